//! virtio-blk (virtio 1.1 section 5.2) over a [`BlockBackend`].
//!
//! Requests are framing-agnostic as VERSION_1 requires: the device-readable
//! descriptors form one byte stream (16-byte header, then OUT data or
//! discard segments) and the device-writable ones another (IN data, then
//! the status byte as its very last byte). The guest is untrusted: chains
//! are bounded, every range is checked against guest memory and the disk
//! before any I/O, data moves through a fixed-size bounce buffer, and every
//! failure ends in a status byte rather than a panic.

use virtio_bindings::bindings::virtio_blk as b;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::backend::BlockBackend;
use super::features::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use super::{QueueError, VirtioDevice};
use crate::memory::GuestMemory;
use std::sync::atomic::Ordering;

pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request; with header and status this bounds a chain.
pub const SEG_MAX: u32 = 128;
const MAX_DESCS: usize = SEG_MAX as usize + 2;
/// Bounce buffer size: the most a single request can make the VMM allocate.
const CHUNK: usize = 64 * 1024;
const HEADER_LEN: u64 = 16;
const ID_LEN: usize = b::VIRTIO_BLK_ID_BYTES as usize;
/// struct virtio_blk_discard_write_zeroes
const DWZ_SEG_LEN: u64 = 16;
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
const MAX_DISCARD_SEG: u32 = 32;
/// Kept small because a backend without fallocate zero-fills synchronously.
const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 18;
/// Punching holes below the host page size only zeroes, it frees nothing.
const DISCARD_ALIGNMENT_SECTORS: u32 = 8;

pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << b::VIRTIO_BLK_F_SEG_MAX;
pub const VIRTIO_BLK_F_RO: u64 = 1 << b::VIRTIO_BLK_F_RO;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << b::VIRTIO_BLK_F_BLK_SIZE;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << b::VIRTIO_BLK_F_FLUSH;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << b::VIRTIO_BLK_F_DISCARD;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << b::VIRTIO_BLK_F_WRITE_ZEROES;

pub const S_OK: u8 = b::VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = b::VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = b::VIRTIO_BLK_S_UNSUPP as u8;

/// struct virtio_blk_config up to and including write_zeroes_may_unmap.
mod cfg {
    pub const CAPACITY: usize = 0x00;
    pub const SEG_MAX: usize = 0x0c;
    pub const BLK_SIZE: usize = 0x14;
    pub const MAX_DISCARD_SECTORS: usize = 0x24;
    pub const MAX_DISCARD_SEG: usize = 0x28;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 0x2c;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 0x30;
    pub const MAX_WRITE_ZEROES_SEG: usize = 0x34;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 0x38;
    pub const LEN: usize = 0x3c;
}

#[derive(Clone, Copy)]
struct Seg {
    addr: GuestAddress,
    len: u32,
}

/// Where a chain's pieces are, before any of it is trusted.
struct Layout {
    /// `segs[..readable]` are device-readable, the rest device-writable.
    readable: usize,
    /// Last byte of the writable stream; `None` if the chain has nowhere to
    /// put a status, in which case nothing can be reported.
    status: Option<GuestAddress>,
    malformed: bool,
    /// The walk stopped at a descriptor that still said NEXT (a loop, an
    /// index or table the walker refused, over 4 GiB), or found none.
    truncated: bool,
}

pub struct Block {
    backend: Box<dyn BlockBackend>,
    avail_features: u64,
    acked_features: u64,
    capacity_sectors: u64,
    config: [u8; cfg::LEN],
    /// Reused for every chain so that a request costs no allocation.
    segs: Vec<Seg>,
    bounce: Vec<u8>,
}

