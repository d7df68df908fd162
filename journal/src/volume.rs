//! A view of a disk at one point of the tree: Now (writable) or a checkpoint (read-only).
//!
//! Requests go through three steps that the synchronous methods here and the io_uring
//! [`crate::IoEngine`] share: *plan* (resolve blocks through the merged index, or lock and
//! allocate for a write; no data I/O), *data I/O* (done by the caller), and *finish* (verify
//! read checksums, or commit a write to the index and the pending log batch).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use crate::base::BaseImage;
use crate::format::{Record, RecordKind, LOG_HEADER_SIZE, RECORD_SIZE, ZERO_BLOCK};
use crate::index::{Index, Loc};
use crate::layer::LayerFiles;
use crate::punch::Puncher;
use crate::rangelock::{RangeGuard, RangeLock};
use crate::read_gate::{ReadGate, ReadPin};
use crate::safe_open::{open_regular, Links};
use crate::space::Alloc;
use crate::{AlignedBuf, Error, Result, BLOCK_SIZE};

#[path = "volume_sync.rs"]
mod sync;
pub(crate) use sync::{Begin, Steps, SyncBatch};

/// Pending records beyond which the log is appended (without waiting for a FLUSH).
const MAX_PENDING_RECORDS: usize = 1 << 18;

/// The writable layer of Now.
pub(crate) struct ActiveLayer {
    pub files: Arc<LayerFiles>,
    log: File,
    alloc: Arc<Mutex<Alloc>>,
    /// Punches ready freed blocks off the sync path (see `punch.rs`); shared with the
    /// active layers a checkpoint makes after this one.
    puncher: Arc<Puncher>,
    journal: Mutex<Pending>,
    /// Signalled when a log append (a sync batch) ends.
    sync_done: Condvar,
    /// Reads in flight, so freed blocks are reused only once nobody can still read them.
    gate: Arc<ReadGate>,
    /// Index entries of this layer: the records a compacted log would hold.
    live: AtomicU64,
    /// Set if a log compaction replaced the log file but this layer could not switch to it:
    /// every later append fails instead of going to the replaced file.
    log_lost: AtomicBool,
}

#[derive(Default)]
struct Pending {
    records: Vec<u8>,
    /// Data blocks superseded by a pending record: freed once that record is durable.
    dead: Vec<(Arc<LayerFiles>, u64)>,
    log_len: u64,
    log_dirty: bool,
    /// A sync batch holds the log (one append at a time: see `volume_sync`).
    syncing: bool,
    /// Sync batches started so far; the generation of the newest.
    started_gen: u64,
    /// Generation of the newest batch that made its records durable.
    durable_gen: u64,
    /// Eventfds of io_uring engines waiting for the log: signalled when it is released.
    wake: Vec<Arc<OwnedFd>>,
    /// The thread whose io_uring engine runs the batch holding the log, if one does.
    holder: Option<std::thread::ThreadId>,
}

impl ActiveLayer {
    /// Wraps an open layer for appending; `next_block` is the first free data block and
    /// `log_len` the valid length of the log.
    pub fn new(files: Arc<LayerFiles>, next_block: u64, log_len: u64) -> Result<ActiveLayer> {
        Self::with_puncher(files, next_block, log_len, Arc::new(Puncher::new()))
    }

    /// A new active layer that takes over `prev`'s punch worker (a checkpoint replacing
    /// `prev`: its queued punches go on without anyone waiting for them).
    pub fn after(files: Arc<LayerFiles>, prev: &ActiveLayer) -> Result<ActiveLayer> {
        Self::with_puncher(files, 0, LOG_HEADER_SIZE, prev.puncher.clone())
    }

    /// Takes over `prev`'s punch worker (an apply replacing `prev`, like [`ActiveLayer::after`]):
    /// `prev`'s queued punches go on without its drop waiting for them.
    pub fn take_over_punches(&mut self, prev: &ActiveLayer) {
        self.puncher = prev.puncher.clone();
    }

    fn with_puncher(
        files: Arc<LayerFiles>,
        next_block: u64,
        log_len: u64,
        puncher: Arc<Puncher>,
    ) -> Result<ActiveLayer> {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true);
        let log = open_regular(&files.log_path, &opts, Links::Refuse)?;
        log.set_len(log_len)
            .map_err(|e| Error::io(&files.log_path, e))?;
        let size = files
            .data
            .metadata()
            .map_err(|e| Error::io(&files.data_path, e))?
            .len();
        crate::compact_log::remove_leftover(&files.log_path);
        let alloc = Arc::new(Mutex::new(Alloc::new(next_block, size)));
        Ok(ActiveLayer {
            puncher,
            files,
            log,
            alloc,
            journal: Mutex::new(Pending {
                log_len,
                ..Pending::default()
            }),
            sync_done: Condvar::new(),
            gate: Arc::default(),
            live: AtomicU64::new(0),
            log_lost: AtomicBool::new(false),
        })
    }

    /// Reserves `n` consecutive data blocks: freed ones when a run is long enough, else at
    /// the end of the file.
    fn allocate(&self, n: u64) -> Result<u64> {
        lock(&self.alloc).allocate(n, &self.files)
    }

    /// Drops the unused preallocated tail of the data file (when the layer is sealed).
    pub fn trim_preallocation(&self) -> Result<()> {
        let used = lock(&self.alloc).high_water() * BLOCK_SIZE;
        self.files
            .data
            .set_len(used)
            .map_err(|e| Error::io(&self.files.data_path, e))?;
        self.files
            .data
            .sync_all()
            .map_err(|e| Error::io(&self.files.data_path, e))
    }
}

