//! The foreground load of `strata bench merge`: fio 4 KiB random writes at queue depth 32
//! through NBD, running until stopped, logging every completion (Unix-epoch milliseconds and
//! latency), so the IOPS and the p99 latency of any time window can be compared: before the
//! delete against during the merge, in the same run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::fail;
use crate::{Error, Result};

/// Upper bound of one load run (it is stopped earlier, once the merge is done).
const MAX_RUNTIME: Duration = Duration::from_secs(1800);
/// How long fio may take to write its logs and exit after SIGINT (a loaded machine took
/// over 30 s for an 18 MB log).
const EXIT_WAIT: Duration = Duration::from_secs(180);
/// How long the log may take to appear after fio exited.
const LOG_WAIT: Duration = Duration::from_secs(10);

/// Milliseconds since the Unix epoch (fio's `--log_unix_epoch` clock).
pub fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A running fio job.
pub struct FioLoad {
    child: Option<Child>,
    prefix: PathBuf,
    pub started_ms: u64,
}

/// One completion: when (epoch ms) and how long it took (ns).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub at_ms: u64,
    pub lat_ns: u64,
}

/// IOPS and latency over a time window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    pub iops: f64,
    pub p99_us: f64,
    pub ops: usize,
}

impl FioLoad {
    /// Starts `fio --ioengine=nbd` on the unix socket, random 4 KiB writes at depth `qd` over
    /// the first `size` bytes; its logs go to `<log_prefix>_clat.1.log`.
    pub fn start(socket: &Path, size: u64, qd: u32, log_prefix: &Path) -> Result<FioLoad> {
        let args = [
            "--name=strata-merge-load".to_string(),
            "--rw=randwrite".to_string(),
            "--bs=4096".to_string(),
            format!("--iodepth={qd}"),
            format!("--size={size}"),
            "--time_based".to_string(),
            format!("--runtime={}s", MAX_RUNTIME.as_secs()),
            "--norandommap".to_string(),
            "--randrepeat=0".to_string(),
            "--ioengine=nbd".to_string(),
            format!("--uri=nbd+unix:///?socket={}", socket.display()),
            format!("--write_lat_log={}", log_prefix.display()),
            "--log_unix_epoch=1".to_string(),
            "--output-format=json".to_string(),
        ];
        let child = Command::new("fio")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io("starting fio (install it: apt-get install fio)", e))?;
        Ok(FioLoad {
            child: Some(child),
            prefix: log_prefix.to_path_buf(),
            started_ms: epoch_ms(),
        })
    }

    /// Fails if fio already exited (it never does by itself before [`MAX_RUNTIME`]).
    pub fn check_running(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Err(fail("fio load", "already stopped"));
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                Err(fail(
                    format!("fio load exited early ({st})"),
                    err.trim().to_string(),
                ))
            }
            Err(e) => Err(Error::io("waiting for fio", e)),
        }
    }

    /// Stops fio (SIGINT: it finishes its logs) and returns every logged completion.
    pub fn stop(mut self) -> Result<Vec<Sample>> {
        if let Some(mut child) = self.child.take() {
            interrupt(&mut child);
        }
        let path = PathBuf::from(format!("{}_clat.1.log", self.prefix.display()));
        // fio writes the log as it exits; on a loaded machine that can lag the exit status.
        let deadline = std::time::Instant::now() + LOG_WAIT;
        while !path.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("reading fio's log {}", path.display()), e))?;
        let samples = parse_log(&text).map_err(|e| fail(format!("{}", path.display()), e))?;
        for suffix in ["clat", "lat", "slat"] {
            let _ = std::fs::remove_file(format!("{}_{suffix}.1.log", self.prefix.display()));
        }
        Ok(samples)
    }
}

fn interrupt(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill takes no pointers; the pid is our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGINT) };
    }
    let deadline = std::time::Instant::now() + EXIT_WAIT;
    while std::time::Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for FioLoad {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            interrupt(&mut child);
        }
    }
}

/// Parses fio's per-I/O latency log: `time_ms, latency_ns, direction, bs, offset[, prio]`.
pub fn parse_log(text: &str) -> std::result::Result<Vec<Sample>, String> {
    let mut v = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut f = line.split(',').map(str::trim);
        let bad = || format!("line {}: {line:?}", i + 1);
        let at_ms = f.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
        let lat_ns = f.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
        v.push(Sample { at_ms, lat_ns });
    }
    Ok(v)
}

/// IOPS and p99 latency of the completions in `[from_ms, to_ms)`; None if the window is
/// empty or has no completion.
pub fn window(samples: &[Sample], from_ms: u64, to_ms: u64) -> Option<Window> {
    window_union(samples, &[(from_ms, to_ms)])
}

/// [`window`] over several disjoint windows taken together.
pub fn window_union(samples: &[Sample], windows: &[(u64, u64)]) -> Option<Window> {
    let span: u64 = windows.iter().map(|&(a, b)| b.saturating_sub(a)).sum();
    if span == 0 {
        return None;
    }
    let mut lat: Vec<u64> = samples
        .iter()
        .filter(|s| windows.iter().any(|&(a, b)| s.at_ms >= a && s.at_ms < b))
        .map(|s| s.lat_ns)
        .collect();
    if lat.is_empty() {
        return None;
    }
    lat.sort_unstable();
    let idx = ((lat.len() as f64 * 0.99).ceil() as usize).clamp(1, lat.len()) - 1;
    Some(Window {
        iops: lat.len() as f64 / (span as f64 / 1000.0),
        p99_us: lat[idx] as f64 / 1000.0,
        ops: lat.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_logs() {
        let s = parse_log("1796166807217, 117065, 1, 4096, 0\n1796166807218, 5, 1, 4096, 0, 0\n\n")
            .unwrap();
        assert_eq!(
            s,
            vec![
                Sample {
                    at_ms: 1796166807217,
                    lat_ns: 117065
                },
                Sample {
                    at_ms: 1796166807218,
                    lat_ns: 5
                }
            ]
        );
        assert!(parse_log("x, 1").unwrap_err().contains("line 1"));
    }

    #[test]
    fn windows_count_and_rank() {
        // 1000 completions over 1 s: latencies 1..=1000 us.
        let s: Vec<Sample> = (0..1000u64)
            .map(|i| Sample {
                at_ms: 10_000 + i,
                lat_ns: (i + 1) * 1000,
            })
            .collect();
        let w = window(&s, 10_000, 11_000).unwrap();
        assert_eq!(w.ops, 1000);
        assert!((w.iops - 1000.0).abs() < 1e-9);
        assert_eq!(w.p99_us, 990.0);
        let half = window(&s, 10_500, 11_000).unwrap();
        assert_eq!(half.ops, 500);
        assert_eq!(half.p99_us, 995.0);
        assert!(window(&s, 20_000, 21_000).is_none());
        assert!(window(&s, 11_000, 11_000).is_none());
        // Two halves of 250 ms each: 500 completions in 0.5 s.
        let u = window_union(&s, &[(10_000, 10_250), (10_750, 11_000)]).unwrap();
        assert_eq!(u.ops, 500);
        assert!((u.iops - 1000.0).abs() < 1e-9);
        assert_eq!(u.p99_us, 995.0);
    }

    #[test]
    fn runs_against_a_file_less_socket_and_reports_the_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let mut load = FioLoad::start(
            &tmp.path().join("no-such.sock"),
            1 << 20,
            4,
            &tmp.path().join("lg"),
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while load.check_running().is_ok() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            load.check_running().is_err(),
            "fio cannot connect: it exits"
        );
    }
}
