//! Space of the active layer's data file: which block the next write gets.
//!
//! New writes take freed blocks first (best fit, so a run of `n` blocks stays contiguous),
//! and only extend the file when no free run is long enough. A block is retired when the
//! record that superseded it is durable (see "Reusing freed blocks" in `docs/DESIGN.md`),
//! waits in the [`ReadGate`] generations until no read can still be reading it, and is then
//! either kept (this file's own blocks, up to [`Alloc::keep_room`]) and reused unpunched, or
//! handed to the punch worker (`punch.rs`; also blocks of Now's older own layers), which
//! gives this file's blocks back to [`Alloc::reuse`] once they are punched.

use std::sync::Arc;

use crate::freelist::FreeList;
use crate::layer::{preallocate, LayerFiles};
use crate::read_gate::ReadGate;
use crate::{Error, Result, BLOCK_SIZE};

/// Smallest and largest preallocation step of an active data file.
const PREALLOC_MIN: u64 = 1 << 20;
const PREALLOC_MAX: u64 = 64 << 20;
/// Retired blocks held back for slow readers beyond which the rest are neither punched nor
/// reused (they stay allocated until the next open rebuilds the free list).
const LIMBO_MAX: usize = 1 << 22;

/// Freed blocks of the active layer kept for reuse without a punch: at least this many...
const KEEP_MIN_BLOCKS: u64 = 64;
/// ...or an eighth of the used part of the data file, but never more than 64 MiB. Beyond
/// that, freed blocks are punched (a large discard gives its space back to the host).
const KEEP_FRACTION: u64 = 8;
const KEEP_MAX_BLOCKS: u64 = (64 << 20) / BLOCK_SIZE;

/// A data block of one layer.
pub(crate) type Block = (Arc<LayerFiles>, u64);

/// Allocation state of one active data file.
pub(crate) struct Alloc {
    /// End of the used part of the file: every block at or past it is unused.
    next_block: u64,
    /// The highest `next_block` ever: superseded log records may name blocks up to here,
    /// so a sealed layer's file is never cut below it.
    high_water: u64,
    prealloc_end: u64,
    free: FreeList,
    /// Retired since the last epoch flip.
    limbo_new: Vec<Block>,
    /// Retired before the last flip: free once the reads of the previous epoch drained.
    limbo_old: Vec<Block>,
    /// False when the layer's log has damaged records (a damaged record's data block is
    /// unknown, so it might be live): then no block is reused.
    reuse: bool,
}

impl Alloc {
    /// `next_block` is the first block no record points at, `file_len` the data file size.
    pub fn new(next_block: u64, file_len: u64) -> Alloc {
        let reuse = std::env::var_os("STRATA_NO_REUSE").is_none();
        Alloc {
            next_block,
            high_water: next_block,
            prealloc_end: file_len.max(next_block.saturating_mul(BLOCK_SIZE)),
            free: FreeList::default(),
            limbo_new: Vec::new(),
            limbo_old: Vec::new(),
            reuse,
        }
    }

    /// Blocks in use (or free below the end) in the data file.
    pub fn used_blocks(&self) -> u64 {
        self.next_block
    }

    /// Blocks the file must keep when the layer is sealed (see `high_water`).
    pub fn high_water(&self) -> u64 {
        self.high_water
    }

    /// Blocks reusable now, and retired blocks waiting for readers.
    pub fn free_blocks(&self) -> (u64, u64) {
        (
            self.free.blocks(),
            (self.limbo_new.len() + self.limbo_old.len()) as u64,
        )
    }

    /// Builds the free list of a reopened layer: every block below the end that no live
    /// record points at (`live` holds the live records' data blocks). With `damaged`,
    /// nothing is ever reused.
    pub fn rebuild(&mut self, mut live: Vec<u64>, damaged: bool) {
        if damaged {
            self.reuse = false;
        }
        if !self.reuse {
            return;
        }
        live.sort_unstable();
        live.dedup();
        let mut cur = 0;
        for b in live {
            if b >= self.next_block {
                break;
            }
            if b > cur {
                self.free.free(cur, b - cur);
            }
            cur = b + 1;
        }
        if cur < self.next_block {
            self.free.free(cur, self.next_block - cur);
        }
        self.settle_tail();
    }

