//! Crash-safe file operations for snapshot storage and disk images.
//!
//! The invariant every function here protects: a `kill -9` or power loss at
//! any instant leaves either the old file/directory or the complete new one
//! under the final name, never a partial one. Partial data only ever lives
//! under a temp name: `.NAME.tmp-PID[-SEQ]` for snapshot files, which
//! [`remove_stale_temps`] can later recognise and delete once its writer is
//! gone, or `.NAME.rewind-tmp` for disk images, which
//! [`remove_reusable_temps`] deletes while the VM directory is idle.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Marker between the original name and the writer's PID in temp names.
const TEMP_MARKER: &str = ".tmp-";

/// Distinguishes temp files of concurrent writers inside one process; the
/// PID alone would let two threads writing the same target share (and
/// interleave into) one temp file.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Returns a fresh temp path next to `final_path`: `DIR/.NAME.tmp-PID-SEQ`.
///
/// Use it for anything that is later moved into place with
/// [`atomic_write`]-style renames or [`publish_dir`], so that a crashed
/// writer's leftovers are recognised by [`remove_stale_temps`].
pub fn temp_path_for(final_path: &Path) -> io::Result<PathBuf> {
    let name = final_path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no file name", final_path.display()),
        )
    })?;
    let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!("{TEMP_MARKER}{}-{seq}", std::process::id()));
    Ok(parent_dir(final_path).join(tmp_name))
}

/// `Path::parent` yields `""` for a bare file name, which cannot be opened
/// for fsync; the directory actually meant is the current one.
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Atomically replaces `path` with `bytes`.
///
/// The data is fsynced before the rename so the new name can never point at
/// unwritten blocks, and the directory is fsynced after it so the rename
/// itself survives a power loss. On failure the temp file is removed and the
/// previous contents of `path` (if any) are untouched.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    atomic_write_with(path, |file| file.write_all(bytes))
}

/// [`atomic_write`] with the payload produced by `fill`; split out so tests
/// can inject a failure halfway through the payload.
fn atomic_write_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = temp_path_for(path)?;
    let result = (|| {
        // truncate rather than create_new: after a reboot our PID may match a
        // stale temp from a previous boot, and that one is garbage anyway.
        let mut file = crate::paths::create_private_file(&tmp, false)?;
        fill(&mut file)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        // Best effort: the original error is what the caller needs to see,
        // and a leftover temp is reclaimed by remove_stale_temps anyway.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(parent_dir(path))
}

/// Creates `path` (private, must not exist) holding `bytes`, not yet
/// durable: see [`sync_together`].
pub fn write_new(path: &Path, bytes: &[u8]) -> io::Result<File> {
    let mut file = crate::paths::create_private_file(path, true)?;
    file.write_all(bytes)?;
    Ok(file)
}

/// Makes several new files durable for about the price of one: their
/// writeback is started for all before the first fsync, so that its journal
/// commit takes every file's blocks and sizes, and the other fsyncs find
/// nothing left to commit. The error names the file.
pub fn sync_together(files: &[(&File, &Path)]) -> Result<(), (PathBuf, io::Error)> {
    use std::os::unix::io::AsRawFd;
    for (file, _) in files {
        // SAFETY: sync_file_range on an open fd; it only starts writeback.
        // A failure here is found again by the fsync below.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    for (file, path) in files {
        file.sync_all().map_err(|e| (path.to_path_buf(), e))?;
    }
    Ok(())
}

/// Makes directory entry changes (creates, renames, unlinks) in `dir`
/// durable; fsyncing a file does not persist the name pointing at it.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn path_to_cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("path {} contains a NUL byte", path.display()),
        )
    })
}

/// Renames a fully written `tmp_dir` to `final_dir`, refusing to replace an
/// existing `final_dir`, so a snapshot directory appears whole or not at all.
///
/// Plain `rename(2)` would silently replace an existing *empty* directory,
/// so this uses `renameat2(RENAME_NOREPLACE)`, which checks and renames in
/// one atomic step. Filesystems without it (EINVAL) fall back to an
/// exists-check plus rename, which is only racy against concurrent
/// publishers of the same name.
pub fn publish_dir(tmp_dir: &Path, final_dir: &Path) -> io::Result<()> {
    // The entries inside tmp_dir must be durable before the directory
    // becomes visible under its final name.
    fsync_dir(tmp_dir)?;

    let from = path_to_cstring(tmp_dir)?;
    let to = path_to_cstring(final_dir)?;
    // SAFETY: both pointers come from live CStrings that are NUL-terminated
    // and outlive the call; AT_FDCWD makes relative paths resolve like
    // rename(2) does. renameat2 does not retain the pointers.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                if fs::symlink_metadata(final_dir).is_ok() {
                    return Err(exists_error(final_dir));
                }
                fs::rename(tmp_dir, final_dir)?;
            }
            Some(libc::EEXIST) => return Err(exists_error(final_dir)),
            _ => return Err(err),
        }
    }

    let final_parent = parent_dir(final_dir);
    fsync_dir(final_parent)?;
    let tmp_parent = parent_dir(tmp_dir);
    if tmp_parent != final_parent {
        // The removal of the old name lives in the other directory.
        fsync_dir(tmp_parent)?;
    }
    Ok(())
}

