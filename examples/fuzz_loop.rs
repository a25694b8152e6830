//! Boots the embedded test guest's fuzz target, snapshots it at its
//! SNAPSHOT doorbell, runs a few inputs with a reset after each, then
//! times resets. Run: `cargo run --release --example fuzz_loop`
//! (needs /dev/kvm).

use std::time::{Duration, Instant};

use rewind::{Event, Vm, VmOptions};

fn main() -> Result<(), rewind::Error> {
    let mut vm = Vm::boot(&VmOptions {
        cmdline: "mode=fuzz".into(),
        ..VmOptions::default()
    })?;
    let first = vm.run(Duration::from_secs(30))?;
    assert_eq!(
        first,
        Event::SnapshotRequested,
        "the target never rang SNAPSHOT"
    );
    vm.snapshot()?;
    let regs = vm.registers()?;
    println!(
        "snapshot at rip {:#x}, input buffer {:x?}",
        regs.rip,
        vm.input_buffer()
    );
    for input in [&b"hello"[..], b"RWN", b"RWND"] {
        vm.write_input(input)?;
        let event = vm.run(Duration::from_secs(1))?;
        println!(
            "{:?}: {event:?}, feedback {:?}",
            String::from_utf8_lossy(input),
            &vm.feedback()?[..5]
        );
        vm.reset()?;
    }
    let n = 2000;
    let t = Instant::now();
    for _ in 0..n {
        vm.write_input(b"x")?;
        vm.run(Duration::from_secs(1))?;
        vm.reset()?;
    }
    let secs = t.elapsed().as_secs_f64();
    println!("{:.0} inputs/s (run + reset)", n as f64 / secs);
    println!("{:#?}", vm.reset_times());
    let diffs = vm.differences_from_snapshot()?;
    println!(
        "differences from the snapshot after {} resets: {diffs:?}",
        n + 3
    );
    Ok(())
}
