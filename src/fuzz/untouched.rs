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
//! - The LAPIC, under the same proof, when the snapshot also shows that no
//!   interrupt can reach it ([`lapic_sealed`]). Ring-3 code cannot write
//!   the LAPIC but through its MMIO page, which KVM emulates in the kernel:
//!   an emulated instruction with no MMIO exit, so the proof fails. What is
//!   left is what arrives from outside: an interrupt accepted into IRR (a
//!   fixed interrupt from the IOAPIC, an MSI, another vCPU, the LAPIC timer,
//!   a performance-counter overflow, an async page fault's "page ready")
//!   or the timer's current count moving. Each is ruled out from the
//!   snapshot: one vCPU, every IOAPIC pin masked, the timer stopped, the
//!   performance-counter LVT masked, async page faults off. rewind itself
//!   signals an MSI only when it restores a VM, before any snapshot. An
//!   interrupt that arrived anyway would be injected (`irq_injections`) or
//!   wait in IRR; the first breaks the proof, the second the premises.

use kvm_bindings::{kvm_irqchip, kvm_lapic_state, kvm_msr_entry, KVM_IRQCHIP_IOAPIC};
use kvm_ioctls::VcpuFd;

use crate::kvm::vcpu_stats::{Counters, VcpuStats, LEAVING_RING3, NAMES};

const MSR_IA32_DEBUGCTL: u32 = 0x1d9;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
const APIC_LVTT: usize = 0x320;
const APIC_LVTPC: usize = 0x340;
const APIC_TMICT: usize = 0x380;
const LVT_MASKED: u32 = 1 << 16;
const IOAPIC_PINS: usize = 24;

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
    let reg = |at: usize| lapic_reg(lapic, at);
    let msr = |index: u32| msr(msrs, index);
    let lvtt = reg(APIC_LVTT);
    let masked = lvtt & LVT_MASKED != 0;
    // KVM clears TSC_DEADLINE when that timer fires, masked or not.
    let timer_idle = match (lvtt >> 17) & 3 {
        2 => msr(MSR_IA32_TSC_DEADLINE) == Some(0),
        _ => masked || reg(APIC_TMICT) == 0,
    };
    timer_idle && msr(MSR_IA32_DEBUGCTL) == Some(0)
}

/// Nothing from outside the vCPU can change its LAPIC while the guest runs
/// ring-3 code only (see the module's comment): the timer stopped (not just
/// masked: its current count would move), the performance-counter LVT
/// masked, async page faults off and every IOAPIC pin masked. `ioapic` is
/// the snapshot's KVM_GET_IRQCHIP of the IOAPIC. The caller checks that the
/// VM has one vCPU.
pub(crate) fn lapic_sealed(
    lapic: &kvm_lapic_state,
    msrs: &[kvm_msr_entry],
    ioapic: &kvm_irqchip,
) -> bool {
    let timer_stopped = match (lapic_reg(lapic, APIC_LVTT) >> 17) & 3 {
        2 => msr(msrs, MSR_IA32_TSC_DEADLINE) == Some(0),
        _ => lapic_reg(lapic, APIC_TMICT) == 0,
    };
    let pmi_masked = lapic_reg(lapic, APIC_LVTPC) & LVT_MASKED != 0;
    let async_pf_off = msr(msrs, MSR_KVM_ASYNC_PF_EN).is_none_or(|v| v & 1 == 0);
    timer_stopped && pmi_masked && async_pf_off && ioapic_masked(ioapic)
}

fn ioapic_masked(chip: &kvm_irqchip) -> bool {
    if chip.chip_id != KVM_IRQCHIP_IOAPIC {
        return false;
    }
    // SAFETY: KVM fills the `ioapic` member of the union for this chip id
    // (checked above); every bit pattern is a valid kvm_ioapic_state.
    let ioapic = unsafe { &chip.chip.ioapic };
    ioapic.redirtbl[..IOAPIC_PINS].iter().all(|entry| {
        // SAFETY: `bits` spans the whole 64-bit entry; any value is valid.
        let bits = unsafe { entry.bits };
        bits & u64::from(LVT_MASKED) != 0
    })
}

fn lapic_reg(lapic: &kvm_lapic_state, at: usize) -> u32 {
    let b = &lapic.regs[at..at + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn msr(msrs: &[kvm_msr_entry], index: u32) -> Option<u64> {
    msrs.iter().find(|m| m.index == index).map(|m| m.data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_reg(lapic: &mut kvm_lapic_state, at: usize, v: u32) {
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            lapic.regs[at + i] = b as _;
        }
    }

    /// The test guest's fuzz snapshot: periodic timer with no initial
    /// count, PMI masked (KVM's reset value), every IOAPIC pin masked.
    fn sealed() -> (kvm_lapic_state, Vec<kvm_msr_entry>, kvm_irqchip) {
        let mut lapic = kvm_lapic_state::default();
        set_reg(&mut lapic, APIC_LVTT, 0x30 | (1 << 17));
        set_reg(&mut lapic, APIC_LVTPC, LVT_MASKED);
        let msrs = vec![kvm_msr_entry {
            index: MSR_KVM_ASYNC_PF_EN,
            data: 0,
            ..Default::default()
        }];
        let mut ioapic = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        // SAFETY: the ioapic member for the IOAPIC's chip id, plain data.
        let state = unsafe { &mut ioapic.chip.ioapic };
        for entry in &mut state.redirtbl {
            entry.bits = u64::from(LVT_MASKED);
        }
        (lapic, msrs, ioapic)
    }

    #[test]
    fn each_way_in_for_an_interrupt_unseals_the_lapic() {
        let (lapic, msrs, ioapic) = sealed();
        assert!(lapic_sealed(&lapic, &msrs, &ioapic));

        let mut running = lapic;
        set_reg(&mut running, APIC_TMICT, 1000);
        assert!(!lapic_sealed(&running, &msrs, &ioapic), "timer counting");
        let mut masked_running = running;
        set_reg(&mut masked_running, APIC_LVTT, LVT_MASKED | (1 << 17));
        assert!(
            !lapic_sealed(&masked_running, &msrs, &ioapic),
            "a masked timer still counts"
        );

        let mut deadline = lapic;
        set_reg(&mut deadline, APIC_LVTT, 0x30 | (2 << 17));
        let armed = [kvm_msr_entry {
            index: MSR_IA32_TSC_DEADLINE,
            data: 1 << 40,
            ..Default::default()
        }];
        assert!(!lapic_sealed(&deadline, &armed, &ioapic), "deadline armed");
        let idle = [kvm_msr_entry {
            data: 0,
            ..armed[0]
        }];
        assert!(lapic_sealed(&deadline, &idle, &ioapic));

        let mut pmi = lapic;
        set_reg(&mut pmi, APIC_LVTPC, 0x400);
        assert!(!lapic_sealed(&pmi, &msrs, &ioapic), "PMI as NMI");

        let async_pf = [kvm_msr_entry {
            data: 0x1000 | 1,
            ..msrs[0]
        }];
        assert!(!lapic_sealed(&lapic, &async_pf, &ioapic), "async PF on");

        let mut pin = ioapic;
        // SAFETY: as in sealed().
        unsafe { pin.chip.ioapic.redirtbl[23].bits = 0x31 };
        assert!(!lapic_sealed(&lapic, &msrs, &pin), "pin 23 unmasked");
        let pic = kvm_irqchip {
            chip_id: 0,
            ..ioapic
        };
        assert!(!lapic_sealed(&lapic, &msrs, &pic), "not the IOAPIC");
    }
}
