//! ENOSPC during a merge, on a small ext4 filesystem the test makes (loop mount; needs
//! root): the merge stops with an error naming the disk, every view reads as before, `check`
//! is clean, and the job resumes once space is freed, or is abandoned leaving nothing.

mod journal_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use journal::{CacheMode, DeleteOptions, Disk, Error, StrategyKind};

/// A loop-mounted ext4 filesystem, unmounted and removed on drop.
struct SmallFs {
    root: tempfile::TempDir,
    mnt: PathBuf,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed (this test needs root and loop devices): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl SmallFs {
    fn new(mib: u64) -> SmallFs {
        let root = tempfile::tempdir_in("/var/tmp").unwrap();
        let img = root.path().join("fs.img");
        let mnt = root.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::File::create(&img)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&img));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        SmallFs { root, mnt }
    }

    fn free(&self) -> u64 {
        let c = std::ffi::CString::new(self.mnt.as_os_str().to_str().unwrap()).unwrap();
        // SAFETY: statvfs writes only into `st`, which lives across the call.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out pointer.
        let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        assert_eq!(r, 0);
        st.f_bavail * st.f_frsize
    }

    /// Fills the filesystem up to `leave` free bytes with a filler file.
    fn fill(&self, leave: u64) -> PathBuf {
        let f = self.mnt.join("filler");
        let free = self.free();
        let file = std::fs::File::create(&f).unwrap();
        if free > leave {
            // SAFETY: fallocate only reads its integer arguments; the fd is open.
            let r = unsafe {
                libc::fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    0,
                    0,
                    (free - leave) as i64,
                )
            };
            assert_eq!(
                r,
                0,
                "fallocate filler: {}",
                std::io::Error::last_os_error()
            );
        }
        file.sync_all().unwrap();
        f
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let _ = &self.root;
    }
}

fn open(dir: &Path) -> Disk {
    journal_common::open(dir, CacheMode::None)
}

/// A 96 MiB loop-mounted ext4 filesystem holding a 64 MiB disk whose checkpoint "a" holds
/// `chunks` 64 KiB writes of patterned bytes at scattered blocks (drawn from `seed`).
/// Returns the filesystem, the disk's directory, the open disk and the last chunk written
/// (the later writes' data).
fn disk_with_checkpoint_a(seed: u64, chunks: u64) -> (SmallFs, PathBuf, Disk, Vec<u8>) {
    let fs = SmallFs::new(96);
    let dir = fs.mnt.join("disk");
    Disk::create(&dir, 64 << 20, None).unwrap();
    let mut disk = open(&dir);
    let now = disk.now();
    let mut x = seed;
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..chunks {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        buf.iter_mut()
            .enumerate()
            .for_each(|(k, b)| *b = (x >> 24) as u8 ^ k as u8);
        let blk = (x >> 33) % (16384 - 16);
        now.write_at(&buf, blk * 4096, false).unwrap();
    }
    disk.checkpoint("a").unwrap();
    (fs, dir, disk, buf)
}

fn contents(disk: &Disk) -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    let size = disk.now().size() as usize;
    for c in disk.list() {
        let mut b = vec![0u8; size];
        disk.checkpoint_view(&c.name)
            .unwrap()
            .read_at(&mut b, 0)
            .unwrap();
        v.push((c.name, b));
    }
    let mut b = vec![0u8; size];
    disk.now().read_at(&mut b, 0).unwrap();
    v.push((String::new(), b));
    v
}

fn assert_same(disk: &Disk, before: &[(String, Vec<u8>)], skip: &str, what: &str) {
    let now = contents(disk);
    for (name, data) in before {
        if name == skip {
            continue;
        }
        let got = now
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{what}: view {name:?} is gone"));
        assert!(got.1 == *data, "{what}: view {name:?} changed");
    }
}

/// The batch of these merges (the merge of `a` copies about 5 of them).
const BATCH: u64 = 4 << 20;

