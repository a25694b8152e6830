//! Bounded boots that record how far a kernel gets on this host: the
//! microvm kernel from its initramfs with two vCPUs up to the point where the
//! second one is up (it is woken by INIT/SIPI into a real-mode trampoline,
//! all emulated on PVM hosts; userspace on two vCPUs is left to
//! `rewind run --guest linux --cpus 2`, minutes more here) and Debian's
//! stock cloud kernel up to its early milestones (its full run belongs to hardware KVM: on PVM
//! its crypto self-tests reach SSE instructions the emulator cannot run).
//! Each run ends at its last milestone (`--expect`) and is capped far above
//! the time that takes here, so a cap that passes is a failure, never luck.
//! The boots take turns with each other (`linux_turn`).

mod common;
use common::*;

fn boot(
    home: &Home,
    kernel: &std::path::Path,
    initrd: &std::path::Path,
    cpus: &str,
    append: &str,
    expect: &str,
    cap_secs: &str,
) -> (Option<i32>, String) {
    let _turn = linux_turn();
    let started = std::time::Instant::now();
    let o = home.run(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cpus",
        cpus,
        "--append",
        append,
        "--console",
        "stdio",
        "--timeout",
        cap_secs,
        "--expect",
        expect,
    ]);
    eprintln!(
        "{} with {cpus} vCPU(s): {:.0} s to {expect:?} (status {:?})",
        kernel.display(),
        started.elapsed().as_secs_f64(),
        o.status.code()
    );
    (o.status.code(), stdout(&o))
}

fn report(name: &str, out: &str, marks: &[&str]) {
    for m in marks {
        let at = out
            .lines()
            .find(|l| l.contains(m))
            .filter(|l| l.starts_with('['))
            .and_then(|l| l.split(']').next())
            .map(|t| t.trim_start_matches('[').trim().to_string());
        eprintln!(
            "{name}: {m:?} at guest time {}",
            at.unwrap_or_else(|| "never".into())
        );
    }
}

#[test]
fn microvm_kernel_finds_and_starts_a_second_cpu() {
    if !kvm_available("linux smp") {
        return;
    }
    let img = rewind::images::linux_images().expect("Linux images build");
    let home = Home::new("smp");
    let (status, out) = boot(
        &home,
        &img.microvm(),
        &img.initramfs(),
        "2",
        "",
        "smp: Brought up 1 node, 2 CPUs",
        "900",
    );
    let marks = [
        "Allowing 2 CPUs",
        "Booting SMP configuration",
        "CPU 1 Converting",
        "Brought up 1 node, 2 CPUs",
    ];
    report("smp", &out, &marks);
    assert!(
        out.contains("smpboot: Allowing 2 present CPUs") || out.contains("Allowing 2 CPUs"),
        "{out}"
    );
    assert!(out.contains("Booting SMP configuration"), "{out}");
    // The AP itself runs: it prints from its own CPU once it is in long mode.
    assert!(out.contains("smpboot: CPU 1 "), "{out}");
    // It used to stop here on PVM hosts: the AP's first IPI was a PV
    // send-IPI hypercall, which never completes there (now hidden).
    assert!(out.contains("smp: Brought up 1 node, 2 CPUs"), "{out}");
    assert_eq!(status, Some(0), "the second CPU did not come up: {out}");
}

/// The kernel configures its CPUs from rewind's MADT.
const MADT_USED: &str = r"Using ACPI \(MADT\) for SMP configuration information";

#[test]
fn stock_debian_kernel_reaches_its_early_milestones() {
    if !kvm_available("linux stock") {
        return;
    }
    let img = rewind::images::linux_images().expect("Linux images build");
    let home = Home::new("stock");
    let (status, out) = boot(
        &home,
        &img.stock(),
        &img.initramfs_stock(),
        "1",
        // Lines as they are printed, not once the serial driver is up
        // (minutes later here): the milestones are all in setup_arch.
        "earlyprintk=serial,ttyS0,115200",
        MADT_USED,
        "600",
    );
    let marks = [
        "Linux version 6.1.0",
        "Hypervisor detected: KVM",
        "ACPI: RSDP",
        "ACPI: FACP",
        "ACPI: APIC",
        "Using ACPI (MADT)",
    ];
    report("stock", &out, &marks);
    assert!(out.contains("Linux version 6.1.0"), "{out}");
    // rewind's ACPI tables are found and parsed by a kernel nobody here wrote.
    assert!(out.contains("ACPI: RSDP 0x00000000000E0000"), "{out}");
    assert!(out.contains("ACPI: FACP"), "{out}");
    assert!(out.contains("ACPI: APIC"), "{out}");
    assert!(out.contains("Hypervisor detected: KVM"), "{out}");
    // The run ends at its last milestone (status 0), not at the cap (124)
    // nor at an instruction the emulator cannot run (1).
    assert_eq!(status, Some(0), "MADT not used: {out}");
}
