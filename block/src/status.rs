//! The one place where errors become the status byte the guest sees.
//!
//! Every request either completes with a status written into its own status byte, or (when the
//! chain has no usable status byte) marks the device as needing a reset. Which status each
//! failure gets is decided here and nowhere else.

use crate::request::RequestError;

/// `VIRTIO_BLK_S_OK`: the request succeeded.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// `VIRTIO_BLK_S_IOERR`: the request failed (bad request or I/O failure).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// `VIRTIO_BLK_S_UNSUPP`: the request type (or one of its flags) is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// A request's guest-visible outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl Status {
    /// The byte written into the request's status descriptor.
    pub fn byte(self) -> u8 {
        match self {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoErr => VIRTIO_BLK_S_IOERR,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP,
        }
    }

    /// Combines the outcomes of the parts of one request: the first failure wins.
    pub fn and(self, other: Status) -> Status {
        if self == Status::Ok {
            other
        } else {
            self
        }
    }
}

/// The status of a request refused while parsing (before any I/O).
pub fn for_request_error(err: &RequestError) -> Status {
    match err {
        RequestError::UnknownType(_)
        | RequestError::FeatureNotNegotiated(_)
        | RequestError::UnsupportedFlags { .. } => Status::Unsupp,
        RequestError::NoDescriptors
        | RequestError::BrokenChain
        | RequestError::TooManyDescriptors(_)
        | RequestError::OutsideGuestMemory { .. }
        | RequestError::ReadableAfterWritable
        | RequestError::NoStatusByte
        | RequestError::HeaderTooShort(_)
        | RequestError::UnexpectedReadableData { .. }
        | RequestError::UnexpectedWritableData { .. }
        | RequestError::MissingData
        | RequestError::Unaligned(_)
        | RequestError::TooLarge { .. }
        | RequestError::OutOfRange { .. }
        | RequestError::ReadOnly
        | RequestError::BadSegmentList(_)
        | RequestError::TooManySegments { .. }
        | RequestError::SegmentTooLarge { .. }
        | RequestError::GuestMemory => Status::IoErr,
    }
}

/// The status of a request the journal failed. Every journal failure is an I/O error to the
/// guest: virtio-blk has no finer-grained status, and the journal already refuses what the
/// parser should have caught (unaligned, out of range, read-only) with errors of its own.
pub fn for_journal_error(err: &journal::Error) -> Status {
    tracing::debug!(error = %err, errno = err.errno(), "journal request failed");
    Status::IoErr
}

/// The status of a request whose data could not be copied to or from guest memory after it
/// was parsed (the guest changed its memory map under an in-flight request).
pub fn for_guest_memory_error(err: &vm_memory::GuestMemoryError) -> Status {
    tracing::debug!(error = %err, "guest memory access failed");
    Status::IoErr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_match_the_spec() {
        assert_eq!(Status::Ok.byte(), 0);
        assert_eq!(Status::IoErr.byte(), 1);
        assert_eq!(Status::Unsupp.byte(), 2);
    }

    #[test]
    fn first_failure_wins() {
        assert_eq!(Status::Ok.and(Status::Ok), Status::Ok);
        assert_eq!(Status::Ok.and(Status::IoErr), Status::IoErr);
        assert_eq!(Status::Unsupp.and(Status::IoErr), Status::Unsupp);
    }

    #[test]
    fn unknown_types_are_unsupported_and_bad_requests_are_io_errors() {
        assert_eq!(
            for_request_error(&RequestError::UnknownType(99)),
            Status::Unsupp
        );
        assert_eq!(for_request_error(&RequestError::ReadOnly), Status::IoErr);
        assert_eq!(for_journal_error(&journal::Error::ReadOnly), Status::IoErr);
    }
}
