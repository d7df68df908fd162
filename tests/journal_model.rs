//! Randomized model test: thousands of random writes, zeroes, discards, flushes,
//! checkpoints, applies, deletes (single and subtree), renames and reopenings of a real disk,
//! compared after every step with a simple in-memory model of every checkpoint's content.

mod journal_common;

use journal::{CacheMode, Disk, Error};
use journal_common::{
    assert_checkpoints, assert_tree, open, random_data_write, random_zeroing, Model,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SIZE: usize = 1 << 20;

fn run_model(seed: u64, steps: usize, cache: CacheMode) {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("disk");
    Disk::create(&dir, SIZE as u64, None).unwrap();
    let mut disk = open(&dir, cache);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut m = Model::new(SIZE);
    let mut next_name = 0;
    for step in 0..steps {
        let names = m.names();
        let pick = |rng: &mut SmallRng| names[rng.gen_range(0..names.len())].clone();
        let op = rng.gen_range(0..100);
        let what;
        if op < 55 {
            what = random_data_write(&mut rng, &disk.now(), &mut m, 32);
        } else if op < 62 {
            what = random_zeroing(&mut rng, &disk.now(), &mut m, 40);
        } else if op < 65 {
            disk.now().flush().unwrap();
            what = "flush".into();
        } else if op < 75 {
            let name = format!("c{next_name}");
            next_name += 1;
            disk.checkpoint(&name).unwrap();
            m.checkpoint(&name);
            what = format!("checkpoint {name}");
        } else if op < 82 && !names.is_empty() {
            let target = pick(&mut rng);
            let save = if rng.gen_bool(0.3) {
                Some(format!("c{next_name}"))
            } else {
                None
            };
            next_name += 1;
            disk.apply(&target, save.as_deref()).unwrap();
            m.apply(&target, save.as_deref());
            what = format!("apply {target} save {save:?}");
        } else if op < 91 && !names.is_empty() {
            let target = pick(&mut rng);
            let subtree = rng.gen_bool(0.25);
            let result = disk.delete(&target, subtree);
            if subtree && m.descends(m.now_parent.clone(), &target) {
                assert!(
                    matches!(result, Err(Error::Invalid(_))),
                    "step {step}: subtree delete above Now must be refused"
                );
                what = format!("refused subtree delete {target}");
            } else {
                result.unwrap();
                m.delete(&target, subtree);
                what = format!("delete {target} subtree={subtree}");
            }
        } else if op < 95 && !names.is_empty() {
            let target = pick(&mut rng);
            let new = format!("r{next_name}");
            next_name += 1;
            if rng.gen_bool(0.2) && names.len() > 1 {
                let other = names.iter().find(|n| **n != target).unwrap().clone();
                assert!(matches!(
                    disk.rename(&target, &other),
                    Err(Error::DuplicateName(_))
                ));
            }
            disk.rename(&target, &new).unwrap();
            m.rename(&target, &new);
            what = format!("rename {target} -> {new}");
        } else {
            drop(disk);
            disk = open(&dir, cache);
            what = "reopen".into();
        }
        let at = format!("step {step} ({what})");
        assert_tree(&disk, &m, &at);
        if step % 25 == 0 || what.starts_with("delete") {
            assert_checkpoints(&disk, &m, &at);
        }
    }
    let report = disk.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    // Nothing the tree no longer references stays on disk.
    drop(disk);
    let files = std::fs::read_dir(dir.join("layers")).unwrap().count();
    let disk = open(&dir, cache);
    let info = disk.info().unwrap();
    assert!(
        files >= 2 && files <= 2 * (info.checkpoints + 1) * 4,
        "{files} layer files for {} checkpoints",
        info.checkpoints
    );
}

#[test]
fn random_operations_match_the_model_direct_io() {
    run_model(1, 1500, CacheMode::None);
}

#[test]
fn random_operations_match_the_model_writeback() {
    run_model(2, 1500, CacheMode::Writeback);
}
