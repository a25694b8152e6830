//! A port compatible with QEMU's `isa-debug-exit`: writing V ends the VM
//! with status `(V << 1) | 1`, so tests written for QEMU keep working.

use super::BusDevice;
use crate::events::{VmEvent, VmEventSender};

pub struct ExitPort {
    events: VmEventSender,
}

impl ExitPort {
    pub fn new(events: VmEventSender) -> Self {
        ExitPort { events }
    }
}

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut value = [0u8; 4];
        let n = data.len().min(4);
        value[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(value);
        self.events
            .send(VmEvent::GuestExit(((v << 1) | 1) as i32 & 0xff));
    }
}

/// Writes end the VM at once; there is nothing in between to capture.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitPortState {}

impl crate::snapshot::Persist for ExitPort {
    type State = ExitPortState;
    fn save(&self) -> ExitPortState {
        ExitPortState {}
    }
    fn restore(&mut self, _: &ExitPortState) -> Result<(), String> {
        Ok(())
    }
}
