//! Unit tests of the journal's behaviour through its public API, on real files.

use std::path::Path;

use crate::{AlignedBuf, CacheMode, Completion, Disk, Error, IoEngine, OpenOptions, Request};

const MIB: u64 = 1 << 20;

fn open(dir: &Path) -> Disk {
    Disk::open(
        dir,
        OpenOptions {
            cache: CacheMode::None,
            read_only: false,
        },
    )
    .unwrap()
}

fn new_disk(size: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("disk");
    Disk::create(&d, size, None).unwrap();
    (t, d)
}

fn read(disk: &Disk, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    disk.now().read_at(&mut b, off).unwrap();
    b
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("layers")).unwrap();
    for e in std::fs::read_dir(from)
        .unwrap()
        .chain(std::fs::read_dir(from.join("layers")).unwrap())
    {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            let rel = e.path().strip_prefix(from).unwrap().to_path_buf();
            std::fs::copy(e.path(), to.join(rel)).unwrap();
        }
    }
}

#[test]
fn unaligned_reads_and_writes_round_trip() {
    let (_t, d) = new_disk(4 * MIB);
    let disk = open(&d);
    let now = disk.now();
    let mut model = vec![0u8; 4 * MIB as usize];
    let writes: &[(u64, usize, u8)] = &[
        (0, 4096, 1),
        (512, 512, 2),
        (4096 * 3 - 512, 1024, 3),
        (8192 + 1536, 9 * 512, 4),
        (4 * MIB - 512, 512, 5),
    ];
    for &(off, len, v) in writes {
        let data: Vec<u8> = (0..len).map(|i| v.wrapping_add(i as u8)).collect();
        now.write_at(&data, off, false).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    for (off, len) in [
        (0u64, 4 * MIB as usize),
        (512, 512),
        (1024, 8192 + 512),
        (4 * MIB - 4096, 4096),
    ] {
        assert_eq!(
            read(&disk, off, len),
            model[off as usize..off as usize + len],
            "at {off}+{len}"
        );
    }
    now.write_at(&[9u8; 100], 3, false).unwrap();
    model[3..103].fill(9);
    assert_eq!(read(&disk, 0, 8192), model[..8192]);
    assert!(matches!(
        now.write_at(&[0u8; 512], 4 * MIB, false),
        Err(Error::OutOfRange { .. })
    ));
    let mut b = [0u8; 512];
    assert!(matches!(
        now.read_at(&mut b, 4 * MIB),
        Err(Error::OutOfRange { .. })
    ));
}

#[test]
fn zeroes_and_discard_never_change_a_checkpoint() {
    let (_t, d) = new_disk(MIB);
    let mut disk = open(&d);
    disk.now().write_at(&[7u8; 16384], 0, false).unwrap();
    disk.checkpoint("c1").unwrap();
    disk.now().write_zeroes(512, 4096 + 1024, false).unwrap();
    disk.now().discard(8192, 8192).unwrap();
    let now = read(&disk, 0, 16384);
    assert_eq!(&now[..512], &[7u8; 512][..]);
    assert!(now[512..512 + 5120].iter().all(|&b| b == 0));
    assert_eq!(&now[5632..8192], &[7u8; 2560][..]);
    assert!(now[8192..].iter().all(|&b| b == 0));
    let mut c = vec![0u8; 16384];
    disk.checkpoint_view("c1")
        .unwrap()
        .read_at(&mut c, 0)
        .unwrap();
    assert_eq!(c, vec![7u8; 16384]);
}

#[test]
fn tree_operations_keep_every_view_intact() {
    let (_t, d) = new_disk(MIB);
    let mut disk = open(&d);
    let blk = |v: u8| vec![v; 4096];
    disk.now().write_at(&blk(1), 0, false).unwrap();
    disk.checkpoint("a").unwrap();
    disk.now().write_at(&blk(2), 4096, false).unwrap();
    disk.checkpoint("b").unwrap();
    disk.now().write_at(&blk(3), 0, false).unwrap();
    // Branch from a.
    disk.apply("a", Some("c")).unwrap();
    assert_eq!(read(&disk, 0, 8192), [blk(1), vec![0; 4096]].concat());
    disk.now().write_at(&blk(4), 8192, false).unwrap();
    assert!(matches!(disk.checkpoint("a"), Err(Error::DuplicateName(_))));
    assert!(matches!(
        disk.apply("zz", None),
        Err(Error::UnknownCheckpoint(_))
    ));
    // a has two children (b and Now): deleting it hides it.
    let r = disk.delete("a", false).unwrap();
    assert_eq!(r.hidden, 1);
    let view = |disk: &Disk, n: &str| {
        let mut v = vec![0u8; 12288];
        disk.checkpoint_view(n).unwrap().read_at(&mut v, 0).unwrap();
        v
    };
    assert_eq!(view(&disk, "b"), [blk(1), blk(2), vec![0; 4096]].concat());
    assert_eq!(view(&disk, "c"), [blk(3), blk(2), vec![0; 4096]].concat());
    assert_eq!(
        read(&disk, 0, 12288),
        [blk(1), vec![0; 4096], blk(4)].concat()
    );
    // Deleting b (a leaf with child c) merges b into c.
    let r = disk.delete("b", false).unwrap();
    assert_eq!(r.merged, 1);
    assert_eq!(view(&disk, "c"), [blk(3), blk(2), vec![0; 4096]].concat());
    disk.rename("c", "c2").unwrap();
    assert!(disk.checkpoint_view("c").is_err());
    // Deleting c2 leaves the hidden a with one child (Now): it merges into Now.
    disk.delete("c2", false).unwrap();
    assert_eq!(disk.list().len(), 0);
    assert_eq!(
        read(&disk, 0, 12288),
        [blk(1), vec![0; 4096], blk(4)].concat()
    );
    drop(disk);
    let disk = open(&d);
    assert_eq!(
        read(&disk, 0, 12288),
        [blk(1), vec![0; 4096], blk(4)].concat()
    );
    assert!(disk.check().unwrap().is_clean());
    // Only Now's one layer stack remains on disk.
    let files = std::fs::read_dir(d.join("layers")).unwrap().count();
    assert_eq!(files, 4, "two layers (a merged into Now) of two files each");
}

#[test]
fn delete_frees_overwritten_blocks() {
    let (_t, d) = new_disk(64 * MIB);
    let mut disk = open(&d);
    let data = vec![9u8; 4 * MIB as usize];
    disk.now().write_at(&data, 0, false).unwrap();
    disk.checkpoint("old").unwrap();
    disk.now().write_at(&data, 0, false).unwrap();
    disk.now().flush().unwrap();
    let before = disk.info().unwrap().allocated_bytes;
    let r = disk.delete("old", false).unwrap();
    let after = disk.info().unwrap().allocated_bytes;
    assert!(r.bytes_freed >= 4 * MIB, "freed {}", r.bytes_freed);
    assert!(before - after >= 4 * MIB, "before {before} after {after}");
    assert_eq!(read(&disk, 0, 4 * MIB as usize), data);
    assert!(disk.check().unwrap().is_clean());
}

#[test]
fn flushed_writes_survive_a_crash_and_unflushed_tail_is_dropped() {
    let (t, d) = new_disk(MIB);
    let disk = open(&d);
    disk.now().write_at(&[1u8; 8192], 0, false).unwrap();
    disk.now().flush().unwrap();
    disk.now().write_at(&[2u8; 4096], 0, false).unwrap();
    // A "crash" image: the files as they are now, before any further flush.
    let crashed = t.path().join("crashed");
    copy_dir(&d, &crashed);
    // Append a torn half record to the log, as a power cut mid-append would.
    let log = crashed.join("layers/L1.log");
    let mut bytes = std::fs::read(&log).unwrap();
    bytes.extend_from_slice(&[0xab; 13]);
    std::fs::write(&log, bytes).unwrap();
    let c = open(&crashed);
    assert_eq!(read(&c, 0, 8192), vec![1u8; 8192]);
    assert!(c.check().unwrap().is_clean());
    c.now().write_at(&[3u8; 4096], 4096, true).unwrap();
    drop(c);
    let c = open(&crashed);
    assert_eq!(
        read(&c, 0, 8192),
        [vec![1u8; 4096], vec![3u8; 4096]].concat()
    );
}

#[test]
fn corruption_is_detected_not_served() {
    let (_t, d) = new_disk(MIB);
    let disk = open(&d);
    disk.now().write_at(&[5u8; 8192], 0, true).unwrap();
    drop(disk);
    let data = d.join("layers/L1.data");
    let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x55], 4096 + 100).unwrap();
    let disk = open(&d);
    let mut b = vec![0u8; 4096];
    disk.now().read_at(&mut b, 0).unwrap();
    assert!(matches!(
        disk.now().read_at(&mut b, 4096),
        Err(Error::Corrupt { .. })
    ));
    let report = disk.check().unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        report.problems[0].contains("disk offset 4096"),
        "{}",
        report.problems[0]
    );
}

