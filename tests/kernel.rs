//! Any test kernel: `--initrd DIR` packed as a newc cpio, and one-line
//! diagnoses when a kernel dies early or prints nothing, checked with tiny
//! bogus kernels made here (never by booting Linux).

mod common;
use common::*;
use std::path::Path;

const LOAD_AT: u64 = 0x100_0000;

/// A minimal x86-64 ELF executable with `code` at its entry and no notes
/// (so no PVH note): one PT_LOAD segment at 16 MiB.
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let code_at = 64 + 56;
    let total = (code_at + code.len()) as u64;
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(LOAD_AT + code_at as u64).to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [0, LOAD_AT, LOAD_AT, total, total, 0x1000u64] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(code);
    e
}

fn write_kernel(dir: &Path, name: &str, code: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, tiny_elf(code)).unwrap();
    p.to_str().unwrap().to_string()
}

/// The rewind lines on stderr, the PVM host's notices aside.
fn rewind_lines(o: &std::process::Output) -> Vec<String> {
    stderr(o)
        .lines()
        .filter(|l| !l.contains("PVM host"))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_kernel_that_dies_silently_is_diagnosed_in_one_line() {
    if !kvm_available("kernel diagnoses") {
        return;
    }
    let home = Home::new("kdiag");
    // ud2 with no IDT: a triple fault before any output.
    let k = write_kernel(&home.path, "ud2.elf", &[0x0f, 0x0b]);
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--name",
            "kd",
            "--kernel",
            &k,
            "--console",
            "none",
            "--timeout",
            "60",
        ];
        args.extend_from_slice(extra);
        home.run(&args)
    };
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let lines = rewind_lines(&o);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines[0].contains("triple fault"), "{lines:#?}");
    assert!(
        lines[1].starts_with("rewind: the kernel printed nothing: ")
            && lines[1].contains("ud2.elf is an ELF without a PVH note")
            && lines[1].contains("not a bzImage"),
        "{lines:#?}"
    );

    let o = run(&["--cmdline", "quiet"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let lines = rewind_lines(&o);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(
        lines[1]
            .starts_with("rewind: the kernel printed nothing and its command line has no console="),
        "{lines:#?}"
    );

    // Garbage: refused before anything runs, one line, status 2.
    let junk = home.path.join("junk");
    std::fs::write(&junk, vec![0x5a; 4096]).unwrap();
    let o = home.run(&[
        "run",
        "--kernel",
        junk.to_str().unwrap(),
        "--console",
        "none",
    ]);
    one_line_error(&o, 2, "is not a kernel rewind can boot");
}

/// `--initrd DIR`: the directory is packed as a newc cpio and placed in
/// guest memory where the zero page says; the archive holds the files.
#[test]
fn an_initrd_directory_is_packed_as_newc_cpio() {
    if !kvm_available("initrd directory") {
        return;
    }
    let home = Home::new("initrddir");
    let dir = home.path.join("initrd");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(
        dir.join("bin/test-program"),
        b"#!/bin/sh\necho from-the-initrd\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("bin/test-program", dir.join("init")).unwrap();
    let archive = rewind::arch::cpio::pack_dir(&dir).unwrap();

    // An independent reader of the format: busybox's cpio lists the files.
    let cpio_file = home.path.join("packed.cpio");
    std::fs::write(&cpio_file, &archive).unwrap();
    if host_tool("busybox", &["true"]).is_some() {
        let list = format!("busybox cpio -t < {}", cpio_file.display());
        let o = host_tool("sh", &["-c", &list]).unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert_eq!(stdout(&o), "bin\nbin/test-program\ninit\n");
    }

    // cli; hlt; jmp back: a kernel that waits quietly, to be snapshotted.
    let k = write_kernel(&home.path, "hlt.elf", &[0xfa, 0xf4, 0xeb, 0xfd]);
    let vm = VmProcess::start(
        &home,
        "ird",
        &[
            "run",
            "--name",
            "ird",
            "--kernel",
            &k,
            "--initrd",
            dir.to_str().unwrap(),
            "--mem",
            "64",
            "--console",
            "none",
            "--timeout",
            "60",
        ],
    );
    vm.socket_ready();
    vm.api_ok(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "s" })),
    );
    assert_eq!(vm.stop(), Some(0));
    let mem = std::fs::read(home.path.join("vms/ird/snapshots/s/memory.bin")).unwrap();
    // The zero page (at 0x7000) says where the initrd is and how long.
    let zp = 0x7000;
    let image = u32::from_le_bytes(mem[zp + 0x218..zp + 0x21c].try_into().unwrap()) as usize;
    let size = u32::from_le_bytes(mem[zp + 0x21c..zp + 0x220].try_into().unwrap()) as usize;
    assert_eq!(size, archive.len());
    assert!(
        mem[image..image + size] == archive[..],
        "the guest's initrd is not the archive"
    );
}

/// The fragment shipped for developers' own kernels sets nothing the
/// tested microvm kernel does not set the same way.
#[test]
fn rewind_config_agrees_with_the_tested_microvm_config() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-images/linux");
    let options = |name: &str| -> Vec<String> {
        std::fs::read_to_string(dir.join(name))
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("CONFIG_"))
            .map(str::to_string)
            .collect()
    };
    let tested = options("microvm.config");
    let shipped = options("rewind.config");
    assert!(shipped.len() > 20, "{shipped:?}");
    for line in &shipped {
        assert!(tested.contains(line), "{line} is not in microvm.config");
    }
    for needed in [
        "CONFIG_SERIAL_8250_CONSOLE=y",
        "CONFIG_VIRTIO_MMIO=y",
        "CONFIG_PVH=y",
        "CONFIG_BLK_DEV_INITRD=y",
    ] {
        assert!(shipped.iter().any(|l| l == needed), "{needed}");
    }
}
