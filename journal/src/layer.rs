//! One layer on disk: its data file, its index log, scanning and appending.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::disk::CacheMode;
use crate::format::{record_seed, LogHeader, Record, RecordKind, LOG_HEADER_SIZE, RECORD_SIZE};
use crate::safe_open::{open_regular, open_regular_flags, Links};
use crate::{Error, Result, BLOCK_SIZE};

/// Directory of layer files inside a disk directory.
pub const LAYERS_DIR: &str = "layers";

/// Path of a layer's data file.
pub fn data_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(LAYERS_DIR).join(format!("L{id}.data"))
}

/// Path of a layer's log file.
pub fn log_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(LAYERS_DIR).join(format!("L{id}.log"))
}

/// An open layer: its data file for reads (and writes, when active).
pub struct LayerFiles {
    pub id: u64,
    pub data: File,
    /// The log, open read-only (scans read it; unlocked readers pin the layer with it).
    pub log: File,
    pub data_path: PathBuf,
    pub log_path: PathBuf,
    pub seed: u32,
}

/// What scanning a log found.
#[derive(Debug, Default)]
pub struct LogScan {
    /// Valid records in log order.
    pub records: Vec<Record>,
    /// Bytes of the log up to the end of the last valid record.
    pub valid_len: u64,
    /// Damaged records followed by valid ones: (byte offset, description).
    pub damaged: Vec<(u64, String)>,
    /// Bytes after `valid_len` that hold no valid record and are not all zero (a torn
    /// tail: a partial record, garbage), up to the end of the last record slot holding a
    /// non-zero byte.
    pub torn_bytes: u64,
    /// Zero bytes after those, to the end of the file: space the log was extended by
    /// (`fallocate`, or a crash between a size change and the write) that no write reached.
    /// No record was ever durable there, so it is not damage in any layer (see "Write,
    /// flush and recovery" in `docs/FORMAT.md`).
    pub zero_tail: u64,
    /// Valid records that are ignored (for blocks past the end of the disk).
    pub ignored: Vec<(u64, String)>,
    /// Problems beyond the first [`MAX_REPORTED`] of `damaged` or `ignored`, only counted.
    pub omitted: u64,
}

/// Problems listed individually per log (memory stays bounded whatever the log holds).
pub const MAX_REPORTED: usize = 1024;
/// Bytes of the log read at a time while scanning (a whole number of records).
const LOG_SCAN_CHUNK: usize = RECORD_SIZE * 32768;

impl LogScan {
    fn report_damage(&mut self, off: u64, why: String) {
        if self.damaged.len() < MAX_REPORTED {
            self.damaged.push((off, why));
        } else {
            self.omitted += 1;
        }
    }
}

