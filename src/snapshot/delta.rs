//! Incremental memory layers: `memory.delta`, the pages a VM wrote since its
//! parent snapshot, on top of that parent's memory (a full `memory.bin` or
//! another delta). The parent is named inside the file, not only in the
//! manifest, so that replacing this one file (a delete merging the parent in)
//! switches the data and the parent it sits on in one rename.
//!
//! Layout, little-endian: a 4 KiB header (magic, version, parent name, the
//! memory file length it belongs to, page count, CRC-64 of the header fields
//! and index), the index (one u64 guest page number per stored page,
//! ascending), padding to a page boundary, then the pages packed in index
//! order. Every stored page is stored whole, zero or not: the index says
//! which pages this layer overrides.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::format::{crc64_xz, crc64_xz_add, crc64_xz_end, CRC64_XZ_START};
use crate::memory::{GuestMemory, PAGE_SIZE};

pub const DELTA_FILE: &str = "memory.delta";
const MAGIC: &[u8; 8] = b"RWMDELTA";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = PAGE_SIZE;
const NAME_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path} is not a rewind memory layer or is corrupt: {what}")]
    Corrupt { path: String, what: String },
}

/// What a delta file holds, read from its header and index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaIndex {
    /// The snapshot (a sibling directory) whose memory this layer sits on.
    pub parent: String,
    pub mem_file_len: u64,
    /// Guest page numbers (address / 4096), ascending.
    pub pages: Vec<u64>,
}

impl DeltaIndex {
    pub fn data_offset(&self) -> u64 {
        data_offset(self.pages.len())
    }

    pub fn file_len(&self) -> u64 {
        self.data_offset() + self.pages.len() as u64 * PAGE_SIZE
    }

    /// Where page `page` is stored in the file, if this layer has it.
    pub fn offset_of(&self, page: u64) -> Option<u64> {
        self.pages
            .binary_search(&page)
            .ok()
            .map(|i| self.data_offset() + i as u64 * PAGE_SIZE)
    }

    /// Bytes before the pages: header, index and padding.
    pub fn header_len(&self) -> usize {
        data_offset(self.pages.len()) as usize
    }

