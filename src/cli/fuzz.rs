//! `rewind fuzz` (the mutation loop on the test guest's fuzz target) and
//! `rewind bench reset` (resets per second, medians).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::ValueEnum;

use rewind::fuzz::{fuzz, FuzzOptions, FuzzReport};
use rewind::{Event, ResetTimes, Vm, VmOptions};

use super::Failure;

#[derive(Clone, Copy, ValueEnum)]
pub enum FuzzGuest {
    /// The embedded test guest's `mode=fuzz` target.
    Test,
}

#[derive(clap::Args)]
pub struct FuzzArgs {
    #[arg(long, value_enum, default_value_t = FuzzGuest::Test)]
    guest: FuzzGuest,
    /// Stop after this many seconds if no crash was found.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// The mutator's seed: the same seed replays the same inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the crashing input is written.
    #[arg(long, default_value = "crash-input.bin")]
    output: PathBuf,
    /// More test guest options (`fault=1`: the planted bug is a real fault;
    /// `dirty=N`, `ptchange=1`).
    #[arg(long, default_value = "")]
    append: String,
    #[arg(long, default_value_t = 64)]
    mem: u64,
}

fn failure(e: rewind::Error) -> Failure {
    Failure::Runtime(e.to_string())
}

/// Boots the fuzz target and stops it at its SNAPSHOT doorbell, snapshotted.
fn target(append: &str, mem_mib: u64) -> Result<Vm, Failure> {
    let mut vm = Vm::boot(&VmOptions {
        cmdline: format!("mode=fuzz {append}").trim().to_string(),
        mem_mib,
        ..VmOptions::default()
    })
    .map_err(|e| match e {
        rewind::Error::Vmm(rewind::vmm::VmmError::Config(c)) => Failure::Usage(c.to_string()),
        other => failure(other),
    })?;
    match vm.run(Duration::from_secs(60)).map_err(failure)? {
        Event::SnapshotRequested => {}
        other => {
            return Err(Failure::Runtime(format!(
                "the fuzz target did not ring SNAPSHOT: {other:?}"
            )))
        }
    }
    vm.snapshot().map_err(failure)?;
    Ok(vm)
}

fn us(d: Duration, n: u64) -> f64 {
    d.as_secs_f64() * 1e6 / n.max(1) as f64
}

/// The per-reset time split, one line, then the vCPU parts.
fn time_split(t: &ResetTimes) -> String {
    let n = t.resets;
    let mut s = format!(
        "per reset: input run {:.1} us (vCPU told to run until its event is in hand), dirty log {:.1} us, page copy {:.1} us ({:.1} pages, {} of them hot), vCPU state {:.1} us (handed to a vCPU thread in {:.1} us; none when it runs on this one), irqchips/PIT {:.1} us, devices {:.1} us, slot reloads {} ({:.1} us)",
        us(t.guest_run, n),
        us(t.dirty_log, n),
        us(t.page_copy, n),
        t.pages_copied as f64 / n.max(1) as f64,
        t.hot_pages,
        us(t.vcpu_state, n),
        us(t.vcpu_round_trip, n),
        us(t.irqchips, n),
        us(t.devices, n),
        t.slot_reloads,
        us(t.slot_reload, n),
    );
    s += &format!(
        "\n  XCRs, debug registers and MSRs left unread in {} of {n} resets (vCPU statistics: no ring-0 code ran), the LAPIC in {} (and no interrupt could reach it); {} left the doorbell's MMIO write to the input's run",
        t.ring0_unread, t.lapic_unread, t.writes_left_to_run
    );
    s += "\n  vCPU parts, read/write us per reset (writes):";
    for (name, get, set, sets) in &t.vcpu_parts {
        s += &format!(" {name} {:.1}/{:.1} ({sets})", us(*get, n), us(*set, n));
    }
    s
}

