//! The physical limit of a merge: copying the same number of bytes from one file to another
//! on the same filesystem with io_uring (O_DIRECT, large requests, a read and then a write
//! per buffer, up to `qd` buffers in flight), then fdatasync of the copy.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use journal::AlignedBuf;

use super::fail;
use crate::{Error, Result};

/// Bytes per request.
pub const CHUNK: usize = 1 << 20;

enum Phase {
    Free,
    Reading(u64),
    Writing(u64),
}

/// Copies the first `len` bytes (a multiple of 4 KiB) of `src` into a new file `dst`, `qd`
/// requests in flight, and returns how long it took including the final fdatasync.
pub fn copy(src: &Path, dst: &Path, len: u64, qd: u32) -> Result<Duration> {
    if !len.is_multiple_of(4096) {
        return Err(fail(
            "io_uring copy",
            format!("{len} is not a multiple of 4 KiB"),
        ));
    }
    fn open_err(p: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |e| Error::io(format!("opening {}", p.display()), e)
    }
    let input = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(src)
        .map_err(open_err(src))?;
    let output = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(dst)
        .map_err(open_err(dst))?;
    let qd = qd.clamp(1, 256);
    let mut ring =
        IoUring::new(qd.next_power_of_two()).map_err(|e| Error::io("creating an io_uring", e))?;
    // The buffers live until every request using them completed (drained before returning).
    let mut bufs: Vec<AlignedBuf> = (0..qd).map(|_| AlignedBuf::new(CHUNK)).collect();
    let mut phase: Vec<Phase> = (0..qd).map(|_| Phase::Free).collect();
    let start = Instant::now();
    let result = pump(&mut ring, &input, &output, &mut bufs, &mut phase, len);
    // Whatever happened, nothing may still write into `bufs` once they are dropped.
    let mut in_flight = phase.iter().filter(|p| !matches!(p, Phase::Free)).count();
    while in_flight > 0 {
        if ring.submit_and_wait(1).is_err() {
            break;
        }
        in_flight -= ring.completion().count();
    }
    result?;
    output
        .sync_data()
        .map_err(|e| Error::io(format!("syncing {}", dst.display()), e))?;
    Ok(start.elapsed())
}

fn chunk_len(total: u64, off: u64) -> u32 {
    (total - off).min(CHUNK as u64) as u32
}

fn pump(
    ring: &mut IoUring,
    input: &File,
    output: &File,
    bufs: &mut [AlignedBuf],
    phase: &mut [Phase],
    len: u64,
) -> Result<()> {
    let (rfd, wfd) = (types::Fd(input.as_raw_fd()), types::Fd(output.as_raw_fd()));
    let mut next = 0u64;
    let mut done = 0u64;
    while done < len {
        for slot in 0..phase.len() {
            if !matches!(phase[slot], Phase::Free) || next >= len {
                continue;
            }
            let n = chunk_len(len, next);
            let e = opcode::Read::new(rfd, bufs[slot].as_mut_ptr(), n)
                .offset(next)
                .build()
                .user_data(slot as u64);
            // SAFETY: `bufs[slot]` is exclusively this request's until its completion is
            // reaped (`phase[slot]` is not Free meanwhile), and `copy` drains every request
            // before the buffers are dropped.
            unsafe { ring.submission().push(&e) }
                .map_err(|_| fail("io_uring copy", "submission queue full"))?;
            phase[slot] = Phase::Reading(next);
            next += n as u64;
        }
        ring.submit_and_wait(1)
            .map_err(|e| Error::io("io_uring submit", e))?;
        let cqes: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, res) in cqes {
            let slot = slot as usize;
            let (off, writing) = match phase[slot] {
                Phase::Reading(o) => (o, false),
                Phase::Writing(o) => (o, true),
                Phase::Free => continue,
            };
            let n = chunk_len(len, off);
            phase[slot] = Phase::Free;
            if res < 0 {
                return Err(Error::io(
                    format!("io_uring copy at {off}"),
                    std::io::Error::from_raw_os_error(-res),
                ));
            }
            if res as u32 != n {
                return Err(fail(
                    "io_uring copy",
                    format!("short transfer at {off}: {res} of {n} bytes"),
                ));
            }
            if writing {
                done += n as u64;
                continue;
            }
            let e = opcode::Write::new(wfd, bufs[slot].as_mut_ptr(), n)
                .offset(off)
                .build()
                .user_data(slot as u64);
            // SAFETY: as for the read: the slot's buffer belongs to this request until its
            // completion is reaped.
            unsafe { ring.submission().push(&e) }
                .map_err(|_| fail("io_uring copy", "submission queue full"))?;
            phase[slot] = Phase::Writing(off);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::pattern::fill_raw;

    #[test]
    fn copies_exactly_and_reports_short_sources() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let len = 3 * CHUNK as u64 + 8192;
        let mut data = vec![0u8; len as usize];
        fill_raw(&mut data, 0, 5);
        std::fs::write(&src, &data).unwrap();
        let dst = tmp.path().join("dst");
        copy(&src, &dst, len, 2).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), data);
        // Asking for more than the source holds is a clear error, not a hang.
        let err = copy(&src, &dst, len + 4096, 4).unwrap_err();
        assert!(crate::cli::error_chain(&err).contains("short transfer"));
        assert!(copy(&src, &dst, 100, 1).is_err());
    }
}
