//! The virtio-mmio transport (version 2, "modern" register layout).
//!
//! The transport owns a `dyn block::VirtioDevice`; the device only sees the queues, guest memory
//! and a [`block::VirtioInterrupt`] when the driver sets DRIVER_OK.

mod interrupt;
pub mod regs;
mod transport;

pub use interrupt::MmioInterrupt;
pub use transport::MmioTransport;
