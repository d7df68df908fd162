//! One NBD client: handshake, then the transmission phase on its own thread, a thin protocol
//! layer over its own [`block::executor::Executor`] (the one virtio-blk uses too, on its own
//! [`journal::IoEngine`]). Requests are read without blocking, decided by
//! [`super::protocol::decide`], started as soon as they are complete (many in flight), and
//! answered with simple replies in completion order.
//!
//! Memory per connection is bounded: at most [`DEPTH`] requests in flight, at most
//! [`ServerLimits::client_buffer`] bytes of payload held (write data received, read data not
//! yet sent; one request may exceed it when nothing else is held), and every connection
//! together at most the server's [`MemoryBudget`]; at most [`MAX_QUEUED`] replies waiting for
//! the client to read them. Past a limit the connection stops reading requests. A client
//! that leaves the connection with nothing for the server to do (no request in flight, none
//! waiting for the server's budget or gate) for [`ServerLimits::idle_timeout`] is disconnected:
//! idle, stuck in the middle of a request, or not reading its replies.
//!
//! Ownership: the executor owns a started request, its quiesce-gate admission and its budget
//! until it completes; read data stays charged to the budget until its reply is sent. The
//! executor drops its engine (which waits for the kernel) before its requests, so an early
//! return releases everything in order. A client that goes away has its requests in flight
//! cancelled: they complete in the journal and release what they hold, unanswered.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::backend::UringBackend;
use block::budget::{Budget, MemoryBudget};
use block::executor::{Done, Executor, Op};
use journal::{AlignedBuf, Volume};

use super::handshake::{negotiate, Outcome};
use super::protocol::*;
use super::stream::Stream;
use crate::quiesce::{Gate, Member};
use crate::sys::{self, ControlOperation, Epoll, EpollEvent, EventFd, EventSet};
use crate::{Error, Result};

/// Requests in flight per connection.
pub const DEPTH: usize = 64;
/// Replies queued for a client that is slow to read them.
pub const MAX_QUEUED: usize = 1024;
/// How long a shutting-down server keeps trying to deliver queued replies.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const READ_BUF: usize = 64 << 10;
/// Poll interval for an engine with requests in flight (see [`Transmission::run`]).
const DEFERRED_RETRY: Duration = Duration::from_millis(5);

const T_SOCK: u64 = 0;
const T_ENGINE: u64 = 1;
const T_WAKER: u64 = 2;
const T_SHUTDOWN: u64 = 3;
const T_BUDGET: u64 = 4;

/// Limits of one server and each of its connections (`strata disk serve` flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Clients served at once; more are accepted and closed at once.
    pub max_clients: usize,
    /// Payload bytes all connections together may hold.
    pub memory_budget: usize,
    /// How long the whole handshake may take.
    pub handshake_timeout: Duration,
    /// How long a client may leave the connection with nothing for the server to do;
    /// `None`: forever.
    pub idle_timeout: Option<Duration>,
    /// Payload bytes one connection may hold.
    pub client_buffer: usize,
}

impl ServerLimits {
    pub const DEFAULT_MAX_CLIENTS: usize = 64;
    pub const DEFAULT_MEMORY_BUDGET: usize = 256 << 20;
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
    pub const DEFAULT_CLIENT_BUFFER: usize = 32 << 20;
}

impl Default for ServerLimits {
    fn default() -> ServerLimits {
        ServerLimits {
            max_clients: Self::DEFAULT_MAX_CLIENTS,
            memory_budget: Self::DEFAULT_MEMORY_BUDGET,
            handshake_timeout: Self::DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: Some(Self::DEFAULT_IDLE_TIMEOUT),
            client_buffer: Self::DEFAULT_CLIENT_BUFFER,
        }
    }
}

/// What every connection of one server shares.
pub struct Export {
    pub volume: Arc<Volume>,
    pub limits: ExportLimits,
    pub gate: Arc<Gate>,
    /// Readable once the server is shutting down (never cleared).
    pub shutdown: Arc<EventFd>,
    pub serve: ServerLimits,
    /// Payload memory of all connections together.
    pub budget: Arc<MemoryBudget>,
}

