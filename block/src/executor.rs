//! The one request executor of every front end (virtio-blk queues, NBD connections): it
//! admits front-end-neutral requests ([`Op`]) through the quiesce gate and a bounded buffer
//! [`Budget`], runs them as journal requests on a [`Backend`] (io_uring through
//! [`journal::IoEngine`] by default), and hands each one back exactly once as a [`Done`]
//! carrying the front end's context.
//!
//! # Admission
//! [`Executor::admit`] checks, in order: room for the request's journal parts (at most
//! `depth` in flight; one request always fits when nothing is in flight), the buffer budget
//! for what the executor must allocate (read data), and the gate. It returns a [`Ticket`]
//! or says what to wait for ([`Wait`]): a completion, the budget's waker, or the gate's
//! waker. A front end that holds payload memory itself (an NBD write's data, received
//! before the request can start) reserves it with [`Executor::reserve`] and hands it to the
//! request with [`Ticket::carry`].
//!
//! # Ownership
//! A started request owns its gate admission and its budget until it is done. Its
//! completion releases both, except that read data stays charged to the budget until the
//! front end gives it back ([`Done::held`], [`Executor::release`]); a cancelled request's
//! completion releases everything and is not delivered. The backend is dropped first (it
//! waits for the kernel), then the slots: no admission is released while the kernel may
//! still write into a buffer of its request.
//!
//! # Durability
//! FLUSH is just another request: it goes to the backend like a read or a write and its
//! completion comes back from there (today the journal engine runs it when submitted; when
//! the engine issues it on io_uring nothing here changes). Writes and write-zeroes carry
//! FUA down to the journal; a discard with FUA is followed by a FLUSH before it completes.

use std::os::fd::RawFd;
use std::sync::Arc;

use journal::{AlignedBuf, Completion};

use crate::backend::Backend;
use crate::budget::Budget;
use crate::gate::RequestGate;

/// A front-end-neutral block request. Offsets and lengths are bytes; the journal checks
/// alignment and range.
#[derive(Debug)]
pub enum Op {
    /// Read `len` bytes at `offset`; the data comes back in [`Done::result`].
    Read { offset: u64, len: u64 },
    /// Write `buf` at `offset`; with `fua`, durable before it completes.
    Write {
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    },
    /// Make every write completed before this request was started durable.
    Flush,
    /// Make `(offset, len)` ranges read as zeros, releasing their space; with `fua`,
    /// durable before it completes.
    Discard { ranges: Vec<(u64, u64)>, fua: bool },
    /// Make `(offset, len)` ranges read as zeros; with `fua`, durable before it completes.
    WriteZeroes { ranges: Vec<(u64, u64)>, fua: bool },
}

impl Op {
    /// Journal requests this request becomes (0 for range lists with nothing in them).
    pub fn parts(&self) -> usize {
        match self {
            Op::Discard { ranges, .. } | Op::WriteZeroes { ranges, .. } => {
                ranges.iter().filter(|r| r.1 > 0).count()
            }
            _ => 1,
        }
    }

    /// Buffer bytes the executor allocates for it (read data).
    pub fn alloc_bytes(&self) -> u64 {
        match self {
            Op::Read { len, .. } => *len,
            _ => 0,
        }
    }
}

/// Why a request cannot start now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// No room (depth or budget): retry after a completion, or after [`Executor::budget_waker`]
    /// fires when [`Executor::starved`].
    Full,
    /// The gate is closed: retry after [`Executor::gate_waker`] fires and
    /// [`Executor::gate_woken`] was called.
    Paused,
}

/// Releases one gate admission when dropped.
struct Admit(Arc<dyn RequestGate>);

