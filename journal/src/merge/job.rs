//! A merge job: composes its run, copies in batches on io_uring, writes the output log.
//! It owns `Arc`s of every file it reads and no borrow of the [`crate::Disk`].

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::disk::CacheMode;
use crate::format::{RecordKind, RECORD_SIZE};
use crate::layer::{self, preallocate, LayerFiles, LAYERS_DIR};
use crate::safe_open::{open_regular, Links};
use crate::tree::sync_dir;
use crate::volume::Volume;
use crate::{locking, Error, Result, BLOCK_SIZE};

use super::compose::{compose, AppendOrder, Composition};
use super::copy::{Copier, CopyPacer, Unpaced, CHUNK_BLOCKS};
use super::progress::MergeProgress;

/// Layers that merge jobs read: they are never punched while a job lives (and never
/// become Now's own, whose overwrites would punch them).
#[derive(Default)]
pub(crate) struct Registry {
    busy: Mutex<HashMap<u64, Vec<u64>>>,
    /// Held while a view is built from the layer logs (and swapped in or registered), and
    /// by a progressive merge while it appends a batch's records and moves Now's index
    /// entries: a view either sees the records or exists (and is known) before them.
    build: Mutex<()>,
    /// Open in-process checkpoint views and their layers: a progressive merge frees no
    /// block of a layer such a view reads.
    views: Mutex<Vec<(Weak<Volume>, Vec<u64>)>>,
}

impl Registry {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<u64>>> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn register(&self, job: u64, layers: Vec<u64>) {
        self.map().insert(job, layers);
    }
    pub fn release(&self, job: u64) {
        self.map().remove(&job);
    }
    /// Every layer some live job reads.
    pub fn busy_layers(&self) -> HashSet<u64> {
        self.map().values().flatten().copied().collect()
    }
    /// Every layer some live job other than `job` reads.
    fn busy_except(&self, job: u64) -> HashSet<u64> {
        self.map()
            .iter()
            .filter(|(&j, _)| j != job)
            .flat_map(|(_, l)| l.iter().copied())
            .collect()
    }
    /// The view-building lock (see `build`).
    pub fn build_lock(&self) -> MutexGuard<'_, ()> {
        self.build.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Records an in-process view of `layers` (call holding [`Registry::build_lock`]).
    pub fn add_view(&self, view: &Arc<Volume>, layers: Vec<u64>) {
        let mut v = self.views.lock().unwrap_or_else(|p| p.into_inner());
        v.retain(|(w, _)| w.strong_count() > 0);
        v.push((Arc::downgrade(view), layers));
    }
    /// Layers that open in-process views read.
    pub(crate) fn viewed_layers(&self) -> HashSet<u64> {
        let mut v = self.views.lock().unwrap_or_else(|p| p.into_inner());
        v.retain(|(w, _)| w.strong_count() > 0);
        v.iter().flat_map(|(_, l)| l.iter().copied()).collect()
    }
}

/// Where a job's output goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// A new layer with the job's id.
    New,
    /// The run's layer at this index absorbs the rest.
    Absorb(usize),
}

/// Everything a job needs, fixed when it is made.
pub(crate) struct JobSetup {
    pub id: u64,
    pub checkpoint: String,
    pub strategy: String,
    pub dir: PathBuf,
    pub uuid: u128,
    pub cache: CacheMode,
    pub disk_blocks: u64,
    pub base_blocks: u64,
    /// The run, oldest first.
    pub run: Vec<Arc<LayerFiles>>,
    /// The layers below the run in its lineage (their logs say which zero records matter).
    pub below: Vec<Arc<LayerFiles>>,
    /// The sealed layers above the run in its stack, and (for Now's stack) the blocks Now's
    /// index reads from above the run when the job is made: the run's versions of those
    /// blocks are hidden in every view that contains the run, and may be punched already.
    pub above: Vec<Arc<LayerFiles>>,
    pub hidden: HashSet<u64>,
    pub target: Target,
    /// The output is a new layer (also once progressive, or resumed after a crash): written
    /// in disk order, restoring locality. An absorbing merge into an existing layer appends
    /// in source order instead (see `compose::append_in_source_order`).
    pub new_layer: bool,
    pub rate_limit: Option<u64>,
    pub queue_depth: u32,
    pub batch_bytes: Option<u64>,
    /// May become progressive (`DeleteOptions::progressive`).
    pub progressive: bool,
    pub registry: Arc<Registry>,
}

