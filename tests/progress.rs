//! Long operations a person waits for: a live line on a terminal that is
//! cleared at the end, and one line per phase when stderr is not a
//! terminal (scripts, CI logs).

mod common;
use common::tmux::Tmux;
use common::*;
use std::time::Duration;

fn phase_lines(o: &std::process::Output) -> Vec<String> {
    assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
    stderr(o).lines().map(str::to_string).collect()
}

#[test]
fn exports_say_one_line_per_phase_and_clear_their_live_line() {
    if !kvm_available("progress") {
        return;
    }
    let home = Home::new("progress");
    let base = home.path.join("base.img");
    std::fs::write(&base, vec![0xA5u8; 8 << 20]).unwrap();
    let vm = start_guest(
        &home,
        "p",
        "300",
        "mode=disk period_ms=200 disk_sectors=512",
        &["--disk", base.to_str().unwrap()],
    );
    vm.socket_ready();
    vm.wait_for(0, "disk id", |l| l == "disk id rewind-disk0");
    vm.api_ok(
        "PUT",
        "/snapshots",
        Some(serde_json::json!({ "name": "s" })),
    );
    assert_eq!(vm.stop(), Some(0));

    let out = home.path.join("s.raw");
    let lines = phase_lines(&home.run(&[
        "disk",
        "export",
        "--snapshot",
        "s",
        "--vm",
        "p",
        out.to_str().unwrap(),
    ]));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("rewind: export disk 0: done in ") && lines[0].ends_with(" MiB/s)"),
        "{lines:?}"
    );

    let bundle = home.path.join("bundle");
    let lines = phase_lines(&home.run(&["snapshot", "export", "s", bundle.to_str().unwrap()]));
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0].starts_with("rewind: export disk 0: done in "),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("rewind: export memory: done in "),
        "{lines:?}"
    );

    // On a terminal: the same one line is what stays on the screen.
    let out2 = home.path.join("s2.raw");
    let Some(t) = Tmux::start(
        &home,
        "pr",
        &[
            "disk",
            "export",
            "--snapshot",
            "s",
            "--vm",
            "p",
            out2.to_str().unwrap(),
        ],
    ) else {
        return;
    };
    let (status, _) = t.wait_exit(Duration::from_secs(60));
    assert_eq!(status, 0);
    let screen: Vec<String> = t.screen().into_iter().filter(|l| !l.is_empty()).collect();
    assert!(
        screen[0].starts_with("rewind: export disk 0: done in ")
            && screen[1].starts_with("exported 0 ")
            && screen[2] == "rewind-exit=0",
        "{screen:#?}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
}
