//! Building a VM: one sequence of steps for a fresh boot and for a restore
//! from a snapshot. A restore is "build from the stored config, then restore
//! in place", the same in-place path a revert uses.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::VcpuFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disks::{self, DiskSetupError};
use super::{io_err, Devices, RunOptions, Vmm, VmmError};
use crate::arch::host::{host_mem_mib, HostKind};
use crate::arch::layout::{
    self, COM1_BASE, COM1_IRQ, COM2_BASE, COM2_IRQ, EXIT_PORT, I8042_BASE, SLEEP_CONTROL_PORT,
};
use crate::arch::{boot, cpuid, loader};
use crate::config::VmConfig;
use crate::console::Console;
use crate::devices::acpi_pm::{AcpiPm, ACPI_PM_LEN};
use crate::devices::bus::lock;
use crate::devices::debug_console::DebugConsole;
use crate::devices::exit_port::ExitPort;
use crate::devices::i8042::{I8042, I8042_LEN};
use crate::devices::serial::{Inbox, SerialDevice, SerialOut, UartEvents, UART_LEN};
use crate::devices::Bus;
use crate::events::vm_event_channel;
use crate::guest::GuestKind;
use crate::kvm::vcpu::{register_kick_handler, VcpuContext, VcpuHandle};
use crate::kvm::vm::{kvm_err, Vm};
use crate::memory::{self, GuestMemory};
use crate::snapshot;

impl Vmm {
    /// Boots `config` from its kernel; vCPUs are created paused.
    pub fn boot(mut config: VmConfig, opts: &RunOptions) -> Result<Vmm, VmmError> {
        let vm = Vm::new()?;
        config.validate(host_mem_mib(), vm.max_vcpus())?;
        let host = HostKind::detect();
        if config.guest == GuestKind::Linux {
            if let Some(extra) = host.linux_cmdline_quirks() {
                eprintln!("rewind: PVM host: adding to the kernel command line: {extra}");
                config.cmdline = add_kernel_params(&config.cmdline, &extra);
            }
        }
        let mut lowers = Vec::new();
        for base in &mut config.disks {
            let identity = crate::disk::BaseIdentity::capture(base)
                .map_err(|e| VmmError::Disk(DiskSetupError::Disk(e)))?;
            // Library callers may pass relative paths; the overlay stores this one.
            *base = identity.path.clone();
            lowers.push((identity, base.clone()));
        }
        let mmio_devices: Vec<_> = (0..lowers.len()).map(disks::mmio_device).collect();
        if config.guest == GuestKind::Linux && !mmio_devices.is_empty() {
            config.cmdline =
                add_kernel_params(&config.cmdline, &disks::cmdline_devices(&mmio_devices));
        }
        let mem = memory::create_guest_memory(config.mem_bytes())?;
        let rsdp = if config.guest == GuestKind::Linux {
            crate::arch::mptable::write_mptable(&mem, config.cpus)
                .map_err(|e| VmmError::Snapshot(e.to_string()))?;
            if config.acpi {
                Some(
                    crate::arch::acpi::write_tables(&mem, config.cpus, &mmio_devices)
                        .map_err(|e| VmmError::Snapshot(e.to_string()))?,
                )
            } else {
                None
            }
        } else {
            None
        };
        let loaded = loader::load_kernel(&mem, &config, rsdp)?;
        boot::write_boot_tables(&mem, config.mem_bytes())?;
        let cpus = config.cpus;
        let guest = config.guest;
        let mut vmm = Vmm::assemble(
            vm,
            config,
            mem,
            opts,
            None,
            lowers,
            |index, fd, supported| {
                let mut cpuid = cpuid::for_vcpu(supported, index as u32, cpus);
                if guest == GuestKind::Linux && host == HostKind::Pvm {
                    cpuid::hide_unemulated(&mut cpuid);
                }
                fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
                boot::set_boot_msrs(fd)?;
                boot::set_lint(fd)?;
                boot::set_fpu(fd)?;
                // Linux wakes its APs itself (INIT/SIPI); the test guest's APs
                // start at its entry like the boot vCPU.
                if index == 0 || guest == GuestKind::Test {
                    boot::set_long_mode_sregs(fd)?;
                    boot::set_entry_regs(fd, loaded.entry, index as u64, cpus as u64)?;
                    if index > 0 {
                        fd.set_mp_state(kvm_bindings::kvm_mp_state {
                            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
                        })
                        .map_err(kvm_err("make an AP runnable"))?;
                    }
                }
                Ok(())
            },
        )?;
        vmm.kernel_format = Some(loaded.format);
        vmm.collapse_huge_pages = true;
        Ok(vmm)
    }

