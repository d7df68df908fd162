//! What every `strata bench` run sets up the same way: its output and scratch directories
//! (the scratch one removed on every exit path unless kept), the strata binary it drives,
//! the machine's load average for the report, and the writable disks it builds its chains in.

use std::fs;
use std::path::{Path, PathBuf};

use journal::{CacheMode, Disk, OpenOptions};

use crate::{Error, Result};

/// The scratch directory of a run: removed when dropped unless asked to keep it.
pub struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("bench: images kept in {}", self.path.display());
        } else if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("bench: could not remove {}: {e}", self.path.display());
        }
    }
}

/// Creates the output directory `out` and the scratch directory `work` (its guard removes
/// it again unless `keep`).
pub fn prepare(out: &Path, work: &Path, keep: bool) -> Result<WorkDir> {
    fs::create_dir_all(out).map_err(|e| Error::io(format!("creating {}", out.display()), e))?;
    fs::create_dir_all(work).map_err(|e| Error::io(format!("creating {}", work.display()), e))?;
    Ok(WorkDir {
        path: work.to_path_buf(),
        keep,
    })
}

/// The running strata binary (the benches start servers with it).
pub fn strata_exe() -> Result<PathBuf> {
    std::env::current_exe().map_err(|e| Error::io("locating the strata binary", e))
}

/// The 1, 5 and 15 minute load averages, "unknown" if unreadable.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Creates a Strata disk of `size` bytes (over `base` if given) and opens it writable with
/// the page cache, as the chains are built.
pub fn create_writable(dir: &Path, size: u64, base: Option<&Path>) -> Result<Disk> {
    Disk::create(dir, size, base)?;
    Ok(Disk::open(
        dir,
        OpenOptions {
            cache: CacheMode::Writeback,
            read_only: false,
        },
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_work_directory_goes_unless_kept() {
        let t = tempfile::tempdir().unwrap();
        let (out, work) = (t.path().join("out"), t.path().join("w/x"));
        let g = prepare(&out, &work, false).unwrap();
        assert!(out.is_dir() && work.is_dir());
        fs::write(work.join("f"), b"1").unwrap();
        drop(g);
        assert!(!work.exists() && out.is_dir());
        drop(prepare(&out, &work, true).unwrap());
        assert!(work.is_dir(), "kept");
        let d = create_writable(&t.path().join("d"), 1 << 20, None).unwrap();
        assert_eq!(d.now().size(), 1 << 20);
        assert!(!loadavg().is_empty());
    }
}
