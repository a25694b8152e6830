//! Progress of long operations a person waits for (image builds, exports,
//! merges): on a terminal a live line on stderr (phase, bytes, rate, time
//! left) that is cleared at the end; when stderr is not a terminal nothing
//! live, one line per phase when it ends. Off unless the program turns it
//! on ([`enable`]): a library user (a fuzz harness) and a running VM, whose
//! terminal belongs to the guest's console, print nothing.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns progress reports on or off for this process.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// One phase of a long operation.
pub struct Phase {
    name: String,
    /// The live line; None when stderr is not a terminal or reports are off.
    bar: Option<ProgressBar>,
    /// Whether a line is printed at the end (reports on).
    report: bool,
    total: u64,
    done: u64,
    t0: Instant,
}

impl Phase {
    /// A phase of `total` bytes.
    pub fn bytes(name: impl Into<String>, total: u64) -> Phase {
        Phase::new(name.into(), Some(total))
    }

    /// A phase whose size is not known: a spinner with the time spent.
    pub fn spinner(name: impl Into<String>) -> Phase {
        Phase::new(name.into(), None)
    }

    fn new(name: String, total: Option<u64>) -> Phase {
        let report = enabled();
        let bar = (report && std::io::stderr().is_terminal()).then(|| {
            let bar = match total {
                Some(t) => ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr())
                    .with_style(
                        ProgressStyle::with_template(
                            "rewind: {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, {eta} left",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    ),
                None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
                    .with_style(
                        ProgressStyle::with_template("rewind: {spinner} {msg} ({elapsed})")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    ),
            };
            bar.set_message(name.clone());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Phase {
            name,
            bar,
            report,
            total: total.unwrap_or(0),
            done: 0,
            t0: Instant::now(),
        }
    }

    /// `done` bytes of the total are through.
    pub fn set(&mut self, done: u64) {
        self.done = done;
        if let Some(b) = &self.bar {
            b.set_position(done);
        }
    }

    /// `done` of `total` bytes are through (a total learnt on the way).
    pub fn progress(&mut self, done: u64, total: u64) {
        if total != self.total {
            self.total = total;
            if let Some(b) = &self.bar {
                b.set_length(total);
            }
        }
        self.set(done);
    }

    /// Whether a live line is drawn (a terminal).
    pub fn is_live(&self) -> bool {
        self.bar.is_some()
    }

    /// What the phase is doing now (the live line only).
    pub fn message(&self, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_message(format!("{}: {msg}", self.name));
        }
    }

    /// A line that must be seen as it is (a warning), above the live line.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Ends the phase with its one line, `rewind: NAME: done in 1.2 s (12.0
    /// MiB, 10.0 MiB/s)`.
    pub fn finish(self) {
        self.end(true);
    }

    /// Ends the phase with its line counting `bytes` (the data a sparse
    /// copy moved, not the extent it covered).
    pub fn finish_bytes(mut self, bytes: u64) {
        self.total = bytes;
        self.done = bytes;
        self.end(true);
    }

    /// Ends the phase without a line (its caller prints the result itself).
    pub fn clear(self) {
        self.end(false);
    }

    fn end(mut self, line: bool) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        if line && self.report {
            eprintln!(
                "rewind: {}",
                summary(&self.name, self.done.max(self.total), self.t0.elapsed())
            );
        }
    }
}

impl Drop for Phase {
    /// A phase dropped on an error path clears its live line, so the error
    /// that follows is one clean line.
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// The line a phase ends with.
pub fn summary(name: &str, bytes: u64, took: Duration) -> String {
    let s = took.as_secs_f64();
    if bytes == 0 {
        return format!("{name}: done in {s:.1} s");
    }
    let mib = bytes as f64 / 1048576.0;
    format!(
        "{name}: done in {s:.1} s ({mib:.1} MiB, {:.1} MiB/s)",
        mib / s.max(1e-3)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lines() {
        assert_eq!(
            summary("export disk 0", 10 << 20, Duration::from_secs(2)),
            "export disk 0: done in 2.0 s (10.0 MiB, 5.0 MiB/s)"
        );
        assert_eq!(
            summary("merge", 0, Duration::from_millis(250)),
            "merge: done in 0.2 s"
        );
    }
}
