//! Inside a snapshot's pause: the dirty logs' last pages, the disk switch,
//! the machine state, and the memory write started (forked for a live
//! snapshot, its few pages copied for a small incremental one) or done
//! (paused).

use std::path::{Path, PathBuf};

use super::snapshots::{ms, snap_err, PauseParts};
use super::{Vmm, VmmError};
use crate::devices::bus::lock;
use crate::snapshot::chain;
use crate::snapshot::delta::{self, DeltaIndex, DELTA_FILE};
use crate::snapshot::live::{self, StallMarker};
use crate::snapshot::state::MEMORY_FILE;
use crate::snapshot::{memory as snapmem, stall};
use std::time::Instant;

/// A live incremental snapshot of at most this many pages copies them
/// inside the pause instead of forking a writer: 1 MiB copies in about
/// 0.1 ms, less than forking the page tables of any but a tiny guest.
pub(super) const COPY_IN_PAUSE_PAGES: usize = 256;

/// Where the memory write stands when the pause ends.
pub(super) enum MemoryJob {
    /// Written inside the pause (`--paused`); the sync is left.
    Written,
    /// A forked writer writes and syncs it.
    Forked(live::Writer),
    /// A small delta's pages, copied inside the pause, packed in index
    /// order as the delta stores them.
    Copied(Vec<u8>),
}

/// What the pause captured, to be finished with the guest running.
pub(super) struct Captured {
    /// Encoded into `body` after the pause.
    pub(super) state: crate::vmm::MachineState,
    pub(super) body: Vec<u8>,
    /// `state.bin`, written and not yet synced.
    pub(super) state_file: Option<std::fs::File>,
    pub(super) memory: snapmem::MemoryOut,
    pub(super) delta: Option<DeltaIndex>,
    pub(super) job: Option<MemoryJob>,
    pub(super) frozen_paths: Vec<PathBuf>,
    pub(super) vcpu0: (Option<u32>, Vec<kvm_bindings::kvm_cpuid_entry2>),
    pub(super) parts: PauseParts,
}

impl Vmm {
    /// Inside the pause: dirty logs, disk switch, machine state, and the
    /// memory write started (live: forked) or done (paused).
    pub(super) fn capture(
        &mut self,
        tmp: &Path,
        final_dir: &Path,
        name: &str,
        prepared: Vec<crate::disk::PreparedSwitch>,
        delta_parent: Option<&str>,
        paused: bool,
    ) -> Result<Captured, VmmError> {
        let mut parts = PauseParts::default();
        let mut lap = Instant::now();
        let mut split = |into: &mut f64| {
            *into = ms(lap);
            lap = Instant::now();
        };
        self.collect_dirty()?;
        split(&mut parts.dirty_log);
        let mut frozen_paths = Vec::new();
        for (d, p) in self.devices.disks.iter_mut().zip(prepared) {
            let frozen = lock(&d.disk).switch_prepared(p).map_err(snap_err)?;
            d.layer = frozen.clone();
            frozen_paths.push(frozen);
        }
        split(&mut parts.disk_switch);
        stall::point("overlay-switched", name);
        let mut state = self.save_state()?;
        for d in &mut state.devices.disks {
            d.layer.frozen = super::disks::layer_name_in(final_dir, &d.layer.frozen);
        }
        let vcpu0 = state
            .vcpus
            .first()
            .map(|v| (v.tsc_khz, v.cpuid.clone()))
            .unwrap_or_default();
        split(&mut parts.state);
        let delta = delta_parent.map(|parent| DeltaIndex {
            parent: parent.to_string(),
            mem_file_len: crate::memory::ram_end(self.config.mem_bytes()),
            pages: chain::pages_of(&self.since_baseline, &self.mem),
        });
        let (file, path) = match &delta {
            Some(index) => {
                let path = tmp.join(DELTA_FILE);
                (delta::create_empty(&path, index).map_err(snap_err)?, path)
            }
            None => {
                let path = tmp.join(MEMORY_FILE);
                let file =
                    snapmem::create_full(&path, self.config.mem_bytes()).map_err(snap_err)?;
                (file, path)
            }
        };
        let memory = snapmem::MemoryOut::new(file, &path);
        let mem = &self.mem;
        let populated = &self.populated;
        // The delta's header and index (8 bytes a page) are encoded and
        // written by the writer, after the pause, into this buffer.
        let mut header = vec![0u8; delta.as_ref().map_or(0, DeltaIndex::header_len)];
        let mut write = |first_write: &dyn Fn()| match &delta {
            Some(index) => {
                delta::write_header(&memory.file, index, &mut header)?;
                first_write();
                delta::write_pages(&memory, mem, index)
            }
            None => snapmem::write_full(mem, populated, &memory, first_write),
        };
        let small = delta
            .as_ref()
            .filter(|d| !paused && d.pages.len() <= COPY_IN_PAUSE_PAGES);
        let job = if let Some(index) = small {
            MemoryJob::Copied(copy_pages(mem, &index.pages)?)
        } else if paused {
            write(&|| stall::point("memory-write-started", name)).map_err(snap_err)?;
            MemoryJob::Written
        } else {
            let job = || {
                write(&|| ())?;
                memory.file.sync_all()
            };
            let stall_marker = StallMarker::for_point("memory-write-started", name);
            MemoryJob::Forked(
                live::spawn(&stall_marker, job)
                    .map_err(|e| snap_err(format!("cannot start the memory writer: {e}")))?,
            )
        };
        split(&mut parts.memory);
        Ok(Captured {
            parts,
            state,
            body: Vec::new(),
            state_file: None,
            memory,
            delta,
            job: Some(job),
            frozen_paths,
            vcpu0,
        })
    }
}

/// Copies the pages at these guest page numbers out of guest memory,
/// packed one after another.
fn copy_pages(mem: &crate::memory::GuestMemory, pages: &[u64]) -> Result<Vec<u8>, VmmError> {
    let page_len = crate::memory::PAGE_SIZE as usize;
    let mut out = vec![0u8; pages.len() * page_len];
    for (&page, to) in pages.iter().zip(out.chunks_exact_mut(page_len)) {
        let Some((host, _)) = delta::host_run(mem, page) else {
            return Err(snap_err(format!("page {page:#x} is outside guest memory")));
        };
        // SAFETY: host_run found this page inside a live guest mapping; the
        // vCPUs are paused, so nothing writes it while it is copied.
        let from = unsafe { std::slice::from_raw_parts(host, page_len) };
        to.copy_from_slice(from);
    }
    Ok(out)
}
