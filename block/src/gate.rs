//! An optional admission gate, so a controller can quiesce the device: while the gate is
//! closed the worker starts no new request (chains wait in the ring or in its small pending
//! list) and keeps completing the ones in flight. Taking a checkpoint of a running VM needs
//! exactly this, because the journal refuses a checkpoint while writes are in flight.
//!
//! The controller side (for example `engine`'s quiesce gate) implements [`RequestGate`].

use std::os::fd::RawFd;

/// Admission control shared between a device worker and a controller.
pub trait RequestGate: Send + Sync {
    /// Admits one request unless the gate is closed. Every `true` is matched by exactly one
    /// [`RequestGate::release`] once the request has completed (status written).
    fn try_admit(&self) -> bool;
    /// Marks one admitted request as completed.
    fn release(&self);
    /// A file descriptor that becomes readable when the gate reopens after a refusal.
    fn waker(&self) -> RawFd;
    /// Clears the waker after it fired.
    fn clear_waker(&self);
}
