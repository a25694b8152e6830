//! A snapshot's memory as a chain: a full layer (`memory.bin`, file offset =
//! guest-physical address, zero pages are holes) at the bottom and the
//! incremental layers (`memory.delta`) of the snapshots above it, each
//! overriding the pages it lists.
//!
//! A directory with a `memory.bin` is a full snapshot whatever else it holds:
//! flattening writes the full layer first and removes the delta after, so a
//! crash in between leaves a stale delta that is simply not read.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::delta::{self, DeltaError, DeltaIndex, DELTA_FILE};
use super::memory as full;
use super::state::MEMORY_FILE;
use crate::fsutil;
use crate::memory::{GuestMemory, PAGE_SIZE};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Deeper chains are cut by taking a full snapshot instead of a delta, so a
/// restore never reads through more layers than this.
pub const MAX_DEPTH: usize = 16;
/// A chain longer than this on disk (written by hand, or a loop) is refused.
const REFUSE_DEPTH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("snapshot {dir} is incomplete: it has neither {MEMORY_FILE} nor {DELTA_FILE}")]
    Missing { dir: String },
    #[error("snapshot {dir}: cannot open {MEMORY_FILE}: {source}")]
    Open { dir: String, source: io::Error },
    #[error("snapshot {dir} is corrupt: {MEMORY_FILE} is {found} bytes, expected {expected} (truncated or from another VM)")]
    Length {
        dir: String,
        found: u64,
        expected: u64,
    },
    #[error(transparent)]
    Delta(#[from] DeltaError),
    #[error(
        "snapshot {dir} stores only the pages changed since snapshot {parent}, which is missing"
    )]
    ParentMissing { dir: String, parent: String },
    #[error("snapshot {dir}'s memory layer belongs to a VM of another size ({found} bytes, expected {expected})")]
    OtherSize {
        dir: String,
        found: u64,
        expected: u64,
    },
    #[error("snapshot {dir}'s memory chain is more than {REFUSE_DEPTH} layers deep (a loop?)")]
    TooDeep { dir: String },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// The full layer's own error, which names its file.
    #[error("{0}")]
    FullLayer(String),
}

/// The pages a walk down a chain, from its top layer, has taken already:
/// each page comes only from the topmost layer that has it.
pub(crate) struct Taken(Vec<u64>);

impl Taken {
    /// One bit per page of the chain's memory file.
    pub fn for_chain(chain: &MemoryChain) -> Taken {
        let pages = chain.base.metadata().map(|m| m.len()).unwrap_or(0) / PAGE_SIZE;
        Taken(vec![0; (pages as usize).div_ceil(64)])
    }

    /// Takes `page`: false when a layer above took it, or it lies beyond
    /// the memory file.
    pub fn take(&mut self, page: u64) -> bool {
        let (w, b) = ((page / 64) as usize, page % 64);
        match self.0.get_mut(w) {
            Some(word) if *word & (1 << b) == 0 => {
                *word |= 1 << b;
                true
            }
            _ => false,
        }
    }
}

/// One incremental layer of a chain.
#[derive(Debug)]
pub struct Layer {
    pub dir: PathBuf,
    pub file: File,
    pub index: DeltaIndex,
}

impl Layer {
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ChainError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| ChainError::Read {
                path: self.dir.join(DELTA_FILE),
                source,
            })
    }
}

/// The memory of one snapshot, opened and checked.
#[derive(Debug)]
pub struct MemoryChain {
    /// The snapshot whose `memory.bin` is the bottom layer.
    pub base_dir: PathBuf,
    pub base: File,
    /// Incremental layers, bottom to top (the snapshot itself last).
    pub layers: Vec<Layer>,
}