fn exists_error(final_dir: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "{} already exists, refusing to replace it",
            final_dir.display()
        ),
    )
}

/// Extracts the writer PID from a temp name `.NAME.tmp-PID[-SEQ]`.
///
/// Anything not matching exactly yields `None`, so files we did not create
/// are never treated as garbage.
fn temp_owner_pid(name: &str) -> Option<u32> {
    let idx = name.rfind(TEMP_MARKER)?;
    // Require ".X" before the marker: a leading dot plus a non-empty name.
    if !name.starts_with('.') || idx < 2 {
        return None;
    }
    let rest = &name[idx + TEMP_MARKER.len()..];
    let (pid, seq) = match rest.split_once('-') {
        Some((pid, seq)) => (pid, Some(seq)),
        None => (rest, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(pid) || seq.is_some_and(|s| !all_digits(s)) {
        return None;
    }
    pid.parse().ok().filter(|&p| p > 0)
}

/// Removes leftover temp files and directories in `dir` whose writer process
/// is gone, returning how many were removed.
///
/// Liveness is judged by `/proc/PID`. A reused PID makes us keep garbage
/// until that process exits, which is the safe direction to be wrong in.
pub fn remove_stale_temps(dir: &Path) -> io::Result<usize> {
    // Without procfs every writer would look dead and we would delete temps
    // that live processes are still filling.
    if !Path::new("/proc/self").exists() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "/proc is not mounted, cannot tell which temp files are stale",
        ));
    }
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_owner_pid) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        // file_type() does not follow symlinks, so a symlinked temp is
        // unlinked rather than having its target's contents deleted.
        let result = if entry.file_type()?.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match result {
            Ok(()) => removed += 1,
            // Another cleaner got there first; the goal is met either way.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if removed > 0 {
        fsync_dir(dir)?;
    }
    Ok(removed)
}

/// Suffix of the temps disk operations write: their name is fixed per target,
/// not per writer, so a rerun after a crash reuses (truncates) the leftover
/// instead of adding another, and [`remove_reusable_temps`] can delete them
/// all while nothing runs on the directory.
const REUSABLE_TEMP_SUFFIX: &str = ".rewind-tmp";

/// Temp file `DIR/.NAME.rewind-tmp` next to `target`: same directory so
/// `rename` is atomic, hidden so users listing the VM directory do not
/// mistake it for an image.
pub(crate) fn reusable_temp_path(target: &Path) -> io::Result<PathBuf> {
    let name = target
        .file_name()
        .ok_or_else(|| io::Error::other("path has no file name"))?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(REUSABLE_TEMP_SUFFIX);
    Ok(parent_dir(target).join(tmp))
}