    /// Reserves `n` consecutive data blocks: a free run if one is long enough, else at the
    /// end, preallocating the file in large steps.
    pub fn allocate(&mut self, n: u64, files: &LayerFiles) -> Result<u64> {
        if let Some(first) = self.free.take(n) {
            return Ok(first);
        }
        let first = self.next_block;
        let end = first
            .checked_add(n)
            .and_then(|e| e.checked_mul(BLOCK_SIZE))
            .ok_or_else(|| Error::Invalid("data file would exceed 2^64 bytes".into()))?;
        if end > self.prealloc_end {
            let step = (end / 16).clamp(PREALLOC_MIN, PREALLOC_MAX);
            let new_end = (end + step).next_multiple_of(PREALLOC_MIN);
            if let Err(e) = preallocate(&files.data, self.prealloc_end, new_end - self.prealloc_end)
            {
                if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(Error::io(&files.data_path, e));
                }
            }
            self.prealloc_end = new_end;
        }
        self.next_block = first + n;
        self.high_water = self.high_water.max(self.next_block);
        Ok(first)
    }

    /// Takes blocks whose superseding records are durable (or that no record ever pointed
    /// at); returns the retired blocks no read can still be reading, which the caller
    /// punches and then hands to [`Alloc::reuse`].
    pub fn retire(&mut self, blocks: Vec<Block>, gate: &ReadGate) -> Vec<Block> {
        let room = LIMBO_MAX.saturating_sub(self.limbo_new.len() + self.limbo_old.len());
        if blocks.len() > room {
            tracing::warn!(
                "{} freed blocks stay allocated: reads in flight hold back too many",
                blocks.len() - room
            );
        }
        self.limbo_new.extend(blocks.into_iter().take(room));
        let mut ready = Vec::new();
        for _ in 0..2 {
            if !self.limbo_old.is_empty() && gate.previous_drained() {
                ready.append(&mut self.limbo_old);
            }
            if self.limbo_old.is_empty() && !self.limbo_new.is_empty() && gate.previous_drained() {
                gate.flip();
                std::mem::swap(&mut self.limbo_old, &mut self.limbo_new);
            } else {
                break;
            }
        }
        ready
    }

    /// How many more of this file's freed blocks may go to the free list without a punch:
    /// the bound (`KEEP_*`) less what the free list already holds (punched or not, so the
    /// unpunched free blocks never exceed the bound). 0 when nothing is reused.
    pub fn keep_room(&self) -> u64 {
        if !self.reuse {
            return 0;
        }
        let bound = (self.next_block / KEEP_FRACTION).clamp(KEEP_MIN_BLOCKS, KEEP_MAX_BLOCKS);
        bound.saturating_sub(self.free.blocks())
    }

    /// Makes punched (or kept) blocks of this file allocatable again.
    pub fn reuse(&mut self, mut blocks: Vec<u64>) {
        if !self.reuse {
            return;
        }
        blocks.sort_unstable();
        let mut i = 0;
        while i < blocks.len() {
            let start = blocks[i];
            let mut end = start + 1;
            i += 1;
            while i < blocks.len() && blocks[i] <= end {
                end = end.max(blocks[i] + 1);
                i += 1;
            }
            if start < self.next_block {
                self.free.free(start, end.min(self.next_block) - start);
            }
        }
        self.settle_tail();
    }

    /// A free extent that ends at the end of the used part shortens it.
    fn settle_tail(&mut self) {
        while let Some(start) = self.free.take_ending_at(self.next_block) {
            self.next_block = start;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::CacheMode;

    fn layer() -> (tempfile::TempDir, Arc<LayerFiles>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(crate::layer::LAYERS_DIR)).unwrap();
        let l = LayerFiles::create(dir.path(), 1, 1, CacheMode::Writeback).unwrap();
        (dir, Arc::new(l))
    }

    /// Retires `blocks` and reuses what comes out ready (as the active layer does, with the
    /// punching left out); returns how many came out.
    fn retire(a: &mut Alloc, gate: &ReadGate, l: &Arc<LayerFiles>, blocks: &[u64]) -> usize {
        let ready = a.retire(blocks.iter().map(|&b| (l.clone(), b)).collect(), gate);
        let n = ready.len();
        a.reuse(ready.into_iter().map(|(_, b)| b).collect());
        n
    }

    #[test]
    fn freed_blocks_are_reused_contiguously_after_readers_drain() {
        let (_d, l) = layer();
        let gate = Arc::new(ReadGate::default());
        let mut a = Alloc::new(0, 0);
        assert_eq!(a.allocate(8, &l).unwrap(), 0);
        assert_eq!(a.allocate(8, &l).unwrap(), 8);
        // A read in flight when blocks 2..6 are retired keeps them from being freed.
        let reader = gate.pin();
        assert_eq!(retire(&mut a, &gate, &l, &[2, 3, 4, 5]), 0);
        assert_eq!(a.allocate(4, &l).unwrap(), 16, "the reader may read 2..6");
        assert_eq!(a.free_blocks(), (0, 4));
        drop(reader);
        // The next retirement (the next flush) frees them.
        assert_eq!(retire(&mut a, &gate, &l, &[]), 4);
        assert_eq!(a.allocate(4, &l).unwrap(), 2);
        // A run longer than any free extent goes to the end; a single block fills a gap.
        assert_eq!(retire(&mut a, &gate, &l, &[0, 6]), 2, "no reader: at once");
        assert_eq!(a.allocate(2, &l).unwrap(), 20);
        assert_eq!(a.allocate(1, &l).unwrap(), 0);
        assert_eq!(a.allocate(1, &l).unwrap(), 6);
        assert_eq!(a.used_blocks(), 22);
        // Freeing the tail shortens the used part.
        retire(&mut a, &gate, &l, &[20, 21, 19, 18]);
        assert_eq!(a.used_blocks(), 18);
        assert_eq!(a.allocate(1, &l).unwrap(), 18);
    }

    #[test]
    fn rebuild_frees_every_unreferenced_block_unless_damaged() {
        let (_d, l) = layer();
        let gate = Arc::new(ReadGate::default());
        let mut a = Alloc::new(10, 10 * BLOCK_SIZE);
        a.rebuild(vec![9, 1, 4, 4], false);
        assert_eq!(a.free_blocks().0, 7);
        assert_eq!(a.allocate(4, &l).unwrap(), 5);
        assert_eq!(a.allocate(1, &l).unwrap(), 0);
        let mut d = Alloc::new(10, 10 * BLOCK_SIZE);
        d.rebuild(vec![9], true);
        assert_eq!(retire(&mut d, &gate, &l, &[3]), 1, "still punched");
        assert_eq!(d.free_blocks(), (0, 0), "but never reused");
        assert_eq!(d.allocate(1, &l).unwrap(), 10);
    }
}
