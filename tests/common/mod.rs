//! Shared helpers for the integration tests: run the real `rewind` binary on
//! the real /dev/kvm with a private $REWIND_HOME.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

pub const BIN: &str = env!("CARGO_BIN_EXE_rewind");

/// True when /dev/kvm can be used. Without it a test says so loudly and is
/// skipped, except under CI=true where a missing /dev/kvm is a failure.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test}: /dev/kvm is not usable and CI=true: this run cannot test rewind");
        }
        eprintln!("SKIPPED {test}: /dev/kvm is not usable on this machine");
    }
    ok
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh $REWIND_HOME for one test, removed when dropped.
pub struct Home {
    pub path: PathBuf,
}

impl Home {
    pub fn new(test: &str) -> Home {
        let path = std::env::temp_dir().join(format!(
            "rewind-test-{}-{}-{}",
            test,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Home { path }
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("REWIND_HOME", &self.path).stdin(Stdio::null());
        c
    }

    /// Runs `rewind ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("rewind binary runs")
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.cmd()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("rewind binary starts")
    }

    pub fn socket(&self, vm: &str) -> PathBuf {
        self.path.join("vms").join(vm).join("api.sock")
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Waits (bounded, by polling a condition that must become true, not by
/// sleeping a guessed time) until `path` exists.
pub fn wait_for_path(path: &Path, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never appeared at {}",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}
