//! Storage behind a virtio-blk device. The device checks every request
//! against `size()` before calling in, so backends see only in-range I/O.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

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

/// A raw image in a plain file, accessed with pread/pwrite.
pub struct RawFileBackend {
    file: File,
    size: u64,
    read_only: bool,
    id: String,
}

/// Bound on the zero-filling fallback's buffer.
const ZERO_CHUNK: usize = 64 * 1024;

impl RawFileBackend {
    /// The serial defaults to the file name (what shows up in /dev/disk/by-id).
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let id = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::from_file(file, read_only, id)
    }

    pub fn from_file(file: File, read_only: bool, id: String) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(Self {
            file,
            size,
            read_only,
            id,
        })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let to_off = |v: u64| {
            libc::off_t::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
        };
        let (offset, len) = (to_off(offset)?, to_off(len)?);
        // SAFETY: fallocate only reads its integer arguments; the fd is owned
        // by `self.file` and open for the duration of the call.
        let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
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

fn unsupported_by_fs(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    )
}

impl BlockBackend for RawFileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
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

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            // Discard is a hint; a filesystem without hole punching keeps the data.
            Err(e) if unsupported_by_fs(&e) => Ok(()),
            r => r,
        }
    }

    fn supports_write_zeroes(&self) -> bool {
        !self.read_only
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.check_writable()?;
        let mode = if may_unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Err(e) if unsupported_by_fs(&e) => {}
            r => return r,
        }
        let zeroes = vec![0u8; ZERO_CHUNK];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK as u64) as usize;
            let at = offset
                .checked_add(done)
                .ok_or(io::ErrorKind::InvalidInput)?;
            self.file.write_all_at(&zeroes[..n], at)?;
            done += n as u64;
        }
        Ok(())
    }
}
