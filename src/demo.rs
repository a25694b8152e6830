//! `rewind demo`: the main job, end to end, on the embedded test guest:
//! boot, snapshot, let the guest change, revert in place, restore a clone
//! in a new process. Every step is timed; the guest checks its own memory
//! at every tick, so "tick N ok" after a revert or restore is the guest
//! saying its memory is exactly what it was at the snapshot.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rewind::control::client;
use rewind::paths;

const PERIOD_MS: u64 = 100;

struct Guest {
    name: String,
    console: PathBuf,
    child: Child,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn exe() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("cannot find rewind itself: {e}"))
}

/// Polls the console file until a line matching `want` appears after byte
/// `from`; returns the line and the offset just past it.
fn wait_line(
    console: &Path,
    from: usize,
    want: &dyn Fn(&str) -> bool,
) -> Result<(String, usize), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        let mut offset = from.min(text.len());
        for line in text.get(offset..).unwrap_or("").split_inclusive('\n') {
            if !line.ends_with('\n') {
                break;
            }
            offset += line.len();
            if want(line.trim_end()) {
                return Ok((line.trim_end().to_string(), offset));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the guest never printed the expected line (console: {})",
                console.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn api(vm: &str, method: &str, path: &str) -> Result<serde_json::Value, String> {
    let resp = client::request(&paths::api_socket(vm), method, path, None, None)
        .map_err(|e| e.to_string())?;
    if resp.status != 200 {
        return Err(resp.body.to_string());
    }
    Ok(resp.body)
}

fn tick_of(line: &str) -> Option<u64> {
    line.strip_prefix("tick ")?
        .strip_suffix(" ok")?
        .parse()
        .ok()
}

pub fn run() -> Result<i32, String> {
    let name = format!("demo-{}", std::process::id());
    let dir = paths::vm_dir(&name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let console = dir.join("console.log");
    println!("rewind demo: the embedded test guest checks all of its 16 MiB data region at every {PERIOD_MS} ms tick\n");

    let t = Instant::now();
    let child = Command::new(exe()?)
        .args(["run", "--name", &name, "--mem", "256", "--timeout", "120"])
        .arg("--console")
        .arg(&console)
        .args(["--append", &format!("period_ms={PERIOD_MS} region=16")])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start rewind run: {e}"))?;
    let guest = Guest {
        name: name.clone(),
        console: console.clone(),
        child,
    };
    let (_, pos) = wait_line(&guest.console, 0, &|l| l == "REWIND-READY")?;
    println!(
        "1. boot      {:>8.2} ms  process start to REWIND-READY",
        t.elapsed().as_secs_f64() * 1e3
    );

    let (line, pos) = wait_line(&guest.console, pos, &|l| tick_of(l) == Some(3))?;
    let snap = api(&guest.name, "PUT", "/snapshots")?;
    let snap_name = snap["name"].as_str().unwrap_or("snap-1").to_string();
    println!(
        "2. snapshot  {:>8.2} ms  '{snap_name}' after \"{line}\": guest paused {:.2} ms, {:.1} MiB on disk",
        snap["total_ms"].as_f64().unwrap_or(0.0),
        snap["pause_ms"].as_f64().unwrap_or(0.0),
        snap["size_bytes"].as_f64().unwrap_or(0.0) / 1048576.0
    );

    let (line, pos) = wait_line(&guest.console, pos, &|l| tick_of(l) == Some(6))?;
    println!(
        "3. change               the guest ran on to \"{line}\", rewriting its region each tick"
    );
    let rev = api(
        &guest.name,
        "PUT",
        &format!("/snapshots/{snap_name}/revert"),
    )?;
    let (after, pos) = wait_line(&guest.console, pos, &|l| tick_of(l).is_some_and(|n| n <= 4))?;
    println!(
        "4. revert    {:>8.2} ms  in place, {} dirty pages copied back; next line: \"{after}\"",
        rev["total_ms"].as_f64().unwrap_or(0.0),
        rev["pages_copied"]
    );

    let t = Instant::now();
    let mut clone = Command::new(exe()?)
        .args([
            "restore",
            &snap_name,
            "--vm",
            &name,
            "--name",
            &format!("{name}-clone"),
        ])
        .args([
            "--console",
            "stdio",
            "--timeout",
            "30",
            "--expect",
            "^tick 5 ok$",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start rewind restore: {e}"))?;
    let out = clone.stdout.take().ok_or("no clone stdout")?;
    let mut first = None;
    let mut lines = Vec::new();
    for l in BufReader::new(out).lines().map_while(Result::ok) {
        first.get_or_insert_with(|| t.elapsed());
        lines.push(l);
    }
    let status = clone.wait().map_err(|e| e.to_string())?;
    println!(
        "5. restore   {:>8.2} ms  new process to the clone's first line \"{}\" (then {}; exit {})",
        first.unwrap_or_default().as_secs_f64() * 1e3,
        lines.first().map(String::as_str).unwrap_or("-"),
        lines.get(1..).map(|l| l.join(", ")).unwrap_or_default(),
        status.code().unwrap_or(-1)
    );

    let _ = api(&guest.name, "PUT", "/vm/stop");
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let ok = !text.contains("CORRUPT") && status.success() && tick_of(&after) == Some(4);
    let _ = pos;
    println!(
        "\n{}: the original VM's console is in {}; snapshots: rewind snapshot list --vm {name}",
        if ok {
            "all steps verified by the guest"
        } else {
            "SOMETHING WENT WRONG"
        },
        console.display()
    );
    Ok(if ok { 0 } else { 1 })
}