/// Removes every [`reusable_temp_path`] temp in `dir`; only safe while
/// nothing runs on the directory. Returns how many were removed.
pub(crate) fn remove_reusable_temps(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(REUSABLE_TEMP_SUFFIX) {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    if removed > 0 {
        fsync_dir(dir)?;
    }
    Ok(removed)
}

pub(crate) fn fsync_file(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Atomically replaces `target` with the already-synced `tmp`, keeping
/// `target`'s permissions (frozen snapshot layers are read-only and must
/// stay so).
pub(crate) fn replace_keeping_mode(tmp: &Path, target: &Path) -> io::Result<()> {
    if let Ok(meta) = fs::metadata(target) {
        fs::set_permissions(tmp, meta.permissions())?;
    }
    fs::rename(tmp, target)
}

/// Publishes `tmp` under `target` without ever clobbering an existing file:
/// `link(2)` fails atomically (`AlreadyExists`) if `target` exists, which
/// `rename(2)` cannot express portably.
pub(crate) fn publish_new(tmp: &Path, target: &Path) -> io::Result<()> {
    let linked = fs::hard_link(tmp, target);
    // On failure the temp is garbage either way, and remove_reusable_temps
    // finds it if this removal fails too.
    let removed = fs::remove_file(tmp);
    linked.and(removed)
}

/// Identity of a file independent of how its path is spelled (relative, via
/// symlinks, ...).
pub(crate) fn file_id(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Whether two paths name the same file or directory; a missing one is
/// the same as nothing.
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    matches!((file_id(a), file_id(b)), (Ok(x), Ok(y)) if x == y)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Self-cleaning unique directory (set REWIND_KEEP_TEST_DIRS=1 to keep
    /// it for post-mortem inspection); tests run in parallel threads of one
    /// process, so the name needs more than the PID.
    pub(crate) struct TestDir(pub PathBuf);

    impl TestDir {
        pub(crate) fn new(tag: &str) -> TestDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("rewind-test-{}-{tag}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TestDir(p)
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }

        pub(crate) fn join(&self, name: impl AsRef<Path>) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            if std::env::var_os("REWIND_KEEP_TEST_DIRS").is_none() {
                let _ = fs::remove_dir_all(&self.0);
            }
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn atomic_write_creates_and_replaces() {
        let d = TestDir::new("aw");
        let p = d.path().join("f.json");
        atomic_write(&p, b"one").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        atomic_write(&p, b"two, longer").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two, longer");
        assert_eq!(names(d.path()), vec!["f.json"]);
    }

    #[test]
    fn atomic_write_failure_midway_keeps_old_contents_and_no_temp() {
        let d = TestDir::new("awfail");
        let p = d.path().join("state.bin");
        atomic_write(&p, b"old contents").unwrap();
        let err = atomic_write_with(&p, |f| {
            f.write_all(b"half of the new")?;
            Err(io::Error::other("simulated crash"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "simulated crash");
        assert_eq!(fs::read(&p).unwrap(), b"old contents");
        assert_eq!(names(d.path()), vec!["state.bin"]);
    }

    #[test]
    fn atomic_write_rename_failure_cleans_temp() {
        let d = TestDir::new("awdir");
        // A non-empty directory at the target makes the final rename fail
        // after the temp was fully written, even when running as root.
        let p = d.path().join("target");
        fs::create_dir(&p).unwrap();
        fs::write(p.join("keep"), b"x").unwrap();
        assert!(atomic_write(&p, b"data").is_err());
        assert_eq!(names(d.path()), vec!["target"]);
        assert_eq!(fs::read(p.join("keep")).unwrap(), b"x");
    }

    #[test]
    fn atomic_write_into_missing_dir_fails() {
        let d = TestDir::new("awmissing");
        let p = d.path().join("nope").join("f");
        assert_eq!(
            atomic_write(&p, b"x").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn publish_dir_moves_whole_dir() {
        let d = TestDir::new("pub");
        let fin = d.path().join("snap-1");
        let tmp = temp_path_for(&fin).unwrap();
        fs::create_dir(&tmp).unwrap();
        fs::write(tmp.join("state.bin"), b"abc").unwrap();
        publish_dir(&tmp, &fin).unwrap();
        assert!(!tmp.exists());
        assert_eq!(fs::read(fin.join("state.bin")).unwrap(), b"abc");
    }

    #[test]
    fn publish_dir_refuses_existing_target() {
        let d = TestDir::new("pubexist");
        let fin = d.path().join("snap-1");
        let tmp = temp_path_for(&fin).unwrap();
        fs::create_dir(&tmp).unwrap();
        fs::write(tmp.join("state.bin"), b"new").unwrap();

        // Empty directory: the case plain rename(2) would silently replace.
        fs::create_dir(&fin).unwrap();
        let err = publish_dir(&tmp, &fin).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(err.to_string().contains("already exists"), "{err}");
        assert!(tmp.join("state.bin").exists());

        fs::write(fin.join("state.bin"), b"old").unwrap();
        assert!(publish_dir(&tmp, &fin).is_err());
        assert_eq!(fs::read(fin.join("state.bin")).unwrap(), b"old");

        fs::remove_dir_all(&fin).unwrap();
        fs::write(&fin, b"a file").unwrap();
        assert!(publish_dir(&tmp, &fin).is_err());
        assert_eq!(fs::read(&fin).unwrap(), b"a file");
        assert!(tmp.join("state.bin").exists());
    }

    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        pid
    }

    #[test]
    fn remove_stale_temps_removes_dead_keeps_live() {
        let d = TestDir::new("stale");
        let dead = dead_pid();
        let live = std::process::id();
        let dp = d.path();
        fs::write(dp.join(format!(".state.bin.tmp-{dead}")), b"x").unwrap();
        fs::create_dir(dp.join(format!(".snap-3.tmp-{dead}-7"))).unwrap();
        fs::write(dp.join(format!(".snap-3.tmp-{dead}-7/state.bin")), b"x").unwrap();
        fs::write(dp.join(format!(".manifest.json.tmp-{live}-0")), b"x").unwrap();
        // Not ours: must survive even though they look similar.
        for keep in [
            "state.bin",
            ".hidden",
            ".x.tmp-abc",
            ".tmp-1",
            "x.tmp-1",
            ".x.tmp-1-",
            ".x.tmp-0",
        ] {
            fs::write(dp.join(keep), b"k").unwrap();
        }
        assert_eq!(remove_stale_temps(dp).unwrap(), 2);
        let left = names(dp);
        assert!(left.contains(&format!(".manifest.json.tmp-{live}-0")));
        assert!(!left.iter().any(|n| n.contains(&format!("tmp-{dead}"))));
        assert_eq!(left.len(), 8, "{left:?}");
        assert_eq!(remove_stale_temps(dp).unwrap(), 0);
    }

    #[test]
    fn temp_owner_pid_parses_only_our_names() {
        assert_eq!(temp_owner_pid(".a.tmp-12"), Some(12));
        assert_eq!(temp_owner_pid(".a.tmp-12-3"), Some(12));
        assert_eq!(temp_owner_pid(".a.tmp-x.tmp-12"), Some(12));
        assert_eq!(temp_owner_pid(".a.tmp-12-3-4"), None);
        assert_eq!(temp_owner_pid(".a.tmp--3"), None);
        assert_eq!(temp_owner_pid("a.tmp-12"), None);
    }
}
