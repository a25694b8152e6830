//! Snapshot create on a running VM: live (the guest runs while a forked
//! writer saves memory as it was at the pause, see `snapshot::live`) or
//! paused, full or incremental (only the pages written since the VM's
//! baseline, when that baseline is a snapshot of this VM).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::capture::{Captured, MemoryJob, COPY_IN_PAUSE_PAGES};
use super::dirty::dirty_pages;
use super::{Vmm, VmmError};
use crate::devices::bus::lock;
use crate::fsutil;
use crate::snapshot::chain::{self, MAX_DEPTH};
use crate::snapshot::delta::{self, DeltaIndex, DELTA_FILE};
use crate::snapshot::format::{crc64_xz, encode_state};
use crate::snapshot::state::{Manifest, MANIFEST_FILE, MANIFEST_VERSION, MEMORY_FILE, STATE_FILE};
use crate::snapshot::{format, memory as snapmem, stall, store};

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
    /// The parent whose memory this snapshot's incremental layer sits on.
    pub incremental_on: Option<String>,
    pub live: bool,
    pub pause_ms: f64,
    /// Where the pause went: stopping the vCPUs, taking the dirty logs,
    /// switching disk layers, saving vCPU and device state, starting (live)
    /// or doing (paused) the memory write, and resuming.
    pub pause_parts_ms: PauseParts,
    pub total_ms: f64,
}

pub(super) fn snap_err(e: impl std::fmt::Display) -> VmmError {
    VmmError::Snapshot(e.to_string())
}

pub(super) fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// How to take a snapshot.
#[derive(Debug, Clone, Copy, Default)]
pub struct SnapshotHow {
    /// Keep the guest paused until memory is written.
    pub paused: bool,
    /// Store all of memory, not only the changes over the baseline.
    pub full: bool,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PauseParts {
    pub stop_vcpus: f64,
    pub dirty_log: f64,
    pub disk_switch: f64,
    pub state: f64,
    pub memory: f64,
    pub resume: f64,
}

/// A live snapshot's memory writer is running: the snapshot is finished
/// (manifest, publish) when it exits.
pub(crate) struct PendingSnapshot {
    tmp: PathBuf,
    final_dir: PathBuf,
    name: String,
    t0: Instant,
    captured: Captured,
    delta_parent: Option<String>,
    paused: bool,
    pause_ms: f64,
}

impl PendingSnapshot {
    fn writer_pid(&self) -> Option<libc::pid_t> {
        match &self.captured.job {
            Some(MemoryJob::Forked(w)) => Some(w.pid()),
            _ => None,
        }
    }
}

/// Answers the client that asked for a snapshot.
pub(crate) type SnapshotReply = Box<dyn FnOnce(Result<SnapshotReport, VmmError>)>;

impl Vmm {
    fn snapshot_name(&self, name: Option<String>) -> Result<String, VmmError> {
        if let Some(n) = name {
            if !crate::config::valid_name(&n) {
                return Err(snap_err(format!(
                    "invalid snapshot name {n:?}: use 1-64 characters of A-Z a-z 0-9 . _ - (not starting with '.')"
                )));
            }
            return Ok(n);
        }
        let dir = store::snapshots_dir(&self.config.name);
        Ok((1..)
            .map(|i| format!("snap-{i}"))
            .find(|n| !dir.join(n).exists())
            .unwrap_or_else(|| "snap".into()))
    }

    /// Captures the whole machine. Live unless `paused`: the vCPUs stop only
    /// while state is captured and the memory writer forked. The snapshot
    /// directory appears whole (renamed from a temp dir) or not at all.
    pub fn snapshot_create(
        &mut self,
        name: Option<String>,
        paused: bool,
        full: bool,
    ) -> Result<SnapshotReport, VmmError> {
        let t0 = Instant::now();
        // First, so that a generated name skips the one a pending snapshot
        // is about to publish.
        self.settle_snapshot();
        let name = self.snapshot_name(name)?;
        let final_dir = store::snapshots_dir(&self.config.name).join(&name);
        let how = SnapshotHow { paused, full };
        self.snapshot_create_at(&final_dir, &name, t0, how)
    }

    /// Captures into `final_dir` anywhere (the boot cache uses this).
    pub fn snapshot_create_at(
        &mut self,
        final_dir: &Path,
        name: &str,
        t0: Instant,
        how: SnapshotHow,
    ) -> Result<SnapshotReport, VmmError> {
        let pending = self.start_snapshot(final_dir, name, t0, how)?;
        self.finish_snapshot(pending)
    }

