//! Loads a kernel (the embedded test guest, a `vmlinux` ELF or a bzImage),
//! the initrd, the command line and the zero page through linux-loader.

use std::fs::File;
use std::io::{Cursor, Read, Seek};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{GuestAddress, ReadVolatile};

use crate::arch::layout;
use crate::config::{KernelSource, VmConfig};
use crate::guest::TEST_GUEST_ELF;
use crate::memory::{self, GuestMemory};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot open kernel {path}: {source}")]
    KernelOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a kernel rewind can boot (neither an x86-64 ELF vmlinux nor a bzImage): {elf}; {bzimage}")]
    NotAKernel {
        path: PathBuf,
        elf: linux_loader::loader::Error,
        bzimage: linux_loader::loader::Error,
    },
    #[error("the embedded test guest failed to load: {0}")]
    TestGuest(linux_loader::loader::Error),
    #[error("cannot read initrd {path}: {source}")]
    Initrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    InitrdDir(#[from] super::cpio::CpioError),
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel; raise --mem")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("kernel command line is invalid or longer than {max} bytes: {reason}")]
    Cmdline { max: usize, reason: String },
    #[error("cannot write boot data into guest memory: {0}")]
    Memory(String),
}

/// Where to start the boot vCPU.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    pub entry: u64,
    pub format: KernelFormat,
}

/// What kind of image was booted, for saying why a kernel died early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    TestGuest,
    /// An ELF, entered at its entry point with Linux's 64-bit boot
    /// protocol; `pvh_note`: it carries Xen's PVH entry note, which Linux
    /// vmlinux files built with CONFIG_PVH have.
    Elf {
        pvh_note: bool,
    },
    BzImage,
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const LOADFLAGS_CAN_USE_HEAP: u8 = 0x80;
/// Linux's default `initrd_addr_max` for old headers.
const INITRD_ADDR_MAX_DEFAULT: u64 = 0x37ff_ffff;

fn load_image<F>(
    mem: &GuestMemory,
    image: &mut F,
) -> Result<KernelLoaderResult, (linux_loader::loader::Error, linux_loader::loader::Error)>
where
    F: Read + ReadVolatile + Seek,
{
    let himem = Some(GuestAddress(layout::HIMEM_START));
    match Elf::load(mem, None, image, himem) {
        Ok(r) => Ok(r),
        Err(elf) => BzImage::load(mem, None, image, himem).map_err(|bz| (elf, bz)),
    }
}

/// `rsdp` is where ACPI tables were written, if they were.
pub fn load_kernel(
    mem: &GuestMemory,
    config: &VmConfig,
    rsdp: Option<u64>,
) -> Result<Loaded, LoadError> {
    let result = match &config.kernel {
        KernelSource::EmbeddedTestGuest => {
            let mut image = Cursor::new(TEST_GUEST_ELF);
            Elf::load(
                mem,
                None,
                &mut image,
                Some(GuestAddress(layout::HIMEM_START)),
            )
            .map_err(LoadError::TestGuest)?
        }
        KernelSource::File(path) => {
            let mut file = File::open(path).map_err(|source| LoadError::KernelOpen {
                path: path.clone(),
                source,
            })?;
            load_image(mem, &mut file).map_err(|(elf, bzimage)| LoadError::NotAKernel {
                path: path.clone(),
                elf,
                bzimage,
            })?
        }
    };
    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(mem, config, path, result.kernel_end)?),
        None => None,
    };
    write_cmdline(mem, &config.cmdline)?;
    write_zero_page(mem, config, &result, initrd, rsdp)?;
    // A bzImage's 64-bit entry point is 0x200 past its protected-mode code.
    let entry = match result.setup_header {
        Some(_) => result.kernel_load.0 + 0x200,
        None => result.kernel_load.0,
    };
    let format = match (&config.kernel, result.setup_header) {
        (KernelSource::EmbeddedTestGuest, _) => KernelFormat::TestGuest,
        (_, Some(_)) => KernelFormat::BzImage,
        (_, None) => KernelFormat::Elf {
            pvh_note: matches!(
                result.pvh_boot_cap,
                linux_loader::loader::elf::PvhBootCapability::PvhEntryPresent(_)
            ),
        },
    };
    Ok(Loaded { entry, format })
}

fn load_initrd(
    mem: &GuestMemory,
    config: &VmConfig,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), LoadError> {
    let err = |source| LoadError::Initrd {
        path: path.to_path_buf(),
        source,
    };
    let bytes = if path.is_dir() {
        super::cpio::pack_dir(path)?
    } else {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(err)?;
        bytes
    };
    let size = bytes.len() as u64;
    let limit = config
        .mem_bytes()
        .min(layout::MMIO_GAP_START)
        .min(INITRD_ADDR_MAX_DEFAULT + 1);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !(memory::PAGE_SIZE - 1));
    let addr = match addr {
        Some(a) if a >= kernel_end => a,
        _ => {
            return Err(LoadError::InitrdTooBig {
                path: path.to_path_buf(),
                size,
                limit,
            })
        }
    };
    use vm_memory::Bytes;
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(|e| LoadError::Memory(e.to_string()))?;
    Ok((addr, bytes.len() as u64))
}

fn write_cmdline(mem: &GuestMemory, text: &str) -> Result<(), LoadError> {
    let bad = |reason: String| LoadError::Cmdline {
        max: layout::CMDLINE_MAX,
        reason,
    };
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX).map_err(|e| bad(e.to_string()))?;
    if !text.trim().is_empty() {
        cmdline
            .insert_str(text.trim())
            .map_err(|e| bad(e.to_string()))?;
    }
    load_cmdline(mem, GuestAddress(layout::CMDLINE), &cmdline).map_err(|e| bad(e.to_string()))
}

fn e820_map(mem_bytes: u64) -> Vec<boot_e820_entry> {
    let mut map = vec![
        boot_e820_entry {
            addr: 0,
            size: layout::EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: layout::EBDA_START,
            size: layout::HIMEM_START - layout::EBDA_START,
            r#type: E820_RESERVED,
        },
    ];
    for (start, size) in memory::ram_ranges(mem_bytes) {
        let end = start.0 + size as u64;
        // Low memory below 1 MiB is described by the two entries above.
        let start = start.0.max(layout::HIMEM_START);
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    map
}

fn write_zero_page(
    mem: &GuestMemory,
    config: &VmConfig,
    kernel: &KernelLoaderResult,
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<(), LoadError> {
    let mut params = boot_params::default();
    if let Some(addr) = rsdp {
        params.acpi_rsdp_addr = addr;
    }
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADFLAGS_CAN_USE_HEAP;
    params.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    params.hdr.cmdline_size = config.cmdline.len() as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(config.mem_bytes());
    for (slot, entry) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = *entry;
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new::<boot_params>(&params, GuestAddress(layout::ZERO_PAGE)),
        mem,
    )
    .map_err(|e| LoadError::Memory(e.to_string()))
}
