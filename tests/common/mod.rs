//! Shared helpers for the integration tests: run the real `rewind` binary on
//! the real /dev/kvm with a private $REWIND_HOME.
#![allow(dead_code)]

pub mod tmux;

use std::path::{Path, PathBuf};

use rewind::child_vm::ChildVm;
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

    /// `rewind` with this home; its boot cache lives inside it too, so no
    /// test reads or fills the user's own cache.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("REWIND_HOME", &self.path)
            .env("REWIND_BOOT_CACHE", self.path.join("boot-cache"))
            .stdin(Stdio::null());
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

/// A running `rewind` process whose console (stdout) is collected line by
/// line, so a test can wait for what the guest says: the library's
/// [`ChildVm`], with failures as panics.
pub struct VmProcess {
    pub name: String,
    vm: ChildVm,
}

impl VmProcess {
    pub fn start(home: &Home, name: &str, args: &[&str]) -> VmProcess {
        VmProcess::start_env(home, name, args, &[])
    }

    /// `start` with extra environment variables for rewind.
    pub fn start_env(home: &Home, name: &str, args: &[&str], env: &[(&str, &str)]) -> VmProcess {
        let mut cmd = home.cmd();
        cmd.envs(env.iter().copied())
            .args(args)
            .stderr(Stdio::inherit());
        let vm = ChildVm::spawn(cmd, name, home.socket(name)).expect("rewind starts");
        VmProcess {
            name: name.to_string(),
            vm,
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.vm.lines()
    }

    /// The $REWIND_HOME this VM runs in.
    pub fn home(&self) -> PathBuf {
        let vm_dir = self.vm.socket().parent().unwrap();
        vm_dir.parent().unwrap().parent().unwrap().to_path_buf()
    }

    pub fn pid(&self) -> u32 {
        self.vm.pid()
    }

    /// Waits until some line at index >= `from` satisfies `pred`; returns its index.
    pub fn wait_for(&self, from: usize, what: &str, pred: impl Fn(&str) -> bool) -> usize {
        let limit = std::time::Duration::from_secs(60);
        self.vm.wait_for(from, limit, pred).unwrap_or_else(|lines| {
            panic!(
                "{}: never saw {what}; console:\n{}",
                self.name,
                lines.join("\n")
            )
        })
    }

    /// Like `wait_for` with a caller's limit (Linux boots take minutes on
    /// PVM hosts); None when the limit passes.
    pub fn wait_long(
        &self,
        from: usize,
        what: &str,
        limit: std::time::Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<usize> {
        let found = self.vm.wait_for(from, limit, pred).ok();
        if found.is_none() {
            eprintln!("{}: {what} not seen within {limit:?}", self.name);
        }
        found
    }

    /// Waits up to `d` for the next console line (or returns earlier).
    pub fn wait_quietly(&self, d: std::time::Duration) {
        self.vm.wait_quietly(d)
    }

    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> rewind::control::ApiResponse {
        let timeout = Some(std::time::Duration::from_secs(120));
        self.vm
            .api(method, path, body.as_ref(), timeout)
            .unwrap_or_else(|e| panic!("{}: {method} {path}: {e}", self.name))
    }

    pub fn api_ok(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let r = self.api(method, path, body);
        assert_eq!(r.status, 200, "{}: {method} {path}: {}", self.name, r.body);
        r.body
    }

    pub fn socket_ready(&self) {
        wait_for_path(self.vm.socket(), "api.sock");
    }

    /// Stops the VM through the API and returns its exit status.
    pub fn stop(self) -> Option<i32> {
        self.stop_and_collect().0
    }

    /// Stops the VM through the API; its status and every line it printed.
    pub fn stop_and_collect(self) -> (Option<i32>, Vec<String>) {
        let _ = self.api("PUT", "/vm/stop", None);
        self.wait_exit()
    }

    pub fn wait_exit(self) -> (Option<i32>, Vec<String>) {
        self.vm.wait_exit()
    }
}

/// "tick N ok" is vCPU 0's line on a 1-vCPU guest; "cpuK tick N ok" otherwise.
pub fn parse_tick(line: &str) -> Option<(usize, u64)> {
    let (cpu, rest) = match line.strip_prefix("cpu") {
        Some(r) => {
            let (c, rest) = r.split_once(' ')?;
            (c.parse().ok()?, rest)
        }
        None => (0, line),
    };
    let n = rest
        .strip_prefix("tick ")?
        .strip_suffix(" ok")?
        .parse()
        .ok()?;
    Some((cpu, n))
}

/// Tick numbers of `cpu` in `lines`, in order.
pub fn ticks_of(lines: &[String], cpu: usize) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| parse_tick(l))
        .filter(|(c, _)| *c == cpu)
        .map(|(_, n)| n)
        .collect()
}

