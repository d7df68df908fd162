//! Strata's user-facing surface: the `strata` CLI, NBD serving of disks, the control socket
//! of a running VM or server, and checkpoint orchestration.

pub mod bench;
pub mod bench_checkpoint;
pub mod bench_guest;
pub mod bench_merge;
pub mod checkpoint_cmd;
pub mod cli;
pub mod control;
pub mod disk_cmd;
pub mod error;
pub mod machine;
pub mod merge_pace;
pub mod merge_progress;
pub mod merge_worker;
pub mod nbd;
pub mod quiesce;
pub mod run_cmd;
pub mod size;
pub mod sys;
pub mod vm_live;
pub mod vm_ops;
pub mod vm_run;
pub mod vmdir;

pub use error::{Error, Result};
