//! Broken snapshot bundles: one clear line, no panic, and the original
//! snapshot stays usable.

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Snapshot "good" taken while the guest is paused, then the VM stopped:
/// every tick line it printed came before the snapshot, so the last one
/// is the tick the snapshot holds. Returns the bundle and that tick.
fn take_snapshot(home: &Home) -> (PathBuf, u64) {
    let vm = VmProcess::start(
        home,
        "v",
        &[
            "run",
            "--name",
            "v",
            "--console",
            "stdio",
            "--timeout",
            "120",
            "--append",
            "period_ms=20 region=2",
        ],
    );
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

fn restore_fails(home: &Home, dir: &Path, needle: &str) {
    let o = home.run(&[
        "restore",
        dir.to_str().unwrap(),
        "--name",
        "r",
        "--console",
        "none",
        "--timeout",
        "10",
    ]);
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        matches!(o.status.code(), Some(1) | Some(2)),
        "status {:?}: {err}",
        o.status
    );
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.contains("PVM host") && !l.contains("VM name"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(needle), "{needle:?} not in: {err}");
}

fn mutate(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    f(&mut bytes);
    std::fs::write(path, bytes).unwrap();
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
    let vm = VmProcess::start(
        &home,
        "v",
        &[
            "run",
            "--name",
            "v",
            "--console",
            "stdio",
            "--timeout",
            "120",
            "--append",
            "period_ms=20 region=2",
        ],
    );
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
        let vm = VmProcess::start_env(
            &home,
            &name,
            &[
                "run",
                "--name",
                &name,
                "--console",
                "stdio",
                "--timeout",
                "300",
                "--append",
                "period_ms=50 region=8",
            ],
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
        let snapper = snapshot_in_background(&home, &name, "victim");
        let marker = home.path.join(format!("stalled-at-{phase}"));
        wait_for_path(&marker, &format!("the stall at {phase}"));
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(vm.pid() as i32, libc::SIGKILL) };
        let _ = vm.wait_exit();
        assert!(
            !snapper.join().unwrap(),
            "{phase}: the snapshot finished although rewind was killed inside it"
        );
        std::fs::remove_file(&marker).unwrap();
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
    let vm = VmProcess::start(
        &small_home,
        "v",
        &[
            "run",
            "--name",
            "v",
            "--console",
            "stdio",
            "--timeout",
            "120",
            "--append",
            "period_ms=20 region=1",
        ],
    );
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

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    f(&mut m);
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

/// A CPU feature this host's KVM does not offer, as (leaf, subleaf,
/// register, bit, the name rewind gives it): a named one if the host lacks
/// one of these, else a reserved bit no CPU has.
fn feature_this_host_lacks() -> (u32, u32, &'static str, u32, String) {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    let pick = |reg: &str, (a, b, c, d): (u32, u32, u32, u32)| match reg {
        "eax" => a,
        "ebx" => b,
        "ecx" => c,
        _ => d,
    };
    // On PVM the CPU's own CPUID counts too (see host_features in
    // src/snapshot/state.rs).
    let has = |leaf: u32, sub: u32, reg: &str, bit: u32| {
        let raw = std::arch::x86_64::__cpuid_count(leaf, sub);
        let raw = (raw.eax, raw.ebx, raw.ecx, raw.edx);
        (is_pvm_host() && pick(reg, raw) & (1 << bit) != 0)
            || cpuid.as_slice().iter().any(|e| {
                e.function == leaf
                    && e.index == sub
                    && pick(reg, (e.eax, e.ebx, e.ecx, e.edx)) & (1 << bit) != 0
            })
    };
    let named = [
        (0xd, 1, "eax", 3, "xsaves"),
        (0xd, 1, "eax", 1, "xsavec"),
        (7, 0, "edx", 24, "amx-tile"),
        (7, 0, "ebx", 16, "avx512f"),
    ];
    for (leaf, sub, reg, bit, name) in named {
        if !has(leaf, sub, reg, bit) {
            return (leaf, sub, reg, bit, name.to_string());
        }
    }
    (0xd, 1, "eax", 31, "cpuid 0xd.1 eax bit 31".to_string())
}

/// Makes the manifest claim the guest was given `feature`.
fn claim_feature(m: &mut serde_json::Value, (leaf, sub, reg, bit): (u32, u32, &str, u32)) {
    let features = m["host"]["cpu_features"].as_array_mut().unwrap();
    let i = match features
        .iter()
        .position(|f| f["leaf"] == leaf && f["subleaf"] == sub)
    {
        Some(i) => i,
        None => {
            features.push(serde_json::json!({
                "leaf": leaf, "subleaf": sub, "eax": 0, "ebx": 0, "ecx": 0, "edx": 0
            }));
            features.len() - 1
        }
    };
    let v = features[i][reg].as_u64().unwrap() | (1 << bit);
    features[i][reg] = v.into();
}

