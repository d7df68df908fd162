//! Unit tests of the journal against hostile or damaged files: sealed logs with torn tails,
//! records pointing outside the data file, planted symlinks and FIFOs, damaged Now layers.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::format::{record_seed, Record, RecordKind, LOG_HEADER_SIZE, RECORD_SIZE};
use crate::tree::Tree;
use crate::{CacheMode, Disk, Error, OpenOptions, BLOCK_SIZE};

const MIB: u64 = 1 << 20;

fn opts(read_only: bool) -> OpenOptions {
    OpenOptions {
        cache: CacheMode::Writeback,
        read_only,
    }
}

fn block(v: u8) -> Vec<u8> {
    vec![v; BLOCK_SIZE as usize]
}

fn read_block(v: &crate::Volume, b: u64) -> crate::Result<Vec<u8>> {
    let mut buf = block(0);
    v.read_at(&mut buf, b * BLOCK_SIZE)?;
    Ok(buf)
}

/// A disk whose checkpoint "c1" holds blocks 0..8 as 1, "c2" (child of c1) rewrites blocks
/// 0..8 as 2, and Now (child of c2) is empty. Returns the temp dir, the disk and c2's layer.
fn two_checkpoints() -> (tempfile::TempDir, PathBuf, u64) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("disk");
    Disk::create(&d, 4 * MIB, None).unwrap();
    let mut disk = Disk::open(&d, opts(false)).unwrap();
    for b in 0..8 {
        disk.now()
            .write_at(&block(1), b * BLOCK_SIZE, false)
            .unwrap();
    }
    disk.checkpoint("c1").unwrap();
    for b in 0..8 {
        disk.now()
            .write_at(&block(2), b * BLOCK_SIZE, false)
            .unwrap();
    }
    disk.checkpoint("c2").unwrap();
    drop(disk);
    let tree = Tree::load(&d).unwrap();
    let c2 = tree.by_name("c2").unwrap().layers[0];
    (t, d, c2)
}

fn log_of(d: &Path, layer: u64) -> PathBuf {
    d.join(format!("layers/L{layer}.log"))
}

fn assert_all_blocks_refused(v: &crate::Volume) {
    for b in 0..8 {
        assert!(
            matches!(read_block(v, b), Err(Error::Corrupt { .. })),
            "block {b} of a damaged sealed layer must not be served"
        );
    }
}

#[test]
fn truncated_tail_of_a_sealed_log_is_damage() {
    let (_t, d, c2) = two_checkpoints();
    let log = log_of(&d, c2);
    let len = std::fs::metadata(&log).unwrap().len();
    assert_eq!(len, LOG_HEADER_SIZE + 8 * RECORD_SIZE as u64);
    // Cut the last record (disk block 7) in half.
    let f = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
    f.set_len(len - 10).unwrap();
    drop(f);
    let disk = Disk::open(&d, opts(true)).unwrap();
    // Block 7's newest version is lost: serving c1's version would be stale data.
    assert_all_blocks_refused(&disk.checkpoint_view("c2").unwrap());
    assert_all_blocks_refused(&disk.now());
    // c1 does not use the damaged layer.
    assert_eq!(
        read_block(&disk.checkpoint_view("c1").unwrap(), 7).unwrap(),
        block(1)
    );
    let report = disk.check().unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("bytes after the last valid record")),
        "{:?}",
        report.problems
    );
}

#[test]
fn flipped_bit_in_the_last_record_of_a_sealed_log_is_damage() {
    let (_t, d, c2) = two_checkpoints();
    let log = log_of(&d, c2);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&log)
        .unwrap();
    let last = LOG_HEADER_SIZE + 7 * RECORD_SIZE as u64;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, last + 2).unwrap();
    f.write_all_at(&[b[0] ^ 4], last + 2).unwrap();
    drop(f);
    let disk = Disk::open(&d, opts(true)).unwrap();
    assert_all_blocks_refused(&disk.checkpoint_view("c2").unwrap());
    assert!(!disk.check().unwrap().is_clean());
}

#[test]
fn torn_tail_of_the_active_log_is_still_dropped_silently() {
    let (_t, d, _) = two_checkpoints();
    let disk = Disk::open(&d, opts(false)).unwrap();
    disk.now().write_at(&block(3), 0, true).unwrap();
    drop(disk);
    let tree = Tree::load(&d).unwrap();
    let active = *tree.now.layers.last().unwrap();
    let log = log_of(&d, active);
    let f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut &f, &[0xab; 13]).unwrap();
    drop(f);
    for ro in [true, false] {
        let disk = Disk::open(&d, opts(ro)).unwrap();
        assert_eq!(read_block(&disk.now(), 0).unwrap(), block(3));
        assert_eq!(read_block(&disk.now(), 5).unwrap(), block(2));
        assert!(disk.check().unwrap().is_clean());
    }
}

