//! 16550A UART (vm-superio) on the PIO bus, interrupting through an irqfd.

use std::io;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use crate::console::{Console, ConsoleWriter};

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const COM2_BASE: u64 = 0x2f8;
pub const COM2_IRQ: u32 = 3;
pub const UART_LEN: u64 = 8;

/// Wraps the irqfd KVM listens on.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, console: Arc<Console>) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), ConsoleWriter(console)),
        }
    }

    /// Host input for the guest; bytes beyond the FIFO's room are dropped,
    /// as on a real UART nobody is reading.
    pub fn enqueue_input(&mut self, bytes: &[u8]) {
        let room = self.uart.fifo_capacity();
        let n = bytes.len().min(room);
        if n > 0 {
            let _ = self.uart.enqueue_raw_bytes(&bytes[..n]);
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            let _ = self.uart.write(offset as u8, b);
        }
    }
}
