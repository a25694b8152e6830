//! A restored VM's guest memory, built from a snapshot's memory chain
//! without reading it: the full layer is mapped `MAP_PRIVATE` (file offset =
//! guest address), and each long run of pages an incremental layer holds is
//! mapped `MAP_PRIVATE | MAP_FIXED` from that layer's file over it, so a
//! restore of a deep chain costs a few `mmap` calls instead of a
//! copy-on-write fault and a copy per page. Short runs are read in: for them
//! a read is cheaper than a mapping and the process's mapping count
//! (`vm.max_map_count`) is spent on what saves most.
//!
//! This works because a delta's data area is page-aligned and holds its
//! pages packed in ascending guest-page order: consecutive guest pages
//! stored side by side in one layer are one page-aligned range of its file.
//!
//! A private mapping shows later writes to its file for pages not yet
//! copied, so snapshot memory files are never changed in place: every
//! writer (snapshot create, flatten, merge on delete, export) writes a new
//! file and renames it over the old one, and a restored VM keeps reading
//! the inode it mapped, even once that is unlinked.

use std::os::unix::io::AsRawFd;

use super::chain::{ChainError, MemoryChain};
use super::delta::{self, DELTA_FILE};
use crate::memory::{GuestMemory, PAGE_SIZE};

/// Which runs are mapped rather than read.
#[derive(Debug, Clone, Copy)]
pub struct MapPolicy {
    /// Runs shorter than this many pages are read.
    pub min_run: u64,
    /// At most this many runs are mapped, the longest first. Each splits
    /// the full layer's mapping (up to two more VMAs), and every VMA is
    /// copied by the fork of a live snapshot inside the guest's pause.
    pub max_maps: usize,
}

impl MapPolicy {
    /// Measured with `cargo bench --bench chain_map` here: a mapping costs
    /// about 3 us, a read about 2.3 us a page (its copy-on-write fault and
    /// copy). Runs of 1 page gain nothing mapped, of 2 pages 43% (12 against
    /// 21 ms for 4,096 runs), of 4 pages 72%; a mapped page costs its copy
    /// later instead, when the guest first writes it. Once the guest has
    /// written its pages, a fork (a live snapshot, inside the guest's
    /// pause) costs about 1 us more per mapped run: 0.6 ms with none,
    /// 1.5 ms with 1,024, 9.9 ms with 8,192; 1.0 ms with 256 (the cap) of
    /// 4 pages among as many read.
    pub const DEFAULT: MapPolicy = MapPolicy {
        min_run: 4,
        max_maps: 256,
    };
}

#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// The full layer's own error, which names its file.
    #[error("{0}")]
    Base(String),
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("{path} is corrupt: page {page:#x} is outside guest memory")]
    Outside { path: String, page: u64 },
    #[error("cannot map {path}: {source}")]
    Map {
        path: String,
        source: std::io::Error,
    },
}

/// What [`map_with`] did, for benchmarks and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MapStats {
    pub runs_mapped: usize,
    pub pages_mapped: u64,
    pub runs_read: usize,
    pub pages_read: u64,
}

/// One run of pages consecutive both in guest memory and in one layer's file.
struct Run {
    layer: usize,
    /// Position of its first page in the layer's index.
    pos: usize,
    page: u64,
    pages: u64,
}

/// Guest memory equal to the snapshot `chain` stands for, `mem_bytes` of
/// guest RAM, read lazily. Must run before the memory is registered with KVM
/// or any vCPU runs: it replaces mappings under the guest.
pub fn map(chain: &MemoryChain, mem_bytes: u64) -> Result<GuestMemory, MappingError> {
    map_with(chain, mem_bytes, MapPolicy::DEFAULT).map(|(mem, _)| mem)
}

