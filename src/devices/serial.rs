//! 16550A UART (vm-superio) on the PIO bus, interrupting through an irqfd.

use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use crate::console::{Console, ConsoleWriter};
use crate::snapshot::Persist;

pub const UART_LEN: u64 = 8;

/// Wraps the irqfd KVM listens on.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where a UART's output goes: the console (COM1), or the guest agent's
/// inbox (COM2).
#[derive(Clone)]
pub enum SerialOut {
    Console(Arc<Console>),
    Inbox(Arc<Inbox>),
}

/// Bytes from the guest, collected for the event loop, which is woken
/// through `wake`.
pub struct Inbox {
    bytes: std::sync::Mutex<Vec<u8>>,
    pub wake: EventFd,
}

/// A guest that writes to a port nobody reads must not grow host memory.
const INBOX_LIMIT: usize = 1 << 20;

impl Inbox {
    pub fn new() -> io::Result<Arc<Inbox>> {
        Ok(Arc::new(Inbox {
            bytes: std::sync::Mutex::new(Vec::new()),
            wake: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?,
        }))
    }

    pub fn take(&self) -> Vec<u8> {
        let _ = self.wake.read();
        std::mem::take(&mut *crate::devices::bus::lock(&self.bytes))
    }
}

/// Tells the event loop when the guest has drained the UART's input FIFO,
/// so queued host input can be fed in as room appears.
#[derive(Clone)]
pub struct UartEvents {
    pub drained: Option<Arc<EventFd>>,
}

impl SerialEvents for UartEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Some(e) = &self.drained {
            let _ = e.write(1);
        }
    }
}

impl std::io::Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOut::Console(c) => ConsoleWriter(c.clone()).write(buf),
            SerialOut::Inbox(inbox) => {
                let mut bytes = crate::devices::bus::lock(&inbox.bytes);
                if bytes.len() + buf.len() <= INBOX_LIMIT {
                    bytes.extend_from_slice(buf);
                }
                let _ = inbox.wake.write(1);
                Ok(buf.len())
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub struct SerialDevice {
    uart: Serial<IrqTrigger, UartEvents, SerialOut>,
    out: SerialOut,
    events: UartEvents,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: SerialOut, events: UartEvents) -> Self {
        SerialDevice {
            uart: Serial::with_events(IrqTrigger(irq), events.clone(), out.clone()),
            out,
            events,
        }
    }

    /// Moves queued host input into the guest's FIFO, as much as it has
    /// room for; the rest waits in `queue` for `in_buffer_empty`. Returns
    /// the bytes moved.
    pub fn feed_from(&mut self, queue: &mut std::collections::VecDeque<u8>) -> Vec<u8> {
        let room = self.uart.fifo_capacity();
        let chunk: Vec<u8> = queue.iter().copied().take(room).collect();
        if chunk.is_empty() || self.uart.enqueue_raw_bytes(&chunk).is_err() {
            return Vec::new();
        }
        queue.drain(..chunk.len());
        chunk
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
        self.uart = Serial::from_state(
            &state,
            IrqTrigger(irq),
            self.events.clone(),
            self.out.clone(),
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn uart() -> SerialDevice {
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let out = SerialOut::Inbox(Inbox::new().unwrap());
        SerialDevice::new(irq, out, UartEvents { drained: None })
    }

    #[test]
    fn save_restore_save() {
        let mut dev = uart();
        // What a driver sets up: divisor (under DLAB), 8N1, interrupts on,
        // modem control, scratch; and input waiting in the FIFO.
        for (offset, value) in [(3, 0x80), (0, 0x01), (1, 0x00), (3, 0x03), (1, 0x0f)] {
            dev.write(offset, &[value]);
        }
        dev.write(4, &[0x0b]);
        dev.write(7, &[0x5a]);
        let mut input: std::collections::VecDeque<u8> = b"hi".iter().copied().collect();
        dev.feed_from(&mut input);
        let mut fresh = uart();
        crate::snapshot::persist::assert_save_restore_save(&dev, &mut fresh);
        let mut b = [0u8];
        fresh.read(7, &mut b);
        assert_eq!(b[0], 0x5a, "the scratch register came back");
        fresh.read(0, &mut b);
        assert_eq!(b[0], b'h', "the input FIFO came back");
    }
}
