//! `rewind bench`: end-to-end figures measured the way a user meets rewind
//! (child processes, the control socket), reported as medians.

use std::time::{Duration, Instant};

use clap::Subcommand;

use std::process::{Command, Stdio};

use rewind::child_vm::{tick_of, ChildVm};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Process start to `REWIND-READY` on the console, for the test guest.
    Boot {
        #[arg(long, default_value_t = 20)]
        runs: usize,
        #[arg(long, default_value_t = 256)]
        mem: u64,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
    },
    /// Pause of every vCPU, as measured inside the VMM.
    Pause {
        #[arg(long, default_value_t = 50)]
        runs: usize,
    },
    /// Full snapshot create (pause and total) with the guest rewriting
    /// `region` MiB every 50 ms tick; live unless --paused.
    Snapshot {
        #[arg(long, default_value_t = 10)]
        runs: usize,
        #[arg(long, default_value_t = 256)]
        mem: u64,
        #[arg(long, default_value_t = 16)]
        region: u64,
        #[arg(long)]
        paused: bool,
    },
    /// Incremental snapshots: a full one, then `runs` more, each after
    /// `ticks` guest ticks; the guest holds `fill` MiB written once and
    /// rewrites `region` MiB every `period_ms`.
    Incremental {
        #[arg(long, default_value_t = 10)]
        runs: usize,
        #[arg(long, default_value_t = 1024)]
        mem: u64,
        #[arg(long, default_value_t = 512)]
        fill: u64,
        #[arg(long, default_value_t = 16)]
        region: u64,
        #[arg(long, default_value_t = 100)]
        period_ms: u64,
        #[arg(long, default_value_t = 1)]
        ticks: u64,
    },
    /// Restore of the 10th incremental snapshot of a chain against
    /// restore of the chain's full base, until the clone's first line.
    Chain {
        #[arg(long, default_value_t = 20)]
        runs: usize,
        #[arg(long, default_value_t = 256)]
        mem: u64,
        #[arg(long, default_value_t = 16)]
        region: u64,
    },
    /// In-place revert to the latest snapshot after the guest dirtied `region` MiB.
    Revert {
        #[arg(long, default_value_t = 50)]
        runs: usize,
        #[arg(long, default_value_t = 1)]
        region: u64,
    },
    /// Restore in a new process until the guest answers (its first timer tick, 1 ms period).
    Restore {
        #[arg(long, default_value_t = 20)]
        runs: usize,
        #[arg(long, default_value_t = 256)]
        mem: u64,
        /// MiB the guest verifies and rewrites before its first answer.
        #[arg(long, default_value_t = 0)]
        region: u64,
    },
    /// Guest disk throughput through the qcow2 overlay (test guest driver),
    /// and the snapshot pause with a disk (overlay switch included).
    Disk {
        /// MiB the guest reads back and rewrites at every tick.
        #[arg(long, default_value_t = 8)]
        mib: u64,
    },
    /// Fuzzer resets per second in process (`rewind::Vm`), input run
    /// included: idle, 16 dirty pages and 1 MiB per input, each also with a
    /// guest page-table change per input.
    Reset {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long, default_value_t = 5000)]
        inputs: u64,
    },
    /// Everything above with default sizes, plus 1 GiB variants.
    All,
    /// Long use: VMS test guests restored from one snapshot, each rewriting
    /// memory and disk, snapshotted, reverted and the snapshot deleted over
    /// and over for MINUTES (scripts/soak.sh).
    Soak {
        #[arg(long, default_value_t = 20)]
        vms: usize,
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
    },
}

pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    match samples.len() {
        0 => 0.0,
        n if n % 2 == 1 => samples[n / 2],
        n => (samples[n / 2 - 1] + samples[n / 2]) / 2.0,
    }
}

fn report(what: &str, samples: Vec<f64>) {
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(0.0, f64::max);
    let n = samples.len();
    println!(
        "{what:<58} median {:>9.3} ms  (min {min:.3}, max {max:.3}, n={n})",
        median(samples)
    );
}

