//! Strata's virtio-blk device model and its io_uring request backend over the journal.
//!
//! # Data path
//! The transport (virtio-mmio in `vmm`) calls [`VirtioDevice::activate`] when the driver sets
//! DRIVER_OK. [`VirtioBlock`] then starts one worker thread (`worker.rs`) that epolls the
//! queue's notify eventfd, the backend's completion eventfd, an optional [`RequestGate`]
//! waker and its own stop eventfd. For each kick it pops every available chain;
//! [`request::parse`] turns each chain into a validated [`request::Request`] without doing
//! I/O; [`virtio_exec::GuestExecutor`] copies guest data into [`journal::AlignedBuf`]s and
//! hands front-end-neutral requests to the shared [`executor::Executor`] (the same one NBD
//! connections use), which admits them through the gate and the buffer [`budget`] and runs
//! them on a [`backend::Backend`] (io_uring through [`journal::IoEngine`] by default, or
//! blocking [`journal::Volume`] calls); completions copy read data back into guest memory and
//! write the status byte chosen by [`status`]. All used entries of one loop
//! iteration are added before the driver is notified, once per queue, honouring
//! `VRING_AVAIL_F_NO_INTERRUPT` or (with `VIRTIO_RING_F_EVENT_IDX`) the used event index.
//!
//! # Trust boundary
//! Everything in guest memory is untrusted. A chain that is malformed but has a writable
//! status byte completes with IOERR (or UNSUPP for unknown types and flags); a chain with no
//! usable status byte (broken links, loops, no writable byte, status outside guest memory) is
//! returned with a used length of 0, and the device sets NEEDS_RESET and signals a config
//! change, while continuing to serve well-formed chains. A corrupt available ring stops that
//! queue (NEEDS_RESET) without stopping the thread. The memory a guest can make the device
//! hold is bounded: one IN/OUT request carries at most `seg_max` x `size_max` = 8 MiB
//! ([`config::MAX_DATA_BYTES`]), buffers of requests in flight total at most 64 MiB
//! ([`config::MAX_BUFFER_BYTES`], plus one request when idle), a chain is scanned for at most
//! [`request::MAX_SCAN`] descriptors, and a discard/write-zeroes list holds at most 32
//! segments.
//!
//! # Geometry
//! `blk_size` is 512 (any guest tool works) with topology hints for 4 KiB physical blocks
//! (see [`config`]), so guests align to the journal's block without being forced to.
//!
//! # Reset
//! [`VirtioDevice::reset`] stops taking new chains, waits for every request in flight, puts
//! them in the used ring (without interrupting the resetting driver) and joins the thread.
//! It blocks: the caller must not hold a lock that [`VirtioInterrupt`] needs.

pub mod backend;
pub mod budget;
pub mod config;
mod device;
pub mod executor;
pub mod gate;
pub mod guest;
pub mod request;
pub mod status;
pub mod virtio;
pub mod virtio_exec;
mod worker;

#[cfg(any(test, feature = "test-utils"))]
pub mod conformance;
#[cfg(test)]
mod fuzz_tests;
#[cfg(any(test, feature = "test-utils"))]
pub mod testutil;
#[cfg(test)]
mod virtio_conformance;

pub use backend::BackendKind;
pub use device::{VirtioBlock, VIRTIO_ID_BLOCK};
pub use gate::RequestGate;
pub use virtio::{ActivateContext, VirtioDevice, VirtioDeviceState, VirtioInterrupt};

/// Errors of the block device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("journal error")]
    Journal(#[from] journal::Error),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("device activation failed: {0}")]
    Activate(String),
    #[error("volume size {0} is not a positive multiple of 512 bytes")]
    VolumeSize(u64),
    #[error("block device checkpoint: {0}")]
    Snapshot(String),
}
