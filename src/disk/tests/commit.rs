use super::chain::three_deep;
use super::*;
use crate::disk::merge::{
    collapse_with_hook, commit_with_hook, rebase_with_hook, stream_with_hook, Step,
};
use crate::disk::{
    backing_chain, cleanup_temps, collapse, commit, create_overlay, rebase, stream, DiskError,
    ImageFormat,
};

fn chain_of(top: &Path) -> Vec<PathBuf> {
    backing_chain(top)
        .unwrap()
        .into_iter()
        .map(|c| c.0)
        .collect()
}

/// The failure-injection points exercised for every merge operation.
const STEPS: [Step; 6] = [
    Step::TempCreated,
    Step::Copied(1),
    Step::Copied(3),
    Step::TempSynced,
    Step::Renamed,
    // Never reached with this data: the "run to completion" case.
    Step::Copied(u64::MAX),
];

fn stop_at(at: Step, path: &Path) -> impl FnMut(Step) -> crate::disk::Result<()> + '_ {
    move |step| {
        if step == at {
            Err(DiskError::Interrupted {
                path: path.to_path_buf(),
                step: format!("{step:?}"),
            })
        } else {
            Ok(())
        }
    }
}

#[test]
fn commit_then_rebase_preserves_views() {
    let dir = TestDir::new("commit-basic");
    let (p, m) = three_deep(&dir);
    let base_hash = hash_file(&p[0]);

    commit(&p[2], &p[1]).unwrap();
    assert!(
        read_view(&p[1]) == m[2],
        "parent must now read like the child"
    );
    assert!(read_view(&p[2]) == m[2]);
    assert!(read_view(&p[3]) == m[3]);
    assert_eq!(chain_of(&p[1]), vec![p[1].clone(), p[0].clone()]);
    qemu_check(&p[1]);

    rebase(&p[3], Path::new("o1.qcow2")).unwrap();
    fs::remove_file(&p[2]).unwrap();
    assert_eq!(
        chain_of(&p[3]),
        vec![p[3].clone(), p[1].clone(), p[0].clone()]
    );
    assert!(read_view(&p[3]) == m[3]);
    qemu_check(&p[1]);
    qemu_check(&p[3]);
    if let Some(q) = qemu_chain(&p[3]) {
        assert_eq!(q, chain_of(&p[3]));
    }
    let flat = dir.join("flat.raw");
    if qemu_convert_raw(&p[3], &flat) {
        assert!(fs::read(&flat).unwrap() == m[3]);
    }
    assert_eq!(hash_file(&p[0]), base_hash, "base written by commit");
    assert_eq!(
        cleanup_temps(dir.path()).unwrap(),
        0,
        "temp file left behind"
    );
}

#[test]
fn commit_refuses_wrong_targets() {
    let dir = TestDir::new("commit-refuse");
    let (p, _) = three_deep(&dir);
    let err = commit(&p[1], &p[0]).unwrap_err();
    assert!(matches!(err, DiskError::IsBase { .. }), "{err}");
    let err = commit(&p[3], &p[1]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{} is not the backing file of {}",
            p[1].display(),
            p[3].display()
        )
    );
}

#[test]
fn interrupted_commit_and_rebase_leave_valid_chains() {
    for at in STEPS {
        let dir = TestDir::new("commit-interrupt");
        let (p, m) = three_deep(&dir);
        let r = commit_with_hook(&p[2], &p[1], &mut stop_at(at, &p[1]));
        let completed = r.is_ok();
        assert!(completed || matches!(r, Err(DiskError::Interrupted { .. })));
        // Old or new state of o1, never a mix, and every dependent reads as before.
        let v1 = read_view(&p[1]);
        let renamed = completed || at == Step::Renamed;
        assert!(
            v1 == if renamed { m[2].clone() } else { m[1].clone() },
            "{at:?}"
        );
        assert!(read_view(&p[2]) == m[2], "{at:?}");
        assert!(read_view(&p[3]) == m[3], "{at:?}");
        for f in &p[1..] {
            qemu_check(f);
        }
        let leftovers = cleanup_temps(dir.path()).unwrap();
        assert_eq!(leftovers, usize::from(!renamed), "{at:?}");

        // Recovery is simply running the operation again.
        commit(&p[2], &p[1]).unwrap();
        assert!(read_view(&p[1]) == m[2]);

        let r = rebase_with_hook(&p[3], Path::new("o1.qcow2"), &mut stop_at(at, &p[3]));
        let completed = r.is_ok();
        let renamed = completed || at == Step::Renamed;
        let expect_backing = if renamed { &p[1] } else { &p[2] };
        assert_eq!(chain_of(&p[3])[1], *expect_backing, "{at:?}");
        assert!(read_view(&p[3]) == m[3], "{at:?}");
        qemu_check(&p[3]);
        cleanup_temps(dir.path()).unwrap();
        rebase(&p[3], Path::new("o1.qcow2")).unwrap();
        fs::remove_file(&p[2]).unwrap();
        assert!(read_view(&p[3]) == m[3], "{at:?}");
        qemu_check(&p[3]);
    }
}

