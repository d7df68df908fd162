//! Randomized model test: thousands of random writes, zeroes, discards, flushes,
//! checkpoints, applies, deletes (single and subtree), renames and reopenings of a real disk,
//! compared after every step with a simple in-memory model of every checkpoint's content.

use std::collections::HashMap;
use std::path::Path;

use journal::{CacheMode, Disk, Error, OpenOptions};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SIZE: usize = 1 << 20;

struct Model {
    now: Vec<u8>,
    now_parent: Option<String>,
    checkpoints: HashMap<String, (Vec<u8>, Option<String>)>,
}

impl Model {
    fn descends(&self, mut node: Option<String>, from: &str) -> bool {
        while let Some(n) = node {
            if n == from {
                return true;
            }
            node = self.checkpoints.get(&n).and_then(|c| c.1.clone());
        }
        false
    }
}

fn open(dir: &Path, cache: CacheMode) -> Disk {
    Disk::open(
        dir,
        OpenOptions {
            cache,
            read_only: false,
        },
    )
    .expect("open disk")
}

fn read_all(v: &journal::Volume) -> Vec<u8> {
    let mut b = vec![0u8; SIZE];
    v.read_at(&mut b, 0).expect("read");
    b
}

fn run_model(seed: u64, steps: usize, cache: CacheMode) {
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
    for step in 0..steps {
        let names: Vec<String> = {
            let mut v: Vec<_> = m.checkpoints.keys().cloned().collect();
            v.sort();
            v
        };
        let pick = |rng: &mut SmallRng| names[rng.gen_range(0..names.len())].clone();
        let op = rng.gen_range(0..100);
        let what;
        if op < 55 {
            let sectors = SIZE / 512;
            let len = 512 * rng.gen_range(1..=32usize);
            let off = 512 * rng.gen_range(0..sectors - len / 512);
            let v: u8 = rng.gen();
            let data: Vec<u8> = (0..len).map(|i| v ^ (i as u8).wrapping_mul(31)).collect();
            disk.now()
                .write_at(&data, off as u64, rng.gen_bool(0.05))
                .unwrap();
            m.now[off..off + len].copy_from_slice(&data);
            what = format!("write {off}+{len}");
        } else if op < 62 {
            let len = 512 * rng.gen_range(1..=40usize);
            let off = 512 * rng.gen_range(0..SIZE / 512 - len / 512);
            if rng.gen_bool(0.5) {
                disk.now()
                    .write_zeroes(off as u64, len as u64, false)
                    .unwrap();
            } else {
                disk.now().discard(off as u64, len as u64).unwrap();
            }
            m.now[off..off + len].fill(0);
            what = format!("zero {off}+{len}");
        } else if op < 65 {
            disk.now().flush().unwrap();
            what = "flush".into();
        } else if op < 75 {
            let name = format!("c{next_name}");
            next_name += 1;
            disk.checkpoint(&name).unwrap();
            m.checkpoints
                .insert(name.clone(), (m.now.clone(), m.now_parent.clone()));
            m.now_parent = Some(name.clone());
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
            if let Some(s) = &save {
                m.checkpoints
                    .insert(s.clone(), (m.now.clone(), m.now_parent.clone()));
            }
            m.now = m.checkpoints[&target].0.clone();
            m.now_parent = Some(target.clone());
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
                let parent = m.checkpoints[&target].1.clone();
                if subtree {
                    let doomed: Vec<String> = names
                        .iter()
                        .filter(|n| m.descends(Some((*n).clone()), &target))
                        .cloned()
                        .collect();
                    for d in doomed {
                        m.checkpoints.remove(&d);
                    }
                } else {
                    m.checkpoints.remove(&target);
                    for c in m.checkpoints.values_mut() {
                        if c.1.as_deref() == Some(&target) {
                            c.1 = parent.clone();
                        }
                    }
                    if m.now_parent.as_deref() == Some(&target) {
                        m.now_parent = parent;
                    }
                }
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
            let c = m.checkpoints.remove(&target).unwrap();
            m.checkpoints.insert(new.clone(), c);
            for c in m.checkpoints.values_mut() {
                if c.1.as_deref() == Some(&target) {
                    c.1 = Some(new.clone());
                }
            }
            if m.now_parent.as_deref() == Some(&target) {
                m.now_parent = Some(new.clone());
            }
            what = format!("rename {target} -> {new}");
        } else {
            drop(disk);
            disk = open(&dir, cache);
            what = "reopen".into();
        }
        assert!(
            read_all(&disk.now()) == m.now,
            "step {step} ({what}): Now differs from the model"
        );
        let listed: Vec<(String, Option<String>)> = disk
            .list()
            .into_iter()
            .map(|c| (c.name, c.parent))
            .collect();
        assert_eq!(
            listed.len(),
            m.checkpoints.len(),
            "step {step} ({what}): checkpoint count"
        );
        for (name, parent) in &listed {
            assert_eq!(
                &m.checkpoints[name].1, parent,
                "step {step} ({what}): parent of {name}"
            );
        }
        if step % 25 == 0 || what.starts_with("delete") {
            for (name, (content, _)) in &m.checkpoints {
                let v = disk.checkpoint_view(name).unwrap();
                assert!(
                    read_all(&v) == *content,
                    "step {step} ({what}): checkpoint {name} differs from the model"
                );
            }
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
