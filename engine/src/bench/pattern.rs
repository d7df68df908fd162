//! Deterministic patterns shared by every target of a benchmark, so that the journal and the
//! qcow2 chain hold exactly the same writes: which 4 KiB blocks each layer writes and with
//! which byte, the random order of benchmark offsets, and the content of raw images.

/// The unit of the layer writes.
pub const BLOCK: u64 = 4096;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A pseudo-random permutation of `0..n`: every value once, in scattered order (like fio's
/// random map: no repeats until everything was visited). A full-period LCG modulo the next
/// power of two, passed through a bijective mixer, skipping values `>= n`.
#[derive(Clone, Debug)]
pub struct Permutation {
    n: u64,
    bits: u32,
    mask: u64,
    a: u64,
    c: u64,
    x: u64,
    mul: u64,
    left: u64,
}

impl Permutation {
    pub fn new(n: u64, seed: u64) -> Permutation {
        let bits = 64 - (n.max(2) - 1).leading_zeros();
        let mask = if bits >= 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        let s1 = splitmix(seed);
        let s2 = splitmix(s1);
        let s3 = splitmix(s2);
        Permutation {
            n,
            bits,
            mask,
            // Hull-Dobell: c odd and a = 1 (mod 4) give the full period 2^bits.
            a: ((s1 << 2) | 1) & mask,
            c: (s2 | 1) & mask,
            x: s3 & mask,
            mul: splitmix(s3) | 1,
            left: n,
        }
    }

    /// A bijection of `0..=mask` that scatters the LCG's regular low bits.
    fn mix(&self, mut v: u64) -> u64 {
        let shift = self.bits.div_ceil(2).max(1);
        v ^= v >> shift;
        v = v.wrapping_mul(self.mul) & self.mask;
        v ^= v >> shift;
        v
    }
}

impl Iterator for Permutation {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        if self.left == 0 {
            return None;
        }
        loop {
            self.x = self.a.wrapping_mul(self.x).wrapping_add(self.c) & self.mask;
            let v = self.mix(self.x);
            if v < self.n {
                self.left -= 1;
                return Some(v);
            }
        }
    }
}

/// The writes of one layer (1-based, oldest first): distinct scattered 4 KiB blocks, all
/// filled with the same byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerWrites {
    pub layer: usize,
    pub byte: u8,
    /// Byte offsets, in write order.
    pub offsets: Vec<u64>,
}

/// The writes of layer `layer` of a disk of `disk_size` bytes. Layers are independent of the
/// depth (layer 5 is the same in every chain), so one chain serves every depth.
pub fn layer_writes(layer: usize, disk_size: u64, writes: u64) -> LayerWrites {
    let blocks = disk_size / BLOCK;
    let offsets = Permutation::new(blocks, 0x5157_0000 + layer as u64)
        .take(writes.min(blocks) as usize)
        .map(|b| b * BLOCK)
        .collect();
    LayerWrites {
        layer,
        byte: (layer % 250) as u8 + 1,
        offsets,
    }
}

/// Fills `buf` with the content of a raw image at byte `offset` (an xorshift stream per 8
/// bytes, so the image is neither sparse nor compressible and any chunk can be made alone).
pub fn fill_raw(buf: &mut [u8], offset: u64, seed: u64) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let word = splitmix(seed ^ (offset / 8 + i as u64));
        let bytes = word.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn permutation_visits_everything_once() {
        for n in [1u64, 2, 3, 7, 16, 1000, 4097] {
            let v: Vec<u64> = Permutation::new(n, 42).collect();
            assert_eq!(v.len() as u64, n, "n={n}");
            let set: HashSet<u64> = v.iter().copied().collect();
            assert_eq!(set.len() as u64, n, "n={n}");
            assert!(v.iter().all(|&x| x < n));
        }
        assert_eq!(Permutation::new(0, 1).next(), None);
    }

    #[test]
    fn permutation_is_scattered_and_seeded() {
        let a: Vec<u64> = Permutation::new(1 << 18, 1).take(1000).collect();
        let b: Vec<u64> = Permutation::new(1 << 18, 2).take(1000).collect();
        assert_ne!(a, b);
        // Consecutive values should rarely fall in the same 64 KiB cluster (16 blocks).
        let same = a.windows(2).filter(|w| w[0] / 16 == w[1] / 16).count();
        assert!(same < 20, "{same} consecutive pairs in one cluster");
        // Both halves of the disk get visited early.
        assert!(a.iter().any(|&x| x < 1 << 17) && a.iter().any(|&x| x >= 1 << 17));
    }

    #[test]
    fn layers_are_deterministic_distinct_and_in_range() {
        let size = 64 << 20;
        let l3 = layer_writes(3, size, 500);
        assert_eq!(l3, layer_writes(3, size, 500));
        assert_eq!(l3.offsets.len(), 500);
        assert_eq!(l3.byte, 4);
        assert!(l3
            .offsets
            .iter()
            .all(|&o| o % BLOCK == 0 && o + BLOCK <= size));
        let set: HashSet<u64> = l3.offsets.iter().copied().collect();
        assert_eq!(set.len(), 500);
        assert_ne!(l3.offsets, layer_writes(4, size, 500).offsets);
        // More writes than blocks: capped at every block once.
        assert_eq!(layer_writes(1, 8 * BLOCK, 100).offsets.len(), 8);
    }

    #[test]
    fn raw_content_is_position_addressed() {
        let mut whole = vec![0u8; 8192];
        fill_raw(&mut whole, 0, 9);
        let mut tail = vec![0u8; 4096];
        fill_raw(&mut tail, 4096, 9);
        assert_eq!(&whole[4096..], &tail[..]);
        assert!(whole.iter().filter(|&&b| b == 0).count() < 200);
    }
}