/// Space reuse and log compaction support (see `space.rs` and `compact_log.rs`).
impl ActiveLayer {
    /// Frees blocks whose superseding records are durable, once no read in flight can
    /// still be reading them (a read resolved before the supersession would otherwise read
    /// a hole or another block's data). This layer's own blocks are reused at once, without
    /// a punch, up to [`Alloc::keep_room`]; the rest go to the punch worker, which makes this
    /// layer's blocks reusable only after their punch. Never punches on the calling thread.
    fn release_dead(&self, dead: Vec<(Arc<LayerFiles>, u64)>) {
        let mut a = lock(&self.alloc);
        let ready = a.retire(dead, &self.gate);
        if ready.is_empty() {
            return;
        }
        // Own blocks are this file object's (not this layer id's: see `punch.rs`).
        let (mut mine, mut punch): (Vec<_>, Vec<_>) = ready
            .into_iter()
            .partition(|(l, _)| Arc::ptr_eq(l, &self.files));
        mine.sort_unstable_by_key(|&(_, b)| b);
        let keep = (a.keep_room() as usize).min(mine.len());
        // The lowest blocks are kept (the file's used part stays compact at its start).
        punch.extend(mine.drain(keep..));
        a.reuse(mine.into_iter().map(|(_, b)| b).collect());
        drop(a);
        self.puncher.enqueue(punch, &self.files, &self.alloc);
    }

    /// Queues blocks of another (sealed) layer that nothing references any more and no
    /// read can still be reading, to be punched by this layer's punch worker: a merge's
    /// swap never waits for its punches (ext4 took ~90 us per scattered 4 KiB hole). They
    /// are punched only, never reused here (they are not this file object's blocks).
    pub(crate) fn punch_later(&self, layer: &Arc<LayerFiles>, blocks: Vec<u64>) {
        if Arc::ptr_eq(layer, &self.files) {
            // Not a case any merge makes (the active layer is never merged): punched here,
            // so that they never reach the free list unpunched.
            return punch_here(layer, blocks);
        }
        let queued = blocks.into_iter().map(|b| (layer.clone(), b)).collect();
        self.puncher.enqueue(queued, &self.files, &self.alloc);
    }

    #[cfg(test)]
    pub(crate) fn puncher_for_tests(&self) -> &Puncher {
        &self.puncher
    }

    /// Waits until the punches queued so far are done and their blocks reusable; false if
    /// that took longer than `limit`.
    pub(crate) fn wait_punches(&self, limit: std::time::Duration) -> bool {
        self.puncher.wait(limit)
    }

    fn check_log(&self) -> Result<()> {
        if self.log_lost.load(Ordering::Acquire) {
            return Err(Error::Corrupt {
                what: self.files.log_path.display().to_string(),
                why: "a log compaction could not switch to the new log; reopen the disk".into(),
            });
        }
        Ok(())
    }

    /// After a (re)open: counts this layer's index entries and rebuilds the free list from
    /// the blocks no live record points at. The log is synced first, so every superseding
    /// record that was replayed is durable before its superseded block is reused.
    pub(crate) fn rebuild_space(&self, index: &Index, ordinal: u16, damaged: bool) -> Result<()> {
        self.log
            .sync_data()
            .map_err(|e| Error::io(&self.files.log_path, e))?;
        let mut live = Vec::new();
        let mut entries = 0;
        for (_, l) in index.iter().filter(|(_, l)| l.ordinal == ordinal) {
            entries += 1;
            if l.data_block != ZERO_BLOCK {
                live.push(l.data_block);
            }
        }
        self.live.store(entries, Ordering::Release);
        lock(&self.alloc).rebuild(live, damaged);
        Ok(())
    }

    /// True when no committed record waits to be appended (none pending, no batch running).
    /// With the view's state lock held no commit can add one meanwhile.
    fn log_settled(&self) -> bool {
        let j = lock(&self.journal);
        j.records.is_empty() && !j.syncing
    }

    /// Records in the log, appended or pending.
    pub(crate) fn log_records(&self) -> u64 {
        let j = lock(&self.journal);
        (j.log_len.saturating_sub(LOG_HEADER_SIZE) + j.records.len() as u64) / RECORD_SIZE as u64
    }

    /// Index entries of this layer (records of a compacted log).
    pub(crate) fn live_entries(&self) -> u64 {
        self.live.load(Ordering::Acquire)
    }

    pub(crate) fn forget_entries(&self, n: u64) {
        self.live.fetch_sub(n, Ordering::AcqRel);
    }

    /// The write descriptor of the log (a compaction points it at the new log).
    pub(crate) fn log_file(&self) -> &File {
        &self.log
    }

    pub(crate) fn mark_log_lost(&self) {
        self.log_lost.store(true, Ordering::Release);
    }

    /// Takes the pending records and freed blocks (a compaction holding the log
    /// writes their effect, which is in the index, into the new log).
    pub(crate) fn take_pending(&self) -> (Vec<u8>, Vec<(Arc<LayerFiles>, u64)>) {
        let mut j = lock(&self.journal);
        (std::mem::take(&mut j.records), std::mem::take(&mut j.dead))
    }

