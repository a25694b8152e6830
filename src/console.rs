//! The console: where guest output goes (stdout, a file or nowhere), line
//! matching for `--expect`, and the host terminal in raw mode.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use regex::Regex;

use crate::devices::bus::lock;
use crate::events::{VmEvent, VmEventSender};

pub mod keys;
pub use keys::{ConsoleKey, EscapeParser, ESCAPE};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleTarget {
    Stdio,
    /// Output to stderr, so stdout carries only `--exec`'s output.
    Stderr,
    None,
    File(PathBuf),
}

impl std::str::FromStr for ConsoleTarget {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdio" => ConsoleTarget::Stdio,
            "stderr" => ConsoleTarget::Stderr,
            "none" => ConsoleTarget::None,
            path => ConsoleTarget::File(PathBuf::from(path)),
        })
    }
}

struct Inner {
    out: Option<Arc<Sink>>,
    line: Vec<u8>,
    expect: Option<Regex>,
    matched: bool,
    /// The first Linux panic line seen, so a panic that ends in a reboot
    /// is reported as a panic, not as a clean reset.
    panic: Option<String>,
    /// Whether the guest's `REWIND-READY` line was reported yet.
    ready_seen: bool,
    /// Whether a `POWER_OFF_MARKS` line ends the VM (Linux guests only).
    power_off_line: bool,
    /// Whether the output so far ends a line: rewind's own notices must
    /// start on a fresh one.
    at_line_start: bool,
    /// Whether the guest printed anything at all (a kernel that did not
    /// is diagnosed when it dies).
    printed: bool,
}

const READY_LINE: &str = "REWIND-READY";

const PANIC_MARK: &str = "Kernel panic - not syncing";

/// The last lines Linux prints on `poweroff`/`halt` once every device is shut
/// down. A kernel without ACPI has no power-off register to write (rewind's
/// microvm kernel), so it halts its CPUs for good after this line; rewind
/// takes the line as the power-off and ends the VM with status 0, for Linux
/// guests only (`watch_power_off_line`). A kernel with ACPI writes the
/// sleep register right after the line, which ends the VM the same way.
const POWER_OFF_MARKS: [&str; 2] = ["reboot: Power down", "reboot: System halted"];

/// Console output waiting for the writer thread. vCPU threads only append
/// here, so a host stdout nobody reads (a pipe, a stopped terminal) never
/// blocks a vCPU, which must stay pausable and stoppable: what does not
/// fit is dropped, counted, and replaced by one marker line.
struct Sink {
    state: Mutex<SinkState>,
    changed: Condvar,
}

#[derive(Default)]
struct SinkState {
    pending: Vec<u8>,
    /// Bytes dropped since the last marker.
    dropped: u64,
    /// The writer thread holds bytes taken from `pending`.
    writing: bool,
    closed: bool,
}

/// Most console output queued for a slow reader (the writer thread may
/// hold as much again, in the write it is blocked in).
pub const SINK_LIMIT: usize = 1 << 20;

/// How long a VM that ends waits for its console output to be read.
pub const FLUSH_LIMIT: Duration = Duration::from_secs(1);

