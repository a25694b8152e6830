//! Live and incremental snapshots on the test guest: the guest keeps
//! rewriting memory while snapshots are written, every snapshot of a chain
//! restores to exactly the memory it had, and deletes and kills inside a
//! chain lose nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::*;

fn create(vm: &VmProcess, body: serde_json::Value) -> serde_json::Value {
    vm.api_ok("PUT", "/snapshots", Some(body))
}

/// Restores `snap` of `vm` as a clone that runs until 5 ticks after its
/// snapshot's; asserts it went on from the snapshot's tick with no CORRUPT
/// line (the fill area is checked on every 4th tick, so at least once).
fn restores_cleanly(home: &Home, vm: &str, snap: &str) {
    let k = snapshot_tick(home, vm, snap);
    let clone = format!("{vm}-{snap}-check");
    let o = restore_until(&home.path, vm, snap, &clone, &format!("^tick {} ", k + 5));
    let out = stdout(&o);
    assert_eq!(
        o.status.code(),
        Some(0),
        "restore {snap}: {out}{}",
        stderr(&o)
    );
    let ticks: Vec<&str> = out.lines().filter(|l| l.starts_with("tick ")).collect();
    assert_eq!(
        ticks.first().copied(),
        Some(format!("tick {} ok", k + 1).as_str()),
        "{out}"
    );
    assert!(!out.contains("CORRUPT"), "restore {snap}: {out}");
}

fn snapshots_dir(home: &Home, vm: &str) -> PathBuf {
    home.path.join("vms").join(vm).join("snapshots")
}

/// The memory snapshot `snap` stands for, as one full layer (export
/// composes the chain into a standalone bundle).
fn composed_memory(home: &Home, vm: &str, snap: &str) -> Vec<u8> {
    let out = home.path.join(format!("export-{vm}-{snap}"));
    let _ = std::fs::remove_dir_all(&out);
    let o = home.run(&[
        "snapshot",
        "export",
        snap,
        out.to_str().unwrap(),
        "--vm",
        vm,
    ]);
    assert_eq!(o.status.code(), Some(0), "export {snap}: {}", stderr(&o));
    let bytes = std::fs::read(out.join("memory.bin")).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    bytes
}

fn same_memory(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(p) =
        (0..a.len() / 4096).find(|p| a[p * 4096..(p + 1) * 4096] != b[p * 4096..(p + 1) * 4096])
    {
        panic!("{what}: page {p:#x} differs");
    }
}

#[test]
fn live_snapshots_of_a_busy_guest_restore_and_revert_exactly() {
    if !kvm_available("live_busy") {
        return;
    }
    let home = Home::new("livebusy");
    let vm = start_guest(
        &home,
        "v",
        "300",
        "period_ms=20 region=16 fill=32",
        &["--mem", "256"],
    );
    vm.socket_ready();
    vm.wait_for(0, "tick 2", |l| l == "tick 2 ok");
    // Several in a row while the guest rewrites 16 MiB every 20 ms.
    let mut parents = vec![];
    for i in 1..=4 {
        let r = create(&vm, serde_json::json!({ "name": format!("s{i}") }));
        assert_eq!(r["live"], true, "{r}");
        parents.push(r["incremental_on"].clone());
        vm.wait_for(vm.lines().len(), "a tick", |l| parse_tick(l).is_some());
    }
    assert_eq!(
        parents,
        vec![
            serde_json::Value::Null,
            "s1".into(),
            "s2".into(),
            "s3".into()
        ]
    );
    for s in ["s1", "s3", "s4"] {
        restores_cleanly(&home, "v", s);
    }
    // In place: back into the middle of the chain, then to its top.
    for s in ["s2", "s4"] {
        let k = snapshot_tick(&home, "v", s);
        let from = vm.lines().len();
        let r = vm.api_ok("PUT", &format!("/snapshots/{s}/revert"), None);
        assert_eq!(r["name"], s);
        let i = vm.wait_for(from, "the tick after the snapshot's", |l| {
            parse_tick(l) == Some((0, k + 1))
        });
        vm.wait_for(i, "four more", |l| parse_tick(l) == Some((0, k + 5)));
    }
    // A live snapshot of a restored clone, and one on top of it.
    let clone = VmProcess::start(
        &home,
        "c",
        &[
            "restore",
            "s3",
            "--vm",
            "v",
            "--name",
            "c",
            "--console",
            "stdio",
            "--timeout",
            "300",
        ],
    );
    clone.socket_ready();
    clone.wait_for(0, "a tick", |l| parse_tick(l).is_some());
    let r = create(&clone, serde_json::json!({ "name": "c1" }));
    assert_eq!(r["incremental_on"], serde_json::Value::Null, "{r}");
    clone.wait_for(clone.lines().len(), "a tick", |l| parse_tick(l).is_some());
    let r = create(&clone, serde_json::json!({ "name": "c2" }));
    assert_eq!(r["incremental_on"], "c1", "{r}");
    restores_cleanly(&home, "c", "c2");
    // In place in the clone, whose memory maps s3's layers: reverting
    // writes into those mappings.
    let k = snapshot_tick(&home, "c", "c1");
    let from = clone.lines().len();
    clone.api_ok("PUT", "/snapshots/c1/revert", None);
    let i = clone.wait_for(from, "the tick after c1's", |l| {
        parse_tick(l) == Some((0, k + 1))
    });
    clone.wait_for(i, "four more", |l| parse_tick(l) == Some((0, k + 5)));
    let lines: Vec<String> = vm.lines().into_iter().chain(clone.lines()).collect();
    assert_eq!(clone.stop(), Some(0));
    assert_eq!(vm.stop(), Some(0));
    assert!(!lines.iter().any(|l| l.contains("CORRUPT")), "{lines:?}");
}

