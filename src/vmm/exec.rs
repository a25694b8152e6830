//! Running commands in the guest through its exec agent on COM2: requests
//! go out as protocol lines fed into the UART as its FIFO drains; the
//! guest's lines come back through the COM2 inbox. Everything happens on
//! the event loop, so disks and the API keep working while a command runs.
//! The protocol itself is [`crate::agent::Engine`]'s; this is its COM2 driver.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::agent::{Engine, Event, OutputMode, Stream};
use crate::devices::bus::lock;
use crate::devices::serial::{Inbox, SerialDevice};

pub use crate::agent::{ExecError, ExecOutput, ExecResult};

/// Called once with the command's result (the control socket answers its
/// client with it).
pub type ExecCallback = Box<dyn FnOnce(ExecResult)>;

/// Who waits for a command's result.
pub enum Waiter {
    /// An API client (`rewind exec`): told all output at the end.
    Api(ExecCallback),
    /// `rewind run --exec`: output streams to our stdout/stderr and the
    /// run ends with the command's status.
    Console,
    /// A library harness's command (`Vm::start_command`): output dropped,
    /// its status handed back.
    Detached,
}

/// What finished, for the event loop.
pub enum Finished {
    /// A `--exec` command ended with this status.
    Console(i32),
    /// A detached command ended with this status.
    Detached(i32),
    Nothing,
}

pub struct ExecLink {
    pub inbox: Arc<Inbox>,
    engine: Engine,
    waiters: HashMap<u64, Waiter>,
}

impl ExecLink {
    pub fn new(inbox: Arc<Inbox>) -> Self {
        // Ids unique across processes: a guest restored from a snapshot
        // may still send lines about an earlier process's request (its
        // tty buffers are part of the snapshot); they must not match.
        let first_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        ExecLink {
            inbox,
            engine: Engine::new(first_id),
            waiters: HashMap::new(),
        }
    }

    /// Starts `cmd` (see [`Engine::start`]); returns its id.
    pub fn start(
        &mut self,
        cmd: String,
        timeout: Duration,
        waiter: Waiter,
        com2: &Mutex<SerialDevice>,
    ) -> u64 {
        let mode = match waiter {
            Waiter::Api(_) => OutputMode::Collect,
            Waiter::Console | Waiter::Detached => OutputMode::Stream,
        };
        let id = self.engine.start(&cmd, timeout, mode);
        self.waiters.insert(id, waiter);
        self.feed(com2);
        id
    }

    /// Moves queued input into the UART as far as its FIFO allows.
    pub fn feed(&mut self, com2: &Mutex<SerialDevice>) {
        let sent = lock(com2).feed_from(self.engine.outgoing());
        if !sent.is_empty() && std::env::var_os("REWIND_TRACE_AGENT").is_some() {
            eprintln!("rewind: agent -> {:?}", String::from_utf8_lossy(&sent));
        }
    }

