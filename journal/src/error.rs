//! The journal's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the journal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error")]
    RawIo(#[from] std::io::Error),
    #[error("{0} is not a Strata disk (no strata.json)")]
    NotADisk(PathBuf),
    #[error("{0} already exists")]
    AlreadyExists(PathBuf),
    #[error("disk {0} is in use by another process (locked)")]
    Locked(PathBuf),
    #[error("size {0} is not a positive multiple of 512 bytes")]
    BadSize(u64),
    #[error("offset {offset} or length {len} is not a multiple of 512 bytes")]
    Unaligned { offset: u64, len: u64 },
    #[error(
        "request at offset {offset} length {len} goes past the end of the disk ({size} bytes)"
    )]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the disk view is read-only")]
    ReadOnly,
    #[error("no checkpoint named {0:?}")]
    UnknownCheckpoint(String),
    #[error("a checkpoint named {0:?} already exists")]
    DuplicateName(String),
    #[error(
        "invalid checkpoint name {0:?}: a name is 1 to 100 characters, with no control characters"
    )]
    BadName(String),
    #[error("base image {path}: {why}")]
    BaseChanged { path: PathBuf, why: String },
    #[error("corrupt data in {what}: {why}")]
    Corrupt { what: String, why: String },
    #[error("unsupported format version {0}")]
    Version(u32),
    #[error("writes are in flight; drain them before changing the checkpoint tree")]
    Busy,
    #[error("{0}")]
    Invalid(String),
    #[error("{0} is a symbolic link (refused)")]
    Symlink(PathBuf),
    #[error("{0} is not a regular file")]
    NotRegular(PathBuf),
    #[error("{path} is larger than {limit} bytes")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("the disk's id counter is exhausted (next_id {0}); no more checkpoints or layers can be created")]
    IdsExhausted(u64),
    #[error("merge {job} of disk {disk}: no space left on the device (about {needed} more bytes needed); free space and run it again, or abandon it")]
    NoSpace {
        disk: PathBuf,
        job: u64,
        needed: u64,
    },
    #[error("merge {0} was cancelled (run it again to continue)")]
    MergeCancelled(u64),
    #[error("{view} cannot be read: {why}")]
    Unreadable { view: String, why: String },
}

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The errno that best describes this error to a block device client.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } | Error::RawIo(source) => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            Error::Unaligned { .. } | Error::BadSize(_) | Error::Invalid(_) => libc::EINVAL,
            Error::OutOfRange { .. } | Error::NoSpace { .. } => libc::ENOSPC,
            Error::ReadOnly => libc::EPERM,
            Error::Corrupt { .. } => libc::EIO,
            _ => libc::EIO,
        }
    }
}

/// An error with its causes, on one line ("a: b: c").
pub fn chain(e: &Error) -> String {
    let mut text = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        text.push_str(&format!(": {s}"));
        src = s.source();
    }
    text
}

/// The journal's result type.
pub type Result<T> = std::result::Result<T, Error>;
