//! Test-only: lets a test stop the snapshot writer at a named point, so a
//! kill -9 lands inside the operation for certain instead of by timing.
//!
//! `REWIND_TEST_STALL_AT=PHASE:NAME` (read once, at the first snapshot)
//! makes the creation of snapshot NAME stop at PHASE: rewind writes
//! `$REWIND_HOME/stalled-at-PHASE` and then waits forever, for the test to
//! kill it. Phases, in order: `overlays-created` (before the pause),
//! `overlay-switched`, `memory-write-started`, `memory-written` (all three
//! with the guest paused), `state-written`, `before-publish`, `published`.
//! Not for users: a matching snapshot never finishes.

use std::sync::OnceLock;

pub const PHASES: &[&str] = &[
    "overlays-created",
    "overlay-switched",
    "memory-write-started",
    "memory-written",
    "state-written",
    "before-publish",
    "published",
];

fn wanted() -> Option<&'static (String, String)> {
    static AT: OnceLock<Option<(String, String)>> = OnceLock::new();
    AT.get_or_init(|| {
        let v = std::env::var("REWIND_TEST_STALL_AT").ok()?;
        let (phase, name) = v.split_once(':')?;
        Some((phase.to_string(), name.to_string()))
    })
    .as_ref()
}

/// Stops here for good if the test asked for `phase` of snapshot `name`.
pub fn point(phase: &str, name: &str) {
    let Some((p, n)) = wanted() else {
        return;
    };
    if p != phase || n != name {
        return;
    }
    let marker = crate::paths::rewind_home().join(format!("stalled-at-{phase}"));
    if std::fs::write(&marker, b"").is_err() {
        return;
    }
    loop {
        std::thread::park();
    }
}
