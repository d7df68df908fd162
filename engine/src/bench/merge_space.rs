//! Space a merge takes on the host: bytes allocated by a file or a directory tree, and a
//! sampler thread that records the peak while a merge runs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes the host allocated for `path` (a file, or every file below a directory); missing
/// or unreadable entries count as 0 (files come and go while a merge runs).
pub fn allocated(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(path)
            .map(|d| d.flatten().map(|e| allocated(&e.path())).sum())
            .unwrap_or(0)
    } else {
        meta.blocks() * 512
    }
}

/// Samples [`allocated`] of a directory every few milliseconds until stopped.
pub struct PeakSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl PeakSampler {
    pub fn start(dir: &Path, every: Duration) -> PeakSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(allocated(dir)));
        let (s, p, d): (_, _, PathBuf) = (stop.clone(), peak.clone(), dir.to_path_buf());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                p.fetch_max(allocated(&d), Ordering::AcqRel);
                std::thread::sleep(every);
            }
        });
        PeakSampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    /// Stops sampling (after one last sample) and returns the largest size seen.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Acquire)
    }
}

impl Drop for PeakSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_allocation_and_sees_the_peak() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(allocated(&tmp.path().join("missing")), 0);
        let sub = tmp.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let f = sub.join("f");
        std::fs::write(&f, vec![1u8; 1 << 20]).unwrap();
        // A sparse file takes (almost) nothing.
        let sparse = std::fs::File::create(tmp.path().join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        let a = allocated(tmp.path());
        assert!((1 << 20..(1 << 20) + (1 << 18)).contains(&a), "{a}");
        let s = PeakSampler::start(tmp.path(), Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(30));
        std::fs::remove_file(&f).unwrap();
        let peak = s.finish();
        assert!(
            peak >= 1 << 20,
            "the peak is kept after the file is gone: {peak}"
        );
        assert!(allocated(tmp.path()) < 1 << 20);
    }
}