/// The test guest in `mode=disk` on a fresh 4 MiB raw disk, writing it
/// every 20 ms.
fn disk_guest(home: &Home, name: &str, env: &[(&str, &str)]) -> VmProcess {
    let img = home.path.join(format!("{name}.img"));
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    start_guest_env(
        home,
        name,
        "300",
        "mode=disk period_ms=20",
        &["--disk", img.to_str().unwrap()],
        env,
    )
}

#[test]
fn live_snapshots_while_the_guest_writes_its_disk() {
    if !kvm_available("live_disk") {
        return;
    }
    let home = Home::new("livedisk");
    let vm = disk_guest(&home, "d", &[]);
    vm.socket_ready();
    vm.wait_for(0, "disk tick 2", |l| l == "tick 2 disk ok");
    for i in 1..=3 {
        create(&vm, serde_json::json!({ "name": format!("d{i}") }));
        vm.wait_for(vm.lines().len(), "a disk tick", |l| first_tick(l).is_some());
    }
    for s in ["d1", "d3"] {
        let k = snapshot_tick(&home, "d", s);
        let from = vm.lines().len();
        vm.api_ok("PUT", &format!("/snapshots/{s}/revert"), None);
        let i = vm.wait_for(from, "the tick after the snapshot's", |l| {
            first_tick(l) == Some(k + 1)
        });
        vm.wait_for(i, "three more", |l| first_tick(l) == Some(k + 4));
    }
    let lines = vm.lines();
    assert_eq!(vm.stop(), Some(0));
    assert!(!lines.iter().any(|l| l.contains("CORRUPT")), "{lines:?}");
    check_vm_disks(&home.path, "d");
}

