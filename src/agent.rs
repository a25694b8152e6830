//! Host side of the guest exec agent (guest-images/linux/agent, protocol in
//! guest-images/linux/PROTOCOL.md): one line per message over a byte
//! stream (the guest's ttyS1, or a pty in tests).
//!
//! host -> guest: `RUNH <id> <hex command>` (or `RUN` with base64), `PING <id>`
//! guest -> host: `HELLO rewind-agent <version>`, `OUTH|ERRH <id> <hex chunk>`
//! (or `OUT|ERR` with base64), `EXIT <id> <status>`, `PONG <id>`,
//! `ERROR <id> <reason>`. Hex is what the agent uses: busybox runs its
//! `base64` applet by re-exec'ing itself, which is fragile on PVM hosts.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the guest agent's channel closed")]
    Closed,
    #[error("talking to the guest agent: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Command(#[from] ExecError),
    #[error("the guest agent sent a malformed line: {0:?}")]
    Malformed(String),
}

/// Which guest stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One parsed line from the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(String),
    Output(Stream, u64, Vec<u8>),
    Exit(u64, i32),
    Pong(u64),
    Error(String, String),
}

pub fn encode_run(id: u64, command: &str) -> String {
    let hex: String = command.bytes().map(|b| format!("{b:02x}")).collect();
    format!("RUNH {id} {hex}\n")
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

pub fn parse_line(line: &str) -> Result<Message, AgentError> {
    let bad = || AgentError::Malformed(line.chars().take(120).collect());
    let mut words = line.trim_end_matches(['\r', '\n']).split(' ');
    let verb = words.next().ok_or_else(bad)?;
    let id = words.next();
    let arg = words.next();
    let num = |s: Option<&str>| s.and_then(|s| s.parse::<u64>().ok()).ok_or_else(bad);
    Ok(match verb {
        "HELLO" => Message::Hello(arg.unwrap_or_default().to_string()),
        "OUT" | "ERR" => {
            let data = B64.decode(arg.unwrap_or_default()).map_err(|_| bad())?;
            let stream = if verb == "OUT" {
                Stream::Stdout
            } else {
                Stream::Stderr
            };
            Message::Output(stream, num(id)?, data)
        }
        "OUTH" | "ERRH" => {
            let data = decode_hex(arg.unwrap_or_default()).ok_or_else(bad)?;
            let stream = if verb == "OUTH" {
                Stream::Stdout
            } else {
                Stream::Stderr
            };
            Message::Output(stream, num(id)?, data)
        }
        "EXIT" => Message::Exit(num(id)?, arg.and_then(|s| s.parse().ok()).ok_or_else(bad)?),
        "PONG" => Message::Pong(num(id)?),
        "ERROR" => Message::Error(
            id.unwrap_or("-").to_string(),
            arg.unwrap_or_default().to_string(),
        ),
        _ => return Err(bad()),
    })
}

/// Longest line kept from the guest agent: its lines carry small chunks,
/// so anything longer is garbage, and a guest that never sends a newline
/// must not grow host memory without bound.
pub const MAX_AGENT_LINE: usize = 1 << 20;

/// Most output (stdout and stderr together) kept for a command whose
/// output is collected and handed over at the end.
pub const MAX_API_OUTPUT: usize = 16 << 20;

/// What a collected command ended with: its status and all its output.
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

/// What happens to a command's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputMode {
    /// Kept (at most [`MAX_API_OUTPUT`]) and handed over with the status.
    Collect,
    /// Handed over chunk by chunk as [`Event::Output`], without a cap.
    Stream,
}

/// What the engine has to tell its owner after input or time passed.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A chunk of a streamed command's output.
    Output(u64, Stream, Vec<u8>),
    /// A command ended (a streamed one with empty output).
    Done(u64, ExecResult),
}

struct Pending {
    /// The request line, kept to resend once if it reached the agent garbled.
    request: String,
    resent: bool,
    mode: OutputMode,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    deadline: Instant,
    timeout: Duration,
}

/// A line from the agent: whole, or only the start of one over
/// [`MAX_AGENT_LINE`] (enough to name its command).
enum Line {
    Whole(Vec<u8>),
    Overlong(Vec<u8>),
}

/// The host side of the protocol without any I/O: the owner hands it the
/// guest's bytes and the time, sends what [`Engine::outgoing`] holds, and
/// acts on the [`Event`]s. Both the VMM (over COM2) and the pty client
/// below drive it, so framing and request matching exist once.
pub struct Engine {
    partial: Vec<u8>,
    /// Leading bytes of `partial` already searched for a newline: a guest
    /// sending a long line a few bytes at a time must not make every
    /// receive rescan it (that cost seconds of the event loop per MiB).
    scanned: usize,
    /// The line being received passed `MAX_AGENT_LINE`: drop bytes up to
    /// its newline, so its tail is not read as a line of its own.
    skipping: bool,
    to_guest: VecDeque<u8>,
    pending: HashMap<u64, Pending>,
    /// Commands waiting for the agent to say it is there.
    queued: Vec<u64>,
    ready: bool,
    next_id: u64,
}

