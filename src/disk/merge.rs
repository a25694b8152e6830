//! Merging layers of a chain without ever leaving a corrupt or half-merged image behind.
//!
//! # Crash-safety procedure (shared by `commit`, `stream`, `rebase` and `collapse`)
//!
//! No image that any chain references is ever modified in place. Each operation:
//!
//! 1. writes the merged result as a brand-new qcow2 under a hidden temp name next to the file it
//!    will replace (`.NAME.rewind-tmp`), with the replaced file's final backing reference;
//! 2. copies, through imago, every range the merged layers allocate (reading through the full
//!    chain, so the temp file reads exactly like the old chain did);
//! 3. flushes imago's metadata and fsyncs the temp file;
//! 4. `rename(2)`s it over the target (atomic: the name points at the old or the new inode,
//!    never at a mix), then fsyncs the directory.
//!
//! The replaced file's new content always reads exactly like what depended on it saw before
//! (`commit`: parent now shows the child's view, which the child on top of it still shows;
//! `stream`/`rebase`: the file itself shows the same view), so every chain reads the same bytes
//! before and after step 4. A `kill -9` anywhere leaves at most a stale temp file, which no image
//! references and `cleanup_temps` removes; rerunning the interrupted operation is idempotent.
//! Processes that still have the old inode open (e.g. a running VM reading a backing layer)
//! keep reading the old, unchanged inode. No file involved may be open for *writing*: a running
//! VM's active overlay can be neither merged (its view would change while being copied) nor
//! replaced (its later writes would go to the unlinked old inode). A snapshot layer that a
//! running overlay sits directly on is therefore kept until that VM's next snapshot or shutdown.

use super::chain::{
    backing_chain, cluster_size, create_qcow2, open_alone, open_chain, read_backing,
    resolve_backing, Layer, COPY_CHUNK,
};
use super::image::{probe, ImageFormat};
use super::{DiskError, IoContext, Result};
use crate::fsutil::{self, parent_dir, same_file};
use imago::ShallowMapping;
use std::fs;
use std::path::Path;

/// Points at which a failure hook can stop a merge, exactly like a `kill -9` would: no cleanup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// The empty temp qcow2 exists.
    TempCreated,
    /// Some data has been copied into the temp file (argument: number of copy runs so far).
    Copied(u64),
    /// The temp file is complete and fsynced, not yet renamed.
    TempSynced,
    /// The temp file has been renamed over the target; the directory is not fsynced yet.
    Renamed,
}

pub(crate) type Hook<'a> = &'a mut dyn FnMut(Step) -> Result<()>;

/// Description of one merge: produce a file that reads like `view`, backed by `backing`, and
/// atomically put it at `target`.
struct Plan<'a> {
    /// What the new file must read as.
    view: Layer,
    view_path: &'a Path,
    /// Layers opened without their backing: wherever one of them allocates, data is copied.
    alloc: Vec<Layer>,
    /// From here on everything is copied: the old lower layer ended, so the view reads zeroes
    /// where the new backing file may have data.
    copy_from: u64,
    /// Backing reference of the new file: name as stored (relative to `target`'s directory).
    backing: Option<(String, ImageFormat)>,
    cluster_size: Option<u64>,
    target: &'a Path,
}

/// Merges `child`'s data into `parent` (its backing file): afterwards `parent` reads exactly as
/// `child` did, and keeps its own backing file. `child` (and anything on top of it) keeps reading
/// the same, so deleting `child` afterwards only needs its dependents rebased onto `parent`.
///
/// Use it to delete an interior snapshot whose layer has exactly one dependent: every other
/// image backed by `parent` would see `child`'s changes. `parent` must be an overlay (qcow2 with
/// a backing file): base images are never written.
pub fn commit(child: &Path, parent: &Path) -> Result<()> {
    commit_with_hook(child, parent, &mut |_| Ok(()))
}

pub(crate) fn commit_with_hook(child: &Path, parent: &Path, hook: Hook<'_>) -> Result<()> {
    let not_backing = || DiskError::NotBackingFile {
        child: child.to_path_buf(),
        parent: parent.to_path_buf(),
    };
    let cb = read_backing(child)?.ok_or_else(not_backing)?;
    if !same_file(&cb.path, parent) {
        return Err(not_backing());
    }
    let is_base = || DiskError::IsBase {
        path: parent.to_path_buf(),
    };
    if probe(parent)? != ImageFormat::Qcow2 {
        return Err(is_base());
    }
    let pb = read_backing(parent)?.ok_or_else(is_base)?;
    let parent_alone = open_alone(parent)?;
    let plan = Plan {
        view: open_chain(child, false)?,
        view_path: child,
        copy_from: parent_alone.size(),
        cluster_size: cluster_size(&parent_alone),
        alloc: vec![open_alone(child)?, parent_alone],
        // Same directory as before, so the stored name stays valid verbatim.
        backing: Some((pb.name, pb.format)),
        target: parent,
    };
    run(plan, hook)
}

