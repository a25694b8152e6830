//! End-to-end tests on a real Linux kernel nobody here wrote (Debian's
//! linux-source-6.1 built as the microvm kernel, and Debian's stock cloud
//! kernel), booted once per scenario. On PVM hosts Linux's ring-0 code is
//! emulated, so a boot takes minutes; the checks are the kernel's own
//! milestones on the console and commands run through the guest agent.

mod common;
use common::*;
use std::time::Instant;

fn images() -> rewind::images::LinuxImages {
    rewind::images::linux_images()
        .expect("the Linux guest images build (guest-images/linux/build.sh)")
}

/// One boot of the microvm kernel: milestones, then commands through the
/// agent (output, stderr, exit status, files), then a snapshot at the shell
/// that is reverted in place and restored in a new process: the file written
/// before it is there, the one written after is not, and the guest's clock
/// has not gone backwards.
#[test]
fn microvm_kernel_boots_and_runs_commands() {
    if !kvm_available("linux microvm") {
        return;
    }
    let img = images();
    let home = Home::new("linux");
    let (kernel, initrd) = (img.microvm(), img.initramfs());
    let (vm, _) = boot_linux(
        &home,
        "lx",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
        ],
        &[
            "Linux version 6.1",
            "Hypervisor detected: KVM",
            "found SMP MP-table",
            "serial8250: ttyS0 at I/O 0x3f8",
            "Run /init as init process",
        ],
    );
    // Pipelines of freshly exec'd programs running side by side: on PVM hosts
    // glibc used AVX2 there, which the guest kernel does not preserve across
    // task switches, and 2 in 15 of these died (`segfault at 0 ip 4a4d02`)
    // until rewind told the guest's glibc to keep to SSE.

    let exec = |vm: &str, cmd: &str| home.run(&["exec", "--vm", vm, "--timeout", "300", cmd]);
    let o = exec("lx", "echo $((6*7))");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "42\n");
    let o = exec(
        "lx",
        "i=0; while [ $i -lt 8 ]; do cat /proc/version | wc -c; i=$((i+1)); done",
    );
    assert_eq!(stderr(&o), "", "exec'd programs failed");
    let out = stdout(&o);
    let counts: Vec<&str> = out.lines().collect();
    assert_eq!(counts.len(), 8, "{out}");
    assert!(
        counts
            .iter()
            .all(|c| *c == counts[0] && c.parse::<u32>().is_ok_and(|n| n > 50)),
        "{out}"
    );
    assert_eq!(o.status.code(), Some(0));
    let o = exec("lx", "echo to-stderr >&2; exit 7");
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(stderr(&o), "to-stderr\n");
    // Shell builtins only (see above). One exec: each costs seconds of
    // emulated kernel work here (fork, pipes, the agent's pumps).
    let o = exec(
        "lx",
        "n=0; while read -r k rest; do case $k in processor) n=$((n+1));; esac; done < /proc/cpuinfo; echo before-snapshot > /tmp/marker && read -r up idle < /proc/uptime && echo $n $up",
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (cpus, uptime) = stdout(&o)
        .trim()
        .split_once(' ')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap();
    assert_eq!(cpus, "1");
    assert!(uptime.parse::<f64>().unwrap() > 0.0, "{uptime}");
    let o = exec("lx", "read -r m < /tmp/marker; echo $m");
    assert_eq!(stdout(&o), "before-snapshot\n", "{}", stderr(&o));
    let uptime: f64 = uptime.parse().unwrap();

    let o = home.run(&["snapshot", "create", "shell", "--vm", "lx"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = exec("lx", "echo after-snapshot > /tmp/marker && echo written");
    assert_eq!(stdout(&o), "written\n", "{}", stderr(&o));
    // Builtins only: the marker's content and the guest's monotonic clock.
    let check = "read -r m < /tmp/marker; read -r up idle < /proc/uptime; echo $m $up";
    let seen = |o: &std::process::Output| -> (String, f64) {
        assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
        let out = stdout(o);
        let (m, up) = out.trim().split_once(' ').expect("marker and uptime");
        (m.to_string(), up.parse().expect("uptime is a number"))
    };

    let o = home.run(&["snapshot", "revert", "shell", "--vm", "lx"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (m, up) = seen(&exec("lx", check));
    assert_eq!(m, "before-snapshot", "in-place revert");
    assert!(
        up >= uptime,
        "clock went backwards after revert: {up} < {uptime}"
    );

    // A fresh process, while the original still runs: a clone.
    let clone = VmProcess::start(
        &home,
        "lx2",
        &[
            "restore",
            "shell",
            "--vm",
            "lx",
            "--name",
            "lx2",
            "--console",
            "stdio",
            "--timeout",
            "1500",
        ],
    );
    clone.socket_ready();
    assert_eq!(vm.stop(), Some(0));
    let (m, up) = seen(&exec("lx2", check));
    assert_eq!(m, "before-snapshot", "restore in a new process");
    assert!(
        up >= uptime,
        "clock went backwards after restore: {up} < {uptime}"
    );

    // `poweroff` in the guest ends the VM with status 0. The agent may or may
    // not get its answer out before the VM is gone, so only the VM's own
    // status counts.
    let _ = exec("lx2", "poweroff");
    let (status, lines) = clone.wait_exit();
    assert_eq!(status, Some(0), "{}", lines.join("\n"));
    assert!(
        lines
            .iter()
            .any(|l| l.contains("reboot: System halted") || l.contains("reboot: Power down")),
        "{}",
        lines.join("\n")
    );
}

/// `rewind run --exec` boots, runs the command, streams its output and
/// exits with its status; with `--boot-cache` the first run fills the cache
/// at REWIND-READY and the second restores it instead of booting.
#[test]
fn run_exec_with_boot_cache() {
    if !kvm_available("linux run --exec") {
        return;
    }
    let img = images();
    let home = Home::new("linuxexec");
    let cache = home.path.join("boot-cache");
    let run = || {
        let t = Instant::now();
        let o = home
            .cmd()
            .env("REWIND_BOOT_CACHE", &cache)
            .args([
                "run",
                "--boot-cache",
                "--kernel",
                img.microvm().to_str().unwrap(),
                "--initrd",
                img.initramfs().to_str().unwrap(),
                "--console",
                "none",
                "--timeout",
                "1500",
                "--exec",
                "echo $((6*7)); exit 7",
            ])
            .output()
            .unwrap();
        (o, t.elapsed())
    };
    let (o, booted) = run();
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert_eq!(stdout(&o), "42\n");
    assert!(
        stderr(&o).contains("booted guest cached in"),
        "{}",
        stderr(&o)
    );
    let (o, restored) = run();
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert_eq!(stdout(&o), "42\n");
    assert!(
        stderr(&o).contains("restored the booted guest from the boot cache"),
        "{}",
        stderr(&o)
    );
    eprintln!(
        "run --exec: booted {:.1} s, from the boot cache {:.2} s",
        booted.as_secs_f64(),
        restored.as_secs_f64()
    );
}