impl Block {
    pub fn new(backend: Box<dyn BlockBackend>) -> Self {
        let capacity_sectors = backend.size() / SECTOR_SIZE;
        let mut avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH;
        let mut config = [0u8; cfg::LEN];
        let mut put = |at: usize, v: u32| config[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put(cfg::SEG_MAX, SEG_MAX);
        put(cfg::BLK_SIZE, SECTOR_SIZE as u32);
        if backend.read_only() {
            avail_features |= VIRTIO_BLK_F_RO;
        } else {
            if backend.supports_discard() {
                avail_features |= VIRTIO_BLK_F_DISCARD;
                put(cfg::MAX_DISCARD_SECTORS, MAX_DISCARD_SECTORS);
                put(cfg::MAX_DISCARD_SEG, MAX_DISCARD_SEG);
                put(cfg::DISCARD_SECTOR_ALIGNMENT, DISCARD_ALIGNMENT_SECTORS);
            }
            if backend.supports_write_zeroes() {
                avail_features |= VIRTIO_BLK_F_WRITE_ZEROES;
                put(cfg::MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SECTORS);
                put(cfg::MAX_WRITE_ZEROES_SEG, 1);
                config[cfg::WRITE_ZEROES_MAY_UNMAP] = 1;
            }
        }
        config[cfg::CAPACITY..cfg::CAPACITY + 8].copy_from_slice(&capacity_sectors.to_le_bytes());
        Self {
            backend,
            avail_features,
            acked_features: 0,
            capacity_sectors,
            config,
            segs: Vec::with_capacity(MAX_DESCS),
            bounce: vec![0; CHUNK],
        }
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    pub fn backend(&self) -> &dyn BlockBackend {
        self.backend.as_ref()
    }

    pub fn backend_mut(&mut self) -> &mut dyn BlockBackend {
        self.backend.as_mut()
    }

    /// Records the chain's descriptors without touching their buffers.
    fn collect(&mut self, chain: DescriptorChain<&GuestMemory>) -> Layout {
        self.segs.clear();
        let mut layout = Layout {
            readable: 0,
            status: None,
            malformed: false,
            truncated: true,
        };
        let mut seen_writable = false;
        // The chain iterator stops at a loop, a bad index or an unreadable
        // table (its TTL bounds it by the queue or indirect table size), so
        // this loop is bounded whatever the guest wrote.
        for desc in chain {
            layout.truncated = desc.has_next();
            if desc.is_write_only() {
                seen_writable = true;
                if desc.len() > 0 {
                    layout.status = desc.addr().checked_add(u64::from(desc.len()) - 1);
                }
            } else if seen_writable {
                // 2.6.4.2: readable buffers come first; mixing means we cannot
                // tell header and data apart.
                layout.malformed = true;
            } else {
                layout.readable += 1;
            }
            if self.segs.len() == MAX_DESCS {
                layout.malformed = true;
            } else {
                self.segs.push(Seg {
                    addr: desc.addr(),
                    len: desc.len(),
                });
            }
        }
        layout
    }

    /// Bytes written to the guest (data and status), or the chain's head
    /// when the chain is cut short: then it is not executed at all.
    fn handle_chain(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
    ) -> Result<u32, QueueError> {
        let head = chain.head_index();
        let layout = self.collect(chain);
        if layout.truncated {
            return Err(QueueError::Truncated(head));
        }
        let Some(status_addr) = layout.status else {
            return Ok(0);
        };
        let (status, written) = match self.execute(mem, &layout) {
            Ok(written) => (S_OK, written),
            Err(status) => (status, 0),
        };
        // Written last: the driver treats the request as done once it sees it.
        if mem.write_obj(status, status_addr).is_err() {
            return Ok(written);
        }
        Ok(written.saturating_add(1))
    }

    /// Returns the number of data bytes written to the guest, or the status
    /// to report instead.
    fn execute(&mut self, mem: &GuestMemory, layout: &Layout) -> Result<u32, u8> {
        if layout.malformed {
            return Err(S_IOERR);
        }
        // Checking every buffer first means a request never half-completes
        // because of a bad address, and huge lengths fail here before any I/O.
        if !self
            .segs
            .iter()
            .all(|s| mem.check_range(s.addr, s.len as usize))
        {
            return Err(S_IOERR);
        }
        let Self {
            backend,
            segs,
            bounce,
            capacity_sectors,
            avail_features,
            ..
        } = self;
        let (readable, writable) = segs.split_at(layout.readable);
        let total = |s: &[Seg]| s.iter().map(|s| u64::from(s.len)).sum::<u64>();
        // The status byte is the writable stream's last byte (it exists: layout.status).
        let in_len = total(writable).saturating_sub(1);
        let out_len = total(readable).checked_sub(HEADER_LEN).ok_or(S_IOERR)?;

        let mut hdr = [0u8; HEADER_LEN as usize];
        read_stream(mem, readable, 0, &mut hdr)?;
        let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let read_only = *avail_features & VIRTIO_BLK_F_RO != 0;
        let capacity = *capacity_sectors;

        match req_type {
            b::VIRTIO_BLK_T_IN => {
                let base = disk_range(capacity, sector, in_len)?;
                for_each_piece(writable, 0, in_len, CHUNK, |addr, n, pos| {
                    let buf = &mut bounce[..n];
                    backend.read_at(buf, base + pos).map_err(|_| S_IOERR)?;
                    mem.write_slice(buf, addr).map_err(|_| S_IOERR)
                })?;
                u32::try_from(in_len).map_err(|_| S_IOERR)
            }
            b::VIRTIO_BLK_T_OUT => {
                if read_only {
                    return Err(S_IOERR);
                }
                let base = disk_range(capacity, sector, out_len)?;
                for_each_piece(readable, HEADER_LEN, out_len, CHUNK, |addr, n, pos| {
                    let buf = &mut bounce[..n];
                    mem.read_slice(buf, addr).map_err(|_| S_IOERR)?;
                    backend.write_at(buf, base + pos).map_err(|_| S_IOERR)
                })?;
                Ok(0)
            }
            b::VIRTIO_BLK_T_FLUSH => backend.flush().map(|()| 0).map_err(|_| S_IOERR),
            b::VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; ID_LEN];
                let serial = backend.id();
                let n = serial.len().min(ID_LEN);
                id[..n].copy_from_slice(&serial.as_bytes()[..n]);
                // A shorter buffer gets a prefix, as in QEMU; no terminator at 20.
                let n = in_len.min(ID_LEN as u64);
                for_each_piece(writable, 0, n, ID_LEN, |addr, len, pos| {
                    let pos = pos as usize;
                    mem.write_slice(&id[pos..pos + len], addr)
                        .map_err(|_| S_IOERR)
                })?;
                Ok(n as u32)
            }
            b::VIRTIO_BLK_T_DISCARD if *avail_features & VIRTIO_BLK_F_DISCARD != 0 => {
                discard_or_zero(mem, readable, out_len, capacity, backend.as_mut(), false)
                    .map(|()| 0)
            }
            b::VIRTIO_BLK_T_WRITE_ZEROES if *avail_features & VIRTIO_BLK_F_WRITE_ZEROES != 0 => {
                discard_or_zero(mem, readable, out_len, capacity, backend.as_mut(), true)
                    .map(|()| 0)
            }
            _ => Err(S_UNSUPP),
        }
    }
}

