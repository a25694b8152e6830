//! A real terminal for console tests: rewind runs in a tmux pane (its own
//! tmux server, so a test never touches the user's), keys go in with
//! `send-keys` and the screen comes back with `capture-pane`, as a person
//! types and reads.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::{host_tool, Home};

pub struct Tmux {
    socket: PathBuf,
    /// Where the pane's shell writes `stty -a` once rewind has ended.
    pub stty_file: PathBuf,
}

impl Tmux {
    /// Starts `rewind ARGS` (with `home`'s environment) in a 200x50 pane
    /// under `sh`; when rewind ends the shell prints `rewind-exit=STATUS`
    /// and saves `stty -a` of the pane's terminal. None (a loud skip; a
    /// failure under CI=true) when tmux is not installed.
    pub fn start(home: &Home, tag: &str, args: &[&str]) -> Option<Tmux> {
        host_tool("tmux", &["-V"])?;
        let socket = home.path.join(format!("tmux-{tag}.sock"));
        let stty_file = home.path.join(format!("stty-{tag}.txt"));
        let conf = home.path.join(format!("tmux-{tag}.conf"));
        // The pane stays readable after its shell ends.
        std::fs::write(
            &conf,
            "set -g remain-on-exit on\nset -g history-limit 20000\n",
        )
        .unwrap();
        let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        // `sh` (not an interactive bash, whose line editor would set the
        // terminal right again) shows the terminal exactly as rewind left it.
        let script = format!(
            "REWIND_HOME={} REWIND_BOOT_CACHE={} {} {}; echo rewind-exit=$?; stty -a > {}",
            shell_quote(home.path.to_str().unwrap()),
            shell_quote(home.path.join("boot-cache").to_str().unwrap()),
            shell_quote(super::BIN),
            quoted.join(" "),
            shell_quote(stty_file.to_str().unwrap()),
        );
        let t = Tmux { socket, stty_file };
        let o = t.tmux(&[
            "-f",
            conf.to_str().unwrap(),
            "new-session",
            "-d",
            "-x",
            "200",
            "-y",
            "50",
            "sh",
            "-c",
            &script,
        ]);
        assert!(o.status.success(), "tmux: {}", super::stderr(&o));
        Some(t)
    }

    fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux runs")
    }

    /// Types `keys` (tmux key names: `C-a`, `s`, `Enter`, or literal text).
    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "0"];
        args.extend(keys);
        let o = self.tmux(&args);
        assert!(o.status.success(), "send-keys: {}", super::stderr(&o));
    }

    /// Types `text` literally.
    pub fn type_text(&self, text: &str) {
        let o = self.tmux(&["send-keys", "-t", "0", "-l", text]);
        assert!(o.status.success(), "send-keys: {}", super::stderr(&o));
    }

    /// Everything the pane showed, scrollback included, wrapped lines joined.
    pub fn screen(&self) -> Vec<String> {
        let o = self.tmux(&["capture-pane", "-p", "-J", "-S", "-", "-t", "0"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| l.trim_end().to_string())
            .collect()
    }

    /// Polls the screen until `done` holds (at most `limit`); returns it.
    pub fn wait_until(
        &self,
        what: &str,
        limit: Duration,
        done: impl Fn(&[String]) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + limit;
        loop {
            let screen = self.screen();
            if done(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "waited {limit:?} for {what}; the pane shows:\n{}",
                screen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a line containing `needle`; returns the screen.
    pub fn wait_for(&self, needle: &str, limit: Duration) -> Vec<String> {
        self.wait_until(needle, limit, |s| s.iter().any(|l| l.contains(needle)))
    }

    /// Waits for rewind to end; its exit status and the terminal's settings
    /// (`stty -a`) as it left them.
    pub fn wait_exit(&self, limit: Duration) -> (i32, String) {
        let screen = self.wait_until("rewind to exit", limit, |s| {
            s.iter().any(|l| l.starts_with("rewind-exit="))
        });
        let status = screen
            .iter()
            .find_map(|l| l.strip_prefix("rewind-exit="))
            .and_then(|s| s.trim().parse().ok())
            .unwrap();
        super::wait_for_path(&self.stty_file, "stty -a output");
        // The shell creates the file, then stty fills it.
        let deadline = Instant::now() + limit;
        loop {
            let stty = std::fs::read_to_string(&self.stty_file).unwrap_or_default();
            if stty.contains("icanon") || Instant::now() > deadline {
                return (status, stty);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
    }
}

/// Whether `stty -a` output shows a terminal fit for a shell: line editing,
/// echo and signal keys on (a raw terminal has `-icanon -echo -isig`).
pub fn terminal_is_sane(stty: &str) -> bool {
    let words: Vec<&str> = stty.split_whitespace().collect();
    ["icanon", "echo", "isig", "icrnl", "opost"]
        .iter()
        .all(|w| words.contains(w))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
