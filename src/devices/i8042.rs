//! The i8042 keyboard controller, only for its reset line: Linux's
//! `reboot=k` pulses it, and rewind ends the VM.

use vm_superio::{I8042Device, Trigger};

use super::BusDevice;
use crate::events::{VmEvent, VmEventSender};

pub const I8042_BASE: u64 = 0x60;
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
