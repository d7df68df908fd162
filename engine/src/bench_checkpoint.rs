//! `strata bench checkpoint`: whole-machine checkpoints of the busy test guest at several
//! memory sizes, in each memory mode: the pause (guest downtime: last vCPU stopped to first
//! vCPU running again), the time to a complete checkpoint, the bytes written (a full image,
//! then an increment after the guest ran on), the time from `apply` to the guest running again,
//! and the longest stall the guest itself saw. Baseline in the same run: writing the same bytes
//! to a file with io_uring.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::Value;

use crate::control::client::call;
use crate::control::Request;
use crate::size::parse_size;
use crate::{Error, Result};

/// Options of `strata bench checkpoint`.
#[derive(Args, Debug, Clone)]
pub struct CheckpointArgs {
    /// Directory for checkpoint.csv, checkpoint.md and checkpoint.svg (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Guest memory sizes, comma separated.
    #[arg(long, default_value = "256M,1G,4G", value_delimiter = ',')]
    pub memory: Vec<String>,
    /// Fraction of guest memory the guest keeps rewriting (its `dirty=` key), in percent.
    #[arg(long, default_value_t = 25)]
    pub dirty_percent: u64,
    /// How long the guest runs before the first checkpoint, and between the steps (seconds).
    #[arg(long, default_value_t = 1.5)]
    pub settle: f64,
    /// Operations of the guest's workload: enough to outlast the checkpoints and the apply;
    /// its `done` line then reports the longest stall it saw.
    #[arg(long, default_value_t = 300_000)]
    pub ops: u64,
    /// Scratch directory (default: a fresh one in $TMPDIR, removed afterwards).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
}

/// One row of checkpoint.csv.
#[derive(Debug, Clone)]
pub struct Row {
    pub memory_mib: u64,
    /// `live`, `live-incremental`, `stop-copy`, `stop-copy-incremental`, `io_uring-write`.
    pub mode: String,
    pub pause_ms: f64,
    pub guest_max_stall_ms: f64,
    pub total_ms: f64,
    pub bytes_written: u64,
    pub apply_ms: f64,
}

const HEADER: &str = "memory_mib,mode,pause_ms,guest_max_stall_ms,total_ms,bytes_written,apply_ms";

fn strata_exe() -> Result<PathBuf> {
    std::env::current_exe().map_err(|e| Error::io("locating the strata binary", e))
}

fn ms(us: &Value) -> f64 {
    us.as_u64().map_or(f64::NAN, |u| u as f64 / 1000.0)
}

/// `strata bench checkpoint`.
pub fn run(args: CheckpointArgs) -> Result<ExitCode> {
    std::fs::create_dir_all(&args.out)
        .map_err(|e| Error::io(format!("creating {}", args.out.display()), e))?;
    let scratch = Scratch::new(args.workdir.clone())?;
    let mut rows = Vec::new();
    for m in &args.memory {
        let bytes = parse_size(m)?;
        for mode in ["live", "stop-copy"] {
            eprintln!("bench checkpoint: {} MiB, {mode}", bytes >> 20);
            rows.extend(one(&scratch.path, bytes, mode, &args)?);
        }
        // The limit: the bytes of the full stop-copy image, written to a file with io_uring.
        let full = rows
            .iter()
            .find(|r| r.memory_mib == bytes >> 20 && r.mode == "stop-copy")
            .map_or(bytes, |r| r.bytes_written.max(1 << 20));
        let path = scratch.path.join("baseline.img");
        let took = vmm::snapshot::memory::bench_baseline_write(&path, full)
            .map_err(|e| Error::Vm(crate::cli::error_chain(&e)))?;
        let _ = std::fs::remove_file(&path);
        rows.push(Row {
            memory_mib: bytes >> 20,
            mode: "io_uring-write".into(),
            pause_ms: f64::NAN,
            guest_max_stall_ms: f64::NAN,
            total_ms: took.as_secs_f64() * 1000.0,
            bytes_written: full,
            apply_ms: f64::NAN,
        });
    }
    let csv = csv(&rows);
    let md = markdown(&rows);
    for (name, text) in [
        ("checkpoint.csv", csv.clone()),
        ("checkpoint.md", md.clone()),
        ("checkpoint.svg", svg(&rows)),
    ] {
        let p = args.out.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
    }
    print!("{md}");
    Ok(ExitCode::SUCCESS)
}