impl Sink {
    fn start(mut out: Box<dyn Write + Send>, events: VmEventSender) -> io::Result<Arc<Sink>> {
        let sink = Arc::new(Sink {
            state: Mutex::new(SinkState::default()),
            changed: Condvar::new(),
        });
        let shared = sink.clone();
        // Detached: it may be blocked in write() for good when nobody reads,
        // and must not keep the process from exiting.
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || shared.write_loop(&mut *out, &events))?;
        Ok(sink)
    }

    fn write_loop(&self, out: &mut dyn Write, events: &VmEventSender) {
        crate::seccomp::install_or_exit(crate::seccomp::Thread::Console);
        loop {
            let chunk = {
                let mut st = lock(&self.state);
                while st.pending.is_empty() && !st.closed {
                    st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.pending.is_empty() {
                    return;
                }
                st.writing = true;
                std::mem::take(&mut st.pending)
            };
            // Nobody reads any more (`rewind run | head`): end the VM, as
            // QEMU does on SIGPIPE, instead of running on unseen until the
            // timeout. Other errors must not stall or kill the guest.
            let result = out.write_all(&chunk).and_then(|_| out.flush());
            let mut st = lock(&self.state);
            st.writing = false;
            if result.is_err_and(|e| e.kind() == io::ErrorKind::BrokenPipe) {
                st.closed = true;
                st.pending.clear();
                drop(st);
                events.send(VmEvent::ConsoleClosed);
                self.changed.notify_all();
                return;
            }
            drop(st);
            self.changed.notify_all();
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut st = lock(&self.state);
        if st.closed {
            return;
        }
        if st.dropped > 0 {
            let marker = format!(
                "\r\n[rewind: {} bytes of console output dropped: nobody was reading it]\r\n",
                st.dropped
            );
            if st.pending.len() + marker.len() + bytes.len() > SINK_LIMIT {
                st.dropped += bytes.len() as u64;
                return;
            }
            st.pending.extend_from_slice(marker.as_bytes());
            st.dropped = 0;
        }
        if st.pending.len() + bytes.len() > SINK_LIMIT {
            st.dropped += bytes.len() as u64;
            return;
        }
        st.pending.extend_from_slice(bytes);
        drop(st);
        self.changed.notify_all();
    }

    /// Waits until everything queued was written, or `limit` passes.
    fn flush(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut st = lock(&self.state);
        while !st.pending.is_empty() || st.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    fn close(&self) {
        lock(&self.state).closed = true;
        self.changed.notify_all();
    }
}

/// Shared by every device that prints (UART, debug console).
pub struct Console {
    inner: Mutex<Inner>,
    events: VmEventSender,
}

/// Longest partial line kept for `--expect` matching; a guest that never
/// prints a newline must not grow host memory without bound.
const MAX_LINE: usize = 64 * 1024;

impl Console {
    pub fn new(
        target: &ConsoleTarget,
        expect: Option<Regex>,
        events: VmEventSender,
    ) -> io::Result<Arc<Self>> {
        let out: Option<Box<dyn Write + Send>> = match target {
            ConsoleTarget::Stdio => Some(Box::new(io::stdout())),
            ConsoleTarget::Stderr => Some(Box::new(io::stderr())),
            ConsoleTarget::None => None,
            ConsoleTarget::File(p) => Some(Box::new(File::create(p)?)),
        };
        let out = out.map(|o| Sink::start(o, events.clone())).transpose()?;
        Ok(Arc::new(Console {
            inner: Mutex::new(Inner {
                out,
                line: Vec::new(),
                expect,
                matched: false,
                panic: None,
                ready_seen: false,
                power_off_line: false,
                at_line_start: true,
                printed: false,
            }),
            events,
        }))
    }

    /// Makes Linux's final `reboot: Power down` line end the VM.
    pub fn watch_power_off_line(&self) {
        lock(&self.inner).power_off_line = true;
    }

    /// Whether the guest printed anything.
    pub fn printed_anything(&self) -> bool {
        lock(&self.inner).printed
    }

    /// The guest kernel's panic line, if it panicked.
    pub fn panic_line(&self) -> Option<String> {
        lock(&self.inner).panic.clone()
    }

    /// Waits (at most `limit`) until the output so far has been written,
    /// so a VM that ends does not lose its last lines to a reader that is
    /// reading, and does not hang on one that is not.
    pub fn flush(&self, limit: Duration) {
        let sink = lock(&self.inner).out.clone();
        if let Some(sink) = sink {
            sink.flush(limit);
        }
    }

    /// rewind's own message to the person at the console, one `[rewind] `
    /// line per line of `text`, on a fresh line and in order with the
    /// guest's output. It is not guest output: `--expect` never sees it.
    pub fn notice(&self, text: &str) {
        let mut inner = lock(&self.inner);
        // CAN first: the guest may be halfway through an escape sequence
        // (busybox's prompt asks for the cursor position with ESC [ 6 n), and
        // the terminal would read "[rewind]" as the rest of it.
        let mut msg = String::from("\x18");
        if !inner.at_line_start {
            msg.push_str("\r\n");
        }
        for line in text.lines() {
            msg.push_str("[rewind] ");
            msg.push_str(line);
            msg.push_str("\r\n");
        }
        inner.at_line_start = true;
        if let Some(out) = &inner.out {
            out.push(msg.as_bytes());
        }
    }

    pub fn write_bytes(&self, bytes: &[u8]) {
        let mut inner = lock(&self.inner);
        if let Some(out) = &inner.out {
            out.push(bytes);
        }
        if let Some(&last) = bytes.last() {
            inner.at_line_start = last == b'\n';
            inner.printed = true;
        }
        for &b in bytes {
            if b == b'\n' {
                let text = String::from_utf8_lossy(&inner.line).trim_end().to_string();
                inner.line.clear();
                if inner.panic.is_none() && text.contains(PANIC_MARK) {
                    inner.panic = Some(text.clone());
                }
                if inner.power_off_line && POWER_OFF_MARKS.iter().any(|m| text.ends_with(m)) {
                    self.events.send(VmEvent::GuestExit(0));
                }
                // Linux guests print it from the agent while the console
                // shell starts, so it may follow the shell's prompt.
                if !inner.ready_seen && text.ends_with(READY_LINE) {
                    inner.ready_seen = true;
                    self.events.send(VmEvent::Ready);
                }
                if inner.matched {
                    continue;
                }
                if inner.expect.as_ref().is_some_and(|re| re.is_match(&text)) {
                    inner.matched = true;
                    self.events.send(VmEvent::ExpectMatched(text));
                }
            } else if inner.line.len() < MAX_LINE {
                inner.line.push(b);
            }
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some(sink) = &lock(&self.inner).out {
            sink.close();
        }
    }
}

/// `io::Write` adapter for vm-superio's UART.
pub struct ConsoleWriter(pub Arc<Console>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_bytes(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Puts a terminal in raw input mode (output processing kept, so the guest's
/// `\n` still returns the carriage) and restores it on drop, which covers
/// every exit path that unwinds or returns.
pub struct RawTerminal {
    fd: i32,
    saved: libc::termios,
}

impl RawTerminal {
    /// Returns None when `fd` is not a terminal.
    pub fn enable(fd: i32) -> Option<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and a valid pointer to a termios struct.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_oflag = saved.c_oflag;
        // SAFETY: valid fd and termios struct.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enable` on the same fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// The console's input: stdin, read as it comes, through the escape parser.
pub struct ConsoleInput {
    fd: i32,
    escape: EscapeParser,
}

impl ConsoleInput {
    /// `escape`: the hotkey prefix, None for none.
    pub fn stdin(escape: Option<u8>) -> Self {
        ConsoleInput {
            fd: libc::STDIN_FILENO,
            escape: EscapeParser::new(escape),
        }
    }

    pub fn fd(&self) -> i32 {
        self.fd
    }

    /// The keys in what one read returns; None once input has ended (or
    /// cannot be read), when it is no longer worth watching.
    pub fn read_keys(&mut self) -> Option<Vec<ConsoleKey>> {
        let mut buf = [0u8; 256];
        // SAFETY: reads into a stack buffer of the given length.
        let got = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
        if got <= 0 {
            return None;
        }
        Some(self.escape.feed(&buf[..got as usize]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::vm_event_channel;

    #[test]
    fn expect_matches_whole_lines_once() {
        let (tx, rx) = vm_event_channel().unwrap();
        let c = Console::new(
            &ConsoleTarget::None,
            Some(Regex::new("^tick 3 ok$").unwrap()),
            tx,
        )
        .unwrap();
        c.write_bytes(b"tick 1 ok\ntick 3");
        assert!(rx.drain().is_empty());
        c.write_bytes(b" ok\r\ntick 3 ok\n");
        assert_eq!(rx.drain(), vec![VmEvent::ExpectMatched("tick 3 ok".into())]);
    }

    /// rewind's notices start on a fresh line and are not guest output.
    #[test]
    fn notices_start_on_a_fresh_line_and_are_not_matched() {
        let path = std::env::temp_dir().join(format!("rewind-notice-{}", std::process::id()));
        let (tx, rx) = vm_event_channel().unwrap();
        let c = Console::new(
            &ConsoleTarget::File(path.clone()),
            Some(Regex::new("rewind").unwrap()),
            tx,
        )
        .unwrap();
        c.notice("first");
        c.write_bytes(b"partial");
        c.notice("two\nlines");
        c.write_bytes(b" rest\n");
        c.notice("after");
        c.flush(Duration::from_secs(10));
        let got = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            got,
            "\x18[rewind] first\r\npartial\x18\r\n[rewind] two\r\n[rewind] lines\r\n rest\n\x18[rewind] after\r\n"
        );
        assert!(rx.drain().is_empty(), "--expect saw a notice");
    }

    #[test]
    fn the_kernels_last_power_off_line_ends_the_vm() {
        let (tx, rx) = vm_event_channel().unwrap();
        let c = Console::new(&ConsoleTarget::None, None, tx).unwrap();
        c.write_bytes(b"[   1.5] reboot: Power down\n");
        assert!(rx.drain().is_empty(), "only watched for Linux guests");
        c.watch_power_off_line();
        c.write_bytes(b"echo reboot: Power down now\n[   1.5] reboot: Power do");
        assert!(rx.drain().is_empty());
        c.write_bytes(b"wn\r\n");
        assert_eq!(rx.drain(), vec![VmEvent::GuestExit(0)]);
    }

    /// A reader that stops reading must not block the writer (a vCPU):
    /// what does not fit is dropped and counted in one marker line.
    #[test]
    fn output_nobody_reads_is_bounded_and_marked() {
        use std::io::Read;
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array it is given.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the read end was just created and is owned from here on.
        let mut reader = unsafe { File::from_raw_fd(fds[0]) };
        let target = ConsoleTarget::File(format!("/proc/self/fd/{}", fds[1]).into());
        let (tx, _rx) = vm_event_channel().unwrap();
        let c = Console::new(&target, None, tx).unwrap();
        // SAFETY: the console opened its own descriptor of the pipe.
        unsafe { libc::close(fds[1]) };
        // Three times the limit while nobody reads: this must return.
        let total = 3 * SINK_LIMIT;
        for _ in 0..total / 4096 {
            c.write_bytes(&[b'x'; 4096]);
        }
        let drain = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            while !got.ends_with(b"end\n") {
                let n = reader.read(&mut buf).unwrap();
                assert!(n > 0, "the pipe closed early");
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        c.flush(Duration::from_secs(10));
        c.write_bytes(b"end\n");
        let got = String::from_utf8(drain.join().unwrap()).unwrap();
        // A marker stands wherever output was dropped (more than one if the
        // writer got a turn in between); with the bytes kept, it accounts
        // for every byte written.
        let kept = got.bytes().filter(|&b| b == b'x').count();
        let dropped: usize = got
            .split("[rewind: ")
            .skip(1)
            .map(|m| {
                assert!(m.contains(" bytes of console output dropped: nobody was reading it]\r\n"));
                m.split(' ').next().unwrap().parse::<usize>().unwrap()
            })
            .sum();
        assert!(
            dropped > 0 && kept <= 2 * SINK_LIMIT + (1 << 16),
            "kept {kept}"
        );
        assert_eq!(kept + dropped, total);
    }
}
