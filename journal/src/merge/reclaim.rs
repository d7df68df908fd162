//! Reclaim: freeing the data blocks of sealed layers that no view can read, in the
//! background (see "journal: merges" in `docs/DESIGN.md`).
//!
//! A relink moves a deleted checkpoint's layers under its child's. The child's layers
//! overwrote some of their blocks: every view that contains the moved layers contains the
//! whole stack they now sit in, so those versions are read by nobody. A reclaim job finds
//! them (recomputed from the logs and, for Now's stack, from Now's index) and punches them
//! in batches, off the [`crate::Disk`], like a merge job copies. It is idempotent: a crash
//! before or during it only leaves blocks allocated, and a later maintenance pass plans it
//! again from what the files say.
//!
//! What it never punches:
//! - a block the newest record of its layer names for a block no layer above overwrites
//!   (only the newest record per disk block is trusted: an older record's data block may
//!   have been reused for another block);
//! - anything of a layer whose log changed since the job was planned (an absorbing merge
//!   appended to it), whose log is damaged, that a merge job registered, that an open
//!   in-process view reads (a view of the deleted checkpoint, opened before the delete,
//!   reads the versions the stack above overwrites), or that a reader without the lock
//!   pinned (the claim is held while a batch is punched); all checked again before every
//!   batch, not only when the job is planned;
//! - in Now's stack, a block whose overwrite is not durable yet (Now's log is synced after
//!   its index is read and before the first punch);
//! - a block a read of Now may still be reading: before every batch the job waits for the
//!   reads of Now that began before it (Now's merge gate), so a read that resolved a block
//!   before Now overwrote it has ended when the block goes.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::format::{Record, RecordKind};
use crate::layer::LayerFiles;
use crate::locking;
use crate::volume::Volume;
use crate::{Error, Result, BLOCK_SIZE};

use super::copy::CopyPacer;
use super::job::{JobSetup, MergeJob, Registry, Target};
use super::progress::{MergeProgress, MergeReport};

/// Blocks punched per batch: the unit of cancellation, rate limiting and reader claims.
const BATCH_BLOCKS: usize = 8192;

/// Blocks punched between two looks at the pacer (scattered blocks: one punch each, about
/// 0.2 ms on this machine's ext4, so a slice is some 50 ms).
const SLICE_BLOCKS: usize = 256;

/// Longest wait for Now's reads in flight before a batch is punched; a batch whose reads
/// do not end by then is left allocated.
const GATE_DRAIN: Duration = Duration::from_secs(10);

/// Layers the reclaim of a stack found nothing more to free in, by id: (log length,
/// allocated bytes of the data file) when it looked. Maintenance does not plan them again
/// while both stay the same.
pub(crate) type Reclaimed = Arc<Mutex<HashMap<u64, (u64, u64)>>>;

/// What lies above the layers being reclaimed.
pub(crate) enum Above {
    /// A stack of sealed layers, oldest first (the targets among them).
    Sealed(Vec<Arc<LayerFiles>>),
    /// Now's stack, whose top was the active layer `active` when the job was planned: Now's
    /// index says which blocks are read above each target. If the active layer changed since
    /// (a checkpoint), the stack up to `active` is sealed and read from its logs.
    Now { now: Arc<Volume>, active: u64 },
}

/// One layer to reclaim.
pub(crate) struct Doomed {
    pub files: Arc<LayerFiles>,
    /// The log's length when the job was planned.
    pub log_len: u64,
}

impl Doomed {
    /// The layer `files` as it is now.
    pub fn new(files: Arc<LayerFiles>) -> Result<Doomed> {
        let log_len = files
            .log
            .metadata()
            .map_err(|e| Error::io(&files.log_path, e))?
            .len();
        Ok(Doomed { files, log_len })
    }
}

/// The dead blocks of one layer, still allocated, sorted.
struct Work {
    files: Arc<LayerFiles>,
    log_len: u64,
    blocks: Vec<u64>,
    named: Named,
}

/// For each doomed layer its position (`None`: no longer where the job expects it), and
/// the topmost position writing each disk block, in one numbering.
type Shadows = (Vec<Option<usize>>, HashMap<u64, usize>);

