//! The bulk copy of a merge on its own io_uring: chunks of up to [`CHUNK_BLOCKS`] copies (in
//! the order the caller lists them), each read (one SQE per run of consecutive source
//! blocks), checksum-verified and written (one SQE per run of consecutive output blocks),
//! with up to `depth` chunks in flight; and the hole punches that free a batch's sources,
//! all in flight at once.
//!
//! Ownership: each slot has one [`AlignedBuf`] for the copier's life, registered with the
//! ring (fixed reads and writes); a slot takes a new chunk only once every completion of its
//! last one is reaped, and [`Copier::copy`] returns only once no SQE of it is in the kernel
//! (or, if the ring itself fails, leaks the buffers the kernel might still write).

use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

use crate::layer::LayerFiles;
use crate::{AlignedBuf, Error, Result, BLOCK_SIZE};

/// Output blocks per chunk (128 KiB).
pub(crate) const CHUNK_BLOCKS: usize = 32;

/// Lets the caller of a merge pause its bulk copy in the middle of a batch (see
/// [`crate::MergeJob::run_paced`]). The copier asks [`CopyPacer::due`] before it starts each
/// chunk; once that says yes it starts no more chunks, lets the ones in flight finish, and
/// calls [`CopyPacer::wait`] with none of its I/O in the kernel, then goes on. Nothing of the
/// job (no lock, no record) is held across the wait except the batch's partly written output
/// blocks, which nothing references yet.
pub trait CopyPacer: Sync {
    /// True when the copy should pause before its next chunk.
    fn due(&self) -> bool;
    /// Blocks for the pause (returns early when the pause should end).
    fn wait(&self);
}

/// A pacer that never pauses.
pub(crate) struct Unpaced;

impl CopyPacer for Unpaced {
    fn due(&self) -> bool {
        false
    }
    fn wait(&self) {}
}

/// One block to copy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CopyItem {
    /// Index of the source layer in the run.
    pub src: u32,
    pub src_block: u64,
    pub crc: u32,
}

struct Chunk {
    /// Position of the chunk's first copy in the caller's list.
    first: usize,
    n: usize,
    /// SQEs of the chunk still in the kernel.
    pending: usize,
    writing: bool,
    err: Option<Error>,
}

/// A merge's ring and its buffers, one per slot, registered with the ring (fixed reads and
/// writes: the kernel maps them once, not at every request).
pub(crate) struct Copier {
    /// Declared before `bufs`: dropped (unregistering them) first.
    ring: IoUring,
    depth: usize,
    /// One chunk buffer per slot; empty once a failed ring leaked them.
    bufs: Vec<AlignedBuf>,
    /// `bufs` are registered with `ring`.
    fixed: bool,
    /// Time spent in [`CopyPacer::wait`] since the last [`Copier::take_paused`].
    paused: std::time::Duration,
}

const WRITE_BIT: u64 = 1 << 31;
/// User data of a hole punch's SQE (no copy slot has it: slots are below 256).
const PUNCH_USER_DATA: u64 = u64::MAX;

fn user_data(slot: usize, write: bool, blocks: usize) -> u64 {
    ((slot as u64) << 32) | if write { WRITE_BIT } else { 0 } | blocks as u64
}

