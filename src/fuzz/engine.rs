//! A small coverage-guided mutation loop over [`crate::Vm`]: inputs that
//! mark a feedback byte no earlier input marked join the corpus, and new
//! inputs are havoc mutations (bit flips, byte sets, inserts, deletes) of
//! corpus entries. Seeded and single-threaded, so a seed replays exactly.

use std::time::{Duration, Instant};

use crate::api::{Error, Event, Vm};

#[derive(Debug, Clone)]
pub struct FuzzOptions {
    pub seed: u64,
    pub duration: Duration,
    /// How long one input may run before it counts as a hang.
    pub input_timeout: Duration,
    /// Longest input generated.
    pub max_len: usize,
    /// Stop at the first crash.
    pub stop_on_crash: bool,
}

impl Default for FuzzOptions {
    fn default() -> Self {
        FuzzOptions {
            seed: 1,
            duration: Duration::from_secs(10),
            input_timeout: Duration::from_secs(1),
            max_len: 64,
            stop_on_crash: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Crash {
    pub input: Vec<u8>,
    /// The CRASH doorbell's code; `None` for a fault (triple fault).
    pub code: Option<u64>,
    /// Which input (counting from 1) found it.
    pub execs: u64,
}

#[derive(Debug, Clone, Default)]
pub struct FuzzReport {
    pub execs: u64,
    pub hangs: u64,
    pub corpus: usize,
    pub crash: Option<Crash>,
    pub elapsed: Duration,
}

/// xorshift64*: small, fast, and the same sequence for the same seed everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // Never zero (xorshift's fixed point), and seeds 1 and 2 far apart.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b' ', b'A', b'0'];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, max_len: usize) {
    // Mostly one change: a byte-at-a-time compare chain advances by one
    // right byte, which more stacked changes would often undo.
    let rounds = if rng.below(2) == 0 {
        1
    } else {
        2 + rng.below(3)
    };
    for _ in 0..rounds {
        match rng.below(6) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = rng.next() as u8;
            }
            2 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            3 if input.len() < max_len => {
                let i = rng.below(input.len() + 1);
                input.insert(i, rng.next() as u8);
            }
            4 if input.len() > 1 => {
                let i = rng.below(input.len());
                input.remove(i);
            }
            _ if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = input[i].wrapping_add(1 + rng.below(16) as u8);
            }
            _ => input.push(rng.next() as u8),
        }
    }
}

/// Runs the loop on a VM that is stopped at its SNAPSHOT doorbell with
/// the snapshot taken (see [`Vm::snapshot`]).
pub fn fuzz(vm: &mut Vm, opts: &FuzzOptions) -> Result<FuzzReport, Error> {
    let start = Instant::now();
    let mut rng = Rng::new(opts.seed);
    let mut corpus: Vec<Vec<u8>> = vec![b"fuzz".to_vec()];
    let mut seen: Vec<bool> = Vec::new();
    let mut report = FuzzReport::default();
    while start.elapsed() < opts.duration {
        // The newest entry half the time: it went furthest (AFL favours new
        // finds the same way).
        let pick = if rng.below(2) == 0 {
            corpus.len() - 1
        } else {
            rng.below(corpus.len())
        };
        let mut input = corpus[pick].clone();
        mutate(&mut rng, &mut input, opts.max_len);
        vm.write_input(&input)?;
        let event = vm.run(opts.input_timeout)?;
        report.execs += 1;
        let feedback = vm.feedback()?;
        if seen.len() < feedback.len() {
            seen.resize(feedback.len(), false);
        }
        let mut new = false;
        for (s, &f) in seen.iter_mut().zip(&feedback) {
            if f != 0 && !*s {
                *s = true;
                new = true;
            }
        }
        if new {
            corpus.push(input.clone());
        }
        let crash = match event {
            Event::Crash(code) => Some(Some(code)),
            Event::Fault => Some(None),
            Event::Timeout => {
                report.hangs += 1;
                None
            }
            Event::Done => None,
            Event::SnapshotRequested
            | Event::Exit(_)
            | Event::CommandExited(_)
            | Event::Fatal(_) => {
                return Err(Error::Dead(format!(
                    "the target did not end its input with DONE or CRASH: {event:?}"
                )))
            }
        };
        vm.reset()?;
        if let Some(code) = crash {
            if report.crash.is_none() {
                report.crash = Some(Crash {
                    input,
                    code,
                    execs: report.execs,
                });
            }
            if opts.stop_on_crash {
                break;
            }
        }
    }
    report.corpus = corpus.len();
    report.elapsed = start.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_mutations() {
        let run = |seed| {
            let mut rng = Rng::new(seed);
            let mut v = b"fuzz".to_vec();
            for _ in 0..100 {
                mutate(&mut rng, &mut v, 64);
            }
            v
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
