//! The VMM: owns the VM, its memory, devices and vCPU threads, runs the
//! event loop, and carries out [`crate::control::Command`]s.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use regex::Regex;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{KernelSource, VmConfig};
use crate::console::{Console, ConsoleKey, ConsoleTarget, EscapeParser, RawTerminal};
use crate::control::{ApiResponse, Command, ControlServer};
use crate::devices::bus::lock;
use crate::devices::debug_console::DebugConsole;
use crate::devices::exit_port::{ExitPort, EXIT_PORT};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{SerialDevice, COM1_BASE, COM1_IRQ, UART_LEN};
use crate::devices::Bus;
use crate::events::{vm_event_channel, VmEvent, VmEventReceiver};
use crate::guest::GuestKind;
use crate::kvm::host::{host_mem_mib, HostKind};
use crate::kvm::vcpu::{register_kick_handler, VcpuContext, VcpuError, VcpuHandle};
use crate::kvm::vm::{kvm_err, Vm, VmError};
use crate::kvm::{boot, cpuid, loader};
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
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Io { what, source }
}

/// How a run ended; `exit_code` is what `rewind run` exits with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    GuestExit(i32),
    Reset,
    Expected(String),
    Timeout(Duration),
    TripleFault { cpu: usize },
    Fatal(String),
    Stopped,
}

pub const EXIT_TIMEOUT: i32 = 124;

