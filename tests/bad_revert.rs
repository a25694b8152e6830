//! Reverting to a damaged or foreign snapshot bundle: refused with one
//! clear line before the running VM is touched, which runs on exactly as
//! it was (not paused, not reverted, same disk overlays).

mod common;
use common::*;
use std::path::Path;

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    f(&mut m);
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

/// A CPU feature this host's KVM does not offer, as (leaf, subleaf,
/// register, bit, the name rewind gives it): a named one if the host lacks
/// one of these, else a reserved bit no CPU has.
fn feature_this_host_lacks() -> (u32, u32, &'static str, u32, String) {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    let pick = |reg: &str, (a, b, c, d): (u32, u32, u32, u32)| match reg {
        "eax" => a,
        "ebx" => b,
        "ecx" => c,
        _ => d,
    };
    // On PVM the CPU's own CPUID counts too (see host_features in
    // src/vmm/host_identity.rs).
    let has = |leaf: u32, sub: u32, reg: &str, bit: u32| {
        let raw = std::arch::x86_64::__cpuid_count(leaf, sub);
        let raw = (raw.eax, raw.ebx, raw.ecx, raw.edx);
        (is_pvm_host() && pick(reg, raw) & (1 << bit) != 0)
            || cpuid.as_slice().iter().any(|e| {
                e.function == leaf
                    && e.index == sub
                    && pick(reg, (e.eax, e.ebx, e.ecx, e.edx)) & (1 << bit) != 0
            })
    };
    let named = [
        (0xd, 1, "eax", 3, "xsaves"),
        (0xd, 1, "eax", 1, "xsavec"),
        (7, 0, "edx", 24, "amx-tile"),
        (7, 0, "ebx", 16, "avx512f"),
    ];
    for (leaf, sub, reg, bit, name) in named {
        if !has(leaf, sub, reg, bit) {
            return (leaf, sub, reg, bit, name.to_string());
        }
    }
    (0xd, 1, "eax", 31, "cpuid 0xd.1 eax bit 31".to_string())
}

/// Makes the manifest claim the guest was given `feature`.
fn claim_feature(m: &mut serde_json::Value, (leaf, sub, reg, bit): (u32, u32, &str, u32)) {
    let features = m["host"]["cpu_features"].as_array_mut().unwrap();
    let i = match features
        .iter()
        .position(|f| f["leaf"] == leaf && f["subleaf"] == sub)
    {
        Some(i) => i,
        None => {
            features.push(serde_json::json!({
                "leaf": leaf, "subleaf": sub, "eax": 0, "ebx": 0, "ecx": 0, "edx": 0
            }));
            features.len() - 1
        }
    };
    let v = features[i][reg].as_u64().unwrap() | (1 << bit);
    features[i][reg] = v.into();
}

/// A host kind rewind refuses to restore a snapshot from, here.
fn other_host_kind() -> &'static str {
    if is_pvm_host() {
        "hardware"
    } else {
        "some-future-kind"
    }
}

