//! Feature bits and the virtio-blk configuration space (`struct virtio_blk_config`).
//!
//! Geometry choice: the logical block size is 512 bytes (`blk_size`), so every guest tool
//! and boot loader works, while the topology hints (`physical_block_exp` = 3, `min_io_size`
//! = 8 logical blocks, `discard_sector_alignment` = 8) tell the guest that the journal's
//! 4 KiB block is the unit it should prefer: Linux then aligns partitions, file systems and
//! discards to 4 KiB, and the journal never has to read-modify-write a partial block for them.

use crate::request::{Limits, HEADER_LEN};

/// Size of the one virtqueue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request (`seg_max`).
pub const SEG_MAX: u32 = 128;
/// Bytes per data segment (`size_max`).
pub const SIZE_MAX: u32 = 64 * 1024;
/// Data bytes of one IN/OUT request: what `seg_max` x `size_max` lets a driver send, and the
/// most the device allocates for one request.
pub const MAX_DATA_BYTES: u32 = SEG_MAX * SIZE_MAX;
/// Data buffers held for requests in flight, summed over all of them.
pub const MAX_BUFFER_BYTES: u64 = 64 << 20;
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
pub const MAX_DISCARD_SEG: u32 = 32;
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 22;
pub const MAX_WRITE_ZEROES_SEG: u32 = 32;
/// 4 KiB physical blocks: 512 << 3.
pub const PHYSICAL_BLOCK_EXP: u8 = 3;
/// 4 KiB in 512-byte logical blocks.
pub const MIN_IO_SIZE: u16 = 8;
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Size of the configuration space we expose (through `write_zeroes_may_unmap` and padding).
pub const CONFIG_LEN: usize = 60;

/// Bit `b` as a feature mask.
pub const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Features offered for a disk (`read_only` adds RO and drops DISCARD / WRITE_ZEROES).
pub fn avail_features(read_only: bool) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_FLUSH);
    if read_only {
        f |= bit(VIRTIO_BLK_F_RO);
    } else {
        f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
    }
    f
}

/// The configuration space of a disk of `capacity` bytes.
pub fn config_space(capacity: u64) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &(capacity / journal::SECTOR_SIZE).to_le_bytes());
    put(8, &SIZE_MAX.to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    // 16..20: geometry (not offered).
    put(20, &(journal::SECTOR_SIZE as u32).to_le_bytes());
    put(24, &[PHYSICAL_BLOCK_EXP, 0]);
    put(26, &MIN_IO_SIZE.to_le_bytes());
    // 28..32: opt_io_size = 0 (not reported); 32..36: writeback, unused, num_queues.
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &MAX_DISCARD_SEG.to_le_bytes());
    put(44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
    put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
    put(52, &MAX_WRITE_ZEROES_SEG.to_le_bytes());
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

/// The request limits for a disk and the features the driver accepted.
pub fn limits(capacity: u64, read_only: bool, acked: u64) -> Limits {
    let has = |b: u32| acked & bit(b) != 0;
    Limits {
        capacity,
        read_only,
        max_descriptors: (SEG_MAX + 2) as u16,
        max_data_bytes: MAX_DATA_BYTES,
        flush: has(VIRTIO_BLK_F_FLUSH),
        discard: has(VIRTIO_BLK_F_DISCARD) && !read_only,
        write_zeroes: has(VIRTIO_BLK_F_WRITE_ZEROES) && !read_only,
        max_discard_sectors: MAX_DISCARD_SECTORS,
        max_discard_seg: MAX_DISCARD_SEG,
        max_write_zeroes_sectors: MAX_WRITE_ZEROES_SECTORS,
        max_write_zeroes_seg: MAX_WRITE_ZEROES_SEG,
    }
}

const _: () = assert!(HEADER_LEN == 16);
const _: () = assert!(MAX_DISCARD_SEG as u64 <= QUEUE_SIZE as u64);

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(c: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([c[off], c[off + 1], c[off + 2], c[off + 3]])
    }

    #[test]
    fn layout_matches_virtio_blk_config() {
        let c = config_space(1 << 30);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap_or_default()),
            (1 << 30) / 512
        );
        assert_eq!(u32_at(&c, 8), SIZE_MAX);
        assert_eq!(u32_at(&c, 12), SEG_MAX);
        assert_eq!(u32_at(&c, 20), 512);
        assert_eq!(c[24], 3);
        assert_eq!(u16::from_le_bytes([c[26], c[27]]), 8);
        assert_eq!(u32_at(&c, 36), MAX_DISCARD_SECTORS);
        assert_eq!(u32_at(&c, 40), MAX_DISCARD_SEG);
        assert_eq!(u32_at(&c, 44), 8);
        assert_eq!(u32_at(&c, 48), MAX_WRITE_ZEROES_SECTORS);
        assert_eq!(u32_at(&c, 52), MAX_WRITE_ZEROES_SEG);
        assert_eq!(c[56], 1);
    }

    #[test]
    fn read_only_disks_offer_ro_and_no_discard() {
        let ro = avail_features(true);
        assert_ne!(ro & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro & bit(VIRTIO_BLK_F_DISCARD), 0);
        let rw = avail_features(false);
        assert_eq!(rw & bit(VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_ne!(rw & bit(VIRTIO_F_VERSION_1), 0);
        let l = limits(4096, false, bit(VIRTIO_BLK_F_FLUSH));
        assert!(l.flush && !l.discard && !l.write_zeroes);
    }
}
