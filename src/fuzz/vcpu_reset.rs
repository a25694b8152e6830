//! A reset's vCPU half: each part of the vCPU's state put back to the
//! snapshot's, read only where it may have changed (fuzz::untouched says
//! what need not be), written only where it differs, each step timed.

use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, kvm_sync_regs, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{SyncReg, VcpuFd};

use super::reset::ResetTimes;
use super::untouched::Ring0Watch;
use crate::kvm::vcpu_state::{self, VcpuState};

/// IA32_TSC: the guest's TSC runs on across resets, as its clock does (PVM
/// cannot set it at all; on hardware a reset that moved it back would make
/// guest time run backwards between inputs).
pub(super) const MSR_TSC: u32 = 0x10;

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

/// Per part timings and what the reset proved, kept across resets (the
/// vCPU half runs on the vCPU's thread, the caller reads it).
#[derive(Default)]
pub(super) struct PartCost {
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

impl PartCost {
    /// `sync_ok`: KVM offers KVM_CAP_SYNC_REGS; `lapic_sealed`: see
    /// fuzz::untouched::lapic_sealed.
    pub(super) fn new(sync_ok: bool, watch: Ring0Watch, lapic_sealed: bool) -> PartCost {
        PartCost {
            sync_ok,
            watch,
            lapic_sealed,
            ..PartCost::default()
        }
    }

    /// The vCPU task made KVM drop its shadows (CR3 had moved).
    pub(super) fn count_cr3_reload(&mut self) {
        self.cr3_reloads += 1;
    }

    /// Puts the vCPU back to `snap` (`msrs`: the MSRs to compare).
    /// `then_runs`: the vCPU enters the guest right after, so the state may
    /// go in through `kvm_run` (see [`restore_with_sync`]). Returns whether
    /// CR3 had moved (KVM's shadows of the guest's page tables must go).
    pub(super) fn put_back(
        &mut self,
        fd: &mut VcpuFd,
        snap: &VcpuState,
        msrs: &[u32],
        then_runs: bool,
        ended: InputEnd,
    ) -> Result<bool, vcpu_state::VcpuStateError> {
        let t = Instant::now();
        let (counters, proven) = self.watch.check(fd, ended.at_doorbell);
        let skip = Skip {
            mp_state: ended.at_doorbell && snap.mp_state.mp_state == KVM_MP_STATE_RUNNABLE,
            ring0: proven,
            lapic: proven && self.lapic_sealed,
        };
        let moved = if then_runs {
            restore_with_sync(fd, snap, msrs, self, skip, ended.write_unfinished)
        } else {
            restore_vcpu(fd, snap, msrs, self, None, skip)
        }?;
        self.watch.equal_at(counters);
        self.ring0_unread += u64::from(proven);
        self.lapic_unread += u64::from(skip.lapic);
        self.total += t.elapsed();
        Ok(moved)
    }

    /// This half's share of `times`.
    pub(super) fn fill(&self, times: &mut ResetTimes) {
        times.vcpu_state = self.total;
        times.slot_reloads += self.cr3_reloads;
        times.ring0_unread = self.ring0_unread;
        times.lapic_unread = self.lapic_unread;
        times.writes_left_to_run = self.writes_left_to_run;
        times.vcpu_parts = PARTS
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, self.get[i], self.set[i], self.sets[i]))
            .collect();
    }
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
