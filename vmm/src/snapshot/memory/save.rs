//! Saving guest memory: stop-copy ([`save_full`]) and live ([`start_live`]).

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;

use super::bitmap::{self, AtomicBitmap};
use super::format::{self, Header, FLAG_INCREMENTAL, PAGE_SIZE};
use super::tracker::{self, ActiveSave, Region, Tracker};
use super::writer::{is_zero, Writer};
use super::{Error, ImageRef, ImageStats, Result};
use crate::snapshot::Identity;

/// `(offset in a staging buffer, length, file offset)` of one write.
type Segment = (usize, usize, u64);

/// The scanner's findings for one batch of a stop-copy save.
struct Scan {
    present: Vec<bool>,
    /// CRC32C of present pages and of missing zero pages.
    crc: Vec<u32>,
    nonzero: Vec<bool>,
}

/// Checksums the present (and missing zero) pages of one batch, guest paused.
fn scan_batch(t: &Tracker, regions: &[Region], first: u64, n: u64) -> Result<Scan> {
    let mut present = Vec::new();
    t.present(first, n as usize, &mut present)?;
    let host = tracker::host_of(regions, first).expect("page inside a region");
    let mut crc = vec![0u32; n as usize];
    let mut nonzero = vec![false; n as usize];
    for k in 0..n as usize {
        if present[k] {
            let ptr = (host + k as u64 * PAGE_SIZE) as *const u8;
            // SAFETY: a present page of the live guest mapping (kept alive by the tracker's
            // memory clone); the guest is paused and the page cannot change under us.
            let page = unsafe { std::slice::from_raw_parts(ptr, PAGE_SIZE as usize) };
            crc[k] = crc32c::crc32c(page);
            nonzero[k] = !is_zero(page);
        } else if t.source_is_zero(first + k as u64) {
            crc[k] = tracker::zero_page_crc();
        }
    }
    Ok(Scan {
        present,
        crc,
        nonzero,
    })
}

/// Pages per staging buffer / per batch (1 MiB).
const BATCH_PAGES: u64 = 256;
/// io_uring SQEs in flight.
const DEPTH: u32 = 64;
/// Staging buffers of the live copier.
const LIVE_BUFS: usize = 16;

/// Options of a live save.
#[derive(Debug, Clone, Default)]
pub struct LiveOptions<'a> {
    /// Save only the pages dirtied since this image (which must be the last image taken of, or
    /// restored into, this memory).
    pub parent: Option<&'a ImageRef>,
    /// Tests: the copier waits while this is set (so faults deterministically come first).
    #[cfg(test)]
    pub hold: Option<Arc<AtomicBool>>,
}

impl<'a> LiveOptions<'a> {
    /// An increment on top of `parent`.
    pub fn incremental(parent: &'a ImageRef) -> LiveOptions<'a> {
        LiveOptions {
            parent: Some(parent),
            #[cfg(test)]
            hold: None,
        }
    }
}

/// A live save running in the background.
pub struct LiveSave {
    thread: Option<JoinHandle<Result<ImageStats>>>,
    save: Arc<ActiveSave>,
    total: u64,
}

impl LiveSave {
    /// Waits for the image to be complete and durable.
    pub fn wait(mut self) -> Result<ImageStats> {
        let th = self.thread.take().expect("joined once");
        th.join()
            .map_err(|_| Error::Save("copier thread panicked".into()))?
    }

