//! Bad input: one clear line on stderr, status 2 (usage) or 1 (runtime),
//! never a panic.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::process::Output;

fn assert_one_line_error(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert!(!err.contains("panicked"), "{err}");
    let line = one_line_error(o, code, needle);
    assert!(line.starts_with("rewind: "), "{err}");
}

#[test]
fn missing_unreadable_and_non_kernel_files() {
    if !kvm_available("bad_kernel") {
        return;
    }
    let home = Home::new("badk");
    let o = home.run(&[
        "run",
        "--name",
        "x",
        "--console",
        "none",
        "--kernel",
        "/nonexistent/vmlinux",
    ]);
    assert_one_line_error(&o, 2, "cannot open kernel /nonexistent/vmlinux");

    let not_kernel = home.path.join("notakernel");
    std::fs::write(&not_kernel, b"hello, I am a text file\n").unwrap();
    let o = home.run(&[
        "run",
        "--name",
        "x",
        "--console",
        "none",
        "--kernel",
        not_kernel.to_str().unwrap(),
    ]);
    assert_one_line_error(&o, 2, "is not a kernel rewind can boot");

    let empty = home.path.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let o = home.run(&[
        "run",
        "--name",
        "x",
        "--console",
        "none",
        "--kernel",
        empty.to_str().unwrap(),
    ]);
    assert_one_line_error(&o, 2, "is not a kernel");

    let dir = home.path.join("adir");
    std::fs::create_dir(&dir).unwrap();
    let o = home.run(&[
        "run",
        "--name",
        "x",
        "--console",
        "none",
        "--kernel",
        dir.to_str().unwrap(),
    ]);
    assert_one_line_error(&o, 2, "adir");

    let o = home.run(&[
        "run",
        "--name",
        "x",
        "--console",
        "none",
        "--kernel",
        not_kernel.to_str().unwrap(),
        "--initrd",
        "/nonexistent/initrd",
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn memory_and_cpu_limits() {
    if !kvm_available("limits") {
        return;
    }
    let home = Home::new("limits");
    let o = home.run(&["run", "--name", "x", "--console", "none", "--mem", "0"]);
    assert_one_line_error(&o, 2, "--mem must be at least");
    let o = home.run(&[
        "run",
        "--name",
        "x",
        "--console",
        "none",
        "--mem",
        "99999999",
    ]);
    assert_one_line_error(&o, 2, "more than this host can give");
    let o = home.run(&["run", "--name", "x", "--console", "none", "--cpus", "0"]);
    assert_one_line_error(&o, 2, "--cpus must be at least 1");
    let o = home.run(&["run", "--name", "x", "--console", "none", "--cpus", "1000"]);
    assert_one_line_error(&o, 2, "--cpus 1000 is more than");
    let o = home.run(&["run", "--name", "../evil", "--console", "none"]);
    assert_one_line_error(&o, 2, "invalid VM name");
    let o = home.run(&["run", "--console", "none", "--timeout", "0"]);
    assert_one_line_error(&o, 2, "--timeout must be a positive");
    let o = home.run(&["run", "--console", "none", "--expect", "("]);
    assert_one_line_error(&o, 2, "--expect is not a valid regex");
    // clap's own usage errors exit 2 too.
    let o = home.run(&["run", "--mem", "lots"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn no_kvm_device_and_no_permission() {
    if !kvm_available("no_kvm") {
        return;
    }
    let home = Home::new("nokvm");
    // Hide /dev/kvm in a private mount namespace (needs root and unshare).
    let o = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && exec {BIN} run --name x --console none --timeout 5"
        ))
        .env("REWIND_HOME", &home.path)
        .output();
    match o {
        Ok(o) if !stderr(&o).contains("unshare failed") && !stderr(&o).contains("mount:") => {
            assert_one_line_error(&o, 1, "cannot open /dev/kvm");
        }
        _ => eprintln!("SKIPPED no_kvm_device part: cannot make a private mount namespace here"),
    }
    // An unprivileged user cannot open a root-only /dev/kvm.
    let mode = std::fs::metadata("/dev/kvm")
        .map(|m| m.permissions().mode())
        .unwrap_or(0);
    if mode & 0o006 == 0 {
        let nobody_home = home.path.join("nobody");
        std::fs::create_dir(&nobody_home).unwrap();
        std::fs::set_permissions(&nobody_home, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(&home.path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let o = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                BIN,
                "run",
                "--name",
                "x",
                "--console",
                "none",
                "--timeout",
                "5",
            ])
            .env("REWIND_HOME", &nobody_home)
            .output();
        match o {
            Ok(o) => assert_one_line_error(&o, 1, "cannot open /dev/kvm"),
            Err(e) => eprintln!("SKIPPED no-permission part: setpriv unavailable: {e}"),
        }
    } else {
        eprintln!("SKIPPED no-permission part: /dev/kvm is world-accessible here");
    }
}

#[test]
fn missing_disk_bad_console_and_unknown_vm_are_usage_errors() {
    if !kvm_available("bad paths") {
        return;
    }
    let home = Home::new("badpaths");
    let o = home.run(&[
        "run",
        "--name",
        "x",
        "--console",
        "none",
        "--timeout",
        "10",
        "--disk",
        "/nonexistent/disk.img",
    ]);
    assert_one_line_error(&o, 2, "/nonexistent/disk.img is missing");
    let o = home.run(&[
        "run",
        "--name",
        "x",
        "--console",
        "/nonexistent/dir/console.log",
        "--timeout",
        "10",
    ]);
    assert_one_line_error(&o, 2, "--console /nonexistent/dir/console.log");
    for cmd in ["stop", "pause", "resume"] {
        let o = home.run(&[cmd, "--vm", "nosuchvm"]);
        assert_one_line_error(&o, 2, "no VM named \"nosuchvm\" is running");
    }
    let o = home.run(&["exec", "--vm", "nosuchvm", "true"]);
    assert_one_line_error(&o, 2, "no VM named \"nosuchvm\" is running");
    // Nothing was left behind by the refused runs.
    let left: Vec<_> = std::fs::read_dir(home.path.join("vms"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