    /// Writes the header and index into `out` ([`Self::header_len`] bytes).
    /// No allocation, so a forked child may call it.
    pub fn encode_into(&self, out: &mut [u8]) {
        out.fill(0);
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            out[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(MAGIC);
        put(&VERSION.to_le_bytes());
        put(&(self.parent.len() as u32).to_le_bytes());
        let mut name = [0u8; NAME_MAX];
        name[..self.parent.len()].copy_from_slice(self.parent.as_bytes());
        put(&name);
        put(&self.mem_file_len.to_le_bytes());
        put(&(self.pages.len() as u64).to_le_bytes());
        let fields_end = at;
        let index_at = HEADER_LEN as usize;
        for (i, p) in self.pages.iter().enumerate() {
            let o = index_at + i * 8;
            out[o..o + 8].copy_from_slice(&p.to_le_bytes());
        }
        let crc = crc64_xz_add(CRC64_XZ_START, &out[..fields_end]);
        let crc = crc64_xz_add(crc, &out[index_at..index_at + self.pages.len() * 8]);
        out[fields_end..fields_end + 8].copy_from_slice(&crc64_xz_end(crc).to_le_bytes());
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = vec![0; self.header_len()];
        self.encode_into(&mut out);
        out
    }
}

fn data_offset(pages: usize) -> u64 {
    (HEADER_LEN + pages as u64 * 8).div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// The bytes the CRC covers: the header fields before it, then the index.
fn checked_bytes(fields: &[u8], pages: &[u64]) -> Vec<u8> {
    let mut v = fields.to_vec();
    for p in pages {
        v.extend_from_slice(&p.to_le_bytes());
    }
    v
}

const FIELDS_LEN: usize = 8 + 4 + 4 + NAME_MAX + 8 + 8;

/// Creates `path` and writes its header and index; the pages follow with
/// [`write_pages`]. The caller syncs the file.
pub fn create(path: &Path, index: &DeltaIndex) -> Result<File, DeltaError> {
    let file = create_empty(path, index)?;
    write_header(&file, index, &mut index.encode()).map_err(|source| DeltaError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(file)
}

/// Creates `path` empty, for [`write_header`] and [`write_pages`] to fill
/// (a live snapshot's writer does both, so the pause only opens the file).
pub fn create_empty(path: &Path, index: &DeltaIndex) -> Result<File, DeltaError> {
    if index.parent.len() > NAME_MAX || index.parent.is_empty() {
        return Err(DeltaError::Corrupt {
            path: path.display().to_string(),
            what: format!("parent name {:?} is not 1-64 bytes", index.parent),
        });
    }
    crate::paths::create_private_file(path, true).map_err(|source| DeltaError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Sizes the file and writes its header and index, encoded into `buf`
/// ([`DeltaIndex::header_len`] bytes). No allocation, so a forked child
/// may call it.
pub fn write_header(file: &File, index: &DeltaIndex, buf: &mut [u8]) -> io::Result<()> {
    index.encode_into(buf);
    file.set_len(index.file_len())?;
    file.write_all_at(buf, 0)
}

/// Copies the pages `index` lists from guest memory into the file, one
/// write per run of consecutive pages. Makes no allocation and takes no
/// lock, so a forked child may call it.
pub fn write_pages(
    out: &super::memory::MemoryOut,
    mem: &GuestMemory,
    index: &DeltaIndex,
) -> io::Result<()> {
    let pages = &index.pages;
    let base = index.data_offset();
    let mut i = 0;
    while i < pages.len() {
        let Some((host, room)) = host_run(mem, pages[i]) else {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        };
        let mut n = 1;
        while i + n < pages.len() && pages[i + n] == pages[i] + n as u64 && (n as u64) < room {
            n += 1;
        }
        let len = n * PAGE_SIZE as usize;
        // SAFETY: `host` points into a live guest mapping with at least
        // `room` pages after it (host_run), and n <= room.
        let bytes = unsafe { std::slice::from_raw_parts(host, len) };
        out.write_at(bytes, base + i as u64 * PAGE_SIZE)?;
        i += n;
    }
    Ok(())
}

/// The host address of guest page `page` and how many pages of the same
/// region follow it (itself included).
pub fn host_run(mem: &GuestMemory, page: u64) -> Option<(*mut u8, u64)> {
    let gpa = page * PAGE_SIZE;
    mem.iter().find_map(|r| {
        let start = r.start_addr().0;
        (gpa >= start && gpa < start + r.len()).then(|| {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(gpa - start))
                .unwrap_or(std::ptr::null_mut());
            (host, (start + r.len() - gpa) / PAGE_SIZE)
        })
    })
}

/// Reads and checks a delta's header and index (not its pages).
pub fn read_index(path: &Path) -> Result<(File, DeltaIndex), DeltaError> {
    let name = path.display().to_string();
    let io_err = |source| DeltaError::Io {
        path: name.clone(),
        source,
    };
    let corrupt = |what: String| DeltaError::Corrupt {
        path: name.clone(),
        what,
    };
    let file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    let mut header = [0u8; FIELDS_LEN + 8];
    if len < HEADER_LEN {
        return Err(corrupt(format!("{len} bytes, shorter than its header")));
    }
    file.read_exact_at(&mut header, 0).map_err(io_err)?;
    if &header[..8] != MAGIC {
        return Err(corrupt("bad magic".into()));
    }
    let u32_at = |o: usize| u32::from_le_bytes(header[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().unwrap_or([0; 8]));
    if u32_at(8) != VERSION {
        return Err(corrupt(format!("format version {}", u32_at(8))));
    }
    let name_len = u32_at(12) as usize;
    if name_len == 0 || name_len > NAME_MAX {
        return Err(corrupt(format!("parent name length {name_len}")));
    }
    let parent = String::from_utf8(header[16..16 + name_len].to_vec())
        .map_err(|_| corrupt("parent name is not UTF-8".into()))?;
    let mem_file_len = u64_at(16 + NAME_MAX);
    let count = u64_at(24 + NAME_MAX);
    // Checked against the file's real length before anything is allocated.
    let expected = HEADER_LEN
        .checked_add(count.saturating_mul(8))
        .map(|h| h.div_ceil(PAGE_SIZE) * PAGE_SIZE)
        .and_then(|d| d.checked_add(count.saturating_mul(PAGE_SIZE)));
    if count > mem_file_len / PAGE_SIZE || expected != Some(len) {
        return Err(corrupt(format!(
            "{len} bytes, but its header lists {count} pages"
        )));
    }
    let mut raw = vec![0u8; count as usize * 8];
    file.read_exact_at(&mut raw, HEADER_LEN).map_err(io_err)?;
    let pages: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    if crc64_xz(&checked_bytes(&header[..FIELDS_LEN], &pages)) != u64_at(FIELDS_LEN) {
        return Err(corrupt("header checksum mismatch".into()));
    }
    if pages.windows(2).any(|w| w[0] >= w[1])
        || pages.last().is_some_and(|&p| p >= mem_file_len / PAGE_SIZE)
    {
        return Err(corrupt(
            "its page index is not ascending within memory".into(),
        ));
    }
    Ok((
        file,
        DeltaIndex {
            parent,
            mem_file_len,
            pages,
        },
    ))
}

/// Copies the pages at positions `which` (ascending) of the layer's index
/// into guest memory (vCPUs paused), one read per run of consecutive pages.
pub fn apply_some(
    mem: &GuestMemory,
    file: &File,
    path: &Path,
    index: &DeltaIndex,
    which: &[usize],
) -> Result<(), DeltaError> {
    let pages = &index.pages;
    let mut k = 0;
    while k < which.len() {
        let i = which[k];
        let (host, room) = host_run(mem, pages[i]).ok_or_else(|| DeltaError::Corrupt {
            path: path.display().to_string(),
            what: format!("page {:#x} is outside guest memory", pages[i] * PAGE_SIZE),
        })?;
        // A run: consecutive index positions holding consecutive pages.
        let mut n = 1;
        while k + n < which.len()
            && which[k + n] == i + n
            && pages[i + n] == pages[i] + n as u64
            && (n as u64) < room
        {
            n += 1;
        }
        // SAFETY: the run lies inside one live guest region (host_run), and
        // the vCPUs are paused, so nothing else writes these pages.
        let bytes = unsafe { std::slice::from_raw_parts_mut(host, n * PAGE_SIZE as usize) };
        file.read_exact_at(bytes, index.data_offset() + i as u64 * PAGE_SIZE)
            .map_err(|source| DeltaError::Io {
                path: path.display().to_string(),
                source,
            })?;
        k += n;
    }
    Ok(())
}
