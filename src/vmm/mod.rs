//! The VMM: owns the VM, its memory, devices and vCPU threads, runs the
//! event loop, and carries out [`crate::control::Command`]s.

mod builder;
pub mod disks;
mod exec;
mod host_identity;
mod persist;
mod signals;
mod snapshots;

pub use persist::{DevicesState, DiskState, MachineState};
pub use signals::SignalFd;
pub use snapshots::{RevertReport, SnapshotReport};

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use regex::Regex;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{KernelSource, VmConfig};
use crate::console::{Console, ConsoleKey, ConsoleTarget, EscapeParser, RawTerminal};
use crate::control::{ApiResponse, Command, ControlServer};
use crate::devices::bus::lock;
use crate::devices::debug_console::DebugConsole;
use crate::devices::exit_port::ExitPort;
use crate::devices::i8042::I8042;
use crate::devices::serial::SerialDevice;
use crate::events::{VmEvent, VmEventReceiver};
use crate::kvm::host::HostKind;
use crate::kvm::vcpu::{VcpuError, VcpuHandle};
use crate::kvm::vm::{Vm, VmError};
use crate::kvm::{boot, loader};
use crate::memory::{self, GuestMemory};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot set up {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("device layout: {0}")]
    Bus(#[from] crate::devices::bus::BusError),
    #[error("{0}")]
    Snapshot(String),
    /// A snapshot refused before anything was touched (corrupt, or not for
    /// this VM or host): the caller's choice of snapshot, not our failure.
    #[error(transparent)]
    Bundle(crate::snapshot::ops::BundleError),
    #[error(transparent)]
    Store(#[from] crate::snapshot::store::StoreError),
    #[error(transparent)]
    Disk(#[from] disks::DiskSetupError),
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Io { what, source }
}

/// How a run ended; `exit_code` is what `rewind run` exits with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    GuestExit(i32),
    /// `--exec`'s command ended with this status.
    ExecDone(i32),
    Reset,
    Expected(String),
    Timeout(Duration),
    TripleFault {
        cpu: usize,
    },
    Fatal(String),
    Stopped,
    /// Whoever read the console went away (`rewind run | head`).
    ConsoleClosed,
    /// Ended by this termination signal (SIGTERM, SIGINT, SIGHUP).
    Signal(i32),
}

pub const EXIT_TIMEOUT: i32 = 124;
/// 128 + SIGPIPE: what a shell shows for a writer whose reader left.
pub const EXIT_CONSOLE_CLOSED: i32 = 141;

impl Outcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::GuestExit(s) | Outcome::ExecDone(s) => *s,
            Outcome::Reset | Outcome::Expected(_) | Outcome::Stopped => 0,
            Outcome::Timeout(_) => EXIT_TIMEOUT,
            Outcome::TripleFault { .. } | Outcome::Fatal(_) => 1,
            Outcome::ConsoleClosed => EXIT_CONSOLE_CLOSED,
            // The shell's convention, so a script can tell a kill from a stop.
            Outcome::Signal(signo) => 128 + signo,
        }
    }

    /// The one line to print on stderr, if any.
    pub fn message(&self) -> Option<String> {
        match self {
            Outcome::GuestExit(_)
            | Outcome::ExecDone(_)
            | Outcome::Expected(_)
            | Outcome::Stopped
            | Outcome::ConsoleClosed
            | Outcome::Signal(_) => None,
            Outcome::Reset => Some("guest requested a reset; VM ended".into()),
            Outcome::Timeout(d) => Some(format!("timed out after {:.1} s", d.as_secs_f64())),
            Outcome::TripleFault { cpu } => Some(format!(
                "guest triple fault on vCPU {cpu}: the guest crashed beyond recovery"
            )),
            Outcome::Fatal(msg) => Some(msg.clone()),
        }
    }
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Not found and bad names are the client's fault; the rest is ours.
fn error_status(e: &VmmError) -> u16 {
    match e {
        VmmError::Store(crate::snapshot::store::StoreError::NotFound { .. }) => 404,
        VmmError::Store(crate::snapshot::store::StoreError::Exists(_)) => 409,
        VmmError::Bundle(_) => 422,
        _ => 500,
    }
}

