//! What the VMM answers to a [`Command`]: typed replies and [`VmmError`]s.
//! How they look on the wire (status codes, JSON) is the control socket's
//! business (`control::reply`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::exec::{ExecCallback, Waiter};
use super::{RevertReport, SnapshotReport, Vmm, VmmError, DEFAULT_EXEC_TIMEOUT};
use crate::config::KernelSource;
use crate::control::Command;
use crate::devices::bus::lock;
use crate::snapshot::state::Manifest;
use crate::snapshot::store::{self, DeleteReport};

/// The answer to one command, one variant per command.
#[derive(Debug)]
pub enum Reply {
    Vm(VmInfo),
    /// The VM stops once this is delivered.
    Stopped,
    Paused {
        pause: Duration,
    },
    Running,
    SnapshotCreated(SnapshotReport),
    Reverted(RevertReport),
    /// The store's own listing (`store::list_json`), which the CLI prints
    /// too when no VM runs: one shape whoever answers.
    Snapshots(serde_json::Value),
    Snapshot(Box<Manifest>),
    SnapshotDeleted {
        name: String,
        report: DeleteReport,
    },
}

/// `GET /vm`.
#[derive(Debug, Serialize)]
pub struct VmInfo {
    pub name: String,
    pub state: &'static str,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub pid: u32,
    pub uptime_ms: u64,
    pub kernel: String,
    pub host: String,
    pub baseline: Option<String>,
    pub disks: Vec<String>,
}

impl Vmm {
    fn describe(&self) -> VmInfo {
        let kernel = match &self.config.kernel {
            KernelSource::EmbeddedTestGuest => "embedded test guest".to_string(),
            KernelSource::File(p) => p.display().to_string(),
        };
        VmInfo {
            name: self.config.name.clone(),
            state: if self.paused { "paused" } else { "running" },
            vcpus: self.config.cpus,
            mem_mib: self.config.mem_mib,
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            kernel,
            host: format!("{:?}", self.host).to_lowercase(),
            baseline: self.baseline.as_ref().map(|p| p.display().to_string()),
            disks: self
                .devices
                .disks
                .iter()
                .map(|d| lock(&d.disk).path().display().to_string())
                .collect(),
        }
    }

    /// Carries out one command other than `Exec` (which answers later,
    /// see [`Vmm::start_exec`]).
    pub fn handle_command(&mut self, cmd: Command) -> Result<Reply, VmmError> {
        // These read or change the store or memory a running live
        // snapshot's writer is still producing: it finishes first.
        if !matches!(
            cmd,
            Command::GetVm | Command::Pause | Command::Resume | Command::SnapshotList
        ) {
            self.settle_snapshot();
        }
        Ok(match cmd {
            Command::GetVm => Reply::Vm(self.describe()),
            Command::Stop => Reply::Stopped,
            Command::Exec { .. } => return Err(VmmError::ExecElsewhere),
            Command::Pause => Reply::Paused {
                pause: self.pause()?,
            },
            Command::Resume => {
                self.resume()?;
                Reply::Running
            }
            Command::SnapshotCreate { name, paused, full } => {
                Reply::SnapshotCreated(self.snapshot_create(name, paused, full)?)
            }
            Command::SnapshotRevert { name } => Reply::Reverted(self.revert(&name)?),
            Command::SnapshotList => Reply::Snapshots(store::list_json(Some(&self.config.name))),
            Command::SnapshotInfo { name } => {
                let manifest = store::read_manifest(&self.find_snapshot(&name)?)
                    .map_err(VmmError::SnapshotLookup)?;
                Reply::Snapshot(Box::new(manifest))
            }
            Command::SnapshotDelete { name } => {
                let dir = self.find_snapshot(&name)?;
                if self.baseline.as_deref() == Some(dir.as_path()) {
                    self.baseline = None;
                }
                let report = store::delete_with_layers(&dir).map_err(VmmError::SnapshotDelete)?;
                Reply::SnapshotDeleted { name, report }
            }
        })
    }

    fn find_snapshot(&self, name: &str) -> Result<PathBuf, VmmError> {
        store::resolve(name, Some(&self.config.name)).map_err(VmmError::SnapshotLookup)
    }

    /// Whether this VM's guest has an agent to run commands.
    pub fn can_exec(&self) -> Result<(), VmmError> {
        if self.config.guest.has_agent() {
            Ok(())
        } else {
            Err(VmmError::NoAgent(self.config.name.clone()))
        }
    }

    /// Runs `cmd` in the guest through its agent; `tell` gets the result
    /// when it ends.
    pub fn start_exec(&mut self, cmd: String, timeout_s: Option<u64>, tell: ExecCallback) {
        let timeout = timeout_s
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_EXEC_TIMEOUT);
        self.exec
            .start(cmd, timeout, Waiter::Api(tell), &self.devices.com2);
    }
}
