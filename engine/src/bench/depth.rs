//! `strata bench depth`: read and write speed against checkpoint-chain depth, for the journal
//! in-process, a raw file, `strata disk serve` and `qemu-nbd` over an equivalent qcow2 chain.
//!
//! Setup (once, for the deepest depth N): a raw base image of `--size` bytes filled with
//! pseudo-random data; a Strata disk over that base with checkpoints c1..cN, where layer i
//! holds `--writes-per-layer` scattered 4 KiB writes of byte i (see `pattern`); and a qcow2
//! chain q1..qN over the same base holding exactly the same writes. Depth D then means:
//! reads of checkpoint cD (Strata) or image qD (qcow2), both D layers over the base, served
//! read-only; allocating writes go into a fresh empty top layer over cD / qD (Strata: `apply
//! cD`; qcow2: a new overlay), recreated before every write run so each run writes into
//! fresh space. A separate raw file of the same size is the physical baseline (raw-fio).
//! guest-virtio is the test guest through virtio-blk (`strata run --disk` on Now after
//! `apply cD`), its own IOPS as it counts them.
//! Every file of a target is synced and dropped from the page cache before each run.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use journal::{CacheMode, Disk, OpenOptions};

use super::fio::{FioJob, FioTarget};
use super::pattern::{fill_raw, layer_writes, LayerWrites, BLOCK};
use super::procs::{self, cache_name, Server};
use super::report::{
    self, Row, TARGET_GUEST, TARGET_JOURNAL, TARGET_QCOW2_NBD, TARGET_RAW, TARGET_STRATA_NBD,
};
use super::scratch::{self, loadavg};
use super::{fail, journal_run, plot, runtime_from_secs, DepthArgs, Measured, Workload};
use crate::{Error, Result};

/// The cells measured at every depth, reads first (they need no reset).
pub const CELLS: [(Workload, u32); 6] = [
    (Workload::RandRead, 1),
    (Workload::RandRead, 32),
    (Workload::RandWrite, 1),
    (Workload::RandWrite, 32),
    (Workload::SeqWrite, 32),
    (Workload::RandWriteFlush8, 32),
];

/// The guest's ledger has room for a region of this many bytes at 256 MiB of guest RAM.
const GUEST_REGION_MAX: u64 = 128 << 20;

const SEED_BASE: u64 = 1;
const SEED_RAW: u64 = 2;

/// Validated options.
#[derive(Clone, Debug)]
pub struct Config {
    pub out: PathBuf,
    pub size: u64,
    pub depths: Vec<usize>,
    pub runtime: Duration,
    pub repeat: u32,
    pub writes_per_layer: u64,
    pub workdir: PathBuf,
    pub keep_workdir: bool,
    pub skip_nbd: bool,
    pub skip_guest: bool,
    pub guest_ops: u64,
}

impl Config {
    pub fn from_args(a: &DepthArgs) -> Result<Config> {
        let size = crate::size::parse_size(&a.size)?;
        if size < (1 << 20) || size % 65536 != 0 {
            return Err(Error::Usage(format!(
                "--size must be a multiple of 64 KiB and at least 1 MiB, got {size}"
            )));
        }
        let mut depths = a.depths.clone();
        depths.sort_unstable();
        depths.dedup();
        if depths.is_empty() || depths[0] == 0 || depths[depths.len() - 1] > 1000 {
            return Err(Error::Usage("--depths must be between 1 and 1000".into()));
        }
        if a.writes_per_layer == 0 || a.writes_per_layer > size / BLOCK {
            return Err(Error::Usage(format!(
                "--writes-per-layer must be between 1 and {} (the disk's 4 KiB blocks)",
                size / BLOCK
            )));
        }
        if a.guest_ops == 0 || a.guest_ops > 100_000_000 {
            return Err(Error::Usage(
                "--guest-ops must be between 1 and 100000000".into(),
            ));
        }
        if a.repeat == 0 || a.repeat > 100 {
            return Err(Error::Usage("--repeat must be between 1 and 100".into()));
        }
        let root = a.workdir.clone().unwrap_or_else(std::env::temp_dir);
        Ok(Config {
            out: a.out.clone(),
            size,
            depths,
            runtime: runtime_from_secs(a.runtime)?,
            repeat: a.repeat,
            writes_per_layer: a.writes_per_layer,
            workdir: root.join(format!("strata-bench-depth-{}", std::process::id())),
            keep_workdir: a.keep_workdir,
            skip_nbd: a.skip_nbd,
            skip_guest: a.skip_guest,
            guest_ops: a.guest_ops,
        })
    }

