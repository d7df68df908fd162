//! The container of every VM state file (and of the memory image header): a fixed 48-byte
//! header (magic, format version, kind, VM uuid, payload length, payload CRC32C, header CRC32C)
//! followed by the payload. See docs/FORMAT.md, "VM state envelope".
//!
//! A file is untrusted: [`open`] checks the magic, version, header checksum, kind, VM identity
//! and that the payload length fits both the per-kind cap and the bytes actually present before
//! it looks at a single payload byte, and then the payload checksum. Each failure is a distinct
//! [`EnvelopeError`] with one clear line.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::Identity;

/// First bytes of every Strata VM state file.
pub const MAGIC: [u8; 8] = *b"STRATAVM";
/// The envelope format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 48;
/// Byte offset of the header CRC32C (it covers every header byte before it).
const HEADER_CRC_AT: usize = 44;

/// What a state file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// vCPU, VM and device state ([`super::MachineState`]).
    MachineState,
    /// The header of a memory image (helper M's format).
    MemoryImage,
}

impl Kind {
    /// The kind's number in the header.
    pub fn code(self) -> u32 {
        match self {
            Kind::MachineState => 1,
            Kind::MemoryImage => 2,
        }
    }

    /// A name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::MachineState => "machine state",
            Kind::MemoryImage => "memory image",
        }
    }
}

/// Why a state file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("not a Strata state file (bad magic)")]
    NotAStateFile,
    #[error("state file format version {found}, this build reads {FORMAT_VERSION}")]
    Version { found: u32 },
    #[error("state file header is damaged (header checksum mismatch)")]
    HeaderChecksum,
    #[error("state file holds kind {found}, expected {expected} ({name})")]
    WrongKind {
        found: u32,
        expected: u32,
        name: &'static str,
    },
    #[error("state file from another VM (uuid {found}, this VM is {expected})")]
    ForeignVm { found: String, expected: String },
    #[error("state file payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    #[error("truncated: header says {expected} bytes, file has {actual}")]
    Truncated { expected: u64, actual: u64 },
    #[error("state file has {extra} unexpected bytes after its payload")]
    TrailingBytes { extra: u64 },
    #[error("state file payload is damaged (checksum mismatch)")]
    Checksum,
    #[error("{path}: not a regular file")]
    NotRegular { path: String },
}

/// Seals `payload` in an envelope of `kind` for the VM `identity`.
pub fn seal(kind: Kind, identity: &Identity, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&kind.code().to_le_bytes());
    out.extend_from_slice(&identity.vm_uuid);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let header_crc = crc32c::crc32c(&out[..HEADER_CRC_AT]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    debug_assert_eq!(out.len(), HEADER_LEN);
    out.extend_from_slice(payload);
    out
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(raw)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(raw)
}

/// A checked header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub payload_len: u64,
    pub payload_crc: u32,
}

/// Checks the header at the start of `bytes` (which must hold at least [`HEADER_LEN`] bytes,
/// else the file is truncated), and that the payload length is at most `max_payload`.
pub fn check_header(
    kind: Kind,
    identity: &Identity,
    bytes: &[u8],
    max_payload: u64,
) -> Result<Header, EnvelopeError> {
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(EnvelopeError::NotAStateFile);
    }
    if bytes.len() < HEADER_LEN {
        return Err(EnvelopeError::Truncated {
            expected: HEADER_LEN as u64,
            actual: bytes.len() as u64,
        });
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(EnvelopeError::Version { found: version });
    }
    if crc32c::crc32c(&bytes[..HEADER_CRC_AT]) != u32_at(bytes, HEADER_CRC_AT) {
        return Err(EnvelopeError::HeaderChecksum);
    }
    let found_kind = u32_at(bytes, 12);
    if found_kind != kind.code() {
        return Err(EnvelopeError::WrongKind {
            found: found_kind,
            expected: kind.code(),
            name: kind.name(),
        });
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&bytes[16..32]);
    if uuid != identity.vm_uuid {
        return Err(EnvelopeError::ForeignVm {
            found: super::uuid_text(&uuid),
            expected: identity.uuid_text(),
        });
    }
    let payload_len = u64_at(bytes, 32);
    if payload_len > max_payload {
        return Err(EnvelopeError::TooLarge {
            len: payload_len,
            max: max_payload,
        });
    }
    Ok(Header {
        payload_len,
        payload_crc: u32_at(bytes, 40),
    })
}

