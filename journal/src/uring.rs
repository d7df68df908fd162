//! Many requests in flight over a [`Volume`] on io_uring.
#![allow(unused)]

use std::os::fd::RawFd;
use std::sync::Arc;

use crate::{AlignedBuf, Result, Volume};

/// A block request.
#[derive(Debug)]
pub enum Request {
    /// Read `len` bytes at `offset`; the completion carries the data.
    Read { offset: u64, len: u64 },
    /// Write `buf` at `offset`; with `fua` durable on completion.
    Write { offset: u64, buf: AlignedBuf, fua: bool },
    /// Make every write completed before this request durable.
    Flush,
    /// Make a range read as zeros.
    WriteZeroes { offset: u64, len: u64, fua: bool },
    /// Discard a range (reads as zeros afterwards).
    Discard { offset: u64, len: u64 },
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// The token given to [`IoEngine::submit`].
    pub token: u64,
    /// `Some(buf)` with the data for reads, `None` for other requests.
    pub result: Result<Option<AlignedBuf>>,
}

/// Drives requests against one volume on an io_uring instance. Not thread-safe: one owner
/// thread submits and reaps.
pub struct IoEngine {}

impl IoEngine {
    /// An engine for `volume` with room for `depth` requests in flight.
    pub fn new(volume: Arc<Volume>, depth: u32) -> Result<IoEngine> {
        todo!()
    }

    /// Starts a request. Invalid requests (unaligned, out of range, write to read-only) are
    /// not rejected here: they complete with an error.
    pub fn submit(&mut self, token: u64, req: Request) -> Result<()> {
        todo!()
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        todo!()
    }

    /// Appends finished requests to `out` without blocking.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        todo!()
    }

    /// Blocks until at least `min` requests have finished (or none are in flight) and
    /// appends them to `out`.
    pub fn wait(&mut self, min: usize, out: &mut Vec<Completion>) -> Result<()> {
        todo!()
    }

    /// An eventfd that becomes readable when completions may be ready (for epoll loops).
    /// Read it to clear it, then call [`IoEngine::poll`].
    pub fn eventfd(&self) -> RawFd {
        todo!()
    }

    /// The volume this engine drives.
    pub fn volume(&self) -> &Arc<Volume> {
        todo!()
    }
}
