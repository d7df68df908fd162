//! virtio-blk on the shared [`crate::executor::Executor`]: turns parsed requests into
//! front-end-neutral [`Op`]s (copying guest data into aligned buffers for writes), and each
//! finished request into guest memory (read data) and its status byte.
//!
//! The bounds are the executor's: at most `depth` journal requests in flight and at most
//! `max_buffer_bytes` of data buffers (each request is already bounded by
//! [`crate::request::Limits::max_data_bytes`]); one request always fits when nothing is in
//! flight. A request that does not fit, or that the gate holds back, is handed back to the
//! worker ([`GuestExecutor::try_start`]) and waits in its pending list.

use std::os::fd::RawFd;
use std::sync::Arc;

use journal::AlignedBuf;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::backend::Backend;
use crate::budget::Budget;
use crate::executor::{self, Executor, Op};
use crate::gate::RequestGate;
use crate::guest::SegList;
use crate::request::{Request, RequestKind, VIRTIO_BLK_ID_BYTES};
use crate::status::{self, Status};

/// A finished request, ready for the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    pub queue: u16,
    pub head: u16,
    /// Bytes written into the chain's device-writable buffers (data plus status).
    pub used_len: u32,
}

/// What the executor carries for a virtio request.
struct Ctx {
    queue: u16,
    head: u16,
    status_addr: GuestAddress,
    /// For reads: where the data goes.
    read_into: Option<SegList>,
}

/// Executes the requests of one device.
pub struct GuestExecutor {
    exec: Executor<Ctx>,
    finished: Vec<executor::Done<Ctx>>,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    write_through: bool,
}

impl GuestExecutor {
    /// `id` is the GET_ID serial; `depth` the most journal requests in flight.
    pub fn new(
        backend: Box<dyn Backend>,
        id: [u8; VIRTIO_BLK_ID_BYTES],
        depth: usize,
        max_buffer_bytes: u64,
        gate: Option<Arc<dyn RequestGate>>,
    ) -> Result<Self, crate::Error> {
        Ok(GuestExecutor {
            exec: Executor::new(backend, depth, Budget::local(max_buffer_bytes)?, gate),
            finished: Vec::new(),
            id,
            write_through: false,
        })
    }

    /// With write-through, every write is durable when it completes (used when the driver did
    /// not negotiate VIRTIO_BLK_F_FLUSH and so cannot ask for durability).
    pub fn set_write_through(&mut self, on: bool) {
        self.write_through = on;
    }