fn open_data(path: &Path, cache: CacheMode, write: bool, create: bool) -> Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(write).create(create);
    if create {
        opts.truncate(true);
        opts.mode(0o600);
    }
    if cache == CacheMode::None {
        match open_regular_flags(path, &opts, Links::Refuse, libc::O_DIRECT) {
            Ok(f) => return Ok(f),
            // tmpfs and some filesystems refuse O_DIRECT: fall back to buffered I/O.
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    open_regular(path, &opts, Links::Refuse)
}

impl LayerFiles {
    /// Creates an empty layer (data file and log with its header), durable on return
    /// (the caller fsyncs the directory).
    pub fn create(dir: &Path, disk_uuid: u128, id: u64, cache: CacheMode) -> Result<LayerFiles> {
        let log_path = log_path(dir, id);
        let data_path = data_path(dir, id);
        let data = open_data(&data_path, cache, true, true)?;
        data.sync_all().map_err(|e| Error::io(&data_path, e))?;
        let mut opts = OpenOptions::new();
        opts.read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600);
        let log = open_regular(&log_path, &opts, Links::Refuse)?;
        let header = LogHeader {
            disk_uuid,
            layer_id: id,
        };
        log.write_all_at(&header.encode(), 0)
            .map_err(|e| Error::io(&log_path, e))?;
        log.sync_all().map_err(|e| Error::io(&log_path, e))?;
        Ok(LayerFiles {
            id,
            data,
            log,
            data_path,
            log_path,
            seed: record_seed(disk_uuid, id),
        })
    }

    /// Opens an existing layer and checks its log header.
    pub fn open(
        dir: &Path,
        disk_uuid: u128,
        id: u64,
        cache: CacheMode,
        write: bool,
    ) -> Result<LayerFiles> {
        let log_path = log_path(dir, id);
        let data_path = data_path(dir, id);
        let data = open_data(&data_path, cache, write, false)?;
        let mut head = [0u8; LOG_HEADER_SIZE as usize];
        let mut ro = OpenOptions::new();
        ro.read(true);
        let mut log = open_regular(&log_path, &ro, Links::Refuse)?;
        let n = read_full(&mut log, &mut head).map_err(|e| Error::io(&log_path, e))?;
        let header = LogHeader::decode(&head[..n], &log_path.display().to_string())?;
        if header.disk_uuid != disk_uuid || header.layer_id != id {
            return Err(Error::Corrupt {
                what: log_path.display().to_string(),
                why: format!(
                    "log belongs to layer {} of another disk or slot",
                    header.layer_id
                ),
            });
        }
        Ok(LayerFiles {
            id,
            data,
            log,
            data_path,
            log_path,
            seed: record_seed(disk_uuid, id),
        })
    }

    /// Reads and validates every record of the log against a disk of `disk_blocks` blocks
    /// and the data file as it is now: a record pointing past the end of the data file is
    /// damage, one for a block past the end of the disk is ignored (and reported).
    pub fn scan_log(&self, disk_blocks: u64) -> Result<LogScan> {
        let data_blocks = self
            .data
            .metadata()
            .map_err(|e| Error::io(&self.data_path, e))?
            .len()
            / BLOCK_SIZE;
        let mut scan = LogScan {
            valid_len: LOG_HEADER_SIZE,
            ..LogScan::default()
        };
        // A run of records with a bad checksum: (offset of the first, count, all zero
        // bytes). It is damage if a valid record follows, a torn tail otherwise.
        let mut bad_run: Option<(u64, u64, bool)> = None;
        // End of the last record slot after a valid record that holds a non-zero byte.
        let mut dirty_end = LOG_HEADER_SIZE;
        let mut chunk = vec![0u8; LOG_SCAN_CHUNK];
        let mut pos = LOG_HEADER_SIZE;
        loop {
            let n = self.read_log_at(&mut chunk, pos)?;
            let slots = chunk[..n].chunks_exact(RECORD_SIZE);
            let rest = slots.remainder();
            if rest.iter().any(|&b| b != 0) {
                dirty_end = pos + n as u64;
            }
            for (i, rec) in slots.enumerate() {
                let off = pos + (i * RECORD_SIZE) as u64;
                let Some(r) = Record::decode(rec, self.seed) else {
                    let zero = rec.iter().all(|&b| b == 0);
                    if !zero {
                        dirty_end = off + RECORD_SIZE as u64;
                    }
                    match &mut bad_run {
                        Some((_, count, all_zero)) => {
                            *count += 1;
                            *all_zero &= zero;
                        }
                        None => bad_run = Some((off, 1, zero)),
                    }
                    continue;
                };
                if let Some((first, count, zero)) = bad_run.take() {
                    let why = match (count, zero) {
                        (1, false) => "record checksum mismatch".to_string(),
                        (_, false) => format!("{count} consecutive records fail their checksum"),
                        // Zeros before a valid record: never-written space inside the log
                        // (nothing appends past a hole) or records that were lost.
                        (_, true) => format!(
                            "{count} consecutive records are zero bytes (records lost, or never written) before a valid record"
                        ),
                    };
                    scan.report_damage(first, why);
                }
                scan.valid_len = off + RECORD_SIZE as u64;
                if r.kind == RecordKind::Data && r.data_block >= data_blocks {
                    scan.report_damage(
                        off,
                        format!(
                            "data block {} is past the end of the data file ({data_blocks} blocks)",
                            r.data_block
                        ),
                    );
                } else if r.disk_block >= disk_blocks {
                    if scan.ignored.len() < MAX_REPORTED {
                        scan.ignored.push((
                            off,
                            format!(
                                "block {} is past the end of the disk ({disk_blocks} blocks)",
                                r.disk_block
                            ),
                        ));
                    } else {
                        scan.omitted += 1;
                    }
                } else {
                    scan.records.push(r);
                }
            }
            pos += n as u64;
            if n < chunk.len() {
                break;
            }
        }
        let torn_end = dirty_end.max(scan.valid_len);
        scan.torn_bytes = torn_end - scan.valid_len;
        scan.zero_tail = pos.saturating_sub(torn_end);
        Ok(scan)
    }

    /// Reads the log at `off` until `buf` is full or the end of the file; returns the bytes
    /// read.
    fn read_log_at(&self, buf: &mut [u8], off: u64) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.log.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(&self.log_path, e)),
            }
        }
        Ok(done)
    }

    /// Reads one data block into `buf` (4 KiB, aligned) with positional I/O.
    pub fn read_block(&self, data_block: u64, buf: &mut [u8]) -> Result<()> {
        let off = data_block
            .checked_mul(BLOCK_SIZE)
            .ok_or_else(|| Error::Corrupt {
                what: self.data_path.display().to_string(),
                why: format!("data block {data_block} is out of range"),
            })?;
        read_exact_at(&self.data, buf, off).map_err(|e| Error::io(&self.data_path, e))
    }

    /// Frees data blocks that nothing references any more (punches holes).
    pub fn punch(&self, blocks: &mut [u64]) -> Result<u64> {
        #[cfg(test)]
        PUNCHES.with(|c| c.set(c.get() + 1));
        blocks.sort_unstable();
        let mut freed = 0;
        let mut i = 0;
        while i < blocks.len() {
            let start = blocks[i];
            let mut end = start.saturating_add(1);
            i += 1;
            while i < blocks.len() && blocks[i] <= end {
                end = end.max(blocks[i].saturating_add(1));
                i += 1;
            }
            let (Some(off), Some(len)) = (
                start.checked_mul(BLOCK_SIZE),
                (end - start).checked_mul(BLOCK_SIZE),
            ) else {
                return Err(Error::Corrupt {
                    what: self.data_path.display().to_string(),
                    why: format!("data block {start} is out of range"),
                });
            };
            punch_hole(&self.data, off, len).map_err(|e| Error::io(&self.data_path, e))?;
            freed += len;
        }
        Ok(freed)
    }
}

