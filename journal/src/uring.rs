//! Many requests in flight over a [`Volume`] on io_uring.
//!
//! Each request is planned by the volume (index lookups, or range lock + allocation for a
//! write), its data I/O goes to the kernel as one or more io_uring SQEs, and when they all
//! complete it is finished (read checksums verified, or the write committed to the index).
//! The checksum/commit steps run on the caller's thread: they touch no data.
//!
//! FLUSH (and a FUA write, once its data is written and committed) waits for a *sync batch*
//! (see `volume_sync`): an fdatasync SQE of the data file; once it succeeded, the write of
//! the pending records to the log linked to an fdatasync of the log. (The append is not
//! linked behind the data sync: on Linux 6.18 a failed fsync SQE did not cancel the SQE
//! linked behind it, so the append waits for the data sync's success completion.)
//! One batch runs at a time per engine; flushes arriving meanwhile wait together for the next
//! one (group commit), and reads and writes behind a flush go on while it runs.
//!
//! Ownership: [`IoEngine::submit`] either takes a request whole (it then completes exactly
//! once, through [`IoEngine::poll`] or [`IoEngine::wait`]) or hands it back in a [`Rejected`]
//! with nothing queued. SQEs that do not fit the submission ring wait in a backlog owned by
//! the engine; a failed `io_uring_enter` leaves them queued for the next attempt. Dropping
//! the engine cancels what the kernel holds and waits for every completion before any buffer
//! is freed.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

use crate::volume::{ActiveLayer, Begin, Planned, ReadPlan, Source, Steps, SyncBatch, WritePlan};
use crate::{AlignedBuf, Error, Result, Volume, BLOCK_SIZE};

/// A block request.
#[derive(Debug)]
pub enum Request {
    /// Read `len` bytes at `offset`; the completion carries the data.
    Read { offset: u64, len: u64 },
    /// Write `buf` at `offset`; with `fua` durable on completion.
    Write {
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    },
    /// Make every write completed before this request durable.
    Flush,
    /// Make a range read as zeros.
    WriteZeroes { offset: u64, len: u64, fua: bool },
    /// Discard a range (reads as zeros afterwards).
    Discard { offset: u64, len: u64 },
}

/// A request the engine did not take: nothing of it was queued, so no completion will come
/// for its token and the caller may reuse the token at once.
#[derive(Debug, thiserror::Error)]
#[error("the io_uring engine did not start the request")]
pub struct Rejected {
    pub token: u64,
    /// The request as it was submitted, with its buffer.
    pub request: Request,
    #[source]
    pub error: Error,
}

impl From<Rejected> for Error {
    fn from(r: Rejected) -> Error {
        r.error
    }
}

/// User data of the cancel SQE sent when the engine is dropped (no slot has this index).
const CANCEL_USER_DATA: u64 = u64::MAX;

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// The token given to [`IoEngine::submit`].
    pub token: u64,
    /// `Some(buf)` with the data for reads, `None` for other requests.
    pub result: Result<Option<AlignedBuf>>,
}

enum Op {
    Read {
        token: u64,
        plan: ReadPlan,
        buf: AlignedBuf,
        offset: u64,
        len: u64,
        pending: usize,
        /// Expected byte count of each SQE, by its index in the user data's low 16 bits.
        expect: Vec<u32>,
        err: Option<Error>,
    },
    Write {
        token: u64,
        plan: WritePlan,
        err: Option<Error>,
    },
    /// A sync batch: its SQEs are steps `STEP_*` in the user data's low bits.
    Sync {
        batch: SyncBatch,
        steps: Steps,
        pending: usize,
    },
    /// One writev SQE for writes (`members`, slots of `Op::Write`) whose data lies back to
    /// back in the data file; `iovecs` point into the members' buffers.
    Run {
        members: Vec<usize>,
        /// Read by the kernel until the writev completes (never touched here).
        _iovecs: Vec<libc::iovec>,
    },
}

/// Steps of a sync batch (low bits of its SQEs' user data).
const STEP_DATA_SYNC: u64 = 0;
const STEP_LOG_WRITE: u64 = 1;
const STEP_LOG_SYNC: u64 = 2;

/// Most bytes merged into one writev SQE. (At most a quarter of the engine's depth of
/// writes merge, so that several SQEs stay in flight.)
const RUN_MAX_BYTES: usize = 1 << 20;

