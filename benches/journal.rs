//! CPU cost of the journal on tmpfs (/dev/shm: no device time, so what remains is lookup,
//! checksum, allocation and io_uring overhead):
//! - a 4 KiB read (index lookup + read + checksum) through `Volume::read_at` at chain depth 1
//!   and 64, and through `IoEngine` at queue depth 32;
//! - 4 KiB random writes at queue depth 32 through `IoEngine`, against a raw file on the same
//!   tmpfs driven on io_uring the same way.
//!
//! Small samples keep the whole run under a minute. Compare the numbers of one run only.

use std::fs::OpenOptions as FsOpenOptions;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use engine::bench::pattern::{layer_writes, LayerWrites, Permutation, BLOCK};
use engine::bench::rawring::RawRing;
use journal::{AlignedBuf, CacheMode, Completion, Disk, IoEngine, OpenOptions, Request, Volume};

const DISK_SIZE: u64 = 64 << 20;
const WRITES_PER_LAYER: u64 = 256;
const DEPTH: usize = 64;
const QD: usize = 32;
/// Writes between two flushes (bounds the tmpfs space the benchmark uses).
const FLUSH_EVERY: usize = 2048;

/// Ends the benchmark with a message instead of a panic when setup fails.
fn must<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => {
            eprintln!("benches/journal: {what}: {e}");
            std::process::exit(1);
        }
    }
}

fn shm_dir() -> tempfile::TempDir {
    if !Path::new("/dev/shm").is_dir() {
        eprintln!("benches/journal: /dev/shm (tmpfs) is needed");
        std::process::exit(1);
    }
    must(
        tempfile::tempdir_in("/dev/shm"),
        "creating a directory in /dev/shm",
    )
}

/// A disk with checkpoints c1..c64, layer i holding 256 scattered writes of byte i.
fn build_disk(dir: &Path) -> Vec<LayerWrites> {
    must(Disk::create(dir, DISK_SIZE, None), "creating the disk");
    let mut disk = must(
        Disk::open(
            dir,
            OpenOptions {
                cache: CacheMode::Writeback,
                read_only: false,
            },
        ),
        "opening",
    );
    let layers: Vec<LayerWrites> = (1..=DEPTH)
        .map(|l| layer_writes(l, DISK_SIZE, WRITES_PER_LAYER))
        .collect();
    let now = disk.now();
    for l in &layers {
        let data = vec![l.byte; BLOCK as usize];
        for &off in &l.offsets {
            must(now.write_at(&data, off, false), "writing a layer");
        }
        must(disk.checkpoint(&format!("c{}", l.layer)), "checkpointing");
    }
    layers
}

/// Offsets held by layer 1 and by no later layer: the deepest possible lookup for a chain.
fn bottom_offsets(layers: &[LayerWrites]) -> Vec<u64> {
    let later: std::collections::HashSet<u64> = layers[1..]
        .iter()
        .flat_map(|l| l.offsets.iter().copied())
        .collect();
    layers[0]
        .offsets
        .iter()
        .copied()
        .filter(|o| !later.contains(o))
        .collect()
}

fn read_batch(engine: &mut IoEngine, offsets: &[u64], out: &mut Vec<Completion>) {
    for (i, &offset) in offsets.iter().enumerate() {
        must(
            engine.submit(i as u64, Request::Read { offset, len: BLOCK }),
            "submitting a read",
        );
    }
    out.clear();
    must(engine.wait(offsets.len(), out), "waiting for reads");
    for c in out.iter() {
        if let Err(e) = &c.result {
            must(Err::<(), _>(e.to_string()), "a read failed");
        }
    }
}

