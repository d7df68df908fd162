//! Payload memory a front end holds: data buffers of requests in flight (write data, read
//! data not yet delivered) bounded per front end (one virtio-blk device, one NBD connection)
//! and, optionally, across all front ends that share a [`MemoryBudget`] (every connection of
//! one NBD server). A front end that cannot get budget stops taking requests; when it failed
//! on the shared budget it is woken through its [`Budget::waker`] once another gives back.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The budget shared by several front ends.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    used: AtomicU64,
    /// Front ends waiting for budget to come back.
    starved: AtomicUsize,
    wakers: Mutex<Vec<Weak<EventFd>>>,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit: limit as u64,
            used: AtomicU64::new(0),
            starved: AtomicUsize::new(0),
            wakers: Mutex::new(Vec::new()),
        })
    }

    /// Bytes held by all front ends now.
    pub fn used(&self) -> usize {
        usize::try_from(self.used.load(Ordering::SeqCst)).unwrap_or(usize::MAX)
    }

    fn try_take(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                u.checked_add(n).filter(|&t| t <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::SeqCst);
        if n > 0 && self.starved.load(Ordering::SeqCst) > 0 {
            let mut wakers = self.wakers.lock().unwrap_or_else(PoisonError::into_inner);
            wakers.retain(|w| match w.upgrade() {
                Some(fd) => {
                    notify(&fd);
                    true
                }
                None => false,
            });
        }
    }
}

/// One front end's share: what it holds, against its own limit and the shared one.
#[derive(Debug)]
pub struct Budget {
    global: Option<Arc<MemoryBudget>>,
    limit: u64,
    held: u64,
    starved: bool,
    waker: Arc<EventFd>,
}

impl Budget {
    /// A front end allowed `limit` bytes of its own, not shared with anyone.
    pub fn local(limit: u64) -> std::io::Result<Budget> {
        Ok(Budget {
            global: None,
            limit,
            held: 0,
            starved: false,
            waker: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    /// A front end allowed `limit` bytes of `global`; [`Budget::waker`] fires when budget it
    /// waited for may be back.
    pub fn shared(global: &Arc<MemoryBudget>, limit: usize) -> std::io::Result<Budget> {
        let mut b = Budget::local(limit as u64)?;
        let mut wakers = global.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        wakers.retain(|w| w.strong_count() > 0);
        wakers.push(Arc::downgrade(&b.waker));
        drop(wakers);
        b.global = Some(global.clone());
        Ok(b)
    }

    /// Bytes this front end holds.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Readable when shared budget this front end waited for may be back.
    pub fn waker(&self) -> RawFd {
        self.waker.as_raw_fd()
    }

    /// Clears the waker after it fired.
    pub fn clear_waker(&self) {
        // Nothing to clear is fine (EAGAIN).
        let _ = self.waker.read();
    }

    /// Takes `n` bytes if both budgets allow it. A front end holding nothing may take one
    /// request larger than its own limit (the shared limit still applies).
    pub fn try_reserve(&mut self, n: u64) -> bool {
        if n == 0 {
            return true;
        }
        let own_ok = self.held == 0 || self.held.checked_add(n).is_some_and(|t| t <= self.limit);
        if !own_ok {
            return false;
        }
        if let Some(global) = &self.global {
            if !global.try_take(n) {
                if !self.starved {
                    self.starved = true;
                    global.starved.fetch_add(1, Ordering::SeqCst);
                }
                // Budget given back between the check and the registration is not missed:
                // the giver sees `starved` and wakes us, or the retry below succeeds.
                if !global.try_take(n) {
                    return false;
                }
            }
        }
        self.end_starving();
        self.held += n;
        true
    }

    /// True when the last reservation failed on the shared budget, not this front end's.
    pub fn starved(&self) -> bool {
        self.starved
    }

    fn end_starving(&mut self) {
        if self.starved {
            self.starved = false;
            if let Some(g) = &self.global {
                g.starved.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Gives back `n` held bytes.
    pub fn release(&mut self, n: u64) {
        let n = n.min(self.held);
        self.held -= n;
        if let Some(g) = &self.global {
            g.give(n);
        }
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        self.end_starving();
        let n = self.held;
        self.release(n);
    }
}

fn notify(fd: &EventFd) {
    // A saturated counter (EAGAIN) leaves the fd readable, which is all a waker needs.
    let _ = fd.write(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_set(b: &Budget) -> bool {
        // Reading clears it; put it back when it was set.
        let set = b.waker.read().is_ok();
        if set {
            notify(&b.waker);
        }
        set
    }

    #[test]
    fn own_and_global_limits() {
        let global = MemoryBudget::new(100);
        let mut a = Budget::shared(&global, 60).unwrap();
        let mut b = Budget::shared(&global, 60).unwrap();
        assert!(
            a.try_reserve(80),
            "one request beyond the own limit when nothing is held"
        );
        assert!(!a.try_reserve(1), "then nothing more");
        assert!(!b.try_reserve(30), "the server's budget is short");
        assert!(b.starved());
        assert!(!is_set(&b));
        a.release(50);
        assert!(is_set(&b), "a starved front end is woken");
        assert!(b.try_reserve(30));
        assert!(!b.starved());
        assert_eq!(global.used(), 60);
        drop(a);
        assert_eq!(
            global.used(),
            30,
            "a dropped front end gives everything back"
        );
        drop(b);
        assert_eq!(global.used(), 0);
    }

    #[test]
    fn a_local_budget_bounds_only_itself() {
        let mut a = Budget::local(10).unwrap();
        assert!(a.try_reserve(0), "nothing always fits");
        assert!(a.try_reserve(64), "one oversized request when idle");
        assert!(!a.try_reserve(1));
        a.release(64);
        assert!(a.try_reserve(6));
        assert!(a.try_reserve(4));
        assert!(!a.try_reserve(1));
        assert!(!a.starved(), "a local budget never starves on a shared one");
        a.release(1000);
        assert_eq!(a.held(), 0, "over-release is clamped");
    }
}
