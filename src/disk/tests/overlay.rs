use super::*;
use crate::disk::{
    backing_chain, create_overlay, make_durable, BaseIdentity, Disk, DiskError, ImageFormat,
};
use std::time::Instant;
use vm_memory::VolatileSlice;

const SIZE: u64 = 4 * MIB;

fn base_and_overlay(dir: &TestDir) -> (PathBuf, PathBuf, Vec<u8>) {
    let base = dir.join("base.raw");
    let model = make_raw(&base, SIZE, 1);
    let top = dir.join("vm.qcow2");
    // Relative backing name: must resolve against the overlay's directory, not the cwd.
    create_overlay(&top, Path::new("base.raw"), ImageFormat::Raw, SIZE).unwrap();
    (base, top, model)
}

#[test]
fn disk_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<Disk>();
}

#[test]
fn overlay_reads_base_and_writes_only_overlay() {
    let dir = TestDir::new("overlay-basic");
    let (base, top, mut model) = base_and_overlay(&dir);
    let base_hash = hash_file(&base);
    let identity = BaseIdentity::capture(&base).unwrap();

    let disk = Disk::open(&top).unwrap();
    assert_eq!(disk.size(), SIZE);
    let mut buf = vec![0u8; SIZE as usize];
    disk.read_at(&mut buf, 0).unwrap();
    assert!(buf == model, "fresh overlay must read the base");

    // Unaligned, cluster-straddling, and whole-cluster writes.
    let writes: [(u64, usize, u64); 4] = [
        (4096 + 100, 10_000, 2),
        (65536 - 7, 20, 3),
        (3 * 65536, 65536, 4),
        (SIZE - 300, 300, 5),
    ];
    for (off, len, seed) in writes {
        let data = pattern(len, seed);
        disk.write_at(&data, off).unwrap();
        model_write(&mut model, off, &data);
    }
    disk.read_at(&mut buf, 0).unwrap();
    assert!(buf == model, "overlay must read its writes over the base");
    disk.flush().unwrap();
    drop(disk);

    assert_eq!(hash_file(&base), base_hash, "base image was modified");
    identity.verify().unwrap();
    assert!(read_view(&top) == model, "reopened overlay lost data");
    qemu_check(&top);
    let flat = dir.join("flat.raw");
    if qemu_convert_raw(&top, &flat) {
        assert!(
            fs::read(&flat).unwrap() == model,
            "qemu reads something else"
        );
    }
}

#[test]
fn out_of_range_and_bad_targets_are_rejected() {
    let dir = TestDir::new("overlay-errors");
    let (base, top, _) = base_and_overlay(&dir);
    let disk = Disk::open(&top).unwrap();
    let err = disk.write_at(&[1; 10], SIZE - 5).unwrap_err();
    assert!(matches!(err, DiskError::OutOfRange { .. }), "{err}");
    let mut b = [0u8; 1];
    assert!(disk.read_at(&mut b, SIZE).is_err());
    assert!(disk.read_at(&mut b, u64::MAX).is_err());
    drop(disk);

    let err = Disk::open(&base).unwrap_err();
    assert!(matches!(err, DiskError::NotOverlay { .. }), "{err}");
    let standalone = dir.join("standalone.qcow2");
    crate::disk::chain::create_qcow2(&standalone, MIB, None, None).unwrap();
    let err = Disk::open(&standalone).unwrap_err();
    assert!(matches!(err, DiskError::IsBase { .. }), "{err}");

    let err = create_overlay(&top, &base, ImageFormat::Raw, SIZE).unwrap_err();
    assert!(matches!(err, DiskError::AlreadyExists { .. }), "{err}");
    let err = create_overlay(
        &dir.join("x.qcow2"),
        Path::new("nope.raw"),
        ImageFormat::Raw,
        SIZE,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "backing file {} of {} is missing",
            dir.join("nope.raw").display(),
            dir.join("x.qcow2").display()
        )
    );
    assert!(!dir.join("x.qcow2").exists());
}

#[test]
fn write_zeroes_and_discard() {
    let dir = TestDir::new("overlay-zero");
    let (base, top, mut model) = base_and_overlay(&dir);
    let base_hash = hash_file(&base);
    let mut disk = Disk::open(&top).unwrap();

    // Unaligned on both ends: whole clusters become zero clusters, the edges are written.
    disk.write_zeroes(1000, 3 * 65536).unwrap();
    model[1000..1000 + 3 * 65536].fill(0);
    // Discard of data we wrote and of pure base data: both must read as zeroes afterwards,
    // never as stale base bytes.
    let data = pattern(2 * 65536, 9);
    disk.write_at(&data, 8 * 65536).unwrap();
    disk.discard(8 * 65536, 2 * 65536).unwrap();
    model[8 * 65536..10 * 65536].fill(0);
    disk.discard(12 * 65536, 65536).unwrap();
    model[12 * 65536..13 * 65536].fill(0);
    // Partial-cluster discard is allowed to do nothing; it must not corrupt anything.
    disk.discard(20 * 65536 + 10, 100).unwrap();

    let mut buf = vec![0u8; SIZE as usize];
    disk.read_at(&mut buf, 0).unwrap();
    let zeroed = &buf[8 * 65536..10 * 65536];
    assert!(zeroed.iter().all(|&b| b == 0));
    assert!(buf == model);
    drop(disk);
    assert_eq!(hash_file(&base), base_hash);
    qemu_check(&top);
}

