//! Log compaction of Now's active layer: when most of its log is superseded records, the log
//! is rewritten with one record per live block of the layer, taken from the in-memory
//! index, so the log (and the time to open the disk) follows live data, not history.
//!
//! Crash safety: the compacted log is written to `L<id>.log.compact` and fsynced, renamed
//! over `L<id>.log`, and the directory fsynced; an open for writing deletes a leftover
//! `.compact` file. Either name holds a complete, valid log of the same blocks. It all runs
//! holding the layer's log ([`ActiveLayer::lock_log`]), so no sync batch is in flight; pending records are taken into
//! the new log (their data is synced first). The layer's own descriptors of the log are
//! pointed at the new file with `dup3`, so every user of them follows without a reopen.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::format::{Record, RecordKind, LOG_HEADER_SIZE, RECORD_SIZE, ZERO_BLOCK};
use crate::index::Loc;
use crate::layer::LayerFiles;
use crate::safe_open::{open_regular, Links};
use crate::volume::{ActiveLayer, Volume};
use crate::{Error, Result, BLOCK_SIZE};

/// A flush compacts the log once it holds at least this many records...
pub const COMPACT_MIN_RECORDS: u64 = 1 << 16;
/// ...and more than this many times the layer's live blocks.
pub const COMPACT_RATIO: u64 = 2;
/// Attempts at the view's state lock while holding the log (a checkpoint holds the state
/// and waits for the log, so this side only tries).
const STATE_TRIES: u32 = 200;

/// What a log compaction did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CompactReport {
    pub records_before: u64,
    pub records_after: u64,
    pub log_bytes_after: u64,
    /// Zero records left out because nothing under them reads as anything but zeros.
    pub zero_entries_dropped: u64,
}

/// Figures of Now's active layer (see [`Volume::active_space`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ActiveSpace {
    /// Records in the log (appended or pending).
    pub log_records: u64,
    /// Index entries of the layer: the records a compacted log holds.
    pub live_entries: u64,
    /// Data blocks below the end of the used part of the data file.
    pub used_blocks: u64,
    /// Freed blocks ready for reuse, and freed blocks waiting for reads in flight.
    pub free_blocks: u64,
    pub waiting_blocks: u64,
}

/// The temporary file a compaction writes.
pub fn tmp_path(log_path: &Path) -> PathBuf {
    let mut name = log_path.as_os_str().to_owned();
    name.push(".compact");
    PathBuf::from(name)
}

/// Deletes a compacted log that a crash left before its rename (the log is intact).
pub(crate) fn remove_leftover(log_path: &Path) {
    let tmp = tmp_path(log_path);
    match std::fs::remove_file(&tmp) {
        Ok(()) => tracing::info!("removed an unfinished log compaction {}", tmp.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot remove {}: {e}", tmp.display()),
    }
}

/// Writes a complete log (the current header, then `records`) to the temporary file and
/// syncs it; returns it open for writing and again read-only, and its length.
fn write_tmp(files: &LayerFiles, records: &[Record]) -> Result<(File, File, u64)> {
    let tmp = tmp_path(&files.log_path);
    let mut header = [0u8; LOG_HEADER_SIZE as usize];
    files
        .log
        .read_exact_at(&mut header, 0)
        .map_err(|e| Error::io(&files.log_path, e))?;
    crate::format::LogHeader::decode(&header, &files.log_path.display().to_string())?;
    let mut opts = OpenOptions::new();
    opts.read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600);
    let f = open_regular(&tmp, &opts, Links::Refuse)?;
    let io = |e| Error::io(&tmp, e);
    f.write_all_at(&header, 0).map_err(io)?;
    let mut off = LOG_HEADER_SIZE;
    for chunk in records.chunks(32768) {
        let mut buf = Vec::with_capacity(chunk.len() * RECORD_SIZE);
        for r in chunk {
            buf.extend_from_slice(&r.encode(files.seed));
        }
        f.write_all_at(&buf, off).map_err(io)?;
        off += buf.len() as u64;
    }
    f.sync_all().map_err(io)?;
    let mut ro = OpenOptions::new();
    ro.read(true);
    let r = open_regular(&tmp, &ro, Links::Refuse)?;
    Ok((f, r, off))
}

