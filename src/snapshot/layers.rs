//! Disk layers shared between snapshots. A snapshot's frozen qcow2 layer is
//! the backing file of whatever came after it (child snapshots' layers,
//! VMs' live overlays, clones). Deleting a snapshot streams its layer into
//! every frozen dependent (each step crash-safe: a new file renamed over
//! the old one), then removes the layer once nothing reads through it. A
//! layer under a running VM's open overlay stays until that VM moves on.

use std::path::{Path, PathBuf};

use crate::disk::{self, DiskError};
use crate::paths;

/// Every qcow2 file rewind keeps for VMs' disks.
fn all_layers() -> Vec<PathBuf> {
    std::fs::read_dir(paths::vms_dir())
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|vm| {
            std::fs::read_dir(vm.path().join("disks"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|f| f.path())
                .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Images whose backing file is `layer`.
pub fn dependents(layer: &Path) -> Vec<PathBuf> {
    all_layers()
        .into_iter()
        .filter(|p| {
            disk::backing_chain(p)
                .ok()
                .and_then(|chain| {
                    chain
                        .get(1)
                        .map(|(b, _)| crate::fsutil::same_file(b, layer))
                })
                .unwrap_or(false)
        })
        .collect()
}

/// Whether `image` is the live overlay of a VM that is running now (its
/// control socket answers): such a file is open for writing and must not
/// be replaced. A VM process asking (a delete through its API) runs under a
/// seccomp filter that forbids sockets: there every writable overlay counts
/// as in use, its own as it is and others' to be safe (kept, never lost).
fn in_use_by_running_vm(image: &Path) -> bool {
    let vm_dir = image.parent().and_then(Path::parent);
    let writable = std::fs::metadata(image)
        .map(|m| !m.permissions().readonly())
        .unwrap_or(false);
    if writable && crate::seccomp::filtered_here() {
        return true;
    }
    writable
        && vm_dir
            .is_some_and(|d| std::os::unix::net::UnixStream::connect(d.join("api.sock")).is_ok())
}

/// What happened to a deleted snapshot's layers.
#[derive(Debug, Default, serde::Serialize)]
pub struct LayerReport {
    /// Dependents that took over the deleted layer's data.
    pub merged_into: Vec<PathBuf>,
    /// Layers removed (space freed).
    pub removed: Vec<PathBuf>,
    /// Layers kept because a running VM's open overlay reads through them.
    pub kept: Vec<PathBuf>,
}

/// Merges `layers` into what depends on them and removes them when nothing
/// does any more. Call after the snapshot directory itself is gone.
pub fn release(layers: &[PathBuf]) -> Result<LayerReport, DiskError> {
    let mut report = LayerReport::default();
    // Half-written merge results of a delete that was killed are never
    // referenced by any image: clear them before starting another.
    for dir in layers.iter().filter_map(|l| l.parent()) {
        let _ = disk::cleanup_temps(dir);
    }
    for layer in layers {
        if !layer.exists() {
            continue;
        }
        let deps = dependents(layer);
        let mut blocked = false;
        for dep in &deps {
            if in_use_by_running_vm(dep) {
                blocked = true;
                continue;
            }
            // stream() writes a new file and renames it over the old one;
            // a frozen (read-only) dependent stays read-only.
            let frozen = std::fs::metadata(dep)
                .map(|m| m.permissions().readonly())
                .unwrap_or(false);
            let phase = crate::progress::Phase::spinner(format!(
                "merge {} into {}",
                layer.file_name().unwrap_or_default().to_string_lossy(),
                dep.file_name().unwrap_or_default().to_string_lossy()
            ));
            disk::stream(dep)?;
            phase.finish();
            if frozen {
                let _ = std::fs::set_permissions(
                    dep,
                    std::os::unix::fs::PermissionsExt::from_mode(crate::paths::frozen_mode()),
                );
            }
            report.merged_into.push(dep.clone());
        }
        if blocked {
            report.kept.push(layer.clone());
        } else {
            let _ = std::fs::set_permissions(
                layer,
                std::os::unix::fs::PermissionsExt::from_mode(crate::paths::file_mode()),
            );
            std::fs::remove_file(layer).map_err(|e| DiskError::Io {
                op: "remove",
                path: layer.clone(),
                io: e,
            })?;
            report.removed.push(layer.clone());
        }
    }
    Ok(report)
}

/// Removes, nearest the top first, the layers of `candidates` that a
/// collapse cut out of a running VM's chain and nothing needs any more: in
/// the same directory as `frozen` (never a boot cache's or another VM's),
/// named by no snapshot, and with no image reading through them. These are
/// the layers [`release`] kept for that VM's overlay: once the VM moved on,
/// nothing else would ever remove them, and every snapshot, revert and
/// delete cycle left one more (and made every later delete slower, as it
/// looks at every layer). Returns the layers removed. When a manifest
/// cannot be read nothing is removed: it might name any of them.
pub fn release_orphans(frozen: &Path, candidates: &[PathBuf]) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let mut named = Vec::new();
    for (_, manifest) in super::store::list(None) {
        match manifest {
            Ok(m) => named.extend(m.disk_layers),
            Err(_) => return removed,
        }
    }
    let dir = frozen.parent();
    for layer in candidates {
        let own = layer.parent() == dir;
        let needed = named.iter().any(|n| crate::fsutil::same_file(n, layer))
            || !dependents(layer).is_empty();
        if !own || needed {
            continue;
        }
        if std::fs::remove_file(layer).is_ok() {
            removed.push(layer.clone());
        }
    }
    removed
}

/// Bytes a layer occupies on disk (allocated, not its virtual size).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}
