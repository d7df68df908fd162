//! One module per parser of untrusted input. To add a target: write `src/targets/<name>.rs`
//! with a `pub const TARGET: Target` (see `journal_log.rs`), list it in [`ALL`], run
//! `strata-fuzz seed <name>` to write its seed corpus, and commit `corpus/<name>/`.

pub mod journal_log;
pub mod memory_image;
pub mod nbd_protocol;
pub mod nbd_session;
pub mod tree_json;
pub mod virtio_blk;
pub mod vm_state;

/// A fuzz target.
pub struct Target {
    pub name: &'static str,
    pub about: &'static str,
    /// Runs one input; any panic is a bug found. Must not leave state that changes how the
    /// next input behaves (beyond caches), so that a saved input replays alone.
    pub run: fn(&[u8]),
    /// Seed inputs, written to `corpus/<name>/` by `strata-fuzz seed` and used when that
    /// directory is empty.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Write each input to `artifacts/<name>/last-input` before running it, so that one that
    /// kills the process (stack overflow, abort, allocation failure) is kept. For targets of
    /// at most a few thousand executions per second.
    pub keep_last_input: bool,
}

/// Every target, in the order `strata-fuzz run` runs them.
pub const ALL: &[Target] = &[
    nbd_protocol::TARGET,
    nbd_session::TARGET,
    virtio_blk::TARGET,
    journal_log::TARGET,
    tree_json::TARGET,
    vm_state::TARGET,
    memory_image::TARGET,
];

pub fn find(name: &str) -> Option<&'static Target> {
    ALL.iter().find(|t| t.name == name)
}
