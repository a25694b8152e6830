//! A guest driver in miniature: it speaks to the device only through MMIO
//! register accesses and rings it lays out in guest memory itself, so the
//! tests exercise the same paths a Linux guest would.

mod block;
mod mmio;
mod snapshot;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::{Address, Bytes, GuestAddress};

use super::block::Block;
use super::mmio::MmioTransport;
use super::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use super::DiskBackend;
use crate::devices::bus::{lock, BusDevice};
use crate::disk::{Disk, ImageFormat};
use crate::memory::GuestMemory;

pub const MEM_SIZE: usize = 0x10_0000;
pub const QSIZE: u16 = 16;
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
/// avail->used_event, after the 16 ring entries.
pub const USED_EVENT: u64 = AVAIL + 4 + 2 * QSIZE as u64;
pub const HDR: u64 = 0x1_0000;
pub const DATA: u64 = 0x2_0000;
pub const STATUS: u64 = 0x4_0000;
pub const DISK_SECTORS: u64 = 64;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

/// A VM disk as production builds it: a raw base in the temp dir under a
/// qcow2 overlay, both removed on drop.
pub struct TempDisk {
    /// The overlay; its file name is the device's serial.
    pub path: PathBuf,
    base: PathBuf,
    disk: Arc<Mutex<Disk>>,
}

impl TempDisk {
    /// Sector `i` is filled with byte `i` so reads can be told apart.
    pub fn new(sectors: u64) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let stem = format!(
            "rewind-virtio-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let base = std::env::temp_dir().join(format!("{stem}.img"));
        let path = std::env::temp_dir().join(format!("{stem}.qcow2"));
        let data: Vec<u8> = (0..sectors * 512).map(|i| (i / 512) as u8).collect();
        std::fs::write(&base, data).unwrap();
        let base_name = Path::new(base.file_name().unwrap());
        crate::disk::create_overlay(&path, base_name, ImageFormat::Raw, sectors * 512).unwrap();
        let disk = Arc::new(Mutex::new(Disk::open(&path).unwrap()));
        Self { path, base, disk }
    }

    /// The guest-visible contents, read through the device's own handle.
    pub fn bytes(&self) -> Vec<u8> {
        let disk = lock(&self.disk);
        let mut buf = vec![0; disk.size() as usize];
        disk.read_at(&mut buf, 0).unwrap();
        buf
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.base);
    }
}

pub fn new_mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

pub fn new_dev(mem: &GuestMemory, disk: &TempDisk, read_only: bool) -> MmioTransport<Block> {
    let id = disk
        .path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let backend = DiskBackend::new(disk.disk.clone(), id, read_only);
    MmioTransport::new(mem.clone(), Block::new(Box::new(backend))).unwrap()
}

pub fn rd(dev: &mut MmioTransport<Block>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(off, &mut b);
    u32::from_le_bytes(b)
}

pub fn wr(dev: &mut MmioTransport<Block>, off: u64, v: u32) {
    dev.write(off, &v.to_le_bytes());
}

pub fn notify(dev: &mut MmioTransport<Block>) {
    wr(dev, 0x50, 0);
}

/// Consumes one pending interrupt edge, if any.
pub fn irq_fired(dev: &MmioTransport<Block>) -> bool {
    dev.irq_evt().read().is_ok()
}

pub fn device_features(dev: &mut MmioTransport<Block>) -> u64 {
    wr(dev, 0x14, 0);
    let lo = rd(dev, 0x10) as u64;
    wr(dev, 0x14, 1);
    let hi = rd(dev, 0x10) as u64;
    lo | (hi << 32)
}

