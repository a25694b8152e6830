//! Snapshots: what a capture contains, how it is written and read.

pub mod boot_cache;
pub mod bundle;
pub mod format;
pub mod layers;
pub mod memory;
pub mod ops;
pub mod persist;
pub mod stall;
pub mod state;
pub mod store;

pub use persist::Persist;
