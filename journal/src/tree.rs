//! The checkpoint tree metadata (`strata.json`): nodes, their layer stacks, Now, the base.
//!
//! Saved atomically: write `strata.json.tmp`, fsync it, rename over `strata.json`, fsync the
//! directory. A crash leaves the old or the new tree, never a mix.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::merge::StackRef;
use crate::safe_open::{open_regular, read_capped, Links};
use crate::{Error, Result};

/// File name of the tree metadata inside a disk directory.
pub const TREE_FILE: &str = "strata.json";
/// Current metadata format version.
pub const TREE_FORMAT: u32 = 1;
/// Largest `strata.json` accepted.
pub const MAX_TREE_BYTES: u64 = 64 << 20;
/// Longest checkpoint name, in characters (Hyper-V's limit).
pub const MAX_NAME_CHARS: usize = 100;

/// A read-only raw base image and what identifies its content.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BaseRef {
    pub path: PathBuf,
    pub size: u64,
    /// CRC32C over sampled 4 KiB blocks of the image, as 8 hex digits.
    pub fingerprint: String,
}

/// A checkpoint, or a hidden internal node kept because two or more children share it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Node {
    pub id: u64,
    /// `None` for a hidden node (a deleted checkpoint that still has several children).
    pub name: Option<String>,
    pub parent: Option<u64>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The layers holding this node's writes on top of its parent, oldest first.
    pub layers: Vec<u64>,
}

/// The writable leaf.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NowNode {
    pub parent: Option<u64>,
    /// Layers owned by Now, oldest first; the last one is the active layer.
    pub layers: Vec<u64>,
}

/// A progressive merge under way: layer `out` sits right above the layers `run` in one
/// stack and holds the run's newest version of the blocks copied so far (see
/// "journal: progressive merges" in `docs/DESIGN.md`). `Disk::resume_merges` completes it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartialMerge {
    pub out: u64,
    pub run: Vec<u64>,
}

/// The whole tree.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tree {
    pub format: u32,
    /// Random disk identity, as 32 hex digits; seeds every record checksum.
    pub uuid: String,
    pub size: u64,
    pub block_size: u64,
    pub base: Option<BaseRef>,
    /// Next id for a node or a layer (one counter for both).
    pub next_id: u64,
    pub nodes: Vec<Node>,
    pub now: NowNode,
    /// Progressive merges under way (absent when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merging: Vec<PartialMerge>,
}

