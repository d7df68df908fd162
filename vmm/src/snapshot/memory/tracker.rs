//! The per-memory userfaultfd: registration, the fault handler thread, the dirty bitmap, and
//! the save currently capturing pages.
//!
//! Invariant between saves: every page that is present and not in `dirty` is write-protected,
//! and no page changed since the last image (or the restored chain) except the `dirty` ones.
//! Missing pages hold their source content (the restored chain's page, or zeros).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::bitmap::{self, AtomicBitmap};
use super::format::{Image, PAGE_SIZE};
use super::uffd::{self, Copied, Uffd};
use super::writer::is_zero;
use super::{Error, Result};

/// One contiguous guest RAM region.
#[derive(Clone, Copy)]
pub struct Region {
    pub host: u64,
    pub len: u64,
    pub first_page: u64,
}

/// The guest RAM regions of `mem`, in page-index order.
pub fn regions(mem: &GuestMemoryMmap) -> Vec<Region> {
    let mut first_page = 0;
    mem.iter()
        .map(|r| {
            let out = Region {
                host: r.as_ptr() as u64,
                len: r.len(),
                first_page,
            };
            first_page += r.len() / PAGE_SIZE;
            out
        })
        .collect()
}

/// Host address of page `i`.
pub fn host_of(regions: &[Region], i: u64) -> Option<u64> {
    regions
        .iter()
        .find(|r| i >= r.first_page && i < r.first_page + r.len / PAGE_SIZE)
        .map(|r| r.host + (i - r.first_page) * PAGE_SIZE)
}

/// Where restored pages come from: for each page the newest chain image holding it.
pub struct Source {
    pub images: Vec<Image>,
    /// Index into `images` per page, `u8::MAX` = zero page.
    pub owner: Vec<u8>,
}

impl Source {
    /// Reads page `i`'s restored content into `buf`.
    pub fn read(&self, i: u64, buf: &mut [u8]) -> Result<()> {
        match self.owner[i as usize] {
            u8::MAX => {
                buf.fill(0);
                Ok(())
            }
            k => self.images[k as usize].read_page(i, buf),
        }
    }
}

/// A save in progress: which pages it needs and which are already captured.
pub struct ActiveSave {
    /// Pages the image holds.
    pub set: Vec<u64>,
    /// Pages someone (copier or handler) has taken on.
    pub claimed: AtomicBitmap,
    /// Pages whose content is captured (in a staging buffer or written).
    pub copied: AtomicBitmap,
    /// Pages with non-zero content.
    pub nonzero: AtomicBitmap,
    pub crcs: Vec<AtomicU32>,
    pub file: File,
    pub data_offset: u64,
    /// The copier gave up: nobody waits for its claims any more.
    pub aborted: AtomicBool,
    pub error: Mutex<Option<String>>,
    pub fault_pages: AtomicU64,
    pub done_pages: AtomicU64,
}

impl ActiveSave {
    /// Records page `i`'s captured content (crc, zero-ness) without writing it.
    pub fn note(&self, i: u64, page: &[u8]) -> bool {
        self.crcs[i as usize].store(crc32c::crc32c(page), Ordering::Relaxed);
        let nz = !is_zero(page);
        if nz {
            self.nonzero.set(i);
        }
        nz
    }

    /// Saves page `i` from the fault handler: synchronous write, then marks it copied.
    fn save_now(&self, i: u64, page: &[u8]) {
        if self.note(i, page) {
            if let Err(e) = self
                .file
                .write_all_at(page, self.data_offset + i * PAGE_SIZE)
            {
                self.fail(format!("write of page {i}: {e}"));
            }
        }
        self.fault_pages.fetch_add(1, Ordering::Relaxed);
        self.done_pages.fetch_add(1, Ordering::Relaxed);
        self.copied.set(i);
    }

    /// Records the first error.
    pub fn fail(&self, msg: String) {
        let mut e = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_none() {
            *e = Some(msg);
        }
    }
}

/// Epoch state, changed only with the lock held (the handler holds it for each fault).
pub struct State {
    /// The image the dirty bitmap is relative to (`None`: no increment possible).
    pub last_image: Option<[u8; 16]>,
    pub save: Option<Arc<ActiveSave>>,
}

/// The userfaultfd and its handler for one guest memory.
pub struct Tracker {
    /// Keeps the mapping alive while the uffd and its threads use it.
    _mem: GuestMemoryMmap,
    pub regions: Vec<Region>,
    pub page_count: u64,
    uffd: Uffd,
    /// Pages un-protected (written) since the epoch began.
    pub dirty: AtomicBitmap,
    pub source: Option<Arc<Source>>,
    state: Mutex<State>,
    stop: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    pagemap: File,
    /// Set when a restored page failed its checksum (found by the prefetch, or by a fault
    /// whose access was then poisoned).
    pub failed: Mutex<Option<String>>,
    /// The prefetch thread has loaded (or given up on) every page.
    pub prefetched: AtomicBool,
}

