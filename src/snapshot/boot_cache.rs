//! The boot cache: a snapshot of a guest taken when it first printed
//! `REWIND-READY`, keyed by everything that decides what that guest is
//! (kernel, initrd, command line, machine shape, disks, snapshot format).
//! `rewind run --boot-cache` restores it instead of booting, which is what
//! a CI suite wants: boot once, restore in milliseconds on every later run.

use std::path::{Path, PathBuf};

use super::format::{crc64_xz, STATE_FORMAT_VERSION};
use super::state::MANIFEST_VERSION;
use crate::config::{KernelSource, VmConfig};

#[derive(Debug, thiserror::Error)]
#[error("cannot read {path} to identify the kernel: {source}")]
pub struct BootCacheError {
    path: PathBuf,
    source: std::io::Error,
}

fn file_digest(path: &Path) -> Result<String, BootCacheError> {
    let bytes = std::fs::read(path).map_err(|source| BootCacheError {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(digest(&bytes))
}

fn digest(bytes: &[u8]) -> String {
    format!("{:016x}:{}", crc64_xz(bytes), bytes.len())
}

/// What the kernel is, by content: the one kernel identity, keying the boot
/// cache and recorded in snapshot manifests. The path is left out because
/// the same kernel copied elsewhere boots the same guest.
pub fn kernel_identity(kernel: &KernelSource) -> Result<String, BootCacheError> {
    match kernel {
        KernelSource::EmbeddedTestGuest => Ok(digest(crate::guest::TEST_GUEST_ELF)),
        KernelSource::File(p) => file_digest(p),
    }
}

pub fn cache_root() -> PathBuf {
    std::env::var_os("REWIND_BOOT_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .filter(|v| !v.is_empty())
                .map(|c| PathBuf::from(c).join("rewind/boot"))
        })
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/rewind/boot")))
        .unwrap_or_else(|| PathBuf::from("/tmp/rewind-boot-cache"))
}

/// The cache directory for `config` (it exists only once a boot filled it).
pub fn entry_for(config: &VmConfig) -> Result<PathBuf, BootCacheError> {
    let kernel = kernel_identity(&config.kernel)?;
    let initrd = match &config.initrd {
        // A directory is packed at boot: the key is the archive it makes.
        Some(p) if p.is_dir() => {
            let archive = crate::arch::cpio::pack_dir(p).map_err(|e| BootCacheError {
                path: p.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            format!("{:016x}", crc64_xz(&archive))
        }
        Some(p) => file_digest(p)?,
        None => "-".into(),
    };
    let mut disks = Vec::new();
    for d in &config.disks {
        let meta = std::fs::metadata(d).map_err(|source| BootCacheError {
            path: d.clone(),
            source,
        })?;
        disks.push(format!(
            "{}:{}:{:?}",
            d.display(),
            meta.len(),
            meta.modified().ok()
        ));
    }
    let key_text = format!(
        "v{MANIFEST_VERSION}.{STATE_FORMAT_VERSION}|{}|{kernel}|{initrd}|{}|{}|{}|{}|{}",
        env!("CARGO_PKG_VERSION"),
        config.cmdline,
        config.mem_mib,
        config.cpus,
        config.acpi,
        disks.join(",")
    );
    Ok(cache_root().join(format!("{:016x}", crc64_xz(key_text.as_bytes()))))
}