/// Pulls the data of `child`'s backing layer into `child`: afterwards `child` reads the same but
/// is backed by its former grandparent (or by nothing, if the backing layer was the base).
///
/// This is the general way to delete a snapshot layer: stream it into each image that depends
/// on it (each one independently crash-safe), then delete it. Unlike `commit`, it works for
/// layers with several children and never needs a rebase.
pub fn stream(child: &Path) -> Result<()> {
    stream_with_hook(child, &mut |_| Ok(()))
}

pub(crate) fn stream_with_hook(child: &Path, hook: Hook<'_>) -> Result<()> {
    let cb = read_backing(child)?.ok_or_else(|| DiskError::IsBase {
        path: child.to_path_buf(),
    })?;
    let grand = match cb.format {
        ImageFormat::Raw => None,
        ImageFormat::Qcow2 => read_backing(&cb.path)?,
    };
    let backing = match grand {
        None => None,
        Some(g) => Some((rename_for(&g.name, &g.path, &cb.path, child)?, g.format)),
    };
    let child_alone = open_alone(child)?;
    let parent_alone = open_alone(&cb.path)?;
    let plan = Plan {
        view: open_chain(child, false)?,
        view_path: child,
        copy_from: parent_alone.size(),
        cluster_size: cluster_size(&child_alone),
        alloc: vec![child_alone, parent_alone],
        backing,
        target: child,
    };
    run(plan, hook)
}

/// Re-points `overlay` at `new_backing` (stored as given, relative to the overlay's directory)
/// without changing the overlay's own data: qemu's `rebase -u`. The caller guarantees that
/// `new_backing` reads exactly like the old backing file (e.g. after `commit`), otherwise the
/// overlay's view changes.
///
/// imago cannot edit a header's backing name, and editing headers in place is not atomic, so
/// this copies the overlay's allocated clusters into a fresh qcow2 and renames it over: cost
/// proportional to the data the overlay holds, never to the disk size.
pub fn rebase(overlay: &Path, new_backing: &Path) -> Result<()> {
    rebase_with_hook(overlay, new_backing, &mut |_| Ok(()))
}

pub(crate) fn rebase_with_hook(overlay: &Path, new_backing: &Path, hook: Hook<'_>) -> Result<()> {
    if probe(overlay)? != ImageFormat::Qcow2 {
        return Err(DiskError::NotOverlay {
            path: overlay.to_path_buf(),
        });
    }
    let resolved = resolve_backing(overlay, new_backing);
    if !resolved.exists() {
        return Err(DiskError::BackingMissing {
            image: overlay.to_path_buf(),
            backing: resolved,
        });
    }
    let format = probe(&resolved)?;
    let name = new_backing.to_str().ok_or_else(|| {
        DiskError::io(
            "store backing name of",
            overlay,
            std::io::Error::other("backing path is not valid UTF-8"),
        )
    })?;
    let view = open_alone(overlay)?;
    let plan = Plan {
        cluster_size: cluster_size(&view),
        view,
        view_path: overlay,
        alloc: vec![open_alone(overlay)?],
        copy_from: u64::MAX,
        backing: Some((name.to_string(), format)),
        target: overlay,
    };
    run(plan, hook)
}

/// Writes at `target` one qcow2 layer that reads exactly like the chain under `top` and is backed
/// directly by `base` (a member of that chain, named by its canonical path): every layer between
/// them is folded in. `target` may be `top` itself (the old inode stays readable for whoever has
/// it open, and the new file keeps the old one's permissions) or a new file elsewhere (a
/// standalone copy of a snapshot's disk).
///
/// This is what keeps chains short: a chain of any depth becomes one layer on its base, and
/// images on top of `top` keep reading the same bytes through it.
pub fn collapse(top: &Path, base: &Path, target: &Path) -> Result<()> {
    collapse_with_hook(top, base, target, &mut |_| Ok(()))
}

pub(crate) fn collapse_with_hook(
    top: &Path,
    base: &Path,
    target: &Path,
    hook: Hook<'_>,
) -> Result<()> {
    let chain = backing_chain(top)?;
    let Some(at) = chain.iter().position(|(p, _)| same_file(p, base)) else {
        return Err(DiskError::NotBackingFile {
            child: top.to_path_buf(),
            parent: base.to_path_buf(),
        });
    };
    if at == 0 {
        return Err(DiskError::IsBase {
            path: top.to_path_buf(),
        });
    }
    let base_name = fs::canonicalize(base).ctx("resolve", base)?;
    let base_name = base_name.to_str().map(str::to_string).ok_or_else(|| {
        DiskError::io(
            "store backing name of",
            target,
            std::io::Error::other("base path is not valid UTF-8"),
        )
    })?;
    let alloc = chain[..at]
        .iter()
        .map(|(p, _)| open_alone(p))
        .collect::<Result<Vec<_>>>()?;
    let view = open_chain(top, false)?;
    let plan = Plan {
        // Past the end of the shortest folded layer the view reads zeroes, which the base
        // underneath must not show through.
        copy_from: alloc.iter().map(|l| l.size()).min().unwrap_or(0),
        cluster_size: cluster_size(&alloc[0]),
        view,
        view_path: top,
        alloc,
        backing: Some((base_name, chain[at].1)),
        target,
    };
    run(plan, hook)
}

