//! The `rewind` command line: parses arguments, calls the library, maps
//! outcomes to exit codes (0 ok, 1 runtime failure, 2 usage, 124 timeout).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use regex::Regex;

use rewind::config::{valid_name, KernelSource, VmConfig};
use rewind::console::ConsoleTarget;
use rewind::control::{client, ControlServer};
use rewind::guest::GuestKind;
use rewind::kvm::host::HostKind;
use rewind::paths;
use rewind::vmm::{RunOptions, SignalFd, Vmm, VmmError};

mod bench;

#[derive(Parser)]
#[command(
    name = "rewind",
    version,
    about = "A small KVM hypervisor whose reason to exist is snapshots"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a guest and run it until it ends, --expect matches or --timeout passes.
    Run(RunArgs),
    /// Stop a running VM through its control socket.
    Stop {
        #[arg(long)]
        vm: String,
    },
    /// Measure rewind (medians over several runs).
    Bench {
        #[command(subcommand)]
        what: bench::BenchCmd,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum GuestArg {
    Test,
    Linux,
}

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// Which guest: the embedded test guest, or a Linux kernel (--kernel).
    #[arg(long, value_enum, default_value = "test")]
    guest: GuestArg,
    /// A vmlinux ELF or bzImage to boot instead of the embedded test guest.
    #[arg(long)]
    kernel: Option<PathBuf>,
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
    /// VM name (directory and control socket under $REWIND_HOME/vms/NAME).
    #[arg(long)]
    name: Option<String>,
    /// stdio (interactive; Ctrl-A x quits), none, or a file path.
    #[arg(long, default_value = "stdio")]
    console: ConsoleTarget,
    /// End with status 124 after this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// End with status 0 at the first console line matching this regex.
    #[arg(long)]
    expect: Option<String>,
}

const LINUX_DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux";

/// A usage error (exit 2) or a runtime error (exit 1), printed as one line.
enum Failure {
    Usage(String),
    Runtime(String),
}

impl From<VmmError> for Failure {
    fn from(e: VmmError) -> Self {
        match e {
            VmmError::Config(_) | VmmError::Load(_) => Failure::Usage(e.to_string()),
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
    let (guest, kernel, default_cmdline) = match (&args.kernel, args.guest) {
        (Some(k), _) => (GuestKind::Linux, KernelSource::File(k.clone()), LINUX_DEFAULT_CMDLINE),
        (None, GuestArg::Test) => (GuestKind::Test, KernelSource::EmbeddedTestGuest, ""),
        (None, GuestArg::Linux) => {
            return Err(Failure::Usage(
                "--guest linux needs --kernel PATH in this version (image recipes come with the Linux guest work)".into(),
            ))
        }
    };
    if guest == GuestKind::Test && args.initrd.is_some() {
        return Err(Failure::Usage("--initrd needs --kernel".into()));
    }
    let cmdline = match (&args.cmdline, &args.append) {
        (Some(c), _) => c.clone(),
        (None, Some(a)) => format!("{default_cmdline} {a}").trim().to_string(),
        (None, None) => default_cmdline.to_string(),
    };
    Ok(VmConfig {
        name,
        guest,
        kernel,
        initrd: args.initrd.clone(),
        cmdline,
        mem_mib: args.mem,
        cpus: args.cpus,
    })
}

fn run(args: RunArgs) -> Result<i32, Failure> {
    let config = build_config(&args)?;
    let timeout = match args.timeout {
        Some(t) if !(t > 0.0 && t.is_finite()) => {
            return Err(Failure::Usage(format!(
                "--timeout must be a positive number of seconds (got {t})"
            )))
        }
        Some(t) => Some(Duration::from_secs_f64(t)),
        None => None,
    };
    let expect = match &args.expect {
        Some(e) => Some(
            Regex::new(e)
                .map_err(|err| Failure::Usage(format!("--expect is not a valid regex: {err}")))?,
        ),
        None => None,
    };
    let opts = RunOptions {
        console: args.console.clone(),
        expect,
        timeout,
    };
    let signals =
        SignalFd::new().map_err(|e| Failure::Runtime(format!("cannot watch signals: {e}")))?;
    let dir = paths::vm_dir(&config.name);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Failure::Runtime(format!("cannot create {}: {e}", dir.display())))?;
    let control = ControlServer::bind(&paths::api_socket(&config.name))
        .map_err(|e| Failure::Runtime(format!("VM {:?}: {e}", config.name)))?;
    if args.name.is_none() {
        eprintln!("rewind: VM name {}", config.name);
    }
    let host = HostKind::detect();
    if host == HostKind::Pvm {
        eprintln!("rewind: {}", host.describe());
    }
    let mut vmm = Vmm::boot(config, &opts)?;
    let outcome = vmm.run(&opts, Some(&control), Some(&signals))?;
    drop(vmm);
    if let Some(msg) = outcome.message() {
        eprintln!("rewind: {msg}");
    }
    Ok(outcome.exit_code())
}

fn stop(vm: &str) -> Result<i32, Failure> {
    let socket = paths::api_socket(vm);
    let resp = client::request(
        &socket,
        "PUT",
        "/vm/stop",
        None,
        Some(Duration::from_secs(30)),
    )
    .map_err(|e| Failure::Runtime(format!("cannot stop VM {vm:?}: {e}")))?;
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
    let result = match cli.command {
        Cmd::Run(args) => run(args),
        Cmd::Stop { vm } => stop(&vm),
        Cmd::Bench { what } => bench::run(what).map_err(Failure::Runtime),
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
    }
}

/// Errors from libraries (regex, io) may span lines; the user gets one.
fn one_line(msg: &str) -> String {
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}
