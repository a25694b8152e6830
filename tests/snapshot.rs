//! Snapshot, revert and restore of the real test guest on /dev/kvm. The
//! guest checks its whole data region at every tick, so "tick N ok" after a
//! revert or restore is the guest itself saying its memory is exactly what
//! it was at the snapshot; any lost or mixed-up page prints CORRUPT.

mod common;
use common::*;

const PERIOD_MS: u64 = 300;

/// The tick value right after the first drop in a vCPU's sequence: where a
/// revert sent it back.
fn first_after_drop(ticks: &[u64]) -> Option<u64> {
    ticks.windows(2).find(|w| w[1] <= w[0]).map(|w| w[1])
}

fn wait_all_cpus(vm: &VmProcess, cpus: usize, from: usize, tick: u64) -> usize {
    let mut last = from;
    for cpu in 0..cpus {
        last = last.max(vm.wait_for(from, &format!("cpu{cpu} tick {tick}"), |l| {
            parse_tick(l) == Some((cpu, tick))
        }));
    }
    last
}

fn assert_clean(lines: &[String], who: &str) {
    assert!(
        !lines.iter().any(|l| l.contains("CORRUPT")),
        "{who} reported corruption:\n{}",
        lines.join("\n")
    );
}

/// Snapshot at tick K; revert in place and restore in a fresh process both
/// continue with tick K+1; a snapshot of the restored guest restores too.
fn cycle(cpus: usize, mem_mib: u64) {
    let home = Home::new(&format!("cycle{cpus}x{mem_mib}"));
    let append = format!("period_ms={PERIOD_MS} region=16");
    let (mem, ncpu) = (mem_mib.to_string(), cpus.to_string());
    let vm = VmProcess::start(
        &home,
        "orig",
        &[
            "run",
            "--name",
            "orig",
            "--console",
            "stdio",
            "--mem",
            &mem,
            "--cpus",
            &ncpu,
            "--timeout",
            "600",
            "--append",
            &append,
        ],
    );
    vm.socket_ready();
    let k = 2;
    let seen = wait_all_cpus(&vm, cpus, 0, k);
    let snap = vm.api_ok(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "s1" })),
    );
    assert_eq!(snap["name"], "s1");
    assert!(
        snap["size_bytes"].as_u64().unwrap() >= cpus as u64 * (16 << 20),
        "{snap}"
    );
    let listed = vm.api_ok("GET", "/snapshots", None);
    assert_eq!(listed["snapshots"][0]["name"], "s1", "{listed}");

    // Restore in a fresh process: the order of state restore is tested for
    // real here. Its first tick per vCPU is the one after the tick s1 holds
    // (at least k: the snapshot came after tick k, maybe a tick or more later).
    let clone = VmProcess::start(
        &home,
        "clone1",
        &[
            "restore",
            "s1",
            "--vm",
            "orig",
            "--name",
            "clone1",
            "--console",
            "stdio",
            "--timeout",
            "600",
        ],
    );
    clone.socket_ready();
    let mut held = Vec::new();
    for cpu in 0..cpus {
        let i = clone.wait_for(0, &format!("clone cpu{cpu} tick"), |l| {
            parse_tick(l).is_some_and(|(c, _)| c == cpu)
        });
        let first = parse_tick(&clone.lines()[i]).unwrap().1;
        assert!(first > k, "clone cpu{cpu}: {:?}", clone.lines());
        held.push(first - 1);
    }
    let top = *held.iter().max().unwrap();
    wait_all_cpus(&clone, cpus, 0, top + 3);

    // Revert in place goes back to the same point as the restore.
    let later = wait_all_cpus(&vm, cpus, seen, top + 3);
    let rev = vm.api_ok("PUT", "/snapshots/s1/revert", None);
    assert_eq!(
        rev["full"], false,
        "revert to the latest snapshot copies only dirty pages: {rev}"
    );
    for (cpu, &kc) in held.iter().enumerate() {
        vm.wait_for(later, &format!("cpu{cpu} back at tick {}", kc + 1), |l| {
            parse_tick(l) == Some((cpu, kc + 1))
        });
        assert_eq!(
            first_after_drop(&ticks_of(&vm.lines(), cpu)),
            Some(kc + 1),
            "cpu{cpu}: {:?}",
            vm.lines()
        );
    }

    // A snapshot of the restored guest restores too. Taken paused and the
    // clone stopped at once, every tick it printed came before s2: the last
    // one per vCPU is what s2 holds.
    clone.api_ok("PUT", "/vm/pause", None);
    clone.api_ok(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "s2" })),
    );
    let (status, clone_lines) = clone.stop_and_collect();
    assert_eq!(status, Some(0));
    let grandchild = VmProcess::start(
        &home,
        "clone2",
        &[
            "restore",
            "s2",
            "--vm",
            "clone1",
            "--name",
            "clone2",
            "--console",
            "stdio",
            "--timeout",
            "600",
        ],
    );
    for cpu in 0..cpus {
        let k2 = *ticks_of(&clone_lines, cpu).last().unwrap();
        grandchild.wait_for(0, &format!("clone2 cpu{cpu} tick {}", k2 + 2), |l| {
            parse_tick(l) == Some((cpu, k2 + 2))
        });
        assert_eq!(
            ticks_of(&grandchild.lines(), cpu).first(),
            Some(&(k2 + 1)),
            "clone2 cpu{cpu}: {:?}",
            grandchild.lines()
        );
    }
    let orig_lines = vm.lines();
    assert_eq!(vm.stop(), Some(0));
    let gc_lines = grandchild.lines();
    assert_eq!(grandchild.stop(), Some(0));
    assert_clean(&orig_lines, "original");
    assert_clean(&clone_lines, "clone");
    assert_clean(&gc_lines, "clone of clone");
}