/// One memory size and mode: full checkpoint, increment, apply; then the guest's own view.
fn one(work: &Path, mem: u64, mode: &str, args: &CheckpointArgs) -> Result<Vec<Row>> {
    let dir = work.join(format!("vm-{}-{mode}", mem >> 20));
    let _ = std::fs::remove_dir_all(&dir);
    let dirty = (mem * args.dirty_percent / 100) & !0xfffff;
    let workload = format!(
        "seed=1,ops={},read=30,bs=4k,region=0:64M,qd=16,flush=64,dirty={}",
        args.ops,
        dirty.max(1 << 20)
    );
    let status = Command::new(strata_exe()?)
        .args(["vm", "create"])
        .arg(&dir)
        .args([
            "--memory",
            &mem.to_string(),
            "--disk-size",
            "1G",
            "--workload",
            &workload,
        ])
        .stdout(Stdio::null())
        .status()
        .map_err(|e| Error::io("running strata vm create", e))?;
    if !status.success() {
        return Err(Error::Vm(format!(
            "strata vm create {} failed",
            dir.display()
        )));
    }
    let api = dir.join("api.sock");
    let mut child = Command::new(strata_exe()?)
        .args(["run", "--vm"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::io("spawning strata run", e))?;
    let result = (|| -> Result<Vec<Row>> {
        wait_socket(&api, &mut child)?;
        let settle = Duration::from_secs_f64(args.settle);
        std::thread::sleep(settle);
        let mut rows = Vec::new();
        let mut apply_ms = f64::NAN;
        for (name, kind) in [
            ("full", mode.to_string()),
            ("incr", format!("{mode}-incremental")),
        ] {
            let v = call(
                &api,
                &Request::CheckpointCreate {
                    name: name.into(),
                    memory: Some(mode.into()),
                },
            )?;
            let c = &v["checkpoint"];
            rows.push(Row {
                memory_mib: mem >> 20,
                mode: kind,
                pause_ms: ms(&c["pause_us"]),
                guest_max_stall_ms: f64::NAN,
                total_ms: ms(&c["total_us"]),
                bytes_written: c["memory_bytes"].as_u64().unwrap_or(0),
                apply_ms: f64::NAN,
            });
            std::thread::sleep(settle / 3);
        }
        let v = call(
            &api,
            &Request::CheckpointApply {
                name: "incr".into(),
                save_current: None,
            },
        )?;
        apply_ms = apply_ms.max(ms(&v["applied"]["apply_us"]));
        std::thread::sleep(settle / 3);
        for r in &mut rows {
            r.apply_ms = apply_ms;
        }
        Ok(rows)
    })();
    // Let the guest finish (its done line reports the longest stall it saw); stop it if it
    // takes too long.
    let deadline = Instant::now() + Duration::from_secs(300);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if matches!(child.try_wait(), Ok(None)) {
        // SAFETY: kill only sends a signal to our own child's pid.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let mut console = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut console);
    }
    let _ = child.wait();
    let stall = console
        .lines()
        .rev()
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix("max_stall_us="))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(f64::NAN, |us| us as f64 / 1000.0);
    let _ = std::fs::remove_dir_all(&dir);
    let mut rows = result?;
    for r in &mut rows {
        r.guest_max_stall_ms = stall;
    }
    Ok(rows)
}

fn wait_socket(api: &Path, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::os::unix::net::UnixStream::connect(api).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(Error::Vm(format!("strata run ended early ({st})")));
        }
        if Instant::now() > deadline {
            return Err(Error::Vm("the VM's control socket never appeared".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn f(x: f64) -> String {
    if x.is_nan() {
        String::new()
    } else {
        format!("{x:.2}")
    }
}

/// The CSV text.
pub fn csv(rows: &[Row]) -> String {
    let mut out = format!("{HEADER}\n");
    for r in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            r.memory_mib,
            r.mode,
            f(r.pause_ms),
            f(r.guest_max_stall_ms),
            f(r.total_ms),
            r.bytes_written,
            f(r.apply_ms)
        ));
    }
    out
}

