//! Running commands in the guest through its exec agent on COM2: requests
//! go out as protocol lines fed into the UART as its FIFO drains; the
//! guest's lines come back through the COM2 inbox. Everything happens on
//! the event loop, so disks and the API keep working while a command runs.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::{self, Message, Stream};
use crate::devices::bus::lock;
use crate::devices::serial::{Inbox, SerialDevice};

/// Longest line kept from the guest agent: its lines carry small chunks,
/// so anything longer is garbage, and a guest that never sends a newline
/// must not grow host memory without bound.
pub const MAX_AGENT_LINE: usize = 1 << 20;

/// Most output (stdout and stderr together) kept for an API exec, which is
/// answered with all of it at the end.
pub const MAX_API_OUTPUT: usize = 16 << 20;

/// What an API exec ended with: the command's status and all its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Why a command has no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    #[error("the command did not finish within {0:?}")]
    Timeout(Duration),
    #[error("the guest agent sent a line over {} MiB; the command's result is lost", MAX_AGENT_LINE >> 20)]
    LineTooLong,
    #[error(
        "the command's output passed {} MiB, the most an API exec keeps; \
         redirect it to a file in the guest",
        MAX_API_OUTPUT >> 20
    )]
    OutputTooLarge,
    #[error("the guest agent refused the command: {0}")]
    Refused(String),
}

pub type ExecResult = Result<ExecOutput, ExecError>;

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
}

struct Pending {
    waiter: Waiter,
    /// The request line, kept to resend once if it reached the agent garbled.
    request: String,
    resent: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    deadline: Instant,
    timeout: Duration,
}

/// What finished, for the event loop.
pub enum Finished {
    /// A `--exec` command ended with this status.
    Console(i32),
    Nothing,
}

pub struct ExecLink {
    pub inbox: Arc<Inbox>,
    partial: Vec<u8>,
    /// The line being received passed `MAX_AGENT_LINE`: drop bytes up to
    /// its newline, so its tail is not read as a line of its own.
    skipping: bool,
    to_guest: VecDeque<u8>,
    pending: HashMap<u64, Pending>,
    /// Commands waiting for the agent to say it is there.
    queued: Vec<(u64, String)>,
    ready: bool,
    next_id: u64,
}

impl ExecLink {
    pub fn new(inbox: Arc<Inbox>) -> Self {
        ExecLink {
            inbox,
            partial: Vec::new(),
            skipping: false,
            to_guest: VecDeque::new(),
            pending: HashMap::new(),
            queued: Vec::new(),
            ready: false,
            // Ids unique across processes: a guest restored from a snapshot
            // may still send lines about an earlier process's request (its
            // tty buffers are part of the snapshot); they must not match.
            next_id: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(1),
        }
    }

    /// Queues `cmd`; it is sent once the agent answers (HELLO at boot, or
    /// PONG to the probe sent here, for a guest restored with its agent
    /// already running).
    pub fn start(
        &mut self,
        cmd: String,
        timeout: Duration,
        waiter: Waiter,
        com2: &std::sync::Mutex<SerialDevice>,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(
            id,
            Pending {
                waiter,
                request: agent::encode_run(id, &cmd),
                resent: false,
                stdout: Vec::new(),
                stderr: Vec::new(),
                deadline: Instant::now() + timeout,
                timeout,
            },
        );
        if self.ready {
            self.to_guest.extend(agent::encode_run(id, &cmd).bytes());
        } else {
            self.queued.push((id, cmd));
            // A bare newline first ends any half line left by an earlier client.
            self.to_guest.extend(format!("\nPING {id}\n").bytes());
        }
        self.feed(com2);
    }

    /// Moves queued input into the UART as far as its FIFO allows.
    pub fn feed(&mut self, com2: &std::sync::Mutex<SerialDevice>) {
        let sent = lock(com2).feed_from(&mut self.to_guest);
        if !sent.is_empty() && std::env::var_os("REWIND_TRACE_AGENT").is_some() {
            eprintln!("rewind: agent -> {:?}", String::from_utf8_lossy(&sent));
        }
    }

