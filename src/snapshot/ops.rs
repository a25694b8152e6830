//! Reading a snapshot bundle back, with one clear error for each way it can
//! be broken.

use std::path::Path;

use super::format::read_state_file;
use super::state::{MachineState, Manifest, MANIFEST_VERSION, MEMORY_FILE, STATE_FILE};
use super::store::{read_manifest, StoreError};
use crate::vmm::VmmError;

pub fn load(dir: &Path) -> Result<(Manifest, MachineState), VmmError> {
    if !dir.is_dir() {
        return Err(VmmError::Snapshot(format!(
            "{} is not a snapshot directory",
            dir.display()
        )));
    }
    let manifest = read_manifest(dir)?;
    if manifest.version != MANIFEST_VERSION {
        return Err(VmmError::Snapshot(format!(
            "snapshot {} has format version {}, this rewind reads version {MANIFEST_VERSION}",
            dir.display(),
            manifest.version
        )));
    }
    let state: MachineState = read_state_file(&dir.join(STATE_FILE)).map_err(StoreError::from)?;
    if !dir.join(MEMORY_FILE).is_file() {
        return Err(VmmError::Snapshot(format!(
            "snapshot {} is incomplete: {MEMORY_FILE} is missing",
            dir.display()
        )));
    }
    Ok((manifest, state))
}
