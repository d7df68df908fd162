//! `strata bench guest`: the built-in test guest's 4 KiB random write and read IOPS through
//! virtio-blk (queue depth 1 and 32), beside the journal driven directly through its io_uring
//! engine with the same workload shape in the same run, and the time from `strata run` start
//! to the guest's first completed I/O. The guest runs in both of its wait modes: sleeping on
//! the device interrupt (`irq=1`, the default) and spinning on its used ring (`irq=0`); each
//! guest cell also reports the exits per request the guest caused (`kicks` + `waits` of its
//! done line).

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
    /// Data-path exits per request the guest caused (guest targets only; of the best run).
    pub exits_per_request: Option<f64>,
}

/// The guest targets and the workload suffix that selects each wait mode.
const GUEST_MODES: [(&str, &str); 2] =
    [("guest-virtio", ",irq=1"), ("guest-virtio-spin", ",irq=0")];

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
    let mut best =
        |target: &'static str, workload: &'static str, qd: u32, iops: f64, exits: Option<f64>| {
            match cells
                .iter_mut()
                .find(|c| c.target == target && c.workload == workload && c.qd == qd)
            {
                Some(c) if iops > c.iops => {
                    c.iops = iops;
                    c.exits_per_request = exits;
                }
                Some(_) => {}
                None => cells.push(Cell {
                    target,
                    workload,
                    qd,
                    iops,
                    exits_per_request: exits,
                }),
            }
        };
    let mut first_io = Duration::MAX;
    for rep in 0..args.repeat.max(1) {
        for qd in [1u32, 32] {
            // Writes first (fresh disks), then reads of the region they filled. Each mode of
            // the guest has its own disk, so every write run allocates as the direct one does.
            let direct_disk = work.join(format!("direct-{rep}-{qd}"));
            Disk::create(&direct_disk, 1 << 30, None)?;
            let guest_disks: Vec<PathBuf> = (0..GUEST_MODES.len())
                .map(|m| work.join(format!("guest-{rep}-{qd}-{m}")))
                .collect();
            for d in &guest_disks {
                Disk::create(d, 1 << 30, None)?;
            }
            for (workload, read) in [("randwrite-4k", false), ("randread-4k", true)] {
                let spec = format!(
                    "seed={},ops={},read={},bs=4k,region=0:{region},qd={qd},flush=0,verify=1",
                    7 + rep,
                    args.ops,
                    if read { 100 } else { 0 }
                );
                // The guest only verifies blocks it wrote in this run, so its read run also
                // writes nothing and checks nothing on its own: give it the write run's
                // region content by reusing the disk. The modes and the direct run take
                // turns, so load on the host falls on all of them alike.
                let mut line = format!("guest bench: {workload} qd{qd}:");
                for ((target, mode), disk) in GUEST_MODES.iter().zip(&guest_disks) {
                    let (summary, _) = run_guest(disk, &format!("{spec}{mode}"))?;
                    let exits = (summary.kicks + summary.waits) as f64 / summary.ops.max(1) as f64;
                    best(target, workload, qd, summary.iops as f64, Some(exits));
                    line.push_str(&format!(
                        " {target} {} IOPS ({exits:.3} exits/request),",
                        summary.iops
                    ));
                }
                let direct = run_direct(&direct_disk, region, args.ops, qd, read)?;
                best("journal-direct", workload, qd, direct, None);
                eprintln!("{line} direct {direct:.0} IOPS");
            }
            for d in guest_disks.iter().chain([&direct_disk]) {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        let first_disk = work.join(format!("first-{rep}"));
        let (_, t) = run_guest(&first_disk, "seed=1,ops=1,read=0,bs=4k,qd=1,flush=0")?;
        first_io = first_io.min(t);
        let _ = std::fs::remove_dir_all(&first_disk);
    }
    Ok((cells, first_io))
}

fn write_report(out: &Path, cells: &[Cell], first_io: Duration) -> Result<()> {
    let mut csv = String::from("target,workload,qd,iops,exits_per_request\n");
    for c in cells {
        let exits = c
            .exits_per_request
            .map(|e| format!("{e:.4}"))
            .unwrap_or_default();
        csv.push_str(&format!(
            "{},{},{},{:.0},{exits}\n",
            c.target, c.workload, c.qd, c.iops
        ));
    }
    csv.push_str(&format!(
        "first-io,strata-run-start-to-first-completed-io-ms,1,{:.1},\n",
        first_io.as_secs_f64() * 1e3
    ));
    let mut md = String::from(
        "| workload | qd | guest, irq (IOPS) | exits/req | ratio | guest, spinning (IOPS) | \
         exits/req | ratio | journal direct (IOPS) |\n| --- | --- | --- | --- | --- | --- | --- \
         | --- | --- |\n",
    );
    let find = |target: &str, c: &Cell| {
        cells
            .iter()
            .find(|d| d.target == target && d.workload == c.workload && d.qd == c.qd)
    };
    for c in cells.iter().filter(|c| c.target == "journal-direct") {
        let direct = c.iops;
        md.push_str(&format!("| {} | {} |", c.workload, c.qd));
        for (target, _) in GUEST_MODES {
            let (iops, exits) = find(target, c)
                .map(|g| (g.iops, g.exits_per_request.unwrap_or(0.0)))
                .unwrap_or((0.0, 0.0));
            let ratio = if direct > 0.0 { iops / direct } else { 0.0 };
            md.push_str(&format!(" {iops:.0} | {exits:.3} | {ratio:.2}x |"));
        }
        md.push_str(&format!(" {direct:.0} |\n"));
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
