//! The `vmm` crate's error type.

use std::path::PathBuf;

/// Everything creating, booting or running a VM can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm (is KVM available and accessible?)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("KVM ioctl {what} failed")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory setup failed: {0}")]
    Memory(String),
    #[error("guest memory access at {addr:#x} failed")]
    GuestMemory {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("cannot read {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel load failed: {0}")]
    KernelLoad(String),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("I/O error: {context}")]
    Io {
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("virtio device error")]
    Device(#[from] block::Error),
    #[error("vCPU {cpu}: {what}")]
    VcpuFault { cpu: usize, what: String },
    #[error("vCPU thread {cpu} panicked")]
    VcpuPanic { cpu: usize },
    #[error(transparent)]
    Envelope(#[from] crate::snapshot::EnvelopeError),
    #[error("invalid machine state: {0}")]
    State(String),
    #[error("cannot capture the machine state: {0}")]
    Capture(String),
    #[error("the VM is not paused")]
    NotPaused,
    #[error("the VM is already paused")]
    AlreadyPaused,
    #[error("the VM is not running (it has ended, or has not started)")]
    NotRunning,
    #[error("vCPU {cpu} did not stop within {waited:?}")]
    PauseTimeout {
        cpu: usize,
        waited: std::time::Duration,
    },
}

impl Error {
    /// Wraps a KVM ioctl error with the name of the ioctl.
    pub fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { what, source }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Io { context, source }
    }
}

/// The `vmm` crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
