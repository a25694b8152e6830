#!/bin/bash
# Tests the exec agent (./agent, protocol in PROTOCOL.md) on the host: the agent runs under the
# same busybox-static the guest initramfs uses, on the slave side of a pty pair (python3's pty
# module stands in for the guest's ttyS1). Exit status 0 = all checks passed.
# Usage: test-agent-on-host.sh [--busybox PATH]   (or REWIND_BUSYBOX=PATH)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
busybox=${REWIND_BUSYBOX:-}
if [ "${1:-}" = --busybox ]; then busybox=$2; fi
die() { echo "test-agent-on-host: FAIL: $*" >&2; exit 1; }
command -v python3 >/dev/null || die "python3 is needed"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -z "$busybox" ]; then
	# The guest's busybox: Debian's busybox-static, fetched with apt like build.sh does (the .deb
	# is shared with build.sh's download cache).
	cache=${REWIND_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rewind/images}
	mkdir -p "$cache/debs"
	deb=$(ls "$cache"/debs/busybox-static_*.deb 2>/dev/null | sort | tail -n1 || true)
	if [ -z "$deb" ]; then
		(cd "$cache/debs" && apt-get -q -o APT::Sandbox::User=root download busybox-static >&2) ||
			die "cannot download busybox-static (run apt-get update?)"
		deb=$(ls "$cache"/debs/busybox-static_*.deb | sort | tail -n1)
	fi
	dpkg-deb -x "$deb" "$tmp/bb"
	busybox=$tmp/bb/bin/busybox
fi
[ -x "$busybox" ] || die "no busybox at $busybox"
echo "test-agent-on-host: agent=$here/agent busybox=$busybox" >&2

export AGENT="$here/agent" BUSYBOX="$busybox" AGENT_TMP="$tmp"
exec python3 - <<'PY'
import base64, os, pty, select, subprocess, sys, time

agent, busybox, tmpdir = os.environ["AGENT"], os.environ["BUSYBOX"], os.environ["AGENT_TMP"]
failures = []

def fail(msg):
    if len(msg) > 300:
        msg = msg[:300] + "..."
    print("test-agent-on-host: FAIL: " + msg, file=sys.stderr)
    failures.append(msg)

master, slave = pty.openpty()
slave_name = os.ttyname(slave)
env = {"PATH": "/usr/bin:/bin", "REWIND_AGENT_TMP": tmpdir}
# Like the guest's /init: `rewind-agent /dev/ttyS1` in its own session.
proc = subprocess.Popen([busybox, "sh", agent, slave_name], stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmpdir, "agent.err"), "w"),
                        start_new_session=True, env=env)
# The parent keeps its slave fd open: with no slave fd open at all, reads on the master fail
# with EIO (before the agent opened the line, or after it closed it).
buf = b""

def line(timeout=20.0):
    """Next protocol line (bytes, without LF) or None on timeout."""
    global buf
    end = time.monotonic() + timeout
    while b"\n" not in buf:
        left = end - time.monotonic()
        if left <= 0:
            return None
        r, _, _ = select.select([master], [], [], left)
        if r:
            try:
                data = os.read(master, 4096)
            except OSError:
                return None
            if not data:
                return None
            buf += data
    l, buf = buf.split(b"\n", 1)
    return l

def send(s):
    os.write(master, s.encode() if isinstance(s, str) else s)

def run(rid, cmd, timeout=30.0):
    """RUN a command; returns (stdout bytes, stderr bytes, status, [(time, line)])."""
    # Alternate framings: hex (what rewind sends) and base64 (the original verb).
    if sum(map(ord, rid)) % 2:
        send("RUN %s %s\n" % (rid, base64.b64encode(cmd.encode()).decode()))
    else:
        send("RUNH %s %s\n" % (rid, cmd.encode().hex()))
    out, err, log = b"", b"", []
    while True:
        l = line(timeout)
        if l is None:
            fail("RUN %s %r: no EXIT within %ss (got %r)" % (rid, cmd, timeout, log))
            return out, err, None, log
        log.append((time.monotonic(), l))
        if b"\r" in l:
            fail("RUN %s: CR in line %r (tty not raw?)" % (rid, l))
        # hexdump pads a short last chunk with spaces
        parts = l.decode().rstrip(" ").split(" ")
        if len(parts) == 3 and parts[0] in ("OUT", "ERR", "OUTH", "ERRH") and parts[1] == rid:
            if parts[0].endswith("H"):
                chunk = bytes.fromhex(parts[2])
            else:
                chunk = base64.b64decode(parts[2], validate=True)
            if parts[0] in ("OUT", "OUTH"):
                out += chunk
            else:
                err += chunk
        elif len(parts) == 3 and parts[0] == "EXIT" and parts[1] == rid:
            return out, err, int(parts[2]), log
        else:
            fail("RUN %s: unexpected line %r" % (rid, l))

