//! The machine state a snapshot carries, owned beside the devices it
//! describes (Firecracker's pattern), and the one path that applies it.
//!
//! Restore, revert and the boot cache (and later fuzz resets) all end in
//! [`Vmm::apply_state`]: "restore from a file" is "build the VM from the
//! stored config, then apply in place", the same step a revert takes on a
//! running VM. Memory and disk layers are put in place by the caller first
//! (a restore maps memory and attaches disks while building; a revert
//! copies pages back and swaps overlays), since how differs and what does
//! not.

use std::path::{Path, PathBuf};
use std::sync::mpsc::channel;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::disks::DiskSnapshot;
use super::{Devices, Vmm, VmmError};
use crate::config::VmConfig;
use crate::devices::acpi_pm::AcpiPmState;
use crate::devices::bus::lock;
use crate::devices::debug_console::DebugConsoleState;
use crate::devices::exit_port::ExitPortState;
use crate::devices::i8042::I8042State;
use crate::devices::serial::UartState;
use crate::devices::virtio::MmioState;
use crate::disk::BaseIdentity;
use crate::kvm::vcpu_state::{self, VcpuState};
use crate::kvm::vm::VmState;
use crate::snapshot::ops::BundleError;
use crate::snapshot::state::StoredState;
use crate::snapshot::store::StoreError;
use crate::snapshot::Persist;

/// Everything but memory. Order of apply: VM (irqchips, PIT, clock), then
/// vCPUs, then devices (a UART re-raising its interrupt needs the irqchip).
pub struct MachineState {
    pub config: VmConfig,
    /// What the capturing host's KVM offered (`KVM_GET_SUPPORTED_CPUID`),
    /// for the record: a guest relies only on its vCPUs' own CPUID, which
    /// is what a restore host is checked against (see snapshot/ops.rs).
    pub host_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

/// One field per member of `Devices`: both sides destructure, so a device
/// added there and left out here does not compile (com2 once was left out:
/// a restored guest's agent never got another interrupt).
#[derive(Clone)]
pub struct DevicesState {
    pub com1: UartState,
    pub com2: UartState,
    pub acpi_pm: AcpiPmState,
    pub i8042: I8042State,
    pub exit_port: ExitPortState,
    pub debug_console: DebugConsoleState,
    /// In disk order.
    pub disks: Vec<DiskState>,
}

/// One disk: the layer its live overlay sits on, and its virtio transport.
#[derive(Clone)]
pub struct DiskState {
    pub layer: DiskSnapshot,
    pub transport: MmioState,
}

impl StoredState for MachineState {
    fn config(&self) -> &VmConfig {
        &self.config
    }

    fn vcpus(&self) -> Vec<(&[kvm_bindings::kvm_cpuid_entry2], Option<u32>)> {
        self.vcpus
            .iter()
            .map(|v| (v.cpuid.as_slice(), v.tsc_khz))
            .collect()
    }

    fn disk_layers(&self) -> Vec<(&BaseIdentity, &Path)> {
        let disks = &self.devices.disks;
        disks
            .iter()
            .map(|d| (&d.layer.base, d.layer.frozen.as_path()))
            .collect()
    }

    fn disk_layers_mut(&mut self) -> Vec<&mut PathBuf> {
        let disks = &mut self.devices.disks;
        disks.iter_mut().map(|d| &mut d.layer.frozen).collect()
    }
}

impl Persist for Devices {
    type State = DevicesState;

    fn save(&self) -> DevicesState {
        let Devices {
            com1,
            com2,
            acpi_pm,
            i8042,
            exit_port,
            debug_console,
            disks,
        } = self;
        DevicesState {
            com1: lock(com1).save(),
            com2: lock(com2).save(),
            acpi_pm: lock(acpi_pm).save(),
            i8042: lock(i8042).save(),
            exit_port: lock(exit_port).save(),
            debug_console: lock(debug_console).save(),
            disks: disks
                .iter()
                .map(|d| DiskState {
                    layer: DiskSnapshot {
                        base: d.base.clone(),
                        frozen: d.layer.clone(),
                        size: lock(&d.disk).size(),
                    },
                    transport: lock(&d.transport).save(),
                })
                .collect(),
        }
    }

