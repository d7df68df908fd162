//! Helpers of the journal tests: for the randomized model tests (`journal_model`,
//! `journal_merge`) an in-memory model of Now and every checkpoint's content and parent,
//! random writes and zeroings applied to both a real disk and the model, and the
//! comparison of the two; for the others, opening a disk and finding layer files by what
//! strata.json says.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use journal::{CacheMode, Disk, OpenOptions, Volume};
use rand::rngs::SmallRng;
use rand::Rng;

/// What the disk should hold: Now's bytes and parent, and each checkpoint's bytes and parent.
pub struct Model {
    pub now: Vec<u8>,
    pub now_parent: Option<String>,
    pub checkpoints: HashMap<String, (Vec<u8>, Option<String>)>,
}

impl Model {
    /// A fresh disk of `size` zero bytes without checkpoints.
    pub fn new(size: usize) -> Model {
        Model {
            now: vec![0; size],
            now_parent: None,
            checkpoints: HashMap::new(),
        }
    }

    /// The checkpoint names, sorted (so that a seed picks the same ones every run).
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.checkpoints.keys().cloned().collect();
        v.sort();
        v
    }

    /// True when `from` is `node` or one of its ancestors.
    pub fn descends(&self, mut node: Option<String>, from: &str) -> bool {
        while let Some(n) = node {
            if n == from {
                return true;
            }
            node = self.checkpoints.get(&n).and_then(|c| c.1.clone());
        }
        false
    }

    /// Records a checkpoint `name` of Now, which becomes Now's parent.
    pub fn checkpoint(&mut self, name: &str) {
        self.save(name);
        self.now_parent = Some(name.to_string());
    }

    /// Records a successful apply of `target`, saving Now as `save` first if asked.
    pub fn apply(&mut self, target: &str, save: Option<&str>) {
        if let Some(s) = save {
            self.save(s);
        }
        self.now = self.checkpoints[target].0.clone();
        self.now_parent = Some(target.to_string());
    }

    /// A checkpoint of Now's content under Now's parent (Now's parent unchanged).
    fn save(&mut self, name: &str) {
        let c = (self.now.clone(), self.now_parent.clone());
        self.checkpoints.insert(name.to_string(), c);
    }

    /// Applies a successful delete to the model.
    pub fn delete(&mut self, target: &str, subtree: bool) {
        let parent = self.checkpoints[target].1.clone();
        if subtree {
            let doomed: Vec<String> = self
                .checkpoints
                .keys()
                .filter(|d| self.descends(Some((*d).clone()), target))
                .cloned()
                .collect();
            for d in doomed {
                self.checkpoints.remove(&d);
            }
        } else {
            self.checkpoints.remove(target);
            self.reparent(target, parent);
        }
    }

    /// Applies a successful rename to the model.
    pub fn rename(&mut self, old: &str, new: &str) {
        let c = self
            .checkpoints
            .remove(old)
            .expect("renamed checkpoint exists");
        self.checkpoints.insert(new.to_string(), c);
        self.reparent(old, Some(new.to_string()));
    }

    /// Children of `old` (checkpoints and Now) get `parent` instead.
    fn reparent(&mut self, old: &str, parent: Option<String>) {
        for c in self.checkpoints.values_mut() {
            if c.1.as_deref() == Some(old) {
                c.1 = parent.clone();
            }
        }
        if self.now_parent.as_deref() == Some(old) {
            self.now_parent = parent;
        }
    }
}

pub fn open(dir: &Path, cache: CacheMode) -> Disk {
    Disk::open(
        dir,
        OpenOptions {
            cache,
            read_only: false,
        },
    )
    .expect("open disk")
}

/// The disk's strata.json.
pub fn tree(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("strata.json")).expect("read strata.json"))
        .expect("strata.json is JSON")
}

fn ids(layers: &serde_json::Value) -> Vec<u64> {
    layers
        .as_array()
        .expect("a layers array")
        .iter()
        .map(|l| l.as_u64().expect("a layer id"))
        .collect()
}

/// Layer ids of checkpoint `name`, oldest first.
pub fn checkpoint_layers(dir: &Path, name: &str) -> Vec<u64> {
    let t = tree(dir);
    let node = t["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no checkpoint {name} in strata.json"));
    ids(&node["layers"])
}

/// Layer ids of Now, oldest first (the last is the active layer).
pub fn now_layers(dir: &Path) -> Vec<u64> {
    ids(&tree(dir)["now"]["layers"])
}

