//! `rewind snapshot ...` and `rewind disk ...`: the snapshot tree as a user
//! sees it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Subcommand;

use crate::{api, Failure};
use rewind::snapshot::state::Manifest;
use rewind::snapshot::{bundle, chain, layers, store};

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Capture the whole machine; prints name, path, size, pause and total
    /// time. Live: the guest runs while memory is written (it stops only to
    /// capture vCPU and device state). Incremental when the VM's memory last
    /// equalled one of its snapshots: only the pages written since are stored.
    Create {
        name: Option<String>,
        #[arg(long)]
        vm: String,
        /// Keep the guest paused until memory is written.
        #[arg(long)]
        paused: bool,
        /// Store all of memory (start a new chain) even when the changes
        /// over the VM's last snapshot would do.
        #[arg(long)]
        full: bool,
    },
    /// Make NAME standalone: write its memory as one full layer instead of
    /// the changes over its parent.
    Flatten {
        name: String,
        #[arg(long)]
        vm: Option<String>,
    },
    /// Put the running VM back to NAME in place.
    Revert {
        name: String,
        #[arg(long)]
        vm: String,
    },
    /// List snapshots (of one VM, or all); --tree shows parents and children.
    List {
        #[arg(long)]
        vm: Option<String>,
        #[arg(long)]
        tree: bool,
    },
    /// Show a snapshot's manifest.
    Info {
        name: String,
        #[arg(long)]
        vm: Option<String>,
        /// Also show each vCPU's registers, MSRs and pending events, and the
        /// UARTs' and virtio queues' state (where was the guest when it was
        /// captured, and what was it waiting for?).
        #[arg(long)]
        vcpus: bool,
    },
    /// Write a standalone copy of a snapshot to DIR: its memory, state and
    /// one qcow2 layer per disk (everything above the base image), named
    /// relative to DIR, so DIR can be moved or copied anywhere the base images
    /// are at the same paths, then started with `rewind restore DIR`.
    Export {
        name: String,
        dir: PathBuf,
        #[arg(long)]
        vm: Option<String>,
    },
    /// Delete a snapshot.
    Delete {
        name: String,
        #[arg(long)]
        vm: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum DiskCmd {
    /// Flatten disk N of a snapshot (or of a stopped VM's current overlay)
    /// into a standalone raw image, equal to `qemu-img convert -O raw`.
    Export {
        /// A snapshot name or path; without it, the VM's current overlay.
        #[arg(long)]
        snapshot: Option<String>,
        #[arg(long)]
        vm: Option<String>,
        #[arg(long, default_value_t = 0)]
        disk: usize,
        out: PathBuf,
    },
}

pub fn run(cmd: SnapshotCmd) -> Result<i32, Failure> {
    match cmd {
        SnapshotCmd::Create {
            name,
            vm,
            paused,
            full,
        } => {
            let body = serde_json::json!({ "name": name, "paused": paused, "full": full });
            let r = api(&vm, "PUT", "/snapshots", Some(body))?;
            let kind = match r["incremental_on"].as_str() {
                Some(p) => format!("changes over {p}"),
                None => "full".to_string(),
            };
            println!(
                "snapshot {} at {} ({:.1} MiB, {kind}, {} guest paused {:.2} ms, total {:.2} ms)",
                r["name"].as_str().unwrap_or("?"),
                r["path"].as_str().unwrap_or("?"),
                r["size_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                if r["live"].as_bool().unwrap_or(false) {
                    "live,"
                } else {
                    "paused,"
                },
                r["pause_ms"].as_f64().unwrap_or(0.0),
                r["total_ms"].as_f64().unwrap_or(0.0)
            );
        }
        SnapshotCmd::Flatten { name, vm } => {
            let dir =
                store::resolve(&name, vm.as_deref()).map_err(|e| Failure::Usage(e.to_string()))?;
            let m = store::read_manifest(&dir).map_err(|e| Failure::Usage(e.to_string()))?;
            let bytes = chain::flatten(&dir, m.memory_file_len).map_err(|e| match e {
                chain::ChainError::Write { .. } => Failure::Runtime(e.to_string()),
                other => Failure::Usage(other.to_string()),
            })?;
            println!(
                "snapshot {name} is standalone: {:.1} MiB of memory in {}",
                bytes as f64 / 1048576.0,
                dir.join(rewind::snapshot::state::MEMORY_FILE).display()
            );
        }
        SnapshotCmd::Revert { name, vm } => {
            let r = api(&vm, "PUT", &format!("/snapshots/{name}/revert"), None)?;
            println!(
                "reverted {vm} to {name} in {:.2} ms ({} pages copied{})",
                r["total_ms"].as_f64().unwrap_or(0.0),
                r["pages_copied"],
                if r["full"].as_bool().unwrap_or(false) {
                    ", full copy"
                } else {
                    ""
                }
            );
        }
        SnapshotCmd::List { vm, tree: true } => {
            print_tree(vm.as_deref())?;
        }
        SnapshotCmd::List { vm, tree: false } => {
            let list = match vm.as_deref().filter(|v| is_running(v)) {
                Some(v) => api(v, "GET", "/snapshots", None)?,
                None => store::list_json(vm.as_deref()),
            };
            for s in list["snapshots"].as_array().into_iter().flatten() {
                match s.get("error") {
                    Some(e) => println!(
                        "{}  BROKEN: {}",
                        s["path"].as_str().unwrap_or("?"),
                        e.as_str().unwrap_or("?")
                    ),
                    None => println!(
                        "{:<20} vm {:<12} parent {:<12} {:>8.1} MiB  {}",
                        s["name"].as_str().unwrap_or("?"),
                        s["vm"].as_str().unwrap_or("?"),
                        s["parent"].as_str().unwrap_or("-"),
                        s["size_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                        s["path"].as_str().unwrap_or("?")
                    ),
                }
            }
        }
        SnapshotCmd::Info { name, vm, vcpus } => info(&name, vm.as_deref(), vcpus)?,
        SnapshotCmd::Export { name, dir, vm } => {
            let src =
                store::resolve(&name, vm.as_deref()).map_err(|e| Failure::Usage(e.to_string()))?;
            if dir.exists() {
                return Err(Failure::Usage(format!("{} already exists", dir.display())));
            }
            let disk_bytes = bundle::export::<rewind::vmm::MachineState>(&src, &dir)
                .map_err(|e| Failure::Runtime(e.to_string()))?;
            // `restore` reads an argument without a '/' as a snapshot name.
            let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
            println!(
                "exported {} to {} (disk layers {:.1} MiB); start it with: rewind restore {}",
                src.display(),
                dir.display(),
                mib(disk_bytes),
                dir.display()
            );
        }
        SnapshotCmd::Delete { name, vm } => delete(&name, vm.as_deref())?,
    }
    Ok(0)
}

/// Prints a snapshot's manifest (asking its VM when that runs) and, with
/// `vcpus`, the captured vCPU and device state.
fn info(name: &str, vm: Option<&str>, vcpus: bool) -> Result<(), Failure> {
    let dir = store::resolve(name, vm).map_err(|e| Failure::Usage(e.to_string()))?;
    let m: Manifest = match running_owner(&dir) {
        Some((o, name)) => {
            let r = api(&o, "GET", &format!("/snapshots/{name}"), None)?;
            serde_json::from_value(r)
                .map_err(|e| Failure::Runtime(format!("VM {o:?} described {name} oddly: {e}")))?
        }
        None => store::read_manifest(&dir).map_err(|e| Failure::Runtime(e.to_string()))?,
    };
    let mut shown = serde_json::to_value(&m).unwrap_or_default();
    // What restoring it reads: its own layer and those it sits on.
    if let Ok(c) = chain::open(&dir, m.memory_file_len) {
        let bytes = c.layer_bytes();
        shown["memory_chain"] = serde_json::json!({
            "depth": c.depth(),
            "base": c.base_dir,
            "own_bytes": bytes.last().copied().unwrap_or(0),
            "chain_bytes": bytes.iter().sum::<u64>(),
        });
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&shown).unwrap_or_default()
    );
    if vcpus {
        let (_, state) = rewind::snapshot::ops::load::<rewind::vmm::MachineState>(&dir)
            .map_err(|e| Failure::Runtime(e.to_string()))?;
        for v in &state.vcpus {
            println!("{}", v.describe());
        }
        println!(
            "com1: {:?}\ncom2: {:?}",
            state.devices.com1, state.devices.com2
        );
        for d in &state.devices.disks {
            println!("virtio: {:?}", d.transport);
        }
    }
    Ok(())
}

/// Deletes through the owning VM's socket when that VM runs (it must
/// forget a baseline that is gone), through the store when it does not.
fn delete(name: &str, vm: Option<&str>) -> Result<(), Failure> {
    let dir = store::resolve(name, vm).map_err(|e| Failure::Usage(e.to_string()))?;
    let (how, report) = match running_owner(&dir) {
        Some((o, name)) => {
            let r = api(&o, "DELETE", &format!("/snapshots/{name}"), None)?;
            (format!(" through running VM {o}"), r)
        }
        None => {
            let r = store::delete_with_layers(&dir).map_err(|e| Failure::Runtime(e.to_string()))?;
            (String::new(), serde_json::to_value(&r).unwrap_or_default())
        }
    };
    let count = |k: &str| report["layers"][k].as_array().map_or(0, Vec::len);
    println!(
        "deleted {}{how} (disk layers: {} merged into dependents, {} removed, {} kept under running VMs)",
        dir.display(),
        count("merged_into"),
        count("removed"),
        count("kept")
    );
    let parent = report["new_parent"]
        .as_str()
        .unwrap_or("nothing (now a root)");
    for child in report["reparented"].as_array().into_iter().flatten() {
        println!("re-parented {} to {parent}", child.as_str().unwrap_or("?"));
    }
    Ok(())
}

/// The VM that owns the snapshot at `dir`, if that VM runs, and the
/// snapshot's name there: then the VM answers for its snapshots, so what it
/// holds (its baseline, a snapshot it is writing) and what the store holds
/// stay one story.
fn running_owner(dir: &Path) -> Option<(String, String)> {
    let name = dir.file_name()?.to_str()?.to_string();
    let owner = dir.parent()?.parent()?.file_name()?.to_str()?.to_string();
    (store::snapshots_dir(&owner).join(&name) == dir && is_running(&owner)).then_some((owner, name))
}

fn is_running(vm: &str) -> bool {
    std::os::unix::net::UnixStream::connect(rewind::paths::api_socket(vm)).is_ok()
}

fn age(created_ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let s = now.saturating_sub(created_ms) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// Parents above children, branches indented; `*` marks the snapshot the
/// running VM last matched (taken, reverted to or restored from).
fn print_tree(vm: Option<&str>) -> Result<i32, Failure> {
    let listed = store::list(vm);
    let mut by_vm: BTreeMap<String, Vec<(PathBuf, Manifest)>> = BTreeMap::new();
    for (path, m) in listed {
        match m {
            Ok(m) => by_vm.entry(m.vm.clone()).or_default().push((path, m)),
            Err(e) => println!("{}  BROKEN: {e}", path.display()),
        }
    }
    for (vm_name, snaps) in by_vm {
        let current = api(&vm_name, "GET", "/vm", None)
            .ok()
            .and_then(|v| v["baseline"].as_str().map(PathBuf::from));
        let running = if current.is_some() { " (running)" } else { "" };
        println!("VM {vm_name}{running}");
        let names: Vec<String> = snaps.iter().map(|(_, m)| m.name.clone()).collect();
        let roots: Vec<usize> = (0..snaps.len())
            .filter(|&i| {
                snaps[i]
                    .1
                    .parent
                    .as_ref()
                    .is_none_or(|p| !names.contains(p))
            })
            .collect();
        for r in roots {
            print_node(&snaps, r, 1, current.as_deref());
        }
    }
    Ok(0)
}

fn print_node(
    snaps: &[(PathBuf, Manifest)],
    i: usize,
    depth: usize,
    current: Option<&std::path::Path>,
) {
    let (path, m) = &snaps[i];
    let disk: u64 = m
        .disk_layers
        .iter()
        .map(|l| layers::allocated_bytes(l))
        .sum();
    let mark = if current.is_some_and(|c| c == path) {
        "*"
    } else {
        " "
    };
    let from = match &m.parent {
        Some(p) if p.contains('/') => format!("  (from {p})"),
        _ => String::new(),
    };
    println!(
        "{mark}{}{:<16} {:>6} ago  memory {:>7.1} MiB  disk {:>7.1} MiB{from}",
        "  ".repeat(depth),
        m.name,
        age(m.created_unix_ms),
        mib(m.memory_bytes),
        mib(disk)
    );
    for (j, (_, child)) in snaps.iter().enumerate() {
        if child.parent.as_deref() == Some(m.name.as_str()) {
            print_node(snaps, j, depth + 1, current);
        }
    }
}

pub fn disk(cmd: DiskCmd) -> Result<i32, Failure> {
    match cmd {
        DiskCmd::Export {
            snapshot,
            vm,
            disk,
            out,
        } => {
            let top = match (&snapshot, &vm) {
                (Some(s), _) => {
                    let dir = store::resolve(s, vm.as_deref())
                        .map_err(|e| Failure::Usage(e.to_string()))?;
                    let m =
                        store::read_manifest(&dir).map_err(|e| Failure::Runtime(e.to_string()))?;
                    m.disk_layers.get(disk).cloned().ok_or_else(|| {
                        Failure::Usage(format!(
                            "snapshot {s} has {} disks, no disk {disk}",
                            m.disk_layers.len()
                        ))
                    })?
                }
                (None, Some(v)) => {
                    if api(v, "GET", "/vm", None).is_ok() {
                        return Err(Failure::Usage(format!(
                            "VM {v} is running; export a snapshot of it (--snapshot) instead of its live disk"
                        )));
                    }
                    newest_overlay(v, disk)?
                }
                (None, None) => return Err(Failure::Usage("give --snapshot or --vm".into())),
            };
            rewind::disk::export_flat(&top, &out, rewind::disk::ImageFormat::Raw)
                .map_err(|e| Failure::Runtime(e.to_string()))?;
            println!(
                "exported {} (chain under {}) to {}",
                disk,
                top.display(),
                out.display()
            );
            Ok(0)
        }
    }
}

fn newest_overlay(vm: &str, disk: usize) -> Result<PathBuf, Failure> {
    let dir = rewind::paths::vm_dir(vm).join("disks");
    let prefix = format!("disk{disk}-");
    std::fs::read_dir(&dir)
        .map_err(|e| Failure::Usage(format!("VM {vm} has no disks ({}: {e})", dir.display())))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter(|e| e.metadata().is_ok_and(|m| !m.permissions().readonly()))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
        .ok_or_else(|| Failure::Usage(format!("VM {vm} has no live overlay for disk {disk}")))
}
