//! Long lineages of disk snapshots stay short, on disk and in the files a VM holds open.
//! The test guest checks its own disk: every tick reads back the previous tick's pattern
//! (`tick N disk ok` or `disk CORRUPT`), so a revert or restore that shows the guest another
//! snapshot's disk layer is caught by the guest itself.

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn disk_tick(line: &str) -> Option<u64> {
    line.strip_prefix("tick ")?
        .split(' ')
        .next()?
        .parse()
        .ok()
        .filter(|_| line.ends_with(" disk ok") || line.contains("CORRUPT"))
}

fn max_tick(lines: &[String]) -> u64 {
    lines.iter().filter_map(|l| disk_tick(l)).max().unwrap_or(0)
}

/// Disk images (the base or any qcow2 layer) that process `pid` has open.
fn image_fds(pid: u32, base: &Path) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|f| std::fs::read_link(f.path()).ok())
        .filter(|t| t.extension().is_some_and(|e| e == "qcow2") || t == base)
        .count()
}

/// The snapshot's disk layer: its manifest names it relative to the snapshot directory, so the
/// VM's directory can be moved whole.
fn layer_of(home: &Home, snap: &str) -> PathBuf {
    let dir = home.path.join("vms/t/snapshots").join(snap);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let name = Path::new(m["disk_layers"][0].as_str().unwrap());
    assert_eq!(name.parent(), Some(Path::new("../../disks")), "{name:?}");
    home.path
        .join("vms/t/disks")
        .join(name.file_name().unwrap())
}

/// Reverts to `snap`, taken when the guest had printed at least tick `lo`; `stale` picks the
/// first line that can only come from after the revert (console output is one ordered stream).
/// Returns that tick, after checking that a few more ticks find the disk right.
fn revert_and_check(vm: &VmProcess, snap: &str, lo: u64, stale: impl Fn(u64) -> bool) -> u64 {
    let from = vm.lines().len();
    vm.api_ok("PUT", &format!("/snapshots/{snap}/revert"), None);
    let i = vm.wait_for(from, &format!("first tick after revert to {snap}"), |l| {
        l.contains("CORRUPT") || disk_tick(l).is_some_and(|t| !stale(t))
    });
    let line = vm.lines()[i].clone();
    let t = disk_tick(&line).unwrap();
    assert!(
        line.ends_with(" disk ok") && t > lo,
        "revert to {snap} (taken at tick >= {lo}): {line:?}"
    );
    let j = vm.wait_for(i, &format!("tick {} after revert to {snap}", t + 3), |l| {
        disk_tick(l).is_some_and(|n| n == t + 3) || l.contains("CORRUPT")
    });
    let after = &vm.lines()[i..=j];
    assert!(!after.iter().any(|l| l.contains("CORRUPT")), "{after:?}");
    t
}

/// Restores `from` (a snapshot name with `--vm`, or a bundle directory) as VM `clone`, running
/// until the test guest's first disk check.
fn restore_disk_guest(home: &Home, from: &[&str], clone: &str) -> std::process::Output {
    let mut args = vec!["restore"];
    args.extend_from_slice(from);
    args.extend_from_slice(&[
        "--name",
        clone,
        "--console",
        "stdio",
        "--timeout",
        "60",
        "--expect",
        "disk (ok|CORRUPT)",
    ]);
    home.run(&args)
}

fn restore_and_check(home: &Home, snap: &str, lo: u64, clone: &str) {
    let o = restore_disk_guest(home, &[snap, "--vm", "t"], clone);
    assert_eq!(o.status.code(), Some(0), "restore {snap}: {}", stderr(&o));
    let out = stdout(&o);
    let first = out.lines().find(|l| disk_tick(l).is_some()).unwrap_or("");
    assert!(
        first.ends_with(" disk ok") && disk_tick(first).unwrap() > lo,
        "restore {snap} (taken at tick >= {lo}): {out}"
    );
}

