//! Page bitmaps: a plain one for images on disk, an atomic one shared between threads.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page, shared between the copier, the fault handler and the tracker.
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    bits: u64,
}

impl AtomicBitmap {
    /// `bits` clear bits.
    pub fn new(bits: u64) -> AtomicBitmap {
        let n = bits.div_ceil(64) as usize;
        let mut words = std::mem::ManuallyDrop::new(vec![0u64; n]);
        // SAFETY: AtomicU64 has the size, alignment and bit validity of u64; the zeroed
        // allocation (untouched until used: it costs no page faults during a pause) is handed
        // over whole, with its length and capacity.
        let words = unsafe {
            Vec::from_raw_parts(
                words.as_mut_ptr().cast::<AtomicU64>(),
                words.len(),
                words.capacity(),
            )
        };
        AtomicBitmap { words, bits }
    }

    /// A bitmap with the bits of `words` set.
    #[cfg(test)]
    pub fn from_words(words: &[u64], bits: u64) -> AtomicBitmap {
        AtomicBitmap {
            words: words.iter().map(|w| AtomicU64::new(*w)).collect(),
            bits,
        }
    }

    /// Sets bit `i`; returns whether it was clear (this caller won it).
    pub fn set(&self, i: u64) -> bool {
        let m = 1u64 << (i % 64);
        self.words[(i / 64) as usize].fetch_or(m, Ordering::AcqRel) & m == 0
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        i < self.bits
            && self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Clears every bit and returns the old words.
    pub fn take(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect()
    }

    /// The current words.
    pub fn snapshot(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }
}

/// Whether bit `i` of `words` is set.
pub fn test(words: &[u64], i: u64) -> bool {
    words
        .get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// Sets bit `i` of `words`.
pub fn set(words: &mut [u64], i: u64) {
    words[(i / 64) as usize] |= 1 << (i % 64);
}

/// Set bits in `words`.
pub fn count(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// Maximal runs `(first, len)` of set bits in `words`, each at most `max` long.
pub fn runs(words: &[u64], bits: u64, max: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut start: Option<u64> = None;
    let mut i = 0;
    while i < bits {
        let w = words[(i / 64) as usize];
        if i % 64 == 0 && (w == 0 || w == u64::MAX) && i + 64 <= bits {
            if w == 0 {
                if let Some(s) = start.take() {
                    push_run(&mut out, s, i - s, max);
                }
            } else if start.is_none() {
                start = Some(i);
            }
            i += 64;
            continue;
        }
        let on = w & (1 << (i % 64)) != 0;
        match (on, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                push_run(&mut out, s, i - s, max);
                start = None;
            }
            _ => {}
        }
        i += 1;
    }
    if let Some(s) = start {
        push_run(&mut out, s, bits - s, max);
    }
    out
}

fn push_run(out: &mut Vec<(u64, u64)>, mut s: u64, mut len: u64, max: u64) {
    while len > 0 {
        let n = len.min(max);
        out.push((s, n));
        s += n;
        len -= n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_and_merge() {
        let mut w = vec![0u64; 3];
        for i in [0, 1, 2, 63, 64, 65, 130] {
            set(&mut w, i);
        }
        for i in 70..128 {
            set(&mut w, i);
        }
        assert_eq!(
            runs(&w, 140, 100),
            vec![(0, 3), (63, 3), (70, 58), (130, 1)]
        );
        assert_eq!(runs(&w, 140, 2), {
            let mut v = vec![(0, 2), (2, 1), (63, 2), (65, 1)];
            let mut s = 70;
            while s < 128 {
                v.push((s, 2));
                s += 2;
            }
            v.push((130, 1));
            v
        });
        let all = vec![u64::MAX; 2];
        assert_eq!(runs(&all, 128, 1000), vec![(0, 128)]);
        assert_eq!(count(&w), 7 + 58);
        let a = AtomicBitmap::from_words(&w, 140);
        assert!(a.get(130) && !a.get(131) && !a.get(1000));
        assert!(a.set(131) && !a.set(131));
        assert_eq!(count(&a.take()), 66);
        assert_eq!(count(&a.snapshot()), 0);
    }
}
