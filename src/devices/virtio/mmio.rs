//! virtio-mmio transport, version 2 (virtio 1.1 section 4.2.2).
//!
//! Every register write comes from the guest, so nothing here trusts a
//! value: unknown offsets, odd sizes and out-of-range selectors read as zero
//! or are ignored, and queue addresses are only used through vm-memory,
//! which checks them on every access.

use serde::{Deserialize, Serialize};
use virtio_bindings::bindings::virtio_mmio as r;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::features::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use super::status::{DRIVER, DRIVER_OK, FAILED, FEATURES_OK, NEEDS_RESET};
use super::VirtioDevice;
use crate::devices::bus::BusDevice;
use crate::memory::GuestMemory;
use crate::snapshot::persist::Persist;

/// Size of the register window; the VMM puts `virtio_mmio.device=512@...` on
/// the kernel command line for it.
pub const MMIO_WINDOW_SIZE: u64 = 0x200;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = u32::from_le_bytes(*b"RWND");
const CONFIG_START: u64 = r::VIRTIO_MMIO_CONFIG as u64;
const INT_VRING: u32 = r::VIRTIO_MMIO_INT_VRING;
const INT_CONFIG: u32 = r::VIRTIO_MMIO_INT_CONFIG;

/// Bumped when `MmioState` changes meaning.
pub const MMIO_STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("cannot create eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("device offers an invalid queue size {0}")]
    QueueSize(u16),
    #[error("device does not offer VIRTIO_F_VERSION_1")]
    NotModern,
}

/// One virtqueue as the driver configured it. `Queue`'s interrupt-coalescing
/// counter is not saved: processing is synchronous and ends with
/// `needs_notification`, which zeroes it, so it is always 0 between calls.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqState {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

/// Transport state; the device's own state is implied by `driver_features`
/// and `activated` (block keeps nothing else).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub version: u32,
    pub device_type: u32,
    pub device_status: u32,
    pub device_features_sel: u32,
    pub driver_features: u64,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub activated: bool,
    pub queues: Vec<VirtqState>,
}

pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemory,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    irq_evt: EventFd,
    device_status: u32,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    activated: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(mem: GuestMemory, device: D) -> Result<Self, MmioError> {
        if device.device_features() & VIRTIO_F_VERSION_1 == 0 {
            return Err(MmioError::NotModern);
        }
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|_| MmioError::QueueSize(max))?);
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?);
        }
        Ok(Self {
            device,
            mem,
            queues,
            queue_evts,
            irq_evt: EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?,
            device_status: 0,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// Register with `KVM_IRQFD`.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }

    /// Register `queue_evts()[i]` with `KVM_IOEVENTFD` on QueueNotify
    /// (offset 0x50), datamatch `i`.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// For when the VMM remaps guest memory (e.g. restore with a new mapping).
    pub fn set_memory(&mut self, mem: GuestMemory) {
        self.mem = mem;
    }

    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// Called by the VMM's poll loop when `queue_evts()[idx]` fires, and by a
    /// trapped QueueNotify write. Drains the eventfd first so that a kick
    /// arriving during processing still leaves it readable for next time.
    pub fn process_queue(&mut self, idx: usize) {
        let Some(evt) = self.queue_evts.get(idx) else {
            return;
        };
        // EAGAIN just means nobody kicked through the eventfd.
        let _ = evt.read();
        if !self.activated || self.device_status & (NEEDS_RESET | FAILED) != 0 {
            return;
        }
        let Some(queue) = self.queues.get_mut(idx) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        if !queue.is_valid(&self.mem) {
            // Rings outside guest RAM: the driver can only recover by a reset,
            // so say so instead of silently ignoring its requests.
            self.set_needs_reset();
            return;
        }
        match self.device.process_queue(idx, queue, &self.mem) {
            Ok(true) => self.signal(INT_VRING),
            Ok(false) => {}
            Err(_) => {
                // Chains completed before the broken one still deserve
                // their interrupt; a spurious one is harmless.
                self.signal(INT_VRING);
                self.set_needs_reset();
            }
        }
    }

    /// Re-runs every ready queue after a restore: a kick that reached the
    /// old process's ioeventfd but was not processed before the pause is
    /// not in the saved state, so the rings themselves are re-read. Raises
    /// the interrupt if any cause is pending, in case the guest had not
    /// seen it yet.
    pub fn kick_after_restore(&mut self) {
        for idx in 0..self.queues.len() {
            self.process_queue(idx);
        }
        if self.interrupt_status != 0 {
            // A spurious interrupt is harmless: the handler reads InterruptStatus.
            let _ = self.irq_evt.write(1);
        }
    }

    /// For devices whose config space can change at run time (e.g. a
    /// resized disk): the driver re-reads config when ConfigGeneration moves.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.activated {
            self.signal(INT_CONFIG);
        }
    }

    fn signal(&mut self, cause: u32) {
        self.interrupt_status |= cause;
        // Only fails when the counter would overflow, i.e. it is already
        // pending; nothing is lost.
        let _ = self.irq_evt.write(1);
    }

    fn set_needs_reset(&mut self) {
        if self.device_status & NEEDS_RESET == 0 {
            self.device_status |= NEEDS_RESET;
            self.signal(INT_CONFIG);
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// Queue registers may only change between FEATURES_OK and the queue
    /// being enabled (4.2.3.2); later writes would move rings under the device.
    fn configurable_queue(&mut self) -> Option<&mut Queue> {
        if self.device_status & FEATURES_OK == 0 || self.device_status & FAILED != 0 {
            return None;
        }
        self.queues
            .get_mut(self.queue_sel as usize)
            .filter(|q| !q.ready())
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.device_status = 0;
        self.device_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.activated = false;
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.device_status;
        // The driver only ever adds bits (3.1.1); anything else is a bug we ignore.
        if value & old != old {
            return;
        }
        let added = value & !old;
        let mut new = value;
        if added & FEATURES_OK != 0 {
            let offered = self.device.device_features();
            let ok = old & DRIVER != 0
                && self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                // Leaving FEATURES_OK clear is how the device refuses (3.1.1 step 6).
                new &= !FEATURES_OK;
            }
        }
        if added & DRIVER_OK != 0 && new & FEATURES_OK == 0 {
            return;
        }
        self.device_status = new;
        if added & DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
        }
        match self.device.activate(self.driver_features) {
            Ok(()) => self.activated = true,
            Err(_) => self.set_needs_reset(),
        }
    }

    fn read_reg(&self, offset: u32) -> u32 {
        let sel_half = |v: u64, sel: u32| match sel {
            0 => v as u32,
            1 => (v >> 32) as u32,
            _ => 0,
        };
        let q = self.selected_queue();
        match offset {
            r::VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            r::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            r::VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            r::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            r::VIRTIO_MMIO_DEVICE_FEATURES => {
                sel_half(self.device.device_features(), self.device_features_sel)
            }
            r::VIRTIO_MMIO_QUEUE_NUM_MAX => q.map_or(0, |q| q.max_size().into()),
            r::VIRTIO_MMIO_QUEUE_NUM => q.map_or(0, |q| q.size().into()),
            r::VIRTIO_MMIO_QUEUE_READY => q.map_or(0, |q| q.ready().into()),
            r::VIRTIO_MMIO_QUEUE_DESC_LOW => q.map_or(0, |q| q.desc_table() as u32),
            r::VIRTIO_MMIO_QUEUE_DESC_HIGH => q.map_or(0, |q| (q.desc_table() >> 32) as u32),
            r::VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.map_or(0, |q| q.avail_ring() as u32),
            r::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.map_or(0, |q| (q.avail_ring() >> 32) as u32),
            r::VIRTIO_MMIO_QUEUE_USED_LOW => q.map_or(0, |q| q.used_ring() as u32),
            r::VIRTIO_MMIO_QUEUE_USED_HIGH => q.map_or(0, |q| (q.used_ring() >> 32) as u32),
            r::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            r::VIRTIO_MMIO_STATUS => self.device_status,
            r::VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // 4.2.2.1 (1.2): all-ones length means "no shared memory region".
            r::VIRTIO_MMIO_SHM_LEN_LOW | r::VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u32, v: u32) {
        match offset {
            r::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            r::VIRTIO_MMIO_DRIVER_FEATURES => {
                // Features are frozen once FEATURES_OK is accepted (3.1.1).
                if self.device_status & DRIVER == 0 || self.device_status & FEATURES_OK != 0 {
                    return;
                }
                let v = u64::from(v);
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
            }
            r::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            r::VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            r::VIRTIO_MMIO_QUEUE_NUM => {
                if let (Some(q), Ok(size)) = (self.configurable_queue(), u16::try_from(v)) {
                    // Queue ignores sizes that are not a power of two <= max.
                    q.set_size(size);
                }
            }
            r::VIRTIO_MMIO_QUEUE_READY => {
                // Disabling is always safe (Linux's del_vq does it); enabling
                // needs negotiated features so event_idx is known.
                let enable = v == 1;
                if enable && self.device_status & FEATURES_OK == 0 {
                    return;
                }
                if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
                    q.set_ready(enable);
                }
            }
            r::VIRTIO_MMIO_QUEUE_NOTIFY => self.process_queue(v as usize),
            r::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !v,
            r::VIRTIO_MMIO_STATUS => self.write_status(v),
            r::VIRTIO_MMIO_QUEUE_DESC_LOW
            | r::VIRTIO_MMIO_QUEUE_DESC_HIGH
            | r::VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | r::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | r::VIRTIO_MMIO_QUEUE_USED_LOW
            | r::VIRTIO_MMIO_QUEUE_USED_HIGH => {
                let Some(q) = self.configurable_queue() else {
                    return;
                };
                let high = offset & 4 != 0;
                let (lo, hi) = if high {
                    (None, Some(v))
                } else {
                    (Some(v), None)
                };
                // Misaligned addresses are dropped by Queue, so is_valid fails later.
                match offset & !4 {
                    r::VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                    r::VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                }
            }
            _ => {}
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            self.device.read_config(offset - CONFIG_START, data);
            return;
        }
        data.fill(0);
        // Registers are 32-bit only (4.2.2.2); other widths read as zero.
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset as u32).to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_START {
            self.device.write_config(offset - CONFIG_START, data);
            return;
        }
        if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_reg(offset as u32, u32::from_le_bytes(bytes));
        }
    }
}

