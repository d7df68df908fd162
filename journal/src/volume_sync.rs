//! Making an active layer's writes durable: a *sync batch* takes the pending records, syncs
//! the data file, appends the records to the log and (for a FLUSH) syncs the log.
//!
//! The same batch is run two ways: blocking ([`ActiveLayer::sync`], for callers without an
//! engine and for checkpoints) or as linked io_uring SQEs by [`crate::IoEngine`]. Either way:
//! - a record reaches the log only after the data it points to was synced (the data sync
//!   runs first and the append only if it succeeded);
//! - one batch at a time holds the log (the `syncing` token), so appends never interleave and
//!   a failed append can be cut off the log's end without losing a later one;
//! - every batch has a generation; a FLUSH needs the first batch that *starts* after it was
//!   submitted (that batch takes every record committed before), so a flush that finds a
//!   batch of someone else running waits for it and then, if a later durable batch already
//!   covers it, completes without syncing again (group commit across engines and threads).
//!
//! A failed step hands the records back to the pending list (before any committed since), so
//! the next batch retries them.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{lock, ActiveLayer, Pending, Volume};
use crate::layer::LayerFiles;
use crate::{Error, Result};

/// Records taken from the pending list for one append, owned by whoever runs the batch (the
/// io_uring engine hands `records` to the kernel as the log write's buffer).
pub(crate) struct SyncBatch {
    pub active: Arc<ActiveLayer>,
    /// Encoded records to append at `log_off` (empty: only the log is synced).
    pub records: Vec<u8>,
    dead: Vec<(Arc<LayerFiles>, u64)>,
    pub log_off: u64,
    /// Also sync the log (a FLUSH); otherwise the records are only appended.
    pub durable: bool,
    generation: u64,
}

/// What [`ActiveLayer::try_begin_sync`] found.
pub(crate) enum Begin {
    /// The caller runs this batch and hands it back to [`Volume::end_sync`].
    Batch(SyncBatch),
    /// Everything committed is already durable.
    Nothing,
    /// Another batch holds the log; the given eventfd is signalled when it is released.
    Busy,
}

/// The outcome of each step of a batch; `None` for a step that was not run.
#[derive(Default)]
pub(crate) struct Steps {
    pub data_sync: Option<std::io::Result<()>>,
    /// Bytes the log write wrote.
    pub log_write: Option<std::io::Result<usize>>,
    pub log_sync: Option<std::io::Result<()>>,
}

/// Why a step that had to run did not.
fn not_run() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::ECANCELED)
}

impl SyncBatch {
    /// True when the batch appends records (and so syncs the data file first).
    pub fn appends(&self) -> bool {
        !self.records.is_empty()
    }
}

impl ActiveLayer {
    /// The log's write descriptor (the engine's append SQE writes through it).
    pub(crate) fn log_fd(&self) -> RawFd {
        self.log.as_raw_fd()
    }

    /// The batch generation whose durable end covers every write committed until now.
    pub(crate) fn flush_target(&self) -> u64 {
        lock(&self.journal).started_gen + 1
    }

    /// True once a durable batch of generation `target` or later has ended.
    pub(crate) fn covered(&self, target: u64) -> bool {
        lock(&self.journal).durable_gen >= target
    }

    /// Sync batches started so far (tests count group commits with it).
    #[cfg(test)]
    pub(crate) fn batches_started(&self) -> u64 {
        lock(&self.journal).started_gen
    }

    /// Takes the log for a batch, if there is anything to do.
    fn take_batch(self: &Arc<Self>, j: &mut Pending, durable: bool) -> Option<SyncBatch> {
        if j.records.is_empty() && !(durable && j.log_dirty) {
            return None;
        }
        j.syncing = true;
        j.started_gen += 1;
        Some(SyncBatch {
            active: self.clone(),
            records: std::mem::take(&mut j.records),
            dead: std::mem::take(&mut j.dead),
            log_off: j.log_len,
            durable,
            generation: j.started_gen,
        })
    }

    /// Starts a batch without blocking. When another batch holds the log, `wake` (if any) is
    /// signalled once it is released.
    pub(crate) fn try_begin_sync(
        self: &Arc<Self>,
        durable: bool,
        wake: Option<&Arc<OwnedFd>>,
    ) -> Begin {
        let mut j = lock(&self.journal);
        if j.syncing {
            if let Some(fd) = wake {
                if !j.wake.iter().any(|w| Arc::ptr_eq(w, fd)) {
                    j.wake.push(fd.clone());
                }
            }
            return Begin::Busy;
        }
        match self.take_batch(&mut j, durable) {
            Some(b) => {
                if wake.is_some() {
                    j.holder = Some(std::thread::current().id());
                }
                Begin::Batch(b)
            }
            None => Begin::Nothing,
        }
    }

    /// Appends pending records to the log, blocking. With `durable` (a FLUSH), the data file
    /// is synced before and the log after, and superseded blocks are released; a durable
    /// batch that ran meanwhile (on an engine or another thread) may cover this call.
    pub fn sync(self: &Arc<Self>, durable: bool) -> Result<()> {
        let batch = {
            let mut j = lock(&self.journal);
            let target = j.started_gen + 1;
            loop {
                if j.durable_gen >= target {
                    return Ok(());
                }
                if !j.syncing {
                    break;
                }
                if j.holder == Some(std::thread::current().id()) {
                    // Only this thread can reap that batch: waiting would never end.
                    return Err(Error::Invalid(
                        "a FLUSH of this thread's io_uring engine is in flight: submit \
                         Request::Flush to the engine instead of a blocking flush"
                            .into(),
                    ));
                }
                j = self.sync_done.wait(j).unwrap_or_else(|p| p.into_inner());
            }
            match self.take_batch(&mut j, durable) {
                Some(b) => b,
                None => return Ok(()),
            }
        };
        let mut steps = Steps::default();
        let mut ok = true;
        if batch.appends() {
            let r = self.files.data.sync_data();
            ok = r.is_ok();
            steps.data_sync = Some(r);
            if ok {
                let r = self
                    .log
                    .write_all_at(&batch.records, batch.log_off)
                    .map(|()| batch.records.len());
                ok = r.is_ok();
                steps.log_write = Some(r);
            }
        }
        if ok && durable {
            steps.log_sync = Some(self.log.sync_data());
        }
        self.finish_sync(batch, steps)
    }

