//! Hostile and damaged disk directories through the CLI: exports onto the disk's own files,
//! FIFOs and devices where metadata should be, a damaged Now, an exhausted id counter, a
//! failed metadata save, a damaged tail of a checkpoint's log, and what a crash can leave
//! after the last record of a log whose size ran ahead of its writes (zero tails, a torn
//! record before zeros, a zero hole before valid records, garbage).

mod journal_common;
mod nbd_common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nbd_common::{run_strata, strata, STRATA};

/// Held while a child process is spawned, and by tests while they hold a disk open in this
/// process: a child forked by another test's thread holds copies of this process's
/// descriptors until it execs, so a disk closed meanwhile would still look locked to the
/// next open here.
static SPAWN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn spawn_lock() -> std::sync::MutexGuard<'static, ()> {
    SPAWN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `strata ARGS` under `timeout 60`, so a hang fails the test instead of stalling it.
fn strata_bounded(args: &[&str]) -> (i32, String, String) {
    let child = {
        let _spawning = spawn_lock();
        Command::new("timeout")
            .arg("60")
            .arg(STRATA)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run timeout strata")
    };
    let out = child.wait_with_output().expect("wait for strata");
    let rc = out.status.code().unwrap_or(-1);
    assert_ne!(rc, 124, "strata {args:?} hung (killed by timeout)");
    (
        rc,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> String {
    let (rc, out, err) = strata_bounded(args);
    assert_eq!(rc, 0, "strata {args:?} failed:\n{out}\n{err}");
    out
}

/// A disk open in this process (holding [`SPAWN`] until it is closed).
struct Held {
    disk: journal::Disk,
    _spawning: std::sync::MutexGuard<'static, ()>,
}

impl std::ops::Deref for Held {
    type Target = journal::Disk;
    fn deref(&self) -> &journal::Disk {
        &self.disk
    }
}

impl std::ops::DerefMut for Held {
    fn deref_mut(&mut self) -> &mut journal::Disk {
        &mut self.disk
    }
}

fn open_disk(path: &Path, read_only: bool) -> Held {
    let spawning = spawn_lock();
    let opts = journal::OpenOptions {
        read_only,
        ..journal::OpenOptions::default()
    };
    Held {
        disk: journal::Disk::open(path, opts).unwrap(),
        _spawning: spawning,
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(s(p)).unwrap();
    // SAFETY: mkfifo only reads the NUL-terminated path that `c` owns.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// A 1 MiB base of 0x42 bytes and a 4 MiB disk over it with checkpoint "c1" (layer 1; Now's
/// active layer is layer 2). Returns (disk, base).
fn disk_over_base(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0x42u8; 1 << 20]).unwrap();
    let disk = dir.join("disk");
    ok(&[
        "disk",
        "create",
        s(&disk),
        "--size",
        "4M",
        "--base",
        s(&base),
    ]);
    ok(&["disk", "checkpoint", s(&disk), "--name", "c1"]);
    (disk, base)
}

fn expected_image() -> Vec<u8> {
    let mut v = vec![0x42u8; 1 << 20];
    v.resize(4 << 20, 0);
    v
}

#[test]
fn export_refuses_the_disks_own_files_and_its_base() {
    let t = tempfile::tempdir().unwrap();
    let (disk, base) = disk_over_base(t.path());
    let hard = t.path().join("hardlink");
    std::fs::hard_link(disk.join("layers/L1.data"), &hard).unwrap();
    let sym = t.path().join("symlink");
    std::os::unix::fs::symlink(disk.join("strata.json"), &sym).unwrap();
    let base_link = t.path().join("base-link");
    std::os::unix::fs::symlink(&base, &base_link).unwrap();
    let targets = [
        disk.join("layers/L1.data"),
        disk.join("layers/L2.log"),
        disk.join("strata.json"),
        disk.join("new-file"),
        disk.join("layers/new-file"),
        disk.clone(),
        base.clone(),
        hard,
        sym,
        base_link,
        PathBuf::from("/dev/null"),
    ];
    let before: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(disk.join("layers"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .chain([disk.join("strata.json"), base.clone()])
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    for target in &targets {
        for name in [&["c1"][..], &[]] {
            let mut args = vec!["disk", "export", s(&disk), "--output", s(target)];
            if let Some(n) = name.first() {
                args.push(n);
            }
            let (rc, out, err) = strata_bounded(&args);
            assert_ne!(
                rc,
                0,
                "export onto {} must be refused: {out}",
                target.display()
            );
            assert!(err.contains("refusing to export"), "{err}");
        }
    }
    for (p, bytes) in &before {
        assert_eq!(&std::fs::read(p).unwrap(), bytes, "{} changed", p.display());
    }
    assert!(!disk.join("new-file").exists());
    let check = ok(&["disk", "check", s(&disk)]);
    assert!(check.contains("clean"), "{check}");
    // A good target works, and replaces an existing file atomically.
    let good = t.path().join("out.raw");
    std::fs::write(&good, b"old").unwrap();
    ok(&["disk", "export", s(&disk), "c1", "--output", s(&good)]);
    assert_eq!(std::fs::read(&good).unwrap(), expected_image());
}

#[test]
fn damaged_checkpoint_tail_fails_export_and_leaves_no_output() {
    let t = tempfile::tempdir().unwrap();
    let disk = t.path().join("disk");
    ok(&["disk", "create", s(&disk), "--size", "4M"]);
    let mut content = vec![0u8; 4 << 20];
    for (i, b) in content.iter_mut().enumerate().take(64 * 4096) {
        *b = (i / 4096) as u8 + 1;
    }
    // Blocks are written through the journal crate (the disk is not served here).
    {
        let d = open_disk(&disk, false);
        d.now().write_at(&content[..64 * 4096], 0, true).unwrap();
    }
    ok(&["disk", "checkpoint", s(&disk), "--name", "c1"]);
    {
        let d = open_disk(&disk, false);
        d.now().write_at(&vec![0xEE; 64 * 4096], 0, true).unwrap();
    }
    ok(&["disk", "checkpoint", s(&disk), "--name", "c2"]);
    let tree: serde_json::Value =
        serde_json::from_slice(&std::fs::read(disk.join("strata.json")).unwrap()).unwrap();
    let c2_layer = tree["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "c2")
        .unwrap()["layers"][0]
        .as_u64()
        .unwrap();
    // Cut c2's log mid-record: the last records' blocks must not fall back to c1's data.
    let log = disk.join(format!("layers/L{c2_layer}.log"));
    let len = std::fs::metadata(&log).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(len - 32 * 20 - 7)
        .unwrap();
    let out = t.path().join("c2.raw");
    let (rc, _, err) = strata_bounded(&["disk", "export", s(&disk), "c2", "--output", s(&out)]);
    assert_ne!(rc, 0, "export of a damaged checkpoint must fail");
    assert!(err.contains("damaged"), "{err}");
    assert!(!out.exists(), "no partial output");
    let leftovers: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("strata-export"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let (rc, report, _) = strata_bounded(&["disk", "check", s(&disk)]);
    assert_eq!(rc, 2, "{report}");
    assert!(
        report.contains("bytes after the last valid record"),
        "{report}"
    );
    // c1 does not use the damaged layer.
    ok(&["disk", "export", s(&disk), "c1", "--output", s(&out)]);
    assert_eq!(std::fs::read(&out).unwrap(), content);
}

#[test]
fn damaged_now_leaves_info_check_and_other_exports_working() {
    let t = tempfile::tempdir().unwrap();
    let (disk, _base) = disk_over_base(t.path());
    // Now's active data file goes missing.
    std::fs::remove_file(disk.join("layers/L2.data")).unwrap();
    let info = ok(&["disk", "info", s(&disk)]);
    assert!(info.contains("checkpoints:  1"), "{info}");
    ok(&["disk", "tree", s(&disk)]);
    let out = t.path().join("c1.raw");
    ok(&["disk", "export", s(&disk), "c1", "--output", s(&out)]);
    assert_eq!(std::fs::read(&out).unwrap(), expected_image());
    let (rc, report, err) = strata_bounded(&["disk", "check", s(&disk)]);
    assert_eq!(rc, 2, "check reports instead of failing:\n{report}\n{err}");
    assert!(report.contains("damaged: Now: layer 2"), "{report}");
    let (rc, _, err) = strata_bounded(&[
        "disk",
        "export",
        s(&disk),
        "--output",
        s(&t.path().join("now.raw")),
    ]);
    assert_ne!(rc, 0);
    assert!(err.contains("Now cannot be read"), "{err}");
    // A bad log header in Now's active layer: the same.
    std::fs::write(disk.join("layers/L2.data"), b"").unwrap();
    std::fs::write(disk.join("layers/L2.log"), [0u8; 64]).unwrap();
    ok(&["disk", "info", s(&disk)]);
    ok(&["disk", "export", s(&disk), "c1", "--output", s(&out)]);
    let (rc, report, _) = strata_bounded(&["disk", "check", s(&disk)]);
    assert_eq!(rc, 2, "{report}");
    assert!(report.contains("bad log magic"), "{report}");
}

#[test]
fn fifos_devices_and_symlinks_as_metadata_are_refused_without_hanging() {
    let t = tempfile::tempdir().unwrap();
    let (disk, base) = disk_over_base(t.path());
    let json = disk.join("strata.json");
    let saved = std::fs::read(&json).unwrap();
    let out = t.path().join("o.raw");
    let commands: [Vec<&str>; 4] = [
        vec!["disk", "info", s(&disk)],
        vec!["disk", "check", s(&disk)],
        vec!["disk", "export", s(&disk), "c1", "--output", s(&out)],
        vec!["disk", "checkpoint", s(&disk), "--name", "x"],
    ];
    std::fs::remove_file(&json).unwrap();
    mkfifo(&json);
    for c in &commands {
        let (rc, _, err) = strata_bounded(c);
        assert_ne!(rc, 0, "{c:?}");
        assert!(err.contains("not a regular file"), "{c:?}: {err}");
    }
    std::fs::remove_file(&json).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &json).unwrap();
    for c in &commands {
        let (rc, _, err) = strata_bounded(c);
        assert_ne!(rc, 0, "{c:?}");
        assert!(err.contains("symbolic link"), "{c:?}: {err}");
    }
    std::fs::remove_file(&json).unwrap();
    std::fs::write(&json, &saved).unwrap();
    // An oversized strata.json is refused by its size limit (it is not read to the end).
    let big = t.path().join("big");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(1 << 40).unwrap();
    drop(f);
    std::fs::rename(&json, t.path().join("json.saved")).unwrap();
    std::fs::rename(&big, &json).unwrap();
    let (rc, _, err) = strata_bounded(&["disk", "info", s(&disk)]);
    assert_ne!(rc, 0);
    assert!(err.contains("larger than"), "{err}");
    std::fs::rename(t.path().join("json.saved"), &json).unwrap();
    // The base replaced by a FIFO: read-only commands go on without it (what it would
    // serve is unreadable), the writer refuses it.
    std::fs::remove_file(&base).unwrap();
    mkfifo(&base);
    ok(&["disk", "info", s(&disk)]);
    let (rc, report, err) = strata_bounded(&commands[1]);
    assert_eq!(rc, 2, "{report}{err}");
    assert!(report.contains("not a regular file"), "{report}");
    for c in &commands[2..] {
        let (rc, _, err) = strata_bounded(c);
        assert_ne!(rc, 0, "{c:?}");
        assert!(err.contains("not a regular file"), "{c:?}: {err}");
    }
    assert!(!out.exists());
    // Creating a disk over a FIFO or a device is refused too.
    let (rc, _, err) = strata_bounded(&[
        "disk",
        "create",
        s(&t.path().join("d2")),
        "--size",
        "4M",
        "--base",
        s(&base),
    ]);
    assert_ne!(rc, 0);
    assert!(err.contains("not a regular file"), "{err}");
    let (rc, _, err) = strata_bounded(&[
        "disk",
        "create",
        s(&t.path().join("d3")),
        "--size",
        "4M",
        "--base",
        "/dev/zero",
    ]);
    assert_ne!(rc, 0);
    assert!(err.contains("not a regular file"), "{err}");
}

#[test]
fn exhausted_id_counter_is_a_clear_error_and_the_disk_stays_usable() {
    let t = tempfile::tempdir().unwrap();
    let (disk, _) = disk_over_base(t.path());
    let json = disk.join("strata.json");
    let mut tree: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    tree["next_id"] = serde_json::Value::from(u64::MAX);
    std::fs::write(&json, serde_json::to_vec(&tree).unwrap()).unwrap();
    let (rc, _, err) = strata_bounded(&["disk", "checkpoint", s(&disk), "--name", "c2"]);
    assert_ne!(rc, 0);
    assert!(err.contains("id counter is exhausted"), "{err}");
    // Nothing was written: the disk opens, c1 exports, a later checkpoint fails the same way.
    ok(&["disk", "info", s(&disk)]);
    let out = t.path().join("c1.raw");
    ok(&["disk", "export", s(&disk), "c1", "--output", s(&out)]);
    let tree2: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(tree2["next_id"], serde_json::Value::from(u64::MAX));
    let leftovers = std::fs::read_dir(disk.join("layers")).unwrap().count();
    assert_eq!(leftovers, 4, "the new layer's files were removed");
    // An id at or above next_id is refused on load.
    tree["next_id"] = serde_json::Value::from(2u64);
    std::fs::write(&json, serde_json::to_vec(&tree).unwrap()).unwrap();
    let (rc, _, err) = strata_bounded(&["disk", "info", s(&disk)]);
    assert_ne!(rc, 0);
    assert!(err.contains("next_id"), "{err}");
}

#[test]
fn failed_metadata_save_leaves_no_temporary_file() {
    let t = tempfile::tempdir().unwrap();
    let (disk, _) = disk_over_base(t.path());
    let before = std::fs::read(disk.join("strata.json")).unwrap();
    // A file size limit below the size of strata.json makes its write fail (EFBIG, as a
    // full filesystem fails it with ENOSPC), after the temporary file was created.
    let limit = (before.len() / 2) as u64;
    let mut cmd = strata(&["disk", "checkpoint", s(&disk), "--name", "c2"]);
    // SAFETY: the closure only calls async-signal-safe setrlimit and signal in the child.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = {
        let _spawning = spawn_lock();
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the save must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("strata.json.tmp"), "{err}");
    assert!(
        !disk.join("strata.json.tmp").exists(),
        "temporary file left behind"
    );
    assert_eq!(std::fs::read(disk.join("strata.json")).unwrap(), before);
    ok(&["disk", "checkpoint", s(&disk), "--name", "c2"]);
    let _spawning = spawn_lock();
    let _ = run_strata(&["disk", "tree", s(&disk)]);
}

#[test]
fn changed_base_is_reported_with_the_other_damage() {
    let t = tempfile::tempdir().unwrap();
    let (disk, base) = disk_over_base(t.path());
    {
        let d = open_disk(&disk, false);
        d.now().write_at(&[7u8; 8192], 1 << 21, true).unwrap();
    }
    ok(&["disk", "checkpoint", s(&disk), "--name", "c2"]);
    // The base changes, and one block of c2's layer is damaged.
    std::fs::write(&base, vec![0x43u8; 1 << 20]).unwrap();
    let data = std::fs::OpenOptions::new()
        .write(true)
        .open(disk.join("layers/L2.data"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&data, &[0], 4096 + 5).unwrap();
    drop(data);
    let (rc, report, err) = strata_bounded(&["disk", "check", s(&disk)]);
    assert_eq!(rc, 2, "{report}{err}");
    assert!(report.contains("content changed"), "{report}");
    assert!(
        report.contains(&format!("disk offset {}", (1 << 21) + 4096)),
        "{report}"
    );
    ok(&["disk", "info", s(&disk)]);
    let out = t.path().join("c2.raw");
    let (rc, _, err) = strata_bounded(&["disk", "export", s(&disk), "c2", "--output", s(&out)]);
    assert_ne!(rc, 0);
    assert!(err.contains("base image"), "{err}");
    assert!(!out.exists());
    // The writer refuses the changed base outright.
    let (rc, _, err) = strata_bounded(&["disk", "checkpoint", s(&disk), "--name", "c3"]);
    assert_ne!(rc, 0);
    assert!(err.contains("content changed"), "{err}");
}

// ---- Log tails after a crash -------------------------------------------------------------

const BLK: usize = 4096;

/// A 4 MiB disk: "c1" holds blocks 0..8 as 1, "c2" (its child) rewrites blocks 0..4 as 2,
/// Now (c2's child) writes block 6 as 3 and flushes. Returns (disk, c1's layer, c2's
/// layer, Now's active layer).
fn layered_disk(dir: &Path) -> (PathBuf, u64, u64, u64) {
    let disk = dir.join("disk");
    {
        // `create` holds the disk's lock for a moment: a `strata` another test spawns then
        // would inherit it until its exec, and the open below would find the disk locked.
        let _spawning = spawn_lock();
        journal::Disk::create(&disk, 4 << 20, None).unwrap();
    }
    let mut d = open_disk(&disk, false);
    d.now().write_at(&[1u8; 8 * BLK], 0, true).unwrap();
    d.checkpoint("c1").unwrap();
    d.now().write_at(&[2u8; 4 * BLK], 0, true).unwrap();
    d.checkpoint("c2").unwrap();
    d.now().write_at(&[3u8; BLK], 6 * BLK as u64, true).unwrap();
    drop(d);
    let c1 = journal_common::checkpoint_layers(&disk, "c1");
    let c2 = journal_common::checkpoint_layers(&disk, "c2");
    let active = *journal_common::now_layers(&disk).last().unwrap();
    (disk, c1[0], c2[0], active)
}

/// What each view of [`layered_disk`] reads in blocks 0..8.
fn expected_blocks(view: &str) -> Vec<u8> {
    match view {
        "c1" => vec![1; 8],
        "c2" => vec![2, 2, 2, 2, 1, 1, 1, 1],
        _ => vec![2, 2, 2, 2, 1, 1, 3, 1],
    }
}

fn read_blocks(v: &journal::Volume) -> journal::Result<Vec<u8>> {
    let mut buf = vec![0u8; 8 * BLK];
    v.read_at(&mut buf, 0)?;
    for b in buf.chunks(BLK) {
        assert!(b.iter().all(|&x| x == b[0]), "a block reads mixed bytes");
    }
    Ok(buf.chunks(BLK).map(|b| b[0]).collect())
}

fn view(d: &Held, name: &str) -> std::sync::Arc<journal::Volume> {
    if name == "Now" {
        d.now()
    } else {
        d.checkpoint_view(name).unwrap()
    }
}

/// Every view reads as [`expected_blocks`] says, read-only and read-write, and `check` (of
/// the crate and of the CLI) is clean.
fn assert_reads_as_before(disk: &Path) {
    for read_only in [true, false] {
        let d = open_disk(disk, read_only);
        for name in ["c1", "c2", "Now"] {
            let got = read_blocks(&view(&d, name));
            assert_eq!(
                got.as_ref().ok(),
                Some(&expected_blocks(name)),
                "{name} (read_only {read_only}): {got:?}"
            );
        }
        let report = d.check().unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
    }
    let out = ok(&["disk", "check", s(disk)]);
    assert!(out.contains("clean"), "{out}");
}

fn log_file(disk: &Path, layer: u64) -> PathBuf {
    journal_common::layer_paths(disk, layer).0
}

/// Extends `path` by `len` zero bytes with `fallocate` mode 0 (as a preallocating writer
/// does before a crash that lands ahead of its write).
fn fallocate_tail(path: &Path, len: u64) {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let at = f.metadata().unwrap().len();
    // SAFETY: fallocate only reads its integer arguments; `f` is open for the call.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, at as i64, len as i64) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
}

fn write_at(path: &Path, bytes: &[u8], at: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, bytes, at).unwrap();
}

fn len_of(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// A sealed layer whose log ends in unwritten preallocated space (a compact-into-parent
/// merge killed between its `fallocate` of the absorbing log and its records) is clean, and
/// a later absorbing merge into that layer writes its records over the zeros.
#[test]
fn zero_tail_of_a_sealed_log_is_unwritten_space_not_damage() {
    let t = tempfile::tempdir().unwrap();
    let (disk, c1, c2, _) = layered_disk(t.path());
    fallocate_tail(&log_file(&disk, c1), 64 << 10);
    fallocate_tail(&log_file(&disk, c2), 100);
    let out = ok(&["disk", "check", s(&disk)]);
    for (l, zeros) in [(c1, 65536), (c2, 100)] {
        assert!(
            out.contains(&format!(
                "note: checkpoint \"c{}\": {}: {zeros} zero bytes at byte",
                if l == c1 { 1 } else { 2 },
                log_file(&disk, l).display()
            )),
            "{out}"
        );
    }
    assert!(
        out.contains("not damage; the next append writes over it"),
        "{out}"
    );
    assert_reads_as_before(&disk);
    // Deleting c1 absorbs c2's blocks into c1's layer (records appended at its last valid
    // record, over the zero tail).
    {
        let mut d = open_disk(&disk, false);
        d.delete_with(
            "c1",
            &journal::DeleteOptions::with(journal::StrategyKind::CompactIntoParent),
        )
        .unwrap();
        assert_eq!(
            read_blocks(&d.checkpoint_view("c2").unwrap()).unwrap(),
            expected_blocks("c2")
        );
        assert_eq!(read_blocks(&d.now()).unwrap(), expected_blocks("Now"));
        let report = d.check().unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
    }
    let d = open_disk(&disk, false);
    assert!(d.list().iter().all(|c| c.name != "c1"));
    assert_eq!(
        read_blocks(&d.checkpoint_view("c2").unwrap()).unwrap(),
        expected_blocks("c2")
    );
    assert_eq!(read_blocks(&d.now()).unwrap(), expected_blocks("Now"));
    assert!(d.check().unwrap().is_clean());
}

/// The active layer's log with a zero tail: a read-write open cuts it off, records stay.
#[test]
fn zero_tail_of_the_active_log_is_cut_at_a_writable_open() {
    let t = tempfile::tempdir().unwrap();
    let (disk, _, _, active) = layered_disk(t.path());
    let log = log_file(&disk, active);
    let len = len_of(&log);
    fallocate_tail(&log, 1 << 20);
    let out = ok(&["disk", "check", s(&disk)]);
    assert!(
        out.contains(&format!(
            "note: Now: {}: 1048576 zero bytes at byte {len} after the last record",
            log.display()
        )) && out.contains("a writable open cuts it off"),
        "{out}"
    );
    assert_reads_as_before(&disk);
    assert!(!ok(&["disk", "check", s(&disk)]).contains("note:"));
    assert_eq!(len_of(&log), len, "the writable open cuts the zero tail");
    // Appends go where the zeros were, and survive a reopen.
    {
        let d = open_disk(&disk, false);
        d.now().write_at(&[3u8; BLK], 7 * BLK as u64, true).unwrap();
    }
    let d = open_disk(&disk, false);
    assert_eq!(read_blocks(&d.now()).unwrap(), vec![2, 2, 2, 2, 1, 1, 3, 3]);
    assert!(d.check().unwrap().is_clean());
}

/// A torn record followed by zeros, and a garbage tail, are torn tails: damage in a sealed
/// layer (reads of it fail, `check` says where), dropped from the active layer.
#[test]
fn torn_record_before_zeros_and_garbage_tails_are_torn() {
    for garbage in [false, true] {
        let t = tempfile::tempdir().unwrap();
        let (disk, _, c2, active) = layered_disk(t.path());
        for layer in [c2, active] {
            let log = log_file(&disk, layer);
            let end = len_of(&log);
            if garbage {
                let bytes: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 1) as u8).collect();
                write_at(&log, &bytes, end);
            } else {
                fallocate_tail(&log, 4096);
                write_at(&log, &[0xa5; 10], end);
            }
        }
        let (rc, report, _) = strata_bounded(&["disk", "check", s(&disk)]);
        assert_eq!(rc, 2, "{report}");
        assert!(
            report.contains(&format!(
                "L{c2}.log: {} bytes after the last valid record",
                if garbage { 4096 } else { 32 }
            )),
            "{report}"
        );
        // The active log's torn record is no problem (a writable open drops it); its zero
        // tail may be a note.
        assert!(
            !report
                .lines()
                .any(|l| !l.starts_with("note: ") && l.contains(&format!("L{active}.log"))),
            "{report}"
        );
        assert_only_c1_reads(&open_disk(&disk, false));
        assert_eq!(
            len_of(&log_file(&disk, active)),
            journal_log_len(1),
            "the active log's tail was cut"
        );
    }
}

/// c2's layer is damaged: c2 and Now (which build on it) fail to read, c1 reads as before.
fn assert_only_c1_reads(d: &Held) {
    for name in ["c2", "Now"] {
        let got = read_blocks(&view(d, name));
        assert!(
            matches!(got, Err(journal::Error::Corrupt { .. })),
            "{name} uses the damaged layer: {got:?}"
        );
    }
    assert_eq!(
        read_blocks(&d.checkpoint_view("c1").unwrap()).unwrap(),
        expected_blocks("c1")
    );
}

/// Length of a log holding `records` records.
fn journal_log_len(records: u64) -> u64 {
    64 + 32 * records
}

/// A hole of zeros followed by valid records is damage (records that were durable may have
/// been lost there), reported as zeros; the records after it are read, and a writable open
/// never cuts them off.
#[test]
fn zero_hole_before_valid_records_is_damage_and_keeps_them() {
    let t = tempfile::tempdir().unwrap();
    let (disk, _, c2, active) = layered_disk(t.path());
    for (layer, records) in [(c2, 4u64), (active, 1)] {
        // The records move 256 bytes on, leaving 8 record slots of zeros before them.
        let log = log_file(&disk, layer);
        let bytes = std::fs::read(&log).unwrap();
        assert_eq!(bytes.len() as u64, journal_log_len(records));
        let mut holed = bytes[..64].to_vec();
        holed.resize(64 + 256, 0);
        holed.extend_from_slice(&bytes[64..]);
        std::fs::write(&log, &holed).unwrap();
    }
    let before: Vec<Vec<u8>> = [c2, active]
        .iter()
        .map(|&l| std::fs::read(log_file(&disk, l)).unwrap())
        .collect();
    for read_only in [false, true] {
        assert_only_c1_reads(&open_disk(&disk, read_only));
    }
    let after: Vec<Vec<u8>> = [c2, active]
        .iter()
        .map(|&l| std::fs::read(log_file(&disk, l)).unwrap())
        .collect();
    assert!(before == after, "the records after the hole were kept");
    let (rc, report, _) = strata_bounded(&["disk", "check", s(&disk)]);
    assert_eq!(rc, 2, "{report}");
    for l in [c2, active] {
        assert!(
            report.contains(&format!(
                "L{l}.log: record at byte 64: 8 consecutive records are zero bytes"
            )),
            "{report}"
        );
    }
}

/// A valid-looking older record of the layer at the end of its log (a filesystem that
/// exposes freed blocks after a crash could put a block of the layer's replaced log there):
/// replay takes it as the newest record of its block. Its data block was freed and reused
/// since, so the read fails its checksum (never the old data) and `check` says which
/// block. Format 1 records carry no sequence number, so a stale record whose data block
/// still holds its old bytes (a superseded block of zeros, punched) would be served: see
/// "Validating layer files at replay" in docs/FORMAT.md.
#[test]
fn stale_record_at_the_end_of_the_active_log_is_never_served_from_a_changed_block() {
    let t = tempfile::tempdir().unwrap();
    let (disk, _, _, active) = layered_disk(t.path());
    let log = log_file(&disk, active);
    let (stale, stale_block) = {
        let d = open_disk(&disk, false);
        d.now().write_at(&[4u8; BLK], 5 * BLK as u64, true).unwrap();
        let bytes = std::fs::read(&log).unwrap();
        let rec = bytes[bytes.len() - 32..].to_vec();
        let data_block = u64::from_le_bytes(rec[8..16].try_into().unwrap());
        // Block 5 is rewritten (its old data block is freed), then other blocks reuse it.
        d.now().write_at(&[5u8; BLK], 5 * BLK as u64, true).unwrap();
        d.now().flush().unwrap();
        // One block at a time, so each write takes a single free block (best fit: the freed
        // one). A freed block is no longer punched before it is reused (up to a bound it is
        // kept as it is), so it is its reuse that changes it.
        d.now().write_at(&[6u8; BLK], 0, true).unwrap();
        d.now().write_at(&[6u8; BLK], BLK as u64, true).unwrap();
        d.now().flush().unwrap();
        (rec, data_block)
    };
    let end = len_of(&log);
    write_at(&log, &stale, end);
    let expect_ok = [6, 6, 2, 2, 1, 5, 3, 1];
    for read_only in [true, false] {
        let d = open_disk(&disk, read_only);
        let mut buf = vec![0u8; BLK];
        let got = d.now().read_at(&mut buf, 5 * BLK as u64);
        assert!(
            got.is_err(),
            "the stale record's data was served: {:?}",
            &buf[..4]
        );
        assert_ne!(buf[..4], [4; 4]);
        for b in (0..8).filter(|&b| b != 5) {
            d.now().read_at(&mut buf, b * BLK as u64).unwrap();
            assert_eq!(buf[0], expect_ok[b as usize], "block {b}");
        }
    }
    let (rc, report, _) = strata_bounded(&["disk", "check", s(&disk)]);
    assert_eq!(rc, 2, "{report}");
    assert!(
        report.contains(&format!(
            "L{active}.data data block {stale_block} (disk offset {})",
            5 * BLK
        )),
        "{report}"
    );
}
