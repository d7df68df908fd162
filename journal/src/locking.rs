//! Who may use a disk directory at the same time (see "Concurrent readers" in
//! `docs/DESIGN.md`).
//!
//! - A writer (any open that may change the disk) holds `lock` exclusively.
//! - A read-only open holds `lock` shared when no writer runs: writers stay out while it
//!   lasts, so it may read Now.
//! - A read-only open made while a writer runs holds no lock on `lock`. It reads only
//!   checkpoints, whose layers are sealed, and pins every layer it opened with a shared
//!   `flock` on the layer's log. Before the writer punches blocks out of a sealed layer it
//!   takes an exclusive `flock` on that log, and leaves the blocks allocated when a reader
//!   pins it. Whole layer files are only ever unlinked, which an open reader does not notice.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::layer::LayerFiles;
use crate::safe_open::{open_regular, Links};
use crate::{Error, Result};

/// Name of the lock file inside a disk directory.
pub const LOCK_FILE: &str = "lock";

/// `flock(fd, op | LOCK_NB)`: `Ok(false)` when another holder conflicts.
fn flock_nb(f: &File, op: i32) -> std::io::Result<bool> {
    // SAFETY: flock only reads the fd, which `f` keeps open for the call.
    let r = unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

fn open_lock_file(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut opts = OpenOptions::new();
    opts.read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600);
    open_regular(&path, &opts, Links::Refuse)
}

/// How long [`lock_writer`] keeps trying while the lock is held. A `flock` belongs to the
/// open file description, which `fork` shares: a child this process forks (to exec a
/// tool, or a test's `strata`) holds a copy of every lock fd until its exec closes them,
/// so a disk closed and reopened by this process meanwhile finds its own old lock still
/// held for that moment (milliseconds). A lock a running writer holds outlasts this.
const WRITER_LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

/// Takes the writer's exclusive lock; [`Error::Locked`] if anyone else holds it (still,
/// after [`WRITER_LOCK_PATIENCE`]).
pub fn lock_writer(dir: &Path) -> Result<File> {
    let f = open_lock_file(dir)?;
    let deadline = std::time::Instant::now() + WRITER_LOCK_PATIENCE;
    loop {
        match flock_nb(&f, libc::LOCK_EX) {
            Ok(true) => return Ok(f),
            Ok(false) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Ok(false) => return Err(Error::Locked(dir.to_path_buf())),
            Err(e) => return Err(Error::io(dir.join(LOCK_FILE), e)),
        }
    }
}

/// Takes a reader's shared lock; `None` while a writer holds the disk.
pub fn lock_reader(dir: &Path) -> Result<Option<File>> {
    let f = open_lock_file(dir)?;
    match flock_nb(&f, libc::LOCK_SH) {
        Ok(true) => Ok(Some(f)),
        Ok(false) => Ok(None),
        Err(e) => Err(Error::io(dir.join(LOCK_FILE), e)),
    }
}

/// Pins a sealed layer for as long as `lf` stays open; false if the writer is punching it.
pub fn pin(lf: &LayerFiles) -> Result<bool> {
    flock_nb(&lf.log, libc::LOCK_SH).map_err(|e| Error::io(&lf.log_path, e))
}

/// The writer's claim on a sealed layer before punching its blocks: `None` while a reader
/// pins it. The claim lasts as long as the returned file is open.
pub fn claim(log_path: &Path) -> Result<Option<File>> {
    let mut opts = OpenOptions::new();
    opts.read(true);
    let f = open_regular(log_path, &opts, Links::Refuse)?;
    match flock_nb(&f, libc::LOCK_EX) {
        Ok(true) => Ok(Some(f)),
        Ok(false) => Ok(None),
        Err(e) => Err(Error::io(log_path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second open file description of the lock file, locked exclusively: what a forked
    /// child's inherited copy of a writer's lock fd is.
    fn hold(dir: &Path) -> File {
        let f = open_lock_file(dir).unwrap();
        assert!(flock_nb(&f, libc::LOCK_EX).unwrap());
        f
    }

    #[test]
    fn a_lock_released_soon_after_is_taken() {
        let t = tempfile::tempdir().unwrap();
        let held = hold(t.path());
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            drop(held);
        });
        lock_writer(t.path()).expect("taken once the inherited copy is closed");
        release.join().unwrap();
    }

    #[test]
    fn a_lock_that_stays_held_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let _held = hold(t.path());
        assert!(matches!(lock_writer(t.path()), Err(Error::Locked(_))));
        // A reader does not wait: it reads checkpoints only while a writer runs.
        assert!(lock_reader(t.path()).unwrap().is_none());
    }
}
