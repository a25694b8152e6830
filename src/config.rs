//! VM configuration: what the user asked for, validated once, and stored in
//! every snapshot so a restore can rebuild the same machine.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::guest::GuestKind;

/// Guest RAM must at least hold the boot structures and the test guest image.
pub const MIN_MEM_MIB: u64 = 32;
/// The test guest keeps per-CPU tables for this many vCPUs.
pub const MAX_TEST_GUEST_CPUS: u32 = 64;
/// Page tables built by the loader cover this much guest-physical space.
pub const MAX_MEM_MIB: u64 = 128 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--mem must be at least {MIN_MEM_MIB} MiB (got {0})")]
    MemTooSmall(u64),
    #[error("--mem {asked} MiB is more than this host can give (at most {limit} MiB)")]
    MemTooLarge { asked: u64, limit: u64 },
    #[error("--cpus must be at least 1")]
    NoCpus,
    #[error("--cpus {asked} is more than rewind supports here (at most {limit})")]
    TooManyCpus { asked: u32, limit: u32 },
    #[error(
        "invalid VM name {0:?}: use 1-64 characters of A-Z a-z 0-9 . _ - (not starting with '.')"
    )]
    BadName(String),
}

/// Where the kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KernelSource {
    /// The test guest compiled into the binary.
    EmbeddedTestGuest,
    /// A `vmlinux` ELF or a bzImage on disk.
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub name: String,
    pub guest: GuestKind,
    pub kernel: KernelSource,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub cpus: u32,
    /// Linux guests: describe the machine with ACPI tables (an MP table is
    /// always written for kernels without ACPI).
    pub acpi: bool,
    /// Base images, never written: the guest writes into qcow2 overlays.
    pub disks: Vec<PathBuf>,
}

/// Longest VM or snapshot name.
pub const MAX_NAME_LEN: usize = 64;

/// The one rule for VM and snapshot names: they become directory and socket
/// names, so they are kept boring. Not starting with `.` keeps `.`, `..` and
/// hidden files out of the directories they name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl VmConfig {
    /// Checks the config against fixed limits and the host's limits
    /// (`host_mem_mib`, `host_max_cpus`).
    pub fn validate(&self, host_mem_mib: u64, host_max_cpus: u32) -> Result<(), ConfigError> {
        if !valid_name(&self.name) {
            return Err(ConfigError::BadName(self.name.clone()));
        }
        if self.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemTooSmall(self.mem_mib));
        }
        let mem_limit = host_mem_mib.min(MAX_MEM_MIB);
        if self.mem_mib > mem_limit {
            return Err(ConfigError::MemTooLarge {
                asked: self.mem_mib,
                limit: mem_limit,
            });
        }
        if self.cpus == 0 {
            return Err(ConfigError::NoCpus);
        }
        let mut cpu_limit = host_max_cpus.min(254);
        if self.guest == GuestKind::Test {
            cpu_limit = cpu_limit.min(MAX_TEST_GUEST_CPUS);
        }
        if self.cpus > cpu_limit {
            return Err(ConfigError::TooManyCpus {
                asked: self.cpus,
                limit: cpu_limit,
            });
        }
        Ok(())
    }

    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            name: "vm1".into(),
            guest: GuestKind::Test,
            kernel: KernelSource::EmbeddedTestGuest,
            initrd: None,
            cmdline: String::new(),
            mem_mib: 256,
            cpus: 1,
            acpi: false,
            disks: vec![],
        }
    }

    #[test]
    fn limits_are_enforced() {
        let mut c = config();
        assert_eq!(c.validate(1024, 8), Ok(()));
        c.mem_mib = 0;
        assert_eq!(c.validate(1024, 8), Err(ConfigError::MemTooSmall(0)));
        c.mem_mib = 2048;
        assert!(matches!(
            c.validate(1024, 8),
            Err(ConfigError::MemTooLarge { limit: 1024, .. })
        ));
        c.mem_mib = 256;
        c.cpus = 0;
        assert_eq!(c.validate(1024, 8), Err(ConfigError::NoCpus));
        c.cpus = 9;
        assert!(matches!(
            c.validate(1024, 8),
            Err(ConfigError::TooManyCpus { limit: 8, .. })
        ));
        c.cpus = 100;
        assert!(matches!(
            c.validate(1024, 512),
            Err(ConfigError::TooManyCpus { limit: 64, .. })
        ));
    }

    #[test]
    fn names_are_checked() {
        for ok in ["a", "a-b_c.1", "A-z_0.9", "-x", "x.", &"n".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "é",
            "a\0",
            &"n".repeat(65),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
