//! The merge worker of one open, writable disk: the background half of an online delete.
//!
//! `Disk::delete_deferred` takes a checkpoint out of the tree at once (one tree commit, no
//! log read, so its cost does not grow with the checkpoint's data) and hands back a pending
//! plan. The worker queues the plan; on its thread the strategy plans with the disk locked
//! but client I/O flowing (a measuring strategy scans the target stack's logs there), and
//! the data movements it wants ([`journal::MergeJob`]s) run next, one at a time, never
//! holding the `Disk` mutex while it copies (the copy only reads sealed layer files the job
//! holds). A finished copy is swapped into the tree by
//! `Disk::finish_merge` with the I/O gate closed and drained, which takes a few
//! milliseconds. A job that runs out of space is paused and retried with a growing back-off;
//! any other failure abandons the job (the tree is already correct without it; a later
//! maintenance pass may plan the merge again). When the queue runs dry after a delete, the
//! worker asks the journal for maintenance merges (stacks grown too deep, garbage, merges a
//! crash interrupted) and runs those too; it also does that once when it starts.
//!
//! Every copy runs in the background (`crate::merge_pace`): on a thread of lowered CPU and I/O
//! priority, with a smaller io_uring queue than an offline merge ([`BACKGROUND_QUEUE_DEPTH`]),
//! yielding to client I/O while the disk's gate has requests in flight, unless the delete
//! gave an explicit rate limit (then only the priority is lowered).
//!
//! Stopping the worker (dropping it) cancels the running copy between two batches and waits
//! for the thread: the job's partial output stays where the journal can resume or discard it
//! on the next open, like after a crash.

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use journal::{
    DeleteOptions, Disk, MergeJob, MergeProgress, MergeReport, MergeStatus, PendingPlan,
};
use serde::Serialize;

use crate::merge_pace::{self, Pacing};
use crate::merge_progress;
use crate::quiesce::Gate;
use crate::{Error, Result};

/// How many finished (done, failed, discarded) merges `status` remembers.
const KEEP_FINISHED: usize = 32;
/// First wait before a paused (out of space) job is retried; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long `finish_merge` waits for in-flight I/O to drain before trying again later. Short:
/// client I/O is paused meanwhile, and a drain that does not come quickly (measured: 32 NBD
/// requests outstanding for over 10 s, released only when the gate reopened) is better
/// retried than waited for.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(250);
/// Wait before retrying a swap whose drain timed out (fixed: the copy is done, and the
/// retry costs the clients at most [`DRAIN_TIMEOUT`]).
const DRAIN_RETRY: Duration = Duration::from_millis(250);
/// io_uring queue depth of an online merge's bulk copy (an offline one uses the delete's,
/// default 32): fewer of the disk's queue slots taken from the clients, and smaller batches,
/// so that a yield comes sooner.
pub const BACKGROUND_QUEUE_DEPTH: u32 = 8;
/// What the status of a job waiting for the clients says.
pub const YIELDING: &str = "yielding to client I/O";
/// Most layer data files a delete holds open across its tree change (see [`HeldFiles`]): the
/// largest ones, where the close costs most.
const MAX_HELD_FILES: usize = 128;
/// Maintenance passes in a row (each one returning jobs) before the worker stops asking
/// until the next delete: a policy that always finds something cannot keep it busy forever.
const MAX_MAINTENANCE_ROUNDS: usize = 8;

/// What `status` shows: every merge running or queued, then the last finished ones.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WorkerStatus {
    /// The running merge first, then the queued ones in the order they will run.
    pub merges: Vec<MergeStatus>,
    /// Merges that ended, newest last, with their reports (done) or errors (failed).
    pub finished: Vec<Finished>,
}

/// A merge that ended.
#[derive(Clone, Debug, Serialize)]
pub struct Finished {
    pub status: MergeStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<MergeReport>,
}

/// What the worker runs next.
enum Work {
    /// A merge or reclaim job.
    Job(Box<MergeJob>, Arc<MergeProgress>),
    /// A deferred delete's planning: its jobs are queued at the front when it has run.
    Plan(PendingPlan, DeleteOptions),
}

/// One queued piece of work with what the worker knows about it.
struct Queued {
    work: Work,
    pacing: Pacing,
}

impl Queued {
    fn job(job: MergeJob, pacing: Pacing) -> Queued {
        Queued {
            work: {
                let progress = job.progress();
                Work::Job(Box::new(job), progress)
            },
            pacing,
        }
    }

    /// How `status` shows it while it waits in the queue.
    fn status(&self) -> MergeStatus {
        let mut s = match &self.work {
            Work::Job(_, progress) => progress.status(),
            Work::Plan(p, opts) => plan_status(p, opts),
        };
        s.state = "queued".into();
        s
    }
}

/// A delete's planning as a status entry (nothing copied yet).
fn plan_status(p: &PendingPlan, opts: &DeleteOptions) -> MergeStatus {
    MergeStatus {
        id: p.id(),
        checkpoint: p.checkpoint().to_string(),
        strategy: opts.custom.as_ref().map_or_else(
            || opts.strategy.name().to_string(),
            |c| c.name().to_string(),
        ),
        state: PLANNING.into(),
        bytes_done: 0,
        bytes_total: 0,
        rate_bytes_per_sec: 0.0,
        eta_secs: None,
        delete: None,
    }
}

