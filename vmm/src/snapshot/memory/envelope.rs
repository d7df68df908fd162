//! The checkpoint envelope of memory images: the shared `snapshot::envelope` (layout in
//! docs/FORMAT.md), with this module's errors. Everything is checked before the payload is
//! looked at.

use super::{Error, Result};
use crate::snapshot::envelope::{self as shared, EnvelopeError, Kind};
use crate::snapshot::Identity;

/// Kind of a memory image header.
pub const KIND_MEMORY_IMAGE: u32 = 2;
/// Bytes of the envelope header.
pub const HEADER_LEN: usize = shared::HEADER_LEN;

fn kind_of(code: u32) -> Kind {
    if code == Kind::MachineState.code() {
        Kind::MachineState
    } else {
        Kind::MemoryImage
    }
}

/// Seals `payload` into an envelope of `kind` for `id`.
pub fn seal(kind: u32, id: &Identity, payload: &[u8]) -> Vec<u8> {
    shared::seal(kind_of(kind), id, payload)
}

/// Checks an envelope header read from the start of a file of `file_len` bytes; returns the
/// payload length.
pub fn check_header(
    kind: u32,
    id: &Identity,
    head: &[u8],
    max_payload: u64,
    file_len: u64,
) -> Result<u64> {
    let h = shared::check_header(kind_of(kind), id, head, max_payload).map_err(|e| match e {
        EnvelopeError::NotAStateFile => Error::NotAnImage,
        EnvelopeError::Version { found } => Error::Version { found },
        EnvelopeError::HeaderChecksum => Error::Checksum("envelope header"),
        EnvelopeError::WrongKind { found, .. } => Error::Kind { found },
        EnvelopeError::ForeignVm { .. } => Error::ForeignVm,
        EnvelopeError::TooLarge { len, max } => Error::Damaged(format!(
            "header says {len} payload bytes, at most {max} fit this memory size"
        )),
        EnvelopeError::Truncated { expected, actual } => Error::Truncated { expected, actual },
        other => Error::Damaged(other.to_string()),
    })?;
    let need = h
        .payload_len
        .checked_add(HEADER_LEN as u64)
        .ok_or_else(|| Error::Damaged("payload length overflows".into()))?;
    if need > file_len {
        return Err(Error::Truncated {
            expected: need,
            actual: file_len,
        });
    }
    Ok(h.payload_len)
}

/// Checks the payload against the header's checksum.
pub fn check_payload(head: &[u8], payload: &[u8]) -> Result<()> {
    let stored = u32::from_le_bytes(head[40..44].try_into().expect("4 bytes"));
    if crc32c::crc32c(payload) != stored {
        return Err(Error::Checksum("image metadata"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: Identity = Identity {
        vm_uuid: [7; 16],
        mem_size: 1 << 24,
    };

    #[test]
    fn round_trip_and_every_field_checked() {
        let sealed = seal(KIND_MEMORY_IMAGE, &ID, b"payload");
        let len = check_header(KIND_MEMORY_IMAGE, &ID, &sealed, 100, sealed.len() as u64).unwrap();
        assert_eq!(len, 7);
        check_payload(&sealed, &sealed[HEADER_LEN..]).unwrap();

        let other = Identity {
            vm_uuid: [8; 16],
            ..ID
        };
        let n = sealed.len() as u64;
        assert!(matches!(
            check_header(KIND_MEMORY_IMAGE, &other, &sealed, 100, n),
            Err(Error::ForeignVm)
        ));
        assert!(matches!(
            check_header(1, &ID, &sealed, 100, n),
            Err(Error::Kind { found: 2 })
        ));
        assert!(matches!(
            check_header(KIND_MEMORY_IMAGE, &ID, &sealed, 6, n),
            Err(Error::Damaged(_))
        ));
        assert!(matches!(
            check_header(KIND_MEMORY_IMAGE, &ID, &sealed, 100, n - 1),
            Err(Error::Truncated { .. })
        ));
        let mut bad = sealed.clone();
        bad[0] = b'X';
        assert!(matches!(
            check_header(KIND_MEMORY_IMAGE, &ID, &bad, 100, n),
            Err(Error::NotAnImage)
        ));
        let mut bad = sealed.clone();
        bad[33] ^= 1;
        assert!(matches!(
            check_header(KIND_MEMORY_IMAGE, &ID, &bad, 100, n),
            Err(Error::Checksum(_))
        ));
        let mut bad = sealed.clone();
        bad[8] = 9;
        let c = crc32c::crc32c(&bad[..44]);
        bad[44..48].copy_from_slice(&c.to_le_bytes());
        assert!(matches!(
            check_header(KIND_MEMORY_IMAGE, &ID, &bad, 100, n),
            Err(Error::Version { found: 9 })
        ));
        let mut bad = sealed;
        bad[HEADER_LEN] ^= 1;
        assert!(check_payload(&bad, &bad[HEADER_LEN..]).is_err());
    }
}
