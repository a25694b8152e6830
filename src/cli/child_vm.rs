//! A `rewind` VM in a child process, driven through its control socket:
//! what `rewind demo` and `rewind bench` use to measure rewind the way a
//! user meets it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use rewind::control::client;
use rewind::paths;

pub fn exe() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("cannot find rewind itself: {e}"))
}

pub struct ChildVm {
    pub name: String,
    child: Child,
    lines: Receiver<String>,
}

/// Forwards a child's stdout lines to a channel, so waits can time out.
fn line_channel(out: ChildStdout) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl ChildVm {
    /// `rewind ARGS` with the console on a pipe; `name` is the VM's name.
    pub fn spawn(name: &str, args: &[String]) -> Result<ChildVm, String> {
        let mut child = Command::new(exe()?)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start rewind: {e}"))?;
        let out = child.stdout.take().ok_or("no stdout")?;
        Ok(ChildVm {
            name: name.to_string(),
            child,
            lines: line_channel(out),
        })
    }

    /// The next console line satisfying `want` (earlier lines are consumed).
    pub fn wait_line(&self, want: impl Fn(&str) -> bool) -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if want(&l) => return Ok(l),
                Ok(_) => {}
                Err(_) => return Err(format!("VM {} never printed the expected line", self.name)),
            }
        }
    }

    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        let socket = paths::api_socket(&self.name);
        let deadline = Instant::now() + Duration::from_secs(20);
        // The socket appears once the child has bound it.
        while !socket.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let resp = client::request(&socket, method, path, body.as_ref(), None)
            .map_err(|e| e.to_string())?;
        if resp.status != 200 {
            return Err(format!("{method} {path}: {}", resp.body));
        }
        Ok(resp.body)
    }

    pub fn stop(mut self) -> Option<i32> {
        let _ = self.api("PUT", "/vm/stop", None);
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for ChildVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tick_of(line: &str) -> Option<u64> {
    line.strip_prefix("tick ")?
        .strip_suffix(" ok")?
        .parse()
        .ok()
}

pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}
