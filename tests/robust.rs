//! A VM stays controllable whatever its console and guest do, and a run
//! ends with the status and the files a user expects.

mod common;
use common::*;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Waits up to `limit` for `child` to exit; kills it and fails otherwise.
fn exit_within(child: &mut Child, limit: Duration, what: &str) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: rewind did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn api(home: &Home, vm: &str, method: &str, path: &str) -> (u16, serde_json::Value, Duration) {
    let t = Instant::now();
    let r = rewind::control::client::request(
        &home.socket(vm),
        method,
        path,
        None,
        Some(Duration::from_secs(60)),
    )
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (r.status, r.body, t.elapsed())
}

/// A pipe of one page, so a guest that prints fills it at once.
fn small_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array it is given.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned from here on.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: plain fcntl on an fd we own.
    let size = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(size >= 4096, "cannot shrink the pipe");
    (r, w)
}

fn bytes_in_pipe(r: &OwnedFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    unsafe { libc::ioctl(r.as_raw_fd(), libc::FIONREAD, &mut n) };
    n as usize
}

#[test]
fn a_console_nobody_reads_does_not_stop_pause_snapshot_or_stop() {
    if !kvm_available("unread console") {
        return;
    }
    let home = Home::new("unread");
    let (read_end, write_end) = small_pipe();
    let mut child = home
        .cmd()
        .args([
            "run",
            "--name",
            "u",
            "--console",
            "stdio",
            "--timeout",
            "300",
            "--append",
            "period_ms=1 region=0",
        ])
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // The guest prints a line per millisecond: the page fills until a line
    // ("tick NNN ok\n", 12 bytes or more) no longer fits, and from then on
    // each line is a write nobody will ever take.
    let deadline = Instant::now() + Duration::from_secs(60);
    while bytes_in_pipe(&read_end) <= 4096 - 12 {
        assert!(Instant::now() < deadline, "the console pipe never filled");
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_for_path(&home.socket("u"), "api.sock");
    // A pause may land between two lines; the vCPU blocks on the next one
    // as soon as it runs again, so later rounds meet a blocked vCPU.
    for round in 0..3 {
        let (status, body, took) = api(&home, "u", "PUT", "/vm/pause");
        assert_eq!(status, 200, "pause {round}: {body}");
        assert!(took < Duration::from_secs(5), "pause took {took:?}");
        if round == 2 {
            let (status, body, _) = api(&home, "u", "PUT", "/snapshots");
            assert_eq!(status, 200, "snapshot: {body}");
        }
        let (status, body, _) = api(&home, "u", "PUT", "/vm/resume");
        assert_eq!(status, 200, "resume {round}: {body}");
    }
    let (status, body, _) = api(&home, "u", "PUT", "/vm/stop");
    assert_eq!(status, 200, "stop: {body}");
    let code = exit_within(&mut child, Duration::from_secs(10), "stop");
    assert_eq!(code, Some(0));
    drop(read_end);
}

#[test]
fn a_test_guest_printing_linuxs_power_off_line_runs_on() {
    if !kvm_available("power-off line") {
        return;
    }
    let home = Home::new("poweroff-line");
    let o = home.run(&[
        "run",
        "--console",
        "stdio",
        "--timeout",
        "60",
        "--append",
        "period_ms=20 region=0 exit_after=3 status=5 say=[____1.5]_reboot:_Power_down",
    ]);
    let out = stdout(&o);
    assert!(out.contains("[    1.5] reboot: Power down\n"), "{out}");
    assert!(out.contains("tick 3 ok\n"), "{out}");
    assert_eq!(o.status.code(), Some(5), "{out}{}", stderr(&o));
}

#[test]
fn a_termination_signal_exits_128_plus_its_number_and_stop_exits_0() {
    if !kvm_available("signals") {
        return;
    }
    let home = Home::new("signals");
    for (signal, code) in [
        (libc::SIGTERM, 143),
        (libc::SIGINT, 130),
        (libc::SIGHUP, 129),
    ] {
        let name = format!("sig{signal}");
        let vm = VmProcess::start(
            &home,
            &name,
            &[
                "run",
                "--name",
                &name,
                "--console",
                "stdio",
                "--timeout",
                "60",
            ],
        );
        vm.socket_ready();
        vm.wait_for(0, "REWIND-READY", |l| l == "REWIND-READY");
        // SAFETY: signals our own child process.
        assert_eq!(unsafe { libc::kill(vm.pid() as i32, signal) }, 0);
        let (status, _) = vm.wait_exit();
        assert_eq!(status, Some(code), "signal {signal}");
    }
    let vm = VmProcess::start(
        &home,
        "api-stop",
        &[
            "run",
            "--name",
            "api-stop",
            "--console",
            "stdio",
            "--timeout",
            "60",
        ],
    );
    vm.socket_ready();
    vm.wait_for(0, "REWIND-READY", |l| l == "REWIND-READY");
    assert_eq!(vm.stop(), Some(0));
}

/// A VM's `disks/` holds the frozen layers its snapshots need and one live
/// overlay per disk: reverts remove the overlay they replace, and the one
/// left when the VM ends is the guest's disk as it left it (exportable).
#[test]
fn a_vm_keeps_one_live_overlay_per_disk_and_reverts_leave_none_behind() {
    if !kvm_available("live overlay cleanup") {
        return;
    }
    let home = Home::new("overlays");
    let base = home.path.join("base.img");
    std::fs::write(&base, vec![0u8; 4 << 20]).unwrap();
    let b = base.to_str().unwrap();
    let vm = start_guest(&home, "d", "60", "mode=disk period_ms=20", &["--disk", b]);
    vm.socket_ready();
    vm.wait_for(0, "tick 2", |l| l == "tick 2 disk ok");
    vm.api_ok(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "s" })),
    );
    for _ in 0..3 {
        let n = vm.lines().len();
        vm.wait_for(n, "a tick", |l| l.ends_with(" disk ok"));
        vm.api_ok("PUT", "/snapshots/s/revert", None);
    }
    let live = vm.api_ok("GET", "/vm", None)["disks"][0]
        .as_str()
        .map(std::path::PathBuf::from)
        .expect("one disk");
    // SIGTERM: an end other than `stop` keeps the overlay too.
    // SAFETY: signals our own child process.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) }, 0);
    assert_eq!(vm.wait_exit().0, Some(143));
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(home.path.join("vms/d/snapshots/s/manifest.json")).unwrap(),
    )
    .unwrap();
    let disks = home.path.join("vms/d/disks");
    let mut want: Vec<std::path::PathBuf> = manifest["disk_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            disks.join(
                std::path::Path::new(p.as_str().unwrap())
                    .file_name()
                    .unwrap(),
            )
        })
        .collect();
    want.push(live);
    want.sort();
    assert_eq!(files_in(&disks), want);
    let out = home.path.join("now.raw");
    let o = home.run(&["disk", "export", "--vm", "d", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 4 << 20);
}

#[test]
fn a_restored_test_guest_with_resumed_1_says_so_before_its_next_tick() {
    if !kvm_available("resumed line") {
        return;
    }
    let home = Home::new("resumed");
    // A 2 s tick: without the wake-up the clone's first line would be the
    // next tick, up to 2 s after the restore.
    let vm = start_guest(&home, "o", "60", "period_ms=2000 region=1 resumed=1", &[]);
    vm.socket_ready();
    vm.wait_for(0, "tick 1", |l| l == "tick 1 ok");
    vm.api_ok(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "s" })),
    );
    assert_eq!(vm.stop(), Some(0));
    let clone = VmProcess::start(
        &home,
        "c",
        &[
            "restore",
            "s",
            "--vm",
            "o",
            "--name",
            "c",
            "--console",
            "stdio",
            "--timeout",
            "60",
            "--expect",
            "^tick 2 ok$",
        ],
    );
    let (status, lines) = clone.wait_exit();
    assert_eq!(status, Some(0), "{lines:?}");
    assert_eq!(lines, vec!["resumed", "tick 2 ok"]);
}
