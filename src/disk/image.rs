//! Image format detection and base-image identity.

use super::{DiskError, Result};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// qcow2 header magic, "QFI\xfb".
pub(crate) const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// Name as written into qcow2 backing-format header extensions (and accepted by qemu).
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// Parses a qcow2 backing-format string; "file" is qemu's legacy alias for raw.
    pub fn from_backing_format(s: &str) -> Option<Self> {
        match s {
            "raw" | "file" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            _ => None,
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Detects qcow2 by its magic; anything else is raw.
///
/// Only use this on files the guest has never written: a guest can write a qcow2 header into a
/// raw disk, so overlays always record the base format explicitly instead of re-probing.
pub fn probe(path: &Path) -> Result<ImageFormat> {
    let mut file = fs::File::open(path).map_err(|e| DiskError::io("open", path, e))?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    // A short file (< 4 bytes) is a (tiny) raw image, not an error.
    while got < magic.len() {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DiskError::io("read", path, e)),
        }
    }
    Ok(if got == magic.len() && magic == QCOW2_MAGIC {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

/// What we remember about a base image when a VM or snapshot starts depending on it. Overlays
/// store only logical differences, so if the base changes underneath them the guest silently
/// sees a mix of two disks; size+mtime catches the usual accidents (re-download, edit, resize)
/// without hashing gigabytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseIdentity {
    pub path: PathBuf,
    pub size: u64,
    /// Modification time in nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    pub format: ImageFormat,
}

impl BaseIdentity {
    /// Records the canonical path: overlays name their base by it, and a relative name would
    /// be resolved against the overlay's directory, not the one it was typed in.
    pub fn capture(path: &Path) -> Result<Self> {
        let meta = base_metadata(path)?;
        Ok(BaseIdentity {
            path: fs::canonicalize(path).map_err(|e| DiskError::io("resolve", path, e))?,
            size: meta.size(),
            mtime_ns: mtime_ns(&meta),
            format: probe(path)?,
        })
    }

    pub fn verify(&self) -> Result<()> {
        let meta = base_metadata(&self.path)?;
        if meta.size() != self.size || mtime_ns(&meta) != self.mtime_ns {
            return Err(DiskError::BaseChanged {
                path: self.path.clone(),
            });
        }
        Ok(())
    }
}

fn base_metadata(path: &Path) -> Result<fs::Metadata> {
    let meta = fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => DiskError::BaseMissing {
            path: path.to_path_buf(),
        },
        _ => DiskError::io("stat", path, e),
    })?;
    if meta.is_dir() {
        return Err(DiskError::io(
            "use as base image",
            path,
            io::Error::other("is a directory"),
        ));
    }
    Ok(meta)
}

fn mtime_ns(meta: &fs::Metadata) -> i64 {
    // Saturating: a file dated beyond year 2262 is not worth an error path.
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}
