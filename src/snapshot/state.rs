//! What a snapshot holds: the machine state in `state.bin` (bincode, via
//! format.rs) and a readable `manifest.json`.

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::devices::debug_console::DebugConsoleState;
use crate::devices::exit_port::ExitPortState;
use crate::devices::i8042::I8042State;
use crate::devices::serial::UartState;
use crate::kvm::vcpu_state::VcpuState;
use crate::kvm::vm::VmState;

pub const STATE_FILE: &str = "state.bin";
pub const MEMORY_FILE: &str = "memory.bin";
pub const MANIFEST_FILE: &str = "manifest.json";
/// Bumped whenever `MachineState` or the memory layout changes meaning.
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Clone, Serialize, Deserialize)]
pub struct DevicesState {
    pub com1: UartState,
    pub com2: UartState,
    pub acpi_pm: crate::devices::acpi_pm::AcpiPmState,
    pub i8042: I8042State,
    pub exit_port: ExitPortState,
    pub debug_console: DebugConsoleState,
    /// One virtio-mmio transport per disk, in disk order.
    pub virtio: Vec<crate::devices::virtio::MmioState>,
}

/// Everything but memory. Order of restore: VM (irqchips, PIT, clock), then
/// vCPUs, then devices (a UART re-raising its interrupt needs the irqchip).
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    pub config: VmConfig,
    /// What the capturing host's KVM offered (`KVM_GET_SUPPORTED_CPUID`):
    /// a restore host must offer at least these features.
    pub host_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
    /// Each disk's frozen layer, in disk order.
    pub disks: Vec<crate::vmm::disks::DiskSnapshot>,
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
    /// Bytes of memory data actually stored (zero pages are holes).
    pub memory_bytes: u64,
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
    pub kind: String,
    pub cpu_vendor: String,
    pub cpu_model: String,
}

impl HostIdentity {
    pub fn current(kind: crate::kvm::host::HostKind) -> HostIdentity {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        HostIdentity {
            kind: format!("{kind:?}").to_lowercase(),
            cpu_vendor: field("vendor_id"),
            cpu_model: field("model name"),
        }
    }
}

/// CPUID feature leaves a guest may rely on: (leaf, subleaf).
const FEATURE_LEAVES: &[(u32, u32)] = &[(1, 0), (7, 0), (0xd, 1), (0x8000_0001, 0)];

/// Feature bits the snapshot's vCPUs were given that this host's KVM does
/// not offer: restoring there would let the guest run instructions that fault.
pub fn missing_cpu_features(
    snapshot: &[kvm_bindings::kvm_cpuid_entry2],
    host: &[kvm_bindings::kvm_cpuid_entry2],
) -> Vec<String> {
    let find = |set: &[kvm_bindings::kvm_cpuid_entry2], leaf, sub| {
        set.iter()
            .find(|e| e.function == leaf && e.index == sub)
            .copied()
    };
    let mut missing = Vec::new();
    for &(leaf, sub) in FEATURE_LEAVES {
        let Some(s) = find(snapshot, leaf, sub) else {
            continue;
        };
        let h = find(host, leaf, sub).unwrap_or_default();
        // Leaf 1 ECX bit 31 (hypervisor) and the APIC ID / count fields in EBX
        // are set by rewind per VM, not taken from the host.
        let (ecx_mask, ebx_mask) = if leaf == 1 {
            (!(1u32 << 31), 0)
        } else {
            (!0, !0)
        };
        for (reg, sv, hv) in [
            ("ebx", s.ebx & ebx_mask, h.ebx),
            ("ecx", s.ecx & ecx_mask, h.ecx),
            ("edx", s.edx, h.edx),
        ] {
            let lacking = sv & !hv;
            if lacking != 0 {
                missing.push(format!("cpuid {leaf:#x}.{sub} {reg} bits {lacking:#x}"));
            }
        }
    }
    missing
}
