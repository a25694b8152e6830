//! The `rewind` command line: parses arguments, calls the library, maps
//! outcomes to exit codes (0 ok, 1 runtime failure, 2 usage, 124 timeout).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use regex::Regex;

use rewind::arch::host::HostKind;
use rewind::config::{valid_name, KernelSource, VmConfig};
use rewind::console::ConsoleTarget;
use rewind::control::{client, ControlServer};
use rewind::guest::GuestKind;
use rewind::paths;
use rewind::snapshot::{boot_cache, store};
use rewind::vmm::{RunOptions, SignalFd, Vmm, VmmError};

mod bench;
mod demo;
mod fuzz;
mod snapshot;
mod soak;
mod vms;

#[derive(Parser)]
#[command(
    name = "rewind",
    version,
    about = "A small KVM hypervisor whose reason to exist is snapshots"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Open the VM folders, snapshots, disk layers, exports and control
    /// socket this command creates to the owner's group (0750/0640, socket
    /// 0660) instead of the owner alone (0700/0600).
    #[arg(long, global = true)]
    group_access: bool,
    /// Run the VM without its seccomp filters (for debugging; see src/seccomp.rs).
    #[arg(long, global = true)]
    no_seccomp: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a guest and run it until it ends, --expect matches or --timeout passes.
    Run(RunArgs),
    /// Run CMD in a running Linux guest through its agent; exits with CMD's
    /// status, 124 when --timeout passes, 2 at once for a guest without an
    /// agent (the test guest).
    Exec {
        #[arg(long)]
        vm: String,
        cmd: String,
        /// Give up after this many seconds, counted from the request (exit 124).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// List running VMs: name, pid, state, snapshots, control socket.
    Ps {
        /// Also list stopped VMs that left a folder (they hold snapshots or disks).
        #[arg(long)]
        all: bool,
        /// One JSON array, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Remove a stopped VM's folder, snapshots and disk layers.
    Rm {
        name: String,
        /// Stop the VM first if it runs.
        #[arg(long)]
        force: bool,
    },
    /// Stop a running VM through its control socket.
    Stop {
        #[arg(long)]
        vm: String,
    },
    /// Pause every vCPU of a running VM.
    Pause {
        #[arg(long)]
        vm: String,
    },
    /// Resume a paused VM.
    Resume {
        #[arg(long)]
        vm: String,
    },
    /// Create, revert to, list, inspect and delete snapshots.
    Snapshot {
        #[command(subcommand)]
        what: snapshot::SnapshotCmd,
    },
    /// Disk images: export a snapshot's or a VM's disk as one standalone image.
    Disk {
        #[command(subcommand)]
        what: snapshot::DiskCmd,
    },
    /// Resume a snapshot in a new process (a clone, if the original still runs).
    Restore(RestoreArgs),
    /// Show the main job on the embedded test guest: boot, snapshot, revert, restore.
    Demo,
    /// Fuzz the test guest's target: a seeded mutation loop with a reset
    /// after every input; prints the crash it finds and resets per second.
    Fuzz(fuzz::FuzzArgs),
    /// Measure rewind (medians over several runs).
    Bench {
        #[command(subcommand)]
        what: bench::BenchCmd,
    },
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// A snapshot NAME (of --vm, or unique across VMs) or a PATH to a snapshot directory.
    snapshot: String,
    #[arg(long)]
    vm: Option<String>,
    /// Name of the new VM (generated when absent).
    #[arg(long)]
    name: Option<String>,
    /// Leave the restored VM paused (`rewind resume --vm NAME` or the API
    /// starts it).
    #[arg(long)]
    paused: bool,
    #[command(flatten)]
    io: IoArgs,
}

/// Console and run-end options shared by run and restore.
#[derive(clap::Args, Clone)]
pub struct IoArgs {
    /// stdio (interactive; Ctrl-A h lists hotkeys, Ctrl-A x quits), stderr, none, or a file path.
    /// Default: stdio, or stderr with --exec (stdout then carries only the
    /// command's output). A closed stdout (`| head`) ends the VM, status 141.
    #[arg(long)]
    console: Option<ConsoleTarget>,
    /// End with status 124 after this many seconds from process start (boot
    /// included). With --exec the default is 600.
    #[arg(long)]
    timeout: Option<f64>,
    /// End with status 0 at the first console line matching this regex.
    #[arg(long)]
    expect: Option<String>,
    /// Linux guests: run CMD through the guest agent once it is up, stream
    /// its output, end with its exit status (124 when --timeout passes).
    #[arg(long)]
    exec: Option<String>,
    /// The interactive console's hotkey prefix: ^X / ctrl-X, a character
    /// code as QEMU's -echr, or none (every key goes to the guest).
    /// Default Ctrl-A; Ctrl-A h lists the hotkeys.
    #[arg(long, value_name = "KEY")]
    escape: Option<String>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum GuestArg {
    /// The embedded test guest.
    Test,
    /// The microvm Linux kernel and busybox initramfs (built on first use).
    Linux,
    /// Debian's stock cloud kernel and its initramfs (built on first use).
    LinuxStock,
}

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// Which guest: the embedded test guest, or a Linux kernel (--kernel).
    #[arg(long, value_enum, default_value = "test")]
    guest: GuestArg,
    /// A vmlinux ELF or bzImage to boot instead of the embedded test guest.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// An initramfs file, or a directory packed on the fly as a newc cpio.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The whole kernel command line (replaces the default).
    #[arg(long, conflicts_with = "append")]
    cmdline: Option<String>,
    /// Appended to the default command line.
    #[arg(long)]
    append: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// A disk image (raw or qcow2; repeatable). It is never written: the guest
    /// writes into a qcow2 overlay in the VM's directory.
    #[arg(long = "disk")]
    disks: Vec<PathBuf>,
    /// Linux guests: boot with the first disk as the root filesystem.
    #[arg(long)]
    root: bool,
    /// Linux guests: no ACPI tables (the MP table and command-line virtio
    /// devices describe the machine).
    #[arg(long)]
    no_acpi: bool,
    /// VM name (directory and control socket under $REWIND_HOME/vms/NAME).
    #[arg(long)]
    name: Option<String>,
    /// Restore this exact guest from the boot cache if it was booted before
    /// (snapshot taken at REWIND-READY); otherwise boot and fill the cache.
    #[arg(long)]
    boot_cache: bool,
    #[command(flatten)]
    io: IoArgs,
}

/// ttyS0 is the console; two UARTs only, so boot does not probe four;
/// reboot through the i8042 (which ends the VM); never hang on panic.
const LINUX_DEFAULT_CMDLINE: &str =
    "console=ttyS0 8250.nr_uarts=2 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.nopnp";

/// A usage error (exit 2) or a runtime error (exit 1), printed as one line.
pub(crate) enum Failure {
    Usage(String),
    Runtime(String),
    /// A command's time limit passed (exit 124, as `run --timeout`).
    Timeout(String),
}

impl From<VmmError> for Failure {
    fn from(e: VmmError) -> Self {
        use rewind::disk::DiskError;
        use rewind::vmm::disks::DiskSetupError;
        match e {
            VmmError::Config(_)
            | VmmError::Load(_)
            | VmmError::Bundle(_)
            | VmmError::Disk(DiskSetupError::Disk(
                DiskError::BaseMissing { .. } | DiskError::BaseChanged { .. },
            )) => Failure::Usage(e.to_string()),
            other => Failure::Runtime(other.to_string()),
        }
    }
}

fn build_config(args: &RunArgs) -> Result<VmConfig, Failure> {
    let name = match &args.name {
        Some(n) if !valid_name(n) => {
            return Err(Failure::Usage(format!(
                "invalid VM name {n:?}: use 1-64 characters of A-Z a-z 0-9 . _ - (not starting with '.')"
            )))
        }
        Some(n) => n.clone(),
        None => paths::generate_name(),
    };
    let mut default_initrd = None;
    let (guest, kernel, default_cmdline) = match (&args.kernel, args.guest) {
        (Some(k), _) => (
            GuestKind::Linux,
            KernelSource::File(k.clone()),
            LINUX_DEFAULT_CMDLINE,
        ),
        (None, GuestArg::Test) => (GuestKind::Test, KernelSource::EmbeddedTestGuest, ""),
        (None, GuestArg::Linux | GuestArg::LinuxStock) => {
            let images =
                rewind::images::linux_images().map_err(|e| Failure::Runtime(e.to_string()))?;
            let (kernel, initrd) = if args.guest == GuestArg::Linux {
                (images.microvm(), images.initramfs())
            } else {
                (images.stock(), images.initramfs_stock())
            };
            // Booting from a disk: an initramfs would run instead of the disk's init.
            if !args.root {
                default_initrd = Some(initrd);
            }
            (
                GuestKind::Linux,
                KernelSource::File(kernel),
                LINUX_DEFAULT_CMDLINE,
            )
        }
    };
    if guest == GuestKind::Test && args.initrd.is_some() {
        return Err(Failure::Usage("--initrd needs --kernel".into()));
    }
    if args.root && (guest != GuestKind::Linux || args.disks.is_empty()) {
        return Err(Failure::Usage("--root needs --kernel and a --disk".into()));
    }
    let root = if args.root {
        " root=/dev/vda rw rootwait"
    } else {
        ""
    };
    let cmdline = match (&args.cmdline, &args.append) {
        (Some(c), _) => c.clone(),
        (None, Some(a)) => format!("{default_cmdline}{root} {a}").trim().to_string(),
        (None, None) => format!("{default_cmdline}{root}").trim().to_string(),
    };
    Ok(VmConfig {
        name,
        guest,
        kernel,
        initrd: args.initrd.clone().or(default_initrd),
        cmdline,
        mem_mib: args.mem,
        cpus: args.cpus,
        acpi: guest == GuestKind::Linux && !args.no_acpi,
        disks: canonical_disks(&args.disks)?,
    })
}

/// Overlays name their base by this path and snapshots keep it, so it must not depend on the
/// directory rewind was started from (a relative name would be resolved against the overlay's).
fn canonical_disks(disks: &[PathBuf]) -> Result<Vec<PathBuf>, Failure> {
    disks
        .iter()
        .map(|d| {
            std::fs::canonicalize(d).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    Failure::Usage(format!("disk image {} is missing", d.display()))
                }
                _ => Failure::Usage(format!("--disk {}: {e}", d.display())),
            })
        })
        .collect()
}

