//! Strata's user-facing surface: the `strata` CLI, NBD serving of disks, the control socket
//! of a running VM or server, and checkpoint orchestration.

pub mod cli;
pub mod disk_cmd;
pub mod error;
pub mod nbd;
pub mod run_cmd;
pub mod size;

pub use error::{Error, Result};
