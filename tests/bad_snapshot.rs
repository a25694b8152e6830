//! Broken snapshot bundles: one clear line, no panic, and the original
//! snapshot stays usable.

mod common;
use common::*;
use std::path::PathBuf;

/// Snapshot "good" taken while the guest is paused, then the VM stopped:
/// every tick line it printed came before the snapshot, so the last one
/// is the tick the snapshot holds. Returns the bundle and that tick.
fn take_snapshot(home: &Home) -> (PathBuf, u64) {
    let vm = start_guest(home, "v", "120", "period_ms=20 region=2", &[]);
    vm.socket_ready();
    vm.wait_for(0, "tick 2", |l| l == "tick 2 ok");
    vm.api_ok("PUT", "/vm/pause", None);
    let r = vm.api_ok(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "good" })),
    );
    let (status, lines) = vm.stop_and_collect();
    assert_eq!(status, Some(0));
    let k = ticks_of(&lines, 0).last().copied().unwrap();
    (PathBuf::from(r["path"].as_str().unwrap()), k)
}

#[test]
fn broken_bundles_are_refused_with_one_clear_line() {
    if !kvm_available("broken_bundles") {
        return;
    }
    let home = Home::new("badsnap");
    let (good, k) = take_snapshot(&home);
    let variant = |name: &str| {
        let d = home.path.join("variants").join(name);
        copy_dir(&good, &d);
        d
    };

    let d = variant("magic");
    mutate(&d.join("state.bin"), |b| b[0] ^= 0xff);
    restore_fails(&home, &d, "not a rewind state file");

    let d = variant("version");
    mutate(&d.join("state.bin"), |b| b[8] = 99);
    restore_fails(&home, &d, "version");

    let d = variant("checksum");
    mutate(&d.join("state.bin"), |b| {
        let n = b.len();
        b[n - 10] ^= 0x55
    });
    restore_fails(&home, &d, "checksum");

    let d = variant("truncated-state");
    mutate(&d.join("state.bin"), |b| b.truncate(b.len() / 2));
    restore_fails(&home, &d, "truncated");

    // A length field claiming u64::MAX body bytes: refused on the header,
    // nothing the size of the claim is ever allocated.
    let d = variant("huge-length");
    mutate(&d.join("state.bin"), |b| {
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes())
    });
    restore_fails(&home, &d, "header says 18446744073709551615 body bytes");

    // A sparse 64 GiB state.bin: refused on its size before it is read, so
    // no 64 GiB buffer is ever asked for (that would abort, not exit 2).
    let d = variant("huge-file");
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("state.bin"))
        .unwrap()
        .set_len(64 << 30)
        .unwrap();
    restore_fails(&home, &d, "is too large: 68719476736 bytes");

    let d = variant("no-memory");
    std::fs::remove_file(d.join("memory.bin")).unwrap();
    restore_fails(&home, &d, "memory.bin is missing");

    let d = variant("short-memory");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("memory.bin"))
        .unwrap();
    f.set_len(4096).unwrap();
    restore_fails(&home, &d, "expected");

    let d = variant("manifest");
    std::fs::write(d.join("manifest.json"), b"{ not json").unwrap();
    restore_fails(&home, &d, "corrupt");

    let d = variant("no-manifest");
    std::fs::remove_file(d.join("manifest.json")).unwrap();
    restore_fails(&home, &d, "missing");

    restore_fails(&home, &home.path.join("does/not/exist"), "no snapshot");
    let o = home.run(&["restore", "nosuchsnap", "--vm", "v", "--console", "none"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("no snapshot named \"nosuchsnap\""),
        "{}",
        stderr(&o)
    );

    // The original is untouched by all of this and still restores.
    let o = home.run(&[
        "restore",
        good.to_str().unwrap(),
        "--name",
        "ok",
        "--console",
        "stdio",
        "--timeout",
        "60",
        "--expect",
        &format!("^tick {} ok$", k + 2),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with(&format!("tick {} ok\n", k + 1)),
        "{}",
        stdout(&o)
    );
}

#[test]
fn snapshot_errors_from_a_running_vm() {
    if !kvm_available("snapshot_errors") {
        return;
    }
    let home = Home::new("snaperr");
    let vm = start_guest(&home, "v", "120", "period_ms=20 region=2", &[]);
    vm.socket_ready();
    vm.wait_for(0, "tick 1", |l| l == "tick 1 ok");
    vm.api_ok(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "x" })),
    );
    let dup = vm.api(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "x" })),
    );
    assert_eq!(dup.status, 409, "{}", dup.body);
    let bad = vm.api(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "../x" })),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    let missing = vm.api("PUT", "/snapshots/nope/revert", None);
    assert_eq!(missing.status, 404, "{}", missing.body);
    // The VM is still fine after refused requests.
    let n = vm.lines().len();
    vm.wait_for(n, "more ticks", |l| parse_tick(l).is_some());
    // CLI round trip: create (auto-named), list, info, delete.
    let o = home.run(&["snapshot", "create", "--vm", "v"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("snapshot snap-1 at"), "{}", stdout(&o));
    let o = home.run(&["snapshot", "list", "--vm", "v"]);
    assert!(
        stdout(&o).contains("snap-1") && stdout(&o).contains("x "),
        "{}",
        stdout(&o)
    );
    let o = home.run(&["snapshot", "info", "snap-1", "--vm", "v"]);
    let info: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(info["parent"], "x");
    assert_eq!(info["config"]["mem_mib"], 256);
    let o = home.run(&["snapshot", "delete", "x", "--vm", "v"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!home.path.join("vms/v/snapshots/x").exists());
    let o = home.run(&["pause", "--vm", "v"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(vm.api_ok("GET", "/vm", None)["state"], "paused");
    let o = home.run(&["resume", "--vm", "v"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(vm.api_ok("GET", "/vm", None)["state"], "running");
    let lines = vm.lines();
    assert_eq!(vm.stop(), Some(0));
    assert!(!lines.iter().any(|l| l.contains("CORRUPT")));
}

/// For every point of a snapshot's creation (see src/snapshot/stall.rs),
/// kill -9 rewind while it is stopped there: the kill lands inside the
/// operation for certain, and earlier snapshots restore exactly.
#[test]
fn kill_9_during_snapshot_leaves_earlier_snapshots_intact() {
    if !kvm_available("kill_during_snapshot") {
        return;
    }
    let home = Home::new("kill9");
    for phase in rewind::snapshot::stall::PHASES {
        let name = format!("v-{phase}");
        let stall = format!("{phase}:victim");
        let vm = start_guest_env(
            &home,
            &name,
            "300",
            "period_ms=50 region=8",
            &[],
            &[("REWIND_TEST_STALL_AT", &stall)],
        );
        vm.socket_ready();
        vm.wait_for(0, "tick 2", |l| l == "tick 2 ok");
        vm.api_ok(
            "PUT",
            "/snapshots",
            Some(serde_json::json!({ "name": "before" })),
        );
        let k = snapshot_tick(&home, &name, "before");
        kill_inside_snapshot(&home, vm, &name, phase);
        // Only whole snapshots are listed: "victim" exists completely or not at all.
        let o = home.run(&["snapshot", "list", "--vm", &name]);
        assert!(!stdout(&o).contains("BROKEN"), "{}", stdout(&o));
        let victim = home.path.join("vms").join(&name).join("snapshots/victim");
        assert_eq!(victim.exists(), *phase == "published", "{phase}");
        if victim.exists() {
            snapshot_tick(&home, &name, "victim");
        }
        let o = home.run(&[
            "restore",
            "before",
            "--vm",
            &name,
            "--name",
            &format!("{name}-r"),
            "--console",
            "stdio",
            "--timeout",
            "60",
            "--expect",
            &format!("^tick {} ok$", k + 2),
        ]);
        assert_eq!(o.status.code(), Some(0), "{phase}: {}", stderr(&o));
        assert!(
            stdout(&o).starts_with(&format!("tick {} ok\n", k + 1)),
            "{phase}: {}",
            stdout(&o)
        );
        assert!(!stdout(&o).contains("CORRUPT"));
    }
}

#[test]
fn full_disk_fails_the_snapshot_cleanly() {
    if !kvm_available("full_disk") {
        return;
    }
    let home = Home::new("fulldisk");
    let small = home.path.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED full_disk: cannot mount a small tmpfs here (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(small.clone());
    let small_home = Home {
        path: small.clone(),
    };
    let vm = start_guest(&small_home, "v", "120", "period_ms=20 region=1", &[]);
    vm.socket_ready();
    vm.wait_for(0, "tick 2", |l| l == "tick 2 ok");
    vm.api_ok(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "fits" })),
    );
    // Now fill the disk, so the next snapshot cannot be written.
    let filler = small.join("filler");
    let _ = std::fs::write(&filler, vec![1u8; 12 << 20]);
    let r = vm.api(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "nospace" })),
    );
    assert_eq!(r.status, 500, "{}", r.body);
    assert!(
        r.body["error"].as_str().unwrap().contains("No space left"),
        "{}",
        r.body
    );
    assert!(!small.join("vms/v/snapshots/nospace").exists());
    let leftovers: Vec<_> = std::fs::read_dir(small.join("vms/v/snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers,
        vec![std::ffi::OsString::from("fits")],
        "temp files left behind"
    );
    // The guest runs on, and the earlier snapshot still reverts.
    let n = vm.lines().len();
    vm.wait_for(n, "more ticks", |l| parse_tick(l).is_some());
    std::fs::remove_file(&filler).unwrap();
    vm.api_ok("PUT", "/snapshots/fits/revert", None);
    let lines = vm.lines();
    assert_eq!(vm.stop(), Some(0));
    assert!(!lines.iter().any(|l| l.contains("CORRUPT")));
    std::mem::forget(small_home);
}

/// Status 2 and one line naming the problem.
fn usage_error(o: &std::process::Output, needle: &str) {
    one_line_error(o, 2, needle);
}

#[test]
fn missing_duplicate_and_invalid_snapshot_names_are_usage_errors() {
    if !kvm_available("snapshot usage errors") {
        return;
    }
    let home = Home::new("snapusage");
    let vm = start_guest(&home, "v", "120", "period_ms=20 region=2", &[]);
    vm.socket_ready();
    vm.wait_for(0, "tick 1", |l| l == "tick 1 ok");
    let o = home.run(&["snapshot", "create", "x", "--vm", "v"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = home.run(&["snapshot", "create", "x", "--vm", "v"]);
    usage_error(&o, "already exists");
    for bad in ["../x", ".x", "a b"] {
        let o = home.run(&["snapshot", "create", bad, "--vm", "v"]);
        usage_error(&o, "Invalid snapshot name");
    }
    let o = home.run(&["snapshot", "revert", "nope", "--vm", "v"]);
    usage_error(&o, "no snapshot named \"nope\"");
    let o = home.run(&["snapshot", "info", "nope", "--vm", "v"]);
    usage_error(&o, "no snapshot named \"nope\"");
    let o = home.run(&["snapshot", "delete", "nope", "--vm", "v"]);
    usage_error(&o, "no snapshot named \"nope\"");
    let o = home.run(&["restore", "nope", "--vm", "v", "--console", "none"]);
    usage_error(&o, "no snapshot named \"nope\"");
    // The refusals cost nothing: x is intact and the VM still reverts to it.
    vm.api_ok("PUT", "/snapshots/x/revert", None);
    let n = vm.lines().len();
    vm.wait_for(n, "ticks after the revert", |l| parse_tick(l).is_some());
    let lines = vm.lines();
    assert_eq!(vm.stop(), Some(0));
    assert!(!lines.iter().any(|l| l.contains("CORRUPT")));
}