/// Byte offset on disk of `len` bytes at `sector`, if whole sectors within capacity.
fn disk_range(capacity_sectors: u64, sector: u64, len: u64) -> Result<u64, u8> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(S_IOERR);
    }
    let start = sector.checked_mul(SECTOR_SIZE).ok_or(S_IOERR)?;
    let end = start.checked_add(len).ok_or(S_IOERR)?;
    if end > capacity_sectors * SECTOR_SIZE {
        return Err(S_IOERR);
    }
    Ok(start)
}

/// Calls `f(guest_addr, n, pos)` for consecutive pieces of bytes
/// `[start, start + len)` of the stream formed by `segs`; `pos` counts from
/// `start`. Pieces stay within one descriptor and are at most `max` long.
fn for_each_piece(
    segs: &[Seg],
    mut start: u64,
    len: u64,
    max: usize,
    mut f: impl FnMut(GuestAddress, usize, u64) -> Result<(), u8>,
) -> Result<(), u8> {
    let mut pos = 0u64;
    for s in segs {
        if pos == len {
            break;
        }
        let seg_len = u64::from(s.len);
        if start >= seg_len {
            start -= seg_len;
            continue;
        }
        let mut off = start;
        start = 0;
        while off < seg_len && pos < len {
            let n = (seg_len - off).min(len - pos).min(max as u64);
            let addr = s.addr.checked_add(off).ok_or(S_IOERR)?;
            f(addr, n as usize, pos)?;
            off += n;
            pos += n;
        }
    }
    if pos == len {
        Ok(())
    } else {
        Err(S_IOERR)
    }
}

fn read_stream(mem: &GuestMemory, segs: &[Seg], start: u64, buf: &mut [u8]) -> Result<(), u8> {
    for_each_piece(segs, start, buf.len() as u64, buf.len(), |addr, n, pos| {
        let pos = pos as usize;
        mem.read_slice(&mut buf[pos..pos + n], addr)
            .map_err(|_| S_IOERR)
    })
}