impl Drop for Admit {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Permission to start one request: room, budget and (with a gate) an admission. Give it to
/// [`Executor::start`], or back with [`Executor::abandon`].
#[must_use = "a ticket holds budget: start it or abandon it"]
pub struct Ticket {
    held: u64,
    admit: Option<Admit>,
}

impl Ticket {
    /// Adds `n` bytes the front end reserved itself (with [`Executor::reserve`]) to what the
    /// request holds; they are released with it.
    pub fn carry(&mut self, n: u64) {
        self.held += n;
    }
}

/// A finished request.
#[derive(Debug)]
pub struct Done<C> {
    pub ctx: C,
    /// `Ok(Some(data))` for reads (exactly the length asked for), `Ok(None)` otherwise; the
    /// first failure of any of its parts.
    pub result: journal::Result<Option<AlignedBuf>>,
    /// Budget bytes still charged for the read data: give them back with
    /// [`Executor::release`] once the data is delivered. 0 for everything else.
    pub held: u64,
}

struct Slot<C> {
    ctx: C,
    /// Journal requests submitted and not completed.
    remaining: u32,
    err: Option<journal::Error>,
    /// For reads: the length asked for, and the data once it arrived.
    read_len: Option<u64>,
    data: Option<AlignedBuf>,
    /// Run a FLUSH once the parts are done (discard with FUA).
    flush_after: bool,
    held: u64,
    /// The front end gave up on it: release everything at completion, deliver nothing.
    cancelled: bool,
    _admit: Option<Admit>,
}

/// Executes the requests of one front end (one queue thread, one connection).
pub struct Executor<C> {
    /// Dropped first: waits for the kernel before the slots' admissions are released.
    backend: Box<dyn Backend>,
    slots: Vec<Option<Slot<C>>>,
    free: Vec<usize>,
    live: usize,
    completions: Vec<Completion>,
    depth: usize,
    budget: Budget,
    gate: Option<Arc<dyn RequestGate>>,
    /// The gate refused a request; no new attempt until its waker fired.
    paused: bool,
}

impl<C> Executor<C> {
    /// `depth`: journal requests in flight at most; `budget`: buffer memory; `gate`: the
    /// quiesce gate, if any.
    pub fn new(
        backend: Box<dyn Backend>,
        depth: usize,
        budget: Budget,
        gate: Option<Arc<dyn RequestGate>>,
    ) -> Self {
        Executor {
            backend,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            completions: Vec::new(),
            depth: depth.max(1),
            budget,
            gate,
            paused: false,
        }
    }

    /// Requests started and not yet done (cancelled ones included).
    pub fn in_flight(&self) -> usize {
        self.live
    }

    /// The backend's completion eventfd: read it to clear it, then [`Executor::poll`].
    pub fn eventfd(&self) -> RawFd {
        self.backend.eventfd()
    }

    /// The backend's io_uring descriptor, if it has one (fault-injection tests).
    pub fn ring_fd(&self) -> Option<RawFd> {
        self.backend.ring_fd()
    }

    /// The gate's waker, if there is a gate.
    pub fn gate_waker(&self) -> Option<RawFd> {
        self.gate.as_ref().map(|g| g.waker())
    }

    /// Call when the gate's waker fired: clears it and lets admissions be tried again.
    pub fn gate_woken(&mut self) {
        if let Some(g) = &self.gate {
            g.clear_waker();
        }
        self.paused = false;
    }

    /// True while the gate refused and its waker did not fire yet.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The budget's waker (fires when shared budget may be back).
    pub fn budget_waker(&self) -> RawFd {
        self.budget.waker()
    }

    /// Clears the budget's waker after it fired.
    pub fn budget_woken(&self) {
        self.budget.clear_waker();
    }

    /// True when the last reservation failed on the shared budget.
    pub fn starved(&self) -> bool {
        self.budget.starved()
    }

    /// Buffer bytes held now (requests in flight, plus what the front end reserved).
    pub fn held(&self) -> u64 {
        self.budget.held()
    }

    /// Reserves `n` bytes the front end holds itself (a payload being received).
    pub fn reserve(&mut self, n: u64) -> bool {
        self.budget.try_reserve(n)
    }

