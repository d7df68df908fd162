//! A Strata disk directory: lock, tree metadata, layers, and the tree operations.
#![allow(unused)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::{Result, Volume};

/// How layer data files are opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// O_DIRECT: no host page cache (like QEMU `cache=none`).
    #[default]
    None,
    /// Buffered I/O through the host page cache (like QEMU `cache=writeback`).
    Writeback,
}

/// Options for [`Disk::open`].
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    pub cache: CacheMode,
    /// Open without the ability to write Now (checkpoint tree changes are refused too).
    pub read_only: bool,
}

/// One checkpoint, as listed to users.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointInfo {
    pub id: u64,
    pub name: String,
    pub parent: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Bytes of data held by this checkpoint's own layer(s).
    pub layer_bytes: u64,
    /// True when Now is a direct child of this checkpoint.
    pub now_parent: bool,
}

/// Summary of a disk.
#[derive(Clone, Debug, Serialize)]
pub struct DiskInfo {
    pub path: PathBuf,
    pub size: u64,
    pub block_size: u64,
    pub base: Option<PathBuf>,
    pub checkpoints: usize,
    /// Name of the checkpoint Now descends from, if any.
    pub now_parent: Option<String>,
    /// Bytes of data written since the last checkpoint.
    pub now_bytes: u64,
    /// Bytes allocated on the host by all layer files.
    pub allocated_bytes: u64,
}

/// What a `check` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    pub layers_checked: usize,
    pub blocks_checked: u64,
    /// One line per problem: which file, which record or block, what is wrong.
    pub problems: Vec<String>,
}

impl CheckReport {
    /// True when nothing is damaged.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What a `delete` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeleteReport {
    pub deleted: Vec<String>,
    pub bytes_freed: u64,
}

/// An open (and locked) Strata disk.
pub struct Disk {
    dir: PathBuf,
}

impl Disk {
    /// Creates a new disk directory of `size` bytes, optionally over a raw base image.
    pub fn create(dir: &Path, size: u64, base: Option<&Path>) -> Result<()> {
        todo!()
    }

    /// Opens and locks a disk; replays each layer's log (recovery after a crash).
    pub fn open(dir: &Path, opts: OpenOptions) -> Result<Disk> {
        todo!()
    }

    /// The read-write view of Now (read-only if the disk was opened read-only). The same
    /// `Arc` stays valid across [`Disk::checkpoint`].
    pub fn now(&self) -> Arc<Volume> {
        todo!()
    }

    /// A read-only view of checkpoint `name`.
    pub fn checkpoint_view(&self, name: &str) -> Result<Arc<Volume>> {
        todo!()
    }

    /// Takes a checkpoint of Now named `name`. Fails with [`crate::Error::Busy`] while
    /// writes are in flight on Now: the caller drains first.
    pub fn checkpoint(&mut self, name: &str) -> Result<CheckpointInfo> {
        todo!()
    }

    /// All checkpoints, parents before children.
    pub fn list(&self) -> Vec<CheckpointInfo> {
        todo!()
    }

    /// Summary.
    pub fn info(&self) -> Result<DiskInfo> {
        todo!()
    }

    /// Makes Now a fresh child of `name`, discarding Now's unsaved writes (first saved as
    /// checkpoint `save_current` if given).
    pub fn apply(&mut self, name: &str, save_current: Option<&str>) -> Result<()> {
        todo!()
    }

    /// Deletes checkpoint `name` (and its descendants with `subtree`).
    pub fn delete(&mut self, name: &str, subtree: bool) -> Result<DeleteReport> {
        todo!()
    }

    /// Renames a checkpoint.
    pub fn rename(&mut self, name: &str, new_name: &str) -> Result<()> {
        todo!()
    }

    /// Writes a flattened raw image of `name` (or Now) to `out`, sparse where unallocated.
    pub fn export(&self, name: Option<&str>, out: &Path) -> Result<()> {
        todo!()
    }

    /// Verifies every record and every live block's checksum.
    pub fn check(&self) -> Result<CheckReport> {
        todo!()
    }

    /// Renders the tree as text, with a `<- Now` marker.
    pub fn tree_text(&self) -> String {
        todo!()
    }

    /// The disk directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