/// Writes planned while plugged whose SQE is not built yet: back to back in one file.
#[derive(Default)]
struct PendingRun {
    members: Vec<usize>,
    fd: RawFd,
    end: u64,
    bytes: usize,
}

/// A FLUSH, or a FUA write whose data is committed, waiting to be made durable.
struct Waiter {
    token: u64,
    /// The layer its writes went to and the sync batch generation that covers them.
    layer: Arc<ActiveLayer>,
    target: u64,
}

/// FLUSH and FUA requests of one engine.
#[derive(Default)]
struct Flushes {
    /// Not yet covered by a batch that started after them.
    waiting: Vec<Waiter>,
    /// The slot of this engine's running batch and the requests it completes.
    running: Option<(usize, Vec<Waiter>)>,
    /// A batch is wanted without a waiter (the pending records grew large).
    background: bool,
    /// The engine is being dropped: no new batch starts.
    closed: bool,
}

/// Drives requests against one volume on an io_uring instance. Not thread-safe: one owner
/// thread submits and reaps.
pub struct IoEngine {
    volume: Arc<Volume>,
    ring: IoUring,
    /// Shared with the active layer while a flush waits for another party's batch.
    eventfd: Arc<OwnedFd>,
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    deferred: VecDeque<(u64, Request)>,
    ready: Vec<Completion>,
    /// SQEs of started requests that did not fit the submission ring yet.
    /// Each with the number of SQEs from it on that must reach the kernel in one submit
    /// (a linked chain is never split across two).
    backlog: VecDeque<(io_uring::squeue::Entry, usize)>,
    flushes: Flushes,
    /// Set by [`IoEngine::plug`]: SQEs wait for [`IoEngine::unplug`], writes are merged.
    plugged: bool,
    run: PendingRun,
    /// Slots that are no request of their own (sync batches, merged runs).
    aux_slots: usize,
    /// Most writes merged into one writev.
    run_max: usize,
    /// Writev SQEs built from merged writes.
    #[cfg(test)]
    runs_merged: usize,
}

impl IoEngine {
    /// An engine for `volume` with room for `depth` requests in flight.
    pub fn new(volume: Arc<Volume>, depth: u32) -> Result<IoEngine> {
        let depth = depth.clamp(1, 4096);
        let entries = (depth * 4).next_power_of_two().max(64);
        let ring = IoUring::builder()
            .setup_cqsize(entries * 4)
            .build(entries)?;
        // SAFETY: eventfd takes no pointers; a non-negative return is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nothing else.
        let eventfd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(IoEngine {
            volume,
            ring,
            eventfd,
            slots: Vec::new(),
            free: Vec::new(),
            deferred: VecDeque::new(),
            ready: Vec::new(),
            backlog: VecDeque::new(),
            flushes: Flushes::default(),
            plugged: false,
            run: PendingRun::default(),
            aux_slots: 0,
            run_max: (depth as usize / 4).clamp(1, 64),
            #[cfg(test)]
            runs_merged: 0,
        })
    }

