//! The composition of a run of layers: the newest version of every block, and what a merge
//! must copy and record to hold it in one layer.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::format::{Record, RecordKind, ZERO_BLOCK};
use crate::layer::LayerFiles;
use crate::{Error, Result, BLOCK_SIZE};

use super::copy::CopyItem;

/// What a merge writes, and where every block of the run ends up.
pub(crate) struct Composition {
    /// Blocks to copy, in output order: item `i` goes to data block `out_first + i`.
    pub copies: Vec<CopyItem>,
    pub out_first: u64,
    /// Records to append to the output log at `log_at`, one per block (disk order).
    pub records: Vec<Record>,
    pub log_at: u64,
    /// (disk block, data block or ZERO_BLOCK, crc) of every block the merged layer defines,
    /// sorted by disk block.
    pub map: Vec<(u64, u64, u32)>,
    /// Data blocks of the absorbing layer that nothing references after the swap.
    pub unreferenced: Vec<u64>,
}

#[derive(Clone, Copy)]
struct Newest {
    src: u32,
    data_block: u64,
    crc: u32,
    zero: bool,
}

fn damaged(lf: &LayerFiles, why: String) -> Error {
    Error::Corrupt {
        what: lf.log_path.display().to_string(),
        why: format!("{why}; the merge stops (run `strata disk check`)"),
    }
}

/// Where an absorbing merge puts the blocks it appends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AppendOrder {
    /// Sorted by disk block (a new layer's output: restores locality).
    Disk,
    /// In the order of their source layers' data files (an existing layer absorbing: reads
    /// and appends sequentially, see [`append_in_source_order`]).
    Source,
}

/// Composes `run` (oldest first). `absorber` is the index of the run layer that receives
/// the others' blocks, or None for a new layer (always in disk order); `order` places
/// what an absorber appends. A zero record is kept only where it hides
/// something: a block of the base, a block some layer `below` the run wrote, or (absorbing)
/// a block the absorbing layer holds data for. Blocks in `hidden` (hidden above the run in
/// every view that contains it) are left out.
pub(crate) fn compose(
    run: &[Arc<LayerFiles>],
    below: &[Arc<LayerFiles>],
    hidden: &HashSet<u64>,
    absorber: Option<usize>,
    order: AppendOrder,
    disk_blocks: u64,
    base_blocks: u64,
) -> Result<Composition> {
    let mut newest: HashMap<u64, Newest> = HashMap::new();
    let mut absorber_data: HashSet<u64> = HashSet::new();
    let mut absorber_blocks: Vec<u64> = Vec::new();
    let mut out_first = 0;
    let mut log_at = crate::format::LOG_HEADER_SIZE;
    for (i, lf) in run.iter().enumerate() {
        let scan = lf.scan_log(disk_blocks)?;
        if let Some((off, why)) = scan.damaged.first() {
            return Err(damaged(lf, format!("record at byte {off}: {why}")));
        }
        if scan.torn_bytes > 0 {
            return Err(damaged(
                lf,
                format!("{} bytes after the last valid record", scan.torn_bytes),
            ));
        }
        let is_absorber = absorber == Some(i);
        for r in &scan.records {
            let zero = r.kind == RecordKind::Zero;
            if is_absorber && !zero {
                absorber_data.insert(r.disk_block);
                absorber_blocks.push(r.data_block);
                out_first = out_first.max(r.data_block + 1);
            }
            newest.insert(
                r.disk_block,
                Newest {
                    src: i as u32,
                    data_block: r.data_block,
                    crc: r.crc,
                    zero,
                },
            );
        }
        if is_absorber {
            let len = lf
                .data
                .metadata()
                .map_err(|e| Error::io(&lf.data_path, e))?
                .len();
            out_first = out_first.max(len.div_ceil(BLOCK_SIZE));
            log_at = scan.valid_len;
        }
    }
    // Zero records that might hide something below the run.
    let mut zeros: HashSet<u64> = newest
        .iter()
        .filter(|(&b, n)| n.zero && b >= base_blocks && !absorber_data.contains(&b))
        .map(|(&b, _)| b)
        .collect();
    let mut needed_zero: HashSet<u64> = HashSet::new();
    for lf in below {
        if zeros.is_empty() {
            break;
        }
        for r in lf.scan_log(disk_blocks)?.records {
            if zeros.remove(&r.disk_block) {
                needed_zero.insert(r.disk_block);
            }
        }
    }
    let mut blocks: Vec<(u64, Newest)> = newest
        .into_iter()
        .filter(|(b, _)| !hidden.contains(b))
        .collect();
    blocks.sort_unstable_by_key(|(b, _)| *b);
    let mut c = Composition {
        copies: Vec::new(),
        out_first,
        records: Vec::new(),
        log_at,
        map: Vec::with_capacity(blocks.len()),
        unreferenced: Vec::new(),
    };
    let mut kept: HashSet<u64> = HashSet::new();
    for (b, n) in blocks {
        let own = absorber == Some(n.src as usize);
        if n.zero {
            let needed = b < base_blocks || absorber_data.contains(&b) || needed_zero.contains(&b);
            if own || needed {
                c.map.push((b, ZERO_BLOCK, 0));
            }
            if needed && !own {
                c.records.push(Record {
                    disk_block: b,
                    data_block: ZERO_BLOCK,
                    crc: 0,
                    kind: RecordKind::Zero,
                });
            }
            continue;
        }
        if own {
            kept.insert(n.data_block);
            c.map.push((b, n.data_block, n.crc));
            continue;
        }
        let data_block = out_first + c.copies.len() as u64;
        c.copies.push(CopyItem {
            src: n.src,
            src_block: n.data_block,
            crc: n.crc,
        });
        c.map.push((b, data_block, n.crc));
        c.records.push(Record {
            disk_block: b,
            data_block,
            crc: n.crc,
            kind: RecordKind::Data,
        });
    }
    absorber_blocks.sort_unstable();
    absorber_blocks.dedup();
    c.unreferenced = absorber_blocks
        .into_iter()
        .filter(|d| !kept.contains(d))
        .collect();
    if absorber.is_some() && order == AppendOrder::Source {
        append_in_source_order(&mut c);
    }
    Ok(c)
}