pub use crate::merge_progress::PLANNING;

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    /// The running job's progress and, while it waits to retry, why.
    running: Option<(Arc<MergeProgress>, Option<String>)>,
    /// The delete whose strategy is planning now.
    planning: Option<MergeStatus>,
    finished: VecDeque<Finished>,
    /// Ids queued or running, and of deletes not planned yet or whose jobs are queued or
    /// running (what `wait` waits for).
    pending: HashSet<u64>,
    /// A delete happened since the last maintenance pass (or the worker just started).
    maintenance_due: bool,
    stopping: bool,
}

struct Shared {
    disk: Arc<Mutex<Disk>>,
    /// The disk's directory (where its layer files are).
    dir: PathBuf,
    gate: Arc<Gate>,
    /// Options of maintenance merges.
    opts: DeleteOptions,
    /// Pacing of the merges of deletes without a rate limit, and of maintenance merges.
    pacing: Pacing,
    state: Mutex<State>,
    /// Signalled when work arrives, a job ends, or the worker stops.
    changed: Condvar,
    cancel: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The worker's state (queues and statuses) stays consistent if a holder panicked.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn lock_disk(disk: &Mutex<Disk>) -> Result<MutexGuard<'_, Disk>> {
    // A panic while holding the disk may have left it half-changed: refuse to go on.
    disk.lock()
        .map_err(|_| Error::Protocol("internal error: the disk state was lost to a panic".into()))
}

/// True when `e` says the filesystem is full (or the quota is exhausted).
pub fn is_no_space(e: &journal::Error) -> bool {
    if matches!(e, journal::Error::NoSpace { .. }) {
        return true;
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
                return true;
            }
        }
        src = s.source();
    }
    false
}

/// Largest `--rate` accepted, in MB/s (a petabyte per second: effectively unlimited).
const MAX_RATE_MB: f64 = 1e9;

/// The journal's delete options for a strategy name and a rate in MB/s (10^6 bytes).
pub fn delete_options(
    subtree: bool,
    strategy: Option<&str>,
    rate_mb: Option<f64>,
) -> Result<DeleteOptions> {
    let mut opts = DeleteOptions {
        subtree,
        ..DeleteOptions::default()
    };
    if let Some(s) = strategy {
        opts.strategy = s
            .parse::<journal::StrategyKind>()
            .map_err(|e| Error::Usage(format!("--strategy {s:?}: {e}")))?;
    }
    if let Some(r) = rate_mb {
        if !(r.is_finite() && r > 0.0 && r <= MAX_RATE_MB) {
            return Err(Error::Usage(format!(
                "--rate {r}: expected MB/s, more than 0 and at most {MAX_RATE_MB}"
            )));
        }
        // At least one byte per second; the product is below 2^60, so it fits.
        opts.rate_limit = Some(((r * 1e6) as u64).max(1));
    }
    Ok(opts)
}

/// The merge worker of one disk. Dropping it cancels the running job and joins the thread.
pub struct MergeWorker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What a delete did: the tree change, and what to wait for.
#[derive(Clone, Debug, Serialize)]
pub struct Deleted {
    #[serde(flatten)]
    pub report: journal::DeleteReport,
    /// What to wait for: the delete's id. Its strategy plans in the background; the merges
    /// it plans name this id as their `delete` in the status, and `wait` on it returns
    /// when they have all ended.
    pub jobs: Vec<u64>,
    /// Microseconds from the request to the checkpoint being gone from the tree.
    pub gone_us: u64,
}

impl MergeWorker {
    /// Starts the worker of `disk`, whose writers all pass through `gate`. It first runs the
    /// maintenance merges the journal wants (for example one a crash interrupted).
    pub fn start(disk: Arc<Mutex<Disk>>, gate: Arc<Gate>) -> Result<MergeWorker> {
        MergeWorker::start_with(disk, gate, Pacing::default())
    }

