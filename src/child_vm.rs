//! Test support, not part of the VMM: a `rewind` VM in a child process,
//! its console (stdout) collected line by line and the VM driven through
//! its control socket. The one driver shared by the integration tests,
//! `rewind bench` and `rewind demo`, so all three meet rewind the way a
//! user does.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::control::{client, ApiResponse, ControlError};

/// How long [`ChildVm::next_line`] waits for a line.
pub const LINE_WAIT: Duration = Duration::from_secs(60);

/// How long a request waits for the VM to bind its control socket.
const SOCKET_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ChildVmError {
    #[error("cannot start rewind: {0}")]
    Spawn(std::io::Error),
    #[error("VM {0} never printed the expected line")]
    NoLine(String),
    #[error("{0}")]
    Control(#[from] ControlError),
    #[error("{method} {path}: {body}")]
    Status {
        method: String,
        path: String,
        body: Value,
    },
}

/// `rewind bench` and `rewind demo` report failures as one line of text.
impl From<ChildVmError> for String {
    fn from(e: ChildVmError) -> String {
        e.to_string()
    }
}

type Lines = Arc<(Mutex<Vec<String>>, Condvar)>;

pub struct ChildVm {
    pub name: String,
    child: Child,
    lines: Lines,
    socket: PathBuf,
    reader: Option<JoinHandle<()>>,
    /// Lines before this index were consumed by `next_line`.
    cursor: AtomicUsize,
}

fn lock(lines: &Lines) -> MutexGuard<'_, Vec<String>> {
    // A panicking test thread poisons nothing the lines depend on.
    lines.0.lock().unwrap_or_else(|p| p.into_inner())
}

impl ChildVm {
    /// Starts `cmd`, a `rewind` command running VM `name` whose control
    /// socket is `socket`, with its stdout (the console) collected.
    pub fn spawn(mut cmd: Command, name: &str, socket: PathBuf) -> Result<ChildVm, ChildVmError> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .map_err(ChildVmError::Spawn)?;
        let out = child.stdout.take().expect("stdout was piped");
        let lines: Lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lock(&sink).push(line);
                sink.1.notify_all();
            }
        });
        Ok(ChildVm {
            name: name.to_string(),
            child,
            lines,
            socket,
            reader: Some(reader),
            cursor: AtomicUsize::new(0),
        })
    }

    /// Every console line so far.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.lines).clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Index of the first line at index >= `from` satisfying `pred`,
    /// waiting up to `limit` for it; `Err` holds the console so far.
    pub fn wait_for(
        &self,
        from: usize,
        limit: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<usize, Vec<String>> {
        let deadline = Instant::now() + limit;
        let mut lines = lock(&self.lines);
        loop {
            if let Some(i) = lines.iter().skip(from).position(|l| pred(l)) {
                return Ok(from + i);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(lines.clone());
            }
            lines = self
                .lines
                .1
                .wait_timeout(lines, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The next line satisfying `want` after the last one this returned
    /// (lines skipped on the way are consumed too).
    pub fn next_line(&self, want: impl Fn(&str) -> bool) -> Result<String, ChildVmError> {
        let from = self.cursor.load(Ordering::Relaxed);
        let i = self
            .wait_for(from, LINE_WAIT, want)
            .map_err(|_| ChildVmError::NoLine(self.name.clone()))?;
        self.cursor.store(i + 1, Ordering::Relaxed);
        Ok(lock(&self.lines)[i].clone())
    }

    /// Waits up to `d` for the next console line (or returns earlier).
    pub fn wait_quietly(&self, d: Duration) {
        let lines = lock(&self.lines);
        let _ = self.lines.1.wait_timeout(lines, d);
    }

    /// One API request, once the VM has bound its socket.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Option<Duration>,
    ) -> Result<ApiResponse, ChildVmError> {
        let deadline = Instant::now() + SOCKET_WAIT;
        while !self.socket.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(client::request(&self.socket, method, path, body, timeout)?)
    }

    /// [`ChildVm::api`] where anything but 200 is an error.
    pub fn api_ok(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Option<Duration>,
    ) -> Result<Value, ChildVmError> {
        let r = self.api(method, path, body, timeout)?;
        if r.status != 200 {
            return Err(ChildVmError::Status {
                method: method.to_string(),
                path: path.to_string(),
                body: r.body,
            });
        }
        Ok(r.body)
    }

    /// Stops the VM through the API; its exit status and every line it printed.
    pub fn stop(self) -> (Option<i32>, Vec<String>) {
        let _ = self.api("PUT", "/vm/stop", None, None);
        self.wait_exit()
    }

    /// Waits for the VM to end by itself; its exit status and every line.
    pub fn wait_exit(mut self) -> (Option<i32>, Vec<String>) {
        let status = self.child.wait().ok().and_then(|s| s.code());
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        (status, self.lines())
    }
}

impl Drop for ChildVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tick number of the test guest's "tick N ok" line.
pub fn tick_of(line: &str) -> Option<u64> {
    line.strip_prefix("tick ")?
        .strip_suffix(" ok")?
        .parse()
        .ok()
}