    /// Requests started and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.exec.in_flight()
    }

    /// The backend's completion eventfd.
    pub fn eventfd(&self) -> RawFd {
        self.exec.eventfd()
    }

    /// The gate's waker, if the device has a gate.
    pub fn gate_waker(&self) -> Option<RawFd> {
        self.exec.gate_waker()
    }

    /// The gate's waker fired.
    pub fn gate_woken(&mut self) {
        self.exec.gate_woken();
    }

    /// Writes `status` for a request that was refused without I/O.
    pub fn reject(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: u16,
        head: u16,
        status_addr: GuestAddress,
        st: Status,
        done: &mut Vec<Done>,
    ) {
        write_status(mem, status_addr, st);
        done.push(Done {
            queue,
            head,
            used_len: 1,
        });
    }

    /// Starts `req`, or hands it back when it must wait (no room, or the gate is closed).
    /// Requests that need no I/O (or fail before it) finish into `done` at once.
    pub fn try_start(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: u16,
        req: Request,
        done: &mut Vec<Done>,
    ) -> Result<(), Request> {
        let finish_now = |st: Status, written: u32, done: &mut Vec<Done>| {
            write_status(mem, req.status, st);
            done.push(Done {
                queue,
                head: req.head,
                used_len: written.saturating_add(1),
            });
        };
        let (parts, alloc) = match &req.kind {
            RequestKind::GetId { data } => {
                let n = (data.len() as usize).min(VIRTIO_BLK_ID_BYTES);
                match data.write_from(mem, &self.id[..n]) {
                    Ok(()) => finish_now(Status::Ok, n as u32, done),
                    Err(e) => finish_now(status::for_guest_memory_error(&e), 0, done),
                }
                return Ok(());
            }
            RequestKind::Read { data, .. } | RequestKind::Write { data, .. } if data.is_empty() => {
                finish_now(Status::Ok, 0, done);
                return Ok(());
            }
            RequestKind::Discard { ranges } | RequestKind::WriteZeroes { ranges }
                if ranges.iter().all(|r| r.len == 0) =>
            {
                finish_now(Status::Ok, 0, done);
                return Ok(());
            }
            RequestKind::Discard { ranges } | RequestKind::WriteZeroes { ranges } => {
                (ranges.len(), 0)
            }
            RequestKind::Read { data, .. } => (1, data.len()),
            // The write buffer is allocated here, not by the executor, but it is held the same.
            RequestKind::Write { data, .. } => (1, data.len()),
            RequestKind::Flush => (1, 0),
        };
        let ticket = match self.exec.admit(parts, alloc) {
            Ok(t) => t,
            Err(_) => return Err(req),
        };
        let Request {
            head,
            kind,
            status: status_addr,
        } = req;
        let fua = self.write_through;
        let mut read_into = None;
        let op = match kind {
            RequestKind::Read { offset, data } => {
                let len = data.len();
                read_into = Some(data);
                Op::Read { offset, len }
            }
            RequestKind::Write { offset, data } => {
                // data.len() <= Limits::max_data_bytes (a u32), checked by the parser.
                let mut buf = AlignedBuf::new(data.len() as usize);
                if let Err(e) = data.read_into(mem, buf.as_mut_slice()) {
                    self.exec.abandon(ticket);
                    write_status(mem, status_addr, status::for_guest_memory_error(&e));
                    done.push(Done {
                        queue,
                        head,
                        used_len: 1,
                    });
                    return Ok(());
                }
                Op::Write { offset, buf, fua }
            }
            RequestKind::Flush => Op::Flush,
            RequestKind::Discard { ranges } => Op::Discard {
                ranges: ranges.iter().map(|r| (r.offset, r.len)).collect(),
                fua: false,
            },
            RequestKind::WriteZeroes { ranges } => Op::WriteZeroes {
                ranges: ranges.iter().map(|r| (r.offset, r.len)).collect(),
                fua,
            },
            RequestKind::GetId { .. } => unreachable!("finished above"),
        };
        let ctx = Ctx {
            queue,
            head,
            status_addr,
            read_into,
        };
        self.exec.start(ticket, ctx, op, &mut self.finished);
        self.deliver(mem, done);
        Ok(())
    }

    /// Collects finished requests without blocking.
    pub fn reap(
        &mut self,
        mem: &GuestMemoryMmap,
        done: &mut Vec<Done>,
    ) -> Result<(), crate::Error> {
        let res = self.exec.poll(&mut self.finished);
        self.deliver(mem, done);
        res.map_err(crate::Error::from)
    }

    /// Waits for every started request to finish. If the backend fails, the requests still
    /// in flight finish with IOERR.
    pub fn drain(&mut self, mem: &GuestMemoryMmap, done: &mut Vec<Done>) {
        self.exec.drain(&mut self.finished);
        self.deliver(mem, done);
    }

    /// Copies read data into the guest and writes each finished request's status.
    fn deliver(&mut self, mem: &GuestMemoryMmap, done: &mut Vec<Done>) {
        for d in self.finished.drain(..) {
            let executor::Done { ctx, result, held } = d;
            let (st, written) = match (result, ctx.read_into.as_ref()) {
                (Err(e), _) => (status::for_journal_error(&e), 0),
                (Ok(Some(buf)), Some(data)) if buf.len() as u64 == data.len() => {
                    match data.write_from(mem, buf.as_slice()) {
                        Ok(()) => (Status::Ok, buf.len() as u32),
                        Err(e) => (status::for_guest_memory_error(&e), 0),
                    }
                }
                (Ok(None), None) => (Status::Ok, 0),
                (Ok(_), _) => {
                    tracing::error!("a completion does not match its request");
                    (Status::IoErr, 0)
                }
            };
            self.exec.release(held);
            write_status(mem, ctx.status_addr, st);
            done.push(Done {
                queue: ctx.queue,
                head: ctx.head,
                used_len: written.saturating_add(1),
            });
        }
    }
}

fn write_status(mem: &GuestMemoryMmap, addr: GuestAddress, st: Status) {
    // The parser checked the address; it can only fail if guest memory changed under us, and
    // then there is nobody left to tell.
    if let Err(e) = mem.write_obj(st.byte(), addr) {
        tracing::warn!(error = %e, addr = addr.0, "cannot write a request status");
    }
}

#[cfg(test)]
#[path = "virtio_exec_tests.rs"]
mod tests;
