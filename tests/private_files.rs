//! Everything rewind writes is private to its owner whatever the umask
//! (guest memory holds the guest's secrets), or open to the group with
//! `--group-access`: every file and directory it created is stat'ed.

mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `cmd` with the umask set to `umask` in the child before rewind starts.
fn with_umask(mut cmd: Command, umask: u32) -> Command {
    // SAFETY: umask(2) is async-signal-safe and touches nothing but the
    // child's own file-creation mask.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(umask as libc::mode_t);
            Ok(())
        });
    }
    cmd
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// Every path under `root` (itself included), depth first.
fn walk(root: &Path, out: &mut Vec<PathBuf>) {
    out.push(root.to_path_buf());
    if std::fs::symlink_metadata(root).unwrap().is_dir() {
        for p in files_in(root) {
            walk(&p, out);
        }
    }
}

/// Boots a VM with a disk and the boot cache, snapshots, reverts, restores
/// a clone, exports a bundle and a disk, all under `umask`; then checks the
/// mode of everything they created.
fn check(umask: u32, group: bool) {
    let home = Home::new(&format!("private-{umask:o}-{group}"));
    let base = home.path.join("base.raw");
    std::fs::write(&base, vec![0u8; 4 << 20]).unwrap();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (dir_mode, file_mode, socket_mode) = if group {
        (0o750, 0o640, 0o660)
    } else {
        (0o700, 0o600, 0o600)
    };
    let cmd = |args: &[&str]| {
        let mut c = home.cmd();
        if group {
            c.arg("--group-access");
        }
        c.args(args);
        with_umask(c, umask)
    };
    let run = |args: &[&str]| {
        let o = cmd(args).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    };

    let mut c = cmd(&["run", "--name", "a", "--disk", base.to_str().unwrap()]);
    c.args([
        "--boot-cache",
        "--console",
        "stdio",
        "--timeout",
        "120",
        "--append",
        "period_ms=20 region=2",
    ])
    .stderr(std::process::Stdio::inherit());
    let vm = rewind::child_vm::ChildVm::spawn(c, "a", home.socket("a")).unwrap();
    vm.wait_for(0, std::time::Duration::from_secs(60), |l| l == "tick 1 ok")
        .unwrap();
    assert_eq!(mode(&home.socket("a")), socket_mode, "api.sock");
    let api = |method: &str, path: &str, body: Option<serde_json::Value>| {
        let r = vm.api(method, path, body.as_ref(), None).unwrap();
        assert_eq!(r.status, 200, "{method} {path}: {}", r.body);
    };
    api("PUT", "/snapshots", Some(serde_json::json!({"name": "s1"})));
    api("PUT", "/snapshots/s1/revert", None);
    api("PUT", "/snapshots", Some(serde_json::json!({"name": "s2"})));
    api("PUT", "/vm/stop", None);
    assert_eq!(vm.wait_exit().0, Some(0));

    let export = home.path.join("export");
    let raw = home.path.join("disk.raw");
    run(&[
        "snapshot",
        "export",
        "s1",
        export.to_str().unwrap(),
        "--vm",
        "a",
    ]);
    run(&[
        "disk",
        "export",
        "--snapshot",
        "s2",
        "--vm",
        "a",
        raw.to_str().unwrap(),
    ]);
    run(&[
        "restore",
        "s1",
        "--vm",
        "a",
        "--name",
        "b",
        "--console",
        "none",
        "--timeout",
        "60",
        "--expect",
        "^tick",
    ]);

    let mut created = Vec::new();
    for top in ["vms", "boot-cache", "export", "disk.raw"] {
        walk(&home.path.join(top), &mut created);
    }
    let names: Vec<String> = created.iter().map(|p| p.display().to_string()).collect();
    for needed in [
        "memory.bin",
        "state.bin",
        "manifest.json",
        ".qcow2",
        "/b/disks",
    ] {
        assert!(
            names.iter().any(|n| n.contains(needed)),
            "no {needed} among {names:?}"
        );
    }
    let mut wrong = Vec::new();
    for p in &created {
        let m = mode(p);
        let meta = std::fs::symlink_metadata(p).unwrap();
        // A frozen disk layer is read-only to its owner too.
        let ok = if meta.is_dir() {
            m == dir_mode
        } else {
            m == file_mode || m == file_mode & 0o444
        };
        if !ok {
            wrong.push(format!("{:o} {}", m, p.display()));
        }
    }
    assert!(
        wrong.is_empty(),
        "umask {umask:o}, group access {group}: expected {dir_mode:o}/{file_mode:o}:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn private_under_umask_0() {
    if !kvm_available("private_under_umask_0") {
        return;
    }
    check(0, false);
}

#[test]
fn private_under_umask_022() {
    if !kvm_available("private_under_umask_022") {
        return;
    }
    check(0o022, false);
}

#[test]
fn group_access_under_umask_077() {
    if !kvm_available("group_access_under_umask_077") {
        return;
    }
    check(0o077, true);
}
