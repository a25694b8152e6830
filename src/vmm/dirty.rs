//! Which pages changed since the VM's baseline: KVM's dirty log and
//! vm-memory's bitmap, gathered into `since_baseline` until a snapshot
//! holding them is durable.

use std::path::PathBuf;

use super::{Vmm, VmmError};
use crate::snapshot::memory as snapmem;

impl Vmm {
    /// Takes the dirty logs (KVM's for the guest's writes, vm-memory's for
    /// rewind's own) into `since_baseline` and `populated`. Reading clears
    /// the logs; nothing is lost, since both sets only grow until a
    /// snapshot holding them is durable.
    pub(super) fn collect_dirty(&mut self) -> Result<(), VmmError> {
        match self.take_dirty_logs() {
            Ok(out) => {
                snapmem::merge_bitmaps(&mut self.since_baseline, &out);
                Ok(())
            }
            Err(e) => {
                // Part of the logs may have been read and dropped: from now
                // on every page counts as written, so no incremental
                // snapshot can miss one.
                for bits in self.since_baseline.iter_mut().chain(&mut self.populated) {
                    bits.fill(u64::MAX);
                }
                Err(e)
            }
        }
    }

    /// After a live snapshot: the blocks the guest wrote while the writer
    /// lived lost their huge pages to copy-on-write; have them collapsed
    /// again so that the next fork stays cheap (`memory::upkeep`).
    pub(super) fn mend_huge_pages(&mut self) {
        if self.upkeep.is_none() || !self.collapse_huge_pages || self.collect_dirty().is_err() {
            return;
        }
        let blocks = crate::memory::upkeep::blocks_of(&self.mem, &self.since_baseline);
        if let Some(u) = &self.upkeep {
            u.collapse(blocks);
        }
    }

    /// Per slot: the pages written since the logs were last read, by the
    /// guest (KVM's log) or by rewind (vm-memory's bitmap), also folded into
    /// `populated`. Reading clears the logs.
    pub(crate) fn take_dirty_logs(&mut self) -> Result<Vec<Vec<u64>>, VmmError> {
        let vmm_dirty = snapmem::take_vmm_dirty(&self.mem);
        let mut out = Vec::new();
        for (slot, (_, size, _)) in crate::memory::regions(&self.mem).into_iter().enumerate() {
            let mut log = self.vm.take_dirty_log(slot as u32, size as usize)?;
            if let Some(extra) = vmm_dirty.get(slot) {
                for (w, e) in log.iter_mut().zip(extra) {
                    *w |= e;
                }
            }
            out.push(log);
        }
        snapmem::merge_bitmaps(&mut self.populated, &out);
        Ok(out)
    }

    /// Memory equals the snapshot just written or reverted to.
    pub(super) fn set_baseline(&mut self, dir: Option<PathBuf>) {
        self.baseline = dir;
        for slot in &mut self.since_baseline {
            slot.fill(0);
        }
    }
}

pub(super) fn dirty_pages(bits: &[Vec<u64>]) -> usize {
    bits.iter().flatten().map(|w| w.count_ones() as usize).sum()
}