/// DISCARD and WRITE_ZEROES share a payload of 16-byte segments
/// {sector: u64, num_sectors: u32, flags: u32}. All segments are validated
/// (re-read from guest memory, not buffered) before any is applied.
fn discard_or_zero(
    mem: &GuestMemory,
    readable: &[Seg],
    payload_len: u64,
    capacity: u64,
    backend: &mut dyn BlockBackend,
    zero: bool,
) -> Result<(), u8> {
    let (max_segs, max_sectors) = if zero {
        (1, MAX_WRITE_ZEROES_SECTORS)
    } else {
        (MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
    };
    if payload_len == 0
        || !payload_len.is_multiple_of(DWZ_SEG_LEN)
        || payload_len / DWZ_SEG_LEN > max_segs.into()
    {
        return Err(S_IOERR);
    }
    let segment = |i: u64| -> Result<(u64, u64, u32), u8> {
        let mut raw = [0u8; DWZ_SEG_LEN as usize];
        read_stream(mem, readable, HEADER_LEN + i * DWZ_SEG_LEN, &mut raw)?;
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&raw[..8]);
        let num = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
        Ok((u64::from_le_bytes(sector), u64::from(num), flags))
    };
    let count = payload_len / DWZ_SEG_LEN;
    let unmap = b::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    for i in 0..count {
        let (sector, num, flags) = segment(i)?;
        // 5.2.6.2: unknown flags, or unmap on a discard, are UNSUPP.
        if flags & !unmap != 0 || (!zero && flags != 0) {
            return Err(S_UNSUPP);
        }
        if num > u64::from(max_sectors) {
            return Err(S_IOERR);
        }
        disk_range(capacity, sector, num * SECTOR_SIZE)?;
    }
    for i in 0..count {
        let (sector, num, flags) = segment(i)?;
        let (offset, len) = (sector * SECTOR_SIZE, num * SECTOR_SIZE);
        if len == 0 {
            // fallocate rejects empty ranges; there is nothing to do anyway.
            continue;
        }
        let res = if zero {
            backend.write_zeroes(offset, len, flags & unmap != 0)
        } else {
            backend.discard(offset, len)
        };
        res.map_err(|_| S_IOERR)?;
    }
    Ok(())
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Only `writeback` is writable, and only with CONFIG_WCE, not offered.
    }

    fn activate(&mut self, acked_features: u64) -> Result<(), String> {
        self.acked_features = acked_features;
        Ok(())
    }

    fn process_queue(
        &mut self,
        _idx: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, QueueError> {
        let mut used_any = false;
        let mut rounds_without_progress = 0;
        loop {
            if queue.disable_notification(mem).is_err() {
                break;
            }
            // The walker pops nothing when the driver claims more chains
            // than the ring holds; without this the driver would wait for
            // them forever.
            if let Ok(avail) = queue.avail_idx(mem, Ordering::Acquire) {
                let next = queue.next_avail();
                if avail.0.wrapping_sub(next) > queue.size() {
                    return Err(QueueError::AvailIndex {
                        avail: avail.0,
                        next,
                        size: queue.size(),
                    });
                }
            }
            let mut progressed = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                progressed = true;
                let head = chain.head_index();
                if head >= queue.size() {
                    return Err(QueueError::Head {
                        head,
                        size: queue.size(),
                    });
                }
                let len = self.handle_chain(chain, mem)?;
                if queue.add_used(mem, head, len).is_ok() {
                    used_any = true;
                }
            }
            // Re-check after re-enabling: a request the driver added after
            // the last pop may come without a kick (with EVENT_IDX it looked
            // at the event index before we moved it), so it must be popped
            // now even if this round popped nothing, or Linux waits forever.
            // An avail index too far ahead pops nothing yet always looks
            // pending: two empty rounds in a row end the loop.
            rounds_without_progress = if progressed {
                0
            } else {
                rounds_without_progress + 1
            };
            match queue.enable_notification(mem) {
                Ok(true) if rounds_without_progress < 2 => continue,
                _ => break,
            }
        }
        Ok(used_any && queue.needs_notification(mem).unwrap_or(true))
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }
}
