//! One thread per vCPU, driven by messages (run, pause, resume, stop).
//!
//! Kicking a vCPU out of `KVM_RUN` is race-free: the requester queues the
//! message, then signals the thread; the handler sets `immediate_exit` in
//! this thread's `kvm_run`, so a signal that lands just before `KVM_RUN`
//! still makes it return at once, and the thread then reads its mailbox.
//!
//! Every request carries a sequence number and its reply echoes it. A
//! request whose wait timed out is still carried out later and its reply
//! arrives late; the next wait drops it by its number instead of taking it
//! for the answer to a newer request.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::assist;
use super::vcpu_inline::InlineVcpu;
use crate::devices::Bus;
use crate::events::{VmEvent, VmEventSender};
use crate::memory::GuestMemory;

/// Offset from SIGRTMIN of the signal that kicks vCPUs.
const KICK_SIGNAL_OFFSET: c_int = 0;
/// A vCPU that does not acknowledge within this long is reported, not waited on forever.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

thread_local! {
    // Set only while this thread owns a live VcpuFd (trap: the handler must
    // never see a freed kvm_run mapping), cleared before the fd is dropped.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Points this thread's kick handler at `run` (null: at nothing). Whoever
/// sets it clears it before the vCPU fd can be dropped or leave the thread.
pub(crate) fn set_kick_target(run: *mut kvm_run) {
    KVM_RUN_PTR.with(|p| p.set(run));
}

extern "C" fn kick_handler(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    let ptr = KVM_RUN_PTR.with(|p| p.get());
    if !ptr.is_null() {
        // SAFETY: the pointer is this thread's live kvm_run mapping (see KVM_RUN_PTR).
        unsafe { std::ptr::write_volatile(&mut (*ptr).immediate_exit, 1) };
    }
}

pub fn kick_signal() -> c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// Installs the kick handler once per process.
pub fn register_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), kick_handler).map_err(std::io::Error::from)
}

/// A closure run on the vCPU thread while it is paused, with the vCPU fd.
pub type VcpuTask = Box<dyn FnOnce(&mut VcpuFd) -> Result<(), String> + Send>;

pub enum Request {
    Pause,
    Resume,
    Stop,
    /// Only accepted while paused; used by snapshot capture and restore.
    Run(VcpuTask),
    /// Run the task, then run the guest if it succeeded, also a vCPU that
    /// had stopped for good (a triple fault): a fuzzer's reset puts the
    /// whole state back and goes on in one round trip.
    RunResume(VcpuTask),
    /// Stop being a thread: hand the vCPU over (stopped, in-flight I/O
    /// completed) to whoever runs it from here (see vcpu_inline).
    Handover(Sender<VcpuCore>),
}

#[derive(Debug)]
pub enum Reply {
    Paused,
    Resumed,
    Done(Result<(), String>),
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {0} thread is gone")]
    Gone(usize),
    #[error("vCPU {0} did not answer within {1:?}")]
    Timeout(usize, Duration),
    #[error("vCPU {cpu}: {msg}")]
    Task { cpu: usize, msg: String },
    #[error("cannot start vCPU thread: {0}")]
    Spawn(std::io::Error),
}

/// What a vCPU thread needs from the VM.
pub struct VcpuContext {
    pub index: usize,
    pub pio: Bus,
    pub mmio: Bus,
    pub mem: GuestMemory,
    pub events: VmEventSender,
    /// Set by a device (the fuzzing doorbell) that needs this vCPU to stop
    /// right after the access it is handling; the thread takes it and
    /// pauses itself.
    pub park: Arc<AtomicBool>,
}

/// A request or reply on the wire, with its sequence number.
struct Numbered<T> {
    seq: u64,
    msg: T,
}

pub struct VcpuHandle {
    pub index: usize,
    tx: Sender<Numbered<Request>>,
    rx: Receiver<Numbered<Reply>>,
    next_seq: AtomicU64,
    reply_timeout: Duration,
    thread: Option<JoinHandle<()>>,
    /// The vCPU after [`VcpuHandle::make_inline`]: run on the caller's
    /// thread, its own thread gone.
    pub(crate) inline: Option<Mutex<InlineVcpu>>,
}

