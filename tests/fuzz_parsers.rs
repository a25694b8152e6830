//! The fuzz targets (src/fuzz.rs) in the normal suite: every crash the
//! fuzzer ever found (fuzz/regressions/TARGET/) and every seed
//! (fuzz/seeds/TARGET/) must pass, and a bounded random run (mutations of
//! the seeds, a fixed number per target, seeded so a failure repeats)
//! stands in for the fuzzer where cargo-fuzz does not run.
//! `scripts/fuzz-parsers.sh` runs the real fuzzer.

use std::path::Path;

/// Inputs per target; the bundle writes files for each, so fewer.
fn random_runs(target: &str) -> usize {
    if target == "bundle" || target == "memory_delta" {
        300
    } else {
        2000
    }
}

fn inputs(kind: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let p = e.path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A few of libFuzzer's mutations: flip bits, set interesting bytes,
/// insert, erase, duplicate a slice, splice in another seed.
fn mutate(rng: &mut Rng, input: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..1 + rng.below(8) {
        let len = input.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = [0, 0xff, 0x7f, 0x80, b'\n', b' ', b'0', 1][rng.below(8)];
            }
            2 => {
                let i = rng.below(len + 1);
                input.insert(i, rng.next() as u8);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below(len - i + 1).min(64);
                input.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below(len - i + 1).min(256);
                let piece: Vec<u8> = input[i..i + n].to_vec();
                let at = rng.below(len + 1);
                input.splice(at..at, piece);
            }
            5 if !other.is_empty() => {
                let i = rng.below(other.len());
                let n = rng.below(other.len() - i + 1).min(256);
                let at = rng.below(len + 1);
                input.splice(at..at, other[i..i + n].iter().copied());
            }
            _ if len >= 8 => {
                // An interesting little-endian number where a length may be.
                let i = rng.below(len - 7);
                let v: u64 = [0, 1, u64::MAX, 1 << 31, 1 << 32, 1 << 63, 0xffff][rng.below(7)];
                input[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ => {}
        }
    }
}

fn run_target(name: &str) {
    let (_, f) = rewind::parser_fuzz::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .expect("a target of that name");
    let regressions = inputs("regressions", name);
    for (path, data) in &regressions {
        eprintln!("{name}: regression {path}");
        f(data);
    }
    let seeds = inputs("seeds", name);
    assert!(!seeds.is_empty(), "{name}: no seeds in fuzz/seeds/{name}");
    for (_, data) in &seeds {
        f(data);
    }
    let mut rng = Rng(0x5EED_0000 ^ (name.len() as u64 * 0x9E37_79B9));
    for run in 0..random_runs(name) {
        let mut input = seeds[rng.below(seeds.len())].1.clone();
        let other = &seeds[rng.below(seeds.len())].1;
        mutate(&mut rng, &mut input, other);
        let result = std::panic::catch_unwind(|| f(&input));
        if result.is_err() {
            let out = std::env::temp_dir().join(format!("rewind-fuzz-{name}-{run}"));
            std::fs::write(&out, &input).unwrap();
            panic!(
                "{name}: random input {run} failed; saved to {} (copy it to fuzz/regressions/{name}/)",
                out.display()
            );
        }
    }
}

#[test]
fn http() {
    run_target("http");
}

#[test]
fn agent() {
    run_target("agent");
}

#[test]
fn virtio_blk() {
    run_target("virtio_blk");
}

#[test]
fn assist() {
    run_target("assist");
}

#[test]
fn bundle() {
    run_target("bundle");
}

#[test]
fn memory_delta() {
    run_target("memory_delta");
}