/// Blocks per batch: the unit of space reservation, rate limiting, cancellation and resume
/// (and of freeing sources in a progressive merge).
fn batch_blocks(depth: u32, bytes: Option<u64>) -> usize {
    match bytes {
        Some(b) => usize::try_from(b / BLOCK_SIZE)
            .unwrap_or(usize::MAX)
            .clamp(CHUNK_BLOCKS, 1 << 20),
        None => (4 * depth as usize * CHUNK_BLOCKS).max(2048),
    }
}

/// One data movement; see [`crate::Disk::finish_merge`].
pub struct MergeJob {
    pub(crate) s: JobSetup,
    progress: Arc<MergeProgress>,
    pub(crate) comp: Option<Composition>,
    /// Items copied (a whole number of batches).
    done: usize,
    pub(crate) out: Option<Arc<LayerFiles>>,
    /// Length of the absorbing layer's data file before the job appended to it.
    absorb_len: Option<u64>,
    /// The output log was (or is being) written: appended data may be referenced.
    pub(crate) log_started: bool,
    /// The output is complete and durable: ready for `finish_merge`.
    pub(crate) copied: bool,
    /// The job's layers left the tree before it could start: nothing was written.
    pub(crate) stale: bool,
    /// Set by `finish_merge` once the output belongs to the tree.
    pub(crate) adopted: bool,
    pub(crate) peak_extra: u64,
    /// Progressive: the output is the run's top layer (in the tree from the start); each
    /// batch's records are appended, Now's index moved to them, and the copied source
    /// blocks freed, so the extra space is about one batch.
    pub(crate) progressive: Option<Progressive>,
    /// Bytes freed from the sources batch by batch.
    pub(crate) freed: u64,
    /// Set for a reclaim job ([`super::reclaim`]): `run` punches instead of copying.
    pub(crate) reclaim: Option<Box<super::reclaim::Reclaim>>,
}

/// State of a progressive job.
pub(crate) struct Progressive {
    /// Now's volume (its index is moved batch by batch when it reads the run).
    now: Arc<Volume>,
    /// The order batches take the copies in, made when the copy starts.
    plan: Option<SourceOrder>,
    /// Zero records appended so far.
    zeros_done: usize,
    /// Records appended so far (data and zero).
    rec_written: usize,
    /// Allocated bytes of the run's files when the job started copying.
    base_alloc: Option<u64>,
    /// Source layers opened for punching, by run index.
    punchers: HashMap<usize, LayerFiles>,
    /// Per source layer (run index): every data block below this one is freed (or was
    /// kept); the next punch of the layer starts here.
    freed_to: HashMap<usize, u64>,
}

/// The copies of a progressive job in source order.
///
/// Batches take the copies in the order of their source blocks ((layer, data block)), not
/// of their disk blocks, and each copy still goes to its disk-order place in the output. So
/// a batch's source blocks are one range of each source layer (two at a layer boundary):
/// every block of that range is copied by this batch, was copied by an earlier one, or is
/// dead in every view that holds the run (superseded inside the run, hidden above it, or
/// never referenced), and one hole punch per range frees the batch whether the sources were
/// written sequentially or in scattered 4 KiB pieces (a punch per scattered block costs a
/// discard each on a filesystem mounted with `discard`: ~0.2-1 ms).
pub(crate) struct SourceOrder {
    /// Copy indices in source order.
    order: Vec<usize>,
    /// Index in `Composition::records` of each copy's data record.
    rec_of: Vec<usize>,
    /// Indices of the zero records (appended, a batch's worth at a time, with the first
    /// batches).
    zeros: Vec<usize>,
}

impl SourceOrder {
    fn new(comp: &Composition) -> SourceOrder {
        let mut order: Vec<usize> = (0..comp.copies.len()).collect();
        order.sort_unstable_by_key(|&i| (comp.copies[i].src, comp.copies[i].src_block));
        let mut rec_of = Vec::with_capacity(comp.copies.len());
        let mut zeros = Vec::new();
        for (i, r) in comp.records.iter().enumerate() {
            match r.kind {
                RecordKind::Data => rec_of.push(i),
                RecordKind::Zero => zeros.push(i),
            }
        }
        SourceOrder {
            order,
            rec_of,
            zeros,
        }
    }
}

/// The span of output blocks a batch writes is preallocated when it is at most this much
/// larger than the batch (in eighths): a batch of sequential sources then lands in one
/// extent, and a scattered one (whose span is most of the output) allocates as it writes.
const SPAN_EIGHTHS: usize = 9;

