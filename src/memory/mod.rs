//! Guest memory (the addresses it is split around are in `arch::layout`).
//!
//! RAM is split around a 1 GiB MMIO gap below 4 GiB: `[0, 3 GiB)` and then
//! `[4 GiB, 4 GiB + rest)`. Everything rewind emulates lives in the gap.
//! Memory is `GuestMemoryMmap<AtomicBitmap>` from the start so that every
//! write rewind itself makes into the guest is visible to dirty tracking.

pub mod upkeep;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Allocate {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The RAM ranges for `mem_bytes` of guest memory.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if mem_bytes > low {
        ranges.push((GuestAddress(MMIO_GAP_END), (mem_bytes - low) as usize));
    }
    ranges
}

/// Highest guest-physical address plus one.
pub fn ram_end(mem_bytes: u64) -> u64 {
    ram_ranges(mem_bytes)
        .last()
        .map(|(a, s)| a.0 + *s as u64)
        .unwrap_or(0)
}

/// Anonymous guest memory with a dirty bitmap per region.
pub fn create_guest_memory(mem_bytes: u64) -> Result<GuestMemory, MemoryError> {
    let mem = GuestMemory::from_ranges(&ram_ranges(mem_bytes)).map_err(|source| {
        MemoryError::Allocate {
            mib: mem_bytes >> 20,
            source,
        }
    })?;
    for r in mem.iter() {
        // Huge pages make the page tables 512 times smaller, and copying
        // them is what a live snapshot's fork costs inside the guest's pause
        // (1 GiB: 0.4 ms instead of 17 ms here). Advice only: without
        // transparent huge pages memory simply stays in 4 KiB pages.
        // SAFETY: madvise on a mapping this region owns, for its length.
        unsafe {
            libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_HUGEPAGE);
        }
    }
    Ok(mem)
}

/// Makes KVM drop its mappings of guest RAM now, with the guest running,
/// so that the fork inside the next pause finds few to drop. A fork
/// write-protects the parent's memory, and KVM answers that by zapping every
/// page it maps there: on a shadow-paging host (PVM) 3 ms of a 3.4 ms fork
/// for 256 MiB the guest had written, against 0.4 ms for the fork itself.
/// Changing the mapping's protection (adding and removing PROT_EXEC) makes
/// the kernel tell KVM the same, without write-protecting anything; the
/// guest refaults what it touches next. Best effort: a failure changes
/// nothing but the pause.
pub fn drop_kvm_mappings(mem: &GuestMemory) {
    for (_, size, host) in regions(mem) {
        let (addr, len) = (host as *mut libc::c_void, size as usize);
        // SAFETY: the region is a live mapping of `len` bytes that vm-memory
        // made PROT_READ | PROT_WRITE; it is made so again at once, and
        // nothing executes guest memory in between.
        unsafe {
            if libc::mprotect(
                addr,
                len,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            ) == 0
            {
                libc::mprotect(addr, len, libc::PROT_READ | libc::PROT_WRITE);
            }
        }
    }
}

/// (guest address, size, host address) of every region, in slot order.
pub fn regions(mem: &GuestMemory) -> Vec<(u64, u64, u64)> {
    mem.iter()
        .map(|r| (r.start_addr().0, r.len(), r.as_ptr() as u64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_around_the_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), 3 << 30));
        assert_eq!(r[1], (GuestAddress(4 << 30), 1 << 30));
        assert_eq!(ram_end(4 << 30), 5 << 30);
    }
}
