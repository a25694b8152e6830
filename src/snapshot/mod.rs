//! Snapshots: what a capture contains, how it is written and read.

pub mod boot_cache;
pub mod bundle;
pub mod format;
pub mod layers;
pub(crate) mod memory;
pub mod ops;
pub(crate) mod persist;
pub mod stall;
pub mod state;
pub mod store;

pub(crate) use persist::Persist;
