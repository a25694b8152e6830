//! `rewind bench soak`: many VMs restored from one snapshot at once, each
//! rewriting its memory and disk (the test guest's mode=disk checks the
//! previous tick's pattern on every tick and writes the next), snapshotted,
//! reverted to that snapshot and the snapshot deleted, over and over. Not a
//! test (it runs for minutes); a report of what long use does to rewind:
//! operations done, open fds and RSS per VM at start and end, files left in
//! the VMs' folders, CORRUPT lines (must be 0) and operations that took more
//! than 10 times their kind's median.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rewind::child_vm::ChildVm;

use super::bench::{median, spawn, spawn_restore};

const BASE: &str = "soak-base";
const OPS: [&str; 3] = ["snapshot", "revert", "delete"];

/// One VM's resources, from /proc.
#[derive(Clone, Copy, Default)]
struct Usage {
    fds: usize,
    rss_kib: u64,
}

fn usage(pid: u32) -> Usage {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    Usage { fds, rss_kib }
}

/// One operation: which VM, which kind, how long.
struct Op {
    vm: usize,
    kind: usize,
    ms: f64,
}

fn disk_tick(line: &str) -> bool {
    line.starts_with("tick ") && line.contains(" disk ")
}

/// Snapshot, revert, delete until `until`; every op is recorded.
fn churn(i: usize, vm: &ChildVm, until: Instant, ops: &Mutex<Vec<Op>>) -> Result<(), String> {
    let mut k = 0u64;
    while Instant::now() < until {
        k += 1;
        let name = format!("k{k}");
        let steps: [(&str, String, Option<serde_json::Value>); 3] = [
            (
                "PUT",
                "/snapshots".to_string(),
                Some(serde_json::json!({ "name": name })),
            ),
            ("PUT", format!("/snapshots/{name}/revert"), None),
            ("DELETE", format!("/snapshots/{name}"), None),
        ];
        for (kind, (method, path, body)) in steps.iter().enumerate() {
            // A tick between operations: the guest rewrote memory and disk.
            vm.next_line(disk_tick)?;
            let t = Instant::now();
            vm.api_ok(method, path, body.as_ref(), Some(Duration::from_secs(300)))?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            ops.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Op { vm: i, kind, ms });
        }
    }
    Ok(())
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap_or(&p).to_path_buf());
            }
        }
    }
    out.sort();
    out
}

pub fn soak(home: &Path, vms: usize, minutes: f64) -> Result<(), String> {
    let base_disk = home.join("soak-base.raw");
    std::fs::write(&base_disk, vec![0u8; 1 << 20])
        .map_err(|e| format!("cannot write {}: {e}", base_disk.display()))?;
    let disk = base_disk.display().to_string();
    let guest = [
        "--mem",
        "64",
        "--disk",
        &disk,
        "--console",
        "stdio",
        "--append",
        "mode=disk period_ms=20 disk_sectors=64",
    ];
    let mut args = vec!["run", "--name", BASE, "--timeout", "600"];
    args.extend_from_slice(&guest);
    let base = spawn(BASE, &args)?;
    base.next_line(disk_tick)?;
    base.api_ok(
        "PUT",
        "/snapshots",
        Some(&serde_json::json!({ "name": "golden" })),
        None,
    )?;
    base.stop();

    let secs = (minutes * 60.0).ceil() as u64;
    let limit = (secs + 600).to_string();
    let started = Instant::now();
    let mut clones = Vec::new();
    for i in 0..vms {
        let name = format!("soak-{i}");
        let c = spawn_restore(&name, "golden", BASE, &limit, None)?;
        clones.push(c);
    }
    let mut start = Vec::new();
    for c in &clones {
        c.next_line(disk_tick)?;
        start.push(usage(c.pid()));
    }
    println!(
        "soak: {vms} VMs restored from one snapshot in {:.1} s; churning for {minutes} min",
        started.elapsed().as_secs_f64()
    );

    let until = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let ops = Arc::new(Mutex::new(Vec::new()));
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = clones
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let ops = ops.clone();
                s.spawn(move || churn(i, c, until, &ops).map_err(|e| format!("VM soak-{i}: {e}")))
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a worker panicked".into()))
                    .err()
            })
            .collect()
    });
    let end: Vec<Usage> = clones.iter().map(|c| usage(c.pid())).collect();
    let mut corrupt = 0;
    let mut left = Vec::new();
    for (i, c) in clones.into_iter().enumerate() {
        let (_, lines) = c.stop();
        corrupt += lines
            .iter()
            .filter(|l| l.contains("CORRUPT") || l.starts_with("DISK-"))
            .inspect(|l| println!("soak-{i}: {l}"))
            .count();
        // Once stopped, a VM's folder keeps its last overlay only (README:
        // Disks); snapshots were all deleted.
        let dir = home.join("vms").join(format!("soak-{i}"));
        let files = files_under(&dir);
        let overlays = files
            .iter()
            .filter(|f| f.starts_with("disks") && f.extension().is_some_and(|e| e == "qcow2"))
            .count();
        left.push((files.len(), overlays, files));
    }

    let ops = std::mem::take(&mut *ops.lock().unwrap_or_else(|e| e.into_inner()));
    report(&ops, &start, &end, &left, corrupt);
    if !failures.is_empty() {
        return Err(failures.join("; "));
    }
    if corrupt > 0 {
        return Err(format!("{corrupt} CORRUPT lines"));
    }
    Ok(())
}

fn report(
    ops: &[Op],
    start: &[Usage],
    end: &[Usage],
    left: &[(usize, usize, Vec<PathBuf>)],
    corrupt: usize,
) {
    let mut medians = [0.0; 3];
    for (kind, name) in OPS.iter().enumerate() {
        let ms: Vec<f64> = ops
            .iter()
            .filter(|o| o.kind == kind)
            .map(|o| o.ms)
            .collect();
        let n = ms.len();
        let max = ms.iter().copied().fold(0.0, f64::max);
        // In the order they finished: a drift from the first tenth to the
        // last shows a cost that grows with use.
        let tenth = (n / 10).clamp(1, n.max(1));
        let first = median(ms.iter().take(tenth).copied().collect());
        let last = median(ms.iter().skip(n.saturating_sub(tenth)).copied().collect());
        medians[kind] = median(ms);
        println!(
            "soak: {name:<8} {n:>6} done, median {:>8.2} ms (first tenth {first:.2}, last tenth {last:.2}), max {max:>8.2} ms",
            medians[kind]
        );
    }
    for (i, (s, e)) in start.iter().zip(end).enumerate() {
        let (files, overlays, ref names) = left[i];
        println!(
            "soak: soak-{i:<3} fds {:>3} -> {:>3}  RSS {:>6.1} -> {:>6.1} MiB  files left {files} ({overlays} overlay){}",
            s.fds,
            e.fds,
            s.rss_kib as f64 / 1024.0,
            e.rss_kib as f64 / 1024.0,
            if files > overlays {
                format!(": {names:?}")
            } else {
                String::new()
            }
        );
    }
    let slow: Vec<&Op> = ops
        .iter()
        .filter(|o| o.ms > 10.0 * medians[o.kind])
        .collect();
    println!("soak: CORRUPT lines: {corrupt}");
    println!(
        "soak: operations slower than 10x their median: {}",
        slow.len()
    );
    for o in slow {
        println!(
            "soak:   soak-{} {} {:.2} ms ({:.1}x median)",
            o.vm,
            OPS[o.kind],
            o.ms,
            o.ms / medians[o.kind]
        );
    }
}
