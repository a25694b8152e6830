//! Disks of a running VM: each base image is read through a qcow2 overlay
//! in the VM's directory (the base is never written) and offered to the
//! guest as virtio-blk over virtio-mmio. A snapshot freezes the overlay
//! and switches the VM to a fresh one on top of it; revert and restore put
//! a fresh overlay on the snapshot's frozen layer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};

use crate::arch::acpi::MmioDevice;
use crate::arch::layout::{VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_STRIDE};
use crate::devices::bus::lock;
use crate::devices::virtio::{Block, DiskBackend, MmioTransport, MMIO_WINDOW_SIZE};
use crate::disk::{self, BaseIdentity, Disk};
use crate::memory::GuestMemory;

pub const MAX_DISKS: usize = 8;
const QUEUE_NOTIFY: u64 = 0x50;

#[derive(Debug, thiserror::Error)]
pub enum DiskSetupError {
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    #[error("at most {MAX_DISKS} disks")]
    TooMany,
    #[error("virtio device: {0}")]
    Virtio(String),
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// What a snapshot keeps of one disk: the frozen top layer (whose backing
/// chain ends at `base`; relative to the snapshot directory unless absolute,
/// see `snapshot::bundle::layer_path`), and the base's identity, checked on
/// restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSnapshot {
    pub base: BaseIdentity,
    pub frozen: PathBuf,
    pub size: u64,
}

pub struct VmDisk {
    pub index: usize,
    pub base: BaseIdentity,
    /// The layer under the live overlay: the base at boot, else the frozen
    /// layer of the snapshot last taken or applied.
    pub layer: PathBuf,
    pub disk: Arc<Mutex<Disk>>,
    pub transport: Arc<Mutex<MmioTransport<Block>>>,
}

/// Where disk `index` sits: fixed by its position, so a restored VM's
/// devices are where the snapshotted guest's drivers expect them.
pub fn mmio_device(index: usize) -> MmioDevice {
    MmioDevice {
        base: VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_STRIDE,
        size: MMIO_WINDOW_SIZE,
        irq: VIRTIO_IRQ_BASE + index as u32,
    }
}

impl VmDisk {
    pub fn mmio(&self) -> MmioDevice {
        mmio_device(self.index)
    }
}

pub fn disks_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join("disks")
}

/// A new, unique overlay name for disk `index`.
pub fn overlay_path(vm_dir: &Path, index: usize) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    disks_dir(vm_dir).join(format!("disk{index}-{nanos:x}.qcow2"))
}

/// How `overlay` names `lower` in its header: by file name when they share a
/// directory (so the directory can be moved or copied whole), else by its
/// canonical path (valid from any directory; a relative name would be read
/// against the overlay's).
pub fn backing_name(overlay: &Path, lower: &Path) -> PathBuf {
    let same_dir = match (overlay.parent(), lower.parent()) {
        (Some(a), Some(b)) => crate::fsutil::same_file(a, b),
        _ => false,
    };
    match lower.file_name() {
        Some(name) if same_dir => PathBuf::from(name),
        _ => std::fs::canonicalize(lower).unwrap_or_else(|_| lower.to_path_buf()),
    }
}

/// How a snapshot in `snapshot_dir` names a disk layer: relative when both
/// are in one VM directory (`VM/snapshots/NAME`, `VM/disks/FILE`), so that
/// directory can be moved or copied whole; absolute otherwise (the boot
/// cache keeps its snapshots elsewhere).
pub fn layer_name_in(snapshot_dir: &Path, layer: &Path) -> PathBuf {
    let grandparent = |p: &Path| p.parent().and_then(Path::parent).map(Path::to_path_buf);
    let same_vm = match (grandparent(snapshot_dir), grandparent(layer)) {
        (Some(a), Some(b)) => crate::fsutil::same_file(&a, &b),
        _ => false,
    };
    let folder = layer.parent().and_then(Path::file_name);
    match (same_vm, folder, layer.file_name()) {
        (true, Some(folder), Some(file)) => Path::new("../..").join(folder).join(file),
        _ => layer.to_path_buf(),
    }
}

/// The Linux command-line form of the devices, for kernels without ACPI.
pub fn cmdline_devices(devices: &[MmioDevice]) -> String {
    devices
        .iter()
        .map(|d| format!("virtio_mmio.device={}@{:#x}:{}", d.size, d.base, d.irq))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Opens disk `index` with a fresh overlay on `lower` (the base, or a
/// snapshot's frozen layer) and wires its virtio device into KVM.
pub fn attach(
    vm: &VmFd,
    mem: &GuestMemory,
    vm_dir: &Path,
    index: usize,
    base: BaseIdentity,
    lower: &Path,
) -> Result<VmDisk, DiskSetupError> {
    if index >= MAX_DISKS {
        return Err(DiskSetupError::TooMany);
    }
    base.verify()?;
    let lower_format = disk::probe(lower)?;
    crate::paths::create_private_dir_all(&disks_dir(vm_dir)).map_err(|e| {
        DiskSetupError::Disk(disk::DiskError::Io {
            op: "create",
            path: disks_dir(vm_dir),
            io: e,
        })
    })?;
    let overlay = overlay_path(vm_dir, index);
    let virtual_size = disk::virtual_size(lower, lower_format)?;
    disk::create_overlay(
        &overlay,
        &backing_name(&overlay, lower),
        lower_format,
        virtual_size,
    )?;
    let opened = Disk::open(&overlay)?;
    let disk = Arc::new(Mutex::new(opened));
    let backend = DiskBackend::new(disk.clone(), format!("rewind-disk{index}"), false);
    let transport = MmioTransport::new(mem.clone(), Block::new(Box::new(backend)))
        .map_err(|e| DiskSetupError::Virtio(e.to_string()))?;
    let d = VmDisk {
        index,
        base,
        layer: lower.to_path_buf(),
        disk,
        transport: Arc::new(Mutex::new(transport)),
    };
    wire(vm, &d)?;
    Ok(d)
}

fn wire(vm: &VmFd, d: &VmDisk) -> Result<(), DiskSetupError> {
    let m = d.mmio();
    let t = lock(&d.transport);
    vm.register_irqfd(t.irq_evt(), m.irq)
        .map_err(|source| DiskSetupError::Kvm {
            what: "route a virtio interrupt",
            source,
        })?;
    for (q, evt) in t.queue_evts().iter().enumerate() {
        vm.register_ioevent(evt, &IoEventAddress::Mmio(m.base + QUEUE_NOTIFY), q as u32)
            .map_err(|source| DiskSetupError::Kvm {
                what: "register a virtio queue notifier",
                source,
            })?;
    }
    Ok(())
}
