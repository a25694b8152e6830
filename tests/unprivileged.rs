//! rewind needs no root: an ordinary user in the `kvm` group boots the test
//! guest with a disk, snapshots, reverts and restores it.
//!
//! The fixture (this file, when the tests run as root, as CI does) creates
//! the group `kvm` and the system user `rewind-test` in it when they are
//! missing, and runs rewind through `setpriv` as that user with no
//! capabilities. Where `/dev/kvm` is not the usual `root:kvm 0660` (this
//! machine has it `root:root 0600`), each command runs in a private mount
//! namespace where a `root:kvm 0660` node for the same device is bound over
//! `/dev/kvm`, as udev would set it; the host's node is never changed.
//! Run as another user, the test says it is skipped: the whole suite then
//! runs unprivileged anyway.

mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

const USER: &str = "rewind-test";

fn sh(script: &str) -> bool {
    Command::new("sh")
        .args(["-c", script])
        .status()
        .is_ok_and(|s| s.success())
}

/// The user and group, created when missing; their ids.
fn ensure_user() -> (u32, u32) {
    if !sh("getent group kvm >/dev/null") {
        assert!(sh("groupadd --system kvm"), "groupadd kvm");
    }
    if !sh(&format!("id -u {USER} >/dev/null 2>&1")) {
        assert!(
            sh(&format!(
                "useradd --system --no-create-home --home-dir /nonexistent \
                 --shell /usr/sbin/nologin --groups kvm {USER}"
            )),
            "useradd {USER}"
        );
    } else if !sh(&format!("id -nG {USER} | grep -qw kvm")) {
        assert!(sh(&format!("usermod -aG kvm {USER}")), "usermod");
    }
    let id = |flag: &str| {
        let o = Command::new("id").args([flag, USER]).output().unwrap();
        stdout(&o).trim().parse::<u32>().unwrap()
    };
    (id("-u"), id("-g"))
}

fn kvm_gid() -> u32 {
    let o = Command::new("getent")
        .args(["group", "kvm"])
        .output()
        .unwrap();
    stdout(&o)
        .split(':')
        .nth(2)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// `rewind ARGS` as USER (no capabilities, groups from /etc/group), with
/// `/dev/kvm` as a `root:kvm 0660` node in a private mount namespace when
/// the host's is not already so.
fn as_user(home: &Home, bin: &Path, args: &[&str]) -> Command {
    let dev = std::fs::metadata("/dev/kvm").unwrap();
    let rdev = dev.rdev();
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    let ready = dev.gid() == kvm_gid() && dev.mode() & 0o060 == 0o060;
    let setpriv = format!(
        "exec setpriv --reuid={USER} --regid={USER} --init-groups \
         --inh-caps=-all --bounding-set=-all -- \"$@\""
    );
    let script = if ready {
        setpriv
    } else {
        let node = home.path.join("dev");
        std::fs::create_dir_all(&node).unwrap();
        let node = node.display();
        format!(
            "mount -t tmpfs -o mode=0755 none {node} && mknod {node}/kvm c {major} {minor} && \
             chgrp kvm {node}/kvm && chmod 0660 {node}/kvm && \
             mount --bind {node}/kvm /dev/kvm && {setpriv}"
        )
    };
    let mut c = Command::new("unshare");
    if ready {
        c = Command::new("sh");
    } else {
        c.args(["--mount", "--propagation", "private", "sh"]);
    }
    c.args(["-c", &script, "sh"])
        .arg(bin)
        .args(args)
        .env("REWIND_HOME", &home.path)
        .env("REWIND_BOOT_CACHE", home.path.join("boot-cache"))
        .env("HOME", &home.path)
        .stdin(std::process::Stdio::null());
    c
}

#[test]
fn an_ordinary_user_in_the_kvm_group_boots_snapshots_reverts_and_restores() {
    if !kvm_available("unprivileged") {
        return;
    }
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED unprivileged: not root, so every other test already runs as a user");
        return;
    }
    let (uid, gid) = ensure_user();
    let home = Home::new("unprivileged");
    // The binary may sit under a directory the user cannot enter.
    let bin = home.path.join("rewind");
    std::fs::copy(BIN, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let base = home.path.join("base.raw");
    std::fs::write(&base, vec![0u8; 4 << 20]).unwrap();
    let chown = |p: &Path| std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
    chown(&home.path);
    chown(&base);

    let mut c = as_user(
        &home,
        &bin,
        &[
            "run",
            "--name",
            "u",
            "--disk",
            base.to_str().unwrap(),
            "--console",
            "stdio",
            "--timeout",
            "120",
            "--append",
            "period_ms=20 region=2",
        ],
    );
    c.stderr(std::process::Stdio::inherit());
    let vm = rewind::child_vm::ChildVm::spawn(c, "u", home.socket("u")).unwrap();
    let wait = std::time::Duration::from_secs(60);
    vm.wait_for(0, wait, |l| l == "tick 2 ok").unwrap();
    let api = |method: &str, path: &str, body: Option<serde_json::Value>| {
        let r = vm.api(method, path, body.as_ref(), None).unwrap();
        assert_eq!(r.status, 200, "{method} {path}: {}", r.body);
    };
    api("PUT", "/vm/pause", None);
    api("PUT", "/snapshots", Some(serde_json::json!({"name": "s"})));
    api("PUT", "/vm/resume", None);

    // A restore in a new process, as the user: its first tick is the one
    // after the snapshot's.
    let o = as_user(
        &home,
        &bin,
        &[
            "restore",
            "s",
            "--vm",
            "u",
            "--name",
            "r",
            "--console",
            "stdio",
            "--timeout",
            "60",
            "--expect",
            "^tick [0-9]+ ok$",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let first = stdout(&o).lines().next().and_then(parse_tick);
    let Some((0, next)) = first else {
        panic!("no tick from the restore: {}", stdout(&o));
    };

    // An in-place revert goes back to the same tick.
    let from = vm.lines().len();
    vm.wait_for(from, wait, |l| {
        parse_tick(l).is_some_and(|(_, t)| t > next + 1)
    })
    .unwrap();
    let from = vm.lines().len();
    api("PUT", "/snapshots/s/revert", None);
    vm.wait_for(from, wait, |l| parse_tick(l) == Some((0, next)))
        .unwrap_or_else(|l| panic!("no tick {next} after the revert: {l:?}"));
    api("PUT", "/vm/stop", None);
    let (status, lines) = vm.wait_exit();
    assert_eq!(status, Some(0), "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains("CORRUPT")), "{lines:?}");

    // Everything rewind wrote belongs to the user: nothing ran as root.
    let mut owned_by_root = Vec::new();
    let mut stack = vec![home.path.join("vms")];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.uid() != uid {
            owned_by_root.push(p.display().to_string());
        }
        if m.is_dir() {
            stack.extend(files_in(&p));
        }
    }
    assert!(owned_by_root.is_empty(), "{owned_by_root:?}");

    // And another local user cannot read the guest's memory.
    let memory = home.path.join("vms/u/snapshots/s/memory.bin");
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            "head",
            "-c",
            "1",
        ])
        .arg(&memory)
        .output()
        .unwrap();
    assert!(!o.status.success(), "nobody read {}", memory.display());
    assert!(stderr(&o).contains("Permission denied"), "{}", stderr(&o));
    assert!(home.path.join("vms/u/snapshots/s/memory.bin").exists());
    assert!(home.path.join("vms/r/disks").is_dir());
}
