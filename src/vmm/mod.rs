//! The VMM: owns the VM, its memory, devices and vCPU threads, runs the
//! event loop, and carries out [`crate::control::Command`]s.

mod builder;
mod capture;
mod commands;
mod diagnose;
mod dirty;
pub mod disks;
mod event_loop;
pub(crate) mod exec;
mod host_identity;
mod hotkeys;
mod persist;
mod revert;
mod signals;
mod snapshots;

pub use commands::{Reply, VmInfo};
pub use exec::{ExecCallback, ExecError, ExecOutput, ExecResult};
pub use persist::{DevicesState, DiskState, MachineState};
pub use revert::RevertReport;
pub use signals::SignalFd;
pub use snapshots::{SnapshotHow, SnapshotReport};

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use regex::Regex;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::host::HostKind;
use crate::arch::{boot, loader};
use crate::config::VmConfig;
use crate::console::{Console, ConsoleTarget, RawTerminal};
use crate::control::{Command, ControlServer};
use crate::devices::bus::lock;
use crate::devices::debug_console::DebugConsole;
use crate::devices::exit_port::ExitPort;
use crate::devices::i8042::I8042;
use crate::devices::serial::SerialDevice;
use crate::events::{VmEvent, VmEventReceiver};
use crate::kvm::vcpu::{VcpuError, VcpuHandle};
use crate::kvm::vm::{Vm, VmError};
use crate::memory::{self, GuestMemory};
use event_loop::{Fired, Wake};

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
    /// The named snapshot is not there (or not readable) for this VM.
    #[error(transparent)]
    SnapshotLookup(crate::snapshot::store::StoreError),
    #[error(transparent)]
    SnapshotDelete(crate::snapshot::store::StoreError),
    #[error("VM {0} runs the test guest, which has no exec agent (exec needs a Linux guest)")]
    NoAgent(String),
    /// `Exec` answers later, through [`Vmm::start_exec`].
    #[error("exec is answered by the event loop")]
    ExecElsewhere,
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
    /// Start with the vCPUs paused (resume through the API).
    pub start_paused: bool,
    /// The interactive console's hotkey prefix (Ctrl-A, `console::ESCAPE`);
    /// None turns hotkeys off, so every key goes to the guest.
    pub escape: Option<u8>,
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
    /// Pages written since memory last equalled `baseline` and already taken
    /// from the dirty logs. Cleared only once a snapshot holding them is
    /// durable (or memory is reverted), so a failed snapshot loses none.
    pub(crate) since_baseline: Vec<Vec<u64>>,
    pub(crate) msr_indices: Vec<u32>,
    pub(crate) has_xsave: bool,
    /// vCPU 0's TSC frequency: a revert must not change it under the guest.
    pub(crate) tsc_khz: Option<u32>,
    /// The kernel's identity for manifests: the restored snapshot's, or read
    /// from the kernel file at the first snapshot (a checksum of the whole
    /// file, so not on every snapshot and not on the boot path).
    pub(crate) kernel_identity: Option<String>,
    /// The booted image's kind (None after a restore), for `diagnosis`.
    pub(crate) kernel_format: Option<loader::KernelFormat>,
    /// Collapses RAM back into huge pages after a live snapshot, reads new
    /// snapshots back into the page cache (`memory::upkeep`).
    pub(crate) upkeep: Option<crate::memory::upkeep::Upkeep>,
    /// RAM is anonymous (a fresh boot), so huge pages can be collapsed; a
    /// restored VM's is a private file mapping, which the kernel does not
    /// collapse.
    pub(crate) collapse_huge_pages: bool,
    /// A live snapshot an API client waits for, while its writer runs.
    pub(crate) pending: Option<(snapshots::PendingSnapshot, snapshots::SnapshotReply)>,
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
        let _raw = interactive
            .then(|| RawTerminal::enable(std::io::stdin().as_raw_fd()))
            .flatten();
        let stdin = interactive.then_some(opts.escape);
        let mut events = self.event_loop(control, signals, stdin)?;
        let mut hotkeys = hotkeys::Hotkeys::new(opts.escape);
        if let Some(cmd) = &opts.exec {
            let timeout = opts.timeout.unwrap_or(DEFAULT_EXEC_TIMEOUT);
            let com2 = &self.devices.com2;
            self.exec
                .start(cmd.clone(), timeout, exec::Waiter::Console, com2);
        }
        if !opts.start_paused {
            self.resume()?;
        }
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.settle_snapshot();
                return Ok(Outcome::Timeout(opts.timeout.unwrap_or_default()));
            }
            // Wake for the run's deadline or a running command's, whichever is first.
            let until = [deadline, self.exec.next_deadline()]
                .into_iter()
                .flatten()
                .min();
            let fired = events.wait(until)?;
            if fired.has(Wake::SnapshotWritten) {
                self.settle_snapshot();
            }
            if let Some(outcome) = self.turn(fired, opts, control, signals, &mut hotkeys) {
                self.settle_snapshot();
                return Ok(outcome);
            }
            // A live snapshot begun this turn is finished when its writer
            // exits; where that cannot be watched, now.
            if !events.follow_writer(self.pending_writer()) {
                self.settle_snapshot();
            }
        }
    }

    /// Acts on what fired in one turn of the loop, in a fixed order: input
    /// room first, then exec, VM events, signals, the API, the console.
    fn turn(
        &mut self,
        fired: Fired,
        opts: &RunOptions,
        control: Option<&ControlServer>,
        signals: Option<&SignalFd>,
        hotkeys: &mut hotkeys::Hotkeys,
    ) -> Option<Outcome> {
        if fired.has(Wake::Com1Drained) {
            let _ = self.com1_drained.read();
            self.feed_console();
        }
        if fired.has(Wake::Com2Drained) {
            let _ = self.com2_drained.read();
            self.exec.feed(&self.devices.com2);
        }
        // A running command's deadline is checked at every turn.
        if fired.has(Wake::ExecInbox) || self.exec.next_deadline().is_some() {
            if let exec::Finished::Console(status) = self.exec.process(&self.devices.com2) {
                return Some(Outcome::ExecDone(status));
            }
        }
        if let Some(outcome) = self.on_vm_events(opts) {
            return Some(outcome);
        }
        if fired.has(Wake::Signal) {
            if let Some(signo) = signals.and_then(SignalFd::read) {
                return Some(Outcome::Signal(signo));
            }
        }
        if fired.has(Wake::Control) {
            if let Some((client, cmd)) = control.and_then(ControlServer::accept_command) {
                if self.serve(client, cmd) {
                    return Some(Outcome::Stopped);
                }
            }
        }
        for key in fired.keys {
            if let Some(outcome) = self.on_console_key(hotkeys, key) {
                return Some(outcome);
            }
        }
        None
    }

    /// Takes the VM events: the ready line writes the boot cache if asked;
    /// any other event ends the run.
    fn on_vm_events(&mut self, opts: &RunOptions) -> Option<Outcome> {
        let mut events = self.events.drain();
        if let Some(i) = events.iter().position(|e| *e == VmEvent::Ready) {
            events.remove(i);
            if let Some(dir) = &opts.snapshot_when_ready {
                match self.snapshot_create_at(dir, "boot-cache", Instant::now(), Default::default())
                {
                    Ok(r) => eprintln!(
                        "rewind: booted guest cached in {} (guest paused {:.1} ms)",
                        dir.display(),
                        r.pause_ms
                    ),
                    Err(e) => eprintln!("rewind: could not write the boot cache: {e}"),
                }
            }
        }
        // The first event that ends the run decides.
        events.into_iter().find_map(|e| self.outcome_of(e))
    }

    fn outcome_of(&self, event: VmEvent) -> Option<Outcome> {
        Some(match event {
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
            VmEvent::Ready => return None,
            VmEvent::Fatal(msg) => Outcome::Fatal(msg),
            VmEvent::ConsoleClosed => Outcome::ConsoleClosed,
            // Only rings with a fuzzer attached, which runs its own loop.
            VmEvent::Doorbell(_) => return None,
        })
    }
}

impl Vmm {
    /// Carries out one API command and answers its client (an exec's later,
    /// when it ends). Whether the VM should stop.
    fn serve(&mut self, client: crate::control::Client, cmd: Command) -> bool {
        if let Command::Exec { cmd, timeout_s } = cmd {
            match self.can_exec() {
                Ok(()) => self.start_exec(cmd, timeout_s, client.exec_waiter()),
                Err(e) => client.answer(&Err(e)),
            }
            return false;
        }
        if let Command::SnapshotCreate { name, paused, full } = cmd {
            let reply: snapshots::SnapshotReply =
                Box::new(move |r| client.answer(&r.map(Reply::SnapshotCreated)));
            self.snapshot_create_then(name, SnapshotHow { paused, full }, reply);
            return false;
        }
        let result = self.handle_command(cmd);
        let stop = matches!(result, Ok(Reply::Stopped));
        client.answer(&result);
        stop
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.settle_snapshot();
        for v in &mut self.vcpus {
            v.stop();
        }
        self.console.flush(crate::console::FLUSH_LIMIT);
        // The live overlays stay: they are the guest's disks as it left them
        // (`disk export --vm`), and `rewind rm` removes them with the VM.
    }
}