/// The Linux probe sequence (virtio 1.1 section 3.1.1) with queue 0 at
/// DESC/AVAIL/USED, negotiating the offered features within `mask`.
pub fn handshake(dev: &mut MmioTransport<Block>, mask: u64) -> Vq {
    assert_eq!(rd(dev, 0x00), 0x7472_6976, "magic");
    assert_eq!(rd(dev, 0x04), 2, "version");
    assert_eq!(rd(dev, 0x08), 2, "device id");
    wr(dev, 0x70, 0);
    wr(dev, 0x70, ACKNOWLEDGE);
    wr(dev, 0x70, ACKNOWLEDGE | DRIVER);
    let features = device_features(dev) & mask;
    wr(dev, 0x24, 0);
    wr(dev, 0x20, features as u32);
    wr(dev, 0x24, 1);
    wr(dev, 0x20, (features >> 32) as u32);
    wr(dev, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_ne!(rd(dev, 0x70) & FEATURES_OK, 0, "features accepted");
    wr(dev, 0x30, 0);
    assert_eq!(rd(dev, 0x44), 0, "queue not yet ready");
    assert!(rd(dev, 0x34) >= u32::from(QSIZE));
    wr(dev, 0x38, u32::from(QSIZE));
    for (off, addr) in [(0x80, DESC), (0x90, AVAIL), (0xa0, USED)] {
        wr(dev, off, addr as u32);
        wr(dev, off + 4, (addr >> 32) as u32);
    }
    wr(dev, 0x44, 1);
    wr(dev, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(
        rd(dev, 0x70),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    );
    Vq::default()
}

/// Driver side of a split virtqueue at DESC/AVAIL/USED.
#[derive(Default, Clone)]
pub struct Vq {
    pub next_desc: u16,
    pub avail_idx: u16,
}

pub fn write_desc(
    mem: &GuestMemory,
    table: u64,
    i: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let at = GuestAddress(table + u64::from(i) * 16);
    mem.write_obj(addr, at).unwrap();
    mem.write_obj(len, at.unchecked_add(8)).unwrap();
    mem.write_obj(flags, at.unchecked_add(12)).unwrap();
    mem.write_obj(next, at.unchecked_add(14)).unwrap();
}

impl Vq {
    /// Lays out `(addr, len, flags)` descriptors as one chain (NEXT added)
    /// and publishes it; returns the head index.
    pub fn push(&mut self, mem: &GuestMemory, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = (head + k as u16) % QSIZE;
            let last = k + 1 == descs.len();
            let flags = if last { flags } else { flags | F_NEXT };
            write_desc(mem, DESC, i, addr, len, flags, (i + 1) % QSIZE);
        }
        self.next_desc = (head + descs.len() as u16) % QSIZE;
        self.publish(mem, head);
        head
    }

    /// Also asks for an interrupt on the next completion, as Linux does by
    /// moving used_event to its last seen used index.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        mem.write_obj(used_idx(mem), GuestAddress(USED_EVENT))
            .unwrap();
        let slot = u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(AVAIL + 4 + slot * 2))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// A request with its header at HDR, optional data buffer and a
    /// one-byte status at STATUS (pre-set to 0xff to see it written).
    pub fn request(
        &mut self,
        mem: &GuestMemory,
        req_type: u32,
        sector: u64,
        data: Option<(u64, u32, u16)>,
    ) -> u16 {
        write_header(mem, HDR, req_type, sector);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut descs = vec![(HDR, 16, 0)];
        descs.extend(data);
        descs.push((STATUS, 1, F_WRITE));
        self.push(mem, &descs)
    }
}

pub fn write_header(mem: &GuestMemory, at: u64, req_type: u32, sector: u64) {
    mem.write_obj(req_type, GuestAddress(at)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
}

pub fn used_idx(mem: &GuestMemory) -> u16 {
    mem.read_obj(GuestAddress(USED + 2)).unwrap()
}

/// (id, len) of used ring entry `i`.
pub fn used_elem(mem: &GuestMemory, i: u16) -> (u32, u32) {
    let at = USED + 4 + u64::from(i % QSIZE) * 8;
    (
        mem.read_obj(GuestAddress(at)).unwrap(),
        mem.read_obj(GuestAddress(at + 4)).unwrap(),
    )
}

pub fn status_byte(mem: &GuestMemory) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

pub fn guest_bytes(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}