/// Ten incremental snapshots: the tenth restores to memory identical, page
/// by page, to a full snapshot taken at the same instant.
#[test]
fn a_chain_of_ten_restores_to_the_same_memory_as_a_full_snapshot() {
    if !kvm_available("chain_of_ten") {
        return;
    }
    let home = Home::new("chain10");
    let vm = start_guest(
        &home,
        "v",
        "300",
        "period_ms=20 region=2 fill=16",
        &["--mem", "128"],
    );
    vm.socket_ready();
    vm.wait_for(0, "tick 2", |l| l == "tick 2 ok");
    for i in 1..=9 {
        create(&vm, serde_json::json!({ "name": format!("s{i}") }));
        vm.wait_for(vm.lines().len(), "a tick", |l| parse_tick(l).is_some());
    }
    vm.api_ok("PUT", "/vm/pause", None);
    let r = create(&vm, serde_json::json!({ "name": "s10" }));
    assert_eq!(r["incremental_on"], "s9", "{r}");
    let r = create(&vm, serde_json::json!({ "name": "full", "full": true }));
    assert_eq!(r["incremental_on"], serde_json::Value::Null, "{r}");
    // Restored (paused, so it changes nothing), then written out whole.
    let clone = VmProcess::start(
        &home,
        "r",
        &[
            "restore",
            "s10",
            "--vm",
            "v",
            "--name",
            "r",
            "--paused",
            "--console",
            "stdio",
            "--timeout",
            "300",
        ],
    );
    clone.socket_ready();
    let r = create(
        &clone,
        serde_json::json!({ "name": "dump", "full": true, "paused": true }),
    );
    assert_eq!(r["live"], false, "{r}");
    let dump = std::fs::read(snapshots_dir(&home, "r").join("dump/memory.bin")).unwrap();
    let full = std::fs::read(snapshots_dir(&home, "v").join("full/memory.bin")).unwrap();
    same_memory(&dump, &full, "restored s10 against the full snapshot");
    // Flattened, s10 stands alone with the same memory.
    let o = home.run(&["snapshot", "flatten", "s10", "--vm", "v"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let s10 = snapshots_dir(&home, "v").join("s10");
    assert!(!s10.join("memory.delta").exists());
    let flat = std::fs::read(s10.join("memory.bin")).unwrap();
    same_memory(&flat, &full, "flattened s10 against the full snapshot");
    // The stored chain is what incremental snapshots are for: small layers.
    let info: serde_json::Value =
        serde_json::from_str(&stdout(&home.run(&["snapshot", "info", "s9", "--vm", "v"]))).unwrap();
    assert_eq!(info["memory_chain"]["depth"], 8, "{info}");
    assert!(info["memory_bytes"].as_u64().unwrap() < (4 << 20), "{info}");
    assert_eq!(clone.stop(), Some(0));
    assert_eq!(vm.stop(), Some(0));
}

/// Builds s1 (full) .. s6 (each on the one before) in VM `name`, stopped.
fn chain_of_six(home: &Home, name: &str) -> Vec<Vec<u8>> {
    let vm = start_guest(
        home,
        name,
        "300",
        "period_ms=20 region=1 fill=4",
        &["--mem", "64"],
    );
    vm.socket_ready();
    vm.wait_for(0, "tick 2", |l| l == "tick 2 ok");
    for i in 1..=6 {
        create(&vm, serde_json::json!({ "name": format!("s{i}") }));
        vm.wait_for(vm.lines().len(), "a tick", |l| parse_tick(l).is_some());
    }
    assert_eq!(vm.stop(), Some(0));
    (1..=6)
        .map(|i| composed_memory(home, name, &format!("s{i}")))
        .collect()
}

#[test]
fn deleting_chain_members_in_any_order_keeps_the_others_exact() {
    if !kvm_available("chain_delete") {
        return;
    }
    let home = Home::new("chaindel");
    let orders: [&[usize]; 3] = [&[1, 2, 3, 4, 5], &[5, 4, 3, 2, 1], &[3, 1, 5, 2, 6]];
    for (n, order) in orders.iter().enumerate() {
        let vm = format!("o{n}");
        let reference = chain_of_six(&home, &vm);
        let mut left: Vec<usize> = (1..=6).collect();
        for &gone in order.iter() {
            let o = home.run(&["snapshot", "delete", &format!("s{gone}"), "--vm", &vm]);
            assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
            left.retain(|&i| i != gone);
            for &i in &left {
                let now = composed_memory(&home, &vm, &format!("s{i}"));
                same_memory(
                    &now,
                    &reference[i - 1],
                    &format!("{vm}: s{i} after deleting s{gone}"),
                );
            }
        }
        restores_cleanly(&home, &vm, &format!("s{}", left[0]));
        // Nothing is left of the deleted ones.
        let names: Vec<String> = files_in(&snapshots_dir(&home, &vm))
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let want: Vec<String> = left.iter().map(|i| format!("s{i}")).collect();
        assert_eq!(names, want);
    }
}

/// kill -9 of `rewind snapshot delete` inside a memory-layer merge: every
/// snapshot is still listed and restores to the memory it had.
#[test]
fn kill_9_during_a_memory_merge_loses_nothing() {
    if !kvm_available("kill_merge") {
        return;
    }
    let home = Home::new("killmerge");
    let reference = chain_of_six(&home, "k");
    // (snapshot deleted, child rewritten, phase): a delta parent merged into
    // its child, and the full base flattened into its child, at each step.
    let cases = [
        ("s3", "s4", "merge-written"),
        ("s1", "s2", "flatten-written"),
        ("s2", "s4", "flatten-renamed"),
    ];
    for (victim, child, phase) in cases {
        let stall = format!("{phase}:{child}");
        let mut proc = home
            .cmd()
            .env("REWIND_TEST_STALL_AT", &stall)
            .args(["snapshot", "delete", victim, "--vm", "k"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let marker = home.path.join(format!("stalled-at-{phase}"));
        wait_for_path(&marker, &format!("the stall at {phase}"));
        proc.kill().unwrap();
        proc.wait().unwrap();
        std::fs::remove_file(&marker).unwrap();
        let dir = snapshots_dir(&home, "k");
        assert!(
            dir.join(victim).is_dir(),
            "{phase}: {victim} went although the delete was killed"
        );
        for i in 1..=6 {
            let s = format!("s{i}");
            if dir.join(&s).is_dir() {
                same_memory(
                    &composed_memory(&home, "k", &s),
                    &reference[i - 1],
                    &format!("{phase}: {s}"),
                );
            }
        }
        // The delete, run again, finishes.
        let o = home.run(&["snapshot", "delete", victim, "--vm", "k"]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        same_memory(
            &composed_memory(&home, "k", child),
            &reference[child[1..].parse::<usize>().unwrap() - 1],
            child,
        );
    }
    restores_cleanly(&home, "k", "s6");
}

/// A live snapshot whose memory writer dies fails, the VM runs on, and the
/// pages it had taken from the dirty log go into the next snapshot.
#[test]
fn a_failed_live_snapshot_loses_no_dirty_pages() {
    if !kvm_available("failed_live") {
        return;
    }
    let home = Home::new("failedlive");
    let vm = start_guest_env(
        &home,
        "f",
        "300",
        "period_ms=20 region=4",
        &[],
        &[("REWIND_TEST_STALL_AT", "memory-write-started:victim")],
    );
    vm.socket_ready();
    vm.wait_for(0, "tick 2", |l| l == "tick 2 ok");
    create(&vm, serde_json::json!({ "name": "base" }));
    vm.wait_for(vm.lines().len(), "ticks after base", |l| {
        parse_tick(l).is_some_and(|t| t.1 > 5)
    });
    // Paused from here: nothing dirties a page again, so only what the
    // failed snapshot took from the log can carry the changes since base.
    vm.api_ok("PUT", "/vm/pause", None);
    let snapper = snapshot_in_background(&home, "f", "victim");
    let marker = home.path.join("stalled-at-memory-write-started");
    wait_for_path(&marker, "the memory writer's stall");
    let writer = children_of(vm.pid());
    assert_eq!(writer.len(), 1, "one forked memory writer: {writer:?}");
    // SAFETY: kill(2) of the forked writer, a child of our child.
    unsafe { libc::kill(writer[0], libc::SIGKILL) };
    assert!(
        !snapper.join().unwrap(),
        "the snapshot succeeded without its writer"
    );
    assert!(!snapshots_dir(&home, "f").join("victim").exists());
    let r = create(&vm, serde_json::json!({ "name": "after" }));
    assert_eq!(r["incremental_on"], "base", "{r}");
    vm.api_ok("PUT", "/vm/resume", None);
    vm.wait_for(vm.lines().len(), "a tick after resuming", |l| {
        parse_tick(l).is_some()
    });
    restores_cleanly(&home, "f", "after");
    assert_eq!(vm.stop(), Some(0));
}

fn children_of(pid: u32) -> Vec<i32> {
    let task = PathBuf::from(format!("/proc/{pid}/task"));
    files_in(&task)
        .iter()
        .flat_map(|t| {
            std::fs::read_to_string(Path::new(t).join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .map(|p| p.parse().unwrap())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// While a live snapshot's memory writer runs, the VMM goes on serving the
/// guest's disk and the API: the writer is held (a test stall) and the
/// guest's disk ticks and a GET /vm must still complete. Killing the writer
/// then fails that snapshot only; the VM and its disk run on.
#[test]
fn the_vm_keeps_its_disk_and_api_while_memory_is_written() {
    if !kvm_available("disk_during_write") {
        return;
    }
    let home = Home::new("diskwrite");
    let vm = disk_guest(
        &home,
        "w",
        &[("REWIND_TEST_STALL_AT", "memory-write-started:held")],
    );
    vm.socket_ready();
    vm.wait_for(0, "disk tick 2", |l| l == "tick 2 disk ok");
    let snapper = snapshot_in_background(&home, "w", "held");
    wait_for_path(
        &home.path.join("stalled-at-memory-write-started"),
        "the memory writer's stall",
    );
    let writer = children_of(vm.pid());
    assert_eq!(writer.len(), 1, "one forked memory writer: {writer:?}");
    let from = vm.lines().len();
    let first = vm.wait_for(from, "a disk tick with the writer held", |l| {
        first_tick(l).is_some()
    });
    let t = first_tick(&vm.lines()[first]).unwrap();
    vm.wait_for(first, "three more disk ticks with the writer held", |l| {
        first_tick(l).is_some_and(|n| n >= t + 3)
    });
    let info = vm.api_ok("GET", "/vm", None);
    assert_eq!(info["state"], "running", "{info}");
    assert!(
        !snapper.is_finished(),
        "the snapshot ended with its writer held"
    );
    // SAFETY: kill(2) of the forked writer, a child of our child.
    unsafe { libc::kill(writer[0], libc::SIGKILL) };
    assert!(
        !snapper.join().unwrap(),
        "the snapshot succeeded without its writer"
    );
    assert!(!snapshots_dir(&home, "w").join("held").exists());
    create(&vm, serde_json::json!({ "name": "after" }));
    let from = vm.lines().len();
    vm.wait_for(from, "a disk tick after", |l| first_tick(l).is_some());
    let lines = vm.lines();
    assert_eq!(vm.stop(), Some(0));
    assert!(!lines.iter().any(|l| l.contains("CORRUPT")), "{lines:?}");
    check_vm_disks(&home.path, "w");
}
