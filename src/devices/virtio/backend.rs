//! Storage behind a virtio-blk device. The device checks every request
//! against `size()` before calling in, so backends see only in-range I/O.

use std::io;
use std::sync::{Arc, Mutex};

use crate::devices::bus::lock;
use crate::disk::{Disk, DiskError};

/// Disk image the block device reads and writes. Offsets and lengths are
/// in bytes and always within `size()`.
pub trait BlockBackend: Send {
    fn size(&self) -> u64;
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Must make every completed write durable (guest FLUSH).
    fn flush(&mut self) -> io::Result<()>;
    /// Serial for VIRTIO_BLK_T_GET_ID; truncated to 20 bytes, zero-padded.
    fn id(&self) -> String;

    /// A read-only backend makes the device offer VIRTIO_BLK_F_RO and fail writes.
    fn read_only(&self) -> bool {
        false
    }
    /// Whether the device may offer VIRTIO_BLK_F_DISCARD.
    fn supports_discard(&self) -> bool {
        false
    }
    /// The guest no longer needs the range; its contents become unspecified.
    fn discard(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Whether the device may offer VIRTIO_BLK_F_WRITE_ZEROES.
    fn supports_write_zeroes(&self) -> bool {
        false
    }
    /// The range must read back as zeroes; `may_unmap` allows deallocating it.
    fn write_zeroes(&mut self, _offset: u64, _len: u64, _may_unmap: bool) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// The one block backend: a VM disk's writable qcow2 overlay, shared with
/// the VMM (which switches it to a new overlay on snapshot).
pub struct DiskBackend {
    disk: Arc<Mutex<Disk>>,
    id: String,
    size: u64,
    read_only: bool,
}

impl DiskBackend {
    /// `id` is the serial the guest sees (/dev/disk/by-id). A `read_only`
    /// backend makes the device offer VIRTIO_BLK_F_RO and fail writes.
    pub fn new(disk: Arc<Mutex<Disk>>, id: String, read_only: bool) -> Self {
        let size = lock(&disk).size();
        Self {
            disk,
            id,
            size,
            read_only,
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::ErrorKind::PermissionDenied.into())
        } else {
            Ok(())
        }
    }
}

fn io(e: DiskError) -> io::Error {
    io::Error::other(e.to_string())
}

impl BlockBackend for DiskBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        lock(&self.disk).read_at(buf, offset).map_err(io)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        lock(&self.disk).write_at(buf, offset).map_err(io)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        lock(&self.disk).flush().map_err(io)
    }

    fn id(&self) -> String {
        self.id.clone()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn supports_discard(&self) -> bool {
        !self.read_only
    }

    /// Frees whole clusters of the overlay (they then read as zeroes, never
    /// as stale base data); partial clusters are kept, which discard allows.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        lock(&self.disk).discard(offset, len).map_err(io)
    }

    fn supports_write_zeroes(&self) -> bool {
        !self.read_only
    }

    /// Whole clusters get the qcow2 zero flag whether or not the guest
    /// allows unmapping: it hides the backing data without writing any.
    fn write_zeroes(&mut self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        self.check_writable()?;
        lock(&self.disk).write_zeroes(offset, len).map_err(io)
    }
}
