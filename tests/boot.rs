//! Boots the real test guest on /dev/kvm and checks what it prints and how
//! rewind exits.

mod common;
use common::*;

fn tick_lines(out: &str, prefix: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|l| l.strip_suffix(" ok"))
        .filter_map(|n| n.parse().ok())
        .collect()
}

#[test]
fn one_vcpu_256m_verifies_memory_every_tick_and_exits_with_guest_status() {
    if !kvm_available("one_vcpu_256m") {
        return;
    }
    let home = Home::new("boot1");
    let o = home.run(&[
        "run",
        "--console",
        "stdio",
        "--mem",
        "256",
        "--timeout",
        "60",
        "--append",
        "period_ms=20 region=32 exit_after=5 status=0",
    ]);
    let out = stdout(&o);
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout: {out}\nstderr: {}",
        stderr(&o)
    );
    assert!(out.starts_with("REWIND-READY\n"), "{out}");
    assert_eq!(tick_lines(&out, "tick "), vec![1, 2, 3, 4, 5], "{out}");
    assert!(!out.contains("CORRUPT"));
}

#[test]
fn four_vcpus_4g_each_vcpu_runs_its_own_workload_above_the_gap() {
    if !kvm_available("four_vcpus_4g") {
        return;
    }
    let home = Home::new("boot4");
    let o = home.run(&[
        "run",
        "--console",
        "stdio",
        "--mem",
        "4096",
        "--cpus",
        "4",
        "--timeout",
        "60",
        "--append",
        "period_ms=20 region=64 exit_after=4",
    ]);
    let out = stdout(&o);
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout: {out}\nstderr: {}",
        stderr(&o)
    );
    assert!(!out.contains("CORRUPT"), "{out}");
    // vCPU 0 ends the run once every vCPU verified its tick 4.
    for cpu in 0..4 {
        let ticks = tick_lines(&out, &format!("cpu{cpu} tick "));
        assert!(ticks.len() >= 4, "cpu{cpu} did not reach tick 4: {out}");
        assert_eq!(ticks, (1..=ticks.len() as u64).collect::<Vec<_>>(), "{out}");
    }
}

#[test]
fn guest_exit_paths_map_to_exit_status() {
    if !kvm_available("guest_exit_paths") {
        return;
    }
    let home = Home::new("exits");
    // MMIO doorbell from ring 3.
    let o = home.run(&[
        "run",
        "--console",
        "none",
        "--timeout",
        "30",
        "--append",
        "mode=exit status=7",
    ]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    // isa-debug-exit port (proxied through ring 0): status is (v << 1) | 1.
    let o = home.run(&[
        "run",
        "--console",
        "none",
        "--timeout",
        "30",
        "--append",
        "mode=exitport status=3",
    ]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    // Triple fault: status 1 and one clear line.
    let o = home.run(&[
        "run",
        "--console",
        "none",
        "--timeout",
        "30",
        "--append",
        "mode=triple",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("triple fault on vCPU 0"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn timeout_and_expect() {
    if !kvm_available("timeout_and_expect") {
        return;
    }
    let home = Home::new("expect");
    let o = home.run(&[
        "run",
        "--console",
        "none",
        "--timeout",
        "0.5",
        "--append",
        "period_ms=1000",
    ]);
    assert_eq!(o.status.code(), Some(124));
    assert!(
        stderr(&o).contains("timed out after 0.5 s"),
        "{}",
        stderr(&o)
    );

    let o = home.run(&[
        "run",
        "--console",
        "stdio",
        "--timeout",
        "30",
        "--expect",
        "^tick 3 ok$",
        "--append",
        "period_ms=10",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("tick 3 ok"));
    assert!(
        !stdout(&o).contains("tick 4 ok"),
        "the run ends at the first match"
    );

    // The regex never matches: timeout status.
    let o = home.run(&[
        "run",
        "--console",
        "none",
        "--timeout",
        "0.5",
        "--expect",
        "never printed",
        "--append",
        "period_ms=10",
    ]);
    assert_eq!(o.status.code(), Some(124));
}

#[test]
fn ring0_instructions_the_emulator_cannot_run_are_assisted_or_reported() {
    if !kvm_available("emulation_assist") {
        return;
    }
    let home = Home::new("assist");
    for (insn, code) in [("int3", 1), ("fwait", 2)] {
        let o = home.run(&[
            "run",
            "--console",
            "stdio",
            "--timeout",
            "30",
            "--append",
            &format!("mode=insn insn={insn}"),
        ]);
        assert_eq!(o.status.code(), Some(0), "{insn}: {}", stderr(&o));
        assert!(
            stdout(&o).contains(&format!("insn {code} done")),
            "{insn}: {}",
            stdout(&o)
        );
    }
    let o = home.run(&[
        "run",
        "--console",
        "stdio",
        "--timeout",
        "30",
        "--append",
        "mode=insn insn=popcnt",
    ]);
    if is_pvm_host() {
        // PVM's emulator cannot run popcnt at CPL0: one clear line with the bytes.
        assert_eq!(o.status.code(), Some(1));
        let err = stderr(&o);
        assert!(
            err.contains("cannot emulate the guest instruction"),
            "{err}"
        );
        assert!(err.contains("bytes f3 48 0f b8 c0"), "{err}");
        assert!(!stdout(&o).contains("insn 3 done"));
    } else {
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert!(stdout(&o).contains("insn 3 done"));
    }
}

#[test]
fn control_socket_reports_the_vm_and_stops_it() {
    if !kvm_available("control_socket") {
        return;
    }
    let home = Home::new("api");
    let child = home.spawn(&[
        "run",
        "--name",
        "apivm",
        "--console",
        "none",
        "--timeout",
        "60",
    ]);
    let sock = home.socket("apivm");
    wait_for_path(&sock, "api.sock");
    let resp = rewind::control::client::request(
        &sock,
        "GET",
        "/vm",
        None,
        Some(std::time::Duration::from_secs(10)),
    )
    .expect("GET /vm");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body["name"], "apivm");
    assert_eq!(resp.body["vcpus"], 1);
    assert_eq!(resp.body["mem_mib"], 256);
    assert_eq!(resp.body["pid"], child.id());

    // A second VM with the same name is refused while the first runs.
    let o = home.run(&[
        "run",
        "--name",
        "apivm",
        "--console",
        "none",
        "--timeout",
        "5",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("apivm"), "{}", stderr(&o));

    let o = home.run(&["stop", "--vm", "apivm"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!sock.exists(), "socket removed on exit");

    let o = home.run(&["stop", "--vm", "apivm"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("apivm"));
}

#[test]
fn ctrl_a_x_on_console_input_stops_the_vm_from_a_pipe_or_a_file() {
    if !kvm_available("ctrl_a_x") {
        return;
    }
    use std::io::Write;
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let home = Home::new("ctrl-a-x");
    let args = ["run", "--console", "stdio", "--timeout", "60"];
    // A pipe: typed while the guest runs.
    let t = Instant::now();
    let mut child = home
        .cmd()
        .args(args)
        .args(["--name", "pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    // Typed once the VM is up (its socket exists), not buffered before it.
    wait_for_path(&home.socket("pipe"), "the VM's socket");
    input.write_all(b"hello\x01x").unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    // A regular file, which epoll cannot watch: read as it stands.
    let file = home.path.join("keys");
    std::fs::write(&file, b"hello\x01x").unwrap();
    let t = Instant::now();
    let o = home
        .cmd()
        .args(args)
        .args(["--name", "file"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
}
