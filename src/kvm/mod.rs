//! Everything that talks to `/dev/kvm`.

pub mod acpi;
pub mod assist;
pub mod boot;
pub mod cpuid;
pub mod host;
pub mod loader;
pub mod mptable;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