    /// [`MergeWorker::start`] with another pacing policy (`adaptive: false` copies without
    /// yielding, still at lowered priority).
    pub fn start_with(
        disk: Arc<Mutex<Disk>>,
        gate: Arc<Gate>,
        pacing: Pacing,
    ) -> Result<MergeWorker> {
        let dir = lock_disk(&disk)?.dir().to_path_buf();
        let shared = Arc::new(Shared {
            disk,
            dir,
            gate,
            opts: DeleteOptions {
                queue_depth: BACKGROUND_QUEUE_DEPTH,
                ..DeleteOptions::default()
            },
            pacing,
            state: Mutex::new(State {
                maintenance_due: true,
                ..State::default()
            }),
            changed: Condvar::new(),
            cancel: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("merge".into())
            .spawn(move || s.run())
            .map_err(|e| Error::io("starting the merge thread", e))?;
        Ok(MergeWorker {
            shared,
            thread: Some(thread),
        })
    }

    /// Deletes `name` online: the checkpoint is gone from the tree when this returns, its
    /// merges are queued. `with_disk` lets the caller do more under the same disk lock (a
    /// VM's memory images); it runs before the tree changes, with I/O paused.
    pub fn delete(
        &self,
        name: &str,
        opts: &DeleteOptions,
        drain_timeout: Duration,
    ) -> Result<Deleted> {
        self.delete_with(name, opts, drain_timeout, |disk, opts| {
            Ok(disk.delete_deferred(name, opts)?)
        })
    }

    /// Like [`MergeWorker::delete`] with the tree change done by `tree_change` (under the
    /// disk lock, I/O paused), which returns the journal's delete report and pending plan.
    pub fn delete_with<F>(
        &self,
        name: &str,
        opts: &DeleteOptions,
        drain_timeout: Duration,
        tree_change: F,
    ) -> Result<Deleted>
    where
        F: FnOnce(&mut Disk, &DeleteOptions) -> Result<(journal::DeleteReport, PendingPlan)>,
    {
        let start = Instant::now();
        // Check the name before pausing anyone's I/O.
        {
            let disk = lock_disk(&self.shared.disk)?;
            if !disk.list().iter().any(|c| c.name == name) {
                return Err(journal::Error::UnknownCheckpoint(name.into()).into());
            }
        }
        // An explicit rate limit replaces the adaptive pacing.
        let (opts, pacing) = match opts.rate_limit {
            Some(_) => (
                opts.clone(),
                Pacing {
                    adaptive: false,
                    ..self.shared.pacing
                },
            ),
            None => (
                DeleteOptions {
                    queue_depth: opts.queue_depth.min(BACKGROUND_QUEUE_DEPTH),
                    ..opts.clone()
                },
                self.shared.pacing,
            ),
        };
        // The tree change may unlink layer files (a leaf checkpoint's, a subtree's).
        let held = HeldFiles::largest_layers(&self.shared.dir, MAX_HELD_FILES);
        // The disk first, then the gate, like every controller (a VM's checkpoint holds the
        // disk while it pauses): the pause never includes a wait for the disk.
        let mut disk = lock_disk(&self.shared.disk)?;
        let locked = start.elapsed();
        let pausing = Instant::now();
        let paused = self.shared.gate.pause(drain_timeout)?;
        let drained = pausing.elapsed();
        let (report, plan) = tree_change(&mut disk, &opts)?;
        drop(paused);
        let paused_for = pausing.elapsed();
        drop(disk);
        let gone_us = start.elapsed().as_micros() as u64;
        drop(held);
        let id = plan.id();
        {
            let mut st = lock(&self.shared.state);
            st.pending.insert(id);
            st.queue.push_back(Queued {
                work: Work::Plan(plan, opts),
                pacing,
            });
            st.maintenance_due = true;
            self.shared.changed.notify_all();
        }
        tracing::info!(
            "delete {name:?}: gone from the tree after {gone_us} us (disk locked at {locked:?}; I/O paused for {paused_for:?}, drained in {drained:?}), planning queued as {id}"
        );
        Ok(Deleted {
            report,
            jobs: vec![id],
            gone_us,
        })
    }

    /// Queues jobs (after any already queued), paced like maintenance merges; returns
    /// their ids.
    pub fn enqueue(&self, jobs: Vec<MergeJob>) -> Vec<u64> {
        self.enqueue_paced(jobs, self.shared.pacing)
    }

    fn enqueue_paced(&self, jobs: Vec<MergeJob>, pacing: Pacing) -> Vec<u64> {
        let mut st = lock(&self.shared.state);
        let mut ids = Vec::with_capacity(jobs.len());
        for job in jobs {
            ids.push(job.id());
            st.pending.insert(job.id());
            st.queue.push_back(Queued::job(job, pacing));
        }
        st.maintenance_due = true;
        self.shared.changed.notify_all();
        ids
    }

    /// Every merge running or queued, and the last ones that ended.
    pub fn status(&self) -> WorkerStatus {
        self.shared.status()
    }

    /// A handle that can wait for merges without keeping the worker alive.
    pub fn waiter(&self) -> Waiter {
        Waiter {
            shared: self.shared.clone(),
        }
    }

    /// Cancels the running job, drops the queue and joins the thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        {
            let mut st = lock(&self.shared.state);
            st.stopping = true;
            self.shared.cancel.store(true, Ordering::SeqCst);
            self.shared.changed.notify_all();
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the merge thread panicked");
            }
        }
        let mut st = lock(&self.shared.state);
        // `pending` stays: a waiter for what was dropped learns that it did not end.
        let dropped = st.queue.len();
        st.queue.clear();
        self.shared.changed.notify_all();
        if dropped > 0 {
            tracing::info!("{dropped} queued merges left for the next open");
        }
    }
}

impl Drop for MergeWorker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Waits for merges to end; holds the worker's state, not the worker.
#[derive(Clone)]
pub struct Waiter {
    shared: Arc<Shared>,
}