/// Runs a host tool the checks need (qemu-img, e2fsck, ...). A missing tool
/// skips those checks loudly, except under CI=true where it is a failure.
pub fn host_tool(name: &str, args: &[&str]) -> Option<Output> {
    match Command::new(name).args(args).output() {
        Ok(o) => Some(o),
        Err(_) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{name} is missing and CI=true")
        }
        Err(_) => {
            eprintln!("SKIPPED {name} checks: {name} is not installed");
            None
        }
    }
}

/// Asks `vm` for a snapshot named `name` from another thread, so the caller
/// can kill the VM in the middle of it; the handle says whether it finished.
pub fn snapshot_in_background(home: &Home, vm: &str, name: &str) -> std::thread::JoinHandle<bool> {
    let socket = home.socket(vm);
    let body = serde_json::json!({ "name": name });
    std::thread::spawn(move || {
        matches!(
            rewind::control::client::request(&socket, "PUT", "/snapshots", Some(&body), None),
            Ok(r) if r.status == 200
        )
    })
}

/// Emulated Linux guests take turns: on PVM hosts two at once each get a
/// fraction of a core, and a kernel whose ticks are emulated crawls or stalls.
/// Every test that runs a Linux guest holds this for its whole run.
pub fn linux_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that failed while holding the turn must not fail the others.
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts a Linux guest (`run_args` after `run`) and waits up to 20 minutes
/// for REWIND-READY, printing how long it took; asserts that every one of
/// `milestones` is on the console and that userspace came up.
pub fn boot_linux(
    home: &Home,
    name: &str,
    run_args: &[&str],
    milestones: &[&str],
) -> (VmProcess, Vec<String>) {
    let started = std::time::Instant::now();
    let mut args = vec!["run", "--name", name];
    args.extend_from_slice(run_args);
    args.extend_from_slice(&["--console", "stdio", "--timeout", "1500"]);
    let vm = VmProcess::start(home, name, &args);
    vm.socket_ready();
    let ready = vm.wait_long(
        0,
        "REWIND-READY",
        std::time::Duration::from_secs(1200),
        |l| l.ends_with("REWIND-READY") || l.contains("Kernel panic"),
    );
    let lines = vm.lines();
    eprintln!(
        "{name}: {:.0} s to REWIND-READY or panic",
        started.elapsed().as_secs_f64()
    );
    for m in milestones {
        assert!(
            lines.iter().any(|l| l.contains(m)),
            "milestone {m:?} missing:\n{}",
            lines.join("\n")
        );
    }
    let ready = ready.expect("userspace started");
    assert!(
        lines[ready].ends_with("REWIND-READY"),
        "{}",
        lines.join("\n")
    );
    (vm, lines)
}

/// The first tick of the test guest's vCPU 0 in `line` ("tick N ok",
/// "cpu0 tick N ok" or, in disk mode, "tick N disk ok").
pub fn first_tick(line: &str) -> Option<u64> {
    if let Some((0, n)) = parse_tick(line) {
        return Some(n);
    }
    line.strip_prefix("tick ")?
        .strip_suffix(" disk ok")?
        .parse()
        .ok()
}

/// The tick vCPU 0 had done when snapshot `snap` of `vm` was taken, read by
/// restoring it: a restored guest's first tick line is that tick + 1. Tests
/// compare against this instead of hoping a snapshot lands within one tick
/// of the line they saw.
pub fn snapshot_tick(home: &Home, vm: &str, snap: &str) -> u64 {
    snapshot_tick_in(&home.path, vm, snap)
}

/// `snapshot_tick` for the $REWIND_HOME at `home`. The clone's folder is
/// removed after, so no overlay of it keeps depending on the snapshot.
pub fn snapshot_tick_in(home: &Path, vm: &str, snap: &str) -> u64 {
    let clone = format!("{vm}-{snap}-tick");
    let o = restore_until(home, vm, snap, &clone, "^(cpu0 )?tick [0-9]+ (disk )?ok$");
    assert_eq!(o.status.code(), Some(0), "restore {snap}: {}", stderr(&o));
    let first = stdout(&o)
        .lines()
        .find_map(first_tick)
        .unwrap_or_else(|| panic!("restore {snap} printed no tick: {}", stdout(&o)));
    assert!(first > 0, "restore {snap}: {}", stdout(&o));
    first - 1
}