/// Serves one accepted client until it disconnects or the server shuts down.
pub fn serve(mut stream: Stream, export: &Export) -> Result<()> {
    stream
        .set_nonblocking()
        .map_err(|e| Error::io("configuring client socket", e))?;
    let deadline = Instant::now() + export.serve.handshake_timeout;
    match negotiate(
        &mut stream,
        &export.limits,
        export.shutdown.as_raw_fd(),
        deadline,
    ) {
        Ok(Outcome::Transmit) => Transmission::new(stream, export)?.run(),
        Ok(Outcome::Closed) => Ok(()),
        Err(e) => {
            tracing::debug!("nbd handshake ended: {e}");
            Ok(())
        }
    }
}

/// A reply being sent.
struct Out {
    head: [u8; REPLY_LEN],
    data: Option<AlignedBuf>,
    /// Bytes of head + data already written.
    pos: usize,
    reserved: usize,
}

impl Out {
    fn parts(&self) -> (&[u8], &[u8]) {
        let head = &self.head[self.pos.min(REPLY_LEN)..];
        let data = self.data.as_ref().map_or(&[][..], |d| {
            &d.as_slice()[self.pos.saturating_sub(REPLY_LEN)..]
        });
        (head, data)
    }

    fn remaining(&self) -> usize {
        REPLY_LEN + self.data.as_ref().map_or(0, AlignedBuf::len) - self.pos
    }
}

/// Where the reader is in the request stream.
enum Input {
    Header,
    /// A write was accepted; its payload is not buffered yet (waiting for budget).
    NeedPayload {
        cookie: u64,
        cmd: Command,
        len: usize,
    },
    Payload {
        cookie: u64,
        cmd: Command,
        buf: AlignedBuf,
        filled: usize,
    },
    /// A refused write: drop its payload, then reply `errno`.
    Discard {
        cookie: u64,
        errno: u32,
        left: u64,
    },
    /// A complete request waiting for a slot, budget or the gate.
    Ready {
        cookie: u64,
        cmd: Command,
        payload: Option<AlignedBuf>,
    },
}

enum Fill {
    Data,
    Blocked,
    Eof,
}

struct Transmission<'a> {
    /// Dropped first: waits for the kernel to finish every request in flight, before their
    /// admissions and buffers go. A request's context is its cookie.
    exec: Executor<u64>,
    sock: Stream,
    export: &'a Export,
    epoll: Epoll,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    hdr: [u8; REQUEST_LEN],
    hdr_fill: usize,
    input: Input,
    out: VecDeque<Out>,
    /// Last time a byte moved either way or a request completed.
    last_progress: Instant,
    /// The client closed its sending side (or the socket hung up).
    eof: bool,
    /// NBD_CMD_DISC received, or the stream is unusable (bad magic).
    closing: bool,
    /// Writing failed: replies can no longer be delivered.
    peer_gone: bool,
    /// The socket reported a hang-up and was removed from epoll.
    hup: bool,
    /// Set when the server began shutting down.
    shutdown_deadline: Option<Instant>,
    interest: EventSet,
}

