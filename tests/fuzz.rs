//! Fuzzing on /dev/kvm: the doorbells, the in-memory snapshot and reset
//! (exact, also when the guest changes its own page tables), a fault
//! reported as a crash, and `rewind fuzz` finding the planted crash.

mod common;
use common::*;

use std::time::Duration;

use rewind::{Console, Event, Vm, VmOptions};

/// What the test guest's target reports when the window it remapped still
/// shows the mapping of the previous input (main.c FUZZ_STALE_PT_CODE).
const STALE_PAGE_TABLE: u64 = 0x57A1E;
const MAGIC_CRASH: u64 = 0x444E5752;
/// fuzz.c FUZZ_STALE_MSR_CODE: KERNEL_GS_BASE held an earlier input's value.
const STALE_MSR: u64 = 0x5157;
/// fuzz.c FUZZ_STALE_LAPIC_CODE: the LAPIC held an earlier input's write.
const STALE_LAPIC: u64 = 0x1A71C;
/// fuzz.c FUZZ_STALE_SSE_CODE: XMM7 held an earlier input's value.
const STALE_SSE: u64 = 0x55E;

fn target(append: &str) -> Vm {
    let mut vm = Vm::boot(&VmOptions {
        cmdline: format!("mode=fuzz {append}"),
        ..VmOptions::default()
    })
    .expect("boot the fuzz target");
    assert_eq!(
        vm.run(Duration::from_secs(60)).unwrap(),
        Event::SnapshotRequested
    );
    vm.snapshot().unwrap();
    vm
}

fn run_input(vm: &mut Vm, input: &[u8]) -> Event {
    vm.write_input(input).unwrap();
    let event = vm.run(Duration::from_secs(10)).unwrap();
    vm.reset().unwrap();
    event
}

#[test]
fn many_resets_leave_memory_registers_and_devices_as_snapshotted() {
    if !kvm_available("reset_exact") {
        return;
    }
    let mut vm = target("dirty=16");
    let before = vm.registers().unwrap();
    for i in 0..300u32 {
        // Crashes and plain inputs alike, of varying length.
        let input: Vec<u8> = if i % 7 == 0 {
            b"RWND".to_vec()
        } else {
            i.to_le_bytes().repeat(1 + i as usize % 5)
        };
        let want = if i % 7 == 0 {
            Event::Crash(MAGIC_CRASH)
        } else {
            Event::Done
        };
        assert_eq!(run_input(&mut vm, &input), want, "input {i}");
    }
    let diffs = vm.differences_from_snapshot().unwrap();
    assert!(diffs.is_empty(), "after 300 resets: {diffs:?}");
    assert_eq!(vm.registers().unwrap(), before);
    let t = vm.reset_times();
    assert_eq!(t.resets, 300);
    // 16 pages, the input and the feedback, the stack: copied back each time.
    assert!(t.pages_copied >= 300 * 18, "{t:?}");
}

/// fuzz.c FUZZ_DIRTY_BASE: `dirty=N` writes one word into each of N pages
/// from here, which hold zeros in the snapshot.
const DIRTY_BASE: u64 = 40 << 20;

/// Pages every input writes become hot (src/fuzz/hot.rs): KVM stops
/// write-protecting them, so the guest's writes to them go unlogged, and
/// every reset must copy them back anyway. Each input writes `page + its
/// length` into 16 pages; after every reset, hot or not, they hold the
/// snapshot's zeros again.
#[test]
fn pages_written_by_every_input_turn_hot_and_are_still_reset() {
    if !kvm_available("reset_hot_pages") {
        return;
    }
    let mut vm = target("dirty=16");
    let mut page = vec![0u8; 4096];
    for i in 0..40u32 {
        let input = vec![b'a'; 1 + i as usize % 9];
        assert_eq!(run_input(&mut vm, &input), Event::Done, "input {i}");
        for p in 0..16u64 {
            vm.read_memory(DIRTY_BASE + p * 4096, &mut page).unwrap();
            assert!(
                page.iter().all(|&b| b == 0),
                "input {i}: page {p} kept the input's write: {:?}",
                &page[..8]
            );
        }
    }
    let diffs = vm.differences_from_snapshot().unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
    let t = vm.reset_times();
    assert!(t.hot_pages >= 16, "the 16 pages never turned hot: {t:?}");
}

