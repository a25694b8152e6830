//! 16550A UART (vm-superio) on the PIO bus, interrupting through an irqfd.

use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use crate::console::{Console, ConsoleWriter};
use crate::snapshot::Persist;

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

/// Where a UART's output goes: the console (COM1), or nowhere until the
/// guest agent's host side claims COM2.
#[derive(Clone)]
pub enum SerialOut {
    Console(Arc<Console>),
    Discard,
}

impl std::io::Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOut::Console(c) => ConsoleWriter(c.clone()).write(buf),
            SerialOut::Discard => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, SerialOut>,
    out: SerialOut,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), out.clone()),
            out,
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

/// vm-superio's `SerialState` has no serde derive; this mirrors it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// IIR bit 0 set means "no interrupt pending".
const IIR_NONE_PENDING: u8 = 0x01;

impl Persist for SerialDevice {
    type State = UartState;

    fn save(&self) -> UartState {
        let s = self.uart.state();
        UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn restore(&mut self, s: &UartState) -> Result<(), String> {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let irq = self
            .uart
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| format!("UART: cannot reuse its interrupt: {e}"))?;
        self.uart = Serial::from_state(&state, IrqTrigger(irq), NoEvents, self.out.clone())
            .map_err(|e| format!("UART state is invalid: {e:?}"))?;
        // An interrupt pending at capture time (for example THRE after the
        // last byte) was delivered to the old irqchip state; raise it again
        // so the guest driver is not left waiting for it.
        if s.interrupt_identification & IIR_NONE_PENDING == 0 {
            let _ = self.uart.interrupt_evt().trigger();
        }
        Ok(())
    }
}
