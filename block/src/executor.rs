//! Runs parsed requests on a [`Backend`]: copies guest data into aligned buffers for writes,
//! copies read data back into guest memory, and writes each request's status byte.
//!
//! The executor bounds what the guest can make it hold: at most `depth` journal requests in
//! flight and at most `max_buffer_bytes` of data buffers (each request is already bounded by
//! [`crate::request::Limits::max_data_bytes`]). A request that does not fit waits until one
//! that does completes ([`Executor::has_room`]); one request always fits when nothing is in
//! flight.

use std::os::fd::RawFd;

use journal::{AlignedBuf, Completion};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::backend::Backend;
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
    /// The request went through [`Executor::start`] (false for refused chains).
    pub started: bool,
}

struct Slot {
    queue: u16,
    head: u16,
    status_addr: GuestAddress,
    /// For reads: where the data goes.
    read_into: Option<SegList>,
    /// Journal requests not yet completed.
    remaining: u32,
    status: Status,
    /// Data bytes written to the guest so far.
    written: u32,
    buffer_bytes: u64,
}

/// Executes requests of one device.
pub struct Executor {
    backend: Box<dyn Backend>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    completions: Vec<Completion>,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    depth: usize,
    max_buffer_bytes: u64,
    buffer_bytes: u64,
    write_through: bool,
}

impl Executor {
    /// `id` is the GET_ID serial; `depth` the most journal requests in flight.
    pub fn new(
        backend: Box<dyn Backend>,
        id: [u8; VIRTIO_BLK_ID_BYTES],
        depth: usize,
        max_buffer_bytes: u64,
    ) -> Self {
        Executor {
            backend,
            slots: Vec::new(),
            free: Vec::new(),
            completions: Vec::new(),
            id,
            depth: depth.max(1),
            max_buffer_bytes,
            buffer_bytes: 0,
            write_through: false,
        }
    }

    /// With write-through, every write is durable when it completes (used when the driver did
    /// not negotiate VIRTIO_BLK_F_FLUSH and so cannot ask for durability).
    pub fn set_write_through(&mut self, on: bool) {
        self.write_through = on;
    }

    /// Requests started and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// The backend's completion eventfd.
    pub fn eventfd(&self) -> RawFd {
        self.backend.eventfd()
    }