/// The state of a reclaim job.
pub(crate) struct Reclaim {
    doomed: Vec<Doomed>,
    above: Above,
    disk_blocks: u64,
    rate_limit: Option<u64>,
    reclaimed: Reclaimed,
    /// Now's volume: reads it began before a batch is punched are waited for.
    now: Arc<Volume>,
    /// Computed on the first run.
    work: Option<Vec<Work>>,
    /// Where the punching stands: layer, block within it.
    at: (usize, usize),
    punched: u64,
    freed: u64,
    /// Layers left allocated because a reader pinned them.
    pub kept_for_readers: usize,
}

/// The newest record of each disk block in `records` (log order).
fn newest(records: &[Record]) -> HashMap<u64, Record> {
    let mut m = HashMap::with_capacity(records.len());
    for r in records {
        m.insert(r.disk_block, *r);
    }
    m
}

/// The data blocks of `files` that no view of a stack reads, given `shadowed` (true for a
/// disk block some layer above overwrites): every block a record of an overwritten disk
/// block names, except those the newest record of a block nobody overwrites names (a data
/// block reused for another disk block). `None` when the log cannot be trusted.
#[cfg(test)]
fn dead_blocks(
    files: &LayerFiles,
    disk_blocks: u64,
    shadowed: impl Fn(u64) -> bool,
) -> Result<Option<Vec<u64>>> {
    Ok(dead_and_named(files, disk_blocks, shadowed)?.map(|(dead, _)| dead))
}

/// [`dead_blocks`], with the disk blocks every record naming each dead block is for.
fn dead_and_named(
    files: &LayerFiles,
    disk_blocks: u64,
    shadowed: impl Fn(u64) -> bool,
) -> Result<Option<(Vec<u64>, Named)>> {
    let scan = files.scan_log(disk_blocks)?;
    if !scan.damaged.is_empty() || scan.omitted > 0 {
        tracing::warn!(
            "layer {}: its log is damaged; nothing of it is reclaimed",
            files.id
        );
        return Ok(None);
    }
    let live: HashSet<u64> = newest(&scan.records)
        .into_values()
        .filter(|r| r.kind == RecordKind::Data && !shadowed(r.disk_block))
        .map(|r| r.data_block)
        .collect();
    // Only versions of overwritten blocks: a block superseded within the layer is Now's
    // (or a merge's) to free.
    let mut dead: Vec<u64> = scan
        .records
        .iter()
        .filter(|r| {
            r.kind == RecordKind::Data && shadowed(r.disk_block) && !live.contains(&r.data_block)
        })
        .map(|r| r.data_block)
        .collect();
    dead.sort_unstable();
    dead.dedup();
    let mut named: Named = HashMap::new();
    for r in scan.records.iter().filter(|r| r.kind == RecordKind::Data) {
        if dead.binary_search(&r.data_block).is_ok() {
            named.entry(r.data_block).or_default().push(r.disk_block);
        }
    }
    Ok(Some((dead, named)))
}

/// For each dead data block of a layer, the disk blocks of the records that name it.
type Named = HashMap<u64, Vec<u64>>;

/// Drops from `batch` (data blocks of layer `id`) the blocks Now's index reads from that
/// layer, for any disk block a record names them for; returns how many. None should be:
/// the plan follows the logs, and Now's index agrees with them. This is the check that
/// keeps a disagreement (a bug elsewhere) from becoming a punched block Now reads.
fn keep_what_now_reads(now: &Volume, id: u64, named: &Named, batch: &mut Vec<u64>) -> usize {
    let st = now.state();
    let Some(ord) = st.layers.iter().position(|l| l.id == id) else {
        return 0;
    };
    let before = batch.len();
    batch.retain(|d| {
        !named.get(d).is_some_and(|disk| {
            disk.iter().any(|&b| {
                st.index
                    .get(b)
                    .is_some_and(|l| usize::from(l.ordinal) == ord && l.data_block == *d)
            })
        })
    });
    before - batch.len()
}

/// The allocated extents of `f` as block ranges (start, end), sorted; the whole file when
/// the filesystem cannot say.
fn allocated_ranges(f: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut off: i64 = 0;
    let end = i64::try_from(len).unwrap_or(i64::MAX);
    while off < end {
        // SAFETY: lseek only reads the fd, which `f` keeps open for the call.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENXIO) {
                // Not supported: treat everything as allocated.
                return vec![(0, len.div_ceil(BLOCK_SIZE))];
            }
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { hole.min(end) };
        out.push((data as u64 / BLOCK_SIZE, (hole as u64).div_ceil(BLOCK_SIZE)));
        if hole <= data {
            break;
        }
        off = hole;
    }
    out
}

