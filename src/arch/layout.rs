//! Every guest-physical address, I/O port and IRQ rewind gives the guest, in
//! one table so that two places cannot disagree (the IOAPIC and LAPIC used
//! to be defined twice). This module imports nothing, so anything may use
//! it; devices do not: they never learn where they sit, the VMM places them.
//!
//! The test guest hard-codes a few of these (guest-images/testguest/guest.h:
//! the debug console, the LAPIC, the exit port, the first virtio window):
//! change both.

// ---- RAM and the MMIO gap (memory: ram_ranges; loader: e820; boot: page
// tables map up to at least the gap's end). RAM is split around a 1 GiB gap
// below 4 GiB: [0, 3 GiB) and then [4 GiB, 4 GiB + rest).
pub const MMIO_GAP_START: u64 = 0xC000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

// ---- Low memory the loader and boot code write (arch::boot, arch::loader),
// all below the 640 KiB EBDA boundary.
pub const BOOT_GDT: u64 = 0x500;
pub const BOOT_IDT: u64 = 0x520;
pub const ZERO_PAGE: u64 = 0x7000;
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xA000;
pub const PD_FIRST: u64 = 0xB000;
pub const PD_LIMIT: u64 = 0x2_0000;
pub const CMDLINE: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 0x1_0000;
/// The MP table's floating pointer and tables (arch::mptable); the loader's
/// e820 reserves from here to `HIMEM_START`.
pub const EBDA_START: u64 = 0x9_FC00;
/// Where the kernel is loaded (arch::loader).
pub const HIMEM_START: u64 = 0x10_0000;

// ---- ACPI (arch::acpi): the RSDP where Linux scans for it, the other
// tables after it, all below `HIMEM_START`.
pub const RSDP_ADDR: u64 = 0xE_0000;
pub const ACPI_TABLES_START: u64 = 0xE_1000;
pub const ACPI_TABLES_END: u64 = 0x10_0000;

// ---- Interrupt controllers KVM emulates (arch::acpi MADT, arch::mptable).
/// Also the MSI address window (vmm::builder wakes restored vCPUs with MSIs).
pub const LAPIC_ADDR: u32 = 0xFEE0_0000;
pub const IOAPIC_ADDR: u32 = 0xFEC0_0000;

// ---- KVM's private pages on VMX (kvm::vm): three for the TSS, one for the
// identity map, inside the MMIO gap where no RAM is.
pub const KVM_TSS_ADDR: u64 = 0xFFFB_D000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xFFFB_C000;

// ---- MMIO devices in the gap (vmm::builder, vmm::disks, arch::acpi DSDT).
/// The debug console and doorbell, one page (devices::debug_console).
pub const DEBUG_CONSOLE_BASE: u64 = 0xD000_0000;
pub const DEBUG_CONSOLE_SIZE: u64 = 0x1000;
/// First virtio-mmio window; disk i is one page further on.
pub const VIRTIO_MMIO_BASE: u64 = 0xD000_1000;
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;

// ---- PIO ports (vmm::builder registers them; arch::acpi describes them).
pub const COM1_BASE: u64 = 0x3f8;
pub const COM2_BASE: u64 = 0x2f8;
/// The i8042 controller (ports 0x60-0x64), for its reset line.
pub const I8042_BASE: u64 = 0x60;
/// ACPI PM1 sleep registers of the hardware-reduced FADT (devices::acpi_pm).
pub const SLEEP_CONTROL_PORT: u64 = 0x600;
pub const SLEEP_STATUS_PORT: u64 = 0x601;
/// QEMU isa-debug-exit compatible: the test guest writes its status here.
pub const EXIT_PORT: u64 = 0xf4;

// ---- ISA IRQs, routed by KVM's irqchip to the same IOAPIC pin
// (vmm::builder irqfds, arch::acpi DSDT, vmm::disks).
pub const COM1_IRQ: u32 = 4;
pub const COM2_IRQ: u32 = 3;
/// Disk i interrupts on IRQ 5 + i (3 and 4 are the UARTs).
pub const VIRTIO_IRQ_BASE: u32 = 5;