/// Medians of each part of the snapshot pauses in `replies`.
fn report_parts(what: &str, replies: &[serde_json::Value]) {
    let parts = [
        "stop_vcpus",
        "dirty_log",
        "disk_switch",
        "state",
        "memory",
        "resume",
    ];
    let line: Vec<String> = parts
        .iter()
        .map(|p| {
            let v = replies
                .iter()
                .filter_map(|r| r["pause_parts_ms"][p].as_f64())
                .collect();
            format!("{p} {:.2}", median(v))
        })
        .collect();
    println!(
        "{:<58} {} (ms, medians)",
        format!("{what}: pause parts"),
        line.join(", ")
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A private $REWIND_HOME so benchmarks never touch the user's VMs.
fn bench_home() -> Result<std::path::PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("rewind-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // Set before any thread of ours exists, so nothing reads it concurrently.
    std::env::set_var("REWIND_HOME", &dir);
    Ok(dir)
}

/// `rewind ARGS` running VM `name` with the console on a pipe; rewind's
/// own stderr would interleave with the report, so it is dropped.
pub(crate) fn spawn(name: &str, args: &[&str]) -> Result<ChildVm, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find rewind itself: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null()).stderr(Stdio::null());
    Ok(ChildVm::spawn(cmd, name, rewind::paths::api_socket(name))?)
}

/// `rewind restore SNAP --vm VM --name CLONE` with the console on a pipe,
/// ending after `timeout` seconds or at a line matching `expect`.
pub(crate) fn spawn_restore(
    clone: &str,
    snap: &str,
    vm: &str,
    timeout: &str,
    expect: Option<&str>,
) -> Result<ChildVm, String> {
    let mut args = vec![
        "restore",
        snap,
        "--vm",
        vm,
        "--name",
        clone,
        "--console",
        "stdio",
        "--timeout",
        timeout,
    ];
    if let Some(e) = expect {
        args.extend(["--expect", e]);
    }
    spawn(clone, &args)
}

fn start_guest(name: &str, mem: u64, append: &str) -> Result<ChildVm, String> {
    let mem = mem.to_string();
    let vm = spawn(
        name,
        &[
            "run",
            "--name",
            name,
            "--mem",
            &mem,
            "--console",
            "stdio",
            "--timeout",
            "600",
            "--append",
            append,
        ],
    )?;
    vm.next_line(|l| tick_of(l) == Some(2))?;
    Ok(vm)
}

fn boot(runs: usize, mem: u64, cpus: u32) -> Result<(), String> {
    let (m, c) = (mem.to_string(), cpus.to_string());
    let mut samples = Vec::new();
    for i in 0..runs.max(1) {
        let name = format!("boot{i}");
        let t = Instant::now();
        let vm = spawn(
            &name,
            &[
                "run",
                "--name",
                &name,
                "--mem",
                &m,
                "--cpus",
                &c,
                "--console",
                "stdio",
                "--timeout",
                "30",
                "--expect",
                "^REWIND-READY$",
            ],
        )?;
        vm.next_line(|l| l == "REWIND-READY")?;
        samples.push(ms(t.elapsed()));
    }
    report(
        &format!("boot: process start to REWIND-READY ({mem} MiB, {cpus} vCPU)"),
        samples,
    );
    Ok(())
}

fn pause(runs: usize) -> Result<(), String> {
    let vm = start_guest("pause", 256, "period_ms=10 region=1")?;
    let mut samples = Vec::new();
    for _ in 0..runs {
        let r = vm.api_ok("PUT", "/vm/pause", None, None)?;
        samples.push(r["pause_us"].as_f64().unwrap_or(0.0) / 1e3);
        vm.api_ok("PUT", "/vm/resume", None, None)?;
    }
    vm.stop();
    report(
        "pause: all vCPUs out of KVM_RUN, in-flight I/O done",
        samples,
    );
    Ok(())
}