impl Copier {
    /// A ring for `depth` chunks in flight.
    pub fn new(depth: u32) -> Result<Copier> {
        let depth = depth.clamp(1, 256) as usize;
        let entries = (depth * (CHUNK_BLOCKS + 1)).next_power_of_two() as u32;
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .build(entries)?;
        let mut bufs: Vec<AlignedBuf> = (0..depth)
            .map(|_| AlignedBuf::new(CHUNK_BLOCKS * BLOCK_SIZE as usize))
            .collect();
        let iovecs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: the buffers live in `bufs` as long as the ring (which is dropped
        // first), and their heap allocations never move.
        let fixed = unsafe { ring.submitter().register_buffers(&iovecs) }
            .map_err(|e| tracing::info!("merge copy: buffers not registered ({e})"))
            .is_ok();
        Ok(Copier {
            ring,
            depth,
            bufs,
            fixed,
            paused: std::time::Duration::ZERO,
        })
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) -> Result<()> {
        loop {
            // SAFETY: every buffer an SQE points into is the buffer of its slot in
            // `self.bufs`, which lives as long as the ring (or is leaked) and is reused only
            // once the slot's completions are reaped (the heap allocation of an AlignedBuf
            // never moves); every fd belongs to an `Arc<LayerFiles>` the caller holds for
            // the whole call.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    /// Copies the items listed in `list` from `sources` to `out`, item `i` to data block
    /// `out_first + i`, in the order of `list` (consecutive entries whose source blocks, or
    /// whose output blocks, are consecutive share one read, or one write).
    /// Returns once every chunk is written (Ok) or the first error once nothing is in flight.
    /// `pacer` may pause the copy between chunks (with nothing of it in flight).
    pub fn copy(
        &mut self,
        sources: &[Arc<LayerFiles>],
        items: &[CopyItem],
        list: &[usize],
        out: &LayerFiles,
        out_first: u64,
        pacer: &dyn CopyPacer,
    ) -> Result<()> {
        if self.bufs.len() < self.depth {
            return Err(Error::Invalid("the merge copy ring failed earlier".into()));
        }
        let mut slots: Vec<Option<Chunk>> = (0..self.depth).map(|_| None).collect();
        let mut next = 0;
        let mut first_err: Option<Error> = None;
        let bs = BLOCK_SIZE as usize;
        let item = |k: usize| -> Result<CopyItem> {
            list.get(k)
                .and_then(|&i| items.get(i))
                .copied()
                .ok_or_else(|| Error::Invalid("merge copy out of range".into()))
        };
        // The pacer asked for a pause: no new chunk until the ones in flight are done.
        let mut holding = false;
        loop {
            // Start chunks into free slots.
            while first_err.is_none() && next < list.len() && !holding {
                let Some(s) = slots.iter().position(Option::is_none) else {
                    break;
                };
                if pacer.due() {
                    holding = true;
                    break;
                }
                let n = CHUNK_BLOCKS.min(list.len() - next);
                let base = self.bufs[s].as_mut_ptr();
                let mut reads = Vec::new();
                let mut i = next;
                while i < next + n {
                    let first = item(i)?;
                    let mut j = i + 1;
                    let mut last = first;
                    while j < next + n {
                        let it = item(j)?;
                        if it.src != first.src || it.src_block != last.src_block + 1 {
                            break;
                        }
                        last = it;
                        j += 1;
                    }
                    let src = sources
                        .get(first.src as usize)
                        .ok_or_else(|| Error::Invalid("merge source out of range".into()))?;
                    let off =
                        first
                            .src_block
                            .checked_mul(BLOCK_SIZE)
                            .ok_or_else(|| Error::Corrupt {
                                what: src.data_path.display().to_string(),
                                why: format!("data block {} is out of range", first.src_block),
                            })?;
                    // SAFETY: (i - next + (j - i)) * bs <= n * bs <= the buffer's length.
                    let ptr = unsafe { base.add((i - next) * bs) };
                    let fd = types::Fd(src.data.as_raw_fd());
                    let len = ((j - i) * bs) as u32;
                    let entry = if self.fixed {
                        opcode::ReadFixed::new(fd, ptr, len, s as u16)
                            .offset(off)
                            .build()
                    } else {
                        opcode::Read::new(fd, ptr, len).offset(off).build()
                    };
                    reads.push(entry.user_data(user_data(s, false, j - i)));
                    i = j;
                }
                slots[s] = Some(Chunk {
                    first: next,
                    n,
                    pending: reads.len(),
                    writing: false,
                    err: None,
                });
                next += n;
                for e in reads {
                    if let Err(e) = self.push(e) {
                        return Err(self.abandon(slots, e));
                    }
                }
            }
            if slots.iter().all(Option::is_none) {
                if holding && first_err.is_none() && next < list.len() {
                    let t = std::time::Instant::now();
                    pacer.wait();
                    self.paused += t.elapsed();
                    holding = false;
                    continue;
                }
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(self.abandon(slots, Error::RawIo(e))),
            }
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (ud, res) in cqes {
                let s = (ud >> 32) as usize;
                let write = ud & WRITE_BIT != 0;
                let blocks = (ud & 0xffff) as usize;
                let Some(chunk) = slots.get_mut(s).and_then(Option::as_mut) else {
                    continue;
                };
                chunk.pending -= 1;
                let expect = (blocks * bs) as i32;
                if res < 0 {
                    let path = if write {
                        out.data_path.clone()
                    } else {
                        let src = items[list[chunk.first]].src as usize;
                        sources[src].data_path.clone()
                    };
                    chunk
                        .err
                        .get_or_insert(Error::io(path, std::io::Error::from_raw_os_error(-res)));
                } else if res != expect {
                    let e = if write {
                        Error::io(
                            &out.data_path,
                            std::io::Error::from_raw_os_error(libc::ENOSPC),
                        )
                    } else {
                        Error::Corrupt {
                            what: "a merge source layer".into(),
                            why: format!("short read ({res} of {expect} bytes)"),
                        }
                    };
                    chunk.err.get_or_insert(e);
                }
                if chunk.pending > 0 {
                    continue;
                }
                if chunk.err.is_none() && !chunk.writing {
                    // Every read of the chunk is in: verify, then write it out.
                    for k in 0..chunk.n {
                        let it = items[list[chunk.first + k]];
                        let got = crc32c::crc32c(&self.bufs[s].as_slice()[k * bs..(k + 1) * bs]);
                        if got != it.crc {
                            let src = &sources[it.src as usize];
                            chunk.err = Some(Error::Corrupt {
                                what: format!(
                                    "{} data block {}",
                                    src.data_path.display(),
                                    it.src_block
                                ),
                                why: format!(
                                    "checksum {got:08x}, expected {:08x}; the merge stops",
                                    it.crc
                                ),
                            });
                            break;
                        }
                    }
                    if chunk.err.is_none() {
                        // One write per run of consecutive output blocks.
                        let ids = &list[chunk.first..chunk.first + chunk.n];
                        let base = self.bufs[s].as_mut_ptr();
                        let mut writes = Vec::new();
                        let mut k = 0;
                        while k < ids.len() {
                            let mut j = k + 1;
                            while j < ids.len() && ids[j] == ids[j - 1] + 1 {
                                j += 1;
                            }
                            let off = (out_first + ids[k] as u64) * BLOCK_SIZE;
                            // SAFETY: k * bs + (j - k) * bs <= chunk.n * bs <= the buffer's
                            // length.
                            let ptr = unsafe { base.add(k * bs) };
                            let fd = types::Fd(out.data.as_raw_fd());
                            let len = ((j - k) * bs) as u32;
                            let entry = if self.fixed {
                                opcode::WriteFixed::new(fd, ptr, len, s as u16)
                                    .offset(off)
                                    .build()
                            } else {
                                opcode::Write::new(fd, ptr, len).offset(off).build()
                            };
                            writes.push(entry.user_data(user_data(s, true, j - k)));
                            k = j;
                        }
                        chunk.writing = true;
                        chunk.pending = writes.len();
                        for entry in writes {
                            if let Err(e) = self.push(entry) {
                                return Err(self.abandon(slots, e));
                            }
                        }
                        continue;
                    }
                }
                // Done (written) or failed with nothing in flight: free the slot.
                if let Some(c) = slots[s].take() {
                    if let Some(e) = c.err {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The time the copies spent paused by their pacer since the last call.
    pub fn take_paused(&mut self) -> std::time::Duration {
        std::mem::take(&mut self.paused)
    }

    /// Punches holes (keeping the size) in `file` at the byte ranges `(offset, length)`, all
    /// submitted before waiting for any. Returns the first error once all completed.
    pub fn punch(&mut self, file: &std::fs::File, ranges: &[(u64, u64)]) -> Result<()> {
        self.fallocate(
            file,
            ranges,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        )
    }

    /// `fallocate(mode)` of `file` at the byte ranges `(offset, length)`, all submitted
    /// before waiting for any. Returns the first error once all completed.
    fn fallocate(&mut self, file: &std::fs::File, ranges: &[(u64, u64)], mode: i32) -> Result<()> {
        let mut first_err: Option<std::io::Error> = None;
        let mut pending = 0usize;
        for &(off, len) in ranges {
            let entry = opcode::Fallocate::new(types::Fd(file.as_raw_fd()), len)
                .offset(off)
                .mode(mode)
                .build()
                .user_data(PUNCH_USER_DATA);
            loop {
                // SAFETY: a fallocate SQE points to no memory; the fd is `file`'s, borrowed
                // until every completion is reaped below.
                if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                    break;
                }
                self.ring.submit()?;
            }
            pending += 1;
        }
        while pending > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                // Nothing of ours is in memory the kernel could write: giving up is safe.
                Err(e) => return Err(Error::RawIo(e)),
            }
            for c in self.ring.completion() {
                if c.user_data() != PUNCH_USER_DATA {
                    continue;
                }
                pending -= 1;
                if c.result() < 0 {
                    first_err.get_or_insert(std::io::Error::from_raw_os_error(-c.result()));
                }
            }
        }
        match first_err {
            Some(e) => Err(Error::RawIo(e)),
            None => Ok(()),
        }
    }

    /// The ring failed with SQEs possibly in the kernel: the buffers are leaked rather
    /// than freed under it (and the copier copies no more).
    fn abandon(&mut self, slots: Vec<Option<Chunk>>, e: Error) -> Error {
        let left = slots.iter().filter(|s| s.is_some()).count();
        if left > 0 {
            tracing::error!(
                "merge copy ring failed with {left} chunks in flight ({e}); leaking their buffers"
            );
            std::mem::forget(std::mem::take(&mut self.bufs));
        }
        e
    }
}

/// The baseline a merge is measured against: copies `len` bytes (a multiple of 4 KiB) from
/// `src` to `dst` at the same offsets on io_uring, in 128 KiB chunks with up to `depth` in
/// flight (read, then write), without checksums. Both files may be O_DIRECT.
pub fn uring_copy(src: &std::fs::File, dst: &std::fs::File, len: u64, depth: u32) -> Result<()> {
    if !len.is_multiple_of(BLOCK_SIZE) {
        return Err(Error::Invalid(format!("{len} is not a multiple of 4096")));
    }
    let depth = depth.clamp(1, 256) as usize;
    let chunk = (CHUNK_BLOCKS as u64) * BLOCK_SIZE;
    let mut ring = IoUring::new((depth * 2).next_power_of_two() as u32)?;
    // (buffer, offset, length, writing) per slot.
    let mut slots: Vec<Option<(AlignedBuf, u64, u32, bool)>> = (0..depth).map(|_| None).collect();
    let mut next = 0u64;
    let mut err: Option<Error> = None;
    loop {
        while err.is_none() && next < len {
            let Some(s) = slots.iter().position(Option::is_none) else {
                break;
            };
            let n = chunk.min(len - next) as u32;
            let mut buf = AlignedBuf::new(chunk as usize);
            let e = opcode::Read::new(types::Fd(src.as_raw_fd()), buf.as_mut_ptr(), n)
                .offset(next)
                .build()
                .user_data(s as u64);
            // SAFETY: the buffer is held in `slots[s]` until the SQE's completion is reaped;
            // the fd is `src`, borrowed for the whole call. The ring has room for `depth`
            // SQEs and at most `depth` are ever queued.
            unsafe { ring.submission().push(&e) }
                .map_err(|_| Error::Invalid("io_uring submission queue full".into()))?;
            slots[s] = Some((buf, next, n, false));
            next += u64::from(n);
        }
        if slots.iter().all(Option::is_none) {
            break;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                for s in slots.into_iter().flatten() {
                    std::mem::forget(s.0);
                }
                return Err(e.into());
            }
        }
        let done: Vec<(usize, i32)> = ring
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
            .collect();
        for (s, res) in done {
            let Some((mut buf, off, n, writing)) = slots[s].take() else {
                continue;
            };
            if res != n as i32 {
                let e = if res < 0 {
                    std::io::Error::from_raw_os_error(-res)
                } else {
                    std::io::Error::from(std::io::ErrorKind::UnexpectedEof)
                };
                err.get_or_insert(Error::RawIo(e));
                continue;
            }
            if writing {
                continue;
            }
            let e = opcode::Write::new(types::Fd(dst.as_raw_fd()), buf.as_mut_ptr(), n)
                .offset(off)
                .build()
                .user_data(s as u64);
            // SAFETY: as above; the slot's read completed, so the ring has room again.
            unsafe { ring.submission().push(&e) }
                .map_err(|_| Error::Invalid("io_uring submission queue full".into()))?;
            slots[s] = Some((buf, off, n, true));
        }
    }
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
