//! What a progressive merge needs from an open view (kept here, apart from `volume.rs`):
//! inserting its output layer above the run, moving index entries of copied blocks from the
//! run to the output, and waiting for the reads that may still use the old blocks.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::format::{Record, RecordKind, ZERO_BLOCK};
use crate::index::Loc;
use crate::layer::LayerFiles;
use crate::read_gate::{ReadGate, ReadPin};
use crate::volume::ViewState;

/// Reads in flight on one view, for merges: every read plan pins the gate before it looks
/// at the index, and a merge waits for the reads pinned before its index change.
#[derive(Default)]
pub(crate) struct MergeGate {
    gate: Arc<ReadGate>,
    /// Flips are serialised (the gate reuses the previous epoch's counter).
    flips: Mutex<()>,
}

impl MergeGate {
    pub fn pin(&self) -> ReadPin {
        self.gate.pin()
    }

    /// The gate's epoch: a drain moves it on before it waits (tests use it to see a drain
    /// waiting for their read).
    #[cfg(test)]
    pub fn epoch(&self) -> u64 {
        self.gate.epoch()
    }

    /// Waits until every read pinned before this call has finished; false if that took
    /// longer than `limit` (a reader that hangs only keeps blocks allocated).
    pub fn drain(&self, limit: Duration) -> bool {
        let _g = self.flips.lock().unwrap_or_else(|p| p.into_inner());
        let start = Instant::now();
        let wait = |start: Instant| {
            while !self.gate.previous_drained() {
                if start.elapsed() > limit {
                    return false;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            true
        };
        // Readers of the epoch before the current one must be gone before its counter is
        // reused; then the reads of the current epoch are the ones to wait for.
        if !wait(start) {
            return false;
        }
        self.gate.flip();
        wait(start)
    }
}

impl ViewState {
    /// Inserts `out` at ordinal `at` (above a run that ends there): entries and marks at or
    /// above `at` move up by one. Call with no write in flight (a planned write carries its
    /// ordinal).
    pub(crate) fn insert_layer(&mut self, at: usize, out: Arc<LayerFiles>) {
        self.index.remap(|_, loc| {
            if usize::from(loc.ordinal) >= at {
                loc.ordinal += 1;
            }
        });
        self.layers.insert(at, out);
        self.damaged_upto = self
            .damaged_upto
            .map(|d| if usize::from(d) >= at { d + 1 } else { d });
        if self.own_from >= at {
            self.own_from += 1;
        }
    }

    /// Removes the layer at ordinal `at`, which no index entry reads (an output that got
    /// nothing): entries and marks above it move down by one. Call with no write in flight.
    pub(crate) fn remove_layer(&mut self, at: usize) {
        self.index.remap(|_, loc| {
            if usize::from(loc.ordinal) > at {
                loc.ordinal -= 1;
            }
        });
        self.layers.remove(at);
        self.damaged_upto = self
            .damaged_upto
            .map(|d| if usize::from(d) > at { d - 1 } else { d });
        if self.own_from > at {
            self.own_from -= 1;
        }
    }

    /// Points the entries of `records`' blocks that the index reads from layers
    /// `first..first+len` at the same versions in the layer at `first + len` (the output,
    /// which now holds them). Blocks superseded above the run are left alone. Returns the
    /// blocks the index reads from the run in another version than the record's (none
    /// unless something is inconsistent): their sources must not be freed.
    pub(crate) fn move_to_output(
        &mut self,
        first: usize,
        len: usize,
        records: &[Record],
    ) -> Vec<u64> {
        let end = first + len;
        let Ok(ord) = u16::try_from(end) else {
            return records.iter().map(|r| r.disk_block).collect();
        };
        let mut kept = Vec::new();
        for r in records {
            let Some(loc) = self.index.get(r.disk_block) else {
                continue;
            };
            let o = usize::from(loc.ordinal);
            if o < first || o >= end {
                continue;
            }
            let new = match r.kind {
                RecordKind::Data if loc.crc == r.crc && loc.data_block != ZERO_BLOCK => Loc {
                    ordinal: ord,
                    data_block: r.data_block,
                    crc: r.crc,
                },
                RecordKind::Zero if loc.data_block == ZERO_BLOCK => Loc {
                    ordinal: ord,
                    data_block: ZERO_BLOCK,
                    crc: 0,
                },
                _ => {
                    kept.push(r.disk_block);
                    continue;
                }
            };
            self.index.insert(r.disk_block, new);
        }
        kept
    }
}
