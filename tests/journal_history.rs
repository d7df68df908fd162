//! Long histories of Now's active layer: its log, data file and index follow live data,
//! not the number of writes ever made. Discards of space that already reads as zeros write
//! nothing; superseded records are compacted away; freed data blocks are reused, also
//! across a SIGKILL of a process writing (checked against a model).

mod journal_common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use journal_common::allocated;

use journal::{Disk, OpenOptions, Volume, BLOCK_SIZE, COMPACT_MIN_RECORDS, COMPACT_RATIO};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Bytes of a log header (docs/FORMAT.md) and of one record.
const LOG_HEADER: u64 = 64;
const RECORD: u64 = 32;
const BS: usize = BLOCK_SIZE as usize;

fn open(dir: &Path) -> Disk {
    journal_common::open(dir, OpenOptions::default().cache)
}

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// Paths of the log and data file of Now's active layer.
fn active_files(disk: &Disk) -> (std::path::PathBuf, std::path::PathBuf) {
    let id = *journal_common::now_layers(disk.dir())
        .last()
        .expect("Now has a layer");
    journal_common::layer_paths(disk.dir(), id)
}

#[test]
fn discarding_space_that_reads_as_zeros_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("disk");
    let size: u64 = 64 << 30;
    Disk::create(&dir, size, None).unwrap();
    let disk = open(&dir);
    let (log, data) = active_files(&disk);
    let now = disk.now();
    // What mkfs and fstrim do on a fresh disk.
    now.discard(0, size).unwrap();
    now.write_zeroes(0, size, true).unwrap();
    now.flush().unwrap();
    assert_eq!(len(&log), LOG_HEADER, "no record for never-written blocks");
    assert_eq!(now.index_stats().0, 0, "the index does not grow");
    assert_eq!(len(&data), 0);
    // Partial end blocks are read-modify-written; the whole block between gets nothing.
    now.discard(100, 2 * BLOCK_SIZE).unwrap();
    now.flush().unwrap();
    assert_eq!(len(&log), LOG_HEADER + 2 * RECORD);
    // Written blocks get one zero record each, once.
    let at = 1u64 << 30;
    now.write_at(&vec![7u8; 1 << 20], at, false).unwrap();
    now.discard(0, size).unwrap();
    now.flush().unwrap();
    let blocks = (1u64 << 20) / BLOCK_SIZE;
    // A zero record for each written block, and for the two partial blocks written above.
    let after = LOG_HEADER + (2 + blocks + blocks + 2) * RECORD;
    assert_eq!(len(&log), after);
    now.discard(0, size).unwrap();
    now.write_zeroes(at, 1 << 20, false).unwrap();
    now.flush().unwrap();
    assert_eq!(len(&log), after, "zeros over zeros write nothing");
    let mut buf = vec![1u8; 1 << 20];
    now.read_at(&mut buf, at).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    drop(now);
    drop(disk);
    let disk = open(&dir);
    assert_eq!(disk.now().index_stats().0 as u64, 2 + blocks);
    assert_eq!(len(&log), after);
}

#[test]
fn discard_over_a_base_writes_records_only_where_the_base_has_data() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base.raw");
    let f = std::fs::File::create(&base).unwrap();
    f.set_len(256 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[9u8; 8192], 64 << 20).unwrap();
    f.sync_all().unwrap();
    let dir = t.path().join("disk");
    Disk::create(&dir, 1 << 30, Some(&base)).unwrap();
    let disk = open(&dir);
    let (log, _) = active_files(&disk);
    let now = disk.now();
    now.discard(0, 1 << 30).unwrap();
    now.flush().unwrap();
    let records = (len(&log) - LOG_HEADER) / RECORD;
    // The filesystem may allocate a little around the 8 KiB it was given, never 256 MiB.
    assert!((2..=512).contains(&records), "{records} records");
    let mut buf = vec![1u8; 8192];
    now.read_at(&mut buf, 64 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "the base's data is discarded");
}

/// Content of block `block` at `version`: a header naming both, then a pattern.
fn block_image(block: u64, version: u64) -> Vec<u8> {
    let mut b = vec![(block.wrapping_mul(31).wrapping_add(version) | 1) as u8; BS];
    b[..8].copy_from_slice(&block.to_le_bytes());
    b[8..16].copy_from_slice(&version.to_le_bytes());
    b
}

