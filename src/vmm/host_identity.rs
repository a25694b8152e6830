//! What a snapshot records of the host it is taken on, and what this host
//! offers a bundle (snapshot/ops.rs compares the two; this side reads the
//! host: its kind, /proc/cpuinfo, CPUID).

use crate::arch::host::HostKind;
use crate::snapshot::state::{
    feature_leaves, CpuidFeatures, HostIdentity, FEATURE_LEAVES, PVM_HOST_KIND,
};

/// The name a manifest records for `kind`.
pub(crate) fn host_kind_name(kind: HostKind) -> String {
    match kind {
        HostKind::Hardware => "hardware",
        HostKind::Pvm => PVM_HOST_KIND,
    }
    .to_string()
}

/// This host, and what vCPU 0 of the guest was given (`tsc_khz`, `cpuid`).
pub(crate) fn host_identity(
    kind: HostKind,
    tsc_khz: Option<u32>,
    cpuid: &[kvm_bindings::kvm_cpuid_entry2],
) -> HostIdentity {
    // Read once: the host's CPU does not change under a running process,
    // and reading /proc/cpuinfo costs a tenth of an idle snapshot.
    static CPU: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    let (vendor, model) = CPU.get_or_init(|| {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        (field("vendor_id"), field("model name"))
    });
    HostIdentity {
        kind: host_kind_name(kind),
        cpu_vendor: vendor.clone(),
        cpu_model: model.clone(),
        tsc_khz,
        cpu_features: feature_leaves(cpuid),
    }
}

/// The feature flags a guest can be given here. On hardware KVM that is
/// `KVM_GET_SUPPORTED_CPUID`. On PVM it is not: that list holds little more
/// than what KVM itself emulates, while guest ring 3 runs on the host CPU
/// natively and a vCPU's CPUID reads back the host's own flags (measured:
/// supported leaf 1 ECX 0x81202000, a vCPU's 0xf7f83203), so the CPU's
/// own CPUID counts too.
pub(crate) fn host_features(
    kind: HostKind,
    supported: &[kvm_bindings::kvm_cpuid_entry2],
) -> Vec<CpuidFeatures> {
    let mut offered = feature_leaves(supported);
    if kind != HostKind::Pvm {
        return offered;
    }
    for &(leaf, subleaf, [a, b, c, d]) in FEATURE_LEAVES {
        // The hypervisor range describes the outer hypervisor, not PVM.
        if (0x4000_0000..0x5000_0000).contains(&leaf) {
            continue;
        }
        let Some(raw) = raw_cpuid(leaf, subleaf) else {
            continue;
        };
        let i = match offered
            .iter()
            .position(|f| f.leaf == leaf && f.subleaf == subleaf)
        {
            Some(i) => i,
            None => {
                offered.push(CpuidFeatures {
                    leaf,
                    subleaf,
                    eax: 0,
                    ebx: 0,
                    ecx: 0,
                    edx: 0,
                });
                offered.len() - 1
            }
        };
        let f = &mut offered[i];
        f.eax |= raw.eax & a;
        f.ebx |= raw.ebx & b;
        f.ecx |= raw.ecx & c;
        f.edx |= raw.edx & d;
    }
    offered
}

/// This CPU's own CPUID leaf, if it has that leaf.
fn raw_cpuid(leaf: u32, subleaf: u32) -> Option<std::arch::x86_64::CpuidResult> {
    use std::arch::x86_64::__cpuid_count;
    // CPUID is available on every x86-64 CPU; the leaf's range is checked
    // against the range's maximum first.
    let max = __cpuid_count(leaf & 0x8000_0000, 0).eax;
    (leaf <= max).then(|| __cpuid_count(leaf, subleaf))
}
