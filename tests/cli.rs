//! The CLI as a new user meets it: a closed pipe ends the VM, exec against
//! a guest without an agent is refused at once, VM folders are cleaned up,
//! listed (`ps`) and removed (`rm`), and deleting a snapshot keeps the
//! tree whole and goes through the running VM.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

fn ticking_vm(home: &Home, name: &str) -> VmProcess {
    let vm = start_guest(home, name, "120", "period_ms=20 region=2", &[]);
    vm.socket_ready();
    vm.wait_for(0, "tick 1", |l| l == "tick 1 ok");
    vm
}

/// Waits (bounded) for a child to exit; None if it still runs at `limit`.
fn exit_within(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn closed_console_output_ends_the_vm() {
    if !kvm_available("closed console") {
        return;
    }
    let home = Home::new("epipe");
    // `rewind run ... | head -2`, with a timeout far beyond the test's limit.
    let mut child = home.spawn(&[
        "run",
        "--name",
        "p",
        "--console",
        "stdio",
        "--timeout",
        "300",
        "--append",
        "period_ms=20 region=2",
    ]);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    for _ in 0..2 {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "console ended early");
    }
    drop(out);
    let t = Instant::now();
    let status = exit_within(&mut child, Duration::from_secs(10));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_eq!(
        status,
        Some(141),
        "rewind did not end within 10 s of its console output closing"
    );
    eprintln!(
        "ended {:.0} ms after the pipe closed",
        t.elapsed().as_secs_f64() * 1e3
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert!(!home.path.join("vms/p").exists(), "folder left behind");
}

#[test]
fn exec_without_an_agent_is_refused_at_once() {
    if !kvm_available("exec without agent") {
        return;
    }
    let home = Home::new("noagent");
    let vm = ticking_vm(&home, "t");
    let t = Instant::now();
    // Without the check this waits the whole --timeout and exits 124 (or 1).
    let o = home.run(&["exec", "--vm", "t", "--timeout", "30", "echo hi"]);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("no exec agent"), "{}", stderr(&o));
    // The VM is unharmed and still answers.
    let n = vm.lines().len();
    vm.wait_for(n, "more ticks", |l| parse_tick(l).is_some());
    vm.api_ok("PUT", "/snapshots", Some(serde_json::json!({"name": "s"})));
    assert_eq!(vm.stop(), Some(0));

    let o = home.run(&["run", "--exec", "echo hi", "--timeout", "30"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("no exec agent"), "{}", stderr(&o));
    let o = home.run(&["restore", "s", "--vm", "t", "--exec", "echo hi"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("no exec agent"), "{}", stderr(&o));
}

fn vm_folders(home: &Home) -> Vec<String> {
    files_in(&home.path.join("vms"))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn vm_folders_are_cleaned_listed_and_removed() {
    if !kvm_available("vm folders") {
        return;
    }
    let home = Home::new("folders");
    // A run that ends, one that times out, one that fails to build, with or
    // without --name: nothing left behind.
    let o = home.run(&["run", "--console", "none", "--append", "mode=exit"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = home.run(&[
        "run",
        "--name",
        "n",
        "--console",
        "none",
        "--timeout",
        "0.3",
    ]);
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    let o = home.run(&["run", "--name", "bad", "--console", "none", "--mem", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(vm_folders(&home), Vec::<String>::new());

    // A VM with snapshots keeps its folder; a clone restored from it and
    // stopped without snapshots of its own leaves nothing.
    let vm = ticking_vm(&home, "keep");
    vm.api_ok("PUT", "/snapshots", Some(serde_json::json!({"name": "s"})));
    let o = home.run(&["ps"]);
    let ps = stdout(&o);
    let row = ps
        .lines()
        .find(|l| l.starts_with("keep "))
        .unwrap_or_else(|| panic!("keep not in ps:\n{ps}"));
    assert!(row.contains(&vm.pid().to_string()), "{ps}");
    assert!(row.contains("running"), "{ps}");
    assert!(row.contains(home.socket("keep").to_str().unwrap()), "{ps}");
    // A running VM is not removed without --force.
    let o = home.run(&["rm", "keep"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("is running"), "{}", stderr(&o));
    assert!(home.path.join("vms/keep/snapshots/s").is_dir());
    assert_eq!(vm.stop(), Some(0));
    let o = home.run(&[
        "restore",
        "s",
        "--vm",
        "keep",
        "--name",
        "clone",
        "--console",
        "none",
        "--timeout",
        "0.5",
    ]);
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    assert_eq!(vm_folders(&home), vec!["keep".to_string()]);
    // ps lists running VMs only; --all adds stopped ones that left a folder.
    assert!(!stdout(&home.run(&["ps"])).contains("keep"));
    let all = stdout(&home.run(&["ps", "--all"]));
    assert!(
        all.lines()
            .any(|l| l.starts_with("keep ") && l.contains("stopped")),
        "{all}"
    );

    let o = home.run(&["rm", "keep"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(vm_folders(&home), Vec::<String>::new());
    let o = home.run(&["rm", "keep"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("no VM named"), "{}", stderr(&o));

    // --force stops a running VM, then removes it.
    let vm = ticking_vm(&home, "f");
    vm.api_ok("PUT", "/snapshots", Some(serde_json::json!({"name": "s"})));
    let o = home.run(&["rm", "--force", "f"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (status, _) = vm.wait_exit();
    assert_eq!(status, Some(0));
    assert_eq!(vm_folders(&home), Vec::<String>::new());
}

fn info(home: &Home, name: &str) -> serde_json::Value {
    let o = home.run(&["snapshot", "info", name, "--vm", "v"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

#[test]
fn deleting_a_snapshot_keeps_the_tree_whole() {
    if !kvm_available("delete keeps lineage") {
        return;
    }
    let home = Home::new("lineage");
    let vm = ticking_vm(&home, "v");
    for name in ["a", "b", "c"] {
        vm.api_ok("PUT", "/snapshots", Some(serde_json::json!({"name": name})));
    }
    assert_eq!(info(&home, "c")["parent"], "b");

    // The VM runs, so the delete goes through it; b's child c takes a.
    let o = home.run(&["snapshot", "delete", "b", "--vm", "v"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("through running VM v"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("re-parented ") && l.contains("snapshots/c to a")),
        "{out}"
    );
    assert_eq!(info(&home, "c")["parent"], "a");
    let tree = stdout(&home.run(&["snapshot", "list", "--tree", "--vm", "v"]));
    // Where the name starts: children are drawn right of their parent.
    let indent = |n: &str| {
        tree.lines()
            .find_map(|l| {
                l.split_whitespace()
                    .any(|w| w == n)
                    .then(|| l.find(&format!(" {n} ")).unwrap())
            })
            .unwrap_or_else(|| panic!("{n} not in tree:\n{tree}"))
    };
    assert!(indent("c") > indent("a"), "{tree}");

    // Deleting the running VM's baseline through it: its next snapshot
    // names no parent that is gone.
    let o = home.run(&["snapshot", "delete", "c", "--vm", "v"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        vm.api_ok("GET", "/vm", None)["baseline"],
        serde_json::Value::Null
    );
    vm.api_ok("PUT", "/snapshots", Some(serde_json::json!({"name": "d"})));
    assert_eq!(info(&home, "d")["parent"], serde_json::Value::Null);
    vm.api_ok("PUT", "/snapshots", Some(serde_json::json!({"name": "e"})));
    assert_eq!(vm.stop(), Some(0));

    // Stopped: the store does it; d was a root, so its child e becomes one.
    let o = home.run(&["snapshot", "delete", "d", "--vm", "v"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(!out.contains("through running VM"), "{out}");
    assert!(out.contains("snapshots/e to nothing"), "{out}");
    assert_eq!(info(&home, "e")["parent"], serde_json::Value::Null);
    let o = home.run(&[
        "restore",
        "e",
        "--vm",
        "v",
        "--name",
        "r",
        "--console",
        "stdio",
        "--timeout",
        "60",
        "--expect",
        "tick [0-9]+ ok",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn rm_leaves_clones_and_their_snapshots_usable() {
    if !kvm_available("rm with clones") {
        return;
    }
    let home = Home::new("rmclones");
    let base = home.path.join("base.img");
    std::fs::write(&base, vec![0x5Au8; 8 << 20]).unwrap();
    let disk_args =
        |name: &'static str| vec!["--name", name, "--console", "stdio", "--timeout", "120"];
    let mut args = vec!["run", "--disk", base.to_str().unwrap()];
    args.extend(disk_args("a"));
    args.extend(["--append", "mode=disk period_ms=50 disk_sectors=2048"]);
    let a = VmProcess::start(&home, "a", &args);
    a.socket_ready();
    a.wait_for(0, "tick 2", |l| l == "tick 2 disk ok");
    a.api_ok("PUT", "/snapshots", Some(serde_json::json!({"name": "s"})));
    assert_eq!(a.stop(), Some(0));
    // b is a clone of a's snapshot s, with a snapshot t of its own.
    let mut args = vec!["restore", "s", "--vm", "a"];
    args.extend(disk_args("b"));
    let b = VmProcess::start(&home, "b", &args);
    b.socket_ready();
    let n = b.wait_for(0, "a tick", |l| l.ends_with(" disk ok"));
    b.wait_for(n + 1, "another tick", |l| l.ends_with(" disk ok"));
    b.api_ok("PUT", "/snapshots", Some(serde_json::json!({"name": "t"})));
    // rm a while its clone runs: t takes s's disk data and loses s as parent.
    let o = home.run(&["rm", "a"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!home.path.join("vms/a").exists());
    let o = home.run(&["snapshot", "info", "t", "--vm", "b"]);
    let t: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(t["parent"], serde_json::Value::Null);
    let n = b.lines().len();
    b.wait_for(n, "b ticks on", |l| l.ends_with(" disk ok"));
    let lines = b.lines();
    assert_eq!(b.stop(), Some(0));
    assert!(!lines.iter().any(|l| l.contains("CORRUPT")), "{lines:?}");
    check_vm_disks(&home.path, "b");
    let o = home.run(&[
        "restore",
        "t",
        "--vm",
        "b",
        "--name",
        "c",
        "--console",
        "stdio",
        "--timeout",
        "60",
        "--expect",
        "^tick [0-9]+ disk ok$",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stdout(&o).contains("CORRUPT"), "{}", stdout(&o));
}

#[test]
fn listings_end_quietly_when_their_reader_leaves() {
    // No VM needed: stopped VM folders are enough for a long `ps --all`.
    let home = Home::new("listpipe");
    // About 100 KiB of output: more than a pipe buffers.
    for i in 0..2000 {
        std::fs::create_dir_all(home.path.join(format!("vms/stopped-vm-{i:05}"))).unwrap();
    }
    let mut child = home.spawn(&["ps", "--all"]);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("NAME"), "{line}");
    drop(out);
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{status:?}: {err}");
}
