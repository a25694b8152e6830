//! Where rewind keeps its state: `$REWIND_HOME` (default
//! `~/.local/share/rewind`), one directory per VM under `vms/NAME/`, and
//! who may read what is there: every file and directory rewind writes is
//! created through the helpers at the end of this file, private to its
//! owner unless `--group-access` opens it to the group.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Always absolute: overlays, snapshots and manifests store paths under it,
/// and a relative one would be read against whatever directory reads it.
pub fn rewind_home() -> PathBuf {
    if let Some(home) = std::env::var_os("REWIND_HOME").filter(|h| !h.is_empty()) {
        return absolute(PathBuf::from(home));
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("rewind")
}

/// Canonical when it exists (symlinks resolved, so two spellings of one
/// home agree); otherwise joined to the current directory.
fn absolute(path: PathBuf) -> PathBuf {
    std::fs::canonicalize(&path)
        .or_else(|_| std::path::absolute(&path))
        .unwrap_or(path)
}

pub fn vms_dir() -> PathBuf {
    rewind_home().join("vms")
}

pub fn vm_dir(name: &str) -> PathBuf {
    vms_dir().join(name)
}

pub fn api_socket(name: &str) -> PathBuf {
    vm_dir(name).join("api.sock")
}

/// Short, unlikely to collide, and readable: `vm-` and 6 hex digits.
pub fn generate_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64 ^ d.as_secs())
        .unwrap_or(0);
    let mixed =
        (nanos ^ (std::process::id() as u64).rotate_left(20)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("vm-{:06x}", mixed >> 40)
}

/// Whether what rewind writes is opened to the owner's group
/// (`--group-access`); private to the owner otherwise. Set once at start,
/// before any file is created.
static GROUP_ACCESS: AtomicBool = AtomicBool::new(false);

pub fn set_group_access(on: bool) {
    GROUP_ACCESS.store(on, Ordering::Relaxed);
}

fn group_access() -> bool {
    GROUP_ACCESS.load(Ordering::Relaxed)
}

/// Mode of every file rewind writes: guest memory holds the guest's keys
/// and passwords, and a disk layer its files, so nobody else may read them.
pub fn file_mode() -> u32 {
    if group_access() {
        0o640
    } else {
        0o600
    }
}

/// Mode of a frozen disk layer: read-only even to its owner, so nothing
/// rewrites what snapshots read through.
pub fn frozen_mode() -> u32 {
    file_mode() & 0o444
}

pub fn dir_mode() -> u32 {
    if group_access() {
        0o750
    } else {
        0o700
    }
}

/// The control socket: connecting needs write permission, so a group that
/// may use the VM gets it; nobody else can reach the socket at all.
pub fn socket_mode() -> u32 {
    if group_access() {
        0o660
    } else {
        0o600
    }
}

/// Sets `path`'s mode outright: `chmod` ignores the umask, so the result is
/// the same under a umask of 0 or 077.
pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// `create_dir_all` where every directory it creates gets [`dir_mode`]
/// (a umask of 0 would otherwise leave `vms/` world-writable); directories
/// that already exist keep their mode (an export's parent may be `/tmp`).
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    while std::fs::symlink_metadata(at).is_err() {
        missing.push(at);
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p,
            _ => break,
        }
    }
    for d in missing.iter().rev() {
        match std::fs::DirBuilder::new().mode(dir_mode()).create(d) {
            Ok(()) => set_mode(d, dir_mode())?,
            // A concurrent creator got there first; it sets the mode too.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A new directory (it must not exist) with [`dir_mode`].
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().mode(dir_mode()).create(dir)?;
    set_mode(dir, dir_mode())
}

/// Opens `path` for writing, creating it with [`file_mode`]: refused if it
/// exists when `create_new`, truncated otherwise. The mode is set on the
/// open file, before any data is written.
pub fn create_private_file(path: &Path, create_new: bool) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.write(true).mode(file_mode());
    if create_new {
        opts.create_new(true);
    } else {
        opts.create(true).truncate(true);
    }
    let file = opts.open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(file_mode()))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::tests::TestDir;
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn new_directories_are_private_and_existing_ones_keep_their_mode() {
        let d = TestDir::new("private-dirs");
        set_mode(d.path(), 0o755).unwrap();
        let leaf = d.join("a/b/c");
        create_private_dir_all(&leaf).unwrap();
        for p in [d.join("a"), d.join("a/b"), leaf.clone()] {
            assert_eq!(mode(&p), 0o700, "{}", p.display());
        }
        // An export's parent (say /tmp) is not ours to change.
        assert_eq!(mode(d.path()), 0o755);
        create_private_dir_all(&leaf).unwrap();

        let f = d.join("a/f");
        create_private_file(&f, true).unwrap();
        assert_eq!(mode(&f), 0o600);
        assert!(create_private_file(&f, true).is_err(), "create_new");
        set_mode(&f, 0o666).unwrap();
        create_private_file(&f, false).unwrap();
        assert_eq!(mode(&f), 0o600, "a truncated file is made private too");
    }
}