fn verify_region(now: &Volume, model: &[Option<u64>], first: u64) {
    let mut buf = vec![0u8; model.len() * BS];
    now.read_at(&mut buf, first * BLOCK_SIZE).unwrap();
    for (i, want) in model.iter().enumerate() {
        let got = &buf[i * BS..(i + 1) * BS];
        match want {
            None => assert!(got.iter().all(|&b| b == 0), "block {i} should be zeros"),
            Some(v) => assert_eq!(got, block_image(first + i as u64, *v), "block {i}"),
        }
    }
}

#[test]
fn rewriting_one_region_forever_keeps_files_proportional_to_live_data() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("disk");
    Disk::create(&dir, 1 << 30, None).unwrap();
    let region: u64 = 512; // blocks: 2 MiB of live data at most
    let first: u64 = 8192;
    let mut model: Vec<Option<u64>> = vec![None; region as usize];
    let mut rng = SmallRng::seed_from_u64(8);
    let mut disk = open(&dir);
    let (log, data) = active_files(&disk);
    let live_bytes = region * BLOCK_SIZE;
    // Stated bounds: the log holds at most max(COMPACT_MIN_RECORDS, COMPACT_RATIO x live)
    // records plus the records since the last flush; the data file's apparent size stays
    // within twice the live data plus preallocation (a 1 MiB step at this size, rounded to
    // 1 MiB) and the allocated bytes within the live data plus that preallocation.
    let max_unflushed = 16 * 8 + 16;
    let log_bound =
        LOG_HEADER + RECORD * (COMPACT_MIN_RECORDS.max(COMPACT_RATIO * region) + max_unflushed);
    let apparent_bound = 2 * live_bytes + (3 << 20);
    let allocated_bound = live_bytes + (3 << 20);
    let mut written: u64 = 0;
    let (mut max_log, mut max_apparent, mut max_alloc) = (0, 0, 0);
    for op in 0..16_000u64 {
        let now = disk.now();
        if op % 8 == 7 {
            let at = rng.gen_range(0..region - 4);
            let n = rng.gen_range(1..=4);
            now.discard((first + at) * BLOCK_SIZE, n * BLOCK_SIZE)
                .unwrap();
            for b in at..at + n {
                model[b as usize] = None;
            }
        } else {
            let at = rng.gen_range(0..region / 8) * 8;
            let mut buf = Vec::with_capacity(8 * BS);
            for b in at..at + 8 {
                buf.extend_from_slice(&block_image(first + b, op));
                model[b as usize] = Some(op);
            }
            now.write_at(&buf, (first + at) * BLOCK_SIZE, false)
                .unwrap();
            written += buf.len() as u64;
        }
        if op % 16 == 15 {
            now.flush().unwrap();
            // Hole punches run in the background after a flush: count them as done.
            now.wait_punches();
            max_log = max_log.max(len(&log));
            max_apparent = max_apparent.max(len(&data));
            max_alloc = max_alloc.max(allocated(&data));
            assert!(
                len(&log) <= log_bound,
                "op {op}: log bound broken: {} bytes > {log_bound} (header + records for \
                 max(COMPACT_MIN_RECORDS, COMPACT_RATIO x {region} live blocks) + {max_unflushed} \
                 unflushed)",
                len(&log)
            );
            assert!(
                len(&data) <= apparent_bound,
                "op {op}: data file size bound broken: {} bytes > {apparent_bound} (2 x {live_bytes} \
                 live + 3 MiB preallocation)",
                len(&data)
            );
            assert!(
                allocated(&data) <= allocated_bound,
                "op {op}: data file allocation bound broken: {} bytes > {allocated_bound} \
                 ({live_bytes} live + 3 MiB preallocation)",
                allocated(&data)
            );
        }
        if op % 5000 == 4999 {
            drop(now);
            drop(disk);
            disk = open(&dir);
            let now = disk.now();
            verify_region(&now, &model, first);
            let entries = now.index_stats().0 as u64;
            assert!(
                entries <= region,
                "op {op}: index bound broken after reopening: {entries} entries > {region} live blocks"
            );
            let space = now.active_space().unwrap();
            assert!(
                space.live_entries <= region,
                "op {op}: live entries bound broken: {} > {region}: {space:?}",
                space.live_entries
            );
            assert!(
                space.used_blocks <= apparent_bound / BLOCK_SIZE,
                "op {op}: used data blocks bound broken: {} > {} (the data file size bound): {space:?}",
                space.used_blocks,
                apparent_bound / BLOCK_SIZE
            );
        }
    }
    verify_region(&disk.now(), &model, first);
    assert!(
        written > 100 * live_bytes,
        "the history is too short to test the bounds: {written} bytes written"
    );
    eprintln!(
        "{written} bytes written over {live_bytes} live: max log {max_log}, max data file {max_apparent} (allocated {max_alloc})"
    );
    // An explicit compaction brings the log to one record per live block.
    let now = disk.now();
    let report = now.compact_log().unwrap().expect("compacted");
    assert_eq!(
        len(&log),
        LOG_HEADER + RECORD * report.records_after,
        "{report:?}"
    );
    assert!(
        report.records_after <= region,
        "compacted log bound broken: {} records > {region} live blocks",
        report.records_after
    );
    verify_region(&now, &model, first);
}

