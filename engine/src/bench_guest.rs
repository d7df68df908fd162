//! `strata bench guest`: the built-in test guest's 4 KiB random write and read IOPS through
//! virtio-blk (queue depth 1 and 32), beside the journal driven directly through its io_uring
//! engine with the same workload shape in the same run, and the time from `strata run` start
//! to the guest's first completed I/O.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use journal::{AlignedBuf, CacheMode, Completion, Disk, IoEngine, OpenOptions, Request};
use vmm::test_guest::Summary;

use crate::{Error, Result};

/// Options of `strata bench guest`.
#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// Directory for guest.csv and guest.md (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Operations per measured cell.
    #[arg(long, default_value_t = 40_000)]
    pub ops: u64,
    /// Region of the disk the workload covers (bytes, suffixes allowed).
    #[arg(long, default_value = "64M")]
    pub region: String,
    /// Runs of every cell; the best is kept (other load on the host only slows runs down).
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Scratch directory (default: a fresh one in $TMPDIR, removed afterwards).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
}

/// One measured cell.
#[derive(Debug, Clone)]
pub struct Cell {
    pub target: &'static str,
    pub workload: &'static str,
    pub qd: u32,
    pub iops: f64,
}

fn strata_exe() -> Result<PathBuf> {
    std::env::current_exe().map_err(|e| Error::io("locating the strata binary", e))
}

/// Runs the test guest with `workload` on `disk`; returns its summary and the time from
/// spawning `strata run` to the `done` line.
pub(crate) fn run_guest(disk: &Path, workload: &str) -> Result<(Summary, Duration)> {
    let start = Instant::now();
    let mut child = Command::new(strata_exe()?)
        .arg("run")
        .arg("--disk")
        .arg(disk)
        .args(["--memory", "256M", "--workload", workload])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Error::io("spawning strata run", e))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::Vm("no stdout from strata run".into()))?;
    let mut done = None;
    let mut console = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| Error::io("reading the guest console", e))?;
        if done.is_none() && line.starts_with(vmm::test_guest::DONE_PREFIX) {
            done = Some(start.elapsed());
        }
        console.push_str(&line);
        console.push('\n');
    }
    let status = child
        .wait()
        .map_err(|e| Error::io("waiting for strata run", e))?;
    let summary = Summary::from_console(&console)
        .map_err(|e| Error::Vm(format!("guest summary: {e}; console:\n{console}")))?;
    if !status.success() || summary.errors != 0 {
        return Err(Error::Vm(format!(
            "guest run failed ({status}, {} errors):\n{console}",
            summary.errors
        )));
    }
    let elapsed = done.ok_or_else(|| Error::Vm("the guest printed no done line".into()))?;
    Ok((summary, elapsed))
}

/// splitmix64, for the direct journal run's offsets.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Drives `ops` 4 KiB random reads or writes over `region` bytes at queue depth `qd` directly
/// through the journal's io_uring engine; returns IOPS.
fn run_direct(disk: &Path, region: u64, ops: u64, qd: u32, read: bool) -> Result<f64> {
    let d = Disk::open(
        disk,
        OpenOptions {
            cache: CacheMode::None,
            read_only: false,
        },
    )?;
    let mut eng = IoEngine::new(d.now(), qd)?;
    let blocks = region / 4096;
    let mut seed = 0x5eed ^ u64::from(qd) ^ u64::from(read);
    let mut out: Vec<Completion> = Vec::new();
    let data = Arc::new(vec![0xa5u8; 4096]);
    let start = Instant::now();
    for i in 0..ops {
        let offset = (next(&mut seed) % blocks) * 4096;
        let req = if read {
            Request::Read { offset, len: 4096 }
        } else {
            Request::Write {
                offset,
                buf: AlignedBuf::from_slice(&data),
                fua: false,
            }
        };
        eng.submit(i, req).map_err(journal::Error::from)?;
        while eng.in_flight() >= qd as usize {
            eng.wait(1, &mut out)?;
        }
        for c in out.drain(..) {
            c.result?;
        }
    }
    eng.wait(usize::MAX, &mut out)?;
    for c in out.drain(..) {
        c.result?;
    }
    Ok(ops as f64 / start.elapsed().as_secs_f64())
}