/// The blocks of sorted `blocks` inside the sorted `ranges`.
fn still_allocated(blocks: Vec<u64>, ranges: &[(u64, u64)]) -> Vec<u64> {
    let mut r = 0;
    blocks
        .into_iter()
        .filter(|&b| {
            while r < ranges.len() && ranges[r].1 <= b {
                r += 1;
            }
            r < ranges.len() && ranges[r].0 <= b
        })
        .collect()
}

fn data_allocated(files: &LayerFiles) -> u64 {
    files.data.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
}

/// The topmost position writing each disk block in `stack` (a stack of sealed layers).
fn tops(stack: &[Arc<LayerFiles>], disk_blocks: u64) -> Result<HashMap<u64, usize>> {
    let mut top = HashMap::new();
    for (i, lf) in stack.iter().enumerate() {
        for r in lf.scan_log(disk_blocks)?.records {
            top.insert(r.disk_block, i);
        }
    }
    Ok(top)
}

impl Reclaim {
    pub(crate) fn new(
        doomed: Vec<Doomed>,
        above: Above,
        disk_blocks: u64,
        rate_limit: Option<u64>,
        reclaimed: Reclaimed,
        now: Arc<Volume>,
    ) -> Reclaim {
        Reclaim {
            doomed,
            above,
            disk_blocks,
            rate_limit,
            reclaimed,
            now,
            work: None,
            at: (0, 0),
            punched: 0,
            freed: 0,
            kept_for_readers: 0,
        }
    }

    /// For each doomed layer, its position and the topmost position writing each block, in
    /// one numbering; `None` for a layer no longer where the job expects it.
    fn shadows(&self) -> Result<Shadows> {
        let position = |stack: &[Arc<LayerFiles>], id: u64| stack.iter().position(|l| l.id == id);
        match &self.above {
            Above::Sealed(stack) => {
                let pos = self
                    .doomed
                    .iter()
                    .map(|d| position(stack, d.files.id))
                    .collect();
                Ok((pos, tops(stack, self.disk_blocks)?))
            }
            Above::Now { now, active } => {
                let st = now.state();
                if st.unreadable.is_some() {
                    return Ok((vec![None; self.doomed.len()], HashMap::new()));
                }
                let pos: Vec<Option<usize>> = self
                    .doomed
                    .iter()
                    .map(|d| position(&st.layers, d.files.id))
                    .collect();
                let Some(lowest) = pos.iter().flatten().min().copied() else {
                    return Ok((pos, HashMap::new()));
                };
                if let Some(a) = st.active.clone().filter(|a| a.files.id == *active) {
                    // Only records on disk count: the active layer's log as long as it is
                    // now, made durable by the sync before it is read.
                    let stack: Vec<Arc<LayerFiles>> = st.layers[lowest..].to_vec();
                    drop(st);
                    let len0 = a
                        .files
                        .log
                        .metadata()
                        .map_err(|e| Error::io(&a.files.log_path, e))?
                        .len();
                    now.sync_log(true)?;
                    let keep = (len0.saturating_sub(crate::format::LOG_HEADER_SIZE)
                        / crate::format::RECORD_SIZE as u64)
                        as usize;
                    let mut top = HashMap::new();
                    let last = stack.len() - 1;
                    for (i, lf) in stack.iter().enumerate() {
                        let mut recs = lf.scan_log(self.disk_blocks)?.records;
                        if i == last {
                            recs.truncate(keep);
                        }
                        for r in recs {
                            top.insert(r.disk_block, i);
                        }
                    }
                    let pos = pos.into_iter().map(|p| p.map(|p| p - lowest)).collect();
                    return Ok((pos, top));
                }
                // A checkpoint sealed the stack: it ends at the old active layer.
                let Some(end) = position(&st.layers, *active) else {
                    return Ok((vec![None; self.doomed.len()], HashMap::new()));
                };
                if end < lowest {
                    return Ok((vec![None; self.doomed.len()], HashMap::new()));
                }
                let stack: Vec<Arc<LayerFiles>> = st.layers[lowest..=end].to_vec();
                drop(st);
                let top = tops(&stack, self.disk_blocks)?;
                let pos = pos
                    .into_iter()
                    .map(|p| p.filter(|&p| p <= end).map(|p| p - lowest))
                    .collect();
                Ok((pos, top))
            }
        }
    }

