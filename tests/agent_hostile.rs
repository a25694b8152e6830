//! A guest whose agent is broken or hostile (silent, sending garbage,
//! flooding its line with short lines or one endless line) costs an exec
//! its timeout, never a hang: rewind's host client (the same protocol
//! engine the VMM drives over COM2) on a pty whose other end plays the guest.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rewind::agent::{AgentClient, AgentError, ExecError};

/// The master (rewind's end) and the slave (the guest's), the slave raw so
/// bytes pass as they are and nothing is echoed back.
fn raw_pty() -> (File, File) {
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
    // SAFETY: both fds were just returned by openpty and are owned here.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // SAFETY: termios is plain data; tcgetattr fills it, cfmakeraw and
    // tcsetattr read it, all on an fd we own.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(slave.as_raw_fd(), &mut t), 0);
        libc::cfmakeraw(&mut t);
        assert_eq!(libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t), 0);
    }
    (File::from(master), File::from(slave))
}

/// Plays the guest: writes what `next` gives until the test is over.
struct Guest {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Guest {
    fn start(mut slave: File, mut next: impl FnMut() -> Vec<u8> + Send + 'static) -> Guest {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut sent = 0u64;
            // A full pty blocks the writer until rewind reads: that is the
            // flood rewind must keep up with, so keep writing.
            while !flag.load(Ordering::Relaxed) {
                let chunk = next();
                if slave.write_all(&chunk).is_err() {
                    break;
                }
                sent += chunk.len() as u64;
            }
            sent
        });
        Guest {
            stop,
            thread: Some(thread),
        }
    }

    /// Bytes the guest managed to send.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

const TIMEOUT: Duration = Duration::from_secs(2);

/// Runs a command against `guest`'s agent; it must fail with its timeout.
fn exec_times_out(what: &str, master: File) {
    let mut client = AgentClient::new(master);
    let t = Instant::now();
    let r = client.run("echo hi", TIMEOUT, &mut |_, _| {
        panic!("{what}: output from a guest that never ran the command")
    });
    match r {
        Err(AgentError::Command(ExecError::Timeout(d))) => assert_eq!(d, TIMEOUT, "{what}"),
        other => panic!("{what}: expected the exec's timeout, got {other:?}"),
    }
    eprintln!("{what}: timed out after {:?}", t.elapsed());
}

#[test]
fn a_silent_agent_costs_the_timeout() {
    let (master, _slave) = raw_pty();
    exec_times_out("silent", master);
}

#[test]
fn a_garbage_spewing_agent_costs_the_timeout() {
    let (master, slave) = raw_pty();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let guest = Guest::start(slave, move || {
        (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    });
    exec_times_out("garbage", master);
    let sent = guest.finish();
    eprintln!("garbage: the guest sent {sent} bytes");
}

#[test]
fn a_flood_of_lines_that_look_like_the_protocol_costs_the_timeout() {
    let (master, slave) = raw_pty();
    // An agent that says it is there, then answers for commands nobody
    // asked for, in short lines as fast as the line takes them.
    let lines = b"HELLO rewind-agent 1\nEXIT 999 0\nOUTH 998 6869\nPONG x\nERROR 7 \nEXIT 1\nx\n"
        .repeat(64);
    let guest = Guest::start(slave, move || lines.clone());
    exec_times_out("protocol flood", master);
    let sent = guest.finish();
    eprintln!("protocol flood: the guest sent {sent} bytes");
}

#[test]
fn an_endless_line_costs_the_timeout() {
    let (master, slave) = raw_pty();
    let guest = Guest::start(slave, || vec![b'4'; 4096]);
    exec_times_out("endless line", master);
    let sent = guest.finish();
    eprintln!("endless line: the guest sent {sent} bytes");
}
