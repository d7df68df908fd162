//! Progress of a merge job, readable from any thread while the job runs.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

/// A snapshot of a job's progress.
#[derive(Clone, Debug, Serialize)]
pub struct MergeStatus {
    pub id: u64,
    pub checkpoint: String,
    pub strategy: String,
    /// "queued" | "copying" | "paused: <why>" | "done" | "failed: <why>"
    pub state: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub rate_bytes_per_sec: f64,
    pub eta_secs: Option<f64>,
    /// The id of the deferred delete that planned this job ([`crate::PendingPlan::id`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delete: Option<u64>,
}

/// What a finished (or discarded) merge did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MergeReport {
    pub id: u64,
    pub checkpoint: String,
    pub strategy: String,
    pub bytes_copied: u64,
    pub bytes_freed: u64,
    /// Most bytes the merge held allocated beyond the layers it replaces (its output).
    pub peak_extra_bytes: u64,
    /// Layer files in the affected lineage before and after.
    pub layers_before: usize,
    pub layers_after: usize,
    pub copy_seconds: f64,
    /// True when the tree changed so that the job's layers were gone: its output was
    /// deleted and nothing changed.
    pub discarded: bool,
    /// The copy freed its sources batch by batch (extra space of about one batch); false
    /// when it held its whole output until the swap.
    pub progressive: bool,
}

const QUEUED: u8 = 0;
const COPYING: u8 = 1;
const PAUSED: u8 = 2;
const DONE: u8 = 3;
const FAILED: u8 = 4;

/// Counters of one job (atomics; the reason text of a pause or failure sits behind a lock
/// that only a state change takes).
pub struct MergeProgress {
    id: u64,
    checkpoint: String,
    strategy: String,
    state: AtomicU8,
    why: Mutex<String>,
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    /// Nanoseconds spent copying (across runs) and bytes copied in that time.
    copy_nanos: AtomicU64,
    copied: AtomicU64,
    started: Instant,
    observer: Mutex<Option<Observer>>,
    /// The deferred delete that planned the job ([`NO_DELETE`] for none).
    delete: AtomicU64,
}

const NO_DELETE: u64 = u64::MAX;

/// A callback run after each batch (see [`MergeProgress::on_batch`]).
type Observer = Arc<dyn Fn(u64) + Send + Sync>;

impl MergeProgress {
    pub(crate) fn new(id: u64, checkpoint: &str, strategy: &str) -> MergeProgress {
        MergeProgress {
            id,
            checkpoint: checkpoint.to_string(),
            strategy: strategy.to_string(),
            state: AtomicU8::new(QUEUED),
            why: Mutex::new(String::new()),
            bytes_done: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            copy_nanos: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            started: Instant::now(),
            observer: Mutex::new(None),
            delete: AtomicU64::new(NO_DELETE),
        }
    }

    /// Runs `f(bytes done)` on the job's thread after each batch, at the batch's peak of
    /// space: its output data (and, in a progressive merge, its records) are durable and
    /// its sources not freed yet. For tests and harnesses that measure space or kill the
    /// process between batches.
    pub fn on_batch(&self, f: impl Fn(u64) + Send + Sync + 'static) {
        *self.observer.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(f));
    }

    pub(crate) fn batch_written(&self, bytes_done: u64) {
        let f = self
            .observer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(f) = f {
            f(bytes_done);
        }
    }

    /// Records that the deferred delete `id` planned this job (shown in its status).
    pub(crate) fn made_by_delete(&self, id: u64) {
        self.delete.store(id, Ordering::Release);
    }

    /// The deferred delete that planned this job, if one did.
    pub fn delete(&self) -> Option<u64> {
        Some(self.delete.load(Ordering::Acquire)).filter(|&d| d != NO_DELETE)
    }

    fn set(&self, state: u8, why: &str) {
        *self.why.lock().unwrap_or_else(|p| p.into_inner()) = why.to_string();
        self.state.store(state, Ordering::Release);
    }

    pub(crate) fn copying(&self) {
        self.set(COPYING, "");
    }
    pub(crate) fn paused(&self, why: &str) {
        self.set(PAUSED, why);
    }
    pub(crate) fn failed(&self, why: &str) {
        self.set(FAILED, why);
    }
    pub(crate) fn done(&self) {
        self.set(DONE, "");
    }
    pub(crate) fn set_total(&self, bytes: u64) {
        self.bytes_total.store(bytes, Ordering::Release);
    }
    pub(crate) fn set_done(&self, bytes: u64) {
        self.bytes_done.store(bytes, Ordering::Release);
    }
    pub(crate) fn add_copy_time(&self, bytes: u64, nanos: u64) {
        self.copied.fetch_add(bytes, Ordering::AcqRel);
        self.copy_nanos.fetch_add(nanos, Ordering::AcqRel);
    }
    /// Seconds spent copying so far.
    pub fn copy_seconds(&self) -> f64 {
        self.copy_nanos.load(Ordering::Acquire) as f64 / 1e9
    }
    /// Seconds since the job was made.
    pub fn age_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The current status.
    pub fn status(&self) -> MergeStatus {
        let state = self.state.load(Ordering::Acquire);
        let why = self.why.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let state = match state {
            QUEUED => "queued".to_string(),
            COPYING => "copying".to_string(),
            PAUSED => format!("paused: {why}"),
            DONE => "done".to_string(),
            _ => format!("failed: {why}"),
        };
        let done = self.bytes_done.load(Ordering::Acquire);
        let total = self.bytes_total.load(Ordering::Acquire);
        let secs = self.copy_seconds();
        let copied = self.copied.load(Ordering::Acquire);
        let rate = if secs > 0.0 {
            copied as f64 / secs
        } else {
            0.0
        };
        MergeStatus {
            id: self.id,
            checkpoint: self.checkpoint.clone(),
            strategy: self.strategy.clone(),
            state,
            bytes_done: done,
            bytes_total: total,
            rate_bytes_per_sec: rate,
            eta_secs: (rate > 0.0).then(|| total.saturating_sub(done) as f64 / rate),
            delete: self.delete(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_follows_the_counters() {
        let p = MergeProgress::new(7, "c", "auto");
        assert_eq!(p.status().state, "queued");
        p.set_total(100);
        p.copying();
        p.set_done(40);
        p.add_copy_time(40, 1_000_000_000);
        let s = p.status();
        assert_eq!((s.bytes_done, s.bytes_total), (40, 100));
        assert_eq!(s.rate_bytes_per_sec, 40.0);
        assert_eq!(s.eta_secs, Some(1.5));
        p.paused("no space left on the device");
        assert_eq!(p.status().state, "paused: no space left on the device");
        p.failed("x");
        assert_eq!(p.status().state, "failed: x");
    }
}
