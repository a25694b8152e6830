//! The exec agent's protocol, tested where the guest cannot run: the real
//! guest agent script (guest-images/linux/agent) under busybox, on a pty
//! pair standing in for the guest's ttyS1, driven by rewind's host client.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use rewind::agent::{AgentClient, Stream};

fn busybox() -> Option<String> {
    if let Ok(b) = std::env::var("REWIND_BUSYBOX") {
        return Some(b);
    }
    let found = Command::new("sh")
        .args(["-c", "command -v busybox"])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
    (!path.is_empty()).then_some(path)
}

/// The master side, the slave's path, and the slave fd itself: it stays
/// open in the test, since with no slave fd open at all reads on the master
/// fail with EIO before the agent has opened the line.
fn openpty() -> (File, String, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills two fds; name/termios/winsize may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty failed");
    let name = std::fs::read_link(format!("/proc/self/fd/{slave}"))
        .unwrap()
        .display()
        .to_string();
    // SAFETY: both fds were just returned by openpty and are owned here.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    // SAFETY: as above.
    (unsafe { File::from_raw_fd(master) }, name, slave)
}

#[test]
fn agent_runs_commands_over_a_pty() {
    let Some(busybox) = busybox() else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("busybox is missing and CI=true (.ci/run installs busybox-static)");
        }
        eprintln!("SKIPPED agent_runs_commands_over_a_pty: no busybox on this machine");
        return;
    };
    let (master, slave, _slave_fd) = openpty();
    let agent = concat!(env!("CARGO_MANIFEST_DIR"), "/guest-images/linux/agent");
    let child = Command::new(&busybox)
        .args(["sh", agent, &slave])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("busybox sh starts");
    let _agent = KillGroup(child);
    let mut client = AgentClient::new(master);
    let t = Duration::from_secs(20);
    client.ping(t).expect("PING answered");

    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut collect = |s: Stream, d: &[u8]| match s {
        Stream::Stdout => out.extend_from_slice(d),
        Stream::Stderr => err.extend_from_slice(d),
    };
    assert_eq!(client.run("echo $((6*7))", t, &mut collect).unwrap(), 0);
    assert_eq!(
        client
            .run("echo oops >&2; exit 7", t, &mut collect)
            .unwrap(),
        7
    );
    assert_eq!(
        client.run("printf 'a\\nb'; true", t, &mut collect).unwrap(),
        0
    );
    assert_eq!(String::from_utf8_lossy(&out), "42\na\nb");
    assert_eq!(String::from_utf8_lossy(&err), "oops\n");
    // Output bigger than one chunk arrives whole and in order.
    let mut big = Vec::new();
    let status = client
        .run(
            "i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done",
            t,
            &mut |_, d| big.extend_from_slice(d),
        )
        .unwrap();
    assert_eq!(status, 0);
    let text = String::from_utf8_lossy(&big);
    assert_eq!(text.lines().count(), 2000);
    assert_eq!(text.lines().last(), Some("line1999"));
}

/// Ends the agent and its helpers (a process group) even when an assertion fails.
struct KillGroup(std::process::Child);

impl Drop for KillGroup {
    fn drop(&mut self) {
        // SAFETY: signals the process group this test created.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}
