//! Building a restored VM's memory from a 10-deep chain, in process
//! (`cargo bench --bench chain_map`): a 256 MiB full layer holding 64 MiB,
//! ten incremental layers on it, each rewriting 16 MiB. Each row is one
//! layout of the layers' pages; columns are the memory's build time with
//! every run read in (what restore did before runs were mapped), with
//! every run mapped, and with the default policy (runs under
//! `MapPolicy::DEFAULT.min_run` pages read, at most `max_maps` mapped),
//! then the time to write every restored page once afterwards (the guest's
//! later cost) and a fork of the process after that (what a live snapshot's
//! pause pays, per mapping). Medians of 15, page cache warm (as for a restore right
//! after the snapshot).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rewind::snapshot::chain::{self, MemoryChain};
use rewind::snapshot::delta::{self, DeltaIndex};
use rewind::snapshot::mapping::{self, MapPolicy};
use vm_memory::GuestMemoryBackend;

const MEM: u64 = 256 << 20;
const PAGE: u64 = 4096;
const RUNS: usize = 15;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Writes the full layer `dir/c0` and layers `c1..c10`, layer `n` holding
/// `pages(n)` (ascending), each page filled with its layer and number.
fn build(root: &Path, pages: &dyn Fn(u64) -> Vec<u64>) -> PathBuf {
    let _ = std::fs::remove_dir_all(root);
    let base_dir = root.join("c0");
    std::fs::create_dir_all(&base_dir).unwrap();
    let base = File::create(base_dir.join("memory.bin")).unwrap();
    base.set_len(MEM).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    for m in 0..64u64 {
        base.write_all_at(&chunk, m << 20).unwrap();
    }
    let mut page = vec![0u8; PAGE as usize];
    for n in 1..=10u64 {
        let dir = root.join(format!("c{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let index = DeltaIndex {
            parent: format!("c{}", n - 1),
            mem_file_len: MEM,
            pages: pages(n),
        };
        let file = delta::create(&dir.join("memory.delta"), &index).unwrap();
        for (i, &p) in index.pages.iter().enumerate() {
            page[..8].copy_from_slice(&(n << 56 | p).to_le_bytes());
            file.write_all_at(&page, index.data_offset() + i as u64 * PAGE)
                .unwrap();
        }
    }
    root.join("c10")
}

fn time_map(chain: &MemoryChain, policy: MapPolicy) -> (Duration, mapping::MapStats) {
    let mut stats = Default::default();
    let t = median(
        (0..RUNS)
            .map(|_| {
                let t = Instant::now();
                let (mem, s) = mapping::map_with(chain, MEM, policy).unwrap();
                let e = t.elapsed();
                stats = s;
                drop(mem);
                e
            })
            .collect(),
    );
    (t, stats)
}

/// Build with `policy`, then write one byte of every page in `pages`.
fn time_touch(chain: &MemoryChain, policy: MapPolicy, pages: &[u64]) -> Duration {
    median(
        (0..RUNS)
            .map(|_| {
                let (mem, _) = mapping::map_with(chain, MEM, policy).unwrap();
                let region = mem.iter().next().unwrap();
                let host = region.as_ptr();
                let t = Instant::now();
                for &p in pages {
                    // SAFETY: p < MEM / PAGE, inside the one 256 MiB region.
                    unsafe { host.add((p * PAGE) as usize).write_volatile(1) };
                }
                t.elapsed()
            })
            .collect(),
    )
}

/// A fork once every page in `pages` was written (each mapping then has
/// private pages of its own, which fork copies mapping by mapping).
fn time_fork(chain: &MemoryChain, policy: MapPolicy, pages: &[u64]) -> Duration {
    let (mem, _) = mapping::map_with(chain, MEM, policy).unwrap();
    let host = mem.iter().next().unwrap().as_ptr();
    for &p in pages {
        // SAFETY: p < MEM / PAGE, inside the one 256 MiB region.
        unsafe { host.add((p * PAGE) as usize).write_volatile(1) };
    }
    let t = median(
        (0..RUNS)
            .map(|_| {
                let t = Instant::now();
                // SAFETY: the bench is single-threaded; the child only exits.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    // SAFETY: in the forked child, ends it without unwinding.
                    unsafe { libc::_exit(0) };
                }
                let e = t.elapsed();
                // SAFETY: reaps the child forked just above.
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                e
            })
            .collect(),
    );
    drop(mem);
    t
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let root = std::env::temp_dir().join(format!("rewind-chain-map-{}", std::process::id()));
    let region = 32768u64; // 128 MiB in
    let span = 4096u64; // 16 MiB of pages per layer
    type Layout = Box<dyn Fn(u64) -> Vec<u64>>;
    let mut layouts: Vec<(String, Layout)> = vec![(
        "the same 16 MiB run in every layer (rewind bench chain)".into(),
        Box::new(move |_| (region..region + span).collect()),
    )];
    for run in [1u64, 2, 4, 8, 16, 64] {
        layouts.push((
            format!("runs of {run} page(s), a gap of {run} after each, shifted per layer"),
            Box::new(move |n| {
                let start = region + (n % 2) * run;
                (0..span / run)
                    .flat_map(|k| {
                        let first = start + 2 * k * run;
                        first..first + run
                    })
                    .collect()
            }),
        ));
    }
    let read_all = MapPolicy {
        min_run: u64::MAX,
        max_maps: 0,
    };
    let map_all = MapPolicy {
        min_run: 1,
        max_maps: usize::MAX,
    };
    println!("chain map: 256 MiB guest, 10 layers of 16 MiB; medians of {RUNS}");
    for (what, pages) in &layouts {
        let top = build(&root, pages.as_ref());
        let chain = chain::open(&top, MEM).unwrap();
        let mut touched: Vec<u64> = (1..=10).flat_map(pages.as_ref()).collect();
        touched.sort_unstable();
        touched.dedup();
        println!("{what}:");
        for (name, policy) in [
            ("read all", read_all),
            ("map all", map_all),
            ("default", MapPolicy::DEFAULT),
        ] {
            let (t, s) = time_map(&chain, policy);
            println!(
                "  {name:9} build {:>9}  ({} runs mapped, {} read)  then write every page {:>9}  fork {:>8}",
                ms(t),
                s.runs_mapped,
                s.runs_read,
                ms(time_touch(&chain, policy, &touched)),
                ms(time_fork(&chain, policy, &touched)),
            );
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}
