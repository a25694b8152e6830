//! The library API a harness links against: [`Vm`].
//!
//! A `Vm` is one guest with one vCPU, driven from the thread that made it
//! (it is not `Send`; one harness thread per VM, as fuzzers run): run it
//! until a guest event or a timeout, read and write its memory and
//! registers, take a [`Vm::snapshot`] into memory (no files) and
//! [`Vm::reset`] back to it as often as you like. A guest talks to the
//! harness through the doorbell page (register map in the README and in
//! `src/devices/debug_console.rs`): it declares an input buffer, rings
//! SNAPSHOT where every input should start, and DONE or CRASH at the end
//! of each input.
//!
//! ```no_run
//! use std::time::Duration;
//! use rewind::{Event, Vm, VmOptions};
//!
//! let mut vm = Vm::boot(&VmOptions {
//!     cmdline: "mode=fuzz".into(),
//!     ..VmOptions::default()
//! })?;
//! assert_eq!(vm.run(Duration::from_secs(10))?, Event::SnapshotRequested);
//! vm.snapshot()?;
//! for input in [&b"hello"[..], b"RWND"] {
//!     vm.write_input(input)?;
//!     let event = vm.run(Duration::from_secs(1))?;
//!     println!("{input:?}: {event:?}");
//!     vm.reset()?;
//! }
//! # Ok::<(), rewind::Error>(())
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::config::{KernelSource, VmConfig};
use crate::console::ConsoleTarget;
use crate::devices::bus::lock;
use crate::devices::debug_console::FuzzLink;
use crate::events::{Doorbell, VmEvent};
use crate::fuzz::reset::MemSnapshot;
use crate::fuzz::vcpu_reset::InputEnd;
use crate::fuzz::{FuzzError, ResetTimes};
use crate::guest::GuestKind;
use crate::kvm::vcpu::VcpuTask;
use crate::kvm::vcpu_inline::InlineStop;
use crate::memory::PAGE_SIZE;
use crate::vmm::exec::{Finished, Waiter};
use crate::vmm::{RunOptions, Vmm, VmmError};

/// The vCPU's general-purpose registers, RIP and RFLAGS (KVM's layout).
pub type Registers = kvm_bindings::kvm_regs;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    Fuzz(#[from] FuzzError),
    #[error("a Vm drives one vCPU (got {0})")]
    Cpus(u32),
    #[error("the test guest runs no exec agent: start_command needs a Linux guest")]
    NoAgent,
    #[error("no snapshot taken yet: call snapshot() first")]
    NoSnapshot,
    #[error("the guest declared no input buffer (doorbell register 0x20)")]
    NoInputBuffer,
    #[error("input is {len} bytes; the guest's buffer takes at most {max}")]
    InputTooLong { len: usize, max: usize },
    #[error("guest memory {addr:#x}+{len:#x} is outside RAM")]
    Memory { addr: u64, len: usize },
    #[error("the guest stopped for good ({0}); reset() it first")]
    Dead(String),
    /// The vCPU could not be run on this thread (one line why).
    #[error("{0}")]
    Inline(String),
}

/// How to build a [`Vm`].
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// `None`: the test guest embedded in rewind (`mode=fuzz` is its fuzz
    /// target). Otherwise a `vmlinux` or bzImage.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_mib: u64,
    /// Base images, never written: each gets a qcow2 overlay in the VM's
    /// folder under `$REWIND_HOME` (removed with the `Vm`). After
    /// [`Vm::snapshot`] the guest's writes stay in memory and each reset
    /// drops them.
    pub disks: Vec<PathBuf>,
    /// Where the guest's console goes.
    pub console: Console,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    None,
    Stderr,
    File(PathBuf),
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            mem_mib: 64,
            disks: Vec::new(),
            console: Console::None,
        }
    }
}

/// Why [`Vm::run`] returned. After any of them the vCPU is stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The guest rang SNAPSHOT: take the root snapshot here.
    SnapshotRequested,
    /// The guest rang DONE: this input ran to its end.
    Done,
    /// The guest rang CRASH with this code.
    Crash(u64),
    /// The vCPU faulted beyond recovery (a triple fault): a crash too.
    Fault,
    /// The guest ended itself (exit port or doorbell) with this status.
    Exit(i32),
    /// The command [`Vm::start_command`] started ended with this status
    /// (124: it ran out of time; 1 also when the agent could not run it).
    CommandExited(i32),
    /// rewind could not continue the vCPU (one line saying why).
    Fatal(String),
    /// Nothing happened within the timeout (a hang, for a fuzzer).
    Timeout,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// One guest with one vCPU. See the module documentation for an example.
