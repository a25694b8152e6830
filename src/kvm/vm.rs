//! The KVM VM: in-kernel irqchip and PIT, memory slots, the CPUID KVM offers.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::arch::layout;
use crate::memory::{self, GuestMemory};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and may this user open /dev/kvm?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub supported_cpuid: CpuId,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is on: KVM_GET_DIRTY_LOG only
    /// reads, and [`Vm::take_dirty_log`] clears (re-protects) itself.
    manual_protect: bool,
    /// Per slot, one bit per page: pages a fuzzer reset keeps writable
    /// (fuzz::hot). Only ever set with `manual_protect`.
    hot: Vec<Vec<u64>>,
}

impl Vm {
    /// Opens /dev/kvm and creates a VM with the devices every guest needs.
    /// Order matters: the irqchip must exist before any vCPU is created.
    pub fn new() -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        fd.set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(kvm_err("set the TSS address"))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_err("set the identity map address"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("report its CPUID"))?;
        Ok(Vm {
            kvm,
            fd,
            supported_cpuid,
            manual_protect: false,
            hot: Vec::new(),
        })
    }

    /// The TSC frequency new vCPUs of this VM get (the VM-wide
    /// KVM_GET_TSC_KHZ, Linux 6.0+), or None where KVM does not say.
    pub fn tsc_khz(&self) -> Option<u32> {
        vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, kvm_bindings::KVMIO, 0xa3);
        // SAFETY: KVM_GET_TSC_KHZ takes no argument and only returns a value.
        let khz = unsafe { vmm_sys_util::ioctl::ioctl(&self.fd, KVM_GET_TSC_KHZ()) };
        u32::try_from(khz).ok().filter(|&k| k > 0)
    }

    /// Whether KVM can run a vCPU's TSC at another rate than the host's.
    pub fn can_scale_tsc(&self) -> bool {
        self.kvm.check_extension(Cap::TscControl)
    }

    /// How many vCPUs KVM allows in one VM.
    pub fn max_vcpus(&self) -> u32 {
        self.kvm.check_extension_int(Cap::MaxVcpus).max(1) as u32
    }

    /// One slot per RAM region, dirty logging on from the start so a
    /// snapshot can always tell what changed since the previous one.
    pub fn register_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
        register_slots(&self.fd, mem).map_err(kvm_io_err("register guest memory"))
    }

    /// Deletes and re-adds every memory slot, which makes KVM drop all its
    /// shadow page tables. Needed after rewind itself rewrote guest memory
    /// (an in-place revert) on hosts that shadow the guest's page tables
    /// (PVM): KVM write-protects guest page-table pages against the guest,
    /// not against the VMM, so its shadows would keep translating through
    /// page tables that no longer exist and a guest process jumps to
    /// garbage. The dirty log starts over with the new slots, which is what
    /// a revert wants anyway. vCPUs must be paused.
    pub fn reload_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
        remove_slots(&self.fd, mem).map_err(kvm_io_err("remove a guest memory slot"))?;
        self.register_memory(mem)
    }
}

fn kvm_io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |e| {
        kvm_err(what)(kvm_ioctls::Error::new(
            e.raw_os_error().unwrap_or(libc::EIO),
        ))
    }
}

/// One slot per RAM region of `mem` on the VM `fd`, dirty logging on.
fn register_slots(fd: &impl std::os::fd::AsRawFd, mem: &GuestMemory) -> std::io::Result<()> {
    for (slot, (guest, size, host)) in memory::regions(mem).into_iter().enumerate() {
        // SAFETY: the region maps memory owned by `mem`, which the VMM keeps
        // alive (and at the same address) for as long as the VM exists.
        unsafe { set_slot(fd, slot, guest, size, host, KVM_MEM_LOG_DIRTY_PAGES)? };
    }
    Ok(())
}

/// Deletes the slots `register_slots` made.
fn remove_slots(fd: &impl std::os::fd::AsRawFd, mem: &GuestMemory) -> std::io::Result<()> {
    for (slot, (guest, _, host)) in memory::regions(mem).into_iter().enumerate() {
        // SAFETY: a zero-sized region deletes the slot; no memory is handed
        // to KVM.
        unsafe { set_slot(fd, slot, guest, 0, host, 0)? };
    }
    Ok(())
}

