//! Snapshot create and in-place revert on a running VM.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{Vmm, VmmError};
use crate::devices::bus::lock;
use crate::fsutil;
use crate::snapshot::format::{crc64_xz, encode_state};
use crate::snapshot::state::{Manifest, MANIFEST_FILE, MANIFEST_VERSION, MEMORY_FILE, STATE_FILE};
use crate::snapshot::{format, memory as snapmem, ops, stall, store};

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
    pub pause_ms: f64,
    pub total_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RevertReport {
    pub name: String,
    /// Pages copied back; with `full` every data page of the snapshot.
    pub pages_copied: u64,
    pub full: bool,
    pub total_ms: f64,
}

fn snap_err(e: impl std::fmt::Display) -> VmmError {
    VmmError::Snapshot(e.to_string())
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

impl Vmm {
    /// Per slot: pages written since tracking last started, by the guest
    /// (KVM's log) or by rewind itself (vm-memory's bitmap). Reading clears.
    fn take_dirty(&mut self) -> Result<Vec<Vec<u64>>, VmmError> {
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

    /// Pauses every vCPU, captures the whole machine, resumes. The snapshot
    /// directory appears whole (renamed from a temp dir) or not at all.
    pub fn snapshot_create(&mut self, name: Option<String>) -> Result<SnapshotReport, VmmError> {
        let t0 = Instant::now();
        let name = self.snapshot_name(name)?;
        let final_dir = store::snapshots_dir(&self.config.name).join(&name);
        self.snapshot_create_at(&final_dir, &name, t0)
    }

    /// Captures into `final_dir` anywhere (the boot cache uses this).
    pub fn snapshot_create_at(
        &mut self,
        final_dir: &Path,
        name: &str,
        t0: Instant,
    ) -> Result<SnapshotReport, VmmError> {
        let tmp = store::begin(final_dir)?;
        let result = self.write_snapshot(&tmp, final_dir, name, t0);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    fn write_snapshot(
        &mut self,
        tmp: &Path,
        final_dir: &Path,
        name: &str,
        t0: Instant,
    ) -> Result<SnapshotReport, VmmError> {
        // New overlays are created before the pause (it costs an fsync);
        // the switch inside the pause only re-points the open layer.
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
            crate::disk::create_overlay(&path, &name, crate::disk::ImageFormat::Qcow2, size)
                .map_err(snap_err)?;
            let p = lock(&d.disk).prepare_switch(&path);
            match p {
                Ok(p) => prepared.push(p),
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    for (path, _) in &next {
                        let _ = std::fs::remove_file(path);
                    }
                    return Err(snap_err(e));
                }
            }
            next.push((path, size));
        }
        stall::point("overlays-created", name);
        let was_running = !self.paused;
        let pause_start = Instant::now();
        self.pause()?;
        // Taking the dirty log folds it into `populated` (nothing is lost),
        // and the baseline it counted from is dropped until the new
        // snapshot is safely written.
        let parent = self.baseline.take();
        let captured = self.take_dirty().and_then(|_| {
            let mut frozen_paths = Vec::new();
            for (d, p) in self.devices.disks.iter_mut().zip(prepared) {
                let frozen = lock(&d.disk).switch_prepared(p).map_err(snap_err)?;
                d.layer = frozen.clone();
                frozen_paths.push(frozen);
            }
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
            let body = encode_state(&state).map_err(snap_err)?;
            let mem_bytes = snapmem::write_full(
                &self.mem,
                self.config.mem_bytes(),
                &self.populated,
                &tmp.join(MEMORY_FILE),
                name,
            )
            .map_err(snap_err)?;
            stall::point("memory-written", name);
            Ok::<_, VmmError>((body, mem_bytes, frozen_paths, vcpu0))
        });
        if was_running {
            self.resume()?;
        }
        let pause_ms = ms(pause_start);
        let (body, mem_bytes, frozen_paths, vcpu0) = match captured {
            Ok(c) => c,
            Err(e) => {
                // Overlays not switched to are unused; one the VM now writes
                // to stays (its lower layer is simply not in any snapshot).
                for (path, _) in &next {
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
        // The layers just frozen must survive a crash before the snapshot
        // that names them is published.
        for (path, d) in frozen_paths.iter().zip(&self.devices.disks) {
            crate::disk::make_durable(path).map_err(snap_err)?;
            bound_chain(path, &d.base.path)?;
        }
        let mem_path = tmp.join(MEMORY_FILE);
        std::fs::File::open(&mem_path)
            .and_then(|f| f.sync_all())
            .map_err(|e| snap_err(format!("cannot flush {}: {e}", mem_path.display())))?;
        let state_path = tmp.join(STATE_FILE);
        fsutil::atomic_write(&state_path, &body)
            .map_err(|e| snap_err(format!("cannot write {}: {e}", state_path.display())))?;
        let state_bytes = body.len() as u64;
        stall::point("state-written", name);
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            name: name.to_string(),
            vm: self.config.name.clone(),
            parent: parent.as_ref().map(|p| parent_label(p, &self.config.name)),
            created_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            config: self.config.clone(),
            kernel: self.kernel_identity(),
            host: super::host_identity::host_identity(self.host, vcpu0.0, &vcpu0.1),
            state_bytes,
            memory_bytes: mem_bytes,
            memory_file_len: crate::memory::ram_end(self.config.mem_bytes()),
            state_crc64: crc64_xz(&body),
            pause_ms,
            total_ms: ms(t0),
            disk_layers: frozen_paths
                .iter()
                .map(|f| super::disks::layer_name_in(final_dir, f))
                .collect(),
        };
        format::write_json_file(&tmp.join(MANIFEST_FILE), &manifest).map_err(snap_err)?;
        stall::point("before-publish", name);
        store::publish(tmp, final_dir)?;
        stall::point("published", name);
        self.baseline = Some(final_dir.to_path_buf());
        Ok(SnapshotReport {
            name: name.to_string(),
            path: final_dir.to_path_buf(),
            size_bytes: state_bytes + mem_bytes,
            pause_ms,
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

    /// Puts the running VM back to snapshot `name` in place. The bundle is
    /// validated whole first: a refused revert leaves the VM as it was.
    pub fn revert(&mut self, name: &str) -> Result<RevertReport, VmmError> {
        let t0 = Instant::now();
        let dir = store::resolve(name, Some(&self.config.name))?;
        let target = ops::Target {
            host_kind: super::host_identity::host_kind_name(self.host),
            offered: super::host_identity::host_features(
                self.host,
                self.vm.supported_cpuid.as_slice(),
            ),
            tsc_khz: self.tsc_khz,
            can_scale_tsc: false,
            running: Some(ops::Running {
                config: &self.config,
                disks: self.devices.disks.len(),
            }),
        };
        let ops::Bundle {
            state,
            memory: file,
            ..
        } = ops::validate::<super::MachineState>(&dir, &target)?;
        let mem_path = dir.join(MEMORY_FILE);
        // Fresh overlays on the snapshot's frozen layers, made before the pause.
        let vm_dir = crate::paths::vm_dir(&self.config.name);
        let mut fresh = Vec::new();
        for (d, snap) in self.devices.disks.iter().zip(&state.devices.disks) {
            let snap = &snap.layer;
            let path = super::disks::overlay_path(&vm_dir, d.index);
            let layer = crate::snapshot::bundle::layer_path(&dir, &snap.frozen);
            crate::disk::create_overlay(
                &path,
                &super::disks::backing_name(&path, &layer),
                crate::disk::ImageFormat::Qcow2,
                snap.size,
            )
            .map_err(snap_err)?;
            let opened = crate::disk::Disk::open(&path).map_err(snap_err)?;
            fresh.push(opened);
        }
        let was_running = !self.paused;
        self.pause()?;
        let mut replaced = Vec::new();
        for ((d, opened), snap) in self
            .devices
            .disks
            .iter_mut()
            .zip(fresh)
            .zip(&state.devices.disks)
        {
            let old = std::mem::replace(&mut *lock(&d.disk), opened);
            d.layer = crate::snapshot::bundle::layer_path(&dir, &snap.layer.frozen);
            replaced.push(old.path().to_path_buf());
        }
        let fast = self
            .baseline
            .as_deref()
            .is_some_and(|b| crate::fsutil::same_file(b, &dir));
        let dirty = self.take_dirty()?;
        // From here guest memory is being rewritten: if anything fails, no
        // baseline is trustworthy any more.
        self.baseline = None;
        let pages_copied = if fast {
            snapmem::revert_dirty(&self.mem, &file, &mem_path, &dirty).map_err(snap_err)?
        } else {
            snapmem::revert_full(&self.mem, &file, &mem_path).map_err(snap_err)?;
            let data = snapmem::data_bitmap(&file, &self.mem);
            snapmem::merge_bitmaps(&mut self.populated, &data);
            data.iter().flatten().map(|w| w.count_ones() as u64).sum()
        };
        if self.host.shadows_guest_page_tables() {
            self.vm.reload_memory(&self.mem)?;
        }
        self.apply_state(&state)?;
        self.baseline = Some(dir);
        if was_running {
            self.resume()?;
        }
        // The replaced tops were live overlays, never part of a snapshot
        // (a snapshot freezes its layer and moves the VM to a new one).
        for path in replaced {
            let _ = std::fs::remove_file(path);
        }
        Ok(RevertReport {
            name: name.to_string(),
            pages_copied,
            full: !fast,
            total_ms: ms(t0),
        })
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
