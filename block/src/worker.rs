//! The device's worker thread: waits on the queue eventfds and the backend's completion
//! eventfd, pops chains in batches, starts them, reaps completions, fills the used ring and
//! notifies the driver once per batch (honouring VRING_AVAIL_F_NO_INTERRUPT, or the used
//! event index with VIRTIO_RING_F_EVENT_IDX).
//! While requests are in flight it polls the completion queue for 20 us before it sleeps.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::request::{self, Limits, Request};
use crate::status;
use crate::virtio::VirtioInterrupt;
use crate::virtio_exec::{Done, GuestExecutor};

const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
const STOP_TOKEN: u64 = u64::MAX;
const BACKEND_TOKEN: u64 = u64::MAX - 1;
const GATE_TOKEN: u64 = u64::MAX - 2;
const SNAPSHOT_TOKEN: u64 = u64::MAX - 3;

/// How long the worker polls for completions before it sleeps in epoll (measured on the 2-core
/// nested host: 20 us beat 0 and 60 us at qd1 and qd32, see docs/DESIGN.md).
const POLL_BEFORE_SLEEP: std::time::Duration = std::time::Duration::from_micros(20);

/// The worker's queues as a checkpoint sees them.
#[derive(Debug, Clone)]
pub(crate) struct WorkerSnapshot {
    /// Each queue, its next available index moved back over chains taken but not started.
    pub queues: Vec<virtio_queue::QueueState>,
    /// Requests started and not yet completed into the used ring.
    pub in_flight: usize,
}

/// The worker's end of the checkpoint channel: a request (a sequence number) arrives on
/// `requests` with `evt` signalled; the answer goes back on `replies` with the same number.
pub(crate) struct SnapshotLink {
    pub evt: EventFd,
    pub requests: mpsc::Receiver<u64>,
    pub replies: mpsc::Sender<(u64, WorkerSnapshot)>,
}

/// What the worker thread owns.
pub(crate) struct Worker {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub queues: Vec<(Queue, EventFd)>,
    pub limits: Limits,
    /// Runs the requests, through the quiesce gate if the device has one.
    pub executor: GuestExecutor,
    pub needs_reset: Arc<AtomicBool>,
    /// Written by `reset`: drain and exit.
    pub stop: EventFd,
    /// Requests for the queue state (VM checkpoints).
    pub snapshot: SnapshotLink,
}

struct QueueState {
    /// The ring is unusable (bad avail index, unreadable): ignored until reset.
    broken: bool,
    /// Chains may be left in the ring because the executor was full.
    backlog: bool,
    /// Used entries were added since the last notification check.
    used_added: bool,
}

impl Worker {
    /// Runs until `stop` is signalled; then drains in-flight requests and returns.
    pub fn run(mut self) {
        if let Err(e) = self.event_loop() {
            tracing::error!(error = %e, "virtio-blk worker failed");
            self.set_needs_reset();
        }
        let mut done = Vec::new();
        self.executor.drain(&self.mem, &mut done);
        let mut states = self.fresh_states();
        // The driver is resetting the device: complete the ring silently.
        self.push_used(&mut states, &mut done, false);
    }

    fn fresh_states(&self) -> Vec<QueueState> {
        self.queues
            .iter()
            .map(|_| QueueState {
                broken: false,
                backlog: false,
                used_added: false,
            })
            .collect()
    }

