//! Payload memory of NBD connections: each connection may hold at most its own budget of
//! request and reply data, and all connections together at most the server's budget. A
//! connection that cannot get budget stops reading requests; it is woken through its
//! eventfd when another connection gives budget back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use crate::sys::EventFd;
use crate::{Error, Result};

/// The budget shared by every connection of one server.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
    /// Connections waiting for budget to come back.
    starved: AtomicUsize,
    wakers: Mutex<Vec<Weak<EventFd>>>,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit,
            used: AtomicUsize::new(0),
            starved: AtomicUsize::new(0),
            wakers: Mutex::new(Vec::new()),
        })
    }

    /// Bytes held by all connections now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                u.checked_add(n).filter(|&t| t <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::SeqCst);
        if n > 0 && self.starved.load(Ordering::SeqCst) > 0 {
            let mut wakers = self.wakers.lock().unwrap_or_else(PoisonError::into_inner);
            wakers.retain(|w| match w.upgrade() {
                Some(fd) => {
                    fd.notify();
                    true
                }
                None => false,
            });
        }
    }
}

/// One connection's share: what it holds, against its own limit and the server's.
#[derive(Debug)]
pub struct ClientBudget {
    global: Arc<MemoryBudget>,
    limit: usize,
    held: usize,
    starved: bool,
    waker: Arc<EventFd>,
}

impl ClientBudget {
    /// A connection allowed `limit` bytes of `global`; `waker()` fires when budget it waited
    /// for may be back.
    pub fn new(global: &Arc<MemoryBudget>, limit: usize) -> Result<ClientBudget> {
        let waker = Arc::new(EventFd::new().map_err(|e| Error::io("creating an eventfd", e))?);
        let mut wakers = global.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        wakers.retain(|w| w.strong_count() > 0);
        wakers.push(Arc::downgrade(&waker));
        drop(wakers);
        Ok(ClientBudget {
            global: global.clone(),
            limit,
            held: 0,
            starved: false,
            waker,
        })
    }

    /// Bytes this connection holds.
    pub fn held(&self) -> usize {
        self.held
    }

    pub fn waker(&self) -> &EventFd {
        &self.waker
    }

    /// Takes `n` bytes if both budgets allow it. A connection holding nothing may take one
    /// request larger than its own limit (the server's limit still applies).
    pub fn try_reserve(&mut self, n: usize) -> bool {
        let own_ok = self.held == 0 || self.held.checked_add(n).is_some_and(|t| t <= self.limit);
        if !own_ok {
            return false;
        }
        if !self.global.try_take(n) {
            if !self.starved {
                self.starved = true;
                self.global.starved.fetch_add(1, Ordering::SeqCst);
            }
            // Budget given back between the check and the registration is not missed: the
            // giver sees `starved` and wakes us, or the retry below succeeds.
            if !self.global.try_take(n) {
                return false;
            }
        }
        self.end_starving();
        self.held += n;
        true
    }

    /// True when the last reservation failed on the server's budget, not this connection's.
    pub fn starved(&self) -> bool {
        self.starved
    }

    fn end_starving(&mut self) {
        if self.starved {
            self.starved = false;
            self.global.starved.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Gives back `n` held bytes.
    pub fn release(&mut self, n: usize) {
        let n = n.min(self.held);
        self.held -= n;
        self.global.give(n);
    }
}

impl Drop for ClientBudget {
    fn drop(&mut self) {
        self.end_starving();
        let n = self.held;
        self.release(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_and_global_limits() {
        let global = MemoryBudget::new(100);
        let mut a = ClientBudget::new(&global, 60).unwrap();
        let mut b = ClientBudget::new(&global, 60).unwrap();
        assert!(
            a.try_reserve(80),
            "one request beyond the own limit when nothing is held"
        );
        assert!(!a.try_reserve(1), "then nothing more");
        assert!(!b.try_reserve(30), "the server's budget is short");
        assert!(b.starved());
        assert!(!b.waker().is_set());
        a.release(50);
        assert!(b.waker().is_set(), "a starved connection is woken");
        assert!(b.try_reserve(30));
        assert!(!b.starved());
        assert_eq!(global.used(), 60);
        drop(a);
        assert_eq!(
            global.used(),
            30,
            "a dropped connection gives everything back"
        );
        drop(b);
        assert_eq!(global.used(), 0);
    }
}
