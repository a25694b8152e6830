//! Everything that talks to `/dev/kvm`: the VM, its vCPUs and their state.
//! What the guest sees of the platform (boot, tables, CPUID) is in `arch`.

pub(crate) mod assist;
pub(crate) mod vcpu;
pub(crate) mod vcpu_inline;
pub(crate) mod vcpu_state;
pub(crate) mod vcpu_stats;
pub(crate) mod vm;
