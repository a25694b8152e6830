//! The VMM's event sources as rust-vmm `event-manager` subscribers. A
//! source that needs only its own device (a virtio queue) handles its event
//! where it fires, so a new device or queue registers itself and the loop
//! does not change. Sources that act on the whole VMM (API commands, exec,
//! the console, VM events, signals) report a typed [`Wake`] that
//! `Vmm::run` carries out once the turn's events are dispatched.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberId, SubscriberOps,
};

use super::{Vmm, VmmError};
use crate::console::{ConsoleInput, ConsoleKey};
use crate::control::ControlServer;
use crate::devices::bus::lock;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::VirtioDevice;

/// A source that fired and needs the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The guest drained COM1's input FIFO: room for console input.
    Com1Drained,
    /// The guest drained COM2's input FIFO: room for exec requests.
    Com2Drained,
    /// The guest agent sent something on COM2.
    ExecInbox,
    /// A device or vCPU sent a [`crate::events::VmEvent`].
    VmEvents,
    Signal,
    /// A client connected to the control socket.
    Control,
    /// A live snapshot's memory writer exited.
    SnapshotWritten,
}

/// What fired during one turn.
#[derive(Default)]
pub(crate) struct Fired {
    wakes: Vec<Wake>,
    /// Console keys, in the order typed.
    pub keys: Vec<ConsoleKey>,
    /// A source that could not be watched (set while registering).
    failed: Option<std::io::Error>,
}

impl Fired {
    pub fn has(&self, wake: Wake) -> bool {
        self.wakes.contains(&wake)
    }
}

type Shared = Rc<RefCell<Fired>>;

fn watch(ops: &mut EventOps, events: Events, shared: &Shared) {
    if let Err(e) = ops.add(events) {
        shared.borrow_mut().failed = Some(std::io::Error::other(e));
    }
}

/// A readable fd that means `wake`; the VMM reads it when it acts.
struct Source {
    fd: RawFd,
    wake: Wake,
    shared: Shared,
}

impl MutEventSubscriber for Source {
    fn init(&mut self, ops: &mut EventOps) {
        watch(ops, Events::new_raw(self.fd, EventSet::IN), &self.shared);
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        self.shared.borrow_mut().wakes.push(self.wake);
    }
}

/// Console input: read here, handed on as keys.
struct Stdin {
    input: ConsoleInput,
    shared: Shared,
}

/// Most reads (of up to 256 bytes) from a stdin that cannot be watched (a
/// regular file), which is read at once instead: enough for a typed script,
/// and a bound for an endless one (/dev/zero).
const UNWATCHABLE_STDIN_MAX: usize = 4096;

