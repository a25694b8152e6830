//! Running commands in the guest through its exec agent on COM2: requests
//! go out as protocol lines fed into the UART as its FIFO drains; the
//! guest's lines come back through the COM2 inbox. Everything happens on
//! the event loop, so disks and the API keep working while a command runs.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::{self, Message, Stream};
use crate::control::ApiResponse;
use crate::devices::bus::lock;
use crate::devices::serial::{Inbox, SerialDevice};

/// Who waits for a command's result.
pub enum Waiter {
    /// An API client (`rewind exec`): answered with all output at the end.
    Api(UnixStream),
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

    /// The earliest deadline of a running command, for the poll timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    /// Handles what the guest sent and expired commands.
    pub fn process(&mut self, com2: &std::sync::Mutex<SerialDevice>) -> Finished {
        self.partial.extend(self.inbox.take());
        let mut finished = Finished::Nothing;
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
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
                let msg = format!("the command did not finish within {:?}", p.timeout);
                match p.waiter {
                    Waiter::Api(stream) => {
                        crate::control::server::respond(&stream, &ApiResponse::error(504, msg))
                    }
                    Waiter::Console => {
                        eprintln!("rewind: {msg}");
                        finished = Finished::Console(crate::vmm::EXIT_TIMEOUT);
                    }
                }
            }
        }
        self.feed(com2);
        finished
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
                    Waiter::Api(stream) => {
                        let body = serde_json::json!({
                            "status": status,
                            "stdout": String::from_utf8_lossy(&p.stdout),
                            "stderr": String::from_utf8_lossy(&p.stderr),
                        });
                        crate::control::server::respond(&stream, &ApiResponse::ok(body));
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
                let msg = format!("the guest agent refused the command: {reason}");
                match p.waiter {
                    Waiter::Api(stream) => {
                        crate::control::server::respond(&stream, &ApiResponse::error(500, msg));
                        None
                    }
                    Waiter::Console => {
                        eprintln!("rewind: {msg}");
                        Some(Finished::Console(1))
                    }
                }
            }
        }
    }
}