/// `strata bench guest`.
pub fn run(args: GuestArgs) -> Result<ExitCode> {
    let region = crate::size::parse_size(&args.region)?;
    if region < 1 << 20 || region % 4096 != 0 {
        return Err(Error::Usage(
            "--region must be a multiple of 4 KiB, at least 1 MiB".into(),
        ));
    }
    std::fs::create_dir_all(&args.out)
        .map_err(|e| Error::io(format!("creating {}", args.out.display()), e))?;
    let work = match &args.workdir {
        Some(w) => w.clone(),
        None => std::env::temp_dir().join(format!("strata-bench-guest-{}", std::process::id())),
    };
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)
        .map_err(|e| Error::io(format!("creating {}", work.display()), e))?;
    let result = measure(&args, region, &work);
    if args.workdir.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    let (cells, first_io) = result?;
    write_report(&args.out, &cells, first_io)?;
    Ok(ExitCode::SUCCESS)
}

fn measure(args: &GuestArgs, region: u64, work: &Path) -> Result<(Vec<Cell>, Duration)> {
    let mut cells: Vec<Cell> = Vec::new();
    let mut best = |target: &'static str, workload: &'static str, qd: u32, iops: f64| match cells
        .iter_mut()
        .find(|c| c.target == target && c.workload == workload && c.qd == qd)
    {
        Some(c) => c.iops = c.iops.max(iops),
        None => cells.push(Cell {
            target,
            workload,
            qd,
            iops,
        }),
    };
    let mut first_io = Duration::MAX;
    for rep in 0..args.repeat.max(1) {
        for qd in [1u32, 32] {
            // Writes first (fresh disk), then reads of the region they filled.
            let guest_disk = work.join(format!("guest-{rep}-{qd}"));
            let direct_disk = work.join(format!("direct-{rep}-{qd}"));
            Disk::create(&guest_disk, 1 << 30, None)?;
            Disk::create(&direct_disk, 1 << 30, None)?;
            for (workload, read) in [("randwrite-4k", false), ("randread-4k", true)] {
                let spec = format!(
                    "seed={},ops={},read={},bs=4k,region=0:{region},qd={qd},flush=0,verify=1",
                    7 + rep,
                    args.ops,
                    if read { 100 } else { 0 }
                );
                // The guest only verifies blocks it wrote in this run, so its read run also
                // writes nothing and checks nothing on its own: give it the write run's
                // region content by reusing the disk.
                let (summary, _) = run_guest(&guest_disk, &spec)?;
                best("guest-virtio", workload, qd, summary.iops as f64);
                let direct = run_direct(&direct_disk, region, args.ops, qd, read)?;
                best("journal-direct", workload, qd, direct);
                eprintln!(
                    "guest bench: {workload} qd{qd}: guest {} IOPS, direct {direct:.0} IOPS",
                    summary.iops
                );
            }
            let _ = std::fs::remove_dir_all(&guest_disk);
            let _ = std::fs::remove_dir_all(&direct_disk);
        }
        let first_disk = work.join(format!("first-{rep}"));
        let (_, t) = run_guest(&first_disk, "seed=1,ops=1,read=0,bs=4k,qd=1,flush=0")?;
        first_io = first_io.min(t);
        let _ = std::fs::remove_dir_all(&first_disk);
    }
    Ok((cells, first_io))
}

fn write_report(out: &Path, cells: &[Cell], first_io: Duration) -> Result<()> {
    let mut csv = String::from("target,workload,qd,iops\n");
    for c in cells {
        csv.push_str(&format!(
            "{},{},{},{:.0}\n",
            c.target, c.workload, c.qd, c.iops
        ));
    }
    csv.push_str(&format!(
        "first-io,strata-run-start-to-first-completed-io-ms,1,{:.1}\n",
        first_io.as_secs_f64() * 1e3
    ));
    let mut md = String::from("| workload | qd | guest via virtio-blk (IOPS) | journal direct (IOPS) | ratio |\n| --- | --- | --- | --- | --- |\n");
    for c in cells.iter().filter(|c| c.target == "guest-virtio") {
        let direct = cells
            .iter()
            .find(|d| d.target == "journal-direct" && d.workload == c.workload && d.qd == c.qd)
            .map(|d| d.iops)
            .unwrap_or(0.0);
        let ratio = if direct > 0.0 { c.iops / direct } else { 0.0 };
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.2}x |\n",
            c.workload, c.qd, c.iops, direct, ratio
        ));
    }
    md.push_str(&format!(
        "\nTime from `strata run` start to the guest's first completed I/O (process spawn to the `done` line of a 1-op run): {:.1} ms\n",
        first_io.as_secs_f64() * 1e3
    ));
    for (name, text) in [("guest.csv", &csv), ("guest.md", &md)] {
        let path = out.join(name);
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    }
    print!("{md}");
    Ok(())
}
