//! The ACPI sleep control register of rewind's hardware-reduced FADT:
//! Linux's `poweroff` writes SLP_TYP=5 (S5, from the DSDT's `_S5_`) with
//! SLP_EN, and the VM ends with status 0.

use super::BusDevice;
use crate::events::{VmEvent, VmEventSender};

pub const ACPI_PM_LEN: u64 = 2;
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const S5: u8 = 5;

pub struct AcpiPm {
    events: VmEventSender,
}

impl AcpiPm {
    pub fn new(events: VmEventSender) -> Self {
        AcpiPm { events }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if offset == 0 && v & SLP_EN != 0 && (v >> SLP_TYP_SHIFT) & 0x7 == S5 {
            self.events.send(VmEvent::GuestExit(0));
        }
    }
}

/// The register holds no state between writes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AcpiPmState {}

impl crate::snapshot::Persist for AcpiPm {
    type State = AcpiPmState;
    fn save(&self) -> AcpiPmState {
        AcpiPmState {}
    }
    fn restore(&mut self, _: &AcpiPmState) -> Result<(), String> {
        Ok(())
    }
}
