//! Per-vCPU CPUID: what KVM supports, with the topology of this VM.

use kvm_bindings::CpuId;

/// Leaves that describe topology and the APIC ID of the calling CPU.
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// One package with `cpus` cores, one thread each; APIC ID = vCPU index.
pub fn for_vcpu(supported: &CpuId, index: u32, cpus: u32) -> CpuId {
    let mut cpuid = supported.clone();
    let core_bits = 32 - (cpus.max(1) - 1).leading_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | ((cpus & 0xff) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if cpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                e.eax = (e.eax & 0x03ff_ffff) | ((cpus - 1) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = index;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 0x100;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = cpus;
                        e.ecx = 0x201;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
    cpuid
}

/// Leaf 1 ECX bits for CX16, MOVBE, POPCNT, XSAVE, OSXSAVE and AVX: on PVM
/// hosts the guest kernel must not pick instructions its emulated ring 0
/// cannot run. KVM honours clearing what it reports as supported; the rest
/// is hidden with `clearcpuid=` on the command line.
const PVM_HIDDEN_LEAF1_ECX: u32 =
    (1 << 13) | (1 << 22) | (1 << 23) | (1 << 26) | (1 << 27) | (1 << 28);

/// KVM paravirtual features (leaf 0x40000001 EAX) that are hypercalls: on
/// PVM a `vmcall` from the guest's emulated ring 0 never completes. Linux
/// uses PV_SEND_IPI (bit 11) for every IPI once a second CPU is up, so with
/// `--cpus 2` the new CPU sat on its first `vmcall` (KVM_HC_SEND_IPI) and
/// the boot CPU spun on a lock it held; PV_SCHED_YIELD (bit 13) is the other
/// hypercall Linux makes. Without them Linux sends IPIs through the LAPIC.
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const PVM_HIDDEN_KVM_FEATURES: u32 = (1 << 11) | (1 << 13);

pub fn hide_unemulated(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        if e.function == LEAF_FEATURES {
            e.ecx &= !PVM_HIDDEN_LEAF1_ECX;
        }
        if e.function == LEAF_KVM_FEATURES {
            e.eax &= !PVM_HIDDEN_KVM_FEATURES;
        }
    }
}