/// Pages a missing-page fault fills at once (an aligned block around the fault).
const FILL_BLOCK: u64 = 16;

static TRACKERS: Mutex<Vec<Arc<Tracker>>> = Mutex::new(Vec::new());

fn registry() -> MutexGuard<'static, Vec<Arc<Tracker>>> {
    TRACKERS.lock().unwrap_or_else(|p| p.into_inner())
}

fn key(mem: &GuestMemoryMmap) -> Option<u64> {
    mem.iter().next().map(|r| r.as_ptr() as u64)
}

/// The tracker of `mem`, if it has one.
pub fn find(mem: &GuestMemoryMmap) -> Option<Arc<Tracker>> {
    let k = key(mem)?;
    registry()
        .iter()
        .find(|t| t.regions.first().map(|r| r.host) == Some(k))
        .cloned()
}

/// The state of restored memory: `Ok(true)` once every page is loaded, `Ok(false)` while the
/// prefetch runs, `Err` as soon as a page of the chain failed its checksum (stop the VM: that
/// page is never served, an access to it fails). Memory that was not restored: `Ok(true)`.
pub fn health(mem: &GuestMemoryMmap) -> Result<bool> {
    let Some(t) = find(mem) else { return Ok(true) };
    if let Some(msg) = t.failed.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        return Err(Error::Restored(msg));
    }
    Ok(t.source.is_none() || t.prefetched.load(Ordering::Acquire))
}

/// Stops tracking `mem`: ends the handler threads and closes its userfaultfd, so the mapping
/// can be freed. Call when the VM using `mem` is gone (never while a guest still runs on a
/// restored memory: pages not loaded yet would read as zeros).
pub fn release(mem: &GuestMemoryMmap) {
    let Some(k) = key(mem) else { return };
    let t = {
        let mut reg = registry();
        let Some(pos) = reg
            .iter()
            .position(|t| t.regions.first().map(|r| r.host) == Some(k))
        else {
            return;
        };
        reg.remove(pos)
    };
    t.stop.store(true, Ordering::Release);
    let threads = std::mem::take(&mut *t.threads.lock().unwrap_or_else(|p| p.into_inner()));
    for th in threads {
        let _ = th.join();
    }
}

impl Tracker {
    /// Registers all of `mem` with a new userfaultfd (missing + write-protect faults) and
    /// starts the handler. With `source` missing pages load from it, else they are zero.
    /// Nothing is write-protected yet.
    pub fn create(mem: &GuestMemoryMmap, source: Option<Arc<Source>>) -> Result<Arc<Tracker>> {
        if find(mem).is_some() {
            return Err(Error::Memory("memory is already tracked".into()));
        }
        let regions = regions(mem);
        let page_count = regions.iter().map(|r| r.len / PAGE_SIZE).sum();
        let uffd = Uffd::new().map_err(|e| Error::Sys("userfaultfd", e))?;
        for r in &regions {
            uffd.register(r.host, r.len)
                .map_err(|e| Error::Sys("UFFDIO_REGISTER of guest memory", e))?;
        }
        let pagemap = File::open("/proc/self/pagemap")
            .map_err(|e| Error::Sys("open /proc/self/pagemap", e))?;
        let t = Arc::new(Tracker {
            _mem: mem.clone(),
            regions,
            page_count,
            uffd,
            dirty: AtomicBitmap::new(page_count),
            source,
            state: Mutex::new(State {
                last_image: None,
                save: None,
            }),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            pagemap,
            failed: Mutex::new(None),
            prefetched: AtomicBool::new(false),
        });
        let h = Arc::clone(&t);
        let th = std::thread::Builder::new()
            .name("uffd-handler".into())
            .spawn(move || h.handler_loop())
            .map_err(|e| Error::Sys("spawn uffd handler", e))?;
        t.add_thread(th);
        registry().push(Arc::clone(&t));
        Ok(t)
    }

    /// Keeps `th` to join on release.
    pub fn add_thread(&self, th: JoinHandle<()>) {
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(th);
    }

    /// Whether release was asked for.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Locks the epoch state (never from a thread that may fault on guest memory while
    /// holding it... see the module docs).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write-protects all of guest RAM.
    pub fn protect_all(&self) -> Result<()> {
        for r in &self.regions {
            self.uffd
                .write_protect(r.host, r.len, true)
                .map_err(|e| Error::Sys("UFFDIO_WRITEPROTECT of guest memory", e))?;
        }
        Ok(())
    }

