//! rewind: a small KVM hypervisor whose reason to exist is snapshots.
//!
//! The library is what the `rewind` binary, the tests and fuzz harnesses link
//! against: build a VM from a [`config::VmConfig`], run it, and drive it with
//! [`control::Command`] values.

pub mod agent;
pub mod arch;
pub mod child_vm;
pub mod config;
pub mod console;
pub mod control;
pub(crate) mod devices;
pub mod disk;
pub(crate) mod events;
mod fsutil;
/// Entry points for the fuzz targets in `fuzz/` and tests/fuzz_parsers.rs.
#[doc(hidden)]
pub mod fuzz;
pub mod guest;
pub mod images;
pub mod kvm;
pub(crate) mod memory;
pub mod paths;
pub mod progress;
pub mod seccomp;
pub mod snapshot;
pub mod vmm;
