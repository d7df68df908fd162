//! The baseline of the checkpoint benchmark: writing bytes to a file with io_uring.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::writer::Writer;
use super::{Error, Result};

/// Writes `bytes` of non-zero data to a new file at `path` with io_uring, in the same batches
/// and queue depth as a memory save, then syncs it: the limit a memory save is measured
/// against (same run, same file system). Returns the elapsed time; the file is left for the
/// caller to remove.
pub fn bench_baseline_write(path: &Path, bytes: u64) -> Result<Duration> {
    const BUF: usize = 1 << 20;
    let io = |context| {
        move |source| Error::Io {
            context,
            path: path.to_path_buf(),
            source,
        }
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io("create baseline file"))?;
    let start = Instant::now();
    let mut w = Writer::new(&file, 64, 16, BUF).map_err(io("io_uring setup"))?;
    let mut off = 0u64;
    while off < bytes {
        let b = w.take_buf().map_err(io("write baseline file"))?;
        let buf = w.buf_mut(b);
        if buf[0] == 0 {
            for (k, x) in buf.iter_mut().enumerate() {
                *x = (k as u8) | 1;
            }
        }
        let len = (bytes - off).min(BUF as u64) as usize;
        w.write_buf(b, &[(0, len, off)])
            .map_err(io("write baseline file"))?;
        off += len as u64;
    }
    w.finish().map_err(io("write baseline file"))?;
    file.sync_data().map_err(io("sync baseline file"))?;
    Ok(start.elapsed())
}