/// A host kind rewind refuses to restore a snapshot from, here.
fn other_host_kind() -> &'static str {
    if is_pvm_host() {
        "hardware"
    } else {
        "some-future-kind"
    }
}

/// The revert is refused with one line naming `needle`, and the VM runs on
/// untouched: not paused, not reverted (its ticks keep counting up).
fn revert_refused(vm: &VmProcess, name: &str, needle: &str) {
    let before = vm.lines();
    let last = before
        .iter()
        .filter_map(|l| parse_tick(l))
        .map(|t| t.1)
        .max();
    let r = vm.api("PUT", &format!("/snapshots/{name}/revert"), None);
    assert_ne!(r.status, 200, "revert {name} was not refused: {}", r.body);
    let err = r.body["error"].as_str().unwrap_or_default().to_string();
    assert!(
        err.contains(needle),
        "revert {name}: {needle:?} not in {err:?}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(vm.api_ok("GET", "/vm", None)["state"], "running");
    let i = vm.wait_for(before.len(), "a tick after the refused revert", |l| {
        parse_tick(l).is_some()
    });
    let next = parse_tick(&vm.lines()[i]).unwrap().1;
    assert!(
        Some(next) > last,
        "revert {name}: the guest went back to tick {next} after {last:?}"
    );
}

#[test]
fn damaged_bundles_are_refused_by_revert_and_the_vm_runs_on() {
    if !kvm_available("damaged_bundles_revert") {
        return;
    }
    let home = Home::new("badrevert");
    let vm = VmProcess::start(
        &home,
        "v",
        &[
            "run",
            "--name",
            "v",
            "--console",
            "stdio",
            "--timeout",
            "300",
            "--append",
            "period_ms=20 region=2",
        ],
    );
    vm.socket_ready();
    vm.wait_for(0, "tick 2", |l| l == "tick 2 ok");
    let snap = |name: &str| {
        vm.api_ok(
            "PUT",
            "/snapshots",
            Some(serde_json::json!({ "name": name })),
        )
    };
    snap("good");
    let k = snapshot_tick(&home, "v", "good");
    let snaps = home.path.join("vms/v/snapshots");

    // The latest snapshot is the baseline a fast revert copies dirty pages
    // from: truncated, it once left the VM paused and half reverted.
    snap("latest");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(snaps.join("latest/memory.bin"))
        .unwrap();
    f.set_len(f.metadata().unwrap().len() / 2).unwrap();
    revert_refused(&vm, "latest", "memory.bin is");

    let variant = |name: &str| {
        let d = snaps.join(name);
        copy_dir(&snaps.join("good"), &d);
        d
    };
    let d = variant("short-memory");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("memory.bin"))
        .unwrap();
    f.set_len(1 << 20).unwrap();
    revert_refused(&vm, "short-memory", "memory.bin is");

    let d = variant("bad-state");
    mutate(&d.join("state.bin"), |b| {
        let n = b.len();
        b[n - 10] ^= 0x55
    });
    revert_refused(&vm, "bad-state", "checksum");

    let d = variant("bad-crc");
    edit_manifest(&d, |m| {
        m["state_crc64"] = (m["state_crc64"].as_u64().unwrap() ^ 1).into()
    });
    revert_refused(&vm, "bad-crc", "state_crc64");
    restore_fails(&home, &d, "state_crc64");

    let d = variant("bad-memlen");
    edit_manifest(&d, |m| {
        m["memory_file_len"] = (m["memory_file_len"].as_u64().unwrap() + 4096).into()
    });
    revert_refused(&vm, "bad-memlen", "memory_file_len");

    let (leaf, sub, reg, bit, feature) = feature_this_host_lacks();
    eprintln!("claiming {feature}, which this host lacks");
    let d = variant("cpu");
    edit_manifest(&d, |m| claim_feature(m, (leaf, sub, reg, bit)));
    revert_refused(&vm, "cpu", &format!("lacks: {feature}"));
    restore_fails(&home, &d, &format!("lacks: {feature}"));

    let d = variant("host-kind");
    edit_manifest(&d, |m| m["host"]["kind"] = other_host_kind().into());
    revert_refused(&vm, "host-kind", other_host_kind());
    restore_fails(&home, &d, other_host_kind());

    // After all that, a good snapshot still reverts, exactly.
    let from = vm.lines().len();
    vm.api_ok("PUT", "/snapshots/good/revert", None);
    let i = vm.wait_for(from, &format!("tick {} after the revert", k + 1), |l| {
        parse_tick(l) == Some((0, k + 1))
    });
    vm.wait_for(i, "the tick after", |l| parse_tick(l) == Some((0, k + 2)));
    let lines = vm.lines();
    assert_eq!(vm.stop(), Some(0));
    assert!(!lines.iter().any(|l| l.contains("CORRUPT")), "{lines:?}");
}