    /// Works out what to punch: the dead blocks of each doomed layer still allocated.
    fn plan(&self) -> Result<Vec<Work>> {
        let (pos, top) = self.shadows()?;
        let mut work = Vec::new();
        for (d, p) in self.doomed.iter().zip(pos) {
            let Some(p) = p else {
                tracing::info!(
                    "reclaim: layer {} moved since it was planned; a later pass looks again",
                    d.files.id
                );
                continue;
            };
            let len = d
                .files
                .log
                .metadata()
                .map_err(|e| Error::io(&d.files.log_path, e))?;
            if len.len() != d.log_len || len.nlink() == 0 {
                continue;
            }
            let Some((dead, named)) = dead_and_named(&d.files, self.disk_blocks, |b| {
                top.get(&b).is_some_and(|&t| t > p)
            })?
            else {
                continue;
            };
            let data_len = d
                .files
                .data
                .metadata()
                .map_err(|e| Error::io(&d.files.data_path, e))?
                .len();
            let blocks = still_allocated(dead, &allocated_ranges(&d.files.data, data_len));
            work.push(Work {
                files: d.files.clone(),
                log_len: d.log_len,
                blocks,
                named,
            });
        }
        Ok(work)
    }

    /// Punches in batches; `cancel` is polled between them. An error leaves the job
    /// resumable (a batch punched twice is harmless).
    ///
    /// `pacer` may pause the job between two slices of [`SLICE_BLOCKS`] punches (a
    /// background reclaim yields to client I/O this way, as a copy does between chunks): the
    /// batch then ends early, its claim is released and the pause comes before the next
    /// batch, which checks, claims and drains again.
    pub(crate) fn run(
        &mut self,
        id: u64,
        cancel: &AtomicBool,
        progress: &MergeProgress,
        registry: &Registry,
        pacer: &dyn CopyPacer,
    ) -> Result<()> {
        if self.work.is_none() {
            let w = self.plan()?;
            let total: u64 = w.iter().map(|w| w.blocks.len() as u64).sum();
            progress.set_total(total * BLOCK_SIZE);
            self.work = Some(w);
        }
        let Some(work) = self.work.as_ref() else {
            return Err(Error::Invalid("reclaim job lost its plan".into()));
        };
        let started = Instant::now();
        let start_punched = self.punched;
        while let Some(w) = work.get(self.at.0) {
            if self.at.1 >= w.blocks.len() {
                let after = data_allocated(&w.files);
                if let Ok(mut m) = self.reclaimed.lock() {
                    m.insert(w.files.id, (w.log_len, after));
                }
                self.at = (self.at.0 + 1, 0);
                continue;
            }
            if pacer.due() {
                // Nothing of the job is held here (the wait ends early on a cancel).
                pacer.wait();
            }
            if cancel.load(Ordering::Acquire) {
                return Err(Error::MergeCancelled(id));
            }
            let skip = |why: &str| {
                tracing::info!(
                    "reclaim {id}: layer {} {why}: its dead blocks stay allocated",
                    w.files.id
                );
            };
            // Checked before every batch: the plan may be old by now (a merge, an absorb, a
            // view opened since).
            if registry.busy_layers().contains(&w.files.id) {
                skip("is read by a merge job");
                self.at = (self.at.0 + 1, 0);
                continue;
            }
            if registry.viewed_layers().contains(&w.files.id) {
                skip("is read by an open checkpoint view");
                self.kept_for_readers += 1;
                self.at = (self.at.0 + 1, 0);
                continue;
            }
            if !unchanged(&w.files, w.log_len) {
                skip("changed since the job was planned");
                self.at = (self.at.0 + 1, 0);
                continue;
            }
            let claim = match locking::claim(&w.files.log_path) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    skip("is pinned by a reader");
                    self.kept_for_readers += 1;
                    self.at = (self.at.0 + 1, 0);
                    continue;
                }
                Err(e) => {
                    skip(&e.to_string());
                    self.at = (self.at.0 + 1, 0);
                    continue;
                }
            };
            // Reads of Now begun before this point may still use a block about to go (one
            // that resolved it before Now overwrote it).
            if !self.now.merge_gate.drain(GATE_DRAIN) {
                skip("has reads in flight that did not end");
                drop(claim);
                self.at = (self.at.0 + 1, 0);
                continue;
            }
            let t0 = Instant::now();
            let end = (self.at.1 + BATCH_BLOCKS).min(w.blocks.len());
            let before = data_allocated(&w.files);
            let from = self.at.1;
            while self.at.1 < end {
                let slice_end = (self.at.1 + SLICE_BLOCKS).min(end);
                let mut slice = w.blocks[self.at.1..slice_end].to_vec();
                if audit_on() {
                    audit_unread(&self.now, w.files.id, &slice);
                }
                let kept = keep_what_now_reads(&self.now, w.files.id, &w.named, &mut slice);
                if kept > 0 {
                    tracing::warn!(
                        "reclaim {id}: layer {}: {kept} planned blocks are still read by Now (its index and the logs disagree): they stay allocated",
                        w.files.id
                    );
                }
                w.files.punch(&mut slice)?;
                self.punched += (slice_end - self.at.1) as u64;
                self.at.1 = slice_end;
                progress.set_done(self.punched * BLOCK_SIZE);
                if pacer.due() {
                    break;
                }
            }
            drop(claim);
            self.freed += before.saturating_sub(data_allocated(&w.files));
            let n = (self.at.1 - from) as u64;
            progress.add_copy_time(n * BLOCK_SIZE, t0.elapsed().as_nanos() as u64);
            if let Some(rate) = self.rate_limit.filter(|&r| r > 0) {
                let bytes = (self.punched - start_punched) * BLOCK_SIZE;
                let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
                while started.elapsed() < due {
                    if cancel.load(Ordering::Acquire) {
                        return Err(Error::MergeCancelled(id));
                    }
                    let left = due.saturating_sub(started.elapsed());
                    std::thread::sleep(left.min(Duration::from_millis(20)));
                }
            }
        }
        Ok(())
    }
}