/// Expresses a backing reference that was relative to `from_image`'s directory so that it is
/// valid from `to_image`'s directory.
fn rename_for(name: &str, resolved: &Path, from_image: &Path, to_image: &Path) -> Result<String> {
    if Path::new(name).is_absolute() || same_file(parent_dir(from_image), parent_dir(to_image)) {
        return Ok(name.to_string());
    }
    let abs = fs::canonicalize(resolved).ctx("resolve", resolved)?;
    abs.to_str().map(str::to_string).ok_or_else(|| {
        DiskError::io(
            "store backing name of",
            to_image,
            std::io::Error::other("backing path is not valid UTF-8"),
        )
    })
}

fn run(plan: Plan<'_>, hook: Hook<'_>) -> Result<()> {
    let tmp = fsutil::reusable_temp_path(plan.target).ctx("name a temp file for", plan.target)?;
    let result = run_inner(&plan, &tmp, hook);
    if let Err(e) = &result {
        // An injected failure simulates kill -9, which cleans up nothing; real errors do clean up.
        if !matches!(e, DiskError::Interrupted { .. }) {
            let _ = fs::remove_file(&tmp);
        }
    }
    result
}

fn run_inner(plan: &Plan<'_>, tmp: &Path, hook: Hook<'_>) -> Result<()> {
    let size = plan.view.size();
    let backing = plan.backing.as_ref().map(|(n, f)| (n.as_str(), *f));
    create_qcow2(tmp, size, backing, plan.cluster_size)?;
    hook(Step::TempCreated)?;
    {
        // Opened with its backing chain so that any partial-cluster write is completed from the
        // new backing file, which is what those bytes must read as anyway.
        let dst = open_chain(tmp, true)?;
        let gran = cluster_size(&dst).unwrap_or(64 * 1024);
        let mut buf = vec![0u8; COPY_CHUNK as usize];
        let mut runs = 0;
        let mut offset = 0;
        while offset < size {
            let (must_copy, len) = must_copy(plan, offset, (size - offset).min(COPY_CHUNK))?;
            if must_copy {
                let data = &mut buf[..len as usize];
                plan.view
                    .read(&mut *data, offset)
                    .ctx("read", plan.view_path)?;
                write_run(&dst, tmp, data, offset, gran, backing.is_some())?;
                runs += 1;
                hook(Step::Copied(runs))?;
            }
            offset += len;
        }
        dst.flush().ctx("flush", tmp)?;
        dst.sync().ctx("fsync", tmp)?;
    }
    hook(Step::TempSynced)?;
    fsutil::replace_keeping_mode(tmp, plan.target).ctx("rename temp file onto", plan.target)?;
    hook(Step::Renamed)?;
    let dir = parent_dir(plan.target);
    fsutil::fsync_dir(dir).ctx("fsync directory", dir)
}

/// Whether `[offset, offset+len')` must be copied, and the length `len' <= max_len` over which
/// that answer holds.
fn must_copy(plan: &Plan<'_>, offset: u64, max_len: u64) -> Result<(bool, u64)> {
    if offset >= plan.copy_from {
        return Ok((true, max_len));
    }
    let mut len = max_len.min(plan.copy_from - offset);
    for layer in &plan.alloc {
        let (mapping, mlen) = layer
            .get_shallow_mapping(offset, len)
            .ctx("map", plan.view_path)?;
        let allocated = match mapping {
            ShallowMapping::Eof { .. } => continue,
            ShallowMapping::Indirect { .. }
            | ShallowMapping::Zero {
                explicit: false, ..
            } => false,
            _ => true,
        };
        len = len.min(mlen.max(1));
        if allocated {
            return Ok((true, len));
        }
    }
    Ok((false, len))
}

/// Writes one run, turning all-zero clusters into qcow2 zero clusters (no data written) and
/// skipping them entirely when there is no backing file to hide.
fn write_run(
    dst: &Layer,
    tmp: &Path,
    data: &[u8],
    offset: u64,
    gran: u64,
    has_backing: bool,
) -> Result<()> {
    let mut pos = 0usize;
    while pos < data.len() {
        // Pieces end on absolute cluster boundaries so zero pieces map to whole clusters.
        let abs = offset + pos as u64;
        let piece_end = ((abs / gran + 1) * gran - offset).min(data.len() as u64) as usize;
        let zero = data[pos..piece_end].iter().all(|&b| b == 0);
        let mut end = piece_end;
        while end < data.len() {
            let next = ((offset + end as u64) / gran + 1) * gran - offset;
            let next = (next as usize).min(data.len());
            if data[end..next].iter().all(|&b| b == 0) != zero {
                break;
            }
            end = next;
        }
        let at = offset + pos as u64;
        if !zero {
            dst.write(&data[pos..end], at).ctx("write", tmp)?;
        } else if has_backing {
            dst.write_zeroes(at, (end - pos) as u64)
                .ctx("write zeroes to", tmp)?;
        }
        pos = end;
    }
    Ok(())
}
