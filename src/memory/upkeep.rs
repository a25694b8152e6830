//! A VM's memory upkeep thread: work on guest RAM and snapshot files that
//! can wait, done off the VMM thread with the guest running.
//!
//! - **Huge pages back.** A live snapshot forks (`snapshot::live`), and what
//!   the fork costs inside the guest's pause is copying the page tables: one
//!   entry per 2 MiB where RAM is in huge pages, 512 where it is in 4 KiB
//!   pages. While the writer lives, every huge page the guest writes is
//!   shared with it, and the kernel splits it to copy the one page written.
//!   They stay split after the writer exits, so the next fork copied 4 KiB
//!   entries for all the guest rewrote (1 GiB guest rewriting 256 MiB: pause
//!   4.6-6.0 ms without this, 3.9 ms with it, before KVM's part was moved out
//!   of the pause). The blocks are collapsed again (`MADV_COLLAPSE`).
//! - **A new snapshot's memory read back.** Memory is written `O_DIRECT`
//!   (steady times, see `snapshot::memory`), so it is not in the page cache,
//!   and the revert that usually follows a snapshot read it from disk
//!   (16 MiB: 14 ms against 3 ms cached). The layer is read back in the
//!   background ([`crate::snapshot::memory::prefetch`]).

use std::fs::File;
use std::sync::mpsc::{channel, Sender};

/// `MADV_COLLAPSE` (Linux 6.1), not in every libc crate version.
const MADV_COLLAPSE: libc::c_int = 25;
pub const HUGE_PAGE: u64 = 2 << 20;

enum Job {
    /// 2 MiB blocks (host addresses) to collapse into huge pages.
    Collapse(Vec<u64>),
    /// A snapshot's memory layer to read into the page cache, up to a limit.
    Prefetch(File, u64),
}

/// The thread and the way to hand it work. Dropping this ends the thread
/// once it has finished the jobs it has.
pub struct Upkeep {
    jobs: Sender<Job>,
}

impl Upkeep {
    /// Starts the thread. Must run before the VMM thread's seccomp filter
    /// is installed: after it, the VMM thread may start no thread.
    pub fn start() -> std::io::Result<Upkeep> {
        let (tx, rx) = channel::<Job>();
        std::thread::Builder::new()
            .name("mem-upkeep".into())
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::Thread::Upkeep);
                while let Ok(job) = rx.recv() {
                    match job {
                        Job::Collapse(blocks) => blocks.into_iter().for_each(collapse),
                        Job::Prefetch(file, limit) => {
                            crate::snapshot::memory::prefetch(&file, limit)
                        }
                    }
                }
            })?;
        Ok(Upkeep { jobs: tx })
    }

    /// Collapses the 2 MiB blocks at these host addresses. A block that is
    /// not anonymous memory, not fully populated or already huge is left as
    /// it is.
    pub fn collapse(&self, blocks: Vec<u64>) {
        if !blocks.is_empty() {
            let _ = self.jobs.send(Job::Collapse(blocks));
        }
    }

    /// Reads up to `limit` bytes of this memory layer's data into the page
    /// cache.
    pub fn prefetch(&self, file: File, limit: u64) {
        let _ = self.jobs.send(Job::Prefetch(file, limit));
    }
}

fn collapse(block: u64) {
    // SAFETY: MADV_COLLAPSE changes how memory is mapped, never what it
    // reads, so it cannot change guest memory even if the VM had unmapped
    // it meanwhile (then it fails with ENOMEM, or collapses another mapping
    // with the same effect: none). Errors only mean "left as it was".
    unsafe {
        libc::madvise(
            block as *mut libc::c_void,
            HUGE_PAGE as usize,
            MADV_COLLAPSE,
        );
    }
}

/// The 2 MiB-aligned host blocks, fully inside their region, that hold any
/// page set in `pages` (one bit per page per slot).
pub fn blocks_of(mem: &super::GuestMemory, pages: &[Vec<u64>]) -> Vec<u64> {
    let mut blocks = Vec::new();
    for ((_, size, host), bits) in super::regions(mem).into_iter().zip(pages) {
        let end = host + size;
        for (w, &word) in bits.iter().enumerate() {
            let mut rest = word;
            while rest != 0 {
                let page = w as u64 * 64 + rest.trailing_zeros() as u64;
                rest &= rest - 1;
                let block = (host + page * super::PAGE_SIZE) & !(HUGE_PAGE - 1);
                if block >= host && block + HUGE_PAGE <= end && blocks.last() != Some(&block) {
                    blocks.push(block);
                }
            }
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_inside_and_once_each() {
        let mem = super::super::create_guest_memory(8 << 20).unwrap();
        let (_, size, host) = super::super::regions(&mem)[0];
        let pages = (size / super::super::PAGE_SIZE) as usize;
        let mut bits = vec![vec![0u64; pages.div_ceil(64)]];
        // Two pages in the second block, one in the last page of memory.
        for p in [512usize, 700, pages - 1] {
            bits[0][p / 64] |= 1 << (p % 64);
        }
        let blocks = blocks_of(&mem, &bits);
        let first_whole = (host + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
        assert!(blocks.iter().all(|b| b % HUGE_PAGE == 0));
        assert!(blocks
            .iter()
            .all(|&b| b >= host && b + HUGE_PAGE <= host + size));
        let mut sorted = blocks.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), blocks.len());
        if host == first_whole {
            assert_eq!(blocks.len(), 2, "{blocks:x?}");
        }
    }
}