    /// Device registers only: the disks' layers were put in place by the
    /// caller (see the top of this file).
    fn restore(&mut self, state: &DevicesState) -> Result<(), String> {
        let Devices {
            com1,
            com2,
            acpi_pm,
            i8042,
            exit_port,
            debug_console,
            disks,
        } = self;
        let DevicesState {
            com1: com1_state,
            com2: com2_state,
            acpi_pm: acpi_pm_state,
            i8042: i8042_state,
            exit_port: exit_port_state,
            debug_console: debug_console_state,
            disks: disk_states,
        } = state;
        lock(com1).restore(com1_state)?;
        lock(com2).restore(com2_state)?;
        lock(acpi_pm).restore(acpi_pm_state)?;
        lock(i8042).restore(i8042_state)?;
        lock(exit_port).restore(exit_port_state)?;
        lock(debug_console).restore(debug_console_state)?;
        if disk_states.len() != disks.len() {
            return Err(format!(
                "snapshot has {} disks, this VM has {}",
                disk_states.len(),
                disks.len()
            ));
        }
        for (disk, s) in disks.iter().zip(disk_states) {
            lock(&disk.transport).restore(&s.transport)?;
        }
        Ok(())
    }
}

impl Vmm {
    /// The whole machine but memory. The vCPUs must be paused (in-flight
    /// I/O completed), or the state would be torn.
    pub fn save_state(&self) -> Result<MachineState, VmmError> {
        if !self.paused {
            return Err(VmmError::Snapshot(
                "the VM must be paused to save its state".into(),
            ));
        }
        Ok(MachineState {
            config: self.config.clone(),
            host_cpuid: self.vm.supported_cpuid.as_slice().to_vec(),
            vm: self.vm.save_state()?,
            vcpus: self.capture_vcpus()?,
            devices: self.devices.save(),
        })
    }

    /// Applies `state` (validated by `snapshot::ops::validate`) to this
    /// paused VM in place. VM-wide state before the vCPUs' (the irqchips
    /// must be in their saved state before LAPICs and pending events go on
    /// top; see vcpu_state.rs for the order within a vCPU), devices last.
    pub(crate) fn apply_state(&mut self, state: &MachineState) -> Result<(), VmmError> {
        let MachineState {
            config: _,
            host_cpuid: _,
            vm,
            vcpus,
            devices,
        } = state;
        self.vm.restore_state(vm)?;
        for (handle, vstate) in self.vcpus.iter().zip(vcpus) {
            let index = handle.index;
            let vstate = vstate.clone();
            handle.run_task(Box::new(move |fd| {
                let refused = vcpu_state::apply(fd, &vstate).map_err(|e| e.to_string())?;
                report_refused_msrs(index, &refused);
                Ok(())
            }))?;
        }
        self.devices.restore(devices).map_err(VmmError::Snapshot)?;
        self.kick_disks();
        Ok(())
    }

    fn capture_vcpus(&self) -> Result<Vec<VcpuState>, VmmError> {
        let mut states = Vec::with_capacity(self.vcpus.len());
        for handle in &self.vcpus {
            let (tx, rx) = channel();
            let msrs = self.msr_indices.clone();
            let has_xsave = self.has_xsave;
            let index = handle.index as u32;
            handle.run_task(Box::new(move |fd| {
                let state =
                    vcpu_state::capture(fd, index, &msrs, has_xsave).map_err(|e| e.to_string())?;
                tx.send(state)
                    .map_err(|_| "capture receiver gone".to_string())
            }))?;
            states.push(
                rx.recv()
                    .map_err(|_| VmmError::Snapshot("vCPU state was not delivered".to_string()))?,
            );
        }
        Ok(states)
    }

