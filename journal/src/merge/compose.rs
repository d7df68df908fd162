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

/// Composes `run` (oldest first). `absorber` is the index of the run layer that receives
/// the others' blocks, or None for a new layer. A zero record is kept only where it hides
/// something: a block of the base, a block some layer `below` the run wrote, or (absorbing)
/// a block the absorbing layer holds data for. Blocks in `hidden` (hidden above the run in
/// every view that contains it) are left out.
pub(crate) fn compose(
    run: &[Arc<LayerFiles>],
    below: &[Arc<LayerFiles>],
    hidden: &HashSet<u64>,
    absorber: Option<usize>,
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
    Ok(c)
}
