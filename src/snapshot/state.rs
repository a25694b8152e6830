//! What a snapshot directory holds: the machine state in `state.bin`
//! (`vmm::MachineState`, bincode via format.rs) and a readable
//! `manifest.json`.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::disk::BaseIdentity;

pub const STATE_FILE: &str = "state.bin";
pub const MEMORY_FILE: &str = "memory.bin";
pub const MANIFEST_FILE: &str = "manifest.json";
/// Bumped whenever the machine state (`vmm::MachineState`) or the memory
/// layout changes meaning.
pub const MANIFEST_VERSION: u32 = 1;

/// What storage reads of the machine state in `state.bin`. The state is
/// the VMM's (`vmm::MachineState`); snapshot/ checks a bundle and rewrites
/// its disk layers through this view, without knowing devices or vCPUs.
pub trait StoredState: Serialize + DeserializeOwned {
    fn config(&self) -> &VmConfig;
    /// Per vCPU, in order: the CPUID it was given and its TSC rate.
    fn vcpus(&self) -> Vec<(&[kvm_bindings::kvm_cpuid_entry2], Option<u32>)>;
    /// Per disk, in order: its base and its frozen layer (relative to the
    /// snapshot directory unless absolute).
    fn disk_layers(&self) -> Vec<(&BaseIdentity, &Path)>;
    /// The frozen layers' names, for a copy that moves them (export).
    fn disk_layers_mut(&mut self) -> Vec<&mut PathBuf>;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub name: String,
    pub vm: String,
    /// The snapshot this VM's memory was last equal to when this one was taken.
    pub parent: Option<String>,
    pub created_unix_ms: u64,
    pub config: VmConfig,
    /// Identifies the kernel the snapshot was booted from.
    pub kernel: String,
    pub host: HostIdentity,
    pub state_bytes: u64,
    /// Bytes of memory data this snapshot stores itself (a full layer's zero
    /// pages are holes; an incremental layer holds only changed pages).
    pub memory_bytes: u64,
    /// For an incremental snapshot, the snapshot its memory layer sits on
    /// when it was taken (`memory.delta` names it authoritatively: a delete
    /// merges layers and may move it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_parent: Option<String>,
    /// Logical length of memory.bin (its offsets are guest-physical addresses).
    pub memory_file_len: u64,
    pub state_crc64: u64,
    pub pause_ms: f64,
    pub total_ms: f64,
    /// Each disk's frozen qcow2 layer (their backing chains end at the bases);
    /// a relative name is relative to the snapshot directory.
    #[serde(default)]
    pub disk_layers: Vec<std::path::PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostIdentity {
    /// `hardware` or `pvm` (see `HostKind`).
    pub kind: String,
    pub cpu_vendor: String,
    pub cpu_model: String,
    /// The guest's TSC frequency (vCPU 0), when KVM reported one.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
    /// The CPUID feature bits the guest's vCPUs were given: a host must
    /// offer all of them, or the guest may run instructions that fault.
    #[serde(default)]
    pub cpu_features: Vec<CpuidFeatures>,
}

/// The feature-flag registers of one CPUID leaf (other registers zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidFeatures {
    pub leaf: u32,
    pub subleaf: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// `HostIdentity::kind` of a PVM host. A guest set up for PVM (features
/// hidden, quirks on) runs anywhere; one set up for hardware KVM may rely on
/// what PVM cannot emulate.
pub const PVM_HOST_KIND: &str = "pvm";

/// CPUID leaves holding feature flags: (leaf, subleaf, and per register
/// eax, ebx, ecx, edx the bits that are flags). Left out: fields that are
/// sizes, counts or IDs; bits rewind sets per VM (leaf 1 ECX 31 hypervisor,
/// EDX 28 HTT); and bits KVM derives from guest control registers (leaf 1
/// ECX 27 OSXSAVE, leaf 7 ECX 4 OSPKE), which no host "supports".
pub const FEATURE_LEAVES: &[(u32, u32, [u32; 4])] = &[
    (1, 0, [0, 0, !((1 << 31) | (1 << 27)), !(1 << 28)]),
    (7, 0, [0, !0, !(1 << 4), !0]),
    (7, 1, [!0, 0, 0, !0]),
    // XCR0 bits the guest may enable (EAX low, EDX high).
    (0xd, 0, [!0, 0, 0, !0]),
    // XSAVEOPT/XSAVEC/XGETBV1/XSAVES/XFD, and IA32_XSS bits.
    (0xd, 1, [!0, 0, !0, !0]),
    (0x4000_0001, 0, [!0, 0, 0, 0]),
    (0x8000_0001, 0, [0, 0, !0, !0]),
    (0x8000_0007, 0, [0, 0, 0, !0]),
];

fn find(
    set: &[kvm_bindings::kvm_cpuid_entry2],
    leaf: u32,
    sub: u32,
) -> Option<kvm_bindings::kvm_cpuid_entry2> {
    set.iter()
        .find(|e| e.function == leaf && e.index == sub)
        .copied()
}

/// The feature flags in `cpuid` (a vCPU's CPUID), leaf by leaf.
pub fn feature_leaves(cpuid: &[kvm_bindings::kvm_cpuid_entry2]) -> Vec<CpuidFeatures> {
    FEATURE_LEAVES
        .iter()
        .filter_map(|&(leaf, subleaf, [a, b, c, d])| {
            let e = find(cpuid, leaf, subleaf)?;
            Some(CpuidFeatures {
                leaf,
                subleaf,
                eax: e.eax & a,
                ebx: e.ebx & b,
                ecx: e.ecx & c,
                edx: e.edx & d,
            })
        })
        .collect()
}

/// Names for the flags a guest is likeliest to rely on; others are shown
/// as `cpuid LEAF.SUB REG bit N`.
const FEATURE_NAMES: &[(u32, u32, usize, u32, &str)] = &[
    (1, 0, 2, 0, "sse3"),
    (1, 0, 2, 1, "pclmulqdq"),
    (1, 0, 2, 9, "ssse3"),
    (1, 0, 2, 12, "fma"),
    (1, 0, 2, 13, "cx16"),
    (1, 0, 2, 19, "sse4.1"),
    (1, 0, 2, 20, "sse4.2"),
    (1, 0, 2, 21, "x2apic"),
    (1, 0, 2, 22, "movbe"),
    (1, 0, 2, 23, "popcnt"),
    (1, 0, 2, 24, "tsc-deadline"),
    (1, 0, 2, 25, "aes"),
    (1, 0, 2, 26, "xsave"),
    (1, 0, 2, 28, "avx"),
    (1, 0, 2, 29, "f16c"),
    (1, 0, 2, 30, "rdrand"),
    (1, 0, 3, 25, "sse"),
    (1, 0, 3, 26, "sse2"),
    (7, 0, 1, 0, "fsgsbase"),
    (7, 0, 1, 3, "bmi1"),
    (7, 0, 1, 5, "avx2"),
    (7, 0, 1, 8, "bmi2"),
    (7, 0, 1, 9, "erms"),
    (7, 0, 1, 16, "avx512f"),
    (7, 0, 1, 17, "avx512dq"),
    (7, 0, 1, 18, "rdseed"),
    (7, 0, 1, 19, "adx"),
    (7, 0, 1, 28, "avx512cd"),
    (7, 0, 1, 29, "sha"),
    (7, 0, 1, 30, "avx512bw"),
    (7, 0, 1, 31, "avx512vl"),
    (7, 0, 2, 1, "avx512vbmi"),
    (7, 0, 2, 3, "pku"),
    (7, 0, 2, 8, "gfni"),
    (7, 0, 2, 9, "vaes"),
    (7, 0, 2, 10, "vpclmulqdq"),
    (7, 0, 2, 11, "avx512vnni"),
    (7, 0, 2, 22, "rdpid"),
    (7, 0, 3, 4, "fsrm"),
    (7, 0, 3, 14, "serialize"),
    (7, 0, 3, 22, "amx-bf16"),
    (7, 0, 3, 24, "amx-tile"),
    (7, 0, 3, 25, "amx-int8"),
    (7, 1, 0, 4, "avx-vnni"),
    (7, 1, 0, 5, "avx512-bf16"),
    (0xd, 0, 0, 2, "xcr0 avx state"),
    (0xd, 0, 0, 5, "xcr0 avx512 opmask state"),
    (0xd, 0, 0, 6, "xcr0 avx512 zmm_hi256 state"),
    (0xd, 0, 0, 7, "xcr0 avx512 hi16_zmm state"),
    (0xd, 0, 0, 9, "xcr0 pkru state"),
    (0xd, 0, 0, 17, "xcr0 amx tilecfg state"),
    (0xd, 0, 0, 18, "xcr0 amx tiledata state"),
    (0xd, 1, 0, 0, "xsaveopt"),
    (0xd, 1, 0, 1, "xsavec"),
    (0xd, 1, 0, 2, "xgetbv1"),
    (0xd, 1, 0, 3, "xsaves"),
    (0xd, 1, 0, 4, "xfd"),
    (0x8000_0001, 0, 2, 5, "lzcnt"),
    (0x8000_0001, 0, 3, 20, "nx"),
    (0x8000_0001, 0, 3, 26, "pdpe1gb"),
    (0x8000_0001, 0, 3, 27, "rdtscp"),
    (0x8000_0007, 0, 3, 8, "invariant-tsc"),
];

/// Features in any of `needed` that `host` does not offer, by name,
/// without repeats.
pub fn missing_cpu_features(needed: &[&[CpuidFeatures]], host: &[CpuidFeatures]) -> Vec<String> {
    let mut missing: Vec<String> = Vec::new();
    for f in needed.iter().flat_map(|set| set.iter()) {
        let h = host
            .iter()
            .find(|h| h.leaf == f.leaf && h.subleaf == f.subleaf)
            .copied()
            .unwrap_or(CpuidFeatures {
                leaf: f.leaf,
                subleaf: f.subleaf,
                eax: 0,
                ebx: 0,
                ecx: 0,
                edx: 0,
            });
        for (r, (reg, want, have)) in [
            ("eax", f.eax, h.eax),
            ("ebx", f.ebx, h.ebx),
            ("ecx", f.ecx, h.ecx),
            ("edx", f.edx, h.edx),
        ]
        .into_iter()
        .enumerate()
        {
            let mut lacking = want & !have;
            while lacking != 0 {
                let bit = lacking.trailing_zeros();
                lacking &= lacking - 1;
                let name = FEATURE_NAMES
                    .iter()
                    .find(|n| (n.0, n.1, n.2, n.3) == (f.leaf, f.subleaf, r, bit))
                    .map(|n| n.4.to_string())
                    .unwrap_or_else(|| {
                        format!("cpuid {:#x}.{} {reg} bit {bit}", f.leaf, f.subleaf)
                    });
                if !missing.contains(&name) {
                    missing.push(name);
                }
            }
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::{missing_cpu_features, CpuidFeatures};

    fn leaf(leaf: u32, subleaf: u32, eax: u32, edx: u32) -> CpuidFeatures {
        CpuidFeatures {
            leaf,
            subleaf,
            eax,
            ebx: 0,
            ecx: 0,
            edx,
        }
    }

    #[test]
    fn missing_features_are_named_once_each() {
        // XSAVEC (bit 1) and XSAVES (bit 3) of leaf 0xd.1 EAX, which the
        // check once ignored, and a bit without a name.
        let needed = [leaf(0xd, 1, 0b1011, 0), leaf(7, 0, 0, 1)];
        let again = [leaf(0xd, 1, 0b1000, 0)];
        let host = [leaf(0xd, 1, 0b0001, 0)];
        assert_eq!(
            missing_cpu_features(&[&needed, &again], &host),
            ["xsavec", "xsaves", "cpuid 0x7.0 edx bit 0"]
        );
        assert!(missing_cpu_features(&[&host], &host).is_empty());
    }
}
