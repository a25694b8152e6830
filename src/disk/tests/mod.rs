//! Shared helpers for the disk tests: temp dirs, deterministic data, and the real `qemu-img`
//! as an independent judge of every file we write.

mod chain;
mod commit;
mod kill;
mod overlay;

use super::chain::open_chain;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub(crate) const MIB: u64 = 1 << 20;

pub(crate) use crate::fsutil::tests::TestDir;

/// Deterministic, non-repeating bytes so misplaced data cannot accidentally compare equal.
pub(crate) fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Raw image filled with `pattern(size, seed)`, except for a zero hole in the middle so that
/// exports have something to turn into holes.
pub(crate) fn make_raw(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let mut data = pattern(size as usize, seed);
    let hole = size as usize / 2;
    data[hole..hole + (size as usize / 8)].fill(0);
    fs::write(path, &data).unwrap();
    data
}

pub(crate) fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

pub(crate) fn hash_file(path: &Path) -> u64 {
    fnv1a(&fs::read(path).unwrap())
}

/// Everything the chain under `top` shows, read through our own code.
pub(crate) fn read_view(top: &Path) -> Vec<u8> {
    let view = open_chain(top, false).unwrap();
    let mut buf = vec![0u8; view.size() as usize];
    view.read(&mut buf[..], 0).unwrap();
    buf
}

/// Applies a write to a model of the disk contents.
pub(crate) fn model_write(model: &mut [u8], offset: u64, data: &[u8]) {
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

/// Whether the real qemu-img is available. Missing qemu-img skips the cross-checks loudly, but
/// fails under CI=true, where a silently skipped oracle would make the suite meaningless.
pub(crate) fn have_qemu_img() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| {
        let ok = Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "qemu-img is required when CI=true"
            );
            eprintln!("!!!!! SKIPPING qemu-img cross-checks: qemu-img not found in PATH !!!!!");
        }
        ok
    })
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `qemu-img check` must report no errors and no leaks (it exits non-zero for either).
pub(crate) fn qemu_check(path: &Path) {
    if !have_qemu_img() {
        return;
    }
    let p = path.to_str().unwrap();
    let out = qemu_img(&["check", "-f", "qcow2", p]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("No errors were found"), "{p}: {text}");
}

/// Filenames `qemu-img info --backing-chain` reports, top first.
pub(crate) fn qemu_chain(top: &Path) -> Option<Vec<PathBuf>> {
    if !have_qemu_img() {
        return None;
    }
    let out = qemu_img(&[
        "info",
        "--backing-chain",
        "--output=json",
        "-U",
        top.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Some(
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| PathBuf::from(i["filename"].as_str().unwrap()))
            .collect(),
    )
}

/// qemu's own flattening of the chain, the reference for `export_flat`.
pub(crate) fn qemu_convert_raw(top: &Path, out: &Path) -> bool {
    if !have_qemu_img() {
        return false;
    }
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        top.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    true
}