    /// `(pages saved, pages to save)`.
    pub fn progress(&self) -> (u64, u64) {
        (self.save.done_pages.load(Ordering::Relaxed), self.total)
    }
}

impl Drop for LiveSave {
    fn drop(&mut self) {
        if let Some(th) = self.thread.take() {
            let _ = th.join();
        }
    }
}

fn check_identity(mem: &GuestMemoryMmap, id: &Identity) -> Result<Vec<Region>> {
    let regions = tracker::regions(mem);
    let total: u64 = regions.iter().map(|r| r.len).sum();
    if total != id.mem_size || !total.is_multiple_of(PAGE_SIZE) {
        return Err(Error::MemSize {
            image: id.mem_size,
            vm: total,
        });
    }
    Ok(regions)
}

fn create_file(path: &Path, page_count: u64) -> Result<File> {
    let io = |source| Error::Io {
        context: "create memory image",
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io)?;
    f.set_len(format::file_len(page_count)).map_err(io)?;
    Ok(f)
}

/// `n` zero atomics from a zeroed allocation (no page touched until used).
fn zeroed_u32s(n: usize) -> Vec<AtomicU32> {
    let mut v = std::mem::ManuallyDrop::new(vec![0u32; n]);
    // SAFETY: AtomicU32 has the size, alignment and bit validity of u32; the allocation is
    // handed over whole, with its length and capacity.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<AtomicU32>(), v.len(), v.capacity()) }
}

fn all_pages(page_count: u64) -> Vec<u64> {
    let mut w = vec![u64::MAX; format::bitmap_words(page_count) as usize];
    let tail = page_count % 64;
    if tail != 0 {
        *w.last_mut().expect("at least one word") = (1 << tail) - 1;
    }
    w
}

/// Splits runs of page indices at region ends and into batches.
fn batches(regions: &[Region], set: &[u64], page_count: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (first, n) in bitmap::runs(set, page_count, u64::MAX) {
        let mut i = first;
        while i < first + n {
            let r = regions
                .iter()
                .find(|r| i >= r.first_page && i < r.first_page + r.len / PAGE_SIZE)
                .expect("page inside a region");
            let end = (first + n)
                .min(r.first_page + r.len / PAGE_SIZE)
                .min(i + BATCH_PAGES);
            out.push((i, end - i));
            i = end;
        }
    }
    out
}

/// Starts an epoch on `mem`'s tracker (creating it the first time): takes the dirty set,
/// write-protects what must be, and returns the pages the image holds. Runs with the epoch
/// lock held (the returned guard), so no fault is resolved until the caller has installed
/// its save.
struct Epoch<'t> {
    guard: std::sync::MutexGuard<'t, tracker::State>,
    set: Vec<u64>,
    incremental: bool,
    protect: Duration,
}

fn begin<'t>(t: &'t Tracker, fresh: bool, parent: Option<&ImageRef>) -> Result<Epoch<'t>> {
    let mut guard = t.lock();
    if guard.save.is_some() {
        return Err(Error::Busy);
    }
    if let Some(p) = parent {
        if guard.last_image != Some(p.image_id) {
            return Err(Error::NotParent);
        }
    }
    let t0 = Instant::now();
    let dirty = t.dirty.take();
    let r = if fresh {
        t.protect_all()
    } else {
        t.protect(&dirty)
    };
    if let Err(e) = r {
        // Keep the invariant: whatever may be unprotected stays marked dirty.
        for (first, n) in bitmap::runs(&dirty, t.page_count, u64::MAX) {
            for i in first..first + n {
                t.dirty.set(i);
            }
        }
        return Err(e);
    }
    let protect = t0.elapsed();
    guard.last_image = None;
    let set = if parent.is_some() {
        dirty
    } else {
        all_pages(t.page_count)
    };
    Ok(Epoch {
        guard,
        set,
        incremental: parent.is_some(),
        protect,
    })
}

fn tracker_for(mem: &GuestMemoryMmap, parent: Option<&ImageRef>) -> Result<(Arc<Tracker>, bool)> {
    match tracker::find(mem) {
        Some(t) => Ok((t, false)),
        None if parent.is_some() => Err(Error::NotParent),
        None => Ok((Tracker::create(mem, None)?, true)),
    }
}

fn write_metadata(
    file: &File,
    path: &Path,
    id: &Identity,
    header: &Header,
    held: &[u64],
    data: &[u64],
    crcs: &[u32],
) -> Result<()> {
    let io = |context| {
        move |source| Error::Io {
            context,
            path: path.to_path_buf(),
            source,
        }
    };
    // Data first, then the metadata: an image without valid metadata is refused, so a crash
    // mid-save never leaves a half image that opens.
    file.sync_data().map_err(io("sync memory image"))?;
    let meta = format::encode(id, header, held, data, crcs);
    file.write_all_at(&meta, 0)
        .map_err(io("write memory image metadata"))?;
    file.sync_data().map_err(io("sync memory image"))
}

/// Writes all of `mem` to a full image at `path`, with the guest paused (stop-copy). Zero
/// pages are left as holes. The next increment may name this image as its parent.
pub fn save_full(mem: &GuestMemoryMmap, path: &Path, id: &Identity) -> Result<ImageStats> {
    save_stop_copy(mem, path, id, None)
}

