//! Guest memory checkpoints: memory images (full and incremental), stop-copy save, live save
//! (userfaultfd write-protect), dirty tracking for incrementals, lazy restore and fold.
//!
//! One [`tracker::Tracker`] per guest memory (made by the first save, or by [`restore`]) owns a
//! userfaultfd registered for missing-page and write-protect faults over all of guest RAM, and
//! a handler thread. Write protection is both the live save's copy-on-write capture and the
//! dirty tracking: a page stays protected from the instant of a checkpoint until its first
//! write, whose fault saves the old content (if a save still needs it), marks the page dirty
//! and un-protects it. Missing pages (restored memory not yet loaded, or never touched) are
//! filled by the same handler from the image chain or with zeros. See docs/DESIGN.md.

mod bench;
mod bitmap;
mod envelope;
mod fold;
mod format;
mod restore;
mod save;
mod sigbus;
mod tracker;
mod uffd;
mod writer;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

pub use bench::{bench_baseline_write, bench_memory, MemoryBench};
pub use fold::fold;
pub use format::PAGE_SIZE;
pub use restore::restore;
pub use save::{save_full, save_stop_copy, start_live, LiveOptions, LiveSave};
pub use sigbus::{exit_on_damaged_access, DAMAGED_EXIT_STATUS};
pub use tracker::{health, release};

/// A memory image named as a parent: its id (from [`ImageStats::image_id`] or [`image_id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageRef {
    pub image_id: [u8; 16],
}

/// What a save did.
#[derive(Debug, Clone, Default)]
pub struct ImageStats {
    /// The new image's id (an increment's parent names it).
    pub image_id: [u8; 16],
    /// Whether the image is incremental.
    pub incremental: bool,
    /// Pages the image holds (all for a full image, the dirty ones for an increment).
    pub pages: u64,
    /// Held pages with non-zero data (the others are holes).
    pub data_pages: u64,
    /// Page data bytes written (`data_pages * 4096`).
    pub bytes_written: u64,
    /// Pages saved by the fault handler (written before the copier reached them).
    pub fault_pages: u64,
    /// Time the caller's thread spent before the guest could run again: the whole save for
    /// stop-copy; registering/write-protecting for live.
    pub pause: Duration,
    /// Of `pause`, the write-protect ioctls.
    pub protect: Duration,
    /// From the start of the save to the image being complete and durable.
    pub elapsed: Duration,
}

/// Reads the id of the image at `path` (checked like a restore would).
pub fn image_id(path: &std::path::Path, id: &crate::snapshot::Identity) -> Result<ImageRef> {
    let img = format::Image::open(path, id)?;
    Ok(ImageRef {
        image_id: img.header.image_id,
    })
}

/// Checks a chain's images as a restore does before mapping anything (envelope, metadata
/// checksums, file sizes, parent links), without reading page data.
pub fn check_chain(chain: &[PathBuf], id: &crate::snapshot::Identity) -> Result<()> {
    format::open_chain(chain, id).map(|_| ())
}

/// Checks every page of a chain against its checksum (a full read; restore itself checks
/// each page as it loads it).
pub fn verify(chain: &[PathBuf], id: &crate::snapshot::Identity) -> Result<()> {
    let imgs = format::open_chain(chain, id)?;
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for img in &imgs {
        for i in 0..img.header.page_count {
            if img.holds(i) {
                img.read_page(i, &mut buf)?;
            }
        }
    }
    Ok(())
}

/// Errors of memory checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not a Strata memory image")]
    NotAnImage,
    #[error("memory image from another VM")]
    ForeignVm,
    #[error(
        "memory image format version {found}, this build reads {}",
        crate::snapshot::envelope::FORMAT_VERSION
    )]
    Version { found: u32 },
    #[error("not a memory image (envelope kind {found})")]
    Kind { found: u32 },
    #[error("truncated: expected {expected} bytes, file has {actual}")]
    Truncated { expected: u64, actual: u64 },
    #[error("checksum mismatch in the {0}")]
    Checksum(&'static str),
    #[error("memory image is for {image} bytes of memory, this VM has {vm}")]
    MemSize { image: u64, vm: u64 },
    #[error("damaged memory image: {0}")]
    Damaged(String),
    #[error("{}: {inner}", path.display())]
    In { path: PathBuf, inner: Box<Error> },
    #[error("page {page} of {} fails its checksum", path.display())]
    PageChecksum { path: PathBuf, page: u64 },
    #[error("memory image chain: {0}")]
    Chain(String),
    #[error("{context} {}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Sys(&'static str, #[source] std::io::Error),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("a memory save is already running for this guest memory")]
    Busy,
    #[error("parent image is not the last checkpoint of this memory (take a full image)")]
    NotParent,
    #[error("restored guest memory is damaged: {0}")]
    Restored(String),
    #[error("memory save failed: {0}")]
    Save(String),
}

impl Error {
    /// Names the file an error is about (once).
    fn at(self, path: &std::path::Path) -> Error {
        match self {
            e @ (Error::In { .. } | Error::Io { .. } | Error::PageChecksum { .. }) => e,
            e => Error::In {
                path: path.to_path_buf(),
                inner: Box::new(e),
            },
        }
    }
}

/// Result of memory checkpoint operations.
pub type Result<T> = std::result::Result<T, Error>;
