//! Strata's KVM virtual machine: guest memory, vCPUs, serial console, virtio-mmio transport,
//! Linux boot, and the built-in test guest.
//!
//! [`vm::Vm`] builds a VM from a [`vm::VmConfig`] and [`vm::Vm::run`] blocks until the guest
//! exits; the [`Outcome`] says how.

pub mod boot;
pub mod bus;
mod control;
pub mod emulate;
pub mod error;
pub mod exit_port;
pub mod fault;
pub mod i8042;
pub mod layout;
pub mod memory;
pub mod mmio;
pub mod outcome;
pub mod serial;
pub mod snapshot;
pub mod test_guest;
pub mod vcpu;
pub mod vm;
pub mod wait_port;

pub use error::{Error, Result};
pub use outcome::{ExitLatch, Outcome};
pub use vm::{Guest, PauseStats, Vm, VmConfig, VmController};
