//! Creating overlays and the writable `Disk` a running VM uses.

use super::chain::{self, create_qcow2, open_chain, open_layer, resolve_backing, Layer};
use super::image::ImageFormat;
use super::scratch::{ScratchLayer, SECTOR};
use super::{DiskError, IoContext, Result};
use crate::fsutil::{self, parent_dir, same_file};
use imago::file::File;
use imago::format::drivers::FormatDriverInstance;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// Creates an empty qcow2 overlay at `path` whose backing file is `backing`.
///
/// `backing` is stored exactly as given; a relative name is resolved against the directory of
/// `path` (as qemu does), which keeps a VM directory relocatable. The format is stored too, so
/// the base is never probed again (a guest could have written a qcow2 header into a raw base).
/// The file appears atomically and never replaces an existing file.
pub fn create_overlay(
    path: &Path,
    backing: &Path,
    backing_format: ImageFormat,
    size: u64,
) -> Result<()> {
    let resolved = resolve_backing(path, backing);
    match fs::metadata(&resolved) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(DiskError::BackingMissing {
                image: path.to_path_buf(),
                backing: resolved,
            });
        }
        Err(e) => return Err(DiskError::io("stat", &resolved, e)),
    }
    if path.exists() {
        return Err(DiskError::AlreadyExists {
            path: path.to_path_buf(),
        });
    }
    let name = backing.to_str().ok_or_else(|| {
        DiskError::io(
            "store backing name of",
            path,
            io::Error::other("backing path is not valid UTF-8"),
        )
    })?;
    let tmp = fsutil::reusable_temp_path(path).ctx("name a temp file for", path)?;
    create_qcow2(&tmp, size, Some((name, backing_format)), None)?;
    fsutil::publish_new(&tmp, path).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => DiskError::AlreadyExists {
            path: path.to_path_buf(),
        },
        _ => DiskError::io("create", path, e),
    })?;
    fsutil::fsync_dir(parent_dir(path)).ctx("fsync directory", parent_dir(path))
}

/// An open, writable overlay: the top of a chain, the only file of it that is ever written.
///
/// `Send` (and `Sync`) so the virtio-blk thread can own it. Reads and writes take `&self`
/// (imago locks internally); `discard` and the overlay switch need `&mut self`, because imago
/// requires exclusive access to invalidate cluster mappings.
#[derive(Debug)]
pub struct Disk {
    /// Always `Some`; an `Option` only so a lost layer is an error, never a panic.
    top: Option<Layer>,
    path: PathBuf,
    size: u64,
    /// While a fuzzer holds a snapshot in memory, the guest's writes go here
    /// instead of the overlay (see disk::scratch).
    scratch: std::sync::Mutex<Option<ScratchLayer>>,
}