/// KVM_SET_USER_MEMORY_REGION on the VM `fd` (the VM's own, or a
/// duplicate a vCPU thread holds, see [`SlotReloader`]).
///
/// # Safety
/// `host..host + size` must stay mapped for as long as the slot exists.
unsafe fn set_slot(
    fd: &impl std::os::fd::AsRawFd,
    slot: usize,
    guest: u64,
    size: u64,
    host: u64,
    flags: u32,
) -> std::io::Result<()> {
    let region = kvm_userspace_memory_region {
        slot: slot as u32,
        flags,
        guest_phys_addr: guest,
        memory_size: size,
        userspace_addr: host,
    };
    // SAFETY: the ioctl reads a valid region struct; the caller vouches for
    // the mapping (see above).
    let r =
        unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, KVM_SET_USER_MEMORY_REGION(), &region) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// VM-wide KVM state: interrupt controllers, PIT and the KVM clock.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct VmState {
    pub pic_master: kvm_bindings::kvm_irqchip,
    pub pic_slave: kvm_bindings::kvm_irqchip,
    pub ioapic: kvm_bindings::kvm_irqchip,
    pub pit: kvm_bindings::kvm_pit_state2,
    pub clock: kvm_bindings::kvm_clock_data,
}

const IRQCHIP_PIC_MASTER: u32 = 0;
const IRQCHIP_PIC_SLAVE: u32 = 1;
const IRQCHIP_IOAPIC: u32 = 2;

