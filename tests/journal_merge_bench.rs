//! Merge throughput against an io_uring copy of the same bytes on the same filesystem.
//! Ignored (it prints numbers, asserts no timing): run with
//! `cargo test --release --test journal_merge_bench -- --ignored --nocapture`
//! (`MERGE_BENCH_DIR` picks the filesystem, default /var/tmp).

use std::fs::OpenOptions as FsOpen;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use journal::{CacheMode, DeleteOptions, Disk, OpenOptions, StrategyKind};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;
const DISK: u64 = 1 << 30;
const DATA: u64 = 256 * MIB;

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

/// A disk with checkpoint "a" holding 256 MiB (scattered 4 KiB writes in random order, or
/// 1 MiB sequential writes) and its child "b" holding 16 MiB.
fn setup(dir: &Path, scattered: bool) -> u64 {
    Disk::create(dir, DISK, None).unwrap();
    let mut disk = open(dir);
    let now = disk.now();
    let mut rng = SmallRng::seed_from_u64(1);
    if scattered {
        let mut blocks: Vec<u64> = (0..DISK / 4096).collect();
        blocks.shuffle(&mut rng);
        let mut buf = vec![0u8; 4096];
        for &b in &blocks[..(DATA / 4096) as usize] {
            rng.fill(&mut buf[..]);
            now.write_at(&buf, b * 4096, false).unwrap();
        }
    } else {
        let mut buf = vec![0u8; MIB as usize];
        for i in 0..DATA / MIB {
            rng.fill(&mut buf[..]);
            now.write_at(&buf, i * MIB, false).unwrap();
        }
    }
    disk.checkpoint("a").unwrap();
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..256 {
        rng.fill(&mut buf[..]);
        let b = rng.gen_range(0..DISK / 4096 - 16);
        now.write_at(&buf, b * 4096, false).unwrap();
    }
    disk.checkpoint("b").unwrap();
    disk.list()[0].id
}

/// MB/s of an io_uring copy of `bytes` bytes of a file in `dir` to a new file there.
fn baseline(dir: &Path, bytes: u64) -> f64 {
    let src_path = dir.join("baseline.src");
    let dst_path = dir.join("baseline.dst");
    {
        let f = std::fs::File::create(&src_path).unwrap();
        let mut rng = SmallRng::seed_from_u64(2);
        let mut buf = vec![0u8; MIB as usize];
        let mut off = 0;
        while off < bytes {
            let n = MIB.min(bytes - off) as usize;
            rng.fill(&mut buf[..n]);
            std::os::unix::fs::FileExt::write_all_at(&f, &buf[..n], off).unwrap();
            off += n as u64;
        }
        f.sync_all().unwrap();
    }
    let src = FsOpen::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&src_path)
        .unwrap();
    let dst = FsOpen::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dst_path)
        .unwrap();
    let t = Instant::now();
    journal::uring_copy(&src, &dst, bytes, 32).unwrap();
    dst.sync_all().unwrap();
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&src_path);
    let _ = std::fs::remove_file(&dst_path);
    bytes as f64 / secs / 1e6
}

#[test]
#[ignore = "benchmark: prints numbers"]
fn merge_rate_vs_uring_copy() {
    let root = std::env::var_os("MERGE_BENCH_DIR").unwrap_or("/var/tmp".into());
    let t = tempfile::tempdir_in(root).unwrap();
    println!(
        "{:<10} {:<20} {:>10} {:>10} {:>9} {:>10} {:>9}",
        "layout", "strategy", "delete ms", "copied MiB", "copy s", "MB/s", "uring MB/s"
    );
    for scattered in [false, true] {
        for kind in [
            StrategyKind::CompactIntoChild,
            StrategyKind::CompactIntoParent,
            StrategyKind::Auto,
            StrategyKind::Relink,
        ] {
            let dir = t.path().join("disk");
            let _ = std::fs::remove_dir_all(&dir);
            setup(&dir, scattered);
            let mut disk = open(&dir);
            let t0 = Instant::now();
            let (_, jobs) = disk.delete_online("a", &DeleteOptions::with(kind)).unwrap();
            let delete_ms = t0.elapsed().as_secs_f64() * 1e3;
            let mut copied = 0;
            let mut secs = 0.0;
            for mut j in jobs {
                let t1 = Instant::now();
                j.run(&AtomicBool::new(false)).unwrap();
                secs += t1.elapsed().as_secs_f64();
                let r = disk.finish_merge(j).unwrap();
                copied += r.bytes_copied;
            }
            // The same bytes with a plain io_uring copy, right after, on the same filesystem.
            let base = if copied > 0 {
                baseline(t.path(), copied)
            } else {
                0.0
            };
            let rate = if secs > 0.0 {
                copied as f64 / secs / 1e6
            } else {
                0.0
            };
            println!(
                "{:<10} {:<20} {:>10.1} {:>10.1} {:>9.3} {:>10.0} {:>9.0}{}",
                if scattered { "scattered" } else { "sequential" },
                kind.to_string(),
                delete_ms,
                copied as f64 / MIB as f64,
                secs,
                rate,
                base,
                if base > 0.0 {
                    format!("  ({:.2}x)", rate / base)
                } else {
                    String::new()
                }
            );
            assert!(disk.check().unwrap().is_clean());
        }
    }
}