#[test]
fn volatile_slices_round_trip() {
    let dir = TestDir::new("overlay-volatile");
    let (_, top, model) = base_and_overlay(&dir);
    let disk = Disk::open(&top).unwrap();
    let mut a = pattern(4096, 11);
    let mut b = pattern(512, 12);
    let expect: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
    {
        let slices = [
            VolatileSlice::from(&mut a[..]),
            VolatileSlice::from(&mut b[..]),
        ];
        disk.write_volatile(&slices, 10_000).unwrap();
    }
    let mut c = vec![0u8; 4096 + 512];
    let mut d = [0u8; 100];
    {
        let slices = [
            VolatileSlice::from(&mut c[..]),
            VolatileSlice::from(&mut d[..]),
        ];
        disk.read_volatile(&slices, 10_000).unwrap();
    }
    assert!(c == expect);
    assert!(d[..] == model[10_000 + 4608..10_000 + 4708]);
}

#[test]
fn switch_overlay_freezes_current_layer() {
    let dir = TestDir::new("overlay-switch");
    let (base, top, mut model) = base_and_overlay(&dir);
    let mut disk = Disk::open(&top).unwrap();
    let a = pattern(100_000, 21);
    disk.write_at(&a, 50_000).unwrap();
    model_write(&mut model, 50_000, &a);
    let frozen_model = model.clone();

    // Prepared outside the pause.
    let next = dir.join("vm-1.qcow2");
    create_overlay(&next, Path::new("vm.qcow2"), ImageFormat::Qcow2, SIZE).unwrap();

    let wrong = dir.join("wrong.qcow2");
    create_overlay(&wrong, Path::new("base.raw"), ImageFormat::Raw, SIZE).unwrap();
    let err = disk.switch_overlay(&wrong).unwrap_err();
    assert!(matches!(err, DiskError::NotBackingFile { .. }), "{err}");

    let prepared = disk.prepare_switch(&next).unwrap();
    let t = Instant::now();
    let frozen = disk.switch_prepared(prepared).unwrap();
    let took = t.elapsed();
    eprintln!("switch_prepared (the part inside the pause) took {took:?}");
    assert!(took.as_millis() < 50, "switch took {took:?}");
    assert_eq!(frozen, top);
    assert_eq!(disk.path(), next);
    make_durable(&frozen).unwrap();
    let frozen_hash = hash_file(&frozen);

    let b = pattern(70_000, 22);
    disk.write_at(&b, 40_000).unwrap();
    model_write(&mut model, 40_000, &b);
    let mut buf = vec![0u8; SIZE as usize];
    disk.read_at(&mut buf, 0).unwrap();
    assert!(buf == model);
    disk.flush().unwrap();
    drop(disk);

    assert_eq!(hash_file(&frozen), frozen_hash, "frozen layer was written");
    assert!(
        read_view(&frozen) == frozen_model,
        "snapshot content changed"
    );
    assert!(read_view(&next) == model);
    let chain: Vec<PathBuf> = backing_chain(&next)
        .unwrap()
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(chain, vec![next.clone(), top.clone(), base.clone()]);
    qemu_check(&top);
    qemu_check(&next);
}

/// A fuzzer's scratch layer: writes (unaligned ones too) read back on top
/// of the overlay, never reach the overlay file, and a reset drops them.
#[test]
fn scratch_layer_keeps_writes_in_memory_until_reset() {
    let dir = TestDir::new("overlay-scratch");
    let (_base, top, mut model) = base_and_overlay(&dir);
    let disk = Disk::open(&top).unwrap();
    disk.write_at(&pattern(4096, 9), 8192).unwrap();
    model_write(&mut model, 8192, &pattern(4096, 9));
    disk.flush().unwrap();
    let before_file = hash_file(&top);
    let snapshot = model.clone();

    disk.begin_scratch().unwrap();
    let mut buf = vec![0u8; SIZE as usize];
    for round in 0..3u64 {
        let writes: [(u64, usize); 4] = [
            (8192 + 100, 700),
            (0, 512),
            (SIZE - 513, 513),
            (70_000, 5000),
        ];
        for (i, (off, len)) in writes.into_iter().enumerate() {
            let data = pattern(len, 100 + round * 10 + i as u64);
            disk.write_at(&data, off).unwrap();
            model_write(&mut model, off, &data);
        }
        disk.write_zeroes(4096, 1024).unwrap();
        model_write(&mut model, 4096, &[0u8; 1024]);
        disk.flush().unwrap();
        disk.read_at(&mut buf, 0).unwrap();
        assert!(
            buf == model,
            "round {round}: reads must see the scratch writes"
        );
        assert!(disk.scratch_bytes() > 0);
        disk.reset_scratch();
        model = snapshot.clone();
        disk.read_at(&mut buf, 0).unwrap();
        assert!(
            buf == model,
            "round {round}: a reset must drop every scratch write"
        );
    }
    assert_eq!(hash_file(&top), before_file, "the overlay file was written");
    assert!(read_view(&top) == snapshot);

    // A new snapshot starts from the disk as the guest sees it: what the
    // old layer held is written down, and survives the next reset.
    disk.write_at(&pattern(1000, 77), 300).unwrap();
    model_write(&mut model, 300, &pattern(1000, 77));
    disk.begin_scratch().unwrap();
    disk.write_at(&pattern(512, 78), 0).unwrap();
    disk.reset_scratch();
    disk.read_at(&mut buf, 0).unwrap();
    assert!(
        buf == model,
        "a second snapshot lost the first one's writes"
    );
}