/// Restores snapshot `snap` of `vm` as VM `clone` in $REWIND_HOME `home`,
/// console on stdout, until a line matches `expect` (60 s at most); the
/// clone's folder is removed after, so no overlay of it keeps depending on
/// the snapshot.
pub fn restore_until(home: &Path, vm: &str, snap: &str, clone: &str, expect: &str) -> Output {
    let o = Command::new(BIN)
        .env("REWIND_HOME", home)
        .stdin(Stdio::null())
        .args([
            "restore",
            snap,
            "--vm",
            vm,
            "--name",
            clone,
            "--console",
            "stdio",
            "--timeout",
            "60",
            "--expect",
            expect,
        ])
        .output()
        .expect("rewind binary runs");
    let _ = std::fs::remove_dir_all(home.join("vms").join(clone));
    o
}

/// Copies the files of snapshot directory `from` to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// `rewind restore DIR` fails with one line of stderr containing `needle`.
pub fn restore_fails(home: &Home, dir: &Path, needle: &str) {
    let o = home.run(&[
        "restore",
        dir.to_str().unwrap(),
        "--name",
        "r",
        "--console",
        "none",
        "--timeout",
        "10",
    ]);
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "{err}");
    // A bundle that cannot be used is bad input, like a missing one.
    assert_eq!(o.status.code(), Some(2), "status {:?}: {err}", o.status);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.contains("PVM host") && !l.contains("VM name"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(needle), "{needle:?} not in: {err}");
}

/// Rewrites the file at `path` through `f`.
pub fn mutate(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    f(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

/// `qemu-img check` one image, when the host has qemu-img: what rewind wrote must be a valid
/// qcow2 to an independent reader.
pub fn qemu_check(path: &Path) {
    if let Some(o) = host_tool("qemu-img", &["check", path.to_str().unwrap()]) {
        assert!(
            o.status.success(),
            "qemu-img check {}: {}",
            path.display(),
            String::from_utf8_lossy(&o.stdout)
        );
    }
}

/// `qemu_check` every file in VM `vm`'s disks directory under the REWIND_HOME `home`.
pub fn check_vm_disks(home: &Path, vm: &str) {
    for f in std::fs::read_dir(home.join("vms").join(vm).join("disks"))
        .unwrap()
        .flatten()
    {
        qemu_check(&f.path());
    }
}

/// Boots the test guest as VM `name` with its console on stdout:
/// `run --name <name> <extra...> --console stdio --timeout <timeout> --append <append>`.
pub fn start_guest(
    home: &Home,
    name: &str,
    timeout: &str,
    append: &str,
    extra: &[&str],
) -> VmProcess {
    start_guest_env(home, name, timeout, append, extra, &[])
}

/// `start_guest` with extra environment variables for the rewind process.
pub fn start_guest_env(
    home: &Home,
    name: &str,
    timeout: &str,
    append: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> VmProcess {
    let mut args = vec!["run", "--name", name];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "--console",
        "stdio",
        "--timeout",
        timeout,
        "--append",
        append,
    ]);
    VmProcess::start_env(home, name, &args, env)
}

/// Asserts exit status `code` and exactly one line on stderr (the PVM host notice aside) that
/// contains `needle`; returns that line.
pub fn one_line_error(o: &Output, code: i32, needle: &str) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.contains("PVM host")).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].contains(needle), "{needle:?} not in: {err}");
    lines[0].to_string()
}

/// The paths in `dir`, sorted; none when `dir` does not exist.
pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// Snapshots `vm` (named `name`, started with `REWIND_TEST_STALL_AT=<phase>:victim`) as
/// "victim" in the background, SIGKILLs rewind once it stalls at `phase`, and asserts the
/// snapshot did not finish.
pub fn kill_inside_snapshot(home: &Home, vm: VmProcess, name: &str, phase: &str) {
    let snapper = snapshot_in_background(home, name, "victim");
    let marker = home.path.join(format!("stalled-at-{phase}"));
    wait_for_path(&marker, &format!("the stall at {phase}"));
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGKILL) };
    let _ = vm.wait_exit();
    assert!(
        !snapper.join().unwrap(),
        "{phase}: the snapshot finished although rewind was killed inside it"
    );
    std::fs::remove_file(&marker).unwrap();
}
