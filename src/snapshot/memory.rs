//! Guest memory in a snapshot: one full layer, `memory.bin`, whose file
//! offset equals the guest-physical address. Zero pages are holes, so the
//! file costs only what the guest touched. A restore maps it
//! `MAP_PRIVATE`: nothing is read up front, clones share clean pages, and
//! the guest's writes never reach the file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::memory::{self, GuestMemory, PAGE_SIZE};

const BITMAP_PAGE: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(PAGE_SIZE as usize) {
    Some(p) => p,
    None => panic!("page size is not zero"),
};

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot write memory file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("snapshot memory file {path} is missing or unreadable: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("snapshot memory file {path} is {found} bytes, expected {expected} (truncated or from another VM)")]
    Length {
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("cannot map snapshot memory {path}: {reason}")]
    Map { path: String, reason: String },
    #[error("cannot read snapshot memory {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// Host view of a region's bytes. Callers only use it while every vCPU is
/// paused, or in a forked child, so nothing writes guest memory meanwhile.
fn region_bytes<R: GuestMemoryRegion>(region: &R) -> &[u8] {
    let ptr = region
        .get_host_address(vm_memory::MemoryRegionAddress(0))
        .unwrap_or(std::ptr::null_mut());
    // SAFETY: the region is a live mapping of `len` bytes owned by guest
    // memory, which outlives this borrow.
    unsafe { std::slice::from_raw_parts(ptr, region.len() as usize) }
}

/// # Safety
/// Every vCPU must be paused and no other host thread may touch guest
/// memory while the returned slice lives.
#[allow(clippy::mut_from_ref)]
unsafe fn region_bytes_mut<R: GuestMemoryRegion>(region: &R) -> &mut [u8] {
    let ptr = region
        .get_host_address(vm_memory::MemoryRegionAddress(0))
        .unwrap_or(std::ptr::null_mut());
    // SAFETY: as above; vCPUs are paused, so the VMM is the only writer.
    unsafe { std::slice::from_raw_parts_mut(ptr, region.len() as usize) }
}

fn is_zero(page: &[u8]) -> bool {
    let (prefix, words, suffix) = // SAFETY: u64 has no invalid bit patterns.
        unsafe { page.align_to::<u64>() };
    prefix.iter().all(|&b| b == 0)
        && words.iter().all(|&w| w == 0)
        && suffix.iter().all(|&b| b == 0)
}

/// Where a memory writer puts pages: the file, and the same file opened
/// with `O_DIRECT` where the filesystem allows it. Direct writes skip the
/// page cache, which makes them steady: a buffered write of 100 MiB took
/// 20 ms or 300-720 ms here depending on whether the kernel had recently
/// freed pages at hand (this host's own host reclaims free pages, so fresh
/// ones cost a fault there), against 73-118 ms direct. They also leave the
/// page cache to the guests.
pub struct MemoryOut {
    pub file: File,
    direct: Option<File>,
}

impl MemoryOut {
    pub fn new(file: File, path: &Path) -> MemoryOut {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        MemoryOut { file, direct }
    }

    /// Writes page-aligned `bytes` at page-aligned `offset`: directly when
    /// the filesystem takes it, else through the page cache. No allocation,
    /// so a forked child may call it.
    pub fn write_at(&self, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        if let Some(direct) = &self.direct {
            match direct.write_all_at(bytes, offset) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        self.file.write_all_at(bytes, offset)
    }
}

/// At most this much of a new snapshot's memory is read back into the page
/// cache after it is written (see [`prefetch`]).
pub const PREFETCH_LIMIT: u64 = 512 << 20;
const PREFETCH_STEP: u64 = 128 << 10;

/// Has the kernel read a memory layer just written `O_DIRECT` back into the
/// page cache (called on the upkeep thread, `memory::upkeep`): a revert to
/// the snapshot just taken (the common case: take one, try something, go
/// back) then copies its pages from memory instead of disk (16 MiB: 3 ms against 14 ms here). Only the data,
/// not the holes of a full layer, and at most `limit` bytes of it. Advice:
/// errors change nothing but the speed of that revert.
pub fn prefetch(file: &File, limit: u64) {
    use std::os::unix::io::AsRawFd;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let (mut pos, mut left) = (0u64, limit);
    while pos < len && left > 0 {
        let (data, hole) = next_data(file, pos, len);
        if data >= hole {
            break;
        }
        let end = data + (hole - data).min(left);
        left -= end - data;
        // In steps: the kernel reads at most its readahead window (at least
        // 128 KiB, often more) per call and drops the rest.
        for at in (data..end).step_by(PREFETCH_STEP as usize) {
            let n = PREFETCH_STEP.min(end - at);
            // SAFETY: posix_fadvise on an open fd only starts readahead.
            unsafe {
                libc::posix_fadvise(
                    file.as_raw_fd(),
                    at as libc::off_t,
                    n as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                );
            }
        }
        pos = hole;
    }
}

/// Creates a full layer's file, `mem_bytes` of guest RAM long and empty.
pub fn create_full(path: &Path, mem_bytes: u64) -> Result<File, MemoryFileError> {
    let err = |source| MemoryFileError::Write {
        path: path.display().to_string(),
        source,
    };
    let file = crate::paths::create_private_file(path, true).map_err(err)?;
    file.set_len(memory::ram_end(mem_bytes)).map_err(err)?;
    Ok(file)
}

/// Writes every non-zero page at its guest-physical offset, looking only
/// at `populated` pages (one bit per page per slot: everything that can be
/// non-zero), so the cost follows what the guest touched, not its size.
/// `first_write` runs once, after the first write (a test's stall point).
/// Makes no allocation and takes no lock, so a forked child may call it.
/// The caller syncs the file.
pub fn write_full(
    mem: &GuestMemory,
    populated: &[Vec<u64>],
    out: &MemoryOut,
    first_write: &dyn Fn(),
) -> std::io::Result<()> {
    let page = PAGE_SIZE as usize;
    let mut started = false;
    for (region, bitmap) in mem.iter().zip(populated) {
        let bytes = region_bytes(region);
        let base = region.start_addr().0;
        let pages = bytes.len() / page;
        let wanted = |p: usize| {
            p < pages
                && bitmap.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0)
                && !is_zero(&bytes[p * page..(p + 1) * page])
        };
        let mut p = 0;
        while p < pages {
            if bitmap.get(p / 64) == Some(&0) {
                p = (p / 64 + 1) * 64;
                continue;
            }
            if !wanted(p) {
                p += 1;
                continue;
            }
            // Extend the run of non-zero pages, then write it in one call.
            let start = p;
            while wanted(p) {
                p += 1;
            }
            out.write_at(&bytes[start * page..p * page], base + (start * page) as u64)?;
            if !started {
                started = true;
                first_write();
            }
        }
    }
    Ok(())
}

/// One bit per page of each slot, set where the snapshot file holds data.
pub fn data_bitmap(file: &File, mem: &GuestMemory) -> Vec<Vec<u64>> {
    mem.iter()
        .map(|region| {
            let base = region.start_addr().0;
            let end = base + region.len();
            let pages = (region.len() / PAGE_SIZE) as usize;
            let mut bits = vec![0u64; pages.div_ceil(64)];
            let mut at = base;
            while at < end {
                let (start, stop) = next_data(file, at, end);
                for p in ((start - base) / PAGE_SIZE) as usize
                    ..((stop.min(end) - base) / PAGE_SIZE) as usize
                {
                    bits[p / 64] |= 1 << (p % 64);
                }
                at = stop.max(at + PAGE_SIZE);
            }
            bits
        })
        .collect()
}

/// `into |= from`, slot by slot.
pub fn merge_bitmaps(into: &mut [Vec<u64>], from: &[Vec<u64>]) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= y;
        }
    }
}