/// Checks a checkpoint name: 1 to 100 characters, no control characters.
pub fn validate_name(name: &str) -> Result<()> {
    let n = name.chars().count();
    if n == 0 || n > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(Error::BadName(name.to_string()));
    }
    Ok(())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Tree {
    /// The disk uuid as a number.
    pub fn uuid_value(&self) -> Result<u128> {
        u128::from_str_radix(&self.uuid, 16).map_err(|_| Error::Corrupt {
            what: TREE_FILE.into(),
            why: format!("bad uuid {:?}", self.uuid),
        })
    }

    /// Allocates a fresh node or layer id; fails when the counter is exhausted (ids are
    /// never reused, so it cannot wrap).
    pub fn alloc_id(&mut self) -> Result<u64> {
        let id = self.next_id;
        self.next_id = id.checked_add(1).ok_or(Error::IdsExhausted(id))?;
        Ok(id)
    }

    /// The node with id `id`.
    pub fn node(&self, id: u64) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The visible checkpoint named `name`.
    pub fn by_name(&self, name: &str) -> Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name.as_deref() == Some(name))
            .ok_or_else(|| Error::UnknownCheckpoint(name.to_string()))
    }

    /// The name of the nearest visible node at or above `id` (hidden nodes are skipped).
    pub fn visible_name(&self, mut id: Option<u64>) -> Option<String> {
        for _ in 0..=self.nodes.len() {
            let n = self.node(id?)?;
            if n.name.is_some() {
                return n.name.clone();
            }
            id = n.parent;
        }
        None
    }

    /// Fails if `name` is invalid or already used.
    pub fn check_new_name(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        if self.nodes.iter().any(|n| n.name.as_deref() == Some(name)) {
            return Err(Error::DuplicateName(name.to_string()));
        }
        Ok(())
    }

    /// Node ids from the root down to `id` inclusive.
    pub fn path_to(&self, id: Option<u64>) -> Result<Vec<u64>> {
        let mut path = Vec::new();
        let mut cur = id;
        while let Some(c) = cur {
            if path.len() > self.nodes.len() {
                return Err(Error::Corrupt {
                    what: TREE_FILE.into(),
                    why: "the checkpoint tree has a cycle".into(),
                });
            }
            let n = self.node(c).ok_or_else(|| Error::Corrupt {
                what: TREE_FILE.into(),
                why: format!("node {c} is referenced but missing"),
            })?;
            path.push(c);
            cur = n.parent;
        }
        path.reverse();
        Ok(path)
    }

    /// Layer ids that make up the content of node `id` (or of Now when `None`), oldest first.
    pub fn lineage_layers(&self, id: Option<u64>) -> Result<Vec<u64>> {
        let (path, extra) = match id {
            Some(id) => (self.path_to(Some(id))?, Vec::new()),
            None => (self.path_to(self.now.parent)?, self.now.layers.clone()),
        };
        let mut layers = Vec::new();
        for nid in path {
            if let Some(n) = self.node(nid) {
                layers.extend_from_slice(&n.layers);
            }
        }
        layers.extend(extra);
        Ok(layers)
    }

    /// Ids of the nodes without a parent (children of the base), in tree order.
    pub fn roots(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.parent.is_none())
            .map(|n| n.id)
            .collect()
    }

    /// Ids of the checkpoint children of `id`.
    pub fn children(&self, id: u64) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.parent == Some(id))
            .map(|n| n.id)
            .collect()
    }

    /// Every layer id referenced by the tree.
    pub fn all_layers(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .nodes
            .iter()
            .flat_map(|n| n.layers.iter().copied())
            .collect();
        v.extend(&self.now.layers);
        v
    }

    /// The layers of stack `at`.
    pub fn stack(&self, at: StackRef) -> Option<&[u64]> {
        match at {
            StackRef::Now => Some(&self.now.layers),
            StackRef::Node(id) => self.node(id).map(|n| n.layers.as_slice()),
        }
    }

    pub(crate) fn stack_mut(&mut self, at: StackRef) -> Option<&mut Vec<u64>> {
        match at {
            StackRef::Now => Some(&mut self.now.layers),
            StackRef::Node(id) => self
                .nodes
                .iter_mut()
                .find(|n| n.id == id)
                .map(|n| &mut n.layers),
        }
    }

    /// Every stack: each node's, then Now's.
    pub fn stacks(&self) -> Vec<StackRef> {
        let mut v: Vec<StackRef> = self.nodes.iter().map(|n| StackRef::Node(n.id)).collect();
        v.push(StackRef::Now);
        v
    }

    /// The layers below stack `at` in its lineage, oldest first.
    pub fn below_stack(&self, at: StackRef) -> Result<Vec<u64>> {
        let parent = match at {
            StackRef::Now => self.now.parent,
            StackRef::Node(id) => self.node(id).and_then(|n| n.parent),
        };
        match parent {
            Some(p) => self.lineage_layers(Some(p)),
            None => Ok(Vec::new()),
        }
    }

    /// Where the layers `run` sit, consecutively and sealed, in one stack: (stack, index of
    /// the first). Now's active (last) layer is never part of a run.
    pub fn find_run(&self, run: &[u64]) -> Option<(StackRef, usize)> {
        let first = *run.first()?;
        for at in self.stacks() {
            let layers = self.stack(at)?;
            let sealed = match at {
                StackRef::Now => layers.len().saturating_sub(1),
                StackRef::Node(_) => layers.len(),
            };
            if let Some(pos) = layers[..sealed].iter().position(|&l| l == first) {
                return (pos + run.len() <= sealed && layers[pos..pos + run.len()] == *run)
                    .then_some((at, pos));
            }
        }
        None
    }

    /// Replaces layers `pos..pos+len` of stack `at` by the single layer `with`.
    pub fn replace_run(&mut self, at: StackRef, pos: usize, len: usize, with: u64) -> bool {
        match self.stack_mut(at) {
            Some(layers) if pos + len <= layers.len() && len > 0 => {
                layers.splice(pos..pos + len, [with]);
                true
            }
            _ => false,
        }
    }

    /// The stacks on the path from a root to each visible checkpoint and to Now.
    pub fn view_paths(&self) -> Result<Vec<Vec<StackRef>>> {
        let mut out = Vec::new();
        for n in self.nodes.iter().filter(|n| n.name.is_some()) {
            out.push(
                self.path_to(Some(n.id))?
                    .into_iter()
                    .map(StackRef::Node)
                    .collect(),
            );
        }
        let mut now: Vec<StackRef> = self
            .path_to(self.now.parent)?
            .into_iter()
            .map(StackRef::Node)
            .collect();
        now.push(StackRef::Now);
        out.push(now);
        Ok(out)
    }

    /// Validates internal consistency after loading.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Error::Corrupt {
            what: TREE_FILE.into(),
            why,
        };
        if self.format != TREE_FORMAT {
            return Err(Error::Version(self.format));
        }
        if self.block_size != crate::BLOCK_SIZE {
            return Err(bad(format!("unsupported block size {}", self.block_size)));
        }
        if self.size == 0 || !self.size.is_multiple_of(crate::SECTOR_SIZE) {
            return Err(bad(format!("bad disk size {}", self.size)));
        }
        self.uuid_value()?;
        if self.now.layers.is_empty() {
            return Err(bad("Now has no active layer".into()));
        }
        let mut layers = self.all_layers();
        let n = layers.len();
        layers.sort_unstable();
        layers.dedup();
        if layers.len() != n {
            return Err(bad("a layer belongs to two nodes".into()));
        }
        let mut ids: Vec<u64> = self.nodes.iter().map(|n| n.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.nodes.len() {
            return Err(bad("two nodes share an id".into()));
        }
        if layers
            .iter()
            .chain(self.nodes.iter().map(|n| &n.id))
            .any(|&id| id >= self.next_id)
        {
            return Err(bad("an id is not below next_id".into()));
        }
        for node in &self.nodes {
            self.path_to(Some(node.id))?;
            if let Some(name) = &node.name {
                validate_name(name)?;
                if self
                    .nodes
                    .iter()
                    .filter(|m| m.name.as_deref() == Some(name))
                    .count()
                    > 1
                {
                    return Err(bad(format!("duplicate name {name:?}")));
                }
            }
        }
        self.path_to(self.now.parent)?;
        Ok(())
    }

    /// Loads and validates `dir/strata.json`.
    pub fn load(dir: &Path) -> Result<Tree> {
        let path = dir.join(TREE_FILE);
        let mut opts = fs::OpenOptions::new();
        opts.read(true);
        let mut f = match open_regular(&path, &opts, Links::Refuse) {
            Ok(f) => f,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotADisk(dir.to_path_buf()))
            }
            Err(e) => return Err(e),
        };
        let text = read_capped(&mut f, &path, MAX_TREE_BYTES)?;
        let tree: Tree = serde_json::from_slice(&text).map_err(|e| Error::Corrupt {
            what: path.display().to_string(),
            why: e.to_string(),
        })?;
        tree.validate()?;
        Ok(tree)
    }

    /// Saves atomically (write new, fsync, rename, fsync the directory).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join(format!("{TREE_FILE}.tmp"));
        let path = dir.join(TREE_FILE);
        let text = serde_json::to_vec_pretty(self).map_err(|e| Error::Invalid(e.to_string()))?;
        let written = (|| {
            // A stale or planted `strata.json.tmp` (even a symlink) is replaced, never followed.
            match fs::remove_file(&tmp) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&tmp, e)),
            }
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)
                .map_err(|e| Error::io(&tmp, e))?;
            f.write_all(&text).map_err(|e| Error::io(&tmp, e))?;
            f.sync_all().map_err(|e| Error::io(&tmp, e))?;
            drop(f);
            fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        sync_dir(dir)
    }
}

