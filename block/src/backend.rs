//! One submit/complete interface over the two ways of running journal requests: io_uring
//! ([`journal::IoEngine`], the default) and plain blocking calls on [`journal::Volume`]
//! (a reference implementation; the same conformance suite runs against both).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use journal::{AlignedBuf, Completion, IoEngine, Rejected, Request, Volume};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Which backend a device runs its requests on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendKind {
    /// Many requests in flight on io_uring.
    #[default]
    Uring,
    /// Each request runs to completion, blocking the device's worker thread, when submitted.
    Blocking,
}

/// Runs journal requests identified by tokens. One owner thread submits and reaps.
pub trait Backend {
    /// Starts a request. An `Err` means it was not started: nothing of it is queued, no
    /// completion will carry `token`, and the request comes back in the [`Rejected`].
    fn submit(&mut self, token: u64, req: Request) -> Result<(), Rejected>;
    /// Appends finished requests to `out` without blocking.
    fn poll(&mut self, out: &mut Vec<Completion>) -> journal::Result<()>;
    /// Blocks until at least `min` requests finished (or none are in flight).
    fn wait(&mut self, min: usize, out: &mut Vec<Completion>) -> journal::Result<()>;
    /// Requests submitted and not yet reaped.
    fn in_flight(&self) -> usize;
    /// Readable when completions may be ready; read it to clear it, then `poll`.
    fn eventfd(&self) -> RawFd;
    /// The io_uring descriptor, if the backend has one (diagnostics, fault-injection tests).
    fn ring_fd(&self) -> Option<RawFd> {
        None
    }
}

/// Creates a backend of `kind` over `volume` with room for `depth` requests in flight.
pub fn open(
    kind: BackendKind,
    volume: Arc<Volume>,
    depth: u32,
) -> Result<Box<dyn Backend>, crate::Error> {
    Ok(match kind {
        BackendKind::Uring => Box::new(UringBackend::new(volume, depth)?),
        BackendKind::Blocking => Box::new(BlockingBackend::new(volume)?),
    })
}

/// io_uring via [`journal::IoEngine`].
pub struct UringBackend {
    engine: IoEngine,
}

impl UringBackend {
    pub fn new(volume: Arc<Volume>, depth: u32) -> journal::Result<Self> {
        Ok(UringBackend {
            engine: IoEngine::new(volume, depth)?,
        })
    }
}

impl Backend for UringBackend {
    fn submit(&mut self, token: u64, req: Request) -> Result<(), Rejected> {
        self.engine.submit(token, req)
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> journal::Result<()> {
        self.engine.poll(out)
    }

    fn wait(&mut self, min: usize, out: &mut Vec<Completion>) -> journal::Result<()> {
        self.engine.wait(min, out)
    }

    fn in_flight(&self) -> usize {
        self.engine.in_flight()
    }

    fn eventfd(&self) -> RawFd {
        self.engine.eventfd()
    }

    fn ring_fd(&self) -> Option<RawFd> {
        Some(self.engine.ring_fd())
    }
}

/// Blocking calls on the volume, run at submit time.
pub struct BlockingBackend {
    volume: Arc<Volume>,
    done: VecDeque<Completion>,
    event: EventFd,
}

impl BlockingBackend {
    pub fn new(volume: Arc<Volume>) -> Result<Self, crate::Error> {
        Ok(BlockingBackend {
            volume,
            done: VecDeque::new(),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn run(&self, req: Request) -> journal::Result<Option<AlignedBuf>> {
        let v = &self.volume;
        match req {
            Request::Read { offset, len } => {
                let len = usize::try_from(len)
                    .map_err(|_| journal::Error::Invalid(format!("read of {len} bytes")))?;
                let mut buf = AlignedBuf::new(len);
                v.read_at(buf.as_mut_slice(), offset)?;
                Ok(Some(buf))
            }
            Request::Write { offset, buf, fua } => {
                v.write_at(buf.as_slice(), offset, fua).map(|()| None)
            }
            Request::Flush => v.flush().map(|()| None),
            Request::WriteZeroes { offset, len, fua } => {
                v.write_zeroes(offset, len, fua).map(|()| None)
            }
            Request::Discard { offset, len } => v.discard(offset, len).map(|()| None),
        }
    }
}

impl Backend for BlockingBackend {
    fn submit(&mut self, token: u64, req: Request) -> Result<(), Rejected> {
        let result = self.run(req);
        self.done.push_back(Completion { token, result });
        // A full eventfd counter only means it is already readable.
        let _ = self.event.write(1);
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> journal::Result<()> {
        out.extend(self.done.drain(..));
        Ok(())
    }

    fn wait(&mut self, _min: usize, out: &mut Vec<Completion>) -> journal::Result<()> {
        self.poll(out)
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn eventfd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
}
