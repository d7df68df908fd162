//! Strata's virtio-blk device model and its io_uring request backend over the journal.

pub mod virtio;

pub use virtio::{ActivateContext, VirtioDevice, VirtioInterrupt};

/// Errors of the block device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("journal error")]
    Journal(#[from] journal::Error),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("device activation failed: {0}")]
    Activate(String),
}
