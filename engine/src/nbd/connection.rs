//! One NBD client: handshake, then the transmission phase on its own thread and its own
//! [`IoEngine`]. Requests are read without blocking, submitted as soon as they are complete
//! (many in flight), and answered with simple replies in completion order.
//!
//! Memory per connection is bounded: at most [`DEPTH`] requests in flight, at most
//! [`MAX_BUFFERED`] bytes of payload held (plus one request), at most [`MAX_QUEUED`] replies
//! waiting for the client to read them. Past a limit the connection stops reading.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use journal::{AlignedBuf, Completion, IoEngine, Request, Volume};

use super::handshake::{negotiate, Outcome};
use super::protocol::*;
use super::stream::Stream;
use crate::quiesce::Gate;
use crate::sys::{Epoll, EventFd};
use crate::{Error, Result};

/// Requests in flight per connection.
pub const DEPTH: usize = 64;
/// Payload bytes (write data received, read data pending) a connection may hold.
pub const MAX_BUFFERED: usize = 64 << 20;
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

/// What every connection of one server shares.
pub struct Export {
    pub volume: Arc<Volume>,
    pub limits: ExportLimits,
    pub gate: Arc<Gate>,
    /// Readable once the server is shutting down (never cleared).
    pub shutdown: Arc<EventFd>,
}

/// Serves one accepted client until it disconnects or the server shuts down.
pub fn serve(mut stream: Stream, export: &Export) -> Result<()> {
    stream
        .set_nonblocking()
        .map_err(|e| Error::io("configuring client socket", e))?;
    match negotiate(&mut stream, &export.limits, export.shutdown.as_raw_fd()) {
        Ok(Outcome::Transmit) => Transmission::new(stream, export)?.run(),
        Ok(Outcome::Closed) => Ok(()),
        Err(e) => {
            tracing::debug!("nbd handshake ended: {e}");
            Ok(())
        }
    }
}

/// A request taken by the engine.
struct Slot {
    cookie: u64,
    /// Read length expected back, for reads.
    read_len: Option<usize>,
    /// Payload bytes this request holds against [`MAX_BUFFERED`].
    reserved: usize,
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
    sock: Stream,
    export: &'a Export,
    engine: IoEngine,
    epoll: Epoll,
    waker: Arc<EventFd>,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    hdr: [u8; REQUEST_LEN],
    hdr_fill: usize,
    input: Input,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    out: VecDeque<Out>,
    reserved: usize,
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
    /// The gate refused the pending request; wait for the waker.
    paused: bool,
    interest: u32,
}

