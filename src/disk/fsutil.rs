//! Small filesystem helpers for the "write a temp file, fsync, rename, fsync the directory"
//! pattern every mutation in this module uses.

use super::{DiskError, IoContext, Result};
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Suffix of every temporary file this module creates; `cleanup_temps` keys on it.
const TEMP_SUFFIX: &str = ".rewind-tmp";

/// Directory holding `path`; a bare file name lives in the current directory, and qemu resolves
/// relative backing names against exactly this directory.
pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Temp file next to `target`: same directory so `rename` is atomic, hidden so users listing the
/// VM directory do not mistake it for an image, fixed name so a rerun after a crash reuses it.
pub(crate) fn temp_path(target: &Path) -> Result<PathBuf> {
    let name = target.file_name().ok_or_else(|| {
        DiskError::io(
            "name a temp file for",
            target,
            std::io::Error::other("path has no file name"),
        )
    })?;
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(TEMP_SUFFIX);
    Ok(parent_dir(target).join(tmp))
}

/// A rename is only durable once the directory entry itself is on disk.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("fsync directory", dir)
}

pub(crate) fn sync_file(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .ctx("fsync", path)
}

/// Atomically replaces `target` with the already-synced `tmp`, keeping `target`'s permissions
/// (frozen snapshot layers are read-only and must stay so).
pub(crate) fn replace(tmp: &Path, target: &Path) -> Result<()> {
    if let Ok(meta) = fs::metadata(target) {
        fs::set_permissions(tmp, meta.permissions()).ctx("set permissions of", tmp)?;
    }
    fs::rename(tmp, target).ctx("rename temp file onto", target)
}

/// Publishes `tmp` under `target` without ever clobbering an existing file: `link(2)` fails
/// atomically if `target` exists, which `rename(2)` cannot express portably.
pub(crate) fn publish_new(tmp: &Path, target: &Path) -> Result<()> {
    match fs::hard_link(tmp, target) {
        Ok(()) => fs::remove_file(tmp).ctx("remove temp file", tmp),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Best effort only: the temp file is garbage either way and cleanup_temps finds it.
            let _ = fs::remove_file(tmp);
            Err(DiskError::AlreadyExists {
                path: target.to_path_buf(),
            })
        }
        Err(e) => Err(DiskError::io("create", target, e)),
    }
}

/// Identity of a file independent of how its path is spelled (relative, via symlinks, ...).
pub(crate) fn file_id(path: &Path) -> std::io::Result<(u64, u64)> {
    let m = fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    matches!((file_id(a), file_id(b)), (Ok(x), Ok(y)) if x == y)
}

/// Removes temp files left by an interrupted create/commit/rebase/stream/export in `dir`.
/// Call it when a VM directory is loaded and nothing is running on it; returns how many were
/// removed. Temp files are never referenced by any image, so deleting them is always safe.
pub fn cleanup_temps(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir).ctx("list", dir)? {
        let entry = entry.ctx("list", dir)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(TEMP_SUFFIX) {
            let path = entry.path();
            fs::remove_file(&path).ctx("remove temp file", &path)?;
            removed += 1;
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Makes a frozen layer durable (file data and its directory entry). Meant to run after the VM
/// resumed from the snapshot pause, because fsync can take far longer than the 1 ms pause budget.
pub fn make_durable(path: &Path) -> Result<()> {
    sync_file(path)?;
    sync_dir(&parent_dir(path))
}