impl Vm {
    fn irqchip(&self, chip_id: u32) -> Result<kvm_bindings::kvm_irqchip, VmError> {
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut chip)
            .map_err(kvm_err("read an interrupt controller"))?;
        Ok(chip)
    }

    /// Read while every vCPU is paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        Ok(VmState {
            pic_master: self.irqchip(IRQCHIP_PIC_MASTER)?,
            pic_slave: self.irqchip(IRQCHIP_PIC_SLAVE)?,
            ioapic: self.irqchip(IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("read the PIT"))?,
            clock: self.fd.get_clock().map_err(kvm_err("read the KVM clock"))?,
        })
    }

    /// Applied before the vCPUs' state. The clock's flags are cleared:
    /// passing KVM_CLOCK_REALTIME back would make guest time jump by the
    /// snapshot's age; without it the guest's clock continues where it was.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        self.fd
            .set_pit2(&state.pit)
            .map_err(kvm_err("restore the PIT"))?;
        let clock = kvm_bindings::kvm_clock_data {
            clock: state.clock.clock,
            flags: 0,
            ..Default::default()
        };
        self.fd
            .set_clock(&clock)
            .map_err(kvm_err("restore the KVM clock"))?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(kvm_err("restore an interrupt controller"))?;
        }
        Ok(())
    }

    /// Indices of every MSR KVM lists as saveable.
    pub fn msr_indices(&self) -> Result<Vec<u32>, VmError> {
        Ok(self
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("list MSRs"))?
            .as_slice()
            .to_vec())
    }

    pub fn has_xsave(&self) -> bool {
        self.kvm.check_extension(Cap::Xsave)
    }

    /// Pages KVM saw written in `slot` since the last call (which clears them
    /// and write-protects them again), plus every hot page (never cleared,
    /// so possibly written unseen: always reported, see [`Vm::keep_hot`]).
    ///
    /// One meaning whatever the cap: with manual protection on, this is
    /// KVM_GET_DIRTY_LOG followed by KVM_CLEAR_DIRTY_LOG of what it read,
    /// which is what KVM_GET_DIRTY_LOG alone does without it. So every
    /// other user of the log (file snapshots, incremental layers, revert)
    /// keeps working unchanged on a fuzzer's VM; hot pages only make its
    /// answer a superset, never miss a write.
    pub fn take_dirty_log(&self, slot: u32, size: usize) -> Result<Vec<u64>, VmError> {
        let mut log = self
            .fd
            .get_dirty_log(slot, size)
            .map_err(kvm_err("read the dirty page log"))?;
        if !self.manual_protect {
            return Ok(log);
        }
        let hot = self.hot.get(slot as usize);
        let hot_word = |i: usize| hot.and_then(|h| h.get(i)).copied().unwrap_or(0);
        // Built only when a page that is not hot was written: a fuzzer's
        // reset, whose written pages are all hot, allocates nothing here.
        if log.iter().enumerate().any(|(i, &w)| w & !hot_word(i) != 0) {
            let mut clear: Vec<u64> = log
                .iter()
                .enumerate()
                .map(|(i, &w)| w & !hot_word(i))
                .collect();
            self.clear_dirty_log(slot, size, &mut clear)?;
        }
        if let Some(hot) = hot {
            for (l, h) in log.iter_mut().zip(hot) {
                *l |= h;
            }
        }
        Ok(log)
    }

    /// KVM_CLEAR_DIRTY_LOG (kvm-ioctls has no call for it): clears the
    /// pages set in `bitmap` from the log of `slot` (`size` bytes) and
    /// write-protects them again.
    fn clear_dirty_log(&self, slot: u32, size: usize, bitmap: &mut [u64]) -> Result<(), VmError> {
        vmm_sys_util::ioctl_iowr_nr!(
            KVM_CLEAR_DIRTY_LOG,
            kvm_bindings::KVMIO,
            0xc0,
            kvm_bindings::kvm_clear_dirty_log
        );
        let pages = size.div_ceil(memory::PAGE_SIZE as usize);
        let arg = kvm_bindings::kvm_clear_dirty_log {
            slot,
            num_pages: u32::try_from(pages).unwrap_or(u32::MAX),
            first_page: 0,
            __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.as_mut_ptr().cast(),
            },
        };
        if bitmap.len() * 64 < pages {
            return Err(kvm_err("clear the dirty page log")(kvm_ioctls::Error::new(
                libc::EINVAL,
            )));
        }
        // SAFETY: `arg` points at `bitmap`, which holds at least one bit per
        // page of the slot (checked above) and outlives the call; KVM only
        // reads it.
        let ret =
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.fd, KVM_CLEAR_DIRTY_LOG(), &arg) };
        if ret < 0 {
            return Err(kvm_err("clear the dirty page log")(
                kvm_ioctls::Error::last(),
            ));
        }
        Ok(())
    }

    /// Turns on KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (without
    /// KVM_DIRTY_LOG_INITIALLY_SET) so that pages can be left out of the
    /// re-protection. Only a fuzzer's VM asks (fuzz::hot); elsewhere the
    /// extra KVM_CLEAR_DIRTY_LOG would buy nothing. False where KVM lacks it.
    pub fn enable_manual_protect(&mut self) -> bool {
        if self.manual_protect {
            return true;
        }
        let offered = self
            .kvm
            .check_extension_raw(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
        let bit = kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
        if offered < 0 || offered as u32 & bit == 0 {
            return false;
        }
        let mut cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        cap.args[0] = u64::from(bit);
        self.manual_protect = self.fd.enable_cap(&cap).is_ok();
        self.manual_protect
    }

    /// Leaves page `page` of `slot` writable from its next write on: the
    /// log stops re-protecting it and reports it always (the caller must
    /// treat it as written at every read). Needs manual protection.
    pub fn keep_hot(&mut self, slot: usize, page: usize, slot_pages: usize) {
        if !self.manual_protect {
            return;
        }
        if self.hot.len() <= slot {
            self.hot.resize(slot + 1, Vec::new());
        }
        let words = &mut self.hot[slot];
        if words.is_empty() {
            words.resize(slot_pages.div_ceil(64), 0);
        }
        if let Some(w) = words.get_mut(page / 64) {
            *w |= 1 << (page % 64);
        }
    }

    /// Forgets every hot page: the next [`Vm::take_dirty_log`] of each slot
    /// reports and re-protects them like any written page.
    pub fn forget_hot(&mut self) {
        self.hot.clear();
    }
}

/// [`Vm::reload_memory`] for another thread (a vCPU's, in a fuzzer's reset):
/// its own duplicate of the VM fd and a handle on guest memory, which keeps
/// the mappings the slots point at alive for as long as this lives.
pub struct SlotReloader {
    fd: std::os::fd::OwnedFd,
    mem: GuestMemory,
}

vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    kvm_bindings::KVMIO,
    0x46,
    kvm_userspace_memory_region
);

impl Vm {
    pub fn slot_reloader(&self, mem: &GuestMemory) -> std::io::Result<SlotReloader> {
        use std::os::fd::{AsRawFd, BorrowedFd};
        // SAFETY: the VM fd is open for as long as `self` lives, and only
        // borrowed here to duplicate it.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd.as_raw_fd()) };
        Ok(SlotReloader {
            fd: fd.try_clone_to_owned()?,
            mem: mem.clone(),
        })
    }
}

impl SlotReloader {
    /// Deletes and re-adds every slot (see [`Vm::reload_memory`]). vCPUs
    /// must be stopped.
    pub fn reload(&self) -> std::io::Result<()> {
        remove_slots(&self.fd, &self.mem)?;
        register_slots(&self.fd, &self.mem)
    }
}