/// Stop-copy save, full or (with `parent`) incremental.
pub fn save_stop_copy(
    mem: &GuestMemoryMmap,
    path: &Path,
    id: &Identity,
    parent: Option<&ImageRef>,
) -> Result<ImageStats> {
    let start = Instant::now();
    let regions = check_identity(mem, id)?;
    let page_count = id.mem_size / PAGE_SIZE;
    let file = create_file(path, page_count)?;
    let (t, fresh) = tracker_for(mem, parent)?;
    let mut epoch = begin(&t, fresh, parent)?;
    let image_id = format::new_image_id();
    let data_offset = format::data_offset(page_count);
    let mut crcs = vec![0u32; page_count as usize];
    let mut data = vec![0u64; format::bitmap_words(page_count) as usize];
    let list = batches(&regions, &epoch.set, page_count);
    // A scanner thread checksums the pages one batch ahead while this thread hands the
    // previous batches to io_uring (whose inline page-cache copy runs on this thread).
    let r = std::thread::scope(|sc| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Scan>>(4);
        let (tr, regs, lst) = (&*t, &regions, &list);
        sc.spawn(move || {
            for &(first, n) in lst {
                let scan = scan_batch(tr, regs, first, n);
                let failed = scan.is_err();
                if tx.send(scan).is_err() || failed {
                    return;
                }
            }
        });
        let mut w = Writer::new(&file, DEPTH, 8, (BATCH_PAGES * PAGE_SIZE) as usize)
            .map_err(|e| Error::Sys("io_uring setup", e))?;
        let wio = |e| Error::Io {
            context: "write memory image",
            path: path.to_path_buf(),
            source: e,
        };
        for &(first, n) in &list {
            let scan = rx
                .recv()
                .map_err(|_| Error::Save("page scanner stopped".into()))??;
            let present = &scan.present;
            let host = tracker::host_of(&regions, first).expect("page inside a region");
            let mut run: Option<(u64, u64)> = None;
            let mut staged: Option<(usize, Vec<Segment>)> = None;
            for k in 0..n {
                let i = first + k;
                let nonzero = if present[k as usize] || t.source_is_zero(i) {
                    // Checksummed by the scanner (a missing zero page: a hole).
                    crcs[i as usize] = scan.crc[k as usize];
                    scan.nonzero[k as usize]
                } else {
                    // Missing: its content is the source's (restored chain or zeros).
                    let b = match &staged {
                        Some((b, _)) => *b,
                        None => {
                            let b = w.take_buf().map_err(wio)?;
                            staged = Some((b, Vec::new()));
                            b
                        }
                    };
                    let at = (k * PAGE_SIZE) as usize;
                    let page = &mut w.buf_mut(b)[at..at + PAGE_SIZE as usize];
                    t.source_page(i, page)?;
                    crcs[i as usize] = crc32c::crc32c(page);
                    let nz = !is_zero(page);
                    if nz {
                        bitmap::set(&mut data, i);
                        let seg = (at, PAGE_SIZE as usize, data_offset + i * PAGE_SIZE);
                        staged.as_mut().expect("staged").1.push(seg);
                    }
                    // A page from the source breaks a direct run.
                    if let Some((s, len)) = run.take() {
                        let p = (host + (s - first) * PAGE_SIZE) as *const u8;
                        // SAFETY: guest pages kept mapped by `mem` until `w.finish()` below.
                        unsafe {
                            w.write_raw(p, (len * PAGE_SIZE) as usize, data_offset + s * PAGE_SIZE)
                        }
                        .map_err(wio)?;
                    }
                    continue;
                };
                if nonzero {
                    bitmap::set(&mut data, i);
                    run = match run {
                        Some((s, len)) => Some((s, len + 1)),
                        None => Some((i, 1)),
                    };
                } else if let Some((s, len)) = run.take() {
                    let p = (host + (s - first) * PAGE_SIZE) as *const u8;
                    // SAFETY: guest pages kept mapped by `mem` until `w.finish()` below.
                    unsafe {
                        w.write_raw(p, (len * PAGE_SIZE) as usize, data_offset + s * PAGE_SIZE)
                    }
                    .map_err(wio)?;
                }
            }
            if let Some((s, len)) = run.take() {
                let p = (host + (s - first) * PAGE_SIZE) as *const u8;
                // SAFETY: guest pages kept mapped by `mem` until `w.finish()` below.
                unsafe { w.write_raw(p, (len * PAGE_SIZE) as usize, data_offset + s * PAGE_SIZE) }
                    .map_err(wio)?;
            }
            if let Some((b, segs)) = staged.take() {
                w.write_buf(b, &segs).map_err(wio)?;
            }
        }
        w.finish().map_err(wio)
    });
    r?;
    let held_pages = bitmap::count(&epoch.set);
    let data_pages = bitmap::count(&data);
    let header = Header {
        mem_size: id.mem_size,
        flags: if epoch.incremental {
            FLAG_INCREMENTAL
        } else {
            0
        },
        image_id,
        parent_id: parent.map(|p| p.image_id).unwrap_or([0; 16]),
        page_count,
        held_pages,
        data_pages,
        data_offset,
    };
    write_metadata(&file, path, id, &header, &epoch.set, &data, &crcs)?;
    epoch.guard.last_image = Some(image_id);
    let protect = epoch.protect;
    drop(epoch);
    let elapsed = start.elapsed();
    Ok(ImageStats {
        image_id,
        incremental: parent.is_some(),
        pages: held_pages,
        data_pages,
        bytes_written: data_pages * PAGE_SIZE,
        fault_pages: 0,
        pause: elapsed,
        protect,
        elapsed,
    })
}

