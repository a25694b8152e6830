//! Reading a snapshot bundle back. Every check a bundle must pass before it
//! may touch a VM is here, in [`validate`], used by both revert and
//! restore: a revert refused here leaves the running VM exactly as it was.

use super::chain::{self, ChainError, MemoryChain};
use std::path::{Path, PathBuf};

use super::format::read_state_file_summed;
use super::state::{
    feature_leaves, missing_cpu_features, CpuidFeatures, Manifest, StoredState, MANIFEST_VERSION,
    MEMORY_FILE, PVM_HOST_KIND, STATE_FILE,
};
use super::store::{read_manifest, StoreError};
use crate::config::VmConfig;

/// A bundle that passed [`validate`]: its memory layers are open (and
/// checked), so what was checked is what gets read.
pub struct Bundle<S> {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub state: S,
    pub memory: MemoryChain,
}

/// Where a bundle is about to be loaded.
pub struct Target<'a> {
    /// This host's kind, as a manifest names it (`HostIdentity::kind`).
    pub host_kind: String,
    /// The CPU features a guest can be given on this host.
    pub offered: Vec<CpuidFeatures>,
    /// The TSC frequency the target's vCPUs run at (a revert) or get (a
    /// restore), when KVM says.
    pub tsc_khz: Option<u32>,
    /// Whether a restore can run the guest's TSC at its saved rate here.
    pub can_scale_tsc: bool,
    /// The VM a revert rewrites in place; None for a restore.
    pub running: Option<Running<'a>>,
}

pub struct Running<'a> {
    pub config: &'a VmConfig,
    pub disks: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{0} is not a snapshot directory")]
    NotADirectory(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "snapshot {dir} has format version {found}, this rewind reads version {MANIFEST_VERSION}"
    )]
    Version { dir: String, found: u32 },
    #[error("snapshot {dir} is corrupt: {STATE_FILE} does not match its manifest ({what})")]
    StateMismatch { dir: String, what: String },
    #[error("snapshot {dir} is incomplete: {MEMORY_FILE} is missing")]
    MemoryMissing { dir: String },
    #[error("snapshot {dir}: cannot open {MEMORY_FILE}: {source}")]
    MemoryOpen { dir: String, source: std::io::Error },
    #[error("snapshot {dir} is corrupt: {MEMORY_FILE} is {found} bytes, expected {expected} (truncated or from another VM)")]
    MemoryLength {
        dir: String,
        found: u64,
        expected: u64,
    },
    #[error(transparent)]
    MemoryChain(ChainError),
    #[error("snapshot {dir} is corrupt: {what}")]
    Inconsistent { dir: String, what: String },
    #[error("snapshot {dir}: disk {index}: {reason}")]
    Disk {
        dir: String,
        index: usize,
        reason: String,
    },
    #[error("snapshot {dir} is of a VM with {theirs}, this one has {ours}: use rewind restore")]
    OtherMachine {
        dir: String,
        theirs: String,
        ours: String,
    },
    #[error("snapshot {dir} was taken on a {found:?} KVM host, this is a {current:?} host: a guest set up for {found:?} may run instructions this host cannot; boot it here instead")]
    HostKind {
        dir: String,
        found: String,
        current: String,
    },
    #[error("snapshot {dir} needs CPU features this host lacks: {features} (taken on {model:?})")]
    CpuFeatures {
        dir: String,
        features: String,
        model: String,
    },
    #[error("snapshot {dir}: its guest's TSC runs at {saved} kHz, this host's at {host} kHz{how}")]
    Tsc {
        dir: String,
        saved: u32,
        host: u32,
        how: &'static str,
    },
}

/// A bundle's manifest and state, each checked on its own and against the
/// other (what `snapshot info` needs; [`validate`] checks the rest).
pub fn load<S: StoredState>(dir: &Path) -> Result<(Manifest, S), BundleError> {
    let name = dir.display().to_string();
    if !dir.is_dir() {
        return Err(BundleError::NotADirectory(name));
    }
    let manifest = read_manifest(dir)?;
    if manifest.version != MANIFEST_VERSION {
        return Err(BundleError::Version {
            dir: name,
            found: manifest.version,
        });
    }
    // The file's own header (magic, version, length, CRC) first: its errors
    // say more than a mismatch with the manifest would.
    let (state, len, crc): (S, u64, u64) =
        read_state_file_summed(&dir.join(STATE_FILE)).map_err(StoreError::from)?;
    if len != manifest.state_bytes {
        return Err(BundleError::StateMismatch {
            dir: name,
            what: format!("{len} bytes, state_bytes says {}", manifest.state_bytes),
        });
    }
    if crc != manifest.state_crc64 {
        return Err(BundleError::StateMismatch {
            dir: name,
            what: format!(
                "CRC-64 {crc:#018x}, state_crc64 says {:#018x}",
                manifest.state_crc64
            ),
        });
    }
    Ok((manifest, state))
}