#[test]
fn three_hundred_snapshots_in_a_row_keep_chains_and_open_files_bounded() {
    if !kvm_available("300 disk snapshots") {
        return;
    }
    let t0 = std::time::Instant::now();
    let home = Home::new("longchain");
    let base = home.path.join("base.img");
    std::fs::write(&base, vec![0x6Bu8; 4 << 20]).unwrap();
    let vm = start_guest(
        &home,
        "t",
        "600",
        "mode=disk period_ms=20 disk_sectors=64",
        &["--mem", "32", "--disk", base.to_str().unwrap()],
    );
    vm.socket_ready();
    vm.wait_for(0, "tick 2", |l| disk_tick(l) == Some(2));
    eprintln!("booted at {:?}", t0.elapsed());
    let started = std::time::Instant::now();
    // lo[n]: a tick the guest had printed before snapshot n was asked for.
    let mut lo = Vec::new();
    let mut most_fds = 0;
    for n in 0..300 {
        lo.push(max_tick(&vm.lines()));
        vm.api_ok(
            "PUT",
            "/snapshots",
            Some(serde_json::json!({ "name": format!("s{n}") })),
        );
        most_fds = most_fds.max(image_fds(vm.pid(), &base));
    }
    eprintln!(
        "300 snapshots in {:?}, at most {most_fds} image files open",
        started.elapsed()
    );
    // A new top, the frozen layer under it and that layer's chain on disk (base included).
    let fd_bound = rewind::disk::COLLAPSE_DEPTH + 3;
    assert!(
        most_fds <= fd_bound,
        "{most_fds} image files open (bound {fd_bound})"
    );
    let mut deepest = 0;
    for n in 0..300 {
        let chain = rewind::disk::backing_chain(&layer_of(&home, &format!("s{n}"))).unwrap();
        assert_eq!(chain.last().unwrap().0, base, "s{n}");
        deepest = deepest.max(chain.len() - 1);
    }
    assert!(
        deepest <= rewind::disk::COLLAPSE_DEPTH,
        "a snapshot's chain has {deepest} qcow2 layers"
    );

    eprintln!("chains checked at {:?}", t0.elapsed());
    let hi = max_tick(&vm.lines());
    let early = revert_and_check(&vm, "s3", lo[3], |t| t > hi);
    assert!(early <= hi, "tick {early} after revert to s3, {hi} before");
    revert_and_check(&vm, "s296", lo[296], |t| t <= lo[296]);
    let lines = vm.lines();
    assert_eq!(vm.stop(), Some(0));
    assert!(!lines.iter().any(|l| l.contains("CORRUPT")), "{lines:?}");

    eprintln!("reverted at {:?}", t0.elapsed());
    restore_and_check(&home, "s3", lo[3], "r-early");
    restore_and_check(&home, "s296", lo[296], "r-late");
    eprintln!("restored at {:?}", t0.elapsed());
    for vm in ["t", "r-early", "r-late"] {
        check_vm_disks(&home.path, vm);
    }
    eprintln!("checked at {:?}", t0.elapsed());
}

#[test]
fn exported_snapshot_with_a_disk_moves_and_restores_elsewhere() {
    if !kvm_available("exported disk snapshot") {
        return;
    }
    let home = Home::new("bundle");
    let base = home.path.join("base.img");
    std::fs::write(&base, vec![0x7Eu8; 4 << 20]).unwrap();
    let vm = start_guest(
        &home,
        "t",
        "600",
        "mode=disk period_ms=30 disk_sectors=64",
        &["--mem", "32", "--disk", base.to_str().unwrap()],
    );
    vm.socket_ready();
    // Three snapshots a few ticks apart: the last one's disk is a chain of three layers.
    let mut lo = 0;
    for (n, k) in [2u64, 4, 6].into_iter().enumerate() {
        vm.wait_for(0, &format!("tick {k}"), |l| disk_tick(l) == Some(k));
        lo = max_tick(&vm.lines());
        vm.api_ok(
            "PUT",
            "/snapshots",
            Some(serde_json::json!({ "name": format!("s{n}") })),
        );
    }
    assert_eq!(vm.stop(), Some(0));

    let exported = home.path.join("out/bundle");
    let o = home.run(&[
        "snapshot",
        "export",
        "s2",
        "--vm",
        "t",
        exported.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = home.run(&[
        "snapshot",
        "export",
        "s2",
        "--vm",
        "t",
        exported.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "export onto an existing directory"
    );
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));

    // The VM's whole directory (snapshots and layers) moved to another REWIND_HOME: its
    // snapshots still restore by name there.
    let home2 = Home::new("bundle-home2");
    std::fs::create_dir_all(home2.path.join("vms")).unwrap();
    std::fs::rename(home.path.join("vms/t"), home2.path.join("vms/t")).unwrap();
    let o = restore_disk_guest(&home2, &["s1", "--vm", "t"], "r-home2");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(" disk ok") && !stdout(&o).contains("CORRUPT"),
        "{}",
        stdout(&o)
    );
    for vm in ["t", "r-home2"] {
        check_vm_disks(&home2.path, vm);
    }

    // The bundle moved to another folder, with the VM it came from (store, layers) gone.
    let moved = home.path.join("elsewhere/moved");
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    std::fs::rename(&exported, &moved).unwrap();
    std::fs::remove_dir_all(home2.path.join("vms/t")).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(&moved)
        .unwrap()
        .flatten()
        .map(|f| f.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["disk0.qcow2", "manifest.json", "memory.bin", "state.bin"]
    );
    // And a plain copy of the moved one.
    let copied = home.path.join("copied");
    std::fs::create_dir_all(&copied).unwrap();
    for f in &files {
        std::fs::copy(moved.join(f), copied.join(f)).unwrap();
    }

    for (dir, clone) in [(&moved, "r-moved"), (&copied, "r-copied")] {
        let o = restore_disk_guest(&home, &[dir.to_str().unwrap()], clone);
        assert_eq!(o.status.code(), Some(0), "{clone}: {}", stderr(&o));
        let out = stdout(&o);
        let first = out.lines().find(|l| disk_tick(l).is_some()).unwrap_or("");
        assert!(
            first.ends_with(" disk ok") && disk_tick(first).unwrap() > lo,
            "{clone} (snapshot taken at tick >= {lo}): {out}"
        );
        qemu_check(&dir.join("disk0.qcow2"));
        check_vm_disks(&home.path, clone);
        let chain = rewind::disk::backing_chain(&dir.join("disk0.qcow2")).unwrap();
        assert_eq!(chain.len(), 2, "{chain:?}");
        assert_eq!(chain[1].0, base);
    }
}
