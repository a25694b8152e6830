#!/bin/bash
# Measures the Linux guest where its kernel is slow (PVM hosts emulate guest ring 0):
#   - boot: process start to REWIND-READY (the agent listening), fresh boot from the initramfs;
#   - tick cost: a ring-3 busy loop timed inside the guest against the same loop under the host's
#     busybox; the difference is what the guest kernel took from it (ticks, mostly);
#   - exec latency: `rewind exec VM 'echo hi'`, median of 5, on the fresh boot and on a restore of
#     its boot-cache snapshot taken AGE minutes earlier (default 0; the issue asked for 15).
# Usage: benches/linux-guest.sh [AGE_MINUTES] [KERNEL INITRD]   (default: the microvm images)
# Needs: a release build (cargo build --release), busybox on the host (busybox-static), bc.
set -euo pipefail
cd "$(dirname "$0")/.."
age=${1:-0}
bin=$PWD/target/release/rewind
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 2; }
if [ $# -ge 3 ]; then
	kernel=$2 initrd=$3
else
	images=$(bash guest-images/linux/build.sh all 2>/dev/null)
	kernel=$images/vmlinux-microvm initrd=$images/initramfs.cpio
fi
work=$(mktemp -d /tmp/rewind-linux-bench.XXXXXX)
export REWIND_HOME=$work/home REWIND_BOOT_CACHE=$work/boot-cache
trap '"$bin" stop --vm lb >/dev/null 2>&1 || true; "$bin" stop --vm lb2 >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

now() { date +%s.%N; }
median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
wait_ready() { # CONSOLE_FILE
	until grep -q 'REWIND-READY' "$1" 2>/dev/null; do sleep 0.2; done
}
exec_latency() { # VM -> median seconds of 5 `echo hi`
	local i s
	for i in 1 2 3 4 5; do
		s=$(now)
		[ "$("$bin" exec --vm "$1" --timeout 600 'echo hi')" = hi ] || { echo "exec failed" >&2; exit 1; }
		echo "$(now) - $s" | bc
	done | median
}
loop='read -r a _ </proc/uptime; i=0; while [ $i -lt 3000000 ]; do i=$((i+1)); done; read -r b _ </proc/uptime; echo "$a $b"'

t0=$(now)
"$bin" run --name lb --boot-cache --kernel "$kernel" --initrd "$initrd" --console "$work/console" \
	--timeout 7200 >/dev/null 2>"$work/run.err" &
wait_ready "$work/console"
boot=$(echo "$(now) - $t0" | bc)
echo "boot to REWIND-READY: ${boot} s"
lat_fresh=$(exec_latency lb)
echo "exec 'echo hi' on the fresh boot: median ${lat_fresh} s"
read -r a b < <("$bin" exec --vm lb --timeout 900 "$loop")
guest=$(echo "$b - $a" | bc)
s=$(now)
busybox sh -c "i=0; while [ \$i -lt 3000000 ]; do i=\$((i+1)); done"
host=$(echo "$(now) - $s" | bc)
hz=$(awk -F= '/^CONFIG_HZ=/ { print $2 }' "$(dirname "$kernel")/config-microvm" 2>/dev/null || echo 100)
echo "ring-3 loop: ${guest} s in the guest, ${host} s on the host"
echo "guest kernel share of a busy vCPU: $(echo "scale=3; ($guest - $host) / $guest" | bc)," \
	"about $(echo "scale=3; ($guest - $host) / $guest * 1000 / $hz" | bc) ms per tick at HZ=$hz"
"$bin" stop --vm lb >/dev/null
if [ "$age" -gt 0 ]; then
	echo "waiting ${age} min so the boot-cache snapshot is that old"
	sleep $((age * 60))
fi
t0=$(now)
"$bin" run --name lb2 --boot-cache --kernel "$kernel" --initrd "$initrd" --console "$work/console2" \
	--timeout 7200 >/dev/null 2>"$work/run2.err" &
until [ -S "$REWIND_HOME/vms/lb2/api.sock" ]; do sleep 0.05; done
echo "restore from the boot cache to the API socket: $(echo "$(now) - $t0" | bc) s"
lat_restored=$(exec_latency lb2)
echo "exec 'echo hi' on a restore of a ${age}-minute-old boot cache: median ${lat_restored} s"