/// Reorders what an absorbing merge appends so that its output follows its sources (each
/// source layer's blocks in the order of its data file) instead of disk order: the copy
/// then reads each source sequentially and appends sequentially, where disk order read a
/// scattered source in 4 KiB pieces (the locality the blocks had in their source is kept;
/// a new layer is still written in disk order, which restores locality). The `k`-th data
/// record stays copy `k`'s (the progressive copy relies on it), and `map` follows.
fn append_in_source_order(c: &mut Composition) {
    let n = c.copies.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_unstable_by_key(|&i| (c.copies[i].src, c.copies[i].src_block));
    let mut rank = vec![0u64; n];
    for (r, &i) in order.iter().enumerate() {
        rank[i] = r as u64;
    }
    let first = c.out_first;
    // Copy `i` was written to data block `first + i`; it goes to `first + rank[i]`.
    let moved = |d: u64| match d.checked_sub(first) {
        Some(i) if d != ZERO_BLOCK && i < n as u64 => first + rank[i as usize],
        _ => d,
    };
    for e in &mut c.map {
        e.1 = moved(e.1);
    }
    let (mut records, data): (Vec<Record>, Vec<Record>) = std::mem::take(&mut c.records)
        .into_iter()
        .partition(|r| r.kind == RecordKind::Zero);
    let mut by_rank: Vec<Option<Record>> = vec![None; n];
    for r in data {
        let d = moved(r.data_block);
        if let Some(slot) = by_rank.get_mut((d - first) as usize) {
            *slot = Some(Record { data_block: d, ..r });
        }
    }
    records.extend(by_rank.into_iter().flatten());
    c.records = records;
    c.copies = order.iter().map(|&i| c.copies[i]).collect();
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use crate::format::{RecordKind, ZERO_BLOCK};
    use crate::{CacheMode, DeleteOptions, Disk, OpenOptions, StrategyKind, BLOCK_SIZE};

    /// "old" holds blocks 0..64; the layer above it writes blocks 200..264 in descending
    /// disk order (its data file holds them backwards) and discards block 3. Deleting
    /// "old" with `kind` copies the blocks it moves: record `k` is copy `k`'s at the
    /// `k`-th output block, the map agrees, every block reads as written before and after a
    /// reopen; and the copies' order is returned (their disk blocks, in output order).
    fn delete_old_with(kind: StrategyKind) -> Vec<u64> {
        let (_t, d, mut disk) = crate::punch::tests::disk();
        let block = |b: u64, tag: u8| {
            let mut v = vec![tag; BLOCK_SIZE as usize];
            v[..8].copy_from_slice(&b.to_le_bytes());
            v
        };
        for b in 0..64 {
            disk.now()
                .write_at(&block(b, 1), b * BLOCK_SIZE, false)
                .unwrap();
        }
        disk.checkpoint("old").unwrap();
        for b in (200..264).rev() {
            disk.now()
                .write_at(&block(b, 2), b * BLOCK_SIZE, false)
                .unwrap();
        }
        disk.now().discard(3 * BLOCK_SIZE, BLOCK_SIZE).unwrap();
        disk.now().flush().unwrap();
        disk.checkpoint("mid").unwrap();
        let (_, jobs) = disk
            .delete_online("old", &DeleteOptions::with(kind))
            .unwrap();
        assert_eq!(jobs.len(), 1);
        let mut order = Vec::new();
        for mut j in jobs {
            j.run(&AtomicBool::new(false)).unwrap();
            let c = j.comp.as_ref().unwrap();
            let data: Vec<_> = c
                .records
                .iter()
                .filter(|r| r.kind == RecordKind::Data)
                .collect();
            assert_eq!(data.len(), c.copies.len());
            for (k, r) in data.iter().enumerate() {
                assert_eq!(r.data_block, c.out_first + k as u64, "record {k}");
                order.push(r.disk_block);
                let m = c.map.binary_search_by_key(&r.disk_block, |e| e.0).unwrap();
                assert_eq!((c.map[m].1, c.map[m].2), (r.data_block, r.crc));
            }
            // The discard of block 3 hides old's data when old's layer absorbs: a zero in
            // the map (a new layer with nothing below needs none).
            let z = c.map.binary_search_by_key(&3, |e| e.0).ok();
            assert_eq!(
                z.map(|z| c.map[z].1),
                (kind == StrategyKind::CompactIntoParent).then_some(ZERO_BLOCK)
            );
            disk.finish_merge(j).unwrap();
        }
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        for b in (0..64).chain(200..264) {
            disk.now().read_at(&mut buf, b * BLOCK_SIZE).unwrap();
            let want = match b {
                3 => vec![0u8; BLOCK_SIZE as usize],
                0..64 => block(b, 1),
                _ => block(b, 2),
            };
            assert!(buf == want, "block {b}");
        }
        assert!(disk.check().unwrap().is_clean());
        drop(disk);
        let opts = OpenOptions {
            cache: CacheMode::None,
            read_only: false,
        };
        let disk = Disk::open(&d, opts).unwrap();
        disk.now().read_at(&mut buf, 263 * BLOCK_SIZE).unwrap();
        assert!(buf == block(263, 2));
        assert!(disk.check().unwrap().is_clean());
        order
    }

    /// An existing layer absorbing appends in source order (old's layer takes the 64
    /// blocks above it, which their source wrote from block 263 down); a new layer
    /// (compact-into-child: progressive, its output absorbing as the run's top) holds both
    /// layers' blocks in disk order.
    #[test]
    fn an_absorbing_merge_appends_in_source_order_and_a_new_layer_in_disk_order() {
        let source: Vec<u64> = (200..264).rev().collect();
        assert_eq!(delete_old_with(StrategyKind::CompactIntoParent), source);
        let disk: Vec<u64> = (0..64).filter(|&b| b != 3).chain(200..264).collect();
        assert_eq!(delete_old_with(StrategyKind::CompactIntoChild), disk);
    }
}