/// Runs `n` inputs, each of which crashes with `stale` when it finds what
/// the input before it left (`what`); every one must end Done, and the VM
/// must equal its snapshot afterwards.
fn inputs_never_see_the_last_one(vm: &mut Vm, n: u32, stale: u64, what: &str) {
    for i in 0..n {
        let event = run_input(vm, &i.to_le_bytes());
        assert_ne!(event, Event::Crash(stale), "input {i} found {what}");
        assert_eq!(event, Event::Done, "input {i}");
    }
    let diffs = vm.differences_from_snapshot().unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
}

/// The target with `append`, through [`inputs_never_see_the_last_one`]
/// for 30 inputs; `None` (the test skipped) without KVM.
fn thirty_inputs_each_finding_the_snapshot(
    test: &str,
    append: &str,
    stale: u64,
    what: &str,
) -> Option<Vm> {
    if !kvm_available(test) {
        return None;
    }
    let mut vm = target(append);
    inputs_never_see_the_last_one(&mut vm, 30, stale, what);
    Some(vm)
}

#[test]
fn page_table_changes_between_resets_stay_exact() {
    if !kvm_available("reset_page_tables") {
        return;
    }
    // Each input first checks that its window shows the snapshot's mapping,
    // then remaps it: a reset that left KVM's shadow of the new mapping in
    // place shows up as the STALE crash in the next input.
    let mut vm = target("ptchange=1");
    inputs_never_see_the_last_one(
        &mut vm,
        100,
        STALE_PAGE_TABLE,
        "the page-table mapping of the input before it",
    );
    if is_pvm_host() {
        // Every input rewrote a page table: every reset flushed KVM's shadows.
        assert_eq!(vm.reset_times().slot_reloads, 100);
    }
    // The same in a second address space the input switches to and leaves
    // in place: its tables are not reachable from the snapshot's CR3, so the
    // reset learns of them from CR3 having moved.
    let mut switched = target("cr3switch=1");
    for i in 0..50u32 {
        let event = run_input(&mut switched, &i.to_le_bytes());
        assert_eq!(event, Event::Done, "input {i} (cr3switch)");
    }
    let diffs = switched.differences_from_snapshot().unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
    if is_pvm_host() {
        assert_eq!(switched.reset_times().slot_reloads, 50);
    }
    // An input that leaves the page tables alone costs no flush.
    let mut plain = target("");
    for i in 0..50u32 {
        assert_eq!(run_input(&mut plain, &i.to_le_bytes()), Event::Done);
    }
    assert_eq!(plain.reset_times().slot_reloads, 0);
}

/// A reset leaves MSRs, XCRs and debug registers unread when the vCPU's
/// statistics prove the input ran no ring-0 code (src/fuzz/untouched.rs).
/// With `msrchange=1` every input's ring-0 code writes KERNEL_GS_BASE after
/// checking that it still holds the snapshot's value: a reset that skipped
/// the MSRs then shows up as the STALE crash in the next input.
#[test]
fn an_msr_written_by_ring_0_code_is_reset_and_ring_3_inputs_skip_the_read() {
    let Some(vm) = thirty_inputs_each_finding_the_snapshot(
        "reset_msr",
        "msrchange=1",
        STALE_MSR,
        "KERNEL_GS_BASE as the input before it left it",
    ) else {
        return;
    };
    assert_eq!(vm.reset_times().ring0_unread, 0, "every input ran ring 0");
    let mut plain = target("");
    for i in 0..30u32 {
        assert_eq!(run_input(&mut plain, &i.to_le_bytes()), Event::Done);
    }
    let diffs = plain.differences_from_snapshot().unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
    if is_pvm_host() {
        // The first reset has no earlier statistics to compare with.
        assert_eq!(plain.reset_times().ring0_unread, 29);
        // No timer, every IOAPIC pin masked: nothing reaches its LAPIC.
        assert_eq!(plain.reset_times().lapic_unread, 29);
    }
}

/// A reset writes the FPU/SSE state back without reading it, before KVM
/// has finished the doorbell's MMIO write (the input's next run does): with
/// `ssechange=1` every input checks that XMM7 holds the snapshot's value,
/// then changes it. A reset that lost the write to the unfinished access
/// (or skipped it) shows up as the STALE crash in the next input.
#[test]
fn sse_registers_written_by_ring_3_are_reset() {
    let Some(vm) = thirty_inputs_each_finding_the_snapshot(
        "reset_sse",
        "ssechange=1",
        STALE_SSE,
        "XMM7 as the input before it left it",
    ) else {
        return;
    };
    if is_pvm_host() {
        // Nothing to read after a ring-3 input: the write was left to the
        // run. Not so after the first input (no earlier statistics), nor for
        // the last reset, carried out for the final comparison, which reads.
        assert_eq!(vm.reset_times().writes_left_to_run, 28);
    }
}