fn run_options(io: &IoArgs) -> Result<RunOptions, Failure> {
    let timeout = match io.timeout {
        Some(t) if !(t > 0.0 && t.is_finite()) => {
            return Err(Failure::Usage(format!(
                "--timeout must be a positive number of seconds (got {t})"
            )))
        }
        Some(t) => Some(Duration::from_secs_f64(t)),
        None => None,
    };
    let expect = match &io.expect {
        Some(e) => Some(
            Regex::new(e)
                .map_err(|err| Failure::Usage(format!("--expect is not a valid regex: {err}")))?,
        ),
        None => None,
    };
    let console = console_target(io.console.clone(), io.exec.is_some());
    if let ConsoleTarget::File(p) = &console {
        // Checked before anything is built, so a typo is a usage error.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .map_err(|e| Failure::Usage(format!("--console {}: {e}", p.display())))?;
    }
    // One rule for exec, here and in `rewind exec`: 600 s unless told.
    let timeout = match (timeout, &io.exec) {
        (None, Some(_)) => Some(rewind::vmm::DEFAULT_EXEC_TIMEOUT),
        (t, _) => t,
    };
    Ok(RunOptions {
        console,
        expect,
        timeout,
        exec: io.exec.clone(),
        snapshot_when_ready: None,
        start_paused: false,
        escape: match &io.escape {
            Some(e) => {
                rewind::console::keys::parse_escape(e).map_err(|e| Failure::Usage(e.to_string()))?
            }
            None => Some(rewind::console::ESCAPE),
        },
    })
}

