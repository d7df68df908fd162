//! The chain `strata bench merge` deletes from: which extents each layer writes, building it
//! as a Strata disk, and checking what a view reads against the plan.
//!
//! A chain of `depth` checkpoints c1..cN (Now is a child of cN). The deleted checkpoint is
//! the middle one, c(N/2): it has a parent and a child, so both compaction directions
//! apply. It holds `held` bytes, either as scattered 4 KiB blocks (random order over the
//! whole disk) or as one sequential run written in 1 MiB pieces; every other layer holds
//! `held / 8` of scattered 4 KiB blocks, some of which overwrite the deleted layer's
//! blocks (garbage a merge can drop). The disk is four times `held`. Each layer's blocks
//! are filled with one byte, so any view's content at any block is known from the plan.

use std::collections::HashMap;
use std::path::Path;

use journal::Volume;

use super::fail;
use super::pattern::{Permutation, BLOCK};
use crate::Result;

/// How the deleted checkpoint's data lies on the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pattern {
    /// 4 KiB blocks in random order all over the disk.
    Scattered,
    /// One contiguous run starting at a quarter of the disk.
    Sequential,
}

impl Pattern {
    pub const ALL: [Pattern; 2] = [Pattern::Scattered, Pattern::Sequential];

    pub fn name(self) -> &'static str {
        match self {
            Pattern::Scattered => "scattered",
            Pattern::Sequential => "sequential",
        }
    }

    pub fn from_name(name: &str) -> Option<Pattern> {
        Pattern::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// A run of bytes written with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

/// What one layer (1-based, oldest first) writes.
#[derive(Clone, Debug)]
pub struct LayerPlan {
    pub layer: usize,
    pub byte: u8,
    /// In write order.
    pub extents: Vec<Extent>,
}

impl LayerPlan {
    pub fn bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }
}

/// The whole chain.
#[derive(Clone, Debug)]
pub struct Layout {
    pub disk_size: u64,
    pub held: u64,
    pub pattern: Pattern,
    pub layers: Vec<LayerPlan>,
    /// 1-based layer of the checkpoint that is deleted.
    pub target: usize,
}

/// Largest single write when building a sequential run.
const SEQ_PIECE: u64 = 1 << 20;

pub fn checkpoint_name(layer: usize) -> String {
    format!("c{layer}")
}

impl Layout {
    /// The plan for `held` bytes (a multiple of 64 KiB) in a chain of `depth` (>= 3).
    pub fn new(held: u64, depth: usize, pattern: Pattern) -> Layout {
        let disk_size = held * 4;
        let blocks = disk_size / BLOCK;
        let target = depth / 2 + depth % 2;
        let layers = (1..=depth)
            .map(|layer| {
                let byte = (layer % 250) as u8 + 1;
                let seed = 0x6d65_7267_0000 + layer as u64;
                let extents = if layer != target {
                    scattered(blocks, seed, (held / 8) / BLOCK)
                } else if pattern == Pattern::Scattered {
                    scattered(blocks, seed, held / BLOCK)
                } else {
                    let start = disk_size / 4;
                    (0..held.div_ceil(SEQ_PIECE))
                        .map(|i| Extent {
                            offset: start + i * SEQ_PIECE,
                            len: SEQ_PIECE.min(held - i * SEQ_PIECE),
                        })
                        .collect()
                };
                LayerPlan {
                    layer,
                    byte,
                    extents,
                }
            })
            .collect();
        Layout {
            disk_size,
            held,
            pattern,
            layers,
            target,
        }
    }

    pub fn target_name(&self) -> String {
        checkpoint_name(self.target)
    }

    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// Creates the Strata disk `dir` (no base image) with checkpoints c1..cN.
    pub fn build_strata(&self, dir: &Path) -> Result<()> {
        let mut disk = super::scratch::create_writable(dir, self.disk_size, None)?;
        let now = disk.now();
        let mut data = Vec::new();
        for l in &self.layers {
            for e in &l.extents {
                data.clear();
                data.resize(e.len as usize, l.byte);
                now.write_at(&data, e.offset, false)?;
            }
            disk.checkpoint(&checkpoint_name(l.layer))?;
        }
        Ok(())
    }

    /// The byte that a view seeing layers 1..=`upto` reads at block offset `off`, with the
    /// deleted layer's data still visible (a delete must not change any other view).
    fn owner_map(&self) -> HashMap<u64, Vec<(usize, u8)>> {
        let mut m: HashMap<u64, Vec<(usize, u8)>> = HashMap::new();
        for l in &self.layers {
            for e in &l.extents {
                let mut o = e.offset;
                while o < e.offset + e.len {
                    m.entry(o).or_default().push((l.layer, l.byte));
                    o += BLOCK;
                }
            }
        }
        m
    }

