use super::*;
use crate::disk::chain::open_layer;
use crate::disk::{
    backing_chain, create_overlay, export_flat, probe, rebase, BaseIdentity, Disk, DiskError,
    ImageFormat,
};
use std::os::unix::fs::MetadataExt;

pub(crate) const SIZE: u64 = 8 * MIB;

/// raw base <- o1 <- o2 <- o3, each level with its own (partly overlapping) writes.
/// Returns the paths and the model of what each level shows: [base, o1, o2, o3].
pub(crate) fn three_deep(dir: &TestDir) -> (Vec<PathBuf>, Vec<Vec<u8>>) {
    let base = dir.join("base.raw");
    let mut model = make_raw(&base, SIZE, 100);
    let mut paths = vec![base];
    let mut models = vec![model.clone()];
    let writes: [&[(u64, usize)]; 3] = [
        &[(0, 65536), (MIB + 10, 300_000), (5 * MIB, 4096)],
        &[
            (MIB + 200_000, 200_000),
            (3 * MIB - 5, 10),
            (SIZE - 65536, 65536),
        ],
        &[(10, 20), (MIB, 65536 * 3), (6 * MIB + 1, 1)],
    ];
    for (level, ws) in writes.iter().enumerate() {
        let name = format!("o{}.qcow2", level + 1);
        let path = dir.join(&name);
        let below = paths.last().unwrap().file_name().unwrap().to_owned();
        let fmt = if level == 0 {
            ImageFormat::Raw
        } else {
            ImageFormat::Qcow2
        };
        create_overlay(&path, Path::new(&below), fmt, SIZE).unwrap();
        let disk = Disk::open(&path).unwrap();
        for (i, &(off, len)) in ws.iter().enumerate() {
            let data = pattern(len, 1000 + level as u64 * 10 + i as u64);
            disk.write_at(&data, off).unwrap();
            model_write(&mut model, off, &data);
        }
        // Explicit zeroes over base data must survive merges as zeroes, not as base data.
        disk.write_zeroes(2 * MIB + 65536 * level as u64, 65536)
            .unwrap();
        model[(2 * MIB + 65536 * level as u64) as usize..][..65536].fill(0);
        drop(disk);
        paths.push(path);
        models.push(model.clone());
    }
    (paths, models)
}

#[test]
fn three_deep_chain_reads_right_bytes() {
    let dir = TestDir::new("chain-3");
    let (paths, models) = three_deep(&dir);
    let base_hash = hash_file(&paths[0]);
    for level in 1..=3 {
        assert!(read_view(&paths[level]) == models[level], "level {level}");
        qemu_check(&paths[level]);
    }
    // Through the Disk API as well, at odd offsets.
    let disk = Disk::open(&paths[3]).unwrap();
    for off in [0u64, 9, MIB - 1, MIB + 199_999, 2 * MIB + 65535, SIZE - 17] {
        let mut buf = vec![0u8; 17];
        disk.read_at(&mut buf, off).unwrap();
        assert_eq!(
            buf[..],
            models[3][off as usize..off as usize + 17],
            "at {off}"
        );
    }
    drop(disk);
    assert_eq!(hash_file(&paths[0]), base_hash);

    let chain = backing_chain(&paths[3]).unwrap();
    let expect: Vec<(PathBuf, ImageFormat)> = vec![
        (paths[3].clone(), ImageFormat::Qcow2),
        (paths[2].clone(), ImageFormat::Qcow2),
        (paths[1].clone(), ImageFormat::Qcow2),
        (paths[0].clone(), ImageFormat::Raw),
    ];
    assert_eq!(chain, expect);
    if let Some(q) = qemu_chain(&paths[3]) {
        let ours: Vec<PathBuf> = expect.into_iter().map(|c| c.0).collect();
        assert_eq!(q, ours);
    }
}

#[test]
fn export_matches_qemu_convert() {
    let dir = TestDir::new("chain-export");
    let (paths, models) = three_deep(&dir);
    let ours = dir.join("export.raw");
    export_flat(&paths[3], &ours, ImageFormat::Raw).unwrap();
    let ours_bytes = fs::read(&ours).unwrap();
    assert!(ours_bytes == models[3], "export differs from the model");
    // Zero runs must be holes, not written zeroes.
    let allocated = fs::metadata(&ours).unwrap().blocks() * 512;
    assert!(
        allocated < SIZE,
        "export is not sparse ({allocated} bytes allocated)"
    );

    let theirs = dir.join("qemu.raw");
    if qemu_convert_raw(&paths[3], &theirs) {
        assert!(
            ours_bytes == fs::read(&theirs).unwrap(),
            "differs from qemu-img convert"
        );
    }

    let q = dir.join("export.qcow2");
    export_flat(&paths[3], &q, ImageFormat::Qcow2).unwrap();
    assert!(
        backing_chain(&q).unwrap().len() == 1,
        "export must be standalone"
    );
    assert!(read_view(&q) == models[3]);
    qemu_check(&q);
    let q_raw = dir.join("qemu-of-export.raw");
    if qemu_convert_raw(&q, &q_raw) {
        assert!(fs::read(&q_raw).unwrap() == models[3]);
    }

    let err = export_flat(&paths[3], &paths[0], ImageFormat::Raw).unwrap_err();
    assert!(err.to_string().contains("part of the chain"), "{err}");
}

