//! The background hole-punch worker of an active layer (see "Reusing freed blocks" in
//! `docs/DESIGN.md`).
//!
//! A durable sync ends by retiring the blocks its records superseded; those no read can
//! still read come out of [`crate::space::Alloc::retire`] ready. Up to a bound the active
//! layer's own ready blocks go straight back to its free list, unpunched (overwrite churn
//! then costs neither a punch nor a filesystem allocation); every other ready block is
//! handed to this worker, so that no sync, flush or client thread ever waits for a punch
//! (on a filesystem mounted with `discard` each punch is a synchronous discard).
//!
//! The worker takes everything queued at once (many syncs' worth), sorts it per file,
//! merges adjacent blocks into ranges, punches them, and only then hands the active layer's
//! own punched blocks to [`crate::space::Alloc::reuse`]. A queued block of a file that was
//! since replaced or unlinked is punched through the descriptor the queue holds: harmless.
//! One worker serves a view's active layer and its successors (a checkpoint or an apply
//! hands the worker on, so dropping the replaced layer never waits); it also punches the
//! blocks a merge's finish leaves unreferenced in a sealed layer (never reused: they are
//! not the active file's). Dropping the last (the disk closes) drains the queue, bounded
//! by [`DRAIN_LIMIT`], and `Disk`'s drop waits for it before the disk lock goes.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::layer::LayerFiles;
use crate::space::{Alloc, Block};

/// Longest wait of a drop (and of [`Puncher::wait`]) for the queued punches; past it the
/// rest is left to the worker thread (or, if it is gone, stays allocated: space only).
pub(crate) const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// Blocks one active layer queued, with where its own blocks go back once punched.
struct Batch {
    blocks: Vec<Block>,
    /// The active layer's data file and allocator: its own blocks go back there (matched by
    /// the file object, never by layer id, so a successor active layer never gets another
    /// file's blocks).
    own: Arc<LayerFiles>,
    alloc: Arc<Mutex<Alloc>>,
}

#[derive(Default)]
struct Queue {
    batches: Vec<Batch>,
    /// Blocks in `batches`.
    queued_blocks: u64,
    /// Blocks of the batch being punched.
    punching: u64,
    /// Batches queued so far, and the newest one whose punches have completed.
    queued: u64,
    done: u64,
    closing: bool,
    /// The worker thread ended (or never started).
    exited: bool,
    /// A drop gave up waiting: the worker punches nothing more (space only).
    abandon: bool,
    /// Blocks handed to a punch so far (tests: kept blocks are never punched).
    punched: u64,
    /// Threads in [`Puncher::wait`].
    waiters: u64,
    /// Tests hold the worker before it punches (a close or a wait releases it).
    #[cfg(test)]
    held: bool,
}