    /// Sample block offsets to check: up to `n` of the deleted layer's blocks (some of them
    /// overwritten later), plus blocks of every other layer and never-written ones.
    pub fn sample_offsets(&self, n: usize) -> Vec<u64> {
        let mut v = Vec::new();
        for l in &self.layers {
            let per = if l.layer == self.target { n } else { n / 8 + 1 };
            let blocks: Vec<u64> = l
                .extents
                .iter()
                .flat_map(|e| (0..e.len / BLOCK).map(move |i| e.offset + i * BLOCK))
                .collect();
            let step = (blocks.len() / per.max(1)).max(1);
            v.extend(blocks.iter().step_by(step).take(per));
        }
        let step = (self.disk_size / BLOCK / 64).max(1);
        v.extend(
            (0..self.disk_size / BLOCK)
                .step_by(step as usize)
                .map(|b| b * BLOCK),
        );
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Reads `offsets` from `view` (which sees layers 1..=`upto`) and compares with the plan.
    /// Returns the number of blocks checked.
    pub fn verify(&self, view: &Volume, upto: usize, offsets: &[u64], what: &str) -> Result<usize> {
        let owners = self.owner_map();
        let mut buf = vec![0u8; BLOCK as usize];
        for &off in offsets {
            let want = owners
                .get(&off)
                .and_then(|w| w.iter().rev().find(|(l, _)| *l <= upto))
                .map_or(0, |&(_, b)| b);
            view.read_at(&mut buf, off)?;
            if let Some(bad) = buf.iter().position(|&b| b != want) {
                return Err(fail(
                    format!("checking {what}"),
                    format!(
                        "byte {} of block {off} reads {:#04x}, expected {want:#04x}",
                        bad, buf[bad]
                    ),
                ));
            }
        }
        Ok(offsets.len())
    }
}

/// `count` distinct 4 KiB blocks of `blocks` in random order.
fn scattered(blocks: u64, seed: u64, count: u64) -> Vec<Extent> {
    Permutation::new(blocks, seed)
        .take(count.min(blocks) as usize)
        .map(|b| Extent {
            offset: b * BLOCK,
            len: BLOCK,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use journal::{CacheMode, Disk, OpenOptions};

    #[test]
    fn plan_has_the_sizes_and_target() {
        let l = Layout::new(4 << 20, 8, Pattern::Scattered);
        assert_eq!(l.disk_size, 16 << 20);
        assert_eq!(l.depth(), 8);
        assert_eq!(l.target, 4);
        assert_eq!(l.target_name(), "c4");
        assert_eq!(l.layers[3].bytes(), 4 << 20);
        assert_eq!(l.layers[0].bytes(), (4 << 20) / 8);
        assert!(l.layers[3].extents.iter().all(|e| e.len == BLOCK));
        let s = Layout::new(3 << 20, 5, Pattern::Sequential);
        assert_eq!(s.target, 3);
        let t = &s.layers[2];
        assert_eq!(t.bytes(), 3 << 20);
        assert_eq!(t.extents.len(), 3);
        assert_eq!(t.extents[0].offset, s.disk_size / 4);
        assert_eq!(t.extents[1].offset, s.disk_size / 4 + SEQ_PIECE);
        assert_eq!(Pattern::from_name("sequential"), Some(Pattern::Sequential));
        assert_eq!(Pattern::from_name("x"), None);
    }

    #[test]
    fn built_disk_reads_as_planned_and_a_wrong_plan_is_caught() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let l = Layout::new(1 << 20, 4, Pattern::Sequential);
        l.build_strata(&dir).unwrap();
        let disk = Disk::open(
            &dir,
            OpenOptions {
                cache: CacheMode::Writeback,
                read_only: true,
            },
        )
        .unwrap();
        let offs = l.sample_offsets(64);
        assert!(offs.len() > 64);
        for up in 1..=4 {
            let v = disk.checkpoint_view(&checkpoint_name(up)).unwrap();
            l.verify(&v, up, &offs, "view").unwrap();
        }
        l.verify(&disk.now(), 4, &offs, "Now").unwrap();
        // Reading c1 as if it saw c2's layer too must fail.
        let v = disk.checkpoint_view("c1").unwrap();
        let err = l.verify(&v, 2, &offs, "c1").unwrap_err();
        assert!(crate::cli::error_chain(&err).contains("expected"));
    }
}
