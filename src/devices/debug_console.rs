//! MMIO debug console and doorbell. On PVM hosts guest ring-3 code cannot do
//! port I/O, but a store outside every memory slot exits to the VMM, so this
//! page is how the test guest's workload talks to rewind.
//!
//! Register map (offsets from `DEBUG_CONSOLE_BASE`):
//! - `0x00` write 1 byte: console output
//! - `0x08` write u64: print `len = value >> 48` bytes from guest-physical
//!   `value & 0xffff_ffff_ffff` (one exit per line instead of per byte)
//! - `0x10` write u32: end the VM with this exit status (low 8 bits)
//! - `0x18` read u64: the magic `RWNDDBG1`, so a guest can probe for rewind
//!
//! Later doorbell commands (snapshot, fuzzing) take offsets from 0x20 up.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::BusDevice;
use crate::console::Console;
use crate::events::{VmEvent, VmEventSender};
use crate::memory::GuestMemory;

pub const REG_PUTC: u64 = 0x00;
pub const REG_PRINT: u64 = 0x08;
pub const REG_EXIT: u64 = 0x10;
pub const REG_MAGIC: u64 = 0x18;
pub const MAGIC: &[u8; 8] = b"RWNDDBG1";
/// A line longer than this is a guest bug; print what fits.
const MAX_PRINT: usize = 4096;

pub struct DebugConsole {
    mem: GuestMemory,
    console: Arc<Console>,
    events: VmEventSender,
}

impl DebugConsole {
    pub fn new(mem: GuestMemory, console: Arc<Console>, events: VmEventSender) -> Self {
        DebugConsole {
            mem,
            console,
            events,
        }
    }
}

fn le_u64(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl BusDevice for DebugConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == REG_MAGIC {
            let n = data.len().min(8);
            data[..n].copy_from_slice(&MAGIC[..n]);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let value = le_u64(data);
        match offset {
            REG_PUTC => self.console.write_bytes(&data[..data.len().min(1)]),
            REG_PRINT => {
                let addr = value & 0xffff_ffff_ffff;
                let len = ((value >> 48) as usize).min(MAX_PRINT);
                let mut buf = vec![0u8; len];
                match self.mem.read_slice(&mut buf, GuestAddress(addr)) {
                    Ok(()) => self.console.write_bytes(&buf),
                    Err(_) => self.console.write_bytes(
                        format!("[rewind: guest printed from bad address {addr:#x}]\n").as_bytes(),
                    ),
                }
            }
            REG_EXIT => self.events.send(VmEvent::GuestExit((value & 0xff) as i32)),
            _ => {}
        }
    }
}

/// Every register is a command acted on at once; doorbell commands that
/// carry state (fuzzing, later) add fields here.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DebugConsoleState {}

impl crate::snapshot::Persist for DebugConsole {
    type State = DebugConsoleState;
    fn save(&self) -> DebugConsoleState {
        DebugConsoleState {}
    }
    fn restore(&mut self, _: &DebugConsoleState) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::ConsoleTarget;

    fn device() -> DebugConsole {
        let (events, _) = crate::events::vm_event_channel().unwrap();
        let console = Console::new(&ConsoleTarget::None, None, events.clone()).unwrap();
        let mem = crate::memory::create_guest_memory(2 << 20).unwrap();
        DebugConsole::new(mem, console, events)
    }

    #[test]
    fn save_restore_save() {
        crate::snapshot::persist::assert_save_restore_save(&device(), &mut device());
    }
}
