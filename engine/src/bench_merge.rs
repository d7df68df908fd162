//! `strata bench merge`: deleting a checkpoint with each merge strategy, idle and under a
//! foreground fio load through NBD, against two baselines measured in the same run (an
//! io_uring copy of the same bytes on the same disk, and `qemu-img commit` of a qcow2 chain
//! holding the same data). Writes merge.csv, merge.md and merge.svg.
//!
//! For every size and pattern: a template chain of depth N (see `bench::merge_layout`) is
//! built once; every (strategy, load) cell deletes the middle checkpoint of a fresh sparse
//! copy of it, cold (page cache dropped). Idle cells call the journal API in-process; loaded
//! cells serve the copy with `strata disk serve --api`, run fio 4 KiB random writes at qd32
//! on Now through NBD, and delete through the control socket while the load runs.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;

use crate::bench::merge_layout::{Layout, Pattern};
use crate::bench::merge_report::{
    self, MergeRow, BASE_COPY, BASE_QEMU, BEFORE, LOAD_FIO, LOAD_IDLE,
};
use crate::bench::merge_space::allocated;
use crate::bench::pattern::fill_raw;
use crate::bench::scratch::{self, loadavg};
use crate::bench::{merge_run, merge_served, procs, qcow2_commit, ringcopy};
use crate::{Error, Result};

/// The strategy a delete uses when none is given.
pub fn default_strategy() -> &'static str {
    journal::StrategyKind::default().name()
}

/// Options of `strata bench merge`.
#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    /// Directory for merge.csv, merge.md and merge.svg (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Bytes held by the deleted checkpoint (suffixes K, M, G), comma separated; each a
    /// multiple of 64 KiB. The disk is 4x the size.
    #[arg(long, default_value = "256M,1G", value_delimiter = ',')]
    pub sizes: Vec<String>,
    /// Checkpoints in the chain (the middle one is deleted).
    #[arg(long, default_value_t = 8)]
    pub depth: usize,
    /// Layouts of the deleted checkpoint's data: scattered, sequential.
    #[arg(long, default_value = "scattered,sequential", value_delimiter = ',')]
    pub patterns: Vec<String>,
    /// Strategies to measure.
    #[arg(
        long,
        default_value = "relink,compact-into-child,compact-into-parent,threshold,auto",
        value_delimiter = ','
    )]
    pub strategies: Vec<String>,
    /// Loads: idle (in-process journal API), fio (served, 4 KiB random writes at qd32).
    #[arg(long, default_value = "idle,fio", value_delimiter = ',')]
    pub loads: Vec<String>,
    /// Repetitions of every loaded cell, each on a fresh copy with its own reference
    /// windows (A B A, so the whole run interleaves A B A A B A ...); the table shows the
    /// median foreground ratio and the spread.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Seconds the load runs before the delete (the no-merge reference window).
    #[arg(long, default_value_t = 4.0)]
    pub baseline_secs: f64,
    /// Longest 64 KiB sequential read of Now after a merge, in seconds.
    #[arg(long, default_value_t = 3.0)]
    pub read_secs: f64,
    /// io_uring queue depth of the idle merges' bulk copy and of the io_uring copy baseline
    /// (merges under load run with the server's default, 32).
    #[arg(long, default_value_t = 32)]
    pub queue_depth: u32,
    /// Scratch directory (its filesystem is what gets measured); default a fresh one in
    /// $TMPDIR, removed afterwards unless --keep-workdir.
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Leave the scratch images in the work directory.
    #[arg(long)]
    pub keep_workdir: bool,
    /// Skip the qemu-img commit baseline.
    #[arg(long)]
    pub skip_qemu: bool,
}

/// Validated options.
#[derive(Clone, Debug)]
pub struct Config {
    pub out: PathBuf,
    pub sizes: Vec<u64>,
    pub depth: usize,
    pub patterns: Vec<Pattern>,
    pub strategies: Vec<String>,
    pub idle: bool,
    pub fio: bool,
    pub repeat: usize,
    pub baseline_secs: f64,
    pub read_secs: f64,
    pub queue_depth: u32,
    pub workdir: PathBuf,
    pub keep_workdir: bool,
    pub skip_qemu: bool,
}

fn secs(flag: &str, v: f64) -> Result<f64> {
    if !v.is_finite() || v <= 0.0 || v > 600.0 {
        return Err(Error::Usage(format!(
            "{flag} must be between 0 and 600 seconds, got {v}"
        )));
    }
    Ok(v)
}