    fn deepest(&self) -> usize {
        self.depths.last().copied().unwrap_or(1)
    }

    /// (target, cache) pairs in measuring order: each NBD pair back to back.
    pub fn targets(&self) -> Vec<(&'static str, CacheMode)> {
        let mut t = vec![
            (TARGET_JOURNAL, CacheMode::None),
            (TARGET_RAW, CacheMode::None),
        ];
        if !self.skip_guest {
            t.push((TARGET_GUEST, CacheMode::None));
        }
        if !self.skip_nbd {
            for c in [CacheMode::None, CacheMode::Writeback] {
                t.push((TARGET_STRATA_NBD, c));
                t.push((TARGET_QCOW2_NBD, c));
            }
        }
        t
    }
}

/// The files of one run.
struct Env {
    exe: PathBuf,
    base: PathBuf,
    raw: PathBuf,
    disk: PathBuf,
    qcow: Vec<PathBuf>,
    qtop: PathBuf,
    socket: PathBuf,
}

fn checkpoint_name(layer: usize) -> String {
    format!("c{layer}")
}

/// `strata bench depth`.
pub fn run(args: DepthArgs) -> Result<ExitCode> {
    if let Some(csv) = &args.from_csv {
        return rerender(csv, &args.out);
    }
    let cfg = Config::from_args(&args)?;
    let fio_version = super::fio::check(!cfg.skip_nbd)?;
    let qemu_version = if cfg.skip_nbd {
        "not used (--skip-nbd)".to_string()
    } else {
        procs::check_qemu()?
    };
    let _guard = scratch::prepare(&cfg.out, &cfg.workdir, cfg.keep_workdir)?;
    let exe = scratch::strata_exe()?;
    let load_before = loadavg();
    let started = std::time::Instant::now();

    let layers: Vec<LayerWrites> = (1..=cfg.deepest())
        .map(|l| layer_writes(l, cfg.size, cfg.writes_per_layer))
        .collect();
    let w = &cfg.workdir;
    let env = Env {
        exe,
        base: w.join("base.raw"),
        raw: w.join("raw.img"),
        disk: w.join("strata-disk"),
        qcow: Vec::new(),
        qtop: w.join("qtop.qcow2"),
        socket: w.join("nbd.sock"),
    };
    eprintln!(
        "bench: writing the raw base and the raw baseline ({} MiB each) in {}",
        cfg.size >> 20,
        w.display()
    );
    write_raw(&env.base, cfg.size, SEED_BASE)?;
    write_raw(&env.raw, cfg.size, SEED_RAW)?;
    eprintln!(
        "bench: [{:>5.0}s] building the Strata disk ({} layers of {} writes)",
        started.elapsed().as_secs_f64(),
        layers.len(),
        cfg.writes_per_layer
    );
    build_strata(&env.disk, &env.base, cfg.size, &layers)?;
    let mut env = env;
    if !cfg.skip_nbd {
        eprintln!(
            "bench: [{:>5.0}s] building the qcow2 chain ({} images)",
            started.elapsed().as_secs_f64(),
            layers.len()
        );
        env.qcow = procs::build_qcow2_chain(w, &env.base, &layers, |l| {
            if l % 8 == 0 {
                eprintln!("bench:   qcow2 layer {l}");
            }
        })?;
    }
    verify_same_content(&cfg, &env, &layers)?;
    eprintln!(
        "bench: [{:>5.0}s] setup done",
        started.elapsed().as_secs_f64()
    );

    let mut rows: Vec<Row> = Vec::new();
    let targets = cfg.targets();
    for &depth in &cfg.depths {
        for (workload, qd) in CELLS {
            let mut best: Vec<Option<Measured>> = vec![None; targets.len()];
            for rep in 0..cfg.repeat {
                let mut order: Vec<usize> = (0..targets.len()).collect();
                if rep % 2 == 1 {
                    order.reverse();
                }
                for i in order {
                    let (target, cache) = targets[i];
                    let Some(m) = measure(&cfg, &env, depth, target, cache, workload, qd)? else {
                        continue;
                    };
                    if best[i].is_none_or(|b| m.iops() > b.iops()) {
                        best[i] = Some(m);
                    }
                }
            }
            for (&(target, cache), m) in targets.iter().zip(best) {
                let Some(m) = m else { continue };
                let row = Row {
                    depth,
                    target,
                    cache: cache_name(cache),
                    workload,
                    qd,
                    iops: m.iops(),
                    mb_per_s: m.mb_per_s(),
                };
                eprintln!(
                    "bench: [{:>5.0}s] depth {depth:>3} {:<9} qd{qd:<2} {:<11} {:<9} {:>9.0} IOPS {:>8.1} MB/s",
                    started.elapsed().as_secs_f64(),
                    workload.name(),
                    target,
                    row.cache,
                    row.iops,
                    row.mb_per_s
                );
                rows.push(row);
            }
        }
    }

    let preamble = preamble(&cfg, &fio_version, &qemu_version, &load_before);
    let md = report::markdown(&rows, &preamble);
    let title = format!(
        "{}; {} MiB disk, {} writes/layer",
        svg_title(&rows),
        cfg.size >> 20,
        cfg.writes_per_layer
    );
    write_out(&cfg.out.join("depth.csv"), &report::csv(&rows))?;
    write_out(&cfg.out.join("depth.md"), &md)?;
    write_out(&cfg.out.join("depth.svg"), &plot::svg(&rows, &title))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{md}").map_err(|e| Error::io("writing the table", e))?;
    Ok(ExitCode::SUCCESS)
}

