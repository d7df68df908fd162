//! A raw file driven on io_uring with a fixed set of aligned buffers: the in-process
//! baseline that the journal's [`journal::IoEngine`] is compared with in `benches/journal.rs`.

use std::fs::File;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};
use journal::AlignedBuf;

use super::fail;
use crate::{Error, Result};

/// Reads or writes of one size at given offsets of a file, up to `qd` in flight.
pub struct RawRing {
    ring: IoUring,
    file: File,
    bufs: Vec<AlignedBuf>,
    free: Vec<usize>,
    bs: usize,
}

impl RawRing {
    /// A ring for `file` with `qd` buffers of `bs` bytes (filled with `fill`).
    pub fn new(file: File, qd: u32, bs: usize, fill: u8) -> Result<RawRing> {
        let qd = qd.clamp(1, 4096);
        let ring = IoUring::new(qd.next_power_of_two())
            .map_err(|e| Error::io("creating an io_uring", e))?;
        let bufs: Vec<AlignedBuf> = (0..qd)
            .map(|_| {
                let mut b = AlignedBuf::new(bs);
                b.as_mut_slice().fill(fill);
                b
            })
            .collect();
        let free = (0..bufs.len()).rev().collect();
        Ok(RawRing {
            ring,
            file,
            bufs,
            free,
            bs,
        })
    }

    /// Issues one request per offset (writes with `write`, else reads) and returns when all
    /// completed. A failed or short request is an error.
    pub fn run(&mut self, offsets: &[u64], write: bool) -> Result<()> {
        let fd = types::Fd(self.file.as_raw_fd());
        let mut next = 0;
        let mut in_flight = 0;
        while next < offsets.len() || in_flight > 0 {
            let mut queued = 0;
            while next < offsets.len() {
                let Some(slot) = self.free.pop() else { break };
                let ptr = self.bufs[slot].as_mut_ptr();
                let len = self.bs as u32;
                let entry = if write {
                    opcode::Write::new(fd, ptr, len)
                        .offset(offsets[next])
                        .build()
                } else {
                    opcode::Read::new(fd, ptr, len)
                        .offset(offsets[next])
                        .build()
                };
                // SAFETY: the buffer of `slot` is owned by `self.bufs`, is not handed to
                // another request until this one's completion is reaped below, and `self`
                // is borrowed mutably for the whole time any request is in flight.
                if unsafe { self.ring.submission().push(&entry.user_data(slot as u64)) }.is_err() {
                    self.free.push(slot);
                    break;
                }
                next += 1;
                in_flight += 1;
                queued += 1;
            }
            let want = if queued > 0 || in_flight == 0 { 0 } else { 1 };
            self.ring
                .submit_and_wait(want)
                .map_err(|e| Error::io("io_uring submit", e))?;
            let mut failed = None;
            for cqe in self.ring.completion() {
                in_flight -= 1;
                self.free.push(cqe.user_data() as usize);
                if cqe.result() < 0 {
                    failed = Some(std::io::Error::from_raw_os_error(-cqe.result()).to_string());
                } else if cqe.result() as usize != self.bs {
                    failed = Some(format!(
                        "short transfer: {} of {} bytes",
                        cqe.result(),
                        self.bs
                    ));
                }
            }
            if let Some(why) = failed {
                // Drain what is still in flight before returning: the buffers must outlive it.
                while in_flight > 0 {
                    self.ring
                        .submit_and_wait(1)
                        .map_err(|e| Error::io("io_uring submit", e))?;
                    for cqe in self.ring.completion() {
                        in_flight -= 1;
                        self.free.push(cqe.user_data() as usize);
                    }
                }
                return Err(fail("raw io_uring request", why));
            }
        }
        Ok(())
    }

    /// The file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn writes_then_reads_back() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("raw");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        let mut r = RawRing::new(f, 8, 4096, 0xab).unwrap();
        let offsets: Vec<u64> = (0..100u64).map(|i| (i * 37 % 256) * 4096).collect();
        r.run(&offsets, true).unwrap();
        let mut b = vec![0u8; 4096];
        r.file().read_exact_at(&mut b, 37 * 4096).unwrap();
        assert!(b.iter().all(|&x| x == 0xab));
        r.file().read_exact_at(&mut b, 1 << 19).unwrap();
        assert!(b.iter().all(|&x| x == 0), "untouched block stays zero");
        r.run(&offsets, false).unwrap();
        // Reading past the end is a short read: an error, not a hang.
        assert!(r.run(&[1 << 20], false).is_err());
    }
}
