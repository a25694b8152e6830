//! Host side of the guest exec agent (guest-images/linux/agent, protocol in
//! guest-images/linux/PROTOCOL.md): one line per message over a byte
//! stream (the guest's ttyS1, or a pty in tests).
//!
//! host -> guest: `RUNH <id> <hex command>` (or `RUN` with base64), `PING <id>`
//! guest -> host: `HELLO rewind-agent <version>`, `OUTH|ERRH <id> <hex chunk>`
//! (or `OUT|ERR` with base64), `EXIT <id> <status>`, `PONG <id>`,
//! `ERROR <id> <reason>`. Hex is what the agent uses: busybox runs its
//! `base64` applet by re-exec'ing itself, which is fragile on PVM hosts.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the guest agent's channel closed")]
    Closed,
    #[error("talking to the guest agent: {0}")]
    Io(#[from] std::io::Error),
    #[error("the guest agent refused the command: {0}")]
    Refused(String),
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

/// A client over any pollable byte stream.
pub struct AgentClient<S: Read + Write + AsRawFd> {
    stream: S,
    pending: Vec<u8>,
    next_id: u64,
}

const MAX_LINE: usize = 1 << 20;

impl<S: Read + Write + AsRawFd> AgentClient<S> {
    pub fn new(stream: S) -> Self {
        AgentClient {
            stream,
            pending: Vec::new(),
            next_id: 1,
        }
    }

    fn wait_readable(fd: RawFd, deadline: Instant, limit: Duration) -> Result<(), AgentError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(AgentError::Timeout(limit));
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        match n {
            0 => Err(AgentError::Timeout(limit)),
            n if n < 0 => Err(std::io::Error::last_os_error().into()),
            _ => Ok(()),
        }
    }

    /// The next complete line (without its newline).
    fn next_line(&mut self, deadline: Instant, limit: Duration) -> Result<String, AgentError> {
        loop {
            if let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                return Ok(String::from_utf8_lossy(&line).trim_end().to_string());
            }
            if self.pending.len() > MAX_LINE {
                return Err(AgentError::Malformed("line longer than 1 MiB".into()));
            }
            Self::wait_readable(self.stream.as_raw_fd(), deadline, limit)?;
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(AgentError::Closed),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EIO) => return Err(AgentError::Closed),
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn next_message(&mut self, deadline: Instant, limit: Duration) -> Result<Message, AgentError> {
        loop {
            let line = self.next_line(deadline, limit)?;
            // Noise before the agent starts (a shell prompt, an echo) is skipped.
            if let Ok(m) = parse_line(&line) {
                return Ok(m);
            }
        }
    }

    pub fn ping(&mut self, timeout: Duration) -> Result<(), AgentError> {
        let id = self.next_id;
        self.next_id += 1;
        self.stream.write_all(format!("PING {id}\n").as_bytes())?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Message::Pong(got) = self.next_message(deadline, timeout)? {
                if got == id {
                    return Ok(());
                }
            }
        }
    }

    /// Runs `command` in the guest, handing output chunks to `output` as they
    /// arrive; returns the command's exit status.
    pub fn run(
        &mut self,
        command: &str,
        timeout: Duration,
        output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<i32, AgentError> {
        let id = self.next_id;
        self.next_id += 1;
        self.stream.write_all(encode_run(id, command).as_bytes())?;
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_message(deadline, timeout)? {
                Message::Output(stream, got, data) if got == id => output(stream, &data),
                Message::Exit(got, status) if got == id => return Ok(status),
                Message::Error(got, reason) if got == id.to_string() => {
                    return Err(AgentError::Refused(reason))
                }
                _ => {}
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
}