/// True while `files` is linked and its log is `log_len` bytes long (as planned).
fn unchanged(files: &LayerFiles, log_len: u64) -> bool {
    files
        .log
        .metadata()
        .is_ok_and(|m| m.len() == log_len && m.nlink() > 0)
}

/// `STRATA_AUDIT_RECLAIM` set: every batch is checked against Now's index first.
fn audit_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("STRATA_AUDIT_RECLAIM").is_some())
}

/// Audit mode: panics if Now's index reads one of `blocks` of layer `id` (about to be
/// punched).
fn audit_unread(now: &Volume, id: u64, blocks: &[u64]) {
    let st = now.state();
    let Some(ord) = st.layers.iter().position(|l| l.id == id) else {
        return;
    };
    let doomed: HashSet<u64> = blocks.iter().copied().collect();
    for (b, l) in st.index.iter() {
        if usize::from(l.ordinal) == ord && doomed.contains(&l.data_block) {
            panic!(
                "audit: reclaim punches layer {id} data block {} that Now reads for block {b}",
                l.data_block
            );
        }
    }
}

/// What makes a reclaim job, besides its plan.
pub(crate) struct ReclaimSetup {
    pub id: u64,
    pub checkpoint: String,
    pub dir: std::path::PathBuf,
    pub uuid: u128,
    pub cache: crate::disk::CacheMode,
    pub disk_blocks: u64,
    pub registry: Arc<Registry>,
}

impl MergeJob {
    /// A reclaim job: `run` punches the dead blocks of `plan`'s layers; finishing it changes
    /// nothing in the tree. It reads no layer a merge could replace, so it registers none.
    pub(crate) fn reclaim(s: ReclaimSetup, plan: Reclaim) -> MergeJob {
        let mut job = MergeJob::new(JobSetup {
            id: s.id,
            checkpoint: s.checkpoint,
            strategy: "reclaim".into(),
            dir: s.dir,
            uuid: s.uuid,
            cache: s.cache,
            disk_blocks: s.disk_blocks,
            base_blocks: 0,
            run: Vec::new(),
            below: Vec::new(),
            above: Vec::new(),
            hidden: HashSet::new(),
            target: Target::New,
            new_layer: true,
            rate_limit: None,
            queue_depth: 1,
            batch_bytes: None,
            progressive: false,
            registry: s.registry,
        });
        // It has no output: nothing to discard, whatever its id.
        job.adopted = true;
        job.reclaim = Some(Box::new(plan));
        job
    }

    /// True for a job that only frees blocks (see [`super::reclaim`]).
    pub fn is_reclaim(&self) -> bool {
        self.reclaim.is_some()
    }

