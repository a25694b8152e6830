//! Builds the embedded test guest (guest-images/testguest) with the system's
//! gcc and ld, so `rewind run --guest test` needs no file at run time.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const SOURCES: &[&str] = &[
    "entry.S",
    "main.c",
    "virtio_blk.c",
    "virtio_blk.h",
    "hostile.c",
    "testguest.h",
    "fuzz.c",
    "link.ld",
];
/// Ring-3 C files, compiled with the same freestanding flags.
const C_FILES: &[&str] = &["main.c", "virtio_blk.c", "hostile.c", "fuzz.c"];

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {:?} (is gcc/binutils installed?): {e}", cmd));
    assert!(status.success(), "test guest build step failed: {:?}", cmd);
}

fn main() {
    let src = PathBuf::from("guest-images/testguest");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for file in SOURCES {
        println!("cargo:rerun-if-changed={}", src.join(file).display());
    }
    let entry_o = out.join("entry.o");
    let elf = out.join("testguest.elf");
    run(Command::new("gcc")
        .args(["-c", "-o"])
        .arg(&entry_o)
        .arg(src.join("entry.S")));
    let mut objects = vec![entry_o];
    for file in C_FILES {
        let obj = out.join(file.replace(".c", ".o"));
        run(Command::new("gcc")
            .args([
                "-c",
                "-O2",
                "-ffreestanding",
                "-fno-pic",
                "-fno-pie",
                "-mgeneral-regs-only",
                "-mno-red-zone",
                "-fno-stack-protector",
                "-fno-asynchronous-unwind-tables",
                "-fno-builtin",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-o",
            ])
            .arg(&obj)
            .arg(src.join(file)));
        objects.push(obj);
    }
    run(Command::new("ld")
        .args(["-nostdlib", "-static", "--no-warn-rwx-segments", "-T"])
        .arg(src.join("link.ld"))
        .arg("-o")
        .arg(&elf)
        .args(&objects));
}