/// Where the console goes: as asked, else stdio, or stderr with `--exec`
/// so that `$(rewind run --exec ...)` captures only the command's output.
fn console_target(requested: Option<ConsoleTarget>, exec: bool) -> ConsoleTarget {
    match requested {
        Some(t) => t,
        None if exec => ConsoleTarget::Stderr,
        None => ConsoleTarget::Stdio,
    }
}

/// Owns the VM directory and control socket for a run, builds the VM with
/// `build` and runs it to its outcome. The folder is removed at the end
/// when nothing in it is worth keeping (see `vms::cleanup_on_exit`).
fn host_vm(
    name: &str,
    generated: bool,
    opts: &RunOptions,
    build: impl FnOnce() -> Result<Vmm, VmmError>,
) -> Result<i32, Failure> {
    let signals =
        SignalFd::new().map_err(|e| Failure::Runtime(format!("cannot watch signals: {e}")))?;
    let dir = paths::vm_dir(name);
    paths::create_private_dir_all(&dir)
        .and_then(|()| paths::set_mode(&dir, paths::dir_mode()))
        .map_err(|e| Failure::Runtime(format!("cannot create {}: {e}", dir.display())))?;
    let control = ControlServer::bind(&paths::api_socket(name)).map_err(|e| match e {
        // The name is taken, like a snapshot name that exists: bad input.
        rewind::control::ControlError::InUse { .. } => {
            Failure::Usage(format!("VM name {name:?} is taken by a running VM ({e})"))
        }
        _ => Failure::Runtime(format!("VM {name:?}: {e}")),
    })?;
    // From here this process owns the name, so it may remove the folder.
    let result = run_hosted(name, generated, opts, &control, &signals, build);
    drop(control);
    vms::cleanup_on_exit(name);
    result
}