/// Opens the memory of the snapshot in `dir` for a VM whose memory file is
/// `mem_file_len` bytes, following delta parents down to a full layer.
pub fn open(dir: &Path, mem_file_len: u64) -> Result<MemoryChain, ChainError> {
    let mut layers = Vec::new();
    let mut at = dir.to_path_buf();
    loop {
        let name = || at.display().to_string();
        let full_path = at.join(MEMORY_FILE);
        match File::open(&full_path) {
            Ok(base) => {
                let found = base
                    .metadata()
                    .map_err(|source| ChainError::Open {
                        dir: name(),
                        source,
                    })?
                    .len();
                if found != mem_file_len {
                    return Err(ChainError::Length {
                        dir: name(),
                        found,
                        expected: mem_file_len,
                    });
                }
                layers.reverse();
                return Ok(MemoryChain {
                    base_dir: at,
                    base,
                    layers,
                });
            }
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(ChainError::Open {
                    dir: name(),
                    source: e,
                })
            }
            Err(_) => {}
        }
        let delta_path = at.join(DELTA_FILE);
        if !delta_path.exists() {
            return Err(if layers.is_empty() {
                ChainError::Missing { dir: name() }
            } else {
                ChainError::ParentMissing {
                    dir: layers
                        .last()
                        .map(|l: &Layer| l.dir.display().to_string())
                        .unwrap_or_default(),
                    parent: name(),
                }
            });
        }
        let (file, index) = delta::read_index(&delta_path)?;
        if index.mem_file_len != mem_file_len {
            return Err(ChainError::OtherSize {
                dir: name(),
                found: index.mem_file_len,
                expected: mem_file_len,
            });
        }
        if layers.len() >= REFUSE_DEPTH {
            return Err(ChainError::TooDeep {
                dir: dir.display().to_string(),
            });
        }
        let next = at.parent().unwrap_or(Path::new(".")).join(&index.parent);
        layers.push(Layer {
            dir: at,
            file,
            index,
        });
        at = next;
    }
}

impl MemoryChain {
    /// Layers above the full one.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// Path of the full layer.
    pub fn base_path(&self) -> PathBuf {
        self.base_dir.join(MEMORY_FILE)
    }

    /// Bytes each layer occupies on disk, bottom (the full layer) first.
    pub fn layer_bytes(&self) -> Vec<u64> {
        std::iter::once(allocated(&self.base))
            .chain(self.layers.iter().map(|l| allocated(&l.file)))
            .collect()
    }

    /// One bit per page per slot: every page that may be non-zero.
    pub fn data_bitmap(&self, mem: &GuestMemory) -> Vec<Vec<u64>> {
        let mut bits = full::data_bitmap(&self.base, mem);
        for layer in &self.layers {
            set_pages(&mut bits, mem, &layer.index.pages);
        }
        bits
    }

    /// Copies the incremental layers over memory that already equals the
    /// full layer (a full revert; a restore maps them instead, see
    /// `mapping`). Top
    /// layer first, and each page only from the topmost layer that has it,
    /// so a deep chain of layers rewriting the same pages costs what one does.
    pub fn apply_layers(&self, mem: &GuestMemory) -> Result<(), ChainError> {
        let mut taken = Taken::for_chain(self);
        for layer in self.layers.iter().rev() {
            let todo: Vec<usize> = (0..layer.index.pages.len())
                .filter(|&i| taken.take(layer.index.pages[i]))
                .collect();
            delta::apply_some(
                mem,
                &layer.file,
                &layer.dir.join(DELTA_FILE),
                &layer.index,
                &todo,
            )?;
        }
        Ok(())
    }

    /// Makes all of guest memory equal this snapshot (vCPUs paused).
    pub fn revert_full(&self, mem: &GuestMemory) -> Result<(), ChainError> {
        full::revert_full(mem, &self.base, &self.base_path())
            .map_err(|e| ChainError::FullLayer(e.to_string()))?;
        self.apply_layers(mem)
    }

