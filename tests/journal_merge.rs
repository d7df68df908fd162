//! Online merges against a model: random writes, discards, flushes, checkpoints, applies and
//! deletes with every strategy (and a custom one); jobs run on a thread while Now keeps being
//! written, some are finished late (after more deletes), dropped or abandoned. Some deletes
//! are deferred (`delete_deferred`): their strategy plans later, after more writes,
//! checkpoints, applies and deletes have changed the tree, or never. After every finished
//! merge every checkpoint and Now equal the model.

mod journal_common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use journal::{
    CacheMode, DeleteOptions, Disk, Error, MergeJob, PendingPlan, StrategyKind, LINEAGE_SLACK,
};
use journal_common::{
    assert_model, open, random_data_write, random_zeroing, read_all, Model, Pairs,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SIZE: usize = 2 << 20;

/// A random write (most of the time) or zeroing of Now, in the disk and the model.
fn random_write(rng: &mut SmallRng, now: &journal::Volume, m: &mut Model) {
    if rng.gen_bool(0.85) {
        random_data_write(rng, now, m, 64);
    } else {
        random_zeroing(rng, now, m, 80);
    }
}

fn options(rng: &mut SmallRng, subtree: bool) -> DeleteOptions {
    let k = rng.gen_range(0..6);
    let mut o = if k == 5 {
        DeleteOptions {
            custom: Some(Arc::new(Pairs)),
            ..DeleteOptions::default()
        }
    } else {
        DeleteOptions::with(StrategyKind::ALL[k])
    };
    o.subtree = subtree;
    o.queue_depth = [1, 4, 32][rng.gen_range(0..3)];
    o.background_reclaim = reclaim_on();
    o
}

/// Relinks punch in background reclaim jobs, as by default in the library; `MERGE_RECLAIM=0`
/// runs them inline in the delete instead.
fn reclaim_on() -> bool {
    std::env::var_os("MERGE_RECLAIM").is_none_or(|v| v != "0")
}

/// Runs `jobs` on a thread while the caller writes to Now, then finishes them.
fn run_online(
    disk: &mut Disk,
    jobs: Vec<MergeJob>,
    rng: &mut SmallRng,
    m: &mut Model,
    what: &str,
) -> usize {
    if std::env::var_os("MERGE_TRACE").is_some() {
        for j in &jobs {
            eprintln!(
                "{what}: job {} {} run {:?} -> {}",
                j.id(),
                j.strategy(),
                j.run_layers(),
                j.output_layer()
            );
        }
        eprintln!("{}", disk.tree_json());
    }
    let now = disk.now();
    let cancel = AtomicBool::new(false);
    let jobs = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let mut jobs = jobs;
            for j in &mut jobs {
                j.run(&cancel).expect("merge run");
            }
            jobs
        });
        // Writes continue on Now while the jobs copy (at least a few, whatever the timing).
        let mut n = 0;
        while n < 8 || (!h.is_finished() && n < 400) {
            random_write(rng, &now, m);
            n += 1;
        }
        h.join().unwrap()
    });
    let mut finished = 0;
    for j in jobs {
        let r = disk.finish_merge(j).expect("finish");
        if !r.discarded {
            finished += 1;
        }
        assert_model(
            disk,
            m,
            &format!("{what}: after merge {} ({})", r.id, r.strategy),
        );
    }
    finished
}

fn depth_bound(disk: &Disk) -> usize {
    disk.list().len() + 1 + LINEAGE_SLACK
}