/// [`map`] under `policy`, saying what it mapped and read.
pub fn map_with(
    chain: &MemoryChain,
    mem_bytes: u64,
    policy: MapPolicy,
) -> Result<(GuestMemory, MapStats), MappingError> {
    let mem = super::memory::map_private(&chain.base_path(), mem_bytes)
        .map_err(|e| MappingError::Base(e.to_string()))?;
    let runs = topmost_runs(chain, &mem)?;
    let mut by_length: Vec<usize> = (0..runs.len())
        .filter(|&r| runs[r].pages >= policy.min_run)
        .collect();
    by_length.sort_by_key(|&r| std::cmp::Reverse(runs[r].pages));
    let mut mapped = vec![false; runs.len()];
    for &r in by_length.iter().take(policy.max_maps) {
        mapped[r] = true;
    }
    let mut stats = MapStats::default();
    // Runs are disjoint in guest memory (each page comes from its topmost
    // layer only), so the order of maps and reads does not matter.
    for (run, mapped) in runs.iter().zip(mapped) {
        let layer = &chain.layers[run.layer];
        let offset = layer.index.data_offset() + run.pos as u64 * PAGE_SIZE;
        let len = (run.pages * PAGE_SIZE) as usize;
        let (host, _) = delta::host_run(&mem, run.page).ok_or_else(|| outside(chain, run))?;
        if mapped {
            map_fixed(host, len, &layer.file, offset).map_err(|source| MappingError::Map {
                path: layer.dir.join(DELTA_FILE).display().to_string(),
                source,
            })?;
            stats.runs_mapped += 1;
            stats.pages_mapped += run.pages;
        } else {
            // SAFETY: the run lies inside one guest region (topmost_runs
            // cuts runs at region ends), which nothing else uses yet.
            let buf = unsafe { std::slice::from_raw_parts_mut(host, len) };
            layer.read_at(buf, offset)?;
            stats.runs_read += 1;
            stats.pages_read += run.pages;
        }
    }
    Ok((mem, stats))
}

/// The runs that make up the layers' contribution: each page only from the
/// topmost layer that has it, cut where guest memory or the file breaks.
fn topmost_runs(chain: &MemoryChain, mem: &GuestMemory) -> Result<Vec<Run>, MappingError> {
    let mut taken = super::chain::Taken::for_chain(chain);
    let mut runs: Vec<Run> = Vec::new();
    for (l, layer) in chain.layers.iter().enumerate().rev() {
        let mut room = 0;
        for (pos, &page) in layer.index.pages.iter().enumerate() {
            if !taken.take(page) {
                continue;
            }
            if let Some(last) = runs.last_mut() {
                if last.layer == l
                    && last.pos + last.pages as usize == pos
                    && last.page + last.pages == page
                    && last.pages < room
                {
                    last.pages += 1;
                    continue;
                }
            }
            let run = Run {
                layer: l,
                pos,
                page,
                pages: 1,
            };
            room = match delta::host_run(mem, page) {
                Some((_, room)) => room,
                None => return Err(outside(chain, &run)),
            };
            runs.push(run);
        }
    }
    Ok(runs)
}

fn outside(chain: &MemoryChain, run: &Run) -> MappingError {
    MappingError::Outside {
        path: chain.layers[run.layer]
            .dir
            .join(DELTA_FILE)
            .display()
            .to_string(),
        page: run.page * PAGE_SIZE,
    }
}

