//! The slow, complete check behind the reset's exactness test: read the
//! whole machine the way a file snapshot does and list every difference
//! from the in-memory snapshot.

use std::sync::mpsc::channel;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use zerocopy::IntoBytes;

use super::reset::MemSnapshot;
use crate::api::Error;
use crate::kvm::vcpu_state;
use crate::memory::PAGE_SIZE;
use crate::snapshot::Persist;
use crate::vmm::Vmm;

pub(crate) fn differences(vmm: &Vmm, snap: &MemSnapshot) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    let page = PAGE_SIZE as usize;
    for (slot, (r, copy)) in vmm.mem.iter().zip(snap.regions()).enumerate() {
        let ptr = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap_or(std::ptr::null_mut());
        // SAFETY: a live mapping of the region's length; the vCPU is stopped.
        let now = unsafe { std::slice::from_raw_parts(ptr, r.len() as usize) };
        for (p, (a, b)) in now
            .chunks_exact(page)
            .zip(copy.chunks_exact(page))
            .enumerate()
        {
            if a != b {
                out.push(format!("slot {slot} page {p:#x} differs"));
            }
        }
    }
    let msrs = snap.compared_msrs().to_vec();
    for (handle, want) in vmm.vcpus.iter().zip(snap.vcpu_states()) {
        let (tx, rx) = channel();
        let wanted = msrs.clone();
        let index = handle.index as u32;
        let has_xsave = want.xsave.is_some();
        handle
            .run_task(Box::new(move |fd| {
                let s = vcpu_state::capture(fd, index, &wanted, has_xsave)
                    .map_err(|e| e.to_string())?;
                tx.send(s).map_err(|_| "receiver gone".to_string())
            }))
            .map_err(super::FuzzError::from)?;
        let now = rx
            .recv()
            .map_err(|_| Error::Dead("the vCPU thread is gone".into()))?;
        let mut part = |name: &str, same: bool| {
            if !same {
                out.push(format!("vCPU {index}: {name} differs"));
            }
        };
        part("mp_state", now.mp_state == want.mp_state);
        part("regs", now.regs == want.regs);
        part("sregs", now.sregs == want.sregs);
        part("fpu", now.fpu == want.fpu);
        part(
            "xsave",
            now.xsave.as_ref().map(|x| x.region) == want.xsave.as_ref().map(|x| x.region),
        );
        part("xcrs", now.xcrs == want.xcrs);
        part("debugregs", now.debugregs == want.debugregs);
        part("lapic", now.lapic.regs == want.lapic.regs);
        part("vcpu_events", now.vcpu_events == want.vcpu_events);
        for m in want.msrs.iter().filter(|m| msrs.contains(&m.index)) {
            let got = now.msrs.iter().find(|n| n.index == m.index).map(|n| n.data);
            if got != Some(m.data) {
                out.push(format!(
                    "vCPU {index}: MSR {:#x} is {got:#x?}, was {:#x}",
                    m.index, m.data
                ));
            }
        }
    }
    let vm_now = vmm.vm.save_state().map_err(super::FuzzError::from)?;
    let vm_want = &snap.machine_state().vm;
    let chips = [
        ("PIC master", &vm_now.pic_master, &vm_want.pic_master),
        ("PIC slave", &vm_now.pic_slave, &vm_want.pic_slave),
        ("IOAPIC", &vm_now.ioapic, &vm_want.ioapic),
    ];
    for (name, a, b) in chips {
        if a.as_bytes() != b.as_bytes() {
            out.push(format!("{name} differs"));
        }
    }
    if vm_now.pit != vm_want.pit {
        out.push("PIT differs".into());
    }
    let dev_now = vmm.devices.save();
    let dev_want = &snap.machine_state().devices;
    let json = |v: &dyn erased::Ser| v.json();
    let pairs: [(&str, String, String); 6] = [
        ("COM1", json(&dev_now.com1), json(&dev_want.com1)),
        ("COM2", json(&dev_now.com2), json(&dev_want.com2)),
        ("ACPI PM", json(&dev_now.acpi_pm), json(&dev_want.acpi_pm)),
        ("i8042", json(&dev_now.i8042), json(&dev_want.i8042)),
        (
            "exit port",
            json(&dev_now.exit_port),
            json(&dev_want.exit_port),
        ),
        (
            "debug console",
            json(&dev_now.debug_console),
            json(&dev_want.debug_console),
        ),
    ];
    for (name, a, b) in pairs {
        if a != b {
            out.push(format!("device {name} differs"));
        }
    }
    for (i, (a, b)) in dev_now.disks.iter().zip(&dev_want.disks).enumerate() {
        if a.transport != b.transport {
            out.push(format!("disk {i} transport differs"));
        }
    }
    Ok(out)
}

/// Device states differ in type; compare them by their serialized form.
mod erased {
    pub trait Ser {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Ser for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}
