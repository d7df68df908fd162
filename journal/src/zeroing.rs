//! Which whole blocks of a WRITE_ZEROES or discard need a zero record: only those that do
//! not already read as zeros, so discarding never-written space writes nothing.
//!
//! A block already reads as zeros when the view's index maps it to a zero record (in any
//! layer), or when no layer wrote it and the base image has a hole there (or there is no
//! base, or the block lies past its end). The base is asked with `SEEK_DATA`/`SEEK_HOLE`
//! (metadata only): a base block that is allocated but holds zeros still gets a record,
//! since telling would cost reading it. A block of a layer with damaged records always gets
//! one (its version is unknown; the zero record makes it readable again).

use std::os::fd::AsRawFd;

use crate::base::BaseImage;
use crate::format::ZERO_BLOCK;
use crate::index::{Index, Loc};
use crate::volume::Run;
use crate::BLOCK_SIZE;

/// The runs of `[first, end)` that need a zero record, in block order.
pub(crate) fn zero_runs(
    index: &Index,
    damaged_upto: Option<u16>,
    base: Option<&BaseImage>,
    first: u64,
    end: u64,
) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    let mut push = |b: u64| match runs.last_mut() {
        Some(r) if r.first_block + r.nblocks == b => r.nblocks += 1,
        _ => runs.push(Run {
            first_block: b,
            nblocks: 1,
            buf_off: None,
        }),
    };
    let extents = base.map_or_else(Vec::new, |b| base_data(b, first, end));
    let needs = |loc: Option<Loc>, in_base: bool| {
        if let Some(d) = damaged_upto {
            if loc.is_none_or(|l| l.ordinal <= d) {
                return true;
            }
        }
        match loc {
            Some(l) => l.data_block != ZERO_BLOCK,
            None => in_base,
        }
    };
    if damaged_upto.is_some() || index.len() as u64 >= end - first {
        let mut ext = extents.iter().peekable();
        for b in first..end {
            while ext.next_if(|&&(_, e)| e <= b).is_some() {}
            let in_base = ext.peek().is_some_and(|&&(s, _)| s <= b);
            if needs(index.get(b), in_base) {
                push(b);
            }
        }
    } else {
        // Fewer written blocks than blocks in the range: walk the index instead.
        let mut blocks: Vec<u64> = index
            .iter()
            .filter(|&(b, l)| b >= first && b < end && l.data_block != ZERO_BLOCK)
            .map(|(b, _)| b)
            .collect();
        for &(s, e) in &extents {
            blocks.extend((s..e).filter(|&b| index.get(b).is_none()));
        }
        blocks.sort_unstable();
        for b in blocks {
            push(b);
        }
    }
    runs
}

/// Block ranges of `[first, end)` where the base image has data (clipped to the range).
fn base_data(base: &BaseImage, first: u64, end: u64) -> Vec<(u64, u64)> {
    let base_end = base.size.div_ceil(BLOCK_SIZE).min(end);
    let mut out = Vec::new();
    let mut pos = first;
    while pos < base_end {
        let Some(data) = seek(base, pos * BLOCK_SIZE, libc::SEEK_DATA) else {
            // Cannot tell (or an error): count the rest as data.
            out.push((pos, base_end));
            break;
        };
        if data == u64::MAX || data >= base.size {
            break; // No data past `pos`.
        }
        let hole = seek(base, data, libc::SEEK_HOLE).unwrap_or(base.size);
        let s = (data / BLOCK_SIZE).max(pos);
        let e = hole.div_ceil(BLOCK_SIZE).min(base_end);
        if e <= s {
            break;
        }
        out.push((s, e));
        pos = e;
    }
    out
}

/// `lseek(fd, off, whence)`; `Some(u64::MAX)` for ENXIO (no data past `off`), `None` for
/// any other failure.
fn seek(base: &BaseImage, off: u64, whence: i32) -> Option<u64> {
    let off = i64::try_from(off).ok()?;
    // SAFETY: lseek only reads its integer arguments; the fd is valid while `base` lives.
    // The base file is only read with positional I/O, so moving its offset disturbs nothing.
    let r = unsafe { libc::lseek(base.file.as_raw_fd(), off, whence) };
    if r >= 0 {
        return u64::try_from(r).ok();
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ENXIO) => Some(u64::MAX),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::CacheMode;
    use std::os::unix::fs::FileExt;

    fn loc(ordinal: u16, data_block: u64) -> Loc {
        Loc {
            ordinal,
            data_block,
            crc: 0,
        }
    }

    fn spans(runs: &[Run]) -> Vec<(u64, u64)> {
        runs.iter().map(|r| (r.first_block, r.nblocks)).collect()
    }

    #[test]
    fn only_blocks_that_hold_data_get_records() {
        let mut idx = Index::default();
        idx.insert(5, loc(0, 1));
        idx.insert(6, loc(0, 2));
        idx.insert(7, loc(1, ZERO_BLOCK));
        idx.insert(9, loc(0, 3));
        idx.insert(1 << 30, loc(0, 4));
        // Both walks (by block, and by index entry) agree.
        assert_eq!(
            spans(&zero_runs(&idx, None, None, 0, 1 << 24)),
            [(5, 2), (9, 1)]
        );
        assert_eq!(spans(&zero_runs(&idx, None, None, 6, 10)), [(6, 1), (9, 1)]);
        assert!(zero_runs(&idx, None, None, 10, 1 << 20).is_empty());
        // Damaged layer 0: its blocks and unwritten ones need records, layer 1's zero not.
        assert_eq!(
            spans(&zero_runs(&idx, Some(0), None, 4, 10)),
            [(4, 3), (8, 2)]
        );
    }

    #[test]
    fn base_holes_read_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("base.raw");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 10 << 20).unwrap();
        f.sync_all().unwrap();
        let base = BaseImage::open(&p, CacheMode::Writeback).unwrap();
        let mut idx = Index::default();
        idx.insert(2560, loc(0, ZERO_BLOCK));
        let runs = zero_runs(&idx, None, Some(&base), 0, 1 << 15);
        // The allocated extent holds block 2560 (10 MiB); the filesystem may allocate a
        // little more around it, but never the whole image.
        let total: u64 = runs.iter().map(|r| r.nblocks).sum();
        assert!(total < 1024, "{:?}", spans(&runs));
        assert!(runs.iter().all(|r| r.first_block + r.nblocks <= 4096));
        assert!(
            runs.iter()
                .all(|r| !(r.first_block..r.first_block + r.nblocks).contains(&2560)),
            "a zero record in the index wins over base data"
        );
        idx.insert(2560, loc(0, 7));
        let runs = zero_runs(&idx, None, Some(&base), 2500, 2600);
        assert!(runs
            .iter()
            .any(|r| (r.first_block..r.first_block + r.nblocks).contains(&2560)));
    }
}