impl<'a> Transmission<'a> {
    fn new(sock: Stream, export: &'a Export) -> Result<Transmission<'a>> {
        let engine = IoEngine::new(export.volume.clone(), DEPTH as u32)?;
        let epoll = Epoll::new().map_err(|e| Error::io("creating epoll", e))?;
        let waker = export.gate.subscribe()?;
        let ctx = |e| Error::io("registering with epoll", e);
        let ein = libc::EPOLLIN as u32;
        epoll.add(sock.as_raw_fd(), ein, T_SOCK).map_err(ctx)?;
        epoll.add(engine.eventfd(), ein, T_ENGINE).map_err(ctx)?;
        epoll.add(waker.as_raw_fd(), ein, T_WAKER).map_err(ctx)?;
        epoll
            .add(export.shutdown.as_raw_fd(), ein, T_SHUTDOWN)
            .map_err(ctx)?;
        Ok(Transmission {
            sock,
            export,
            engine,
            epoll,
            waker,
            rbuf: vec![0u8; READ_BUF],
            rstart: 0,
            rend: 0,
            hdr: [0u8; REQUEST_LEN],
            hdr_fill: 0,
            input: Input::Header,
            slots: (0..DEPTH).map(|_| None).collect(),
            free: (0..DEPTH).rev().collect(),
            out: VecDeque::new(),
            reserved: 0,
            eof: false,
            closing: false,
            peer_gone: false,
            hup: false,
            shutdown_deadline: None,
            paused: false,
            interest: ein,
        })
    }

    fn run(mut self) -> Result<()> {
        let mut events = Vec::new();
        let mut done = Vec::new();
        loop {
            // Run until nothing moves: a completion frees a slot, sent output frees budget,
            // and either may unblock the next request; no event would report that.
            loop {
                self.pump_input()?;
                // Some requests finish inside `submit` (errors, flushes, reads of unwritten
                // blocks) without signalling the eventfd: collect them here.
                self.engine.poll(&mut done)?;
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
            self.update_interest()?;
            let mut timeout = self
                .shutdown_deadline
                .map(|d| d.saturating_duration_since(Instant::now()));
            if self.engine.in_flight() > 0 {
                // A write deferred behind another connection's range lock is retried only when
                // the engine is polled; nothing signals its eventfd when that lock is freed.
                timeout = Some(timeout.map_or(DEFERRED_RETRY, |t| t.min(DEFERRED_RETRY)));
            }
            self.epoll
                .wait(&mut events, timeout)
                .map_err(|e| Error::io("waiting on epoll", e))?;
            for &(token, ev) in &events {
                match token {
                    T_SOCK if ev & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 => {
                        self.on_hangup()?
                    }
                    T_ENGINE => {
                        self.clear_engine_fd();
                        self.engine.poll(&mut done)?;
                        self.complete(&mut done);
                    }
                    T_WAKER => {
                        self.waker.clear();
                        self.paused = false;
                    }
                    T_SHUTDOWN if self.shutdown_deadline.is_none() => {
                        self.shutdown_deadline = Some(Instant::now() + SHUTDOWN_GRACE);
                        // Level-triggered and never cleared: stop watching it.
                        let fd = self.export.shutdown.as_raw_fd();
                        self.epoll.delete(fd).map_err(|e| Error::io("epoll", e))?;
                    }
                    _ => {}
                }
            }
        }
    }

    fn clear_engine_fd(&self) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from the engine's eventfd, which stays open
        // while `self.engine` lives; EAGAIN (already clear) is harmless.
        let _ = unsafe { libc::read(self.engine.eventfd(), (&mut v as *mut u64).cast(), 8) };
    }

    fn on_hangup(&mut self) -> Result<()> {
        if !self.hup {
            self.hup = true;
            // HUP is reported whatever the interest: stop watching, read what is left directly.
            self.epoll
                .delete(self.sock.as_raw_fd())
                .map_err(|e| Error::io("epoll", e))?;
            self.interest = 0;
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
        no_more_input && !pending_request && self.engine.in_flight() == 0 && output_done
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
        let mut want = 0;
        if self.may_read() && wants_bytes {
            want |= libc::EPOLLIN as u32;
        }
        if !self.out.is_empty() && !self.peer_gone {
            want |= libc::EPOLLOUT as u32;
        }
        if want != self.interest {
            self.epoll
                .modify(self.sock.as_raw_fd(), want, T_SOCK)
                .map_err(|e| Error::io("epoll", e))?;
            self.interest = want;
        }
        Ok(())
    }

    fn budget_allows(&self, n: usize) -> bool {
        self.reserved == 0 || self.reserved + n <= MAX_BUFFERED
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
                    return Fill::Data;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Fill::Blocked,
                Err(e) => {
                    tracing::debug!("nbd client read failed: {e}");
                    self.eof = true;
                    self.peer_gone = true;
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
                        self.reserved -= payload.as_ref().map_or(0, AlignedBuf::len);
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
                    if !self.budget_allows(len) {
                        self.input = Input::NeedPayload { cookie, cmd, len };
                        return Ok(());
                    }
                    self.reserved += len;
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
                            Ok(n) => filled += n,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(_) => (self.eof, self.peer_gone) = (true, true),
                        }
                    }
                    if filled < buf.len() {
                        if self.eof || self.peer_gone || self.shutdown_deadline.is_some() {
                            self.reserved -= buf.len(); // disconnected mid-request
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

    /// Submits a complete request. Returns it back when it cannot start yet.
    fn try_submit(
        &mut self,
        cookie: u64,
        cmd: Command,
        payload: Option<AlignedBuf>,
    ) -> Result<Option<Input>> {
        let held = payload.as_ref().map_or(0, AlignedBuf::len);
        // Requests that need no journal work.
        let trivial = match cmd {
            Command::Flush => self.export.limits.read_only,
            Command::Read { len, .. } | Command::Write { len, .. } => len == 0,
            Command::Trim { len, .. } | Command::WriteZeroes { len, .. } => len == 0,
            Command::Disconnect => true,
        };
        if trivial {
            self.reserved -= held;
            self.reply(cookie, 0, None, 0);
            return Ok(None);
        }
        let read_len = match cmd {
            Command::Read { len, .. } => Some(len as usize),
            _ => None,
        };
        let need = read_len.unwrap_or(0);
        if self.free.is_empty() || self.paused || (need > 0 && !self.budget_allows(need)) {
            return Ok(Some(Input::Ready {
                cookie,
                cmd,
                payload,
            }));
        }
        if !self.export.gate.try_admit() {
            self.paused = true;
            return Ok(Some(Input::Ready {
                cookie,
                cmd,
                payload,
            }));
        }
        let req = match (cmd, payload) {
            (Command::Read { offset, len }, _) => Request::Read {
                offset,
                len: u64::from(len),
            },
            (Command::Write { offset, fua, .. }, Some(buf)) => Request::Write { offset, buf, fua },
            (Command::Flush, _) => Request::Flush,
            (Command::Trim { offset, len }, _) => Request::Discard {
                offset,
                len: u64::from(len),
            },
            (Command::WriteZeroes { offset, len, fua }, _) => Request::WriteZeroes {
                offset,
                len: u64::from(len),
                fua,
            },
            // A write always carries its payload and Disconnect is trivial.
            (Command::Write { .. } | Command::Disconnect, _) => {
                self.export.gate.release();
                self.reserved -= held;
                self.reply(cookie, EINVAL, None, 0);
                return Ok(None);
            }
        };
        let Some(idx) = self.free.pop() else {
            self.export.gate.release();
            return Err(Error::Protocol("internal: no free request slot".into()));
        };
        match self.engine.submit(idx as u64, req) {
            Ok(()) => {
                self.reserved += need;
                self.slots[idx] = Some(Slot {
                    cookie,
                    read_len,
                    reserved: need + held,
                });
            }
            Err(e) => {
                self.free.push(idx);
                self.export.gate.release();
                self.reserved -= held;
                self.reply(cookie, errno_of(&e), None, 0);
            }
        }
        Ok(None)
    }

    /// Turns engine completions into replies.
    fn complete(&mut self, done: &mut Vec<Completion>) {
        for c in done.drain(..) {
            let idx = usize::try_from(c.token).unwrap_or(usize::MAX);
            let Some(slot) = self.slots.get_mut(idx).and_then(Option::take) else {
                tracing::warn!("nbd: completion with unknown token {}", c.token);
                continue;
            };
            self.free.push(idx);
            self.export.gate.release();
            match (c.result, slot.read_len) {
                (Ok(Some(buf)), Some(len)) if buf.len() == len => {
                    self.reply(slot.cookie, 0, Some(buf), slot.reserved);
                }
                (Ok(_), Some(_)) => {
                    tracing::error!("nbd: read completed without the expected data");
                    self.reserved -= slot.reserved;
                    self.reply(slot.cookie, EIO, None, 0);
                }
                (Ok(_), None) => {
                    self.reserved -= slot.reserved;
                    self.reply(slot.cookie, 0, None, 0);
                }
                (Err(e), _) => {
                    tracing::debug!("nbd: request failed: {e}");
                    self.reserved -= slot.reserved;
                    self.reply(slot.cookie, errno_of(&e), None, 0);
                }
            }
        }
    }

    /// Queues a reply; `reserved` bytes of budget are released once it is sent.
    fn reply(&mut self, cookie: u64, errno: u32, data: Option<AlignedBuf>, reserved: usize) {
        if self.peer_gone {
            self.reserved -= reserved;
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
                    sent = true;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !self.hup => return sent,
                Err(e) => e,
            };
            tracing::debug!("nbd client write failed: {err}");
            self.peer_gone = true;
            for m in self.out.drain(..) {
                self.reserved -= m.reserved;
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
            self.reserved -= front.reserved;
            self.out.pop_front();
        }
    }
}

#[cfg(test)]
#[path = "connection_tests.rs"]
mod tests;