/// Blocks the crash test's writer uses.
const CRASH_REGION: u64 = 512;
const CRASH_OPS: u64 = 40_000;
const CHILD_ENV: &str = "STRATA_HISTORY_CHILD";

#[derive(Clone, Copy, Debug)]
enum Op {
    Write { at: u64, n: u64 },
    Discard { at: u64, n: u64 },
    Flush,
}

fn crash_ops(seed: u64) -> Vec<Op> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..CRASH_OPS)
        .map(|i| {
            if i % 12 == 11 {
                return Op::Flush;
            }
            let n = [1, 1, 2, 4, 8, 16][rng.gen_range(0..6)];
            let at = rng.gen_range(0..CRASH_REGION - n);
            if rng.gen_range(0..6) == 0 {
                Op::Discard { at, n }
            } else {
                Op::Write { at, n }
            }
        })
        .collect()
}

fn version(round: u64, op: usize) -> u64 {
    round * 1_000_000 + op as u64
}

/// The child process: writes, discards and flushes `crash_ops(seed)` into the disk, reading
/// concurrently, and prints `ACK <op>` after every flush returns. Waits to be killed.
#[test]
#[ignore = "entry point of the child process of a_sigkill_while_rewriting_loses_nothing_flushed"]
fn history_crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let round: u64 = std::env::var("STRATA_HISTORY_ROUND")
        .unwrap()
        .parse()
        .unwrap();
    let disk = open(Path::new(&dir));
    let now = disk.now();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A reader racing the writer: every block reads as zeros or as a version of itself
    // (a reused block with another block's data fails its checksum, and is reported).
    let reader = {
        let now = now.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rng = SmallRng::seed_from_u64(round);
            let mut buf = vec![0u8; 16 * BS];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let at = rng.gen_range(0..CRASH_REGION - 16);
                now.read_at(&mut buf, at * BLOCK_SIZE)
                    .unwrap_or_else(|e| panic!("BAD read at block {at}: {e}"));
                for (i, b) in buf.chunks(BS).enumerate() {
                    let owner = u64::from_le_bytes(b[..8].try_into().unwrap());
                    assert!(
                        b.iter().all(|&x| x == 0) || owner == at + i as u64,
                        "BAD block {} holds block {owner}'s data",
                        at + i as u64
                    );
                }
            }
        })
    };
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for (i, op) in crash_ops(round).into_iter().enumerate() {
        match op {
            Op::Write { at, n } => {
                let mut buf = Vec::with_capacity(n as usize * BS);
                for b in at..at + n {
                    buf.extend_from_slice(&block_image(b, version(round, i)));
                }
                now.write_at(&buf, at * BLOCK_SIZE, false).unwrap();
            }
            Op::Discard { at, n } => now.discard(at * BLOCK_SIZE, n * BLOCK_SIZE).unwrap(),
            Op::Flush => {
                now.flush().unwrap();
                if i % 1200 == 1199 {
                    now.compact_log().unwrap();
                }
                writeln!(out, "ACK {i}").unwrap();
                out.flush().unwrap();
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
    writeln!(out, "DONE").unwrap();
    out.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3600));
}

