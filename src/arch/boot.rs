//! Boot-time CPU state: a vCPU enters the kernel in 64-bit mode with
//! identity-mapped page tables, the way Linux's 64-bit boot protocol wants
//! (and the test guest, which every vCPU enters directly: waking APs with
//! INIT/SIPI means minutes of emulated real-mode code on PVM hosts).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout;
use crate::memory::{self, GuestMemory};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot write boot tables into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM refused the boot CPU state ({what}): {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BootError {
    move |source| BootError::Kvm { what, source }
}

const GDT_NULL: u64 = 0;
const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;
const GDT_TSS: u64 = 0x0080_8b00_0000_0067;
/// Linux's 64-bit boot protocol wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const BOOT_TR: u16 = 0x20;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT_RW_USER: u64 = 0x7;
const PDE_HUGE: u64 = 0x80;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// Writes the boot GDT and identity page tables (2 MiB pages, user-accessible
/// so the test guest's ring 3 can reach its MMIO console) covering RAM, the
/// MMIO gap and at least 4 GiB.
pub fn write_boot_tables(mem: &GuestMemory, mem_bytes: u64) -> Result<(), BootError> {
    let gdt = [GDT_NULL, GDT_NULL, GDT_CODE64, GDT_DATA, GDT_TSS];
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::BOOT_GDT + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT))?;

    let map_end = memory::ram_end(mem_bytes).max(layout::MMIO_GAP_END);
    let gib = map_end.div_ceil(1 << 30);
    let max_gib = (layout::PD_LIMIT - layout::PD_FIRST) / 4096;
    let gib = gib.min(max_gib);
    mem.write_obj(
        layout::PDPT | PTE_PRESENT_RW_USER,
        GuestAddress(layout::PML4),
    )?;
    for g in 0..gib {
        let pd = layout::PD_FIRST + g * 4096;
        mem.write_obj(pd | PTE_PRESENT_RW_USER, GuestAddress(layout::PDPT + g * 8))?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| (((g << 30) + (i << 21)) | PTE_PRESENT_RW_USER | PDE_HUGE).to_le_bytes())
            .collect();
        mem.write_slice(&entries, GuestAddress(pd))?;
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

pub fn set_long_mode_sregs(vcpu: &VcpuFd) -> Result<(), BootError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("get sregs"))?;
    sregs.gdt.base = layout::BOOT_GDT;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.idt.base = layout::BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cs = segment(BOOT_CS, 0xb, true);
    let data = segment(BOOT_DS, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0x67,
        s: 0,
        g: 0,
        db: 0,
        type_: 0xb,
        ..segment(BOOT_TR, 0xb, false)
    };
    sregs.cr3 = layout::PML4;
    sregs.cr4 |= CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))
}

/// `rdi`/`rdx` carry the vCPU index and count for the test guest; Linux
/// ignores them and reads the zero page from `rsi`.
pub fn set_entry_regs(vcpu: &VcpuFd, entry: u64, index: u64, cpus: u64) -> Result<(), BootError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsi: layout::ZERO_PAGE,
        rdi: index,
        rdx: cpus,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("set regs"))
}

pub fn set_fpu(vcpu: &VcpuFd) -> Result<(), BootError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set fpu"))
}

pub fn set_boot_msrs(vcpu: &VcpuFd) -> Result<(), BootError> {
    let msrs = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }])
    .map_err(|_| BootError::Kvm {
        what: "build msr list",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    vcpu.set_msrs(&msrs).map_err(kvm("set msrs"))?;
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn lapic_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let b: Vec<u8> = regs[offset..offset + 4].iter().map(|&c| c as u8).collect();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

/// LINT0 as ExtINT (the PIC) and LINT1 as NMI, as a PC BIOS leaves them.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), BootError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("get lapic"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let v = lapic_reg(&lapic.regs, reg);
        set_lapic_reg(&mut lapic.regs, reg, (v & !0x700) | (mode << 8));
    }
    vcpu.set_lapic(&lapic).map_err(kvm("set lapic"))
}