/// Points descriptor `target` at the open file of `with` (atomically: the number never
/// refers to anything else in between).
fn repoint(target: &File, with: &File) -> std::io::Result<()> {
    for _ in 0..100 {
        // SAFETY: dup3 only reads its integer arguments. Both descriptors are open (owned by
        // `target` and `with`, alive for the call); `target`'s number stays open and owned
        // by `target` afterwards, now naming `with`'s open file description.
        let r = unsafe { libc::dup3(with.as_raw_fd(), target.as_raw_fd(), libc::O_CLOEXEC) };
        if r >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) {
            return Err(e);
        }
    }
    Err(std::io::Error::from_raw_os_error(libc::EBUSY))
}

impl Volume {
    /// Compacts the active layer's log now (whatever its live fraction). `None` when there
    /// is nothing to compact or the view changed meanwhile.
    pub fn compact_log(&self) -> Result<Option<CompactReport>> {
        self.compact(true)
    }

    /// Compacts the log if the counters say most of it is superseded; a failure only costs
    /// space, so it is logged.
    pub(crate) fn compact_if_due(&self) {
        if let Err(e) = self.compact(false) {
            tracing::warn!("log compaction failed (the log stays as it is): {e}");
        }
    }

    /// Figures of Now's active layer (`None` for read-only views).
    pub fn active_space(&self) -> Option<ActiveSpace> {
        let active = self.state().active.clone()?;
        let (used_blocks, free_blocks, waiting_blocks) = active.space();
        Some(ActiveSpace {
            log_records: active.log_records(),
            live_entries: active.live_entries(),
            used_blocks,
            free_blocks,
            waiting_blocks,
        })
    }