/// Maps `len` bytes of `file` at `offset` copy-on-write over `host`.
fn map_fixed(host: *mut u8, len: usize, file: &std::fs::File, offset: u64) -> std::io::Result<()> {
    // SAFETY: `host..host+len` lies inside one guest region's mapping, which
    // the GuestMemory being built owns and which no vCPU, KVM slot or other
    // thread uses yet; MAP_FIXED replaces exactly that range, and the region
    // unmaps its whole length (this range included) when dropped. `offset`
    // and `len` are page multiples within the file (its length was checked
    // against its index when the chain was opened).
    let p = unsafe {
        libc::mmap(
            host.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::tests::TestDir;
    use crate::memory::ram_end;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};

    const PAGE: u64 = PAGE_SIZE;

    /// A full layer `c0` with data in `base_pages`, and layers `c1..` on it
    /// holding `layers[n - 1]`; every stored page is tagged with its layer
    /// and number. Returns the top snapshot's directory.
    fn build(dir: &TestDir, mem_bytes: u64, base_pages: &[u64], layers: &[Vec<u64>]) -> PathBuf {
        let len = ram_end(mem_bytes);
        let c0 = dir.join("c0");
        std::fs::create_dir_all(&c0).unwrap();
        let base = std::fs::File::create(c0.join(super::super::state::MEMORY_FILE)).unwrap();
        base.set_len(len).unwrap();
        for &p in base_pages {
            base.write_all_at(&tag(0, p), p * PAGE).unwrap();
        }
        for (i, pages) in layers.iter().enumerate() {
            let n = i as u64 + 1;
            let at = dir.join(format!("c{n}"));
            std::fs::create_dir_all(&at).unwrap();
            let index = delta::DeltaIndex {
                parent: format!("c{}", n - 1),
                mem_file_len: len,
                pages: pages.clone(),
            };
            let file = delta::create(&at.join(DELTA_FILE), &index).unwrap();
            for (k, &p) in pages.iter().enumerate() {
                file.write_all_at(&tag(n, p), index.data_offset() + k as u64 * PAGE)
                    .unwrap();
            }
        }
        dir.join(format!("c{}", layers.len()))
    }

    fn tag(layer: u64, page: u64) -> Vec<u8> {
        let mut v = vec![0u8; PAGE as usize];
        v[..8].copy_from_slice(&layer.to_le_bytes());
        v[8..16].copy_from_slice(&page.to_le_bytes());
        v[PAGE as usize - 1] = 0x5a;
        v
    }

    /// Maps the chain under each policy and compares `pages` of guest
    /// memory with the chain flattened by `flatten_to` (the composition
    /// export and flatten write), page by page.
    fn check(top: &Path, mem_bytes: u64, pages: &[u64]) -> Vec<MapStats> {
        let chain = super::super::chain::open(top, ram_end(mem_bytes)).unwrap();
        let flat = top.join("flat.bin");
        let _ = std::fs::remove_file(&flat);
        chain.flatten_to(&flat).unwrap();
        let flat = std::fs::File::open(&flat).unwrap();
        let policies = [
            MapPolicy {
                min_run: u64::MAX,
                max_maps: 0,
            },
            MapPolicy {
                min_run: 1,
                max_maps: usize::MAX,
            },
            MapPolicy::DEFAULT,
            // Capped: only the longest runs are mapped, the rest read.
            MapPolicy {
                min_run: 1,
                max_maps: 2,
            },
        ];
        let mut want = vec![0u8; PAGE as usize];
        policies
            .iter()
            .map(|&policy| {
                let (mem, stats) = map_with(&chain, mem_bytes, policy).unwrap();
                for &p in pages {
                    flat.read_exact_at(&mut want, p * PAGE).unwrap();
                    let (host, _) = delta::host_run(&mem, p).unwrap();
                    // SAFETY: one page inside a live region of `mem`.
                    let got = unsafe { std::slice::from_raw_parts(host, PAGE as usize) };
                    assert!(
                        got == want.as_slice(),
                        "{policy:?}: page {p:#x} holds layer {} page {:#x}",
                        got[0],
                        u64::from_le_bytes(got[8..16].try_into().unwrap())
                    );
                }
                stats
            })
            .collect()
    }

    #[test]
    fn long_runs_and_single_pages_compose_like_flatten_under_every_policy() {
        let dir = TestDir::new("map-mix");
        let layers = vec![
            // A long run, single pages with gaps, a short run.
            [
                (100..300).collect::<Vec<_>>(),
                vec![400, 402, 404],
                (500..511).collect(),
            ]
            .concat(),
            // Splits the run below, fills the gaps next to its single
            // pages, overlaps the end of its short run and goes on.
            [
                (150..160).collect::<Vec<_>>(),
                vec![401, 403],
                (505..521).collect(),
            ]
            .concat(),
            // Runs broken by a missing page, the first pages of memory.
            [
                vec![0, 1, 299],
                (1000..1050).collect(),
                (1051..1100).collect(),
            ]
            .concat(),
        ];
        let top = build(&dir, 16 << 20, &(0..256).collect::<Vec<_>>(), &layers);
        let every: Vec<u64> = (0..4096).collect();
        let stats = check(&top, 16 << 20, &every);
        let distinct = {
            let mut all: Vec<u64> = layers.concat();
            all.sort_unstable();
            all.dedup();
            all.len() as u64
        };
        for s in &stats {
            assert_eq!(s.pages_mapped + s.pages_read, distinct, "{s:?}");
        }
        assert_eq!(stats[0].runs_mapped, 0);
        assert_eq!(stats[1].runs_read, 0);
        assert!(
            stats[2].runs_mapped > 0 && stats[2].runs_read > 0,
            "{:?}",
            stats[2]
        );
        assert_eq!(stats[3].runs_mapped, 2);
    }

    #[test]
    fn runs_on_both_sides_of_the_mmio_gap_land_in_their_regions() {
        let dir = TestDir::new("map-gap");
        let mem_bytes = (3 << 30) + (1 << 20);
        let low_end = crate::arch::layout::MMIO_GAP_START / PAGE;
        let high = crate::arch::layout::MMIO_GAP_END / PAGE;
        let run = |from: u64| (from..from + 8).collect::<Vec<u64>>();
        let layers = vec![
            [run(low_end - 8), run(high)].concat(),
            [run(low_end - 16), vec![high + 8]].concat(),
        ];
        let top = build(&dir, mem_bytes, &[0, high + 100], &layers);
        let mut pages: Vec<u64> = layers.concat();
        pages.extend([0, 1, low_end - 17, high + 9, high + 100]);
        check(&top, mem_bytes, &pages);
    }
}
