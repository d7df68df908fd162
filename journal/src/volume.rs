//! A view of a disk at one point of the tree: Now (writable) or a checkpoint (read-only).
#![allow(unused)]

use crate::Result;

/// A readable (and, for Now, writable) view. All methods take `&self` and are thread-safe.
/// Offsets and lengths must be multiples of 512 bytes; any length is accepted.
pub struct Volume {}

impl Volume {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        todo!()
    }

    /// True for checkpoint views and disks opened read-only.
    pub fn read_only(&self) -> bool {
        todo!()
    }

    /// Reads `buf.len()` bytes at `offset`. A damaged block fails with `Error::Corrupt`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        todo!()
    }

    /// Writes `data` at `offset`; with `fua` the data is durable on return.
    pub fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        todo!()
    }

    /// Makes `len` bytes at `offset` read as zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        todo!()
    }

    /// Discards `len` bytes at `offset` (they then read as zeros in this view only).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        todo!()
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        todo!()
    }
}
