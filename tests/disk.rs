//! Disks through qcow2 overlays and virtio-blk, checked by the test guest's
//! own ring-3 driver: every tick it reads back the previous tick's pattern
//! from its disk and writes the next (`tick N disk ok` or CORRUPT).

mod common;
use common::*;
use std::path::Path;

fn disk_tick(line: &str) -> Option<u64> {
    line.strip_prefix("tick ")?
        .strip_suffix(" disk ok")?
        .parse()
        .ok()
}

fn qemu_img(args: &[&str]) -> Option<String> {
    let o = host_tool("qemu-img", args)?;
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Some(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn check_all_overlays(home: &Home) {
    for vm in std::fs::read_dir(home.path.join("vms")).unwrap().flatten() {
        for f in std::fs::read_dir(vm.path().join("disks"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = f.path();
            if p.extension().is_some_and(|e| e == "qcow2") {
                qemu_img(&["check", p.to_str().unwrap()]);
            }
        }
    }
}

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn disk_follows_snapshot_revert_restore_and_the_base_is_never_written() {
    if !kvm_available("disk cycle") {
        return;
    }
    let home = Home::new("disk");
    let base = home.path.join("base.img");
    // A base with known, non-zero contents, so reads through the overlay are real.
    std::fs::write(&base, vec![0xA5u8; 8 << 20]).unwrap();
    let before = sha(&base);
    let b = base.to_str().unwrap();
    let vm = start_guest(
        &home,
        "d",
        "300",
        "mode=disk period_ms=200 disk_sectors=512",
        &["--disk", b],
    );
    vm.socket_ready();
    vm.wait_for(0, "disk id", |l| l == "disk id rewind-disk0");
    let i = vm.wait_for(0, "tick 2", |l| disk_tick(l) == Some(2));
    vm.api_ok(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "s" })),
    );
    // The tick s holds: the snapshot may land a tick after the line seen.
    let k = snapshot_tick(&home, "d", "s");
    let i = vm.wait_for(i, "three ticks past s", |l| disk_tick(l) == Some(k + 3));
    let r = vm.api_ok("PUT", "/snapshots/s/revert", None);
    assert_eq!(r["full"], false);
    let j = vm.wait_for(i + 1, "back at the tick after s", |l| {
        disk_tick(l).is_some_and(|n| n <= k + 1) || l.contains("CORRUPT")
    });
    assert_eq!(
        vm.lines()[j],
        format!("tick {} disk ok", k + 1),
        "{:?}",
        vm.lines()
    );
    vm.wait_for(j, "two ticks after revert", |l| disk_tick(l) == Some(k + 2));
    let orig = vm.lines();
    assert_eq!(vm.stop(), Some(0));

    // Two clones of the snapshot, each with its own overlay. c0 runs until
    // stopped, so its overlay can be looked at while it runs.
    let expect = format!("^tick {} disk ok$", k + 3);
    let clones: Vec<VmProcess> = (0..2)
        .map(|i| {
            let name = format!("c{i}");
            let mut args = vec![
                "restore",
                "s",
                "--vm",
                "d",
                "--name",
                &name,
                "--console",
                "stdio",
                "--timeout",
                "120",
            ];
            if i == 1 {
                args.extend(["--expect", &expect]);
            }
            VmProcess::start(&home, &name, &args)
        })
        .collect();
    let mut live = None;
    for c in clones {
        let name = c.name.clone();
        let (status, lines) = if name == "c0" {
            c.socket_ready();
            c.wait_for(0, "three ticks", |l| disk_tick(l) == Some(k + 3));
            let disks = c.api_ok("GET", "/vm", None)["disks"].clone();
            live = disks[0].as_str().map(std::path::PathBuf::from);
            let overlays: Vec<_> = std::fs::read_dir(home.path.join("vms/c0/disks"))
                .unwrap()
                .flatten()
                .collect();
            assert_eq!(overlays.len(), 1, "the clone has one overlay of its own");
            qemu_img(&["check", overlays[0].path().to_str().unwrap()]);
            if let Some(info) = qemu_img(&[
                "info",
                "--backing-chain",
                overlays[0].path().to_str().unwrap(),
            ]) {
                assert!(
                    info.contains(&format!("backing file: {}", base.display())),
                    "{info}"
                );
                assert!(info.contains("vms/d/disks/disk0-"), "{info}");
            }
            let status = c.stop();
            (status, Vec::new())
        } else {
            c.wait_exit()
        };
        assert_eq!(status, Some(0), "{name}: {lines:?}");
        let ticks: Vec<u64> = lines.iter().filter_map(|l| disk_tick(l)).collect();
        if name != "c0" {
            // Ticks may follow the matching line before the VM stops.
            assert_eq!(
                ticks.get(..3),
                Some(&[k + 1, k + 2, k + 3][..]),
                "{name}: {lines:?}"
            );
        }
    }
    assert!(!orig.iter().any(|l| l.contains("CORRUPT")), "{orig:?}");
    assert_eq!(sha(&base), before, "the base image was written");
    check_all_overlays(&home);
    // The overlay c0 wrote to last is its disk as it left it.
    let live = live.expect("c0 has a disk");
    assert!(live.exists(), "c0's disk is gone");
    // A changed or missing base is refused with one clear line naming it.
    std::fs::write(&base, vec![0u8; 4 << 20]).unwrap();
    let o = home.run(&[
        "restore",
        "s",
        "--vm",
        "d",
        "--name",
        "bad",
        "--console",
        "none",
        "--timeout",
        "10",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&base.display().to_string()) && stderr(&o).contains("changed"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_file(&base).unwrap();
    let o = home.run(&[
        "restore",
        "s",
        "--vm",
        "d",
        "--name",
        "bad2",
        "--console",
        "none",
        "--timeout",
        "10",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("is missing"), "{}", stderr(&o));
}

#[test]
fn qcow2_base_and_missing_disk() {
    if !kvm_available("qcow2 base") {
        return;
    }
    let home = Home::new("qbase");
    let base = home.path.join("base.qcow2");
    if qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "16M"]).is_none() {
        return;
    }
    let o = home.run(&[
        "run",
        "--disk",
        base.to_str().unwrap(),
        "--console",
        "stdio",
        "--timeout",
        "60",
        "--append",
        "mode=disk period_ms=20 exit_after=3",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("tick 3 disk ok"), "{}", stdout(&o));
    qemu_img(&["check", base.to_str().unwrap()]);
    let o = home.run(&[
        "run",
        "--disk",
        "/nonexistent/disk.img",
        "--console",
        "none",
        "--timeout",
        "10",
    ]);
    assert!(
        matches!(o.status.code(), Some(1) | Some(2)),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("/nonexistent/disk.img"),
        "{}",
        stderr(&o)
    );
}

/// `rewind ARGS` started in `cwd` with `REWIND_HOME` exactly as given (maybe relative).
fn rewind_in(cwd: &Path, home: &str, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(BIN);
    c.current_dir(cwd)
        .env("REWIND_HOME", home)
        .args(args)
        .stdin(std::process::Stdio::null());
    c
}

/// Polls the console file until the guest has printed disk tick `k` (or `vm` ended).
fn wait_console(path: &Path, k: u64, vm: &mut std::process::Child) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let want = format!("tick {k} disk ok");
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        assert!(!text.contains("CORRUPT"), "{text}");
        if text.lines().any(|l| l == want) {
            return;
        }
        if let Some(status) = vm.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(vm.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the VM ended ({status}) before {want:?}: {err}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {want:?} in {}: {text}",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Boots the test guest in disk mode with `disk` as typed, from `cwd`, snapshots it after tick 2,
/// stops it and restores the snapshot in a new process: its disk ticks must go on.
fn boot_snapshot_restore(cwd: &Path, home: &str, abs_home: &Path, disk: &str) {
    let console = cwd.join("console.txt");
    let mut vm = rewind_in(
        cwd,
        home,
        &[
            "run",
            "--name",
            "r",
            "--disk",
            disk,
            "--console",
            console.to_str().unwrap(),
            "--timeout",
            "120",
            "--append",
            "mode=disk period_ms=50 disk_sectors=64",
        ],
    )
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    wait_console(&console, 2, &mut vm);
    let o = rewind_in(cwd, home, &["snapshot", "create", "s", "--vm", "r"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "snapshot: {}", stderr(&o));
    let o = rewind_in(cwd, home, &["stop", "--vm", "r"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "stop: {}", stderr(&o));
    let out = vm.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let o = rewind_in(
        cwd,
        home,
        &[
            "restore",
            "s",
            "--vm",
            "r",
            "--name",
            "r2",
            "--console",
            "stdio",
            "--timeout",
            "60",
            "--expect",
            "disk (ok|CORRUPT)",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "restore: {}", stderr(&o));
    assert!(
        stdout(&o).contains(" disk ok") && !stdout(&o).contains("CORRUPT"),
        "{}",
        stdout(&o)
    );
    // Every file rewind wrote names its backing file by an absolute path
    // or a name in its own directory, so it is valid from any cwd.
    for vm in ["r", "r2"] {
        check_vm_disks(abs_home, vm);
    }
}

#[test]
fn relative_disk_path_boots_snapshots_and_restores() {
    if !kvm_available("relative --disk") {
        return;
    }
    let home = Home::new("reldisk");
    let cwd = home.path.join("work");
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::write(cwd.join("base.img"), vec![0x3Cu8; 4 << 20]).unwrap();
    boot_snapshot_restore(&cwd, home.path.to_str().unwrap(), &home.path, "base.img");
}

#[test]
fn relative_rewind_home_keeps_disk_snapshots_working() {
    if !kvm_available("relative REWIND_HOME") {
        return;
    }
    let home = Home::new("relhome");
    let base = home.path.join("base.img");
    std::fs::write(&base, vec![0x4Du8; 4 << 20]).unwrap();
    boot_snapshot_restore(
        &home.path,
        "state",
        &home.path.join("state"),
        base.to_str().unwrap(),
    );
}
