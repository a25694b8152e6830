//! Emulated devices. Devices never see the VMM or KVM: they get offsets
//! from the bus, raise interrupts through an EventFd and report VM-level
//! events through a [`crate::events::VmEventSender`].

pub mod acpi_pm;
pub mod bus;
pub mod debug_console;
pub mod exit_port;
pub mod i8042;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice};
