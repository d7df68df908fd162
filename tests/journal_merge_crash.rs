//! SIGKILL during merges: a child process (this test binary, running the ignored
//! `crash_child` test) deletes checkpoints with each strategy and runs the merges to the
//! end; the parent kills it at random moments, reopens the disk and checks that every
//! checkpoint and Now read exactly as before, that the deleted checkpoint is either still
//! there (old tree) or gone (new tree), that no file outside the tree is left, and that
//! `check` is clean.

mod journal_common;

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use journal::{CacheMode, DeleteOptions, Disk, OpenOptions, StrategyKind};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 48 << 20;
const BLOCKS: u64 = SIZE / 4096;

fn open_ro(dir: &Path) -> Disk {
    Disk::open(
        dir,
        OpenOptions {
            cache: CacheMode::None,
            read_only: true,
        },
    )
    .expect("open disk read-only")
}

fn open(dir: &Path) -> Disk {
    Disk::open(
        dir,
        OpenOptions {
            cache: CacheMode::None,
            read_only: false,
        },
    )
    .expect("open disk")
}

fn hash(b: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// A hash of every block of a view.
fn digest(v: &journal::Volume) -> Vec<u64> {
    let mut out = Vec::with_capacity(BLOCKS as usize);
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..SIZE).step_by(buf.len()) {
        v.read_at(&mut buf, off).unwrap();
        out.extend(buf.chunks(4096).map(hash));
    }
    out
}

/// A new disk of [`SIZE`] bytes in a temporary directory (in `MERGE_CRASH_TMP`, default
/// /var/tmp).
fn fresh_disk() -> (tempfile::TempDir, std::path::PathBuf) {
    let t = tempfile::tempdir_in(std::env::var_os("MERGE_CRASH_TMP").unwrap_or("/var/tmp".into()))
        .unwrap();
    let dir = t.path().join("disk");
    Disk::create(&dir, SIZE, None).unwrap();
    (t, dir)
}

/// `n` writes of `buf` filled with random bytes, each at a random block of `now`.
fn scatter(now: &journal::Volume, rng: &mut SmallRng, buf: &mut [u8], n: usize) {
    for _ in 0..n {
        let b = rng.gen_range(0..BLOCKS - 16);
        rng.fill(&mut buf[..]);
        now.write_at(buf, b * 4096, false).unwrap();
    }
}

/// `cmd` (this test binary, or a command that runs it) running `crash_child`, which deletes
/// `target` with `strategy` in the disk at `dir`.
fn crash_child_command(
    mut cmd: Command,
    dir: &Path,
    target: &str,
    strategy: StrategyKind,
) -> Command {
    cmd.args([
        "--exact",
        "crash_child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("MERGE_CRASH_DIR", dir)
    .env("MERGE_CRASH_TARGET", target)
    .env("MERGE_CRASH_STRATEGY", strategy.to_string());
    cmd
}

/// The digest of every checkpoint (by name) and of Now (by "").
fn snapshot(disk: &Disk) -> HashMap<String, Vec<u64>> {
    let mut model: HashMap<String, Vec<u64>> = disk
        .list()
        .into_iter()
        .map(|c| {
            let d = digest(&disk.checkpoint_view(&c.name).unwrap());
            (c.name, d)
        })
        .collect();
    model.insert(String::new(), digest(&disk.now()));
    model
}

/// The disk lists exactly the checkpoints of `model` (by name; "" is Now), every view
/// reads as its digest there, and `check` is clean.
fn assert_views(disk: &Disk, model: &HashMap<String, Vec<u64>>, when: &str) {
    let names: HashSet<String> = disk.list().into_iter().map(|c| c.name).collect();
    let expected: HashSet<String> = model.keys().filter(|n| !n.is_empty()).cloned().collect();
    assert_eq!(names, expected, "{when}: checkpoints");
    for name in &expected {
        let v = disk.checkpoint_view(name).unwrap();
        assert!(
            digest(&v) == model[name],
            "{when}: checkpoint {name} changed"
        );
    }
    assert!(digest(&disk.now()) == model[""], "{when}: Now changed");
    let report = disk.check().unwrap();
    assert!(report.is_clean(), "{when}: {:?}", report.problems);
}

/// Layer ids strata.json references.
fn tree_layers(dir: &Path) -> HashSet<u64> {
    let t: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("strata.json")).unwrap()).unwrap();
    let mut set = HashSet::new();
    for n in t["nodes"].as_array().unwrap() {
        for l in n["layers"].as_array().unwrap() {
            set.insert(l.as_u64().unwrap());
        }
    }
    for l in t["now"]["layers"].as_array().unwrap() {
        set.insert(l.as_u64().unwrap());
    }
    set
}