impl MutEventSubscriber for Stdin {
    fn init(&mut self, ops: &mut EventOps) {
        let events = Events::new_raw(self.input.fd(), EventSet::IN);
        if ops.add(events).is_err() {
            // epoll refuses files that are always readable (a regular
            // file, /dev/null): read them now, up to their end, as turns
            // woken by their readiness would have.
            for _ in 0..UNWATCHABLE_STDIN_MAX {
                let Some(keys) = self.input.read_keys() else {
                    break;
                };
                self.shared.borrow_mut().keys.extend(keys);
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.input.read_keys() {
            Some(keys) => self.shared.borrow_mut().keys.extend(keys),
            // Ended: watching it would report its end at every turn.
            None => {
                let _ = ops.remove(events);
            }
        }
    }
}

/// One virtio device's queue notifications, handled by the device itself.
struct Queues<D: VirtioDevice> {
    transport: Arc<Mutex<MmioTransport<D>>>,
    shared: Shared,
}

impl<D: VirtioDevice> MutEventSubscriber for Queues<D> {
    fn init(&mut self, ops: &mut EventOps) {
        let transport = lock(&self.transport);
        for (q, evt) in transport.queue_evts().iter().enumerate() {
            watch(
                ops,
                Events::with_data(evt, q as u32, EventSet::IN),
                &self.shared,
            );
        }
    }

    fn process(&mut self, events: Events, _: &mut EventOps) {
        lock(&self.transport).process_queue(events.data() as usize);
    }
}

/// The run's event sources, registered once.
pub(crate) struct EventLoop {
    manager: EventManager<Box<dyn MutEventSubscriber>>,
    shared: Shared,
    writer: Option<WriterWatch>,
}

/// A live snapshot's memory writer, watched through a pidfd (readable once
/// it exits; owned here, so that its number stays registered until it is
/// removed from the loop).
struct WriterWatch {
    pid: libc::pid_t,
    id: SubscriberId,
    _pidfd: OwnedFd,
}

fn loop_err(e: impl std::error::Error + Send + Sync + 'static) -> VmmError {
    super::io_err("the event loop")(std::io::Error::other(e))
}

impl EventLoop {
    /// Registers `subscriber`; one whose fds cannot be watched is taken out
    /// again.
    fn add(&mut self, subscriber: Box<dyn MutEventSubscriber>) -> Result<SubscriberId, VmmError> {
        let id = self.manager.add_subscriber(subscriber);
        let failed = self.shared.borrow_mut().failed.take();
        match failed {
            Some(e) => {
                let _ = self.manager.remove_subscriber(id);
                Err(loop_err(e))
            }
            None => Ok(id),
        }
    }

    fn source(&mut self, fd: RawFd, wake: Wake) -> Result<SubscriberId, VmmError> {
        let shared = self.shared.clone();
        self.add(Box::new(Source { fd, wake, shared }))
    }

    /// Watches the memory writer `pid` (the one pending now, or none), in
    /// place of the one watched before. False when it cannot be watched.
    pub fn follow_writer(&mut self, pid: Option<libc::pid_t>) -> bool {
        if self.writer.as_ref().map(|w| w.pid) == pid {
            return true;
        }
        if let Some(old) = self.writer.take() {
            let _ = self.manager.remove_subscriber(old.id);
        }
        let Some(pid) = pid else {
            return true;
        };
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return false;
        }
        // SAFETY: the kernel just returned this fd, and nothing else owns it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let Ok(id) = self.source(pidfd.as_raw_fd(), Wake::SnapshotWritten) else {
            return false;
        };
        self.writer = Some(WriterWatch {
            pid,
            id,
            _pidfd: pidfd,
        });
        true
    }

    /// Waits for events (or for `until`), dispatches them, and returns what
    /// needs the VMM.
    pub fn wait(&mut self, until: Option<Instant>) -> Result<Fired, VmmError> {
        let timeout_ms = match until {
            // Input read while registering is waiting already.
            _ if !self.shared.borrow().keys.is_empty() => 0,
            // One more millisecond: waking just before the deadline would
            // only mean another turn.
            Some(d) => {
                d.saturating_duration_since(Instant::now())
                    .as_millis()
                    .min(i32::MAX as u128 - 1) as i32
                    + 1
            }
            None => -1,
        };
        self.manager
            .run_with_timeout(timeout_ms)
            .map_err(loop_err)?;
        Ok(std::mem::take(&mut *self.shared.borrow_mut()))
    }
}

impl Vmm {
    /// Every source the run watches: the VM's own, then the control socket,
    /// signals and console input when the run has them (`stdin`: with that
    /// hotkey prefix, or none).
    pub(crate) fn event_loop(
        &self,
        control: Option<&ControlServer>,
        signals: Option<&super::SignalFd>,
        stdin: Option<Option<u8>>,
    ) -> Result<EventLoop, VmmError> {
        let mut lp = EventLoop {
            manager: EventManager::new().map_err(loop_err)?,
            shared: Shared::default(),
            writer: None,
        };
        lp.source(self.events.wake_fd().as_raw_fd(), Wake::VmEvents)?;
        lp.source(self.exec.inbox.wake.as_raw_fd(), Wake::ExecInbox)?;
        lp.source(self.com2_drained.as_raw_fd(), Wake::Com2Drained)?;
        lp.source(self.com1_drained.as_raw_fd(), Wake::Com1Drained)?;
        for disk in &self.devices.disks {
            let transport = disk.transport.clone();
            let shared = lp.shared.clone();
            lp.add(Box::new(Queues { transport, shared }))?;
        }
        if let Some(c) = control {
            lp.source(c.as_raw_fd(), Wake::Control)?;
        }
        if let Some(s) = signals {
            lp.source(s.fd, Wake::Signal)?;
        }
        if let Some(escape) = stdin {
            let input = ConsoleInput::stdin(escape);
            let shared = lp.shared.clone();
            lp.add(Box::new(Stdin { input, shared }))?;
        }
        Ok(lp)
    }
}