fn run_model(seed: u64, steps: usize, cache: CacheMode, qemu_compare: bool) {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("disk");
    Disk::create(&dir, SIZE as u64, None).unwrap();
    let mut disk = open(&dir, cache);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut m = Model {
        now: vec![0; SIZE],
        now_parent: None,
        checkpoints: HashMap::new(),
    };
    let mut next_name = 0;
    // Jobs made by earlier deletes, finished later (their layers may be gone by then).
    let mut late: Vec<MergeJob> = Vec::new();
    // Deferred deletes whose strategy has not planned yet.
    let mut unplanned: Vec<(PendingPlan, DeleteOptions)> = Vec::new();
    let mut planned = 0;
    let mut merged = 0;
    let mut discarded = 0;
    for step in 0..steps {
        let mut names: Vec<String> = m.checkpoints.keys().cloned().collect();
        names.sort();
        let op = rng.gen_range(0..100);
        let what;
        if op < 50 {
            random_write(&mut rng, &disk.now(), &mut m);
            what = "write".to_string();
        } else if op < 53 {
            disk.now().flush().unwrap();
            what = "flush".into();
        } else if op < 68 {
            let name = format!("c{next_name}");
            next_name += 1;
            disk.checkpoint(&name).unwrap();
            m.checkpoints
                .insert(name.clone(), (m.now.clone(), m.now_parent.clone()));
            m.now_parent = Some(name.clone());
            what = format!("checkpoint {name}");
        } else if op < 72 && !names.is_empty() {
            let target = names[rng.gen_range(0..names.len())].clone();
            disk.apply(&target, None).unwrap();
            m.now = m.checkpoints[&target].0.clone();
            m.now_parent = Some(target.clone());
            what = format!("apply {target}");
        } else if op < 96 && !names.is_empty() {
            let target = names[rng.gen_range(0..names.len())].clone();
            let subtree = rng.gen_bool(0.15);
            let opts = options(&mut rng, subtree);
            let refused = subtree && m.descends(m.now_parent.clone(), &target);
            let mode = rng.gen_range(0..6);
            what = format!(
                "delete {target} subtree={subtree} strategy={:?} mode={mode}",
                opts.custom
                    .as_ref()
                    .map(|c| c.name().to_string())
                    .unwrap_or(opts.strategy.to_string())
            );
            if mode == 5 {
                let r = disk.delete_deferred(&target, &opts);
                if refused {
                    assert!(matches!(r, Err(Error::Invalid(_))), "{what}");
                } else {
                    let (_, plan) = r.unwrap();
                    m.delete(&target, subtree);
                    assert_model(&disk, &m, &format!("step {step} ({what}) before planning"));
                    unplanned.push((plan, opts));
                }
            } else if mode == 0 {
                let r = disk.delete_with(&target, &opts);
                if refused {
                    assert!(matches!(r, Err(Error::Invalid(_))), "{what}");
                } else {
                    let r = r.unwrap();
                    merged += r.merge_jobs;
                    m.delete(&target, subtree);
                    if late.is_empty() {
                        let depth = disk.info().unwrap().depth;
                        assert!(
                            depth <= depth_bound(&disk),
                            "step {step} ({what}): Now's lineage has {depth} layers, bound {}",
                            depth_bound(&disk)
                        );
                    }
                }
            } else {
                let r = disk.delete_online(&target, &opts);
                if refused {
                    assert!(matches!(r, Err(Error::Invalid(_))), "{what}");
                } else {
                    let (_, jobs) = r.unwrap();
                    m.delete(&target, subtree);
                    // The checkpoint is gone at once; all else reads as before.
                    assert_model(&disk, &m, &format!("step {step} ({what}) before merging"));
                    match mode {
                        1 | 2 => merged += run_online(&mut disk, jobs, &mut rng, &mut m, &what),
                        3 => late.extend(jobs),
                        _ => {
                            // Run, then give up, or drop without running.
                            for mut j in jobs {
                                if rng.gen_bool(0.5) {
                                    j.run(&AtomicBool::new(false)).unwrap();
                                    disk.abandon_merge(j);
                                }
                            }
                        }
                    }
                }
            }
        } else if op < 98 {
            // The deferred deletes plan on today's tree (in any order), then the late jobs
            // run (while Now is written) and finish; some are stale.
            while !unplanned.is_empty() {
                let (plan, opts) = unplanned.swap_remove(rng.gen_range(0..unplanned.len()));
                let id = plan.id();
                let (jobs, _) = disk.plan_deferred(plan, &opts).unwrap();
                for j in &jobs {
                    assert_eq!(j.progress().status().delete, Some(id));
                }
                planned += 1;
                late.extend(jobs);
            }
            let jobs = std::mem::take(&mut late);
            let n = jobs.len();
            let done = run_online(&mut disk, jobs, &mut rng, &mut m, "late jobs");
            merged += done;
            discarded += n - done;
            let mo = DeleteOptions {
                background_reclaim: reclaim_on(),
                ..DeleteOptions::default()
            };
            let mj = disk.maintenance_merges(&mo).unwrap();
            merged += run_online(&mut disk, mj, &mut rng, &mut m, "maintenance");
            let depth = disk.info().unwrap().depth;
            assert!(
                depth <= depth_bound(&disk),
                "after maintenance: depth {depth}: {}",
                std::fs::read_to_string(dir.join("strata.json")).unwrap()
            );
            what = format!("late jobs ({n})");
        } else {
            late.clear();
            // A plan dropped unplanned leaves only garbage for a maintenance pass.
            unplanned.clear();
            drop(disk);
            disk = open(&dir, cache);
            what = "reopen".into();
        }
        if std::env::var_os("MERGE_TRACE").is_some() {
            eprintln!("step {step}: {what}");
        }
        assert_model(&disk, &m, &format!("step {step} ({what})"));
    }
    drop(late);
    drop(unplanned);
    let report = disk.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(merged > 5, "only {merged} merges ran");
    assert!(planned > 0 || steps < 200, "no deferred delete was planned");
    eprintln!(
        "seed {seed}: {merged} merges finished, {discarded} stale jobs discarded, {planned} deferred plans"
    );
    if qemu_compare {
        let img = t.path().join("model.raw");
        let out = t.path().join("now.raw");
        std::fs::write(&img, &m.now).unwrap();
        disk.export(None, &out).unwrap();
        qemu_img_compare(&img, &out);
        if let Some((name, (content, _))) = m.checkpoints.iter().next() {
            std::fs::write(&img, content).unwrap();
            disk.export(Some(name), &out).unwrap();
            qemu_img_compare(&img, &out);
        }
    }
    drop(disk);
    // Whatever the tree holds, the files on disk are exactly its layers.
    let disk = open(&dir, cache);
    assert_model(&disk, &m, "final reopen");
}

