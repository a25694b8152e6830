//! `rewind bench`: end-to-end figures measured the way a user sees them.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Subcommand;

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
}

pub fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    match samples.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => samples[n / 2],
        n => (samples[n / 2 - 1] + samples[n / 2]) / 2,
    }
}

fn boot_once(mem: u64, cpus: u32) -> Result<Duration, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find rewind itself: {e}"))?;
    let start = Instant::now();
    let mut child = Command::new(exe)
        .args([
            "run",
            "--console",
            "stdio",
            "--timeout",
            "30",
            "--expect",
            "^REWIND-READY$",
        ])
        .args(["--mem", &mem.to_string(), "--cpus", &cpus.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start rewind: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut ready = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line.trim_end() == "REWIND-READY" {
            ready = Some(start.elapsed());
            break;
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    match ready {
        Some(t) if status.success() => Ok(t),
        _ => Err(format!(
            "the test guest did not become ready (rewind exited with {status})"
        )),
    }
}

pub fn run(cmd: BenchCmd) -> Result<i32, String> {
    match cmd {
        BenchCmd::Boot { runs, mem, cpus } => {
            let mut samples = Vec::with_capacity(runs);
            for _ in 0..runs.max(1) {
                samples.push(boot_once(mem, cpus)?);
            }
            let min = samples.iter().min().copied().unwrap_or_default();
            let max = samples.iter().max().copied().unwrap_or_default();
            println!(
                "boot (process start to REWIND-READY), test guest, {mem} MiB, {cpus} vCPU, {} runs: median {:.2} ms (min {:.2}, max {:.2})",
                samples.len(),
                median(samples).as_secs_f64() * 1e3,
                min.as_secs_f64() * 1e3,
                max.as_secs_f64() * 1e3
            );
            Ok(0)
        }
    }
}
