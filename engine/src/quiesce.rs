//! A gate that lets a controller stop new I/O and wait for in-flight I/O to drain, so that a
//! checkpoint holds exactly the writes acknowledged before it.
//!
//! Workers (NBD connections, and later virtio-blk queues) call [`Gate::try_admit`] before they
//! start a request and [`Gate::release`] when it has completed; NBD connections hold an
//! [`Admission`] from [`Gate::admit`] instead, which releases itself when dropped, so no early
//! return can leak one. A controller calls
//! [`Gate::pause`]: from then on admissions fail, and `pause` returns a [`PauseGuard`] once
//! every admitted request has been released. Dropping the guard reopens the gate and wakes the
//! workers through the eventfds they got from [`Gate::subscribe`]. Nothing here knows about
//! NBD or virtio.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError, Weak};
use std::time::{Duration, Instant};

use crate::sys::{self, EventFd, Flag};
use crate::{Error, Result};

/// How often a controller checks whether another one's pause has ended.
const PAUSER_POLL: Duration = Duration::from_millis(1);

/// Top bit of the state word: a pause is requested. The other bits count admitted requests.
const PAUSED: u64 = 1 << 63;

/// The gate shared by every worker of one disk.
#[derive(Debug, Default)]
pub struct Gate {
    state: AtomicU64,
    /// Wakers of the workers; also the mutex that the drain condition variable waits under.
    wakers: Mutex<Vec<Weak<EventFd>>>,
    drained: Condvar,
    /// Serialises controllers: one pause at a time.
    pauser: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The protected data (a list of wakers, or nothing) stays valid if a holder panicked.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Gate {
    /// An open gate with nothing in flight.
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate::default())
    }

    /// Admits one request unless a pause is in progress. Every `true` must be matched by one
    /// [`Gate::release`] once the request has completed. On `false` the worker keeps the
    /// request, stops taking new ones, and retries when its waker fires.
    pub fn try_admit(&self) -> bool {
        let prev = self.state.fetch_add(1, Ordering::SeqCst);
        if prev & PAUSED != 0 {
            self.release();
            return false;
        }
        true
    }

    /// Admits one request unless a pause is in progress; the admission is released when the
    /// returned guard is dropped.
    pub fn admit(self: &Arc<Gate>) -> Option<Admission> {
        self.try_admit().then(|| Admission { gate: self.clone() })
    }

    /// Marks one admitted request as completed.
    pub fn release(&self) {
        let prev = self.state.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(prev & !PAUSED > 0, "release without admit");
        if prev & PAUSED != 0 && prev & !PAUSED == 1 {
            // Take the lock so a controller between its check and its wait cannot miss this.
            let _guard = lock(&self.wakers);
            self.drained.notify_all();
        }
    }

    /// Admitted requests not yet released.
    pub fn in_flight(&self) -> u64 {
        self.state.load(Ordering::SeqCst) & !PAUSED
    }

    /// True while a controller holds the gate closed.
    pub fn is_paused(&self) -> bool {
        self.state.load(Ordering::SeqCst) & PAUSED != 0
    }

    /// An eventfd that is notified whenever the gate reopens. The worker keeps the `Arc`; the
    /// gate holds only a weak reference.
    pub fn subscribe(&self) -> Result<Arc<EventFd>> {
        let fd = Arc::new(sys::new_eventfd().map_err(|e| Error::io("creating an eventfd", e))?);
        let mut wakers = lock(&self.wakers);
        wakers.retain(|w| w.strong_count() > 0);
        wakers.push(Arc::downgrade(&fd));
        Ok(fd)
    }

    /// Closes the gate and waits up to `timeout` for every admitted request to be released.
    /// On timeout the gate is reopened and [`Error::DrainTimeout`] is returned. The timeout
    /// also bounds the wait for another controller's pause to end (the gate stays as that
    /// one left it): a controller that pauses while holding a lock the other one waits for
    /// (a VM's checkpoint holds the disk; a merge's swap, paused, takes the disk) gets a
    /// timeout instead of a deadlock.
    pub fn pause(&self, timeout: Duration) -> Result<PauseGuard<'_>> {
        let start = Instant::now();
        let serial = loop {
            match self.pauser.try_lock() {
                Ok(g) => break g,
                // The guarded data is nothing: a panicked holder leaves nothing to repair.
                Err(TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    let waited = start.elapsed();
                    if waited >= timeout {
                        return Err(Error::DrainTimeout {
                            waited,
                            in_flight: self.in_flight(),
                        });
                    }
                    std::thread::sleep(PAUSER_POLL.min(timeout - waited));
                }
            }
        };
        self.state.fetch_or(PAUSED, Ordering::SeqCst);
        let mut wakers = lock(&self.wakers);
        loop {
            let in_flight = self.in_flight();
            if in_flight == 0 {
                break;
            }
            let waited = start.elapsed();
            if waited >= timeout {
                drop(wakers);
                self.reopen();
                return Err(Error::DrainTimeout { waited, in_flight });
            }
            wakers = self
                .drained
                .wait_timeout(wakers, timeout - waited)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(wakers);
        Ok(PauseGuard {
            gate: self,
            _serial: serial,
        })
    }

    fn reopen(&self) {
        self.state.fetch_and(!PAUSED, Ordering::SeqCst);
        let mut wakers = lock(&self.wakers);
        wakers.retain(|w| match w.upgrade() {
            Some(fd) => {
                fd.notify();
                true
            }
            None => false,
        });
    }
}

