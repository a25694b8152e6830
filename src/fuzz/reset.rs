//! A snapshot held in memory and the reset back to it: only the pages
//! dirtied since (KVM's dirty log OR vm-memory's bitmap), only the vCPU and
//! VM state that differs (read, compare, write what changed; the registers
//! and the FPU are written every time, unread), the devices, and the
//! shadow-MMU flush only when a restored page was a page table.
//!
//! The vCPU must be stopped (a doorbell parked it, it triple-faulted, or it
//! was paused) for both. Every step is timed, per part, in [`ResetTimes`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_irqchip;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use zerocopy::IntoBytes;

use super::hot::HotPages;
use super::pagetables::page_table_pages;
use super::untouched::{lapic_sealed, no_msr_side_effects, Ring0Watch};
use super::vcpu_reset::{InputEnd, PartCost, MSR_TSC};
use super::FuzzError;
use crate::arch::host::HostKind;
use crate::devices::bus::lock;
use crate::kvm::vcpu::VcpuTask;
use crate::kvm::vcpu_state::VcpuState;
use crate::kvm::vm::SlotReloader;
use crate::memory::PAGE_SIZE;
use crate::snapshot::Persist;
use crate::vmm::{MachineState, Vmm};

/// Where a reset spends its time, summed over resets.
#[derive(Debug, Clone, Default)]
pub struct ResetTimes {
    pub resets: u64,
    /// KVM_GET_DIRTY_LOG and vm-memory's bitmap.
    pub dirty_log: Duration,
    /// Copying dirtied pages back.
    pub page_copy: Duration,
    /// Re-registering the memory slots (shadow paging, a page table restored).
    pub slot_reload: Duration,
    /// The vCPU's registers, read, compared and written where they differ,
    /// measured on the vCPU thread as it resumes.
    pub vcpu_state: Duration,
    /// Handing that work to the vCPU thread (not waited for).
    pub vcpu_round_trip: Duration,
    /// From the vCPU told to run until the harness holds the guest's event:
    /// the input's own run and the hand-offs around it.
    pub guest_run: Duration,
    /// Irqchips and PIT (read, written back where they differ).
    pub irqchips: Duration,
    /// rewind's own devices, the doorbell registers and the disks' scratch
    /// layers (emptied: the disk writes since the snapshot are dropped).
    pub devices: Duration,
    pub pages_copied: u64,
    /// Pages kept writable and copied back at every reset (fuzz::hot), now.
    pub hot_pages: u64,
    pub slot_reloads: u64,
    /// Resets that left XCRs, debug registers and MSRs unread: the vCPU's
    /// statistics proved the guest ran no ring-0 code (fuzz::untouched).
    pub ring0_unread: u64,
    /// Of those, resets that also left the LAPIC unread: the snapshot showed
    /// no interrupt could reach it (fuzz::untouched::lapic_sealed).
    pub lapic_unread: u64,
    /// Resets that left the doorbell's MMIO write for the input's run to
    /// finish (nothing had to be read: one KVM_RUN fewer).
    pub writes_left_to_run: u64,
    /// Per vCPU state part: (name, time reading, time writing, writes).
    pub vcpu_parts: Vec<(&'static str, Duration, Duration, u64)>,
}

/// A snapshot taken into memory: no files.
pub(crate) struct MemSnapshot {
    /// One copy per memory slot, zero pages left untouched (never faulted in).
    regions: Vec<Vec<u8>>,
    state: MachineState,
    vcpus: Vec<Arc<VcpuState>>,
    /// The fuzzing doorbell's registers (not in `state`, see debug_console).
    doorbell: (u64, u64),
    /// Per slot, one bit per page: page tables reachable from CR3.
    page_tables: Vec<Vec<u64>>,
    /// MSRs to compare on reset (all but the TSC).
    /// Shared with every reset's vCPU task, so none copies the list.
    msrs: Arc<[u32]>,
    cost: Arc<Mutex<PartCost>>,
    /// Where KVM shadows the guest's page tables: the slot reload a vCPU
    /// task does itself when CR3 had moved.
    reloader: Option<Arc<SlotReloader>>,
    hot: Mutex<HotPages>,
}

fn region_ptr<R: GuestMemoryRegion>(r: &R) -> *mut u8 {
    r.get_host_address(vm_memory::MemoryRegionAddress(0))
        .unwrap_or(std::ptr::null_mut())
}

impl MemSnapshot {
    /// Captures the stopped VM. From here the dirty log counts from this
    /// snapshot, so the file snapshot a later revert would copy back from is
    /// forgotten (its next revert copies everything, as after a restore).
    pub fn take(vmm: &mut Vmm) -> Result<MemSnapshot, FuzzError> {
        vmm.baseline = None;
        // An earlier snapshot's hot pages go back under the log first, so
        // the read below re-protects them and counts from here.
        vmm.vm.forget_hot();
        vmm.take_dirty_logs()?;
        let page = PAGE_SIZE as usize;
        let mut regions = Vec::new();
        for r in vmm.mem.iter() {
            let len = r.len() as usize;
            // SAFETY: the region is a live mapping of `len` bytes owned by
            // guest memory; the vCPU is stopped, so nothing writes it now.
            let src = unsafe { std::slice::from_raw_parts(region_ptr(r), len) };
            let mut copy = vec![0u8; len];
            for (d, s) in copy.chunks_exact_mut(page).zip(src.chunks_exact(page)) {
                if s.iter().any(|&b| b != 0) {
                    d.copy_from_slice(s);
                }
            }
            regions.push(copy);
        }
        let state = vmm.save_state()?;
        let mut page_tables: Vec<Vec<u64>> = regions
            .iter()
            .map(|r| vec![0u64; (r.len() / page).div_ceil(64)])
            .collect();
        let slots = crate::memory::regions(&vmm.mem);
        for v in &state.vcpus {
            let s = &v.sregs;
            for pfn in page_table_pages(&vmm.mem, s.cr0, s.cr3, s.cr4, s.efer) {
                let gpa = pfn * PAGE_SIZE;
                for (i, (start, size, _)) in slots.iter().enumerate() {
                    if gpa >= *start && gpa < start + size {
                        let p = ((gpa - start) / PAGE_SIZE) as usize;
                        page_tables[i][p / 64] |= 1 << (p % 64);
                    }
                }
            }
        }
        // Statistics are read on the harness's thread only (the vCPU
        // thread's seccomp filter has no need for them).
        let watch = vmm.host == HostKind::Pvm
            && vmm.vcpus.len() == 1
            && vmm.vcpus[0].inline.is_some()
            && no_msr_side_effects(&state.vcpus[0].lapic, &state.vcpus[0].msrs);
        let sealed = watch
            && lapic_sealed(
                &state.vcpus[0].lapic,
                &state.vcpus[0].msrs,
                &state.vm.ioapic,
            );
        let link = lock(&vmm.devices.debug_console).fuzz_link();
        // Disk writes from here on stay in memory; a reset drops them.
        for d in &vmm.devices.disks {
            lock(&d.disk)
                .begin_scratch()
                .map_err(|e| FuzzError::State(e.to_string()))?;
        }
        let slot_pages: Vec<usize> = regions.iter().map(|r| r.len() / page).collect();
        let hot = HotPages::new(&mut vmm.vm, &page_tables, &slot_pages);
        Ok(MemSnapshot {
            hot: Mutex::new(hot),
            regions,
            vcpus: state.vcpus.iter().cloned().map(Arc::new).collect(),
            state,
            doorbell: link.registers(),
            page_tables,
            msrs: vmm
                .msr_indices
                .iter()
                .copied()
                .filter(|&m| m != MSR_TSC)
                .collect(),
            reloader: match vmm.host.shadows_guest_page_tables() {
                true => Some(Arc::new(vmm.vm.slot_reloader(&vmm.mem).map_err(|e| {
                    FuzzError::State(format!("cannot duplicate the VM fd: {e}"))
                })?)),
                false => None,
            },
            cost: Arc::new(Mutex::new(PartCost::new(
                vmm.vm.kvm.check_extension(kvm_ioctls::Cap::SyncRegs),
                Ring0Watch::new(watch),
                sealed,
            ))),
        })
    }

