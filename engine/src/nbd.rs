//! NBD serving of a disk (`strata disk serve`) and the live checkpoint client.

use std::process::ExitCode;

use crate::cli::{CheckpointCommand, ServeArgs};
use crate::Result;

/// `strata disk serve`.
pub fn serve_cmd(_args: ServeArgs) -> Result<ExitCode> {
    Err(crate::Error::Usage("not yet implemented".into()))
}

/// `strata checkpoint ...`.
pub fn checkpoint_cmd(_cmd: CheckpointCommand) -> Result<ExitCode> {
    Err(crate::Error::Usage("not yet implemented".into()))
}