/// `--from-csv`: writes depth.csv, depth.md and depth.svg in `out` from an existing CSV.
fn rerender(csv: &Path, out: &Path) -> Result<ExitCode> {
    let text =
        fs::read_to_string(csv).map_err(|e| Error::io(format!("reading {}", csv.display()), e))?;
    let rows =
        report::parse_csv(&text).map_err(|e| fail(format!("parsing {}", csv.display()), e))?;
    let old_md = fs::read_to_string(out.join("depth.md")).unwrap_or_default();
    let preamble = match old_md.find("\n## Results") {
        Some(at) => old_md[..at + 1].to_string(),
        None => format!(
            "# strata bench depth\n\nRe-rendered from {}.\n",
            csv.display()
        ),
    };
    fs::create_dir_all(out).map_err(|e| Error::io(format!("creating {}", out.display()), e))?;
    let md = report::markdown(&rows, &preamble);
    write_out(&out.join("depth.csv"), &report::csv(&rows))?;
    write_out(&out.join("depth.md"), &md)?;
    write_out(&out.join("depth.svg"), &plot::svg(&rows, &svg_title(&rows)))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{md}").map_err(|e| Error::io("writing the table", e))?;
    Ok(ExitCode::SUCCESS)
}

fn svg_title(rows: &[Row]) -> String {
    let depths: std::collections::BTreeSet<usize> = rows.iter().map(|r| r.depth).collect();
    let d: Vec<String> = depths.iter().map(|d| d.to_string()).collect();
    format!(
        "strata bench depth: IOPS (MB/s for seqwrite) at chain depth {}",
        d.join(", ")
    )
}

