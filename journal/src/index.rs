//! The merged block index of a view: disk block -> newest version, in O(1) whatever the depth.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Where the newest version of a block lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    /// Position of the layer in the view's layer list.
    pub ordinal: u16,
    /// Block number in that layer's data file, or [`crate::format::ZERO_BLOCK`].
    pub data_block: u64,
    /// CRC32C of the block's 4 KiB (0 for zero blocks).
    pub crc: u32,
}

/// A cheap, well-mixing hasher for block numbers (splitmix64 finaliser).
#[derive(Default, Clone, Copy)]
pub struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Disk block -> location of its newest version. Blocks absent read from the base (or zeros).
///
/// Memory: one hash slot per distinct block written anywhere in the view's lineage. A slot is
/// 24 bytes (8-byte key, 16-byte [`Loc`]) plus one control byte; the table keeps a load factor
/// between 7/16 and 7/8, so 28 to 57 bytes per written block.
#[derive(Default)]
pub struct Index {
    map: HashMap<u64, Loc, BuildHasherDefault<BlockHasher>>,
}

impl Index {
    /// The newest version of `block`, if any layer of the view wrote it.
    #[inline]
    pub fn get(&self, block: u64) -> Option<Loc> {
        self.map.get(&block).copied()
    }

    /// The location of `block`, to change in place.
    #[inline]
    pub fn get_mut(&mut self, block: u64) -> Option<&mut Loc> {
        self.map.get_mut(&block)
    }

    /// Records a newer version of `block`; returns the one it replaces.
    #[inline]
    pub fn insert(&mut self, block: u64, loc: Loc) -> Option<Loc> {
        self.map.insert(block, loc)
    }

    /// Forgets `block` (it reads from the base, or zeros, again); returns what it mapped to.
    pub fn remove(&mut self, block: u64) -> Option<Loc> {
        self.map.remove(&block)
    }

    /// Number of blocks mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no block is mapped.
    #[allow(dead_code)]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Iterates over (block, loc) in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Loc)> + '_ {
        self.map.iter().map(|(k, v)| (*k, *v))
    }

    /// Rewrites every location in place (a merge renumbering ordinals).
    pub fn remap(&mut self, mut f: impl FnMut(u64, &mut Loc)) {
        for (k, v) in self.map.iter_mut() {
            f(*k, v);
        }
    }

    /// Bytes of heap memory used by the table.
    pub fn heap_bytes(&self) -> usize {
        self.map.capacity() * (std::mem::size_of::<(u64, Loc)>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_wins_and_memory_is_bounded() {
        let mut idx = Index::default();
        for b in 0..10_000u64 {
            idx.insert(
                b * 7,
                Loc {
                    ordinal: 0,
                    data_block: b,
                    crc: 1,
                },
            );
        }
        let old = idx.insert(
            14,
            Loc {
                ordinal: 3,
                data_block: 99,
                crc: 2,
            },
        );
        assert_eq!(old.map(|l| l.data_block), Some(2));
        assert_eq!(idx.get(14).map(|l| l.ordinal), Some(3));
        assert_eq!(idx.get(15), None);
        assert_eq!(idx.len(), 10_000);
        assert!(
            idx.heap_bytes() <= 10_000 * 57,
            "{} bytes",
            idx.heap_bytes()
        );
    }
}
