//! Snapshot benchmarks (`cargo bench --bench snapshot`): pause, full
//! snapshot, live and paused (256 MiB and 1 GiB, little and much memory
//! rewritten), incremental snapshots (after 1 s idle, after 100 MiB
//! re-dirtied, ten on a guest holding 512 MiB), restore of a 10-deep chain,
//! in-place revert, restore in a new process. The same figures are
//! `rewind bench all`.

use std::process::Command;

fn main() {
    let rewind = env!("CARGO_BIN_EXE_rewind");
    for args in [
        &["bench", "pause"][..],
        &["bench", "snapshot", "--mem", "256", "--region", "16"],
        &[
            "bench", "snapshot", "--mem", "256", "--region", "200", "--runs", "5",
        ],
        &[
            "bench", "snapshot", "--mem", "1024", "--region", "256", "--runs", "5",
        ],
        &[
            "bench", "snapshot", "--mem", "1024", "--region", "256", "--runs", "5", "--paused",
        ],
        &[
            "bench", "snapshot", "--mem", "1024", "--region", "900", "--runs", "5",
        ],
        &[
            "bench",
            "incremental",
            "--fill",
            "100",
            "--region",
            "0",
            "--period-ms",
            "1000",
        ],
        &[
            "bench",
            "incremental",
            "--fill",
            "0",
            "--region",
            "100",
            "--period-ms",
            "1000",
        ],
        &["bench", "incremental", "--fill", "512", "--region", "16"],
        &["bench", "chain", "--runs", "10"],
        &["bench", "revert", "--region", "1"],
        &["bench", "revert", "--region", "16", "--runs", "20"],
        &["bench", "restore", "--mem", "256"],
        &["bench", "restore", "--mem", "1024"],
        &["bench", "restore", "--mem", "256", "--region", "16"],
        &["bench", "disk", "--mib", "8"],
    ] {
        let status = Command::new(rewind)
            .args(args)
            .status()
            .expect("run rewind bench");
        assert!(status.success(), "rewind {args:?} failed");
    }
}