    /// Puts the stopped VM's memory, VM-wide and device state back to this
    /// snapshot; it stays stopped. The vCPU's own state goes back with
    /// [`MemSnapshot::vcpu_task`], run on its thread as it resumes (one
    /// hand-over per input instead of two).
    pub fn reset(&self, vmm: &mut Vmm, times: &mut ResetTimes) -> Result<(), FuzzError> {
        times.resets += 1;
        let t = Instant::now();
        let dirty = vmm.take_dirty_logs()?;
        times.dirty_log += t.elapsed();

        let t = Instant::now();
        let page = PAGE_SIZE as usize;
        let mut page_table_hit = false;
        for (((r, bitmap), copy), pts) in vmm
            .mem
            .iter()
            .zip(&dirty)
            .zip(&self.regions)
            .zip(&self.page_tables)
        {
            let dst = region_ptr(r);
            for (w, (&bits, &pt)) in bitmap.iter().zip(pts).enumerate() {
                page_table_hit |= bits & pt != 0;
                let mut bits = bits;
                while bits != 0 {
                    let p = w * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    if (p + 1) * page > copy.len() {
                        continue;
                    }
                    // SAFETY: page `p` lies inside both the guest region
                    // (same length as `copy`) and the copy; the vCPU is
                    // stopped, so rewind is the only writer.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            copy.as_ptr().add(p * page),
                            dst.add(p * page),
                            page,
                        )
                    };
                    times.pages_copied += 1;
                }
            }
        }
        times.page_copy += t.elapsed();

        let t = Instant::now();
        let mut hot = self.hot.lock().unwrap_or_else(|p| p.into_inner());
        times.hot_pages = hot.observe(&mut vmm.vm, &dirty) as u64;
        times.dirty_log += t.elapsed();

