//! The interactive console as a person uses it: rewind in a real terminal
//! (a tmux pane), hotkeys typed with `send-keys`, the screen read back with
//! `capture-pane`, on the embedded test guest. After every exit path the
//! terminal must be as the shell left it, not raw.

mod common;
use common::tmux::{terminal_is_sane, Tmux};
use common::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(20);

/// The tick numbers on `screen` (in order) and the index of each line.
fn ticks(screen: &[String]) -> Vec<(usize, u64)> {
    screen
        .iter()
        .enumerate()
        .filter_map(|(i, l)| first_tick(l).map(|t| (i, t)))
        .collect()
}

fn line_of(screen: &[String], needle: &str) -> usize {
    screen
        .iter()
        .rposition(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not on screen:\n{}", screen.join("\n")))
}

/// Boot, see ticks, Ctrl-A s, let it run, Ctrl-A r: the tick numbers go
/// back. Then the tree, pause and resume, delete, help, and Ctrl-A x,
/// which leaves the terminal sane.
#[test]
fn hotkeys_snapshot_revert_list_pause_delete_and_quit() {
    if !kvm_available("console hotkeys") {
        return;
    }
    let home = Home::new("hotkeys");
    let Some(t) = Tmux::start(&home, "hk", &["run", "--name", "hk", "--timeout", "120"]) else {
        return;
    };
    t.wait_for("tick 3 ok", LIMIT);

    t.keys(&["C-a", "s"]);
    let screen = t.wait_for("[rewind] snapshot snap-1 taken", LIMIT);
    let at = line_of(&screen, "[rewind] snapshot snap-1 taken");
    assert!(
        screen[at].starts_with("[rewind] "),
        "not on a line of its own: {:?}",
        screen[at]
    );
    let snap_tick = ticks(&screen)
        .into_iter()
        .filter(|(i, _)| *i < at)
        .map(|(_, n)| n)
        .max()
        .unwrap();
    assert!(home
        .path
        .join("vms/hk/snapshots/snap-1/manifest.json")
        .is_file());

    // Let it run well past the snapshot.
    let screen = t.wait_until("5 more ticks", LIMIT, |s| {
        ticks(s).iter().any(|(_, n)| *n >= snap_tick + 5)
    });
    let _ = screen;
    t.keys(&["C-a", "r"]);
    let screen = t.wait_until("a tick after the revert", LIMIT, |s| {
        s.iter()
            .rposition(|l| l.contains("[rewind] reverted to snap-1"))
            .is_some_and(|at| ticks(s).iter().any(|(i, _)| *i > at))
    });
    let at = line_of(&screen, "[rewind] reverted to snap-1");
    let before = ticks(&screen)
        .into_iter()
        .filter(|(i, _)| *i < at)
        .map(|(_, n)| n)
        .max()
        .unwrap();
    let after = ticks(&screen)
        .into_iter()
        .find(|(i, _)| *i > at)
        .map(|(_, n)| n)
        .unwrap();
    assert!(
        before >= snap_tick + 5 && after <= snap_tick + 2,
        "ticks did not go back: snapshot at tick {snap_tick}, {before} before the revert, {after} after:\n{}",
        screen.join("\n")
    );

    t.keys(&["C-a", "l"]);
    let screen = t.wait_for("[rewind] snapshots of VM hk:", LIMIT);
    let at = line_of(&screen, "[rewind] snapshots of VM hk:");
    assert!(
        screen[at + 1].starts_with("[rewind] * snap-1")
            && screen[at + 1].contains(" ago  memory ")
            && screen[at + 1].ends_with("<- current"),
        "{}",
        screen[at..].join("\n")
    );

    t.keys(&["C-a", "p"]);
    t.wait_for("[rewind] paused (Ctrl-A p resumes)", LIMIT);
    let ps = stdout(&home.run(&["ps"]));
    assert!(
        ps.lines()
            .any(|l| l.starts_with("hk ") && l.contains("paused")),
        "{ps}"
    );
    t.keys(&["C-a", "p"]);
    t.wait_for("[rewind] resumed", LIMIT);
    let ps = stdout(&home.run(&["ps"]));
    assert!(
        ps.lines()
            .any(|l| l.starts_with("hk ") && l.contains("running")),
        "{ps}"
    );

    t.keys(&["C-a", "d"]);
    t.wait_for("[rewind] deleted snapshot snap-1", LIMIT);
    assert!(!home.path.join("vms/hk/snapshots/snap-1").exists());
    t.keys(&["C-a", "r"]);
    t.wait_for(
        "[rewind] no snapshot of this VM yet (Ctrl-A s takes one)",
        LIMIT,
    );

    t.keys(&["C-a", "?"]);
    t.wait_for("[rewind]   Ctrl-A x  quit (stop the VM)", LIMIT);

    t.keys(&["C-a", "x"]);
    let (status, stty) = t.wait_exit(LIMIT);
    assert_eq!(status, 0, "{}", t.screen().join("\n"));
    assert!(
        t.screen().iter().any(|l| l == "[rewind] stopping the VM"),
        "{}",
        t.screen().join("\n")
    );
    assert!(terminal_is_sane(&stty), "terminal left raw:\n{stty}");
}

/// `R` offers the newest snapshots by number and reverts to the one picked.
#[test]
fn hotkey_pick_reverts_to_the_snapshot_chosen() {
    if !kvm_available("console pick") {
        return;
    }
    let home = Home::new("pick");
    let Some(t) = Tmux::start(&home, "pk", &["run", "--name", "pk", "--timeout", "120"]) else {
        return;
    };
    t.wait_for("tick 2 ok", LIMIT);
    t.keys(&["C-a", "s"]);
    let screen = t.wait_for("[rewind] snapshot snap-1 taken", LIMIT);
    let first = ticks(&screen).last().unwrap().1;
    t.wait_until("3 more ticks", LIMIT, |s| {
        ticks(s).iter().any(|(_, n)| *n >= first + 3)
    });
    t.keys(&["C-a", "s"]);
    t.wait_for("[rewind] snapshot snap-2 taken", LIMIT);
    t.keys(&["C-a", "R"]);
    let screen = t.wait_for("[rewind]   2) snap-1", LIMIT);
    assert!(
        screen.iter().any(|l| l.starts_with("[rewind]   1) snap-2")),
        "{}",
        screen.join("\n")
    );
    t.keys(&["2"]);
    let screen = t.wait_until("a tick after the revert", LIMIT, |s| {
        s.iter()
            .rposition(|l| l.contains("[rewind] reverted to snap-1"))
            .is_some_and(|at| ticks(s).iter().any(|(i, _)| *i > at))
    });
    let at = line_of(&screen, "[rewind] reverted to snap-1");
    let after = ticks(&screen).into_iter().find(|(i, _)| *i > at).unwrap().1;
    assert!(after <= first + 2, "{}", screen.join("\n"));
    // Any other key cancels, and reaches nothing else.
    t.keys(&["C-a", "R"]);
    t.wait_for("press 1-2, any other key cancels", LIMIT);
    t.keys(&["q"]);
    t.wait_for("[rewind] revert cancelled", LIMIT);
    t.keys(&["C-a", "x"]);
    let (status, stty) = t.wait_exit(LIMIT);
    assert_eq!(status, 0);
    assert!(terminal_is_sane(&stty), "terminal left raw:\n{stty}");
}

/// `--escape ^b`: Ctrl-A is an ordinary key then, Ctrl-B the prefix; a
/// SIGTERM ends the VM (143) and the terminal is restored all the same.
#[test]
fn another_escape_key_and_a_signal_leave_the_terminal_sane() {
    if !kvm_available("console escape") {
        return;
    }
    let home = Home::new("escape");
    let args = ["run", "--name", "esc", "--escape", "^b", "--timeout", "120"];
    let Some(t) = Tmux::start(&home, "esc", &args) else {
        return;
    };
    t.wait_for("tick 2 ok", LIMIT);
    t.keys(&["C-a", "x", "C-a", "s"]);
    t.keys(&["C-b", "s"]);
    let screen = t.wait_for("[rewind] snapshot snap-1 taken", LIMIT);
    assert!(
        screen
            .iter()
            .any(|l| l.contains("(Ctrl-B r reverts to it)")),
        "{}",
        screen.join("\n")
    );
    // Ctrl-A x did not quit and Ctrl-A s took no snapshot.
    assert!(!screen.iter().any(|l| l.contains("stopping the VM")));
    assert!(!home.path.join("vms/esc/snapshots/snap-2").exists());
    let vm = rewind::control::client::request(&home.socket("esc"), "GET", "/vm", None, None)
        .expect("the VM still runs");
    let pid = vm.body["pid"].as_i64().unwrap() as i32;
    // SAFETY: sends SIGTERM to the rewind process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let (status, stty) = t.wait_exit(LIMIT);
    assert_eq!(status, 143, "{}", t.screen().join("\n"));
    assert!(terminal_is_sane(&stty), "terminal left raw:\n{stty}");
}

#[test]
fn a_bad_escape_key_is_one_line_and_status_2() {
    let home = Home::new("badescape");
    for bad in ["a", "^1", "300", ""] {
        let o = home.run(&["run", "--escape", bad, "--timeout", "5"]);
        one_line_error(&o, 2, "--escape");
    }
}

/// `--escape none`: every key is the guest's, Ctrl-A x included.
#[test]
fn no_escape_key_sends_every_key_to_the_guest() {
    if !kvm_available("console escape none") {
        return;
    }
    let home = Home::new("noescape");
    let args = [
        "run",
        "--name",
        "ne",
        "--escape",
        "none",
        "--timeout",
        "120",
    ];
    let Some(t) = Tmux::start(&home, "ne", &args) else {
        return;
    };
    let screen = t.wait_for("tick 2 ok", LIMIT);
    let seen = ticks(&screen).last().unwrap().1;
    t.keys(&["C-a", "x", "C-a", "s", "C-a", "h"]);
    // The guest runs on past the keys, and rewind said nothing.
    let screen = t.wait_until("3 more ticks", LIMIT, |s| {
        ticks(s).iter().any(|(_, n)| *n >= seen + 3)
    });
    assert!(
        !screen.iter().any(|l| l.starts_with("[rewind]")),
        "{}",
        screen.join("\n")
    );
    assert!(!home.path.join("vms/ne/snapshots").exists());
    let o = home.run(&["stop", "--vm", "ne"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (status, stty) = t.wait_exit(LIMIT);
    assert_eq!(status, 0);
    assert!(terminal_is_sane(&stty), "terminal left raw:\n{stty}");
}
