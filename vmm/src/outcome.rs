//! How a VM run ends: the first reason reported by any vCPU or device wins.

use std::sync::{Condvar, Mutex};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The test guest wrote its exit status to the exit port.
    ExitPort(u32),
    /// The guest asked for a reset through the i8042 (Linux `reboot=k`, or a reboot/poweroff
    /// request that ends up there).
    Reset,
    /// A vCPU stopped in a way the guest did not ask for (triple fault, KVM internal error,
    /// failed entry, an ioctl error...). The text says what, with registers and code bytes.
    Fault { cpu: usize, what: String },
    /// The VMM was asked to stop (e.g. SIGINT/SIGTERM caught by the CLI).
    Stopped { signal: i32 },
}

/// A one-shot latch holding the first [`Outcome`].
#[derive(Debug, Default)]
pub struct ExitLatch {
    outcome: Mutex<Option<Outcome>>,
    cond: Condvar,
}

impl ExitLatch {
    /// Creates an unset latch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `outcome` unless an earlier one is already recorded.
    pub fn set(&self, outcome: Outcome) {
        let mut guard = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(outcome);
            self.cond.notify_all();
        }
    }

    /// The recorded outcome, if any.
    pub fn get(&self) -> Option<Outcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// True once an outcome is recorded.
    pub fn is_set(&self) -> bool {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Blocks until an outcome is recorded, or `timeout` passes (then returns `None`).
    pub fn wait(&self, timeout: Option<std::time::Duration>) -> Option<Outcome> {
        let mut guard = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if let Some(o) = guard.as_ref() {
                return Some(o.clone());
            }
            match deadline {
                None => guard = self.cond.wait(guard).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return None;
                    }
                    guard = self
                        .cond
                        .wait_timeout(guard, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn first_outcome_wins() {
        let latch = ExitLatch::new();
        assert_eq!(latch.wait(Some(Duration::from_millis(1))), None);
        latch.set(Outcome::ExitPort(3));
        latch.set(Outcome::Reset);
        assert_eq!(latch.get(), Some(Outcome::ExitPort(3)));
    }

    #[test]
    fn wait_wakes_on_set_from_another_thread() {
        let latch = Arc::new(ExitLatch::new());
        let l2 = Arc::clone(&latch);
        let t = std::thread::spawn(move || l2.set(Outcome::Reset));
        assert_eq!(latch.wait(None), Some(Outcome::Reset));
        t.join().unwrap();
    }
}