fn trace() -> bool {
    std::env::var_os("REWIND_TRACE_AGENT").is_some()
}

impl Engine {
    /// An engine numbering its requests from `first_id`.
    pub fn new(first_id: u64) -> Self {
        Engine {
            partial: Vec::new(),
            scanned: 0,
            skipping: false,
            to_guest: VecDeque::new(),
            pending: HashMap::new(),
            queued: Vec::new(),
            ready: false,
            next_id: first_id,
        }
    }

    /// Bytes to send to the agent; the owner drains as many as it can.
    pub fn outgoing(&mut self) -> &mut VecDeque<u8> {
        &mut self.to_guest
    }

    /// Whether the agent has said it is there (HELLO, or a PONG).
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Asks the agent to say it is there; returns the probe's id.
    pub fn probe(&mut self) -> u64 {
        let id = self.take_id();
        // A bare newline first ends any half line left by an earlier client.
        self.to_guest.extend(format!("\nPING {id}\n").bytes());
        id
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Starts `cmd`; returns its id. It is sent once the agent answers
    /// (HELLO at boot, or PONG to the probe sent here, for a guest
    /// restored with its agent already running).
    pub fn start(&mut self, cmd: &str, timeout: Duration, mode: OutputMode) -> u64 {
        let id = self.take_id();
        let request = encode_run(id, cmd);
        if self.ready {
            self.to_guest.extend(request.bytes());
        } else {
            self.queued.push(id);
            self.to_guest.extend(format!("\nPING {id}\n").bytes());
        }
        let pending = Pending {
            request,
            resent: false,
            mode,
            stdout: Vec::new(),
            stderr: Vec::new(),
            deadline: Instant::now() + timeout,
            timeout,
        };
        self.pending.insert(id, pending);
        id
    }

    /// The earliest deadline of a running command.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    /// Whether no command is running.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// Bytes of an unfinished line held.
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// Takes what the guest sent; returns what it meant.
    pub fn receive(&mut self, mut bytes: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        if self.skipping {
            let Some(pos) = bytes.iter().position(|&b| b == b'\n') else {
                return events;
            };
            bytes = &bytes[pos + 1..];
            self.skipping = false;
        }
        self.partial.extend_from_slice(bytes);
        let trace = trace();
        for line in self.take_lines() {
            let line = match line {
                Line::Whole(line) => line,
                Line::Overlong(head) => {
                    self.overlong_line(&head, &mut events);
                    continue;
                }
            };
            if trace {
                eprintln!("rewind: agent <- {:?}", String::from_utf8_lossy(&line));
            }
            // Noise (a shell prompt, an echo) is skipped.
            if let Ok(msg) = parse_line(&String::from_utf8_lossy(&line)) {
                self.on_message(msg, &mut events);
            }
        }
        if self.ready {
            for id in std::mem::take(&mut self.queued) {
                if let Some(p) = self.pending.get(&id) {
                    self.to_guest.extend(p.request.bytes());
                }
            }
        }
        events
    }

    /// Every complete line received, in order. Lines are cut out of
    /// `partial` by index and the rest moved once: draining line by line
    /// moved the whole remainder per line, and a guest sending 1 MiB of
    /// short lines kept the event loop busy for seconds.
    fn take_lines(&mut self) -> Vec<Line> {
        let mut lines = Vec::new();
        let mut start = 0;
        let mut from = self.scanned.min(self.partial.len());
        while let Some(i) = self.partial[from..].iter().position(|&b| b == b'\n') {
            let end = from + i;
            let line = &self.partial[start..=end];
            lines.push(if end - start <= MAX_AGENT_LINE {
                Line::Whole(line.to_vec())
            } else {
                Line::Overlong(line[..64].to_vec())
            });
            start = end + 1;
            from = start;
        }
        self.partial.drain(..start);
        self.scanned = self.partial.len();
        if self.partial.len() > MAX_AGENT_LINE {
            // Its newline has not come yet: drop it when it does.
            self.skipping = true;
            self.scanned = 0;
            let line = std::mem::take(&mut self.partial);
            lines.push(Line::Overlong(line[..64].to_vec()));
        }
        lines
    }

    /// Fails the command a line over `MAX_AGENT_LINE` was about, if its
    /// start names one.
    fn overlong_line(&mut self, line: &[u8], events: &mut Vec<Event>) {
        let head = String::from_utf8_lossy(&line[..line.len().min(64)]).into_owned();
        if let Some(id) = head.split(' ').nth(1).and_then(|s| s.parse().ok()) {
            self.fail(id, ExecError::LineTooLong, events);
        }
    }

    fn fail(&mut self, id: u64, err: ExecError, events: &mut Vec<Event>) {
        if self.pending.remove(&id).is_some() {
            self.queued.retain(|q| *q != id);
            events.push(Event::Done(id, Err(err)));
        }
    }

    /// Fails the commands whose deadline is `now` or earlier.
    pub fn expire(&mut self, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        let expired: Vec<(u64, Duration)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, p)| (*id, p.timeout))
            .collect();
        for (id, timeout) in expired {
            self.fail(id, ExecError::Timeout(timeout), &mut events);
        }
        events
    }

    fn on_message(&mut self, msg: Message, events: &mut Vec<Event>) {
        match msg {
            Message::Hello(_) | Message::Pong(_) => self.ready = true,
            Message::Output(stream, id, data) => self.on_output(id, stream, data, events),
            Message::Exit(id, status) => {
                if let Some(p) = self.pending.remove(&id) {
                    let out = ExecOutput {
                        status,
                        stdout: p.stdout,
                        stderr: p.stderr,
                    };
                    events.push(Event::Done(id, Ok(out)));
                }
            }
            Message::Error(id, reason) => {
                let Ok(id) = id.parse() else { return };
                // A line garbled on its way (a byte lost before the agent set
                // its tty raw) is worth one more try before giving up.
                if let Some(p) = self
                    .pending
                    .get_mut(&id)
                    .filter(|p| !p.resent && reason == "unknown-verb")
                {
                    p.resent = true;
                    self.to_guest.extend(format!("\n{}", p.request).bytes());
                    return;
                }
                self.fail(id, ExecError::Refused(reason), events);
            }
        }
    }

    fn on_output(&mut self, id: u64, stream: Stream, data: Vec<u8>, events: &mut Vec<Event>) {
        let Some(p) = self.pending.get_mut(&id) else {
            return;
        };
        if p.mode == OutputMode::Stream {
            events.push(Event::Output(id, stream, data));
        } else if p.stdout.len() + p.stderr.len() + data.len() > MAX_API_OUTPUT {
            self.fail(id, ExecError::OutputTooLarge, events);
        } else {
            match stream {
                Stream::Stdout => p.stdout.extend_from_slice(&data),
                Stream::Stderr => p.stderr.extend_from_slice(&data),
            }
        }
    }
}

