//! `rewind ps` and `rewind rm`, and the cleanup of a VM's folder when its
//! process ends: `$REWIND_HOME/vms/NAME` stays only while it holds
//! something a user can still use (snapshots or disk layers).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::Failure;
use rewind::config::valid_name;
use rewind::control::client;
use rewind::paths;
use rewind::snapshot::{layers, store};

/// The VM's description when it runs (its socket answers), else None.
fn running(name: &str) -> Option<serde_json::Value> {
    let socket = paths::api_socket(name);
    client::request(&socket, "GET", "/vm", None, Some(Duration::from_secs(5)))
        .ok()
        .filter(|r| r.status == 200)
        .map(|r| r.body)
}

/// Snapshot directories of `name` (complete ones; temporaries start with '.').
fn snapshot_count(name: &str) -> usize {
    std::fs::read_dir(store::snapshots_dir(name))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .count()
}

fn has_disk_files(vm_dir: &Path) -> bool {
    std::fs::read_dir(vm_dir.join("disks"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| !e.file_name().to_string_lossy().starts_with('.'))
}

/// Removes the folder of a VM whose process is ending, unless it holds
/// snapshots or disk files (a live overlay `disk export --vm` can read, or
/// a layer that clones read through). Only the process that owned the
/// VM's socket calls this, after closing it.
pub fn cleanup_on_exit(name: &str) {
    let dir = paths::vm_dir(name);
    // Our socket is gone by now: one there belongs to a new process that
    // took the name in the meantime.
    let reused = paths::api_socket(name).exists();
    if !reused && snapshot_count(name) == 0 && !has_disk_files(&dir) {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `rewind ps`: running VMs (and with `all`, stopped VMs that left a
/// folder); with `json`, one JSON array for scripts.
pub fn ps(all: bool, json: bool) -> Result<i32, Failure> {
    let mut names: Vec<String> = std::fs::read_dir(paths::vms_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let mut rows = Vec::new();
    for name in names {
        let snaps = snapshot_count(&name);
        let row = match running(&name) {
            Some(vm) => serde_json::json!({
                "name": name,
                "pid": vm["pid"],
                "state": vm["state"],
                "snapshots": snaps,
                "socket": paths::api_socket(&name),
            }),
            None if all => serde_json::json!({
                "name": name,
                "pid": null,
                "state": "stopped",
                "snapshots": snaps,
                "socket": null,
            }),
            None => continue,
        };
        rows.push(row);
    }
    if json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(0);
    }
    println!(
        "{:<20} {:>8} {:<8} {:>9}  SOCKET",
        "NAME", "PID", "STATE", "SNAPSHOTS"
    );
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for r in rows {
        println!(
            "{:<20} {:>8} {:<8} {:>9}  {}",
            text(&r["name"]),
            text(&r["pid"]),
            text(&r["state"]),
            text(&r["snapshots"]),
            text(&r["socket"])
        );
    }
    Ok(0)
}

/// `rewind rm NAME`: removes a stopped VM's folder and snapshots; with
/// `force`, stops a running VM first.
pub fn rm(name: &str, force: bool) -> Result<i32, Failure> {
    if !valid_name(name) {
        return Err(Failure::Usage(format!("invalid VM name {name:?}")));
    }
    let dir = paths::vm_dir(name);
    if !dir.is_dir() {
        return Err(Failure::Usage(format!("no VM named {name:?}")));
    }
    if let Some(vm) = running(name) {
        if !force {
            return Err(Failure::Runtime(format!(
                "VM {name} is running (pid {}): stop it first, or rm --force",
                vm["pid"]
            )));
        }
        crate::stop(name)?;
        wait_stopped(name)?;
    }
    let report = remove(name)?;
    println!("{report}");
    Ok(0)
}

/// The stop request is answered before the process has let go of its
/// files: wait (bounded) until nothing answers on the socket.
fn wait_stopped(name: &str) -> Result<(), Failure> {
    let socket = paths::api_socket(name);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        if Instant::now() > deadline {
            return Err(Failure::Runtime(format!(
                "VM {name} did not stop within 30 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Deletes a stopped VM's snapshots the way `snapshot delete` does (their
/// disk layers are merged into whatever other VMs read through them), then
/// its folder. Layers a running clone still reads through are kept.
pub fn remove(name: &str) -> Result<String, Failure> {
    let dir = paths::vm_dir(name);
    // The VM's own live overlays are read by nothing else: removing them
    // first spares merging the snapshots' layers into them.
    for e in std::fs::read_dir(dir.join("disks"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let writable = e.metadata().is_ok_and(|m| !m.permissions().readonly());
        if writable {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let mut deleted = 0;
    // Newest first: children go before their parents, so nothing is
    // re-parented only to be deleted next.
    let mut snaps = store::list(Some(name));
    snaps.reverse();
    for (path, _) in snaps {
        store::delete_with_layers(&path).map_err(|e| Failure::Runtime(e.to_string()))?;
        deleted += 1;
    }
    // What is left in disks/ are layers other VMs read through (kept by a
    // delete while a clone ran, or by an earlier rm): merged into the
    // stopped ones now, kept while a running one still reads them.
    let left: Vec<_> = std::fs::read_dir(dir.join("disks"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .collect();
    let kept = layers::release(&left)
        .map_err(|e| Failure::Runtime(e.to_string()))?
        .kept
        .len();
    if kept == 0 {
        std::fs::remove_dir_all(&dir)
            .map_err(|e| Failure::Runtime(format!("cannot remove {}: {e}", dir.display())))?;
        Ok(format!(
            "removed VM {name} ({deleted} snapshots, folder {})",
            dir.display()
        ))
    } else {
        Ok(format!(
            "removed VM {name}'s {deleted} snapshots; kept {kept} disk layers in {} that running VMs read through (rm again once they stop)",
            dir.join("disks").display()
        ))
    }
}