pub struct Vm {
    vmm: Vmm,
    link: Arc<FuzzLink>,
    snapshot: Option<MemSnapshot>,
    times: ResetTimes,
    /// Why the vCPU cannot run until a reset (a triple fault).
    dead: Option<String>,
    /// A reset's vCPU half, carried out as the vCPU next starts.
    vcpu_pending: bool,
    /// The last input ended at a doorbell store (see fuzz::untouched).
    stopped_at_doorbell: bool,
}

fn console_target(c: &Console) -> ConsoleTarget {
    match c {
        Console::None => ConsoleTarget::None,
        Console::Stderr => ConsoleTarget::Stderr,
        Console::File(p) => ConsoleTarget::File(p.clone()),
    }
}

fn run_options(c: &Console) -> RunOptions {
    RunOptions {
        console: console_target(c),
        expect: None,
        timeout: None,
        exec: None,
        snapshot_when_ready: None,
        start_paused: false,
        escape: None,
    }
}

fn vm_name() -> String {
    format!(
        "lib-{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

impl Vm {
    /// Boots a guest (paused until the first [`Vm::run`]).
    pub fn boot(opts: &VmOptions) -> Result<Vm, Error> {
        let (guest, kernel) = match &opts.kernel {
            None => (GuestKind::Test, KernelSource::EmbeddedTestGuest),
            Some(k) => (GuestKind::Linux, KernelSource::File(k.clone())),
        };
        let config = VmConfig {
            name: vm_name(),
            guest,
            kernel,
            initrd: opts.initrd.clone(),
            cmdline: opts.cmdline.clone(),
            mem_mib: opts.mem_mib,
            cpus: 1,
            acpi: false,
            disks: opts.disks.clone(),
        };
        Vm::new(Vmm::boot(config, &run_options(&opts.console))?)
    }

    /// Restores a snapshot directory (`rewind snapshot export`, or one in
    /// the store) into a new VM, paused.
    pub fn restore(dir: &Path, console: &Console) -> Result<Vm, Error> {
        Vm::new(Vmm::restore(dir, &vm_name(), &run_options(console))?)
    }

    fn new(vmm: Vmm) -> Result<Vm, Error> {
        if vmm.config.cpus != 1 {
            return Err(Error::Cpus(vmm.config.cpus));
        }
        let mut vmm = vmm;
        if vmm.devices.disks.is_empty() && vmm.config.guest == GuestKind::Test {
            // The vCPU runs on the harness's thread: no hand-off per input.
            // Disks keep their vCPU thread, since their queues are served by
            // the event loop on this one while the guest runs; so does a
            // Linux guest, whose exec agent it serves (start_command).
            vmm.vcpus[0].make_inline().map_err(FuzzError::from)?;
        }
        let link = lock(&vmm.devices.debug_console).fuzz_link();
        link.arm(true);
        Ok(Vm {
            vmm,
            link,
            snapshot: None,
            times: ResetTimes::default(),
            dead: None,
            vcpu_pending: false,
            stopped_at_doorbell: false,
        })
    }

    /// Runs the guest until it rings a doorbell, ends, faults, or `timeout`
    /// passes. The vCPU is stopped again when this returns.
    pub fn run(&mut self, timeout: Duration) -> Result<Event, Error> {
        if let Some(why) = &self.dead {
            return Err(Error::Dead(why.clone()));
        }
        let deadline = Instant::now() + timeout;
        if self.vmm.paused {
            self.start_vcpu()?;
        }
        // Read by the reset's vCPU half just handed over; this run decides anew.
        self.stopped_at_doorbell = false;
        let t = Instant::now();
        let event = self.run_until(deadline);
        self.times.guest_run += t.elapsed();
        event
    }

    fn run_until(&mut self, deadline: Instant) -> Result<Event, Error> {
        if self.vmm.vcpus[0].inline.is_some() {
            return self.run_inline(deadline);
        }
        self.run_with_devices(deadline)
    }

    /// [`Vm::run`] with the vCPU on this thread (see kvm::vcpu_inline).
    fn run_inline(&mut self, deadline: Instant) -> Result<Event, Error> {
        let mut seen = Vec::new();
        let outcome = {
            let events = &self.vmm.events;
            let mut vcpu = self.vmm.vcpus[0]
                .inline()
                .ok_or_else(|| Error::Inline("the vCPU is not on this thread".into()))?;
            vcpu.run(deadline, &mut || {
                let mut ends = false;
                while let Some(e) = events.recv_timeout(Duration::ZERO) {
                    ends |= !matches!(
                        e,
                        VmEvent::Ready | VmEvent::ExpectMatched(_) | VmEvent::ConsoleClosed
                    );
                    seen.push(e);
                }
                ends
            })
            .map_err(Error::Inline)?
        };
        self.vmm.paused = true;
        // A doorbell or a halt sent its event before the run returned.
        while let Some(e) = self.vmm.events.recv_timeout(Duration::ZERO) {
            seen.push(e);
        }
        for e in seen {
            if let Some(ev) = self.stopped_by(e) {
                return Ok(ev);
            }
        }
        match outcome {
            InlineStop::TimedOut => Ok(Event::Timeout),
            other => Err(Error::Dead(format!(
                "the vCPU stopped ({other:?}) without an event"
            ))),
        }
    }

    /// [`Vm::run`] for a VM whose vCPU has its own thread: the VMM's event
    /// loop (an epoll set, built per run) serves the disks' queues and the
    /// exec agent's channel while the guest runs.
    fn run_with_devices(&mut self, deadline: Instant) -> Result<Event, Error> {
        let mut lp = self.vmm.event_loop(None, None, None)?;
        loop {
            lp.wait(Some(deadline))?;
            let com2 = &self.vmm.devices.com2;
            self.vmm.exec.feed(com2);
            if let Finished::Detached(status) = self.vmm.exec.process(com2) {
                if !self.vmm.paused {
                    self.vmm.pause()?;
                }
                return Ok(Event::CommandExited(status));
            }
            for e in self.vmm.events.drain() {
                if let Some(ev) = self.stopped_by(e) {
                    if !self.vmm.paused {
                        self.vmm.pause()?;
                    }
                    return Ok(ev);
                }
            }
            if Instant::now() >= deadline {
                self.vmm.pause()?;
                for e in self.vmm.events.drain() {
                    if let Some(ev) = self.stopped_by(e) {
                        return Ok(ev);
                    }
                }
                return Ok(Event::Timeout);
            }
        }
    }

    /// Not `Vmm::resume`: this also restarts a vCPU that stopped for good
    /// (a triple fault) once a reset put its state back, and carries out
    /// the reset's vCPU half on the way.
    fn start_vcpu(&mut self) -> Result<(), Error> {
        let t = Instant::now();
        let task = self.take_vcpu_task(true);
        // Not waited for: the guest's next event (or a Fatal one, if the
        // task failed) is the answer, one thread wake-up fewer per input.
        self.vmm.vcpus[0]
            .request_run_and_resume(task)
            .map_err(FuzzError::from)?;
        if self.vmm.vcpus[0].inline.is_none() {
            self.times.vcpu_round_trip += t.elapsed();
        }
        self.vmm.paused = false;
        Ok(())
    }

    /// The pending vCPU restore, or nothing to do.
    fn take_vcpu_task(&mut self, then_runs: bool) -> VcpuTask {
        match (self.vcpu_pending, &self.snapshot) {
            (true, Some(s)) => {
                self.vcpu_pending = false;
                let ended = InputEnd {
                    at_doorbell: self.stopped_at_doorbell,
                    write_unfinished: self.vmm.vcpus[0].write_unfinished(),
                };
                s.vcpu_task(0, then_runs, ended)
            }
            _ => Box::new(|_| Ok(())),
        }
    }

    /// Stops the vCPU and carries out a pending vCPU restore, so its state
    /// can be read or written.
    fn settle(&mut self) -> Result<(), Error> {
        self.stop()?;
        if self.vcpu_pending {
            let task = self.take_vcpu_task(false);
            self.vmm.vcpus[0].run_task(task).map_err(FuzzError::from)?;
        }
        Ok(())
    }

    /// What a VM event means to the caller; `None` for ones that do not
    /// stop the run (the ready line).
    fn stopped_by(&mut self, event: VmEvent) -> Option<Event> {
        if matches!(event, VmEvent::Doorbell(_)) {
            self.stopped_at_doorbell = true;
        }
        let ev = match event {
            VmEvent::Doorbell(bell) => {
                // The vCPU parked itself right after the doorbell store.
                self.vmm.paused = true;
                match bell {
                    Doorbell::Snapshot => Event::SnapshotRequested,
                    Doorbell::Done => Event::Done,
                    Doorbell::Crash(code) => Event::Crash(code),
                }
            }
            VmEvent::TripleFault { .. } => {
                // The vCPU thread waits for requests; only a reset revives it.
                self.vmm.paused = true;
                self.dead = Some("triple fault".into());
                Event::Fault
            }
            VmEvent::GuestExit(s) => Event::Exit(s),
            VmEvent::Fatal(msg) => {
                self.vmm.paused = true;
                self.dead = Some(msg.clone());
                Event::Fatal(msg)
            }
            VmEvent::Reset => {
                self.vmm.paused = true;
                self.dead = Some("the guest asked for a reset".into());
                Event::Fatal("the guest asked for a reset".into())
            }
            VmEvent::Ready | VmEvent::ExpectMatched(_) | VmEvent::ConsoleClosed => return None,
        };
        Some(ev)
    }

    fn stop(&mut self) -> Result<(), Error> {
        self.vmm.pause()?;
        Ok(())
    }

    /// Takes a snapshot into memory (replacing any earlier one): guest
    /// memory, vCPU, VM and device state.
    pub fn snapshot(&mut self) -> Result<(), Error> {
        self.settle()?;
        self.snapshot = Some(MemSnapshot::take(&mut self.vmm)?);
        self.times = ResetTimes::default();
        Ok(())
    }

    /// Puts the VM back to the last [`Vm::snapshot`]: the pages dirtied
    /// since, the vCPU and VM state that differ, the devices. Also revives
    /// a vCPU that faulted.
    pub fn reset(&mut self) -> Result<(), Error> {
        self.stop()?;
        let snap = self.snapshot.as_ref().ok_or(Error::NoSnapshot)?;
        snap.reset(&mut self.vmm, &mut self.times)?;
        self.vcpu_pending = true;
        self.dead = None;
        Ok(())
    }

    /// Where each reset's time went, summed since the snapshot.
    pub fn reset_times(&self) -> ResetTimes {
        let mut t = self.times.clone();
        if let Some(s) = &self.snapshot {
            s.fill_vcpu_times(&mut t);
        }
        t
    }

    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.vmm
            .mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| Error::Memory {
                addr,
                len: buf.len(),
            })
    }

    /// Writes guest memory (tracked: the next reset undoes it).
    pub fn write_memory(&mut self, addr: u64, data: &[u8]) -> Result<(), Error> {
        self.vmm
            .mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| Error::Memory {
                addr,
                len: data.len(),
            })
    }

    /// The input buffer the guest declared: (guest-physical address,
    /// capacity in bytes including the 4-byte length).
    pub fn input_buffer(&self) -> Option<(u64, usize)> {
        self.link.input().map(|b| (b.addr, b.len))
    }

    /// Writes `data` into the guest's input buffer as the next input.
    pub fn write_input(&mut self, data: &[u8]) -> Result<(), Error> {
        let (addr, cap) = self.input_buffer().ok_or(Error::NoInputBuffer)?;
        let max = cap.saturating_sub(4);
        if data.len() > max {
            return Err(Error::InputTooLong {
                len: data.len(),
                max,
            });
        }
        self.write_memory(addr, &(data.len() as u32).to_le_bytes())?;
        self.write_memory(addr + 4, data)
    }

    /// The feedback buffer's bytes (empty if the guest declared none).
    pub fn feedback(&self) -> Result<Vec<u8>, Error> {
        let Some(b) = self.link.feedback() else {
            return Ok(Vec::new());
        };
        let mut out = vec![0u8; b.len];
        self.read_memory(b.addr, &mut out)?;
        Ok(out)
    }

    pub fn registers(&mut self) -> Result<Registers, Error> {
        self.settle()?;
        let (tx, rx) = channel();
        self.vmm.vcpus[0]
            .run_task(Box::new(move |fd| {
                let regs = fd.get_regs().map_err(|e| e.to_string())?;
                tx.send(regs).map_err(|_| "receiver gone".to_string())
            }))
            .map_err(FuzzError::from)?;
        rx.recv()
            .map_err(|_| Error::Dead("the vCPU thread is gone".into()))
    }

    pub fn set_registers(&mut self, regs: &Registers) -> Result<(), Error> {
        self.settle()?;
        let regs = *regs;
        self.vmm.vcpus[0]
            .run_task(Box::new(move |fd| {
                fd.set_regs(&regs).map_err(|e| e.to_string())
            }))
            .map_err(FuzzError::from)?;
        Ok(())
    }

    /// Starts `cmd` in the guest through its exec agent (the Linux guest
    /// guest-images/linux builds runs one on its second serial port) and
    /// returns at once: [`Vm::run`] carries the request to the guest while
    /// it runs, and returns [`Event::CommandExited`] if the command ends.
    /// Its output is dropped. This is how a harness starts a fuzz target in
    /// a restored Linux guest: start it, then run until it rings SNAPSHOT.
    /// The command has no time limit; give `run` one.
    pub fn start_command(&mut self, cmd: &str) -> Result<(), Error> {
        if self.vmm.config.guest != GuestKind::Linux {
            return Err(Error::NoAgent);
        }
        // The agent's request outlives every reset (the guest's side is put
        // back to where it waits for the command): no deadline of its own.
        const NO_DEADLINE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
        let com2 = &self.vmm.devices.com2;
        self.vmm
            .exec
            .start(cmd.to_string(), NO_DEADLINE, Waiter::Detached, com2);
        Ok(())
    }

    /// Bytes of disk writes held in memory since the snapshot, all disks.
    pub fn disk_scratch_bytes(&self) -> u64 {
        let disks = &self.vmm.devices.disks;
        disks.iter().map(|d| lock(&d.disk).scratch_bytes()).sum()
    }

    /// Bench support: the floor under a reset on this host
    /// ([`crate::fuzz::Floor`]), measured from the snapshot over `runs`
    /// inputs that are not reset in between (only the stack and KVM's dirty
    /// log are, so every input pays for its first write to each page as a
    /// reset one does). Memory is not put back: the VM is used up.
    #[doc(hidden)]
    pub fn measure_floor(mut self, runs: usize) -> Result<crate::fuzz::Floor, Error> {
        self.reset()?;
        self.settle()?;
        let snap = self.snapshot.as_ref().ok_or(Error::NoSnapshot)?;
        let regs = snap.vcpu_states()[0].regs;
        let done =
            crate::arch::layout::DEBUG_CONSOLE_BASE + crate::devices::debug_console::REG_FUZZ_DONE;
        // Two pages from the stack pointer down: the doorbell call's frame.
        let base = (regs.rsp & !(PAGE_SIZE - 1)).saturating_sub(PAGE_SIZE);
        let mut stack = (base, vec![0u8; 2 * PAGE_SIZE as usize]);
        self.read_memory(base, &mut stack.1)?;
        let slots = crate::memory::regions(&self.vmm.mem);
        let vm = &self.vmm.vm;
        let mut rearm = || {
            for (slot, (_, size, _)) in slots.iter().enumerate() {
                vm.take_dirty_log(slot as u32, *size as usize)
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        let mut vcpu = self.vmm.vcpus[0]
            .inline()
            .ok_or_else(|| Error::Inline("the vCPU is not on this thread".into()))?;
        let mut floor = crate::fuzz::floor::vcpu_floor(
            vcpu.vcpu(),
            &self.vmm.mem,
            &regs,
            &stack,
            done,
            runs,
            &mut rearm,
        )
        .map_err(Error::Inline)?;
        drop(vcpu);
        floor.hand_off = crate::fuzz::floor::hand_off(runs);
        Ok(floor)
    }

    /// Test support: every difference between the VM now and its snapshot
    /// (memory pages, vCPU state parts, irqchips, PIT, devices), read the
    /// slow, complete way. Empty after an exact reset.
    #[doc(hidden)]
    pub fn differences_from_snapshot(&mut self) -> Result<Vec<String>, Error> {
        self.settle()?;
        let snap = self.snapshot.as_ref().ok_or(Error::NoSnapshot)?;
        crate::fuzz::verify::differences(&self.vmm, snap)
    }
}

impl Drop for Vm {
    /// The VM's folder (disk overlays) goes with it: its name was made up
    /// here and nothing else refers to it.
    fn drop(&mut self) {
        let dir = crate::paths::vm_dir(&self.vmm.config.name);
        if dir.exists() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
