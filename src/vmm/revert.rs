//! In-place revert of a running VM to one of its snapshots.

use std::time::Instant;

use serde::Serialize;

use super::snapshots::{ms, snap_err};
use super::{Vmm, VmmError};
use crate::devices::bus::lock;
use crate::snapshot::{memory as snapmem, ops, store};

#[derive(Debug, Clone, Serialize)]
pub struct RevertReport {
    pub name: String,
    /// Pages copied back; with `full` every data page of the snapshot.
    pub pages_copied: u64,
    pub full: bool,
    pub total_ms: f64,
}

impl Vmm {
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
            memory: chain,
            ..
        } = ops::validate::<super::MachineState>(&dir, &target)?;
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
        self.collect_dirty()?;
        // From here guest memory is being rewritten: if anything fails, no
        // baseline is trustworthy any more.
        self.baseline = None;
        let pages_copied = if fast {
            chain
                .revert_pages(&self.mem, &self.since_baseline)
                .map_err(snap_err)?
        } else {
            chain.revert_full(&self.mem).map_err(snap_err)?;
            let data = chain.data_bitmap(&self.mem);
            snapmem::merge_bitmaps(&mut self.populated, &data);
            data.iter().flatten().map(|w| w.count_ones() as u64).sum()
        };
        if self.host.shadows_guest_page_tables() {
            self.vm.reload_memory(&self.mem)?;
        }
        self.apply_state(&state)?;
        self.set_baseline(Some(dir));
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
