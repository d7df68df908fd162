//! Large batched writes to an image file on io_uring: from staging buffers the writer owns
//! (live save, restore sources) or straight from guest memory (stop-copy, guest paused).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};

/// An SQE's target, kept until it completes (short writes are resubmitted).
struct Op {
    ptr: *const u8,
    len: u32,
    off: u64,
    /// The staging buffer the data lives in, or `None` for a caller-owned range.
    buf: Option<usize>,
}

/// Writes to one file with up to `depth` SQEs in flight.
pub struct Writer {
    ring: IoUring,
    fd: i32,
    ops: Vec<Option<Op>>,
    free_ops: Vec<usize>,
    in_flight: usize,
    unsubmitted: usize,
    bufs: Vec<Vec<u8>>,
    /// SQEs still reading each buffer.
    buf_users: Vec<u32>,
    free_bufs: Vec<usize>,
    /// Bytes written so far.
    pub written: u64,
}

// SAFETY: the raw pointers in `ops` point into buffers the writer owns or into memory the
// caller of `write_raw` keeps alive until `finish`; the writer is used by one thread at a time.
unsafe impl Send for Writer {}

impl Writer {
    /// A writer to `file` with `nbufs` staging buffers of `buf_size` bytes.
    pub fn new(file: &File, depth: u32, nbufs: usize, buf_size: usize) -> io::Result<Writer> {
        let ring = IoUring::builder()
            .setup_cqsize(depth.next_power_of_two() * 2)
            .build(depth.next_power_of_two())?;
        Ok(Writer {
            ring,
            fd: file.as_raw_fd(),
            ops: Vec::new(),
            free_ops: Vec::new(),
            in_flight: 0,
            unsubmitted: 0,
            bufs: (0..nbufs).map(|_| vec![0u8; buf_size]).collect(),
            buf_users: vec![0; nbufs],
            free_bufs: (0..nbufs).rev().collect(),
            written: 0,
        })
    }

    /// A free staging buffer (waits for writes to complete if none is free).
    pub fn take_buf(&mut self) -> io::Result<usize> {
        loop {
            if let Some(b) = self.free_bufs.pop() {
                return Ok(b);
            }
            self.reap(1)?;
        }
    }

    /// The contents of staging buffer `b` (only between `take_buf` and `write_buf`).
    pub fn buf_mut(&mut self, b: usize) -> &mut [u8] {
        &mut self.bufs[b]
    }

    /// Writes `segments` (`(offset in buffer, len, file offset)`) of buffer `b`; the buffer
    /// is free again when they all complete.
    pub fn write_buf(&mut self, b: usize, segments: &[(usize, usize, u64)]) -> io::Result<()> {
        if segments.is_empty() {
            self.free_bufs.push(b);
            return Ok(());
        }
        for &(at, len, off) in segments {
            let ptr = self.bufs[b][at..at + len].as_ptr();
            self.buf_users[b] += 1;
            self.push(Op {
                ptr,
                len: len as u32,
                off,
                buf: Some(b),
            })?;
        }
        Ok(())
    }

    /// Writes `len` bytes at `ptr` to `off` without copying.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped and readable until [`Writer::finish`] returns.
    pub unsafe fn write_raw(&mut self, ptr: *const u8, len: usize, off: u64) -> io::Result<()> {
        self.push(Op {
            ptr,
            len: len as u32,
            off,
            buf: None,
        })
    }

    fn push(&mut self, op: Op) -> io::Result<()> {
        let entry = opcode::Write::new(types::Fd(self.fd), op.ptr, op.len)
            .offset(op.off)
            .build();
        let slot = match self.free_ops.pop() {
            Some(s) => {
                self.ops[s] = Some(op);
                s
            }
            None => {
                self.ops.push(Some(op));
                self.ops.len() - 1
            }
        };
        let entry = entry.user_data(slot as u64);
        loop {
            // SAFETY: the SQE's buffer is described by `self.ops[slot]`, whose memory stays
            // alive and unmoved until its completion is reaped (see `write_buf`/`write_raw`).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                break;
            }
            self.submit()?;
            self.reap(1)?;
        }
        self.in_flight += 1;
        self.unsubmitted += 1;
        if self.unsubmitted >= 8 {
            self.submit()?;
        }
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted > 0 {
            self.ring.submit()?;
            self.unsubmitted = 0;
        }
        Ok(())
    }

    /// Waits for at least `want` completions (if any are in flight) and handles them.
    fn reap(&mut self, want: usize) -> io::Result<()> {
        if self.in_flight == 0 {
            return Ok(());
        }
        self.unsubmitted = 0;
        self.ring.submit_and_wait(want.min(self.in_flight))?;
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, res) in done {
            self.in_flight -= 1;
            let slot = slot as usize;
            let op = self.ops[slot].take().expect("completion of a live op");
            self.free_ops.push(slot);
            if res < 0 {
                self.release(op.buf);
                return Err(io::Error::from_raw_os_error(-res));
            }
            let n = res as u32;
            self.written += u64::from(n);
            if n == 0 {
                self.release(op.buf);
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "image write wrote 0 bytes",
                ));
            }
            if n < op.len {
                // SAFETY: advances within the same live range.
                let ptr = unsafe { op.ptr.add(n as usize) };
                self.push(Op {
                    ptr,
                    len: op.len - n,
                    off: op.off + u64::from(n),
                    buf: op.buf,
                })?;
            } else {
                self.release(op.buf);
            }
        }
        Ok(())
    }

    fn release(&mut self, buf: Option<usize>) {
        if let Some(b) = buf {
            self.buf_users[b] -= 1;
            if self.buf_users[b] == 0 {
                self.free_bufs.push(b);
            }
        }
    }

    /// Waits for every write.
    pub fn finish(&mut self) -> io::Result<()> {
        self.submit()?;
        while self.in_flight > 0 {
            self.reap(self.in_flight)?;
        }
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // The kernel may still read our buffers: never free them under it.
        while self.in_flight > 0 {
            if self.reap(self.in_flight).is_err() && self.ring.submit_and_wait(1).is_err() {
                std::mem::forget(std::mem::take(&mut self.bufs));
                break;
            }
        }
    }
}

/// Whether a page is all zero.
pub fn is_zero(page: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets aligned middle.
        unsafe { page.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}