    /// Write-protects the pages set in `pages`: per run if there are few runs, else whole
    /// regions (one page-table walk beats thousands of ioctls).
    pub fn protect(&self, pages: &[u64]) -> Result<()> {
        let runs = bitmap::runs(pages, self.page_count, u64::MAX);
        if runs.len() as u64 > self.page_count / 32 {
            return self.protect_all();
        }
        for (first, n) in runs {
            // A run never crosses a region: split at region ends.
            let mut i = first;
            while i < first + n {
                let r = self
                    .regions
                    .iter()
                    .find(|r| i >= r.first_page && i < r.first_page + r.len / PAGE_SIZE)
                    .expect("page inside a region");
                let end = (first + n).min(r.first_page + r.len / PAGE_SIZE);
                let host = r.host + (i - r.first_page) * PAGE_SIZE;
                self.uffd
                    .write_protect(host, (end - i) * PAGE_SIZE, true)
                    .map_err(|e| Error::Sys("UFFDIO_WRITEPROTECT of dirty pages", e))?;
                i = end;
            }
        }
        Ok(())
    }

    /// Installs `len` bytes of restored content at missing page `i..` (write-protected, so
    /// the first write is tracked). Pages already present are left alone.
    pub fn fill(&self, i: u64, data: &[u8]) -> Result<()> {
        let host = host_of(&self.regions, i).expect("page inside a region");
        // SAFETY: `data` is a live buffer of `data.len()` bytes.
        match unsafe { self.uffd.copy(host, data.as_ptr(), data.len() as u64, true) } {
            Ok(Copied::All) => Ok(()),
            Ok(Copied::Exists) => {
                // Some page of the range exists: fill the rest one page at a time.
                if data.len() as u64 > PAGE_SIZE {
                    for (k, page) in data.chunks(PAGE_SIZE as usize).enumerate() {
                        self.fill(i + k as u64, page)?;
                    }
                }
                Ok(())
            }
            Err(e) => Err(Error::Sys("UFFDIO_COPY", e)),
        }
    }

    /// Which of `n` pages from `first` are present (or swapped) in the page tables: the others
    /// hold their source content.
    pub fn present(&self, first: u64, n: usize, out: &mut Vec<bool>) -> Result<()> {
        present(&self.pagemap, &self.regions, first, n, out)
    }

    /// Whether page `i`, when not present, is a zero page (never touched, or zero in the
    /// restored chain).
    pub fn source_is_zero(&self, i: u64) -> bool {
        self.source
            .as_ref()
            .is_none_or(|s| s.owner[i as usize] == u8::MAX)
    }

