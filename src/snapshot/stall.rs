//! Test-only: lets a test stop the snapshot writer at a named point, so a
//! kill -9 lands inside the operation for certain instead of by timing.
//!
//! `REWIND_TEST_STALL_AT=PHASE:NAME` (read once, at the first snapshot)
//! makes the creation of snapshot NAME stop at PHASE: rewind writes
//! `$REWIND_HOME/stalled-at-PHASE` and then waits forever, for the test to
//! kill it. Phases, in order: `overlays-created` (before the pause),
//! `overlay-switched` (with the guest paused), `memory-write-started` (in the
//! memory writer: a forked child for a live snapshot, so the guest runs),
//! `state-written` (written while the memory writer works),
//! `memory-written`, `before-publish`, `published`; and in
//! a delete that merges memory layers, `merge-written`, `flatten-written`
//! and `flatten-renamed` (NAME is then the child being rewritten).
//! Not for users: a matching snapshot never finishes.

use std::sync::OnceLock;

pub const PHASES: &[&str] = &[
    "overlays-created",
    "overlay-switched",
    "memory-write-started",
    "state-written",
    "memory-written",
    "before-publish",
    "published",
];

/// Points inside a delete that merges memory layers into a child.
pub const DELETE_PHASES: &[&str] = &["merge-written", "flatten-written", "flatten-renamed"];

fn wanted() -> Option<&'static (String, String)> {
    static AT: OnceLock<Option<(String, String)>> = OnceLock::new();
    AT.get_or_init(|| {
        let v = std::env::var("REWIND_TEST_STALL_AT").ok()?;
        let (phase, name) = v.split_once(':')?;
        Some((phase.to_string(), name.to_string()))
    })
    .as_ref()
}

/// The marker file to write if the test asked for `phase` of snapshot
/// `name` (for code that cannot stop here itself: the forked memory writer).
pub fn marker_if_wanted(phase: &str, name: &str) -> Option<std::path::PathBuf> {
    let (p, n) = wanted()?;
    (p == phase && n == name)
        .then(|| crate::paths::rewind_home().join(format!("stalled-at-{phase}")))
}

/// Stops here for good if the test asked for `phase` of snapshot `name`.
pub fn point(phase: &str, name: &str) {
    let Some(marker) = marker_if_wanted(phase, name) else {
        return;
    };
    if std::fs::write(&marker, b"").is_err() {
        return;
    }
    loop {
        std::thread::park();
    }
}
