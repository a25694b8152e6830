//! ACPI tables (through the `acpi_tables` crate) for Linux kernels with ACPI:
//! RSDP, XSDT, a hardware-reduced FADT whose sleep control register is
//! rewind's ACPI PM device (so `poweroff` ends the VM), a MADT for the
//! vCPUs and IOAPIC, and a DSDT declaring the UARTs and virtio-mmio devices
//! (the stock Debian kernel finds virtio-mmio devices only through ACPI).

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout::{
    ACPI_TABLES_END, ACPI_TABLES_START, COM1_BASE, COM1_IRQ, COM2_BASE, COM2_IRQ, IOAPIC_ADDR,
    LAPIC_ADDR, RSDP_ADDR, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT,
};
use crate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"REWIND";

/// A virtio-mmio device as the guest must be told about it.
#[derive(Debug, Clone, Copy)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables do not fit below 1 MiB")]
    TooBig,
    #[error("cannot write ACPI tables into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

fn uart(name: &str, uid: u8, port: u16, irq: u32) -> Vec<u8> {
    let hid = aml::EISAName::new("PNP0501");
    let io = aml::IO::new(port, port, 1, 8);
    let int = aml::Interrupt::new(true, true, false, false, irq);
    let crs = aml::ResourceTemplate::new(vec![&io, &int]);
    let hid_name = aml::Name::new("_HID".into(), &hid);
    let uid_name = aml::Name::new("_UID".into(), &uid);
    let crs_name = aml::Name::new("_CRS".into(), &crs);
    bytes(&aml::Device::new(
        name.into(),
        vec![&hid_name, &uid_name, &crs_name],
    ))
}

fn virtio_device(index: usize, dev: &MmioDevice) -> Vec<u8> {
    let mem = aml::Memory32Fixed::new(true, dev.base as u32, dev.size as u32);
    let int = aml::Interrupt::new(true, true, false, false, dev.irq);
    let crs = aml::ResourceTemplate::new(vec![&mem, &int]);
    let hid_name = aml::Name::new("_HID".into(), &"LNRO0005");
    let uid = index as u32;
    let uid_name = aml::Name::new("_UID".into(), &uid);
    let crs_name = aml::Name::new("_CRS".into(), &crs);
    bytes(&aml::Device::new(
        format!("VR{index:02X}").as_str().into(),
        vec![&hid_name, &uid_name, &crs_name],
    ))
}

fn dsdt(virtio: &[MmioDevice]) -> Sdt {
    let mut body = Vec::new();
    body.extend(uart("COM1", 0, COM1_BASE as u16, COM1_IRQ));
    body.extend(uart("COM2", 1, COM2_BASE as u16, COM2_IRQ));
    for (i, d) in virtio.iter().enumerate() {
        body.extend(virtio_device(i, d));
    }
    let mut sb = Vec::new();
    // Scope(\_SB_) { devices }
    struct Raw(Vec<u8>);
    impl Aml for Raw {
        fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
            sink.vec(&self.0);
        }
    }
    let devices = Raw(body);
    aml::Scope::new("_SB_".into(), vec![&devices]).to_aml_bytes(&mut sb);
    // S5 type 5: what Linux writes into the sleep control register on poweroff.
    let five = 5u8;
    let zero = 0u8;
    let s5 = aml::Package::new(vec![&five, &zero]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut sb);
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"RWDSDT  ", 1);
    table.append_slice(&sb);
    table
}

/// Writes the tables; returns the RSDP address (also found by the kernel's
/// scan of 0xE0000-0xFFFFF).
pub fn write_tables(mem: &GuestMemory, cpus: u32, virtio: &[MmioDevice]) -> Result<u64, AcpiError> {
    let mut next = ACPI_TABLES_START;
    let mut place = |data: &[u8]| -> Result<u64, AcpiError> {
        let at = next;
        let end = at + data.len() as u64;
        if end > ACPI_TABLES_END {
            return Err(AcpiError::TooBig);
        }
        mem.write_slice(data, GuestAddress(at))?;
        next = (end + 15) & !15;
        Ok(at)
    };

    let dsdt_addr = place(dsdt(virtio).as_slice())?;

    let mut fadt = FADTBuilder::new(OEM_ID, *b"RWFACP  ", 1)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr);
    fadt.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        SLEEP_CONTROL_PORT,
    );
    fadt.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        SLEEP_STATUS_PORT,
    );
    let fadt_addr = place(&bytes(&fadt.finalize()))?;

    let mut madt = MADT::new(
        OEM_ID,
        *b"RWMADT  ",
        1,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for cpu in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(
            cpu as u8,
            cpu as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    let madt_addr = place(&bytes(&madt))?;

    let mut xsdt = XSDT::new(OEM_ID, *b"RWXSDT  ", 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&bytes(&xsdt))?;

    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    mem.write_slice(&bytes(&rsdp), GuestAddress(RSDP_ADDR))?;
    Ok(RSDP_ADDR)
}