    /// Gives back bytes from [`Executor::reserve`] or [`Done::held`].
    pub fn release(&mut self, n: u64) {
        self.budget.release(n);
    }

    /// Admits a request of `parts` journal requests that needs `alloc` bytes of buffers from
    /// the executor (see [`Op::parts`], [`Op::alloc_bytes`]).
    pub fn admit(&mut self, parts: usize, alloc: u64) -> Result<Ticket, Wait> {
        if self.live > 0 && self.backend.in_flight().saturating_add(parts) > self.depth {
            return Err(Wait::Full);
        }
        if self.paused {
            return Err(Wait::Paused);
        }
        if !self.budget.try_reserve(alloc) {
            return Err(Wait::Full);
        }
        let admit = match &self.gate {
            Some(g) if g.try_admit() => Some(Admit(g.clone())),
            Some(_) => {
                self.paused = true;
                self.budget.release(alloc);
                return Err(Wait::Paused);
            }
            None => None,
        };
        Ok(Ticket { held: alloc, admit })
    }

    /// Gives back a ticket that will not be started.
    pub fn abandon(&mut self, ticket: Ticket) {
        self.budget.release(ticket.held);
    }

    /// Starts `op` under `ticket`. A request that needs no journal work (an empty range list)
    /// or that the backend refuses outright is done at once, into `out`.
    pub fn start(&mut self, ticket: Ticket, ctx: C, op: Op, out: &mut Vec<Done<C>>) {
        let mut parts: Vec<journal::Request> = Vec::with_capacity(1);
        let mut read_len = None;
        let mut flush_after = false;
        match op {
            Op::Read { offset, len } => {
                read_len = Some(len);
                parts.push(journal::Request::Read { offset, len });
            }
            Op::Write { offset, buf, fua } => {
                parts.push(journal::Request::Write { offset, buf, fua })
            }
            Op::Flush => parts.push(journal::Request::Flush),
            Op::Discard { ranges, fua } => {
                flush_after = fua;
                parts.extend(
                    ranges
                        .into_iter()
                        .filter(|r| r.1 > 0)
                        .map(|(offset, len)| journal::Request::Discard { offset, len }),
                );
            }
            Op::WriteZeroes { ranges, fua } => parts.extend(
                ranges
                    .into_iter()
                    .filter(|r| r.1 > 0)
                    .map(|(offset, len)| journal::Request::WriteZeroes { offset, len, fua }),
            ),
        }
        let slot = Slot {
            ctx,
            remaining: parts.len() as u32,
            err: None,
            read_len,
            data: None,
            flush_after: flush_after && !parts.is_empty(),
            held: ticket.held,
            cancelled: false,
            _admit: ticket.admit,
        };
        let index = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.live += 1;
        if parts.is_empty() {
            self.finish(index, out);
            return;
        }
        for part in parts {
            // A refused part was not queued and never completes: count it done here; the
            // slot stays taken until the parts that were queued complete.
            if let Err(r) = self.backend.submit(index as u64, part) {
                self.part_done(index, Err(r.error), out);
            }
        }
    }

    /// Stops delivering every request in flight: each still completes in the backend, and
    /// then releases its admission and budget without a [`Done`].
    pub fn cancel_all(&mut self) {
        for slot in self.slots.iter_mut().flatten() {
            slot.cancelled = true;
        }
    }

    /// Collects finished requests without blocking. An `Err` (the backend cannot submit any
    /// more) comes after the completions that were ready.
    pub fn poll(&mut self, out: &mut Vec<Done<C>>) -> journal::Result<()> {
        let mut completions = std::mem::take(&mut self.completions);
        let res = self.backend.poll(&mut completions);
        self.complete(&mut completions, out);
        self.completions = completions;
        res
    }

