//! Snapshot storage: the state file format, bundles (checked, exported),
//! the store, memory layers and the boot cache. The machine state itself
//! and the host it is checked against are the VMM's (`vmm::MachineState`,
//! read here through `state::StoredState`); nothing here imports `vmm`,
//! `devices` or `kvm`.

pub mod boot_cache;
pub mod bundle;
pub mod chain;
pub mod delta;
pub mod format;
pub mod layers;
pub mod live;
pub mod mapping;
pub(crate) mod memory;
pub mod ops;
pub(crate) mod persist;
pub mod stall;
pub mod state;
pub mod store;
pub mod tree;

pub(crate) use persist::Persist;
