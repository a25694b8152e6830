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

#[cfg(test)]
mod tests {
    use super::acpi_pm::AcpiPm;
    use super::exit_port::ExitPort;
    use super::i8042::I8042;
    use crate::snapshot::persist::assert_save_restore_save;

    /// The devices whose state is empty (the UART, the debug console and the
    /// virtio transport have their own, next to them): still checked, so one
    /// that gains state and forgets to save it fails here.
    #[test]
    fn stateless_devices_save_restore_save() {
        let events = || crate::events::vm_event_channel().unwrap().0;
        assert_save_restore_save(&AcpiPm::new(events()), &mut AcpiPm::new(events()));
        assert_save_restore_save(&I8042::new(events()), &mut I8042::new(events()));
        assert_save_restore_save(&ExitPort::new(events()), &mut ExitPort::new(events()));
    }
}