fn layer_files(dir: &Path) -> HashSet<u64> {
    std::fs::read_dir(dir.join("layers"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.strip_prefix('L')
                .and_then(|r| r.split('.').next().map(str::to_string))
                .and_then(|r| r.parse().ok())
        })
        .collect()
}

/// Small batches, so that most merges take several and kills land between them.
fn options(strategy: StrategyKind) -> DeleteOptions {
    DeleteOptions {
        rate_limit: Some(12 << 20),
        queue_depth: 8,
        batch_bytes: Some(1 << 20),
        ..DeleteOptions::with(strategy)
    }
}

/// The child: deletes `MERGE_CRASH_TARGET` with `MERGE_CRASH_STRATEGY`, rate-limited so the
/// copy takes a while, reporting each stage on stdout.
#[test]
#[ignore = "run by merges_survive_sigkill as its child process"]
fn crash_child() {
    let Some(dir) = std::env::var_os("MERGE_CRASH_DIR") else {
        return;
    };
    let target = std::env::var("MERGE_CRASH_TARGET").unwrap();
    let strategy: StrategyKind = std::env::var("MERGE_CRASH_STRATEGY")
        .unwrap()
        .parse()
        .unwrap();
    let mut disk = open(Path::new(&dir));
    let opts = options(strategy);
    let never = std::sync::atomic::AtomicBool::new(false);
    // A merge an earlier kill interrupted is completed first (as the engine does).
    for mut j in disk.resume_merges(&opts).unwrap() {
        j.run(&never).unwrap();
        disk.finish_merge(j).unwrap();
        println!("resumed");
    }
    let (_, jobs) = disk.delete_online(&target, &opts).unwrap();
    println!("deleted {}", jobs.len());
    for mut j in jobs {
        j.progress().on_batch(|done| println!("batch {done}"));
        if j.is_reclaim() {
            println!("reclaiming {}", j.id());
        }
        j.run(&never).unwrap();
        println!("copied {}", j.id());
        disk.finish_merge(j).unwrap();
        println!("finished");
    }
    for mut j in disk.maintenance_merges(&opts).unwrap() {
        j.run(&never).unwrap();
        disk.finish_merge(j).unwrap();
        println!("maintenance finished");
    }
    println!("done");
}

