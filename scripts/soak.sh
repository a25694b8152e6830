#!/bin/sh
# Soak: scripts/soak.sh [VMS] [MINUTES] (default 20 VMs, 10 minutes), not
# part of CI. VMS test guests restored from one snapshot at once, each
# rewriting memory and disk, snapshotted, reverted and the snapshot deleted
# over and over; reports operations done with medians, fds and RSS per VM at
# start and end, files left in each VM's folder, CORRUPT lines (must be 0)
# and operations slower than 10x their median. Exit status 1 on corruption
# or a failed operation. On PVM hosts every VM's ring-0 work is emulated:
# on a shared machine use fewer VMs.
set -eu
cd "$(dirname "$0")/.."
nice -n 10 cargo build --release --bin rewind
exec ./target/release/rewind bench soak --vms "${1:-20}" --minutes "${2:-10}"
