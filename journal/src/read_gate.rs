//! When a freed data block may be handed to a new write: only once every read that may
//! still be reading its old contents has finished.
//!
//! A read resolves its blocks through the index and reads them later, without locks. A
//! block freed after that resolution must not be rewritten with another block's data before
//! the read completes (it would fail its checksum). Reads pin the gate for their lifetime;
//! freed blocks wait in two generations (see `space::Alloc`): blocks freed before the last
//! [`ReadGate::flip`] are reusable once the readers of the previous epoch have drained,
//! which never blocks anyone (a reader that never finishes only delays reuse).

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

/// Two reader counters indexed by epoch parity.
#[derive(Default, Debug)]
pub(crate) struct ReadGate {
    epoch: AtomicU64,
    readers: [AtomicU64; 2],
}

/// A read in flight; dropping it ends the read.
#[derive(Debug)]
pub(crate) struct ReadPin {
    gate: Arc<ReadGate>,
    slot: usize,
}

impl Drop for ReadPin {
    fn drop(&mut self) {
        self.gate.readers[self.slot].fetch_sub(1, SeqCst);
    }
}

impl ReadGate {
    /// Registers a read; must be called before the read looks at the index.
    pub fn pin(self: &Arc<ReadGate>) -> ReadPin {
        loop {
            let e = self.epoch.load(SeqCst);
            let slot = (e & 1) as usize;
            self.readers[slot].fetch_add(1, SeqCst);
            // A flip between the load and the increment: this read may have missed it, so
            // it registers again in the new epoch (it has not looked at the index yet).
            if self.epoch.load(SeqCst) == e {
                return ReadPin {
                    gate: self.clone(),
                    slot,
                };
            }
            self.readers[slot].fetch_sub(1, SeqCst);
        }
    }

    /// True when no read registered before the last flip is still running.
    pub fn previous_drained(&self) -> bool {
        let e = self.epoch.load(SeqCst);
        self.readers[((e + 1) & 1) as usize].load(SeqCst) == 0
    }

    /// The current epoch (tests watch a drain flip it).
    #[cfg(test)]
    pub fn epoch(&self) -> u64 {
        self.epoch.load(SeqCst)
    }

    /// Starts a new epoch. The caller serialises flips and only flips when
    /// [`ReadGate::previous_drained`] (the previous epoch's counter is reused).
    pub fn flip(&self) {
        self.epoch.fetch_add(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_from_before_the_flip_holds_the_previous_epoch() {
        let g = Arc::new(ReadGate::default());
        let old = g.pin();
        assert!(g.previous_drained());
        g.flip();
        assert!(
            !g.previous_drained(),
            "the read pinned before the flip runs"
        );
        let new = g.pin();
        assert!(!g.previous_drained());
        drop(old);
        assert!(g.previous_drained(), "a read after the flip does not count");
        g.flip();
        assert!(!g.previous_drained());
        drop(new);
        assert!(g.previous_drained());
    }
}
