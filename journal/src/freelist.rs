//! Free extents of a data file: best-fit allocation of `n` consecutive blocks, coalescing on
//! free. Used by the active layer to reuse blocks that superseded writes freed.

use std::collections::{BTreeMap, BTreeSet};

/// Free runs of data blocks, indexed by start (for coalescing) and by length (for best fit).
#[derive(Default, Debug)]
pub(crate) struct FreeList {
    by_start: BTreeMap<u64, u64>,
    by_len: BTreeSet<(u64, u64)>,
    blocks: u64,
}

impl FreeList {
    /// Total free blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Number of free extents.
    #[cfg(test)]
    pub fn extents(&self) -> usize {
        self.by_start.len()
    }

    fn remove(&mut self, start: u64) -> Option<u64> {
        let len = self.by_start.remove(&start)?;
        self.by_len.remove(&(len, start));
        self.blocks -= len;
        Some(len)
    }

    fn put(&mut self, start: u64, len: u64) {
        self.by_start.insert(start, len);
        self.by_len.insert((len, start));
        self.blocks += len;
    }

    /// Frees `[start, start+len)`, merging with neighbours. Blocks already free are ignored
    /// (a double free would otherwise hand one block to two writes); returns the blocks that
    /// were newly freed.
    pub fn free(&mut self, start: u64, len: u64) -> u64 {
        let Some(end) = start.checked_add(len) else {
            return 0;
        };
        if len == 0 {
            return 0;
        }
        // Clip against extents that overlap [start, end): free only the gaps between them.
        let overlapping: Vec<(u64, u64)> = self
            .by_start
            .range(..end)
            .rev()
            .take_while(|(&s, &l)| s + l > start)
            .map(|(&s, &l)| (s, l))
            .collect();
        if !overlapping.is_empty() {
            let mut gaps = Vec::new();
            let mut cur = start;
            for &(s, l) in overlapping.iter().rev() {
                if s > cur {
                    gaps.push((cur, s - cur));
                }
                cur = cur.max(s + l);
            }
            if cur < end {
                gaps.push((cur, end - cur));
            }
            return gaps.into_iter().map(|(s, l)| self.free(s, l)).sum();
        }
        let mut new_start = start;
        let mut new_len = len;
        if let Some((&ps, &pl)) = self.by_start.range(..start).next_back() {
            if ps + pl == start {
                self.remove(ps);
                new_start = ps;
                new_len += pl;
            }
        }
        if let Some(nl) = self.by_start.get(&end).copied() {
            self.remove(end);
            new_len += nl;
        }
        self.put(new_start, new_len);
        len
    }

    /// Takes `n` consecutive blocks from the smallest extent that holds them (the lowest such
    /// extent among equals); `None` when no extent is long enough.
    pub fn take(&mut self, n: u64) -> Option<u64> {
        if n == 0 {
            return None;
        }
        let &(len, start) = self.by_len.range((n, 0)..).next()?;
        self.remove(start);
        if len > n {
            self.put(start + n, len - n);
        }
        Some(start)
    }

    /// Removes the extent that ends exactly at `end`, if any; returns its start.
    pub fn take_ending_at(&mut self, end: u64) -> Option<u64> {
        let (&s, &l) = self.by_start.range(..end).next_back()?;
        if s + l != end {
            return None;
        }
        self.remove(s);
        Some(s)
    }

    /// True when `block` is free.
    #[cfg(test)]
    pub fn contains(&self, block: u64) -> bool {
        self.by_start
            .range(..=block)
            .next_back()
            .is_some_and(|(&s, &l)| block < s + l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_and_takes_best_fit() {
        let mut f = FreeList::default();
        assert_eq!(f.free(10, 2), 2);
        assert_eq!(f.free(14, 1), 1);
        assert_eq!(f.free(12, 2), 2);
        assert_eq!(f.extents(), 1, "10..15 is one extent");
        assert_eq!(f.blocks(), 5);
        f.free(100, 3);
        // Best fit: a run of 3 comes from the extent of exactly 3, not the larger one.
        assert_eq!(f.take(3), Some(100));
        assert_eq!(f.take(6), None);
        assert_eq!(f.take(2), Some(10));
        assert_eq!(f.blocks(), 3);
        assert!(f.contains(12) && !f.contains(11) && !f.contains(15));
        assert_eq!(f.take_ending_at(15), Some(12));
        assert_eq!(f.blocks(), 0);
    }

    #[test]
    fn a_double_free_is_ignored() {
        let mut f = FreeList::default();
        f.free(5, 10);
        assert_eq!(f.free(8, 2), 0);
        assert_eq!(f.free(0, 20), 10, "only the gaps around 5..15 are new");
        assert_eq!(f.blocks(), 20);
        assert_eq!(f.extents(), 1);
        assert_eq!(f.take(20), Some(0));
        assert_eq!(f.take(1), None);
    }
}