/// Opens an envelope held in `bytes`: every header check, then the length and the payload
/// checksum. Returns the payload.
pub fn open<'a>(
    kind: Kind,
    identity: &Identity,
    bytes: &'a [u8],
    max_payload: u64,
) -> Result<&'a [u8], EnvelopeError> {
    let header = check_header(kind, identity, bytes, max_payload)?;
    let have = (bytes.len() - HEADER_LEN) as u64;
    let total = header.payload_len.saturating_add(HEADER_LEN as u64);
    if have < header.payload_len {
        return Err(EnvelopeError::Truncated {
            expected: total,
            actual: bytes.len() as u64,
        });
    }
    if have > header.payload_len {
        return Err(EnvelopeError::TrailingBytes {
            extra: have - header.payload_len,
        });
    }
    let payload = &bytes[HEADER_LEN..];
    if crc32c::crc32c(payload) != header.payload_crc {
        return Err(EnvelopeError::Checksum);
    }
    Ok(payload)
}

/// Reads and opens the state file at `path`: it must be a regular file (symlinks are not
/// followed), and no more than the header plus `max_payload` bytes are ever read.
pub fn read_file(
    path: &Path,
    kind: Kind,
    identity: &Identity,
    max_payload: u64,
) -> crate::Result<Vec<u8>> {
    let ctx = |source| crate::Error::ReadFile {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(ctx)?;
    let meta = file.metadata().map_err(ctx)?;
    if !meta.file_type().is_file() {
        return Err(EnvelopeError::NotRegular {
            path: path.display().to_string(),
        }
        .into());
    }
    let cap = max_payload.saturating_add(HEADER_LEN as u64);
    // Read at most one byte more than allowed, so an oversized file is seen as such.
    let limit = meta.size().min(cap.saturating_add(1));
    let mut bytes = Vec::with_capacity(usize::try_from(limit).unwrap_or(0));
    (&mut file)
        .take(limit)
        .read_to_end(&mut bytes)
        .map_err(ctx)?;
    let header = check_header(kind, identity, &bytes, max_payload)?;
    if meta.size() > cap {
        // The header's length is within the cap, so the file has bytes past its payload.
        return Err(EnvelopeError::TrailingBytes {
            extra: meta.size() - HEADER_LEN as u64 - header.payload_len,
        }
        .into());
    }
    let payload = open(kind, identity, &bytes, max_payload)?;
    Ok(payload.to_vec())
}

/// Writes an envelope of `payload` to `path` atomically: a temporary file beside it is
/// written, synced and renamed over `path`, and the directory is synced, so a crash leaves
/// either the old file or the complete new one.
pub fn write_file(
    path: &Path,
    kind: Kind,
    identity: &Identity,
    payload: &[u8],
) -> crate::Result<()> {
    let bytes = seal(kind, identity, payload);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| crate::Error::Config(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let io = crate::Error::io;
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io("creating a state file"))?;
        f.write_all(&bytes).map_err(io("writing a state file"))?;
        f.sync_all().map_err(io("syncing a state file"))?;
        std::fs::rename(&tmp, path).map_err(io("renaming a state file into place"))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing the state file's directory"))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> Identity {
        Identity {
            vm_uuid: [b; 16],
            mem_size: 64 << 20,
        }
    }

    fn reseal_header(bytes: &mut [u8]) {
        let crc = crc32c::crc32c(&bytes[..HEADER_CRC_AT]);
        bytes[HEADER_CRC_AT..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn round_trip() {
        let sealed = seal(Kind::MachineState, &id(1), b"hello");
        assert_eq!(sealed.len(), HEADER_LEN + 5);
        assert_eq!(
            open(Kind::MachineState, &id(1), &sealed, 100),
            Ok(&b"hello"[..])
        );
        let empty = seal(Kind::MemoryImage, &id(1), b"");
        assert_eq!(open(Kind::MemoryImage, &id(1), &empty, 0), Ok(&b""[..]));
    }

    #[test]
    fn every_damage_has_its_own_error() {
        let good = seal(Kind::MachineState, &id(1), b"payload bytes");
        fn open1(b: &[u8]) -> Result<&[u8], EnvelopeError> {
            open(Kind::MachineState, &id(1), b, 1 << 20)
        }

        assert_eq!(
            open1(b"garbage!garbage!"),
            Err(EnvelopeError::NotAStateFile)
        );
        assert_eq!(open1(b""), Err(EnvelopeError::NotAStateFile));

        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x01;
        assert_eq!(open1(&flipped), Err(EnvelopeError::Checksum));

        let mut header_flip = good.clone();
        header_flip[33] ^= 0x80; // payload length
        assert_eq!(open1(&header_flip), Err(EnvelopeError::HeaderChecksum));

        assert_eq!(
            open1(&good[..good.len() - 3]),
            Err(EnvelopeError::Truncated {
                expected: good.len() as u64,
                actual: good.len() as u64 - 3
            })
        );
        assert_eq!(
            open1(&good[..20]),
            Err(EnvelopeError::Truncated {
                expected: HEADER_LEN as u64,
                actual: 20
            })
        );
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(
            open1(&longer),
            Err(EnvelopeError::TrailingBytes { extra: 1 })
        );

        let other = seal(Kind::MachineState, &id(2), b"payload bytes");
        assert!(matches!(
            open1(&other),
            Err(EnvelopeError::ForeignVm { .. })
        ));
        let msg = open1(&other).unwrap_err().to_string();
        assert!(msg.contains("another VM"), "{msg}");

        let mut v7 = good.clone();
        v7[8..12].copy_from_slice(&7u32.to_le_bytes());
        reseal_header(&mut v7);
        assert_eq!(open1(&v7), Err(EnvelopeError::Version { found: 7 }));
        assert_eq!(
            open1(&v7).unwrap_err().to_string(),
            "state file format version 7, this build reads 1"
        );

        let mem = seal(Kind::MemoryImage, &id(1), b"payload bytes");
        assert!(matches!(
            open1(&mem),
            Err(EnvelopeError::WrongKind { found: 2, .. })
        ));

        // A header claiming a huge payload is refused on the cap before anything else.
        let mut huge = good.clone();
        huge[32..40].copy_from_slice(&(1u64 << 40).to_le_bytes());
        reseal_header(&mut huge);
        assert_eq!(
            open1(&huge),
            Err(EnvelopeError::TooLarge {
                len: 1 << 40,
                max: 1 << 20
            })
        );
    }

    #[test]
    fn files_are_written_atomically_and_read_with_caps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        write_file(&path, Kind::MachineState, &id(3), b"abc").unwrap();
        assert_eq!(
            read_file(&path, Kind::MachineState, &id(3), 10).unwrap(),
            b"abc"
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
        // Over the cap: refused from the header alone.
        let err = read_file(&path, Kind::MachineState, &id(3), 2).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
        // A symlink is not followed; a directory is not a state file.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(read_file(&link, Kind::MachineState, &id(3), 10).is_err());
        let err = read_file(dir.path(), Kind::MachineState, &id(3), 10).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        // A big file with a small valid header: trailing bytes, read no further than the cap.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&vec![0u8; 4096]).unwrap();
        let err = read_file(&path, Kind::MachineState, &id(3), 10).unwrap_err();
        assert!(err.to_string().contains("unexpected bytes"), "{err}");
    }
}
