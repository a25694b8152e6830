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
    /// `ldmxcsr m32` / `stmxcsr m32`, done through KVM_GET/SET_FPU.
    Ldmxcsr,
    Stmxcsr,
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
        _ if mxcsr::decode(&bytes).is_some() => {
            mxcsr::complete(vcpu, mem, &mut regs, &bytes).map_err(|e| {
                format!("vCPU {cpu}: cannot complete {} at RIP {:#x}: {e}", hex(&bytes[..4.min(bytes.len())]), regs.rip)
            })
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

/// `ldmxcsr`/`stmxcsr` with a memory operand (0F AE /2 and /3), decoded far
/// enough to find the operand: prefixes, REX, ModRM, SIB, displacement,
/// RIP-relative addressing and FS/GS overrides.
pub(crate) mod mxcsr {
    use kvm_bindings::kvm_regs;
    use kvm_ioctls::VcpuFd;
    use vm_memory::{Bytes, GuestAddress};

    use super::Assisted;
    use crate::memory::GuestMemory;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Decoded {
        pub store: bool,
        pub len: usize,
        modrm: u8,
        sib: Option<u8>,
        disp: i64,
        rex: u8,
        segment: Option<u8>,
    }

    const SEG_FS: u8 = 0x64;
    const SEG_GS: u8 = 0x65;

    pub fn decode(b: &[u8]) -> Option<Decoded> {
        let mut i = 0;
        let mut segment = None;
        while let Some(&p) = b.get(i) {
            match p {
                SEG_FS | SEG_GS => segment = Some(p),
                0x2e | 0x36 | 0x3e | 0x26 | 0x66 | 0xf2 | 0xf3 => {}
                _ => break,
            }
            i += 1;
        }
        let mut rex = 0;
        if let Some(&r) = b.get(i).filter(|r| (0x40..=0x4f).contains(*r)) {
            rex = r;
            i += 1;
        }
        if b.get(i..i + 2)? != [0x0f, 0xae] {
            return None;
        }
        i += 2;
        let modrm = *b.get(i)?;
        i += 1;
        let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
        let store = match (md, reg) {
            (3, _) => return None,
            (_, 2) => false,
            (_, 3) => true,
            _ => return None,
        };
        let mut sib = None;
        if rm == 4 {
            sib = Some(*b.get(i)?);
            i += 1;
        }
        let no_base = sib.is_some_and(|s| s & 7 == 5) && md == 0;
        let disp = match md {
            0 if rm == 5 || no_base => {
                let d = i32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?) as i64;
                i += 4;
                d
            }
            1 => {
                let d = *b.get(i)? as i8 as i64;
                i += 1;
                d
            }
            2 => {
                let d = i32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?) as i64;
                i += 4;
                d
            }
            _ => 0,
        };
        Some(Decoded {
            store,
            len: i,
            modrm,
            sib,
            disp,
            rex,
            segment,
        })
    }

    fn reg(regs: &kvm_regs, n: u8) -> u64 {
        [
            regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi,
            regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
        ][(n & 15) as usize]
    }

    /// The operand's linear address.
    pub fn address(d: &Decoded, regs: &kvm_regs, seg_base: u64) -> u64 {
        let (md, rm) = (d.modrm >> 6, d.modrm & 7);
        let rex_b = (d.rex & 1) << 3;
        let rex_x = ((d.rex >> 1) & 1) << 3;
        let ea = if md == 0 && rm == 5 {
            // RIP-relative: from the end of the instruction.
            regs.rip
                .wrapping_add(d.len as u64)
                .wrapping_add(d.disp as u64)
        } else if let Some(sib) = d.sib {
            let (scale, index, base) = (sib >> 6, ((sib >> 3) & 7) | rex_x, (sib & 7) | rex_b);
            let index_val = if index == 4 {
                0
            } else {
                reg(regs, index) << scale
            };
            let base_val = if sib & 7 == 5 && md == 0 {
                0
            } else {
                reg(regs, base)
            };
            base_val.wrapping_add(index_val).wrapping_add(d.disp as u64)
        } else {
            reg(regs, rm | rex_b).wrapping_add(d.disp as u64)
        };
        seg_base.wrapping_add(ea)
    }

    pub fn complete(
        vcpu: &mut VcpuFd,
        mem: &GuestMemory,
        regs: &mut kvm_regs,
        bytes: &[u8],
    ) -> Result<Assisted, String> {
        let d = decode(bytes).ok_or("not ldmxcsr/stmxcsr")?;
        let sregs = vcpu.get_sregs().map_err(|e| e.to_string())?;
        let seg_base = match d.segment {
            Some(SEG_FS) => sregs.fs.base,
            Some(SEG_GS) => sregs.gs.base,
            _ => 0,
        };
        let linear = address(&d, regs, seg_base);
        let t = vcpu.translate_gva(linear).map_err(|e| e.to_string())?;
        if t.valid == 0 {
            return Err(format!("operand address {linear:#x} is not mapped"));
        }
        let gpa = GuestAddress(t.physical_address);
        let done = if d.store {
            mem.write_obj(get_mxcsr(vcpu)?, gpa)
                .map_err(|e| e.to_string())?;
            Assisted::Stmxcsr
        } else {
            let value = mem.read_obj::<u32>(gpa).map_err(|e| e.to_string())?;
            set_mxcsr(vcpu, value)?;
            Assisted::Ldmxcsr
        };
        regs.rip += d.len as u64;
        vcpu.set_regs(regs).map_err(|e| e.to_string())?;
        Ok(done)
    }

    /// MXCSR lives at byte 24 of the legacy FXSAVE area, which is also the
    /// start of the XSAVE area. KVM_GET/SET_XSAVE is used where it exists
    /// because on PVM hosts KVM_GET/SET_FPU does not reach the live MXCSR.
    const MXCSR_OFFSET: usize = 24;

    fn get_mxcsr(vcpu: &VcpuFd) -> Result<u32, String> {
        match vcpu.get_xsave() {
            Ok(x) => Ok(x.region[MXCSR_OFFSET / 4]),
            Err(_) => Ok(vcpu.get_fpu().map_err(|e| e.to_string())?.mxcsr),
        }
    }

    fn set_mxcsr(vcpu: &VcpuFd, value: u32) -> Result<(), String> {
        match vcpu.get_xsave() {
            Ok(mut x) => {
                x.region[MXCSR_OFFSET / 4] = value;
                // SAFETY: the buffer was just read from this vCPU by
                // KVM_GET_XSAVE; only MXCSR changed.
                unsafe { vcpu.set_xsave(&x) }.map_err(|e| e.to_string())
            }
            Err(_) => {
                let mut fpu = vcpu.get_fpu().map_err(|e| e.to_string())?;
                fpu.mxcsr = value;
                vcpu.set_fpu(&fpu).map_err(|e| e.to_string())
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn decodes_the_forms_linux_and_the_test_guest_use() {
            // ldmxcsr (%rsp)
            let d = decode(&[0x0f, 0xae, 0x14, 0x24]).unwrap();
            assert!(!d.store);
            assert_eq!(d.len, 4);
            let regs = kvm_regs {
                rsp: 0x1000,
                rip: 0x5000,
                ..Default::default()
            };
            assert_eq!(address(&d, &regs, 0), 0x1000);
            // stmxcsr 0x4(%rsp)
            let d = decode(&[0x0f, 0xae, 0x5c, 0x24, 0x04]).unwrap();
            assert!(d.store);
            assert_eq!(d.len, 5);
            assert_eq!(address(&d, &regs, 0), 0x1004);
            // ldmxcsr 0x10(%rip)
            let d = decode(&[0x0f, 0xae, 0x15, 0x10, 0, 0, 0]).unwrap();
            assert_eq!(d.len, 7);
            assert_eq!(address(&d, &regs, 0), 0x5000 + 7 + 0x10);
            // ldmxcsr -0x8(%r13) with REX.B
            let d = decode(&[0x41, 0x0f, 0xae, 0x55, 0xf8]).unwrap();
            let regs13 = kvm_regs {
                r13: 0x2000,
                ..Default::default()
            };
            assert_eq!(address(&d, &regs13, 0), 0x1ff8);
            // %gs:0x20 via SIB with no base and no index
            let d = decode(&[0x65, 0x0f, 0xae, 0x1c, 0x25, 0x20, 0, 0, 0]).unwrap();
            assert!(d.store);
            assert_eq!(address(&d, &regs, 0x7000), 0x7020);
            // Not ours: fxsave, register forms, other opcodes.
            assert!(decode(&[0x0f, 0xae, 0x04, 0x24]).is_none());
            assert!(decode(&[0x0f, 0xae, 0xd0]).is_none());
            assert!(decode(&[0xf3, 0x48, 0x0f, 0xb8, 0xc0]).is_none());
            assert!(decode(&[0x0f]).is_none());
        }
    }
}
