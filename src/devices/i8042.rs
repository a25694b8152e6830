//! The i8042 keyboard controller, only for its reset line: Linux's
//! `reboot=k` pulses it, and rewind ends the VM.

use vm_superio::{I8042Device, Trigger};

use super::BusDevice;
use crate::events::{VmEvent, VmEventSender};

pub const I8042_LEN: u64 = 5;

pub struct ResetTrigger(VmEventSender);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.send(VmEvent::Reset);
        Ok(())
    }
}

pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    pub fn new(events: VmEventSender) -> Self {
        I8042(I8042Device::new(ResetTrigger(events)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            let _ = self.0.write(offset as u8, b);
        }
    }
}

/// Only the reset line matters to rewind; vm-superio keeps no other state
/// worth carrying across a snapshot, so the state is empty by design.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {}

impl crate::snapshot::Persist for I8042 {
    type State = I8042State;
    fn save(&self) -> I8042State {
        I8042State {}
    }
    fn restore(&mut self, _: &I8042State) -> Result<(), String> {
        Ok(())
    }
}
