//! fio jobs: a raw file with `--ioengine=io_uring --direct=1`, or an NBD export with
//! `--ioengine=nbd`; results read from fio's JSON output.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::{fail, Measured, Workload};
use crate::{Error, Result};

/// Where a fio job does its I/O.
#[derive(Clone, Copy, Debug)]
pub enum FioTarget<'a> {
    /// A file, opened with O_DIRECT and driven on io_uring.
    File(&'a Path),
    /// An NBD server listening on a unix socket (fio's libnbd engine).
    Nbd(&'a Path),
}

/// One fio job.
#[derive(Clone, Copy, Debug)]
pub struct FioJob {
    pub workload: Workload,
    pub qd: u32,
    /// Bytes of the target to use, from offset 0.
    pub size: u64,
    pub runtime: Duration,
}

impl FioJob {
    /// The fio command line (without the program name). Reads run for the whole runtime;
    /// writes stop at the runtime or after one pass over the target, so that a random write
    /// never hits a block twice (fio's random map) and a sequential one never wraps.
    pub fn args(&self, target: FioTarget<'_>) -> Vec<String> {
        let rw = match self.workload {
            Workload::RandRead => "randread",
            Workload::RandWrite | Workload::RandWriteFlush8 => "randwrite",
            Workload::SeqWrite => "write",
        };
        let mut a = vec![
            "--name=strata-bench".to_string(),
            "--output-format=json".to_string(),
            format!("--rw={rw}"),
            format!("--bs={}", self.workload.block_size()),
            format!("--iodepth={}", self.qd.max(1)),
            format!("--size={}", self.size),
            format!("--runtime={}ms", self.runtime.as_millis().max(1)),
            "--randrepeat=1".to_string(),
            "--numjobs=1".to_string(),
        ];
        if !self.workload.is_write() {
            a.push("--time_based".to_string());
        }
        if self.workload.flush_every() > 0 {
            // fio's nbd engine has no datasync; both become NBD_CMD_FLUSH there.
            let sync = match target {
                FioTarget::File(_) => "fdatasync",
                FioTarget::Nbd(_) => "fsync",
            };
            a.push(format!("--{sync}={}", self.workload.flush_every()));
        }
        match target {
            FioTarget::File(path) => {
                a.push(format!("--filename={}", path.display()));
                a.push("--ioengine=io_uring".to_string());
                a.push("--direct=1".to_string());
            }
            FioTarget::Nbd(socket) => {
                a.push("--ioengine=nbd".to_string());
                a.push(format!("--uri=nbd+unix:///?socket={}", socket.display()));
            }
        }
        a
    }

    /// Runs fio and returns what it measured.
    pub fn run(&self, target: FioTarget<'_>) -> Result<Measured> {
        let args = self.args(target);
        let out = Command::new("fio")
            .args(&args)
            .output()
            .map_err(|e| Error::io("running fio (install it: apt-get install fio)", e))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(fail(
                format!("fio {}", args.join(" ")),
                format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        parse_output(&stdout, self.workload.is_write()).map_err(|e| {
            fail(
                format!("fio {}", args.join(" ")),
                crate::cli::error_chain(&e),
            )
        })
    }
}

/// Extracts the read or write side of the single job in fio's JSON output (which may be
/// preceded by warnings).
pub fn parse_output(text: &str, write: bool) -> Result<Measured> {
    let start = text
        .find('{')
        .ok_or_else(|| fail("fio output", "no JSON object in fio's output"))?;
    let v: serde_json::Value = serde_json::from_str(&text[start..])
        .map_err(|e| fail("fio output", format!("invalid JSON: {e}")))?;
    let job = v
        .get("jobs")
        .and_then(|j| j.get(0))
        .ok_or_else(|| fail("fio output", "no job in fio's JSON"))?;
    if let Some(err) = job
        .get("error")
        .and_then(|e| e.as_i64())
        .filter(|&e| e != 0)
    {
        return Err(fail(
            "fio output",
            format!("fio job failed with error {err}"),
        ));
    }
    let side = job
        .get(if write { "write" } else { "read" })
        .ok_or_else(|| fail("fio output", "no read/write section in fio's JSON"))?;
    let num = |key: &str| side.get(key).and_then(|x| x.as_f64()).unwrap_or(0.0);
    let ops = num("total_ios") as u64;
    let bytes = num("io_bytes") as u64;
    let runtime_ms = num("runtime");
    if ops == 0 || runtime_ms <= 0.0 {
        return Err(fail("fio output", "fio completed no I/O"));
    }
    Ok(Measured {
        ops,
        bytes,
        secs: runtime_ms / 1000.0,
    })
}

/// Checks that fio exists, and with `nbd` that its libnbd engine does; a clear error if not.
pub fn check(nbd: bool) -> Result<String> {
    let out = Command::new("fio").arg("--version").output().map_err(|e| {
        Error::io(
            "fio is needed for the raw-fio baseline (install it: apt-get install fio)",
            e,
        )
    })?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if nbd {
        let help = Command::new("fio")
            .arg("--enghelp=nbd")
            .output()
            .map_err(|e| Error::io("running fio --enghelp=nbd", e))?;
        let text = String::from_utf8_lossy(&help.stdout);
        if !help.status.success() || !text.contains("uri") {
            return Err(fail(
                "fio has no nbd engine",
                "install a fio built with libnbd (Debian's fio package has it), or pass --skip-nbd",
            ));
        }
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"fio: some warning
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "strata-bench",
      "error" : 0,
      "read" : { "io_bytes" : 40960000, "bw_bytes" : 20480000, "iops" : 5000.0, "runtime" : 2000, "total_ios" : 10000 },
      "write" : { "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.0, "runtime" : 0, "total_ios" : 0 }
    }
  ]
}"#;

    #[test]
    fn parses_the_read_side() {
        let m = parse_output(SAMPLE, false).unwrap();
        assert_eq!(
            m,
            Measured {
                ops: 10000,
                bytes: 40_960_000,
                secs: 2.0
            }
        );
        assert_eq!(m.iops(), 5000.0);
        assert!(parse_output(SAMPLE, true).is_err(), "no writes were done");
        assert!(parse_output("garbage", false).is_err());
        assert!(parse_output(r#"{"jobs":[{"error":5,"read":{}}]}"#, false).is_err());
    }

    #[test]
    fn job_arguments() {
        let job = FioJob {
            workload: Workload::SeqWrite,
            qd: 32,
            size: 1 << 30,
            runtime: Duration::from_millis(2500),
        };
        let a = job.args(FioTarget::Nbd(Path::new("/tmp/s.sock")));
        assert!(a.contains(&"--rw=write".to_string()));
        assert!(a.contains(&"--bs=65536".to_string()));
        assert!(a.contains(&"--runtime=2500ms".to_string()));
        assert!(a.contains(&"--uri=nbd+unix:///?socket=/tmp/s.sock".to_string()));
        assert!(
            !a.contains(&"--time_based".to_string()),
            "writes make one pass at most"
        );
        let job = FioJob {
            workload: Workload::RandRead,
            qd: 1,
            ..job
        };
        let a = job.args(FioTarget::File(Path::new("/x/raw.img")));
        assert!(a.contains(&"--time_based".to_string()));
        assert!(
            a.contains(&"--direct=1".to_string()) && a.contains(&"--ioengine=io_uring".to_string())
        );
        assert!(a.contains(&"--filename=/x/raw.img".to_string()));
        assert!(!a.iter().any(|x| x.contains("sync=")));
        let job = FioJob {
            workload: Workload::RandWriteFlush8,
            ..job
        };
        let a = job.args(FioTarget::File(Path::new("/x/raw.img")));
        assert!(a.contains(&"--fdatasync=8".to_string()));
        assert!(a.contains(&"--rw=randwrite".to_string()));
        let a = job.args(FioTarget::Nbd(Path::new("/x/s.sock")));
        assert!(
            a.contains(&"--fsync=8".to_string()),
            "fio's nbd engine has no datasync"
        );
    }
}
