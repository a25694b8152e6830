//! Console hotkeys carried out: each one is a [`Command`] handed to
//! [`Vmm::handle_command`], the path API requests take, so a hotkey can do
//! nothing the API cannot and both stay one implementation. What a key did
//! is told on the console as `[rewind] ...` lines (`Console::notice`).

use super::{Outcome, Reply, Vmm, VmmError};
use crate::console::keys::escape_name;
use crate::console::ConsoleKey;
use crate::control::Command;
use crate::snapshot::tree;

/// Most snapshots `R` offers: one digit picks one.
const PICK_MAX: usize = 9;

/// The hotkeys' state over one run.
pub(crate) struct Hotkeys {
    escape: Option<u8>,
    /// After `R`: the names offered, newest first; the next key picks.
    choices: Option<Vec<String>>,
}

impl Hotkeys {
    pub fn new(escape: Option<u8>) -> Self {
        Hotkeys {
            escape,
            choices: None,
        }
    }

    fn key_name(&self, key: impl std::fmt::Display) -> String {
        match self.escape {
            Some(e) => format!("{} {key}", escape_name(e)),
            None => format!("(no escape key) {key}"),
        }
    }

    fn help(&self) -> String {
        let k = |c| self.key_name(c);
        let esc = self.escape.map(escape_name).unwrap_or_default();
        format!(
            "console hotkeys:\n\
             \x20 {}  snapshot (auto-named)\n\
             \x20 {}  revert to this VM's latest snapshot\n\
             \x20 {}  revert to one picked from a list\n\
             \x20 {}  list snapshots (tree)\n\
             \x20 {}  pause / resume\n\
             \x20 {}  delete the latest snapshot\n\
             \x20 {}  quit (stop the VM)\n\
             \x20 {}  this help ({} too)\n\
             \x20 {esc} {esc}  send {esc} to the guest",
            k('s'),
            k('r'),
            k('R'),
            k('l'),
            k('p'),
            k('d'),
            k('x'),
            k('h'),
            k('?'),
        )
    }
}