#[test]
fn cycle_1_vcpu_256m() {
    if kvm_available("cycle_1_vcpu_256m") {
        cycle(1, 256);
    }
}

#[test]
fn cycle_4_vcpus_2g() {
    if kvm_available("cycle_4_vcpus_2g") {
        cycle(4, 2048);
    }
}

#[test]
fn revert_between_two_snapshots_uses_full_copy_and_stays_exact() {
    if !kvm_available("revert_two") {
        return;
    }
    let home = Home::new("two");
    let vm = start_guest(&home, "v", "600", &format!("period_ms={PERIOD_MS}"), &[]);
    vm.socket_ready();
    let i = vm.wait_for(0, "tick 2", |l| l == "tick 2 ok");
    vm.api_ok(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "a" })),
    );
    let i = vm.wait_for(i, "tick 4", |l| l == "tick 4 ok");
    vm.api_ok(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "b" })),
    );
    // The ticks a and b hold (a snapshot may land a tick after the line seen).
    let (ka, kb) = (
        snapshot_tick(&home, "v", "a"),
        snapshot_tick(&home, "v", "b"),
    );
    let i = vm.wait_for(i, "two ticks past b", |l| {
        parse_tick(l).is_some_and(|(_, n)| n >= kb + 2)
    });
    let r = vm.api_ok("PUT", "/snapshots/a/revert", None);
    assert_eq!(r["full"], true, "a is not the baseline any more: {r}");
    let i = vm.wait_for(i + 1, "the tick after a", |l| {
        parse_tick(l).is_some_and(|(_, n)| n <= ka + 1)
    });
    assert_eq!(vm.lines()[i], format!("tick {} ok", ka + 1));
    let i = vm.wait_for(i, "two ticks past b", |l| {
        parse_tick(l).is_some_and(|(_, n)| n >= kb + 2)
    });
    let r = vm.api_ok("PUT", "/snapshots/b/revert", None);
    assert_eq!(r["full"], true);
    let i = vm.wait_for(i + 1, "the tick after b", |l| {
        parse_tick(l).is_some_and(|(_, n)| n <= kb + 1)
    });
    assert_eq!(vm.lines()[i], format!("tick {} ok", kb + 1));
    let r = vm.api_ok("PUT", "/snapshots/b/revert", None);
    assert_eq!(r["full"], false, "b is the baseline now: {r}");
    let i = vm.wait_for(i + 1, "the tick after b again", |l| {
        parse_tick(l) == Some((0, kb + 1))
    });
    let lines = vm.lines();
    assert!(i > 0);
    assert_eq!(vm.stop(), Some(0));
    assert_clean(&lines, "guest");
}

#[test]
fn two_hundred_reverts_in_a_row_keep_the_timer_alive() {
    if !kvm_available("200_reverts") {
        return;
    }
    let home = Home::new("r200");
    let vm = start_guest(&home, "v", "600", "period_ms=20 region=4", &[]);
    vm.socket_ready();
    vm.wait_for(0, "tick 3", |l| l == "tick 3 ok");
    vm.api_ok(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "s" })),
    );
    for n in 0..200 {
        let r = vm.api("PUT", "/snapshots/s/revert", None);
        assert_eq!(r.status, 200, "revert {n}: {}", r.body);
    }
    let end = vm.lines().len();
    // The guest goes on ticking after the last revert: no hang, no lost timer.
    let i = vm.wait_for(end, "ticks after 200 reverts", |l| {
        parse_tick(l).is_some_and(|(_, n)| n >= 6)
    });
    let lines = vm.lines();
    assert!(i >= end);
    assert_eq!(vm.stop(), Some(0));
    assert_clean(&lines, "guest");
}

#[test]
fn ten_clones_at_once_all_continue() {
    if !kvm_available("ten_clones") {
        return;
    }
    let home = Home::new("clones");
    let vm = start_guest(&home, "v", "600", "period_ms=50 region=8", &[]);
    vm.socket_ready();
    vm.wait_for(0, "tick 2", |l| l == "tick 2 ok");
    // Paused, then stopped: its last tick line is the tick the snapshot holds.
    vm.api_ok("PUT", "/vm/pause", None);
    vm.api_ok(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "s" })),
    );
    let (status, lines) = vm.stop_and_collect();
    assert_eq!(status, Some(0));
    let k = *ticks_of(&lines, 0).last().unwrap();
    let expect = format!("^tick {} ok$", k + 6);
    let clones: Vec<VmProcess> = (0..10)
        .map(|i| {
            let name = format!("c{i}");
            VmProcess::start(
                &home,
                &name,
                &[
                    "restore",
                    "s",
                    "--vm",
                    "v",
                    "--name",
                    &name,
                    "--console",
                    "stdio",
                    "--timeout",
                    "120",
                    "--expect",
                    &expect,
                ],
            )
        })
        .collect();
    for c in clones {
        let name = c.name.clone();
        let (status, lines) = c.wait_exit();
        assert_eq!(status, Some(0), "{name}: {lines:?}");
        // Ticks may follow the matching line before the VM stops.
        let ticks = ticks_of(&lines, 0);
        assert_eq!(
            ticks.get(..6),
            Some(&(k + 1..=k + 6).collect::<Vec<_>>()[..]),
            "{name}"
        );
        assert!(
            ticks.windows(2).all(|w| w[1] == w[0] + 1),
            "{name}: {ticks:?}"
        );
        assert_clean(&lines, &name);
    }
}