    /// Page `i`'s content at the start of the epoch when it is not present.
    pub fn source_page(&self, i: u64, buf: &mut [u8]) -> Result<()> {
        match &self.source {
            Some(s) => s.read(i, buf),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn page_of(&self, addr: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| addr >= r.host && addr < r.host + r.len)
            .map(|r| r.first_page + (addr - r.host) / PAGE_SIZE)
    }

    fn handler_loop(&self) {
        let mut msgs = [uffd::Msg::default(); 64];
        let mut buf = vec![0u8; (FILL_BLOCK * PAGE_SIZE) as usize];
        while !self.stopping() {
            let n = match self.uffd.read(&mut msgs, 100) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!("userfaultfd read failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
            };
            for m in &msgs[..n] {
                if m.event == uffd::EVENT_PAGEFAULT {
                    self.handle(m.address & !(PAGE_SIZE - 1), m.flags, &mut buf);
                }
            }
        }
    }

    /// Resolves one fault. Takes only the epoch lock, which no faulting thread holds.
    fn handle(&self, addr: u64, flags: u64, buf: &mut [u8]) {
        let page = PAGE_SIZE as usize;
        let Some(i) = self.page_of(addr) else {
            let _ = self.uffd.wake(addr, PAGE_SIZE);
            return;
        };
        let st = self.lock();
        let save = st.save.as_ref().filter(|s| bitmap::test(&s.set, i));
        if flags & uffd::FLAG_WP != 0 {
            if let Some(s) = save {
                if s.claimed.set(i) {
                    // SAFETY: `addr` is a present, still write-protected page of the live
                    // guest mapping (kept alive by `self._mem`): nobody can change it now.
                    unsafe {
                        std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), page)
                    };
                    s.save_now(i, &buf[..page]);
                } else {
                    // The copier is capturing this page: let it finish before un-protecting.
                    while !s.copied.get(i) && !s.aborted.load(Ordering::Acquire) {
                        std::thread::yield_now();
                    }
                }
            }
            self.dirty.set(i);
            drop(st);
            if let Err(e) = self.uffd.write_protect(addr, PAGE_SIZE, false) {
                tracing::error!("un-protecting page {i} failed: {e}");
                let _ = self.uffd.wake(addr, PAGE_SIZE);
            }
            return;
        }
        // Missing page: its content is the source's.
        if let Err(e) = self.source_page(i, &mut buf[..page]) {
            drop(st);
            self.poison(addr, e.to_string());
            return;
        }
        if let Some(s) = save {
            if s.claimed.set(i) {
                s.save_now(i, &buf[..page]);
            }
        }
        drop(st);
        // Fill the rest of the faulting page's aligned block too (sequential access takes one
        // fault per block). Same source content, write-protected: safe for a running save
        // (the copier reads the same bytes) and for tracking (nothing is dirty).
        if let Some((first, n)) = self.fill_block(i, buf) {
            let host = host_of(&self.regions, first).expect("page inside a region");
            // SAFETY: `buf` holds `n` pages.
            let r = unsafe { self.uffd.copy(host, buf.as_ptr(), n * PAGE_SIZE, true) };
            if let Ok(Copied::All) = r {
                return;
            }
            // A page of the block exists (prefetch, a neighbour's fault): just this page.
            if let Err(e) = self.source_page(i, &mut buf[..page]) {
                self.poison(addr, e.to_string());
                return;
            }
        }
        // SAFETY: `buf` holds at least one page.
        match unsafe { self.uffd.copy(addr, buf.as_ptr(), PAGE_SIZE, true) } {
            Ok(Copied::All) => {}
            Ok(Copied::Exists) => {
                let _ = self.uffd.wake(addr, PAGE_SIZE);
            }
            Err(e) => {
                tracing::error!("filling page {i} failed: {e}");
                let _ = self.uffd.wake(addr, PAGE_SIZE);
            }
        }
    }

    /// Reads the source content of page `i`'s aligned block of [`FILL_BLOCK`] pages (inside
    /// its region) into `buf`; `None` if a neighbour fails its checksum (then `buf` still
    /// holds page `i` at its start).
    fn fill_block(&self, i: u64, buf: &mut [u8]) -> Option<(u64, u64)> {
        let r = self
            .regions
            .iter()
            .find(|r| i >= r.first_page && i < r.first_page + r.len / PAGE_SIZE)?;
        let first = (i - i % FILL_BLOCK).max(r.first_page);
        let end = (first + FILL_BLOCK).min(r.first_page + r.len / PAGE_SIZE);
        for j in first..end {
            let at = ((j - first) * PAGE_SIZE) as usize;
            if self
                .source_page(j, &mut buf[at..at + PAGE_SIZE as usize])
                .is_err()
            {
                // Page i itself was read fine by the caller; keep it first in `buf`.
                let _ = self.source_page(i, &mut buf[..PAGE_SIZE as usize]);
                return None;
            }
        }
        Some((first, end - first))
    }

    /// Records that restored memory is damaged (the first reason is kept).
    pub fn record_damage(&self, msg: String) {
        tracing::error!("restored guest memory is damaged: {msg}");
        super::sigbus::record(&msg);
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(msg);
        }
    }

    fn poison(&self, addr: u64, msg: String) {
        self.record_damage(msg);
        if let Err(e) = self.uffd.poison(addr, PAGE_SIZE) {
            tracing::error!("cannot poison damaged page: {e}; the faulting thread stays blocked");
        }
    }
}

/// CRC32C of a zero page.
pub fn zero_page_crc() -> u32 {
    static CRC: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CRC.get_or_init(|| crc32c::crc32c(&[0u8; PAGE_SIZE as usize]))
}

/// Reads `/proc/self/pagemap` for `n` pages from page `first` (one region): present or
/// swapped per page.
pub fn present(
    pagemap: &File,
    regions: &[Region],
    first: u64,
    n: usize,
    out: &mut Vec<bool>,
) -> Result<()> {
    out.clear();
    let host = host_of(regions, first).expect("page inside a region");
    let mut raw = vec![0u8; n * 8];
    pagemap
        .read_exact_at(&mut raw, host / PAGE_SIZE * 8)
        .map_err(|e| Error::Sys("read /proc/self/pagemap", e))?;
    out.extend(raw.chunks(8).map(|e| {
        let v = u64::from_le_bytes(e.try_into().expect("8 bytes"));
        v & (3 << 62) != 0
    }));
    Ok(())
}
