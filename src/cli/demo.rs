//! `rewind demo`: the main job, end to end, on the embedded test guest:
//! boot, snapshot, let the guest change, revert in place, restore a clone
//! in a new process. Every step is timed; the guest checks its own memory
//! at every tick, so "tick N ok" after a revert or restore is the guest
//! saying its memory is exactly what it was at the snapshot.

use std::time::Instant;

use crate::bench::{spawn, spawn_restore};
use rewind::child_vm::tick_of;

const PERIOD_MS: u64 = 100;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn field(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(0.0)
}

pub fn run() -> Result<i32, String> {
    let name = format!("demo-{}", std::process::id());
    println!("rewind demo: the embedded test guest checks all of its 16 MiB data region at every {PERIOD_MS} ms tick\n");

    let t = Instant::now();
    // resumed=1: a restored clone prints "resumed" the moment it runs, so
    // the restore figure is not padded by the wait for its next tick.
    let period = format!("period_ms={PERIOD_MS} region=16 resumed=1");
    let vm = spawn(
        &name,
        &[
            "run",
            "--name",
            &name,
            "--console",
            "stdio",
            "--timeout",
            "120",
            "--append",
            &period,
        ],
    )?;
    vm.next_line(|l| l == "REWIND-READY")?;
    println!(
        "1. boot      {:>8.2} ms  process start to REWIND-READY",
        ms(t)
    );

    let line = vm.next_line(|l| tick_of(l) == Some(3))?;
    let snap = vm.api_ok("PUT", "/snapshots", None, None)?;
    let snap_name = snap["name"].as_str().unwrap_or("snap-1").to_string();
    println!(
        "2. snapshot  {:>8.2} ms  '{snap_name}' after \"{line}\": live, guest paused {:.2} ms, {:.1} MiB on disk",
        field(&snap, "total_ms"),
        field(&snap, "pause_ms"),
        field(&snap, "size_bytes") / 1048576.0
    );

    let line = vm.next_line(|l| tick_of(l) == Some(6))?;
    println!(
        "3. change               the guest ran on to \"{line}\", rewriting its region every tick"
    );
    let rev = vm.api_ok("PUT", &format!("/snapshots/{snap_name}/revert"), None, None)?;
    let after = vm.next_line(|l| tick_of(l).is_some_and(|n| n <= 4) || l.contains("CORRUPT"))?;
    println!(
        "4. revert    {:>8.2} ms  in place, {} dirty pages copied back; next line: \"{after}\"",
        field(&rev, "total_ms"),
        rev["pages_copied"]
    );

    let t = Instant::now();
    let clone_name = format!("{name}-clone");
    let clone = spawn_restore(&clone_name, &snap_name, &name, "30", None)?;
    let first =
        clone.next_line(|l| l == "resumed" || tick_of(l).is_some() || l.contains("CORRUPT"))?;
    let first_ms = ms(t);
    let second = clone.next_line(|_| true)?;
    let second_ms = ms(t);
    println!(
        "5. restore   {first_ms:>8.2} ms  new process to the clone's first line \"{first}\" (printed as soon as it runs); \"{second}\" at {second_ms:.0} ms (its next timer tick)"
    );
    let clone_status = clone.stop().0;
    let vm_status = vm.stop().0;

    let ok = tick_of(&after) == Some(4)
        && first == "resumed"
        && tick_of(&second) == Some(4)
        && clone_status == Some(0)
        && vm_status == Some(0);
    // The demo leaves nothing behind (the clone's folder went with its
    // process); a failed demo keeps its VM for a look.
    let cleanup = if ok {
        match crate::vms::remove(&name) {
            Ok(_) => format!("VM {name} and its snapshot removed."),
            Err(
                crate::Failure::Usage(e) | crate::Failure::Runtime(e) | crate::Failure::Timeout(e),
            ) => {
                format!("could not remove VM {name}: {e}")
            }
        }
    } else {
        format!(
            "Look at it with: rewind snapshot list --vm {name}; remove it with: rewind rm {name}"
        )
    };
    println!(
        "\n{} {cleanup}",
        if ok {
            "All steps verified by the guest itself."
        } else {
            "SOMETHING WENT WRONG."
        }
    );
    Ok(if ok { 0 } else { 1 })
}