/// How the console and the run end are wired for one run.
pub struct RunOptions {
    pub console: ConsoleTarget,
    pub expect: Option<Regex>,
    pub timeout: Option<Duration>,
    /// Run this in the guest through its agent, stream its output, and end
    /// the run with its exit status.
    pub exec: Option<String>,
    /// Snapshot the guest into this directory when it prints REWIND-READY
    /// (the boot cache: later runs restore it instead of booting).
    pub snapshot_when_ready: Option<PathBuf>,
}

/// How long `rewind exec` waits for a command unless told otherwise.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(600);

pub struct Vmm {
    pub config: VmConfig,
    pub host: HostKind,
    pub(crate) vm: Vm,
    pub(crate) mem: GuestMemory,
    pub(crate) vcpus: Vec<VcpuHandle>,
    pub(crate) devices: Devices,
    pub(crate) console: Arc<Console>,
    pub(crate) exec: exec::ExecLink,
    pub(crate) com2_drained: Arc<EventFd>,
    /// Console input waits here until the guest drains the UART's FIFO.
    pub(crate) com1_drained: Arc<EventFd>,
    pub(crate) console_input: std::collections::VecDeque<u8>,
    pub(crate) events: VmEventReceiver,
    pub(crate) paused: bool,
    pub(crate) started: Instant,
    /// The snapshot guest memory was last made equal to, and since when the
    /// dirty log counts: reverting to it copies back only dirtied pages.
    pub(crate) baseline: Option<PathBuf>,
    /// Pages that may be non-zero (one bit per page per slot): a snapshot
    /// reads only these, so its cost follows what the guest touched.
    pub(crate) populated: Vec<Vec<u64>>,
    pub(crate) msr_indices: Vec<u32>,
    pub(crate) has_xsave: bool,
    /// vCPU 0's TSC frequency: a revert must not change it under the guest.
    pub(crate) tsc_khz: Option<u32>,
}

/// The devices whose state a snapshot carries.
pub(crate) struct Devices {
    pub com1: Arc<Mutex<SerialDevice>>,
    pub com2: Arc<Mutex<SerialDevice>>,
    pub acpi_pm: Arc<Mutex<crate::devices::acpi_pm::AcpiPm>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub exit_port: Arc<Mutex<ExitPort>>,
    pub debug_console: Arc<Mutex<DebugConsole>>,
    pub disks: Vec<disks::VmDisk>,
}