impl Config {
    pub fn from_args(a: &MergeArgs) -> Result<Config> {
        let mut sizes = Vec::new();
        for s in &a.sizes {
            let n = crate::size::parse_size(s)?;
            if n < (1 << 20) || n % 65536 != 0 || n > (1 << 40) {
                return Err(Error::Usage(format!(
                    "--sizes {s}: expected a multiple of 64 KiB from 1M to 1T"
                )));
            }
            sizes.push(n);
        }
        if sizes.is_empty() {
            return Err(Error::Usage("--sizes is empty".into()));
        }
        if !(3..=64).contains(&a.depth) {
            return Err(Error::Usage(format!(
                "--depth {}: expected 3 to 64",
                a.depth
            )));
        }
        let mut patterns = Vec::new();
        for p in &a.patterns {
            patterns.push(Pattern::from_name(p).ok_or_else(|| {
                Error::Usage(format!("--patterns {p}: expected scattered or sequential"))
            })?);
        }
        for s in &a.strategies {
            s.parse::<journal::StrategyKind>()
                .map_err(|e| Error::Usage(format!("--strategies: {e}")))?;
        }
        let mut idle = false;
        let mut fio = false;
        for l in &a.loads {
            match l.as_str() {
                "idle" => idle = true,
                "fio" => fio = true,
                other => {
                    return Err(Error::Usage(format!(
                        "--loads {other}: expected idle or fio"
                    )))
                }
            }
        }
        if patterns.is_empty() || a.strategies.is_empty() || !(idle || fio) {
            return Err(Error::Usage(
                "--patterns, --strategies and --loads need at least one value each".into(),
            ));
        }
        if a.queue_depth == 0 || a.queue_depth > 256 {
            return Err(Error::Usage(
                "--queue-depth must be between 1 and 256".into(),
            ));
        }
        if !(1..=50).contains(&a.repeat) {
            return Err(Error::Usage(format!(
                "--repeat {}: expected 1 to 50",
                a.repeat
            )));
        }
        let root = a.workdir.clone().unwrap_or_else(std::env::temp_dir);
        Ok(Config {
            out: a.out.clone(),
            sizes,
            depth: a.depth,
            patterns,
            strategies: a.strategies.clone(),
            idle,
            fio,
            repeat: a.repeat,
            baseline_secs: secs("--baseline-secs", a.baseline_secs)?,
            read_secs: secs("--read-secs", a.read_secs)?,
            queue_depth: a.queue_depth,
            workdir: root.join(format!("strata-bench-merge-{}", std::process::id())),
            keep_workdir: a.keep_workdir,
            skip_qemu: a.skip_qemu,
        })
    }
}