    /// After a restore the guest may have queued requests whose notification
    /// went to the old eventfd: process every queue once and re-signal.
    fn kick_disks(&self) {
        for d in &self.devices.disks {
            lock(&d.transport).kick_after_restore();
        }
    }
}

/// KVM refusing an MSR it listed is unusual; say so rather than hide it.
fn report_refused_msrs(index: usize, refused: &[u32]) {
    if !refused.is_empty() {
        let list: Vec<String> = refused.iter().map(|m| format!("{m:#x}")).collect();
        eprintln!(
            "rewind: vCPU {index}: KVM refused to restore MSRs {} (left at their reset values)",
            list.join(", ")
        );
    }
}

impl From<BundleError> for VmmError {
    fn from(e: BundleError) -> VmmError {
        match e {
            // Keeps "no such snapshot" a 404.
            BundleError::Store(s @ StoreError::NotFound { .. }) => VmmError::Store(s),
            other => VmmError::Bundle(other),
        }
    }
}

// state.bin keeps the layout of format version 1, where the disks' virtio
// transports and layers were two sequences: the in-memory one `Vec` is
// written as those two, and read back only when they pair up.

#[derive(Serialize)]
struct MachineOut<'a> {
    config: &'a VmConfig,
    host_cpuid: &'a [kvm_bindings::kvm_cpuid_entry2],
    vm: &'a VmState,
    vcpus: &'a [VcpuState],
    devices: DevicesOut<'a>,
    disks: Vec<&'a DiskSnapshot>,
}

#[derive(Serialize)]
struct DevicesOut<'a> {
    com1: &'a UartState,
    com2: &'a UartState,
    acpi_pm: &'a AcpiPmState,
    i8042: &'a I8042State,
    exit_port: &'a ExitPortState,
    debug_console: &'a DebugConsoleState,
    virtio: Vec<&'a MmioState>,
}

#[derive(Deserialize)]
struct MachineIn {
    config: VmConfig,
    host_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    devices: DevicesIn,
    disks: Vec<DiskSnapshot>,
}

#[derive(Deserialize)]
struct DevicesIn {
    com1: UartState,
    com2: UartState,
    acpi_pm: AcpiPmState,
    i8042: I8042State,
    exit_port: ExitPortState,
    debug_console: DebugConsoleState,
    virtio: Vec<MmioState>,
}

impl Serialize for MachineState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let d = &self.devices;
        MachineOut {
            config: &self.config,
            host_cpuid: &self.host_cpuid,
            vm: &self.vm,
            vcpus: &self.vcpus,
            devices: DevicesOut {
                com1: &d.com1,
                com2: &d.com2,
                acpi_pm: &d.acpi_pm,
                i8042: &d.i8042,
                exit_port: &d.exit_port,
                debug_console: &d.debug_console,
                virtio: d.disks.iter().map(|d| &d.transport).collect(),
            },
            disks: d.disks.iter().map(|d| &d.layer).collect(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for MachineState {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let m = MachineIn::deserialize(de)?;
        let d = m.devices;
        if d.virtio.len() != m.disks.len() {
            return Err(serde::de::Error::custom(format!(
                "{} virtio states for {} disks",
                d.virtio.len(),
                m.disks.len()
            )));
        }
        let disks = m
            .disks
            .into_iter()
            .zip(d.virtio)
            .map(|(layer, transport)| DiskState { layer, transport })
            .collect();
        Ok(MachineState {
            config: m.config,
            host_cpuid: m.host_cpuid,
            vm: m.vm,
            vcpus: m.vcpus,
            devices: DevicesState {
                com1: d.com1,
                com2: d.com2,
                acpi_pm: d.acpi_pm,
                i8042: d.i8042,
                exit_port: d.exit_port,
                debug_console: d.debug_console,
                disks,
            },
        })
    }
}
