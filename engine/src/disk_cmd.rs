//! `strata disk ...`: offline operations on a disk directory.

use std::process::ExitCode;

use crate::cli::DiskCommand;
use crate::Result;

/// Runs one offline disk command.
pub fn run(_cmd: DiskCommand) -> Result<ExitCode> {
    Err(crate::Error::Usage("not yet implemented".into()))
}