/// Appends a record with a valid checksum to `layer`'s log.
fn append_record(d: &Path, layer: u64, r: Record) {
    let tree = Tree::load(d).unwrap();
    let seed = record_seed(tree.uuid_value().unwrap(), layer);
    let log = log_of(d, layer);
    let len = std::fs::metadata(&log).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
    f.write_all_at(&r.encode(seed), len).unwrap();
}

#[test]
fn record_pointing_past_the_data_file_is_damage() {
    let (_t, d, c2) = two_checkpoints();
    // A valid record whose data block would wrap the file offset to 0 (2^52 * 4096 = 2^64).
    append_record(
        &d,
        c2,
        Record {
            disk_block: 100,
            data_block: 1 << 52,
            crc: crc32c::crc32c(&block(2)),
            kind: RecordKind::Data,
        },
    );
    let disk = Disk::open(&d, opts(true)).unwrap();
    let c2v = disk.checkpoint_view("c2").unwrap();
    assert!(matches!(read_block(&c2v, 100), Err(Error::Corrupt { .. })));
    assert_all_blocks_refused(&c2v);
    let report = disk.check().unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("past the end of the data file")),
        "{:?}",
        report.problems
    );
    // Just past the end of the data file (8 blocks) is refused too; the last one is fine.
    for (data_block, ok) in [(8, false), (7, true)] {
        let (_t, d, c2) = two_checkpoints();
        append_record(
            &d,
            c2,
            Record {
                disk_block: 200,
                data_block,
                crc: crc32c::crc32c(&block(2)),
                kind: RecordKind::Data,
            },
        );
        let disk = Disk::open(&d, opts(true)).unwrap();
        let got = read_block(&disk.checkpoint_view("c2").unwrap(), 200);
        assert_eq!(got.is_ok(), ok, "data block {data_block}: {got:?}");
        if ok {
            assert_eq!(got.unwrap(), block(2));
        }
    }
}

#[test]
fn planted_symlinks_and_fifos_are_refused() {
    let (t, d, _) = two_checkpoints();
    let tree = Tree::load(&d).unwrap();
    let active = *tree.now.layers.last().unwrap();
    let data = d.join(format!("layers/L{active}.data"));
    let victim = t.path().join("victim");
    std::fs::write(&victim, b"user data").unwrap();
    std::fs::remove_file(&data).unwrap();
    std::os::unix::fs::symlink(&victim, &data).unwrap();
    assert!(matches!(
        Disk::open(&d, opts(false)),
        Err(Error::Symlink(_))
    ));
    assert_eq!(std::fs::read(&victim).unwrap(), b"user data");
    // A FIFO instead of a sealed log: refused at once, not a hang.
    let (_t2, d2, c2) = two_checkpoints();
    let log = log_of(&d2, c2);
    std::fs::remove_file(&log).unwrap();
    let c = std::ffi::CString::new(log.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo only reads the NUL-terminated path that `c` owns.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let disk = Disk::open(&d2, opts(true)).unwrap();
    assert!(matches!(
        disk.checkpoint_view("c2"),
        Err(Error::NotRegular(_))
    ));
}

#[test]
fn damaged_now_leaves_unrelated_checkpoints_readable() {
    let (_t, d, _) = two_checkpoints();
    let tree = Tree::load(&d).unwrap();
    let active = *tree.now.layers.last().unwrap();
    std::fs::remove_file(d.join(format!("layers/L{active}.data"))).unwrap();
    let disk = Disk::open(&d, opts(true)).unwrap();
    assert!(matches!(
        read_block(&disk.now(), 0),
        Err(Error::Unreadable { .. })
    ));
    assert_eq!(
        read_block(&disk.checkpoint_view("c2").unwrap(), 0).unwrap(),
        block(2)
    );
    disk.info().unwrap();
    let report = disk.check().unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.starts_with("Now: layer") && p.contains(&format!("L{active}.data"))),
        "{:?}",
        report.problems
    );
    drop(disk);
    // A writable open cannot serve Now: it fails with the reason.
    assert!(Disk::open(&d, opts(false)).is_err());
    // A bad log header in a layer of c2 breaks c2 and Now, not c1.
    let (_t, d, c2) = two_checkpoints();
    std::fs::OpenOptions::new()
        .write(true)
        .open(log_of(&d, c2))
        .unwrap()
        .write_all_at(b"XX", 0)
        .unwrap();
    let disk = Disk::open(&d, opts(true)).unwrap();
    assert!(read_block(&disk.now(), 0).is_err());
    assert!(disk.checkpoint_view("c2").is_err());
    assert_eq!(
        read_block(&disk.checkpoint_view("c1").unwrap(), 0).unwrap(),
        block(1)
    );
    let report = disk.check().unwrap();
    assert!(
        report.problems.iter().any(|p| p.contains("bad log magic")),
        "{:?}",
        report.problems
    );
}
