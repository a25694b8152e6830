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

use kvm_bindings::{kvm_irqchip, kvm_msr_entry, kvm_sync_regs, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{SyncReg, VcpuFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use zerocopy::IntoBytes;

use super::hot::HotPages;
use super::pagetables::page_table_pages;
use super::untouched::{lapic_sealed, no_msr_side_effects, Ring0Watch};
use super::FuzzError;
use crate::arch::host::HostKind;
use crate::devices::bus::lock;
use crate::kvm::vcpu::VcpuTask;
use crate::kvm::vcpu_state::{self, VcpuState};
use crate::kvm::vm::SlotReloader;
use crate::memory::PAGE_SIZE;
use crate::snapshot::Persist;
use crate::vmm::{MachineState, Vmm};

/// IA32_TSC: the guest's TSC runs on across resets, as its clock does (PVM
/// cannot set it at all; on hardware a reset that moved it back would make
/// guest time run backwards between inputs).
const MSR_TSC: u32 = 0x10;

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

/// The vCPU state parts in apply order (see kvm::vcpu_state).
const PARTS: [&str; 9] = [
    "mp_state",
    "regs",
    "sregs",
    "fpu/xsave",
    "xcrs",
    "debugregs",
    "lapic",
    "msrs",
    "events",
];

#[derive(Default)]
struct PartCost {
    get: [Duration; 9],
    set: [Duration; 9],
    sets: [u64; 9],
    total: Duration,
    /// KVM offers KVM_CAP_SYNC_REGS (registers through `kvm_run`).
    sync_ok: bool,
    /// Slot reloads done on the vCPU thread (CR3 had moved).
    cr3_reloads: u64,
    /// The valid bits are set, so `kvm_run` holds the state of the last exit.
    sync_valid: bool,
    watch: Ring0Watch,
    ring0_unread: u64,
    /// The snapshot seals the LAPIC (fuzz::untouched::lapic_sealed).
    lapic_sealed: bool,
    lapic_unread: u64,
    writes_left_to_run: u64,
}

/// How the input before a reset ended.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct InputEnd {
    /// At a doorbell store (see fuzz::untouched).
    pub(crate) at_doorbell: bool,
    /// The vCPU stopped at an MMIO write that its next KVM_RUN finishes
    /// (kvm::vcpu_inline): state read before then must finish it first.
    pub(crate) write_unfinished: bool,
}

/// Parts a reset leaves unread, each proven unchanged (fuzz::untouched).
#[derive(Clone, Copy, Default)]
struct Skip {
    mp_state: bool,
    ring0: bool,
    lapic: bool,
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
    msrs: Vec<u32>,
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
            cost: Arc::new(Mutex::new(PartCost {
                sync_ok: vmm.vm.kvm.check_extension(kvm_ioctls::Cap::SyncRegs),
                watch: Ring0Watch::new(watch),
                lapic_sealed: sealed,
                ..PartCost::default()
            })),
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
    /// state may go in through `kvm_run` (see [`restore_with_sync`]).
    /// `ended`: how the input ended (see fuzz::untouched for what a
    /// doorbell lets a reset leave unread).
    pub fn vcpu_task(&self, index: usize, then_runs: bool, ended: InputEnd) -> VcpuTask {
        let after_doorbell = ended.at_doorbell;
        let snap = self.vcpus[index].clone();
        let msrs = self.msrs.clone();
        let cost = self.cost.clone();
        let reloader = self.reloader.clone();
        Box::new(move |fd| {
            let mut cost = cost.lock().unwrap_or_else(|p| p.into_inner());
            let t = Instant::now();
            let (counters, proven) = cost.watch.check(fd, after_doorbell);
            let skip = Skip {
                mp_state: after_doorbell && snap.mp_state.mp_state == KVM_MP_STATE_RUNNABLE,
                ring0: proven,
                lapic: proven && cost.lapic_sealed,
            };
            let moved = if then_runs {
                restore_with_sync(fd, &snap, &msrs, &mut cost, skip, ended.write_unfinished)
            } else {
                restore_vcpu(fd, &snap, &msrs, &mut cost, None, skip)
            }
            .map_err(|e| e.to_string())?;
            cost.watch.equal_at(counters);
            cost.ring0_unread += u64::from(proven);
            cost.lapic_unread += u64::from(skip.lapic);
            cost.total += t.elapsed();
            if let (true, Some(r)) = (moved, &reloader) {
                r.reload()
                    .map_err(|e| format!("cannot re-register guest memory: {e}"))?;
                cost.cr3_reloads += 1;
            }
            Ok(())
        })
    }

    /// The vCPU time split so far (read on the caller's thread).
    pub fn fill_vcpu_times(&self, times: &mut ResetTimes) {
        let c = self.cost.lock().unwrap_or_else(|p| p.into_inner());
        times.vcpu_state = c.total;
        times.slot_reloads += c.cr3_reloads;
        times.ring0_unread = c.ring0_unread;
        times.lapic_unread = c.lapic_unread;
        times.writes_left_to_run = c.writes_left_to_run;
        times.vcpu_parts = PARTS
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, c.get[i], c.set[i], c.sets[i]))
            .collect();
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

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> vcpu_state::VcpuStateError {
    move |source| vcpu_state::VcpuStateError::Kvm { what, source }
}

type Get<'a> = &'a mut dyn FnMut() -> Result<bool, vcpu_state::VcpuStateError>;
type Set<'a> = &'a mut dyn FnMut() -> Result<(), vcpu_state::VcpuStateError>;

/// One part: read it (`get` says whether it equals the snapshot's), write
/// it only if not, timing both.
fn step(
    cost: &mut PartCost,
    i: usize,
    get: Get,
    set: Set,
) -> Result<(), vcpu_state::VcpuStateError> {
    let t = Instant::now();
    let same = get()?;
    cost.get[i] += t.elapsed();
    if !same {
        let t = Instant::now();
        set()?;
        cost.set[i] += t.elapsed();
        cost.sets[i] += 1;
    }
    Ok(())
}

/// [`restore_vcpu`] with KVM_CAP_SYNC_REGS where KVM has it: the registers,
/// special registers and pending events KVM stored in `kvm_run` at the last
/// exit are read from there (no ioctl), and the registers and events go back
/// the same way, applied by KVM as the vCPU next enters (events still last).
/// Only for a restore followed by a run: a later KVM_GET_REGS would not see
/// the registers until then. `write_unfinished`: KVM has yet to finish the
/// MMIO write the vCPU stopped at; it is left to the coming run unless some
/// part must be read (the vCPU's state is exact only once it is finished).
fn restore_with_sync(
    fd: &mut VcpuFd,
    snap: &VcpuState,
    msr_indices: &[u32],
    cost: &mut PartCost,
    skip: Skip,
    write_unfinished: bool,
) -> Result<bool, vcpu_state::VcpuStateError> {
    let reads = !(skip.mp_state && skip.ring0 && skip.lapic && cost.sync_valid);
    match (write_unfinished, reads) {
        (true, true) => crate::kvm::vcpu::complete_in_flight_io(fd),
        (true, false) => cost.writes_left_to_run += 1,
        (false, _) => {}
    }
    // kvm_run holds them only after an exit with the valid bits set.
    let synced = cost.sync_valid.then(|| fd.sync_regs());
    let moved = restore_vcpu(fd, snap, msr_indices, cost, synced.as_ref(), skip)?;
    if let Some(now) = synced {
        let t = Instant::now();
        fd.sync_regs_mut().regs = snap.regs;
        fd.set_sync_dirty_reg(SyncReg::Register);
        cost.set[1] += t.elapsed();
        cost.sets[1] += 1;
        if now.events != snap.vcpu_events {
            fd.sync_regs_mut().events = snap.vcpu_events;
            fd.set_sync_dirty_reg(SyncReg::VcpuEvents);
            cost.sets[8] += 1;
        }
    }
    if cost.sync_ok {
        fd.set_sync_valid_reg(SyncReg::Register);
        fd.set_sync_valid_reg(SyncReg::SystemRegister);
        fd.set_sync_valid_reg(SyncReg::VcpuEvents);
        cost.sync_valid = true;
    }
    Ok(moved)
}

/// Reads each part, writes it back only if it differs from the snapshot, in
/// kvm::vcpu_state's apply order (LAPIC before MSRs, events last). Returns
/// whether CR3 had moved (a new address space: KVM's shadows must go).
fn restore_vcpu(
    fd: &VcpuFd,
    snap: &VcpuState,
    msr_indices: &[u32],
    cost: &mut PartCost,
    synced: Option<&kvm_sync_regs>,
    skip: Skip,
) -> Result<bool, vcpu_state::VcpuStateError> {
    step(
        cost,
        0,
        &mut || {
            Ok(skip.mp_state
                || fd.get_mp_state().map_err(kvm_err("read mp_state"))? == snap.mp_state)
        },
        &mut || {
            fd.set_mp_state(snap.mp_state)
                .map_err(kvm_err("set mp_state"))
        },
    )?;
    // The registers always changed: the guest ran. With synced registers
    // they go in through kvm_run as the vCPU enters (see restore_with_sync).
    if synced.is_none() {
        step(cost, 1, &mut || Ok(false), &mut || {
            fd.set_regs(&snap.regs).map_err(kvm_err("set registers"))
        })?;
    }
    let mut moved = false;
    step(
        cost,
        2,
        &mut || {
            let now = match synced {
                Some(s) => s.sregs,
                None => fd.get_sregs().map_err(kvm_err("read special registers"))?,
            };
            moved = now.cr3 != snap.sregs.cr3;
            Ok(now == snap.sregs)
        },
        &mut || {
            fd.set_sregs(&snap.sregs)
                .map_err(kvm_err("set special registers"))
        },
    )?;
    // Written, not compared: ring-3 code changes it freely (most targets'
    // every memcpy), writing costs what reading does, and a write needs no
    // finished MMIO write (see restore_with_sync).
    match &snap.xsave {
        // XSAVE holds the x87 and SSE state too.
        Some(want) => step(cost, 3, &mut || Ok(false), &mut || {
            // SAFETY: a whole kvm_xsave read by KVM_GET_XSAVE on this vCPU,
            // whose CPUID has not changed since.
            unsafe { fd.set_xsave(want) }.map_err(kvm_err("set XSAVE"))
        })?,
        None => step(cost, 3, &mut || Ok(false), &mut || {
            vcpu_state::apply_fpu(fd, &snap.fpu)
        })?,
    }
    if let (Some(want), false) = (&snap.xcrs, skip.ring0) {
        step(
            cost,
            4,
            &mut || Ok(fd.get_xcrs().map_err(kvm_err("read XCRs"))? == *want),
            &mut || fd.set_xcrs(want).map_err(kvm_err("set XCRs")),
        )?;
    }
    step(
        cost,
        5,
        &mut || {
            Ok(skip.ring0
                || fd
                    .get_debug_regs()
                    .map_err(kvm_err("read debug registers"))?
                    == snap.debugregs)
        },
        &mut || {
            fd.set_debug_regs(&snap.debugregs)
                .map_err(kvm_err("set debug registers"))
        },
    )?;
    step(
        cost,
        6,
        &mut || {
            Ok(skip.lapic
                || fd.get_lapic().map_err(kvm_err("read the LAPIC"))?.regs == snap.lapic.regs)
        },
        &mut || fd.set_lapic(&snap.lapic).map_err(kvm_err("set the LAPIC")),
    )?;
    // By hand, not through `step`: what is written depends on what was read.
    let t = Instant::now();
    let now = match skip.ring0 {
        true => Vec::new(),
        false => vcpu_state::read_msrs(fd, msr_indices)?,
    };
    let changed: Vec<kvm_msr_entry> = snap
        .msrs
        .iter()
        .filter(|m| m.index != MSR_TSC && !skip.ring0)
        .filter(|m| !now.iter().any(|n| n.index == m.index && n.data == m.data))
        .copied()
        .collect();
    cost.get[7] += t.elapsed();
    if !changed.is_empty() {
        let t = Instant::now();
        vcpu_state::write_msrs(fd, &changed)?;
        cost.set[7] += t.elapsed();
        cost.sets[7] += 1;
    }
    if synced.is_some() {
        return Ok(moved);
    }
    step(
        cost,
        8,
        &mut || Ok(fd.get_vcpu_events().map_err(kvm_err("read vCPU events"))? == snap.vcpu_events),
        &mut || {
            fd.set_vcpu_events(&snap.vcpu_events)
                .map_err(kvm_err("set vCPU events"))
        },
    )?;
    Ok(moved)
}