fn write_out(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// `strata bench merge`.
pub fn run(args: MergeArgs) -> Result<ExitCode> {
    let cfg = Config::from_args(&args)?;
    let fio_version = if cfg.fio {
        crate::bench::fio::check(true)?
    } else {
        "fio not used (--loads idle)".to_string()
    };
    let qemu_version = if cfg.skip_qemu {
        "qemu-img not used (--skip-qemu)".to_string()
    } else {
        procs::check_qemu()?
    };
    let _guard = scratch::prepare(&cfg.out, &cfg.workdir, cfg.keep_workdir)?;
    let exe = scratch::strata_exe()?;
    let load_before = loadavg();
    let started = Instant::now();
    let log = |msg: String| eprintln!("bench: [{:>6.1}s] {msg}", started.elapsed().as_secs_f64());
    let mut rows: Vec<MergeRow> = Vec::new();
    for &size in &cfg.sizes {
        for &pattern in &cfg.patterns {
            let layout = Layout::new(size, cfg.depth, pattern);
            let mib = size >> 20;
            let case = format!("{mib} MiB {}", pattern.name());
            let template = cfg.workdir.join("template");
            let _ = fs::remove_dir_all(&template);
            log(format!(
                "{case}: building the chain ({} checkpoints)",
                cfg.depth
            ));
            layout.build_strata(&template)?;
            let mut before = MergeRow::new(mib, pattern.name(), BEFORE, "-");
            merge_run::measure_disk(&template, &layout, cfg.read_secs, &mut before)?;
            rows.push(before);

            log(format!("{case}: io_uring copy of {mib} MiB"));
            rows.push(copy_baseline(&cfg, size, mib, pattern)?);
            if !cfg.skip_qemu {
                log(format!("{case}: building the qcow2 chain"));
                let qdir = cfg.workdir.join("qcow2");
                let _ = fs::remove_dir_all(&qdir);
                fs::create_dir_all(&qdir)
                    .map_err(|e| Error::io(format!("creating {}", qdir.display()), e))?;
                let chain = qcow2_commit::build_chain(&qdir, &layout)?;
                log(format!("{case}: qemu-img commit"));
                let c = qcow2_commit::commit(&chain, &layout)?;
                let mut r = MergeRow::new(mib, pattern.name(), BASE_QEMU, LOAD_IDLE);
                r.merge_ms = c.took.as_secs_f64() * 1000.0;
                r.bytes_copied = c.image_bytes as f64;
                r.mb_per_s = c.image_bytes as f64 / c.took.as_secs_f64() / 1e6;
                rows.push(r);
                let _ = fs::remove_dir_all(&qdir);
            }

            let cell = cfg.workdir.join("cell");
            for strategy in &cfg.strategies {
                let loads = [(cfg.idle, LOAD_IDLE), (cfg.fio, LOAD_FIO)];
                for (_, load) in loads.iter().filter(|(on, _)| *on) {
                    log(format!(
                        "{case}: delete {} with {strategy}, {load}",
                        layout.target_name()
                    ));
                    let reps = if *load == LOAD_IDLE { 1 } else { cfg.repeat };
                    let mut done = Vec::with_capacity(reps);
                    for rep in 0..reps {
                        merge_run::copy_template(&template, &cell)?;
                        let mut r = MergeRow::new(mib, pattern.name(), strategy, load);
                        if *load == LOAD_IDLE {
                            let opts = merge_run::delete_options(strategy, cfg.queue_depth)?;
                            merge_run::idle_delete(&cell, &layout, &opts, &mut r)?;
                        } else {
                            merge_served::loaded_delete(
                                &exe,
                                &cell,
                                &cfg.workdir,
                                &layout,
                                strategy,
                                cfg.baseline_secs,
                                &mut r,
                            )?;
                        }
                        let checked = merge_run::verify(&cell, &layout, *load == LOAD_IDLE)?;
                        if rep == 0 {
                            merge_run::measure_disk(&cell, &layout, cfg.read_secs, &mut r)?;
                        }
                        log(format!(
                            "{case}: {strategy} {load} ({}/{reps}): gone {:.1} ms, merge {:.2} s, {:.1} MB/s, fg {:.2}x, p99 {:.2}x, {checked} blocks checked",
                            rep + 1,
                            r.gone_ms,
                            r.merge_ms / 1000.0,
                            r.mb_per_s,
                            r.fg_iops_ratio,
                            r.fg_p99_ratio,
                        ));
                        done.push(r);
                        let _ = fs::remove_dir_all(&cell);
                    }
                    rows.extend(merge_report::aggregate(&done));
                    // Kept up to date, so that a failure later leaves what was measured.
                    write_out(&cfg.out.join("merge.csv"), &merge_report::csv(&rows))?;
                }
            }
            let _ = fs::remove_dir_all(&template);
        }
    }
    let preamble = preamble(&cfg, &fio_version, &qemu_version, &load_before);
    let md = merge_report::markdown(&rows, &preamble, default_strategy());
    let title = format!(
        "strata bench merge: delete the middle checkpoint of a chain of {}",
        cfg.depth
    );
    write_out(&cfg.out.join("merge.csv"), &merge_report::csv(&rows))?;
    write_out(&cfg.out.join("merge.md"), &md)?;
    write_out(
        &cfg.out.join("merge.svg"),
        &merge_report::svg(&rows, &title),
    )?;
    writeln!(std::io::stdout().lock(), "{md}").map_err(|e| Error::io("writing the table", e))?;
    Ok(ExitCode::SUCCESS)
}

/// The io_uring copy of `size` bytes between two files of the work directory.
fn copy_baseline(cfg: &Config, size: u64, mib: u64, pattern: Pattern) -> Result<MergeRow> {
    let src = cfg.workdir.join("copy-src");
    let dst = cfg.workdir.join("copy-dst");
    let f =
        fs::File::create(&src).map_err(|e| Error::io(format!("creating {}", src.display()), e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        fill_raw(&mut buf[..n], off, 3);
        std::os::unix::fs::FileExt::write_all_at(&f, &buf[..n], off)
            .map_err(|e| Error::io(format!("writing {}", src.display()), e))?;
        off += n as u64;
    }
    drop(f);
    procs::evict_page_cache(&[&src])?;
    let took = ringcopy::copy(&src, &dst, size, cfg.queue_depth)?;
    let mut r = MergeRow::new(mib, pattern.name(), BASE_COPY, LOAD_IDLE);
    r.merge_ms = took.as_secs_f64() * 1000.0;
    r.bytes_copied = size as f64;
    r.mb_per_s = size as f64 / took.as_secs_f64() / 1e6;
    r.peak_extra_sampled = allocated(&dst) as f64;
    let _ = fs::remove_file(&src);
    let _ = fs::remove_file(&dst);
    Ok(r)
}

fn preamble(cfg: &Config, fio: &str, qemu: &str, load_before: &str) -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let sizes: Vec<String> = cfg
        .sizes
        .iter()
        .map(|s| format!("{} MiB", s >> 20))
        .collect();
    format!(
        "# strata bench merge\n\n\
         Linux {kernel}; {cpus} CPUs; {fio}; {qemu}. Load average before {load_before}, after {load_after} \
         (other jobs share this machine: expect noise; compare ratios within this run).\n\n\
         - Chain: {depth} checkpoints c1..c{depth}, Now a child of c{depth}; the deleted checkpoint c{target} \
         holds {sizes} either as 4 KiB blocks scattered in random order over the disk or as one sequential run; \
         every other layer holds 1/8 of that in scattered 4 KiB blocks (some overwrite the deleted layer's). \
         The disk is 4x the held size, no base image; cache none (O_DIRECT). Every cell deletes from a fresh, \
         cold copy of the same chain.\n\
         - gone ms: from the delete call to its return (the checkpoint is out of the tree then; checked). \
         merge s: to the last merge job swapped in (idle: the jobs of the delete, then the maintenance merges \
         the policy asks for). MB/s: bytes copied / merge time. freed: the journal's report; reclaimed: host \
         allocation before minus after (idle). peak extra: the journal's account / sampled every 5 ms (idle).\n\
         - Load: fio `--ioengine=nbd` 4 KiB random writes at qd32 on Now through `strata disk serve --api`, \
         during the merge (at least 1 s from the delete); the no-merge reference is the same load {baseline:.1} s \
         before the delete (after 1 s of warm-up) and half that long after the merges ended, taken together. \
         p99 = 99th percentile completion latency. Each loaded cell runs {repeat} times (fresh copy, server and fio each time): \
         the fg ratios are the median of the repetitions with [min-max], merge s the median (longest). The served merges \
         run with the server's defaults: the merge worker's background pacing (copy thread at nice 10 and best-effort \
         I/O level 7, io_uring qd8, yielding to client I/O), no rate limit.\n\
         - After each delete: cold open time and index memory of Now's lineage, 64 KiB sequential reads of Now \
         at qd{qd} over the deleted layer's span (the whole disk when scattered), at most {read:.1} s. \
         `before` = the same on the chain before any delete.\n\
         - Baselines: `{copy}` = the same number of bytes copied file to file on the same filesystem with \
         io_uring (1 MiB O_DIRECT requests, qd{mqd}, then fdatasync); `{qemu_name}` = `qemu-img commit -t none -d` \
         of the deleted layer's image into its parent in a qcow2 chain holding the same writes (64 KiB \
         clusters: a scattered 4 KiB write allocates a whole cluster, so it copies more bytes).\n",
        depth = cfg.depth,
        target = cfg.depth / 2 + cfg.depth % 2,
        sizes = sizes.join(" and "),
        baseline = cfg.baseline_secs,
        repeat = cfg.repeat,
        qd = merge_run::SEQ_READ_QD,
        read = cfg.read_secs,
        copy = BASE_COPY,
        mqd = cfg.queue_depth,
        qemu_name = BASE_QEMU,
        load_after = loadavg(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: MergeArgs,
    }

    fn cfg(args: &[&str]) -> Result<Config> {
        let mut v = vec!["t", "--out", "/tmp/o"];
        v.extend_from_slice(args);
        Config::from_args(&T::parse_from(v).a)
    }

    #[test]
    fn defaults_and_validation() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.sizes, vec![256 << 20, 1 << 30]);
        assert_eq!(c.depth, 8);
        assert_eq!(c.patterns, vec![Pattern::Scattered, Pattern::Sequential]);
        assert_eq!(c.strategies.len(), 5);
        assert!(c.idle && c.fio);
        assert_eq!(c.repeat, 3);
        let c = cfg(&[
            "--sizes",
            "4M",
            "--loads",
            "idle",
            "--strategies",
            "relink,auto",
        ])
        .unwrap();
        assert_eq!(c.sizes, vec![4 << 20]);
        assert!(c.idle && !c.fio);
        assert!(cfg(&["--sizes", "100K"]).is_err());
        assert!(cfg(&["--sizes", "1000000"]).is_err());
        assert!(cfg(&["--depth", "2"]).is_err());
        assert!(cfg(&["--patterns", "zigzag"]).is_err());
        assert!(cfg(&["--strategies", "magic"]).is_err());
        assert!(cfg(&["--loads", "heavy"]).is_err());
        assert!(cfg(&["--baseline-secs=-1"]).is_err());
        assert!(cfg(&["--queue-depth", "0"]).is_err());
        assert!(cfg(&["--repeat", "0"]).is_err());
        assert_eq!(cfg(&["--repeat", "5"]).unwrap().repeat, 5);
    }
}