fn qemu_img_compare(a: &Path, b: &Path) {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .expect("qemu-img must be installed (apt-get install qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn merges_match_the_model_direct_io() {
    run_model(1, 500, CacheMode::None, true);
}

#[test]
fn merges_match_the_model_writeback() {
    let base: u64 = std::env::var("MERGE_SEED_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    for seed in [base, base + 1] {
        run_model(seed, 400, CacheMode::Writeback, false);
    }
}

/// 300 checkpoint + write + delete cycles keep Now's lineage and the layer files shallow.
#[test]
fn long_history_stays_shallow() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("disk");
    Disk::create(&dir, SIZE as u64, None).unwrap();
    let mut disk = open(&dir, CacheMode::Writeback);
    let mut model = vec![0u8; SIZE];
    disk.checkpoint("keep").unwrap();
    for i in 0..300u32 {
        let off = (i as usize * 7 % 64) * 4096;
        let data = vec![(i % 251) as u8 + 1; 8192];
        disk.now().write_at(&data, off as u64, false).unwrap();
        model[off..off + 8192].copy_from_slice(&data);
        disk.checkpoint(&format!("c{i}")).unwrap();
        disk.delete(&format!("c{i}"), false).unwrap();
        let depth = disk.info().unwrap().depth;
        assert!(
            depth <= 1 + 1 + 1 + LINEAGE_SLACK,
            "cycle {i}: Now's lineage has {depth} layers"
        );
    }
    let files = std::fs::read_dir(dir.join("layers")).unwrap().count();
    // Two files per layer: "keep", at most 1 + LINEAGE_SLACK sealed layers of Now, and
    // Now's active layer.
    assert!(files <= 2 * (3 + LINEAGE_SLACK), "{files} files in layers/");
    assert!(read_all(&disk.now()) == model);
    assert!(disk.check().unwrap().is_clean());
    drop(disk);
    let disk = open(&dir, CacheMode::Writeback);
    assert!(read_all(&disk.now()) == model);
}