impl VcpuHandle {
    /// Starts the thread paused; `resume` lets it run.
    pub fn spawn(vcpu: VcpuFd, ctx: VcpuContext) -> Result<VcpuHandle, VcpuError> {
        let (tx, req_rx) = channel();
        let (reply_tx, rx) = channel();
        let index = ctx.index;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || VcpuThread::new(vcpu, ctx, req_rx, reply_tx).run())
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle {
            index,
            tx,
            rx,
            next_seq: AtomicU64::new(1),
            reply_timeout: REPLY_TIMEOUT,
            thread: Some(thread),
            inline: None,
        })
    }

    /// Takes the vCPU off its thread (which ends) to be run on the caller's
    /// from now on ([`InlineVcpu::run`]). The other methods keep working:
    /// pause and resume have nothing to do, tasks run at once.
    pub fn make_inline(&mut self) -> Result<(), VcpuError> {
        if self.inline.is_some() {
            return Ok(());
        }
        let (tx, rx) = channel();
        self.send(Request::Handover(tx))?;
        let core = rx.recv().map_err(|_| VcpuError::Gone(self.index))?;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.inline = Some(Mutex::new(InlineVcpu::new(core)));
        Ok(())
    }

    pub(crate) fn inline(&self) -> Option<std::sync::MutexGuard<'_, InlineVcpu>> {
        let m = self.inline.as_ref()?;
        Some(m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Queues `req` and kicks the thread; returns the number its reply carries.
    fn send(&self, req: Request) -> Result<Ticket, VcpuError> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.tx
            .send(Numbered { seq, msg: req })
            .map_err(|_| VcpuError::Gone(self.index))?;
        if let Some(t) = &self.thread {
            // A thread that already exited cannot be kicked and needs no kick.
            let _ = t.kill(kick_signal());
        }
        Ok(Ticket(seq))
    }

    /// The reply to `ticket`, dropping late replies to earlier requests
    /// (ones whose wait timed out). The thread answers in order, so a
    /// reply numbered above the ticket cannot come first.
    fn wait(&self, ticket: Ticket) -> Result<Reply, VcpuError> {
        let deadline = std::time::Instant::now() + self.reply_timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let reply = self.rx.recv_timeout(left).map_err(|e| match e {
                RecvTimeoutError::Timeout => VcpuError::Timeout(self.index, self.reply_timeout),
                RecvTimeoutError::Disconnected => VcpuError::Gone(self.index),
            })?;
            if reply.seq == ticket.0 {
                return Ok(reply.msg);
            }
        }
    }

    /// Asks to pause without waiting, so N vCPUs pause in parallel.
    pub fn request_pause(&self) -> Result<Ticket, VcpuError> {
        if self.inline.is_some() {
            // It runs only inside InlineVcpu::run, so it is stopped now.
            return Ok(Ticket(0));
        }
        self.send(Request::Pause)
    }

    pub fn wait_paused(&self, ticket: Ticket) -> Result<(), VcpuError> {
        if self.inline.is_some() {
            return Ok(());
        }
        match self.wait(ticket)? {
            Reply::Paused => Ok(()),
            _ => Err(VcpuError::Gone(self.index)),
        }
    }

    /// Asks to resume without waiting (see `request_pause`).
    pub fn request_resume(&self) -> Result<Ticket, VcpuError> {
        if self.inline.is_some() {
            return Ok(Ticket(0));
        }
        self.send(Request::Resume)
    }

    pub fn wait_resumed(&self, ticket: Ticket) -> Result<(), VcpuError> {
        if self.inline.is_some() {
            return Ok(());
        }
        match self.wait(ticket)? {
            Reply::Resumed => Ok(()),
            _ => Err(VcpuError::Gone(self.index)),
        }
    }

    /// The vCPU runs on the caller's thread and stopped at an MMIO write
    /// that its next KVM_RUN finishes (see kvm::vcpu_inline).
    pub fn write_unfinished(&self) -> bool {
        self.inline().is_some_and(|v| v.write_unfinished())
    }

    /// Runs `task` on the (paused) vCPU thread and waits for it.
    pub fn run_task(&self, task: VcpuTask) -> Result<(), VcpuError> {
        if let Some(mut v) = self.inline() {
            return v.run_task(task).map_err(|msg| VcpuError::Task {
                cpu: self.index,
                msg,
            });
        }
        let ticket = self.send(Request::Run(task))?;
        match self.wait(ticket)? {
            Reply::Done(Ok(())) => Ok(()),
            Reply::Done(Err(msg)) => Err(VcpuError::Task {
                cpu: self.index,
                msg,
            }),
            _ => Err(VcpuError::Gone(self.index)),
        }
    }

    /// Runs `task` on the stopped vCPU thread, then lets the guest run (see
    /// [`Request::RunResume`]), without waiting for the answer: a fuzzer
    /// hears from the guest next anyway. A task that fails is
    /// reported as [`VmEvent::Fatal`] (the guest does not run).
    pub fn request_run_and_resume(&self, task: VcpuTask) -> Result<Ticket, VcpuError> {
        if let Some(mut v) = self.inline() {
            v.run_task_then_run(task);
            return Ok(Ticket(0));
        }
        self.send(Request::RunResume(task))
    }

    pub fn stop(&mut self) {
        if self.inline.take().is_some() {
            return;
        }
        let _ = self.send(Request::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The sequence number a reply must carry to answer one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

#[derive(PartialEq, Eq, Clone, Copy)]
enum State {
    Running,
    Paused,
    /// The guest cannot continue (triple fault, fatal exit); wait for Stop.
    Halted,
}

/// The vCPU and what it needs to handle its exits: run by its own thread
/// ([`VcpuThread`]) or on a fuzzer's (see vcpu_inline).
pub(crate) struct VcpuCore {
    pub(crate) vcpu: VcpuFd,
    pub(crate) ctx: VcpuContext,
    /// The last exit was an MMIO write (KVM had already moved RIP past it).
    pub(crate) last_exit_mmio_write: bool,
}

struct VcpuThread {
    core: VcpuCore,
    requests: Receiver<Numbered<Request>>,
    replies: Sender<Numbered<Reply>>,
    state: State,
}

pub(crate) enum Flow {
    Continue,
    Halt,
}

/// What the thread does after a request.
enum Next {
    Go,
    Stop,
    Handover(Sender<VcpuCore>),
}

impl VcpuThread {
    fn new(
        vcpu: VcpuFd,
        ctx: VcpuContext,
        requests: Receiver<Numbered<Request>>,
        replies: Sender<Numbered<Reply>>,
    ) -> Self {
        VcpuThread {
            core: VcpuCore {
                vcpu,
                ctx,
                last_exit_mmio_write: false,
            },
            requests,
            replies,
            state: State::Paused,
        }
    }

    fn run(mut self) {
        crate::seccomp::install_or_exit(crate::seccomp::Thread::Vcpu);
        set_kick_target(self.core.vcpu.get_kvm_run());
        let next = self.event_loop();
        // Cleared before the vCPU leaves this thread (see KVM_RUN_PTR).
        set_kick_target(std::ptr::null_mut());
        if let Next::Handover(to) = next {
            let _ = to.send(self.core);
        }
    }

    fn handle(&mut self, req: Numbered<Request>) -> Next {
        let seq = req.seq;
        let reply = |msg| Numbered { seq, msg };
        match req.msg {
            Request::Stop => return Next::Stop,
            Request::Handover(to) => {
                if self.state == State::Running {
                    self.core.complete_in_flight_io();
                }
                return Next::Handover(to);
            }
            Request::Pause => {
                if self.state == State::Running {
                    self.core.complete_in_flight_io();
                    // Tell a kvmclock-aware guest it was paused, so its
                    // soft-lockup watchdog does not fire after a long pause.
                    let _ = self.core.vcpu.kvmclock_ctrl();
                    self.state = State::Paused;
                }
                let _ = self.replies.send(reply(Reply::Paused));
            }
            Request::Resume => {
                if self.state == State::Paused {
                    self.state = State::Running;
                }
                let _ = self.replies.send(reply(Reply::Resumed));
            }
            Request::Run(task) => {
                let result = if self.state == State::Running {
                    Err("vCPU must be paused first".to_string())
                } else {
                    task(&mut self.core.vcpu)
                };
                let _ = self.replies.send(reply(Reply::Done(result)));
            }
            Request::RunResume(task) => {
                let result = if self.state == State::Running {
                    Err("vCPU must be paused first".to_string())
                } else {
                    task(&mut self.core.vcpu)
                };
                match &result {
                    Ok(()) => self.state = State::Running,
                    // Whoever did not wait for the reply hears of it here.
                    Err(msg) => self.core.ctx.events.send(VmEvent::Fatal(format!(
                        "vCPU {}: {msg}",
                        self.core.ctx.index
                    ))),
                }
                let _ = self.replies.send(reply(Reply::Done(result)));
            }
        }
        Next::Go
    }

    fn event_loop(&mut self) -> Next {
        loop {
            if self.state != State::Running {
                match self.requests.recv() {
                    Ok(req) => match self.handle(req) {
                        Next::Go => {}
                        other => return other,
                    },
                    Err(_) => return Next::Stop,
                }
                continue;
            }
            // Clear the kick before reading the mailbox: a kick after this
            // point makes the next KVM_RUN return at once.
            self.core.vcpu.set_kvm_immediate_exit(0);
            while let Ok(req) = self.requests.try_recv() {
                match self.handle(req) {
                    Next::Go => {}
                    other => return other,
                }
            }
            if self.state != State::Running {
                continue;
            }
            if let Flow::Halt = self.core.run_once() {
                self.state = State::Halted;
            } else if self.core.ctx.park.swap(false, Ordering::SeqCst) {
                // The device already told the VMM; finish the access so the
                // saved RIP is past it, then wait for requests.
                self.core.complete_in_flight_io();
                self.state = State::Paused;
            }
        }
    }
}

/// See [`VcpuCore::complete_in_flight_io`]; for a reset's vCPU task, which
/// holds only the fd.
pub(crate) fn complete_in_flight_io(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
}

impl VcpuCore {
    /// Re-enters KVM_RUN with immediate_exit set, so KVM finishes a PIO/MMIO
    /// access whose data we already supplied instead of replaying or losing
    /// it after a snapshot.
    pub(crate) fn complete_in_flight_io(&mut self) {
        complete_in_flight_io(&mut self.vcpu);
    }

    pub(crate) fn run_once(&mut self) -> Flow {
        let cpu = self.ctx.index;
        self.last_exit_mmio_write = false;
        let exit = match self.vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Flow::Continue
            }
            Err(e) => {
                self.ctx
                    .events
                    .send(VmEvent::Fatal(format!("vCPU {cpu}: KVM_RUN failed: {e}")));
                return Flow::Halt;
            }
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !self.ctx.pio.read(port as u64, data) {
                    data.fill(0xff);
                }
            }
            VcpuExit::IoOut(port, data) => {
                self.ctx.pio.write(port as u64, data);
            }
            VcpuExit::MmioRead(addr, data) => {
                if !self.ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                self.ctx.mmio.write(addr, data);
                self.last_exit_mmio_write = true;
            }
            VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
            VcpuExit::Shutdown => {
                self.ctx.events.send(VmEvent::TripleFault { cpu });
                return Flow::Halt;
            }
            VcpuExit::SystemEvent(kind, _) => {
                let event = match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::GuestExit(0),
                    KVM_SYSTEM_EVENT_RESET => VmEvent::Reset,
                    KVM_SYSTEM_EVENT_CRASH => VmEvent::Fatal(format!("vCPU {cpu}: guest crashed")),
                    other => VmEvent::Fatal(format!("vCPU {cpu}: unknown system event {other}")),
                };
                self.ctx.events.send(event);
                return Flow::Halt;
            }
            VcpuExit::InternalError => {
                match assist::handle_internal_error(&mut self.vcpu, &self.ctx.mem, cpu) {
                    Ok(done) => {
                        if std::env::var_os("REWIND_TRACE_ASSIST").is_some() {
                            eprintln!("rewind: vCPU {cpu}: assisted {done:?}");
                        }
                    }
                    Err(msg) => {
                        self.ctx.events.send(VmEvent::Fatal(msg));
                        return Flow::Halt;
                    }
                }
            }
            VcpuExit::FailEntry(reason, _) => {
                self.ctx.events.send(VmEvent::Fatal(format!(
                    "vCPU {cpu}: KVM could not enter the guest (hardware reason {reason:#x})"
                )));
                return Flow::Halt;
            }
            other => {
                self.ctx.events.send(VmEvent::Fatal(format!(
                    "vCPU {cpu}: unexpected KVM exit {other:?}"
                )));
                return Flow::Halt;
            }
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request whose wait timed out is answered late; that late answer
    /// must not be taken for the reply to the next request.
    #[test]
    fn a_late_reply_is_not_taken_for_the_next_one() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("SKIPPED: /dev/kvm is not usable");
            return;
        };
        register_kick_handler().unwrap();
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let (events, _rx) = crate::events::vm_event_channel().unwrap();
        let ctx = VcpuContext {
            index: 0,
            pio: Bus::default(),
            mmio: Bus::default(),
            mem: crate::memory::create_guest_memory(2 << 20).unwrap(),
            events,
            park: Arc::default(),
        };
        let mut handle = VcpuHandle::spawn(vcpu, ctx).unwrap();
        handle.reply_timeout = Duration::from_millis(200);
        // A task that holds the (paused) vCPU thread until we let it go.
        let (release, held) = channel::<()>();
        let task: VcpuTask = Box::new(move |_| {
            let _ = held.recv();
            Ok(())
        });
        assert!(matches!(
            handle.run_task(task),
            Err(VcpuError::Timeout(0, _))
        ));
        release.send(()).unwrap();
        // The thread now answers the task (late), then this pause.
        let ticket = handle.request_pause().unwrap();
        handle.wait_paused(ticket).unwrap();
        let failing: VcpuTask = Box::new(|_| Err("second task".into()));
        match handle.run_task(failing) {
            Err(VcpuError::Task { msg, .. }) => assert_eq!(msg, "second task"),
            other => panic!("wrong reply: {other:?}"),
        }
        handle.stop();
    }
}