fn snapshot(runs: usize, mem: u64, region: u64, paused: bool) -> Result<(), String> {
    let how = if paused { "paused" } else { "live" };
    let vm = start_guest(
        &format!("snap-{mem}-{region}-{how}"),
        mem,
        &format!("period_ms=50 region={region}"),
    )?;
    let (mut pause, mut total, mut size) = (Vec::new(), Vec::new(), 0.0);
    let mut replies = Vec::new();
    for i in 0..runs {
        // Each one full: the one before is deleted, so no baseline remains.
        let r = vm.api_ok(
            "PUT",
            "/snapshots",
            Some(&serde_json::json!({ "name": format!("s{i}"), "paused": paused })),
            None,
        )?;
        pause.push(r["pause_ms"].as_f64().unwrap_or(0.0));
        total.push(r["total_ms"].as_f64().unwrap_or(0.0));
        size = r["size_bytes"].as_f64().unwrap_or(0.0) / 1048576.0;
        replies.push(r);
        vm.api_ok("DELETE", &format!("/snapshots/s{i}"), None, None)?;
    }
    vm.stop();
    report(
        &format!("{how} snapshot, {mem} MiB guest rewriting {region} MiB: pause"),
        pause,
    );
    report(
        &format!("{how} snapshot, {mem} MiB guest rewriting {region} MiB: total ({size:.1} MiB)"),
        total,
    );
    report_parts(
        &format!("{how} snapshot, {mem} MiB, {region} MiB"),
        &replies,
    );
    Ok(())
}