    /// Waits until every started request is done. If the backend fails, or cannot finish
    /// what it holds, the requests left finish with an I/O error: this never hangs.
    pub fn drain(&mut self, out: &mut Vec<Done<C>>) {
        let mut completions = std::mem::take(&mut self.completions);
        while self.live > 0 {
            let res = if self.backend.in_flight() > 0 {
                self.backend.wait(1, &mut completions)
            } else {
                self.backend.poll(&mut completions)
            };
            let progressed = !completions.is_empty();
            self.complete(&mut completions, out);
            if let Err(e) = res {
                tracing::error!(error = %e, "block backend failed while draining");
                self.fail_all(out);
            } else if !progressed && self.backend.in_flight() == 0 {
                self.fail_all(out);
            }
        }
        self.completions = completions;
    }

    fn fail_all(&mut self, out: &mut Vec<Done<C>>) {
        for i in 0..self.slots.len() {
            if let Some(slot) = self.slots[i].as_mut() {
                slot.remaining = 1;
                slot.flush_after = false;
                let err = journal::Error::RawIo(std::io::Error::from_raw_os_error(libc::EIO));
                self.part_done(i, Err(err), out);
            }
        }
    }

    fn complete(&mut self, completions: &mut Vec<Completion>, out: &mut Vec<Done<C>>) {
        for c in completions.drain(..) {
            let Some(index) = usize::try_from(c.token)
                .ok()
                .filter(|&i| matches!(self.slots.get(i), Some(Some(_))))
            else {
                tracing::warn!(token = c.token, "completion for an unknown request");
                continue;
            };
            self.part_done(index, c.result, out);
        }
    }

    fn part_done(
        &mut self,
        index: usize,
        result: journal::Result<Option<AlignedBuf>>,
        out: &mut Vec<Done<C>>,
    ) {
        let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        match (result, slot.read_len) {
            (Err(e), _) => {
                slot.err.get_or_insert(e);
            }
            (Ok(Some(buf)), Some(len)) if buf.len() as u64 == len && slot.data.is_none() => {
                slot.data = Some(buf);
            }
            (Ok(None), None) => {}
            (Ok(got), _) => {
                tracing::error!(
                    got = got.as_ref().map(AlignedBuf::len),
                    "a completion does not match its request"
                );
                slot.err.get_or_insert(journal::Error::Invalid(
                    "completion does not match its request".into(),
                ));
            }
        }
        slot.remaining = slot.remaining.saturating_sub(1);
        if slot.remaining > 0 {
            return;
        }
        if std::mem::take(&mut slot.flush_after) && slot.err.is_none() {
            slot.remaining = 1;
            if let Err(r) = self.backend.submit(index as u64, journal::Request::Flush) {
                self.part_done(index, Err(r.error), out);
            }
            return;
        }
        self.finish(index, out);
    }

    fn finish(&mut self, index: usize, out: &mut Vec<Done<C>>) {
        let Some(slot) = self.slots.get_mut(index).and_then(Option::take) else {
            return;
        };
        self.free.push(index);
        self.live -= 1;
        let Slot {
            ctx,
            err,
            read_len,
            data,
            held,
            cancelled,
            _admit,
            ..
        } = slot;
        // The admission goes now: the request's effect is in the journal.
        drop(_admit);
        let result = match (err, read_len) {
            (Some(e), _) => Err(e),
            (None, Some(_)) => match data {
                Some(d) => Ok(Some(d)),
                None => Err(journal::Error::Invalid(
                    "read completed without data".into(),
                )),
            },
            (None, None) => Ok(None),
        };
        let keep = match &result {
            Ok(Some(_)) if !cancelled => held.min(read_len.unwrap_or(0)),
            _ => 0,
        };
        self.budget.release(held - keep);
        if !cancelled {
            out.push(Done {
                ctx,
                result,
                held: keep,
            });
        }
    }
}

#[cfg(test)]
#[path = "executor_tests.rs"]
mod tests;
