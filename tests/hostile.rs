//! A guest that attacks rewind's devices (the test guest's mode=hostile: bad
//! virtio rings and chains, every port, odd MMIO offsets and widths, doorbell
//! writes no driver sends, a 100 MiB console flood) cannot crash or hang it:
//! the VMM keeps running with bounded memory, its API answers, the disk works
//! again after a reset, and a snapshot taken afterwards restores.

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const MEM_MIB: u64 = 64;
const FLOOD_LINES: u64 = 100 * 1024 * 1024 / 4096;

/// The console, minus the flood's lines, which are only counted: keeping
/// 100 MiB of them would measure the test, not rewind.
#[derive(Default)]
struct Console {
    lines: Vec<String>,
    flood_bytes: u64,
    closed: bool,
}

type Shared = Arc<(Mutex<Console>, Condvar)>;

fn wait_line(c: &Shared, what: &str, pred: impl Fn(&str) -> bool) -> usize {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut g = c.0.lock().unwrap();
    loop {
        if let Some(i) = g.lines.iter().position(|l| pred(l)) {
            return i;
        }
        let now = Instant::now();
        assert!(
            now < deadline && !g.closed,
            "never saw {what}; console:\n{}",
            g.lines.join("\n")
        );
        g = c.1.wait_timeout(g, deadline - now).unwrap().0;
    }
}

/// Peak resident memory of a process, in KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[test]
fn a_hostile_guest_cannot_crash_hang_or_bloat_rewind() {
    if !kvm_available("hostile guest") {
        return;
    }
    let home = Home::new("hostile");
    let disk = home.path.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let mem = MEM_MIB.to_string();
    let mut child = home
        .cmd()
        .args([
            "run",
            "--name",
            "h",
            "--mem",
            &mem,
            "--disk",
            disk.to_str().unwrap(),
            "--console",
            "stdio",
            "--timeout",
            "300",
            "--append",
            "mode=hostile period_ms=10 region=1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    let console: Shared = Default::default();
    let sink = console.clone();
    let out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = Vec::new();
        while r.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let mut g = sink.0.lock().unwrap();
            if line.starts_with(b"FLOOD ") {
                g.flood_bytes += line.len() as u64;
            } else {
                g.lines
                    .push(String::from_utf8_lossy(&line).trim_end().to_string());
                sink.1.notify_all();
            }
            line.clear();
        }
        sink.0.lock().unwrap().closed = true;
        sink.1.notify_all();
    });

    let done = wait_line(&console, "HOSTILE-DONE", |l| l == "HOSTILE-DONE");
    let lines = console.0.lock().unwrap().lines.clone();
    let has = |needle: &str| lines[..done].iter().any(|l| l.contains(needle));
    assert!(has("hostile ports done 65525"), "{lines:#?}");
    assert!(has("hostile mmio done"), "{lines:#?}");
    assert!(has("hostile doorbell done"), "{lines:#?}");
    // Each bad request is either answered with a status or makes the device
    // say DEVICE_NEEDS_RESET; none leaves the guest waiting.
    let virtio: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("hostile virtio ") && !l.contains("recover"))
        .collect();
    assert_eq!(virtio.len(), 18, "{lines:#?}");
    for l in &virtio {
        assert!(!l.ends_with("timeout"), "a request was left hanging: {l}");
    }
    for case in [
        "bad-data-addr status 1",
        "bad-header-addr status 1",
        "huge-len needs-reset",
        "loop needs-reset",
        "indirect-long status 1",
        "head-out-of-range needs-reset",
        "avail-jump needs-reset",
        "used-out-of-ram needs-reset",
        "ring-in-mmio needs-reset",
        "notify-undefined status 0",
    ] {
        assert!(has(&format!("hostile virtio {case}")), "{case}: {lines:#?}");
    }
    assert!(has("hostile virtio recovered ok"), "{lines:#?}");
    assert!(
        has(&format!("hostile flood done {FLOOD_LINES}")),
        "{lines:#?}"
    );

    // Still a working VM: it ticks, and its API answers at once.
    wait_line(&console, "a tick after the attack", |l| l == "tick 2 ok");
    let t = Instant::now();
    let r = rewind::control::client::request(
        &home.socket("h"),
        "GET",
        "/vm",
        None,
        Some(Duration::from_secs(10)),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    eprintln!("GET /vm after the attack: {:?}", t.elapsed());

    // The flood went through (or was dropped and said so), never buffered
    // whole: peak RSS stays well below guest memory plus the flood.
    let hwm_mib = vm_hwm_kib(pid) / 1024;
    eprintln!("rewind peak RSS: {hwm_mib} MiB (guest {MEM_MIB} MiB, flood 100 MiB)");
    assert!(hwm_mib < MEM_MIB + 48, "peak RSS {hwm_mib} MiB");

    let snap = home.run(&["snapshot", "create", "after", "--vm", "h"]);
    assert_eq!(snap.status.code(), Some(0), "{}", stderr(&snap));
    let r = rewind::control::client::request(
        &home.socket("h"),
        "PUT",
        "/vm/stop",
        None,
        Some(Duration::from_secs(30)),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(child.wait().unwrap().code(), Some(0));
    reader.join().unwrap();
    let g = console.0.lock().unwrap();
    let dropped = g
        .lines
        .iter()
        .filter(|l| l.contains("bytes of console output dropped"))
        .count();
    assert!(
        g.flood_bytes == FLOOD_LINES * 4096 || dropped > 0,
        "flood bytes {} and no drop marker",
        g.flood_bytes
    );
    drop(g);

    // The snapshot restores in a new process and the guest's memory check
    // keeps passing there.
    let clone = VmProcess::start(
        &home,
        "c",
        &[
            "restore",
            "after",
            "--vm",
            "h",
            "--name",
            "c",
            "--console",
            "stdio",
            "--timeout",
            "120",
        ],
    );
    let first = clone.wait_for(0, "a tick in the restored VM", |l| tick_ok(l).is_some());
    let n = tick_ok(&clone.lines()[first]).unwrap();
    clone.wait_for(first + 1, "two more ticks", |l| {
        tick_ok(l).is_some_and(|t| t >= n + 2)
    });
    let (status, lines) = clone.stop_and_collect();
    assert_eq!(status, Some(0));
    assert!(!lines.iter().any(|l| l.contains("CORRUPT")), "{lines:#?}");
}

fn tick_ok(l: &str) -> Option<u64> {
    l.strip_prefix("tick ")?.strip_suffix(" ok")?.parse().ok()
}
