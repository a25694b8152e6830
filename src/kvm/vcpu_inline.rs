//! A vCPU run on the caller's thread instead of its own. A fuzzer's loop
//! (write an input, run it, reset, again) then costs no thread hand-off:
//! with a vCPU thread each input woke it (a signal and a futex) and was
//! woken back by its doorbell (another futex), and the reset waited for the
//! device lock the vCPU thread held while it finished the doorbell access.
//!
//! Nothing runs the guest between two [`InlineVcpu::run`] calls, so the
//! vCPU is stopped whenever the caller holds it. A deadline is a POSIX
//! timer aimed at the calling thread with the vCPU kick signal: its handler
//! sets `immediate_exit`, as a kick to a vCPU thread does.

use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

use super::vcpu::{kick_signal, set_kick_target, Flow, VcpuCore, VcpuTask};
use crate::events::VmEvent;

/// Why [`InlineVcpu::run`] returned. The vCPU is stopped in every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InlineStop {
    /// A device parked the vCPU (a fuzzing doorbell).
    Parked,
    /// The vCPU cannot go on (triple fault, fatal exit; its event was sent).
    Halted,
    /// The caller's `stop` check said so (an event that ends the run).
    Stopped,
    /// The deadline passed.
    TimedOut,
}

/// A timer that sends the kick signal to one thread.
struct KickTimer {
    id: libc::timer_t,
    tid: libc::pid_t,
}

// SAFETY: a timer id is a process-wide handle; any thread may arm or
// delete it (it only names the thread it signals).
unsafe impl Send for KickTimer {}

impl KickTimer {
    fn for_this_thread() -> Result<KickTimer, String> {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        // SAFETY: an all-zero sigevent is valid; the fields that matter are
        // set below.
        let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
        ev.sigev_notify = libc::SIGEV_THREAD_ID;
        ev.sigev_signo = kick_signal();
        ev.sigev_notify_thread_id = tid;
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `ev` and `id` are valid for the call; the kernel writes `id`.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut id) } != 0 {
            return Err(format!(
                "cannot create the vCPU deadline timer: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(KickTimer { id, tid })
    }

    /// Fires once after `after` (zero disarms it).
    fn set(&self, after: Duration) {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `id` is a live timer (deleted only on drop), `spec` is
        // valid; the old value is not asked for.
        unsafe { libc::timer_settime(self.id, 0, &spec, std::ptr::null_mut()) };
    }
}

impl Drop for KickTimer {
    fn drop(&mut self) {
        // SAFETY: `id` came from timer_create and is deleted once.
        unsafe { libc::timer_delete(self.id) };
    }
}

pub(crate) struct InlineVcpu {
    core: VcpuCore,
    timer: Option<KickTimer>,
    /// A reset's vCPU half failed (its Fatal event was sent): the guest
    /// must not run until a task succeeds.
    halted: bool,
    /// The vCPU parked at an MMIO write that KVM finishes as it next
    /// enters (see [`InlineVcpu::run`]).
    write_unfinished: bool,
}

impl InlineVcpu {
    pub(crate) fn new(core: VcpuCore) -> InlineVcpu {
        InlineVcpu {
            core,
            timer: None,
            halted: false,
            write_unfinished: false,
        }
    }

    /// See [`InlineVcpu::run`]: a read of the vCPU's state now must first
    /// let KVM finish the write ([`Self::finish_write`]).
    pub(crate) fn write_unfinished(&self) -> bool {
        self.write_unfinished
    }

    fn finish_write(&mut self) {
        if std::mem::take(&mut self.write_unfinished) {
            self.core.complete_in_flight_io();
        }
    }

    /// The stopped vCPU itself (bench support: the bare KVM_RUN loop).
    pub(crate) fn vcpu(&mut self) -> &mut VcpuFd {
        self.finish_write();
        &mut self.core.vcpu
    }

    /// Runs `task` on the stopped vCPU.
    pub(crate) fn run_task(&mut self, task: VcpuTask) -> Result<(), String> {
        self.finish_write();
        task(&mut self.core.vcpu)
    }

    /// Runs `task` (a reset's vCPU half) to be followed by [`Self::run`]. A
    /// failure is reported as a Fatal event, as the vCPU thread does, and
    /// keeps the guest from running. A write left unfinished stays so: the
    /// task finishes it if it reads state (it knows from
    /// [`Self::write_unfinished`], asked before).
    pub(crate) fn run_task_then_run(&mut self, task: VcpuTask) {
        match task(&mut self.core.vcpu) {
            Ok(()) => self.halted = false,
            Err(msg) => {
                self.halted = true;
                let cpu = self.core.ctx.index;
                self.core
                    .ctx
                    .events
                    .send(VmEvent::Fatal(format!("vCPU {cpu}: {msg}")));
            }
        }
    }

    /// Runs the guest on this thread until a device parks the vCPU, it
    /// halts, `stop` (asked after every other exit) says so, or `deadline`
    /// passes.
    pub(crate) fn run(
        &mut self,
        deadline: Instant,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<InlineStop, String> {
        if self.halted {
            return Ok(InlineStop::Halted);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(InlineStop::TimedOut);
        }
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        if self.timer.as_ref().map(|t| t.tid) != Some(tid) {
            self.timer = Some(KickTimer::for_this_thread()?);
        }
        let timer = self.timer.as_ref().expect("set above");
        // The kick target before the timer: a signal that lands first
        // makes the next KVM_RUN return at once.
        set_kick_target(self.core.vcpu.get_kvm_run());
        self.core.vcpu.set_kvm_immediate_exit(0);
        timer.set(left);
        // The first KVM_RUN below finishes it.
        self.write_unfinished = false;
        let outcome = loop {
            if kick_seen(&mut self.core.vcpu) && Instant::now() >= deadline {
                self.core.complete_in_flight_io();
                break InlineStop::TimedOut;
            }
            if let Flow::Halt = self.core.run_once() {
                break InlineStop::Halted;
            }
            if self
                .core
                .ctx
                .park
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                // A doorbell is an MMIO write: KVM has moved RIP past it and
                // written the registers back, and finishing it changes no
                // state, so the next KVM_RUN may do it (a reset that only
                // writes the vCPU's state spares a run). State read before
                // then is not what the guest will see, though: on PVM,
                // KVM_GET_XSAVE then reports SSE state in use (XSTATE_BV 2)
                // where the guest's is still in its initial state (0), so
                // every reader finishes the write first.
                if self.core.last_exit_mmio_write {
                    self.write_unfinished = true;
                } else {
                    self.core.complete_in_flight_io();
                }
                break InlineStop::Parked;
            }
            if stop() {
                self.core.complete_in_flight_io();
                break InlineStop::Stopped;
            }
        };
        // Disarmed before the kick target goes: a signal from a timer that
        // fired meanwhile still finds a live kvm_run (the next run clears
        // its immediate_exit).
        timer.set(Duration::ZERO);
        set_kick_target(std::ptr::null_mut());
        Ok(outcome)
    }
}

/// Whether a kick set `immediate_exit` (it is cleared for the next run).
fn kick_seen(vcpu: &mut VcpuFd) -> bool {
    // SAFETY: the vCPU's own live kvm_run mapping; the signal handler on
    // this thread writes the same byte, so read it volatile.
    let flag = unsafe { std::ptr::read_volatile(&vcpu.get_kvm_run().immediate_exit) };
    if flag != 0 {
        vcpu.set_kvm_immediate_exit(0);
    }
    flag != 0
}