impl Waiter {
    /// Blocks until none of `ids` is queued or running (or the worker stops); returns how
    /// each ended, as far as the worker still remembers. A delete's id stands for the
    /// merges its plan queued (their ends are returned).
    pub fn wait(&self, ids: &[u64]) -> Result<Vec<Finished>> {
        let mut st = lock(&self.shared.state);
        while !st.stopping && ids.iter().any(|id| st.pending.contains(id)) {
            st = self
                .shared
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let ended: Vec<Finished> = st
            .finished
            .iter()
            .filter(|f| merge_progress::is_of(ids, f.status.id, f.status.delete))
            .cloned()
            .collect();
        let cut_short = ids.iter().any(|id| st.pending.contains(id))
            || ended.iter().any(|f| f.status.state.starts_with("stopped"));
        if st.stopping && cut_short {
            return Err(Error::Usage(
                "the server is stopping; the unfinished merges continue when the disk is next opened"
                    .into(),
            ));
        }
        Ok(ended)
    }

    /// Same as [`MergeWorker::status`].
    pub fn status(&self) -> WorkerStatus {
        self.shared.status()
    }
}

impl Shared {
    fn status(&self) -> WorkerStatus {
        let st = lock(&self.state);
        let mut merges = Vec::with_capacity(st.queue.len() + 2);
        if let Some(p) = &st.planning {
            merges.push(p.clone());
        }
        if let Some((p, paused)) = &st.running {
            let mut s = p.status();
            if let Some(why) = paused {
                s.state = format!("paused: {why}");
            } else if s.state == "queued" {
                // Taken by the thread, which has not reached the copy yet.
                s.state = "starting".into();
            }
            merges.push(s);
        }
        merges.extend(st.queue.iter().map(Queued::status));
        WorkerStatus {
            merges,
            finished: st.finished.iter().cloned().collect(),
        }
    }

    fn stopping(&self) -> bool {
        lock(&self.state).stopping
    }

