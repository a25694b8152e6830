//! What a guest flooding its agent line costs the VMM's event loop: the
//! protocol engine's time to take 1 MiB of short lines in one piece (what
//! the COM2 inbox hands over at most) and 1 MiB of one endless line in
//! 64-byte pieces. Median of 9 (`cargo bench --bench agent_flood`).

use std::time::{Duration, Instant};

use rewind::agent::{Engine, OutputMode};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(f: impl Fn(&mut Engine)) -> Duration {
    median(
        (0..9)
            .map(|_| {
                let mut e = Engine::new(1);
                e.start("true", Duration::from_secs(60), OutputMode::Collect);
                let t = Instant::now();
                f(&mut e);
                t.elapsed()
            })
            .collect(),
    )
}

fn main() {
    let short = b"x\n".repeat(1 << 19);
    let lines = time(|e| {
        e.receive(&short);
    });
    let piece = [b'4'; 64];
    let endless = time(|e| {
        for _ in 0..(1 << 20) / 64 {
            e.receive(&piece);
        }
    });
    println!("agent flood: 1 MiB of 2-byte lines at once: median {lines:?}");
    println!("agent flood: 1 MiB of one line in 64-byte pieces: median {endless:?}");
}