/// fsyncs a directory so that renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> Tree {
        Tree {
            format: TREE_FORMAT,
            uuid: format!("{:032x}", 77u128),
            size: 1 << 20,
            block_size: 4096,
            base: None,
            merging: Vec::new(),
            next_id: 10,
            nodes: vec![
                Node {
                    id: 1,
                    name: Some("a".into()),
                    parent: None,
                    created: 0,
                    layers: vec![2],
                },
                Node {
                    id: 3,
                    name: Some("b".into()),
                    parent: Some(1),
                    created: 0,
                    layers: vec![4, 5],
                },
            ],
            now: NowNode {
                parent: Some(3),
                layers: vec![6],
            },
        }
    }

    #[test]
    fn lineage_and_names() {
        let t = tree();
        t.validate().unwrap();
        assert_eq!(t.lineage_layers(None).unwrap(), vec![2, 4, 5, 6]);
        assert_eq!(t.lineage_layers(Some(1)).unwrap(), vec![2]);
        assert!(matches!(
            t.check_new_name("a"),
            Err(Error::DuplicateName(_))
        ));
        assert!(matches!(validate_name(""), Err(Error::BadName(_))));
        assert!(validate_name(&"x".repeat(100)).is_ok());
        assert!(validate_name(&"x".repeat(101)).is_err());
        assert!(validate_name("a\nb").is_err());
    }

    #[test]
    fn validation_catches_damage() {
        let mut t = tree();
        t.nodes[1].parent = Some(3);
        assert!(t.validate().is_err(), "cycle");
        let mut t = tree();
        t.now.layers = vec![2];
        assert!(t.validate().is_err(), "shared layer");
        let mut t = tree();
        t.nodes[1].name = Some("a".into());
        assert!(t.validate().is_err(), "duplicate name");
        // Two nodes with one id (found by the tree_json fuzz target: `disk tree` recursed
        // until the stack overflowed).
        let mut t = tree();
        let first = t.nodes[0].id;
        t.nodes[1].id = first;
        t.nodes[1].parent = None;
        t.now.parent = Some(first);
        let e = t.validate().unwrap_err().to_string();
        assert!(e.contains("share an id"), "{e}");
    }

    #[test]
    fn runs_are_found_only_whole_and_sealed() {
        let mut t = tree();
        assert_eq!(t.find_run(&[4, 5]), Some((StackRef::Node(3), 0)));
        assert_eq!(t.find_run(&[5]), Some((StackRef::Node(3), 1)));
        assert_eq!(t.find_run(&[2, 4]), None, "two stacks");
        assert_eq!(t.find_run(&[6]), None, "the active layer");
        assert_eq!(t.below_stack(StackRef::Now).unwrap(), vec![2, 4, 5]);
        assert!(t.replace_run(StackRef::Node(3), 0, 2, 9));
        assert_eq!(t.lineage_layers(None).unwrap(), vec![2, 9, 6]);
        assert_eq!(t.view_paths().unwrap().len(), 3);
    }

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let t = tree();
        t.save(dir.path()).unwrap();
        assert_eq!(Tree::load(dir.path()).unwrap(), t);
        std::fs::write(dir.path().join(TREE_FILE), b"{ nope").unwrap();
        assert!(matches!(Tree::load(dir.path()), Err(Error::Corrupt { .. })));
    }
}
