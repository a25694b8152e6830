//! The x86-64 platform the guest sees: where things live (`layout`), how a
//! kernel is loaded and entered, the firmware tables that describe the
//! machine, the CPUID it reports, and what kind of host rewind runs on.

pub(crate) mod acpi;
pub(crate) mod boot;
pub mod cpio;
pub(crate) mod cpuid;
pub mod host;
pub mod layout;
pub(crate) mod loader;
pub(crate) mod mptable;
