//! Fuzzing: a snapshot held in memory, the reset back to it, and a small
//! mutation engine driving a guest through the doorbells
//! (devices::debug_console has the register map). The public face is
//! [`crate::Vm`]; `rewind fuzz` is [`engine::fuzz`] on the test guest.

pub mod engine;
pub mod floor;
pub(crate) mod hot;
pub(crate) mod pagetables;
pub(crate) mod reset;
pub(crate) mod untouched;
pub(crate) mod vcpu_reset;
pub(crate) mod verify;

pub use engine::{fuzz, FuzzOptions, FuzzReport};
pub use floor::Floor;
pub use reset::ResetTimes;

#[derive(Debug, thiserror::Error)]
pub enum FuzzError {
    #[error(transparent)]
    Vmm(#[from] crate::vmm::VmmError),
    #[error(transparent)]
    Vm(#[from] crate::kvm::vm::VmError),
    #[error(transparent)]
    Vcpu(#[from] crate::kvm::vcpu::VcpuError),
    #[error("KVM refused to {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("cannot restore device state: {0}")]
    State(String),
}
