//! How devices and vCPU threads tell the VMM's event loop that something
//! happened, without knowing anything about the VMM.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Something that ends the VM or needs the event loop's attention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest asked to end with this exit status (exit port or doorbell).
    GuestExit(i32),
    /// The guest asked for a reset (i8042 or ACPI); rewind ends the VM.
    Reset,
    /// A vCPU triple-faulted.
    TripleFault { cpu: usize },
    /// A console line matched `--expect`.
    ExpectMatched(String),
    /// The guest printed its ready line (`REWIND-READY`).
    Ready,
    /// A vCPU hit something it cannot continue from; the text is one line.
    Fatal(String),
    /// The console's reader went away (EPIPE on a pipe).
    ConsoleClosed,
    /// A fuzzing doorbell rang while a fuzzer was attached; the vCPU that
    /// rang it has stopped and waits for the fuzzer.
    Doorbell(Doorbell),
}

/// The fuzzing doorbells (devices::debug_console has the register map).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doorbell {
    /// Take the root snapshot here.
    Snapshot,
    /// This input ran to its end.
    Done,
    /// This input crashed with this code.
    Crash(u64),
}

/// The sending half, cloned into every device and vCPU thread. The EventFd
/// wakes the event loop; the channel carries the payload.
#[derive(Clone)]
pub struct VmEventSender {
    tx: Sender<VmEvent>,
    wake: Arc<EventFd>,
}

impl VmEventSender {
    pub fn send(&self, event: VmEvent) {
        // A closed channel means the VMM is already shutting down: nothing to tell.
        if self.tx.send(event).is_ok() {
            let _ = self.wake.write(1);
        }
    }
}

/// The receiving half, owned by the event loop.
pub struct VmEventReceiver {
    rx: Receiver<VmEvent>,
    wake: Arc<EventFd>,
}

impl VmEventReceiver {
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Drains the wake counter and returns every pending event.
    pub fn drain(&self) -> Vec<VmEvent> {
        let _ = self.wake.read();
        self.rx.try_iter().collect()
    }

    /// The next event, waiting at most `timeout` (a fuzzer's loop: one
    /// event per input, no poll set needed).
    pub fn recv_timeout(&self, timeout: std::time::Duration) -> Option<VmEvent> {
        self.rx.recv_timeout(timeout).ok()
    }
}

pub fn vm_event_channel() -> std::io::Result<(VmEventSender, VmEventReceiver)> {
    let (tx, rx) = channel();
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    Ok((
        VmEventSender {
            tx,
            wake: wake.clone(),
        },
        VmEventReceiver { rx, wake },
    ))
}
