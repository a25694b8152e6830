//! Long use of one VM: snapshot, revert to it, delete it, over and over (what
//! `rewind bench soak` does to many VMs at once). The VM's disk folder must
//! stay bounded: each cycle used to leave the deleted snapshot's layer behind
//! for good (soak: 100+ files per VM after 2 minutes, and every delete slower
//! than the last), while a snapshot kept from before the churn must still
//! revert with its disk intact.

mod common;
use common::*;

const CYCLES: usize = 24;

fn disk_ok(l: &str) -> bool {
    l.starts_with("tick ") && l.ends_with(" disk ok")
}

#[test]
fn snapshot_revert_delete_cycles_leave_a_bounded_disk_folder() {
    if !kvm_available("churn") {
        return;
    }
    let home = Home::new("churn");
    let disk = home.path.join("base.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let vm = start_guest(
        &home,
        "c",
        "300",
        "mode=disk period_ms=20 disk_sectors=64",
        &["--mem", "64", "--disk", disk.to_str().unwrap()],
    );
    vm.wait_for(0, "a disk tick", disk_ok);
    vm.api_ok(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "keep" })),
    );
    for k in 0..CYCLES {
        let name = format!("k{k}");
        let seen = vm.lines().len();
        vm.wait_for(seen, "a disk tick", disk_ok);
        vm.api_ok(
            "PUT",
            "/snapshots",
            Some(serde_json::json!({ "name": name })),
        );
        vm.api_ok("PUT", &format!("/snapshots/{name}/revert"), None);
        vm.api_ok("DELETE", &format!("/snapshots/{name}"), None);
    }
    let disks = home.path.join("vms/c/disks");
    let files = files_in(&disks);
    // A chain is at most COLLAPSE_DEPTH (16) layers; beside it only the kept
    // snapshot's layer and the live overlay.
    assert!(
        files.len() <= 16 + 2,
        "{} files after {CYCLES} cycles: {files:#?}",
        files.len()
    );

    let seen = vm.lines().len();
    vm.api_ok("PUT", "/snapshots/keep/revert", None);
    let after = vm.wait_for(seen, "a disk tick after reverting to keep", disk_ok);
    vm.wait_for(after + 1, "another disk tick", disk_ok);
    let (status, lines) = vm.stop_and_collect();
    assert_eq!(status, Some(0));
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("CORRUPT") || l.starts_with("DISK-")),
        "{lines:#?}"
    );
    check_vm_disks(&home.path, "c");
}
