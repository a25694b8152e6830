#!/bin/sh
# Fuzzes each of rewind's parsers of untrusted input (src/parser_fuzz.rs) with
# libFuzzer for a bounded time: scripts/fuzz-parsers.sh [SECONDS_PER_TARGET]
# (default 60) [TARGET...]. Builds on stable Rust: libfuzzer-sys with the
# coverage instrumentation cargo-fuzz would ask for (no sanitizer: the code
# under test is safe Rust, and a panic, overflow, hang or runaway allocation
# is what is looked for). Prints executions and findings per target; a
# finding is in fuzz/artifacts/TARGET/: copy it to fuzz/regressions/TARGET/
# so tests/fuzz_parsers.rs replays it in the normal suite, then fix it.
set -eu
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
[ $# -gt 0 ] && shift
targets=${*:-http agent virtio_blk assist bundle memory_delta}
RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing"
export RUSTFLAGS
# An explicit --target keeps the flags off build scripts and proc macros,
# which would not link without libFuzzer (as cargo-fuzz does).
host=$(rustc -vV | sed -n 's/^host: //p')
nice -n 10 cargo build --release --bins --target "$host"
for t in $targets; do
    mkdir -p "corpus/$t" "artifacts/$t"
    # A fresh corpus directory is the fuzzer's own; the seeds only start it.
    nice -n 10 "./target/$host/release/$t" -max_total_time="$secs" -timeout=10 \
        -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" "corpus/$t" "seeds/$t" >"$t.log" 2>&1 || true
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$t.log")
    found=$(find "artifacts/$t" -type f | wc -l)
    echo "$t: ${runs:-?} executions in ${secs}s, $found findings$( [ "$found" -gt 0 ] && echo " (fuzz/artifacts/$t)")"
done
