//! Seccomp: every kind of thread in a VM's process runs under its filter,
//! and a call outside its list ends the process with one line and status
//! 159 (128 + SIGSYS). The test hook REWIND_TEST_SECCOMP_PROBE=KIND makes
//! that thread attempt chroot(2), which no list allows and which is
//! harmless when let through. The rest of the suite runs with the filters
//! on, which is what shows the lists are complete.

mod common;
use common::*;

/// Runs the test guest until its third tick, with the probe in `kind`.
fn probe(home: &Home, kind: &str, extra: &[&str]) -> std::process::Output {
    let mut c = home.cmd();
    c.env("REWIND_TEST_SECCOMP_PROBE", kind)
        .args(["run"])
        .args(extra)
        .args([
            "--console",
            "stdio",
            "--timeout",
            "30",
            "--append",
            "period_ms=20 region=2",
            "--expect",
            "^tick 3 ok$",
        ]);
    c.output().unwrap()
}

#[test]
fn a_forbidden_call_ends_the_vm_in_every_kind_of_thread() {
    if !kvm_available("seccomp_probe") {
        return;
    }
    let home = Home::new("seccomp");
    for kind in ["vcpu", "console", "vmm", "mem-upkeep"] {
        let o = probe(&home, kind, &[]);
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(o.status.code(), Some(159), "{kind}: {err}");
        let needle = format!("rewind: seccomp: the {kind} thread made system call 161,");
        assert!(err.contains(&needle), "{kind}: {needle:?} not in: {err}");
        assert!(
            !stdout(&o).contains("tick 3 ok"),
            "{kind}: the guest ran on"
        );
    }
}

/// A vCPU thread may make ioctls, but only KVM's.
#[test]
fn a_vcpu_thread_is_refused_an_ioctl_that_is_not_kvms() {
    if !kvm_available("seccomp_ioctl") {
        return;
    }
    let home = Home::new("seccomp-ioctl");
    let o = probe(&home, "vcpu-ioctl", &[]);
    assert_eq!(o.status.code(), Some(159), "{}", stderr(&o));
    let needle = "rewind: seccomp: the vcpu thread made system call 16,";
    assert!(stderr(&o).contains(needle), "{}", stderr(&o));
    let o = probe(&home, "vcpu-ioctl", &["--no-seccomp"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn no_seccomp_lets_the_same_call_through() {
    if !kvm_available("seccomp_off") {
        return;
    }
    let home = Home::new("noseccomp");
    for kind in ["vcpu", "console", "vmm"] {
        let o = probe(&home, kind, &["--no-seccomp"]);
        assert_eq!(o.status.code(), Some(0), "{kind}: {}", stderr(&o));
        assert!(stdout(&o).contains("tick 3 ok"), "{}", stdout(&o));
        assert!(!stderr(&o).contains("seccomp"), "{}", stderr(&o));
    }
}

/// `rewind fuzz` runs the guest on its main thread once the target is
/// booted; that thread is filtered too.
#[test]
fn the_fuzzer_thread_is_filtered() {
    if !kvm_available("seccomp_fuzzer") {
        return;
    }
    let home = Home::new("seccomp-fuzz");
    let crash = home.path.join("crash.bin");
    let fuzz = |extra: &[&str]| {
        let mut c = home.cmd();
        c.env("REWIND_TEST_SECCOMP_PROBE", "fuzzer")
            .args(extra)
            .args(["fuzz", "--guest", "test", "--seed", "7", "--output"])
            .arg(&crash);
        c.output().unwrap()
    };
    let o = fuzz(&[]);
    assert_eq!(o.status.code(), Some(159), "{}", stderr(&o));
    let needle = "rewind: seccomp: the fuzzer thread made system call 161,";
    assert!(stderr(&o).contains(needle), "{}", stderr(&o));
    assert!(!crash.exists());
    let o = fuzz(&["--no-seccomp"]);
    assert!(stdout(&o).contains("crash found"), "{}", stderr(&o));
    assert!(crash.exists());
}
