//! How the merge worker stays in the background: the bulk copy runs on a thread of lowered
//! CPU and I/O priority, and yields to client I/O while there is any.
//!
//! Priority: the copy thread sets its own niceness to [`COPY_NICE`] (`setpriority` on its
//! thread id applies to that thread only on Linux) and its I/O priority to best-effort level
//! 7 (`ioprio_set` on its thread id). io_uring takes a request's priority from the submitting
//! thread when the SQE carries none (`io_prep_rw`: `get_current_ioprio()`), and the io-wq
//! workers a ring starts are created from the thread that uses it (they copy its niceness and
//! share its I/O context), so the copy's reads and writes carry the lowered priority. The idle
//! class is not used: mq-deadline (this machine's scheduler for its disk) dispatches no
//! lower-class request while a higher-class one is in flight, up to its 10 s aging limit, so a
//! client writing without pause would hold an idle-class merge to a few requests per 10 s.
//!
//! Pacing: the copy runs in time slices. While the disk's quiesce gate has client requests in
//! flight (sampled every millisecond, smoothed over about 50 ms), the copy pauses once it has
//! worked [`Pacing::slice`] since its last pause: it starts no new chunk (128 KiB), lets the
//! ones in flight finish and waits `worked x (1 / share - 1) x busy fraction`, at most
//! [`Pacing::max_wait`], ending the wait early once the clients have been idle for
//! [`Pacing::idle_resume`] (`journal::CopyPacer`: the pause comes between two chunks, also in
//! the middle of a batch, so a slice is a slice however long a batch takes; `worked` counts
//! everything the job did since the last pause: copies, syncs, record appends, punches). With
//! no client I/O the copy is never interrupted. The merge keeps at least `share` of the time
//! whatever the clients do, so every merge finishes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use journal::MergeJob;
use serde::Serialize;

use crate::quiesce::Gate;

/// Niceness of the merge copy thread (0 = normal, 19 = lowest).
pub const COPY_NICE: i32 = 10;
/// I/O priority class best-effort and its lowest level.
const IOPRIO_CLASS_BE: i32 = 2;
const IOPRIO_LEVEL: i32 = 7;
const IOPRIO_CLASS_SHIFT: i32 = 13;
const IOPRIO_WHO_PROCESS: i32 = 1;

/// A thread's CPU and I/O priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Priority {
    pub nice: i32,
    /// `ioprio_get`'s value: class << 13 | level (0: none set, follows the niceness).
    pub ioprio: i32,
}

/// The merge copy's I/O priority value.
pub const COPY_IOPRIO: i32 = (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | IOPRIO_LEVEL;

/// The calling thread's kernel id.
pub fn thread_id() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Lowers the calling thread's CPU and I/O priority to the merge copy's.
pub fn lower_this_thread() -> std::io::Result<()> {
    let tid = thread_id();
    // SAFETY: setpriority takes plain integers; `tid` is this thread's id.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, COPY_NICE) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ioprio_set takes plain integers and changes only this thread's I/O context.
    if unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, tid, COPY_IOPRIO) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The priority of thread `tid` of this process.
pub fn priority_of(tid: i32) -> std::io::Result<Priority> {
    // SAFETY: ioprio_get takes plain integers.
    let ioprio = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, tid) };
    if ioprio < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The niceness is field 19 of /proc/self/task/TID/stat (getpriority's -1 is ambiguous).
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "unexpected stat format");
    let rest = stat.rsplit_once(") ").ok_or_else(bad)?.1;
    let nice = rest
        .split_whitespace()
        .nth(16)
        .and_then(|f| f.parse().ok())
        .ok_or_else(bad)?;
    Ok(Priority {
        nice,
        ioprio: ioprio as i32,
    })
}

/// The pacing policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pacing {
    /// Off: the copy runs uninterrupted (an explicit `--rate` paces it instead).
    pub adaptive: bool,
    /// Longest uninterrupted copy while clients are busy.
    pub slice: Duration,
    /// Share of the time the merge keeps while the clients are busy all the time.
    pub share: f64,
    /// Longest wait after one slice.
    pub max_wait: Duration,
    /// A wait ends once no client request was in flight for this long.
    pub idle_resume: Duration,
    /// Smoothed busy fraction above which the clients count as busy.
    pub busy_above: f64,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            adaptive: true,
            slice: Duration::from_millis(50),
            share: 0.1,
            max_wait: Duration::from_secs(2),
            idle_resume: Duration::from_millis(20),
            busy_above: 0.05,
        }
    }
}