/// The revert is refused with one line naming `needle`, and the VM runs on
/// untouched: not paused, not reverted (its ticks keep counting up).
fn revert_refused(vm: &VmProcess, name: &str, needle: &str) {
    let before = vm.lines();
    let last = before
        .iter()
        .filter_map(|l| parse_tick(l))
        .map(|t| t.1)
        .max();
    let r = vm.api("PUT", &format!("/snapshots/{name}/revert"), None);
    assert_ne!(r.status, 200, "revert {name} was not refused: {}", r.body);
    let err = r.body["error"].as_str().unwrap_or_default().to_string();
    assert!(
        err.contains(needle),
        "revert {name}: {needle:?} not in {err:?}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(vm.api_ok("GET", "/vm", None)["state"], "running");
    let i = vm.wait_for(before.len(), "a tick after the refused revert", |l| {
        parse_tick(l).is_some()
    });
    let next = parse_tick(&vm.lines()[i]).unwrap().1;
    assert!(
        Some(next) > last,
        "revert {name}: the guest went back to tick {next} after {last:?}"
    );
}

#[test]
fn damaged_bundles_are_refused_by_revert_and_the_vm_runs_on() {
    if !kvm_available("damaged_bundles_revert") {
        return;
    }
    let home = Home::new("badrevert");
    let vm = start_guest(&home, "v", "300", "period_ms=20 region=2", &[]);
    vm.socket_ready();
    vm.wait_for(0, "tick 2", |l| l == "tick 2 ok");
    let snap = |name: &str| {
        vm.api_ok(
            "PUT",
            "/snapshots",
            Some(serde_json::json!({ "name": name })),
        )
    };
    snap("good");
    let k = snapshot_tick(&home, "v", "good");
    let snaps = home.path.join("vms/v/snapshots");

    // The latest snapshot is the baseline a fast revert copies dirty pages
    // from: truncated, it once left the VM paused and half reverted.
    vm.api_ok(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "latest", "full": true })),
    );
    // An incremental snapshot on it: its own layer damaged, then its base.
    let r = snap("inc");
    assert_eq!(r["incremental_on"], "latest", "{r}");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(snaps.join("inc/memory.delta"))
        .unwrap();
    f.set_len(f.metadata().unwrap().len() - 4096).unwrap();
    revert_refused(
        &vm,
        "inc",
        "memory.delta is not a rewind memory layer or is corrupt",
    );
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(snaps.join("latest/memory.bin"))
        .unwrap();
    f.set_len(f.metadata().unwrap().len() / 2).unwrap();
    revert_refused(&vm, "latest", "memory.bin is");

    let variant = |name: &str| {
        let d = snaps.join(name);
        copy_dir(&snaps.join("good"), &d);
        d
    };
    let d = variant("short-memory");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("memory.bin"))
        .unwrap();
    f.set_len(1 << 20).unwrap();
    revert_refused(&vm, "short-memory", "memory.bin is");

    let d = variant("bad-state");
    mutate(&d.join("state.bin"), |b| {
        let n = b.len();
        b[n - 10] ^= 0x55
    });
    revert_refused(&vm, "bad-state", "checksum");

    let d = variant("bad-crc");
    edit_manifest(&d, |m| {
        m["state_crc64"] = (m["state_crc64"].as_u64().unwrap() ^ 1).into()
    });
    revert_refused(&vm, "bad-crc", "state_crc64");
    restore_fails(&home, &d, "state_crc64");

    let d = variant("bad-memlen");
    edit_manifest(&d, |m| {
        m["memory_file_len"] = (m["memory_file_len"].as_u64().unwrap() + 4096).into()
    });
    revert_refused(&vm, "bad-memlen", "memory_file_len");

    let (leaf, sub, reg, bit, feature) = feature_this_host_lacks();
    eprintln!("claiming {feature}, which this host lacks");
    let d = variant("cpu");
    edit_manifest(&d, |m| claim_feature(m, (leaf, sub, reg, bit)));
    revert_refused(&vm, "cpu", &format!("lacks: {feature}"));
    restore_fails(&home, &d, &format!("lacks: {feature}"));

    let d = variant("host-kind");
    edit_manifest(&d, |m| m["host"]["kind"] = other_host_kind().into());
    revert_refused(&vm, "host-kind", other_host_kind());
    restore_fails(&home, &d, other_host_kind());

    // A guest whose TSC ran at another rate would keep time wrongly here.
    let d = variant("tsc");
    edit_manifest(&d, |m| {
        m["host"]["tsc_khz"] = (m["host"]["tsc_khz"].as_u64().unwrap() * 2).into()
    });
    revert_refused(&vm, "tsc", "TSC runs at");
    if is_pvm_host() {
        // KVM_CAP_TSC_CONTROL is 0 here: nothing can scale it either.
        restore_fails(&home, &d, "cannot scale it");
    }

    // After all that, a good snapshot still reverts, exactly.
    let from = vm.lines().len();
    vm.api_ok("PUT", "/snapshots/good/revert", None);
    let i = vm.wait_for(from, &format!("tick {} after the revert", k + 1), |l| {
        parse_tick(l) == Some((0, k + 1))
    });
    vm.wait_for(i, "the tick after", |l| parse_tick(l) == Some((0, k + 2)));
    let lines = vm.lines();
    assert_eq!(vm.stop(), Some(0));
    assert!(!lines.iter().any(|l| l.contains("CORRUPT")), "{lines:?}");
}

fn overlay_files(home: &Home, vm: &str) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = std::fs::read_dir(home.path.join("vms").join(vm).join("disks"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort();
    names
}

/// With a disk: a refused revert makes no overlay and switches none (the
/// guest keeps writing where it did), and the guest's disk checks go on.
#[test]
fn a_refused_revert_keeps_the_disk_overlays() {
    if !kvm_available("refused revert with a disk") {
        return;
    }
    let home = Home::new("badrevertdisk");
    let base = home.path.join("base.img");
    std::fs::write(&base, vec![0x33u8; 8 << 20]).unwrap();
    let vm = start_guest(
        &home,
        "d",
        "300",
        "mode=disk period_ms=50 disk_sectors=512",
        &["--disk", base.to_str().unwrap()],
    );
    vm.socket_ready();
    vm.wait_for(0, "tick 2", |l| first_tick(l) == Some(2));
    vm.api_ok(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "good" })),
    );
    let k = snapshot_tick(&home, "d", "good");
    let snaps = home.path.join("vms/d/snapshots");
    copy_dir(&snaps.join("good"), &snaps.join("short"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(snaps.join("short/memory.bin"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let overlays = overlay_files(&home, "d");
    let from = vm.lines().len();
    let r = vm.api("PUT", "/snapshots/short/revert", None);
    assert_ne!(r.status, 200, "{}", r.body);
    assert!(
        r.body["error"].as_str().unwrap().contains("memory.bin is"),
        "{}",
        r.body
    );
    assert_eq!(overlay_files(&home, "d"), overlays, "the overlays changed");
    assert_eq!(vm.api_ok("GET", "/vm", None)["state"], "running");
    let last = vm.lines()[..from]
        .iter()
        .filter_map(|l| first_tick(l))
        .max();
    let i = vm.wait_for(from, "a disk tick after the refused revert", |l| {
        first_tick(l).is_some() || l.contains("CORRUPT")
    });
    assert!(first_tick(&vm.lines()[i]) > last, "{:?}", vm.lines());

    let from = vm.lines().len();
    vm.api_ok("PUT", "/snapshots/good/revert", None);
    let i = vm.wait_for(from, "the tick after good", |l| {
        first_tick(l) == Some(k + 1) || l.contains("CORRUPT")
    });
    vm.wait_for(i, "the next tick", |l| {
        first_tick(l) == Some(k + 2) || l.contains("CORRUPT")
    });
    let lines = vm.lines();
    assert_eq!(vm.stop(), Some(0));
    assert!(!lines.iter().any(|l| l.contains("CORRUPT")), "{lines:?}");
}
