//! Hot pages: pages every recent input wrote stop being write-protected.
//!
//! Dirty logging write-protects each page it reports, so an input's first
//! write to every page it touches is a fault (about 2.3 us each on PVM),
//! then the reset copies the page back anyway. A page found dirty at
//! [`HOT_AFTER`] resets in a row becomes hot: the dirty log no longer
//! re-protects it (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, see
//! `kvm::vm::Vm::take_dirty_log`) and reports it at every read, so every
//! reset copies it back whether or not the input wrote it. That keeps
//! resets exact: an unlogged write to a hot page is undone like a logged one.
//!
//! Page-table pages of the snapshot never become hot: the reset reloads
//! KVM's shadow page tables when it restores one (reset.rs), which it must
//! learn from a real write, not from a page reported at every reset. A
//! page becoming a page table later is reachable only through a write to
//! one of those (logged) or a new CR3 (seen by the vCPU task), as before.
//!
//! Hot pages stay hot until the next snapshot; at most [`HOT_CAP`] pages,
//! so a target that writes a lot per input copies no more than before.

use crate::kvm::vm::Vm;

/// Consecutive resets a page must be found dirty in to become hot.
/// `rewind bench reset` (16 dirty pages, medians of 3 x 3,000 inputs): 2 ->
/// 18,395/s, 8 -> 18,637/s, 32 -> 18,100/s, all within noise once the set
/// is built; 8 keeps a page an input wrote by chance out of the capped set.
pub const HOT_AFTER: u8 = 8;

/// At most this many hot pages (1 MiB): copying a hot page back costs about
/// 0.05-0.1 us, the fault it saves about 2.3 us on PVM; a bound keeps a
/// wide, changing dirty set from copying far more than it wrote.
pub const HOT_CAP: usize = 256;

/// The streaks of the pages dirty in the last reset, per memory slot.
pub(crate) struct HotPages {
    /// Per slot, one count per page (pages dirty in each recent reset).
    streak: Vec<Vec<u8>>,
    /// Per slot, one bit per page: a streak is running.
    running: Vec<Vec<u64>>,
    /// Per slot, one bit per page: hot.
    hot: Vec<Vec<u64>>,
    count: usize,
    /// Per slot, the snapshot's page-table pages (never hot).
    page_tables: Vec<Vec<u64>>,
    enabled: bool,
}

impl HotPages {
    /// Turns KVM's manual dirty-log protection on for `vm` (a fuzzer's VM
    /// only) and starts with no hot page. Without the cap, no page is ever
    /// made hot and resets work as before.
    pub fn new(vm: &mut Vm, page_tables: &[Vec<u64>], slot_pages: &[usize]) -> HotPages {
        vm.forget_hot();
        let enabled =
            std::env::var_os("REWIND_NO_HOT_PAGES").is_none() && vm.enable_manual_protect();
        HotPages {
            streak: slot_pages.iter().map(|&n| vec![0; n]).collect(),
            running: page_tables.iter().map(|p| vec![0; p.len()]).collect(),
            hot: page_tables.iter().map(|p| vec![0; p.len()]).collect(),
            count: 0,
            page_tables: page_tables.to_vec(),
            enabled,
        }
    }

    /// Counts one reset's dirty pages and makes the pages with a long
    /// enough streak hot in `vm`. Returns how many pages are hot.
    pub fn observe(&mut self, vm: &mut Vm, dirty: &[Vec<u64>]) -> usize {
        if !self.enabled || self.count >= HOT_CAP {
            return self.count;
        }
        for (slot, bits) in dirty.iter().enumerate() {
            let (Some(streak), Some(running), Some(hot), Some(pts)) = (
                self.streak.get_mut(slot),
                self.running.get_mut(slot),
                self.hot.get_mut(slot),
                self.page_tables.get(slot),
            ) else {
                continue;
            };
            for (w, &now) in bits.iter().enumerate() {
                let (Some(run), Some(h), Some(&pt)) =
                    (running.get_mut(w), hot.get_mut(w), pts.get(w))
                else {
                    break;
                };
                let now = now & !pt & !*h;
                // Streaks broken by this reset start over.
                let mut ended = *run & !now;
                while ended != 0 {
                    let p = w * 64 + ended.trailing_zeros() as usize;
                    ended &= ended - 1;
                    if let Some(s) = streak.get_mut(p) {
                        *s = 0;
                    }
                }
                *run = now;
                let mut go = now;
                while go != 0 {
                    let bit = go.trailing_zeros();
                    go &= go - 1;
                    let p = w * 64 + bit as usize;
                    let Some(s) = streak.get_mut(p) else { continue };
                    *s = s.saturating_add(1);
                    if *s >= HOT_AFTER && self.count < HOT_CAP {
                        *h |= 1 << bit;
                        *run &= !(1 << bit);
                        *s = 0;
                        self.count += 1;
                        vm.keep_hot(slot, p, streak.len());
                    }
                }
            }
        }
        self.count
    }
}
