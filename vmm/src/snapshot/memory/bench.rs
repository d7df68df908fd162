//! The baseline of the checkpoint benchmark: writing bytes to a file with io_uring.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::writer::Writer;
use super::{Error, Result};

/// Maps an I/O error of the baseline file at `path` (with what was being done) to [`Error::Io`].
fn io_error<'a>(
    path: &'a Path,
    context: &'static str,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        context,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates (or truncates) the baseline file at `path` for writing; never through a symlink.
fn create_baseline(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_error(path, "create baseline file"))
}

/// Writes `bytes` of non-zero data to a new file at `path` with io_uring, in the same batches
/// and queue depth as a memory save, then syncs it: the limit a memory save is measured
/// against (same run, same file system). Returns the elapsed time; the file is left for the
/// caller to remove.
pub fn bench_baseline_write(path: &Path, bytes: u64) -> Result<Duration> {
    const BUF: usize = 1 << 20;
    let file = create_baseline(path)?;
    let start = Instant::now();
    let mut w = Writer::new(&file, 64, 16, BUF).map_err(io_error(path, "io_uring setup"))?;
    let mut off = 0u64;
    while off < bytes {
        let b = w
            .take_buf()
            .map_err(io_error(path, "write baseline file"))?;
        let buf = w.buf_mut(b);
        if buf[0] == 0 {
            for (k, x) in buf.iter_mut().enumerate() {
                *x = (k as u8) | 1;
            }
        }
        let len = (bytes - off).min(BUF as u64) as usize;
        w.write_buf(b, &[(0, len, off)])
            .map_err(io_error(path, "write baseline file"))?;
        off += len as u64;
    }
    w.finish().map_err(io_error(path, "write baseline file"))?;
    file.sync_data()
        .map_err(io_error(path, "sync baseline file"))?;
    Ok(start.elapsed())
}

/// Writes all of `mem` (straight from the guest mapping, 1 MiB per io_uring write) to a new
/// file at `path`, then syncs it: "writing the same bytes of memory to a file with io_uring",
/// the limit of a stop-copy save. Returns the elapsed time.
pub fn bench_baseline_write_memory(
    mem: &vm_memory::GuestMemoryMmap,
    path: &Path,
) -> Result<Duration> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    const CHUNK: u64 = 1 << 20;
    let file = create_baseline(path)?;
    let start = Instant::now();
    let mut w = Writer::new(&file, 64, 1, 4096).map_err(io_error(path, "io_uring setup"))?;
    let mut off = 0u64;
    for r in mem.iter() {
        let mut at = 0;
        while at < r.len() {
            let len = (r.len() - at).min(CHUNK);
            // SAFETY: a range of the live guest mapping, kept mapped by `mem` until `finish`.
            unsafe { w.write_raw(r.as_ptr().add(at as usize), len as usize, off) }
                .map_err(io_error(path, "write baseline file"))?;
            at += len;
            off += len;
        }
    }
    w.finish().map_err(io_error(path, "write baseline file"))?;
    file.sync_data()
        .map_err(io_error(path, "sync baseline file"))?;
    Ok(start.elapsed())
}

/// Memory-side checkpoint figures for one memory size (see [`bench_memory`]).
#[derive(Debug, Clone, Default)]
pub struct MemoryBench {
    pub mem_size: u64,
    /// First stop-copy full image of fully written memory (includes arming the tracker:
    /// userfaultfd registration and write-protecting all of RAM).
    pub stop_copy_first: super::ImageStats,
    /// Later stop-copy full images (best of three): the steady-state write rate.
    pub stop_copy: super::ImageStats,
    /// Baseline (best of three, interleaved with the saves): the same number of bytes written
    /// with io_uring to a file from reused 1 MiB buffers.
    pub baseline: Duration,
    /// Baseline (best of three): the guest memory itself written with io_uring to a file.
    pub baseline_memory: Duration,
    /// First live image of fresh memory (register + write-protect everything).
    pub live_first: super::ImageStats,
    /// A second live full image (only the dirty pages re-protected).
    pub live_again: super::ImageStats,
    /// Live increment after 1% of the pages changed.
    pub live_incremental: super::ImageStats,
    /// `restore` of the full + incremental chain (lazy: until it returns).
    pub restore: Duration,
    /// Touching every page of the restored memory afterwards (faults + prefetch).
    pub restore_touch_all: Duration,
}

impl MemoryBench {
    /// Stop-copy write rate relative to writing the same memory with io_uring (target >= 0.8).
    pub fn stop_copy_ratio(&self) -> f64 {
        self.baseline_memory.as_secs_f64() / self.stop_copy.elapsed.as_secs_f64()
    }

