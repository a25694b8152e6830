//! `rewind snapshot ...` and `rewind disk ...`: the snapshot tree as a user
//! sees it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Subcommand;

use crate::{api, Failure};
use rewind::progress::Phase;
use rewind::snapshot::state::Manifest;
use rewind::snapshot::{bundle, chain, store, tree};

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
    /// List snapshots (of one VM, or all); --tree draws parents and children
    /// as `virsh snapshot-list --tree` does, `*` on the running VM's current one.
    List {
        #[arg(long)]
        vm: Option<String>,
        #[arg(long)]
        tree: bool,
        /// The listing as JSON (the API's, each entry with `current`), for
        /// scripts; parents make the tree.
        #[arg(long)]
        json: bool,
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
        /// The manifest as one line of JSON (what the API answers), for scripts.
        #[arg(long)]
        json: bool,
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
            let phase = Phase::spinner(format!("snapshot of {vm}"));
            let r = api(&vm, "PUT", "/snapshots", Some(body))?;
            phase.clear();
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
                chain::ChainError::Write { .. } | chain::ChainError::Read { .. } => {
                    Failure::Runtime(e.to_string())
                }
                other => Failure::Usage(other.to_string()),
            })?;
            println!(
                "snapshot {name} is standalone: {:.1} MiB of memory in {}",
                bytes as f64 / 1048576.0,
                dir.join(rewind::snapshot::state::MEMORY_FILE).display()
            );
        }
        SnapshotCmd::Revert { name, vm } => {
            let phase = Phase::spinner(format!("revert {vm} to {name}"));
            let r = api(&vm, "PUT", &format!("/snapshots/{name}/revert"), None)?;
            phase.clear();
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
        SnapshotCmd::List { vm, json: true, .. } => {
            println!("{}", listing(vm.as_deref())?);
        }
        SnapshotCmd::List { vm, tree: true, .. } => print_tree(&listing(vm.as_deref())?),
        SnapshotCmd::List { vm, .. } => {
            // The plain listing needs no VM's current position.
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
        SnapshotCmd::Info {
            name,
            vm,
            vcpus,
            json,
        } => info(&name, vm.as_deref(), vcpus, json)?,
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
fn info(name: &str, vm: Option<&str>, vcpus: bool, json: bool) -> Result<(), Failure> {
    if json && vcpus {
        return Err(Failure::Usage(
            "--vcpus is a report for people; it has no --json form".into(),
        ));
    }
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
    if json {
        println!("{}", serde_json::to_string(&shown).unwrap_or_default());
        return Ok(());
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

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// The listing, from the VM when it runs (one shape whoever answers), each
/// entry with `current`: whether its running VM last matched it.
fn listing(vm: Option<&str>) -> Result<serde_json::Value, Failure> {
    let mut list = match vm.filter(|v| is_running(v)) {
        Some(v) => api(v, "GET", "/snapshots", None)?,
        None => store::list_json(vm),
    };
    let mut baselines: BTreeMap<String, Option<PathBuf>> = BTreeMap::new();
    for s in list["snapshots"].as_array_mut().into_iter().flatten() {
        let Some(owner) = s["vm"].as_str().map(str::to_string) else {
            continue;
        };
        let baseline = baselines.entry(owner.clone()).or_insert_with(|| {
            api(&owner, "GET", "/vm", None)
                .ok()
                .and_then(|v| v["baseline"].as_str().map(PathBuf::from))
        });
        let path = s["path"].as_str().map(PathBuf::from);
        s["current"] = serde_json::Value::Bool(baseline.is_some() && *baseline == path);
    }
    Ok(list)
}

/// One tree per VM (`virsh snapshot-list --tree`), `*` on the running
/// VM's current position.
fn print_tree(list: &serde_json::Value) {
    let (nodes, broken) = tree::nodes(list);
    for line in broken {
        println!("{line}");
    }
    let mut by_vm: BTreeMap<String, Vec<tree::Node>> = BTreeMap::new();
    let mut current: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (n, s) in nodes.into_iter().zip(
        list["snapshots"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s.get("error").is_none()),
    ) {
        if s["current"].as_bool() == Some(true) {
            current.insert(n.vm.clone(), n.path.clone());
        }
        by_vm.entry(n.vm.clone()).or_default().push(n);
    }
    let now = tree::now_ms();
    for (vm_name, snaps) in by_vm {
        let cur = current.get(&vm_name);
        let running = if is_running(&vm_name) {
            " (running)"
        } else {
            ""
        };
        println!("VM {vm_name}{running}");
        for line in tree::render(&snaps, cur.map(PathBuf::as_path), now) {
            println!("{line}");
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
            let mut phase = Phase::bytes(format!("export disk {disk}"), 0);
            rewind::disk::export_flat_with_progress(
                &top,
                &out,
                rewind::disk::ImageFormat::Raw,
                &mut |done, total| phase.progress(done, total),
            )
            .map_err(|e| Failure::Runtime(e.to_string()))?;
            phase.finish();
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