struct Shared {
    q: Mutex<Queue>,
    /// Signalled when work is queued, when a batch is done and when the worker exits.
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits on the condition variable until `done(q)` or `limit` from `start` has passed;
    /// returns the guard and whether `done` held.
    fn wait_until<'a>(
        &self,
        mut q: MutexGuard<'a, Queue>,
        start: Instant,
        limit: Duration,
        done: impl Fn(&Queue) -> bool,
    ) -> (MutexGuard<'a, Queue>, bool) {
        while !done(&q) {
            let left = limit.saturating_sub(start.elapsed());
            if left.is_zero() {
                return (q, false);
            }
            q = self
                .cv
                .wait_timeout(q, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        (q, true)
    }
}

/// Punches the blocks the active layers of one view queue, on a thread of its own (started
/// with the first batch). Shared by an active layer and the successors a checkpoint makes,
/// so that dropping a replaced active layer never waits; drained when the last goes.
pub(crate) struct Puncher {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Puncher {
    pub fn new() -> Puncher {
        Puncher {
            shared: Arc::new(Shared {
                q: Mutex::new(Queue {
                    exited: true,
                    ..Queue::default()
                }),
                cv: Condvar::new(),
            }),
            thread: Mutex::new(None),
        }
    }

    /// Queues `blocks` (ready: no read can still read them) to be punched; `own` and
    /// `alloc` are the queuing active layer's file and allocator. Never blocks on a punch;
    /// if no worker thread can be started they are punched here.
    pub fn enqueue(&self, blocks: Vec<Block>, own: &Arc<LayerFiles>, alloc: &Arc<Mutex<Alloc>>) {
        if blocks.is_empty() {
            return;
        }
        let mut q = self.shared.lock();
        q.queued_blocks += blocks.len() as u64;
        q.batches.push(Batch {
            blocks,
            own: own.clone(),
            alloc: alloc.clone(),
        });
        q.queued += 1;
        if q.exited && !q.closing {
            let mut t = self.thread.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(old) = t.take() {
                // An earlier worker that ended (it only ends when closing or on a panic).
                let _ = old.join();
            }
            let shared = self.shared.clone();
            match std::thread::Builder::new()
                .name("strata-punch".into())
                .spawn(move || worker(&shared))
            {
                Ok(h) => {
                    q.exited = false;
                    *t = Some(h);
                }
                Err(e) => {
                    tracing::warn!("no punch worker ({e}): punching on the syncing thread");
                    let batches = std::mem::take(&mut q.batches);
                    let gen = q.queued;
                    q.punched += q.queued_blocks;
                    q.queued_blocks = 0;
                    drop(q);
                    punch_batches(batches);
                    let mut q = self.shared.lock();
                    q.done = q.done.max(gen);
                    drop(q);
                    self.shared.cv.notify_all();
                    return;
                }
            }
        }
        drop(q);
        self.shared.cv.notify_all();
    }

    /// Waits until every punch queued before this call has completed (and the punched own
    /// blocks are back in the free list); false if that took longer than `limit`.
    pub fn wait(&self, limit: Duration) -> bool {
        let start = Instant::now();
        let mut q = self.shared.lock();
        let target = q.queued;
        q.waiters += 1;
        self.shared.cv.notify_all();
        let (mut q, _) = self
            .shared
            .wait_until(q, start, limit, |q| q.done >= target || q.exited);
        q.waiters -= 1;
        q.done >= target
    }

    /// Blocks handed to a punch so far.
    #[cfg(test)]
    pub fn punched(&self) -> u64 {
        self.shared.lock().punched
    }

    /// Holds (or releases) the worker before its next punch.
    #[cfg(test)]
    pub fn hold(&self, held: bool) {
        self.shared.lock().held = held;
        self.shared.cv.notify_all();
    }

    /// Blocks queued and not yet punched (including a batch being punched).
    pub fn pending(&self) -> u64 {
        let q = self.shared.lock();
        q.queued_blocks + q.punching
    }
}

impl Drop for Puncher {
    /// Drains the queue: waits (bounded) for the worker to punch what is queued and exit.
    fn drop(&mut self) {
        let mut q = self.shared.lock();
        q.closing = true;
        self.shared.cv.notify_all();
        let (mut q, exited) = self
            .shared
            .wait_until(q, Instant::now(), DRAIN_LIMIT, |q| q.exited);
        if !exited {
            tracing::warn!(
                "the punch worker did not drain in {DRAIN_LIMIT:?} ({} blocks queued): \
                 they stay allocated (space only; a reopen frees the active layer's, a \
                 reclaim the others)",
                q.queued_blocks
            );
            // Nothing more is punched once the files may be another writer's.
            q.abandon = true;
            q.batches.clear();
            return;
        }
        drop(q);
        if let Some(h) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
    }
}

/// Marks the worker as gone even if a punch panics (so that waiters do not wait forever).
struct ExitGuard<'a>(&'a Shared);

impl Drop for ExitGuard<'_> {
    fn drop(&mut self) {
        let mut q = self.0.lock();
        q.exited = true;
        drop(q);
        self.0.cv.notify_all();
    }
}

fn worker(shared: &Shared) {
    let _exit = ExitGuard(shared);
    let mut q = shared.lock();
    loop {
        #[cfg(test)]
        if q.held && !q.closing && q.waiters == 0 {
            q = shared.cv.wait(q).unwrap_or_else(|p| p.into_inner());
            continue;
        }
        if q.batches.is_empty() || q.abandon {
            q.batches.clear();
            q.done = q.queued;
            shared.cv.notify_all();
            if q.closing {
                return;
            }
            q = shared.cv.wait(q).unwrap_or_else(|p| p.into_inner());
            continue;
        }
        let batches = std::mem::take(&mut q.batches);
        let gen = q.queued;
        q.punching = q.queued_blocks;
        q.punched += q.queued_blocks;
        q.queued_blocks = 0;
        drop(q);
        punch_batches(batches);
        q = shared.lock();
        q.punching = 0;
        q.done = q.done.max(gen);
        shared.cv.notify_all();
    }
}

