//! virtio devices behind the virtio-mmio transport (virtio 1.1, modern
//! interface only: MMIO version 2, `VIRTIO_F_VERSION_1` always offered).
//!
//! # Wiring a device into the VMM
//!
//! ```text
//! let mem: GuestMemory = ...;                        // cheap clone (Arc'd regions)
//! let backend = DiskBackend::new(disk, id, read_only);  // disk: Arc<Mutex<disk::Disk>>
//! let dev = MmioTransport::new(mem.clone(), Block::new(Box::new(backend)))?;
//! ```
//!
//! * **MMIO window**: [`MMIO_WINDOW_SIZE`] (0x200) bytes at `BASE`. Keep an
//!   `Arc<Mutex<MmioTransport<Block>>>` for the poll loop and snapshots and
//!   insert a clone of it on the MMIO bus (`MmioTransport` is a `BusDevice`).
//!   Linux finds it from the kernel command line:
//!   `virtio_mmio.device=512@0xBASE:IRQ` (512 = 0x200; repeat the option
//!   once per device). The kernel needs `CONFIG_VIRTIO_MMIO` and
//!   `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`.
//! * **Interrupt**: register [`MmioTransport::irq_evt`] with `KVM_IRQFD` on
//!   GSI `IRQ`. The device writes 1 to it after setting InterruptStatus;
//!   the guest's handler reads InterruptStatus and acks, so edge triggering
//!   is enough.
//! * **Notifications**: for each `i`, register `queue_evts()[i]` with
//!   `KVM_IOEVENTFD` at `BASE + 0x50` (QueueNotify), length 4, datamatch
//!   `i` (the driver writes the queue index). When it becomes readable the
//!   poll loop locks the device and calls [`MmioTransport::process_queue`]`(i)`,
//!   which drains the eventfd itself. Without an ioeventfd the guest's
//!   write traps to the bus and is processed synchronously on the vCPU.
//! * **Snapshots**: `Persist::save` while the VM is paused. To restore, build
//!   a fresh transport (or reuse the old one), `restore(&state)`, register
//!   its fds, restore the irqchip, then call
//!   [`MmioTransport::kick_after_restore`].
//!
//! All processing is synchronous: a request is read, executed against the
//! backend and completed (data, status byte, used ring, interrupt) before
//! `process_queue` returns. The device therefore never holds a request in
//! flight, and a pause taken between two bus/poll-loop events never leaves
//! one half done; the queue position in the saved state is exact.

pub mod backend;
pub mod block;
pub mod mmio;

#[cfg(test)]
mod tests;

pub use backend::DiskBackend;
pub use block::Block;
pub use mmio::{MmioState, MmioTransport, MMIO_WINDOW_SIZE};

use virtio_queue::Queue;

use crate::memory::GuestMemory;

/// Feature bits shared by every device (device-specific ones live with the device).
pub mod features {
    use virtio_bindings::bindings::{virtio_config, virtio_ring};

    pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
    pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
    pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_ring::VIRTIO_RING_F_EVENT_IDX;
}

/// Device status bits (virtio 1.1 section 2.1).
pub mod status {
    use virtio_bindings::bindings::virtio_config as c;

    /// Only a driver sets it, and the only driver here is the tests'.
    #[cfg(test)]
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    pub const NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// A driver error after which the device cannot tell which requests the
/// driver meant: it stops the queue and sets DEVICE_NEEDS_RESET (virtio 1.1
/// section 2.1.2) instead of completing requests with no status, which a
/// driver would wait on forever or read a stale status from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("available index {avail} is more than a queue ({size}) ahead of {next}")]
    AvailIndex { avail: u16, next: u16, size: u16 },
    #[error("chain head {head} is outside the queue ({size})")]
    Head { head: u16, size: u16 },
    #[error(
        "descriptor chain at head {0} is cut short: a loop, a bad index or table, or over 4 GiB"
    )]
    Truncated(u16),
}

/// What a device type implements so that [`MmioTransport`] can carry it.
/// The transport owns the queues, the feature/status handshake, the
/// interrupt and snapshots of all that; the device owns its config space
/// and what a request means.
pub trait VirtioDevice: Send {
    /// virtio device ID (2 = block, 1 = net, 19 = vsock).
    fn device_type(&self) -> u32;
    /// One entry per queue: the QueueNumMax offered (a power of two).
    fn queue_max_sizes(&self) -> &[u16];
    /// Every feature bit offered, including `VIRTIO_F_VERSION_1` and any
    /// ring features (`EVENT_IDX`, `INDIRECT_DESC`) the device can honour.
    fn device_features(&self) -> u64;
    /// Config space read at `offset` from its start; bytes beyond the
    /// device's config structure read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Config space write; read-only fields ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK with `acked_features`. Also called by
    /// `restore` when the saved device was live. An error marks the device
    /// NEEDS_RESET.
    fn activate(&mut self, acked_features: u64) -> Result<(), String>;
    /// Consumes every available chain of queue `idx` and completes it.
    /// Returns whether the driver should be interrupted (the queue's
    /// notification suppression already consulted), or the driver error
    /// that leaves the queue unusable until a reset.
    fn process_queue(
        &mut self,
        idx: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, QueueError>;
    /// The driver wrote 0 to Status: forget negotiated state.
    fn reset(&mut self);
}