impl Outcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::GuestExit(s) => *s,
            Outcome::Reset | Outcome::Expected(_) | Outcome::Stopped => 0,
            Outcome::Timeout(_) => EXIT_TIMEOUT,
            Outcome::TripleFault { .. } | Outcome::Fatal(_) => 1,
        }
    }

    /// The one line to print on stderr, if any.
    pub fn message(&self) -> Option<String> {
        match self {
            Outcome::GuestExit(_) | Outcome::Expected(_) | Outcome::Stopped => None,
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
}

pub struct Vmm {
    pub config: VmConfig,
    pub host: HostKind,
    vm: Vm,
    mem: GuestMemory,
    vcpus: Vec<VcpuHandle>,
    serial: Arc<Mutex<SerialDevice>>,
    events: VmEventReceiver,
    paused: bool,
    started: Instant,
}

impl Vmm {
    /// Builds the machine and loads the kernel; vCPUs are created paused.
    pub fn boot(config: VmConfig, opts: &RunOptions) -> Result<Vmm, VmmError> {
        let host = HostKind::detect();
        let vm = Vm::new()?;
        config.validate(host_mem_mib(), vm.max_vcpus())?;
        register_kick_handler().map_err(io_err("the vCPU kick signal"))?;

        let mem = memory::create_guest_memory(config.mem_bytes())?;
        vm.register_memory(&mem)?;
        let (events_tx, events) = vm_event_channel().map_err(io_err("the event channel"))?;
        let console = Console::new(&opts.console, opts.expect.clone(), events_tx.clone())
            .map_err(io_err("the console output"))?;

        let mut pio = Bus::default();
        let mut mmio = Bus::default();
        let irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("the UART interrupt"))?;
        vm.fd
            .register_irqfd(&irq, COM1_IRQ)
            .map_err(kvm_err("route the UART interrupt"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(irq, console.clone())));
        pio.insert(COM1_BASE, UART_LEN, serial.clone())?;
        pio.insert(
            I8042_BASE,
            I8042_LEN,
            Arc::new(Mutex::new(I8042::new(events_tx.clone()))),
        )?;
        pio.insert(
            EXIT_PORT,
            1,
            Arc::new(Mutex::new(ExitPort::new(events_tx.clone()))),
        )?;
        mmio.insert(
            memory::DEBUG_CONSOLE_BASE,
            memory::DEBUG_CONSOLE_SIZE,
            Arc::new(Mutex::new(DebugConsole::new(
                mem.clone(),
                console.clone(),
                events_tx.clone(),
            ))),
        )?;

        let loaded = loader::load_kernel(&mem, &config)?;
        boot::write_boot_tables(&mem, config.mem_bytes())?;

        let mut vcpus = Vec::with_capacity(config.cpus as usize);
        for index in 0..config.cpus as usize {
            let fd = vm
                .fd
                .create_vcpu(index as u64)
                .map_err(kvm_err("create a vCPU"))?;
            fd.set_cpuid2(&cpuid::for_vcpu(
                &vm.supported_cpuid,
                index as u32,
                config.cpus,
            ))
            .map_err(kvm_err("set CPUID"))?;
            boot::set_boot_msrs(&fd)?;
            boot::set_lint(&fd)?;
            boot::set_fpu(&fd)?;
            // Linux wakes its APs itself (INIT/SIPI); the test guest's APs
            // start at its entry like the boot vCPU.
            if index == 0 || config.guest == GuestKind::Test {
                boot::set_long_mode_sregs(&fd)?;
                boot::set_entry_regs(&fd, loaded.entry, index as u64, config.cpus as u64)?;
                if index > 0 {
                    fd.set_mp_state(kvm_bindings::kvm_mp_state {
                        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
                    })
                    .map_err(kvm_err("make an AP runnable"))?;
                }
            }
            let ctx = VcpuContext {
                index,
                pio: pio.clone(),
                mmio: mmio.clone(),
                mem: mem.clone(),
                events: events_tx.clone(),
            };
            vcpus.push(VcpuHandle::spawn(fd, ctx)?);
        }
        Ok(Vmm {
            config,
            host,
            vm,
            mem,
            vcpus,
            serial,
            events,
            paused: true,
            started: Instant::now(),
        })
    }

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
    /// pause costs one round trip, not N).
    pub fn pause(&mut self) -> Result<Duration, VmmError> {
        let t = Instant::now();
        if !self.paused {
            for v in &self.vcpus {
                v.request_pause()?;
            }
            for v in &self.vcpus {
                v.wait_paused()?;
            }
            self.paused = true;
        }
        Ok(t.elapsed())
    }

    pub fn resume(&mut self) -> Result<(), VmmError> {
        if self.paused {
            for v in &self.vcpus {
                v.resume()?;
            }
            self.paused = false;
        }
        Ok(())
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
            other => (
                fail(
                    501,
                    &format!("{other:?} is not available in this version of rewind"),
                ),
                false,
            ),
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
            let stdin_idx = stdin_open.then(|| {
                fds.push(libc::pollfd {
                    fd: stdin_fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
                fds.len() - 1
            });
            let timeout_ms = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(Outcome::Timeout(opts.timeout.unwrap_or_default()));
                    }
                    (d - now).as_millis().min(i32::MAX as u128) as i32 + 1
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
            if let Some(event) = self.events.drain().into_iter().next() {
                return Ok(match event {
                    VmEvent::GuestExit(s) => Outcome::GuestExit(s),
                    VmEvent::Reset => Outcome::Reset,
                    VmEvent::TripleFault { cpu } => Outcome::TripleFault { cpu },
                    VmEvent::ExpectMatched(line) => Outcome::Expected(line),
                    VmEvent::Fatal(msg) => Outcome::Fatal(msg),
                });
            }
            if let Some(i) = signal_idx {
                if fds[i].revents & libc::POLLIN != 0 {
                    return Ok(Outcome::Stopped);
                }
            }
            if let (Some(i), Some(server)) = (control_idx, control) {
                if fds[i].revents & libc::POLLIN != 0 {
                    let mut stop = false;
                    let _ = server.serve_one(&mut |cmd| {
                        let (resp, s) = self.handle_command(cmd);
                        stop |= s;
                        resp
                    });
                    if stop {
                        return Ok(Outcome::Stopped);
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
                            ConsoleKey::Guest(bytes) => lock(&self.serial).enqueue_input(&bytes),
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
    }
}

/// SIGINT, SIGTERM and SIGHUP as a pollable fd, so a `kill` or Ctrl-C (when
/// the console is not raw) ends the VM through the normal exit path and the
/// terminal is restored. Must be created before any thread so the mask is
/// inherited.
pub struct SignalFd {
    pub fd: i32,
}

impl SignalFd {
    pub fn new() -> std::io::Result<SignalFd> {
        // SAFETY: sigset_t is plain data initialised by sigemptyset.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: all calls get valid pointers to `set`.
        let fd = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGHUP);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SignalFd { fd })
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        // SAFETY: closes the fd this struct owns.
        unsafe { libc::close(self.fd) };
    }
}
