//! A merge job: composes its run, copies in batches on io_uring, writes the output log.
//! It owns `Arc`s of every file it reads and no borrow of the [`crate::Disk`].

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::disk::CacheMode;
use crate::format::RECORD_SIZE;
use crate::layer::{self, preallocate, LayerFiles, LAYERS_DIR};
use crate::safe_open::{open_regular, Links};
use crate::tree::sync_dir;
use crate::{Error, Result, BLOCK_SIZE};

use super::compose::{compose, Composition};
use super::copy::{Copier, CHUNK_BLOCKS};
use super::progress::MergeProgress;

/// Layers that merge jobs read: they are never punched while a job lives (and never
/// become Now's own, whose overwrites would punch them).
#[derive(Default)]
pub(crate) struct Registry {
    busy: Mutex<HashMap<u64, Vec<u64>>>,
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
    pub rate_limit: Option<u64>,
    pub queue_depth: u32,
    pub registry: Arc<Registry>,
}

/// Blocks per batch: the unit of space reservation, rate limiting, cancellation and resume.
fn batch_blocks(depth: u32) -> usize {
    (4 * depth as usize * CHUNK_BLOCKS).max(2048)
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
    log_started: bool,
    /// The output is complete and durable: ready for `finish_merge`.
    pub(crate) copied: bool,
    /// The job's layers left the tree before it could start: nothing was written.
    pub(crate) stale: bool,
    /// Set by `finish_merge` once the output belongs to the tree.
    pub(crate) adopted: bool,
    pub(crate) peak_extra: u64,
    /// Set for a reclaim job ([`super::reclaim`]): `run` punches instead of copying.
    pub(crate) reclaim: Option<Box<super::reclaim::Reclaim>>,
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
            reclaim: None,
        }
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
        match self.run_inner(cancel) {
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

    fn run_inner(&mut self, cancel: &AtomicBool) -> Result<()> {
        if self.copied {
            return Ok(());
        }
        self.progress.copying();
        if let Some(r) = self.reclaim.as_mut() {
            return r
                .run(self.s.id, cancel, &self.progress, &self.s.registry)
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
            let c = compose(
                &self.s.run,
                &self.s.below,
                &hidden,
                absorber,
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
        let (Some(comp), Some(out)) = (self.comp.as_ref(), self.out.clone()) else {
            return Err(Error::Invalid("merge job lost its state".into()));
        };
        let total = comp.copies.len();
        let batch = batch_blocks(self.s.queue_depth);
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
            copier.copy(
                &self.s.run,
                &comp.copies,
                self.done..end,
                &out,
                comp.out_first,
            )?;
            self.done = end;
            self.peak_extra = self.peak_extra.max(self.done as u64 * BLOCK_SIZE);
            self.progress.set_done(self.done as u64 * BLOCK_SIZE);
            self.progress
                .add_copy_time(len, t0.elapsed().as_nanos() as u64);
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
        }
        // The data is durable before any record points at it.
        out.data
            .sync_data()
            .map_err(|e| Error::io(&out.data_path, e))?;
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
        self.peak_extra = self
            .peak_extra
            .max(self.done as u64 * BLOCK_SIZE + bytes.len() as u64);
        self.copied = true;
        Ok(())
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
