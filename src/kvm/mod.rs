//! Everything that talks to `/dev/kvm`.

pub(crate) mod acpi;
pub(crate) mod assist;
pub(crate) mod boot;
pub(crate) mod cpuid;
pub mod host;
pub(crate) mod loader;
pub(crate) mod mptable;
pub(crate) mod vcpu;
pub(crate) mod vcpu_state;
pub(crate) mod vm;
