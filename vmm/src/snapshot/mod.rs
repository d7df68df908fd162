//! VM checkpoints: machine state and guest memory images.

pub mod memory;

/// Who a checkpoint file belongs to: every file carries the VM's uuid and memory size, and a
/// file of another VM (or another memory size) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub vm_uuid: [u8; 16],
    pub mem_size: u64,
}