impl Vmm {
    /// Carries out one console key; the outcome ends the run (quit).
    pub(super) fn on_console_key(&mut self, hk: &mut Hotkeys, key: ConsoleKey) -> Option<Outcome> {
        if let Some(choices) = hk.choices.take() {
            match key {
                ConsoleKey::Guest(mut bytes) => {
                    let picked = bytes.first().and_then(|b| {
                        let i = b.checked_sub(b'1')? as usize;
                        choices.get(i)
                    });
                    match picked {
                        Some(name) => self.revert_to(name),
                        None => self.console.notice("revert cancelled"),
                    }
                    if !bytes.is_empty() {
                        bytes.remove(0);
                    }
                    return self.on_console_key(hk, ConsoleKey::Guest(bytes));
                }
                // Another hotkey instead of a digit: that key is meant.
                other => {
                    self.console.notice("revert cancelled");
                    return self.on_console_key(hk, other);
                }
            }
        }
        match key {
            ConsoleKey::Guest(bytes) => {
                if !bytes.is_empty() {
                    self.console_input.extend(bytes);
                    self.feed_console();
                }
            }
            ConsoleKey::Quit => {
                if let Ok(Reply::Stopped) = self.handle_command(Command::Stop) {
                    self.console.notice("stopping the VM");
                    return Some(Outcome::Stopped);
                }
            }
            ConsoleKey::Snapshot => {
                // Live: the notice comes when the memory writer is done, and
                // the console and disks are served meanwhile.
                let console = self.console.clone();
                let revert_key = hk.key_name('r');
                let reply: super::snapshots::SnapshotReply = Box::new(move |result| {
                    let msg = match result {
                        Ok(r) => format!(
                            "snapshot {} taken: {:.1} MiB{}, {} guest paused {:.1} ms ({revert_key} reverts to it)",
                            r.name,
                            r.size_bytes as f64 / 1048576.0,
                            r.incremental_on
                                .as_ref()
                                .map(|p| format!(" (changes over {p})"))
                                .unwrap_or_default(),
                            if r.live { "live," } else { "paused," },
                            r.pause_ms,
                        ),
                        Err(e) => failed("snapshot", Err(e)),
                    };
                    console.notice(&msg);
                });
                self.snapshot_create_then(None, super::SnapshotHow::default(), reply);
            }
            ConsoleKey::RevertLatest => match self.own_snapshots() {
                Ok(snaps) => match snaps.last() {
                    Some(n) => {
                        let name = n.name.clone();
                        self.revert_to(&name);
                    }
                    None => self.console.notice(&format!(
                        "no snapshot of this VM yet ({} takes one)",
                        hk.key_name('s')
                    )),
                },
                Err(e) => self.console.notice(&format!("cannot list snapshots: {e}")),
            },
            ConsoleKey::RevertPick => match self.own_snapshots() {
                Ok(snaps) if snaps.is_empty() => self.console.notice("no snapshot to revert to"),
                Ok(snaps) => {
                    let now = tree::now_ms();
                    let newest: Vec<&tree::Node> = snaps.iter().rev().take(PICK_MAX).collect();
                    let mut msg = format!(
                        "revert to which snapshot? press 1-{}, any other key cancels",
                        newest.len()
                    );
                    for (i, n) in newest.iter().enumerate() {
                        msg.push_str(&format!(
                            "\n  {}) {}  {} ago",
                            i + 1,
                            n.name,
                            tree::age(n.created_unix_ms, now)
                        ));
                    }
                    self.console.notice(&msg);
                    hk.choices = Some(newest.iter().map(|n| n.name.clone()).collect());
                }
                Err(e) => self.console.notice(&format!("cannot list snapshots: {e}")),
            },
            ConsoleKey::List => {
                let msg = match self.own_snapshots() {
                    Ok(snaps) if snaps.is_empty() => {
                        format!("no snapshots of VM {} yet", self.config.name)
                    }
                    Ok(snaps) => {
                        let lines = tree::render(&snaps, self.baseline.as_deref(), tree::now_ms());
                        format!(
                            "snapshots of VM {}:\n{}",
                            self.config.name,
                            lines.join("\n")
                        )
                    }
                    Err(e) => format!("cannot list snapshots: {e}"),
                };
                self.console.notice(&msg);
            }
            ConsoleKey::PauseResume => {
                let (cmd, what) = if self.paused {
                    (Command::Resume, "resumed".to_string())
                } else {
                    (
                        Command::Pause,
                        format!("paused ({} resumes)", hk.key_name('p')),
                    )
                };
                let msg = match self.handle_command(cmd) {
                    Ok(_) => what,
                    Err(e) => format!("pause/resume failed: {e}"),
                };
                self.console.notice(&msg);
            }
            ConsoleKey::DeleteLatest => {
                let msg = match self.own_snapshots() {
                    Ok(snaps) => match snaps.last() {
                        Some(n) => {
                            let name = n.name.clone();
                            match self
                                .handle_command(Command::SnapshotDelete { name: name.clone() })
                            {
                                Ok(_) => format!("deleted snapshot {name}"),
                                Err(e) => format!("cannot delete {name}: {e}"),
                            }
                        }
                        None => "no snapshot to delete".to_string(),
                    },
                    Err(e) => format!("cannot list snapshots: {e}"),
                };
                self.console.notice(&msg);
            }
            ConsoleKey::Help => self.console.notice(&hk.help()),
            ConsoleKey::Unknown(b) => {
                let shown = if b.is_ascii_graphic() {
                    (b as char).to_string()
                } else {
                    format!("0x{b:02x}")
                };
                self.console.notice(&format!(
                    "{}: no such hotkey ({} lists them)",
                    hk.key_name(shown),
                    hk.key_name('h')
                ));
            }
        }
        None
    }

    fn revert_to(&mut self, name: &str) {
        let msg = match self.handle_command(Command::SnapshotRevert {
            name: name.to_string(),
        }) {
            Ok(Reply::Reverted(r)) => format!(
                "reverted to {} in {:.1} ms ({} pages copied{})",
                r.name,
                r.total_ms,
                r.pages_copied,
                if r.full { ", full copy" } else { "" }
            ),
            other => failed(&format!("revert to {name}"), other),
        };
        self.console.notice(&msg);
    }

    /// This VM's snapshots, oldest first, as the API lists them.
    fn own_snapshots(&mut self) -> Result<Vec<tree::Node>, VmmError> {
        match self.handle_command(Command::SnapshotList)? {
            Reply::Snapshots(listing) => Ok(tree::nodes(&listing).0),
            other => Err(VmmError::Snapshot(format!("unexpected answer {other:?}"))),
        }
    }
}

fn failed(what: &str, result: Result<Reply, VmmError>) -> String {
    match result {
        Ok(other) => format!("{what}: unexpected answer {other:?}"),
        Err(e) => format!("{what} failed: {e}"),
    }
}