fn incremental(
    runs: usize,
    mem: u64,
    fill: u64,
    region: u64,
    period_ms: u64,
    ticks: u64,
) -> Result<(), String> {
    let name = format!("inc-{mem}-{fill}-{region}-{period_ms}");
    let vm = start_guest(
        &name,
        mem,
        &format!("period_ms={period_ms} region={region} fill={fill}"),
    )?;
    let create = |name: &str| {
        vm.api_ok(
            "PUT",
            "/snapshots",
            Some(&serde_json::json!({ "name": name })),
            None,
        )
    };
    let first = create("full")?;
    let (mut pause, mut total, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
    let mut replies = Vec::new();
    for i in 0..runs {
        let at = vm.next_line(|l| tick_of(l).is_some())?;
        let start = tick_of(&at).unwrap_or(0);
        if ticks > 1 {
            vm.next_line(|l| tick_of(l).is_some_and(|n| n >= start + ticks - 1))?;
        }
        let r = create(&format!("i{i}"))?;
        if r["incremental_on"].is_null() {
            return Err(format!("snapshot i{i} was not incremental: {r}"));
        }
        pause.push(r["pause_ms"].as_f64().unwrap_or(0.0));
        total.push(r["total_ms"].as_f64().unwrap_or(0.0));
        sizes.push(r["size_bytes"].as_f64().unwrap_or(0.0) / 1024.0);
        replies.push(r);
    }
    vm.stop();
    let what = format!(
        "incremental, {mem} MiB guest, fill={fill} region={region}, every {}",
        if ticks * period_ms >= 1000 {
            format!("{:.1} s", (ticks * period_ms) as f64 / 1e3)
        } else {
            format!("{} ms", ticks * period_ms)
        }
    );
    report(&format!("{what}: pause"), pause);
    report(&format!("{what}: total"), total);
    report_parts(&what, &replies);
    let sum: f64 = sizes.iter().sum();
    println!(
        "{:<58} median {:>9.1} KiB  (all {runs}: {:.1} MiB; the full one: {:.1} MiB)",
        format!("{what}: size"),
        median(sizes),
        sum / 1024.0,
        first["size_bytes"].as_f64().unwrap_or(0.0) / 1048576.0
    );
    Ok(())
}

fn chain(runs: usize, mem: u64, region: u64) -> Result<(), String> {
    let orig = format!("chain-{mem}-{region}");
    // Each snapshot is taken on a tick that arrived after the previous one
    // returned, with ticks far enough apart that the guest is idle then, as
    // for c0. A snapshot taken while the guest rewrites its region makes the
    // clone finish that rewrite before its first line, which times the
    // guest rather than the restore (with 20 ms ticks every other one did).
    let vm = start_guest(
        &orig,
        mem,
        &format!("period_ms=100 region={region} resumed=1"),
    )?;
    for i in 0..=10 {
        let from = vm.lines().len();
        vm.wait_for(from, Duration::from_secs(30), |l| tick_of(l).is_some())
            .map_err(|_| format!("{orig}: no tick before snapshot c{i}"))?;
        vm.api_ok(
            "PUT",
            "/snapshots",
            Some(&serde_json::json!({ "name": format!("c{i}") })),
            None,
        )?;
    }
    vm.stop();
    let (mut base, mut top) = (Vec::new(), Vec::new());
    for i in 0..runs {
        for (snap, samples) in [("c0", &mut base), ("c10", &mut top)] {
            let name = format!("chain-restored-{snap}-{i}");
            let t = Instant::now();
            let c = spawn_restore(&name, snap, &orig, "30", Some("resumed"))?;
            c.next_line(|l| l == "resumed")?;
            samples.push(ms(t.elapsed()));
        }
    }
    report(
        &format!("restore of a full snapshot ({mem} MiB, {region} MiB rewritten per layer)"),
        base,
    );
    report("restore of the 10th incremental snapshot on it", top);
    Ok(())
}

fn revert(runs: usize, region: u64) -> Result<(), String> {
    let vm = start_guest(
        &format!("revert-{region}"),
        256,
        &format!("period_ms=5 region={region}"),
    )?;
    vm.api_ok(
        "PUT",
        "/snapshots",
        Some(&serde_json::json!({ "name": "base" })),
        None,
    )?;
    let (mut inside, mut client) = (Vec::new(), Vec::new());
    let mut pages = 0.0;
    for _ in 0..runs {
        // Let the guest run a few ticks so it dirties its region again.
        vm.next_line(|l| tick_of(l).is_some_and(|n| n >= 5))?;
        let t = Instant::now();
        let r = vm.api_ok("PUT", "/snapshots/base/revert", None, None)?;
        client.push(ms(t.elapsed()));
        inside.push(r["total_ms"].as_f64().unwrap_or(0.0));
        pages = r["pages_copied"].as_f64().unwrap_or(0.0);
    }
    vm.stop();
    report(
        &format!("revert in place, {region} MiB dirtied (~{pages} pages): in VMM"),
        inside,
    );
    report("revert in place: API round trip", client);
    Ok(())
}

fn restore(runs: usize, mem: u64, region: u64) -> Result<(), String> {
    let orig = format!("orig-{mem}-{region}");
    let vm = start_guest(
        &orig,
        mem,
        &format!("period_ms=1 region={region} resumed=1"),
    )?;
    vm.api_ok(
        "PUT",
        "/snapshots",
        Some(&serde_json::json!({ "name": "r" })),
        None,
    )?;
    vm.stop();
    let (mut samples, mut verified) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let name = format!("restored-{mem}-{region}-{i}");
        let t = Instant::now();
        let c = spawn_restore(&name, "r", &orig, "30", Some("tick"))?;
        // "resumed" comes the moment the clone runs (what restore costs);
        // its first tick, at most 1 ms on, follows a re-verification of the
        // region through the lazily mapped memory file.
        c.next_line(|l| l == "resumed")?;
        samples.push(ms(t.elapsed()));
        c.next_line(|l| tick_of(l).is_some())?;
        verified.push(ms(t.elapsed()));
    }
    report(
        &format!("restore ({mem} MiB): new process to the clone's first line"),
        samples,
    );
    report(
        &format!("restore ({mem} MiB): to its first tick, {region} MiB re-verified"),
        verified,
    );
    Ok(())
}