/// Starts a live save of `mem` to `path`, with the guest paused: write-protects guest memory
/// (only the pages dirtied since the last image, after the first save) and returns; the guest
/// may resume at once. A background thread copies the pages with io_uring; a guest (or device)
/// write to a page not yet saved saves its old content first. With `opts.parent` the image is
/// an increment holding only the pages dirtied since that image.
pub fn start_live(
    mem: &GuestMemoryMmap,
    path: &Path,
    id: &Identity,
    opts: LiveOptions<'_>,
) -> Result<LiveSave> {
    let start = Instant::now();
    check_identity(mem, id)?;
    let page_count = id.mem_size / PAGE_SIZE;
    let file = create_file(path, page_count)?;
    let handler_file = file
        .try_clone()
        .map_err(|e| Error::Sys("dup memory image fd", e))?;
    let (t, fresh) = tracker_for(mem, opts.parent)?;
    let mut epoch = begin(&t, fresh, opts.parent)?;
    let total = bitmap::count(&epoch.set);
    let save = Arc::new(ActiveSave {
        set: std::mem::take(&mut epoch.set),
        claimed: AtomicBitmap::new(page_count),
        copied: AtomicBitmap::new(page_count),
        nonzero: AtomicBitmap::new(page_count),
        crcs: zeroed_u32s(page_count as usize),
        file: handler_file,
        data_offset: format::data_offset(page_count),
        aborted: AtomicBool::new(false),
        error: Mutex::new(None),
        fault_pages: AtomicU64::new(0),
        done_pages: AtomicU64::new(0),
    });
    epoch.guard.save = Some(Arc::clone(&save));
    let protect = epoch.protect;
    let incremental = epoch.incremental;
    drop(epoch);
    let pause = start.elapsed();
    let job = CopyJob {
        t: Arc::clone(&t),
        save: Arc::clone(&save),
        file,
        path: path.to_path_buf(),
        id: *id,
        parent: opts.parent.map(|p| p.image_id),
        incremental,
        start,
        pause,
        protect,
        #[cfg(test)]
        hold: opts.hold.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("memory-copier".into())
        .spawn(move || job.run())
        .map_err(|e| Error::Sys("spawn memory copier", e))?;
    Ok(LiveSave {
        thread: Some(thread),
        save,
        total,
    })
}

struct CopyJob {
    t: Arc<Tracker>,
    save: Arc<ActiveSave>,
    file: File,
    path: PathBuf,
    id: Identity,
    parent: Option<[u8; 16]>,
    incremental: bool,
    start: Instant,
    pause: Duration,
    protect: Duration,
    #[cfg(test)]
    hold: Option<Arc<AtomicBool>>,
}

impl CopyJob {
    fn run(self) -> Result<ImageStats> {
        let r = self.copy().and_then(|()| self.finish());
        if r.is_err() {
            self.save.aborted.store(true, Ordering::Release);
        }
        let mut st = self.t.lock();
        st.save = None;
        if let Ok(stats) = &r {
            st.last_image = Some(stats.image_id);
        }
        r
    }

    fn copy(&self) -> Result<()> {
        let (t, s) = (&self.t, &self.save);
        let wio = |e| Error::Io {
            context: "write memory image",
            path: self.path.clone(),
            source: e,
        };
        let mut w = Writer::new(
            &self.file,
            DEPTH,
            LIVE_BUFS,
            (BATCH_PAGES * PAGE_SIZE) as usize,
        )
        .map_err(|e| Error::Sys("io_uring setup", e))?;
        #[cfg(test)]
        while self
            .hold
            .as_ref()
            .is_some_and(|h| h.load(Ordering::Acquire))
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut present = Vec::new();
        for (first, n) in batches(&t.regions, &s.set, t.page_count) {
            if t.stopping() {
                return Err(Error::Save("guest memory released during the save".into()));
            }
            t.present(first, n as usize, &mut present)?;
            let host = tracker::host_of(&t.regions, first).expect("page inside a region");
            let b = w.take_buf().map_err(wio)?;
            let mut segs: Vec<(usize, usize, u64)> = Vec::new();
            let mut err = None;
            for k in 0..n {
                let i = first + k;
                if !s.claimed.set(i) {
                    continue; // the fault handler saved it
                }
                if !present[k as usize] && t.source_is_zero(i) {
                    // A hole: nothing to copy or write.
                    s.crcs[i as usize].store(tracker::zero_page_crc(), Ordering::Relaxed);
                    s.copied.set(i);
                    s.done_pages.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let at = (k * PAGE_SIZE) as usize;
                let page = &mut w.buf_mut(b)[at..at + PAGE_SIZE as usize];
                if present[k as usize] {
                    let src = (host + k * PAGE_SIZE) as *const u8;
                    // SAFETY: a present page of the live guest mapping (kept alive by the
                    // tracker's memory clone); it is write-protected and claimed by us, so the fault
                    // handler keeps any writer blocked until `copied` is set below.
                    unsafe { std::ptr::copy_nonoverlapping(src, page.as_mut_ptr(), page.len()) };
                } else if let Err(e) = t.source_page(i, page) {
                    err.get_or_insert(e);
                }
                let nz = s.note(i, page);
                s.copied.set(i);
                s.done_pages.fetch_add(1, Ordering::Relaxed);
                if nz {
                    let off = s.data_offset + i * PAGE_SIZE;
                    match segs.last_mut() {
                        Some((a, len, o)) if *a + *len == at && *o + *len as u64 == off => {
                            *len += PAGE_SIZE as usize
                        }
                        _ => segs.push((at, PAGE_SIZE as usize, off)),
                    }
                }
            }
            w.write_buf(b, &segs).map_err(wio)?;
            if let Some(e) = err {
                return Err(e);
            }
        }
        w.finish().map_err(wio)?;
        // Pages the handler claimed: wait until it has written them.
        for (first, n) in bitmap::runs(&s.set, t.page_count, u64::MAX) {
            for i in first..first + n {
                while !s.copied.get(i) {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        }
        if let Some(e) = s.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(Error::Save(e));
        }
        Ok(())
    }

    fn finish(&self) -> Result<ImageStats> {
        let s = &self.save;
        let page_count = self.t.page_count;
        let data = s.nonzero.snapshot();
        let crcs: Vec<u32> = s.crcs.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let image_id = format::new_image_id();
        let held_pages = bitmap::count(&s.set);
        let data_pages = bitmap::count(&data);
        let header = Header {
            mem_size: self.id.mem_size,
            flags: if self.incremental {
                FLAG_INCREMENTAL
            } else {
                0
            },
            image_id,
            parent_id: self.parent.unwrap_or([0; 16]),
            page_count,
            held_pages,
            data_pages,
            data_offset: s.data_offset,
        };
        write_metadata(
            &self.file, &self.path, &self.id, &header, &s.set, &data, &crcs,
        )?;
        Ok(ImageStats {
            image_id,
            incremental: self.incremental,
            pages: held_pages,
            data_pages,
            bytes_written: data_pages * PAGE_SIZE,
            fault_pages: s.fault_pages.load(Ordering::Relaxed),
            pause: self.pause,
            protect: self.protect,
            elapsed: self.start.elapsed(),
        })
    }
}