#[test]
fn a_sigkill_while_rewriting_loses_nothing_flushed() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("disk");
    Disk::create(&dir, 64 << 20, None).unwrap();
    // What the disk holds, per block: None (zeros) or a version.
    let mut state: Vec<Option<u64>> = vec![None; CRASH_REGION as usize];
    let mut rng = SmallRng::seed_from_u64(99);
    for round in 1..=4u64 {
        let stop_after = rng.gen_range(30..1500usize);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "history_crash_child", "--ignored", "--nocapture"])
            .env(CHILD_ENV, &dir)
            .env("STRATA_HISTORY_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acks = 0;
        let mut last_ack: Option<usize> = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(i) = ack(&line) {
                last_ack = Some(i);
                acks += 1;
                if acks == stop_after {
                    break;
                }
            }
            assert!(
                !line.contains("DONE"),
                "the writer finished before it was killed"
            );
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(!err.contains("BAD"), "round {round}: {err}");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc_sigkill()),
            "round {round}: the writer died on its own: {err}"
        );
        // Acks printed before the kill and not read yet count too.
        for line in lines.map_while(|l| l.ok()) {
            if let Some(i) = ack(&line) {
                last_ack = Some(i);
            }
        }
        let last_ack = last_ack.expect("at least one flush");
        // Every block reads as it was at the last acknowledged flush, or as a later write
        // or discard of that block left it.
        let ops = crash_ops(round);
        let mut at_ack = state.clone();
        let mut later: Vec<Vec<Option<u64>>> = vec![Vec::new(); CRASH_REGION as usize];
        for (i, op) in ops.iter().enumerate() {
            let (at, n, v) = match *op {
                Op::Write { at, n } => (at, n, Some(version(round, i))),
                Op::Discard { at, n } => (at, n, None),
                Op::Flush => continue,
            };
            for b in at..at + n {
                if i <= last_ack {
                    at_ack[b as usize] = v;
                } else {
                    later[b as usize].push(v);
                }
            }
        }
        let disk = open(&dir);
        let report = disk.check().unwrap();
        assert!(report.is_clean(), "round {round}: {:?}", report.problems);
        let now = disk.now();
        let mut buf = vec![0u8; CRASH_REGION as usize * BS];
        now.read_at(&mut buf, 0)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        for b in 0..CRASH_REGION as usize {
            let got = &buf[b * BS..(b + 1) * BS];
            let seen = if got.iter().all(|&x| x == 0) {
                None
            } else {
                let owner = u64::from_le_bytes(got[..8].try_into().unwrap());
                let v = u64::from_le_bytes(got[8..16].try_into().unwrap());
                assert_eq!(
                    owner, b as u64,
                    "round {round}: block {b} holds another's data"
                );
                assert_eq!(got, block_image(b as u64, v), "round {round}: block {b}");
                Some(v)
            };
            assert!(
                seen == at_ack[b] || later[b].contains(&seen),
                "round {round}: block {b} reads {seen:?}, flushed {:?}, later {:?}",
                at_ack[b],
                later[b]
            );
            state[b] = seen;
        }
        let space = now.active_space().unwrap();
        assert!(space.live_entries <= CRASH_REGION, "{space:?}");
        eprintln!("round {round}: killed after flush of op {last_ack}: {space:?}");
    }
}

fn libc_sigkill() -> i32 {
    9
}

/// The op index of an `ACK <op>` line (the test harness may print its own text before it).
fn ack(line: &str) -> Option<usize> {
    let at = line.find("ACK ")?;
    line[at + 4..].trim().parse().ok()
}

#[test]
fn deleting_a_checkpoint_never_frees_a_reused_block() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("disk");
    Disk::create(&dir, 64 << 20, None).unwrap();
    let mut disk = open(&dir);
    let now = disk.now();
    // Block 0's first data block is freed by its rewrite, then reused for block 5: the
    // layer's log keeps a superseded record naming it for block 0.
    now.write_at(&block_image(0, 1), 0, false).unwrap();
    now.flush().unwrap();
    now.write_at(&block_image(0, 2), 0, false).unwrap();
    now.flush().unwrap();
    now.write_at(&block_image(5, 3), 5 * BLOCK_SIZE, false)
        .unwrap();
    now.flush().unwrap();
    let (_, data) = active_files(&disk);
    disk.checkpoint("c").unwrap();
    // Sealed at the high-water mark (two blocks), not at the lowered end of use.
    assert_eq!(len(&data), 2 * BLOCK_SIZE);
    // Now overrides block 0; deleting c merges c's layer into Now and frees what Now
    // overrides there: block 0's current data block only, not the reused one.
    now.write_at(&block_image(0, 4), 0, false).unwrap();
    now.flush().unwrap();
    disk.delete("c", false).unwrap();
    let mut buf = vec![0u8; BS];
    now.read_at(&mut buf, 5 * BLOCK_SIZE).unwrap();
    assert_eq!(buf, block_image(5, 3));
    drop(now);
    drop(disk);
    let disk = open(&dir);
    let report = disk.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    disk.now().read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, block_image(0, 4));
}

