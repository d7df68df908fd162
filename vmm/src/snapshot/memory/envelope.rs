//! The checkpoint envelope (layout in docs/FORMAT.md, shared with the machine-state files):
//! magic, format version, kind, VM uuid, payload length, payload CRC32C, header CRC32C, then
//! the payload. Everything is checked before the payload is looked at.
//!
//! Helper S writes the shared `snapshot/envelope.rs` to the same layout in parallel; this copy
//! keeps the memory images independent until the lead unifies them.

use super::{Error, Result};
use crate::snapshot::Identity;

/// `b"STRATAVM"`.
pub const MAGIC: [u8; 8] = *b"STRATAVM";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Kind of a memory image header.
pub const KIND_MEMORY_IMAGE: u32 = 2;
/// Bytes of the envelope header.
pub const HEADER_LEN: usize = 48;

/// Seals `payload` into an envelope of `kind` for `id`.
pub fn seal(kind: u32, id: &Identity, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&id.vm_uuid);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let hcrc = crc32c::crc32c(&out);
    out.extend_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks the envelope header in `head` (at least [`HEADER_LEN`] bytes) and returns the
/// payload length, which the caller has checked against `max_payload` and `file_len`.
pub fn check_header(
    kind: u32,
    id: &Identity,
    head: &[u8],
    max_payload: u64,
    file_len: u64,
) -> Result<u64> {
    if head.len() < HEADER_LEN {
        return Err(Error::Truncated {
            expected: HEADER_LEN as u64,
            actual: head.len() as u64,
        });
    }
    if head[..8] != MAGIC {
        return Err(Error::NotAnImage);
    }
    let stored = u32::from_le_bytes(head[44..48].try_into().expect("4 bytes"));
    if crc32c::crc32c(&head[..44]) != stored {
        return Err(Error::Checksum("envelope header"));
    }
    let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(Error::Version { found: version });
    }
    let found = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
    if found != kind {
        return Err(Error::Kind { found });
    }
    if head[16..32] != id.vm_uuid {
        return Err(Error::ForeignVm);
    }
    let len = u64::from_le_bytes(head[32..40].try_into().expect("8 bytes"));
    if len > max_payload {
        return Err(Error::Damaged(format!(
            "header says {len} payload bytes, at most {max_payload} fit this memory size"
        )));
    }
    let need = len
        .checked_add(HEADER_LEN as u64)
        .ok_or_else(|| Error::Damaged("payload length overflows".into()))?;
    if need > file_len {
        return Err(Error::Truncated {
            expected: need,
            actual: file_len,
        });
    }
    Ok(len)
}

/// Checks the payload CRC of an envelope whose header passed [`check_header`].
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
