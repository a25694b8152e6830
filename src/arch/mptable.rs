//! An Intel MultiProcessor Specification 1.4 table, for kernels without ACPI
//! (the microvm kernel, `--no-acpi`): it lists the vCPUs, the ISA bus, the
//! IOAPIC and how the 16 ISA interrupts reach it. Linux finds the floating
//! pointer by scanning the EBDA.

use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout::{EBDA_START, IOAPIC_ADDR, LAPIC_ADDR};
use crate::memory::GuestMemory;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT: u8 = 2;
/// Family 6 signature and FPU|APIC feature flags: what Linux expects to see.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in an MP table")]
    TooManyCpus(u32),
    #[error("cannot write the MP table into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The configuration table's entries, without its header.
fn entries(cpus: u32) -> (Vec<u8>, u16) {
    let ioapic_id = cpus as u8;
    let mut e = Vec::new();
    let mut count = 0u16;
    for cpu in 0..cpus {
        e.push(ENTRY_PROCESSOR);
        e.push(cpu as u8);
        e.push(APIC_VERSION);
        e.push(CPU_ENABLED | if cpu == 0 { CPU_BOOT } else { 0 });
        e.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        e.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        e.extend_from_slice(&[0; 8]);
        count += 1;
    }
    e.extend_from_slice(&[ENTRY_BUS, 0]);
    e.extend_from_slice(b"ISA   ");
    count += 1;
    e.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    e.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // ISA IRQ n arrives at IOAPIC pin n, as KVM routes it.
    for irq in 0..16u8 {
        e.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    // LINT0 is the PIC (ExtINT), LINT1 NMI, on every LAPIC (0xff).
    e.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    e.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;
    (e, count)
}

pub fn write_mptable(mem: &GuestMemory, cpus: u32) -> Result<(), MptableError> {
    if cpus > 254 {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let floating = EBDA_START;
    let table = floating + 16;
    let (body, count) = entries(cpus);
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + body.len()) as u16).to_le_bytes());
    header.push(4);
    header.push(0); // checksum, below
    header.extend_from_slice(b"REWIND  ");
    header.extend_from_slice(b"000000000000");
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]);
    let mut config = header;
    config.extend_from_slice(&body);
    config[7] = checksum(&config);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table as u32).to_le_bytes());
    fp.push(1);
    fp.push(4);
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]);
    fp[10] = checksum(&fp);

    mem.write_slice(&fp, GuestAddress(floating))?;
    mem.write_slice(&config, GuestAddress(table))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        write_mptable(&mem, 4).unwrap();
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(fp.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let len = {
            let mut h = [0u8; 44];
            mem.read_slice(&mut h, GuestAddress(EBDA_START + 16))
                .unwrap();
            assert_eq!(&h[..4], b"PCMP");
            assert_eq!(u16::from_le_bytes([h[34], h[35]]), 4 + 1 + 1 + 16 + 2);
            u16::from_le_bytes([h[4], h[5]]) as usize
        };
        let mut all = vec![0u8; len];
        mem.read_slice(&mut all, GuestAddress(EBDA_START + 16))
            .unwrap();
        assert_eq!(all.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert!(EBDA_START + 16 + len as u64 <= 0xA_0000, "fits in the EBDA");
    }
}