#[cfg(test)]
thread_local! {
    /// Calls of [`LayerFiles::punch`] on this thread (tests see which thread punches).
    pub(crate) static PUNCHES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Bytes the host filesystem allocated for `path` (0 if it cannot be read).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Reads until `buf` is full or EOF; returns the bytes read.
pub fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// `pread` of exactly `buf.len()` bytes; EOF before that is an error.
pub fn read_exact_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    f.read_exact_at(buf, off)
}

/// Deallocates a byte range of a file, keeping its size.
pub fn punch_hole(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is valid for `f`'s lifetime.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Allocates a byte range of a file (extending it).
pub fn preallocate(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is valid for `f`'s lifetime.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, off, len) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer of a disk with uuid 9 whose data file is `blocks` blocks long, and its log
    /// open for writing.
    fn test_layer(blocks: u64) -> (tempfile::TempDir, LayerFiles, File) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(LAYERS_DIR)).unwrap();
        let l = LayerFiles::create(dir.path(), 9, 1, CacheMode::Writeback).unwrap();
        l.data.set_len(blocks * BLOCK_SIZE).unwrap();
        let log = OpenOptions::new().write(true).open(&l.log_path).unwrap();
        (dir, l, log)
    }

    /// A data record of disk block `b` at data block `b`.
    fn rec(b: u64) -> Record {
        Record {
            disk_block: b,
            data_block: b,
            crc: 0,
            kind: RecordKind::Data,
        }
    }

    #[test]
    fn scan_stops_at_torn_tail_and_reports_damage() {
        let (_dir, l, log) = test_layer(10);
        let mut bytes = Vec::new();
        for b in 0..4 {
            bytes.extend_from_slice(&rec(b).encode(l.seed));
        }
        log.write_all_at(&bytes, LOG_HEADER_SIZE).unwrap();
        // A torn tail: half a record.
        log.write_all_at(&rec(9).encode(l.seed)[..10], LOG_HEADER_SIZE + 128)
            .unwrap();
        let s = l.scan_log(1 << 20).unwrap();
        assert_eq!(s.records.len(), 4);
        assert_eq!(s.valid_len, LOG_HEADER_SIZE + 128);
        assert_eq!(s.torn_bytes, 10);
        assert!(s.damaged.is_empty());
        // Damage in the middle is reported, later records still count.
        log.write_all_at(&[0xff], LOG_HEADER_SIZE + 33).unwrap();
        let s = l.scan_log(1 << 20).unwrap();
        assert_eq!(s.records.len(), 3);
        assert_eq!(s.damaged.len(), 1);
        assert_eq!(s.damaged[0].0, LOG_HEADER_SIZE + 32);
        // A valid record for a data block past the end of the data file is damage too, and
        // one for a block past the end of the disk is ignored.
        let s = l.scan_log(3).unwrap();
        assert_eq!(s.records.len(), 2);
        assert_eq!(s.ignored.len(), 1);
        l.data.set_len(2 * BLOCK_SIZE).unwrap();
        let s = l.scan_log(1 << 20).unwrap();
        assert_eq!(s.records.len(), 1);
        assert_eq!(s.damaged.len(), 3, "{:?}", s.damaged);
    }

    #[test]
    fn a_long_damaged_stretch_is_one_problem() {
        let (_dir, l, log) = test_layer(4);
        log.write_all_at(&rec(0).encode(l.seed), LOG_HEADER_SIZE)
            .unwrap();
        // 64 MiB of zeros (2 Mi records that fail their checksum, spanning several scan
        // chunks), then one valid record.
        let tail = LOG_HEADER_SIZE + 32 + (64 << 20);
        log.write_all_at(&rec(1).encode(l.seed), tail).unwrap();
        let s = l.scan_log(1 << 20).unwrap();
        assert_eq!(s.records.len(), 2);
        assert_eq!(s.damaged.len(), 1, "one entry for the whole stretch");
        assert_eq!(s.damaged[0].0, LOG_HEADER_SIZE + 32);
        assert!(
            s.damaged[0].1.contains("2097152 consecutive"),
            "{}",
            s.damaged[0].1
        );
        assert_eq!(s.valid_len, tail + 32);
        assert_eq!(s.torn_bytes, 0);
    }

    /// Every case of what a crash can leave after the last durable record of a log whose
    /// size ran ahead of its writes (a preallocated absorbing log, an extended file).
    #[test]
    fn zero_tails_are_unwritten_space_and_other_tails_are_torn() {
        let (_dir, l, log) = test_layer(16);
        for b in 0..4 {
            log.write_all_at(&rec(b).encode(l.seed), LOG_HEADER_SIZE + 32 * b)
                .unwrap();
        }
        let end = LOG_HEADER_SIZE + 128;
        // A zero tail: the records after the preallocation were never written.
        preallocate(&log, end, 4096).unwrap();
        let s = l.scan_log(1 << 20).unwrap();
        assert_eq!(s.records.len(), 4);
        assert_eq!((s.valid_len, s.torn_bytes, s.zero_tail), (end, 0, 4096));
        assert!(s.damaged.is_empty());
        // A torn record then zeros: torn up to the end of the torn record's slot.
        log.write_all_at(&rec(4).encode(l.seed)[..10], end).unwrap();
        let s = l.scan_log(1 << 20).unwrap();
        assert_eq!(
            (s.valid_len, s.torn_bytes, s.zero_tail),
            (end, 32, 4096 - 32)
        );
        // Garbage at the very end: the whole tail is torn.
        log.write_all_at(&[0x5a], end + 4095).unwrap();
        let s = l.scan_log(1 << 20).unwrap();
        assert_eq!((s.valid_len, s.torn_bytes, s.zero_tail), (end, 4096, 0));
        // A partial last slot of zeros is zero tail too.
        log.write_all_at(&[0; 32], end).unwrap();
        log.write_all_at(&[0], end + 4095).unwrap();
        log.set_len(end + 4096 + 7).unwrap();
        let s = l.scan_log(1 << 20).unwrap();
        assert_eq!((s.torn_bytes, s.zero_tail), (0, 4096 + 7));
        // A zero hole followed by valid records: the records after it count, the hole is
        // damage (records that were durable may be lost there), reported as zeros.
        log.set_len(end + 4096).unwrap();
        log.write_all_at(&rec(7).encode(l.seed), end + 256).unwrap();
        let s = l.scan_log(1 << 20).unwrap();
        assert_eq!(s.records.len(), 5);
        assert_eq!(s.records[4], rec(7));
        assert_eq!(s.valid_len, end + 288);
        assert_eq!((s.torn_bytes, s.zero_tail), (0, 4096 - 288));
        assert_eq!(s.damaged.len(), 1, "{:?}", s.damaged);
        assert_eq!(s.damaged[0].0, end);
        assert!(
            s.damaged[0]
                .1
                .contains("8 consecutive records are zero bytes"),
            "{:?}",
            s.damaged
        );
        // A hole of garbage is reported as failed checksums.
        log.write_all_at(&[1], end + 40).unwrap();
        let s = l.scan_log(1 << 20).unwrap();
        assert!(
            s.damaged[0].1.contains("8 consecutive records fail"),
            "{:?}",
            s.damaged
        );
    }

    #[test]
    fn open_refuses_foreign_log() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(LAYERS_DIR)).unwrap();
        LayerFiles::create(dir.path(), 9, 1, CacheMode::Writeback).unwrap();
        assert!(LayerFiles::open(dir.path(), 10, 1, CacheMode::Writeback, false).is_err());
        assert!(LayerFiles::open(dir.path(), 9, 1, CacheMode::None, false).is_ok());
    }
}