/// One admitted request; dropping it releases the admission.
#[derive(Debug)]
#[must_use = "dropping an admission releases it at once"]
pub struct Admission {
    gate: Arc<Gate>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.gate.release();
    }
}

/// One worker's handle on a gate: admission plus the worker's own waker. It is the
/// [`block::RequestGate`] of a virtio-blk worker, so a VM's disk is quiesced like an NBD
/// connection.
#[derive(Debug)]
pub struct Member {
    gate: Arc<Gate>,
    waker: Arc<EventFd>,
}

impl Member {
    /// Subscribes a new worker to `gate`.
    pub fn new(gate: &Arc<Gate>) -> Result<Member> {
        Ok(Member {
            gate: gate.clone(),
            waker: gate.subscribe()?,
        })
    }
}

impl block::RequestGate for Member {
    fn try_admit(&self) -> bool {
        self.gate.try_admit()
    }

    fn release(&self) {
        self.gate.release()
    }

    fn waker(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&*self.waker)
    }

    fn clear_waker(&self) {
        self.waker.clear()
    }
}

/// Proof that the gate is closed and drained; reopens it when dropped.
#[derive(Debug)]
pub struct PauseGuard<'a> {
    gate: &'a Gate,
    _serial: MutexGuard<'a, ()>,
}

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        self.gate.reopen();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn pause_fails_admissions_and_waits_for_drain() {
        let gate = Gate::new();
        assert!(gate.try_admit());
        assert!(gate.try_admit());
        assert_eq!(gate.in_flight(), 2);
        let done = Arc::new(AtomicBool::new(false));
        let releaser = {
            let (gate, done) = (gate.clone(), done.clone());
            std::thread::spawn(move || {
                // Wait until the controller has closed the gate, then finish both requests.
                while !gate.is_paused() {
                    std::thread::yield_now();
                }
                assert!(!gate.try_admit(), "no admission while paused");
                done.store(true, Ordering::SeqCst);
                gate.release();
                gate.release();
            })
        };
        let guard = gate.pause(Duration::from_secs(30)).unwrap();
        assert!(
            done.load(Ordering::SeqCst),
            "pause returned before the requests finished"
        );
        assert_eq!(gate.in_flight(), 0);
        assert!(!gate.try_admit());
        drop(guard);
        releaser.join().unwrap();
        assert!(!gate.is_paused());
        assert!(gate.try_admit());
        gate.release();
    }

    #[test]
    fn resume_notifies_subscribers() {
        let gate = Gate::new();
        let waker = gate.subscribe().unwrap();
        let dropped = gate.subscribe().unwrap();
        drop(dropped);
        let guard = gate.pause(Duration::from_secs(1)).unwrap();
        assert!(!waker.is_set());
        drop(guard);
        assert!(waker.is_set());
        assert_eq!(lock(&gate.wakers).len(), 1, "dead wakers are pruned");
    }

    #[test]
    fn timeout_reopens_the_gate() {
        let gate = Gate::new();
        assert!(gate.try_admit());
        let err = gate.pause(Duration::from_millis(20)).unwrap_err();
        match err {
            Error::DrainTimeout { in_flight, .. } => assert_eq!(in_flight, 1),
            other => panic!("unexpected {other}"),
        }
        assert!(!gate.is_paused());
        assert!(gate.try_admit());
        gate.release();
        gate.release();
        assert_eq!(gate.in_flight(), 0);
    }

    #[test]
    fn admissions_release_on_drop() {
        let gate = Gate::new();
        let a = gate.admit().unwrap();
        let b = gate.admit().unwrap();
        assert_eq!(gate.in_flight(), 2);
        drop(a);
        assert_eq!(gate.in_flight(), 1);
        let err = gate.pause(Duration::from_millis(1)).unwrap_err();
        assert!(matches!(err, Error::DrainTimeout { in_flight: 1, .. }));
        drop(b);
        let guard = gate.pause(Duration::from_secs(1)).unwrap();
        assert!(gate.admit().is_none(), "no admission while paused");
        assert_eq!(gate.in_flight(), 0);
        drop(guard);
    }

    #[test]
    fn member_is_a_block_request_gate() {
        use block::RequestGate;
        let gate = Gate::new();
        let m = Member::new(&gate).unwrap();
        assert!(m.try_admit());
        assert_eq!(gate.in_flight(), 1);
        m.release();
        let guard = gate.pause(Duration::from_secs(1)).unwrap();
        assert!(!m.try_admit());
        drop(guard);
        assert!(
            crate::sys::wait_readable(m.waker(), None, Some(Duration::ZERO)).unwrap()
                == crate::sys::Readiness::Ready
        );
        m.clear_waker();
        assert!(
            crate::sys::wait_readable(m.waker(), None, Some(Duration::ZERO)).unwrap()
                == crate::sys::Readiness::TimedOut
        );
        assert!(m.try_admit());
        m.release();
    }

    /// A controller that holds a lock another one needs while pausing (a VM checkpoint holds
    /// the disk and pauses; a merge swap pauses and then takes the disk) gets a timeout, not
    /// a deadlock.
    #[test]
    fn waiting_for_another_pause_is_bounded_by_the_timeout() {
        let gate = Gate::new();
        let disk = Arc::new(Mutex::new(()));
        let first = gate.pause(Duration::from_secs(1)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let second = {
            let (gate, disk) = (gate.clone(), disk.clone());
            std::thread::spawn(move || {
                let _disk = disk.lock().unwrap();
                let r = gate.pause(Duration::from_millis(50)).map(drop);
                tx.send(r).unwrap();
            })
        };
        // Bounded here too, so that a pause that waits forever fails the test instead of
        // hanging it.
        let r = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the second pause waited for the first one without a bound");
        match r {
            Err(Error::DrainTimeout { in_flight, .. }) => assert_eq!(in_flight, 0),
            other => panic!("unexpected {other:?}"),
        }
        second.join().unwrap();
        // The first pause is untouched and the "disk" is free again.
        assert!(gate.is_paused());
        drop(disk.lock().unwrap());
        drop(first);
        assert!(!gate.is_paused());
        assert!(gate.try_admit());
        gate.release();
    }

    #[test]
    fn controllers_are_serialised() {
        let gate = Gate::new();
        let g1 = gate.pause(Duration::from_secs(1)).unwrap();
        let second = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let _g = gate.pause(Duration::from_secs(30)).unwrap();
                gate.is_paused()
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        drop(g1);
        assert!(second.join().unwrap());
        assert!(!gate.is_paused());
    }
}
