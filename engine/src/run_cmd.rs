//! `strata run`: boot a VM.

use std::process::ExitCode;

use crate::cli::RunArgs;
use crate::Result;

/// `strata run`.
pub fn run(_args: RunArgs) -> Result<ExitCode> {
    Err(crate::Error::Usage("not yet implemented".into()))
}