/// Checks everything about the bundle in `dir` that can be checked without
/// touching the target VM: files, lengths, checksums, internal consistency,
/// disk layers, this host, and (for a revert) the running VM's shape.
pub fn validate<S: StoredState>(dir: &Path, target: &Target) -> Result<Bundle<S>, BundleError> {
    let (manifest, state) = load::<S>(dir)?;
    let config = state.config();
    let vcpus = state.vcpus();
    let disks = state.disk_layers();
    let name = || dir.display().to_string();
    let inconsistent = |what: String| BundleError::Inconsistent { dir: name(), what };

    let expected = crate::memory::ram_end(config.mem_bytes());
    if manifest.memory_file_len != expected {
        return Err(inconsistent(format!(
            "the manifest's memory_file_len {} is not that of a {} MiB VM ({expected})",
            manifest.memory_file_len, config.mem_mib
        )));
    }
    let memory = chain::open(dir, expected).map_err(|e| match e {
        ChainError::Missing { dir } => BundleError::MemoryMissing { dir },
        ChainError::Open { dir, source } => BundleError::MemoryOpen { dir, source },
        ChainError::Length {
            dir,
            found,
            expected,
        } => BundleError::MemoryLength {
            dir,
            found,
            expected,
        },
        other => BundleError::MemoryChain(other),
    })?;
    if vcpus.len() != config.cpus as usize {
        return Err(inconsistent(format!(
            "{} vCPU states for {} vCPUs",
            vcpus.len(),
            config.cpus
        )));
    }
    for (index, &(base, frozen)) in disks.iter().enumerate() {
        let disk_err = |reason: String| BundleError::Disk {
            dir: name(),
            index,
            reason,
        };
        // Layer names are relative to the snapshot directory (it can move).
        let layer = super::bundle::layer_path(dir, frozen);
        if !layer.is_file() {
            return Err(disk_err(format!(
                "its layer {} is missing",
                layer.display()
            )));
        }
        base.verify().map_err(|e| disk_err(e.to_string()))?;
    }

    check_host(dir, &manifest, &vcpus, target)?;
    if let Some(run) = &target.running {
        let shape = |c: &VmConfig, disks: usize| {
            format!("{} MiB, {} vCPUs and {disks} disks", c.mem_mib, c.cpus)
        };
        let (theirs, ours) = (shape(config, disks.len()), shape(run.config, run.disks));
        if theirs != ours {
            return Err(BundleError::OtherMachine {
                dir: name(),
                theirs,
                ours,
            });
        }
    }
    // The manifest's figure (readable, what a user sees) and every vCPU's.
    let rates = vcpus.iter().map(|&(_, tsc_khz)| tsc_khz);
    for saved in std::iter::once(manifest.host.tsc_khz).chain(rates) {
        if tsc_differs(saved, target.tsc_khz) {
            let how = if target.running.is_some() {
                ": a revert cannot change it, use rewind restore"
            } else if target.can_scale_tsc {
                continue;
            } else {
                " and KVM here cannot scale it"
            };
            return Err(tsc_error(dir, saved, target.tsc_khz, how));
        }
    }
    Ok(Bundle {
        dir: dir.to_path_buf(),
        manifest,
        state,
        memory,
    })
}

/// The host kind and the CPU features the guest was given, as the manifest
/// records them and as the vCPU states in state.bin hold them.
fn check_host(
    dir: &Path,
    manifest: &Manifest,
    vcpus: &[(&[kvm_bindings::kvm_cpuid_entry2], Option<u32>)],
    target: &Target,
) -> Result<(), BundleError> {
    let current = &target.host_kind;
    let found = &manifest.host.kind;
    // A guest set up for PVM (features hidden, quirks on) runs anywhere;
    // one set up for hardware KVM may rely on what PVM cannot emulate.
    if found != current && found != PVM_HOST_KIND {
        return Err(BundleError::HostKind {
            dir: dir.display().to_string(),
            found: found.clone(),
            current: current.clone(),
        });
    }
    let given: Vec<_> = vcpus
        .iter()
        .map(|&(cpuid, _)| feature_leaves(cpuid))
        .collect();
    let mut needed: Vec<&[_]> = vec![&manifest.host.cpu_features];
    needed.extend(given.iter().map(Vec::as_slice));
    let missing = missing_cpu_features(&needed, &target.offered);
    if !missing.is_empty() {
        return Err(BundleError::CpuFeatures {
            dir: dir.display().to_string(),
            features: missing.join(", "),
            model: manifest.host.cpu_model.clone(),
        });
    }
    Ok(())
}

/// KVM itself leaves a guest's TSC unscaled within 250 ppm of the host's.
const TSC_TOLERANCE_PPM: u64 = 250;

/// True when a guest whose TSC ran at `saved` kHz would see time run at a
/// different rate on a vCPU running at `host` kHz.
pub fn tsc_differs(saved: Option<u32>, host: Option<u32>) -> bool {
    match (saved, host) {
        (Some(s), Some(h)) => {
            u64::from(s.abs_diff(h)) * 1_000_000 > u64::from(h) * TSC_TOLERANCE_PPM
        }
        _ => false,
    }
}

pub fn tsc_error(
    dir: &Path,
    saved: Option<u32>,
    host: Option<u32>,
    how: &'static str,
) -> BundleError {
    BundleError::Tsc {
        dir: dir.display().to_string(),
        saved: saved.unwrap_or(0),
        host: host.unwrap_or(0),
        how,
    }
}

#[cfg(test)]
mod tests {
    use super::tsc_differs;

    #[test]
    fn tsc_tolerance_is_250_ppm() {
        assert!(!tsc_differs(Some(2_000_000), Some(2_000_400)));
        assert!(tsc_differs(Some(2_000_000), Some(2_001_000)));
        assert!(!tsc_differs(None, Some(2_000_000)));
    }
}
