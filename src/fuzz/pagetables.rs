//! Which guest pages are page tables, learnt by walking the guest's own
//! tables from CR3 at snapshot time.
//!
//! Why: where KVM shadows the guest's page tables (PVM, or EPT/NPT off) it
//! write-protects them against the guest, not against the VMM. A reset that
//! copies an old page-table page back behind KVM's back leaves KVM
//! translating through the page table that no longer exists, so such a
//! reset must make KVM drop its shadows (re-register the memory slots,
//! `kvm::vm::Vm::reload_memory`). A reset that restores no page-table page
//! does not need to: a new table can only become reachable through a write
//! to a table reachable at the snapshot (then that page is dirty and in this
//! set) or through a new CR3 (which the reset checks).

use vm_memory::{Bytes, GuestAddress};

use crate::memory::{GuestMemory, PAGE_SIZE};

const PRESENT: u64 = 1;
const HUGE: u64 = 1 << 7;
/// Bits 12..51 of an entry: the next table's (or page's) frame.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

/// Guest-physical page numbers of every page-table page reachable from
/// `cr3` (sorted, deduplicated). Covers 4- and 5-level long mode and PAE;
/// 32-bit paging is walked as one level of directory plus tables. An
/// unreadable entry (outside RAM) is skipped: KVM cannot shadow it either.
pub fn page_table_pages(mem: &GuestMemory, cr0: u64, cr3: u64, cr4: u64, efer: u64) -> Vec<u64> {
    if cr0 & CR0_PG == 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    if efer & EFER_LMA != 0 {
        let levels = if cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        walk64(mem, cr3 & ADDR_MASK, levels, &mut out);
    } else if cr4 & CR4_PAE != 0 {
        // Four PDPTEs in one 32-byte aligned block of CR3's page.
        out.push(cr3 >> 12);
        for i in 0..4u64 {
            if let Some(e) = read_entry(mem, (cr3 & !0x1f) + i * 8) {
                if e & PRESENT != 0 {
                    walk64(mem, e & ADDR_MASK, 2, &mut out);
                }
            }
        }
    } else {
        walk32(mem, cr3 & 0xffff_f000, &mut out);
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn read_entry(mem: &GuestMemory, addr: u64) -> Option<u64> {
    mem.read_obj::<u64>(GuestAddress(addr)).ok()
}

/// `level` 1 is a page table (its entries map pages, nothing to follow).
fn walk64(mem: &GuestMemory, table: u64, level: u32, out: &mut Vec<u64>) {
    out.push(table / PAGE_SIZE);
    if level == 1 {
        return;
    }
    let mut page = [0u8; PAGE_SIZE as usize];
    if mem.read_slice(&mut page, GuestAddress(table)).is_err() {
        return;
    }
    for chunk in page.chunks_exact(8) {
        let e = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        // A huge entry maps memory directly (2 MiB or 1 GiB): no table below.
        if e & PRESENT == 0 || (level <= 3 && e & HUGE != 0) {
            continue;
        }
        walk64(mem, e & ADDR_MASK, level - 1, out);
    }
}

fn walk32(mem: &GuestMemory, dir: u64, out: &mut Vec<u64>) {
    out.push(dir / PAGE_SIZE);
    for i in 0..1024u64 {
        let Ok(e) = mem.read_obj::<u32>(GuestAddress(dir + i * 4)) else {
            return;
        };
        let e = e as u64;
        if e & PRESENT != 0 && e & HUGE == 0 {
            out.push((e & 0xffff_f000) / PAGE_SIZE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_identity_map_is_three_pages_per_gib() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        crate::arch::boot::write_boot_tables(&mem, 64 << 20).unwrap();
        let pages = page_table_pages(&mem, CR0_PG, crate::arch::layout::PML4, CR4_PAE, EFER_LMA);
        // PML4, PDPT and one PD per GiB mapped (4 GiB: RAM plus the gap),
        // all 2 MiB pages, so no page tables below.
        let pd = crate::arch::layout::PD_FIRST / PAGE_SIZE;
        assert_eq!(pages, vec![9, 10, pd, pd + 1, pd + 2, pd + 3]);
    }
}