fn disk(mib: u64) -> Result<(), String> {
    let home = std::env::var_os("REWIND_HOME")
        .map(std::path::PathBuf::from)
        .ok_or("no bench home")?;
    let base = home.join("bench-disk.img");
    std::fs::write(&base, vec![0u8; ((mib + 1) << 20) as usize]).map_err(|e| e.to_string())?;
    let sectors = mib * 2048;
    let name = format!("disk-{mib}");
    let append = format!("mode=disk period_ms=1 disk_sectors={sectors}");
    let b = base.display().to_string();
    let vm = spawn(
        &name,
        &[
            "run",
            "--name",
            &name,
            "--disk",
            &b,
            "--console",
            "stdio",
            "--timeout",
            "600",
            "--append",
            &append,
        ],
    )?;
    let disk_tick = |l: &str| {
        l.strip_prefix("tick ")?
            .strip_suffix(" disk ok")?
            .parse::<u64>()
            .ok()
    };
    vm.next_line(|l| disk_tick(l) == Some(3))?;
    let t = Instant::now();
    let start = 3;
    let end = vm.next_line(|l| disk_tick(l).is_some_and(|n| n >= start + 20))?;
    let ticks = disk_tick(&end).unwrap_or(start) - start;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{:<58} {:>9.1} MiB/s read + the same written ({ticks} ticks of {mib} MiB in {secs:.2} s)",
        "guest disk I/O through the qcow2 overlay (virtio-blk)",
        ticks as f64 * mib as f64 / secs
    );
    let mut pause = Vec::new();
    for i in 0..10 {
        let r = vm.api_ok(
            "PUT",
            "/snapshots",
            Some(&serde_json::json!({ "name": format!("d{i}") })),
            None,
        )?;
        pause.push(r["pause_ms"].as_f64().unwrap_or(0.0));
    }
    vm.stop();
    report(
        "snapshot pause with one disk (overlay switch included)",
        pause,
    );
    Ok(())
}

pub fn run(cmd: BenchCmd) -> Result<i32, String> {
    let home = bench_home()?;
    let result = match cmd {
        BenchCmd::Boot { runs, mem, cpus } => boot(runs, mem, cpus),
        BenchCmd::Pause { runs } => pause(runs),
        BenchCmd::Snapshot {
            runs,
            mem,
            region,
            paused,
        } => snapshot(runs, mem, region, paused),
        BenchCmd::Incremental {
            runs,
            mem,
            fill,
            region,
            period_ms,
            ticks,
        } => incremental(runs, mem, fill, region, period_ms, ticks),
        BenchCmd::Chain { runs, mem, region } => chain(runs, mem, region),
        BenchCmd::Revert { runs, region } => revert(runs, region),
        BenchCmd::Restore { runs, mem, region } => restore(runs, mem, region),
        BenchCmd::Disk { mib } => disk(mib),
        BenchCmd::Soak { vms, minutes } => super::soak::soak(&home, vms, minutes),
        BenchCmd::Reset { runs, inputs } => super::fuzz::bench(runs, inputs),
        BenchCmd::All => boot(20, 256, 1)
            .and_then(|_| pause(50))
            .and_then(|_| snapshot(10, 256, 16, false))
            .and_then(|_| snapshot(5, 256, 200, false))
            .and_then(|_| snapshot(5, 1024, 256, false))
            .and_then(|_| snapshot(5, 1024, 256, true))
            .and_then(|_| snapshot(5, 1024, 900, false))
            .and_then(|_| incremental(10, 1024, 100, 0, 1000, 1))
            .and_then(|_| incremental(10, 1024, 0, 100, 1000, 1))
            .and_then(|_| incremental(10, 1024, 512, 16, 100, 1))
            .and_then(|_| chain(10, 256, 16))
            .and_then(|_| revert(50, 1))
            .and_then(|_| revert(20, 16))
            .and_then(|_| restore(20, 256, 0))
            .and_then(|_| restore(20, 1024, 0))
            .and_then(|_| restore(20, 256, 16))
            .and_then(|_| disk(8))
            .and_then(|_| super::fuzz::bench(5, 5000)),
    };
    let _ = std::fs::remove_dir_all(&home);
    result.map(|_| 0)
}