    /// The earliest deadline of a running command, for the event loop's timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    /// Adds what the guest sent to the partial line, leaving out the rest
    /// of a line that grew too long.
    fn take_inbox(&mut self) {
        let mut bytes = self.inbox.take();
        if self.skipping {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    bytes.drain(..=pos);
                    self.skipping = false;
                }
                None => return,
            }
        }
        self.partial.extend(bytes);
    }

    /// Handles what the guest sent and expired commands.
    pub fn process(&mut self, com2: &std::sync::Mutex<SerialDevice>) -> Finished {
        self.take_inbox();
        let mut finished = Finished::Nothing;
        loop {
            let Some(pos) = self.partial.iter().position(|&b| b == b'\n') else {
                if self.partial.len() > MAX_AGENT_LINE {
                    // Its newline has not come yet: drop it when it does.
                    self.skipping = true;
                    let line = std::mem::take(&mut self.partial);
                    if let Some(done) = self.overlong_line(&line) {
                        finished = done;
                    }
                }
                break;
            };
            if pos > MAX_AGENT_LINE {
                let line: Vec<u8> = self.partial.drain(..=pos).collect();
                if let Some(done) = self.overlong_line(&line) {
                    finished = done;
                }
                continue;
            }
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            if std::env::var_os("REWIND_TRACE_AGENT").is_some() {
                eprintln!("rewind: agent <- {:?}", String::from_utf8_lossy(&line));
            }
            let Ok(msg) = agent::parse_line(&String::from_utf8_lossy(&line)) else {
                continue;
            };
            if let Some(done) = self.on_message(msg) {
                finished = done;
            }
        }
        if self.ready && !self.queued.is_empty() {
            for (id, cmd) in self.queued.drain(..) {
                self.to_guest.extend(agent::encode_run(id, &cmd).bytes());
            }
        }
        let now = Instant::now();
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(p) = self.pending.remove(&id) {
                self.queued.retain(|(q, _)| *q != id);
                let err = ExecError::Timeout(p.timeout);
                match p.waiter {
                    Waiter::Api(tell) => tell(Err(err)),
                    Waiter::Console => {
                        eprintln!("rewind: {err}");
                        finished = Finished::Console(crate::vmm::EXIT_TIMEOUT);
                    }
                }
            }
        }
        self.feed(com2);
        finished
    }

    /// Fails the command a line over `MAX_AGENT_LINE` was about, if its
    /// start names one.
    fn overlong_line(&mut self, line: &[u8]) -> Option<Finished> {
        let head = String::from_utf8_lossy(&line[..line.len().min(64)]).into_owned();
        let id: u64 = head.split(' ').nth(1)?.parse().ok()?;
        let p = self.pending.remove(&id)?;
        self.queued.retain(|(q, _)| *q != id);
        fail(p.waiter, ExecError::LineTooLong)
    }

    fn on_message(&mut self, msg: Message) -> Option<Finished> {
        match msg {
            Message::Hello(_) | Message::Pong(_) => {
                self.ready = true;
                None
            }
            Message::Output(stream, id, data) => {
                let p = self.pending.get_mut(&id)?;
                if let Waiter::Console = p.waiter {
                    let _ = match stream {
                        Stream::Stdout => std::io::stdout()
                            .write_all(&data)
                            .and_then(|_| std::io::stdout().flush()),
                        Stream::Stderr => std::io::stderr().write_all(&data),
                    };
                } else if p.stdout.len() + p.stderr.len() + data.len() > MAX_API_OUTPUT {
                    let p = self.pending.remove(&id)?;
                    return fail(p.waiter, ExecError::OutputTooLarge);
                } else {
                    match stream {
                        Stream::Stdout => p.stdout.extend_from_slice(&data),
                        Stream::Stderr => p.stderr.extend_from_slice(&data),
                    }
                }
                None
            }
            Message::Exit(id, status) => {
                let p = self.pending.remove(&id)?;
                match p.waiter {
                    Waiter::Api(tell) => {
                        tell(Ok(ExecOutput {
                            status,
                            stdout: p.stdout,
                            stderr: p.stderr,
                        }));
                        None
                    }
                    Waiter::Console => Some(Finished::Console(status)),
                }
            }
            Message::Error(id, reason) => {
                let num: u64 = id.parse().ok()?;
                // A line garbled on its way (a byte lost before the agent set
                // its tty raw) is worth one more try before giving up.
                if let Some(p) = self
                    .pending
                    .get_mut(&num)
                    .filter(|p| !p.resent && reason == "unknown-verb")
                {
                    p.resent = true;
                    let line = p.request.clone();
                    self.to_guest.extend(format!("\n{line}").bytes());
                    return None;
                }
                let p = self.pending.remove(&num)?;
                fail(p.waiter, ExecError::Refused(reason))
            }
        }
    }
}

/// Tells the waiter its command failed.
fn fail(waiter: Waiter, err: ExecError) -> Option<Finished> {
    match waiter {
        Waiter::Api(tell) => {
            tell(Err(err));
            None
        }
        Waiter::Console => {
            eprintln!("rewind: {err}");
            Some(Finished::Console(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::{SerialOut, UartEvents};
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;
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
            let id = self.link.next_id;
            self.link.start(
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
                assert!(self.link.partial.len() <= MAX_AGENT_LINE);
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
        assert!(l.link.pending.is_empty());
    }
}