impl Disk {
    /// Opens the overlay at `path` read-write with its whole backing chain (read-only).
    /// Refuses anything that is not a qcow2 image with a backing file, so a base image can never
    /// be opened for writing by mistake.
    pub fn open(path: &Path) -> Result<Disk> {
        require_overlay(path)?;
        let top = open_chain(path, true)?;
        Ok(Disk {
            size: top.size(),
            top: Some(top),
            path: path.to_path_buf(),
            scratch: Default::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn top(&self) -> Result<&Layer> {
        self.top.as_ref().ok_or_else(|| lost(&self.path))
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DiskError::OutOfRange {
                path: self.path.clone(),
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Reads exactly `buf.len()` bytes; unallocated ranges come from the backing chain.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.top()?
            .read(&mut *buf, offset)
            .ctx("read", &self.path)?;
        if let Some(s) = self.scratch().as_ref() {
            s.patch_read(buf, offset);
        }
        Ok(())
    }

    /// Writes all of `buf` into the overlay; partial clusters are completed from the backing
    /// chain by imago (copy-on-write), the backing files are never touched.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let top = self.top()?;
        if let Some(s) = self.scratch().as_mut() {
            let mut failed = None;
            s.write(buf, offset, |sector, data| {
                if let Err(e) = top.read(&mut data[..], sector * SECTOR) {
                    failed = Some(e);
                }
            });
            return match failed {
                Some(e) => Err(e).ctx("read", &self.path),
                None => Ok(()),
            };
        }
        top.write(buf, offset).ctx("write", &self.path)
    }

    fn scratch(&self) -> std::sync::MutexGuard<'_, Option<ScratchLayer>> {
        self.scratch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on the guest's writes stay in memory (an empty layer);
    /// `reset_scratch` drops them. A layer already there (an earlier
    /// snapshot's) is written down first: a new snapshot starts from the
    /// disk as the guest sees it now.
    pub fn begin_scratch(&self) -> Result<()> {
        let mut scratch = self.scratch();
        if let Some(old) = scratch.take() {
            let top = self.top()?;
            for (sector, data) in old.sectors() {
                top.write(&data[..], sector * SECTOR)
                    .ctx("write", &self.path)?;
            }
        }
        *scratch = Some(ScratchLayer::default());
        Ok(())
    }

    pub fn reset_scratch(&self) {
        if let Some(s) = self.scratch().as_mut() {
            s.clear();
        }
    }

    /// Bytes held in memory (0 without a scratch layer).
    pub fn scratch_bytes(&self) -> u64 {
        self.scratch().as_ref().map_or(0, ScratchLayer::bytes)
    }

    /// The direct-to-guest-memory paths below bypass the scratch layer.
    fn refuse_scratch(&self) -> Result<()> {
        if self.scratch().is_some() {
            return Err(DiskError::Io {
                op: "access (direct I/O bypasses a fuzzer's scratch layer)",
                path: self.path.clone(),
                io: io::ErrorKind::Unsupported.into(),
            });
        }
        Ok(())
    }

    /// Reads straight into guest memory (no bounce buffer), e.g. a virtio-blk descriptor chain.
    pub fn read_volatile<'a, B: BitmapSlice>(
        &self,
        bufs: &'a [VolatileSlice<'a, B>],
        offset: u64,
    ) -> Result<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(offset, len)?;
        self.refuse_scratch()?;
        // The guard keeps the guest mappings alive (and marks them dirty) until the read is done.
        let (vec, _guard) = IoVectorMut::from_volatile_slice(bufs);
        self.top()?.readv(vec, offset).ctx("read", &self.path)
    }