/// A merge finished while Now's newest writes are still pending: a crash right then (the
/// files as they are, copied) reads every block as it was or as it was written, never a
/// hole that the merge punched under a record that was not yet durable.
#[test]
fn a_crash_right_after_finishing_a_merge_reads_no_punched_block() {
    use journal::{DeleteOptions, StrategyKind};
    use std::sync::atomic::AtomicBool;
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("disk");
    Disk::create(&dir, 4 << 20, None).unwrap();
    let mut disk = open(&dir);
    let now = disk.now();
    now.write_at(&[1u8; 8 * BS], 0, false).unwrap();
    disk.checkpoint("a").unwrap();
    now.write_at(&[2u8; 4 * BS], 0, false).unwrap();
    disk.checkpoint("b").unwrap();
    now.write_at(&[3u8; BS], 20 * BS as u64, false).unwrap();
    disk.checkpoint("c").unwrap();
    now.write_at(&[5u8; BS], 21 * BS as u64, false).unwrap();
    // Now's stack gets c's layer, then b's: two sealed layers that a compaction merges.
    disk.delete_online("c", &DeleteOptions::with(StrategyKind::Relink))
        .unwrap();
    let (_, jobs) = disk
        .delete_online("b", &DeleteOptions::with(StrategyKind::CompactIntoChild))
        .unwrap();
    assert_eq!(jobs.len(), 1, "a merge of Now's two sealed layers");
    for mut j in jobs {
        j.run(&AtomicBool::new(false)).unwrap();
        // Supersedes merged blocks 0..4 (and 4..8 of layer a), not flushed.
        now.write_at(&[4u8; 8 * BS], 0, false).unwrap();
        assert!(!disk.finish_merge(j).unwrap().discarded);
    }
    let snap = t.path().join("crash");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&dir)
        .arg(&snap)
        .status()
        .unwrap()
        .success());
    let crashed = open(&snap);
    let mut b = vec![0u8; 8 * BS];
    crashed
        .now()
        .read_at(&mut b, 0)
        .expect("every block reads (no punched hole under a live record)");
    for (i, blk) in b.chunks(BS).enumerate() {
        let old = if i < 4 { 2u8 } else { 1 };
        assert!(
            blk.iter().all(|&x| x == 4) || blk.iter().all(|&x| x == old),
            "block {i} reads neither the old nor the new data"
        );
    }
    assert!(crashed.check().unwrap().is_clean());
    drop(crashed);
    let r = disk.check().unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
}

/// Sum of (apparent length, allocated bytes) of the files in `layers/` whose name ends
/// with `suffix`, and how many there are.
fn layer_files(dir: &Path, suffix: &str) -> (u64, u64, usize) {
    let (mut apparent, mut alloc, mut n) = (0, 0, 0);
    for e in std::fs::read_dir(dir.join("layers")).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().ends_with(suffix) {
            let m = e.metadata().unwrap();
            apparent += m.len();
            alloc += m.blocks() * 512;
            n += 1;
        }
    }
    (apparent, alloc, n)
}