    fn event_loop(&mut self) -> Result<(), crate::Error> {
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(self.stop.as_raw_fd(), STOP_TOKEN)?;
        add(self.executor.eventfd(), BACKEND_TOKEN)?;
        for (i, (_, evt)) in self.queues.iter().enumerate() {
            add(evt.as_raw_fd(), i as u64)?;
        }
        if let Some(waker) = self.executor.gate_waker() {
            add(waker, GATE_TOKEN)?;
        }
        add(self.snapshot.evt.as_raw_fd(), SNAPSHOT_TOKEN)?;
        let mut states = self.fresh_states();
        let mut pending: VecDeque<(u16, Request)> = VecDeque::new();
        let mut done: Vec<Done> = Vec::new();
        let mut events = vec![EpollEvent::default(); self.queues.len() + 4];
        let mut snapshot_asked = false;
        // Chains may have been made available before activation.
        let mut kicked = vec![true; self.queues.len()];
        loop {
            self.reap(&mut done);
            self.start_pending(&mut pending, &mut done);
            for q in 0..self.queues.len() {
                if states[q].broken {
                    kicked[q] = false;
                } else if (kicked[q] || states[q].backlog) && pending.is_empty() {
                    // (A kick that arrives while requests wait for room stays recorded.)
                    kicked[q] = false;
                    self.process_queue(q, &mut states[q], &mut pending, &mut done);
                }
            }
            self.reap(&mut done);
            self.push_used(&mut states, &mut done, true);
            if std::mem::take(&mut snapshot_asked) {
                // Every completion reaped so far is in the used ring: answer now.
                self.answer_snapshots(&pending);
            }

            // Requests in flight: look at the completion queue for a short while before
            // sleeping, so a completion that is about to arrive costs no eventfd wake-up. The
            // epoll below still runs (without blocking when this found work), so a stop or a
            // checkpoint request is never starved by a busy device.
            let got = self.poll_completions(&mut done);
            let n = match epoll.wait(if got { 0 } else { -1 }, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            for ev in &events[..n] {
                match ev.data() {
                    STOP_TOKEN => {
                        // Completions the poll above reaped (status written) still go to
                        // the used ring: a request never finishes without its used entry.
                        self.push_used(&mut states, &mut done, false);
                        return Ok(());
                    }
                    BACKEND_TOKEN => clear_eventfd(self.executor.eventfd()),
                    GATE_TOKEN => self.executor.gate_woken(),
                    SNAPSHOT_TOKEN => {
                        let _ = self.snapshot.evt.read();
                        snapshot_asked = true;
                    }
                    q => {
                        if let Some((_, evt)) = self.queues.get(q as usize) {
                            let _ = evt.read();
                            kicked[q as usize] = true;
                        }
                    }
                }
            }
        }
    }

    /// Spins on the backend's completion queue for up to [`POLL_BEFORE_SLEEP`] while requests
    /// are in flight; true when completions were reaped.
    fn poll_completions(&mut self, done: &mut Vec<Done>) -> bool {
        if self.executor.in_flight() == 0 || !done.is_empty() {
            return !done.is_empty();
        }
        let deadline = std::time::Instant::now() + POLL_BEFORE_SLEEP;
        loop {
            self.reap(done);
            if !done.is_empty() {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Answers every pending checkpoint request with the queues' state. A chain in `pending`
    /// was taken from its ring but not started: the state shows it as still available.
    fn answer_snapshots(&self, pending: &VecDeque<(u16, Request)>) {
        let queues: Vec<virtio_queue::QueueState> = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, (q, _))| {
                let mut st = q.state();
                let taken = pending
                    .iter()
                    .filter(|(pq, _)| usize::from(*pq) == i)
                    .count();
                st.next_avail = st.next_avail.wrapping_sub(taken as u16);
                st
            })
            .collect();
        let snap = WorkerSnapshot {
            queues,
            in_flight: self.executor.in_flight(),
        };
        while let Ok(seq) = self.snapshot.requests.try_recv() {
            // The device may have given up waiting; a closed channel is fine.
            let _ = self.snapshot.replies.send((seq, snap.clone()));
        }
    }

    fn reap(&mut self, done: &mut Vec<Done>) {
        if let Err(e) = self.executor.reap(&self.mem, done) {
            tracing::error!(error = %e, "reaping block completions failed");
        }
    }

    fn start_pending(&mut self, pending: &mut VecDeque<(u16, Request)>, done: &mut Vec<Done>) {
        while let Some((q, req)) = pending.pop_front() {
            if let Err(req) = self.executor.try_start(&self.mem, q, req, done) {
                pending.push_front((q, req));
                return;
            }
        }
    }

    /// Pops and starts every available chain of queue `q` until the ring is empty (with
    /// notifications re-enabled) or the executor is full.
    fn process_queue(
        &mut self,
        q: usize,
        state: &mut QueueState,
        pending: &mut VecDeque<(u16, Request)>,
        done: &mut Vec<Done>,
    ) {
        let qi = q as u16;
        state.backlog = false;
        // `queue.iter()` reads the avail index once; the driver may publish more chains
        // between that read and `enable_notification`, which then reports new work although
        // this pass popped nothing. That is a normal race: retry. Only an index that keeps
        // moving without any chain ever becoming readable means a broken ring.
        let mut empty_passes = 0u32;
        loop {
            let queue = &mut self.queues[q].0;
            if let Err(e) = queue.disable_notification(&self.mem) {
                tracing::error!(error = %e, "cannot disable queue notifications");
                state.broken = true;
                break;
            }
            let mut popped = 0usize;
            let iter = match queue.iter(&self.mem) {
                Ok(iter) => iter,
                Err(e) => {
                    tracing::error!(error = %e, queue = q, "virtqueue is broken");
                    state.broken = true;
                    break;
                }
            };
            for chain in iter {
                popped += 1;
                match request::parse(chain, &self.mem, &self.limits) {
                    Ok(req) if !pending.is_empty() => {
                        pending.push_back((qi, req));
                        break;
                    }
                    Ok(req) => {
                        if let Err(req) = self.executor.try_start(&self.mem, qi, req, done) {
                            pending.push_back((qi, req));
                            break;
                        }
                    }
                    Err(rej) => {
                        tracing::debug!(error = %rej.error, head = rej.head, "refused a request");
                        match rej.status {
                            Some(addr) => {
                                let st = status::for_request_error(&rej.error);
                                self.executor
                                    .reject(&self.mem, qi, rej.head, addr, st, done);
                            }
                            None => {
                                // No status byte to report through: return the buffer (so
                                // the ring keeps moving) and ask the driver for a reset.
                                done.push(Done {
                                    queue: qi,
                                    head: rej.head,
                                    used_len: 0,
                                });
                                flag_reset(&self.needs_reset, self.interrupt.as_ref());
                            }
                        }
                    }
                }
            }
            if !pending.is_empty() {
                state.backlog = true;
                break;
            }
            if self.executor.in_flight() > 0 {
                // Requests are in flight, so a completion will wake this loop soon and it looks
                // at the ring again then: leave driver notifications off meanwhile. Each
                // notification is a VM exit (31-66 us on nested KVM), so a busy device takes
                // none at all.
                state.backlog = true;
                break;
            }
            let queue = &mut self.queues[q].0;
            match queue.enable_notification(&self.mem) {
                Ok(false) => break,
                Ok(true) if popped == 0 => {
                    empty_passes += 1;
                    if empty_passes > 1024 {
                        tracing::error!(queue = q, "available ring cannot be read");
                        state.broken = true;
                        break;
                    }
                    std::thread::yield_now();
                }
                Ok(true) => empty_passes = 0,
                Err(e) => {
                    tracing::error!(error = %e, "cannot enable queue notifications");
                    state.broken = true;
                    break;
                }
            }
        }
        if state.broken {
            self.needs_reset_now();
        }
    }

    /// Adds finished requests to their used rings, then (with `notify`) notifies each queue
    /// at most once.
    fn push_used(&mut self, states: &mut [QueueState], done: &mut Vec<Done>, notify: bool) {
        for d in done.drain(..) {
            let Some((queue, _)) = self.queues.get_mut(usize::from(d.queue)) else {
                continue;
            };
            match queue.add_used(&self.mem, d.head, d.used_len) {
                Ok(()) => states[usize::from(d.queue)].used_added = true,
                Err(virtio_queue::Error::InvalidDescriptorIndex) => {
                    // The driver made a head index past the queue available: there is no way
                    // to return it (NEEDS_RESET is already set), but the ring itself is fine.
                    tracing::debug!(head = d.head, "cannot return an invalid head index");
                }
                Err(e) => {
                    tracing::error!(error = %e, head = d.head, "cannot add to the used ring");
                    states[usize::from(d.queue)].broken = true;
                    self.needs_reset_now();
                }
            }
        }
        for (q, state) in states.iter_mut().enumerate() {
            if !std::mem::take(&mut state.used_added) || !notify {
                continue;
            }
            if self.should_notify(q) {
                if let Err(e) = self.interrupt.signal_used_queue(q as u16) {
                    tracing::error!(error = %e, "cannot signal the used queue");
                }
            }
        }
    }

    fn should_notify(&mut self, q: usize) -> bool {
        let queue = &mut self.queues[q].0;
        if queue.event_idx_enabled() {
            return queue.needs_notification(&self.mem).unwrap_or(true);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        let flags: u16 = self
            .mem
            .load(GuestAddress(queue.avail_ring()), Ordering::Acquire)
            .map(u16::from_le)
            .unwrap_or(0);
        flags & VRING_AVAIL_F_NO_INTERRUPT == 0
    }

    fn needs_reset_now(&self) {
        flag_reset(&self.needs_reset, self.interrupt.as_ref());
    }

    fn set_needs_reset(&self) {
        self.needs_reset_now();
    }
}

/// Sets DEVICE_NEEDS_RESET (once) and tells the driver through a config-change interrupt.
fn flag_reset(needs_reset: &AtomicBool, interrupt: &dyn VirtioInterrupt) {
    if !needs_reset.swap(true, Ordering::SeqCst) {
        if let Err(e) = interrupt.signal_config_change() {
            tracing::error!(error = %e, "cannot signal a configuration change");
        }
    }
}

fn clear_eventfd(fd: RawFd) {
    let mut v = 0u64;
    // SAFETY: `fd` is the backend's eventfd, open for the executor's lifetime; we read at
    // most 8 bytes into a local u64. epoll reported it readable, so the read does not block
    // (and a failed read only means there was nothing to clear).
    let _ = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), std::mem::size_of::<u64>()) };
}