    /// Copies back only the `dirty` pages (per slot), each from the topmost
    /// layer that has it. Returns pages copied.
    pub fn revert_pages(&self, mem: &GuestMemory, dirty: &[Vec<u64>]) -> Result<u64, ChainError> {
        let pages = pages_of(dirty, mem);
        let mut i = 0;
        while i < pages.len() {
            let (source, offset) = self.locate(pages[i]);
            let Some((host, room)) = delta::host_run(mem, pages[i]) else {
                i += 1;
                continue;
            };
            // One read for a run of pages consecutive in memory and in the
            // same file (a revert after a snapshot reads data that skipped
            // the page cache: a read per page would be a disk access each).
            let mut n = 1;
            while i + n < pages.len()
                && pages[i + n] == pages[i] + n as u64
                && (n as u64) < room
                && self.locate(pages[i + n]) == (source, offset + n as u64 * PAGE_SIZE)
            {
                n += 1;
            }
            // SAFETY: the run lies inside one live guest region (host_run);
            // vCPUs are paused, so nothing else writes it.
            let buf = unsafe { std::slice::from_raw_parts_mut(host, n * PAGE_SIZE as usize) };
            match source {
                Some(l) => self.layers[l].read_at(buf, offset)?,
                None => {
                    self.base
                        .read_exact_at(buf, offset)
                        .map_err(|source| ChainError::Read {
                            path: self.base_path(),
                            source,
                        })?
                }
            }
            i += n;
        }
        Ok(pages.len() as u64)
    }

    /// Where page `page` of this snapshot is stored: the topmost layer that
    /// has it (`Some(index)`) or the full layer (`None`), and the offset.
    fn locate(&self, page: u64) -> (Option<usize>, u64) {
        self.layers
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, l)| l.index.offset_of(page).map(|o| (Some(i), o)))
            .unwrap_or((None, page * PAGE_SIZE))
    }

    /// Writes the composed memory as one full layer at `to` (created, must
    /// not exist), synced. Returns its data bytes.
    pub fn flatten_to(&self, to: &Path) -> Result<u64, ChainError> {
        let err = |source| ChainError::Write {
            path: to.to_path_buf(),
            source,
        };
        let dst = crate::paths::create_private_file(to, true).map_err(err)?;
        let len = self.base.metadata().map_err(err)?.len();
        dst.set_len(len).map_err(err)?;
        copy_data(&self.base, &dst).map_err(err)?;
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for layer in &self.layers {
            for (i, &p) in layer.index.pages.iter().enumerate() {
                let at = layer.index.data_offset() + i as u64 * PAGE_SIZE;
                layer.read_at(&mut page, at)?;
                dst.write_all_at(&page, p * PAGE_SIZE).map_err(err)?;
            }
        }
        dst.sync_all().map_err(err)?;
        Ok(allocated(&dst))
    }
}

/// Turns snapshot `dir` into a full snapshot (its memory no longer depends
/// on any other): `memory.bin` is written whole and renamed into place, then
/// the delta is removed. Returns the full layer's data bytes.
pub fn flatten(dir: &Path, mem_file_len: u64) -> Result<u64, ChainError> {
    let chain = open(dir, mem_file_len)?;
    if chain.layers.is_empty() {
        return Ok(allocated(&chain.base));
    }
    let target = dir.join(MEMORY_FILE);
    let werr = |source| ChainError::Write {
        path: target.clone(),
        source,
    };
    let tmp = fsutil::temp_path_for(&target).map_err(werr)?;
    let bytes = chain.flatten_to(&tmp).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    super::stall::point("flatten-written", &name_of(dir));
    std::fs::rename(&tmp, &target).map_err(werr)?;
    fsutil::fsync_dir(dir).map_err(werr)?;
    super::stall::point("flatten-renamed", &name_of(dir));
    let _ = std::fs::remove_file(dir.join(DELTA_FILE));
    fsutil::fsync_dir(dir).map_err(werr)?;
    Ok(bytes)
}