/// Thousands of checkpoint + rewrite + online delete cycles (merges run and finished while
/// the history goes on, maintenance merges every few cycles): the layer files, the space
/// they take, the logs (what an open replays) and Now's lineage stay bounded by functions
/// of the live data, not of the history; and everything reads as the model says.
#[test]
fn thousands_of_checkpoint_delete_cycles_stay_bounded() {
    use journal::{DeleteOptions, StrategyKind, LINEAGE_SLACK};
    use std::sync::atomic::AtomicBool;
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("disk");
    let region: u64 = 256; // blocks of live data: 1 MiB
    Disk::create(&dir, 64 << 20, None).unwrap();
    let mut disk = open(&dir);
    let mut model: Vec<Option<u64>> = vec![None; region as usize];
    let mut rng = SmallRng::seed_from_u64(11);
    // A checkpoint that stays: the lineage always has a shared layer below Now's stack.
    for b in 0..region {
        disk.now()
            .write_at(&block_image(b, 0), b * BLOCK_SIZE, false)
            .unwrap();
        model[b as usize] = Some(0);
    }
    disk.checkpoint("keep").unwrap();
    let keep_model = model.clone();
    let live = region * BLOCK_SIZE;
    // Stated bounds, as functions of the live data (region blocks) and the lineage bound:
    // at most `layers` layers exist ("keep", Now's sealed layers up to 1 + LINEAGE_SLACK
    // beyond one per checkpoint, the checkpoint of the cycle, Now's active layer);
    let layers = 1 + 2 + 1 + LINEAGE_SLACK as u64 + 1;
    // the space allocated is at most the distinct data of the three views that exist
    // between cycles ("keep", the newest checkpoint, Now: the region each), plus the active
    // layer's preallocation step (1 MiB) and a cycle's writes;
    let alloc_bound = 3 * live + (2 << 20);
    // each log holds at most one record per block it defines plus the records an absorbing
    // merge appends (one per block of the region) and a cycle's writes (the active layer
    // is sealed every cycle, so its log never reaches the compaction threshold).
    let cycle_records = 64;
    let log_bound = layers * (LOG_HEADER + RECORD * (2 * region + cycle_records));
    let (mut max_files, mut max_alloc, mut max_log, mut max_depth) = (0, 0, 0, 0);
    let (mut merges, mut maintenance) = (0, 0);
    let cycles = 2000u64;
    let mut prev: Option<String> = None;
    for c in 1..=cycles {
        // Rewrites of the same region (some discards).
        for _ in 0..4 {
            let at = rng.gen_range(0..region / 8) * 8;
            if rng.gen_bool(0.15) {
                disk.now().discard(at * BLOCK_SIZE, 8 * BLOCK_SIZE).unwrap();
                model[at as usize..at as usize + 8].fill(None);
                continue;
            }
            let mut buf = Vec::with_capacity(8 * BS);
            for b in at..at + 8 {
                buf.extend_from_slice(&block_image(b, c));
                model[b as usize] = Some(c);
            }
            disk.now().write_at(&buf, at * BLOCK_SIZE, false).unwrap();
        }
        let name = format!("c{c}");
        disk.checkpoint(&name).unwrap();
        if let Some(p) = prev.take() {
            let kind = [StrategyKind::CompactIntoChild, StrategyKind::Relink][(c % 2) as usize];
            let (_, jobs) = disk.delete_online(&p, &DeleteOptions::with(kind)).unwrap();
            for mut j in jobs {
                j.run(&AtomicBool::new(false)).unwrap();
                // Now is written between the copy and the swap.
                let at = rng.gen_range(0..region);
                disk.now()
                    .write_at(&block_image(at, c), at * BLOCK_SIZE, false)
                    .unwrap();
                model[at as usize] = Some(c);
                if !disk.finish_merge(j).unwrap().discarded {
                    merges += 1;
                }
            }
        }
        prev = Some(name);
        if c % 8 == 0 {
            disk.now().flush().unwrap();
            for mut j in disk.maintenance_merges(&DeleteOptions::default()).unwrap() {
                j.run(&AtomicBool::new(false)).unwrap();
                if !disk.finish_merge(j).unwrap().discarded {
                    maintenance += 1;
                }
            }
        }
        // Hole punches run in the background after a flush: count them as done.
        disk.now().wait_punches();
        let (_, _, data_files) = layer_files(&dir, ".data");
        let (log_bytes, _, log_files) = layer_files(&dir, ".log");
        let (_, alloc, _) = layer_files(&dir, ".data");
        let depth = disk.info().unwrap().depth as u64;
        max_files = max_files.max(data_files + log_files);
        max_alloc = max_alloc.max(alloc);
        max_log = max_log.max(log_bytes);
        max_depth = max_depth.max(depth);
        assert!(
            (data_files as u64) <= layers && log_files == data_files,
            "cycle {c}: layer file bound broken: {data_files} data and {log_files} log files, \
             bound {layers} layers (keep + 2 + 1 + LINEAGE_SLACK + active), one log each"
        );
        assert!(
            depth <= layers,
            "cycle {c}: lineage bound broken: {depth} layers > {layers}"
        );
        assert!(
            alloc <= alloc_bound,
            "cycle {c}: allocation bound broken: {alloc} bytes allocated > {alloc_bound} \
             (3 views x {live} live + 2 MiB)"
        );
        assert!(
            log_bytes <= log_bound,
            "cycle {c}: log bound broken: {log_bytes} log bytes > {log_bound} ({layers} layers x \
             (header + 2 x {region} + {cycle_records} records))"
        );
        if c % 500 == 0 {
            verify_region(&disk.now(), &model, 0);
            verify_region(&disk.checkpoint_view("keep").unwrap(), &keep_model, 0);
            drop(disk);
            disk = open(&dir);
            verify_region(&disk.now(), &model, 0);
            let (_, _, n) = layer_files(&dir, ".data");
            // Open time: what an open replays is the logs of Now's lineage.
            let (log_bytes, _, _) = layer_files(&dir, ".log");
            assert!(
                log_bytes <= log_bound,
                "cycle {c}: open-time bound broken: the reopened disk has {log_bytes} log bytes > {log_bound}"
            );
            assert!(
                n as u64 <= layers,
                "cycle {c}: layer file bound broken after reopening: {n} > {layers}"
            );
            let r = disk.check().unwrap();
            assert!(r.is_clean(), "cycle {c}: {:?}", r.problems);
        }
    }
    assert!(
        merges > cycles / 4,
        "only {merges} merges finished in {cycles} cycles: the history did not exercise merges"
    );
    eprintln!(
        "{cycles} cycles, {merges} delete merges + {maintenance} maintenance merges: max {max_files} \
         layer files, {max_alloc} bytes allocated (bound {alloc_bound}), {max_log} log bytes \
         (bound {log_bound}), lineage {max_depth} (bound {layers}); live data {live} bytes"
    );
}