    /// The volume this engine drives.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// An eventfd that becomes readable when completions may be ready (for epoll loops).
    /// Read it to clear it, then call [`IoEngine::poll`].
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        let running = self.flushes.running.as_ref().map_or(0, |(_, w)| w.len());
        self.slots.len() - self.free.len() - self.aux_slots
            + self.ready.len()
            + self.deferred.len()
            + self.flushes.waiting.len()
            + running
    }

    fn alloc_slot(&mut self, op: Op) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(op);
                i
            }
            None => {
                self.slots.push(Some(op));
                self.slots.len() - 1
            }
        }
    }

    /// Queues one SQE of a request that already owns its slot. Never fails: what does not fit
    /// the submission ring waits in the backlog.
    fn push_sqe(&mut self, entry: io_uring::squeue::Entry) {
        self.push_chain(vec![entry]);
    }

    /// Queues SQEs that must reach the kernel in one submit (a linked chain), in order.
    fn push_chain(&mut self, chain: Vec<io_uring::squeue::Entry>) {
        if self.backlog.is_empty() {
            let mut sq = self.ring.submission();
            if sq.capacity() - sq.len() >= chain.len() {
                for entry in &chain {
                    // SAFETY: every buffer an SQE points into is owned by an `Op` in
                    // `self.slots` (or by an `Arc<LayerFiles>` it holds) and stays alive and
                    // unmoved until its completion is reaped (`Drop` waits for it);
                    // AlignedBuf's and a Vec's heap allocations never move.
                    if unsafe { sq.push(entry) }.is_err() {
                        unreachable!("room was checked");
                    }
                }
                return;
            }
        }
        let n = chain.len();
        for (i, entry) in chain.into_iter().enumerate() {
            self.backlog.push_back((entry, n - i));
        }
    }

    /// The ring's file descriptor (for diagnostics and fault-injection tests).
    pub fn ring_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Starts a request. Invalid requests (unaligned, out of range, write to read-only)
    /// complete with an error. `Err` only when nothing of the request was queued: the ring
    /// cannot take the SQEs already waiting (a failing `io_uring_enter`); the request comes
    /// back in the [`Rejected`] and no completion will carry `token`.
    pub fn submit(&mut self, token: u64, req: Request) -> std::result::Result<(), Rejected> {
        if self.plugged {
            // Nothing reaches the kernel before `unplug`, which reports a failing ring.
            self.start(token, req);
            return Ok(());
        }
        let mut kicked = self.kick();
        if matches!(&kicked, Err(Error::RawIo(e)) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)))
        {
            // A full completion queue: move its entries to `ready` and try once more.
            self.reap();
            kicked = self.kick();
        }
        if let Err(error) = kicked {
            return Err(Rejected {
                token,
                request: req,
                error,
            });
        }
        self.start(token, req);
        if !self.ready.is_empty() {
            self.signal();
        }
        // The request is the engine's now: a failed enter leaves its SQEs queued, and the next
        // submit, poll or wait tries again (and reports a lasting failure).
        if let Err(e) = self.kick() {
            tracing::debug!("io_uring submit failed, retried later: {e}");
        }
        Ok(())
    }

    /// Holds back SQEs of the requests submitted from now on until [`IoEngine::unplug`] (or
    /// the next `poll`/`wait`), so that a batch of requests costs one `io_uring_enter` and
    /// writes whose data lands back to back in the data file go to the kernel as one writev.
    /// While plugged, `submit` never refuses a request.
    pub fn plug(&mut self) {
        self.plugged = true;
    }

    /// Hands the requests submitted since [`IoEngine::plug`] to the kernel. On `Err` (the
    /// ring refuses SQEs) they stay queued and the next submit, poll or wait tries again.
    pub fn unplug(&mut self) -> Result<()> {
        self.plugged = false;
        self.emit_run();
        if !self.ready.is_empty() {
            self.signal();
        }
        self.kick()
    }

    /// Queues the data write of the write in `slot`: at once, or (plugged) into the pending
    /// run when it continues it.
    fn queue_write(&mut self, slot: usize, fd: RawFd, off: u64, len: usize) {
        if !self.plugged {
            self.push_write_sqe(slot);
            return;
        }
        let r = &self.run;
        if !r.members.is_empty()
            && (r.fd != fd
                || r.end != off
                || r.members.len() >= self.run_max
                || r.bytes + len > RUN_MAX_BYTES)
        {
            self.emit_run();
        }
        if self.run.members.is_empty() {
            self.run.fd = fd;
            self.run.bytes = 0;
        }
        self.run.members.push(slot);
        self.run.end = off + len as u64;
        self.run.bytes += len;
    }

    /// The single write SQE of the write in `slot`.
    fn push_write_sqe(&mut self, slot: usize) {
        let Some(Some(Op::Write { plan, .. })) = self.slots.get(slot) else {
            return;
        };
        let e = opcode::Write::new(
            types::Fd(plan.active.files.data.as_raw_fd()),
            plan.data.as_slice().as_ptr(),
            plan.data.len() as u32,
        )
        .offset(plan.file_off())
        .build()
        .user_data((slot as u64) << 16);
        self.push_sqe(e);
    }

    /// Builds the SQE of the pending run: one writev for its writes.
    fn emit_run(&mut self) {
        let run = std::mem::take(&mut self.run);
        match run.members.len() {
            0 => return,
            1 => return self.push_write_sqe(run.members[0]),
            _ => {}
        }
        let mut iovecs = Vec::with_capacity(run.members.len());
        let mut off = None;
        for &m in &run.members {
            if let Some(Some(Op::Write { plan, .. })) = self.slots.get(m) {
                off.get_or_insert(plan.file_off());
                iovecs.push(libc::iovec {
                    iov_base: plan.data.as_slice().as_ptr() as *mut libc::c_void,
                    iov_len: plan.data.len(),
                });
            }
        }
        let (ptr, n) = (iovecs.as_ptr(), iovecs.len() as u32);
        let off = off.unwrap_or(0);
        let slot = self.alloc_slot(Op::Run {
            members: run.members,
            _iovecs: iovecs,
        });
        #[cfg(test)]
        {
            self.runs_merged += 1;
        }
        self.aux_slots += 1;
        let e = opcode::Writev::new(types::Fd(run.fd), ptr, n)
            .offset(off)
            .build()
            .user_data((slot as u64) << 16);
        self.push_sqe(e);
    }

    /// Frees a slot that is no request of its own.
    fn free_aux(&mut self, slot: usize) -> Option<Op> {
        let op = self.slots.get_mut(slot).and_then(Option::take)?;
        self.free.push(slot);
        self.aux_slots -= 1;
        Some(op)
    }

    /// Makes the eventfd readable: completions finished on the caller's thread (errors,
    /// FLUSH, reads of unwritten blocks) are waiting for [`IoEngine::poll`].
    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd this engine owns.
        let _ = unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Hands queued SQEs (ring and backlog) to the kernel. On `Err` they stay queued.
    fn kick(&mut self) -> Result<()> {
        loop {
            {
                let mut sq = self.ring.submission();
                while let Some((entry, together)) = self.backlog.front() {
                    if sq.capacity() - sq.len() < *together {
                        break;
                    }
                    // SAFETY: as in `push_chain`: the buffers of a backlogged SQE are owned by
                    // its request's slot until the completion is reaped.
                    if unsafe { sq.push(entry) }.is_err() {
                        break;
                    }
                    self.backlog.pop_front();
                }
            }
            let queued = self.ring.submission().len();
            if queued == 0 {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(0) => return Ok(()), // the kernel took none (CQ backpressure): later
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            if self.backlog.is_empty() {
                return Ok(());
            }
        }
    }

    /// Takes a request: it completes into `ready` or owns a slot with its SQEs queued.
    fn start(&mut self, token: u64, req: Request) {
        match req {
            Request::Read { offset, len } => self.start_read(token, offset, len),
            Request::Write { offset, buf, fua } => {
                let len = buf.len() as u64;
                self.start_write(token, offset, len, Some(buf), fua)
            }
            Request::WriteZeroes { offset, len, fua } => {
                self.start_write(token, offset, len, None, fua)
            }
            Request::Discard { offset, len } => self.start_write(token, offset, len, None, false),
            Request::Flush => self.wait_durable(token),
        }
        // A FLUSH, or a FUA write with no data I/O that finished at once, may start a batch.
        self.pump_flushes();
    }

    fn start_read(&mut self, token: u64, offset: u64, len: u64) {
        let plan = match self.volume.plan_read(offset, len) {
            Ok(p) => p,
            Err(e) => {
                self.ready.push(Completion {
                    token,
                    result: Err(e),
                });
                return;
            }
        };
        let mut buf = AlignedBuf::new((plan.nblocks * BLOCK_SIZE) as usize);
        let base_ptr = buf.as_mut_ptr();
        let mut sqes = Vec::new();
        let mut expect = Vec::new();
        for seg in &plan.segs {
            let (fd, len) = match &seg.source {
                Source::Zero => continue,
                Source::Layer(l) => (l.data.as_raw_fd(), seg.len as u64),
                Source::Base(b) => (
                    b.file.as_raw_fd(),
                    (seg.len as u64).min(b.size - seg.file_off),
                ),
            };
            // SAFETY: buf_off + len <= nblocks * BLOCK_SIZE, the buffer's length.
            let ptr = unsafe { base_ptr.add(seg.buf_off) };
            sqes.push(
                opcode::Read::new(types::Fd(fd), ptr, len as u32)
                    .offset(seg.file_off)
                    .build(),
            );
            expect.push(len as u32);
        }
        let pending = sqes.len();
        if pending > usize::from(u16::MAX) {
            self.ready.push(Completion {
                token,
                result: Err(Error::Invalid("read too large".into())),
            });
            return;
        }
        let slot = self.alloc_slot(Op::Read {
            token,
            plan,
            buf,
            offset,
            len,
            pending,
            expect,
            err: None,
        });
        if pending == 0 {
            self.finish(slot);
            return;
        }
        for (i, sqe) in sqes.into_iter().enumerate() {
            self.push_sqe(sqe.user_data(((slot as u64) << 16) | i as u64));
        }
    }

    fn start_write(
        &mut self,
        token: u64,
        offset: u64,
        len: u64,
        data: Option<AlignedBuf>,
        fua: bool,
    ) {
        let zero = data.is_none();
        let plan = match self.volume.plan_write(offset, len, data, fua, false) {
            Ok(Planned::Ready(p)) => p,
            Ok(Planned::Busy(data)) => {
                let req = match data {
                    Some(buf) => Request::Write { offset, buf, fua },
                    None if zero => Request::WriteZeroes { offset, len, fua },
                    None => Request::Discard { offset, len },
                };
                self.deferred.push_back((token, req));
                return;
            }
            Err(e) => {
                self.ready.push(Completion {
                    token,
                    result: Err(e),
                });
                return;
            }
        };
        let fd = plan.active.files.data.as_raw_fd();
        let len = plan.data.len();
        let off = plan.file_off();
        // The buffer's heap allocation stays where it is when the plan moves into its slot.
        let slot = self.alloc_slot(Op::Write {
            token,
            plan,
            err: None,
        });
        if len == 0 {
            self.finish(slot);
            return;
        }
        self.queue_write(slot, fd, off, len);
    }

    /// Completes the request in `slot` whose data I/O is done.
    fn finish(&mut self, slot: usize) {
        let Some(op) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free.push(slot);
        if matches!(op, Op::Sync { .. } | Op::Run { .. }) {
            self.aux_slots -= 1;
        }
        let completion = match op {
            Op::Read {
                token,
                plan,
                buf,
                offset,
                len,
                err,
                ..
            } => {
                let result = match err {
                    Some(e) => Err(e),
                    None => Volume::verify_read(&plan, buf.as_slice()).map(|_| {
                        let skip = (offset - plan.first_block * BLOCK_SIZE) as usize;
                        if skip == 0 && buf.len() as u64 == len {
                            Some(buf)
                        } else {
                            Some(AlignedBuf::from_slice(
                                &buf.as_slice()[skip..skip + len as usize],
                            ))
                        }
                    }),
                };
                Completion { token, result }
            }
            Op::Write { token, plan, err } => {
                let result = match err {
                    Some(e) => {
                        self.volume.abort(plan);
                        Err(e)
                    }
                    None => {
                        let fua = plan.fua;
                        if self.volume.commit(plan) {
                            self.flushes.background = true;
                        }
                        if fua {
                            // Completes when a batch that started after the commit ends.
                            self.wait_durable(token);
                            return;
                        }
                        Ok(None)
                    }
                };
                Completion { token, result }
            }
            Op::Sync { batch, steps, .. } => {
                let result = self.volume.end_sync(batch, steps);
                let waiters = self
                    .flushes
                    .running
                    .take()
                    .map(|(_, w)| w)
                    .unwrap_or_default();
                for w in waiters {
                    let result = match &result {
                        Ok(()) => Ok(None),
                        Err(e) => Err(copy_error(e)),
                    };
                    self.ready.push(Completion {
                        token: w.token,
                        result,
                    });
                }
                if let Err(e) = result {
                    tracing::debug!("sync batch failed: {e}");
                }
                return;
            }
            // A run completes through its members (see `reap`).
            Op::Run { .. } => return,
        };
        self.ready.push(completion);
    }

    /// Queues `token` (a FLUSH, or a committed FUA write) until every write committed so far
    /// is durable. On a view without an active layer there is nothing to make durable.
    fn wait_durable(&mut self, token: u64) {
        match self.volume.active_layer() {
            Some(layer) => {
                let target = layer.flush_target();
                self.flushes.waiting.push(Waiter {
                    token,
                    layer,
                    target,
                });
            }
            None => self.ready.push(Completion {
                token,
                result: Ok(None),
            }),
        }
    }

    /// Completes the waiters already covered and starts a batch for the others, unless this
    /// engine's batch is running (they wait for the next one) or another party holds the
    /// log (the eventfd is signalled when it is released).
    fn pump_flushes(&mut self) {
        if self.flushes.closed
            || self.flushes.running.is_some()
            || self.flushes.waiting.is_empty() && !self.flushes.background
        {
            return;
        }
        let active = self.volume.active_layer();
        let waiting = std::mem::take(&mut self.flushes.waiting);
        for w in waiting {
            // A layer that is no longer active was made durable by the checkpoint that
            // sealed it (or dropped by `apply`).
            let done = active
                .as_ref()
                .is_none_or(|a| !Arc::ptr_eq(a, &w.layer) || w.layer.covered(w.target));
            if done {
                self.ready.push(Completion {
                    token: w.token,
                    result: Ok(None),
                });
            } else {
                self.flushes.waiting.push(w);
            }
        }
        let Some(active) = active else {
            self.flushes.background = false;
            return;
        };
        if self.flushes.waiting.is_empty() && !self.flushes.background {
            return;
        }
        match self.volume.begin_sync(&active, &self.eventfd) {
            Begin::Busy => {}
            Begin::Nothing => {
                self.flushes.background = false;
                for w in std::mem::take(&mut self.flushes.waiting) {
                    self.ready.push(Completion {
                        token: w.token,
                        result: Ok(None),
                    });
                }
            }
            Begin::Batch(batch) => {
                self.flushes.background = false;
                let waiters = std::mem::take(&mut self.flushes.waiting);
                self.start_sync(batch, waiters);
            }
        }
    }

    /// Starts a batch: the data sync first when it appends, else the log sync alone.
    fn start_sync(&mut self, batch: SyncBatch, waiters: Vec<Waiter>) {
        let data_fd = types::Fd(batch.active.files.data.as_raw_fd());
        let appends = batch.appends();
        let slot = self.alloc_slot(Op::Sync {
            batch,
            steps: Steps::default(),
            pending: 1,
        });
        self.aux_slots += 1;
        self.flushes.running = Some((slot, waiters));
        if appends {
            let e = opcode::Fsync::new(data_fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(((slot as u64) << 16) | STEP_DATA_SYNC);
            self.push_sqe(e);
        } else {
            self.append_and_sync_log(slot);
        }
    }

    /// The steps after a successful data sync: the append (if any) linked to the log sync,
    /// which so starts only once the append completed.
    fn append_and_sync_log(&mut self, slot: usize) {
        let Some(Some(Op::Sync { batch, pending, .. })) = self.slots.get_mut(slot) else {
            return;
        };
        let log_fd = types::Fd(batch.active.log_fd());
        let mut chain = Vec::new();
        if batch.appends() {
            let Ok(len) = u32::try_from(batch.records.len()) else {
                // Not reached (MAX_PENDING_RECORDS bounds an append); the batch fails and
                // hands its records back.
                *pending = 0;
                self.finish(slot);
                return;
            };
            let link = if batch.durable {
                io_uring::squeue::Flags::IO_LINK
            } else {
                io_uring::squeue::Flags::empty()
            };
            chain.push(
                opcode::Write::new(log_fd, batch.records.as_ptr(), len)
                    .offset(batch.log_off)
                    .build()
                    .user_data(((slot as u64) << 16) | STEP_LOG_WRITE)
                    .flags(link),
            );
        }
        if batch.durable {
            chain.push(
                opcode::Fsync::new(log_fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(((slot as u64) << 16) | STEP_LOG_SYNC),
            );
        }
        *pending = chain.len();
        if chain.is_empty() {
            self.finish(slot);
            return;
        }
        self.push_chain(chain);
    }

    fn reap(&mut self) {
        let mut done = Vec::new();
        let mut synced = Vec::new();
        let mut runs = Vec::new();
        for cqe in self.ring.completion() {
            let slot = (cqe.user_data() >> 16) as usize;
            let sub = (cqe.user_data() & 0xffff) as usize;
            let res = cqe.result();
            match self.slots.get_mut(slot).and_then(Option::as_mut) {
                Some(Op::Read {
                    pending,
                    err,
                    expect,
                    plan,
                    ..
                }) => {
                    let want = expect.get(sub).copied().unwrap_or(0);
                    if err.is_none() {
                        if res < 0 {
                            *err = Some(std::io::Error::from_raw_os_error(-res).into());
                        } else if (res as u32) < want {
                            let what = plan
                                .segs
                                .iter()
                                .filter_map(|s| match &s.source {
                                    Source::Layer(l) => Some(l.data_path.display().to_string()),
                                    Source::Base(b) => Some(b.path.display().to_string()),
                                    Source::Zero => None,
                                })
                                .nth(sub)
                                .unwrap_or_default();
                            *err = Some(Error::Corrupt {
                                what,
                                why: format!("short read: {res} of {want} bytes"),
                            });
                        }
                    }
                    *pending = pending.saturating_sub(1);
                    if *pending == 0 {
                        done.push(slot);
                    }
                }
                Some(Op::Write { err, plan, .. }) => {
                    if res < 0 {
                        *err = Some(Error::io(
                            &plan.active.files.data_path,
                            std::io::Error::from_raw_os_error(-res),
                        ));
                    } else if (res as usize) < plan.data.len() {
                        *err = Some(Error::io(
                            &plan.active.files.data_path,
                            std::io::Error::from_raw_os_error(libc::ENOSPC),
                        ));
                    }
                    done.push(slot);
                }
                Some(Op::Run { .. }) => {
                    runs.push((slot, res));
                }
                Some(Op::Sync { steps, pending, .. }) => {
                    let r = if res < 0 {
                        Err(std::io::Error::from_raw_os_error(-res))
                    } else {
                        Ok(res as usize)
                    };
                    *pending = pending.saturating_sub(1);
                    match sub as u64 {
                        STEP_DATA_SYNC => {
                            let ok = r.is_ok();
                            steps.data_sync = Some(r.map(drop));
                            if ok {
                                synced.push(slot);
                                continue;
                            }
                        }
                        STEP_LOG_WRITE => steps.log_write = Some(r),
                        _ => steps.log_sync = Some(r.map(drop)),
                    }
                    if *pending == 0 {
                        done.push(slot);
                    }
                }
                None => {}
            }
        }
        for (slot, res) in runs {
            self.end_run(slot, res, &mut done);
        }
        let wrote = done
            .iter()
            .any(|&s| matches!(self.slots.get(s), Some(Some(Op::Write { .. }))));
        for slot in done {
            self.finish(slot);
        }
        for slot in synced {
            self.append_and_sync_log(slot);
        }
        if wrote || !self.deferred.is_empty() {
            self.retry_deferred();
        }
        self.pump_flushes();
    }

    /// Hands the outcome of a run's writev to its members: those wholly inside the bytes
    /// written succeeded, the others failed.
    fn end_run(&mut self, slot: usize, res: i32, done: &mut Vec<usize>) {
        let Some(Op::Run { members, .. }) = self.free_aux(slot) else {
            return;
        };
        let mut at = 0usize;
        for m in members {
            if let Some(Some(Op::Write { err, plan, .. })) = self.slots.get_mut(m) {
                at += plan.data.len();
                if res < 0 {
                    *err = Some(Error::io(
                        &plan.active.files.data_path,
                        std::io::Error::from_raw_os_error(-res),
                    ));
                } else if (res as usize) < at {
                    *err = Some(Error::io(
                        &plan.active.files.data_path,
                        std::io::Error::from_raw_os_error(libc::ENOSPC),
                    ));
                }
                done.push(m);
            }
        }
    }

    fn retry_deferred(&mut self) {
        let n = self.deferred.len();
        for _ in 0..n {
            let Some((token, req)) = self.deferred.pop_front() else {
                break;
            };
            self.start(token, req);
        }
        if let Err(e) = self.kick() {
            tracing::warn!("io_uring submit failed: {e}");
        }
    }

    /// Appends finished requests to `out` without blocking.
    /// An `Err` (the ring refuses SQEs) comes after the completions that were ready.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        if self.plugged {
            self.plugged = false;
            self.emit_run();
        }
        let mut kicked = self.kick();
        if kicked.is_ok() && self.ring.submission().cq_overflow() {
            // Completions that did not fit the CQ are flushed into it by the next enter.
            kicked = self.ring.submit().map(drop).map_err(Error::from);
        }
        self.reap();
        out.append(&mut self.ready);
        kicked
    }

    /// Blocks until at least `min` requests have finished (or none are in flight) and
    /// appends them to `out`.
    pub fn wait(&mut self, min: usize, out: &mut Vec<Completion>) -> Result<()> {
        let start = out.len();
        loop {
            self.poll(out)?;
            let got = out.len() - start;
            let busy = self.slots.len() - self.free.len();
            let flushes = !self.flushes.waiting.is_empty();
            if got >= min || busy == 0 && self.deferred.is_empty() && !flushes {
                return Ok(());
            }
            if flushes && self.flushes.running.is_none() {
                // Another party's batch holds the log: its end, like every completion of
                // this ring, signals the eventfd.
                self.sleep_on_eventfd();
                self.pump_flushes();
                continue;
            }
            if busy == 0 {
                // Only deferred writes remain and nothing holds their locks here: another
                // engine does; give it a moment.
                std::thread::yield_now();
                self.retry_deferred();
                continue;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl IoEngine {
    /// Waits (at most a few milliseconds) for the eventfd and clears it.
    fn sleep_on_eventfd(&self) {
        let mut pfd = libc::pollfd {
            fd: self.eventfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, length 1.
        let r = unsafe { libc::poll(&mut pfd, 1, 10) };
        if r > 0 {
            let mut v: u64 = 0;
            // SAFETY: reads 8 bytes into a live u64 from an eventfd this engine owns
            // (non-blocking).
            let _ = unsafe { libc::read(self.eventfd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
    }
}

/// A copy of `e` for each request that shares one failed sync batch (same path and errno).
fn copy_error(e: &Error) -> Error {
    match e {
        Error::Io { path, source } => Error::io(
            path.clone(),
            std::io::Error::from_raw_os_error(source.raw_os_error().unwrap_or(libc::EIO)),
        ),
        other => Error::Invalid(other.to_string()),
    }
}

impl Drop for IoEngine {
    /// Buffers of requests in flight are freed only once the kernel is done with them: SQEs
    /// still in the backlog are taken back, everything else is cancelled and waited for.
    /// Writes that finish here are committed or aborted as usual, so no range lock or
    /// in-flight count outlives the engine; their completions are dropped.
    fn drop(&mut self) {
        self.deferred.clear();
        self.flushes.closed = true;
        self.flushes.waiting.clear();
        // Writes planned while plugged that never got an SQE: given up.
        for m in std::mem::take(&mut self.run.members) {
            self.take_back((m as u64) << 16);
        }
        for (entry, _) in std::mem::take(&mut self.backlog) {
            self.take_back(entry.get_user_data());
        }
        let mut cancel_sent = false;
        // Transient enter failures (EINTR, EBUSY while the CQ is full) are retried, a bounded
        // number of times in a row.
        let mut retries = 0u32;
        loop {
            self.reap();
            self.ready.clear();
            if self.slots.iter().all(Option::is_none) {
                return;
            }
            if !cancel_sent {
                // Best effort (a regular file's I/O may not be cancellable): waiting below is
                // what makes freeing safe.
                let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                    .build()
                    .user_data(CANCEL_USER_DATA);
                // SAFETY: a cancel SQE points to no memory.
                cancel_sent = unsafe { self.ring.submission().push(&cancel) }.is_ok();
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => retries = 0,
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY))
                        && retries < 1000 =>
                {
                    retries += 1;
                }
                Err(e) => {
                    // The kernel may still write into these buffers: leak them rather than
                    // free memory it could write into.
                    let left = self.slots.iter().filter(|s| s.is_some()).count();
                    tracing::error!(
                        "io_uring engine dropped with {left} requests the kernel may still \
                         hold ({e}); leaking their buffers"
                    );
                    for slot in self.slots.drain(..) {
                        std::mem::forget(slot);
                    }
                    return;
                }
            }
        }
    }
}

impl IoEngine {
    /// Gives up one SQE that never reached the kernel (engine drop).
    fn take_back(&mut self, user_data: u64) {
        let slot = (user_data >> 16) as usize;
        let gone = || Error::Invalid("the io_uring engine was dropped".into());
        let done = match self.slots.get_mut(slot).and_then(Option::as_mut) {
            Some(Op::Read { pending, err, .. }) => {
                err.get_or_insert_with(gone);
                *pending = pending.saturating_sub(1);
                *pending == 0
            }
            Some(Op::Write { err, .. }) => {
                *err = Some(gone());
                true
            }
            Some(Op::Sync { pending, .. }) => {
                // Its steps stay unrun: the batch fails and hands its records back.
                *pending = pending.saturating_sub(1);
                *pending == 0
            }
            Some(Op::Run { .. }) => {
                let mut done = Vec::new();
                self.end_run(slot, -libc::ECANCELED, &mut done);
                for m in done {
                    self.finish(m);
                }
                false
            }
            None => false,
        };
        if done {
            self.finish(slot);
        }
    }
}

#[cfg(test)]
#[path = "uring_tests.rs"]
mod tests;
