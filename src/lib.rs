//! rewind: a small KVM hypervisor whose reason to exist is snapshots.
//!
//! The public library API is [`Vm`] (see [`api`]): boot or restore a guest,
//! run it until a guest event or a timeout, read and write its memory and
//! registers, snapshot it into memory and reset it back, thousands of times
//! a second; [`fuzz::fuzz`] is a small mutation loop on top. Everything
//! else here is the `rewind` binary's machinery, public only so the binary,
//! the tests and the benches can link against it, and hidden from the docs.

pub mod api;
pub mod fuzz;
pub use api::{Console, Error, Event, Registers, Vm, VmOptions};
pub use fuzz::ResetTimes;

#[doc(hidden)]
pub mod agent;
#[doc(hidden)]
pub mod arch;
#[doc(hidden)]
pub mod child_vm;
#[doc(hidden)]
pub mod config;
#[doc(hidden)]
pub mod console;
#[doc(hidden)]
pub mod control;
pub(crate) mod devices;
#[doc(hidden)]
pub mod disk;
pub(crate) mod events;
mod fsutil;
#[doc(hidden)]
pub mod guest;
#[doc(hidden)]
pub mod images;
#[doc(hidden)]
pub mod kvm;
pub(crate) mod memory;
/// Entry points for the fuzz targets in `fuzz/` and tests/fuzz_parsers.rs.
#[doc(hidden)]
pub mod parser_fuzz;
#[doc(hidden)]
pub mod paths;
#[doc(hidden)]
pub mod progress;
#[doc(hidden)]
pub mod seccomp;
#[doc(hidden)]
pub mod snapshot;
#[doc(hidden)]
pub mod vmm;