/// Allocates a byte range of a file without changing its size (a log keeps no zeroed tail,
/// which a scan would take for a torn record).
fn reserve(f: &std::fs::File, off: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is valid for `f`'s lifetime.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, off, len) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `at` as milliseconds since the Unix epoch (for debug lines that are lined up with other
/// tools' logs).
fn epoch_ms(at: Instant) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.saturating_sub(at.elapsed()).as_millis() as u64
}

fn no_space(e: &Error) -> bool {
    let errno = match e {
        Error::Io { source, .. } | Error::RawIo(source) => source.raw_os_error(),
        _ => None,
    };
    matches!(errno, Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl MergeJob {
    pub(crate) fn new(s: JobSetup) -> MergeJob {
        s.registry
            .register(s.id, s.run.iter().map(|l| l.id).collect());
        let progress = Arc::new(MergeProgress::new(s.id, &s.checkpoint, &s.strategy));
        MergeJob {
            s,
            progress,
            comp: None,
            done: 0,
            out: None,
            absorb_len: None,
            log_started: false,
            copied: false,
            stale: false,
            adopted: false,
            peak_extra: 0,
            progressive: None,
            freed: 0,
            reclaim: None,
        }
    }

    /// Makes a job progressive. Its run's top layer must be the output (`Target::Absorb`
    /// of the last layer) and `out` that layer's files opened writable, or `None` to open
    /// them when the copy starts.
    pub(crate) fn make_progressive(&mut self, now: Arc<Volume>) {
        self.progressive = Some(Progressive {
            now,
            plan: None,
            zeros_done: 0,
            rec_written: 0,
            base_alloc: None,
            punchers: HashMap::new(),
            freed_to: HashMap::new(),
        });
    }

    /// Turns a new-layer job into a progressive one whose output `out` (id = the job's id,
    /// already committed to the tree above the run) is an empty layer.
    pub(crate) fn adopt_output_above(&mut self, out: Arc<LayerFiles>, now: Arc<Volume>) {
        self.s.run.push(out.clone());
        self.s.target = Target::Absorb(self.s.run.len() - 1);
        self.s
            .registry
            .register(self.s.id, self.s.run.iter().map(|l| l.id).collect());
        self.absorb_len = Some(0);
        self.out = Some(out);
        self.make_progressive(now);
    }

    /// True for a job [`crate::Disk::start_progressive_merges`] could still make
    /// progressive (it copies whole-output now).
    pub fn may_become_progressive(&self) -> bool {
        self.progressive.is_none()
            && !self.stale
            && self.s.progressive
            && (self.absorbs_into_top() || self.makes_new_layer())
    }

    /// True for a job whose output is the top layer of its run (absorbing into the top).
    pub(crate) fn absorbs_into_top(&self) -> bool {
        self.s.target == Target::Absorb(self.s.run.len().saturating_sub(1))
    }

    /// True for a new-layer job (the output is not in the tree yet).
    pub(crate) fn makes_new_layer(&self) -> bool {
        self.s.target == Target::New
    }

    pub fn id(&self) -> u64 {
        self.s.id
    }
    /// The deleted checkpoint's name ("" for maintenance).
    pub fn checkpoint(&self) -> &str {
        &self.s.checkpoint
    }
    pub fn strategy(&self) -> &str {
        &self.s.strategy
    }
    pub fn progress(&self) -> Arc<MergeProgress> {
        self.progress.clone()
    }
    /// Layer ids of the run this job replaces, oldest first.
    pub fn run_layers(&self) -> Vec<u64> {
        self.s.run.iter().map(|l| l.id).collect()
    }
    /// Changes the bulk-copy rate limit (bytes per second, None = unlimited) for the next
    /// [`MergeJob::run`]; a job stays resumable between runs.
    pub fn set_rate_limit(&mut self, rate: Option<u64>) {
        self.s.rate_limit = rate;
    }

    /// True once the copy is complete (ready for `finish_merge`).
    pub fn is_copied(&self) -> bool {
        self.copied
    }
    /// The id of the layer that replaces the run.
    pub fn output_layer(&self) -> u64 {
        match self.s.target {
            Target::New => self.s.id,
            Target::Absorb(i) => self.s.run[i].id,
        }
    }

    /// The bulk copy on io_uring, in batches. An error leaves the job resumable: `run` again
    /// continues from the last completed batch. `cancel` is polled between batches.
    pub fn run(&mut self, cancel: &AtomicBool) -> Result<()> {
        self.run_paced(cancel, &Unpaced)
    }

    /// [`MergeJob::run`] whose bulk copy `pacer` may pause between two chunks, also in the
    /// middle of a batch (a background merge yields to client I/O this way).
    pub fn run_paced(&mut self, cancel: &AtomicBool, pacer: &dyn CopyPacer) -> Result<()> {
        match self.run_inner(cancel, pacer) {
            Ok(()) => {
                self.progress.done();
                Ok(())
            }
            Err(e) => {
                let e = if no_space(&e) {
                    let needed = self.remaining_bytes();
                    Error::NoSpace {
                        disk: self.s.dir.clone(),
                        job: self.s.id,
                        needed,
                    }
                } else {
                    e
                };
                match &e {
                    Error::NoSpace { .. } => self
                        .progress
                        .paused(&format!("no space left on the device: {e}")),
                    Error::MergeCancelled(_) => self.progress.paused("cancelled"),
                    _ => self.progress.failed(&crate::error::chain(&e)),
                }
                Err(e)
            }
        }
    }

    fn remaining_bytes(&self) -> u64 {
        match &self.comp {
            Some(c) => {
                (c.copies.len() - self.done) as u64 * BLOCK_SIZE
                    + (c.records.len() * RECORD_SIZE) as u64
            }
            None => 0,
        }
    }

    fn run_inner(&mut self, cancel: &AtomicBool, pacer: &dyn CopyPacer) -> Result<()> {
        if self.copied {
            return Ok(());
        }
        self.progress.copying();
        if let Some(r) = self.reclaim.as_mut() {
            return r
                .run(self.s.id, cancel, &self.progress, &self.s.registry, pacer)
                .map(|()| self.copied = true);
        }
        if self.comp.is_none() {
            let absorber = match self.s.target {
                Target::New => None,
                Target::Absorb(i) => Some(i),
            };
            let mut hidden = std::mem::take(&mut self.s.hidden);
            for lf in &self.s.above {
                hidden.extend(
                    lf.scan_log(self.s.disk_blocks)?
                        .records
                        .iter()
                        .map(|r| r.disk_block),
                );
            }
            let order = if self.s.new_layer {
                AppendOrder::Disk
            } else {
                AppendOrder::Source
            };
            let c = compose(
                &self.s.run,
                &self.s.below,
                &hidden,
                absorber,
                order,
                self.s.disk_blocks,
                self.s.base_blocks,
            )?;
            self.progress.set_total(c.copies.len() as u64 * BLOCK_SIZE);
            self.comp = Some(c);
        }
        if self.out.is_none() {
            let out = match self.s.target {
                Target::New => {
                    let lf = LayerFiles::create(&self.s.dir, self.s.uuid, self.s.id, self.s.cache)?;
                    sync_dir(&self.s.dir.join(LAYERS_DIR))?;
                    lf
                }
                Target::Absorb(i) => {
                    let lf = match LayerFiles::open(
                        &self.s.dir,
                        self.s.uuid,
                        self.s.run[i].id,
                        self.s.cache,
                        true,
                    ) {
                        Ok(lf) => lf,
                        // Layers are unlinked only once the tree no longer has them: the
                        // job is stale, and finish_merge will discard it.
                        Err(Error::Io { source, .. })
                            if source.kind() == std::io::ErrorKind::NotFound =>
                        {
                            tracing::info!(
                                "merge {}: layer {} is gone from the tree; nothing to do",
                                self.s.id,
                                self.s.run[i].id
                            );
                            self.stale = true;
                            self.copied = true;
                            return Ok(());
                        }
                        Err(e) => return Err(e),
                    };
                    let len = lf
                        .data
                        .metadata()
                        .map_err(|e| Error::io(&lf.data_path, e))?
                        .len();
                    self.absorb_len = Some(len);
                    lf
                }
            };
            self.out = Some(Arc::new(out));
        }
        if self.progressive.is_some() {
            return self.run_progressive(cancel, pacer);
        }
        let (Some(comp), Some(out)) = (self.comp.as_ref(), self.out.clone()) else {
            return Err(Error::Invalid("merge job lost its state".into()));
        };
        let total = comp.copies.len();
        let batch = batch_blocks(self.s.queue_depth, self.s.batch_bytes);
        let mut copier = Copier::new(self.s.queue_depth)?;
        let started = Instant::now();
        let start_done = self.done;
        while self.done < total {
            if cancel.load(Ordering::Acquire) {
                return Err(Error::MergeCancelled(self.s.id));
            }
            let end = (self.done + batch).min(total);
            let t0 = Instant::now();
            // Reserve the batch's space first: running out of it stops here, cleanly.
            let off = (comp.out_first + self.done as u64) * BLOCK_SIZE;
            let len = (end - self.done) as u64 * BLOCK_SIZE;
            if let Err(e) = preallocate(&out.data, off, len) {
                if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(Error::io(&out.data_path, e));
                }
            }
            let list: Vec<usize> = (self.done..end).collect();
            copier.copy(
                &self.s.run,
                &comp.copies,
                &list,
                &out,
                comp.out_first,
                pacer,
            )?;
            tracing::debug!(
                "merge {} batch at {} ms: copy {:.1} ms",
                self.s.id,
                epoch_ms(t0),
                t0.elapsed().as_secs_f64() * 1000.0
            );
            self.done = end;
            self.peak_extra = self.peak_extra.max(self.done as u64 * BLOCK_SIZE);
            self.progress.batch_written(self.done as u64 * BLOCK_SIZE);
            self.progress.set_done(self.done as u64 * BLOCK_SIZE);
            let worked = t0.elapsed().saturating_sub(copier.take_paused());
            self.progress.add_copy_time(len, worked.as_nanos() as u64);
            self.pace(cancel, started, start_done)?;
        }
        let t_copied = Instant::now();
        // The data is durable before any record points at it.
        out.data
            .sync_data()
            .map_err(|e| Error::io(&out.data_path, e))?;
        let t_synced = Instant::now();
        let mut bytes = Vec::with_capacity(comp.records.len() * RECORD_SIZE);
        for r in &comp.records {
            bytes.extend_from_slice(&r.encode(out.seed));
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true);
        let log = open_regular(&out.log_path, &opts, Links::Refuse)?;
        if !bytes.is_empty() {
            if let Err(e) = preallocate(&log, comp.log_at, bytes.len() as u64) {
                if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(Error::io(&out.log_path, e));
                }
            }
            self.log_started = true;
            log.write_all_at(&bytes, comp.log_at)
                .map_err(|e| Error::io(&out.log_path, e))?;
        }
        log.sync_all().map_err(|e| Error::io(&out.log_path, e))?;
        tracing::debug!(
            "merge {} output at {} ms: data sync {:.1} ms, log {:.1} ms",
            self.s.id,
            epoch_ms(t_copied),
            t_synced.duration_since(t_copied).as_secs_f64() * 1000.0,
            t_synced.elapsed().as_secs_f64() * 1000.0
        );
        self.peak_extra = self
            .peak_extra
            .max(self.done as u64 * BLOCK_SIZE + bytes.len() as u64);
        self.copied = true;
        Ok(())
    }

    /// The progressive copy (see [`Progressive`] and "journal: progressive merges" in
    /// `docs/DESIGN.md`).
    fn run_progressive(&mut self, cancel: &AtomicBool, pacer: &dyn CopyPacer) -> Result<()> {
        let (Some(comp), Some(mut p), Some(out)) =
            (self.comp.take(), self.progressive.take(), self.out.clone())
        else {
            return Err(Error::Invalid("merge job lost its state".into()));
        };
        let r = self.progressive_batches(cancel, pacer, &comp, &mut p, &out);
        self.comp = Some(comp);
        self.progressive = Some(p);
        r?;
        self.copied = true;
        Ok(())
    }

    fn run_alloc(&self) -> u64 {
        self.s
            .run
            .iter()
            .map(|l| layer::allocated(&l.data_path) + layer::allocated(&l.log_path))
            .sum()
    }

    /// Per batch (copies in source order, see [`SourceOrder`]): copy, make the data and
    /// then the batch's records durable, move Now's index entries of the batch's blocks from
    /// the run to the output (holding the registry's build lock, so every view either sees
    /// the records or is known), wait for the reads that may still use the old blocks, and
    /// free the batch's source ranges.
    fn progressive_batches(
        &mut self,
        cancel: &AtomicBool,
        pacer: &dyn CopyPacer,
        comp: &Composition,
        p: &mut Progressive,
        out: &Arc<LayerFiles>,
    ) -> Result<()> {
        let plan = p.plan.take().unwrap_or_else(|| SourceOrder::new(comp));
        let r = self.source_order_batches(cancel, pacer, comp, p, &plan, out);
        p.plan = Some(plan);
        r
    }

    /// [`MergeJob::progressive_batches`] with the plan taken out of `p`.
    #[allow(clippy::too_many_arguments)]
    fn source_order_batches(
        &mut self,
        cancel: &AtomicBool,
        pacer: &dyn CopyPacer,
        comp: &Composition,
        p: &mut Progressive,
        plan: &SourceOrder,
        out: &Arc<LayerFiles>,
    ) -> Result<()> {
        let run_ids: Vec<u64> = self.s.run.iter().map(|l| l.id).collect();
        let top = run_ids.len() - 1;
        let base = match p.base_alloc {
            Some(b) => b,
            None => *p.base_alloc.insert(self.run_alloc()),
        };
        let total = comp.copies.len();
        let batch = batch_blocks(self.s.queue_depth, self.s.batch_bytes);
        let mut copier = Copier::new(self.s.queue_depth)?;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true);
        let log = match open_regular(&out.log_path, &opts, Links::Refuse) {
            Ok(f) => f,
            // Layers are unlinked only once the tree no longer has them: the job is stale,
            // and finish_merge will discard it.
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                tracing::info!(
                    "merge {}: layer {} is gone from the tree; nothing to do",
                    self.s.id,
                    out.id
                );
                self.stale = true;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let started = Instant::now();
        let start_done = self.done;
        while self.done < total || p.zeros_done < plan.zeros.len() {
            if cancel.load(Ordering::Acquire) {
                return Err(Error::MergeCancelled(self.s.id));
            }
            let end = (self.done + batch).min(total);
            let zend = (p.zeros_done + batch).min(plan.zeros.len());
            let list = &plan.order[self.done..end];
            let t0 = Instant::now();
            let len = list.len() as u64 * BLOCK_SIZE;
            let nrec = list.len() + zend - p.zeros_done;
            let at = comp.log_at + (p.rec_written * RECORD_SIZE) as u64;
            // The log's space first: once the copy is done, appending the records cannot
            // run out of space (which would leave the output in the tree with a batch of
            // data that nothing references yet).
            if let Err(e) = reserve(&log, at, (nrec * RECORD_SIZE) as u64) {
                if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(Error::io(&out.log_path, e));
                }
            }
            if let (Some(&lo), Some(&hi)) = (list.iter().min(), list.iter().max()) {
                let end_before = out
                    .data
                    .metadata()
                    .map_err(|e| Error::io(&out.data_path, e))?
                    .len();
                let span = (hi - lo + 1) * 8 <= list.len() * SPAN_EIGHTHS;
                if span {
                    self.preallocate_span(out, comp.out_first + lo as u64, hi - lo + 1)?;
                }
                let copied =
                    copier.copy(&self.s.run, &comp.copies, list, out, comp.out_first, pacer);
                if let Err(e) = copied {
                    // Nothing references the batch's output blocks yet: give them back (out
                    // of space, the tree commit that takes an empty output out needs them).
                    let mut blocks: Vec<u64> = if span {
                        (lo..=hi).map(|i| comp.out_first + i as u64).collect()
                    } else {
                        list.iter().map(|&i| comp.out_first + i as u64).collect()
                    };
                    blocks.retain(|&b| b < end_before / BLOCK_SIZE);
                    let mut ranges = Vec::new();
                    blocks.sort_unstable();
                    for b in blocks {
                        match ranges.last_mut() {
                            Some((o, l)) if *o + *l == b * BLOCK_SIZE => *l += BLOCK_SIZE,
                            _ => ranges.push((b * BLOCK_SIZE, BLOCK_SIZE)),
                        }
                    }
                    let cut = out.data.set_len(end_before).map_err(Error::RawIo);
                    if let Err(t) = cut.and_then(|()| copier.punch(&out.data, &ranges)) {
                        tracing::warn!("could not trim {}: {t}", out.data_path.display());
                    }
                    return Err(e);
                }
            }
            let t_copied = Instant::now();
            let paused = copier.take_paused();
            // The data is durable before any record points at it.
            out.data
                .sync_data()
                .map_err(|e| Error::io(&out.data_path, e))?;
            let t_synced = Instant::now();
            let recs: Vec<crate::format::Record> = list
                .iter()
                .map(|&i| comp.records[plan.rec_of[i]])
                .chain(
                    plan.zeros[p.zeros_done..zend]
                        .iter()
                        .map(|&i| comp.records[i]),
                )
                .collect();
            let mut bytes = Vec::with_capacity(recs.len() * RECORD_SIZE);
            for r in &recs {
                bytes.extend_from_slice(&r.encode(out.seed));
            }
            let (moved, kept) = {
                let _views = self.s.registry.build_lock();
                self.log_started = true;
                // A short write (a kill, ENOSPC) ends at a block boundary, which is a record
                // boundary: the log keeps a valid prefix, and a resumed job rewrites the rest.
                log.write_all_at(&bytes, at)
                    .map_err(|e| Error::io(&out.log_path, e))?;
                log.sync_data().map_err(|e| Error::io(&out.log_path, e))?;
                let mut st = p.now.state_mut();
                match st.find_run(&run_ids) {
                    Some(pos) => (true, st.move_to_output(pos, top, &recs)),
                    // Now reads part of the run without the output: free nothing.
                    None if st.layers.iter().any(|l| run_ids.contains(&l.id)) => {
                        (false, recs.iter().map(|r| r.disk_block).collect())
                    }
                    None => (false, Vec::new()),
                }
            };
            let t_logged = Instant::now();
            self.peak_extra = self.peak_extra.max(self.run_alloc().saturating_sub(base));
            self.progress.batch_written(end as u64 * BLOCK_SIZE);
            // Reads planned before the move may still read the old blocks.
            let drained = !moved || p.now.merge_gate.drain(Duration::from_secs(10));
            let t_drained = Instant::now();
            if !moved && !kept.is_empty() {
                // Now reads part of the run without the output: free nothing.
            } else if drained {
                self.freed += self.free_sources(comp, p, plan, list, &kept, &mut copier);
            } else {
                tracing::warn!(
                    "merge {}: a read of Now did not finish in 10 s; this batch's sources stay allocated for now",
                    self.s.id
                );
            }
            let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1000.0;
            tracing::debug!(
                "merge {} batch at {} ms: copy {:.1} ms (paused {:.1} ms), data sync {:.1} ms, log {:.1} ms, drain {:.1} ms, free {:.1} ms",
                self.s.id,
                epoch_ms(t0),
                ms(t0, t_copied),
                paused.as_secs_f64() * 1000.0,
                ms(t_copied, t_synced),
                ms(t_synced, t_logged),
                ms(t_logged, t_drained),
                ms(t_drained, Instant::now()),
            );
            self.done = end;
            p.zeros_done = zend;
            p.rec_written += recs.len();
            self.progress.set_done(self.done as u64 * BLOCK_SIZE);
            let worked = t0.elapsed().saturating_sub(paused);
            self.progress.add_copy_time(len, worked.as_nanos() as u64);
            self.pace(cancel, started, start_done)?;
        }
        log.sync_all().map_err(|e| Error::io(&out.log_path, e))?;
        Ok(())
    }

    /// Reserves output blocks `first..first + n` (ENOSPC here gives back what the call
    /// added past the file's end and pauses the job).
    fn preallocate_span(&self, out: &LayerFiles, first: u64, n: usize) -> Result<()> {
        let off = first * BLOCK_SIZE;
        let len = n as u64 * BLOCK_SIZE;
        let end_before = out
            .data
            .metadata()
            .map_err(|e| Error::io(&out.data_path, e))?
            .len();
        if let Err(e) = preallocate(&out.data, off, len) {
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                return Ok(());
            }
            // A failed fallocate may leave part of the range allocated: give back what lies
            // past the old end (no record references data there).
            if off + len > end_before {
                if let Err(t) = out.data.set_len(end_before.max(off.min(end_before))) {
                    tracing::warn!("could not trim {}: {t}", out.data_path.display());
                }
            }
            return Err(Error::io(&out.data_path, e));
        }
        Ok(())
    }

    /// The rate limit's sleep after a batch (polling `cancel`).
    fn pace(&self, cancel: &AtomicBool, started: Instant, start_done: usize) -> Result<()> {
        if let Some(rate) = self.s.rate_limit.filter(|&r| r > 0) {
            let bytes = (self.done - start_done) as u64 * BLOCK_SIZE;
            let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
            while started.elapsed() < due {
                if cancel.load(Ordering::Acquire) {
                    return Err(Error::MergeCancelled(self.s.id));
                }
                let left = due.saturating_sub(started.elapsed());
                std::thread::sleep(left.min(Duration::from_millis(20)));
            }
        }
        Ok(())
    }

    /// Frees the source ranges of the batch `list` (copies in source order): per source
    /// layer below the output, from where its last punch ended to the batch's last block of
    /// it, except the source blocks of `kept` (disk blocks whose Now entry was not moved), in
    /// layers no other job reads, no open in-process view reads and no reader of another
    /// process pins (a layer skipped now is covered by its next punch). Returns the bytes
    /// freed.
    fn free_sources(
        &self,
        comp: &Composition,
        p: &mut Progressive,
        plan: &SourceOrder,
        list: &[usize],
        kept: &[u64],
        copier: &mut Copier,
    ) -> u64 {
        let kept: HashSet<u64> = kept.iter().copied().collect();
        let top = self.s.run.len() - 1;
        // Per source layer: the batch's last block, and the blocks to keep.
        let mut per: HashMap<usize, (u64, Vec<u64>)> = HashMap::new();
        for &i in list {
            let it = comp.copies[i];
            if it.src as usize >= top {
                continue;
            }
            let e = per
                .entry(it.src as usize)
                .or_insert((it.src_block, Vec::new()));
            e.0 = e.0.max(it.src_block);
            if kept.contains(&comp.records[plan.rec_of[i]].disk_block) {
                e.1.push(it.src_block);
            }
        }
        if per.is_empty() {
            return 0;
        }
        let busy = self.s.registry.busy_except(self.s.id);
        let viewed = self.s.registry.viewed_layers();
        let mut freed = 0;
        for (src, (last, mut keep)) in per {
            let id = self.s.run[src].id;
            if busy.contains(&id) || viewed.contains(&id) {
                continue;
            }
            let from = p.freed_to.get(&src).copied().unwrap_or(0);
            let to = last + 1;
            keep.sort_unstable();
            let mut ranges = Vec::new();
            let mut at = from;
            for k in keep.into_iter().chain([to]) {
                if k > at {
                    ranges.push((at * BLOCK_SIZE, (k - at) * BLOCK_SIZE));
                }
                at = at.max(k + 1);
            }
            let log_path = layer::log_path(&self.s.dir, id);
            let _claim = match locking::claim(&log_path) {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!("merge {}: layer {id}: {e}", self.s.id);
                    continue;
                }
            };
            let files = match p.punchers.entry(src) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    match LayerFiles::open(&self.s.dir, self.s.uuid, id, self.s.cache, true) {
                        Ok(f) => v.insert(f),
                        Err(e) => {
                            tracing::warn!("merge {}: layer {id}: {e}", self.s.id);
                            continue;
                        }
                    }
                }
            };
            let before = layer::allocated(&files.data_path);
            match copier.punch(&files.data, &ranges) {
                Ok(()) => {
                    p.freed_to.insert(src, to);
                }
                Err(e) => tracing::warn!(
                    "merge {}: could not free blocks of layer {id}: {e}",
                    self.s.id
                ),
            }
            freed += before.saturating_sub(layer::allocated(&files.data_path));
        }
        freed
    }

    /// Deletes the job's output (a new layer's files, or the data appended to an absorbing
    /// layer while no record points at it yet).
    pub(crate) fn discard_output(&mut self) {
        if self.adopted {
            return;
        }
        match self.s.target {
            Target::New => {
                let _ = std::fs::remove_file(layer::data_path(&self.s.dir, self.s.id));
                let _ = std::fs::remove_file(layer::log_path(&self.s.dir, self.s.id));
            }
            Target::Absorb(_) => {
                if let (Some(out), Some(len), false) =
                    (&self.out, self.absorb_len, self.log_started)
                {
                    if let Err(e) = out.data.set_len(len) {
                        tracing::warn!("could not trim {}: {e}", out.data_path.display());
                    }
                }
                // A progressive job's output is in the tree and its records are what Now's
                // index (and every reopened view) reads for the copied blocks, whose
                // sources may be punched already: they stay.
                let progressive = self.progressive.is_some();
                if let (Some(out), Some(c), true, false) =
                    (&self.out, &self.comp, self.log_started, progressive)
                {
                    // The records appended to the absorbing layer go again: views keep
                    // reading the run's own records, and the logs must say the same (a
                    // later merge below this layer would take those blocks as hidden
                    // above it). The copied data stays: a reader that loaded the records
                    // meanwhile may still read it.
                    let mut opts = std::fs::OpenOptions::new();
                    opts.write(true);
                    let cut = open_regular(&out.log_path, &opts, Links::Refuse).and_then(|f| {
                        f.set_len(c.log_at)
                            .and_then(|()| f.sync_all())
                            .map_err(|e| Error::io(&out.log_path, e))
                    });
                    if let Err(e) = cut {
                        tracing::warn!("merge {}: {e}", self.s.id);
                    }
                }
            }
        }
        self.out = None;
        self.adopted = true;
    }
}

impl Drop for MergeJob {
    fn drop(&mut self) {
        self.discard_output();
        self.s.registry.release(self.s.id);
    }
}