/// Paths of layer `id`'s log and data file.
pub fn layer_paths(dir: &Path, id: u64) -> (PathBuf, PathBuf) {
    let layers = dir.join("layers");
    (
        layers.join(format!("L{id}.log")),
        layers.join(format!("L{id}.data")),
    )
}

/// Bytes the filesystem allocated for `path`.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// All of a volume's bytes.
pub fn read_all(v: &Volume) -> Vec<u8> {
    let mut b = vec![0u8; v.size() as usize];
    v.read_at(&mut b, 0).expect("read");
    b
}

/// A random byte range `(offset, length)` of 1 to `max_sectors` whole sectors inside a disk of
/// `size` bytes (the length is drawn first).
fn random_extent(rng: &mut SmallRng, size: usize, max_sectors: usize) -> (usize, usize) {
    let len = 512 * rng.gen_range(1..=max_sectors);
    let off = 512 * rng.gen_range(0..(size - len) / 512);
    (off, len)
}

/// Writes 1 to `max_sectors` sectors of patterned bytes at a random sector of Now (FUA one
/// time in 20), in the disk and the model. Returns what it did.
pub fn random_data_write(
    rng: &mut SmallRng,
    now: &Volume,
    m: &mut Model,
    max_sectors: usize,
) -> String {
    let (off, len) = random_extent(rng, m.now.len(), max_sectors);
    let v: u8 = rng.gen();
    let data: Vec<u8> = (0..len).map(|i| v ^ (i as u8).wrapping_mul(31)).collect();
    now.write_at(&data, off as u64, rng.gen_bool(0.05)).unwrap();
    m.now[off..off + len].copy_from_slice(&data);
    format!("write {off}+{len}")
}

/// Zeroes 1 to `max_sectors` sectors at a random sector of Now, half the time with
/// WRITE_ZEROES and half with a discard, in the disk and the model. Returns what it did.
pub fn random_zeroing(
    rng: &mut SmallRng,
    now: &Volume,
    m: &mut Model,
    max_sectors: usize,
) -> String {
    let (off, len) = random_extent(rng, m.now.len(), max_sectors);
    if rng.gen_bool(0.5) {
        now.write_zeroes(off as u64, len as u64, false).unwrap();
    } else {
        now.discard(off as u64, len as u64).unwrap();
    }
    m.now[off..off + len].fill(0);
    format!("zero {off}+{len}")
}

/// Now's content, the number of checkpoints and every checkpoint's parent equal the model.
pub fn assert_tree(disk: &Disk, m: &Model, what: &str) {
    assert!(
        read_all(&disk.now()) == m.now,
        "{what}: Now differs from the model"
    );
    let listed = disk.list();
    assert_eq!(
        listed.len(),
        m.checkpoints.len(),
        "{what}: checkpoint count"
    );
    for c in &listed {
        let (_, parent) = &m.checkpoints[&c.name];
        assert_eq!(parent, &c.parent, "{what}: parent of {}", c.name);
    }
}

/// Every checkpoint's content equals the model.
pub fn assert_checkpoints(disk: &Disk, m: &Model, what: &str) {
    for (name, (content, _)) in &m.checkpoints {
        let v = disk.checkpoint_view(name).unwrap();
        assert!(
            read_all(&v) == *content,
            "{what}: checkpoint {name} differs from the model"
        );
    }
}

/// The whole disk equals the model: [`assert_tree`] and [`assert_checkpoints`].
pub fn assert_model(disk: &Disk, m: &Model, what: &str) {
    assert_tree(disk, m, what);
    assert_checkpoints(disk, m, what);
}

/// A research strategy (`journal_merge`, `journal_reclaim`): merge the first two sealed layers of the stack that received the
/// deleted checkpoint, the newer one absorbing the older.
pub struct Pairs;
impl journal::Strategy for Pairs {
    fn name(&self) -> &str {
        "pairs"
    }
    fn plan(&self, s: &journal::Situation) -> Vec<journal::Move> {
        let Some(st) = s.target.and_then(|t| s.stack(t)) else {
            return Vec::new();
        };
        if st.sealed < 2 || st.busy {
            return Vec::new();
        }
        vec![journal::Move {
            stack: st.at,
            first: 0,
            len: 2,
            placement: journal::Placement::Absorb(1),
        }]
    }
}
