//! Online merges: rewriting a contiguous run of sealed layers into one layer while Now keeps
//! being read and written (see "journal: merges" in `docs/DESIGN.md`).
//!
//! A delete is a tree commit (the relink) followed by [`MergeJob`]s chosen by a
//! [`Strategy`]. A job composes its run (newest version of each block), copies the live
//! blocks on io_uring ([`copy`]) into a new layer or into one layer of the run (absorb), and
//! [`crate::Disk::finish_merge`] swaps the result into the tree and into Now's open view.
//! The blocks a relink leaves unread (overwritten by the stack above them) are freed by a
//! reclaim job ([`reclaim`]), a [`MergeJob`] that punches instead of copying.

mod compose;
mod copy;
mod job;
mod progress;
mod reclaim;
mod strategy;
mod view_hooks;

pub use copy::{uring_copy, CopyPacer};
pub use job::MergeJob;
pub use progress::{MergeProgress, MergeReport, MergeStatus};
pub use strategy::{
    LayerStat, Move, Placement, Situation, StackRef, StackStat, Strategy, StrategyKind,
};

pub(crate) use job::{JobSetup, Registry, Target};
pub(crate) use reclaim::{
    finish as finish_reclaim, Above, Doomed, Reclaim, ReclaimSetup, Reclaimed,
};
pub(crate) use strategy::{builtin, maintenance_moves};
pub(crate) use view_hooks::MergeGate;

#[cfg(test)]
pub(crate) use reclaim::tests as reclaim_tests;

use std::sync::Arc;

/// Options of a delete (and of maintenance merges).
#[derive(Clone)]
pub struct DeleteOptions {
    /// Delete the checkpoint's descendants too.
    pub subtree: bool,
    pub strategy: StrategyKind,
    /// A custom strategy (overrides `strategy`), for research harnesses and examples.
    pub custom: Option<Arc<dyn Strategy>>,
    /// Bulk-copy rate limit in bytes per second (None = as fast as the disk goes).
    pub rate_limit: Option<u64>,
    /// io_uring queue depth of the bulk copy: chunks of up to 128 KiB in flight (default 32).
    pub queue_depth: u32,
    /// Bytes per batch (the unit of space reservation, of freeing sources in a progressive
    /// merge, of rate limiting, cancellation and resume). `None`: 8 MiB or
    /// 4 x `queue_depth` x 128 KiB, whichever is more.
    pub batch_bytes: Option<u64>,
    /// Let copying merges whose output tops their run free their sources batch by batch
    /// (default true; false keeps every source until the swap, for comparisons).
    pub progressive: bool,
    /// Punch a relink's shadowed blocks in a background reclaim job (returned first among
    /// the jobs) instead of inline in the delete; maintenance then also plans reclaims of
    /// layers holding overwritten blocks. Default true. False runs the same reclaim job
    /// inside `delete_online` before it returns (and maintenance plans no reclaims): the
    /// old behaviour, kept for comparisons.
    pub background_reclaim: bool,
}

impl Default for DeleteOptions {
    fn default() -> Self {
        DeleteOptions {
            subtree: false,
            strategy: StrategyKind::Auto,
            custom: None,
            rate_limit: None,
            queue_depth: 32,
            batch_bytes: None,
            progressive: true,
            background_reclaim: true,
        }
    }
}

impl std::fmt::Debug for DeleteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeleteOptions")
            .field("subtree", &self.subtree)
            .field("strategy", &self.strategy)
            .field(
                "custom",
                &self.custom.as_ref().map(|c| c.name().to_string()),
            )
            .field("rate_limit", &self.rate_limit)
            .field("queue_depth", &self.queue_depth)
            .field("batch_bytes", &self.batch_bytes)
            .field("progressive", &self.progressive)
            .field("background_reclaim", &self.background_reclaim)
            .finish()
    }
}

impl DeleteOptions {
    /// Options with one built-in strategy.
    pub fn with(strategy: StrategyKind) -> Self {
        DeleteOptions {
            strategy,
            ..DeleteOptions::default()
        }
    }

    /// The strategy these options select.
    pub(crate) fn strategy_impl(&self) -> Arc<dyn Strategy> {
        match &self.custom {
            Some(c) => c.clone(),
            None => builtin(self.strategy),
        }
    }
}

/// Layer-file slack of a lineage: maintenance keeps the layers of every lineage at most
/// (nodes on its path) + 1 (Now's active layer) + this, so at most
/// visible checkpoints + 1 + `LINEAGE_SLACK`.
pub const LINEAGE_SLACK: usize = 4;
