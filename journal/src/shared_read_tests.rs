//! Read-only opens while another open holds the disk for writing: checkpoints are readable,
//! Now is not, and a delete in the writer never makes a reader see wrong data.
//!
//! `flock` locks belong to open file descriptions, so a writer and a reader in one process
//! exclude each other exactly as two processes do.

use std::path::PathBuf;

use crate::{CacheMode, Disk, Error, OpenOptions, Volume, BLOCK_SIZE};

fn opts(read_only: bool) -> OpenOptions {
    OpenOptions {
        cache: CacheMode::Writeback,
        read_only,
    }
}

fn fill(v: u8) -> Vec<u8> {
    vec![v; BLOCK_SIZE as usize]
}

fn write_blocks(d: &Disk, blocks: std::ops::Range<u64>, v: u8) {
    for b in blocks {
        d.now().write_at(&fill(v), b * BLOCK_SIZE, false).unwrap();
    }
    d.now().flush().unwrap();
}

fn assert_blocks(v: &Volume, blocks: std::ops::Range<u64>, want: u8) {
    for b in blocks {
        let mut buf = fill(0);
        v.read_at(&mut buf, b * BLOCK_SIZE)
            .unwrap_or_else(|e| panic!("block {b}: {e}"));
        assert!(buf == fill(want), "block {b} is not {want}");
    }
}

/// c1: blocks 0..16 = 1; c2 (child of c1): blocks 0..8 = 2; Now: child of c2.
fn setup() -> (tempfile::TempDir, PathBuf, Disk) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("disk");
    Disk::create(&d, 4 << 20, None).unwrap();
    let mut w = Disk::open(&d, opts(false)).unwrap();
    write_blocks(&w, 0..16, 1);
    w.checkpoint("c1").unwrap();
    write_blocks(&w, 0..8, 2);
    w.checkpoint("c2").unwrap();
    (t, d, w)
}

#[test]
fn checkpoints_are_readable_while_a_writer_holds_the_disk() {
    let (t, d, w) = setup();
    write_blocks(&w, 0..4, 3);
    let r = Disk::open(&d, opts(true)).unwrap();
    assert!(matches!(
        r.now().read_at(&mut fill(0), 0),
        Err(Error::Unreadable { .. })
    ));
    assert_blocks(&r.checkpoint_view("c1").unwrap(), 0..16, 1);
    assert_blocks(&r.checkpoint_view("c2").unwrap(), 0..8, 2);
    let info = r.info().unwrap();
    assert_eq!(info.checkpoints, 2);
    assert!(info.now_unreadable.is_some());
    let report = r.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.skipped.len(), 1);
    assert!(matches!(
        r.export(None, &t.path().join("now.raw")),
        Err(Error::Locked(_))
    ));
    r.export(Some("c1"), &t.path().join("c1.raw")).unwrap();
    // A writer is still refused, by the writer and by the reader alike.
    assert!(matches!(Disk::open(&d, opts(false)), Err(Error::Locked(_))));
    // A reader without the lock does not keep a new writer out.
    drop(w);
    let w = Disk::open(&d, opts(false)).unwrap();
    assert_blocks(&w.now(), 0..4, 3);
    assert_blocks(&r.checkpoint_view("c1").unwrap(), 0..16, 1);
}

#[test]
fn a_reader_without_a_writer_keeps_writers_out_and_reads_now() {
    let (_t, d, w) = setup();
    write_blocks(&w, 0..4, 3);
    drop(w);
    let r1 = Disk::open(&d, opts(true)).unwrap();
    let r2 = Disk::open(&d, opts(true)).unwrap();
    assert_blocks(&r1.now(), 0..4, 3);
    assert_blocks(&r2.now(), 4..8, 2);
    assert!(matches!(Disk::open(&d, opts(false)), Err(Error::Locked(_))));
    drop((r1, r2));
    Disk::open(&d, opts(false)).unwrap();
}

#[test]
fn a_merge_in_the_writer_never_punches_blocks_a_reader_pinned() {
    let (_t, d, mut w) = setup();
    let r = Disk::open(&d, opts(true)).unwrap();
    let c1 = r.checkpoint_view("c1").unwrap();
    // c1 has one child (c2): deleting it merges its layer into c2 and would punch blocks
    // 0..8 of it (c2 overwrote them), which the reader's view of c1 still reads.
    let report = w.delete("c1", false).unwrap();
    assert_eq!(report.merged, 1);
    assert_eq!(report.kept_for_readers, 1);
    assert_blocks(&c1, 0..16, 1);
    // A view asked for after the delete is built from the tree as it is now.
    assert!(matches!(
        r.checkpoint_view("c1"),
        Err(Error::UnknownCheckpoint(_))
    ));
    assert_blocks(&r.checkpoint_view("c2").unwrap(), 0..8, 2);
    assert_blocks(&r.checkpoint_view("c2").unwrap(), 8..16, 1);
}

#[test]
fn a_view_opened_after_an_unpinned_merge_is_never_served_stale() {
    let (_t, d, mut w) = setup();
    // The reader read the tree before the delete, but opens the view after it.
    let r = Disk::open(&d, opts(true)).unwrap();
    let report = w.delete("c1", false).unwrap();
    assert_eq!(report.kept_for_readers, 0);
    assert!(
        report.bytes_freed > 0,
        "the merge punched c1's overwritten blocks"
    );
    assert!(matches!(
        r.checkpoint_view("c1"),
        Err(Error::UnknownCheckpoint(_))
    ));
}

#[test]
fn a_merge_into_now_keeps_pinned_blocks_when_now_overwrites_them() {
    let (_t, d, mut w) = setup();
    let r = Disk::open(&d, opts(true)).unwrap();
    let c2 = r.checkpoint_view("c2").unwrap();
    // c2's only child is Now: deleting c2 merges its layer into Now; Now's later overwrites
    // would free c2's blocks if the merged layer counted as Now's own.
    let report = w.delete("c2", false).unwrap();
    assert_eq!(report.merged, 1);
    write_blocks(&w, 0..8, 9);
    assert_blocks(&c2, 0..8, 2);
    assert_blocks(&c2, 8..16, 1);
    assert_blocks(&w.now(), 0..8, 9);
}

#[test]
fn a_deleted_checkpoint_stays_readable_for_a_reader_that_opened_it() {
    let (_t, d, mut w) = setup();
    w.apply("c1", None).unwrap();
    write_blocks(&w, 0..2, 7);
    w.checkpoint("side").unwrap();
    w.apply("c2", None).unwrap();
    let r = Disk::open(&d, opts(true)).unwrap();
    let side = r.checkpoint_view("side").unwrap();
    w.delete("side", false).unwrap();
    assert_blocks(&side, 0..2, 7);
    assert_blocks(&side, 2..16, 1);
    assert!(r.checkpoint_view("side").is_err());
}