fn reads(c: &mut Criterion) {
    let tmp = shm_dir();
    let dir = tmp.path().join("disk");
    let layers = build_disk(&dir);
    let offsets = bottom_offsets(&layers);
    let disk = must(
        Disk::open(
            &dir,
            OpenOptions {
                cache: CacheMode::Writeback,
                read_only: true,
            },
        ),
        "opening",
    );
    let mut g = c.benchmark_group("read_4k");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(1500));
    for depth in [1, DEPTH] {
        let view: Arc<Volume> = must(
            disk.checkpoint_view(&format!("c{depth}")),
            "opening a checkpoint view",
        );
        let mut buf = vec![0u8; BLOCK as usize];
        let mut i = 0;
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("read_at/depth{depth}"), |b| {
            b.iter(|| {
                i = (i + 1) % offsets.len();
                must(view.read_at(&mut buf, offsets[i]), "read_at");
                black_box(&buf);
            })
        });
        let mut engine = must(
            IoEngine::new(view.clone(), QD as u32),
            "creating an IoEngine",
        );
        let mut out = Vec::with_capacity(QD);
        let mut start = 0;
        g.throughput(Throughput::Elements(QD as u64));
        g.bench_function(format!("io_engine_qd{QD}/depth{depth}"), |b| {
            b.iter(|| {
                start = (start + QD) % (offsets.len() - QD);
                read_batch(&mut engine, &offsets[start..start + QD], &mut out);
            })
        });
    }
    g.finish();
}

fn writes(c: &mut Criterion) {
    let tmp = shm_dir();
    let dir = tmp.path().join("disk");
    must(Disk::create(&dir, DISK_SIZE, None), "creating the disk");
    let disk = must(
        Disk::open(
            &dir,
            OpenOptions {
                cache: CacheMode::Writeback,
                read_only: false,
            },
        ),
        "opening",
    );
    let offsets: Vec<u64> = Permutation::new(DISK_SIZE / BLOCK, 11)
        .map(|b| b * BLOCK)
        .collect();
    let template = vec![0x5au8; BLOCK as usize];
    let mut g = c.benchmark_group("randwrite_4k_qd32");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(1500));
    g.throughput(Throughput::Elements(QD as u64));

    let mut engine = must(IoEngine::new(disk.now(), QD as u32), "creating an IoEngine");
    let mut out: Vec<Completion> = Vec::with_capacity(QD);
    let mut pos = 0;
    let mut since_flush = 0;
    g.bench_function("journal_io_engine", |b| {
        b.iter(|| {
            for k in 0..QD {
                let offset = offsets[(pos + k) % offsets.len()];
                let req = Request::Write {
                    offset,
                    buf: AlignedBuf::from_slice(&template),
                    fua: false,
                };
                must(engine.submit(k as u64, req), "submitting a write");
            }
            pos = (pos + QD) % offsets.len();
            out.clear();
            must(engine.wait(QD, &mut out), "waiting for writes");
            if out.iter().any(|c| c.result.is_err()) {
                must(Err::<(), _>("a write failed"), "journal write");
            }
            since_flush += QD;
            if since_flush >= FLUSH_EVERY {
                since_flush = 0;
                must(engine.volume().flush(), "flush");
            }
        })
    });

    let raw_path = tmp.path().join("raw");
    let raw = must(
        FsOpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&raw_path),
        "creating the raw file",
    );
    must(raw.set_len(DISK_SIZE), "sizing the raw file");
    let mut ring = must(
        RawRing::new(raw, QD as u32, BLOCK as usize, 0x5a),
        "creating the raw ring",
    );
    let mut pos = 0;
    let mut since_flush = 0;
    g.bench_function("raw_file_io_uring", |b| {
        b.iter(|| {
            let end = (pos + QD).min(offsets.len());
            must(ring.run(&offsets[pos..end], true), "raw writes");
            pos = if end == offsets.len() { 0 } else { end };
            since_flush += QD;
            if since_flush >= FLUSH_EVERY {
                since_flush = 0;
                must(ring.file().sync_data(), "fdatasync");
            }
        })
    });
    g.finish();
}

criterion_group!(benches, reads, writes);
criterion_main!(benches);
