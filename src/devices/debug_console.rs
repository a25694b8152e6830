//! MMIO debug console and doorbell. On PVM hosts guest ring-3 code cannot do
//! port I/O, but a store outside every memory slot exits to the VMM, so this
//! page is how the test guest's workload (and a Linux program mapping it
//! through `/dev/mem`) talks to rewind.
//!
//! Register map (offsets from `DEBUG_CONSOLE_BASE`, guest-physical
//! 0xD000_0000; little-endian; writes of 1-8 bytes, unused bytes zero):
//! - `0x00` write 1 byte: console output
//! - `0x08` write u64: print `len = value >> 48` bytes from guest-physical
//!   `value & 0xffff_ffff_ffff` (one exit per line instead of per byte)
//! - `0x10` write u32: end the VM with this exit status (low 8 bits)
//! - `0x18` read u64: the magic `RWNDDBG1`, so a guest can probe for rewind
//!
//! Fuzzing doorbells, modelled on kAFL/Nyx's hypercalls (GET_PAYLOAD,
//! SNAPSHOT/NEXT_PAYLOAD, RELEASE, PANIC). They act only while a fuzzer is
//! attached (`rewind fuzz`, the [`crate::Vm`] API); otherwise SNAPSHOT, DONE
//! and CRASH are ignored and the guest runs on, so a target can tell it ran
//! alone.
//! - `0x20` write u64 INPUT: the input buffer, guest-physical
//!   `value & 0xffff_ffff_ffff`, `value >> 48` bytes long (header
//!   included). The fuzzer writes each input there as a u32 length followed
//!   by the bytes (at most capacity - 4).
//! - `0x28` write u64 FEEDBACK: a buffer the target marks as it goes
//!   (coverage, compare progress), same encoding; the fuzzer reads it after
//!   each input. It must be zero at the SNAPSHOT, so each reset clears it.
//! - `0x30` write any SNAPSHOT: take the root snapshot here. The vCPU stops
//!   right after this store; every reset returns here with the next input in
//!   the buffer.
//! - `0x38` write any DONE: this input ran to its end; reset me.
//! - `0x40` write u64 CRASH: this input crashed with this code; reset me.
//!   A real fault in the target (a triple fault in the test guest, which has
//!   no handlers) is reported as a crash too.
//! - `0x48` read u64: the register map's version (1), 0 before it existed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::BusDevice;
use crate::console::Console;
use crate::events::{Doorbell, VmEvent, VmEventSender};
use crate::memory::GuestMemory;

pub const REG_PUTC: u64 = 0x00;
pub const REG_PRINT: u64 = 0x08;
pub const REG_EXIT: u64 = 0x10;
pub const REG_MAGIC: u64 = 0x18;
pub const REG_FUZZ_INPUT: u64 = 0x20;
pub const REG_FUZZ_FEEDBACK: u64 = 0x28;
pub const REG_FUZZ_SNAPSHOT: u64 = 0x30;
pub const REG_FUZZ_DONE: u64 = 0x38;
pub const REG_FUZZ_CRASH: u64 = 0x40;
pub const REG_VERSION: u64 = 0x48;
pub const MAGIC: &[u8; 8] = b"RWNDDBG1";
pub const VERSION: u64 = 1;
/// A line longer than this is a guest bug; print what fits.
const MAX_PRINT: usize = 4096;

/// The fuzzing side of the doorbell page, shared by the device (the guest
/// writes it), the vCPU thread (which stops after a doorbell that needs the
/// fuzzer) and the fuzzer (which arms it and reads the buffers).
#[derive(Debug, Default)]
pub struct FuzzLink {
    armed: AtomicBool,
    /// Set by a doorbell the fuzzer must answer; the vCPU that made the
    /// access takes it and stops (see kvm::vcpu), so its state is exactly
    /// the one right after the store.
    park: Arc<AtomicBool>,
    input: AtomicU64,
    feedback: AtomicU64,
}

/// A guest buffer declared through INPUT or FEEDBACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestBuffer {
    pub addr: u64,
    pub len: usize,
}

fn decode_buffer(v: u64) -> Option<GuestBuffer> {
    (v != 0).then_some(GuestBuffer {
        addr: v & 0xffff_ffff_ffff,
        len: (v >> 48) as usize,
    })
}

impl FuzzLink {
    pub fn arm(&self, on: bool) {
        self.armed.store(on, Ordering::SeqCst);
    }

    pub fn input(&self) -> Option<GuestBuffer> {
        decode_buffer(self.input.load(Ordering::SeqCst))
    }

    pub fn feedback(&self) -> Option<GuestBuffer> {
        decode_buffer(self.feedback.load(Ordering::SeqCst))
    }

    /// The flag the vCPU threads watch.
    pub fn park_flag(&self) -> Arc<AtomicBool> {
        self.park.clone()
    }

    /// The registers as raw values, for a snapshot held by the fuzzer.
    pub fn registers(&self) -> (u64, u64) {
        (
            self.input.load(Ordering::SeqCst),
            self.feedback.load(Ordering::SeqCst),
        )
    }

    pub fn set_registers(&self, (input, feedback): (u64, u64)) {
        self.input.store(input, Ordering::SeqCst);
        self.feedback.store(feedback, Ordering::SeqCst);
    }
}

pub struct DebugConsole {
    mem: GuestMemory,
    console: Arc<Console>,
    events: VmEventSender,
    fuzz: Arc<FuzzLink>,
}

impl DebugConsole {
    pub fn new(mem: GuestMemory, console: Arc<Console>, events: VmEventSender) -> Self {
        DebugConsole {
            mem,
            console,
            events,
            fuzz: Arc::default(),
        }
    }

    pub fn fuzz_link(&self) -> Arc<FuzzLink> {
        self.fuzz.clone()
    }

    /// A doorbell the fuzzer answers: stop the vCPU, then tell the fuzzer
    /// (park first, so the fuzzer never finds the vCPU still running).
    fn ring(&self, bell: Doorbell) {
        if self.fuzz.armed.load(Ordering::SeqCst) {
            self.fuzz.park.store(true, Ordering::SeqCst);
            self.events.send(VmEvent::Doorbell(bell));
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
        let value = match offset {
            REG_MAGIC => u64::from_le_bytes(*MAGIC),
            REG_VERSION => VERSION,
            _ => 0,
        };
        let n = data.len().min(8);
        data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
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
            REG_FUZZ_INPUT => self.fuzz.input.store(value, Ordering::SeqCst),
            REG_FUZZ_FEEDBACK => self.fuzz.feedback.store(value, Ordering::SeqCst),
            REG_FUZZ_SNAPSHOT => self.ring(Doorbell::Snapshot),
            REG_FUZZ_DONE => self.ring(Doorbell::Done),
            REG_FUZZ_CRASH => self.ring(Doorbell::Crash(value)),
            _ => {}
        }
    }
}

/// Every register is a command acted on at once. The fuzzing registers
/// (the buffers a target declared) are not in `state.bin`, whose layout
/// they would change: the fuzzer's in-memory snapshot carries them
/// ([`FuzzLink::registers`]), and a target declares them before its
/// SNAPSHOT doorbell anyway.
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
