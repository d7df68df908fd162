//! Same-run A/B of a new-layer merge's copy: progressive (sources freed batch by batch, at
//! several batch sizes) against the whole-output copy, beside an io_uring copy of the same
//! bytes. Ignored (it prints numbers, asserts no timing): run with
//! `cargo test --release --test journal_merge_progressive_bench -- --ignored --nocapture`
//! (`MERGE_BENCH_DIR` picks the filesystem, default /var/tmp; `MERGE_BENCH_MIB` the size,
//! default 256).

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

fn setup(dir: &Path, data: u64, scattered: bool) {
    let size = 4 * data;
    Disk::create(dir, size, None).unwrap();
    let mut disk = open(dir);
    let now = disk.now();
    let mut rng = SmallRng::seed_from_u64(1);
    if scattered {
        let mut blocks: Vec<u64> = (0..size / 4096).collect();
        blocks.shuffle(&mut rng);
        let mut buf = vec![0u8; 4096];
        for &b in &blocks[..(data / 4096) as usize] {
            rng.fill(&mut buf[..]);
            now.write_at(&buf, b * 4096, false).unwrap();
        }
    } else {
        let mut buf = vec![0u8; MIB as usize];
        for i in 0..data / MIB {
            rng.fill(&mut buf[..]);
            now.write_at(&buf, i * MIB, false).unwrap();
        }
    }
    disk.checkpoint("a").unwrap();
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..64 {
        rng.fill(&mut buf[..]);
        let b = rng.gen_range(0..size / 4096 - 16);
        now.write_at(&buf, b * 4096, false).unwrap();
    }
    disk.checkpoint("b").unwrap();
    now.flush().unwrap();
}

fn uring_rate(dir: &Path, bytes: u64) -> f64 {
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
fn progressive_vs_whole_output() {
    let root = std::env::var_os("MERGE_BENCH_DIR").unwrap_or("/var/tmp".into());
    let mib: u64 = std::env::var("MERGE_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let t = tempfile::tempdir_in(root).unwrap();
    println!(
        "{:<10} {:<22} {:>10} {:>8} {:>8} {:>10} {:>10}",
        "layout", "mode", "copied MiB", "copy s", "MB/s", "uring MB/s", "peak MiB"
    );
    for scattered in [false, true] {
        let modes: [(&str, bool, Option<u64>); 4] = [
            ("whole-output", false, None),
            ("progressive 8M", true, Some(8 * MIB)),
            ("progressive 32M", true, Some(32 * MIB)),
            ("whole-output again", false, None),
        ];
        for (label, progressive, batch) in modes {
            let dir = t.path().join("disk");
            let _ = std::fs::remove_dir_all(&dir);
            setup(&dir, mib * MIB, scattered);
            let mut disk = open(&dir);
            let opts = DeleteOptions {
                progressive,
                batch_bytes: batch,
                ..DeleteOptions::with(StrategyKind::CompactIntoChild)
            };
            let (_, jobs) = disk.delete_online("a", &opts).unwrap();
            let (mut copied, mut secs, mut peak) = (0, 0.0, 0);
            for mut j in jobs {
                let t1 = Instant::now();
                j.run(&AtomicBool::new(false)).unwrap();
                secs += t1.elapsed().as_secs_f64();
                let r = disk.finish_merge(j).unwrap();
                copied += r.bytes_copied;
                peak = peak.max(r.peak_extra_bytes);
            }
            let base = uring_rate(t.path(), copied);
            let rate = copied as f64 / secs / 1e6;
            println!(
                "{:<10} {:<22} {:>10.1} {:>8.3} {:>8.0} {:>10.0} {:>10.1}  ({:.2}x)",
                if scattered { "scattered" } else { "sequential" },
                label,
                copied as f64 / MIB as f64,
                secs,
                rate,
                base,
                peak as f64 / MIB as f64,
                rate / base
            );
            assert!(disk.check().unwrap().is_clean());
        }
    }
}