impl<D: VirtioDevice> Persist for MmioTransport<D> {
    type State = MmioState;

    fn save(&self) -> MmioState {
        MmioState {
            version: MMIO_STATE_VERSION,
            device_type: self.device.device_type(),
            device_status: self.device_status,
            device_features_sel: self.device_features_sel,
            driver_features: self.driver_features,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            activated: self.activated,
            queues: self
                .queues
                .iter()
                .map(|q| VirtqState {
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    event_idx: q.event_idx_enabled(),
                })
                .collect(),
        }
    }

    /// Validates everything before changing anything, so a rejected state
    /// leaves the device as it was.
    fn restore(&mut self, s: &MmioState) -> Result<(), String> {
        if s.version != MMIO_STATE_VERSION {
            return Err(format!(
                "virtio-mmio state version {} (expected {MMIO_STATE_VERSION})",
                s.version
            ));
        }
        if s.device_type != self.device.device_type() {
            return Err(format!(
                "virtio device type {} in snapshot, {} here",
                s.device_type,
                self.device.device_type()
            ));
        }
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "virtio device has {} queues, snapshot has {}",
                self.queues.len(),
                s.queues.len()
            ));
        }
        let offered = self.device.device_features();
        if s.driver_features & !offered != 0 {
            // E.g. the disk was writable when saved and is read-only now.
            return Err(format!(
                "snapshot negotiated virtio features {:#x} the device no longer offers ({offered:#x})",
                s.driver_features & !offered
            ));
        }
        if s.activated && s.device_status & DRIVER_OK == 0 {
            return Err("virtio device active without DRIVER_OK".into());
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, (vq, q)) in s.queues.iter().zip(&self.queues).enumerate() {
            let state = QueueState {
                max_size: q.max_size(),
                next_avail: vq.next_avail,
                next_used: vq.next_used,
                event_idx_enabled: vq.event_idx,
                size: vq.size,
                ready: vq.ready,
                desc_table: vq.desc_table,
                avail_ring: vq.avail_ring,
                used_ring: vq.used_ring,
            };
            queues.push(Queue::try_from(state).map_err(|e| format!("virtio queue {i}: {e}"))?);
        }

        self.device.reset();
        if s.activated {
            self.device.activate(s.driver_features)?;
        }
        self.queues = queues;
        // Kicks queued before the revert belong to the discarded timeline;
        // kick_after_restore re-reads the rings instead.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.device_status = s.device_status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features = s.driver_features;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        self.activated = s.activated;
        Ok(())
    }
}