/// What pacing did to one job.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Paced {
    /// Times the copy yielded.
    pub yields: u64,
    /// Time spent waiting for the clients.
    pub waited: Duration,
}

/// How often the gate is sampled.
const SAMPLE: Duration = Duration::from_millis(1);
/// Weight of one sample in the smoothed busy fraction (time constant about 50 samples).
const EWMA: f64 = 0.02;

/// Milliseconds since the Unix epoch (debug lines lined up with other tools' logs).
fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn busy_sample(gate: &Gate) -> f64 {
    if gate.in_flight() > 0 {
        1.0
    } else {
        0.0
    }
}

/// True when a copy that has worked `worked` since its last pause should pause before its
/// next chunk, the clients' smoothed busy fraction being `busy`.
pub fn pause_due(pacing: &Pacing, worked: Duration, busy: f64) -> bool {
    pacing.adaptive && busy > pacing.busy_above && worked >= pacing.slice
}

/// How long a copy that worked `worked` since its last pause waits for the clients, busy
/// `busy` of the time: `worked x (1 / share - 1) x busy`, at most [`Pacing::max_wait`]. While
/// `worked` is at most about `max_wait x share / (1 - share)` (0.22 s with the defaults; a
/// pause comes after each slice of 50 ms and a chunk), the copy keeps `share` of the time
/// when the clients are busy all of it.
pub fn pause_length(pacing: &Pacing, worked: Duration, busy: f64) -> Duration {
    let share = pacing.share.clamp(0.01, 1.0);
    worked
        .mul_f64((1.0 / share - 1.0) * busy.clamp(0.0, 1.0))
        .min(pacing.max_wait)
}

/// The copy's side of the pacing: [`journal::CopyPacer`] over the busy fraction the worker
/// thread samples.
struct Duty<'a> {
    pacing: &'a Pacing,
    gate: &'a Gate,
    cancel: &'a AtomicBool,
    /// The smoothed busy fraction (f64 bits), written by the sampling thread.
    busy: AtomicU64,
    /// Start of the current work period (the copy's start or the end of its last pause).
    since: Mutex<Instant>,
    /// A pause is under way (the sampling thread reports it through `waiting`).
    pausing: AtomicBool,
    yields: AtomicU64,
    waited_ns: AtomicU64,
}

impl Duty<'_> {
    fn busy(&self) -> f64 {
        f64::from_bits(self.busy.load(Ordering::Acquire))
    }
    fn since(&self) -> Instant {
        *self.since.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl journal::CopyPacer for Duty<'_> {
    fn due(&self) -> bool {
        pause_due(self.pacing, self.since().elapsed(), self.busy())
    }

    fn wait(&self) {
        let worked = self.since().elapsed();
        let wait = pause_length(self.pacing, worked, self.busy());
        self.pausing.store(true, Ordering::Release);
        let t = Instant::now();
        let mut idle_since: Option<Instant> = None;
        while t.elapsed() < wait && !self.cancel.load(Ordering::Acquire) {
            std::thread::sleep(SAMPLE);
            if self.gate.in_flight() == 0 {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.pacing.idle_resume {
                    break;
                }
            } else {
                idle_since = None;
            }
        }
        let waited = t.elapsed();
        tracing::debug!(
            "merge paced: worked {:.1} ms, busy {:.2}, waited {:.1} of {:.1} ms, until {} ms",
            worked.as_secs_f64() * 1000.0,
            self.busy(),
            waited.as_secs_f64() * 1000.0,
            wait.as_secs_f64() * 1000.0,
            epoch_ms(),
        );
        self.yields.fetch_add(1, Ordering::AcqRel);
        self.waited_ns
            .fetch_add(waited.as_nanos() as u64, Ordering::AcqRel);
        *self.since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.pausing.store(false, Ordering::Release);
    }
}