#[test]
fn lock_base_and_bad_input() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base.raw");
    std::fs::write(&base, vec![0x42u8; 2 * MIB as usize]).unwrap();
    let d = t.path().join("d");
    assert!(matches!(
        Disk::create(&d, 1000, None),
        Err(Error::BadSize(1000))
    ));
    assert!(!d.exists(), "a failed create leaves nothing");
    Disk::create(&d, 4 * MIB, Some(&base)).unwrap();
    assert!(matches!(
        Disk::create(&d, 4 * MIB, None),
        Err(Error::AlreadyExists(_))
    ));
    let disk = open(&d);
    assert!(matches!(
        Disk::open(&d, OpenOptions::default()),
        Err(Error::Locked(_))
    ));
    assert_eq!(
        read(&disk, 2 * MIB - 512, 1024),
        [vec![0x42u8; 512], vec![0; 512]].concat()
    );
    drop(disk);
    std::fs::write(&base, vec![0x43u8; 2 * MIB as usize]).unwrap();
    assert!(matches!(
        Disk::open(&d, OpenOptions::default()),
        Err(Error::BaseChanged { .. })
    ));
    assert!(matches!(
        Disk::open(t.path(), OpenOptions::default()),
        Err(Error::NotADisk(_))
    ));
}

#[test]
fn io_engine_many_in_flight() {
    let (_t, d) = new_disk(16 * MIB);
    let disk = open(&d);
    let mut eng = IoEngine::new(disk.now(), 32).unwrap();
    let mut model = vec![0u8; 16 * MIB as usize];
    let mut out: Vec<Completion> = Vec::new();
    for i in 0..200u64 {
        let off = (i * 7919 % 4000) * 4096;
        let len = if i % 5 == 0 {
            512 * 3
        } else {
            4096 * (1 + i % 4)
        };
        let v = (i % 251) as u8;
        let off = off.min(16 * MIB - len);
        let data = vec![v; len as usize];
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        eng.submit(
            i,
            Request::Write {
                offset: off,
                buf: AlignedBuf::from_slice(&data),
                fua: false,
            },
        )
        .unwrap();
        if eng.in_flight() >= 32 {
            eng.wait(1, &mut out).unwrap();
        }
    }
    eng.wait(usize::MAX, &mut out).unwrap();
    eng.submit(1000, Request::Flush).unwrap();
    eng.submit(
        1001,
        Request::WriteZeroes {
            offset: 0,
            len: 8192,
            fua: false,
        },
    )
    .unwrap();
    eng.submit(
        1002,
        Request::Read {
            offset: 3,
            len: 512,
        },
    )
    .unwrap();
    eng.wait(usize::MAX, &mut out).unwrap();
    model[..8192].fill(0);
    assert_eq!(out.len(), 203);
    for c in &out {
        if c.token == 1002 {
            let got = c.result.as_ref().expect("an unaligned read succeeds");
            assert_eq!(got.as_ref().map(|b| b.len()), Some(512));
        } else {
            assert!(c.result.is_ok(), "token {}: {:?}", c.token, c.result);
        }
    }
    out.clear();
    for (i, chunk) in (0..16 * MIB).step_by(MIB as usize).enumerate() {
        eng.submit(
            i as u64,
            Request::Read {
                offset: chunk,
                len: MIB,
            },
        )
        .unwrap();
    }
    eng.submit(
        99,
        Request::Read {
            offset: 512,
            len: 4096,
        },
    )
    .unwrap();
    eng.wait(usize::MAX, &mut out).unwrap();
    for c in out {
        let buf = c.result.unwrap().unwrap();
        let off = if c.token == 99 { 512 } else { c.token * MIB };
        assert_eq!(
            buf.as_slice(),
            &model[off as usize..off as usize + buf.len()],
            "read {}",
            c.token
        );
    }
}