/// Makes child snapshot `child` (a delta on `parent`) independent of
/// `parent`, which is about to be deleted: a full parent is flattened into
/// the child; a delta parent's pages are merged into the child's delta, which
/// then sits on the parent's own parent. Each step replaces one file by
/// rename, and every intermediate state restores the same memory.
pub fn merge_parent_into(child: &Path, mem_file_len: u64) -> Result<(), ChainError> {
    let chain = open(child, mem_file_len)?;
    let Some(own) = chain.layers.last() else {
        return Ok(());
    };
    if chain.layers.len() == 1 {
        // The parent is the full layer itself.
        flatten(child, mem_file_len)?;
        return Ok(());
    }
    let below = &chain.layers[chain.layers.len() - 2];
    let mut pages: Vec<u64> = below
        .index
        .pages
        .iter()
        .chain(&own.index.pages)
        .copied()
        .collect();
    pages.sort_unstable();
    pages.dedup();
    let merged = DeltaIndex {
        parent: below.index.parent.clone(),
        mem_file_len,
        pages,
    };
    let target = child.join(DELTA_FILE);
    let werr = |source| ChainError::Write {
        path: target.clone(),
        source,
    };
    let tmp = fsutil::temp_path_for(&target).map_err(werr)?;
    let result = (|| {
        let out = delta::create(&tmp, &merged)?;
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for (i, &p) in merged.pages.iter().enumerate() {
            let (layer, at) = own
                .index
                .offset_of(p)
                .map(|o| (own, o))
                .or_else(|| below.index.offset_of(p).map(|o| (below, o)))
                .unwrap_or((below, 0));
            layer.read_at(&mut page, at)?;
            out.write_all_at(&page, merged.data_offset() + i as u64 * PAGE_SIZE)
                .map_err(werr)?;
        }
        out.sync_all().map_err(werr)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    super::stall::point("merge-written", &name_of(child));
    std::fs::rename(&tmp, &target).map_err(werr)?;
    fsutil::fsync_dir(child).map_err(werr)
}

fn name_of(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Sets the bits of guest pages `pages` in per-slot bitmaps.
pub fn set_pages(bits: &mut [Vec<u64>], mem: &GuestMemory, pages: &[u64]) {
    for (region, slot) in mem.iter().zip(bits.iter_mut()) {
        let first = region.start_addr().0 / PAGE_SIZE;
        let end = first + region.len() / PAGE_SIZE;
        for &p in pages.iter().filter(|&&p| p >= first && p < end) {
            let i = (p - first) as usize;
            if let Some(w) = slot.get_mut(i / 64) {
                *w |= 1 << (i % 64);
            }
        }
    }
}

/// Guest page numbers whose bit is set in per-slot bitmaps, ascending.
pub fn pages_of(bits: &[Vec<u64>], mem: &GuestMemory) -> Vec<u64> {
    let mut out = Vec::new();
    for (region, slot) in mem.iter().zip(bits) {
        let first = region.start_addr().0 / PAGE_SIZE;
        let pages = region.len() / PAGE_SIZE;
        for (w, &word) in slot.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let p = w as u64 * 64 + bits.trailing_zeros() as u64;
                bits &= bits - 1;
                if p < pages {
                    out.push(first + p);
                }
            }
        }
    }
    out
}

/// Bytes a file occupies on disk (holes excluded).
pub fn allocated(file: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
}

/// Copies `src`'s data extents into `dst` at the same offsets, keeping holes
/// (a full layer stores zero pages as holes; filling them could cost as much
/// disk as guest RAM).
fn copy_data(src: &File, dst: &File) -> io::Result<()> {
    let len = src.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let Some(data) = seek(src, pos, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(src, data, libc::SEEK_HOLE)?.unwrap_or(len);
        let mut at = data;
        while at < hole {
            let n = ((hole - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)?;
            dst.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        pos = hole;
    }
    Ok(())
}

/// `lseek` with SEEK_DATA/SEEK_HOLE; `None` when there is no more data.
fn seek(file: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor `file` owns for the whole call; it only
    // moves the file offset, which nothing uses (all I/O here is positional).
    let r = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}
