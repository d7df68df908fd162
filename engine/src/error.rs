//! The engine's error type.

/// Everything the CLI, server and orchestration can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Journal(#[from] journal::Error),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Protocol(String),
    #[error("{0}")]
    Vm(String),
    #[error("in-flight I/O did not drain within {waited:?} ({in_flight} requests still running)")]
    DrainTimeout {
        waited: std::time::Duration,
        in_flight: u64,
    },
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, Error>;