impl Vmm {
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    pub fn vm_fd(&self) -> &kvm_ioctls::VmFd {
        &self.vm.fd
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Pauses every vCPU (requests go out to all first, then we wait, so the
    /// pause costs one round trip, not N). All or nothing: if one vCPU does
    /// not answer, every vCPU is asked to run again (a late one carries out
    /// its queued pause and then this resume, in order) and the VM stays
    /// running, so `paused` always says what the vCPUs will be doing.
    pub fn pause(&mut self) -> Result<Duration, VmmError> {
        let t = Instant::now();
        if self.paused {
            return Ok(t.elapsed());
        }
        let mut first_err = None;
        let mut tickets = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            match v.request_pause() {
                Ok(ticket) => tickets.push(Some(ticket)),
                Err(e) => {
                    tickets.push(None);
                    first_err.get_or_insert(e);
                }
            }
        }
        let mut answered = vec![false; self.vcpus.len()];
        for (i, (v, ticket)) in self.vcpus.iter().zip(&tickets).enumerate() {
            let Some(ticket) = ticket else { continue };
            match v.wait_paused(*ticket) {
                Ok(()) => answered[i] = true,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let Some(err) = first_err else {
            self.paused = true;
            return Ok(t.elapsed());
        };
        for (v, answered) in self.vcpus.iter().zip(answered) {
            // Only the vCPUs that answered are waited for: the others'
            // replies come late and are dropped by their sequence number.
            if let Ok(ticket) = v.request_resume() {
                if answered {
                    let _ = v.wait_resumed(ticket);
                }
            }
        }
        Err(err.into())
    }

    /// Resumes every vCPU. A vCPU that does not answer still has the resume
    /// queued and runs once it reads it, so the VM counts as running.
    pub fn resume(&mut self) -> Result<(), VmmError> {
        if !self.paused {
            return Ok(());
        }
        let tickets: Vec<_> = self.vcpus.iter().map(|v| v.request_resume()).collect();
        self.paused = false;
        let mut result = Ok(());
        for (v, ticket) in self.vcpus.iter().zip(tickets) {
            if let Err(e) = ticket.and_then(|t| v.wait_resumed(t)) {
                if result.is_ok() {
                    result = Err(e.into());
                }
            }
        }
        result
    }

    fn feed_console(&mut self) {
        lock(&self.devices.com1).feed_from(&mut self.console_input);
    }

    fn describe(&self) -> serde_json::Value {
        let kernel = match &self.config.kernel {
            KernelSource::EmbeddedTestGuest => "embedded test guest".to_string(),
            KernelSource::File(p) => p.display().to_string(),
        };
        serde_json::json!({
            "name": self.config.name,
            "state": if self.paused { "paused" } else { "running" },
            "vcpus": self.config.cpus,
            "mem_mib": self.config.mem_mib,
            "pid": std::process::id(),
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "kernel": kernel,
            "host": format!("{:?}", self.host).to_lowercase(),
            "baseline": self.baseline.as_ref().map(|p| p.display().to_string()),
            "disks": self.devices.disks.iter().map(|d| crate::devices::bus::lock(&d.disk).path().display().to_string()).collect::<Vec<_>>(),
        })
    }

    /// Carries out one API command. Returns the response and whether the VM
    /// should stop afterwards.
    pub fn handle_command(&mut self, cmd: Command) -> (ApiResponse, bool) {
        let ok = |body| ApiResponse { status: 200, body };
        let fail = |status, e: &dyn std::fmt::Display| ApiResponse {
            status,
            body: serde_json::json!({ "error": e.to_string() }),
        };
        match cmd {
            Command::GetVm => (ok(self.describe()), false),
            Command::Stop => (ok(serde_json::json!({ "stopped": true })), true),
            Command::Exec { .. } => (fail(500, &"exec is answered by the event loop"), false),
            Command::Pause => match self.pause() {
                Ok(d) => (
                    ok(serde_json::json!({ "state": "paused", "pause_us": d.as_micros() as u64 })),
                    false,
                ),
                Err(e) => (fail(500, &e), false),
            },
            Command::Resume => match self.resume() {
                Ok(()) => (ok(serde_json::json!({ "state": "running" })), false),
                Err(e) => (fail(500, &e), false),
            },
            Command::SnapshotCreate { name } => match self.snapshot_create(name) {
                Ok(r) => (ok(json(&r)), false),
                Err(e) => (fail(error_status(&e), &e), false),
            },
            Command::SnapshotRevert { name } => match self.revert(&name) {
                Ok(r) => (ok(json(&r)), false),
                Err(e) => (fail(error_status(&e), &e), false),
            },
            Command::SnapshotList => (
                ok(crate::snapshot::store::list_json(Some(&self.config.name))),
                false,
            ),
            Command::SnapshotInfo { name } => {
                match crate::snapshot::store::resolve(&name, Some(&self.config.name))
                    .and_then(|d| crate::snapshot::store::read_manifest(&d))
                {
                    Ok(m) => (ok(json(&m)), false),
                    Err(e) => (fail(404, &e), false),
                }
            }
            Command::SnapshotDelete { name } => {
                match crate::snapshot::store::resolve(&name, Some(&self.config.name)) {
                    Ok(dir) => {
                        if self.baseline.as_deref() == Some(dir.as_path()) {
                            self.baseline = None;
                        }
                        match crate::snapshot::store::delete_with_layers(&dir) {
                            Ok(r) => (
                                ok(serde_json::json!({
                                    "deleted": name,
                                    "layers": r.layers,
                                    "reparented": r.reparented,
                                    "new_parent": r.new_parent,
                                })),
                                false,
                            ),
                            Err(e) => (fail(500, &e), false),
                        }
                    }
                    Err(e) => (fail(404, &e), false),
                }
            }
        }
    }

    /// Runs until the guest ends, `--expect` matches, the timeout passes, the
    /// API or the console asks to stop, or a termination signal arrives.
    pub fn run(
        &mut self,
        opts: &RunOptions,
        control: Option<&ControlServer>,
        signals: Option<&SignalFd>,
    ) -> Result<Outcome, VmmError> {
        let deadline = opts.timeout.map(|t| Instant::now() + t);
        let interactive = opts.console == ConsoleTarget::Stdio;
        let stdin_fd = std::io::stdin().as_raw_fd();
        let _raw = if interactive {
            RawTerminal::enable(stdin_fd)
        } else {
            None
        };
        let mut stdin_open = interactive;
        let mut escape = EscapeParser::default();
        if let Some(cmd) = &opts.exec {
            let timeout = opts.timeout.unwrap_or(DEFAULT_EXEC_TIMEOUT);
            self.exec.start(
                cmd.clone(),
                timeout,
                exec::Waiter::Console,
                &self.devices.com2,
            );
        }
        self.resume()?;
        loop {
            let mut fds = vec![libc::pollfd {
                fd: self.events.wake_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            let control_idx = control.map(|c| {
                fds.push(libc::pollfd {
                    fd: c.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                fds.len() - 1
            });
            let signal_idx = signals.map(|s| {
                fds.push(libc::pollfd {
                    fd: s.fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
                fds.len() - 1
            });
            let inbox_idx = fds.len();
            fds.push(libc::pollfd {
                fd: self.exec.inbox.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            fds.push(libc::pollfd {
                fd: self.com2_drained.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            fds.push(libc::pollfd {
                fd: self.com1_drained.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            let queue_start = fds.len();
            let mut queues = Vec::new();
            for (d, disk) in self.devices.disks.iter().enumerate() {
                for (q, evt) in lock(&disk.transport).queue_evts().iter().enumerate() {
                    fds.push(libc::pollfd {
                        fd: evt.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                    queues.push((d, q));
                }
            }
            let stdin_idx = stdin_open.then(|| {
                fds.push(libc::pollfd {
                    fd: stdin_fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
                fds.len() - 1
            });
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(Outcome::Timeout(opts.timeout.unwrap_or_default()));
            }
            // Wake for the run's deadline or a running command's, whichever is first.
            let timeout_ms = match [deadline, self.exec.next_deadline()]
                .into_iter()
                .flatten()
                .min()
            {
                Some(d) => {
                    d.saturating_duration_since(Instant::now())
                        .as_millis()
                        .min(i32::MAX as u128) as i32
                        + 1
                }
                None => -1,
            };
            // SAFETY: fds is a valid array of pollfd for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io_err("the event loop")(err));
            }
            if fds[inbox_idx + 2].revents & libc::POLLIN != 0 {
                let _ = self.com1_drained.read();
                self.feed_console();
            }
            if fds[inbox_idx + 1].revents & libc::POLLIN != 0 {
                let _ = self.com2_drained.read();
                self.exec.feed(&self.devices.com2);
            }
            if fds[inbox_idx].revents & libc::POLLIN != 0 || self.exec.next_deadline().is_some() {
                if let exec::Finished::Console(status) = self.exec.process(&self.devices.com2) {
                    return Ok(Outcome::ExecDone(status));
                }
            }
            for (i, &(d, q)) in queues.iter().enumerate() {
                if fds[queue_start + i].revents & libc::POLLIN != 0 {
                    lock(&self.devices.disks[d].transport).process_queue(q);
                }
            }
            let mut events = self.events.drain();
            if let Some(i) = events.iter().position(|e| *e == VmEvent::Ready) {
                events.remove(i);
                if let Some(dir) = &opts.snapshot_when_ready {
                    match self.snapshot_create_at(dir, "boot-cache", Instant::now()) {
                        Ok(r) => eprintln!(
                            "rewind: booted guest cached in {} (guest paused {:.1} ms)",
                            dir.display(),
                            r.pause_ms
                        ),
                        Err(e) => eprintln!("rewind: could not write the boot cache: {e}"),
                    }
                }
            }
            if let Some(event) = events.into_iter().next() {
                return Ok(match event {
                    VmEvent::GuestExit(s) => Outcome::GuestExit(s),
                    VmEvent::Reset => match self.console.panic_line() {
                        Some(line) => Outcome::Fatal(format!(
                            "guest kernel panicked: {}",
                            line.split("] ").last().unwrap_or(&line)
                        )),
                        None => Outcome::Reset,
                    },
                    VmEvent::TripleFault { cpu } => Outcome::TripleFault { cpu },
                    VmEvent::ExpectMatched(line) => Outcome::Expected(line),
                    VmEvent::Ready => continue,
                    VmEvent::Fatal(msg) => Outcome::Fatal(msg),
                    VmEvent::ConsoleClosed => Outcome::ConsoleClosed,
                });
            }
            if let (Some(i), Some(signals)) = (signal_idx, signals) {
                if fds[i].revents & libc::POLLIN != 0 {
                    if let Some(signo) = signals.read() {
                        return Ok(Outcome::Signal(signo));
                    }
                }
            }
            if let (Some(i), Some(server)) = (control_idx, control) {
                if fds[i].revents & libc::POLLIN != 0 {
                    if let Some((stream, parsed)) = server.accept_command() {
                        match parsed {
                            Ok(Command::Exec { .. }) if !self.config.guest.has_agent() => {
                                let msg = format!(
                                    "VM {} runs the test guest, which has no exec agent (exec needs a Linux guest)",
                                    self.config.name
                                );
                                crate::control::server::respond(
                                    &stream,
                                    &ApiResponse::error(409, msg),
                                );
                            }
                            Ok(Command::Exec { cmd, timeout_s }) => {
                                let timeout = timeout_s
                                    .map(Duration::from_secs)
                                    .unwrap_or(DEFAULT_EXEC_TIMEOUT);
                                self.exec.start(
                                    cmd,
                                    timeout,
                                    exec::Waiter::Api(stream),
                                    &self.devices.com2,
                                );
                            }
                            Ok(cmd) => {
                                let (resp, stop) = self.handle_command(cmd);
                                crate::control::server::respond(&stream, &resp);
                                if stop {
                                    return Ok(Outcome::Stopped);
                                }
                            }
                            Err(resp) => crate::control::server::respond(&stream, &resp),
                        }
                    }
                }
            }
            if let Some(i) = stdin_idx {
                if fds[i].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    let mut buf = [0u8; 256];
                    // SAFETY: reads into a stack buffer of the given length.
                    let got = unsafe { libc::read(stdin_fd, buf.as_mut_ptr().cast(), buf.len()) };
                    if got <= 0 {
                        stdin_open = false;
                        continue;
                    }
                    for key in escape.feed(&buf[..got as usize]) {
                        match key {
                            ConsoleKey::Guest(bytes) => {
                                self.console_input.extend(bytes);
                                self.feed_console();
                            }
                            ConsoleKey::Quit => return Ok(Outcome::Stopped),
                        }
                    }
                }
            }
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        for v in &mut self.vcpus {
            v.stop();
        }
        self.console.flush(crate::console::FLUSH_LIMIT);
        // The live overlays stay: they are the guest's disks as it left them
        // (`disk export --vm`), and `rewind rm` removes them with the VM.
    }
}
