//! Pausing a running VM: every vCPU thread is kicked out of KVM_RUN and parks on a condition
//! variable (no busy loop) until it is resumed or the VM stops. A parked vCPU serves commands
//! on its own thread (state capture).
//!
//! The kick is the vCPU signal (see [`crate::vcpu::kick_signal`]); its handler sets the
//! thread's `kvm_run.immediate_exit`, so a kick that lands just before the thread enters
//! KVM_RUN still makes KVM_RUN return at once: one kick per vCPU is enough.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::snapshot::VcpuState;
use crate::{Error, Result};

/// Something a parked vCPU does on its own thread.
pub(crate) enum Command {
    /// Read the vCPU's state and send it back.
    Capture(mpsc::Sender<Result<VcpuState>>),
}

#[derive(Default)]
struct Slot {
    /// The thread, once it runs (for the kick).
    tid: Option<libc::pthread_t>,
    live: bool,
    parked: bool,
    parked_at: Option<Instant>,
    resumed_at: Option<Instant>,
    command: Option<Command>,
}

#[derive(Default)]
struct State {
    pause: bool,
    stopping: bool,
    slots: Vec<Slot>,
}

/// What [`crate::VmController::pause`] measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PauseStats {
    /// When the pause was requested.
    pub requested: Instant,
    /// When the last vCPU parked (the guest is fully stopped from here).
    pub stopped: Instant,
    /// vCPUs parked.
    pub vcpus: usize,
}

/// The pause/park rendezvous shared by the controller and the vCPU threads.
#[derive(Default)]
pub(crate) struct Control {
    /// Mirrors `State::pause` for the vCPU loop's lock-free check.
    pause_flag: AtomicBool,
    state: Mutex<State>,
    cond: Condvar,
}

/// How long a capture waits for a parked vCPU to answer.
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(10);

