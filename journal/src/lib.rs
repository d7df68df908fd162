//! Strata's storage engine: a redirect-on-write journal over an optional read-only base image.
//!
//! A disk is a directory holding tree metadata (`strata.json`), an optional reference to a
//! raw base image, and one layer (data file + index log) per checkpoint plus the active layer
//! ("Now"). Reads resolve through one merged in-memory index, so their cost does not depend on
//! the depth of the checkpoint chain. See `docs/FORMAT.md` for the on-disk format.
//!
//! Entry points: [`Disk`] (open/create, checkpoint tree operations), [`Volume`] (a readable,
//! possibly writable view: Now or one checkpoint) and [`IoEngine`] (many requests in flight on
//! io_uring over a volume).

mod audit;
mod base;
mod buf;
mod compact_log;
mod disk;
mod error;
mod format;
mod freelist;
mod index;
mod layer;
mod locking;
mod merge;
mod punch;
mod rangelock;
mod read_gate;
mod safe_open;
mod space;
mod tree;
mod uring;
mod view;
mod volume;
mod zeroing;

pub use buf::{AlignedBuf, BUF_ALIGN};
pub use compact_log::{ActiveSpace, CompactReport, COMPACT_MIN_RECORDS, COMPACT_RATIO};
pub use disk::{
    CacheMode, CheckReport, CheckpointInfo, DeleteReport, Disk, DiskInfo, MergeEvent, OpenOptions,
    PendingPlan, MAX_MAINTENANCE_ROUNDS, MERGE_POLL,
};
pub use error::{Error, Result};
pub use merge::{
    uring_copy, CopyPacer, DeleteOptions, LayerStat, MergeJob, MergeProgress, MergeReport,
    MergeStatus, Move, Placement, Situation, StackRef, StackStat, Strategy, StrategyKind,
    LINEAGE_SLACK,
};
pub use tree::validate_name;
pub use uring::{Completion, IoEngine, Rejected, Request};
pub use volume::Volume;

/// Disk sizes are multiples of this (requests themselves have byte granularity).
pub const SECTOR_SIZE: u64 = 512;
/// The journal's internal block size: the unit of redirection and of checksums.
pub const BLOCK_SIZE: u64 = 4096;
#[cfg(test)]
mod bytes_tests;
#[cfg(test)]
mod hardening_tests;
#[cfg(test)]
mod shared_read_tests;
#[cfg(test)]
mod tests;