    /// Stop-copy write rate relative to writing from reused buffers (cache-hot source).
    pub fn stop_copy_ratio_buffer(&self) -> f64 {
        self.baseline.as_secs_f64() / self.stop_copy.elapsed.as_secs_f64()
    }
}

/// Measures memory checkpoints of `mem_size` bytes of fully written guest memory, with the
/// image files in `dir` (removed afterwards): stop-copy against the io_uring baseline in the
/// same run, live pauses, an increment after 1% of the pages changed, and lazy restore.
pub fn bench_memory(dir: &Path, mem_size: u64) -> Result<MemoryBench> {
    use super::{restore, save_full, start_live, ImageRef, LiveOptions, PAGE_SIZE};
    use crate::snapshot::Identity;
    use vm_memory::{Bytes, GuestAddress};

    let id = Identity {
        vm_uuid: *b"strata-mem-bench",
        mem_size,
    };
    // Guest address of page i (RAM skips the MMIO hole).
    let ranges = crate::layout::ram_ranges(mem_size);
    let addr = move |i: u64| {
        let mut off = i * PAGE_SIZE;
        for &(start, len) in &ranges {
            if off < len {
                return GuestAddress(start + off);
            }
            off -= len;
        }
        unreachable!("page {i} beyond memory")
    };
    let fill = |seed: u64| -> Result<vm_memory::GuestMemoryMmap> {
        let mem = crate::memory::create(mem_size).map_err(|e| Error::Memory(e.to_string()))?;
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for i in 0..mem_size / PAGE_SIZE {
            let v = (i ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            for (k, w) in page.chunks_mut(8).enumerate() {
                w.copy_from_slice(&(v.wrapping_add(k as u64)).to_le_bytes());
            }
            mem.write_slice(&page, addr(i))
                .map_err(|e| Error::Memory(e.to_string()))?;
        }
        Ok(mem)
    };
    let p = |n: &str| dir.join(n);
    let mut out = MemoryBench {
        mem_size,
        ..MemoryBench::default()
    };

    let mem = fill(1)?;
    out.stop_copy_first = save_full(&mem, &p("bench-stop-copy.img"), &id)?;
    let _ = std::fs::remove_file(p("bench-stop-copy.img"));
    let bytes = out.stop_copy_first.bytes_written;
    let best = |a: Duration, b: Duration| if a.is_zero() { b } else { a.min(b) };
    for _ in 0..3 {
        let t = bench_baseline_write_memory(&mem, &p("bench-baseline-mem"))?;
        out.baseline_memory = best(out.baseline_memory, t);
        let _ = std::fs::remove_file(p("bench-baseline-mem"));
        let s = save_full(&mem, &p("bench-stop-copy.img"), &id)?;
        let _ = std::fs::remove_file(p("bench-stop-copy.img"));
        if out.stop_copy.elapsed.is_zero() || s.elapsed < out.stop_copy.elapsed {
            out.stop_copy = s;
        }
        let t = bench_baseline_write(&p("bench-baseline"), bytes)?;
        out.baseline = best(out.baseline, t);
        let _ = std::fs::remove_file(p("bench-baseline"));
    }
    super::release(&mem);
    drop(mem);

    let mem = fill(2)?;
    out.live_first =
        start_live(&mem, &p("bench-live0.img"), &id, LiveOptions::default())?.wait()?;
    let _ = std::fs::remove_file(p("bench-live0.img"));
    out.live_again = start_live(&mem, &p("bench-full.img"), &id, LiveOptions::default())?.wait()?;
    let pages = mem_size / PAGE_SIZE;
    for k in 0..pages / 100 {
        let i = (k * 7919) % pages;
        mem.write_obj(k | 1, addr(i))
            .map_err(|e| Error::Memory(e.to_string()))?;
    }
    let parent = ImageRef {
        image_id: out.live_again.image_id,
    };
    let opts = LiveOptions::incremental(&parent);
    out.live_incremental = start_live(&mem, &p("bench-incr.img"), &id, opts)?.wait()?;
    super::release(&mem);
    drop(mem);

    let t0 = Instant::now();
    let chain = [p("bench-full.img"), p("bench-incr.img")];
    let r = restore(&chain, &id)?;
    out.restore = t0.elapsed();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for i in 0..pages {
        r.read_slice(&mut page, addr(i))
            .map_err(|e| Error::Memory(e.to_string()))?;
    }
    out.restore_touch_all = t0.elapsed();
    super::release(&r);
    for f in &chain {
        let _ = std::fs::remove_file(f);
    }
    Ok(out)
}
