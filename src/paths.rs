//! Where rewind keeps its state: `$REWIND_HOME` (default
//! `~/.local/share/rewind`), one directory per VM under `vms/NAME/`.

use std::path::PathBuf;
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