    /// Layers a reader pinned, whose blocks a reclaim job left allocated (0 for merges).
    pub fn kept_for_readers(&self) -> usize {
        self.reclaim.as_ref().map_or(0, |r| r.kept_for_readers)
    }
}

/// The report of a reclaim job that ran (`None` for any other job); called by
/// `Disk::try_finish_merge`.
pub(crate) fn finish(job: &mut MergeJob) -> Option<MergeReport> {
    let r = job.reclaim.as_ref()?;
    let progress = job.progress();
    progress.done();
    let layers = r.doomed.len();
    Some(MergeReport {
        id: job.id(),
        checkpoint: job.checkpoint().to_string(),
        strategy: job.strategy().to_string(),
        bytes_freed: r.freed,
        layers_before: layers,
        layers_after: layers,
        copy_seconds: progress.copy_seconds(),
        ..MergeReport::default()
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use crate::{CacheMode, DeleteOptions, Disk, OpenOptions, StrategyKind};

    /// A disk of 1 MiB, open for writing.
    pub(crate) fn small_disk(dir: &std::path::Path) -> Disk {
        disk_of(dir, 1 << 20)
    }

    /// A fresh disk of `size` bytes, open for writing (write-back cache).
    pub(crate) fn disk_of(dir: &std::path::Path, size: u64) -> Disk {
        Disk::create(dir, size, None).unwrap();
        Disk::open(
            dir,
            OpenOptions {
                cache: CacheMode::Writeback,
                read_only: false,
            },
        )
        .unwrap()
    }

    /// Waits until `h` has finished or a drain of `gate` flipped its epoch past `e0` (then
    /// it is waiting for the reads pinned before, since the test holds one).
    pub(crate) fn finished_or_draining<T>(
        h: &std::thread::ScopedJoinHandle<'_, T>,
        gate: &crate::merge::MergeGate,
        e0: u64,
    ) {
        while !h.is_finished() && gate.epoch() == e0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A read of Now that resolved block 0 to the relinked layer, planned before Now
    /// overwrote the block, is still in flight when the reclaim (planned after the
    /// overwrite, so block 0 of that layer is dead) gets to its batch: the batch waits for it.
    #[test]
    fn a_batch_waits_for_a_read_that_resolved_its_block_before_now_overwrote_it() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("disk");
        let mut disk = small_disk(&dir);
        let now = disk.now();
        now.write_at(&[1; 4096], 0, false).unwrap();
        disk.checkpoint("old").unwrap();
        let (_, jobs) = disk
            .delete_online("old", &DeleteOptions::with(StrategyKind::Relink))
            .unwrap();
        let mut job = jobs.into_iter().next().expect("a reclaim job");
        assert!(job.is_reclaim());
        // Resolved to the old layer's block; read later (as the io_uring engine does).
        let plan = now.plan_read(0, 4096).unwrap();
        // Durable, so the reclaim counts it (Now's own free of the block waits for the read
        // on the active layer's gate).
        now.write_at(&[2; 4096], 0, true).unwrap();
        let e0 = now.merge_gate.epoch();
        let freed = std::thread::scope(|s| {
            let h = s.spawn(|| {
                job.run(&AtomicBool::new(false)).unwrap();
                job
            });
            finished_or_draining(&h, &now.merge_gate, e0);
            let mut buf = crate::AlignedBuf::new(4096);
            let read = Volume::execute_read(&plan, buf.as_mut_slice());
            assert!(
                read.is_ok() && buf.as_slice() == [1; 4096],
                "the read planned before the overwrite got a punched block: {read:?}"
            );
            drop(plan);
            let job = h.join().unwrap();
            disk.finish_merge(job).unwrap().bytes_freed
        });
        assert!(
            freed >= 4096,
            "the block was not reclaimed at all ({freed})"
        );
        let mut buf = [0u8; 4096];
        now.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [2; 4096]);
    }

    /// A pacer that asks for a pause at every look and checks, during each pause, that the
    /// job holds no claim on any layer (a reader of another process could pin it then).
    struct AlwaysDue {
        layers: std::path::PathBuf,
        waits: std::sync::atomic::AtomicUsize,
    }

    impl CopyPacer for AlwaysDue {
        fn due(&self) -> bool {
            true
        }
        fn wait(&self) {
            self.waits.fetch_add(1, Ordering::AcqRel);
            for e in std::fs::read_dir(&self.layers).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "log") {
                    assert!(
                        locking::claim(&p).unwrap().is_some(),
                        "{} is claimed during a pause",
                        p.display()
                    );
                }
            }
        }
    }

    /// A background reclaim yields between slices of punches, with nothing held, and still
    /// frees every dead block.
    #[test]
    fn a_paced_reclaim_pauses_between_slices_with_no_claim_held() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("disk");
        let mut disk = disk_of(&dir, 8 << 20);
        let now = disk.now();
        let blocks = 4 * SLICE_BLOCKS as u64;
        // Every other block: the dead blocks are scattered (one punch each).
        for i in 0..blocks {
            now.write_at(&[1; 4096], 2 * i * BLOCK_SIZE, false).unwrap();
        }
        disk.checkpoint("old").unwrap();
        for i in 0..blocks {
            now.write_at(&[2; 4096], 2 * i * BLOCK_SIZE, false).unwrap();
        }
        now.flush().unwrap();
        let (_, jobs) = disk
            .delete_online("old", &DeleteOptions::with(StrategyKind::Relink))
            .unwrap();
        let mut job = jobs.into_iter().next().expect("a reclaim job");
        assert!(job.is_reclaim());
        let pacer = AlwaysDue {
            layers: dir.join(crate::layer::LAYERS_DIR),
            waits: Default::default(),
        };
        job.run_paced(&AtomicBool::new(false), &pacer).unwrap();
        let waits = pacer.waits.load(Ordering::Acquire);
        assert!(
            waits >= blocks as usize / SLICE_BLOCKS,
            "{waits} pauses for {blocks} blocks in slices of {SLICE_BLOCKS}"
        );
        let freed = disk.finish_merge(job).unwrap().bytes_freed;
        assert!(
            freed >= blocks * BLOCK_SIZE,
            "freed {freed} of {} bytes",
            blocks * BLOCK_SIZE
        );
        let mut buf = [0u8; 4096];
        for i in [0, blocks / 2, blocks - 1] {
            now.read_at(&mut buf, 2 * i * BLOCK_SIZE).unwrap();
            assert_eq!(buf, [2; 4096], "block {}", 2 * i);
        }
    }

    #[test]
    fn only_allocated_dead_blocks_are_kept() {
        let b = still_allocated(vec![0, 3, 4, 9, 10, 20], &[(3, 5), (10, 11)]);
        assert_eq!(b, vec![3, 4, 10]);
        assert!(still_allocated(vec![1, 2], &[]).is_empty());
    }

    #[test]
    fn the_newest_record_of_a_block_decides_and_reused_blocks_stay() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join(crate::layer::LAYERS_DIR)).unwrap();
        let lf = LayerFiles::create(t.path(), 7, 2, crate::disk::CacheMode::Writeback).unwrap();
        let rec = |disk_block, data_block| Record {
            disk_block,
            data_block,
            crc: 0,
            kind: RecordKind::Data,
        };
        // Block 1 was written at data block 0, then again at 1; data block 0 was then reused
        // for block 2. Block 3 is at data block 2.
        let mut bytes = Vec::new();
        for r in [rec(1, 0), rec(1, 1), rec(2, 0), rec(3, 2)] {
            bytes.extend_from_slice(&r.encode(lf.seed));
        }
        use std::os::unix::fs::FileExt;
        let log = std::fs::File::options()
            .write(true)
            .open(&lf.log_path)
            .unwrap();
        log.write_all_at(&bytes, crate::format::LOG_HEADER_SIZE)
            .unwrap();
        lf.data.set_len(3 * BLOCK_SIZE).unwrap();
        // Nothing overwritten above: nothing is dead (block 1's superseded data block 0 is
        // block 2's now).
        let dead = dead_blocks(&lf, 16, |_| false).unwrap().unwrap();
        assert_eq!(dead, Vec::<u64>::new());
        // Block 2 overwritten above: data block 0 is dead; block 1's newest (1) is not.
        let dead = dead_blocks(&lf, 16, |b| b == 2).unwrap().unwrap();
        assert_eq!(dead, vec![0]);
        // Block 1 overwritten above: both its data blocks would be, but 0 is block 2's now.
        let dead = dead_blocks(&lf, 16, |b| b == 1).unwrap().unwrap();
        assert_eq!(dead, vec![1]);
        let dead = dead_blocks(&lf, 16, |b| b == 1 || b == 3).unwrap().unwrap();
        assert_eq!(dead, vec![1, 2]);
    }
}