/// Runs `fold` (which puts o2 of `three_deep` directly on the base) with a
/// kill -9 at each step in turn until one gets through the rename: after
/// every kill o2 and o3 read as before, o2 passes `qemu-img check`, and o2
/// sits on o1 until the rename and on the base after it.
fn fold_o1_into_o2_killed_at_every_step(
    dir: &TestDir,
    p: &[PathBuf],
    m: &[Vec<u8>],
    mut fold: impl FnMut(crate::disk::merge::Hook<'_>) -> crate::disk::Result<()>,
) {
    for at in STEPS {
        let r = fold(&mut stop_at(at, &p[2]));
        let renamed = r.is_ok() || at == Step::Renamed;
        assert!(read_view(&p[2]) == m[2], "{at:?}");
        assert!(read_view(&p[3]) == m[3], "{at:?}");
        qemu_check(&p[2]);
        let expect = if renamed { &p[0] } else { &p[1] };
        assert_eq!(chain_of(&p[2])[1], *expect, "{at:?}");
        cleanup_temps(dir.path()).unwrap();
        if renamed {
            break;
        }
    }
}

#[test]
fn stream_merges_parent_into_child() {
    let dir = TestDir::new("stream");
    let (p, m) = three_deep(&dir);
    fold_o1_into_o2_killed_at_every_step(&dir, &p, &m, |hook| stream_with_hook(&p[2], hook));
    // o1 is no longer needed by o2 (and thus o3).
    fs::remove_file(&p[1]).unwrap();
    assert!(read_view(&p[3]) == m[3]);
    assert_eq!(
        chain_of(&p[3]),
        vec![p[3].clone(), p[2].clone(), p[0].clone()]
    );

    // Streaming the raw base itself yields a standalone image.
    stream(&p[2]).unwrap();
    assert_eq!(chain_of(&p[2]), vec![p[2].clone()]);
    assert!(read_view(&p[2]) == m[2]);
    assert!(read_view(&p[3]) == m[3]);
    qemu_check(&p[2]);
    qemu_check(&p[3]);
}

/// Deleting a snapshot layer with two children: stream it into both, then delete it.
#[test]
fn stream_deletes_layer_with_two_children() {
    let dir = TestDir::new("stream-two");
    let base = dir.join("base.raw");
    let mut m0 = make_raw(&base, 4 * MIB, 5);
    let a = dir.join("a.qcow2");
    create_overlay(&a, Path::new("base.raw"), ImageFormat::Raw, 4 * MIB).unwrap();
    let d = crate::disk::Disk::open(&a).unwrap();
    let w = pattern(300_000, 6);
    d.write_at(&w, 100_000).unwrap();
    model_write(&mut m0, 100_000, &w);
    drop(d);
    let mut models = Vec::new();
    let mut kids = Vec::new();
    // Children in a subdirectory: their backing names are relative, so streaming must rewrite
    // the grandparent reference to stay valid from the child's directory.
    fs::create_dir(dir.join("sub")).unwrap();
    for (i, name) in ["b1.qcow2", "sub/b2.qcow2"].iter().enumerate() {
        let kid = dir.join(name);
        let backing = if i == 0 { "a.qcow2" } else { "../a.qcow2" };
        create_overlay(&kid, Path::new(backing), ImageFormat::Qcow2, 4 * MIB).unwrap();
        let d = crate::disk::Disk::open(&kid).unwrap();
        let w = pattern(70_000, 7 + i as u64);
        let mut m = m0.clone();
        d.write_at(&w, 200_000 * (i as u64 + 1)).unwrap();
        model_write(&mut m, 200_000 * (i as u64 + 1), &w);
        drop(d);
        models.push(m);
        kids.push(kid);
    }
    for kid in &kids {
        stream(kid).unwrap();
    }
    fs::remove_file(&a).unwrap();
    for (kid, m) in kids.iter().zip(&models) {
        assert!(read_view(kid) == *m);
        qemu_check(kid);
        if let Some(q) = qemu_chain(kid) {
            assert_eq!(q.len(), 2);
        }
    }
}

/// Collapsing in place under a kill -9 at every step: the layer and what reads through it always
/// read the same bytes, and once renamed it sits directly on the base (by absolute name).
#[test]
fn collapse_in_place_survives_kill_9_at_every_step() {
    let dir = TestDir::new("collapse");
    let (p, m) = three_deep(&dir);
    let base_hash = hash_file(&p[0]);
    fold_o1_into_o2_killed_at_every_step(&dir, &p, &m, |hook| {
        collapse_with_hook(&p[2], &p[0], &p[2], hook)
    });
    fs::remove_file(&p[1]).unwrap();
    assert!(read_view(&p[3]) == m[3]);
    qemu_check(&p[3]);
    assert_eq!(hash_file(&p[0]), base_hash, "base written by collapse");

    // Into a new file elsewhere: a standalone copy of the whole chain above the base.
    let other = TestDir::new("collapse-out");
    let out = other.join("copy.qcow2");
    collapse(&p[3], &p[0], &out).unwrap();
    assert!(read_view(&out) == m[3]);
    assert_eq!(chain_of(&out), vec![out.clone(), p[0].clone()]);
    qemu_check(&out);
    let err = collapse(&p[3], &other.join("nope"), &other.join("x.qcow2")).unwrap_err();
    assert!(matches!(err, DiskError::NotBackingFile { .. }), "{err}");
}