    /// Ends a batch with the outcome of its steps and releases the log.
    pub(crate) fn finish_sync(&self, batch: SyncBatch, steps: Steps) -> Result<()> {
        let SyncBatch {
            records,
            dead,
            log_off,
            durable,
            generation,
            ..
        } = batch;
        let mut j = lock(&self.journal);
        let outcome = self.settle(&mut j, records, dead, log_off, durable, generation, steps);
        j.syncing = false;
        j.holder = None;
        let wake = std::mem::take(&mut j.wake);
        drop(j);
        self.sync_done.notify_all();
        for fd in wake {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to an eventfd kept open by the Arc.
            let _ = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
        let freed = outcome?;
        self.release_dead(freed);
        Ok(())
    }

    /// Applies a batch's outcome to the pending state; `Ok` carries the blocks to release.
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &self,
        j: &mut Pending,
        records: Vec<u8>,
        dead: Vec<(Arc<LayerFiles>, u64)>,
        log_off: u64,
        durable: bool,
        generation: u64,
        steps: Steps,
    ) -> Result<Vec<(Arc<LayerFiles>, u64)>> {
        let give_back = |j: &mut Pending, records: Vec<u8>, dead| {
            let mut r = records;
            r.append(&mut j.records);
            j.records = r;
            let mut d: Vec<_> = dead;
            d.append(&mut j.dead);
            j.dead = d;
        };
        if let Err(e) = self.check_log() {
            // The log was replaced under a descriptor that could not follow: whatever this
            // batch appended went to the replaced file.
            give_back(j, records, dead);
            return Err(e);
        }
        if !records.is_empty() {
            if let Err(e) = steps.data_sync.unwrap_or_else(|| Err(not_run())) {
                give_back(j, records, dead);
                return Err(Error::io(&self.files.data_path, e));
            }
            let wrote = match steps.log_write.unwrap_or_else(|| Err(not_run())) {
                Ok(n) if n == records.len() => Ok(()),
                Ok(_) => Err(std::io::Error::from_raw_os_error(libc::ENOSPC)),
                Err(e) => Err(e),
            };
            if let Err(e) = wrote {
                // Cut off whatever part of the append landed: the next batch rewrites it.
                let _ = self.log.set_len(log_off);
                give_back(j, records, dead);
                return Err(Error::io(&self.files.log_path, e));
            }
            j.log_len = log_off + records.len() as u64;
            j.log_dirty = true;
        }
        if !durable {
            give_back(j, Vec::new(), dead);
            return Ok(Vec::new());
        }
        if let Err(e) = steps.log_sync.unwrap_or_else(|| Err(not_run())) {
            // The records are in the log, not yet known durable: their superseded blocks
            // wait for a later batch.
            give_back(j, Vec::new(), dead);
            return Err(Error::io(&self.files.log_path, e));
        }
        j.log_dirty = false;
        j.durable_gen = j.durable_gen.max(generation);
        Ok(dead)
    }

    /// Holds the log against every sync batch (blocking until the running one ends), for
    /// work that rewrites the log. Released on drop.
    pub(crate) fn lock_log(&self) -> LogLock<'_> {
        let mut j = lock(&self.journal);
        while j.syncing {
            j = self.sync_done.wait(j).unwrap_or_else(|p| p.into_inner());
        }
        j.syncing = true;
        LogLock { layer: self }
    }
}

/// The log held by [`ActiveLayer::lock_log`].
pub(crate) struct LogLock<'a> {
    layer: &'a ActiveLayer,
}

impl Drop for LogLock<'_> {
    fn drop(&mut self) {
        let mut j = lock(&self.layer.journal);
        j.syncing = false;
        let wake = std::mem::take(&mut j.wake);
        drop(j);
        self.layer.sync_done.notify_all();
        for fd in wake {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to an eventfd kept open by the Arc.
            let _ = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

impl Volume {
    /// The layer writes go to now, if the view is writable.
    pub(crate) fn active_layer(&self) -> Option<Arc<ActiveLayer>> {
        self.state().active.clone()
    }

    /// Starts a durable batch on `active` for an engine. A running batch counts as a write in
    /// flight (a checkpoint waits for it). [`Begin::Nothing`] when `active` is no longer the
    /// active layer: the checkpoint that sealed it made it durable (or `apply` dropped it).
    pub(crate) fn begin_sync(&self, active: &Arc<ActiveLayer>, wake: &Arc<OwnedFd>) -> Begin {
        // Counted before the active layer is checked, as for writes (see `plan_write`).
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let current = self
            .state()
            .active
            .as_ref()
            .is_some_and(|a| Arc::ptr_eq(a, active));
        let begin = if current {
            active.try_begin_sync(true, Some(wake))
        } else {
            Begin::Nothing
        };
        if !matches!(begin, Begin::Batch(_)) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        begin
    }

    /// Ends a batch started with [`Volume::begin_sync`].
    pub(crate) fn end_sync(&self, batch: SyncBatch, steps: Steps) -> Result<()> {
        let active = batch.active.clone();
        let r = active.finish_sync(batch, steps);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        r
    }
}