    /// The earliest deadline of a running command, for the event loop's timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.engine.next_deadline()
    }

    /// Handles what the guest sent and expired commands.
    pub fn process(&mut self, com2: &Mutex<SerialDevice>) -> Finished {
        let mut events = self.engine.receive(&self.inbox.take());
        events.extend(self.engine.expire(Instant::now()));
        let mut finished = Finished::Nothing;
        for event in events {
            if let Some(done) = self.on_event(event) {
                finished = done;
            }
        }
        self.feed(com2);
        finished
    }

    fn on_event(&mut self, event: Event) -> Option<Finished> {
        match event {
            // Only `--exec` and detached commands stream; the latter's
            // output goes nowhere.
            Event::Output(id, stream, data) => {
                if !matches!(self.waiters.get(&id), Some(Waiter::Console)) {
                    return None;
                }
                let _ = match stream {
                    Stream::Stdout => std::io::stdout()
                        .write_all(&data)
                        .and_then(|_| std::io::stdout().flush()),
                    Stream::Stderr => std::io::stderr().write_all(&data),
                };
                None
            }
            Event::Done(id, result) => match (self.waiters.remove(&id)?, result) {
                (Waiter::Api(tell), result) => {
                    tell(result);
                    None
                }
                (Waiter::Console, Ok(out)) => Some(Finished::Console(out.status)),
                (Waiter::Detached, Ok(out)) => Some(Finished::Detached(out.status)),
                (waiter, Err(err)) => {
                    eprintln!("rewind: {err}");
                    let timed_out = matches!(err, ExecError::Timeout(_));
                    let status = if timed_out {
                        crate::vmm::EXIT_TIMEOUT
                    } else {
                        1
                    };
                    Some(match waiter {
                        Waiter::Detached => Finished::Detached(status),
                        _ => Finished::Console(status),
                    })
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{MAX_AGENT_LINE, MAX_API_OUTPUT};
    use crate::devices::serial::{SerialOut, UartEvents};
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use vmm_sys_util::eventfd::EventFd;

    struct Link {
        link: ExecLink,
        guest: SerialOut,
        com2: Mutex<SerialDevice>,
    }

    impl Link {
        fn new() -> Link {
            let inbox = Inbox::new().unwrap();
            let guest = SerialOut::Inbox(inbox.clone());
            let com2 = Mutex::new(SerialDevice::new(
                EventFd::new(0).unwrap(),
                guest.clone(),
                UartEvents { drained: None },
            ));
            Link {
                link: ExecLink::new(inbox),
                guest,
                com2,
            }
        }

        /// Starts `cmd` for an API client; returns its id and the client's end.
        fn start(&mut self, cmd: &str) -> (u64, UnixStream) {
            let (ours, theirs) = UnixStream::pair().unwrap();
            theirs
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let id = self.link.start(
                cmd.into(),
                Duration::from_secs(60),
                Waiter::Api(crate::control::exec_waiter(ours)),
                &self.com2,
            );
            (id, theirs)
        }

        /// What the guest agent sends, in pieces the inbox takes whole.
        fn guest_sends(&mut self, bytes: &[u8]) {
            for chunk in bytes.chunks(256 << 10) {
                self.guest.write_all(chunk).unwrap();
                self.link.process(&self.com2);
                assert!(self.link.engine.buffered() <= MAX_AGENT_LINE);
            }
        }
    }

    fn answer(mut client: UnixStream) -> String {
        let mut text = String::new();
        client
            .read_to_string(&mut text)
            .expect("the exec caller got an answer");
        text
    }

    #[test]
    fn a_detached_command_hands_back_its_status() {
        let mut l = Link::new();
        let id = l.link.start(
            "/bin/rewind-fuzz-example".into(),
            Duration::from_secs(60),
            Waiter::Detached,
            &l.com2,
        );
        let said = format!("HELLO rewind-agent 1\nOUTH {id} 6869\nEXIT {id} 3\n");
        l.guest.write_all(said.as_bytes()).unwrap();
        assert!(matches!(l.link.process(&l.com2), Finished::Detached(3)));
        assert!(l.link.engine.is_idle());
    }

    #[test]
    fn a_line_without_end_is_bounded_and_fails_its_command() {
        let mut l = Link::new();
        let (id, client) = l.start("yes | tr -d '\\n'");
        l.guest_sends(b"HELLO rewind-agent 1\n");
        let mut line = format!("OUTH {id} ").into_bytes();
        line.resize(3 * MAX_AGENT_LINE, b'4');
        l.guest_sends(&line);
        let text = answer(client);
        assert!(text.starts_with("HTTP/1.1 502"), "{text}");
        assert!(text.contains("a line over 1 MiB"), "{text}");
        // The rest of the long line is dropped, and the link goes on.
        let (id2, client2) = l.start("true");
        l.guest_sends(format!("4444\nEXIT {id2} 0\n").as_bytes());
        let text = answer(client2);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("\"status\":0"), "{text}");
    }

    #[test]
    fn a_guest_flooding_com2_gets_its_exec_timed_out() {
        let mut l = Link::new();
        let (id, client) = l.start("echo hi");
        // Garbage, answers for commands nobody asked for, and 1 MiB runs
        // of short lines as the inbox hands them over (it holds 1 MiB).
        let mut junk = b"HELLO rewind-agent 1\n\x00\xff\xfe garbage\rEXIT 999 0\n".to_vec();
        junk.extend(format!("EXIT {id}\nOUTH {id} zz\nERRH {id} 4\nPONG\n").bytes());
        for _ in 0..8 {
            l.guest_sends(&b"x\n".repeat(1 << 19));
            l.guest_sends(&junk);
        }
        assert!(!l.link.engine.is_idle(), "nothing in that ends the command");
        let late = Instant::now() + Duration::from_secs(61);
        for event in l.link.engine.expire(late) {
            let _ = l.link.on_event(event);
        }
        let text = answer(client);
        assert!(text.starts_with("HTTP/1.1 504"), "{text}");
        assert!(text.contains("did not finish within"), "{text}");
    }

    #[test]
    fn an_api_exec_keeps_at_most_16_mib_of_output() {
        let mut l = Link::new();
        let (id, client) = l.start("cat /dev/zero");
        l.guest_sends(b"HELLO rewind-agent 1\n");
        let chunk = format!("OUTH {id} {}\n", "00".repeat(256 << 10));
        for _ in 0..(MAX_API_OUTPUT / (256 << 10) + 1) {
            l.guest_sends(chunk.as_bytes());
        }
        let text = answer(client);
        assert!(text.starts_with("HTTP/1.1 507"), "{text}");
        assert!(text.contains("passed 16 MiB"), "{text}");
        assert!(l.link.engine.is_idle());
    }
}
