//! Snapshot, restore, snapshot again (crosvm's suspend/resume test), in one
//! process through the library: the machine state a restored VM reports
//! must be the state it was restored from. A field a save forgets or a
//! restore drops shows up here by name, before any guest notices.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{kvm_available, Home};
use rewind::config::{KernelSource, VmConfig};
use rewind::console::ConsoleTarget;
use rewind::guest::GuestKind;
use rewind::snapshot::format::{encode_state, read_state_file};
use rewind::vmm::{MachineState, RunOptions, Vmm};

/// IA32_TSC: the TSC keeps counting between the save and the second save
/// (KVM runs a paused guest's TSC with the host's).
const MSR_IA32_TSC: u32 = 0x10;
/// The LAPIC timer's current count (TMCCT): KVM computes it from the time
/// left to the next expiry, which passes while the VM is paused.
const LAPIC_TMCCT: usize = 0x390;

/// Zeroes what must differ between two saves of one paused machine taken at
/// different times, or by two VMs: readings of a clock or of the host, not
/// guest state.
fn mask_host_readings(s: &mut MachineState) {
    // The KVM clock runs on from the value the restore set.
    s.vm.clock = Default::default();
    // When each PIT channel was last loaded, in host time: KVM stamps a
    // restored channel with the time of the restore.
    for c in &mut s.vm.pit.channels {
        c.count_load_time = 0;
    }
    // KVM_GET_SUPPORTED_CPUID (kept for the record, never applied) reports
    // the APIC ID of the host CPU the asking thread ran on (measured on
    // PVM: leaf 1 EBX bits 31-24 and leaf 0xb EDX), which is not the guest's.
    for e in &mut s.host_cpuid {
        match (e.function, e.index) {
            (1, 0) => e.ebx &= 0x00ff_ffff,
            (0xb, _) => e.edx = 0,
            _ => {}
        }
    }
    for v in &mut s.vcpus {
        for m in v.msrs.iter_mut().filter(|m| m.index == MSR_IA32_TSC) {
            m.data = 0;
        }
        v.lapic.regs[LAPIC_TMCCT..LAPIC_TMCCT + 4].fill(0);
    }
}

/// The state cut into named parts, each encoded, so a difference is
/// reported by name.
fn parts(s: &MachineState) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |name: String, bytes: Vec<u8>| out.push((name, bytes));
    let enc = |v: &dyn erased::Enc| v.enc();
    add("config".into(), enc(&s.config));
    add("host_cpuid".into(), enc(&s.host_cpuid));
    add("vm.pic_master".into(), enc(&s.vm.pic_master));
    add("vm.pic_slave".into(), enc(&s.vm.pic_slave));
    add("vm.ioapic".into(), enc(&s.vm.ioapic));
    add("vm.pit".into(), enc(&s.vm.pit));
    add("vm.clock".into(), enc(&s.vm.clock));
    for v in &s.vcpus {
        let i = v.index;
        add(format!("vcpu{i}.cpuid"), enc(&v.cpuid));
        add(format!("vcpu{i}.mp_state"), enc(&v.mp_state));
        add(format!("vcpu{i}.regs"), enc(&v.regs));
        add(format!("vcpu{i}.sregs"), enc(&v.sregs));
        add(format!("vcpu{i}.fpu"), enc(&v.fpu));
        add(format!("vcpu{i}.xsave"), enc(&v.xsave));
        add(format!("vcpu{i}.xcrs"), enc(&v.xcrs));
        add(format!("vcpu{i}.debugregs"), enc(&v.debugregs));
        add(format!("vcpu{i}.lapic"), enc(&v.lapic));
        for m in &v.msrs {
            add(format!("vcpu{i}.msr {:#x}", m.index), enc(&m.data));
        }
        add(format!("vcpu{i}.msr count"), enc(&v.msrs.len()));
        add(format!("vcpu{i}.vcpu_events"), enc(&v.vcpu_events));
        add(format!("vcpu{i}.tsc_khz"), enc(&v.tsc_khz));
    }
    let d = &s.devices;
    add("com1".into(), enc(&d.com1));
    add("com2".into(), enc(&d.com2));
    add("acpi_pm".into(), enc(&d.acpi_pm));
    add("i8042".into(), enc(&d.i8042));
    add("exit_port".into(), enc(&d.exit_port));
    add("debug_console".into(), enc(&d.debug_console));
    for (i, disk) in d.disks.iter().enumerate() {
        add(format!("disk{i}.layer"), enc(&disk.layer));
        add(format!("disk{i}.transport"), enc(&disk.transport));
    }
    out
}