    /// Sleeps up to `d`, waking early when the worker stops.
    fn sleep(&self, d: Duration) {
        let deadline = Instant::now() + d;
        let mut st = lock(&self.state);
        while !st.stopping {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The thread: takes jobs one at a time until stopped.
    fn run(&self) {
        let mut rounds = 0;
        loop {
            let next = {
                let mut st = lock(&self.state);
                loop {
                    if st.stopping {
                        return;
                    }
                    if let Some(q) = st.queue.pop_front() {
                        match &q.work {
                            Work::Job(_, progress) => st.running = Some((progress.clone(), None)),
                            Work::Plan(p, opts) => st.planning = Some(plan_status(p, opts)),
                        }
                        break Some(q);
                    }
                    if st.maintenance_due {
                        st.maintenance_due = false;
                        break None;
                    }
                    rounds = 0;
                    st = self
                        .changed
                        .wait(st)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            };
            match next {
                Some(Queued {
                    work: Work::Job(job, progress),
                    pacing,
                }) => self.run_job(*job, progress, pacing),
                Some(Queued {
                    work: Work::Plan(plan, opts),
                    pacing,
                }) => self.run_plan(plan, opts, pacing),
                None => {
                    rounds += 1;
                    if rounds <= MAX_MAINTENANCE_ROUNDS {
                        self.plan_maintenance();
                    } else {
                        tracing::warn!(
                            "maintenance merges keep finding work; waiting for the next delete"
                        );
                    }
                }
            }
        }
    }

    /// Asks the journal for the merges it wants now and queues them.
    fn plan_maintenance(&self) {
        let jobs = match lock_disk(&self.disk) {
            Ok(mut disk) => disk.maintenance_merges(&self.opts),
            Err(e) => {
                tracing::error!("maintenance merges: {e}");
                return;
            }
        };
        match jobs {
            Ok(jobs) if jobs.is_empty() => {}
            Ok(jobs) => {
                tracing::info!("{} maintenance merges queued", jobs.len());
                let mut st = lock(&self.state);
                for job in jobs {
                    st.pending.insert(job.id());
                    st.queue.push_back(Queued::job(job, self.pacing));
                }
                // Their completion may make more work due (a threshold crossed again).
                st.maintenance_due = true;
                self.changed.notify_all();
            }
            Err(e) => tracing::warn!("maintenance merges: {}", crate::cli::error_chain(&e)),
        }
    }

    /// Lets a deferred delete's strategy plan (disk locked, client I/O flowing) and queues
    /// its jobs at the front, in the plan's order. A plan that fails is listed as a failed
    /// merge: the checkpoint is gone all the same, and a maintenance pass reclaims later
    /// what its jobs would have.
    fn run_plan(&self, plan: PendingPlan, opts: DeleteOptions, pacing: Pacing) {
        let id = plan.id();
        let mut status = plan_status(&plan, &opts);
        let start = Instant::now();
        let planned = lock_disk(&self.disk).and_then(|mut disk| {
            let (jobs, freed) = disk.plan_deferred(plan, &opts)?;
            Ok((self.start_progressive(&mut disk, jobs), freed))
        });
        let took = start.elapsed();
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        st.planning = None;
        match planned {
            Ok((jobs, _)) => {
                let ids: Vec<u64> = jobs.iter().map(MergeJob::id).collect();
                tracing::info!(
                    "delete {:?} ({id}): planned in {took:?}, merges {ids:?}",
                    status.checkpoint
                );
                for job in jobs.into_iter().rev() {
                    st.pending.insert(job.id());
                    st.queue.push_front(Queued::job(job, pacing));
                }
                if ids.is_empty() {
                    st.pending.remove(&id);
                }
            }
            Err(e) => {
                let why = crate::cli::error_chain(&e);
                tracing::error!(
                    "delete {:?} ({id}): planning failed: {why}",
                    status.checkpoint
                );
                st.pending.remove(&id);
                status.state = format!("failed: planning: {why}");
                push_finished(
                    st,
                    Finished {
                        status,
                        report: None,
                    },
                );
            }
        }
        self.changed.notify_all();
    }

    /// Runs one job to its end: done, failed, or left for the next open (stopping).
    fn run_job(&self, mut job: MergeJob, progress: Arc<MergeProgress>, pacing: Pacing) {
        let id = job.id();
        let mut backoff = FIRST_BACKOFF;
        let mut copied = false;
        let mut drain_retries = 0u32;
        let ended = loop {
            if !copied {
                let paced =
                    merge_pace::run_paced(&mut job, &self.cancel, &self.gate, &pacing, |waiting| {
                        self.set_paused(waiting.then(|| YIELDING.to_string()))
                    });
                match paced {
                    Ok(p) => {
                        copied = true;
                        if p.yields > 0 {
                            tracing::info!(
                                "merge {id}: yielded to client I/O {} times, {:?} in all",
                                p.yields,
                                p.waited
                            );
                        }
                    }
                    Err(_) if self.stopping() => break None,
                    Err(e) if is_no_space(&e) => {
                        let why = crate::cli::error_chain(&e);
                        tracing::warn!("merge {id} paused: {why}; retrying in {backoff:?}");
                        self.backoff(&mut backoff, why);
                        continue;
                    }
                    Err(e) => {
                        let why = crate::cli::error_chain(&e);
                        tracing::error!("merge {id} failed: {why}");
                        match lock_disk(&self.disk) {
                            Ok(mut disk) => disk.abandon_merge(job),
                            Err(e) => tracing::error!("merge {id}: cannot abandon: {e}"),
                        }
                        break Some(Err(why));
                    }
                }
            }
            if self.stopping() {
                // Stopped at the end of the copy: the next open picks the job up.
                break None;
            }
            match self.finish(job) {
                Finish::Done(report) => {
                    if drain_retries > 0 {
                        tracing::info!(
                            "merge {id}: swapped in after {drain_retries} drain timeouts"
                        );
                    }
                    break Some(Ok(report));
                }
                Finish::Retry(j, e) => {
                    let why = crate::cli::error_chain(&e);
                    job = *j;
                    if matches!(e, Error::DrainTimeout { .. }) {
                        drain_retries += 1;
                        tracing::info!("merge {id}: {why}; retrying in {DRAIN_RETRY:?}");
                        self.set_paused(Some(why));
                        self.sleep(DRAIN_RETRY);
                        self.set_paused(None);
                    } else {
                        tracing::warn!("merge {id}: {why}; retrying in {backoff:?}");
                        self.backoff(&mut backoff, why);
                    }
                }
                Finish::Failed(e) => {
                    let why = crate::cli::error_chain(&e);
                    tracing::error!("merge {id}: finishing failed: {why}");
                    break Some(Err(why));
                }
            }
        };
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        st.running = None;
        st.pending.remove(&id);
        // A delete is no longer pending when the last of its jobs (queued together at the
        // front when it planned) has ended.
        if let Some(d) = progress.delete() {
            let more = st.queue.iter().any(|q| match &q.work {
                Work::Job(_, p) => p.delete() == Some(d),
                Work::Plan(..) => false,
            });
            if !more {
                st.pending.remove(&d);
            }
        }
        let mut status = progress.status();
        let report = match ended {
            // Left unfinished by a stop: shown with where the copy stood ("paused:
            // cancelled" when the stop interrupted it).
            None => {
                status.state = format!("stopped ({}): continues at the next open", status.state);
                None
            }
            Some(result) => match result {
                Ok(r) => {
                    status.state = if r.discarded {
                        "discarded (the tree changed meanwhile)".into()
                    } else {
                        "done".into()
                    };
                    Some(r)
                }
                Err(why) => {
                    status.state = format!("failed: {why}");
                    None
                }
            },
        };
        push_finished(st, Finished { status, report });
        self.changed.notify_all();
    }

    /// Shows the running job as paused for `why`, waits, doubles the back-off.
    fn backoff(&self, backoff: &mut Duration, why: String) {
        self.set_paused(Some(why));
        self.sleep(*backoff);
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        self.set_paused(None);
    }

    fn set_paused(&self, why: Option<String>) {
        if let Some((_, p)) = lock(&self.state).running.as_mut() {
            *p = why;
        }
    }

    /// Makes a deferred delete's jobs progressive with client I/O paused (a new layer's
    /// output enters Now's view only with no write in flight; planned while clients wrote,
    /// they copied their whole output before the swap: 1128 MiB of extra space for a 1 GiB
    /// compact-into-child under fio, against one batch). Paused only if a job needs it.
    fn start_progressive(&self, disk: &mut Disk, jobs: Vec<MergeJob>) -> Vec<MergeJob> {
        if !jobs.iter().any(MergeJob::may_become_progressive) {
            return jobs;
        }
        let start = Instant::now();
        match self.gate.pause(DRAIN_TIMEOUT) {
            Ok(paused) => {
                let jobs = disk.start_progressive_merges(jobs);
                drop(paused);
                tracing::info!(
                    "outputs of merges {:?} placed with I/O paused for {:?}",
                    jobs.iter().map(MergeJob::id).collect::<Vec<_>>(),
                    start.elapsed()
                );
                jobs
            }
            Err(e) => {
                tracing::info!("merges copy their whole output before the swap ({e})");
                jobs
            }
        }
    }

    /// Swaps a completed job into the tree with I/O drained.
    fn finish(&self, job: MergeJob) -> Finish {
        let id = job.id();
        // The swap unlinks the run's files (and a discarded output): their last close, which
        // frees their space, comes after the gate reopens.
        let layers = job.run_layers().into_iter().chain([job.output_layer()]);
        let held = HeldFiles::layers(&self.dir, layers);
        // The disk first, then the gate (see `delete_with`).
        let mut disk = match lock_disk(&self.disk) {
            Ok(d) => d,
            Err(e) => return Finish::Retry(Box::new(job), e),
        };
        let start = Instant::now();
        let paused = match self.gate.pause(DRAIN_TIMEOUT) {
            Ok(p) => p,
            Err(e) => return Finish::Retry(Box::new(job), e),
        };
        let drained = start.elapsed();
        let r = disk.try_finish_merge(job);
        drop(paused);
        let paused_for = start.elapsed();
        let finish = match r {
            Ok(report) => Finish::Done(report),
            // Busy (a write slipped in) or a full disk while committing: the job is intact.
            Err((job, e)) if matches!(e, journal::Error::Busy) || is_no_space(&e) => {
                Finish::Retry(job, e.into())
            }
            Err((job, e)) => {
                disk.abandon_merge(*job);
                Finish::Failed(e.into())
            }
        };
        drop(disk);
        drop(held);
        tracing::info!(
            "merge {id}: swapped in with I/O paused for {paused_for:?} (drain {drained:?}; files closed after {:?})",
            start.elapsed()
        );
        finish
    }
}

/// Remembers an ended merge (the last [`KEEP_FINISHED`]).
fn push_finished(st: &mut State, f: Finished) {
    st.finished.push_back(f);
    while st.finished.len() > KEEP_FINISHED {
        st.finished.pop_front();
    }
}

/// Extra read-only handles on layer data files, held across a change done with client I/O
/// paused. The journal unlinks the files a swap or delete replaces and drops its handles; the
/// last close of an unlinked file is where the filesystem frees its blocks, which took 125 and
/// 187 ms for two 64 MiB layers on ext4 (strace of a compact-into-child swap under fio:
/// nearly all of its 333 ms pause). Dropping these handles after the gate reopened moves
/// that work out of the pause. Holding a handle changes nothing for the journal: layer files
/// are only ever unlinked whole, which an open reader does not notice (docs/DESIGN.md,
/// "Concurrent readers"). A file that cannot be opened is simply not held.
struct HeldFiles {
    _files: Vec<File>,
}

impl HeldFiles {
    /// The data files (`layers/L<id>.data`, docs/FORMAT.md) of layers `ids` of the disk in
    /// `dir`.
    fn layers(dir: &Path, ids: impl IntoIterator<Item = u64>) -> HeldFiles {
        let layers = dir.join("layers");
        let _files = ids
            .into_iter()
            .filter_map(|id| open_held(&layers.join(format!("L{id}.data"))))
            .collect();
        HeldFiles { _files }
    }

    /// The `max` largest (by allocated space) layer data files of the disk in `dir`.
    fn largest_layers(dir: &Path, max: usize) -> HeldFiles {
        let Ok(entries) = std::fs::read_dir(dir.join("layers")) else {
            return HeldFiles { _files: Vec::new() };
        };
        let mut files: Vec<(u64, PathBuf)> = entries
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".data")))
            .filter_map(|e| {
                use std::os::unix::fs::MetadataExt;
                let m = e.metadata().ok()?;
                m.is_file().then(|| (m.blocks(), e.path()))
            })
            .collect();
        files.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        let _files = files
            .iter()
            .take(max)
            .filter_map(|(_, p)| open_held(p))
            .collect();
        HeldFiles { _files }
    }
}

/// Opens `path` read-only (not following a symlink), or `None`.
fn open_held(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()
}

/// How finishing a completed job went.
enum Finish {
    Done(MergeReport),
    /// I/O did not drain in time: the job is handed back to be tried again.
    Retry(Box<MergeJob>, Error),
    Failed(Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use journal::{CacheMode, OpenOptions, StrategyKind};

    const SIZE: usize = 4 << 20;

    struct Fixture {
        _t: tempfile::TempDir,
        dir: std::path::PathBuf,
        disk: Arc<Mutex<Disk>>,
        gate: Arc<Gate>,
        /// Expected contents of checkpoints a, b and of Now.
        a: Vec<u8>,
        b: Vec<u8>,
        now: Vec<u8>,
    }

    fn open(dir: &std::path::Path) -> Disk {
        Disk::open(
            dir,
            OpenOptions {
                cache: CacheMode::Writeback,
                read_only: false,
            },
        )
        .unwrap()
    }

    fn fill(disk: &Disk, model: &mut [u8], seed: u8, from: usize, len: usize) {
        let data: Vec<u8> = (0..len)
            .map(|i| seed ^ (i as u8).wrapping_mul(37) ^ (i >> 12) as u8)
            .collect();
        disk.now().write_at(&data, from as u64, false).unwrap();
        model[from..from + len].copy_from_slice(&data);
    }

    /// a: 2 MiB at 0; b: 2 MiB at 1 MiB (overwriting half of a's); Now: 64 KiB more.
    fn fixture() -> Fixture {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("disk");
        Disk::create(&dir, SIZE as u64, None).unwrap();
        let mut disk = open(&dir);
        let mut m = vec![0u8; SIZE];
        fill(&disk, &mut m, 1, 0, 2 << 20);
        disk.checkpoint("a").unwrap();
        let a = m.clone();
        fill(&disk, &mut m, 2, 1 << 20, 2 << 20);
        disk.checkpoint("b").unwrap();
        let b = m.clone();
        fill(&disk, &mut m, 3, 3 << 20, 64 << 10);
        Fixture {
            _t: t,
            dir,
            disk: Arc::new(Mutex::new(disk)),
            gate: Gate::new(),
            a,
            b,
            now: m,
        }
    }

    fn read(v: &journal::Volume) -> Vec<u8> {
        let mut b = vec![0u8; SIZE];
        v.read_at(&mut b, 0).unwrap();
        b
    }

    fn opts(kind: StrategyKind, rate: Option<u64>) -> DeleteOptions {
        DeleteOptions {
            rate_limit: rate,
            ..DeleteOptions::with(kind)
        }
    }

    fn wait_idle(w: &MergeWorker) -> WorkerStatus {
        loop {
            let s = w.status();
            if s.merges.is_empty() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn delete_is_gone_at_once_and_merges_keep_every_view() {
        for kind in StrategyKind::ALL {
            let f = fixture();
            let w = MergeWorker::start(f.disk.clone(), f.gate.clone()).unwrap();
            wait_idle(&w);
            let d = w.delete("a", &opts(kind, None), DRAIN_TIMEOUT).unwrap();
            assert_eq!(d.report.deleted, ["a"]);
            assert!(
                !lock(&f.disk).list().iter().any(|c| c.name == "a"),
                "{kind}: a still listed"
            );
            // What to wait for is the delete; its plan's jobs name it.
            assert_eq!(d.jobs.len(), 1, "{kind}: {d:?}");
            let ended = w.waiter().wait(&d.jobs).unwrap();
            assert!(!ended.is_empty(), "{kind}: nothing ran");
            for e in &ended {
                assert_eq!(e.status.delete, Some(d.jobs[0]), "{kind}: {e:?}");
                assert!(!e.status.state.starts_with("failed"), "{kind}: {e:?}");
            }
            assert!(w.waiter().status().merges.iter().all(|m| m.id != d.jobs[0]));
            wait_idle(&w);
            let disk = lock(&f.disk);
            assert!(read(&disk.now()) == f.now, "{kind}: Now changed");
            assert!(
                read(&disk.checkpoint_view("b").unwrap()) == f.b,
                "{kind}: b changed"
            );
            drop(disk);
            drop(w);
            drop(f.disk);
            let disk = open(&f.dir);
            assert!(disk.check().unwrap().is_clean(), "{kind}");
            assert!(read(&disk.checkpoint_view("b").unwrap()) == f.b, "{kind}");
        }
        let f = fixture();
        let w = MergeWorker::start(f.disk.clone(), f.gate.clone()).unwrap();
        let e = w
            .delete("nope", &DeleteOptions::default(), DRAIN_TIMEOUT)
            .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        assert!(!f.gate.is_paused());
        let _ = &f.a;
    }

    #[test]
    fn later_deletes_are_queued_in_order_behind_the_running_merge() {
        // A chain p0 -> ... -> p5 -> Now, 512 KiB of its own in each: deleting p0, p2, p4
        // gives three merges on three independent stacks (p1's, p3's, p5's).
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("disk");
        Disk::create(&dir, SIZE as u64, None).unwrap();
        let mut disk = open(&dir);
        let mut m = vec![0u8; SIZE];
        let mut views = Vec::new();
        for i in 0..6 {
            fill(&disk, &mut m, i as u8 + 1, i * (512 << 10), 512 << 10);
            disk.checkpoint(&format!("p{i}")).unwrap();
            views.push(m.clone());
        }
        let disk = Arc::new(Mutex::new(disk));
        let w = MergeWorker::start(disk.clone(), Gate::new()).unwrap();
        wait_idle(&w);
        // Slow enough that the first merge is still running when the others come.
        let slow = opts(StrategyKind::CompactIntoChild, Some(256 << 10));
        let mut all = Vec::new();
        for victim in ["p0", "p2", "p4"] {
            let d = w.delete(victim, &slow, DRAIN_TIMEOUT).unwrap();
            assert_eq!(d.jobs.len(), 1, "{victim}: {d:?}");
            all.extend(d.jobs);
        }
        // The worker plans the first delete and starts its merge at once; the later deletes
        // wait, unplanned, behind it.
        let s = loop {
            let s = w.status();
            if s.merges
                .first()
                .is_some_and(|m| m.delete.is_some() && m.state != "queued")
            {
                break s;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(s.merges.len(), 3, "{s:?}");
        assert_eq!(s.merges[0].delete, Some(all[0]), "{s:?}");
        for (m, &id) in s.merges[1..].iter().zip(&all[1..]) {
            assert_eq!(
                (m.id, m.delete, m.state.as_str()),
                (id, None, "queued"),
                "{s:?}"
            );
        }
        let ended = w.waiter().wait(&all).unwrap();
        let order: Vec<Option<u64>> = ended.iter().map(|e| e.status.delete).collect();
        let expected: Vec<Option<u64>> = all.iter().map(|&d| Some(d)).collect();
        assert_eq!(order, expected, "merges ran out of order");
        assert!(ended.iter().all(|e| e.status.state == "done"), "{ended:?}");
        wait_idle(&w);
        let d = lock(&disk);
        assert!(read(&d.now()) == m);
        for i in [1, 3, 5] {
            assert!(read(&d.checkpoint_view(&format!("p{i}")).unwrap()) == views[i]);
        }
    }

    #[test]
    fn stopping_cancels_the_copy_and_the_next_open_finishes_it() {
        let f = fixture();
        let w = MergeWorker::start(f.disk.clone(), f.gate.clone()).unwrap();
        wait_idle(&w);
        // 64 KiB/s: minutes for megabytes, so the stop lands mid-copy.
        let slow = opts(StrategyKind::CompactIntoChild, Some(64 << 10));
        let d = w.delete("a", &slow, DRAIN_TIMEOUT).unwrap();
        assert!(!d.jobs.is_empty());
        while w.status().merges.first().map(|m| m.bytes_done) == Some(0) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let waiter = w.waiter();
        let jobs = d.jobs.clone();
        let waiting = {
            let waiter = waiter.clone();
            std::thread::spawn(move || waiter.wait(&jobs))
        };
        w.stop();
        let e = waiting.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("stopping"), "{e}");
        // The stop interrupted the copy (it would have taken about a minute).
        let s = waiter.status();
        drop(waiter);
        let stopped = s
            .finished
            .iter()
            .find(|e| e.status.delete == Some(d.jobs[0]))
            .unwrap();
        assert_eq!(
            stopped.status.state, "stopped (paused: cancelled): continues at the next open",
            "{s:?}"
        );
        // The process "exits": a new open resumes or redoes the merge.
        let Fixture {
            disk, dir, now, b, ..
        } = f;
        drop(
            Arc::try_unwrap(disk)
                .ok()
                .expect("the worker let go of the disk"),
        );
        let disk = Arc::new(Mutex::new(open(&dir)));
        assert!(read(&lock(&disk).now()) == now);
        assert!(read(&lock(&disk).checkpoint_view("b").unwrap()) == b);
        let w = MergeWorker::start(disk.clone(), Gate::new()).unwrap();
        wait_idle(&w);
        drop(w);
        let disk = lock(&disk);
        assert!(read(&disk.now()) == now);
        assert!(read(&disk.checkpoint_view("b").unwrap()) == b);
        assert!(disk.check().unwrap().is_clean());
    }

    #[test]
    fn held_files_are_the_layers_asked_for_and_outlive_their_unlink() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let layers = t.path().join("layers");
        std::fs::create_dir(&layers).unwrap();
        for (id, kib) in [(1u64, 64usize), (2, 256), (3, 128)] {
            std::fs::write(layers.join(format!("L{id}.data")), vec![7u8; kib << 10]).unwrap();
            std::fs::write(layers.join(format!("L{id}.log")), b"log").unwrap();
        }
        let ino = |id: u64| {
            std::fs::metadata(layers.join(format!("L{id}.data")))
                .unwrap()
                .ino()
        };
        let inos = |h: &HeldFiles| -> Vec<u64> {
            h._files
                .iter()
                .map(|f| f.metadata().unwrap().ino())
                .collect()
        };
        // A layer without files (999) is skipped.
        let held = HeldFiles::layers(t.path(), [3, 999, 1]);
        assert_eq!(inos(&held), [ino(3), ino(1)]);
        // The largest first, at most as many as asked for; logs are not held.
        let big = HeldFiles::largest_layers(t.path(), 2);
        assert_eq!(inos(&big), [ino(2), ino(3)]);
        assert!(HeldFiles::largest_layers(&t.path().join("none"), 2)
            ._files
            .is_empty());
        // What the swap relies on: an unlinked file stays allocated while it is held.
        std::fs::remove_file(layers.join("L2.data")).unwrap();
        let m = big._files[0].metadata().unwrap();
        assert_eq!(m.nlink(), 0);
        assert!(m.blocks() * 512 >= 256 << 10, "{m:?}");
    }

    #[test]
    fn options_are_validated() {
        let o = delete_options(true, Some("relink"), Some(1.5)).unwrap();
        assert!(o.subtree);
        assert_eq!(o.strategy, StrategyKind::Relink);
        assert_eq!(o.rate_limit, Some(1_500_000));
        assert_eq!(delete_options(false, None, None).unwrap().rate_limit, None);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 2e9] {
            let e = delete_options(false, None, Some(bad)).unwrap_err();
            assert!(e.to_string().contains("--rate"), "{e}");
        }
        let e = delete_options(false, Some("sideways"), None).unwrap_err();
        assert!(e.to_string().contains("sideways"), "{e}");
    }

    #[test]
    fn no_space_is_recognised_through_sources() {
        let e = journal::Error::io("/x", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(is_no_space(&e));
        let e = journal::Error::io("/x", std::io::Error::from_raw_os_error(libc::EIO));
        assert!(!is_no_space(&e));
        assert!(!is_no_space(&journal::Error::OutOfRange {
            offset: 0,
            len: 1,
            size: 0
        }));
    }
}