/// A job made before later deletes stays valid wherever its run was relinked to; one whose
/// layers are gone is discarded without changing anything.
#[test]
fn a_job_survives_later_relinks_and_a_stale_one_is_discarded() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("disk");
    Disk::create(&dir, SIZE as u64, None).unwrap();
    let mut disk = open(&dir, CacheMode::None);
    let now = disk.now();
    let w = |b: u64, v: u8| now.write_at(&vec![v; 4096], b * 4096, false).unwrap();
    w(0, 1);
    w(1, 1);
    disk.checkpoint("a").unwrap();
    w(1, 2);
    disk.checkpoint("b").unwrap();
    w(2, 3);
    disk.checkpoint("c").unwrap();
    w(3, 4);
    disk.checkpoint("d").unwrap();
    // Deleting b compacts its layer and c's into one (in c's stack).
    let (_, jobs) = disk
        .delete_online("b", &DeleteOptions::with(StrategyKind::CompactIntoChild))
        .unwrap();
    assert_eq!(jobs.len(), 1);
    let mut job = jobs.into_iter().next().unwrap();
    // c is deleted before the job runs: its stack (with the run) is relinked into d's.
    let (_, more) = disk
        .delete_online("c", &DeleteOptions::with(StrategyKind::Relink))
        .unwrap();
    assert!(
        more.iter().all(|j| j.is_reclaim()),
        "a relink copies nothing"
    );
    job.run(&AtomicBool::new(false)).unwrap();
    let r = disk.finish_merge(job).unwrap();
    assert!(!r.discarded);
    assert!(r.layers_after < r.layers_before, "{r:?}");
    let d = disk.checkpoint_view("d").unwrap();
    let mut b = vec![0u8; 4 * 4096];
    d.read_at(&mut b, 0).unwrap();
    for (i, v) in [1u8, 2, 3, 4].iter().enumerate() {
        assert!(
            b[i * 4096..(i + 1) * 4096].iter().all(|x| x == v),
            "block {i}"
        );
    }
    // A stale job: its run is deleted (subtree) before it finishes.
    disk.apply("a", None).unwrap();
    let now = disk.now();
    now.write_at(&[9; 4096], 0, false).unwrap();
    disk.checkpoint("e").unwrap();
    now.write_at(&[8; 4096], 4096, false).unwrap();
    disk.checkpoint("f").unwrap();
    disk.apply("d", None).unwrap();
    let (_, jobs) = disk
        .delete_online("e", &DeleteOptions::with(StrategyKind::CompactIntoChild))
        .unwrap();
    let mut job = jobs.into_iter().next().expect("a job");
    let out = dir
        .join("layers")
        .join(format!("L{}.data", job.output_layer()));
    job.run(&AtomicBool::new(false)).unwrap();
    assert!(out.exists());
    disk.delete("f", true).unwrap();
    let r = disk.finish_merge(job).unwrap();
    assert!(r.discarded);
    assert!(!out.exists(), "the discarded output is deleted");
    assert!(disk.check().unwrap().is_clean());
}

/// finish_merge refuses while a write is in flight and hands the job back.
#[test]
fn finish_waits_for_writes_in_flight() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("disk");
    Disk::create(&dir, SIZE as u64, None).unwrap();
    let mut disk = open(&dir, CacheMode::Writeback);
    let now = disk.now();
    now.write_at(&[1; 8192], 0, false).unwrap();
    disk.checkpoint("a").unwrap();
    now.write_at(&[2; 4096], 0, false).unwrap();
    disk.checkpoint("b").unwrap();
    let (_, jobs) = disk
        .delete_online("a", &DeleteOptions::with(StrategyKind::CompactIntoChild))
        .unwrap();
    let mut job = jobs.into_iter().next().unwrap();
    job.run(&AtomicBool::new(false)).unwrap();
    let mut engine = journal::IoEngine::new(now.clone(), 4).unwrap();
    engine
        .submit(
            1,
            journal::Request::Write {
                offset: 8192,
                buf: journal::AlignedBuf::from_slice(&[3; 4096]),
                fua: false,
            },
        )
        .unwrap();
    let (job, e) = match disk.try_finish_merge(job) {
        Err((job, e)) => (job, e),
        Ok(_) => {
            // The write may already have completed and been reaped by the kernel side only
            // once polled: it is still counted in flight until then.
            panic!("finish must wait for the write in flight");
        }
    };
    assert!(matches!(e, Error::Busy), "{e}");
    let mut done = Vec::new();
    engine.wait(1, &mut done).unwrap();
    assert!(done[0].result.is_ok());
    let r = disk.finish_merge(*job).unwrap();
    assert!(!r.discarded);
    let mut b = vec![0u8; 3 * 4096];
    disk.checkpoint_view("b")
        .unwrap()
        .read_at(&mut b, 0)
        .unwrap();
    assert!(b[..4096].iter().all(|&x| x == 2) && b[4096..8192].iter().all(|&x| x == 1));
    now.read_at(&mut b, 0).unwrap();
    assert!(b[8192..].iter().all(|&x| x == 3));
}
