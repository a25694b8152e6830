//! Everything that talks to `/dev/kvm`: the VM, its vCPUs and their state.
//! What the guest sees of the platform (boot, tables, CPUID) is in `arch`.

pub mod assist;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
