//! Merge copy rates against an io_uring copy of the same bytes on the same filesystem, in the
//! same run. Ignored (they print numbers and assert no timing): run with
//! `cargo test --release --test journal_merge_bench -- --ignored --nocapture --test-threads 1`.
//!
//! - `merge_rate_vs_uring_copy`: each strategy deletes a checkpoint holding 256 MiB
//!   (scattered 4 KiB writes in random order, or 1 MiB sequential writes).
//! - `progressive_vs_whole_output`: a new-layer merge (compact-into-child) freeing its
//!   sources batch by batch at two batch sizes, and keeping them until the swap, each cell
//!   between two io_uring copies of the same bytes (A B A, the copies interleaved with the
//!   cells), `MERGE_BENCH_ROUNDS` rounds (default 3); prints every cell and the median ratio.
//!
//! `MERGE_BENCH_DIR` picks the filesystem (default /var/tmp), `MERGE_BENCH_MIB` the size
//! (default 256), `MERGE_BENCH_QD` the merge's queue depth (default 32).

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

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bench_root() -> tempfile::TempDir {
    let root = std::env::var_os("MERGE_BENCH_DIR").unwrap_or("/var/tmp".into());
    tempfile::tempdir_in(root).unwrap()
}

/// A disk of 4 x `data` bytes with checkpoint "a" holding `data` bytes (scattered 4 KiB
/// writes in random order, or 1 MiB sequential writes) and its child "b" holding `tail`
/// 64 KiB writes at random places.
fn setup(dir: &Path, data: u64, scattered: bool, tail: usize) {
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
    for _ in 0..tail {
        rng.fill(&mut buf[..]);
        let b = rng.gen_range(0..size / 4096 - 16);
        now.write_at(&buf, b * 4096, false).unwrap();
    }
    disk.checkpoint("b").unwrap();
    now.flush().unwrap();
}

/// Copies the disk directory `from` to `to` (every file fsynced: the merge reads it with
/// O_DIRECT from the device, as a cold disk).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type().unwrap().is_dir() {
            copy_dir(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
            std::fs::File::open(&dst).unwrap().sync_all().unwrap();
        }
    }
}

/// A file of `bytes` random bytes for [`baseline`].
fn baseline_source(dir: &Path, bytes: u64) -> std::path::PathBuf {
    let src_path = dir.join("baseline.src");
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
    src_path
}

/// MB/s of an io_uring copy (O_DIRECT, 128 KiB requests, 32 in flight) of the first `bytes`
/// bytes of `src_path` to a new file beside it, including its fsync.
fn baseline(src_path: &Path, bytes: u64) -> f64 {
    let dst_path = src_path.with_extension("dst");
    let src = FsOpen::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(src_path)
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
    drop(dst);
    let _ = std::fs::remove_file(&dst_path);
    bytes as f64 / secs / 1e6
}

/// Deletes "a" with `opts`, runs and finishes its jobs: (bytes copied, copy seconds, peak
/// extra bytes).
fn merge(dir: &Path, opts: &DeleteOptions) -> (u64, f64, u64) {
    let mut disk = open(dir);
    let (_, jobs) = disk.delete_online("a", opts).unwrap();
    let (mut copied, mut secs, mut peak) = (0, 0.0, 0);
    for mut j in jobs {
        let t1 = Instant::now();
        j.run(&AtomicBool::new(false)).unwrap();
        secs += t1.elapsed().as_secs_f64();
        let r = disk.finish_merge(j).unwrap();
        copied += r.bytes_copied;
        peak = peak.max(r.peak_extra_bytes);
    }
    assert!(disk.check().unwrap().is_clean());
    (copied, secs, peak)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[test]
#[ignore = "benchmark: prints numbers"]
fn merge_rate_vs_uring_copy() {
    let t = bench_root();
    let data = env_u64("MERGE_BENCH_MIB", 256) * MIB;
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
            setup(&dir, data, scattered, 256);
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
                let src = baseline_source(t.path(), copied);
                let b = baseline(&src, copied);
                let _ = std::fs::remove_file(src);
                b
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

#[test]
#[ignore = "benchmark: prints numbers"]
fn progressive_vs_whole_output() {
    let t = bench_root();
    let data = env_u64("MERGE_BENCH_MIB", 256) * MIB;
    let rounds = env_u64("MERGE_BENCH_ROUNDS", 3);
    let qd = env_u64("MERGE_BENCH_QD", 32) as u32;
    let modes: [(&str, bool, Option<u64>); 3] = [
        ("whole-output", false, None),
        ("progressive 8M", true, Some(8 * MIB)),
        ("progressive 32M", true, Some(32 * MIB)),
    ];
    println!(
        "{:<10} {:<16} {:>5} {:>10} {:>8} {:>8} {:>10} {:>9} {:>7}",
        "layout",
        "mode",
        "round",
        "copied MiB",
        "copy s",
        "MB/s",
        "uring MB/s",
        "peak MiB",
        "ratio"
    );
    let mut summary = Vec::new();
    for scattered in [true, false] {
        let layout = if scattered { "scattered" } else { "sequential" };
        let template = t.path().join("template");
        let _ = std::fs::remove_dir_all(&template);
        setup(&template, data, scattered, 64);
        let src = baseline_source(t.path(), data + 8 * MIB);
        let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        let mut peaks = vec![0u64; modes.len()];
        let mut before = baseline(&src, data);
        for round in 0..rounds {
            for (m, &(label, progressive, batch)) in modes.iter().enumerate() {
                let dir = t.path().join("disk");
                let _ = std::fs::remove_dir_all(&dir);
                copy_dir(&template, &dir);
                let opts = DeleteOptions {
                    progressive,
                    batch_bytes: batch,
                    queue_depth: qd,
                    ..DeleteOptions::with(StrategyKind::CompactIntoChild)
                };
                let (copied, secs, peak) = merge(&dir, &opts);
                let after = baseline(&src, copied);
                let rate = copied as f64 / secs / 1e6;
                let base = (before + after) / 2.0;
                ratios[m].push(rate / base);
                peaks[m] = peaks[m].max(peak);
                println!(
                    "{:<10} {:<16} {:>5} {:>10.1} {:>8.3} {:>8.0} {:>10.0} {:>9.1} {:>6.2}x",
                    layout,
                    label,
                    round,
                    copied as f64 / MIB as f64,
                    secs,
                    rate,
                    base,
                    peak as f64 / MIB as f64,
                    rate / base
                );
                before = after;
            }
        }
        for (m, &(label, _, _)) in modes.iter().enumerate() {
            let mut r = ratios[m].clone();
            let (lo, hi) = r
                .iter()
                .fold((f64::MAX, 0f64), |(l, h), &x| (l.min(x), h.max(x)));
            summary.push(format!(
                "{layout:<10} {label:<16} x uring copy: median {:.2} [{lo:.2}-{hi:.2}], peak extra {:.1} MiB",
                median(&mut r),
                peaks[m] as f64 / MIB as f64
            ));
        }
        let _ = std::fs::remove_file(src);
    }
    println!();
    for l in summary {
        println!("{l}");
    }
}