    /// [`Vmm::snapshot_create`] for an API client: a live snapshot answers
    /// when its memory writer is done, and the VMM serves the guest's
    /// devices and other clients meanwhile (see [`Vmm::settle_snapshot`]).
    pub(crate) fn snapshot_create_then(
        &mut self,
        name: Option<String>,
        how: SnapshotHow,
        reply: SnapshotReply,
    ) {
        let t0 = Instant::now();
        self.settle_snapshot();
        let begun = self.snapshot_name(name).and_then(|name| {
            let final_dir = store::snapshots_dir(&self.config.name).join(&name);
            self.start_snapshot(&final_dir, &name, t0, how)
        });
        match begun {
            Ok(p) if p.writer_pid().is_some() => self.pending = Some((p, reply)),
            Ok(p) => reply(self.finish_snapshot(p)),
            Err(e) => reply(Err(e)),
        }
    }

    /// Finishes a pending snapshot first, then begins one into `final_dir`
    /// through a temp directory, removed again if the beginning fails.
    fn start_snapshot(
        &mut self,
        final_dir: &Path,
        name: &str,
        t0: Instant,
        how: SnapshotHow,
    ) -> Result<PendingSnapshot, VmmError> {
        self.settle_snapshot();
        let tmp = store::begin(final_dir)?;
        self.begin_snapshot(&tmp, final_dir, name, t0, how)
            .inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&tmp);
            })
    }

    /// The pid of a live snapshot's memory writer still running, for the
    /// event loop to wake when it exits.
    pub(crate) fn pending_writer(&self) -> Option<libc::pid_t> {
        self.pending.as_ref().and_then(|(p, _)| p.writer_pid())
    }

    /// Finishes the live snapshot whose writer is running, if any (waiting
    /// for the writer), and answers its client. Whatever needs the snapshot
    /// done or the store still (another snapshot, a revert, a delete, the
    /// end of the run) calls this first.
    pub(crate) fn settle_snapshot(&mut self) {
        if let Some((p, reply)) = self.pending.take() {
            reply(self.finish_snapshot(p));
        }
    }

    /// The snapshot a new one in `final_dir` may store only changes over:
    /// the baseline, when it is a sibling (same VM) whose chain is short.
    fn incremental_parent(&self, final_dir: &Path) -> Option<String> {
        let parent = self.baseline.as_ref()?;
        let same_store = match (parent.parent(), final_dir.parent()) {
            (Some(a), Some(b)) => fsutil::same_file(a, b),
            _ => false,
        };
        if !same_store {
            return None;
        }
        let len = crate::memory::ram_end(self.config.mem_bytes());
        let chain = chain::open(parent, len).ok()?;
        (chain.depth() < MAX_DEPTH)
            .then(|| parent.file_name())
            .flatten()
            .map(|n| n.to_string_lossy().into_owned())
    }

    /// New overlays for every disk, created before the pause (it costs an
    /// fsync); the switch inside the pause only re-points the open layer.
    fn prepare_overlays(
        &self,
    ) -> Result<(Vec<PathBuf>, Vec<crate::disk::PreparedSwitch>), VmmError> {
        let vm_dir = crate::paths::vm_dir(&self.config.name);
        let mut next = Vec::new();
        let mut prepared = Vec::new();
        for d in &self.devices.disks {
            let (current, size) = {
                let disk = lock(&d.disk);
                (disk.path().to_path_buf(), disk.size())
            };
            let path = super::disks::overlay_path(&vm_dir, d.index);
            let name = super::disks::backing_name(&path, &current);
            let made =
                crate::disk::create_overlay(&path, &name, crate::disk::ImageFormat::Qcow2, size)
                    .map_err(snap_err)
                    .and_then(|_| lock(&d.disk).prepare_switch(&path).map_err(snap_err));
            match made {
                Ok(p) => prepared.push(p),
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    for path in &next {
                        let _ = std::fs::remove_file(path);
                    }
                    return Err(e);
                }
            }
            next.push(path);
        }
        Ok((next, prepared))
    }

    /// Pauses, captures and resumes; leaves the memory write running (live)
    /// and makes the state file and the frozen disk layers durable meanwhile.
    /// On error the caller removes `tmp`.
    fn begin_snapshot(
        &mut self,
        tmp: &Path,
        final_dir: &Path,
        name: &str,
        t0: Instant,
        how: SnapshotHow,
    ) -> Result<PendingSnapshot, VmmError> {
        let paused = how.paused;
        let (next, prepared) = self.prepare_overlays()?;
        stall::point("overlays-created", name);
        let delta_parent = self.incremental_parent(final_dir).filter(|_| !how.full);
        let was_running = !self.paused;
        // The dirty logs are cumulative, so most of them can be taken with
        // the guest running: the pause then takes (and write-protects
        // again) only the pages written since, not all of them.
        self.collect_dirty()?;
        // A snapshot that will fork has KVM drop its mappings first, so
        // that the fork in the pause does not (see drop_kvm_mappings). One
        // that will copy its few pages in the pause does not fork.
        let will_copy =
            delta_parent.is_some() && dirty_pages(&self.since_baseline) <= COPY_IN_PAUSE_PAGES;
        if !paused && !will_copy {
            crate::memory::drop_kvm_mappings(&self.mem);
        }
        let pause_start = Instant::now();
        self.pause()?;
        let stop_vcpus = ms(pause_start);
        let captured = self.capture(
            tmp,
            final_dir,
            name,
            prepared,
            delta_parent.as_deref(),
            paused,
        );
        let resume_start = Instant::now();
        if was_running {
            self.resume()?;
        }
        let pause_ms = ms(pause_start);
        let resume = ms(resume_start);
        let mut c = match captured {
            Ok(c) => c,
            Err(e) => {
                // Overlays not switched to are unused; one the VM now writes
                // to stays (its lower layer is simply not in any snapshot).
                for path in &next {
                    if !self
                        .devices
                        .disks
                        .iter()
                        .any(|d| lock(&d.disk).path() == path)
                    {
                        let _ = std::fs::remove_file(path);
                    }
                }
                return Err(e);
            }
        };
        c.parts.stop_vcpus = stop_vcpus;
        c.parts.resume = resume;
        // While the writer works: the state file, and the layers just frozen,
        // which must survive a crash before the snapshot naming them is
        // published.
        let state_path = tmp.join(STATE_FILE);
        let state_written = encode_state(&c.state).map_err(snap_err).and_then(|body| {
            c.body = body;
            c.state_file =
                Some(fsutil::write_new(&state_path, &c.body).map_err(|e| {
                    snap_err(format!("cannot write {}: {e}", state_path.display()))
                })?);
            Ok(())
        });
        if state_written.is_ok() {
            stall::point("state-written", name);
        }
        let disks_durable = state_written.and_then(|_| {
            for (path, d) in c.frozen_paths.iter().zip(&self.devices.disks) {
                crate::disk::make_durable(path).map_err(snap_err)?;
                bound_chain(path, &d.base.path)?;
            }
            Ok::<_, VmmError>(())
        });
        if let Err(e) = disks_durable {
            if let Some(MemoryJob::Forked(w)) = c.job.take() {
                w.abandon();
            }
            return Err(e);
        }
        Ok(PendingSnapshot {
            tmp: tmp.to_path_buf(),
            final_dir: final_dir.to_path_buf(),
            name: name.to_string(),
            t0,
            captured: c,
            delta_parent,
            paused,
            pause_ms,
        })
    }

    /// Waits for the memory write, then writes the manifest and publishes.
    /// Removes the temp directory on error.
    fn finish_snapshot(&mut self, p: PendingSnapshot) -> Result<SnapshotReport, VmmError> {
        let tmp = p.tmp.clone();
        let result = self.publish_snapshot(p);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    fn publish_snapshot(&mut self, p: PendingSnapshot) -> Result<SnapshotReport, VmmError> {
        let PendingSnapshot {
            tmp,
            final_dir,
            name,
            t0,
            captured: mut c,
            delta_parent,
            paused,
            pause_ms,
        } = p;
        let name = name.as_str();
        // The files the writer did not sync: made durable together below.
        let mut memory_synced = false;
        match c.job.take() {
            Some(MemoryJob::Forked(w)) => {
                w.wait()
                    .map_err(|e| snap_err(format!("cannot write guest memory: {e}")))?;
                memory_synced = true;
            }
            Some(MemoryJob::Copied(pages)) => {
                let write = |index: &DeltaIndex| {
                    delta::write_header(&c.memory.file, index, &mut vec![0; index.header_len()])?;
                    stall::point("memory-write-started", name);
                    // Through the page cache: at most 1 MiB, made durable with
                    // the other files below instead of waiting for the disk here.
                    c.memory.file.write_all_at(&pages, index.data_offset())
                };
                c.delta
                    .as_ref()
                    .map_or(Ok(()), write)
                    .map_err(|e| snap_err(format!("cannot write guest memory: {e}")))?;
            }
            Some(MemoryJob::Written) | None => {}
        }
        stall::point("memory-written", name);
        let mem_bytes = match &c.delta {
            Some(index) => index.pages.len() as u64 * crate::memory::PAGE_SIZE,
            None => chain::allocated(&c.memory.file),
        };
        let state_bytes = c.body.len() as u64;
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            name: name.to_string(),
            vm: self.config.name.clone(),
            parent: self
                .baseline
                .as_ref()
                .map(|p| parent_label(p, &self.config.name)),
            created_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            config: self.config.clone(),
            kernel: self.kernel_identity(),
            host: super::host_identity::host_identity(self.host, c.vcpu0.0, &c.vcpu0.1),
            state_bytes,
            memory_bytes: mem_bytes,
            memory_parent: delta_parent.clone(),
            memory_file_len: crate::memory::ram_end(self.config.mem_bytes()),
            state_crc64: crc64_xz(&c.body),
            pause_ms,
            total_ms: ms(t0),
            disk_layers: c
                .frozen_paths
                .iter()
                .map(|f| super::disks::layer_name_in(&final_dir, f))
                .collect(),
        };
        let json = format::json_bytes(&manifest).map_err(snap_err)?;
        let manifest_path = tmp.join(MANIFEST_FILE);
        let manifest_file = fsutil::write_new(&manifest_path, &json)
            .map_err(|e| snap_err(format!("cannot write {}: {e}", manifest_path.display())))?;
        let state_path = tmp.join(STATE_FILE);
        let memory_path = tmp.join(if c.delta.is_some() {
            DELTA_FILE
        } else {
            MEMORY_FILE
        });
        let mut unsynced = vec![(&manifest_file, manifest_path.as_path())];
        if let Some(f) = &c.state_file {
            unsynced.push((f, state_path.as_path()));
        }
        if !memory_synced {
            unsynced.push((&c.memory.file, memory_path.as_path()));
        }
        fsutil::sync_together(&unsynced)
            .map_err(|(path, e)| snap_err(format!("cannot flush {}: {e}", path.display())))?;
        stall::point("before-publish", name);
        store::publish(&tmp, &final_dir)?;
        stall::point("published", name);
        self.set_baseline(Some(final_dir.clone()));
        if let (Some(u), Ok(file)) = (&self.upkeep, c.memory.file.try_clone()) {
            u.prefetch(file, snapmem::PREFETCH_LIMIT);
        }
        if !paused {
            self.mend_huge_pages();
        }
        Ok(SnapshotReport {
            name: name.to_string(),
            path: final_dir,
            size_bytes: state_bytes + mem_bytes,
            incremental_on: delta_parent,
            live: !paused,
            pause_ms,
            pause_parts_ms: c.parts,
            total_ms: ms(t0),
        })
    }

    /// The kernel's identity, read once (see `Vmm::kernel_identity`). A kernel
    /// file gone since boot is recorded as the error, as it always was: the
    /// field is for people, and the snapshot itself does not need it.
    fn kernel_identity(&mut self) -> String {
        if let Some(k) = &self.kernel_identity {
            return k.clone();
        }
        match crate::snapshot::boot_cache::kernel_identity(&self.config.kernel) {
            Ok(k) => self.kernel_identity.insert(k).clone(),
            Err(e) => e.to_string(),
        }
    }
}

/// Keeps every chain at most `COLLAPSE_DEPTH` qcow2 layers deep: a frozen layer above that is
/// rewritten as one layer on the base (same bytes, new inode renamed over the old one, so a
/// crash leaves the old layer or the new one, and what reads through it sees no change).
fn bound_chain(frozen: &Path, base: &Path) -> Result<(), VmmError> {
    let chain = crate::disk::backing_chain(frozen).map_err(snap_err)?;
    let depth = chain
        .iter()
        .position(|(p, _)| crate::fsutil::same_file(p, base))
        .unwrap_or(chain.len() - 1);
    if depth > crate::disk::COLLAPSE_DEPTH {
        crate::disk::collapse(frozen, base, frozen).map_err(snap_err)?;
        // The old chain's layers from deleted snapshots are orphans now.
        let cut: Vec<_> = chain[1..depth].iter().map(|(p, _)| p.clone()).collect();
        crate::snapshot::layers::release_orphans(frozen, &cut);
    }
    Ok(())
}

fn parent_label(parent: &Path, vm: &str) -> String {
    if parent.parent() == Some(store::snapshots_dir(vm).as_path()) {
        parent
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        parent.display().to_string()
    }
}