/// Runs `job`'s copy to its end on a background-priority thread, pacing it against the
/// client I/O admitted by `gate`: the copy pauses between two of its chunks (also in the
/// middle of a batch) once it worked a slice while the clients are busy (see
/// [`pause_due`], [`pause_length`]). `cancel` stops it (the job's `MergeCancelled` error, at
/// the end of the current batch); `waiting` is told when a wait for the clients starts
/// (true) and ends (false).
pub fn run_paced(
    job: &mut MergeJob,
    cancel: &AtomicBool,
    gate: &Gate,
    pacing: &Pacing,
    mut waiting: impl FnMut(bool),
) -> journal::Result<Paced> {
    if cancel.load(Ordering::Acquire) {
        return Err(journal::Error::MergeCancelled(job.id()));
    }
    let duty = Duty {
        pacing,
        gate,
        cancel,
        busy: AtomicU64::new(0f64.to_bits()),
        since: Mutex::new(Instant::now()),
        pausing: AtomicBool::new(false),
        yields: AtomicU64::new(0),
        waited_ns: AtomicU64::new(0),
    };
    let finished = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        let copier = std::thread::Builder::new()
            .name("merge-copy".into())
            .spawn_scoped(s, || {
                if let Err(e) = lower_this_thread() {
                    tracing::warn!("merge copy: cannot lower its priority: {e}");
                }
                *duty.since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                let r = job.run_paced(cancel, &duty);
                finished.store(true, Ordering::Release);
                r
            });
        let copier = match copier {
            Ok(c) => c,
            Err(e) => return Err(journal::Error::RawIo(e)),
        };
        let mut ewma = 0.0f64;
        let mut shown = false;
        while !finished.load(Ordering::Acquire) {
            std::thread::sleep(SAMPLE);
            ewma = ewma * (1.0 - EWMA) + busy_sample(gate) * EWMA;
            duty.busy.store(ewma.to_bits(), Ordering::Release);
            let pausing = duty.pausing.load(Ordering::Acquire);
            if pausing != shown {
                shown = pausing;
                waiting(pausing);
            }
        }
        if shown {
            waiting(false);
        }
        copier
            .join()
            .unwrap_or_else(|_| Err(journal::Error::Invalid("the merge copy panicked".into())))
    });
    result?;
    Ok(Paced {
        yields: duty.yields.load(Ordering::Acquire),
        waited: Duration::from_nanos(duty.waited_ns.load(Ordering::Acquire)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use journal::{CacheMode, DeleteOptions, Disk, OpenOptions, StrategyKind};
    use std::os::fd::AsRawFd;

    #[test]
    fn lowering_applies_to_the_calling_thread_only() {
        let me = priority_of(thread_id()).unwrap();
        let (tid, lowered) = std::thread::spawn(|| {
            lower_this_thread().unwrap();
            (thread_id(), priority_of(thread_id()).unwrap())
        })
        .join()
        .unwrap();
        assert_ne!(tid, thread_id());
        assert_eq!(
            lowered,
            Priority {
                nice: COPY_NICE,
                ioprio: COPY_IOPRIO
            }
        );
        assert_eq!(
            priority_of(thread_id()).unwrap(),
            me,
            "the caller is untouched"
        );
    }

    /// The io-wq worker an io_uring request is punted to (IOSQE_ASYNC, a read blocked on an
    /// empty pipe) runs with the niceness and I/O priority of the thread that submitted it.
    #[test]
    fn io_uring_workers_inherit_the_lowered_priority() {
        let (worker, submitter) = std::thread::spawn(|| {
            lower_this_thread().unwrap();
            let me = thread_id();
            let mut fds = [0; 2];
            // SAFETY: `fds` has room for the two descriptors pipe writes.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            // SAFETY: pipe returned two fresh descriptors that nothing else owns.
            let (r, w) = unsafe {
                use std::os::fd::FromRawFd;
                (
                    std::fs::File::from_raw_fd(fds[0]),
                    std::fs::File::from_raw_fd(fds[1]),
                )
            };
            let mut ring = io_uring::IoUring::new(4).unwrap();
            let mut buf = vec![0u8; 8];
            let sqe = io_uring::opcode::Read::new(
                io_uring::types::Fd(r.as_raw_fd()),
                buf.as_mut_ptr(),
                buf.len() as u32,
            )
            .build()
            .flags(io_uring::squeue::Flags::ASYNC)
            .user_data(1);
            // SAFETY: `buf` outlives the request: it completes (below) before buf is dropped.
            unsafe { ring.submission().push(&sqe).unwrap() };
            ring.submit().unwrap();
            let name = format!("iou-wrk-{me}");
            let deadline = Instant::now() + Duration::from_secs(10);
            let found = loop {
                let hit = std::fs::read_dir("/proc/self/task")
                    .unwrap()
                    .flatten()
                    .find_map(|e| {
                        let tid: i32 = e.file_name().to_str()?.parse().ok()?;
                        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
                        (comm.trim() == name).then_some(tid)
                    });
                if let Some(t) = hit {
                    break t;
                }
                assert!(Instant::now() < deadline, "no io-wq worker {name} appeared");
                std::thread::sleep(Duration::from_millis(5));
            };
            let worker = priority_of(found).unwrap();
            std::io::Write::write_all(&mut &w, b"x").unwrap();
            ring.submit_and_wait(1).unwrap();
            let cqe = ring.completion().next().unwrap();
            assert_eq!(cqe.result(), 1);
            (worker, priority_of(me).unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(submitter.nice, COPY_NICE);
        assert_eq!(
            worker, submitter,
            "the io-wq worker runs at the submitter's priority"
        );
    }

    #[test]
    fn a_pause_is_due_only_after_a_slice_of_work_with_busy_clients() {
        let p = Pacing::default();
        let ms = Duration::from_millis;
        assert!(!pause_due(&p, ms(49), 1.0), "before the slice ends");
        assert!(pause_due(&p, ms(50), 1.0));
        assert!(pause_due(&p, ms(5000), 0.06));
        assert!(!pause_due(&p, ms(5000), 0.05), "clients not busy enough");
        assert!(!pause_due(&p, ms(5000), 0.0));
        let off = Pacing {
            adaptive: false,
            ..p
        };
        assert!(
            !pause_due(&off, ms(5000), 1.0),
            "an explicit rate paces instead"
        );
    }

    #[test]
    fn pauses_keep_the_share_up_to_the_longest_wait() {
        let p = Pacing::default();
        let ms = Duration::from_millis;
        let close = |a: Duration, b: Duration| a.abs_diff(b) < Duration::from_micros(10);
        // Busy all the time: 9 x the work (share 10 %).
        assert!(close(pause_length(&p, ms(50), 1.0), ms(450)));
        // Busy half the time: half as long.
        assert!(close(pause_length(&p, ms(50), 0.5), ms(225)));
        assert_eq!(pause_length(&p, ms(50), 0.0), Duration::ZERO);
        // A long stretch of work (a slow batch end) waits at most max_wait: the merge keeps
        // going whatever the clients do.
        assert_eq!(pause_length(&p, ms(1000), 1.0), p.max_wait);
        // Out-of-range busy fractions are clamped.
        assert!(close(pause_length(&p, ms(50), 7.0), ms(450)));
        // The time share of the copy over a pause cycle at the default slice.
        let cycle = ms(50) + pause_length(&p, ms(50), 1.0);
        let share = 0.05 / cycle.as_secs_f64();
        assert!((share - p.share).abs() < 1e-3, "{share}");
    }

    /// The copy pauses in the middle of a batch: with one batch of 24 MiB and 1 ms slices, a
    /// busy gate makes it yield many times before the batch (the whole copy) ends.
    #[test]
    fn busy_clients_pause_the_copy_inside_a_batch() {
        let (_t, disk, mut job, model) = job_with_batch(Some(32 * MIB as u64));
        let gate = Gate::new();
        assert!(gate.try_admit());
        let pacing = Pacing {
            slice: Duration::from_millis(1),
            max_wait: Duration::from_millis(2),
            ..Pacing::default()
        };
        let mut shown = 0;
        let p = run_paced(&mut job, &AtomicBool::new(false), &gate, &pacing, |w| {
            shown += usize::from(w)
        })
        .unwrap();
        gate.release();
        assert!(p.yields >= 4, "{p:?}");
        assert!(shown >= 1, "the worker shows the pauses");
        assert!(job.is_copied());
        finish_and_check(disk, job, &model);
    }

    const MIB: usize = 1 << 20;

    /// A disk whose checkpoint `a` holds 24 MiB, deleted with compact-into-child: a job of
    /// three batches at the background queue depth.
    fn job() -> (tempfile::TempDir, Disk, journal::MergeJob, Vec<u8>) {
        job_with_batch(None)
    }

    /// [`job`] with the given batch size (`DeleteOptions::batch_bytes`).
    fn job_with_batch(
        batch_bytes: Option<u64>,
    ) -> (tempfile::TempDir, Disk, journal::MergeJob, Vec<u8>) {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("disk");
        let size = 32 * MIB;
        Disk::create(&dir, size as u64, None).unwrap();
        let mut disk = Disk::open(
            &dir,
            OpenOptions {
                cache: CacheMode::Writeback,
                read_only: false,
            },
        )
        .unwrap();
        let mut model = vec![0u8; size];
        for (i, b) in model[..24 * MIB].iter_mut().enumerate() {
            *b = (i / 4096) as u8 ^ 0x5a;
        }
        disk.now().write_at(&model[..24 * MIB], 0, false).unwrap();
        disk.checkpoint("a").unwrap();
        model[MIB..2 * MIB].fill(7);
        disk.now()
            .write_at(&model[MIB..2 * MIB], MIB as u64, false)
            .unwrap();
        disk.checkpoint("b").unwrap();
        let opts = DeleteOptions {
            queue_depth: crate::merge_worker::BACKGROUND_QUEUE_DEPTH,
            batch_bytes,
            ..DeleteOptions::with(StrategyKind::CompactIntoChild)
        };
        let (_, mut jobs) = disk.delete_online("a", &opts).unwrap();
        assert_eq!(jobs.len(), 1);
        (t, disk, jobs.remove(0), model)
    }

    fn finish_and_check(mut disk: Disk, job: journal::MergeJob, model: &[u8]) {
        disk.finish_merge(job).unwrap();
        let mut got = vec![0u8; model.len()];
        disk.checkpoint_view("b")
            .unwrap()
            .read_at(&mut got, 0)
            .unwrap();
        assert!(got == model, "b reads differently after the paced merge");
        assert!(disk.check().unwrap().is_clean());
    }

    #[test]
    fn an_idle_gate_never_interrupts_the_copy() {
        let (_t, disk, mut job, model) = job();
        let gate = Gate::new();
        // Slices short enough that a busy gate would interrupt every batch.
        let pacing = Pacing {
            slice: Duration::from_millis(1),
            ..Pacing::default()
        };
        let mut waits = 0;
        let p = run_paced(&mut job, &AtomicBool::new(false), &gate, &pacing, |w| {
            waits += usize::from(w)
        })
        .unwrap();
        assert_eq!(p, Paced::default());
        assert_eq!(waits, 0);
        finish_and_check(disk, job, &model);
    }

    #[test]
    fn busy_clients_make_the_copy_yield_and_it_still_finishes() {
        let (_t, disk, mut job, model) = job();
        let gate = Gate::new();
        // A client request in flight for the whole copy.
        assert!(gate.try_admit());
        let pacing = Pacing {
            slice: Duration::from_millis(1),
            ..Pacing::default()
        };
        let mut waits = 0;
        let p = run_paced(&mut job, &AtomicBool::new(false), &gate, &pacing, |w| {
            waits += usize::from(w)
        })
        .unwrap();
        gate.release();
        assert!(p.yields >= 1, "{p:?}");
        assert!(waits >= 1 && p.waited > Duration::ZERO, "{p:?}");
        assert!(job.is_copied());
        finish_and_check(disk, job, &model);
    }

    #[test]
    fn cancel_stops_a_paced_copy() {
        let (_t, _disk, mut job, _) = job();
        let cancel = AtomicBool::new(true);
        let e = run_paced(&mut job, &cancel, &Gate::new(), &Pacing::default(), |_| {}).unwrap_err();
        assert!(matches!(e, journal::Error::MergeCancelled(_)), "{e}");
        assert!(!job.is_copied());
    }
}
