//! Exclusive locks on ranges of disk blocks, held by a write from planning to commit.

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};

#[derive(Default)]
struct Inner {
    held: Vec<Range<u64>>,
}

/// A set of locked block ranges.
#[derive(Default, Clone)]
pub struct RangeLock {
    inner: Arc<(Mutex<Inner>, Condvar)>,
}

/// Releases its range when dropped.
pub struct RangeGuard {
    lock: RangeLock,
    range: Range<u64>,
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

impl RangeLock {
    /// Locks `range` if no held range overlaps it.
    pub fn try_lock(&self, range: Range<u64>) -> Option<RangeGuard> {
        let mut inner = self.inner.0.lock().unwrap_or_else(|p| p.into_inner());
        if inner.held.iter().any(|h| overlaps(h, &range)) {
            return None;
        }
        inner.held.push(range.clone());
        Some(RangeGuard {
            lock: self.clone(),
            range,
        })
    }

    /// Locks `range`, waiting for overlapping holders to release.
    pub fn lock(&self, range: Range<u64>) -> RangeGuard {
        let (m, cv) = &*self.inner;
        let mut inner = m.lock().unwrap_or_else(|p| p.into_inner());
        while inner.held.iter().any(|h| overlaps(h, &range)) {
            inner = cv.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        inner.held.push(range.clone());
        RangeGuard {
            lock: self.clone(),
            range,
        }
    }

    /// Number of ranges held.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.inner
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .held
            .len()
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let (m, cv) = &*self.lock.inner;
        let mut inner = m.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pos) = inner.held.iter().position(|h| *h == self.range) {
            inner.held.swap_remove(pos);
        }
        cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_ranges_exclude() {
        let l = RangeLock::default();
        let a = l.try_lock(0..4).unwrap();
        assert!(l.try_lock(3..5).is_none());
        let b = l.try_lock(4..8).unwrap();
        assert_eq!(l.held(), 2);
        drop(a);
        assert!(l.try_lock(0..4).is_some());
        drop(b);
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn lock_waits_for_release() {
        let l = RangeLock::default();
        let g = l.lock(10..20);
        let l2 = l.clone();
        let t = std::thread::spawn(move || {
            let _g = l2.lock(15..16);
            1
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!t.is_finished());
        drop(g);
        assert_eq!(t.join().unwrap(), 1);
    }
}