/// A strategy that returns one given move (when the deleted checkpoint is `on`).
struct OneMove {
    on: &'static str,
    mv: journal::Move,
}
impl journal::Strategy for OneMove {
    fn name(&self) -> &str {
        "one-move"
    }
    fn plan(&self, s: &journal::Situation) -> Vec<journal::Move> {
        if s.deleted == self.on {
            vec![self.mv]
        } else {
            Vec::new()
        }
    }
}

/// A merge that absorbs a run into one of its layers and is then given up after its records
/// reached that layer's log must take them back out: otherwise the logs say the absorbing
/// layer holds blocks Now's index reads from below it, and a later merge of the layers
/// below takes those blocks as hidden above the run and leaves them out (finish refused
/// with "merged layer does not hold block ..."; after a reopen the two would disagree).
#[test]
fn a_given_up_absorbing_merge_leaves_no_records_behind() {
    given_up_absorb(false);
}

/// A progressive absorb into its run's top moves Now's index to each batch's records (and
/// frees the copied sources), so given up, its records stay: every view, reopened too, reads
/// the same, and a later merge of the layers below takes them as what they are.
#[test]
fn a_given_up_progressive_absorb_keeps_the_records_views_read() {
    given_up_absorb(true);
}

fn given_up_absorb(progressive: bool) {
    use journal::{DeleteOptions, Move, Placement, StackRef, StrategyKind};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("disk");
    Disk::create(&dir, 4 << 20, None).unwrap();
    let mut disk = open(&dir);
    let now = disk.now();
    let w = |b: u64, v: u8| now.write_at(&vec![v; BS], b * BLOCK_SIZE, false).unwrap();
    w(0, 1);
    disk.checkpoint("a").unwrap();
    w(1, 2);
    disk.checkpoint("b").unwrap();
    w(2, 3); // only in c's layer
    disk.checkpoint("c").unwrap();
    w(3, 4);
    disk.checkpoint("d").unwrap();
    w(4, 5);
    disk.checkpoint("e").unwrap();
    // Reclaims inline: this test is about the absorb's records, and counts the jobs.
    let relink = DeleteOptions {
        background_reclaim: false,
        ..DeleteOptions::with(StrategyKind::Relink)
    };
    for n in ["e", "d", "c"] {
        let (_, j) = disk.delete_online(n, &relink).unwrap();
        assert!(j.is_empty());
    }
    let with = |on, mv| DeleteOptions {
        custom: Some(Arc::new(OneMove { on, mv })),
        progressive,
        background_reclaim: false,
        ..DeleteOptions::default()
    };
    // Now's stack: b c d e active. Absorb c into d, then give the job up.
    let (_, jobs) = disk
        .delete_online(
            "b",
            &with(
                "b",
                Move {
                    stack: StackRef::Now,
                    first: 1,
                    len: 2,
                    placement: Placement::Absorb(1),
                },
            ),
        )
        .unwrap();
    assert_eq!(jobs.len(), 1);
    let d_log = |disk: &Disk| {
        let tree: serde_json::Value =
            serde_json::from_slice(&std::fs::read(disk.dir().join("strata.json")).unwrap())
                .unwrap();
        let id = tree["now"]["layers"][2].as_u64().unwrap();
        disk.dir().join("layers").join(format!("L{id}.log"))
    };
    let before = len(&d_log(&disk));
    for mut j in jobs {
        j.run(&AtomicBool::new(false)).unwrap();
        assert!(len(&d_log(&disk)) > before, "the job appended records");
        disk.abandon_merge(j);
    }
    if progressive {
        assert!(
            len(&d_log(&disk)) > before,
            "given up: Now reads the records"
        );
        let mut b = vec![0u8; 5 * BS];
        now.read_at(&mut b, 0).unwrap();
        for (i, blk) in b.chunks(BS).enumerate() {
            assert!(blk.iter().all(|&x| x == i as u8 + 1), "block {i}, given up");
        }
        assert!(disk.check().unwrap().is_clean());
    } else {
        assert_eq!(len(&d_log(&disk)), before, "given up: the records are gone");
    }
    // Merge the layers below d (a, b, c) into one.
    let (_, jobs) = disk
        .delete_online(
            "a",
            &with(
                "a",
                Move {
                    stack: StackRef::Now,
                    first: 0,
                    len: 3,
                    placement: Placement::NewLayer,
                },
            ),
        )
        .unwrap();
    assert_eq!(jobs.len(), 1);
    for mut j in jobs {
        j.run(&AtomicBool::new(false)).unwrap();
        assert!(!disk.finish_merge(j).unwrap().discarded);
    }
    let mut b = vec![0u8; 5 * BS];
    now.read_at(&mut b, 0).unwrap();
    for (i, blk) in b.chunks(BS).enumerate() {
        assert!(blk.iter().all(|&x| x == i as u8 + 1), "block {i}");
    }
    drop(now);
    assert!(disk.check().unwrap().is_clean());
    drop(disk);
    let disk = open(&dir);
    disk.now().read_at(&mut b, 0).unwrap();
    for (i, blk) in b.chunks(BS).enumerate() {
        assert!(
            blk.iter().all(|&x| x == i as u8 + 1),
            "block {i} after a reopen"
        );
    }
}

