//! Snapshot benchmarks (`cargo bench --bench snapshot`): pause, full
//! snapshot (256 MiB and 1 GiB, little and much memory touched), in-place
//! revert, restore in a new process. The same figures are `rewind bench all`.

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
            "bench", "snapshot", "--mem", "1024", "--region", "16", "--runs", "5",
        ],
        &[
            "bench", "snapshot", "--mem", "1024", "--region", "900", "--runs", "5",
        ],
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
