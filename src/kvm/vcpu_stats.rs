//! A vCPU's binary statistics (KVM_GET_STATS_FD): the counters that tell
//! whether a guest did anything but run ring-3 code and touch MMIO since a
//! point in time (see fuzz::reset, which skips reading state that only
//! ring-0 code can change when they say the guest never got there).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_ioctls::VcpuFd;

/// KVM_GET_STATS_FD: _IO(KVMIO, 0xce).
const KVM_GET_STATS_FD: libc::c_ulong = 0xAECE;

/// The counters that move when a guest leaves ring 3 for anything but an
/// MMIO access: port I/O, an interrupt or NMI injected, a guest page fault,
/// a hypercall, a halt (fuzz::untouched).
pub(crate) const LEAVING_RING3: [&str; 6] = [
    "io_exits",
    "irq_injections",
    "nmi_injections",
    "pf_guest",
    "hypercalls",
    "halt_exits",
];

/// The counters read, by name (KVM's own names).
pub(crate) const NAMES: [&str; 9] = [
    "exits",
    "insn_emulation",
    "mmio_exits",
    LEAVING_RING3[0],
    LEAVING_RING3[1],
    LEAVING_RING3[2],
    LEAVING_RING3[3],
    LEAVING_RING3[4],
    LEAVING_RING3[5],
];

/// Values of [`NAMES`], in that order.
pub(crate) type Counters = [u64; NAMES.len()];

pub(crate) struct VcpuStats {
    file: File,
    data_offset: u64,
    /// Byte offset of each counter inside the data block.
    at: [usize; NAMES.len()],
    /// The data block up to the last counter read.
    len: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("KVM offers no vCPU statistics: {0}")]
    Unavailable(std::io::Error),
    #[error("cannot read the vCPU statistics: {0}")]
    Read(std::io::Error),
    #[error("the vCPU statistics have no counter {0}")]
    Missing(&'static str),
}

impl VcpuStats {
    pub(crate) fn open(vcpu: &VcpuFd) -> Result<VcpuStats, StatsError> {
        // SAFETY: a request without argument on a vCPU fd; the result is a
        // new fd or -1.
        let fd = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD as _, 0) };
        if fd < 0 {
            return Err(StatsError::Unavailable(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned to us and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut header = [0u8; 24];
        file.read_exact_at(&mut header, 0)
            .map_err(StatsError::Read)?;
        let word = |i: usize| u32::from_ne_bytes(header[i * 4..i * 4 + 4].try_into().unwrap());
        let (name_size, count, desc_offset, data_offset) = (
            word(1) as usize,
            word(2) as usize,
            word(4) as u64,
            word(5) as u64,
        );
        // Descriptor: flags u32, exponent i16, size u16, offset u32,
        // bucket_size u32, then the name.
        let desc_len = 16 + name_size;
        let mut descs = vec![0u8; desc_len * count];
        file.read_exact_at(&mut descs, desc_offset)
            .map_err(StatsError::Read)?;
        let mut at = [usize::MAX; NAMES.len()];
        for d in descs.chunks_exact(desc_len) {
            let offset = u32::from_ne_bytes(d[8..12].try_into().unwrap()) as usize;
            let name = &d[16..];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if let Some(i) = NAMES.iter().position(|n| n.as_bytes() == name) {
                at[i] = offset;
            }
        }
        if let Some(i) = at.iter().position(|&o| o == usize::MAX) {
            return Err(StatsError::Missing(NAMES[i]));
        }
        let len = at.iter().max().copied().unwrap_or(0) + 8;
        Ok(VcpuStats {
            file,
            data_offset,
            at,
            len,
        })
    }

    /// The counters now (one read).
    pub(crate) fn read(&self) -> Result<Counters, StatsError> {
        let mut data = [0u8; 2048];
        let buf = data
            .get_mut(..self.len)
            .ok_or_else(|| StatsError::Read(std::io::Error::other("statistics block too large")))?;
        self.file
            .read_exact_at(buf, self.data_offset)
            .map_err(StatsError::Read)?;
        let mut out = [0u64; NAMES.len()];
        for (o, &at) in out.iter_mut().zip(&self.at) {
            *o = u64::from_ne_bytes(buf[at..at + 8].try_into().unwrap());
        }
        Ok(out)
    }
}
