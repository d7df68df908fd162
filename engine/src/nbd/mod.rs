//! NBD serving of a disk (`strata disk serve`) and the live checkpoint client
//! (`strata checkpoint ...`).
//!
//! `protocol` parses and encodes the wire format, `handshake` runs option haggling,
//! `connection` serves one client on its own thread and io_uring engine, `server` listens and
//! handles signals. Live checkpoints go through the control socket ([`crate::control`]) and
//! the I/O gate ([`crate::quiesce`]).

pub use block::budget;
pub mod connection;
pub mod handshake;
pub mod protocol;
pub mod server;
pub mod stream;

use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use journal::{Disk, OpenOptions};

use crate::cli::ServeArgs;
use crate::control::{ControlServer, DiskTarget};
use crate::quiesce::Gate;
use crate::sys::{self, SignalFd};
use crate::{Error, Result};
use connection::Export;
use protocol::ExportLimits;
use server::{ListenAddr, Listener};

/// `strata disk serve`: serves Now read-write (or a checkpoint read-only) until SIGINT or
/// SIGTERM, then flushes and exits. The only stdout output is the ready line.
pub fn serve_cmd(args: ServeArgs) -> Result<ExitCode> {
    let addr = ListenAddr::parse(&args.listen)?;
    let serve = args.limits.server_limits()?;
    // Before any thread exists, so that every thread inherits the blocked mask.
    let sigset = sys::block_termination_signals().map_err(|e| Error::io("blocking signals", e))?;
    let signals = SignalFd::new(&sigset).map_err(|e| Error::io("creating a signalfd", e))?;

    let read_only = args.checkpoint.is_some();
    let disk = Disk::open(
        &args.disk,
        OpenOptions {
            cache: args.cache.into(),
            read_only,
        },
    )?;
    let volume = match &args.checkpoint {
        Some(name) => disk.checkpoint_view(name)?,
        None => disk.now(),
    };
    let limits = ExportLimits {
        size: volume.size(),
        read_only: read_only || volume.read_only(),
    };
    let disk = Arc::new(Mutex::new(disk));
    let gate = Gate::new();
    let shutdown = Arc::new(sys::new_eventfd().map_err(|e| Error::io("creating an eventfd", e))?);

    let control = match &args.api {
        Some(path) => {
            let target = DiskTarget::new(disk.clone(), gate.clone(), !limits.read_only);
            Some(ControlServer::start(path, Arc::new(target))?)
        }
        None => None,
    };
    let listener = Listener::bind(&addr)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "strata: serving {} on {}",
        args.disk.display(),
        listener.local_addr()
    )
    .and_then(|()| out.flush())
    .map_err(|e| Error::io("writing the ready line", e))?;
    drop(out);

    let export = Arc::new(Export {
        volume: volume.clone(),
        limits,
        gate,
        shutdown,
        serve,
        budget: budget::MemoryBudget::new(serve.memory_budget),
    });
    let served = server::run(&listener, export, &signals);
    if let Some(c) = control {
        c.stop();
    }
    drop(listener);
    if !limits.read_only {
        volume.flush()?;
    }
    served?;
    Ok(ExitCode::SUCCESS)
}
