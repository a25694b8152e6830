//! The project's own test guest, built by `build.rs` from
//! `guest-images/testguest` and embedded so that `rewind run --guest test`
//! needs no file.

/// The test guest as an ELF image, loaded like any `vmlinux`.
pub const TEST_GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

/// Which guest a run boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GuestKind {
    /// The embedded test guest: every vCPU starts at its entry in 64-bit mode.
    Test,
    /// A Linux kernel: only the boot vCPU starts; the kernel wakes the others.
    Linux,
}

impl GuestKind {
    /// Whether an exec agent can ever answer: the test guest has none, so
    /// an exec is refused at once instead of waiting for its timeout.
    pub fn has_agent(self) -> bool {
        self == GuestKind::Linux
    }
}