#[test]
fn qcow2_base_works() {
    let dir = TestDir::new("chain-qcow2-base");
    let raw = dir.join("src.raw");
    let mut model = make_raw(&raw, SIZE, 200);
    let mut bases = Vec::new();
    if have_qemu_img() {
        // Base created by qemu and filled by qemu (compressed clusters: imago's special path).
        let compressed = dir.join("compressed.qcow2");
        let out = Command::new("qemu-img")
            .args(["convert", "-c", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&compressed)
            .status()
            .unwrap();
        assert!(out.success());
        bases.push(compressed);
        // Base created by `qemu-img create -f qcow2`, filled before any VM used it.
        let created = dir.join("created.qcow2");
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&created)
            .arg(SIZE.to_string())
            .status()
            .unwrap();
        assert!(st.success());
        let l = open_layer(&created, ImageFormat::Qcow2, None, true).unwrap();
        l.write(&model[..], 0).unwrap();
        drop(l);
        bases.push(created);
    } else {
        let created = dir.join("created.qcow2");
        crate::disk::chain::create_qcow2(&created, SIZE, None, None).unwrap();
        let l = open_layer(&created, ImageFormat::Qcow2, None, true).unwrap();
        l.write(&model[..], 0).unwrap();
        drop(l);
        bases.push(created);
    }
    for base in bases {
        assert_eq!(probe(&base).unwrap(), ImageFormat::Qcow2);
        let base_hash = hash_file(&base);
        let name = base.file_name().unwrap().to_str().unwrap().to_string();
        let top = dir.join(format!("{name}.top.qcow2"));
        create_overlay(&top, Path::new(&name), ImageFormat::Qcow2, SIZE).unwrap();
        let mut m = model.clone();
        let disk = Disk::open(&top).unwrap();
        let data = pattern(123_456, 7);
        disk.write_at(&data, 777_777).unwrap();
        model_write(&mut m, 777_777, &data);
        drop(disk);
        assert!(read_view(&top) == m);
        assert_eq!(
            hash_file(&base),
            base_hash,
            "qcow2 base {name} was modified"
        );
        qemu_check(&top);
        qemu_check(&base);
        let ours = dir.join(format!("{name}.export.raw"));
        export_flat(&top, &ours, ImageFormat::Raw).unwrap();
        let theirs = dir.join(format!("{name}.qemu.raw"));
        if qemu_convert_raw(&top, &theirs) {
            assert!(fs::read(&ours).unwrap() == fs::read(&theirs).unwrap());
        }
        assert!(fs::read(&ours).unwrap() == m);
    }
    model.clear();
}

#[test]
fn base_identity_detects_change_and_absence() {
    let dir = TestDir::new("chain-identity");
    let base = dir.join("base.img");
    make_raw(&base, MIB, 3);
    let id = BaseIdentity::capture(&base).unwrap();
    assert_eq!(id.format, ImageFormat::Raw);
    id.verify().unwrap();
    let json = serde_json::to_string(&id).unwrap();
    let back: BaseIdentity = serde_json::from_str(&json).unwrap();
    assert_eq!(back, id);

    let f = fs::OpenOptions::new().write(true).open(&base).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    f.set_modified(later).unwrap();
    drop(f);
    let msg = id.verify().unwrap_err().to_string();
    assert_eq!(
        msg,
        format!(
            "base image {} changed since the snapshot was taken (size or mtime differs)",
            base.display()
        )
    );
    let id = BaseIdentity::capture(&base).unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(&base)
        .unwrap()
        .set_len(MIB + 1)
        .unwrap();
    assert!(matches!(id.verify(), Err(DiskError::BaseChanged { .. })));

    fs::remove_file(&base).unwrap();
    let msg = id.verify().unwrap_err().to_string();
    assert_eq!(msg, format!("base image {} is missing", base.display()));
    assert!(matches!(
        BaseIdentity::capture(&base),
        Err(DiskError::BaseMissing { .. })
    ));
}

#[test]
fn broken_chains_are_reported() {
    let dir = TestDir::new("chain-broken");
    let (paths, _) = three_deep(&dir);
    // Missing middle layer: the error names both the image and the missing file.
    let moved = dir.join("moved.qcow2");
    fs::rename(&paths[1], &moved).unwrap();
    let err = Disk::open(&paths[3]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "backing file {} of {} is missing",
            paths[1].display(),
            paths[2].display()
        )
    );
    fs::rename(&moved, &paths[1]).unwrap();

    // A loop (o1 backed by o3) must be detected, not followed forever.
    rebase(&paths[1], Path::new("o3.qcow2")).unwrap();
    let err = backing_chain(&paths[3]).unwrap_err();
    assert!(matches!(err, DiskError::ChainTooDeep { .. }), "{err}");
    assert!(Disk::open(&paths[3]).is_err());
}

#[test]
fn probe_distinguishes_formats() {
    let dir = TestDir::new("chain-probe");
    let tiny = dir.join("tiny");
    fs::write(&tiny, b"QF").unwrap();
    assert_eq!(probe(&tiny).unwrap(), ImageFormat::Raw);
    let q = dir.join("q.qcow2");
    crate::disk::chain::create_qcow2(&q, MIB, None, None).unwrap();
    assert_eq!(probe(&q).unwrap(), ImageFormat::Qcow2);
    qemu_check(&q);
    assert!(probe(&dir.join("absent")).is_err());
}