/// A read racing an overwrite and a flush of the same blocks: the flush frees the old blocks
/// (punched, or reused), and a read that resolved them before must still get what it asked
/// for (old or new data), never a punched hole or another block's data (a checksum error).
#[test]
fn a_read_racing_an_overwrite_and_a_flush_never_fails() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("disk");
    Disk::create(&dir, 64 << 20, None).unwrap();
    let disk = open(&dir);
    let now = disk.now();
    // Long reads (16 MiB) against short overwrites (64 blocks) and flushes.
    let n: u64 = 4096;
    let chunk: u64 = 64;
    let write = |at: u64, len: u64, v: u64| {
        let mut buf = Vec::with_capacity(len as usize * BS);
        for b in at..at + len {
            buf.extend_from_slice(&block_image(b, v));
        }
        now.write_at(&buf, at * BLOCK_SIZE, false).unwrap();
    };
    write(0, n, 0);
    now.flush().unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut rng = SmallRng::seed_from_u64(5);
    let reads = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut buf = vec![0u8; n as usize * BS];
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                now.read_at(&mut buf, 0)
                    .expect("a read racing a flush must not fail its checksum");
                for (b, blk) in buf.chunks(BS).enumerate() {
                    let v = u64::from_le_bytes(blk[8..16].try_into().unwrap());
                    assert_eq!(blk, block_image(b as u64, v), "block {b}");
                }
                reads += 1;
            }
            reads
        });
        for v in 1..=1500 {
            write(rng.gen_range(0..n / chunk) * chunk, chunk, v);
            now.flush().unwrap();
            if reader.is_finished() {
                break;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        reader.join().unwrap()
    });
    assert!(reads > 0);
}