/// Punches the blocks of `batches` coalesced into ranges per file (many syncs' worth at
/// once), then makes each batch's own blocks reusable in its allocator.
fn punch_batches(batches: Vec<Batch>) {
    let mut all: Vec<Block> = batches
        .iter()
        .flat_map(|b| b.blocks.iter().cloned())
        .collect();
    // Grouped by file object (a file replaced under the same layer id is another group).
    all.sort_by_key(|(l, b)| (Arc::as_ptr(l) as usize, *b));
    let mut i = 0;
    while i < all.len() {
        let layer = all[i].0.clone();
        let mut group = Vec::new();
        while i < all.len() && Arc::ptr_eq(&all[i].0, &layer) {
            group.push(all[i].1);
            i += 1;
        }
        if let Err(e) = layer.punch(&mut group) {
            // Best effort: an unpunched block only costs space, and reusing it is safe (a
            // write overwrites it before any record points at it).
            tracing::warn!(
                "could not free {} blocks of layer {}: {e}",
                group.len(),
                layer.id
            );
        }
    }
    for b in batches {
        let mine: Vec<u64> = b
            .blocks
            .iter()
            .filter(|(l, _)| Arc::ptr_eq(l, &b.own))
            .map(|&(_, n)| n)
            .collect();
        if !mine.is_empty() {
            b.alloc
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .reuse(mine);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use crate::layer::{allocated, PUNCHES};
    use crate::volume::ActiveLayer;
    use crate::{CacheMode, DeleteOptions, Disk, OpenOptions, StrategyKind, BLOCK_SIZE};

    const BLOCKS: u64 = 1024;

    /// A fresh 64 MiB disk opened read-write with O_DIRECT (also used by other modules' tests).
    pub(crate) fn disk() -> (tempfile::TempDir, PathBuf, Disk) {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("disk");
        Disk::create(&d, 64 << 20, None).unwrap();
        let opts = OpenOptions {
            cache: CacheMode::None,
            read_only: false,
        };
        let disk = Disk::open(&d, opts).unwrap();
        (t, d, disk)
    }

    fn active(disk: &Disk) -> Arc<ActiveLayer> {
        disk.now().active_layer().unwrap()
    }

    fn data_path(disk: &Disk) -> PathBuf {
        active(disk).files.data_path.clone()
    }

    /// Writes `n` blocks at block `at`, each with its own contents, and flushes.
    fn write(disk: &Disk, at: u64, n: u64, tag: u8) {
        let mut buf = vec![tag; (n * BLOCK_SIZE) as usize];
        for (i, c) in buf.chunks_mut(BLOCK_SIZE as usize).enumerate() {
            c[..8].copy_from_slice(&(at + i as u64).to_le_bytes());
        }
        disk.now().write_at(&buf, at * BLOCK_SIZE, false).unwrap();
        disk.now().flush().unwrap();
    }

    fn punches_here() -> u64 {
        PUNCHES.with(|c| c.get())
    }

    fn alloc_of(p: &Path) -> u64 {
        allocated(p)
    }

    /// Blocks 0..BLOCKS and a tail block written, then 0..BLOCKS discarded and flushed: the
    /// discard frees BLOCKS of the active layer's own blocks (the tail keeps the used part
    /// from shrinking).
    fn free_a_range(disk: &Disk) {
        write(disk, 0, BLOCKS, 1);
        write(disk, BLOCKS, 1, 2);
        disk.now().discard(0, BLOCKS * BLOCK_SIZE).unwrap();
        disk.now().flush().unwrap();
    }

    #[test]
    fn a_flush_never_punches_on_its_thread_and_the_worker_punches_beyond_the_bound() {
        let (_t, _d, disk) = disk();
        let data = data_path(&disk);
        let a = active(&disk);
        write(&disk, 0, BLOCKS, 1);
        write(&disk, BLOCKS, 1, 2);
        let before = alloc_of(&data);
        let here = punches_here();
        disk.now().discard(0, BLOCKS * BLOCK_SIZE).unwrap();
        disk.now().flush().unwrap();
        assert_eq!(punches_here(), here, "the flushing thread punched");
        disk.now().wait_punches();
        assert_eq!(punches_here(), here, "waiting punched on this thread");
        // 1025 blocks used: the bound keeps max(64, 1025 / 8) = 128 blocks unpunched.
        let kept = 128;
        assert_eq!(a.puncher_for_tests().punched(), BLOCKS - kept);
        let freed = before - alloc_of(&data);
        assert!(
            freed >= (BLOCKS - kept) * BLOCK_SIZE && freed < BLOCKS * BLOCK_SIZE,
            "freed {freed} bytes"
        );
        // Every freed block is reusable: kept ones at once, punched ones after the punch.
        let space = disk.now().active_space().unwrap();
        assert_eq!(
            (space.free_blocks, space.waiting_blocks),
            (BLOCKS, 0),
            "{space:?}"
        );
        write(&disk, 5000, BLOCKS, 3);
        assert_eq!(disk.now().active_space().unwrap().used_blocks, BLOCKS + 1);
        assert!(disk.check().unwrap().is_clean());
    }

    #[test]
    fn overwrite_churn_reuses_kept_blocks_without_a_punch() {
        let (_t, _d, disk) = disk();
        let a = active(&disk);
        write(&disk, 0, BLOCKS, 1);
        let used = disk.now().active_space().unwrap().used_blocks;
        for round in 0..200u64 {
            // 16 blocks overwritten per flush: fewer than the bound keeps.
            write(&disk, (round * 37) % (BLOCKS - 16), 16, round as u8);
        }
        disk.now().wait_punches();
        assert_eq!(a.puncher_for_tests().punched(), 0, "churn was punched");
        let space = disk.now().active_space().unwrap();
        // Runs of 16 need a free extent of 16: fragments below that stay free, so the
        // used part may grow by up to the kept bound (128 blocks here) plus one write.
        assert!(
            space.used_blocks <= used + 128 + 16,
            "the file grew instead of reusing: {space:?} (was {used})"
        );
        assert!(disk.check().unwrap().is_clean());
    }

    #[test]
    fn punched_blocks_are_reused_only_after_their_punch() {
        let (_t, _d, disk) = disk();
        let a = active(&disk);
        a.puncher_for_tests().hold(true);
        free_a_range(&disk);
        // The worker holds 1024 - 128 blocks: they are not in the free list yet.
        let space = disk.now().active_space().unwrap();
        assert_eq!(space.free_blocks, 128, "{space:?}");
        assert_eq!(space.waiting_blocks, BLOCKS - 128, "{space:?}");
        // A write larger than the kept blocks goes to the end, not into queued blocks.
        write(&disk, 6000, 256, 4);
        assert!(disk.now().active_space().unwrap().used_blocks >= BLOCKS + 1 + 256);
        a.puncher_for_tests().hold(false);
        disk.now().wait_punches();
        let space = disk.now().active_space().unwrap();
        assert_eq!(space.waiting_blocks, 0, "{space:?}");
        assert!(space.free_blocks >= BLOCKS - 128, "{space:?}");
        assert!(disk.check().unwrap().is_clean());
    }

    #[test]
    fn dropping_the_disk_drains_queued_punches() {
        let (_t, d, disk) = disk();
        let data = data_path(&disk);
        active(&disk).puncher_for_tests().hold(true);
        write(&disk, 0, BLOCKS, 1);
        write(&disk, BLOCKS, 1, 2);
        let before = alloc_of(&data);
        disk.now().discard(0, BLOCKS * BLOCK_SIZE).unwrap();
        disk.now().flush().unwrap();
        assert_eq!(alloc_of(&data), before, "held: nothing punched yet");
        // The close waits for the queue (a wait releases the hold).
        drop(disk);
        let freed = before - alloc_of(&data);
        assert!(freed >= (BLOCKS - 128) * BLOCK_SIZE, "freed {freed} bytes");
        let opts = OpenOptions {
            cache: CacheMode::None,
            read_only: false,
        };
        assert!(Disk::open(&d, opts).unwrap().check().unwrap().is_clean());
    }

    #[test]
    fn a_checkpoint_never_gives_the_new_active_layer_the_old_ones_blocks() {
        let (_t, _d, mut disk) = disk();
        let old = active(&disk);
        old.puncher_for_tests().hold(true);
        // The old active layer queues blocks 128..1024 (its own: 0..128 are kept).
        free_a_range(&disk);
        disk.checkpoint("c").unwrap();
        let new = active(&disk);
        assert!(!Arc::ptr_eq(&old.files, &new.files));
        // The new one (same worker) queues its own: 200 blocks and a tail at 200, the 200
        // discarded: 64 kept, 136 queued. One worker pass then punches both batches.
        write(&disk, 0, 200, 5);
        write(&disk, 200, 1, 6);
        disk.now().discard(0, 200 * BLOCK_SIZE).unwrap();
        disk.now().flush().unwrap();
        old.puncher_for_tests().hold(false);
        assert!(new.wait_punches(super::DRAIN_LIMIT));
        // Only its own blocks came back: 0..200 free, the tail at 200 (which is block 200 of
        // the old file's queued range) still in use.
        let space = disk.now().active_space().unwrap();
        assert_eq!(
            (space.used_blocks, space.free_blocks),
            (201, 200),
            "{space:?}"
        );
        assert!(disk.check().unwrap().is_clean());
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        disk.now().read_at(&mut buf, 200 * BLOCK_SIZE).unwrap();
        assert_eq!(buf[8], 6);
    }

    /// Deleting "old" (0..BLOCKS of tag 1) with compact-into-parent absorbs the layer above
    /// (every other block, tag 2) into old's layer: the swap hands old's shadowed blocks to
    /// the punch worker instead of punching them itself; Now reads the same before and
    /// after they are punched, and they are punched, not reused.
    #[test]
    fn a_merge_swap_leaves_its_shadowed_blocks_to_the_worker() {
        let (_t, _d, mut disk) = disk();
        write(&disk, 0, BLOCKS, 1);
        disk.checkpoint("old").unwrap();
        for b in (0..BLOCKS).step_by(2) {
            write(&disk, b, 1, 2);
        }
        disk.checkpoint("mid").unwrap();
        let a = active(&disk);
        a.puncher_for_tests().hold(true);
        let expect = |b: u64| if b % 2 == 0 { 2 } else { 1 };
        let read_all = |disk: &Disk| {
            let mut buf = vec![0u8; BLOCK_SIZE as usize];
            for b in 0..BLOCKS {
                disk.now().read_at(&mut buf, b * BLOCK_SIZE).unwrap();
                assert_eq!(
                    (u64::from_le_bytes(buf[..8].try_into().unwrap()), buf[8]),
                    (b, expect(b)),
                    "block {b}"
                );
            }
        };
        let opts = DeleteOptions::with(StrategyKind::CompactIntoParent);
        let (_, jobs) = disk.delete_online("old", &opts).unwrap();
        assert_eq!(jobs.len(), 1);
        let here = punches_here();
        let mut freed = 0;
        for mut j in jobs {
            j.run(&std::sync::atomic::AtomicBool::new(false)).unwrap();
            freed += disk.finish_merge(j).unwrap().bytes_freed;
        }
        assert_eq!(punches_here(), here, "the swap punched on its thread");
        assert_eq!(a.puncher_for_tests().pending(), BLOCKS / 2);
        // Old's layer is now the bottom of Now's view (mid's was removed).
        let merged = disk.now().state().layers[0].data_path.clone();
        let before = alloc_of(&merged);
        read_all(&disk);
        a.puncher_for_tests().hold(false);
        disk.now().wait_punches();
        assert_eq!(a.puncher_for_tests().punched(), BLOCKS / 2);
        // (Less a few blocks of extent tree the 512 holes make the filesystem allocate.)
        let punched = before - alloc_of(&merged);
        assert!(
            punched >= (BLOCKS / 2 - 16) * BLOCK_SIZE && freed >= BLOCKS / 2 * BLOCK_SIZE,
            "punched {punched} bytes, reported {freed}"
        );
        // None of them reached the active layer's free list.
        assert_eq!(disk.now().active_space().unwrap().free_blocks, 0);
        read_all(&disk);
        assert!(disk.check().unwrap().is_clean());
    }

    /// An apply's new active layer takes over the old one's worker: the apply does not wait
    /// for the queued punches (before, dropping the old state drained them, with Now
    /// locked), and they still complete.
    #[test]
    fn an_apply_hands_the_queued_punches_on_instead_of_waiting() {
        let (_t, _d, mut disk) = disk();
        disk.checkpoint("c").unwrap();
        let old = active(&disk);
        old.puncher_for_tests().hold(true);
        free_a_range(&disk);
        let queued = old.puncher_for_tests().pending();
        assert!(queued >= BLOCKS - 128, "{queued} queued");
        disk.apply("c", None).unwrap();
        let new = active(&disk);
        assert!(!Arc::ptr_eq(&old.files, &new.files));
        assert_eq!(
            old.puncher_for_tests().pending(),
            queued,
            "the apply drained"
        );
        assert_eq!(old.puncher_for_tests().punched(), 0);
        drop(old);
        assert!(new.wait_punches(super::DRAIN_LIMIT));
        assert_eq!(new.puncher_for_tests().punched(), queued);
        assert!(disk.check().unwrap().is_clean());
    }
}