impl Control {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain flags; a panicking holder leaves it usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>, timeout: Duration) -> MutexGuard<'a, State> {
        self.cond
            .wait_timeout(g, timeout)
            .unwrap_or_else(|p| p.into_inner())
            .0
    }

    /// Marks `n` vCPU threads as about to start (before they are spawned).
    pub fn start(&self, n: usize) {
        let mut g = self.lock();
        g.slots = (0..n)
            .map(|_| Slot {
                live: true,
                ..Slot::default()
            })
            .collect();
    }

    /// Ends every park: the VM is stopping.
    pub fn stop(&self) {
        let mut g = self.lock();
        g.stopping = true;
        self.cond.notify_all();
    }

    // ---- vCPU side ----

    /// Records the calling thread as vCPU `id`'s (so it can be kicked).
    pub fn register(&self, id: usize) {
        let mut g = self.lock();
        if let Some(s) = g.slots.get_mut(id) {
            // SAFETY: pthread_self has no preconditions and returns the calling thread's id.
            s.tid = Some(unsafe { libc::pthread_self() });
        }
    }

    /// vCPU `id`'s thread is ending.
    pub fn unregister(&self, id: usize) {
        let mut g = self.lock();
        if let Some(s) = g.slots.get_mut(id) {
            s.live = false;
            s.parked = false;
            s.tid = None;
            s.command = None;
        }
        self.cond.notify_all();
    }

    /// True when the vCPU loop should park.
    pub fn pause_requested(&self) -> bool {
        self.pause_flag.load(Ordering::Acquire)
    }

    /// Parks vCPU `id` until resumed (true) or the VM stops (false), serving commands meanwhile.
    pub fn park(&self, id: usize, mut serve: impl FnMut(Command)) -> bool {
        let mut g = self.lock();
        let Some(s) = g.slots.get_mut(id) else {
            // Not a started vCPU (cannot happen through `Vm::run`): wait out the pause anyway.
            while g.pause && !g.stopping {
                g = self.cond.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            return !g.stopping;
        };
        s.parked = true;
        s.parked_at = Some(Instant::now());
        self.cond.notify_all();
        loop {
            if g.stopping {
                g.slots[id].parked = false;
                return false;
            }
            if !g.pause {
                let s = &mut g.slots[id];
                s.parked = false;
                s.resumed_at = Some(Instant::now());
                self.cond.notify_all();
                return true;
            }
            if let Some(cmd) = g.slots[id].command.take() {
                drop(g);
                serve(cmd);
                g = self.lock();
                continue;
            }
            g = self.cond.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    // ---- controller side ----

    /// Requests a pause, kicks every vCPU, and waits up to `timeout` for all to park. On
    /// timeout the pause is withdrawn and the VM keeps running.
    pub fn pause(&self, timeout: Duration, kick: libc::c_int) -> Result<PauseStats> {
        let requested = Instant::now();
        let mut g = self.lock();
        if g.pause {
            return Err(Error::AlreadyPaused);
        }
        if g.stopping || !g.slots.iter().any(|s| s.live) {
            return Err(Error::NotRunning);
        }
        g.pause = true;
        self.pause_flag.store(true, Ordering::Release);
        for s in g.slots.iter().filter(|s| s.live) {
            if let Some(tid) = s.tid {
                // SAFETY: `tid` belongs to a vCPU thread that is still live: it clears its
                // slot under this lock before it exits, and it is joined only after that, so
                // the id is valid. The signal has a handler (installed with the VM).
                let rc = unsafe { libc::pthread_kill(tid, kick) };
                if rc != 0 {
                    tracing::debug!("kicking a vCPU thread failed: {rc}");
                }
            }
        }
        let deadline = requested + timeout;
        loop {
            let live = g.slots.iter().filter(|s| s.live).count();
            let all_parked = g.slots.iter().all(|s| !s.live || s.parked);
            if live == 0 || g.stopping {
                Self::withdraw(&mut g, &self.pause_flag);
                self.cond.notify_all();
                return Err(Error::NotRunning);
            }
            if all_parked {
                let stopped = g
                    .slots
                    .iter()
                    .filter_map(|s| s.parked_at)
                    .max()
                    .unwrap_or(requested);
                return Ok(PauseStats {
                    requested,
                    stopped,
                    vcpus: live,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                let cpu = g
                    .slots
                    .iter()
                    .position(|s| s.live && !s.parked)
                    .unwrap_or(0);
                Self::withdraw(&mut g, &self.pause_flag);
                self.cond.notify_all();
                return Err(Error::PauseTimeout {
                    cpu,
                    waited: now - requested,
                });
            }
            g = self.wait(g, deadline - now);
        }
    }

    fn withdraw(g: &mut State, flag: &AtomicBool) {
        g.pause = false;
        flag.store(false, Ordering::Release);
    }

    /// True while paused with every vCPU thread live and parked.
    fn all_parked(g: &State) -> bool {
        g.pause && !g.stopping && !g.slots.is_empty() && g.slots.iter().all(|s| s.live && s.parked)
    }

    /// Captures every vCPU's state on its own (parked) thread, in vCPU order.
    pub fn capture(&self) -> Result<Vec<VcpuState>> {
        let mut g = self.lock();
        if !g.pause {
            return Err(Error::NotPaused);
        }
        if !Self::all_parked(&g) {
            return Err(Error::NotRunning);
        }
        let mut replies = Vec::with_capacity(g.slots.len());
        for s in &mut g.slots {
            let (tx, rx) = mpsc::channel();
            s.command = Some(Command::Capture(tx));
            replies.push(rx);
        }
        self.cond.notify_all();
        drop(g);
        let mut out = Vec::with_capacity(replies.len());
        for (cpu, rx) in replies.into_iter().enumerate() {
            match rx.recv_timeout(CAPTURE_TIMEOUT) {
                Ok(r) => out.push(r.map_err(|e| Error::Capture(format!("vCPU {cpu}: {e}")))?),
                Err(_) => {
                    return Err(Error::Capture(format!(
                        "vCPU {cpu} did not report its state"
                    )))
                }
            }
        }
        Ok(out)
    }

    /// Lets every parked vCPU run again; returns when all have left their park, with the
    /// instant the first one did.
    pub fn resume(&self, timeout: Duration) -> Result<Instant> {
        let mut g = self.lock();
        if !g.pause {
            return Err(Error::NotPaused);
        }
        for s in &mut g.slots {
            s.resumed_at = None;
        }
        Self::withdraw(&mut g, &self.pause_flag);
        self.cond.notify_all();
        let deadline = Instant::now() + timeout;
        loop {
            if g.slots.iter().all(|s| !s.live || !s.parked) {
                return Ok(g
                    .slots
                    .iter()
                    .filter_map(|s| s.resumed_at)
                    .min()
                    .unwrap_or_else(Instant::now));
            }
            let now = Instant::now();
            if now >= deadline {
                let cpu = g.slots.iter().position(|s| s.live && s.parked).unwrap_or(0);
                return Err(Error::VcpuFault {
                    cpu,
                    what: "did not resume".into(),
                });
            }
            g = self.wait(g, deadline - now);
        }
    }

    /// True while a pause is in force.
    pub fn is_paused(&self) -> bool {
        self.lock().pause
    }
}
