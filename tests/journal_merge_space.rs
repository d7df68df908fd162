//! Space and readers during a progressive merge: the extra space a copying merge holds is
//! about one batch (measured from st_blocks of the run's layer files at the peak of every
//! batch), Now reads and writes stay correct while the sources are freed under it, and an
//! open checkpoint view that reads the run keeps its blocks.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use journal::{CacheMode, DeleteOptions, Disk, OpenOptions, StrategyKind};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 96 << 20;
const BLOCKS: u64 = SIZE / 4096;
const BATCH: u64 = 2 << 20;
/// Records and preallocation rounding beyond one batch.
const SLACK: u64 = 1 << 20;

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

/// Allocated bytes of the files of `layers`.
fn allocated(dir: &Path, layers: &HashSet<u64>) -> u64 {
    std::fs::read_dir(dir.join("layers"))
        .unwrap()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.strip_prefix('L')
                .and_then(|r| r.split('.').next().map(str::to_string))
                .and_then(|r| r.parse::<u64>().ok())
                .is_some_and(|id| layers.contains(&id))
        })
        .map(|e| e.metadata().map(|m| m.blocks() * 512).unwrap_or(0))
        .sum()
}

fn tree_file(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("strata.json")).unwrap()).unwrap()
}

fn read_all(v: &journal::Volume) -> Vec<u8> {
    let mut b = vec![0u8; SIZE as usize];
    v.read_at(&mut b, 0).unwrap();
    b
}

/// A write of `blocks` 4 KiB blocks at a random offset aligned to its size.
fn write_piece(rng: &mut SmallRng, now: &journal::Volume, model: &mut [u8], blocks: u64) {
    let b = rng.gen_range(0..BLOCKS / blocks - 1) * blocks;
    let mut buf = vec![0u8; (blocks * 4096) as usize];
    rng.fill(&mut buf[..]);
    now.write_at(&buf, b * 4096, false).unwrap();
    model[(b * 4096) as usize..((b + blocks) * 4096) as usize].copy_from_slice(&buf);
}

/// A 64 KiB write at a random 64 KiB-aligned offset.
fn write(rng: &mut SmallRng, now: &journal::Volume, model: &mut [u8]) {
    write_piece(rng, now, model, 16);
}

/// Checkpoint `a` holds ~24 MiB of scattered pieces of `piece` blocks (written in random
/// order: a 4 KiB piece's place in a's data file says nothing about its disk offset), `b`
/// (its child) ~2 MiB; Now is b's child. Deleting `a` compacts b's relinked stack into a new
/// layer.
fn setup_pieces(dir: &Path, piece: u64) -> (Disk, Vec<u8>, Vec<u8>) {
    Disk::create(dir, SIZE, None).unwrap();
    let disk = open(dir);
    let now = disk.now();
    let mut rng = SmallRng::seed_from_u64(11);
    let mut model = vec![0u8; SIZE as usize];
    let per = |mib: u64| (mib << 20) / (piece * 4096);
    for _ in 0..per(26) {
        write_piece(&mut rng, &now, &mut model, piece);
    }
    let mut disk = disk;
    disk.checkpoint("a").unwrap();
    for _ in 0..per(2) {
        write_piece(&mut rng, &now, &mut model, piece);
    }
    disk.checkpoint("b").unwrap();
    let b = model.clone();
    for _ in 0..10 {
        write(&mut rng, &now, &mut model);
    }
    now.flush().unwrap();
    (disk, model, b)
}

/// 64 KiB pieces.
fn setup(dir: &Path) -> (Disk, Vec<u8>, Vec<u8>) {
    setup_pieces(dir, 16)
}

fn options() -> DeleteOptions {
    DeleteOptions {
        queue_depth: 8,
        batch_bytes: Some(BATCH),
        ..DeleteOptions::with(StrategyKind::CompactIntoChild)
    }
}

/// Runs the merge of `a` while Now is read and written, sampling the allocated size of the
/// run's and the output's files at every batch's peak, and checks the bound and the data.
fn merge_within_one_batch(piece: u64) {
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    let dir = t.path().join("disk");
    let (mut disk, mut model, b_model) = setup_pieces(&dir, piece);
    let (_, jobs) = disk.delete_online("a", &options()).unwrap();
    assert_eq!(jobs.len(), 1);
    let mut job = jobs.into_iter().next().unwrap();
    let layers: HashSet<u64> = job
        .run_layers()
        .into_iter()
        .chain([job.output_layer()])
        .collect();
    let base = allocated(&dir, &layers);
    let peak = Arc::new(AtomicU64::new(0));
    let batches = Arc::new(AtomicU64::new(0));
    {
        let (peak, batches, dir, layers) = (peak.clone(), batches.clone(), dir.clone(), layers);
        job.progress().on_batch(move |_| {
            let extra = allocated(&dir, &layers).saturating_sub(base);
            peak.fetch_max(extra, Ordering::SeqCst);
            batches.fetch_add(1, Ordering::SeqCst);
        });
    }
    // Now is read (every block checked against the model) and written while the merge
    // frees the blocks it copied.
    let now = disk.now();
    let mut rng = SmallRng::seed_from_u64(5);
    let job = std::thread::scope(|s| {
        let h = s.spawn(move || {
            job.run(&AtomicBool::new(false)).unwrap();
            job
        });
        let mut rounds = 0;
        while rounds < 4 || !h.is_finished() {
            write(&mut rng, &now, &mut model);
            let off = rng.gen_range(0..BLOCKS - 256) * 4096;
            let mut buf = vec![0u8; 256 * 4096];
            now.read_at(&mut buf, off)
                .expect("Now reads during the merge");
            assert!(
                buf[..] == model[off as usize..off as usize + buf.len()],
                "Now at {off} reads other data during the merge"
            );
            rounds += 1;
        }
        h.join().unwrap()
    });
    let r = disk.finish_merge(job).unwrap();
    let peak = peak.load(Ordering::SeqCst);
    eprintln!(
        "{piece}-block pieces: {} batches, {} MiB copied, peak extra {} KiB sampled, {} KiB reported",
        batches.load(Ordering::SeqCst),
        r.bytes_copied >> 20,
        peak >> 10,
        r.peak_extra_bytes >> 10
    );
    assert!(
        r.bytes_copied >= 6 * BATCH,
        "the merge is several batches: {r:?}"
    );
    assert!(batches.load(Ordering::SeqCst) >= 6);
    assert!(
        peak <= BATCH + SLACK,
        "extra space during the merge: {peak} bytes (batch {BATCH})"
    );
    assert!(
        r.peak_extra_bytes <= BATCH + SLACK && r.peak_extra_bytes >= BATCH / 2,
        "reported peak extra {} bytes",
        r.peak_extra_bytes
    );
    assert!(r.bytes_freed > 0, "{r:?}");
    assert!(read_all(&disk.now()) == model, "Now after the merge");
    assert!(read_all(&disk.checkpoint_view("b").unwrap()) == b_model);
    assert!(disk.check().unwrap().is_clean());
    drop(disk);
    let disk = open(&dir);
    assert!(read_all(&disk.now()) == model, "Now after reopening");
    assert!(read_all(&disk.checkpoint_view("b").unwrap()) == b_model);
}