/// The markdown table, with the ratios the targets are stated in.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| memory | mode | pause ms | guest max stall ms | complete ms | bytes written | apply ms | write rate vs io_uring |\n|---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.memory_mib == r.memory_mib && b.mode == "io_uring-write");
        let ratio = match base {
            Some(b) if r.mode.starts_with("stop-copy") && r.bytes_written > 0 => {
                let rate = r.bytes_written as f64 / r.total_ms;
                let brate = b.bytes_written as f64 / b.total_ms;
                format!("{:.2}x", rate / brate)
            }
            _ => String::new(),
        };
        out.push_str(&format!(
            "| {} MiB | {} | {} | {} | {} | {} | {} | {} |\n",
            r.memory_mib,
            r.mode,
            f(r.pause_ms),
            f(r.guest_max_stall_ms),
            f(r.total_ms),
            r.bytes_written,
            f(r.apply_ms),
            ratio
        ));
    }
    out
}

/// A bar chart of the pause per memory size and mode.
pub fn svg(rows: &[Row]) -> String {
    let bars: Vec<&Row> = rows.iter().filter(|r| !r.pause_ms.is_nan()).collect();
    let max = bars.iter().map(|r| r.pause_ms).fold(1.0, f64::max);
    let (w, h, left, bottom) = (760.0, 360.0, 60.0, 80.0);
    let bw = (w - left - 20.0) / bars.len().max(1) as f64;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11"><text x="{}" y="16" text-anchor="middle" font-size="14">Guest pause per checkpoint (ms, lower is better)</text><line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        w / 2.0,
        h - bottom,
        w - 20.0,
        h - bottom
    );
    for (i, r) in bars.iter().enumerate() {
        let bh = (h - bottom - 30.0) * r.pause_ms / max;
        let x = left + i as f64 * bw + 4.0;
        let color = if r.mode.starts_with("live") {
            "#3b7dd8"
        } else {
            "#d8833b"
        };
        s.push_str(&format!(
            r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{:.1}</text><text x="{:.1}" y="{:.1}" text-anchor="end" transform="rotate(-40 {:.1} {:.1})">{} MiB {}</text>"#,
            h - bottom - bh,
            bw - 8.0,
            x + (bw - 8.0) / 2.0,
            h - bottom - bh - 3.0,
            r.pause_ms,
            x + bw / 2.0,
            h - bottom + 12.0,
            x + bw / 2.0,
            h - bottom + 12.0,
            r.memory_mib,
            r.mode
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// A scratch directory removed on drop (unless the user gave one).
struct Scratch {
    path: PathBuf,
    owned: bool,
}

impl Scratch {
    fn new(given: Option<PathBuf>) -> Result<Scratch> {
        match given {
            Some(p) => {
                std::fs::create_dir_all(&p)
                    .map_err(|e| Error::io(format!("creating {}", p.display()), e))?;
                Ok(Scratch {
                    path: p,
                    owned: false,
                })
            }
            None => {
                let p =
                    std::env::temp_dir().join(format!("strata-bench-ckpt-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p)
                    .map_err(|e| Error::io(format!("creating {}", p.display()), e))?;
                Ok(Scratch {
                    path: p,
                    owned: true,
                })
            }
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_has_the_issue_columns_and_ratios() {
        let rows = vec![
            Row {
                memory_mib: 256,
                mode: "stop-copy".into(),
                pause_ms: 100.0,
                guest_max_stall_ms: 101.0,
                total_ms: 100.0,
                bytes_written: 100 << 20,
                apply_ms: 5.0,
            },
            Row {
                memory_mib: 256,
                mode: "io_uring-write".into(),
                pause_ms: f64::NAN,
                guest_max_stall_ms: f64::NAN,
                total_ms: 50.0,
                bytes_written: 100 << 20,
                apply_ms: f64::NAN,
            },
        ];
        let c = csv(&rows);
        assert!(c.starts_with(HEADER));
        assert!(c.contains("256,io_uring-write,,,50.00,104857600,"), "{c}");
        let md = markdown(&rows);
        assert!(md.contains("| 0.50x |"), "{md}");
        assert!(svg(&rows).contains("<rect"));
    }
}