/// A blocking client over any pollable byte stream (a pty in tests): a
/// thin loop around [`Engine`].
pub struct AgentClient<S: Read + Write + AsRawFd> {
    stream: S,
    engine: Engine,
}

impl<S: Read + Write + AsRawFd> AgentClient<S> {
    pub fn new(stream: S) -> Self {
        AgentClient {
            stream,
            engine: Engine::new(1),
        }
    }

    /// Sends what the engine holds, then waits for the guest's bytes until
    /// `deadline` and hands them to the engine.
    fn turn(&mut self, deadline: Instant, limit: Duration) -> Result<Vec<Event>, AgentError> {
        let out: Vec<u8> = self.engine.outgoing().drain(..).collect();
        self.stream.write_all(&out)?;
        let now = Instant::now();
        if deadline <= now {
            return Err(AgentError::Timeout(limit));
        }
        // Wake for the engine's own deadlines too, so they fail on time.
        let until = self
            .engine
            .next_deadline()
            .map_or(deadline, |d| d.min(deadline));
        let left = until.saturating_duration_since(now);
        let mut pfd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let mut buf = [0u8; 4096];
        let got = match n {
            0 => 0,
            _ => match self.stream.read(&mut buf) {
                Ok(0) => return Err(AgentError::Closed),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) if e.raw_os_error() == Some(libc::EIO) => return Err(AgentError::Closed),
                Err(e) => return Err(e.into()),
            },
        };
        let mut events = self.engine.receive(&buf[..got]);
        events.extend(self.engine.expire(Instant::now()));
        Ok(events)
    }

    /// Waits until the agent says it is there.
    pub fn ping(&mut self, timeout: Duration) -> Result<(), AgentError> {
        self.engine.probe();
        let deadline = Instant::now() + timeout;
        while !self.engine.is_ready() {
            self.turn(deadline, timeout)?;
        }
        Ok(())
    }

    /// Runs `command` in the guest, handing output chunks to `output` as they
    /// arrive; returns the command's exit status.
    pub fn run(
        &mut self,
        command: &str,
        timeout: Duration,
        output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<i32, AgentError> {
        let id = self.engine.start(command, timeout, OutputMode::Stream);
        // The engine fails the command at its deadline; this one is a backstop.
        let deadline = Instant::now() + timeout + Duration::from_secs(1);
        loop {
            for event in self.turn(deadline, timeout)? {
                match event {
                    Event::Output(got, stream, data) if got == id => output(stream, &data),
                    Event::Done(got, result) if got == id => return Ok(result?.status),
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        assert_eq!(encode_run(3, "echo hi"), "RUNH 3 6563686f206869\n");
        assert_eq!(
            parse_line("OUTH 3 34320a").unwrap(),
            Message::Output(Stream::Stdout, 3, b"42\n".to_vec())
        );
        assert!(parse_line("OUTH 3 3").is_err());
        assert!(parse_line("ERRH 3 zz").is_err());
        assert_eq!(
            parse_line("OUT 3 NDIK").unwrap(),
            Message::Output(Stream::Stdout, 3, b"42\n".to_vec())
        );
        assert_eq!(
            parse_line("ERR 3 eA==\r").unwrap(),
            Message::Output(Stream::Stderr, 3, b"x".to_vec())
        );
        assert_eq!(parse_line("EXIT 3 7").unwrap(), Message::Exit(3, 7));
        assert_eq!(parse_line("PONG 9").unwrap(), Message::Pong(9));
        assert!(matches!(
            parse_line("HELLO rewind-agent 1").unwrap(),
            Message::Hello(_)
        ));
        assert!(parse_line("OUT x NDIK").is_err());
        assert!(parse_line("OUT 3 !!!").is_err());
        assert!(parse_line("EXIT 3").is_err());
        assert!(parse_line("~ # ").is_err());
    }

    fn sent(e: &mut Engine) -> String {
        String::from_utf8(e.outgoing().drain(..).collect()).unwrap()
    }

    const T: Duration = Duration::from_secs(60);

    #[test]
    fn commands_wait_for_the_agent_to_answer_a_ping() {
        let mut e = Engine::new(5);
        let id = e.start("true", T, OutputMode::Collect);
        assert_eq!(sent(&mut e), "\nPING 5\n");
        assert!(e.receive(b"~ # PING 5\r\n").is_empty(), "noise is skipped");
        assert_eq!(sent(&mut e), "");
        assert!(e.receive(b"PONG 5\n").is_empty());
        assert_eq!(sent(&mut e), encode_run(id, "true"));
        // Once ready, commands go out at once.
        let id2 = e.start("false", T, OutputMode::Collect);
        assert_eq!(sent(&mut e), encode_run(id2, "false"));
    }

    #[test]
    fn output_is_collected_or_streamed_and_lines_may_split() {
        let mut e = Engine::new(1);
        e.receive(b"HELLO rewind-agent 1\n");
        let kept = e.start("a", T, OutputMode::Collect);
        let streamed = e.start("b", T, OutputMode::Stream);
        assert!(e.receive(b"OUTH 1 34").is_empty());
        assert_eq!(
            e.receive(b"320a\nERRH 2 78\nEXIT 2 3\n"),
            vec![
                Event::Output(streamed, Stream::Stderr, b"x".to_vec()),
                Event::Done(
                    streamed,
                    Ok(ExecOutput {
                        status: 3,
                        stdout: vec![],
                        stderr: vec![]
                    })
                ),
            ]
        );
        let done = e.receive(b"EXIT 1 0\n");
        let out = ExecOutput {
            status: 0,
            stdout: b"42\n".to_vec(),
            stderr: vec![],
        };
        assert_eq!(done, vec![Event::Done(kept, Ok(out))]);
        assert!(e.is_idle());
    }

    #[test]
    fn an_unknown_verb_is_resent_once_then_refused() {
        let mut e = Engine::new(1);
        e.receive(b"HELLO rewind-agent 1\n");
        let id = e.start("true", T, OutputMode::Collect);
        let request = sent(&mut e);
        assert!(e.receive(b"ERROR 1 unknown-verb\n").is_empty());
        assert_eq!(sent(&mut e), format!("\n{request}"));
        let refused = ExecError::Refused("unknown-verb".into());
        assert_eq!(
            e.receive(b"ERROR 1 unknown-verb\n"),
            vec![Event::Done(id, Err(refused))]
        );
    }

    #[test]
    fn deadlines_fail_their_commands() {
        let mut e = Engine::new(1);
        let id = e.start("sleep 9", Duration::from_millis(10), OutputMode::Stream);
        let deadline = e.next_deadline().unwrap();
        assert!(e.expire(deadline - Duration::from_millis(1)).is_empty());
        let timeout = ExecError::Timeout(Duration::from_millis(10));
        assert_eq!(e.expire(deadline), vec![Event::Done(id, Err(timeout))]);
        assert_eq!(e.next_deadline(), None);
        // A late answer about it is ignored.
        assert!(e.receive(b"PONG 1\nEXIT 1 0\n").is_empty());
    }
}