#[test]
fn a_copying_merge_needs_about_one_batch_of_extra_space() {
    merge_within_one_batch(16);
}

/// Sources written as scattered 4 KiB blocks in random order (each batch's blocks, in disk
/// order, are spread over the whole source file) need no more than sequential ones.
#[test]
fn a_merge_of_scattered_4k_writes_needs_about_one_batch_of_extra_space() {
    merge_within_one_batch(1);
}

/// A checkpoint view opened before the merge reads the run's layers: they keep their
/// blocks while it is open (the merge cannot move its index).
#[test]
fn an_open_checkpoint_view_keeps_reading_during_the_merge() {
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    let dir = t.path().join("disk");
    let (mut disk, model, b_model) = setup(&dir);
    let (_, jobs) = disk.delete_online("a", &options()).unwrap();
    let mut job = jobs.into_iter().next().unwrap();
    let b = disk.checkpoint_view("b").unwrap();
    job.run(&AtomicBool::new(false)).unwrap();
    assert!(read_all(&b) == b_model, "the open view of b after the copy");
    let r = disk.finish_merge(job).unwrap();
    assert!(read_all(&b) == b_model, "the open view of b after the swap");
    assert!(!r.discarded);
    drop(b);
    assert!(read_all(&disk.now()) == model);
    assert!(read_all(&disk.checkpoint_view("b").unwrap()) == b_model);
    assert!(disk.check().unwrap().is_clean());
}

/// Cancelled between batches and dropped (as a crash would leave it): every view reads as
/// before, at once and after reopening; the tree holds the partial output above the run,
/// and a resumed merge completes it.
#[test]
fn an_interrupted_merge_leaves_a_valid_tree_and_resumes() {
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    let dir = t.path().join("disk");
    let (mut disk, model, b_model) = setup(&dir);
    let (_, jobs) = disk.delete_online("a", &options()).unwrap();
    let mut job = jobs.into_iter().next().unwrap();
    let out = job.output_layer();
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        job.progress().on_batch(move |done| {
            if done >= 3 * BATCH {
                cancel.store(true, Ordering::SeqCst);
            }
        });
    }
    job.run(&cancel).expect_err("cancelled");
    let done = job.progress().status().bytes_done;
    assert!(done >= 3 * BATCH && done < job.progress().status().bytes_total);
    drop(job);
    assert!(read_all(&disk.now()) == model);
    assert!(read_all(&disk.checkpoint_view("b").unwrap()) == b_model);
    drop(disk);
    let mut disk = open(&dir);
    assert!(read_all(&disk.now()) == model, "Now after reopening");
    assert!(read_all(&disk.checkpoint_view("b").unwrap()) == b_model);
    assert!(disk.check().unwrap().is_clean());
    let tree = tree_file(&dir);
    let top_of_b = |t: &serde_json::Value| {
        t["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "b")
            .map(|n| n["layers"].clone())
            .unwrap()
    };
    let b_layers = top_of_b(&tree);
    assert!(
        b_layers.as_array().unwrap().len() >= 2
            && b_layers.as_array().unwrap().last().and_then(|l| l.as_u64()) == Some(out),
        "the partial output stays above the run: {tree}"
    );
    assert_eq!(tree["merging"][0]["out"].as_u64(), Some(out), "{tree}");
    let jobs = disk.resume_merges(&options()).unwrap();
    assert_eq!(jobs.len(), 1, "one partial merge to resume");
    for mut j in jobs {
        assert_eq!(j.output_layer(), out);
        j.run(&AtomicBool::new(false)).unwrap();
        let r = disk.finish_merge(j).unwrap();
        assert!(
            !r.discarded && r.bytes_copied > 0 && r.bytes_copied < 24 << 20,
            "{r:?}"
        );
    }
    assert!(disk.resume_merges(&options()).unwrap().is_empty());
    let tree = tree_file(&dir);
    let b_layers = top_of_b(&tree);
    assert!(tree.get("merging").is_none(), "{tree}");
    assert_eq!(b_layers, serde_json::json!([out]), "b is one layer");
    assert!(read_all(&disk.now()) == model);
    assert!(read_all(&disk.checkpoint_view("b").unwrap()) == b_model);
    assert!(disk.check().unwrap().is_clean());
}