    /// Restores the snapshot in `dir` into a new VM named `name`: built from
    /// the stored config with memory mapped copy-on-write from the snapshot
    /// and disks on its frozen layers, then the state applied in place.
    pub fn restore(dir: &Path, name: &str, opts: &RunOptions) -> Result<Vmm, VmmError> {
        let started = Instant::now();
        let vm = Vm::new()?;
        let host = HostKind::detect();
        let target = snapshot::ops::Target {
            host_kind: super::host_identity::host_kind_name(host),
            offered: super::host_identity::host_features(host, vm.supported_cpuid.as_slice()),
            tsc_khz: vm.tsc_khz(),
            can_scale_tsc: vm.can_scale_tsc(),
            running: None,
        };
        let snapshot::ops::Bundle {
            state,
            memory,
            manifest,
            ..
        } = snapshot::ops::validate::<super::MachineState>(dir, &target)?;
        let mut config = state.config.clone();
        config.name = name.to_string();
        config.validate(host_mem_mib(), vm.max_vcpus())?;
        // The full layer and the incremental layers' long runs are mapped
        // copy-on-write (read lazily, shared by clones), before KVM sees the
        // memory; short runs are copied in.
        let mem = snapshot::mapping::map(&memory, config.mem_bytes())
            .map_err(|e| VmmError::Snapshot(e.to_string()))?;
        let populated = memory.data_bitmap(&mem);
        let lowers = state
            .devices
            .disks
            .iter()
            .map(|d| {
                let layer = &d.layer;
                (
                    layer.base.clone(),
                    snapshot::bundle::layer_path(dir, &layer.frozen),
                )
            })
            .collect();
        let saved_tsc: Vec<_> = state.vcpus.iter().map(|v| v.tsc_khz).collect();
        let mut vmm = Vmm::assemble(
            vm,
            config,
            mem,
            opts,
            Some(dir.to_path_buf()),
            lowers,
            |index, fd, _| {
                // A vCPU's TSC rate is set before its state: the saved TSC
                // value and deadline count in the guest's rate.
                let saved = saved_tsc[index];
                let host = fd.get_tsc_khz().ok();
                if snapshot::ops::tsc_differs(saved, host) {
                    // Only KVM_CAP_TSC_CONTROL hosts can scale a guest's TSC.
                    fd.set_tsc_khz(saved.unwrap_or(0)).map_err(|_| {
                        snapshot::ops::tsc_error(dir, saved, host, " and KVM here cannot scale it")
                    })?;
                }
                Ok(())
            },
        )?;
        vmm.apply_state(&state)?;
        vmm.wake_restored_test_guest()?;
        vmm.populated = populated;
        vmm.started = started;
        vmm.kernel_identity = Some(manifest.kernel);
        Ok(vmm)
    }

    /// A restored guest sleeps until its next timer tick, so the first line
    /// it prints says more about its tick period than about the restore. A
    /// test guest started with `resumed=1` has a gate on `RESUME_VECTOR`:
    /// one interrupt per vCPU (after the LAPICs were restored, which would
    /// clear it) makes each print `resumed` the moment it runs.
    fn wake_restored_test_guest(&self) -> Result<(), VmmError> {
        const RESUME_VECTOR: u32 = 48;
        const MSI_ADDRESS: u32 = layout::LAPIC_ADDR;
        let opted_in = self.config.kernel == crate::config::KernelSource::EmbeddedTestGuest
            && self
                .config
                .cmdline
                .split_whitespace()
                .any(|w| w == "resumed=1");
        if !opted_in {
            return Ok(());
        }
        for cpu in 0..self.config.cpus {
            // The test guest's APIC IDs are its vCPU indices.
            let msi = kvm_bindings::kvm_msi {
                address_lo: MSI_ADDRESS | (cpu << 12),
                data: RESUME_VECTOR,
                ..Default::default()
            };
            self.vm
                .fd
                .signal_msi(msi)
                .map_err(|e| VmmError::Snapshot(format!("cannot wake the restored guest: {e}")))?;
        }
        Ok(())
    }