fn printable(input: &[u8]) -> String {
    input
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

pub fn run(args: FuzzArgs) -> Result<i32, Failure> {
    let FuzzGuest::Test = args.guest;
    let mut vm = target(&args.append, args.mem)?;
    eprintln!(
        "rewind: fuzzing the test guest (seed {}, at most {} s)",
        args.seed, args.duration
    );
    // From here this thread runs the guest (its exits, the resets): it gets
    // a filter as a vCPU thread does.
    rewind::seccomp::install(rewind::seccomp::Thread::Fuzzer)
        .map_err(|e| Failure::Runtime(e.to_string()))?;
    let opts = FuzzOptions {
        seed: args.seed,
        duration: Duration::from_secs(args.duration),
        ..FuzzOptions::default()
    };
    let report: FuzzReport = fuzz(&mut vm, &opts).map_err(failure)?;
    let secs = report.elapsed.as_secs_f64();
    match &report.crash {
        Some(c) => {
            let how = match c.code {
                Some(code) => format!("CRASH doorbell, code {code:#x}"),
                None => "fault (triple fault)".to_string(),
            };
            println!(
                "crash found after {} inputs ({secs:.2} s): {how}, input \"{}\" ({} bytes)",
                c.execs,
                printable(&c.input),
                c.input.len()
            );
            std::fs::write(&args.output, &c.input).map_err(|e| {
                Failure::Runtime(format!("cannot write {}: {e}", args.output.display()))
            })?;
            println!("wrote the input to {}", args.output.display());
        }
        None => println!(
            "no crash found in {} inputs ({secs:.2} s, corpus {})",
            report.execs, report.corpus
        ),
    }
    let times = vm.reset_times();
    println!(
        "{:.0} resets/s ({} resets in {secs:.2} s, guest run time included); {}",
        times.resets as f64 / secs.max(1e-9),
        times.resets,
        time_split(&times)
    );
    Ok(0)
}

/// What an input costs here with no reset work at all (see
/// rewind::fuzz::Floor): the ceiling on resets per second on this host.
fn floor(name: &str, append: &str, inputs: u64) -> Result<(), String> {
    let vm = target(append, 64).map_err(|e| match e {
        Failure::Usage(m) | Failure::Runtime(m) | Failure::Timeout(m) => m,
    })?;
    let f = vm
        .measure_floor(inputs as usize)
        .map_err(|e| e.to_string())?;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "floor, {name} (medians of {inputs}): KVM_RUN from the snapshot to DONE {:.1} us (at most {:.0} inputs/s), KVM_RUN with immediate_exit {:.1} us, one vCPU ioctl {:.1} us, thread hand-off {:.1} us",
        us(f.kvm_run),
        1.0 / f.kvm_run.as_secs_f64().max(1e-9),
        us(f.immediate_exit_run),
        us(f.vcpu_ioctl),
        us(f.hand_off),
    );
    Ok(())
}

/// `rewind bench reset`: resets per second, input run included, for each
/// case (median of `runs` VMs, `inputs` resets each).
pub fn bench(runs: usize, inputs: u64) -> Result<(), String> {
    let cases = [
        ("idle", ""),
        ("16 dirty pages", "dirty=16"),
        ("1 MiB dirty", "dirty=256"),
        ("idle, page-table change", "ptchange=1"),
        ("16 dirty pages, page-table change", "dirty=16 ptchange=1"),
        ("1 MiB dirty, page-table change", "dirty=256 ptchange=1"),
    ];
    floor("idle", "", inputs)?;
    floor("16 dirty pages", "dirty=16", inputs)?;
    for (name, append) in cases {
        let mut rates = Vec::new();
        let mut last = ResetTimes::default();
        for _ in 0..runs {
            let mut vm = target(append, 64).map_err(|e| match e {
                Failure::Usage(m) | Failure::Runtime(m) | Failure::Timeout(m) => m,
            })?;
            let t = Instant::now();
            for i in 0..inputs {
                vm.write_input(&i.to_le_bytes())
                    .map_err(|e| e.to_string())?;
                match vm.run(Duration::from_secs(5)).map_err(|e| e.to_string())? {
                    Event::Done => {}
                    other => return Err(format!("{name}: input {i} ended with {other:?}")),
                }
                vm.reset().map_err(|e| e.to_string())?;
            }
            rates.push(inputs as f64 / t.elapsed().as_secs_f64());
            last = vm.reset_times();
        }
        let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rates.iter().copied().fold(0.0, f64::max);
        println!(
            "reset {name:<36} median {:>8.0} resets/s  (min {min:.0}, max {max:.0}, n={runs}, {inputs} inputs each)",
            super::bench::median(rates)
        );
        println!("  last run {}", time_split(&last));
    }
    Ok(())
}
