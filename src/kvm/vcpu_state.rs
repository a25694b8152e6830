//! Capture and apply the whole state of one vCPU, in a documented order.
//!
//! Capture order (vCPU paused, in-flight PIO/MMIO already completed):
//! mp_state, regs, sregs, FPU, XSAVE, XCRs, debug regs, LAPIC, MSRs,
//! vcpu_events last, so a pending exception or NMI is read after
//! everything that could have raised it.
//!
//! Apply order: CPUID first (KVM checks MSRs and XSAVE against it), then
//! mp_state, regs, sregs, FPU, XSAVE, XCRs, debug regs, **LAPIC before MSRs**
//! (setting the LAPIC resets its timer; TSC_DEADLINE written before it is
//! dropped and the guest's timer dies), MSRs, vcpu_events last (it may
//! inject a pending event into the state set above).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("snapshot has {0} MSRs or CPUID entries, more than KVM accepts")]
    TooMany(usize),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { what, source }
}

/// `kvm_fpu` has no serde support in kvm-bindings; this mirrors it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: Vec<[u8; 16]>,
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: Vec<[u8; 16]>,
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        for (d, s) in f.fpr.iter_mut().zip(&self.fpr) {
            *d = *s;
        }
        for (d, s) in f.xmm.iter_mut().zip(&self.xmm) {
            *d = *s;
        }
        f
    }
}

#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    pub xsave: Option<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

/// By hand: `kvm_xsave` is not `Clone` (it ends in a zero-length array);
/// its 4 KiB region is all that KVM_GET_XSAVE fills.
impl Clone for VcpuState {
    fn clone(&self) -> Self {
        VcpuState {
            index: self.index,
            cpuid: self.cpuid.clone(),
            mp_state: self.mp_state,
            regs: self.regs,
            sregs: self.sregs,
            fpu: self.fpu.clone(),
            xsave: self.xsave.as_ref().map(|x| kvm_xsave {
                region: x.region,
                ..Default::default()
            }),
            xcrs: self.xcrs,
            debugregs: self.debugregs,
            lapic: self.lapic,
            msrs: self.msrs.clone(),
            vcpu_events: self.vcpu_events,
            tsc_khz: self.tsc_khz,
        }
    }
}

/// Reads `indices` in batches. KVM_GET_MSRS stops at the first MSR it cannot
/// read and returns how many it did (no errno), so skip that one and go on.
pub fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany(entries.len()))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm("read MSRs"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    Ok(out)
}

pub fn capture(
    vcpu: &VcpuFd,
    index: u32,
    msr_indices: &[u32],
    has_xsave: bool,
) -> Result<VcpuState, VcpuStateError> {
    let mp_state = vcpu.get_mp_state().map_err(kvm("read mp_state"))?;
    let regs = vcpu.get_regs().map_err(kvm("read registers"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("read special registers"))?;
    let fpu = FpuState::from(&vcpu.get_fpu().map_err(kvm("read the FPU"))?);
    let xsave = if has_xsave {
        Some(vcpu.get_xsave().map_err(kvm("read XSAVE state"))?)
    } else {
        None
    };
    let xcrs = if has_xsave {
        Some(vcpu.get_xcrs().map_err(kvm("read XCRs"))?)
    } else {
        None
    };
    let debugregs = vcpu.get_debug_regs().map_err(kvm("read debug registers"))?;
    let lapic = vcpu.get_lapic().map_err(kvm("read the LAPIC"))?;
    let msrs = read_msrs(vcpu, msr_indices)?;
    let vcpu_events = vcpu.get_vcpu_events().map_err(kvm("read vCPU events"))?;
    let cpuid = vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("read CPUID"))?
        .as_slice()
        .to_vec();
    let tsc_khz = vcpu.get_tsc_khz().ok();
    Ok(VcpuState {
        index,
        cpuid,
        mp_state,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        vcpu_events,
        tsc_khz,
    })
}

