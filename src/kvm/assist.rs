//! Emulation assist for PVM hosts, where KVM's instruction emulator runs
//! guest ring-0 code and gives up on some instructions with
//! `KVM_EXIT_INTERNAL_ERROR`. rewind completes the few that are safe to
//! complete and stops with a clear line (instruction bytes and RIP) on
//! everything else: it never loops silently.

use kvm_bindings::KVM_INTERNAL_ERROR_EMULATION;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// What the assist did.
#[derive(Debug, PartialEq, Eq)]
pub enum Assisted {
    /// `int3`: #BP injected with RIP past the instruction, as hardware does.
    Int3,
    /// `fwait`: no x87 exceptions are pending in a guest rewind boots; skipped.
    Fwait,
}

const INT3: u8 = 0xcc;
const FWAIT: u8 = 0x9b;
const BP_VECTOR: u8 = 3;

fn fetch(vcpu: &VcpuFd, mem: &GuestMemory, rip: u64) -> Option<Vec<u8>> {
    let gpa = vcpu.translate_gva(rip).ok()?;
    if gpa.valid == 0 {
        return None;
    }
    let mut bytes = vec![0u8; 15];
    // An instruction near the end of RAM: take what is there.
    let mut n = 15;
    while n > 0 {
        if mem
            .read_slice(&mut bytes[..n], GuestAddress(gpa.physical_address))
            .is_ok()
        {
            bytes.truncate(n);
            return Some(bytes);
        }
        n -= 1;
    }
    None
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Handles one `KVM_EXIT_INTERNAL_ERROR`. Ok: the vCPU may run on. Err: a
/// one-line reason to stop the VM.
pub fn handle_internal_error(
    vcpu: &mut VcpuFd,
    mem: &GuestMemory,
    cpu: usize,
) -> Result<Assisted, String> {
    let suberror = vcpu.get_kvm_run_internal_suberror();
    let mut regs = vcpu.get_regs().map_err(|e| {
        format!("vCPU {cpu}: KVM internal error {suberror} and registers unreadable: {e}")
    })?;
    let bytes = fetch(vcpu, mem, regs.rip);
    if suberror != KVM_INTERNAL_ERROR_EMULATION {
        return Err(format!(
            "vCPU {cpu}: KVM internal error (suberror {suberror}) at RIP {:#x}",
            regs.rip
        ));
    }
    let Some(bytes) = bytes else {
        return Err(format!(
            "vCPU {cpu}: KVM could not emulate an instruction at RIP {:#x} (not mapped)",
            regs.rip
        ));
    };
    match bytes.first().copied() {
        Some(INT3) => {
            regs.rip += 1;
            vcpu.set_regs(&regs)
                .map_err(|e| format!("vCPU {cpu}: cannot complete int3: {e}"))?;
            let mut events = vcpu
                .get_vcpu_events()
                .map_err(|e| format!("vCPU {cpu}: cannot complete int3: {e}"))?;
            events.exception.injected = 1;
            events.exception.nr = BP_VECTOR;
            events.exception.has_error_code = 0;
            vcpu.set_vcpu_events(&events)
                .map_err(|e| format!("vCPU {cpu}: cannot complete int3: {e}"))?;
            Ok(Assisted::Int3)
        }
        Some(FWAIT) => {
            regs.rip += 1;
            vcpu.set_regs(&regs)
                .map_err(|e| format!("vCPU {cpu}: cannot complete fwait: {e}"))?;
            Ok(Assisted::Fwait)
        }
        _ => Err(format!(
            "vCPU {cpu}: KVM cannot emulate the guest instruction at RIP {:#x} (bytes {}); on PVM hosts guest ring-0 code is emulated and this instruction is not supported",
            regs.rip,
            hex(&bytes[..bytes.len().min(8)])
        )),
    }
}

/// kvm-ioctls' `VcpuExit::InternalError` carries no payload, so read the
/// suberror from the shared `kvm_run` page.
trait InternalSuberror {
    fn get_kvm_run_internal_suberror(&mut self) -> u32;
}

impl InternalSuberror for VcpuFd {
    fn get_kvm_run_internal_suberror(&mut self) -> u32 {
        let run = self.get_kvm_run();
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the
        // exit union is the one KVM filled in.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }
}
