//! Host detection. On a PVM host (`kvm_pvm`, software nested virtualisation)
//! guest ring-0 code is emulated and some instructions cannot run there at
//! all; rewind says so once and adapts, and never does so on hardware KVM.

use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HostKind {
    /// VT-x or AMD-V.
    Hardware,
    /// kvm_pvm: ring 0 emulated, ring 3 native.
    Pvm,
}

impl HostKind {
    pub fn detect() -> HostKind {
        if Path::new("/sys/module/kvm_pvm").exists() {
            HostKind::Pvm
        } else {
            HostKind::Hardware
        }
    }

    /// Whether KVM shadows the guest's page tables (PVM always; hardware
    /// KVM with EPT/NPT turned off), so that guest memory rewritten by the
    /// VMM must be followed by a flush of KVM's shadow MMU.
    pub fn shadows_guest_page_tables(self) -> bool {
        let param_off =
            |path: &str, off: &str| std::fs::read_to_string(path).is_ok_and(|v| v.trim() == off);
        self == HostKind::Pvm
            || param_off("/sys/module/kvm_intel/parameters/ept", "N")
            || param_off("/sys/module/kvm_amd/parameters/npt", "0")
    }

    pub fn describe(self) -> &'static str {
        match self {
            HostKind::Hardware => "hardware KVM",
            HostKind::Pvm => {
                "PVM host (kvm_pvm): guest ring-0 code is emulated; rewind completes int3, fwait, ldmxcsr and stmxcsr for the guest"
            }
        }
    }
}

/// Features whose instructions PVM's emulator cannot run in guest ring 0
/// (design notes, section 1). `clearcpuid` takes /proc/cpuinfo names.
/// FSGSBASE is on the list because with it a busybox child process came up
/// with a wrong FS base (TLS) and segfaulted; `nofsgsbase` fixed it.
const PVM_CLEARCPUID: &str = "xsave,xsaves,xsavec,xsaveopt,avx,avx2,avx512f,pcid,invpcid,smap,rdtscp,rdpid,popcnt,cx16,movbe,pclmulqdq,aes,sse4_1,sse4_2,fsgsbase";

/// Ring-3 CPUID on PVM reports the host's AVX/AVX2/AVX-512 even though the
/// guest kernel (`noxsave`) saves only x87/SSE state when it switches tasks,
/// so two guest processes using YMM registers corrupt each other: glibc's
/// AVX2 memcpy then copies a fresh process's TLS image wrong and busybox
/// dies at its first TLS read (`segfault at 0 ip 4a4d02`, 2 of 15 pipelines
/// before, 0 of 15 after). The kernel hands `KEY=VALUE` words without a dot
/// in the key to init's environment, so every glibc process in the guest
/// inherits this and keeps to SSE code paths.
const PVM_GLIBC_TUNABLES: &str = "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_Fast_Unaligned_Load";

impl HostKind {
    /// What a Linux guest needs on its command line on this host, if anything.
    ///
    /// `clocksource=kvm-clock`: the guest TSC cannot be set on PVM, so a
    /// restored guest that keeps time with the TSC sees its clock jump by the
    /// snapshot's age, and a periodic tick then replays every missed tick one
    /// emulated handler at a time (minutes of ring-0 work for a snapshot a
    /// minute old). kvm-clock is restored exactly with KVM_SET_CLOCK, so time
    /// continues from the capture.
    pub fn linux_cmdline_quirks(self) -> Option<String> {
        match self {
            HostKind::Hardware => None,
            HostKind::Pvm => Some(format!(
                "noxsave nofsgsbase clearcpuid={PVM_CLEARCPUID} mitigations=off clocksource=kvm-clock {PVM_GLIBC_TUNABLES}"
            )),
        }
    }
}

/// Total host RAM in MiB, the ceiling for `--mem`.
pub fn host_mem_mib() -> u64 {
    // SAFETY: sysinfo fills a plain-data struct we own.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return u64::MAX;
    }
    (info.totalram as u64).saturating_mul(info.mem_unit as u64) >> 20
}
