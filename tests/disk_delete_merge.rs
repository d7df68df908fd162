//! Offline `strata disk delete` with each strategy: the merges run to completion in the
//! foreground (plain progress lines when stderr is not a terminal), and every remaining
//! checkpoint and Now export exactly as before.

mod nbd_common;

use std::collections::BTreeMap;
use std::path::Path;

use journal::{CacheMode, Disk, OpenOptions};
use nbd_common::{run_ok, run_strata, strata};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

const SIZE: usize = 8 << 20;

fn open(dir: &Path) -> Disk {
    Disk::open(
        dir,
        OpenOptions {
            cache: CacheMode::Writeback,
            read_only: false,
        },
    )
    .unwrap()
}

/// A chain c0..c4 of checkpoints, each after random writes and discards; returns the
/// expected contents of each and of Now.
fn build(dir: &Path, seed: u64) -> (BTreeMap<String, Vec<u8>>, Vec<u8>) {
    Disk::create(dir, SIZE as u64, None).unwrap();
    let mut disk = open(dir);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut now = vec![0u8; SIZE];
    let mut cps = BTreeMap::new();
    for i in 0..5 {
        for _ in 0..200 {
            let len = 4096 * rng.gen_range(1..=16);
            let off = 4096 * rng.gen_range(0..(SIZE - len) / 4096);
            if rng.gen_ratio(1, 8) {
                disk.now().discard(off as u64, len as u64).unwrap();
                now[off..off + len].fill(0);
            } else {
                let mut data = vec![0u8; len];
                rng.fill_bytes(&mut data);
                disk.now().write_at(&data, off as u64, false).unwrap();
                now[off..off + len].copy_from_slice(&data);
            }
        }
        let name = format!("c{i}");
        disk.checkpoint(&name).unwrap();
        cps.insert(name, now.clone());
    }
    disk.now().write_at(&[7u8; 4096], 0, true).unwrap();
    now[..4096].fill(7);
    (cps, now)
}

fn export(disk: &Path, name: Option<&str>, out: &Path) -> Vec<u8> {
    let mut c = strata(&["disk", "export"]);
    c.arg(disk);
    if let Some(n) = name {
        c.arg(n);
    }
    run_ok(c.arg("--output").arg(out));
    std::fs::read(out).unwrap()
}

#[test]
fn offline_delete_runs_merges_to_completion_with_progress() {
    let t = tempfile::tempdir().unwrap();
    for (k, strategy) in [
        "relink",
        "compact-into-child",
        "compact-into-parent",
        "threshold",
        "auto",
    ]
    .iter()
    .enumerate()
    {
        let dir = t.path().join(strategy);
        let (mut cps, now) = build(&dir, k as u64);
        let d = dir.to_str().unwrap();
        for victim in ["c2", "c0", "c4"] {
            let (rc, out, err) = run_strata(&[
                "disk",
                "delete",
                d,
                victim,
                "--strategy",
                strategy,
                "--rate",
                "500",
            ]);
            assert_eq!(rc, 0, "{strategy} delete {victim}: {out}{err}");
            assert!(out.contains(&format!("deleted \"{victim}\"")), "{out}");
            assert!(!err.contains('\r'), "a bar on a non-terminal: {err}");
            cps.remove(victim);
            for (name, want) in &cps {
                let got = export(&dir, Some(name), &t.path().join("x.raw"));
                assert!(
                    got == *want,
                    "{strategy}: {name} changed after deleting {victim}"
                );
            }
            let got = export(&dir, None, &t.path().join("x.raw"));
            assert!(
                got == now,
                "{strategy}: Now changed after deleting {victim}"
            );
        }
        // Nothing is left for a background worker: the merges ran to completion.
        let (rc, out, err) = run_strata(&["disk", "check", d]);
        assert_eq!(rc, 0, "{out}{err}");
        assert!(out.contains("clean"), "{out}");
    }
    // Bad options are one-line errors that change nothing.
    let dir = t.path().join("bad");
    build(&dir, 9);
    let d = dir.to_str().unwrap();
    for (args, want) in [
        (vec!["--strategy", "sideways"], "--strategy"),
        (vec!["--rate", "0"], "--rate"),
        (vec!["--rate=-3"], "--rate"),
        (vec!["--rate", "NaN"], "--rate"),
    ] {
        let mut a = vec!["disk", "delete", d, "c1"];
        a.extend(&args);
        let (rc, out, err) = run_strata(&a);
        assert_ne!(rc, 0, "{args:?}: {out}");
        assert!(
            err.contains(want) && err.trim().lines().count() == 1,
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let listed = open(&dir).list();
    assert_eq!(listed.len(), 5, "a refused delete changed the tree");
}
