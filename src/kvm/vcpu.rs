//! One thread per vCPU, driven by messages (run, pause, resume, stop).
//!
//! Kicking a vCPU out of `KVM_RUN` is race-free: the requester queues the
//! message, then signals the thread; the handler sets `immediate_exit` in
//! this thread's `kvm_run`, so a signal that lands just before `KVM_RUN`
//! still makes it return at once, and the thread then reads its mailbox.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::assist;
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
    #[error("vCPU {0} did not answer within {REPLY_TIMEOUT:?}")]
    Timeout(usize),
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
}

pub struct VcpuHandle {
    pub index: usize,
    tx: Sender<Request>,
    rx: Receiver<Reply>,
    thread: Option<JoinHandle<()>>,
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
            thread: Some(thread),
        })
    }

    fn send(&self, req: Request) -> Result<(), VcpuError> {
        self.tx.send(req).map_err(|_| VcpuError::Gone(self.index))?;
        if let Some(t) = &self.thread {
            // A thread that already exited cannot be kicked and needs no kick.
            let _ = t.kill(kick_signal());
        }
        Ok(())
    }

    fn wait(&self) -> Result<Reply, VcpuError> {
        self.rx.recv_timeout(REPLY_TIMEOUT).map_err(|e| match e {
            RecvTimeoutError::Timeout => VcpuError::Timeout(self.index),
            RecvTimeoutError::Disconnected => VcpuError::Gone(self.index),
        })
    }

    /// Asks to pause without waiting, so N vCPUs pause in parallel.
    pub fn request_pause(&self) -> Result<(), VcpuError> {
        self.send(Request::Pause)
    }

    pub fn wait_paused(&self) -> Result<(), VcpuError> {
        match self.wait()? {
            Reply::Paused => Ok(()),
            _ => Err(VcpuError::Gone(self.index)),
        }
    }

    pub fn resume(&self) -> Result<(), VcpuError> {
        self.send(Request::Resume)?;
        match self.wait()? {
            Reply::Resumed => Ok(()),
            _ => Err(VcpuError::Gone(self.index)),
        }
    }

    /// Runs `task` on the (paused) vCPU thread and waits for it.
    pub fn run_task(&self, task: VcpuTask) -> Result<(), VcpuError> {
        self.send(Request::Run(task))?;
        match self.wait()? {
            Reply::Done(Ok(())) => Ok(()),
            Reply::Done(Err(msg)) => Err(VcpuError::Task {
                cpu: self.index,
                msg,
            }),
            _ => Err(VcpuError::Gone(self.index)),
        }
    }

    pub fn stop(&mut self) {
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

#[derive(PartialEq, Eq, Clone, Copy)]
enum State {
    Running,
    Paused,
    /// The guest cannot continue (triple fault, fatal exit); wait for Stop.
    Halted,
}

struct VcpuThread {
    vcpu: VcpuFd,
    ctx: VcpuContext,
    requests: Receiver<Request>,
    replies: Sender<Reply>,
    state: State,
}

enum Flow {
    Continue,
    Halt,
}

impl VcpuThread {
    fn new(
        vcpu: VcpuFd,
        ctx: VcpuContext,
        requests: Receiver<Request>,
        replies: Sender<Reply>,
    ) -> Self {
        VcpuThread {
            vcpu,
            ctx,
            requests,
            replies,
            state: State::Paused,
        }
    }

    fn run(mut self) {
        let run_ptr: *mut kvm_run = self.vcpu.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run_ptr));
        self.event_loop();
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    }

    /// Returns false on Stop.
    fn handle(&mut self, req: Request) -> bool {
        match req {
            Request::Stop => return false,
            Request::Pause => {
                if self.state == State::Running {
                    self.complete_in_flight_io();
                    // Tell a kvmclock-aware guest it was paused, so its
                    // soft-lockup watchdog does not fire after a long pause.
                    let _ = self.vcpu.kvmclock_ctrl();
                    self.state = State::Paused;
                }
                let _ = self.replies.send(Reply::Paused);
            }
            Request::Resume => {
                if self.state == State::Paused {
                    self.state = State::Running;
                }
                let _ = self.replies.send(Reply::Resumed);
            }
            Request::Run(task) => {
                let result = if self.state == State::Running {
                    Err("vCPU must be paused first".to_string())
                } else {
                    task(&mut self.vcpu)
                };
                let _ = self.replies.send(Reply::Done(result));
            }
        }
        true
    }

    fn event_loop(&mut self) {
        loop {
            if self.state != State::Running {
                match self.requests.recv() {
                    Ok(req) => {
                        if !self.handle(req) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
                continue;
            }
            // Clear the kick before reading the mailbox: a kick after this
            // point makes the next KVM_RUN return at once.
            self.vcpu.set_kvm_immediate_exit(0);
            while let Ok(req) = self.requests.try_recv() {
                if !self.handle(req) {
                    return;
                }
            }
            if self.state != State::Running {
                continue;
            }
            if let Flow::Halt = self.run_once() {
                self.state = State::Halted;
            }
        }
    }

    /// Re-enters KVM_RUN with immediate_exit set, so KVM finishes a PIO/MMIO
    /// access whose data we already supplied instead of replaying or losing
    /// it after a snapshot.
    fn complete_in_flight_io(&mut self) {
        self.vcpu.set_kvm_immediate_exit(1);
        let _ = self.vcpu.run();
        self.vcpu.set_kvm_immediate_exit(0);
    }

    fn run_once(&mut self) -> Flow {
        let cpu = self.ctx.index;
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
