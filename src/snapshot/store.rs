//! Where snapshots live: `$REWIND_HOME/vms/VM/snapshots/NAME/`, or any
//! directory given by path (so a CI job can ship one). A snapshot directory
//! is written under a temporary name and renamed whole, so it exists
//! complete or not at all, whatever kills rewind in between.

use std::path::{Path, PathBuf};

use super::format::{read_json_file, FormatError};
use super::state::{Manifest, MANIFEST_FILE};
use crate::fsutil;
use crate::paths;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no snapshot named {name:?}{}", vm.as_ref().map(|v| format!(" for VM {v:?}")).unwrap_or_default())]
    NotFound { name: String, vm: Option<String> },
    #[error("snapshot name {0:?} is ambiguous: several VMs have it; add --vm")]
    Ambiguous(String),
    #[error("a snapshot named {0:?} already exists")]
    Exists(String),
    #[error("{0}")]
    Format(#[from] FormatError),
    #[error("snapshot store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub fn snapshots_dir(vm: &str) -> PathBuf {
    paths::vm_dir(vm).join("snapshots")
}

/// A NAME, or a PATH (anything with a '/') to a snapshot directory.
pub fn resolve(name_or_path: &str, vm: Option<&str>) -> Result<PathBuf, StoreError> {
    if name_or_path.contains('/') {
        let p = PathBuf::from(name_or_path);
        return if p.join(MANIFEST_FILE).exists() || p.exists() {
            Ok(p)
        } else {
            Err(StoreError::NotFound {
                name: name_or_path.into(),
                vm: None,
            })
        };
    }
    if let Some(vm) = vm {
        let p = snapshots_dir(vm).join(name_or_path);
        return if p.is_dir() {
            Ok(p)
        } else {
            Err(StoreError::NotFound {
                name: name_or_path.into(),
                vm: Some(vm.into()),
            })
        };
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(paths::vms_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("snapshots").join(name_or_path))
        .filter(|p| p.is_dir())
        .collect();
    match found.len() {
        0 => Err(StoreError::NotFound {
            name: name_or_path.into(),
            vm: None,
        }),
        1 => Ok(found.remove(0)),
        _ => Err(StoreError::Ambiguous(name_or_path.into())),
    }
}

/// Disk layers come back as paths: a manifest names them relative to its
/// directory when they are in the same VM directory or bundle.
pub fn read_manifest(dir: &Path) -> Result<Manifest, StoreError> {
    let mut m: Manifest = read_json_file(&dir.join(MANIFEST_FILE))?;
    for layer in &mut m.disk_layers {
        *layer = super::bundle::layer_path(dir, layer);
    }
    Ok(m)
}

/// Every complete snapshot of `vm` (or of every VM), oldest first.
pub fn list(vm: Option<&str>) -> Vec<(PathBuf, Result<Manifest, StoreError>)> {
    let vms: Vec<String> = match vm {
        Some(v) => vec![v.to_string()],
        None => std::fs::read_dir(paths::vms_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
    };
    let mut out: Vec<(PathBuf, Result<Manifest, StoreError>)> = vms
        .iter()
        .flat_map(|v| {
            std::fs::read_dir(snapshots_dir(v))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| e.path())
                .collect::<Vec<_>>()
        })
        .map(|p| {
            let m = read_manifest(&p);
            (p, m)
        })
        .collect();
    out.sort_by_key(|(p, m)| {
        (
            m.as_ref().map(|m| m.created_unix_ms).unwrap_or(0),
            p.clone(),
        )
    });
    out
}

/// A fresh temporary directory beside where `final_dir` will appear;
/// leftovers of dead processes are cleaned first.
pub fn begin(final_dir: &Path) -> Result<PathBuf, StoreError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    let parent = final_dir.parent().unwrap_or(Path::new("."));
    crate::paths::create_private_dir_all(parent).map_err(io(parent))?;
    let _ = fsutil::remove_stale_temps(parent);
    if final_dir.exists() {
        return Err(StoreError::Exists(
            final_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ));
    }
    let tmp = fsutil::temp_path_for(final_dir).map_err(io(final_dir))?;
    crate::paths::create_private_dir(&tmp).map_err(io(&tmp))?;
    Ok(tmp)
}

pub fn publish(tmp: &Path, final_dir: &Path) -> Result<(), StoreError> {
    // publish_dir makes tmp's entries durable before the rename.
    fsutil::publish_dir(tmp, final_dir).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            StoreError::Exists(final_dir.display().to_string())
        } else {
            StoreError::Io {
                path: final_dir.to_path_buf(),
                source,
            }
        }
    })
}

/// What deleting one snapshot did.
#[derive(Debug, Default, serde::Serialize)]
pub struct DeleteReport {
    pub layers: super::layers::LayerReport,
    /// Children (by path) that took the deleted snapshot's parent.
    pub reparented: Vec<PathBuf>,
    /// That parent, as the deleted snapshot's manifest named it.
    pub new_parent: Option<String>,
}