impl<'a> Transmission<'a> {
    fn new(sock: Stream, export: &'a Export) -> Result<Transmission<'a>> {
        let backend = Box::new(UringBackend::new(export.volume.clone(), DEPTH as u32)?);
        let budget = Budget::shared(&export.budget, export.serve.client_buffer)
            .map_err(|e| Error::io("creating an eventfd", e))?;
        let gate: Arc<dyn block::RequestGate> = Arc::new(Member::new(&export.gate)?);
        let exec = Executor::new(backend, DEPTH, budget, Some(gate));
        let epoll = Epoll::new().map_err(|e| Error::io("creating epoll", e))?;
        let ctx = |e| Error::io("registering with epoll", e);
        let ein = EventSet::IN;
        let watched = [
            Some((sock.as_raw_fd(), T_SOCK)),
            Some((exec.eventfd(), T_ENGINE)),
            exec.gate_waker().map(|waker| (waker, T_WAKER)),
            Some((exec.budget_waker(), T_BUDGET)),
            Some((export.shutdown.as_raw_fd(), T_SHUTDOWN)),
        ];
        for (fd, token) in watched.into_iter().flatten() {
            let ev = EpollEvent::new(ein, token);
            epoll.ctl(ControlOperation::Add, fd, ev).map_err(ctx)?;
        }
        Ok(Transmission {
            exec,
            sock,
            export,
            epoll,
            rbuf: vec![0u8; READ_BUF],
            rstart: 0,
            rend: 0,
            hdr: [0u8; REQUEST_LEN],
            hdr_fill: 0,
            input: Input::Header,
            out: VecDeque::new(),
            last_progress: Instant::now(),
            eof: false,
            closing: false,
            peer_gone: false,
            hup: false,
            shutdown_deadline: None,
            interest: ein,
        })
    }

    fn run(mut self) -> Result<()> {
        let mut buf = [EpollEvent::default(); sys::MAX_EVENTS];
        let mut done = Vec::new();
        loop {
            // Run until nothing moves: a completion frees a slot, sent output frees budget,
            // and either may unblock the next request; no event would report that.
            loop {
                self.pump_input()?;
                // Some requests finish inside `submit` (errors, flushes, reads of unwritten
                // blocks) without signalling the eventfd: collect them here.
                self.exec.poll(&mut done)?;
                let completed = !done.is_empty();
                self.complete(&mut done);
                let sent = self.flush_output();
                if !completed && !sent {
                    break;
                }
            }
            if self.finished() {
                return Ok(());
            }
            let idle_left = self.idle_left();
            if idle_left == Some(Duration::ZERO) {
                tracing::debug!(
                    "nbd: closing a client idle for {:?}",
                    self.export.serve.idle_timeout
                );
                return Ok(());
            }
            self.update_interest()?;
            let mut timeout = self
                .shutdown_deadline
                .map(|d| d.saturating_duration_since(Instant::now()));
            if let Some(left) = idle_left {
                timeout = Some(timeout.map_or(left, |t| t.min(left)));
            }
            if self.exec.in_flight() > 0 {
                // A write deferred behind another connection's range lock is retried only when
                // the engine is polled; nothing signals its eventfd when that lock is freed.
                timeout = Some(timeout.map_or(DEFERRED_RETRY, |t| t.min(DEFERRED_RETRY)));
            }
            let events = sys::wait_events(&self.epoll, &mut buf, timeout)
                .map_err(|e| Error::io("waiting on epoll", e))?;
            for ev in events {
                let hup = EventSet::HANG_UP | EventSet::ERROR;
                match ev.data() {
                    T_SOCK if EventSet::from_bits_truncate(ev.events()).intersects(hup) => {
                        self.on_hangup()?
                    }
                    T_ENGINE => {
                        self.clear_engine_fd();
                        self.exec.poll(&mut done)?;
                        self.complete(&mut done);
                    }
                    T_WAKER => self.exec.gate_woken(),
                    T_BUDGET => self.exec.budget_woken(),
                    T_SHUTDOWN if self.shutdown_deadline.is_none() => {
                        self.shutdown_deadline = Some(Instant::now() + SHUTDOWN_GRACE);
                        // Level-triggered and never cleared: stop watching it.
                        let fd = self.export.shutdown.as_raw_fd();
                        self.unwatch(fd)?;
                    }
                    _ => {}
                }
            }
        }
    }

    /// Time left before the client counts as idle, `None` while the server has work for it
    /// (requests in flight, or one waiting for the gate or the server's budget with nothing
    /// for the client to read) or without an idle timeout.
    fn idle_left(&self) -> Option<Duration> {
        let limit = self.export.serve.idle_timeout?;
        let waiting_for_server =
            matches!(self.input, Input::Ready { .. } | Input::NeedPayload { .. })
                && self.out.is_empty();
        if self.exec.in_flight() > 0 || self.exec.is_paused() || waiting_for_server {
            return None;
        }
        Some(limit.saturating_sub(self.last_progress.elapsed()))
    }

    fn clear_engine_fd(&self) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from the engine's eventfd, which stays open
        // while `self.exec` lives; EAGAIN (already clear) is harmless.
        let _ = unsafe { libc::read(self.exec.eventfd(), (&mut v as *mut u64).cast(), 8) };
    }