def check(name, got, want):
    if got != want:
        fail("%s: got %r, want %r" % (name, got, want))
    else:
        print("test-agent-on-host: ok   %s" % name, file=sys.stderr)

try:
    hello = line(10)
    check("HELLO on start", hello, b"HELLO rewind-agent 1")
    send("PING p1\n")
    check("PING -> PONG", line(), b"PONG p1")
    send("PING p2\r\n")
    check("PING with CRLF", line(), b"PONG p2")
    send("FROB x1\n")
    check("unknown verb", line(), b"ERROR x1 unknown-verb")
    o, e, s, _ = run("1", "echo $((6*7))")
    check("echo $((6*7)): stdout", o, b"42\n")
    check("echo $((6*7)): stderr", e, b"")
    check("echo $((6*7)): status", s, 0)
    o, e, s, _ = run("2", "exit 7")
    check("exit 7: status", s, 7)
    check("exit 7: no output", (o, e), (b"", b""))
    o, e, s, _ = run("3", "echo out; echo err >&2; echo out2; exit 3")
    check("stdout separated", o, b"out\nout2\n")
    check("stderr separated", e, b"err\n")
    check("status 3", s, 3)
    o, e, s, _ = run("4", "cat; echo stdin-was-eof")
    check("stdin is /dev/null", (o, s), (b"stdin-was-eof\n", 0))
    o, e, s, _ = run("5", "printf '\\000\\001\\377x'")
    check("binary output", o, b"\x00\x01\xffx")
    o, e, s, _ = run("6", "seq 1 20000")
    check("large output (seq 1 20000)", o, "".join("%d\n" % i for i in range(1, 20001)).encode())
    # Chunks are 256 bytes: the first one leaves before the command ends.
    o, e, s, log = run("7", "seq 1 100; sleep 1; echo second >&2")
    check("streaming: data", (o, e, s), ("".join("%d\n" % i for i in range(1, 101)).encode(), b"second\n", 0))
    t_first = next((t for t, l in log if l.startswith(b"OUTH 7 ")), None)
    t_exit = log[-1][0] if log else None
    if t_first is None or t_exit is None or t_exit - t_first < 0.5:
        fail("streaming: first chunk not sent before the command finished (%r)" % log)
    else:
        print("test-agent-on-host: ok   streaming (first chunk %.2fs before EXIT)" % (t_exit - t_first),
              file=sys.stderr)
    o, e, s, _ = run("8", "no_such_command_xyz")
    check("missing command: status 127", s, 127)
    if b"not found" not in e:
        fail("missing command: stderr %r lacks 'not found'" % e)
    o, e, s, _ = run("9", "sh -c 'kill -TERM $$'")  # a command killed by a signal
    check("killed command: status 143", s, 143)
    send("PING p3\n")
    check("still alive after all", line(), b"PONG p3")
finally:
    os.close(master)
    os.close(slave)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        fail("agent did not exit when the line closed")
    leftovers = [n for n in os.listdir(tmpdir) if n.startswith("rewind-agent.")]
    if leftovers:
        fail("agent left %r behind" % leftovers)

if failures:
    err = open(os.path.join(tmpdir, "agent.err")).read()
    if err:
        print("agent stderr:\n" + err, file=sys.stderr)
    print("test-agent-on-host: %d check(s) FAILED" % len(failures), file=sys.stderr)
    sys.exit(1)
print("test-agent-on-host: all checks passed", file=sys.stderr)
PY