        if page_table_hit && vmm.host.shadows_guest_page_tables() {
            let t = Instant::now();
            vmm.vm.reload_memory(&vmm.mem)?;
            times.slot_reload += t.elapsed();
            times.slot_reloads += 1;
        }

        let t = Instant::now();
        restore_vm_state(vmm, &self.state)?;
        times.irqchips += t.elapsed();
        let t = Instant::now();
        restore_devices(vmm, &self.state.devices)?;
        for d in &vmm.devices.disks {
            lock(&d.disk).reset_scratch();
        }
        lock(&vmm.devices.debug_console)
            .fuzz_link()
            .set_registers(self.doorbell);
        times.devices += t.elapsed();
        Ok(())
    }

    /// The task that puts vCPU `index` back (see [`MemSnapshot::reset`]).
    /// When the guest had switched address spaces (CR3 moved) and KVM
    /// shadows page tables, it makes KVM drop its shadows too, right there
    /// on the vCPU thread, so the caller need not wait for its answer.
    /// `then_runs`: the vCPU enters the guest right after the task, so the
    /// state may go in through `kvm_run` (see fuzz::vcpu_reset).
    /// `ended`: how the input ended (see fuzz::untouched for what a
    /// doorbell lets a reset leave unread).
    pub fn vcpu_task(&self, index: usize, then_runs: bool, ended: InputEnd) -> VcpuTask {
        let snap = self.vcpus[index].clone();
        let msrs = self.msrs.clone();
        let cost = self.cost.clone();
        let reloader = self.reloader.clone();
        Box::new(move |fd| {
            let mut cost = cost.lock().unwrap_or_else(|p| p.into_inner());
            let moved = cost
                .put_back(fd, &snap, &msrs, then_runs, ended)
                .map_err(|e| e.to_string())?;
            if let (true, Some(r)) = (moved, &reloader) {
                r.reload()
                    .map_err(|e| format!("cannot re-register guest memory: {e}"))?;
                cost.count_cr3_reload();
            }
            Ok(())
        })
    }

    /// The vCPU time split so far (read on the caller's thread).
    pub fn fill_vcpu_times(&self, times: &mut ResetTimes) {
        let c = self.cost.lock().unwrap_or_else(|p| p.into_inner());
        c.fill(times);
    }

    pub fn vcpu_states(&self) -> &[Arc<VcpuState>] {
        &self.vcpus
    }

    pub fn machine_state(&self) -> &MachineState {
        &self.state
    }

    pub fn regions(&self) -> &[Vec<u8>] {
        &self.regions
    }

    pub fn compared_msrs(&self) -> &[u32] {
        &self.msrs
    }
}

/// Each device whose state differs from the snapshot's, through the same
/// `Persist::restore` a revert uses (a UART's restore rebuilds it, costing
/// more than the compare). Most of the time measured here is waiting for
/// the debug console's lock, which the vCPU thread holds until its
/// doorbell exit is through: hand-over latency, not work.
fn restore_devices(vmm: &Vmm, want: &crate::vmm::DevicesState) -> Result<(), FuzzError> {
    fn put<D: Persist>(dev: &std::sync::Mutex<D>, want: &D::State) -> Result<(), FuzzError>
    where
        D::State: PartialEq,
    {
        let mut d = lock(dev);
        if d.save() != *want {
            d.restore(want).map_err(FuzzError::State)?;
        }
        Ok(())
    }
    let d = &vmm.devices;
    put(&d.com1, &want.com1)?;
    put(&d.com2, &want.com2)?;
    put(&d.acpi_pm, &want.acpi_pm)?;
    put(&d.i8042, &want.i8042)?;
    put(&d.exit_port, &want.exit_port)?;
    put(&d.debug_console, &want.debug_console)?;
    for (disk, w) in d.disks.iter().zip(&want.disks) {
        put(&disk.transport, &w.transport)?;
    }
    Ok(())
}

/// Irqchips and PIT: read, and written back only where they differ (the
/// KVM clock runs on, like the TSC).
fn restore_vm_state(vmm: &Vmm, state: &MachineState) -> Result<(), FuzzError> {
    let fd = &vmm.vm.fd;
    let kvm = |what: &'static str| move |e| FuzzError::Kvm(what, e);
    for want in [&state.vm.pic_master, &state.vm.pic_slave, &state.vm.ioapic] {
        let mut now = kvm_irqchip {
            chip_id: want.chip_id,
            ..Default::default()
        };
        fd.get_irqchip(&mut now).map_err(kvm("read an irqchip"))?;
        if now.as_bytes() != want.as_bytes() {
            fd.set_irqchip(want).map_err(kvm("restore an irqchip"))?;
        }
    }
    let pit = fd.get_pit2().map_err(kvm("read the PIT"))?;
    if pit != state.vm.pit {
        fd.set_pit2(&state.vm.pit).map_err(kvm("restore the PIT"))?;
    }
    Ok(())
}
