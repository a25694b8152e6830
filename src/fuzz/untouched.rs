//! Which vCPU state a reset may leave unread because the guest provably
//! did not change it, and the proof.
//!
//! - mp_state, after an input that ended at a doorbell: the vCPU had just
//!   executed the doorbell's store, so it was runnable (one vCPU: no INIT
//!   or SIPI can come), and a reset's other writes do not change it.
//! - XCRs, debug registers and MSRs: only ring-0 code can write them
//!   (XSETBV, MOV DR, WRMSR), or an exception (DR6) or interrupt delivery.
//!   On PVM every guest ring-0 instruction goes through KVM's emulator, so
//!   the vCPU's `insn_emulation` statistic counts it, and each exception or
//!   interrupt shows in `pf_guest`, `irq_injections` or the emulated
//!   handler. If, since the reset before, the only emulated instructions
//!   were the MMIO accesses (`insn_emulation` grew exactly as `mmio_exits`),
//!   no port I/O, halt, hypercall, injected interrupt, NMI or guest page
//!   fault happened, and the input ended at a doorbell (not a triple fault
//!   or a timeout), the guest never ran ring-0 code and those parts are as
//!   the last reset left them. Two things change MSRs without ring-0 code:
//!   a TSC-deadline timer firing (clears IA32_TSC_DEADLINE) and branch
//!   recording (LBR MSRs, DEBUGCTL bit 0), so the proof is used only when
//!   the snapshot has neither the LAPIC timer running nor DEBUGCTL set.
//!   On hardware KVM ring-0 code runs natively, uncounted: never used there.

use kvm_bindings::{kvm_lapic_state, kvm_msr_entry};
use kvm_ioctls::VcpuFd;

use crate::kvm::vcpu_stats::{Counters, VcpuStats, LEAVING_RING3, NAMES};

const MSR_IA32_DEBUGCTL: u32 = 0x1d9;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const APIC_LVTT: usize = 0x320;
const APIC_TMICT: usize = 0x380;

/// Reads the vCPU's statistics at each reset and says whether the guest
/// stayed out of ring 0 since the reset before.
#[derive(Default)]
pub(crate) struct Ring0Watch {
    /// PVM host, the vCPU on the harness's thread (statistics are read
    /// there, outside the vCPU thread's seccomp filter), no timer, no LBR.
    enabled: bool,
    stats: Option<VcpuStats>,
    /// The counters when the vCPU state last equalled the snapshot's.
    last: Option<Counters>,
}

impl Ring0Watch {
    pub(crate) fn new(enabled: bool) -> Ring0Watch {
        Ring0Watch {
            enabled,
            stats: None,
            last: None,
        }
    }

    /// The counters now, and whether the guest provably ran no ring-0 code
    /// since the last [`Ring0Watch::equal_at`]. `after_doorbell`: the input
    /// ended at a doorbell store.
    pub(crate) fn check(&mut self, fd: &VcpuFd, after_doorbell: bool) -> (Option<Counters>, bool) {
        if !self.enabled {
            return (None, false);
        }
        if self.stats.is_none() {
            match VcpuStats::open(fd) {
                Ok(s) => self.stats = Some(s),
                Err(e) => {
                    eprintln!("rewind: {e}; every reset reads the whole vCPU state");
                    self.enabled = false;
                    return (None, false);
                }
            }
        }
        let now = self.stats.as_ref().and_then(|s| s.read().ok());
        let proven = match (self.last.take(), now) {
            (Some(before), Some(now)) => after_doorbell && only_ring3(&before, &now),
            _ => false,
        };
        (now, proven)
    }

    /// The vCPU state equals the snapshot's as of `counters` (a reset's
    /// vCPU half succeeded).
    pub(crate) fn equal_at(&mut self, counters: Option<Counters>) {
        self.last = counters;
    }
}

fn only_ring3(before: &Counters, now: &Counters) -> bool {
    let delta = |name: &str| {
        let i = NAMES
            .iter()
            .position(|n| *n == name)
            .expect("a known counter");
        now[i].wrapping_sub(before[i])
    };
    delta("insn_emulation") == delta("mmio_exits") && LEAVING_RING3.iter().all(|n| delta(n) == 0)
}

/// Neither a LAPIC timer that could fire (and clear TSC_DEADLINE) nor
/// branch recording, in the snapshot.
pub(crate) fn no_msr_side_effects(lapic: &kvm_lapic_state, msrs: &[kvm_msr_entry]) -> bool {
    let reg = |at: usize| {
        let b: Vec<u8> = lapic.regs[at..at + 4].iter().map(|&c| c as u8).collect();
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    };
    let msr = |index: u32| msrs.iter().find(|m| m.index == index).map(|m| m.data);
    let lvtt = reg(APIC_LVTT);
    let masked = lvtt & (1 << 16) != 0;
    // KVM clears TSC_DEADLINE when that timer fires, masked or not.
    let timer_idle = match (lvtt >> 17) & 3 {
        2 => msr(MSR_IA32_TSC_DEADLINE) == Some(0),
        _ => masked || reg(APIC_TMICT) == 0,
    };
    timer_idle && msr(MSR_IA32_DEBUGCTL) == Some(0)
}