fn run_hosted(
    name: &str,
    generated: bool,
    opts: &RunOptions,
    control: &ControlServer,
    signals: &SignalFd,
    build: impl FnOnce() -> Result<Vmm, VmmError>,
) -> Result<i32, Failure> {
    // The terminal is the guest console's from here; what the VM does for
    // its API clients (merges on delete) is shown by them, not here.
    rewind::progress::enable(false);
    let mut vmm = build()?;
    // Built: from here on the main thread is the event loop (API, devices,
    // snapshots), and opens no socket and runs no program.
    rewind::seccomp::install(rewind::seccomp::Thread::Vmm)
        .map_err(|e| Failure::Runtime(e.to_string()))?;
    if generated {
        eprintln!("rewind: VM name {name}");
    }
    if vmm.host == HostKind::Pvm {
        eprintln!("rewind: {}", vmm.host.describe());
    }
    let outcome = vmm.run(opts, Some(control), Some(signals))?;
    let diagnosis = vmm.diagnosis(&outcome);
    drop(vmm);
    if let Some(msg) = outcome.message() {
        eprintln!("rewind: {msg}");
    }
    if let Some(why) = diagnosis {
        eprintln!("rewind: {why}");
    }
    Ok(outcome.exit_code())
}

fn run(args: RunArgs) -> Result<i32, Failure> {
    let config = build_config(&args)?;
    if args.io.exec.is_some() && !config.guest.has_agent() {
        return Err(Failure::Usage(
            "--exec needs a Linux guest: the test guest has no exec agent".into(),
        ));
    }
    let mut opts = run_options(&args.io)?;
    let name = config.name.clone();
    if args.boot_cache {
        let entry = boot_cache::entry_for(&config).map_err(|e| Failure::Usage(e.to_string()))?;
        if entry.is_dir() {
            let t = std::time::Instant::now();
            let restored = host_vm(&name, args.name.is_none(), &opts, || {
                let vmm = Vmm::restore(&entry, &name, &opts);
                if vmm.is_ok() {
                    eprintln!(
                        "rewind: restored the booted guest from the boot cache {} in {:.1} ms",
                        entry.display(),
                        t.elapsed().as_secs_f64() * 1e3
                    );
                }
                vmm
            });
            match restored {
                Err(Failure::Runtime(msg)) | Err(Failure::Usage(msg)) => {
                    eprintln!(
                        "rewind: boot cache entry unusable ({msg}); booting and refilling it"
                    );
                    let _ = std::fs::remove_dir_all(&entry);
                }
                ok => return ok,
            }
        }
        opts.snapshot_when_ready = Some(entry);
    }
    host_vm(&name, args.name.is_none(), &opts, || {
        Vmm::boot(config, &opts)
    })
}

fn restore(args: RestoreArgs) -> Result<i32, Failure> {
    let mut opts = run_options(&args.io)?;
    opts.start_paused = args.paused;
    let dir = store::resolve(&args.snapshot, args.vm.as_deref())
        .map_err(|e| Failure::Usage(e.to_string()))?;
    if args.io.exec.is_some()
        && store::read_manifest(&dir).is_ok_and(|m| !m.config.guest.has_agent())
    {
        return Err(Failure::Usage(
            "--exec needs a Linux guest: this snapshot is of the test guest, which has no exec agent"
                .into(),
        ));
    }
    let name = match &args.name {
        Some(n) if !valid_name(n) => return Err(Failure::Usage(format!("invalid VM name {n:?}"))),
        Some(n) => n.clone(),
        None => paths::generate_name(),
    };
    host_vm(&name, args.name.is_none(), &opts, || {
        Vmm::restore(&dir, &name, &opts)
    })
}