    /// Everything but the per-vCPU setup, which `configure_vcpu` does.
    fn assemble<F>(
        vm: Vm,
        config: VmConfig,
        mem: GuestMemory,
        opts: &RunOptions,
        baseline: Option<PathBuf>,
        lowers: Vec<(crate::disk::BaseIdentity, PathBuf)>,
        mut configure_vcpu: F,
    ) -> Result<Vmm, VmmError>
    where
        F: FnMut(usize, &VcpuFd, &kvm_bindings::CpuId) -> Result<(), VmmError>,
    {
        let host = HostKind::detect();
        register_kick_handler().map_err(io_err("the vCPU kick signal"))?;
        vm.register_memory(&mem)?;
        let (events_tx, events) = vm_event_channel().map_err(io_err("the event channel"))?;
        let console = Console::new(&opts.console, opts.expect.clone(), events_tx.clone())
            .map_err(io_err("the console output"))?;
        // Only a Linux kernel's last line means it powered off; any other
        // guest may print those words and run on.
        if matches!(config.kernel, crate::config::KernelSource::File(_)) {
            console.watch_power_off_line();
        }

        let mut pio = Bus::default();
        let mut mmio = Bus::default();
        let uart = |irq_line: u32, out: SerialOut, events: UartEvents| -> Result<_, VmmError> {
            let irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("a UART interrupt"))?;
            vm.fd
                .register_irqfd(&irq, irq_line)
                .map_err(kvm_err("route a UART interrupt"))?;
            Ok(Arc::new(Mutex::new(SerialDevice::new(irq, out, events))))
        };
        let inbox = Inbox::new().map_err(io_err("the guest agent channel"))?;
        let com1_drained =
            Arc::new(EventFd::new(EFD_NONBLOCK).map_err(io_err("the console input"))?);
        let com2_drained =
            Arc::new(EventFd::new(EFD_NONBLOCK).map_err(io_err("the guest agent channel"))?);
        let vm_dir = crate::paths::vm_dir(&config.name);
        let mut vm_disks = Vec::new();
        for (index, (base, lower)) in lowers.into_iter().enumerate() {
            vm_disks.push(disks::attach(&vm.fd, &mem, &vm_dir, index, base, &lower)?);
        }
        let devices = Devices {
            disks: vm_disks,
            com1: uart(
                COM1_IRQ,
                SerialOut::Console(console.clone()),
                UartEvents {
                    drained: Some(com1_drained.clone()),
                },
            )?,
            com2: uart(
                COM2_IRQ,
                SerialOut::Inbox(inbox.clone()),
                UartEvents {
                    drained: Some(com2_drained.clone()),
                },
            )?,
            acpi_pm: Arc::new(Mutex::new(AcpiPm::new(events_tx.clone()))),
            i8042: Arc::new(Mutex::new(I8042::new(events_tx.clone()))),
            exit_port: Arc::new(Mutex::new(ExitPort::new(events_tx.clone()))),
            debug_console: Arc::new(Mutex::new(DebugConsole::new(
                mem.clone(),
                console.clone(),
                events_tx.clone(),
            ))),
        };
        pio.insert(COM1_BASE, UART_LEN, devices.com1.clone())?;
        pio.insert(COM2_BASE, UART_LEN, devices.com2.clone())?;
        pio.insert(SLEEP_CONTROL_PORT, ACPI_PM_LEN, devices.acpi_pm.clone())?;
        pio.insert(I8042_BASE, I8042_LEN, devices.i8042.clone())?;
        pio.insert(EXIT_PORT, 1, devices.exit_port.clone())?;
        for d in &devices.disks {
            let m = d.mmio();
            mmio.insert(m.base, m.size, d.transport.clone())?;
        }
        mmio.insert(
            layout::DEBUG_CONSOLE_BASE,
            layout::DEBUG_CONSOLE_SIZE,
            devices.debug_console.clone(),
        )?;

        let park = lock(&devices.debug_console).fuzz_link().park_flag();
        let mut vcpus = Vec::with_capacity(config.cpus as usize);
        let mut tsc_khz = None;
        for index in 0..config.cpus as usize {
            let fd = vm
                .fd
                .create_vcpu(index as u64)
                .map_err(kvm_err("create a vCPU"))?;
            configure_vcpu(index, &fd, &vm.supported_cpuid)?;
            if index == 0 {
                tsc_khz = fd.get_tsc_khz().ok();
            }
            let ctx = VcpuContext {
                index,
                pio: pio.clone(),
                mmio: mmio.clone(),
                mem: mem.clone(),
                events: events_tx.clone(),
                park: park.clone(),
            };
            vcpus.push(VcpuHandle::spawn(fd, ctx)?);
        }
        let msr_indices = vm.msr_indices()?;
        // At boot only what the loader wrote (vm-memory's bitmap) is non-zero.
        let populated = crate::snapshot::memory::take_vmm_dirty(&mem);
        let has_xsave = vm.has_xsave();
        Ok(Vmm {
            config,
            host,
            vm,
            mem,
            vcpus,
            devices,
            console,
            exec: super::exec::ExecLink::new(inbox),
            com2_drained,
            com1_drained,
            console_input: std::collections::VecDeque::new(),
            events,
            paused: true,
            started: Instant::now(),
            baseline,
            since_baseline: populated.iter().map(|s| vec![0; s.len()]).collect(),
            populated,
            msr_indices,
            has_xsave,
            tsc_khz,
            kernel_identity: None,
            kernel_format: None,
            // Before the VMM thread's seccomp filter, which forbids threads.
            upkeep: crate::memory::upkeep::Upkeep::start().ok(),
            collapse_huge_pages: false,
            pending: None,
        })
    }
}

/// Adds `extra` to the kernel's own parameters: before a ` -- `, whatever
/// follows it is handed to init instead of the kernel.
fn add_kernel_params(cmdline: &str, extra: &str) -> String {
    let padded = format!(" {cmdline} ");
    match padded.find(" -- ") {
        Some(i) => format!("{} {extra}{}", &padded[..i], &padded[i..])
            .trim()
            .to_string(),
        None => format!("{cmdline} {extra}").trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::add_kernel_params;

    #[test]
    fn kernel_params_go_before_init_arguments() {
        assert_eq!(
            add_kernel_params("console=ttyS0", "a=1"),
            "console=ttyS0 a=1"
        );
        assert_eq!(add_kernel_params("", "a=1"), "a=1");
        assert_eq!(
            add_kernel_params("console=ttyS0 -- single x", "a=1"),
            "console=ttyS0 a=1 -- single x"
        );
        assert_eq!(add_kernel_params("-- single", "a=1"), "a=1 -- single");
    }
}
