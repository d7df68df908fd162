//! A debugging audit of a view against its layers' logs (off unless `STRATA_AUDIT` is set
//! in the environment): after a durable sync, every index entry must be what replaying the
//! logs gives, i.e. the newest record of the highest layer that has one for that block.
//! Anything that trusts a log (a merge's composition, an open) relies on it.

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::format::{RecordKind, ZERO_BLOCK};
use crate::volume::ViewState;
use crate::BLOCK_SIZE;

/// True when the audit runs.
pub(crate) fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("STRATA_AUDIT").is_some())
}

/// Compares the index of `st` with its layers' logs; panics with the first differences.
pub(crate) fn check_view(st: &ViewState, size: u64, what: &str) {
    if st.unreadable.is_some() || st.damaged_upto.is_some() {
        return;
    }
    let disk_blocks = size.div_ceil(BLOCK_SIZE);
    // block -> (layer ordinal, data block or ZERO_BLOCK, crc) of the replayed state.
    let mut replay: HashMap<u64, (usize, u64, u32)> = HashMap::new();
    for (o, lf) in st.layers.iter().enumerate() {
        let scan = match lf.scan_log(disk_blocks) {
            Ok(s) => s,
            Err(e) => panic!("audit ({what}): layer {}: {e}", lf.id),
        };
        assert!(
            scan.damaged.is_empty(),
            "audit ({what}): layer {} log damaged: {:?}",
            lf.id,
            scan.damaged
        );
        for r in scan.records {
            let d = if r.kind == RecordKind::Zero {
                ZERO_BLOCK
            } else {
                r.data_block
            };
            replay.insert(r.disk_block, (o, d, r.crc));
        }
    }
    let mut bad = Vec::new();
    for (b, l) in st.index.iter() {
        let want = replay.remove(&b);
        let got = (usize::from(l.ordinal), l.data_block, l.crc);
        let ok = match want {
            Some((o, d, crc)) => {
                (o == got.0 && d == got.1 && (d == ZERO_BLOCK || crc == got.2))
                    // An absorbing merge in flight (records appended to a layer of its run,
                    // not yet adopted): the same data, higher up in the run.
                    || (o > got.0
                        && (d == ZERO_BLOCK) == (got.1 == ZERO_BLOCK)
                        && (d == ZERO_BLOCK || crc == got.2))
            }
            // A zero the index keeps where a merge left out a zero record that hid nothing.
            None => got.1 == ZERO_BLOCK,
        };
        if !ok {
            bad.push(format!(
                "block {b}: index {:?} (layer {:?}), logs {:?} (layer {:?})",
                got,
                st.layers.get(got.0).map(|l| l.id),
                want,
                want.and_then(|w| st.layers.get(w.0)).map(|l| l.id)
            ));
        }
    }
    // Blocks the logs define that the index lacks: only zeros a compaction dropped.
    for (b, (o, d, _)) in replay {
        if d != ZERO_BLOCK {
            bad.push(format!(
                "block {b}: not in the index, logs say layer {:?} data block {d}",
                st.layers.get(o).map(|l| l.id)
            ));
        }
    }
    if !bad.is_empty() {
        bad.truncate(20);
        let ids: Vec<u64> = st.layers.iter().map(|l| l.id).collect();
        panic!("audit ({what}): view layers {ids:?}: {bad:#?}");
    }
}