/// Maps `memory.bin` copy-on-write as the guest's RAM.
pub fn map_private(path: &Path, mem_bytes: u64) -> Result<GuestMemory, MemoryFileError> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|source| MemoryFileError::Open {
        path: name.clone(),
        source,
    })?;
    let found = file
        .metadata()
        .map_err(|source| MemoryFileError::Open {
            path: name.clone(),
            source,
        })?
        .len();
    let expected = memory::ram_end(mem_bytes);
    if found != expected {
        return Err(MemoryFileError::Length {
            path: name,
            found,
            expected,
        });
    }
    let mut regions = Vec::new();
    for (addr, size) in memory::ram_ranges(mem_bytes) {
        let map_err = |reason: String| MemoryFileError::Map {
            path: name.clone(),
            reason,
        };
        let fd = file.try_clone().map_err(|e| map_err(e.to_string()))?;
        let mapping =
            MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::new(size, BITMAP_PAGE))
                .with_file_offset(FileOffset::new(fd, addr.0))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, addr)
            .ok_or_else(|| map_err("region overflows the address space".into()))?;
        regions.push(region);
    }
    GuestMemory::from_regions(regions).map_err(|e| MemoryFileError::Map {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn read_exact_at(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), MemoryFileError> {
    file.read_exact_at(buf, offset)
        .map_err(|source| MemoryFileError::Read {
            path: path.display().to_string(),
            source,
        })
}

/// Makes all of guest memory equal the snapshot: data extents are read in,
/// pages in holes are zeroed only where they are not zero already (so
/// untouched memory stays unallocated).
pub fn revert_full(mem: &GuestMemory, file: &File, path: &Path) -> Result<(), MemoryFileError> {
    let page = PAGE_SIZE as usize;
    for region in mem.iter() {
        // SAFETY: reverts run with every vCPU paused, on the VMM thread.
        let bytes = unsafe { region_bytes_mut(region) };
        let base = region.start_addr().0;
        let mut off = 0usize;
        while off < bytes.len() {
            let (data_start, data_end) =
                next_data(file, base + off as u64, base + bytes.len() as u64);
            let hole_end = (data_start - base) as usize;
            for p in (off..hole_end).step_by(page) {
                if !is_zero(&bytes[p..p + page]) {
                    bytes[p..p + page].fill(0);
                }
            }
            let data_end = ((data_end - base) as usize).min(bytes.len());
            if hole_end < data_end {
                read_exact_at(file, path, &mut bytes[hole_end..data_end], data_start)?;
            }
            off = data_end.max(hole_end);
        }
    }
    Ok(())
}

/// The next data extent at or after `from`, clipped to `end`: (start, end).
/// Where SEEK_DATA is not supported, everything counts as data.
fn next_data(file: &File, from: u64, end: u64) -> (u64, u64) {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: lseek on a descriptor we own; the offset is not used for I/O.
    let data = unsafe { libc::lseek(fd, from as i64, libc::SEEK_DATA) };
    if data < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error();
        // ENXIO: no more data after `from`.
        return if errno == Some(libc::ENXIO) {
            (end, end)
        } else {
            (from, end)
        };
    }
    let data = (data as u64).min(end);
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, data as i64, libc::SEEK_HOLE) };
    let hole = if hole < 0 {
        end
    } else {
        (hole as u64).min(end)
    };
    // Extents are page-aligned in files rewind writes; align anyway.
    (
        data & !(PAGE_SIZE - 1),
        hole.div_ceil(PAGE_SIZE) * PAGE_SIZE,
    )
}

/// Pages the VMM itself wrote (vm-memory's bitmap), per slot; resets it.
pub fn take_vmm_dirty(mem: &GuestMemory) -> Vec<Vec<u64>> {
    mem.iter()
        .map(|r| std::ops::Deref::deref(r).bitmap().get_and_reset())
        .collect()
}