/// Sends one API request to VM `vm`; non-2xx answers become errors.
fn api(
    vm: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, Failure> {
    let socket = paths::api_socket(vm);
    let resp = client::request(&socket, method, path, body.as_ref(), None).map_err(|e| {
        match e {
            // Naming a VM that does not run is the caller's mistake.
            rewind::control::ControlError::NotListening { .. } => {
                Failure::Usage(format!("no VM named {vm:?} is running ({e})"))
            }
            _ => Failure::Runtime(format!("VM {vm:?}: {e}")),
        }
    })?;
    if !(200..300).contains(&resp.status) {
        let msg = resp.body["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| resp.body.to_string());
        // 4xx (bad name, no such snapshot, name taken, no agent): bad input.
        return Err(match resp.status {
            504 => Failure::Timeout(msg),
            400..=499 => Failure::Usage(msg),
            _ => Failure::Runtime(msg),
        });
    }
    Ok(resp.body)
}

fn exec(vm: &str, cmd: &str, timeout: u64) -> Result<i32, Failure> {
    use std::io::Write;
    let body = serde_json::json!({ "cmd": cmd, "timeout_s": timeout });
    let r = api(vm, "PUT", "/vm/exec", Some(body))?;
    let _ = std::io::stdout().write_all(r["stdout"].as_str().unwrap_or("").as_bytes());
    let _ = std::io::stderr().write_all(r["stderr"].as_str().unwrap_or("").as_bytes());
    Ok(r["status"].as_i64().unwrap_or(1) as i32)
}

pub(crate) fn stop(vm: &str) -> Result<i32, Failure> {
    let socket = paths::api_socket(vm);
    let resp = client::request(
        &socket,
        "PUT",
        "/vm/stop",
        None,
        Some(Duration::from_secs(30)),
    )
    .map_err(|e| match e {
        rewind::control::ControlError::NotListening { .. } => {
            Failure::Usage(format!("no VM named {vm:?} is running ({e})"))
        }
        _ => Failure::Runtime(format!("cannot stop VM {vm:?}: {e}")),
    })?;
    if resp.status != 200 {
        return Err(Failure::Runtime(format!(
            "VM {vm:?} refused to stop: {}",
            resp.body
        )));
    }
    Ok(0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    rewind::paths::set_group_access(cli.group_access);
    if !cli.no_seccomp {
        // Only this process's VM threads install filters (run, restore);
        // other commands never start one.
        rewind::seccomp::enable();
    }
    if !matches!(
        cli.command,
        Cmd::Run(_) | Cmd::Restore(_) | Cmd::Demo | Cmd::Bench { .. } | Cmd::Fuzz(_)
    ) {
        // Listings end quietly when their reader leaves (`rewind ps | head
        // -1`), as other Unix tools do, instead of panicking in println!.
        // A VM (and what spawns VMs) keeps EPIPE as an error so it can end
        // cleanly (status 141).
        // SAFETY: restores the default action for one signal before any
        // thread exists; no handler is involved.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    rewind::progress::enable(true);
    let result = match cli.command {
        Cmd::Run(args) => run(args),
        Cmd::Stop { vm } => stop(&vm),
        Cmd::Exec { vm, cmd, timeout } => exec(&vm, &cmd, timeout),
        Cmd::Ps { all, json } => vms::ps(all, json),
        Cmd::Rm { name, force } => vms::rm(&name, force),
        Cmd::Pause { vm } => api(&vm, "PUT", "/vm/pause", None).map(|r| {
            println!("paused {vm} in {} us", r["pause_us"]);
            0
        }),
        Cmd::Resume { vm } => api(&vm, "PUT", "/vm/resume", None).map(|_| {
            println!("resumed {vm}");
            0
        }),
        Cmd::Snapshot { what } => snapshot::run(what),
        Cmd::Disk { what } => snapshot::disk(what),
        Cmd::Restore(args) => restore(args),
        Cmd::Demo => demo::run().map_err(Failure::Runtime),
        Cmd::Bench { what } => bench::run(what).map_err(Failure::Runtime),
        Cmd::Fuzz(args) => fuzz::run(args),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(Failure::Usage(msg)) => {
            eprintln!("rewind: {}", one_line(&msg));
            ExitCode::from(2)
        }
        Err(Failure::Runtime(msg)) => {
            eprintln!("rewind: {}", one_line(&msg));
            ExitCode::from(1)
        }
        Err(Failure::Timeout(msg)) => {
            eprintln!("rewind: {}", one_line(&msg));
            ExitCode::from(rewind::vmm::EXIT_TIMEOUT as u8)
        }
    }
}

/// Errors from libraries (regex, io) may span lines; the user gets one.
fn one_line(msg: &str) -> String {
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_moves_the_default_console_off_stdout() {
        assert_eq!(console_target(None, false), ConsoleTarget::Stdio);
        assert_eq!(console_target(None, true), ConsoleTarget::Stderr);
        // What the user asked for wins.
        for exec in [false, true] {
            assert_eq!(
                console_target(Some(ConsoleTarget::Stdio), exec),
                ConsoleTarget::Stdio
            );
            assert_eq!(
                console_target(Some(ConsoleTarget::None), exec),
                ConsoleTarget::None
            );
        }
    }
}