/// A reset leaves the LAPIC unread when, besides the proof above, the
/// snapshot shows no interrupt can reach it (src/fuzz/untouched.rs). Ring-3
/// code can still write it through its MMIO page: with `lapicchange=1`
/// every input checks the timer's divide register, then changes it. A reset
/// that skipped the LAPIC after such an input shows up as the STALE crash
/// in the next one.
#[test]
fn a_lapic_written_from_ring_3_is_reset() {
    let Some(vm) = thirty_inputs_each_finding_the_snapshot(
        "reset_lapic",
        "lapicchange=1",
        STALE_LAPIC,
        "the LAPIC as the input before it left it",
    ) else {
        return;
    };
    assert_eq!(vm.reset_times().lapic_unread, 0, "every input wrote it");
}

#[test]
fn disk_writes_since_the_snapshot_are_dropped_by_each_reset() {
    if !kvm_available("reset_disk") {
        return;
    }
    const STALE_DISK: u64 = 0xD15C;
    let home = Home::new("fuzz-disk");
    let base = home.path.join("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    // The VM's overlay goes under REWIND_HOME; only this test gives a disk.
    std::env::set_var("REWIND_HOME", &home.path);
    let mut vm = Vm::boot(&VmOptions {
        cmdline: "mode=fuzz disk=1".into(),
        disks: vec![base.clone()],
        ..VmOptions::default()
    })
    .unwrap();
    assert_eq!(
        vm.run(Duration::from_secs(60)).unwrap(),
        Event::SnapshotRequested
    );
    vm.snapshot().unwrap();
    for i in 0..50u32 {
        let event = run_input(&mut vm, &i.to_le_bytes());
        assert_ne!(
            event,
            Event::Crash(STALE_DISK),
            "input {i} read an earlier input's write"
        );
        assert_eq!(event, Event::Done, "input {i}");
    }
    assert_eq!(vm.disk_scratch_bytes(), 0);
    let diffs = vm.differences_from_snapshot().unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
    let vms = home.path.join("vms");
    drop(vm);
    // The base is never written, and the Vm's folder went with it.
    assert_eq!(std::fs::read(&base).unwrap(), vec![0u8; 1 << 20]);
    assert_eq!(std::fs::read_dir(&vms).map(|d| d.count()).unwrap_or(0), 0);
}

/// A snapshot taken by `rewind snapshot create` restores into a `Vm`, which
/// then snapshots and resets like a booted one: the guest (timer ticks, a
/// region rewritten every tick) replays the same ticks after every reset and
/// never finds its memory corrupt.
#[test]
fn a_snapshot_from_the_store_restores_into_a_vm_that_resets() {
    if !kvm_available("restore_into_vm") {
        return;
    }
    let home = Home::new("fuzz-restore");
    let src = start_guest(
        &home,
        "src",
        "60",
        "period_ms=10 region=1",
        &["--mem", "64"],
    );
    src.wait_for(0, "tick 3", |l| l.contains("tick 3 ok"));
    let o = home.run(&["snapshot", "create", "s1", "--vm", "src"]);
    assert!(o.status.success(), "{}", stderr(&o));
    src.stop();
    let dir = home.path.join("vms/src/snapshots/s1");
    let console = home.path.join("console.txt");
    let mut vm = Vm::restore(&dir, &Console::File(console.clone())).unwrap();
    vm.snapshot().unwrap();
    let rip = vm.registers().unwrap().rip;
    for _ in 0..5 {
        assert_eq!(vm.run(Duration::from_millis(300)).unwrap(), Event::Timeout);
        vm.reset().unwrap();
        assert_eq!(vm.registers().unwrap().rip, rip);
    }
    drop(vm);
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(!text.contains("CORRUPT"), "{text}");
    let ticks: Vec<&str> = text.lines().filter(|l| l.starts_with("tick ")).collect();
    let first = ticks.first().expect("the restored guest ticked");
    let replays = ticks.iter().filter(|l| *l == first).count();
    assert_eq!(replays, 5, "each reset replays from the same tick: {text}");
}

#[test]
fn a_fault_in_the_target_is_a_crash_and_the_next_input_runs() {
    if !kvm_available("reset_fault") {
        return;
    }
    let mut vm = target("fault=1");
    assert_eq!(run_input(&mut vm, b"RWND"), Event::Fault);
    assert_eq!(run_input(&mut vm, b"fine"), Event::Done);
    assert_eq!(run_input(&mut vm, b"RWND!"), Event::Fault);
    assert_eq!(run_input(&mut vm, b"RWN"), Event::Done);
    assert_eq!(vm.feedback().unwrap()[..5], [0, 0, 0, 0, 0]);
    let diffs = vm.differences_from_snapshot().unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
}

#[test]
fn memory_and_registers_written_by_the_harness_are_reset_too() {
    if !kvm_available("reset_harness_writes") {
        return;
    }
    let mut vm = target("");
    let (addr, cap) = vm.input_buffer().unwrap();
    assert!(cap > 4);
    let mut regs = vm.registers().unwrap();
    let saved = regs;
    regs.rbx ^= 0x5a5a;
    vm.set_registers(&regs).unwrap();
    vm.write_memory(0x300_0000, b"written by the harness")
        .unwrap();
    vm.reset().unwrap();
    let mut back = [0u8; 22];
    vm.read_memory(0x300_0000, &mut back).unwrap();
    assert_eq!(back, [0u8; 22]);
    assert_eq!(vm.registers().unwrap(), saved);
    let mut header = [0u8; 4];
    vm.read_memory(addr, &mut header).unwrap();
    assert_eq!(header, [0, 0, 0, 0]);
    assert!(matches!(
        vm.write_input(&vec![0u8; cap]),
        Err(rewind::Error::InputTooLong { .. })
    ));
}

#[test]
fn rewind_fuzz_finds_the_planted_crash_and_writes_its_input() {
    if !kvm_available("rewind_fuzz") {
        return;
    }
    let home = Home::new("fuzz");
    let out = home.path.join("crash.bin");
    // Seed 7 finds the magic after about 6,000 inputs (deterministic).
    let o = home.run(&[
        "fuzz",
        "--guest",
        "test",
        "--seed",
        "7",
        "--duration",
        "120",
        "--output",
        out.to_str().unwrap(),
    ]);
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{text}{}", stderr(&o));
    assert!(
        text.contains("crash found after 6016 inputs"),
        "{text}{}",
        stderr(&o)
    );
    assert!(text.contains("code 0x444e5752"), "{text}");
    let input = std::fs::read(&out).unwrap();
    assert!(input.starts_with(b"RWND"), "{input:?}");
    let rate = text.lines().find(|l| l.contains(" resets/s ")).unwrap();
    for part in ["dirty log", "page copy", "vCPU state", "devices"] {
        assert!(rate.contains(part), "{rate}");
    }
}

#[test]
fn without_a_fuzzer_the_target_runs_its_input_once_and_exits() {
    if !kvm_available("fuzz_alone") {
        return;
    }
    let home = Home::new("fuzz-alone");
    let o = home.run(&[
        "run",
        "--console",
        "stdio",
        "--timeout",
        "60",
        "--mem",
        "64",
        "--append",
        "mode=fuzz",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("fuzz: no fuzzer attached, the input ran once"));
}

/// The Linux-side helper is not run here (that needs a Linux guest booted
/// on this emulated host for minutes); it must at least build cleanly.
#[test]
fn the_linux_doorbell_helper_builds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-images/fuzz-helper");
    let home = Home::new("fuzz-helper");
    let obj = home.path.join("example_target.o");
    let Some(o) = host_tool(
        "gcc",
        &[
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-c",
            dir.join("example_target.c").to_str().unwrap(),
            "-o",
            obj.to_str().unwrap(),
        ],
    ) else {
        return;
    };
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(obj.exists());
}

/// The test guest runs no exec agent: `start_command` says so at once
/// rather than leave a request nobody will answer.
#[test]
fn start_command_needs_a_guest_with_an_exec_agent() {
    if !kvm_available("start_command") {
        return;
    }
    let mut vm = Vm::boot(&VmOptions {
        cmdline: "mode=fuzz".into(),
        ..VmOptions::default()
    })
    .unwrap();
    let err = vm.start_command("true").unwrap_err();
    assert!(err.to_string().contains("no exec agent"), "{err}");
}