/// Applies `state` in the order documented at the top of this file. Returns
/// the MSRs KVM refused (the rest were applied).
pub fn apply(vcpu: &VcpuFd, state: &VcpuState) -> Result<Vec<u32>, VcpuStateError> {
    let cpuid = CpuId::from_entries(&state.cpuid)
        .map_err(|_| VcpuStateError::TooMany(state.cpuid.len()))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
    vcpu.set_mp_state(state.mp_state)
        .map_err(kvm("set mp_state"))?;
    vcpu.set_regs(&state.regs).map_err(kvm("set registers"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(kvm("set special registers"))?;
    vcpu.set_fpu(&state.fpu.to_kvm())
        .map_err(kvm("set the FPU"))?;
    if let Some(xsave) = &state.xsave {
        // SAFETY: the buffer is a whole kvm_xsave read by KVM_GET_XSAVE on
        // a vCPU with the same CPUID, which was just set.
        unsafe { vcpu.set_xsave(xsave) }.map_err(kvm("set XSAVE state"))?;
    }
    if let Some(xcrs) = &state.xcrs {
        vcpu.set_xcrs(xcrs).map_err(kvm("set XCRs"))?;
    }
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(kvm("set debug registers"))?;
    vcpu.set_lapic(&state.lapic).map_err(kvm("set the LAPIC"))?;
    let refused = write_msrs(vcpu, &state.msrs)?;
    vcpu.set_vcpu_events(&state.vcpu_events)
        .map_err(kvm("set vCPU events"))?;
    Ok(refused)
}

/// The FPU part of [`apply`] alone (a fuzzer's reset writes only what changed).
pub fn apply_fpu(vcpu: &VcpuFd, fpu: &FpuState) -> Result<(), VcpuStateError> {
    vcpu.set_fpu(&fpu.to_kvm()).map_err(kvm("set the FPU"))
}

/// KVM_SET_MSRS stops at the first MSR it refuses: apply the rest after it
/// and report the refused ones.
pub fn write_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<Vec<u32>, VcpuStateError> {
    let mut refused = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest).map_err(|_| VcpuStateError::TooMany(rest.len()))?;
        let n = vcpu.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
        if let Some(bad) = rest.get(n) {
            refused.push(bad.index);
        }
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    Ok(refused)
}

impl VcpuState {
    /// A human-readable summary for `rewind snapshot info --vcpus`: enough to
    /// tell where the guest was (RIP, ring, page table) and what was pending.
    pub fn describe(&self) -> String {
        let r = &self.regs;
        let s = &self.sregs;
        let e = &self.vcpu_events;
        let mut out = format!(
            "vcpu {}: mp_state {} rip {:#x} rsp {:#x} rflags {:#x} cpl {} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}\n",
            self.index,
            self.mp_state.mp_state,
            r.rip,
            r.rsp,
            r.rflags,
            s.cs.selector & 3,
            s.cr0,
            s.cr3,
            s.cr4,
            s.efer
        );
        out += &format!(
            "  rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x}\n  r8 {:#x} r9 {:#x} r10 {:#x} r11 {:#x} r12 {:#x} r13 {:#x} r14 {:#x} r15 {:#x}\n",
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
        );
        out += &format!(
            "  cs {:#x} ss {:#x} fs.base {:#x} gs.base {:#x} apic_base {:#x} interrupt_bitmap {:x?}\n",
            s.cs.selector, s.ss.selector, s.fs.base, s.gs.base, s.apic_base, s.interrupt_bitmap
        );
        out += &format!(
            "  events: exception inj {} nr {} pending {}; interrupt inj {} nr {} shadow {}; nmi inj {} pending {} masked {}; flags {:#x}\n",
            e.exception.injected,
            e.exception.nr,
            e.exception.pending,
            e.interrupt.injected,
            e.interrupt.nr,
            e.interrupt.shadow,
            e.nmi.injected,
            e.nmi.pending,
            e.nmi.masked,
            e.flags
        );
        out += "  msrs:";
        for m in &self.msrs {
            out += &format!(" {:#x}={:#x}", m.index, m.data);
        }
        out
    }
}
