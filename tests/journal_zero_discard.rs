//! A discard or WRITE_ZEROES of space that already reads as zeros writes nothing: no zero
//! record per block, no index entry, no log growth. (`mkfs.ext4` and `fstrim` in a guest
//! discard whole disks; one record per never-written block made a 512 MB log and 820 MB of
//! index for a fresh 64 GiB disk.)

use journal::{CacheMode, Disk, OpenOptions};

fn log_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir.join("layers"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

#[test]
fn discarding_never_written_space_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("disk");
    Disk::create(&dir, 64 << 30, None).unwrap();
    let opts = OpenOptions {
        cache: CacheMode::Writeback,
        read_only: false,
    };
    let disk = Disk::open(&dir, opts).unwrap();
    let now = disk.now();
    let empty_log = log_bytes(&dir);
    now.discard(0, 64 << 30).unwrap();
    now.write_zeroes(0, 64 << 30, true).unwrap();
    now.flush().unwrap();
    assert_eq!(
        log_bytes(&dir),
        empty_log,
        "zero records were written for zeros"
    );
    assert_eq!(now.index_stats().0, 0, "the index grew");

    // Data, then a discard over it and its never-written surroundings: records only for
    // the blocks that held data, and they read back as zeros.
    now.write_at(&[7u8; 8192], 1 << 30, false).unwrap();
    now.flush().unwrap();
    let with_data = log_bytes(&dir);
    now.discard(0, 64 << 30).unwrap();
    now.flush().unwrap();
    assert_eq!(
        log_bytes(&dir),
        with_data + 2 * 32,
        "one zero record per data block"
    );
    let mut b = vec![1u8; 8192];
    now.read_at(&mut b, 1 << 30).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    drop(now);
    drop(disk);
    let disk = Disk::open(&dir, opts).unwrap();
    let mut b = vec![1u8; 8192];
    disk.now().read_at(&mut b, 1 << 30).unwrap();
    assert!(
        b.iter().all(|&x| x == 0),
        "the discard did not survive a reopen"
    );
    assert!(disk.check().unwrap().is_clean());
}