#[test]
fn merges_survive_sigkill() {
    let (_t, dir) = fresh_disk();
    let mut rng = SmallRng::seed_from_u64(7);
    // A chain of checkpoints, each holding a few MiB of scattered blocks, with two branches
    // so that hidden nodes and relinks into checkpoints happen too.
    let mut model: HashMap<String, Vec<u64>>;
    {
        let mut disk = open(&dir);
        let now = disk.now();
        let mut buf = vec![0u8; 64 << 10];
        for i in 0..10 {
            scatter(&now, &mut rng, &mut buf, 96);
            // Some discards too.
            let b = rng.gen_range(0..BLOCKS - 64);
            now.discard(b * 4096, 64 * 4096).unwrap();
            let name = format!("c{i}");
            disk.checkpoint(&name).unwrap();
            if i == 3 {
                disk.apply("c1", None).unwrap();
            }
        }
        scatter(&now, &mut rng, &mut buf, 32);
        now.flush().unwrap();
        model = snapshot(&disk);
    }
    let exe = std::env::current_exe().unwrap();
    let strategies = [
        StrategyKind::CompactIntoChild,
        StrategyKind::CompactIntoParent,
        StrategyKind::Auto,
        StrategyKind::Threshold,
        StrategyKind::Relink,
    ];
    let (mut rolled_back, mut rolled_forward, mut mid_merge) = (0, 0, 0);
    let (mut between_batches, mut resumed) = (0, 0);
    let mut mid_reclaim = 0;
    let mut round = 0;
    while model.len() > 2 && round < 24 {
        let mut names: Vec<String> = model.keys().filter(|n| !n.is_empty()).cloned().collect();
        names.sort();
        let target = names[rng.gen_range(0..names.len())].clone();
        let strategy = strategies[round % strategies.len()];
        round += 1;
        let mut child = crash_child_command(Command::new(&exe), &dir, &target, strategy)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Some kills land in the delete itself, most during the copy or the swap.
        let delay = Duration::from_millis(if round % 4 == 0 {
            rng.gen_range(0..40)
        } else {
            rng.gen_range(0..1200)
        });
        let start = Instant::now();
        while start.elapsed() < delay {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = child.kill();
        let status = child.wait().unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        if out.contains("deleted") && !out.contains("done") {
            mid_merge += 1;
        }
        // Killed after a batch of a job and before that job's copy ended.
        if out
            .rsplit_once("deleted")
            .is_some_and(|(_, tail)| tail.contains("batch") && !tail.contains("copied"))
        {
            between_batches += 1;
        }
        if let Some(at) = out.find("reclaiming ") {
            // Killed while punching: the reclaim did not report its end.
            let id = out[at + 11..].lines().next().unwrap_or("");
            if !out.contains(&format!("copied {id}")) {
                mid_reclaim += 1;
            }
        }
        if status.success() {
            assert!(out.contains("done"), "child output: {out}");
        }
        // Restart: every view reads exactly as before.
        let disk = open(&dir);
        let listed: HashSet<String> = disk.list().into_iter().map(|c| c.name).collect();
        if listed.contains(&target) {
            rolled_back += 1;
            assert!(
                !out.contains("deleted"),
                "{target} came back after its delete committed"
            );
        } else {
            rolled_forward += 1;
            model.remove(&target);
        }
        let expected: HashSet<String> = model.keys().filter(|n| !n.is_empty()).cloned().collect();
        assert_eq!(listed, expected, "round {round}: checkpoints");
        for name in &expected {
            let v = disk.checkpoint_view(name).unwrap();
            assert!(
                digest(&v) == model[name],
                "round {round} ({strategy}, killed after {delay:?}, child said {out:?}): checkpoint {name} changed"
            );
        }
        assert!(
            digest(&disk.now()) == model[""],
            "round {round} ({strategy}): Now changed"
        );
        let report = disk.check().unwrap();
        assert!(report.is_clean(), "round {round}: {:?}", report.problems);
        // Every other round, the parent completes an interrupted merge itself and checks
        // again (the others are completed by the next child).
        let mut disk = disk;
        if round % 2 == 0 {
            let never = std::sync::atomic::AtomicBool::new(false);
            for mut j in disk.resume_merges(&options(strategy)).unwrap() {
                j.run(&never).unwrap();
                let r = disk.finish_merge(j).unwrap();
                assert!(!r.discarded, "round {round}: {r:?}");
                resumed += 1;
            }
            assert_views(
                &disk,
                &model,
                &format!("round {round}, after the resumed merge"),
            );
            assert!(disk.resume_merges(&options(strategy)).unwrap().is_empty());
        }
        drop(disk);
        // The open removed the output of an interrupted merge: only the tree's files remain.
        assert_eq!(
            layer_files(&dir),
            tree_layers(&dir),
            "round {round}: stray layer files"
        );
    }
    eprintln!(
        "{round} kills: {rolled_back} rolled back, {rolled_forward} committed, {mid_merge} during merges ({mid_reclaim} during a reclaim), {between_batches} between batches; {resumed} merges resumed by the parent"
    );
    assert!(
        between_batches >= 2,
        "only {between_batches} kills landed between batches"
    );
    assert!(resumed >= 1, "no interrupted merge was resumed");
    assert!(
        mid_merge >= 3,
        "only {mid_merge} kills landed during a merge"
    );
    assert!(rolled_forward >= 1);
}

/// A compact-into-parent merge killed after it preallocated the absorbing layer's log and
/// before it wrote the records there (`strace` delivers SIGKILL as the child enters its
/// first `pwrite` of that log): the log ends in zeros. The reopened disk reads exactly as
/// before, `check` is clean, and a later compact-into-parent merge into the same layer
/// writes its records over the zeros.
#[test]
fn compact_into_parent_killed_between_log_preallocation_and_records() {
    let strace = Command::new("strace").arg("-V").output();
    assert!(
        strace.is_ok_and(|o| o.status.success()),
        "this test needs strace (apt-get install strace)"
    );
    let (_t, dir) = fresh_disk();
    let mut rng = SmallRng::seed_from_u64(11);
    let mut model: HashMap<String, Vec<u64>>;
    {
        let mut disk = open(&dir);
        let now = disk.now();
        let mut buf = vec![0u8; 64 << 10];
        // c1 is large, c2 (its child) and c3 small: deleting c1 absorbs c2 into c1's layer.
        for (name, writes) in [("c1", 128), ("c2", 24), ("c3", 16)] {
            scatter(&now, &mut rng, &mut buf, writes);
            disk.checkpoint(name).unwrap();
        }
        now.write_at(&buf, 0, true).unwrap();
        model = snapshot(&disk);
    }
    let absorber = journal_common::checkpoint_layers(&dir, "c1")[0];
    let log = dir.join(format!("layers/L{absorber}.log"));
    let log_len = std::fs::metadata(&log).unwrap().len();
    let exe = std::env::current_exe().unwrap();
    let mut strace = Command::new("strace");
    strace
        .args(["-f", "-qq", "-o", "/dev/null", "-e", "signal=none", "-P"])
        .arg(&log)
        .args(["-e", "trace=pwrite64", "-e", "inject=pwrite64:signal=KILL"])
        .arg(&exe);
    let out = crash_child_command(strace, &dir, "c1", StrategyKind::CompactIntoParent)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the child was not killed: {said}");
    assert!(
        said.contains("deleted 1") && !said.contains("copied"),
        "the kill landed elsewhere: {said}"
    );
    // The kill landed between the preallocation and the records.
    let bytes = std::fs::read(&log).unwrap();
    assert!(
        bytes.len() as u64 > log_len,
        "the absorbing log was not preallocated ({} bytes)",
        bytes.len()
    );
    assert!(
        bytes[log_len as usize..].iter().all(|&b| b == 0),
        "records were written after the preallocation"
    );
    model.remove("c1");
    let notes = open_ro(&dir).check().unwrap().notes;
    assert!(
        notes.len() == 1 && notes[0].contains(&format!("L{absorber}.log: ")),
        "check notes the absorbing log's zero tail: {notes:?}"
    );
    for read_only in [true, false] {
        let disk = Disk::open(
            &dir,
            OpenOptions {
                cache: CacheMode::None,
                read_only,
            },
        )
        .unwrap();
        assert_views(&disk, &model, &format!("reopened (read_only {read_only})"));
    }
    // c1's layer, now the bottom of c3's stack [c1, c2, c3], absorbs c2 and c3.
    let mut disk = open(&dir);
    disk.delete_with("c2", &options(StrategyKind::CompactIntoParent))
        .unwrap();
    model.remove("c2");
    assert_views(&disk, &model, "after a second compact-into-parent");
    assert_eq!(
        journal_common::checkpoint_layers(&dir, "c3"),
        vec![absorber],
        "c1's layer absorbed the stack"
    );
    drop(disk);
    assert_views(&open(&dir), &model, "reopened after the second merge");
    assert_eq!(layer_files(&dir), tree_layers(&dir), "stray layer files");
}