/// Deletes a snapshot, hands its children to its own parent (so the tree
/// keeps its lineage) and releases its disk layers (merged into what
/// depends on them, removed when nothing does). Children are rewritten
/// first, each manifest atomically: a crash in between leaves the
/// snapshot still there beside its re-parented children, never a child
/// naming a parent that is gone. The snapshot directory goes in one
/// rename; an interrupted release leaves a valid chain and at worst an
/// unreferenced layer.
pub fn delete_with_layers(dir: &Path) -> Result<DeleteReport, StoreError> {
    // Resolved while the directory exists: a relative name means nothing after.
    let manifest = read_manifest(dir).ok();
    let layers = manifest
        .as_ref()
        .map(|m| m.disk_layers.clone())
        .unwrap_or_default();
    let new_parent = manifest.and_then(|m| m.parent);
    merge_memory_into_children(dir)?;
    let reparented = reparent_children(dir, new_parent.as_deref())?;
    delete(dir)?;
    let layers = super::layers::release(&layers).map_err(|e| StoreError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(DeleteReport {
        layers,
        reparented,
        new_parent,
    })
}

/// Snapshots whose incremental memory layer sits directly on `dir` take
/// its pages into their own layer (or become full if `dir` is), each in one
/// rename, so nothing reads through `dir`'s memory once it is gone.
fn merge_memory_into_children(dir: &Path) -> Result<(), StoreError> {
    let Some(name) = dir.file_name() else {
        return Ok(());
    };
    let siblings = std::fs::read_dir(dir.parent().unwrap_or(Path::new(".")))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        // Temp directories are unpublished snapshots (or leftovers).
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        });
    for child in siblings {
        if child.join(super::state::MEMORY_FILE).exists() {
            continue;
        }
        let Ok((_, index)) = super::delta::read_index(&child.join(super::delta::DELTA_FILE)) else {
            continue;
        };
        if std::ffi::OsStr::new(&index.parent) != name {
            continue;
        }
        super::chain::merge_parent_into(&child, index.mem_file_len).map_err(|e| {
            StoreError::Io {
                path: child.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
    }
    Ok(())
}

/// The snapshot directory a manifest's `parent` names: a bare name is a
/// sibling of the snapshot; a path (a clone's parent in another VM) is
/// itself.
fn parent_path(snapshot: &Path, label: &str) -> PathBuf {
    if label.contains('/') {
        PathBuf::from(label)
    } else {
        snapshot.parent().unwrap_or(Path::new(".")).join(label)
    }
}

/// Makes every snapshot whose parent is `dir` a child of `dir`'s parent
/// (`grandparent`, as `dir`'s manifest names it); returns the children.
fn reparent_children(dir: &Path, grandparent: Option<&str>) -> Result<Vec<PathBuf>, StoreError> {
    let grand_path = grandparent.map(|g| parent_path(dir, g));
    let mut moved = Vec::new();
    for (child, m) in list(None) {
        let Ok(m) = m else { continue };
        let is_child = m.parent.as_deref().is_some_and(|p| {
            let p = parent_path(&child, p);
            p == dir || crate::fsutil::same_file(&p, dir)
        });
        if !is_child || crate::fsutil::same_file(&child, dir) {
            continue;
        }
        // Rewritten as stored, not as `list` resolved it: the layer names
        // stay relative, so the child's VM directory can still move.
        let mut m: Manifest = read_json_file(&child.join(MANIFEST_FILE))?;
        // Named the way snapshot create names parents: bare within one VM.
        m.parent = grand_path.as_ref().map(|g| {
            if g.parent().is_some() && g.parent() == child.parent() {
                g.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            } else {
                g.display().to_string()
            }
        });
        super::format::write_json_file(&child.join(MANIFEST_FILE), &m)?;
        moved.push(child);
    }
    Ok(moved)
}

/// Removes a snapshot directory: renamed away first (one atomic step, so a
/// crash leaves either the whole snapshot or an unlisted temp), then removed.
pub fn delete(dir: &Path) -> Result<(), StoreError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    let tmp = fsutil::temp_path_for(dir).map_err(io(dir))?;
    std::fs::rename(dir, &tmp).map_err(io(dir))?;
    if let Some(parent) = dir.parent() {
        let _ = fsutil::fsync_dir(parent);
    }
    std::fs::remove_dir_all(&tmp).map_err(io(&tmp))
}

/// The listing as the API returns it.
pub fn list_json(vm: Option<&str>) -> serde_json::Value {
    let snapshots: Vec<serde_json::Value> = list(vm)
        .into_iter()
        .map(|(path, m)| match m {
            Ok(m) => serde_json::json!({
                "name": m.name,
                "vm": m.vm,
                "parent": m.parent,
                "created_unix_ms": m.created_unix_ms,
                "size_bytes": m.state_bytes + m.memory_bytes,
                "memory_bytes": m.memory_bytes,
                "disk_bytes": m.disk_layers.iter().map(|l| super::layers::allocated_bytes(l)).sum::<u64>(),
                "path": path,
            }),
            Err(e) => serde_json::json!({
                "name": path.file_name().map(|n| n.to_string_lossy().into_owned()),
                "path": path,
                "error": e.to_string(),
            }),
        })
        .collect();
    serde_json::json!({ "snapshots": snapshots })
}
