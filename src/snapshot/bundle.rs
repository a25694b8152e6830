//! Standalone snapshot bundles: `rewind snapshot export NAME DIR`.
//!
//! A snapshot in the store names its disk layers by where they live (the VM's
//! `disks/` directory), and each layer reads through its parents', so moving
//! the snapshot directory alone would leave its disks behind. An exported
//! bundle carries one qcow2 layer per disk, `diskN.qcow2`, holding everything
//! above the base (the chain collapsed), and names it relative to itself, so
//! the directory can be moved or copied anywhere the base image is found at
//! the same path. Like every snapshot directory it appears whole or not at
//! all (written under a temp name beside DIR, then renamed).

use std::io;
use std::path::{Path, PathBuf};

use super::format::{crc64_xz, encode_state, write_json_file, FormatError};
use super::ops;
use super::state::{StoredState, MANIFEST_FILE, MEMORY_FILE, STATE_FILE};
use super::store::{self, StoreError};
use crate::fsutil;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{0}")]
    Load(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("disk {index} of the snapshot: {source}")]
    Disk {
        index: usize,
        source: crate::disk::DiskError,
    },
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// A disk layer named in a snapshot: a relative name is relative to the
/// snapshot directory (`diskN.qcow2` in a bundle, `../../disks/FILE` in a
/// VM's store), an absolute one is used as is. The result has no `..`, so it
/// stays valid after the snapshot directory is gone (delete releases the
/// layers after removing the directory).
pub fn layer_path(snapshot_dir: &Path, layer: &Path) -> PathBuf {
    if layer.is_absolute() {
        return layer.to_path_buf();
    }
    // Canonical, so no symlink makes dropping a `..` below wrong.
    let dir = std::fs::canonicalize(snapshot_dir).unwrap_or_else(|_| snapshot_dir.to_path_buf());
    let mut out = PathBuf::new();
    for c in dir.join(layer).components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Writes a standalone copy of the snapshot in `src` to `dest` (which must
/// not exist). Returns the bytes of disk data written.
pub fn export<S: StoredState>(src: &Path, dest: &Path) -> Result<u64, BundleError> {
    let (mut manifest, mut state) =
        ops::load::<S>(src).map_err(|e| BundleError::Load(e.to_string()))?;
    let tmp = store::begin(dest)?;
    let result = (|| {
        let mut disk_bytes = 0;
        manifest.disk_layers.clear();
        let layers: Vec<(PathBuf, PathBuf)> = state
            .disk_layers()
            .into_iter()
            .map(|(base, frozen)| (base.path.clone(), layer_path(src, frozen)))
            .collect();
        for (index, ((base, layer), frozen)) in
            layers.iter().zip(state.disk_layers_mut()).enumerate()
        {
            let name = PathBuf::from(format!("disk{index}.qcow2"));
            let out = tmp.join(&name);
            let phase = crate::progress::Phase::spinner(format!("export disk {index}"));
            crate::disk::collapse(layer, base, &out)
                .map_err(|source| BundleError::Disk { index, source })?;
            phase.finish();
            disk_bytes += super::layers::allocated_bytes(&out);
            *frozen = name.clone();
            manifest.disk_layers.push(name);
        }
        // A bundle stands alone, so its memory is one full layer.
        let mem_path = tmp.join(MEMORY_FILE);
        let phase = crate::progress::Phase::spinner("export memory");
        let bytes = super::chain::open(src, manifest.memory_file_len)
            .and_then(|chain| chain.flatten_to(&mem_path))
            .map_err(|e| BundleError::Load(e.to_string()))?;
        phase.finish_bytes(bytes);
        let body = encode_state(&state)?;
        let state_path = tmp.join(STATE_FILE);
        fsutil::atomic_write(&state_path, &body).map_err(|source| BundleError::Io {
            op: "write",
            path: state_path,
            source,
        })?;
        manifest.state_bytes = body.len() as u64;
        manifest.state_crc64 = crc64_xz(&body);
        // A bundle stands alone: its parent is in another store, or nowhere.
        manifest.parent = None;
        write_json_file(&tmp.join(MANIFEST_FILE), &manifest)?;
        store::publish(&tmp, dest)?;
        Ok(disk_bytes)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