    /// Writes straight from guest memory.
    pub fn write_volatile<'a, B: BitmapSlice>(
        &self,
        bufs: &'a [VolatileSlice<'a, B>],
        offset: u64,
    ) -> Result<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(offset, len)?;
        self.refuse_scratch()?;
        let (vec, _guard) = IoVector::from_volatile_slice(bufs);
        self.top()?.writev(vec, offset).ctx("write", &self.path)
    }

    /// Writes back imago's metadata caches and fsyncs the overlay: what virtio-blk FLUSH needs.
    pub fn flush(&self) -> Result<()> {
        if self.scratch().is_some() {
            // Nothing of the guest's since the snapshot is meant to last.
            return Ok(());
        }
        let top = self.top()?;
        top.flush().ctx("flush", &self.path)?;
        top.sync().ctx("fsync", &self.path)
    }

    /// Makes the range read as zeroes. Cheap: whole clusters only get the qcow2 "zero" flag
    /// (no data written, the backing data is hidden); only unaligned head/tail bytes are written.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        if self.scratch().is_some() {
            return self.write_at(&vec![0u8; len as usize], offset);
        }
        self.top()?
            .write_zeroes(offset, len)
            .ctx("write zeroes to", &self.path)
    }

    /// Guest discard: whole clusters in the range are freed in the overlay and then read as
    /// zeroes (never as stale base data); partial clusters are left alone, which discard allows.
    /// Needs `&mut self` because freeing clusters invalidates mappings imago might hold.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        if self.scratch().is_some() {
            // Discarded data may read as anything; zeroes keep it simple.
            return self.write_zeroes(offset, len);
        }
        let Disk { top, path, .. } = self;
        let top = top.as_mut().ok_or_else(|| lost(path))?;
        match top.discard_to_any(offset, len) {
            // Discard is advisory; qcow2 v2 images cannot discard safely, so do nothing there.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
            r => r.ctx("discard", path),
        }
    }

    /// The disk-side half of `snapshot create`: `prepare_switch` then `switch_prepared`.
    pub fn switch_overlay(&mut self, next: &Path) -> Result<PathBuf> {
        let prepared = self.prepare_switch(next)?;
        self.switch_prepared(prepared)
    }

    /// Everything of an overlay switch that can be done while the guest runs: `next` must be an
    /// overlay already created (with `create_overlay`) whose backing file is this disk's current
    /// file. Its backing chain below the current file is opened afresh here: those layers are
    /// frozen, and after a collapse they are fewer than the handles the running disk holds.
    pub fn prepare_switch(&self, next: &Path) -> Result<PreparedSwitch> {
        let new_top = Qcow2::<File>::open_path(next, true).ctx("open qcow2 image", next)?;
        let backs_onto_us = new_top.implicit_backing_file().is_some_and(|name| {
            let resolved = resolve_backing(next, Path::new(name));
            same_file(&resolved, &self.path)
        }) && new_top.implicit_backing_format().map(String::as_str)
            == Some("qcow2");
        if !backs_onto_us {
            return Err(DiskError::NotBackingFile {
                child: next.to_path_buf(),
                parent: self.path.clone(),
            });
        }
        let new_size = FormatDriverInstance::size(&new_top);
        if new_size != self.size {
            return Err(DiskError::SizeMismatch {
                path: next.to_path_buf(),
                expected: self.size,
                actual: new_size,
            });
        }
        let below = match chain::read_backing(&self.path)? {
            Some(b) => Some(open_chain_as(&b.path, b.format)?),
            None => None,
        };
        Ok(PreparedSwitch {
            new_top,
            next: next.to_path_buf(),
            below,
        })
    }

    /// The part of `snapshot create` run inside the VM pause. The current file is flushed,
    /// reopened read-only on the prepared chain and becomes the backing layer of the new top;
    /// writes go to the new top from now on, and every handle the old top held is closed, so
    /// the files open stay bounded by the depth of the chain on disk. Returns the frozen file's
    /// path; call `make_durable` on it after resuming.
    pub fn switch_prepared(&mut self, prepared: PreparedSwitch) -> Result<PathBuf> {
        let PreparedSwitch {
            mut new_top,
            next,
            below,
        } = prepared;
        self.top()?.flush().ctx("flush", &self.path)?;
        // Opened after the flush: the metadata on disk is complete only now.
        let frozen_layer = open_layer(&self.path, ImageFormat::Qcow2, below, false)?;

        // Infallible from here on, so the disk can never be left without a top layer.
        new_top.set_backing(Some(frozen_layer));
        self.top = Some(Layer::new(new_top));
        let frozen = std::mem::replace(&mut self.path, next);
        // Read-only marks the layer as part of a snapshot; failure is harmless (we never write
        // it again through this Disk) so it must not fail the switch.
        let _ = fs::set_permissions(
            &frozen,
            fs::Permissions::from_mode(crate::paths::frozen_mode()),
        );
        Ok(frozen)
    }
}

/// What `Disk::prepare_switch` opened, for `Disk::switch_prepared`.
pub struct PreparedSwitch {
    new_top: Qcow2<File>,
    next: PathBuf,
    below: Option<Layer>,
}

impl std::fmt::Debug for PreparedSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedSwitch")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

/// Opens the chain under `path`, whose format is known from the header naming it (a raw base is
/// never probed: the guest could have written a qcow2 header into it).
fn open_chain_as(path: &Path, format: ImageFormat) -> Result<Layer> {
    match format {
        ImageFormat::Raw => open_layer(path, ImageFormat::Raw, None, false),
        ImageFormat::Qcow2 => open_chain(path, false),
    }
}

fn lost(path: &Path) -> DiskError {
    DiskError::io("use", path, io::Error::other("disk has no open top layer"))
}

/// A writable top must be a qcow2 with a backing file: raw files and backing-less qcow2 files
/// are bases, which rewind never writes.
fn require_overlay(path: &Path) -> Result<()> {
    if super::probe(path)? != ImageFormat::Qcow2 {
        return Err(DiskError::NotOverlay {
            path: path.to_path_buf(),
        });
    }
    if chain::read_backing(path)?.is_none() {
        return Err(DiskError::IsBase {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}