    fn compact(&self, force: bool) -> Result<Option<CompactReport>> {
        let Some(active) = self.state().active.clone() else {
            return Ok(None);
        };
        let due = |a: &ActiveLayer| {
            let records = a.log_records();
            records >= COMPACT_MIN_RECORDS
                && records > a.live_entries().saturating_mul(COMPACT_RATIO)
        };
        if !force && !due(&active) {
            return Ok(None);
        }
        let mut attempt = 0;
        let (serial, st) = loop {
            // No sync batch runs while this is held (so none appends to the old log).
            let serial = active.lock_log();
            if let Some(st) = self.try_state() {
                break (serial, st);
            }
            drop(serial);
            attempt += 1;
            if attempt >= STATE_TRIES {
                return Ok(None);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        if st.unreadable.is_some() || !st.active.as_ref().is_some_and(|a| Arc::ptr_eq(a, &active)) {
            return Ok(None);
        }
        let Ok(ord) = u16::try_from(st.layers.len() - 1) else {
            return Ok(None);
        };
        // A zero record is needed only over something that reads otherwise: an older layer
        // or the base. In the lineage's only layer, past the end of the base, it is not.
        let base_size = self.base().map(|b| b.size);
        let droppable = |block: u64| {
            ord == 0
                && st.damaged_upto.is_none()
                && base_size.is_none_or(|s| block.saturating_mul(BLOCK_SIZE) >= s)
        };
        let mut records = Vec::new();
        let mut dropped = Vec::new();
        for (block, l) in st.index.iter().filter(|(_, l)| l.ordinal == ord) {
            if l.data_block == ZERO_BLOCK {
                if droppable(block) {
                    dropped.push(block);
                    continue;
                }
                records.push(Record {
                    disk_block: block,
                    data_block: ZERO_BLOCK,
                    crc: 0,
                    kind: RecordKind::Zero,
                });
            } else {
                records.push(Record {
                    disk_block: block,
                    data_block: l.data_block,
                    crc: l.crc,
                    kind: RecordKind::Data,
                });
            }
        }
        // The pending records' effects are in the index just read (a commit updates the
        // index and queues its records under the state lock held here).
        let records_before = active.log_records();
        let (pending, dead) = active.take_pending();
        drop(st);
        records.sort_unstable_by_key(|r| r.disk_block);
        let files = active.files.clone();
        let prepared = (|| {
            // The pending records' data must be durable before the records are.
            files
                .data
                .sync_data()
                .map_err(|e| Error::io(&files.data_path, e))?;
            let (rw, ro, len) = write_tmp(&files, &records)?;
            std::fs::rename(tmp_path(&files.log_path), &files.log_path)
                .map_err(|e| Error::io(&files.log_path, e))?;
            Ok((rw, ro, len))
        })();
        let (rw, ro, len) = match prepared {
            Ok(p) => p,
            Err(e) => {
                active.restore_pending(pending, dead);
                remove_leftover(&files.log_path);
                return Err(e);
            }
        };
        // The log file is replaced: from here on appends must go to the new one.
        if let Err(e) = repoint(active.log_file(), &rw).and_then(|()| repoint(&files.log, &ro)) {
            active.mark_log_lost();
            return Err(Error::io(&files.log_path, e));
        }
        let dir = files.log_path.parent().unwrap_or(Path::new("."));
        if let Err(e) = crate::tree::sync_dir(dir) {
            // The rename may not be durable: the freed blocks are not reused (they stay
            // holes until the next open), everything else is as if it had worked.
            active.log_replaced(len, Vec::new());
            drop(dead);
            return Err(e);
        }
        active.log_replaced(len, dead);
        drop(serial);
        let zero = Loc {
            ordinal: ord,
            data_block: ZERO_BLOCK,
            crc: 0,
        };
        let mut removed = 0;
        if !dropped.is_empty() {
            let mut st = self.state_mut();
            if st.active.as_ref().is_some_and(|a| Arc::ptr_eq(a, &active)) {
                for b in &dropped {
                    if st.index.get(*b) == Some(zero) {
                        st.index.remove(*b);
                        removed += 1;
                    }
                }
                active.forget_entries(removed);
            }
        }
        Ok(Some(CompactReport {
            records_before,
            records_after: records.len() as u64,
            log_bytes_after: len,
            zero_entries_dropped: removed,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Disk, OpenOptions};

    fn open(dir: &Path) -> Disk {
        Disk::open(dir, OpenOptions::default()).unwrap()
    }

    fn log_len(dir: &Path, layer: u64) -> u64 {
        std::fs::metadata(crate::layer::log_path(dir, layer))
            .unwrap()
            .len()
    }

    fn read(disk: &Disk, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        disk.now().read_at(&mut b, off).unwrap();
        b
    }

    #[test]
    fn compaction_keeps_one_record_per_live_block_and_survives_reopen() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("d");
        Disk::create(&dir, 64 << 20, None).unwrap();
        let disk = open(&dir);
        let now = disk.now();
        for round in 0..10u8 {
            now.write_at(&vec![round + 1; 64 << 10], 0, false).unwrap();
            now.flush().unwrap();
        }
        now.write_at(&[5u8; 8192], 1 << 20, false).unwrap();
        now.discard(1 << 20, 4096).unwrap();
        now.flush().unwrap();
        assert_eq!(log_len(&dir, 1), LOG_HEADER_SIZE + 32 * (160 + 3));
        let r = now.compact_log().unwrap().unwrap();
        // 16 blocks at 0 and one at 1 MiB + 4 KiB; the zero record over nothing is dropped.
        assert_eq!(r.records_after, 17, "{r:?}");
        assert_eq!(r.zero_entries_dropped, 1);
        assert_eq!(log_len(&dir, 1), LOG_HEADER_SIZE + 32 * 17);
        assert_eq!(now.index_stats().0, 17);
        // Appends after the compaction go to the new log.
        now.write_at(&[9u8; 4096], 2 << 20, false).unwrap();
        now.flush().unwrap();
        assert_eq!(log_len(&dir, 1), LOG_HEADER_SIZE + 32 * 18);
        drop(now);
        drop(disk);
        let disk = open(&dir);
        assert_eq!(read(&disk, 0, 64 << 10), vec![10u8; 64 << 10]);
        assert_eq!(read(&disk, 1 << 20, 8192)[..4096], [0u8; 4096]);
        assert_eq!(read(&disk, 1 << 20, 8192)[4096..], [5u8; 4096]);
        assert_eq!(read(&disk, 2 << 20, 4096), vec![9u8; 4096]);
        assert!(disk.check().unwrap().is_clean());
    }

    #[test]
    fn zero_records_over_an_older_layer_are_kept() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("d");
        Disk::create(&dir, 64 << 20, None).unwrap();
        let mut disk = open(&dir);
        disk.now().write_at(&[3u8; 8192], 0, false).unwrap();
        disk.checkpoint("a").unwrap();
        let now = disk.now();
        now.discard(0, 8192).unwrap();
        now.write_at(&[4u8; 4096], 1 << 20, false).unwrap();
        now.write_at(&[6u8; 4096], 1 << 20, false).unwrap();
        now.flush().unwrap();
        let r = now.compact_log().unwrap().unwrap();
        assert_eq!((r.records_before, r.records_after), (4, 3), "{r:?}");
        drop(now);
        drop(disk);
        let disk = open(&dir);
        assert_eq!(read(&disk, 0, 8192), vec![0u8; 8192]);
        assert_eq!(read(&disk, 1 << 20, 4096), vec![6u8; 4096]);
        let mut b = vec![0u8; 8192];
        disk.checkpoint_view("a")
            .unwrap()
            .read_at(&mut b, 0)
            .unwrap();
        assert_eq!(b, vec![3u8; 8192]);
    }

    #[test]
    fn an_unfinished_compaction_is_removed_on_open() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("d");
        Disk::create(&dir, 64 << 20, None).unwrap();
        {
            let disk = open(&dir);
            disk.now().write_at(&[1u8; 4096], 0, false).unwrap();
            disk.now().write_at(&[2u8; 4096], 0, false).unwrap();
        }
        let log = crate::layer::log_path(&dir, 1);
        let before = std::fs::read(&log).unwrap();
        // A crash after the temporary log was written, before its rename.
        std::fs::write(tmp_path(&log), &before[..LOG_HEADER_SIZE as usize]).unwrap();
        let disk = open(&dir);
        assert!(!tmp_path(&log).exists());
        assert_eq!(std::fs::read(&log).unwrap(), before);
        assert_eq!(read(&disk, 0, 4096), vec![2u8; 4096]);
    }

    #[test]
    fn a_flush_compacts_only_past_the_threshold() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("d");
        Disk::create(&dir, 64 << 20, None).unwrap();
        let disk = open(&dir);
        let now = disk.now();
        let buf = vec![7u8; 1 << 20];
        let per = (1u64 << 20) / BLOCK_SIZE;
        let mut written = 0;
        // Rewrites of the same 1 MiB: the log grows until it passes the threshold.
        while written + per < COMPACT_MIN_RECORDS {
            now.write_at(&buf, 0, false).unwrap();
            now.flush().unwrap();
            written += per;
        }
        assert_eq!(log_len(&dir, 1), LOG_HEADER_SIZE + 32 * written);
        now.write_at(&buf, 0, false).unwrap();
        now.write_at(&buf, 0, false).unwrap();
        now.flush().unwrap();
        assert_eq!(log_len(&dir, 1), LOG_HEADER_SIZE + 32 * per, "compacted");
        let space = now.active_space().unwrap();
        assert_eq!(space.log_records, per);
        assert_eq!(space.live_entries, per);
    }
}
