//! Real `kill -9` during commit + rebase: the test binary re-executes itself to run the merge in
//! a child process, kills it after a varying delay, and checks the chain each time.

use super::*;
use crate::disk::{
    backing_chain, cleanup_temps, commit, create_overlay, rebase, Disk, ImageFormat,
};
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

const HELPER_ENV: &str = "REWIND_DISK_KILL_HELPER_DIR";
const SIZE: u64 = 64 * MIB;

/// The whole delete-interior-snapshot procedure, as the main crate would run it.
fn delete_o2(dir: &Path) {
    commit(&dir.join("o2.qcow2"), &dir.join("o1.qcow2")).unwrap();
    rebase(&dir.join("o3.qcow2"), Path::new("o1.qcow2")).unwrap();
    fs::remove_file(dir.join("o2.qcow2")).unwrap();
}

#[test]
#[ignore = "child process of commit_survives_kill_9; does nothing when run directly"]
fn kill_helper() {
    let Some(dir) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let mut out = std::io::stdout();
    writeln!(out, "HELPER-START").unwrap();
    out.flush().unwrap();
    delete_o2(Path::new(&dir));
    writeln!(out, "HELPER-DONE").unwrap();
}

fn build(dir: &TestDir) -> Vec<u8> {
    let base = dir.join("base.raw");
    let mut model = make_raw(&base, SIZE, 77);
    for (i, name) in ["o1.qcow2", "o2.qcow2", "o3.qcow2"].iter().enumerate() {
        let below = if i == 0 {
            "base.raw".to_string()
        } else {
            format!("o{i}.qcow2")
        };
        let fmt = if i == 0 {
            ImageFormat::Raw
        } else {
            ImageFormat::Qcow2
        };
        let path = dir.join(name);
        create_overlay(&path, Path::new(&below), fmt, SIZE).unwrap();
        let disk = Disk::open(&path).unwrap();
        // Enough scattered data in o2 (and o3, which gets rebased) that the merge takes a while.
        let (count, len) = if i == 0 { (8, 65536) } else { (96, 200_000) };
        for k in 0..count {
            // o1's writes sit in gaps o2 does not cover, so a commit that drops either layer's
            // data is visible.
            let off = if i == 0 {
                k as u64 * 7 * MIB + 3 * MIB + 333_333
            } else {
                (k as u64 * 655_361 + i as u64 * 12_345) % (SIZE / 2)
            };
            let data = pattern(len, (i * 1000 + k) as u64);
            disk.write_at(&data, off).unwrap();
            model_write(&mut model, off, &data);
        }
        drop(disk);
    }
    model
}

fn copy_dir(from: &Path, to: &Path) {
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn commit_survives_kill_9() {
    let template = TestDir::new("kill-template");
    let model = build(&template);
    let test_name = concat!(module_path!(), "::kill_helper")
        .split_once("::")
        .map(|(_, rest)| rest)
        .unwrap();
    let exe = std::env::current_exe().unwrap();

    let (mut interrupted, mut finished) = (0, 0);
    for delay_ms in [0u64, 1, 2, 4, 6, 9, 13, 18, 25, 35, 50, 70, 100, 140, 200] {
        let dir = TestDir::new("kill-run");
        copy_dir(template.path(), dir.path());
        let mut child = Command::new(&exe)
            .args([
                test_name,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            let line = lines
                .next()
                .expect("helper exited before starting")
                .unwrap();
            if line.contains("HELPER-START") {
                break;
            }
        }
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let rest: Vec<String> = lines.map_while(|l| l.ok()).collect();
        if rest.iter().any(|l| l.contains("HELPER-DONE")) {
            finished += 1;
        } else {
            interrupted += 1;
        }

        let top = dir.join("o3.qcow2");
        let chain: Vec<PathBuf> = backing_chain(&top)
            .unwrap()
            .into_iter()
            .map(|c| c.0)
            .collect();
        assert!(
            read_view(&top) == model,
            "after kill at {delay_ms} ms (elapsed {:?}) o3 reads wrong data; chain {chain:?}",
            started.elapsed()
        );
        for f in &chain[..chain.len() - 1] {
            qemu_check(f);
        }
        // Recover: drop temp files and finish (or redo) whatever was interrupted.
        cleanup_temps(dir.path()).unwrap();
        if dir.join("o2.qcow2").exists() {
            delete_o2(dir.path());
        }
        assert!(
            read_view(&top) == model,
            "after recovery from kill at {delay_ms} ms"
        );
        qemu_check(&top);
        qemu_check(&dir.join("o1.qcow2"));
    }
    eprintln!("kill -9: {interrupted} runs interrupted mid-procedure, {finished} finished first");
    assert!(
        interrupted > 0,
        "no kill landed inside the procedure; the test proves nothing"
    );
}