mod erased {
    /// Encodes any serializable part (a trait object, so `parts` can name
    /// one closure for all types).
    pub trait Enc {
        fn enc(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Enc for T {
        fn enc(&self) -> Vec<u8> {
            rewind::snapshot::format::encode_state(self).expect("a state part encodes")
        }
    }
}

fn differing(a: &MachineState, b: &MachineState) -> Vec<String> {
    let (pa, pb) = (parts(a), parts(b));
    let mut names: Vec<String> = pa
        .iter()
        .filter(|(name, bytes)| !pb.iter().any(|(n, b)| n == name && b == bytes))
        .map(|(name, _)| name.clone())
        .collect();
    names.extend(
        pb.iter()
            .filter(|(name, _)| !pa.iter().any(|(n, _)| n == name))
            .map(|(name, _)| format!("{name} (only after the restore)")),
    );
    names
}

fn wait_for_line(console: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if text.contains(what) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "the guest never printed {what:?}; console:\n{}",
        std::fs::read_to_string(console).unwrap_or_default()
    );
}

fn options(console: &Path) -> RunOptions {
    RunOptions {
        console: ConsoleTarget::File(console.to_path_buf()),
        expect: None,
        timeout: None,
        exec: None,
        snapshot_when_ready: None,
        start_paused: false,
        escape: None,
    }
}

#[test]
fn restored_machine_state_is_the_saved_one() {
    if !kvm_available("roundtrip") {
        return;
    }
    let home = Home::new("roundtrip");
    // The VM's overlays go under REWIND_HOME; this is the binary's only test.
    std::env::set_var("REWIND_HOME", &home.path);
    let disk = home.path.join("base.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let config = VmConfig {
        name: "rt".into(),
        guest: GuestKind::Test,
        kernel: KernelSource::EmbeddedTestGuest,
        initrd: None,
        // Not mode=disk: its requests are served by the event loop (`run`),
        // which this test does not run; the disk is attached all the same.
        cmdline: "mode=verify region=1 period_ms=20".into(),
        mem_mib: 64,
        cpus: 2,
        acpi: false,
        disks: vec![disk],
    };
    let console = home.path.join("console.txt");
    let mut vmm = Vmm::boot(config, &options(&console)).expect("the test guest boots");
    vmm.resume().unwrap();
    // Some ticks on both vCPUs, so timers and the UART have moved.
    wait_for_line(&console, "cpu0 tick 3 ok");
    wait_for_line(&console, "cpu1 tick 3 ok");
    vmm.pause().unwrap();

    let dir = home.path.join("snap");
    vmm.snapshot_create_at(&dir, "rt", Instant::now(), Default::default())
        .expect("snapshot");
    let saved: MachineState = read_state_file(&dir.join("state.bin")).expect("state.bin reads");
    // The running VM, saved again, is what the file holds.
    let mut again = vmm.save_state().unwrap();
    drop(vmm);

    let restored = Vmm::restore(&dir, "rt", &options(&home.path.join("console2.txt")))
        .expect("the snapshot restores in this process");
    let mut after = restored.save_state().unwrap();
    let mut saved = saved;
    for s in [&mut saved, &mut again, &mut after] {
        mask_host_readings(s);
    }
    assert_eq!(differing(&saved, &again), Vec::<String>::new());
    let diff = differing(&saved, &after);
    assert!(
        diff.is_empty(),
        "the restored VM's state differs from the snapshot's in: {}",
        diff.join(", ")
    );
    // And whole: nothing outside the named parts differs either.
    assert_eq!(encode_state(&saved).unwrap(), encode_state(&after).unwrap());
}
