//! A Linux guest on an ext4 root disk (built by the image recipe from
//! Debian's busybox-static): files written before a snapshot survive a revert,
//! files written after it are gone, and the snapshot's disk layer, exported,
//! is a clean ext4 filesystem that holds exactly those files. The base image
//! is never written; every qcow2 rewind made passes `qemu-img check`.

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn qcow2_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            qcow2_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "qcow2") {
            out.push(p);
        }
    }
}

/// The image is what a power cut at the snapshot would leave: once its
/// journal is replayed (what mounting it does), e2fsck -fn finds nothing and
/// debugfs reads `files` out of it.
fn check_ext4(image: &Path, files: &[(&str, Option<&str>)]) {
    let img = image.to_str().unwrap();
    let Some(o) = host_tool("e2fsck", &["-y", "-E", "journal_only", img]) else {
        return;
    };
    assert!(
        matches!(o.status.code(), Some(0 | 1)),
        "journal replay of {img}:\n{}{}",
        stdout(&o),
        stderr(&o)
    );
    let o = host_tool("e2fsck", &["-fn", img]).unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "e2fsck -fn {img}:\n{}{}",
        stdout(&o),
        stderr(&o)
    );
    for (path, want) in files {
        let o = host_tool("debugfs", &["-R", &format!("cat {path}"), img]).unwrap();
        match want {
            Some(text) => assert_eq!(stdout(&o), *text, "{path} in {img}: {}", stderr(&o)),
            None => assert!(
                stdout(&o).is_empty() && stderr(&o).contains("File not found"),
                "{path} should not exist in {img}: {}{}",
                stdout(&o),
                stderr(&o)
            ),
        }
    }
}

#[test]
fn ext4_root_disk_reverts_with_the_snapshot() {
    if !kvm_available("linux ext4 root disk") {
        return;
    }
    let img = rewind::images::linux_images()
        .expect("the Linux guest images build (guest-images/linux/build.sh)");
    let home = Home::new("linuxdisk");
    let base = home.path.join("root.ext4");
    std::fs::copy(img.rootfs(), &base).unwrap();
    let pristine = std::fs::read(img.rootfs()).unwrap();
    let (vm, _) = boot_linux(
        &home,
        "rd",
        &[
            "--kernel",
            img.microvm().to_str().unwrap(),
            "--disk",
            base.to_str().unwrap(),
            "--root",
        ],
        &[
            "virtio_blk virtio0: [vda]",
            "EXT4-fs (vda): mounted filesystem",
            "VFS: Mounted root (ext4 filesystem)",
        ],
    );

    let exec = |cmd: &str| {
        let o = home.run(&["exec", "--vm", "rd", "--timeout", "300", cmd]);
        assert_eq!(o.status.code(), Some(0), "{cmd}: {}", stderr(&o));
        stdout(&o)
    };
    // Crash-consistent snapshots: `sync` puts the data and the journal on
    // the disk; the filesystem itself is never frozen (with `fsfreeze` the
    // guest hung in the thaw here, see the issue notes).
    assert_eq!(
        exec("echo first > /kept && echo 1 > /counter && sync && echo synced"),
        "synced\n"
    );
    let o = home.run(&["snapshot", "create", "s1", "--vm", "rd"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        exec("echo second > /lost && echo 2 > /counter && sync && echo written"),
        "written\n"
    );
    let o = home.run(&["snapshot", "revert", "s1", "--vm", "rd"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let check =
        "cat /kept /counter && if [ -e /lost ]; then echo lost-present; else echo lost-absent; fi";
    assert_eq!(exec(check), "first\n1\nlost-absent\n");
    // Guest-side throughput through the overlay (information, not a test;
    // on PVM hosts it measures the emulated guest kernel, not the disk).
    let dd = exec("{ time dd if=/dev/zero of=/dd.bin bs=64k count=16 conv=fsync; } 2>&1 && { time dd if=/dev/vda of=/dev/null bs=64k count=64; } 2>&1 && rm /dd.bin && sync");
    eprintln!("dd in the guest (write 1 MiB with fsync, read 4 MiB of vda):\n{dd}");
    assert_eq!(vm.stop(), Some(0));

    let snap = home.path.join("s1.raw");
    let o = home.run(&[
        "disk",
        "export",
        "--snapshot",
        "s1",
        "--vm",
        "rd",
        snap.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    check_ext4(
        &snap,
        &[
            ("/kept", Some("first\n")),
            ("/counter", Some("1\n")),
            ("/lost", None),
        ],
    );
    let now = home.path.join("now.raw");
    let o = home.run(&["disk", "export", "--vm", "rd", now.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    check_ext4(
        &now,
        &[
            ("/kept", Some("first\n")),
            ("/counter", Some("1\n")),
            ("/lost", None),
        ],
    );

    assert!(
        std::fs::read(&base).unwrap() == pristine,
        "the base image was written"
    );
    let mut layers = Vec::new();
    qcow2_files(&home.path, &mut layers);
    assert!(layers.len() >= 2, "overlays: {layers:?}");
    for layer in layers {
        if let Some(o) = host_tool("qemu-img", &["check", layer.to_str().unwrap()]) {
            assert_eq!(
                o.status.code(),
                Some(0),
                "qemu-img check {}: {}{}",
                layer.display(),
                stdout(&o),
                stderr(&o)
            );
        }
    }
}