    /// Stops watching `fd`.
    fn unwatch(&self, fd: RawFd) -> Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            .map_err(|e| Error::io("epoll", e))
    }

    fn on_hangup(&mut self) -> Result<()> {
        if !self.hup {
            self.hup = true;
            // HUP is reported whatever the interest: stop watching, read what is left directly.
            self.unwatch(self.sock.as_raw_fd())?;
            self.interest = EventSet::empty();
        }
        Ok(())
    }

    /// Done when nothing is running and no more requests will be read.
    fn finished(&self) -> bool {
        let shutting = self.shutdown_deadline.is_some();
        let no_more_input = self.closing || shutting || self.peer_gone || self.eof;
        let pending_request =
            matches!(self.input, Input::Ready { .. }) && !shutting && !self.peer_gone;
        let grace_over = self.shutdown_deadline.is_some_and(|d| Instant::now() >= d);
        let output_done = self.out.is_empty() || self.peer_gone || grace_over;
        no_more_input && !pending_request && self.exec.in_flight() == 0 && output_done
    }

    fn may_read(&self) -> bool {
        !(self.eof || self.closing || self.peer_gone || self.shutdown_deadline.is_some())
            && self.out.len() < MAX_QUEUED
    }

    fn update_interest(&mut self) -> Result<()> {
        if self.hup {
            return Ok(());
        }
        let wants_bytes = matches!(
            self.input,
            Input::Header | Input::Payload { .. } | Input::Discard { .. }
        );
        let mut want = EventSet::empty();
        if self.may_read() && wants_bytes {
            want |= EventSet::IN;
        }
        if !self.out.is_empty() && !self.peer_gone {
            want |= EventSet::OUT;
        }
        if want != self.interest {
            let ev = EpollEvent::new(want, T_SOCK);
            self.epoll
                .ctl(ControlOperation::Modify, self.sock.as_raw_fd(), ev)
                .map_err(|e| Error::io("epoll", e))?;
            self.interest = want;
        }
        Ok(())
    }

    /// Reads more bytes into the read-ahead buffer.
    fn fill(&mut self) -> Fill {
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        } else if self.rend == self.rbuf.len() {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        loop {
            match self.sock.read(&mut self.rbuf[self.rend..]) {
                Ok(0) => {
                    self.eof = true;
                    return Fill::Eof;
                }
                Ok(n) => {
                    self.rend += n;
                    self.last_progress = Instant::now();
                    return Fill::Data;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Fill::Blocked,
                Err(e) => {
                    tracing::debug!("nbd client read failed: {e}");
                    self.eof = true;
                    self.lose_peer();
                    return Fill::Eof;
                }
            }
        }
    }

    /// Takes up to `n` buffered bytes.
    fn take_buffered(&mut self, n: usize) -> &[u8] {
        let k = n.min(self.rend - self.rstart);
        let s = self.rstart;
        self.rstart += k;
        &self.rbuf[s..s + k]
    }

    /// Advances the request reader as far as it can go without blocking.
    fn pump_input(&mut self) -> Result<()> {
        loop {
            match std::mem::replace(&mut self.input, Input::Header) {
                Input::Ready {
                    cookie,
                    cmd,
                    payload,
                } => {
                    if self.peer_gone || self.shutdown_deadline.is_some() {
                        self.release(payload.as_ref().map_or(0, AlignedBuf::len));
                        return Ok(());
                    }
                    if let Some(back) = self.try_submit(cookie, cmd, payload)? {
                        self.input = back;
                        return Ok(());
                    }
                }
                Input::Header => {
                    if !self.may_read() {
                        return Ok(());
                    }
                    let need = REQUEST_LEN - self.hdr_fill;
                    let got = self.take_buffered(need).len();
                    let (start, end) = (self.rstart - got, self.rstart);
                    self.hdr[self.hdr_fill..self.hdr_fill + got]
                        .copy_from_slice(&self.rbuf[start..end]);
                    self.hdr_fill += got;
                    if self.hdr_fill < REQUEST_LEN {
                        match self.fill() {
                            Fill::Data => continue,
                            Fill::Blocked | Fill::Eof => return Ok(()),
                        }
                    }
                    self.hdr_fill = 0;
                    self.input = self.parse_header();
                }
                Input::NeedPayload { cookie, cmd, len } => {
                    if !self.exec.reserve(len as u64) {
                        self.input = Input::NeedPayload { cookie, cmd, len };
                        return Ok(());
                    }
                    self.input = Input::Payload {
                        cookie,
                        cmd,
                        buf: AlignedBuf::new(len),
                        filled: 0,
                    };
                }
                Input::Payload {
                    cookie,
                    cmd,
                    mut buf,
                    mut filled,
                } => {
                    let chunk = self.take_buffered(buf.len() - filled);
                    let k = chunk.len();
                    buf.as_mut_slice()[filled..filled + k].copy_from_slice(chunk);
                    filled += k;
                    while filled < buf.len() && self.may_read() {
                        match self.sock.read(&mut buf.as_mut_slice()[filled..]) {
                            Ok(0) => self.eof = true,
                            Ok(n) => {
                                filled += n;
                                self.last_progress = Instant::now();
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(_) => {
                                self.eof = true;
                                self.lose_peer();
                            }
                        }
                    }
                    if filled < buf.len() {
                        if self.eof || self.peer_gone || self.shutdown_deadline.is_some() {
                            self.release(buf.len()); // disconnected mid-request
                        } else {
                            self.input = Input::Payload {
                                cookie,
                                cmd,
                                buf,
                                filled,
                            };
                        }
                        return Ok(());
                    }
                    self.input = Input::Ready {
                        cookie,
                        cmd,
                        payload: Some(buf),
                    };
                }
                Input::Discard {
                    cookie,
                    errno,
                    mut left,
                } => {
                    left -= self
                        .take_buffered(usize::try_from(left).unwrap_or(usize::MAX))
                        .len() as u64;
                    if left == 0 {
                        self.reply(cookie, errno, None, 0);
                        continue;
                    }
                    self.input = Input::Discard {
                        cookie,
                        errno,
                        left,
                    };
                    if !self.may_read() {
                        return Ok(());
                    }
                    match self.fill() {
                        Fill::Data => continue,
                        Fill::Blocked | Fill::Eof => return Ok(()),
                    }
                }
            }
        }
    }

    /// Turns a complete header into the next input state.
    fn parse_header(&mut self) -> Input {
        let Some(h) = RequestHeader::parse(&self.hdr) else {
            tracing::debug!("nbd: bad request magic, closing the connection");
            self.closing = true;
            return Input::Header;
        };
        match decide(&h, &self.export.limits) {
            Decision::Reject { errno, skip: 0 } => {
                self.reply(h.cookie, errno, None, 0);
                Input::Header
            }
            Decision::Reject { errno, skip } => Input::Discard {
                cookie: h.cookie,
                errno,
                left: skip,
            },
            Decision::Run(Command::Disconnect) => {
                self.closing = true;
                Input::Header
            }
            Decision::Run(cmd @ Command::Write { len, .. }) if len > 0 => Input::NeedPayload {
                cookie: h.cookie,
                cmd,
                len: len as usize,
            },
            Decision::Run(cmd) => Input::Ready {
                cookie: h.cookie,
                cmd,
                payload: None,
            },
        }
    }

    /// Starts a complete request. Returns it back when it cannot start yet.
    fn try_submit(
        &mut self,
        cookie: u64,
        cmd: Command,
        payload: Option<AlignedBuf>,
    ) -> Result<Option<Input>> {
        let held = payload.as_ref().map_or(0, AlignedBuf::len);
        let op = match (cmd, payload) {
            // Requests that need no journal work.
            (Command::Flush, _) if self.export.limits.read_only => None,
            (Command::Read { len: 0, .. } | Command::Write { len: 0, .. }, _) => None,
            (Command::Trim { len: 0, .. } | Command::WriteZeroes { len: 0, .. }, _) => None,
            (Command::Disconnect, _) => None,
            (Command::Read { offset, len }, _) => Some(Op::Read {
                offset,
                len: u64::from(len),
            }),
            (Command::Write { offset, fua, .. }, Some(buf)) => Some(Op::Write { offset, buf, fua }),
            (Command::Flush, _) => Some(Op::Flush),
            (Command::Trim { offset, len, fua }, _) => Some(Op::Discard {
                ranges: vec![(offset, u64::from(len))],
                fua,
            }),
            (Command::WriteZeroes { offset, len, fua }, _) => Some(Op::WriteZeroes {
                ranges: vec![(offset, u64::from(len))],
                fua,
            }),
            // A write always carries its payload.
            (Command::Write { .. }, None) => {
                self.reply(cookie, EINVAL, None, 0);
                return Ok(None);
            }
        };
        let Some(op) = op else {
            self.release(held);
            self.reply(cookie, 0, None, 0);
            return Ok(None);
        };
        let mut ticket = match self.exec.admit(op.parts(), op.alloc_bytes()) {
            Ok(t) => t,
            Err(_) => {
                let payload = match op {
                    Op::Write { buf, .. } => Some(buf),
                    _ => None,
                };
                return Ok(Some(Input::Ready {
                    cookie,
                    cmd,
                    payload,
                }));
            }
        };
        ticket.carry(held as u64);
        let mut done = Vec::new();
        self.exec.start(ticket, cookie, op, &mut done);
        self.complete(&mut done);
        Ok(None)
    }

    /// Turns finished requests into replies.
    fn complete(&mut self, done: &mut Vec<Done<u64>>) {
        if !done.is_empty() {
            self.last_progress = Instant::now();
        }
        for d in done.drain(..) {
            let held = usize::try_from(d.held).unwrap_or(usize::MAX);
            match d.result {
                Ok(data) => self.reply(d.ctx, 0, data, held),
                Err(e) => {
                    tracing::debug!("nbd: request failed: {e}");
                    self.reply(d.ctx, errno_of(&e), None, held);
                }
            }
        }
    }

    /// Gives back `n` bytes of budget.
    fn release(&mut self, n: usize) {
        self.exec.release(n as u64);
    }

    /// The client cannot be answered any more: requests in flight finish unanswered.
    fn lose_peer(&mut self) {
        self.peer_gone = true;
        self.exec.cancel_all();
    }

    /// Queues a reply; `reserved` bytes of budget are released once it is sent.
    fn reply(&mut self, cookie: u64, errno: u32, data: Option<AlignedBuf>, reserved: usize) {
        if self.peer_gone {
            self.release(reserved);
            return;
        }
        self.out.push_back(Out {
            head: simple_reply(cookie, errno),
            data,
            pos: 0,
            reserved,
        });
    }

    /// Writes queued replies until the socket would block; true if anything was written.
    fn flush_output(&mut self) -> bool {
        let mut sent = false;
        while !self.out.is_empty() && !self.peer_gone {
            let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(64);
            for m in self.out.iter().take(32) {
                let (h, d) = m.parts();
                for part in [h, d] {
                    if !part.is_empty() {
                        iov.push(IoSlice::new(part));
                    }
                }
            }
            let err = match self.sock.write_vectored(&iov) {
                Ok(0) => io::Error::from(io::ErrorKind::WriteZero),
                Ok(n) => {
                    self.advance_output(n);
                    self.last_progress = Instant::now();
                    sent = true;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !self.hup => return sent,
                Err(e) => e,
            };
            tracing::debug!("nbd client write failed: {err}");
            self.lose_peer();
            for m in std::mem::take(&mut self.out) {
                self.release(m.reserved);
            }
            return true;
        }
        sent
    }

    fn advance_output(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.out.front_mut() else {
                return;
            };
            let left = front.remaining();
            if n < left {
                front.pos += n;
                return;
            }
            n -= left;
            let reserved = front.reserved;
            self.out.pop_front();
            self.release(reserved);
        }
    }
}

#[cfg(test)]
#[path = "conformance_tests.rs"]
mod conformance_tests;
#[cfg(test)]
#[path = "connection_tests.rs"]
mod tests;