    /// True when `req` may start now without exceeding the executor's bounds.
    pub fn has_room(&self, req: &Request) -> bool {
        if self.in_flight() == 0 {
            return true;
        }
        let parts = journal_parts(&req.kind);
        let bytes = req.buffer_bytes();
        self.backend.in_flight() + parts <= self.depth
            && (bytes == 0 || self.buffer_bytes + bytes <= self.max_buffer_bytes)
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
            started: false,
        });
    }

    /// Starts `req`; requests that need no I/O (or fail before it) finish into `done` at once.
    pub fn start(&mut self, mem: &GuestMemoryMmap, queue: u16, req: Request, done: &mut Vec<Done>) {
        let Request {
            head,
            kind,
            status: status_addr,
        } = req;
        let finish_now = |st: Status, written: u32, done: &mut Vec<Done>| {
            write_status(mem, status_addr, st);
            done.push(Done {
                queue,
                head,
                used_len: written.saturating_add(1),
                started: true,
            });
        };
        let mut parts: Vec<journal::Request> = Vec::with_capacity(1);
        let mut read_into = None;
        let mut buffer_bytes = 0;
        match kind {
            RequestKind::GetId { data } => {
                let n = (data.len() as usize).min(VIRTIO_BLK_ID_BYTES);
                match data.write_from(mem, &self.id[..n]) {
                    Ok(()) => finish_now(Status::Ok, n as u32, done),
                    Err(e) => finish_now(status::for_guest_memory_error(&e), 0, done),
                }
                return;
            }
            RequestKind::Read { offset, data } => {
                if data.is_empty() {
                    return finish_now(Status::Ok, 0, done);
                }
                buffer_bytes = data.len();
                parts.push(journal::Request::Read {
                    offset,
                    len: data.len(),
                });
                read_into = Some(data);
            }
            RequestKind::Write { offset, data } => {
                if data.is_empty() {
                    return finish_now(Status::Ok, 0, done);
                }
                // data.len() <= Limits::max_data_bytes (a u32), checked by the parser.
                let mut buf = AlignedBuf::new(data.len() as usize);
                if let Err(e) = data.read_into(mem, buf.as_mut_slice()) {
                    return finish_now(status::for_guest_memory_error(&e), 0, done);
                }
                buffer_bytes = data.len();
                parts.push(journal::Request::Write {
                    offset,
                    buf,
                    fua: self.write_through,
                });
            }
            RequestKind::Flush => parts.push(journal::Request::Flush),
            RequestKind::Discard { ranges } => {
                for r in ranges.into_iter().filter(|r| r.len > 0) {
                    parts.push(journal::Request::Discard {
                        offset: r.offset,
                        len: r.len,
                    });
                }
            }
            RequestKind::WriteZeroes { ranges } => {
                for r in ranges.into_iter().filter(|r| r.len > 0) {
                    parts.push(journal::Request::WriteZeroes {
                        offset: r.offset,
                        len: r.len,
                        fua: self.write_through,
                    });
                }
            }
        }
        if parts.is_empty() {
            return finish_now(Status::Ok, 0, done);
        }
        let slot = Slot {
            queue,
            head,
            status_addr,
            read_into,
            remaining: parts.len() as u32,
            status: Status::Ok,
            written: 0,
            buffer_bytes,
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
        self.buffer_bytes += buffer_bytes;
        for part in parts {
            // A refused part was not queued and never completes: it is finished here, and the
            // slot stays taken until the parts that were queued complete.
            if let Err(r) = self.backend.submit(index as u64, part) {
                let st = status::for_journal_error(&r.error);
                self.part_done(mem, index, st, done);
            }
        }
    }

    /// Collects finished requests without blocking.
    pub fn reap(
        &mut self,
        mem: &GuestMemoryMmap,
        done: &mut Vec<Done>,
    ) -> Result<(), crate::Error> {
        let mut completions = std::mem::take(&mut self.completions);
        let res = self.backend.poll(&mut completions);
        self.complete(mem, &mut completions, done);
        self.completions = completions;
        res.map_err(crate::Error::from)
    }

    /// Waits for every started request to finish. If the backend fails, the requests still
    /// in flight finish with IOERR.
    pub fn drain(&mut self, mem: &GuestMemoryMmap, done: &mut Vec<Done>) {
        let mut completions = std::mem::take(&mut self.completions);
        while self.in_flight() > 0 {
            let res = if self.backend.in_flight() > 0 {
                self.backend.wait(1, &mut completions)
            } else {
                self.backend.poll(&mut completions)
            };
            let progressed = !completions.is_empty();
            self.complete(mem, &mut completions, done);
            if let Err(e) = res {
                tracing::error!(error = %e, "block backend failed while draining");
                self.fail_all(mem, done);
            } else if !progressed && self.backend.in_flight() == 0 {
                // Nothing can complete any more: never hang the caller.
                self.fail_all(mem, done);
            }
        }
        self.completions = completions;
    }

    fn fail_all(&mut self, mem: &GuestMemoryMmap, done: &mut Vec<Done>) {
        for i in 0..self.slots.len() {
            if let Some(slot) = self.slots[i].as_mut() {
                slot.status = Status::IoErr;
                slot.remaining = 1;
                self.part_done(mem, i, Status::IoErr, done);
            }
        }
    }

    fn complete(
        &mut self,
        mem: &GuestMemoryMmap,
        completions: &mut Vec<Completion>,
        done: &mut Vec<Done>,
    ) {
        for c in completions.drain(..) {
            let Some(index) = usize::try_from(c.token)
                .ok()
                .filter(|&i| matches!(self.slots.get(i), Some(Some(_))))
            else {
                tracing::warn!(token = c.token, "completion for an unknown request");
                continue;
            };
            let st = match (c.result, self.slots[index].as_mut()) {
                (Err(e), _) => status::for_journal_error(&e),
                (Ok(Some(buf)), Some(slot)) => match slot.read_into.as_ref() {
                    Some(data) if buf.len() as u64 == data.len() => {
                        match data.write_from(mem, buf.as_slice()) {
                            Ok(()) => {
                                slot.written = buf.len() as u32;
                                Status::Ok
                            }
                            Err(e) => status::for_guest_memory_error(&e),
                        }
                    }
                    _ => {
                        tracing::error!(
                            len = buf.len(),
                            "read completion does not match its request"
                        );
                        Status::IoErr
                    }
                },
                (Ok(None), Some(slot)) if slot.read_into.is_some() => {
                    tracing::error!("read completed without data");
                    Status::IoErr
                }
                (Ok(_), _) => Status::Ok,
            };
            self.part_done(mem, index, st, done);
        }
    }

    fn part_done(&mut self, mem: &GuestMemoryMmap, index: usize, st: Status, done: &mut Vec<Done>) {
        let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        slot.status = slot.status.and(st);
        slot.remaining = slot.remaining.saturating_sub(1);
        if slot.remaining > 0 {
            return;
        }
        let Some(slot) = self.slots[index].take() else {
            return;
        };
        self.free.push(index);
        self.buffer_bytes -= slot.buffer_bytes;
        let written = if slot.status == Status::Ok {
            slot.written
        } else {
            0
        };
        write_status(mem, slot.status_addr, slot.status);
        done.push(Done {
            queue: slot.queue,
            head: slot.head,
            used_len: written.saturating_add(1),
            started: true,
        });
    }
}

/// Journal requests one virtio request turns into.
fn journal_parts(kind: &RequestKind) -> usize {
    match kind {
        RequestKind::Discard { ranges } | RequestKind::WriteZeroes { ranges } => ranges.len(),
        RequestKind::GetId { .. } => 0,
        _ => 1,
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
#[path = "executor_tests.rs"]
mod tests;