fn write_out(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn write_raw(path: &Path, size: u64, seed: u64) -> Result<()> {
    let f = File::create(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        fill_raw(&mut buf[..n], off, seed);
        f.write_all_at(&buf[..n], off)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        off += n as u64;
    }
    f.sync_all()
        .map_err(|e| Error::io(format!("syncing {}", path.display()), e))
}

/// Creates the Strata disk over `base` with one checkpoint per layer (c1..cN).
fn build_strata(dir: &Path, base: &Path, size: u64, layers: &[LayerWrites]) -> Result<()> {
    let mut disk = scratch::create_writable(dir, size, Some(base))?;
    let now = disk.now();
    for layer in layers {
        let data = vec![layer.byte; BLOCK as usize];
        for &off in &layer.offsets {
            now.write_at(&data, off, false)?;
        }
        disk.checkpoint(&checkpoint_name(layer.layer))?;
    }
    Ok(())
}

/// Checks that the Strata disk and the qcow2 chain read the same bytes: one block of every
/// layer that no later layer overwrote, and blocks only the base holds.
fn verify_same_content(cfg: &Config, env: &Env, layers: &[LayerWrites]) -> Result<()> {
    let mut owner: HashMap<u64, u8> = HashMap::new();
    for l in layers {
        for &o in &l.offsets {
            owner.insert(o, l.byte);
        }
    }
    let disk = Disk::open(
        &env.disk,
        OpenOptions {
            cache: CacheMode::Writeback,
            read_only: true,
        },
    )?;
    let view = disk.checkpoint_view(&checkpoint_name(cfg.deepest()))?;
    let mut buf = vec![0u8; BLOCK as usize];
    let mut qemu_cmds = Vec::new();
    for l in layers {
        let Some(&off) = l.offsets.iter().find(|o| owner.get(o) == Some(&l.byte)) else {
            continue;
        };
        view.read_at(&mut buf, off)?;
        if buf.iter().any(|&b| b != l.byte) {
            return Err(fail(
                "checking the Strata disk",
                format!("block at {off} does not hold layer {}'s byte", l.layer),
            ));
        }
        qemu_cmds.push(format!("read -q -P {} {off} 4k", l.byte));
    }
    let mut expect = vec![0u8; BLOCK as usize];
    let mut checked = 0;
    for b in (0..cfg.size / BLOCK).step_by(997) {
        let off = b * BLOCK;
        if owner.contains_key(&off) {
            continue;
        }
        view.read_at(&mut buf, off)?;
        fill_raw(&mut expect, off, SEED_BASE);
        if buf != expect {
            return Err(fail(
                "checking the Strata disk",
                format!("base block at {off} differs from the base image"),
            ));
        }
        checked += 1;
    }
    if let Some(top) = env.qcow.last() {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-r", "-f", "qcow2"]);
        for c in &qemu_cmds {
            cmd.arg("-c").arg(c);
        }
        let out = cmd
            .arg(top)
            .output()
            .map_err(|e| Error::io("running qemu-io", e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || text.contains("fail") || text.contains("error") {
            return Err(fail(
                "checking the qcow2 chain",
                format!(
                    "{} {}",
                    text.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
    }
    eprintln!(
        "bench: content check passed ({} layer blocks, {checked} base blocks)",
        qemu_cmds.len()
    );
    Ok(())
}

fn measure(
    cfg: &Config,
    env: &Env,
    depth: usize,
    target: &str,
    cache: CacheMode,
    workload: Workload,
    qd: u32,
) -> Result<Option<Measured>> {
    let mut files: Vec<&Path> = vec![&env.base, &env.raw, &env.disk];
    files.extend(env.qcow.iter().map(PathBuf::as_path));
    files.push(&env.qtop);
    procs::evict_page_cache(&files)?;
    let cp = checkpoint_name(depth);
    let job = FioJob {
        workload,
        qd,
        size: cfg.size,
        runtime: cfg.runtime,
    };
    let write = workload.is_write();
    let seed = 7 + qd as u64;
    match target {
        TARGET_JOURNAL => {
            let mut disk = Disk::open(
                &env.disk,
                OpenOptions {
                    cache: CacheMode::None,
                    read_only: !write,
                },
            )?;
            let volume = if write {
                disk.apply(&cp, None)?;
                disk.now()
            } else {
                disk.checkpoint_view(&cp)?
            };
            journal_run::run(volume, workload, qd, cfg.runtime, seed).map(Some)
        }
        TARGET_RAW => job.run(FioTarget::File(&env.raw)).map(Some),
        TARGET_GUEST => measure_guest(cfg, env, &cp, workload, qd, seed),
        TARGET_STRATA_NBD => {
            if write {
                Disk::open(
                    &env.disk,
                    OpenOptions {
                        cache: CacheMode::Writeback,
                        read_only: false,
                    },
                )?
                .apply(&cp, None)?;
            }
            let server = Server::strata(
                &env.exe,
                &env.disk,
                &env.socket,
                cache,
                (!write).then_some(cp.as_str()),
            )?;
            let m = job.run(FioTarget::Nbd(server.socket()));
            server.stop()?;
            m.map(Some)
        }
        TARGET_QCOW2_NBD => {
            let image = env
                .qcow
                .get(depth - 1)
                .ok_or_else(|| fail("qcow2-nbd", format!("no qcow2 image for depth {depth}")))?;
            let server = if write {
                procs::create_overlay(&env.qtop, image, "qcow2")?;
                Server::qemu(&env.qtop, &env.socket, cache, false)?
            } else {
                Server::qemu(image, &env.socket, cache, true)?
            };
            let m = job.run(FioTarget::Nbd(server.socket()));
            server.stop()?;
            m.map(Some)
        }
        other => Err(fail("bench depth", format!("unknown target {other}"))),
    }
}

/// The test guest through virtio-blk on Now over `cp` (a fresh top layer: writes allocate,
/// reads go through every layer). `None` for sequential writes, which the guest has no mode
/// for.
fn measure_guest(
    cfg: &Config,
    env: &Env,
    cp: &str,
    workload: Workload,
    qd: u32,
    seed: u64,
) -> Result<Option<Measured>> {
    if !workload.is_random() {
        return Ok(None);
    }
    Disk::open(
        &env.disk,
        OpenOptions {
            cache: CacheMode::None,
            read_only: false,
        },
    )?
    .apply(cp, None)?;
    let spec = format!(
        "seed={seed},ops={},read={},bs=4k,region=0:{},qd={qd},flush={},verify=0",
        cfg.guest_ops,
        if workload.is_write() { 0 } else { 100 },
        cfg.size.min(GUEST_REGION_MAX),
        workload.flush_every()
    );
    let (summary, _) = crate::bench_guest::run_guest(&env.disk, &spec)?;
    let iops = summary.iops as f64;
    if iops <= 0.0 {
        return Err(fail(
            "guest-virtio",
            format!("the guest reported {iops} IOPS"),
        ));
    }
    Ok(Some(Measured {
        ops: cfg.guest_ops,
        bytes: cfg.guest_ops * BLOCK,
        secs: cfg.guest_ops as f64 / iops,
    }))
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn preamble(cfg: &Config, fio: &str, qemu: &str, load_before: &str) -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let fs_type = command_line(
        "stat",
        &["-f", "-c", "%T", &cfg.workdir.display().to_string()],
    );
    let date = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let depths: Vec<String> = cfg.depths.iter().map(|d| d.to_string()).collect();
    format!(
        "# strata bench depth\n\n\
         {date}; Linux {kernel}; {cpus} CPUs; work directory on {fs_type}; {fio}; {qemu}.\n\
         Load average before {load_before}, after {load_after} (other jobs share this machine: expect noise).\n\n\
         - Disk: {size} MiB raw base image of pseudo-random data; depth D = D layers over it (D-1 checkpoints plus \
         the top), each holding {writes} scattered 4 KiB writes of one byte. qcow2: a chain of D images \
         (`qemu-img create -b prev`, default 64 KiB clusters) over the same base with the same writes, made with qemu-io.\n\
         - Depths {depths}; {runtime:.1} s per run, best of {repeat} run(s) per cell (repeats in reverse target order); every file is synced and dropped from the page cache before each cell.\n\
         - Reads: 4 KiB uniformly random over the whole disk (most land on blocks only the base holds, the \
         deepest lookup for qcow2), served read-only (Strata `--checkpoint cD`, `qemu-nbd --read-only`).\n\
         - Writes go into a fresh empty top layer over the D layers (Strata `apply cD`, qcow2 a new overlay), \
         recreated before every write cell; random writes touch each block at most once (fio's random map), so every \
         write allocates. Writes stop at the runtime or after one pass over the disk.\n\
         - journal-api: `IoEngine` in-process, O_DIRECT. raw-fio: fio io_uring O_DIRECT on a raw file. \
         *-nbd: fio's nbd engine on a unix socket; cache none = `strata disk serve --cache none` vs \
         `qemu-nbd --cache=none --aio=io_uring`, writeback = `--cache writeback` vs qemu-nbd's defaults.\n\
         - guest-virtio: the built-in test guest through virtio-blk (`strata run --disk`, cache none) on Now after `apply cD`, \
         {guest_ops} operations per run over the first {guest_region} MiB (its ledger's room), as the guest counts them; it has no sequential mode.\n\
         - randwrite-flush8: random 4 KiB writes with a FLUSH after every 8 (raw-fio: `--fdatasync=8`; the guest: `flush=8`).\n\
         - MB/s = 10^6 bytes/s. Ratios compare numbers of this run only.\n",
        size = cfg.size >> 20,
        writes = cfg.writes_per_layer,
        depths = depths.join(", "),
        runtime = cfg.runtime.as_secs_f64(),
        repeat = cfg.repeat,
        load_after = loadavg(),
        guest_ops = cfg.guest_ops,
        guest_region = cfg.size.min(GUEST_REGION_MAX) >> 20,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: DepthArgs,
    }

    fn cfg(args: &[&str]) -> Result<Config> {
        let mut v = vec!["t", "--out", "/tmp/o"];
        v.extend_from_slice(args);
        Config::from_args(&T::parse_from(v).a)
    }

    #[test]
    fn defaults_and_validation() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.size, 1 << 30);
        assert_eq!(c.depths, vec![1, 8, 32, 64]);
        assert_eq!(c.writes_per_layer, 1024);
        assert_eq!(c.targets().len(), 7);
        assert_eq!(c.guest_ops, 20_000);
        let c = cfg(&[
            "--depths",
            "8,1,8",
            "--skip-nbd",
            "--size",
            "64M",
            "--runtime",
            "0.5",
        ])
        .unwrap();
        assert_eq!(c.depths, vec![1, 8]);
        assert_eq!(
            c.targets(),
            vec![
                (TARGET_JOURNAL, CacheMode::None),
                (TARGET_RAW, CacheMode::None),
                (TARGET_GUEST, CacheMode::None)
            ]
        );
        assert_eq!(c.runtime, Duration::from_millis(500));
        assert!(cfg(&["--depths", "0"]).is_err());
        assert!(cfg(&["--size", "1000"]).is_err());
        assert!(cfg(&["--size", "1M", "--writes-per-layer", "1000"]).is_err());
        assert!(cfg(&["--runtime=-1"]).is_err());
        assert!(cfg(&["--repeat", "0"]).is_err());
        assert_eq!(cfg(&["--repeat", "3"]).unwrap().repeat, 3);
        let c = cfg(&["--skip-nbd", "--skip-guest"]).unwrap();
        assert_eq!(c.targets().len(), 2);
        assert!(cfg(&["--guest-ops", "0"]).is_err());
    }

    #[test]
    fn strata_disk_has_one_checkpoint_per_layer_with_its_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        write_raw(&base, 4 << 20, SEED_BASE).unwrap();
        let layers: Vec<LayerWrites> = (1..=3).map(|l| layer_writes(l, 4 << 20, 50)).collect();
        let dir = tmp.path().join("d");
        build_strata(&dir, &base, 4 << 20, &layers).unwrap();
        let disk = Disk::open(
            &dir,
            OpenOptions {
                cache: CacheMode::Writeback,
                read_only: true,
            },
        )
        .unwrap();
        let names: Vec<String> = disk.list().into_iter().map(|c| c.name).collect();
        assert_eq!(names, vec!["c1", "c2", "c3"]);
        let mut buf = vec![0u8; 4096];
        let v1 = disk.checkpoint_view("c1").unwrap();
        assert_eq!(v1.depth(), 1);
        v1.read_at(&mut buf, layers[0].offsets[0]).unwrap();
        assert!(buf.iter().all(|&b| b == layers[0].byte));
        let v3 = disk.checkpoint_view("c3").unwrap();
        assert_eq!(v3.depth(), 3);
        v3.read_at(&mut buf, layers[2].offsets[0]).unwrap();
        assert!(buf.iter().all(|&b| b == layers[2].byte));
    }
}
