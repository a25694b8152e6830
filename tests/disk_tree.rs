//! The snapshot tree with differencing disks: branches, reverts to every
//! node, deletes of interior snapshots (their disk layer is merged into
//! what depends on it), export, and kill -9 in the middle of deletes.

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn disk_tick(line: &str) -> Option<u64> {
    line.strip_prefix("tick ")?
        .strip_suffix(" disk ok")?
        .parse()
        .ok()
}

fn qemu_img(args: &[&str]) -> Option<std::process::Output> {
    host_tool("qemu-img", args)
}

fn check_all(home: &Path) {
    for vm in std::fs::read_dir(home.join("vms")).unwrap().flatten() {
        for f in std::fs::read_dir(vm.path().join("disks"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = f.path();
            // A delete killed mid-merge may leave a temp file that no image
            // references; the next delete removes it (checked below).
            if f.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            qemu_check(&p);
        }
    }
}

thread_local! {
    /// (VM, snapshot) -> the tick the snapshot holds, as `snap` read it.
    static HELD: std::cell::RefCell<std::collections::HashMap<(String, String), u64>> =
        Default::default();
}

/// The tick snapshot `name` of `vm` holds if `snap` took it, else `k`.
fn held(vm: &str, name: &str, k: u64) -> u64 {
    HELD.with(|h| h.borrow().get(&(vm.to_string(), name.to_string())).copied())
        .unwrap_or(k)
}

/// Snapshot now (just after the guest printed tick `k`, or a later one
/// if a revert before landed late); returns the index of that line. The snapshot may land a tick or more later: the tick it
/// holds is read back (by restoring it) for `revert` and `restore_ok`.
fn snap(vm: &VmProcess, from: usize, k: u64, name: &str) -> usize {
    let i = vm.wait_for(from, &format!("tick {k}"), |l| {
        disk_tick(l).is_some_and(|n| n >= k)
    });
    vm.api_ok(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": name })),
    );
    let t = snapshot_tick_in(&vm.home(), &vm.name, name);
    assert!(t >= k, "{name} holds tick {t}, taken after tick {k}");
    HELD.with(|h| {
        h.borrow_mut()
            .insert((vm.name.clone(), name.to_string()), t)
    });
    i
}

/// Reverts to `name` taken at tick `k`: the next tick line must be the one
/// after the tick it holds.
fn revert(vm: &VmProcess, name: &str, k: u64) -> usize {
    let k = held(&vm.name, name, k);
    let from = vm.lines().len();
    vm.api_ok("PUT", &format!("/snapshots/{name}/revert"), None);
    let i = vm.wait_for(from, &format!("tick after revert to {name}"), |l| {
        disk_tick(l).is_some() || l.contains("CORRUPT")
    });
    // Lines printed before the revert may still arrive: find the drop.
    let j = vm.wait_for(i, &format!("tick {} after revert to {name}", k + 1), |l| {
        disk_tick(l) == Some(k + 1) || l.contains("CORRUPT")
    });
    assert_eq!(
        vm.lines()[j],
        format!("tick {} disk ok", k + 1),
        "revert to {name}: {:?}",
        vm.lines()
    );
    j
}

fn restore_ok(home: &Home, name: &str, k: u64, clone: &str) {
    restore_ok_from(home, "t", name, k, clone)
}

fn restore_ok_from(home: &Home, vm: &str, name: &str, k: u64, clone: &str) {
    let k = held(vm, name, k);
    let o = home.run(&[
        "restore",
        name,
        "--vm",
        vm,
        "--name",
        clone,
        "--console",
        "stdio",
        "--timeout",
        "60",
        "--expect",
        &format!("^tick {} disk ok$", k + 2),
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "restore {name}: {}\n{}",
        stdout(&o),
        stderr(&o)
    );
    assert!(
        stdout(&o).starts_with(&format!("tick {} disk ok\n", k + 1)),
        "restore {name}: {}",
        stdout(&o)
    );
}

#[test]
fn tree_of_snapshots_with_branches_reverts_deletes_and_exports() {
    if !kvm_available("snapshot tree") {
        return;
    }
    let home = Home::new("tree");
    let base = home.path.join("base.img");
    std::fs::write(&base, vec![0x5Au8; 8 << 20]).unwrap();
    let base_bytes = std::fs::read(&base).unwrap();
    let vm = start_guest(
        &home,
        "t",
        "600",
        "mode=disk period_ms=150 disk_sectors=2048",
        &["--disk", base.to_str().unwrap()],
    );
    vm.socket_ready();
    // a(2) -> b(4) -> d(6) ; a(2) -> c(4)
    let i = snap(&vm, 0, 2, "a");
    let i = snap(&vm, i, 4, "b");
    let _ = i;
    let i = revert(&vm, "a", 2);
    let i = snap(&vm, i, 4, "c");
    let _ = i;
    let i = revert(&vm, "b", 4);
    let _ = snap(&vm, i, 6, "d");

    let o = home.run(&["snapshot", "list", "--tree", "--vm", "t"]);
    let tree = stdout(&o);
    let pos = |n: &str| {
        tree.lines()
            .position(|l| l.split_whitespace().any(|w| w == n || w == format!("*{n}")))
            .unwrap_or_else(|| panic!("{n} not in tree:\n{tree}"))
    };
    // Where the name starts: children are drawn right of their parent.
    let indent = |n: &str| {
        tree.lines()
            .nth(pos(n))
            .unwrap()
            .find(&format!(" {n} "))
            .unwrap()
    };
    assert!(pos("a") < pos("b") && pos("b") < pos("d"), "{tree}");
    assert!(
        indent("b") > indent("a") && indent("c") == indent("b") && indent("d") > indent("b"),
        "{tree}"
    );
    assert!(
        tree.lines().nth(pos("d")).unwrap().starts_with('*'),
        "d is the current position:\n{tree}"
    );

    // Revert to every node.
    for (name, k) in [("a", 2), ("c", 4), ("b", 4), ("d", 6)] {
        revert(&vm, name, k);
    }
    // Delete the interior b (its child d keeps its data).
    let o = home.run(&["snapshot", "delete", "b", "--vm", "t"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("1 merged into dependents, 1 removed"),
        "{}",
        stdout(&o)
    );
    revert(&vm, "d", 6);
    check_all(&home.path);
    let lines = vm.lines();
    assert_eq!(vm.stop(), Some(0));
    assert!(!lines.iter().any(|l| l.contains("CORRUPT")), "{lines:?}");

    // With the VM stopped, delete the root a: c, d and the VM's last overlay take its data.
    let o = home.run(&["snapshot", "delete", "a", "--vm", "t"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    check_all(&home.path);
    restore_ok(&home, "c", 4, "rc");
    restore_ok(&home, "d", 6, "rd");
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_bytes,
        "the base image was written"
    );

    // Export d's disk: equal to qemu-img's flattening of the same chain.
    let out = home.path.join("d.raw");
    let o = home.run(&[
        "disk",
        "export",
        "--snapshot",
        "d",
        "--vm",
        "t",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let info: serde_json::Value =
        serde_json::from_str(&stdout(&home.run(&["snapshot", "info", "d", "--vm", "t"]))).unwrap();
    let layer = PathBuf::from(info["disk_layers"][0].as_str().unwrap());
    let theirs = home.path.join("d.qemu.raw");
    if let Some(o) = qemu_img(&[
        "convert",
        "-O",
        "raw",
        layer.to_str().unwrap(),
        theirs.to_str().unwrap(),
    ]) {
        assert!(o.status.success());
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&theirs).unwrap(),
            "export differs from qemu-img convert"
        );
    }
}

#[test]
fn kill_9_during_deletes_leaves_every_listed_snapshot_usable() {
    if !kvm_available("kill during delete") {
        return;
    }
    let home = Home::new("killdel");
    let base = home.path.join("base.img");
    std::fs::write(&base, vec![0x11u8; 32 << 20]).unwrap();
    let vm = start_guest(
        &home,
        "t",
        "600",
        "mode=disk period_ms=100 disk_sectors=32768",
        &["--disk", base.to_str().unwrap()],
    );
    vm.socket_ready();
    let mut i = 0;
    let mut ks = Vec::new();
    for (n, k) in (2..=12).step_by(2).enumerate() {
        i = snap(&vm, i, k, &format!("s{n}"));
        ks.push((format!("s{n}"), k));
    }
    assert_eq!(vm.stop(), Some(0));
    // Delete interior snapshots, killing the delete at a different moment each time.
    for (round, victim) in ["s1", "s3", "s2"].iter().enumerate() {
        let mut child = home
            .cmd()
            .args(["snapshot", "delete", victim, "--vm", "t"])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2 + 15 * round as u64));
        let _ = child.kill();
        let _ = child.wait();
        check_all(&home.path);
        let listed = stdout(&home.run(&["snapshot", "list", "--vm", "t"]));
        assert!(!listed.contains("BROKEN"), "{listed}");
        for (name, k) in &ks {
            if listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name.as_str()))
            {
                restore_ok(&home, name, *k, &format!("r{round}{name}"));
            }
        }
    }
    // A delete that runs to the end also clears what killed ones left.
    let o = home.run(&["snapshot", "delete", "s4", "--vm", "t"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let temps: Vec<_> = std::fs::read_dir(home.path.join("vms/t/disks"))
        .unwrap()
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().starts_with('.'))
        .map(|f| f.file_name())
        .collect();
    assert!(temps.is_empty(), "temp files left: {temps:?}");
    check_all(&home.path);
    restore_ok(&home, "s5", 12, "rlast");
}

/// kill -9 while the creation of a snapshot with a disk is stopped at each
/// of its points (src/snapshot/stall.rs: before the pause with the new
/// overlay made, after the overlay switch, in the memory write, ...): the
/// kill lands inside for certain, every layer passes `qemu-img check`, and
/// the earlier snapshot restores exactly.
#[test]
fn kill_9_during_snapshot_create_with_a_disk_keeps_earlier_snapshots() {
    if !kvm_available("kill during create with a disk") {
        return;
    }
    let home = Home::new("killcreate");
    let base = home.path.join("base.img");
    std::fs::write(&base, vec![0x22u8; 32 << 20]).unwrap();
    for phase in rewind::snapshot::stall::PHASES {
        let name = format!("k-{phase}");
        let stall = format!("{phase}:victim");
        let vm = start_guest_env(
            &home,
            &name,
            "600",
            "mode=disk period_ms=100 disk_sectors=32768",
            &["--disk", base.to_str().unwrap()],
            &[("REWIND_TEST_STALL_AT", &stall)],
        );
        vm.socket_ready();
        snap(&vm, 0, 2, "before");
        let k = snapshot_tick(&home, &name, "before");
        kill_inside_snapshot(&home, vm, &name, phase);
        check_all(&home.path);
        let listed = stdout(&home.run(&["snapshot", "list", "--vm", &name]));
        assert!(!listed.contains("BROKEN"), "{listed}");
        restore_ok_from(&home, &name, "before", k, &format!("{name}-r"));
        let victim_listed = listed
            .lines()
            .any(|l| l.split_whitespace().next() == Some("victim"));
        assert_eq!(victim_listed, *phase == "published", "{phase}: {listed}");
        if victim_listed {
            let o = home.run(&[
                "restore",
                "victim",
                "--vm",
                &name,
                "--name",
                &format!("{name}-v"),
                "--console",
                "stdio",
                "--timeout",
                "60",
                "--expect",
                "tick [0-9]+ disk ok",
            ]);
            assert_eq!(o.status.code(), Some(0), "victim: {}", stderr(&o));
            assert!(!stdout(&o).contains("CORRUPT"), "{}", stdout(&o));
        }
    }
}
