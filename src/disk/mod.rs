//! Disk layer of rewind: copy-on-write qcow2 overlays on top of a never-written base image.
//!
//! Layout on disk (every arrow is a qcow2 backing-file reference):
//!
//! ```text
//! base.img (raw or qcow2, never written)
//!   <- snapshot layer A (frozen qcow2, read-only)
//!        <- snapshot layer B (frozen)
//!             <- running overlay (the only writable file, owned by `Disk`)
//! ```
//!
//! All qcow2 parsing and writing is delegated to `imago`; this module only decides which files
//! exist, what they point to, and how they are replaced atomically (temp file, fsync, rename,
//! fsync of the directory).
//!
//! Lifecycle, as the main crate is expected to drive it:
//! - VM creation: `BaseIdentity::capture(base)`, `create_overlay(vm_dir/x.qcow2, base, ..)`,
//!   `Disk::open`. Before every later open: `BaseIdentity::verify`.
//! - `snapshot create`: before pausing, `create_overlay(next, current, Qcow2, size)` and
//!   `Disk::prepare_switch(next)`; in the pause, `Disk::switch_prepared`; after resuming,
//!   `make_durable(frozen)`, then `collapse` the frozen layer onto the base if its chain is
//!   deeper than `COLLAPSE_DEPTH`, which bounds both chain depth and the files a VM holds open.
//! - revert/restore/clone: `create_overlay(fresh, snapshot_layer, Qcow2, size)` + `Disk::open`.
//! - delete snapshot S (layer L): for each image directly on L, `stream(child)`, then delete L.
//!   Alternatively, if L has exactly one dependent C, `commit(C, L)`, `rebase` C's dependents
//!   onto L and delete C. Either way every step is atomic (see `merge`). A layer the running
//!   VM's writable overlay sits directly on cannot be merged while the VM runs; keep it until
//!   the VM's next snapshot or shutdown.
//! - `disk export`: `export_flat(top, out, Raw)`.
//! - on load of a VM directory: `cleanup_temps(dir)`.

pub(crate) mod chain;
pub(crate) mod image;
mod merge;
pub(crate) mod overlay;
pub(crate) mod scratch;

#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};

pub use chain::{backing_chain, export_flat, export_flat_with_progress, virtual_size};
pub use image::{probe, BaseIdentity, ImageFormat};
pub use merge::{collapse, commit, rebase, stream};
pub use overlay::{create_overlay, Disk, PreparedSwitch};

/// Deepest backing chain we accept; deeper chains are almost certainly loops through symlinks or
/// hand-edited headers, and walking them would open an unbounded number of files.
pub const MAX_CHAIN_DEPTH: usize = 256;

/// A frozen layer with more qcow2 layers than this under it (itself included) is collapsed onto
/// its base after a snapshot, so no chain rewind makes grows past it. Smaller means less read
/// indirection and fewer open files, larger means the full diff is copied less often (once per
/// this many snapshots in a row).
pub const COLLAPSE_DEPTH: usize = 16;

pub type Result<T> = std::result::Result<T, DiskError>;

/// Every message is one line and names the file it is about, so it can be shown to a user as is.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("base image {} is missing", path.display())]
    BaseMissing { path: PathBuf },

    #[error(
        "base image {} changed since the snapshot was taken (size or mtime differs)",
        path.display()
    )]
    BaseChanged { path: PathBuf },

    #[error("backing file {} of {} is missing", backing.display(), image.display())]
    BackingMissing { image: PathBuf, backing: PathBuf },

    #[error("{} has unsupported backing format {format:?}", image.display())]
    UnsupportedFormat { image: PathBuf, format: String },

    #[error("{} is not a qcow2 overlay", path.display())]
    NotOverlay { path: PathBuf },

    #[error("refusing to write {}: it has no backing file, so it is a base image", path.display())]
    IsBase { path: PathBuf },

    #[error("{} already exists", path.display())]
    AlreadyExists { path: PathBuf },

    #[error(
        "backing chain of {} is deeper than {MAX_CHAIN_DEPTH} layers or loops",
        path.display()
    )]
    ChainTooDeep { path: PathBuf },

    #[error("{} is not the backing file of {}", parent.display(), child.display())]
    NotBackingFile { child: PathBuf, parent: PathBuf },

    #[error("{} has size {actual} bytes, expected {expected}", path.display())]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    #[error(
        "request at offset {offset} length {len} is beyond the end of {} ({size} bytes)",
        path.display()
    )]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },

    #[error("cannot {op} {}: {io}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        io: io::Error,
    },

    /// Only produced by the failure-injection hooks the tests use to simulate `kill -9`.
    #[error("operation on {} interrupted at step {step:?} (injected)", path.display())]
    Interrupted { path: PathBuf, step: String },
}

impl DiskError {
    pub(crate) fn io(op: &'static str, path: &Path, io: io::Error) -> Self {
        DiskError::Io {
            op,
            path: path.to_path_buf(),
            io,
        }
    }
}

/// Attaches the operation and file name to an `io::Error`, because imago's errors rarely say
/// which file of a chain failed.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|e| DiskError::io(op, path, e))
    }
}

/// Removes temp files left by an interrupted create/commit/rebase/stream/export in `dir`.
/// Call it when a VM directory is loaded and nothing is running on it; returns how many were
/// removed. Temp files are never referenced by any image, so deleting them is always safe.
pub fn cleanup_temps(dir: &Path) -> Result<usize> {
    crate::fsutil::remove_reusable_temps(dir).ctx("remove temp files in", dir)
}

/// Makes a frozen layer durable (file data and its directory entry). Meant to run after the VM
/// resumed from the snapshot pause, because fsync can take far longer than the 1 ms pause budget.
pub fn make_durable(path: &Path) -> Result<()> {
    crate::fsutil::fsync_file(path).ctx("fsync", path)?;
    let dir = crate::fsutil::parent_dir(path);
    crate::fsutil::fsync_dir(dir).ctx("fsync directory", dir)
}
