//! Byte layouts of the journal's files (see `docs/FORMAT.md`).
//!
//! A layer is two files: `L<id>.data` (4 KiB data blocks, no header) and `L<id>.log` (a
//! 64-byte header followed by 32-byte index records). Every record carries its own CRC32C,
//! seeded with the layer's identity, so a record copied from another layer does not validate.

use crate::{Error, Result};

/// Magic at the start of every log file.
pub const LOG_MAGIC: [u8; 8] = *b"STRATALG";
/// Version of the log format.
pub const LOG_VERSION: u32 = 1;
/// Size of the log header.
pub const LOG_HEADER_SIZE: u64 = 64;
/// Size of one index record.
pub const RECORD_SIZE: usize = 32;
/// `data_block` value of a record that makes a block read as zeros.
pub const ZERO_BLOCK: u64 = u64::MAX;

/// What a record says about one disk block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// The block's data is at `data_block` of the layer's data file, with checksum `crc`.
    Data,
    /// The block reads as zeros (WRITE_ZEROES or discard).
    Zero,
}

/// One decoded index record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub disk_block: u64,
    pub data_block: u64,
    pub crc: u32,
    pub kind: RecordKind,
}

/// The seed that binds records to one layer of one disk.
pub fn record_seed(disk_uuid: u128, layer_id: u64) -> u32 {
    let mut b = [0u8; 24];
    b[..16].copy_from_slice(&disk_uuid.to_le_bytes());
    b[16..].copy_from_slice(&layer_id.to_le_bytes());
    crc32c::crc32c(&b)
}

impl Record {
    /// Encodes the record with its checksum.
    pub fn encode(&self, seed: u32) -> [u8; RECORD_SIZE] {
        let mut b = [0u8; RECORD_SIZE];
        b[0..8].copy_from_slice(&self.disk_block.to_le_bytes());
        b[8..16].copy_from_slice(&self.data_block.to_le_bytes());
        b[16..20].copy_from_slice(&self.crc.to_le_bytes());
        let kind: u32 = match self.kind {
            RecordKind::Data => 1,
            RecordKind::Zero => 2,
        };
        b[20..24].copy_from_slice(&kind.to_le_bytes());
        let sum = crc32c::crc32c_append(seed, &b[..28]);
        b[28..32].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Decodes a record; `None` if its checksum or kind is wrong.
    pub fn decode(b: &[u8], seed: u32) -> Option<Record> {
        if b.len() != RECORD_SIZE {
            return None;
        }
        let sum = u32::from_le_bytes(b[28..32].try_into().ok()?);
        if crc32c::crc32c_append(seed, &b[..28]) != sum {
            return None;
        }
        let kind = match u32::from_le_bytes(b[20..24].try_into().ok()?) {
            1 => RecordKind::Data,
            2 => RecordKind::Zero,
            _ => return None,
        };
        let data_block = u64::from_le_bytes(b[8..16].try_into().ok()?);
        if (kind == RecordKind::Zero) != (data_block == ZERO_BLOCK) {
            return None;
        }
        Some(Record {
            disk_block: u64::from_le_bytes(b[0..8].try_into().ok()?),
            data_block,
            crc: u32::from_le_bytes(b[16..20].try_into().ok()?),
            kind,
        })
    }
}

/// The log file header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogHeader {
    pub disk_uuid: u128,
    pub layer_id: u64,
}

impl LogHeader {
    /// Encodes the 64-byte header.
    pub fn encode(&self) -> [u8; LOG_HEADER_SIZE as usize] {
        let mut b = [0u8; LOG_HEADER_SIZE as usize];
        b[0..8].copy_from_slice(&LOG_MAGIC);
        b[8..12].copy_from_slice(&LOG_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(crate::BLOCK_SIZE as u32).to_le_bytes());
        b[16..32].copy_from_slice(&self.disk_uuid.to_le_bytes());
        b[32..40].copy_from_slice(&self.layer_id.to_le_bytes());
        let sum = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Decodes and validates a header.
    pub fn decode(b: &[u8], what: &str) -> Result<LogHeader> {
        let corrupt = |why: &str| Error::Corrupt {
            what: what.to_string(),
            why: why.to_string(),
        };
        if b.len() < LOG_HEADER_SIZE as usize {
            return Err(corrupt("log header is truncated"));
        }
        if b[0..8] != LOG_MAGIC {
            return Err(corrupt("bad log magic"));
        }
        let sum = u32::from_le_bytes([b[60], b[61], b[62], b[63]]);
        if crc32c::crc32c(&b[..60]) != sum {
            return Err(corrupt("log header checksum mismatch"));
        }
        let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if version != LOG_VERSION {
            return Err(Error::Version(version));
        }
        let block = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        if u64::from(block) != crate::BLOCK_SIZE {
            return Err(corrupt("unsupported block size"));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[32..40]);
        Ok(LogHeader {
            disk_uuid: u128::from_le_bytes(uuid),
            layer_id: u64::from_le_bytes(id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_binding() {
        let seed = record_seed(7, 3);
        let r = Record {
            disk_block: 42,
            data_block: 9,
            crc: 0xdead_beef,
            kind: RecordKind::Data,
        };
        let b = r.encode(seed);
        assert_eq!(Record::decode(&b, seed), Some(r));
        assert_eq!(
            Record::decode(&b, record_seed(7, 4)),
            None,
            "bound to its layer"
        );
        let mut flipped = b;
        flipped[3] ^= 1;
        assert_eq!(Record::decode(&flipped, seed), None);
        let z = Record {
            disk_block: 1,
            data_block: ZERO_BLOCK,
            crc: 0,
            kind: RecordKind::Zero,
        };
        assert_eq!(Record::decode(&z.encode(seed), seed), Some(z));
    }

    #[test]
    fn header_round_trip() {
        let h = LogHeader {
            disk_uuid: 0x1234,
            layer_id: 5,
        };
        let b = h.encode();
        assert_eq!(LogHeader::decode(&b, "x").unwrap(), h);
        let mut bad = b;
        bad[33] ^= 0x40;
        assert!(LogHeader::decode(&bad, "x").is_err());
        assert!(LogHeader::decode(&b[..10], "x").is_err());
    }
}