    /// Puts back what [`ActiveLayer::take_pending`] took, before anything newer.
    pub(crate) fn restore_pending(&self, records: Vec<u8>, dead: Vec<(Arc<LayerFiles>, u64)>) {
        let mut j = lock(&self.journal);
        let mut r = records;
        r.append(&mut j.records);
        j.records = r;
        let mut d = dead;
        d.append(&mut j.dead);
        j.dead = d;
    }

    /// The log was replaced by a durable compacted log of `len` bytes that covers `dead`'s
    /// superseding records.
    pub(crate) fn log_replaced(&self, len: u64, dead: Vec<(Arc<LayerFiles>, u64)>) {
        {
            let mut j = lock(&self.journal);
            j.log_len = len;
            j.log_dirty = false;
        }
        self.release_dead(dead);
    }

    /// Allocation figures: (used blocks, reusable free blocks, blocks waiting for readers
    /// or for their punch).
    pub(crate) fn space(&self) -> (u64, u64, u64) {
        let queued = self.puncher.pending();
        let a = lock(&self.alloc);
        let (free, limbo) = a.free_blocks();
        (a.used_blocks(), free, limbo + queued)
    }
}

/// Punches `blocks` of `layer` on this thread (a failure costs space only: logged).
fn punch_here(layer: &LayerFiles, mut blocks: Vec<u64>) {
    if let Err(e) = layer.punch(&mut blocks) {
        tracing::warn!("could not free blocks of layer {}: {e}", layer.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The mutable part of a view.
pub(crate) struct ViewState {
    /// Layers by ordinal, oldest first.
    pub layers: Vec<Arc<LayerFiles>>,
    pub index: Index,
    /// The layer writes go to (`None` for read-only views).
    pub active: Option<Arc<ActiveLayer>>,
    /// Ordinals from here on belong to Now alone: their superseded blocks can be freed.
    pub own_from: usize,
    /// The newest layer with damaged log records, if any: a damaged record's block is
    /// unknown, so no block whose newest version is in that layer or below (or in the base)
    /// can be trusted, and reading one fails.
    pub damaged_upto: Option<u16>,
    /// Set when the view's files cannot be opened or are in use elsewhere: every request
    /// fails with this reason.
    pub unreadable: Option<String>,
}

impl ViewState {
    /// A state whose every request fails with `why` (its files could not be opened).
    pub fn unreadable(why: String) -> ViewState {
        ViewState {
            layers: Vec::new(),
            index: Index::default(),
            active: None,
            own_from: 0,
            damaged_upto: None,
            unreadable: Some(why),
        }
    }

    /// Where the layers `run` sit consecutively in this view, if they do.
    pub fn find_run(&self, run: &[u64]) -> Option<usize> {
        if run.is_empty() || self.unreadable.is_some() {
            return None;
        }
        self.layers
            .windows(run.len())
            .position(|w| w.iter().map(|l| l.id).eq(run.iter().copied()))
    }

    /// Checks that a merged run can replace layers `first..first+len`: every data block the
    /// index reads from them is in the merged layer's `map` ((disk block, data block or
    /// [`ZERO_BLOCK`], crc), strictly ascending by disk block) as a data block of the same
    /// crc.
    ///
    /// Called with the state locked (clients wait): one streaming pass over the index
    /// counts the blocks read from the run, and one probe per map entry matches them, so
    /// the cost is a hash probe per merged block instead of a search per index entry.
    pub fn check_merged_run(
        &self,
        first: usize,
        len: usize,
        map: &[(u64, u64, u32)],
    ) -> Result<()> {
        let end = first + len;
        let in_run = |loc: &Loc| {
            let o = usize::from(loc.ordinal);
            o >= first && o < end && loc.data_block != ZERO_BLOCK
        };
        let missing = |block: u64| {
            Error::Invalid(format!(
                "merged layer does not hold block {block} as the view reads it"
            ))
        };
        let read_from_run = self.index.iter().filter(|(_, l)| in_run(l)).count();
        let mut matched = 0;
        let mut prev: Option<u64> = None;
        for &(block, data, crc) in map {
            if prev.is_some_and(|p| p >= block) {
                return Err(Error::Invalid(format!(
                    "merged layer's map is not ascending at block {block}"
                )));
            }
            prev = Some(block);
            match self.index.get(block) {
                Some(loc) if in_run(&loc) => {
                    if data == ZERO_BLOCK || crc != loc.crc {
                        return Err(missing(block));
                    }
                    matched += 1;
                }
                _ => {}
            }
        }
        if matched != read_from_run {
            // A block read from the run that the map lacks: name one (the error path only).
            let lacking = self
                .index
                .iter()
                .filter(|(_, l)| in_run(l))
                .map(|(b, _)| b)
                .find(|b| map.binary_search_by_key(b, |e| e.0).is_err());
            return Err(missing(lacking.unwrap_or(0)));
        }
        Ok(())
    }

    /// Swaps a merged layer into the view in place of layers `first..first+len` (call with
    /// the state locked, no write in flight, after [`ViewState::check_merged_run`] with the
    /// same `map`): index entries of those ordinals move to `merged` at the data block the
    /// map gives (a zero stays a zero), higher ordinals shift down by `len - 1`. Blocks
    /// superseded above the run keep pointing above it, so they are never served from the
    /// merged layer.
    pub fn swap_merged_run(
        &mut self,
        first: usize,
        len: usize,
        merged: Arc<LayerFiles>,
        map: &[(u64, u64, u32)],
    ) {
        let end = first + len;
        let shift = (len - 1) as u16;
        let ord = first as u16;
        // Ordinals first (a streaming pass): afterwards the run's entries, and only they,
        // have ordinal `ord` (those below keep theirs, those above are at `ord + 1` or more).
        self.index.remap(|_, loc| {
            let o = usize::from(loc.ordinal);
            if o >= end {
                loc.ordinal -= shift;
            } else if o >= first {
                loc.ordinal = ord;
            }
        });
        // Then the data blocks, one probe per merged block.
        for &(block, data, _) in map {
            if let Some(loc) = self.index.get_mut(block) {
                if loc.ordinal == ord && loc.data_block != ZERO_BLOCK {
                    loc.data_block = data;
                }
            }
        }
        self.layers.splice(first..end, [merged]);
        self.damaged_upto = self.damaged_upto.map(|d| {
            let o = usize::from(d);
            if o >= end {
                d - shift
            } else if o >= first {
                ord
            } else {
                d
            }
        });
        if self.own_from >= end {
            self.own_from -= len - 1;
        } else if self.own_from > first {
            self.own_from = first + 1;
        }
    }

    fn check_readable(&self) -> Result<()> {
        match &self.unreadable {
            Some(why) => Err(Error::Unreadable {
                view: "Now".into(),
                why: why.clone(),
            }),
            None => Ok(()),
        }
    }
}

/// Where a piece of a read comes from.
pub(crate) enum Source {
    Layer(Arc<LayerFiles>),
    Base(Arc<BaseImage>),
    Zero,
}

/// A contiguous piece of a planned read.
pub(crate) struct ReadSeg {
    pub source: Source,
    pub file_off: u64,
    pub buf_off: usize,
    pub len: usize,
}

/// A block whose checksum is verified once its data is read.
pub(crate) struct BlockCheck {
    pub buf_off: usize,
    pub crc: u32,
    pub layer: u64,
    pub data_block: u64,
    pub disk_block: u64,
}

/// A planned read of whole blocks into a block-aligned buffer.
pub(crate) struct ReadPlan {
    pub first_block: u64,
    pub nblocks: u64,
    pub segs: Vec<ReadSeg>,
    pub checks: Vec<BlockCheck>,
    /// Keeps the blocks read from being reused for other data while the read runs.
    _pin: Option<ReadPin>,
    /// Holds the merge gate while the plan lives (see [`crate::merge::MergeGate`]).
    _merge_pin: ReadPin,
}

/// One run of consecutive disk blocks in a write.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Run {
    pub first_block: u64,
    pub nblocks: u64,
    /// Offset of the run's data in the plan's buffer; `None` for blocks that become zeros.
    pub buf_off: Option<usize>,
}

/// A planned write: locked, allocated, checksummed; the caller writes `data` at `file_off`
/// of the active data file and then calls [`Volume::commit`].
pub(crate) struct WritePlan {
    _guard: RangeGuard,
    pub runs: Vec<Run>,
    pub data: AlignedBuf,
    pub crcs: Vec<u32>,
    pub active: Arc<ActiveLayer>,
    pub ordinal: u16,
    /// First allocated data block (valid when `data` is not empty).
    pub data_block: u64,
    pub fua: bool,
}

impl WritePlan {
    /// Byte offset in the active data file where `data` goes.
    pub fn file_off(&self) -> u64 {
        self.data_block * BLOCK_SIZE
    }
}

/// The outcome of planning a write.
pub(crate) enum Planned {
    Ready(WritePlan),
    /// An overlapping write holds the blocks; the data is handed back for a later retry.
    Busy(Option<AlignedBuf>),
}

/// A readable (and, for Now, writable) view. All methods take `&self` and are thread-safe.
/// Offsets and lengths have byte granularity: a write that covers part of a 4 KiB block
/// reads the rest of the block and rewrites it whole, holding the block's range lock.
pub struct Volume {
    size: u64,
    read_only: bool,
    base: Option<Arc<BaseImage>>,
    state: RwLock<ViewState>,
    locks: RangeLock,
    in_flight: AtomicUsize,
    /// Reads in flight, for a merge that frees source blocks it moved out of the index.
    pub(crate) merge_gate: crate::merge::MergeGate,
}

impl Volume {
    pub(crate) fn new(
        size: u64,
        read_only: bool,
        base: Option<Arc<BaseImage>>,
        state: ViewState,
    ) -> Volume {
        Volume {
            size,
            read_only: read_only || state.active.is_none(),
            base,
            state: RwLock::new(state),
            locks: RangeLock::default(),
            in_flight: AtomicUsize::new(0),
            merge_gate: crate::merge::MergeGate::default(),
        }
    }

    pub(crate) fn state(&self) -> RwLockReadGuard<'_, ViewState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The state, unless a writer holds (or waits for) its lock.
    pub(crate) fn try_state(&self) -> Option<RwLockReadGuard<'_, ViewState>> {
        match self.state.try_read() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// The base image under every layer, if any.
    pub(crate) fn base(&self) -> Option<&Arc<BaseImage>> {
        self.base.as_ref()
    }

    pub(crate) fn state_mut(&self) -> RwLockWriteGuard<'_, ViewState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True for checkpoint views and disks opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Writes planned and not yet committed or aborted.
    pub fn writes_in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Number of distinct blocks written in this view's lineage, and the index's heap bytes.
    pub fn index_stats(&self) -> (usize, usize) {
        let st = self.state();
        (st.index.len(), st.index.heap_bytes())
    }

    /// Why this view cannot be read at all, if so (its files are damaged or missing, or
    /// another process is writing it).
    pub fn unreadable_reason(&self) -> Option<String> {
        self.state().unreadable.clone()
    }

    /// Fails with [`Error::Unreadable`] when the view cannot be read at all.
    pub fn check_readable(&self) -> Result<()> {
        self.state().check_readable()
    }

    /// Number of layers in this view's lineage.
    pub fn depth(&self) -> usize {
        self.state().layers.len()
    }

    /// Any byte offset and length inside the disk is accepted: partial blocks are
    /// read-modify-written under the block range lock.
    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Resolves the whole blocks covering `[offset, offset+len)`.
    pub(crate) fn plan_read(&self, offset: u64, len: u64) -> Result<ReadPlan> {
        self.check_range(offset, len)?;
        let first_block = offset / BLOCK_SIZE;
        let end_block = (offset + len).div_ceil(BLOCK_SIZE);
        let nblocks = end_block - first_block;
        let mut segs: Vec<ReadSeg> = Vec::new();
        let mut checks = Vec::new();
        let st = self.state();
        st.check_readable()?;
        // Pinned before the index is read: a block this read resolves is not reused for
        // other data until the plan is dropped, and a merge frees a block it moved out of
        // the index only once the reads that may have resolved to it are done.
        let pin = st.active.as_ref().map(|a| a.gate.pin());
        let merge_pin = self.merge_gate.pin();
        for i in 0..nblocks {
            let block = first_block + i;
            let buf_off = (i * BLOCK_SIZE) as usize;
            let found = st.index.get(block);
            if let Some(d) = st.damaged_upto {
                if found.is_none_or(|l| l.ordinal <= d) {
                    let layer = st
                        .layers
                        .get(usize::from(d))
                        .map(|l| l.id)
                        .unwrap_or_default();
                    return Err(Error::Corrupt {
                        what: format!("disk offset {}", block * BLOCK_SIZE),
                        why: format!("the index log of layer {layer} is damaged, so this block's version is unknown"),
                    });
                }
            }
            let (source, file_off) =
                match found {
                    Some(Loc {
                        data_block: ZERO_BLOCK,
                        ..
                    }) => (Source::Zero, 0),
                    Some(loc) => {
                        let layer = st.layers.get(usize::from(loc.ordinal)).ok_or_else(|| {
                            Error::Corrupt {
                                what: format!("index of block {block}"),
                                why: "points at a missing layer".into(),
                            }
                        })?;
                        checks.push(BlockCheck {
                            buf_off,
                            crc: loc.crc,
                            layer: layer.id,
                            data_block: loc.data_block,
                            disk_block: block,
                        });
                        let off = loc.data_block.checked_mul(BLOCK_SIZE).ok_or_else(|| {
                            Error::Corrupt {
                                what: format!("index of block {block}"),
                                why: format!("data block {} is out of range", loc.data_block),
                            }
                        })?;
                        (Source::Layer(layer.clone()), off)
                    }
                    None => match &self.base {
                        Some(b) if block * BLOCK_SIZE < b.size => {
                            (Source::Base(b.clone()), block * BLOCK_SIZE)
                        }
                        _ => (Source::Zero, 0),
                    },
                };
            if let Some(last) = segs.last_mut() {
                let contiguous = last.buf_off + last.len == buf_off
                    && match (&last.source, &source) {
                        (Source::Zero, Source::Zero) => true,
                        (Source::Layer(a), Source::Layer(b)) => {
                            a.id == b.id && last.file_off + last.len as u64 == file_off
                        }
                        (Source::Base(_), Source::Base(_)) => {
                            last.file_off + last.len as u64 == file_off
                        }
                        _ => false,
                    };
                if contiguous {
                    last.len += BLOCK_SIZE as usize;
                    continue;
                }
            }
            segs.push(ReadSeg {
                source,
                file_off,
                buf_off,
                len: BLOCK_SIZE as usize,
            });
        }
        Ok(ReadPlan {
            first_block,
            nblocks,
            segs,
            checks,
            _pin: pin,
            _merge_pin: merge_pin,
        })
    }

    /// Verifies the checksums of a completed read plan's layer blocks.
    pub(crate) fn verify_read(plan: &ReadPlan, buf: &[u8]) -> Result<()> {
        for c in &plan.checks {
            let block = &buf[c.buf_off..c.buf_off + BLOCK_SIZE as usize];
            let got = crc32c::crc32c(block);
            if got != c.crc {
                return Err(Error::Corrupt {
                    what: format!(
                        "layer {} data block {} (disk offset {})",
                        c.layer,
                        c.data_block,
                        c.disk_block * BLOCK_SIZE
                    ),
                    why: format!("checksum {got:08x}, expected {:08x}", c.crc),
                });
            }
        }
        Ok(())
    }

    /// Executes a read plan with positional I/O into `buf` (block aligned, `nblocks` long).
    pub(crate) fn execute_read(plan: &ReadPlan, buf: &mut [u8]) -> Result<()> {
        for seg in &plan.segs {
            let dst = &mut buf[seg.buf_off..seg.buf_off + seg.len];
            match &seg.source {
                Source::Zero => dst.fill(0),
                Source::Base(b) => {
                    b.read_at(dst, seg.file_off)?;
                }
                Source::Layer(l) => {
                    l.data
                        .read_exact_at(dst, seg.file_off)
                        .map_err(|e| Error::io(&l.data_path, e))?;
                }
            }
        }
        Self::verify_read(plan, buf)
    }

    /// Reads `buf.len()` bytes at `offset`. A damaged block fails with `Error::Corrupt`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let plan = self.plan_read(offset, buf.len() as u64)?;
        let mut tmp = AlignedBuf::new((plan.nblocks * BLOCK_SIZE) as usize);
        Self::execute_read(&plan, tmp.as_mut_slice())?;
        let skip = (offset - plan.first_block * BLOCK_SIZE) as usize;
        buf.copy_from_slice(&tmp.as_slice()[skip..skip + buf.len()]);
        Ok(())
    }

    fn lock_blocks(&self, first: u64, end: u64, wait: bool) -> Option<RangeGuard> {
        if wait {
            Some(self.locks.lock(first..end))
        } else {
            self.locks.try_lock(first..end)
        }
    }

    /// Reads whole block `block` as this view currently sees it (used for read-modify-write).
    fn read_block_into(&self, block: u64, dst: &mut [u8]) -> Result<()> {
        let plan = self.plan_read(
            block * BLOCK_SIZE,
            BLOCK_SIZE.min(self.size - block * BLOCK_SIZE),
        )?;
        let mut tmp = AlignedBuf::new(BLOCK_SIZE as usize);
        Self::execute_read(&plan, tmp.as_mut_slice())?;
        dst.copy_from_slice(tmp.as_slice());
        Ok(())
    }

    /// Plans a write of `data` (exactly `len` bytes) at `offset`, or with `data = None` makes
    /// the range read as zeros. With `wait` false, returns [`Planned::Busy`] instead of
    /// waiting for an overlapping write.
    pub(crate) fn plan_write(
        &self,
        offset: u64,
        len: u64,
        data: Option<AlignedBuf>,
        fua: bool,
        wait: bool,
    ) -> Result<Planned> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_range(offset, len)?;
        if data.as_ref().is_some_and(|d| d.len() as u64 != len) {
            return Err(Error::Invalid(
                "write buffer length differs from the request length".into(),
            ));
        }
        // Counted before the active layer is looked up, so that a checkpoint that sees no
        // write in flight (under the state lock) cannot race with one about to start.
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let result = self.plan_write_counted(offset, len, data, fua, wait);
        if !matches!(result, Ok(Planned::Ready(_))) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        result
    }

    fn plan_write_counted(
        &self,
        offset: u64,
        len: u64,
        data: Option<AlignedBuf>,
        fua: bool,
        wait: bool,
    ) -> Result<Planned> {
        let (active, ordinal) = {
            let st = self.state();
            st.check_readable()?;
            let active = st.active.clone().ok_or(Error::ReadOnly)?;
            let ordinal = u16::try_from(st.layers.len() - 1).map_err(|_| {
                Error::Invalid("too many layers in one lineage (limit 65536)".into())
            })?;
            (active, ordinal)
        };
        let first = offset / BLOCK_SIZE;
        let end = (offset + len).div_ceil(BLOCK_SIZE);
        let Some(guard) = self.lock_blocks(first, end, wait) else {
            return Ok(Planned::Busy(data));
        };
        let head_partial = !offset.is_multiple_of(BLOCK_SIZE);
        let tail_partial = !(offset + len).is_multiple_of(BLOCK_SIZE);
        let nblocks = end - first;
        let skip = (offset - first * BLOCK_SIZE) as usize;
        let mut runs = Vec::new();
        let buf = match data {
            Some(src) => {
                let aligned = !head_partial && !tail_partial && src.len() as u64 == len;
                let buf = if aligned {
                    src
                } else {
                    let mut img = AlignedBuf::new((nblocks * BLOCK_SIZE) as usize);
                    if head_partial {
                        self.read_block_into(
                            first,
                            &mut img.as_mut_slice()[..BLOCK_SIZE as usize],
                        )?;
                    }
                    if tail_partial && (nblocks > 1 || !head_partial) {
                        let at = ((nblocks - 1) * BLOCK_SIZE) as usize;
                        self.read_block_into(
                            end - 1,
                            &mut img.as_mut_slice()[at..at + BLOCK_SIZE as usize],
                        )?;
                    }
                    img.as_mut_slice()[skip..skip + len as usize]
                        .copy_from_slice(&src.as_slice()[..len as usize]);
                    img
                };
                runs.push(Run {
                    first_block: first,
                    nblocks,
                    buf_off: Some(0),
                });
                buf
            }
            None => {
                // Zeroing: partial end blocks are rewritten, whole blocks become zero records.
                let mut parts: Vec<u64> = Vec::new();
                if head_partial {
                    parts.push(first);
                }
                if tail_partial && !(head_partial && nblocks == 1) {
                    parts.push(end - 1);
                }
                let mut img = AlignedBuf::new(parts.len() * BLOCK_SIZE as usize);
                for (i, &b) in parts.iter().enumerate() {
                    let at = i * BLOCK_SIZE as usize;
                    let slot = &mut img.as_mut_slice()[at..at + BLOCK_SIZE as usize];
                    self.read_block_into(b, slot)?;
                    let bstart = b * BLOCK_SIZE;
                    let zs = offset.max(bstart) - bstart;
                    let ze = (offset + len).min(bstart + BLOCK_SIZE) - bstart;
                    slot[zs as usize..ze as usize].fill(0);
                    runs.push(Run {
                        first_block: b,
                        nblocks: 1,
                        buf_off: Some(at),
                    });
                }
                let zfirst = if head_partial { first + 1 } else { first };
                let zend = if tail_partial { end - 1 } else { end };
                if zend > zfirst {
                    // Blocks that already read as zeros get no record (the range lock
                    // keeps their index entries as they are until this write commits), so
                    // discarding never-written space writes nothing.
                    let st = self.state();
                    runs.extend(crate::zeroing::zero_runs(
                        &st.index,
                        st.damaged_upto,
                        self.base.as_deref(),
                        zfirst,
                        zend,
                    ));
                }
                img
            }
        };
        let crcs: Vec<u32> = buf
            .as_slice()
            .chunks(BLOCK_SIZE as usize)
            .map(crc32c::crc32c)
            .collect();
        let data_blocks = (buf.len() as u64) / BLOCK_SIZE;
        let data_block = if data_blocks > 0 {
            active.allocate(data_blocks)?
        } else {
            0
        };
        let plan = WritePlan {
            _guard: guard,
            runs,
            data: buf,
            crcs,
            active,
            ordinal,
            data_block,
            fua,
        };
        Ok(Planned::Ready(plan))
    }

    /// Makes a completed write visible (index) and queues its records for the log. Returns
    /// true when the caller should append the log soon ([`Volume::sync_log`]).
    pub(crate) fn commit(&self, plan: WritePlan) -> bool {
        let mut dead = Vec::new();
        let mut new_entries = 0;
        let mut rec_bytes = Vec::with_capacity(plan.crcs.len().max(1) * crate::format::RECORD_SIZE);
        let seed = plan.active.files.seed;
        let mut st = self.state_mut();
        for run in &plan.runs {
            for k in 0..run.nblocks {
                let block = run.first_block + k;
                let (loc, rec) = match run.buf_off {
                    Some(off) => {
                        let i = off / BLOCK_SIZE as usize + k as usize;
                        let db = plan.data_block + i as u64;
                        let crc = plan.crcs[i];
                        (
                            Loc {
                                ordinal: plan.ordinal,
                                data_block: db,
                                crc,
                            },
                            Record {
                                disk_block: block,
                                data_block: db,
                                crc,
                                kind: RecordKind::Data,
                            },
                        )
                    }
                    None => (
                        Loc {
                            ordinal: plan.ordinal,
                            data_block: ZERO_BLOCK,
                            crc: 0,
                        },
                        Record {
                            disk_block: block,
                            data_block: ZERO_BLOCK,
                            crc: 0,
                            kind: RecordKind::Zero,
                        },
                    ),
                };
                let old = st.index.insert(block, loc);
                if old.is_none_or(|o| o.ordinal != plan.ordinal) {
                    new_entries += 1;
                }
                if let Some(old) = old {
                    if usize::from(old.ordinal) >= st.own_from && old.data_block != ZERO_BLOCK {
                        if let Some(l) = st.layers.get(usize::from(old.ordinal)) {
                            dead.push((l.clone(), old.data_block));
                        }
                    }
                }
                rec_bytes.extend_from_slice(&rec.encode(seed));
            }
        }
        plan.active.live.fetch_add(new_entries, Ordering::AcqRel);
        let mut j = lock(&plan.active.journal);
        drop(st);
        j.records.extend_from_slice(&rec_bytes);
        j.dead.append(&mut dead);
        let big = j.records.len() / crate::format::RECORD_SIZE >= MAX_PENDING_RECORDS;
        drop(j);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        big
    }

    /// Gives up a planned write whose data I/O failed; nothing becomes visible.
    pub(crate) fn abort(&self, plan: WritePlan) {
        let blocks = plan.data.len() as u64 / BLOCK_SIZE;
        let mut j = lock(&plan.active.journal);
        for k in 0..blocks {
            j.dead
                .push((plan.active.files.clone(), plan.data_block + k));
        }
        drop(j);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Appends pending records to the log; `durable` also syncs data and log (a FLUSH).
    pub fn sync_log(&self, durable: bool) -> Result<()> {
        let active = self.state().active.clone();
        match active {
            Some(a) => {
                a.sync(durable)?;
                if durable && crate::audit::enabled() && self.in_flight.load(Ordering::Acquire) == 0
                {
                    // Only if every committed write is in the log: another thread (a reclaim
                    // job syncs Now) may have committed writes since this sync.
                    let st = self.state();
                    if a.log_settled() {
                        crate::audit::check_view(&st, self.size, "after a durable sync");
                    }
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn write_planned(&self, plan: WritePlan) -> Result<()> {
        if !plan.data.is_empty() {
            if let Err(e) = plan
                .active
                .files
                .data
                .write_all_at(plan.data.as_slice(), plan.file_off())
            {
                let path = plan.active.files.data_path.clone();
                self.abort(plan);
                return Err(Error::io(path, e));
            }
        }
        let fua = plan.fua;
        let big = self.commit(plan);
        if fua || big {
            self.sync_log(fua)?;
        }
        Ok(())
    }

    /// Writes `data` at `offset`; with `fua` the data is durable on return.
    pub fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        let buf = AlignedBuf::from_slice(data);
        if let Planned::Ready(plan) =
            self.plan_write(offset, data.len() as u64, Some(buf), fua, true)?
        {
            self.write_planned(plan)?;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        if let Planned::Ready(plan) = self.plan_write(offset, len, None, fua, true)? {
            self.write_planned(plan)?;
        }
        Ok(())
    }

    /// Discards `len` bytes at `offset`: they read as zeros in this view afterwards; no
    /// checkpoint changes.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, false)
    }

    /// Waits until the hole punches queued so far (blocks freed by durable syncs, punched
    /// by a background worker) are done, so that allocated sizes reflect them. Bounded (a
    /// minute); a sync or flush never waits for punches itself.
    pub fn wait_punches(&self) {
        if let Some(a) = self.active_layer() {
            if !a.wait_punches(crate::punch::DRAIN_LIMIT) {
                tracing::warn!("queued hole punches did not complete in time");
            }
        }
    }

    /// Frees `blocks` of `layer` (a sealed layer) in the background, on the active layer's
    /// punch worker (see [`ActiveLayer::punch_later`]); [`Volume::wait_punches`] waits for
    /// them too. Without an active layer they are punched here.
    pub(crate) fn punch_later(&self, layer: &Arc<LayerFiles>, blocks: Vec<u64>) {
        match self.active_layer() {
            Some(a) => a.punch_later(layer, blocks),
            None => punch_here(layer, blocks),
        }
    }

    /// Makes every completed write durable (and compacts the log when most of it is
    /// superseded records).
    pub fn flush(&self) -> Result<()> {
        self.sync_log(true)?;
        self.compact_if_due();
        Ok(())
    }
}

#[cfg(test)]
mod merged_run_tests {
    use super::*;

    /// A view whose index reads blocks 0..8 from layers 0..4 (block b from layer b % 4,
    /// data block 100 + b, crc b + 1) and block 8 as a zero of layer 2.
    fn view() -> ViewState {
        let mut v = ViewState::unreadable(String::new());
        for b in 0..8u64 {
            v.index.insert(
                b,
                Loc {
                    ordinal: (b % 4) as u16,
                    data_block: 100 + b,
                    crc: b as u32 + 1,
                },
            );
        }
        v.index.insert(
            8,
            Loc {
                ordinal: 2,
                data_block: ZERO_BLOCK,
                crc: 0,
            },
        );
        v
    }

    /// The map of a merge of layers 1..3 holding every block they define (blocks 1, 2, 5
    /// and 6 as data, 8 as a zero) and `extra` blocks nobody reads from them.
    fn merged_map(extra: &[u64]) -> Vec<(u64, u64, u32)> {
        let mut m: Vec<(u64, u64, u32)> = [1u64, 2, 5, 6]
            .iter()
            .map(|&b| (b, 500 + b, b as u32 + 1))
            .collect();
        m.push((8, ZERO_BLOCK, 0));
        m.extend(extra.iter().map(|&b| (b, 900 + b, 7)));
        m.sort_unstable();
        m
    }

    #[test]
    fn a_map_holding_every_block_read_from_the_run_passes() {
        // Blocks 0, 3, 4 and 7 read from outside the run: their map entries do not matter.
        let v = view();
        v.check_merged_run(1, 2, &merged_map(&[0, 3, 9])).unwrap();
    }

    #[test]
    fn a_missing_block_a_zero_or_another_crc_fails_naming_the_block() {
        let v = view();
        let lacking: Vec<_> = merged_map(&[]).into_iter().filter(|e| e.0 != 5).collect();
        // A map entry for a block read from outside the run does not stand in for it.
        let mut other = lacking.clone();
        other.push((7, 507, 8));
        other.sort_unstable();
        let zeroed: Vec<_> = merged_map(&[])
            .into_iter()
            .map(|e| if e.0 == 2 { (2, ZERO_BLOCK, 0) } else { e })
            .collect();
        let crc: Vec<_> = merged_map(&[])
            .into_iter()
            .map(|e| if e.0 == 6 { (6, 506, 99) } else { e })
            .collect();
        for (map, block) in [(lacking, 5), (other, 5), (zeroed, 2), (crc, 6)] {
            let e = v.check_merged_run(1, 2, &map).unwrap_err().to_string();
            assert!(
                e.contains(&format!("does not hold block {block} ")),
                "{block}: {e}"
            );
        }
    }

    #[test]
    fn a_map_out_of_order_or_repeating_a_block_fails() {
        let v = view();
        // Block 1 twice stands in for the missing block 5 in a count.
        let mut repeated: Vec<_> = merged_map(&[]).into_iter().filter(|e| e.0 != 5).collect();
        repeated.insert(1, (1, 501, 2));
        let mut reversed = merged_map(&[]);
        reversed.reverse();
        for map in [repeated, reversed] {
            let e = v.check_merged_run(1, 2, &map).unwrap_err().to_string();
            assert!(e.contains("not ascending"), "{e}");
        }
    }
}