fn scenario(strategy: StrategyKind) {
    // 20 MiB in checkpoint a (scattered), 2 MiB in b, a little in Now.
    let (fs, dir, mut disk, buf) = disk_with_checkpoint_a(0x9e37_79b9, 320);
    let now = disk.now();
    for i in 0..32u64 {
        now.write_at(&buf, (i * 97 % 16000) * 4096, false).unwrap();
    }
    disk.checkpoint("b").unwrap();
    now.write_at(&buf, 0, true).unwrap();
    let before = contents(&disk);
    // Leave 1 MiB: the merge needs about 22 MiB (a new layer) or 2 MiB (absorbing).
    let filler = fs.fill(1 << 20);
    let opts = DeleteOptions {
        batch_bytes: Some(BATCH),
        ..DeleteOptions::with(strategy)
    };
    let (_, jobs) = disk.delete_online("a", &opts).unwrap();
    assert_eq!(jobs.len(), 1, "{strategy} makes one job");
    let mut job = jobs.into_iter().next().unwrap();
    let never = AtomicBool::new(false);
    let e = job
        .run(&never)
        .expect_err("the merge must run out of space");
    assert!(matches!(e, Error::NoSpace { .. }), "{e:?}");
    assert_eq!(e.errno(), libc::ENOSPC);
    let msg = e.to_string();
    assert!(
        msg.contains(&dir.display().to_string()) && msg.contains("no space left"),
        "{msg}"
    );
    let status = job.progress().status();
    assert!(
        status.state.starts_with("paused: no space left"),
        "{status:?}"
    );
    assert!(status.bytes_done < status.bytes_total, "{status:?}");
    // Nothing is lost: every view reads as before, and check is clean.
    assert_same(&disk, &before, "a", "after ENOSPC");
    assert!(disk.check().unwrap().is_clean());
    // Free the space and resume.
    std::fs::remove_file(&filler).unwrap();
    job.run(&never).unwrap();
    let r = disk.finish_merge(job).unwrap();
    assert!(!r.discarded && r.bytes_copied > 0, "{r:?}");
    if strategy == StrategyKind::CompactIntoChild {
        // Progressive: the copied sources are freed batch by batch.
        assert!(
            r.bytes_copied >= 4 * BATCH && r.peak_extra_bytes <= BATCH + (2 << 20),
            "peak extra space of a new-layer merge: {r:?}"
        );
    }
    assert_same(&disk, &before, "a", "after the resumed merge");
    assert!(disk.check().unwrap().is_clean());

    // Out of space again, this time abandoned: nothing changes, no file is left.
    let files_before = std::fs::read_dir(dir.join("layers")).unwrap().count();
    now.write_at(&buf, 4096 * 100, false).unwrap();
    disk.checkpoint("c").unwrap();
    let before_c = contents(&disk);
    let filler = fs.fill(1 << 20);
    let (_, jobs) = disk
        .delete_online("b", &DeleteOptions::with(StrategyKind::CompactIntoChild))
        .unwrap();
    let mut job = jobs.into_iter().next().expect("a job");
    let e = job.run(&never).expect_err("out of space");
    assert!(matches!(e, Error::NoSpace { .. }), "{e:?}");
    disk.abandon_merge(job);
    assert_same(&disk, &before_c, "b", "after abandoning");
    assert!(disk.check().unwrap().is_clean());
    std::fs::remove_file(&filler).unwrap();
    drop(disk);
    let disk = open(&dir);
    assert_same(&disk, &before_c, "b", "after reopening");
    let files = std::fs::read_dir(dir.join("layers")).unwrap().count();
    assert!(
        files <= files_before + 2,
        "{files} files, {files_before} before"
    );
}

/// A merge into a new layer that copies ~22 MiB completes with 10 MiB free: it needs one
/// batch (4 MiB) of extra space, not the whole output.
#[test]
fn a_new_layer_merge_fits_in_a_few_batches_of_free_space() {
    let (fs, _dir, mut disk, buf) = disk_with_checkpoint_a(0x5151_7777, 360);
    let now = disk.now();
    now.write_at(&buf, 0, false).unwrap();
    disk.checkpoint("b").unwrap();
    now.write_at(&buf, 4096 * 64, true).unwrap();
    let before = contents(&disk);
    let _filler = fs.fill(10 << 20);
    let opts = DeleteOptions {
        batch_bytes: Some(BATCH),
        ..DeleteOptions::with(StrategyKind::CompactIntoChild)
    };
    let (_, jobs) = disk.delete_online("a", &opts).unwrap();
    let mut job = jobs.into_iter().next().expect("a job");
    job.run(&AtomicBool::new(false))
        .expect("the merge fits in 10 MiB of free space");
    let r = disk.finish_merge(job).unwrap();
    assert!(r.bytes_copied >= 18 << 20, "{r:?}");
    assert!(r.peak_extra_bytes <= BATCH + (2 << 20), "{r:?}");
    assert_same(&disk, &before, "a", "after the merge");
    assert!(disk.check().unwrap().is_clean());
}

#[test]
fn enospc_into_a_new_layer_is_resumable() {
    scenario(StrategyKind::CompactIntoChild);
}

#[test]
fn enospc_absorbing_is_resumable() {
    scenario(StrategyKind::CompactIntoParent);
}
