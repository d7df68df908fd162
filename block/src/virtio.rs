//! The contract between a virtio device model and its transport (virtio-mmio lives in `vmm`).
//!
//! A device never sees the transport: it gets guest memory, its queues with their notification
//! eventfds, and an interrupt handle when the driver sets DRIVER_OK.

use std::sync::Arc;

use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// How a device tells the driver that something happened.
pub trait VirtioInterrupt: Send + Sync {
    /// Used-buffer notification for queue `queue_index`.
    fn signal_used_queue(&self, queue_index: u16) -> std::io::Result<()>;
    /// Configuration-change notification (also used after the device sets NEEDS_RESET).
    fn signal_config_change(&self) -> std::io::Result<()>;
}

/// Everything a device needs to start processing its queues.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Each queue as configured by the driver, with the eventfd the transport signals (an
    /// ioeventfd in KVM) when the driver writes QueueNotify for it.
    pub queues: Vec<(Queue, EventFd)>,
}

/// A device's own part of a VM checkpoint (the transport saves its registers beside it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioDeviceState {
    /// The feature bits the driver accepted.
    pub acked_features: u64,
    /// The configuration space as the driver reads it.
    pub config: Vec<u8>,
    /// The device had asked for a reset (DEVICE_NEEDS_RESET).
    pub needs_reset: bool,
    /// Each queue with its ring positions while the device is active (empty while it is not).
    /// A chain the device had taken from the available ring but not started is not counted as
    /// taken: after a restore it is taken again.
    pub queues: Vec<QueueState>,
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 for block).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver (including VIRTIO_F_VERSION_1).
    fn avail_features(&self) -> u64;
    /// Feature bits the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Reads device configuration space; bytes outside it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; writes outside writable fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device (normally a worker thread). Called once per DRIVER_OK.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), crate::Error>;
    /// Stops the device, waiting for in-flight requests to finish. Returns false if the
    /// device was not active.
    fn reset(&mut self) -> bool;
    /// True once the device met an error that needs a reset (the transport then reports
    /// DEVICE_NEEDS_RESET in its status register).
    fn needs_reset(&self) -> bool;
    /// Captures the device for a checkpoint. Only meaningful while the driver cannot notify
    /// (vCPUs paused) and no request is in flight (the caller drained the device); a device
    /// with requests in flight refuses.
    fn save_state(&mut self) -> Result<VirtioDeviceState, crate::Error> {
        Err(crate::Error::Snapshot(
            "this virtio device does not support checkpoints".into(),
        ))
    }
    /// Restores a device created afresh (never activated) from `state`. With `ctx` (the
    /// driver had set DRIVER_OK) the device starts at once on the queues of `ctx`, which the
    /// transport built and validated from `state.queues`, and processes any chain already in
    /// their available rings.
    fn restore_state(
        &mut self,
        state: &VirtioDeviceState,
        ctx: Option<ActivateContext>,
    ) -> Result<(), crate::Error> {
        let _ = (state, ctx);
        Err(crate::Error::Snapshot(
            "this virtio device does not support checkpoints".into(),
        ))
    }
}
