//! Boot benchmark: process start to `REWIND-READY` for the embedded test
//! guest, median of 20 (`cargo bench --bench boot`). The same measurement
//! is `rewind bench boot`.

use std::process::Command;

fn main() {
    let status = Command::new(env!("CARGO_BIN_EXE_rewind"))
        .args(["bench", "boot", "--runs", "20"])
        .status()
        .expect("run rewind bench boot");
    assert!(status.success(), "rewind bench boot failed");
}
