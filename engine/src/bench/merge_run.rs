//! One measured delete of `strata bench merge`, and what is measured on a disk before and
//! after: the 64 KiB sequential read of Now, the open time and the index memory.

use std::path::Path;
use std::time::{Duration, Instant};

use std::sync::atomic::AtomicBool;

use journal::{
    CacheMode, DeleteOptions, DeleteReport, Disk, MergeReport, OpenOptions, StrategyKind,
};

use super::merge_layout::{checkpoint_name, Layout, Pattern};
use super::merge_report::MergeRow;
use super::merge_space::{allocated, PeakSampler};
use super::{fail, journal_run, procs};
use crate::Result;

/// Queue depth of the sequential read of Now.
pub const SEQ_READ_QD: u32 = 8;

/// The bytes of the disk the sequential read covers: where the deleted layer's data lies.
pub fn read_range(layout: &Layout) -> std::ops::Range<u64> {
    match layout.pattern {
        Pattern::Scattered => 0..layout.disk_size,
        Pattern::Sequential => layout.disk_size / 4..layout.disk_size / 4 + layout.held,
    }
}

/// Cold open time, index memory of Now's lineage, and a cold 64 KiB sequential read of Now.
pub fn measure_disk(dir: &Path, layout: &Layout, read_secs: f64, row: &mut MergeRow) -> Result<()> {
    procs::evict_page_cache(&[dir, &dir.join("layers")])?;
    let start = Instant::now();
    let disk = Disk::open(
        dir,
        OpenOptions {
            cache: CacheMode::None,
            read_only: true,
        },
    )?;
    row.open_ms = start.elapsed().as_secs_f64() * 1000.0;
    row.index_bytes = disk.info()?.index_bytes as f64;
    let m = journal_run::seq_read(
        disk.now(),
        read_range(layout),
        SEQ_READ_QD,
        Duration::from_secs_f64(read_secs),
    )?;
    row.seqread_mb_per_s = m.mb_per_s();
    Ok(())
}

/// Checks the views a delete of the target must leave unchanged: its parent and its child
/// checkpoints, and (when nothing else wrote it) Now.
pub fn verify(dir: &Path, layout: &Layout, with_now: bool) -> Result<usize> {
    let disk = Disk::open(
        dir,
        OpenOptions {
            cache: CacheMode::Writeback,
            read_only: true,
        },
    )?;
    if disk.list().iter().any(|c| c.name == layout.target_name()) {
        return Err(fail(
            "checking the disk after the delete",
            format!("checkpoint {} is still listed", layout.target_name()),
        ));
    }
    let offs = layout.sample_offsets(2048);
    let mut n = 0;
    for up in [layout.target - 1, layout.target + 1] {
        if up >= 1 && up <= layout.depth() {
            let name = checkpoint_name(up);
            let view = disk.checkpoint_view(&name)?;
            n += layout.verify(&view, up, &offs, &name)?;
        }
    }
    if with_now {
        n += layout.verify(&disk.now(), layout.depth(), &offs, "Now")?;
    }
    Ok(n)
}

/// Copies the template disk to `cell` (sparse), cold.
pub fn copy_template(template: &Path, cell: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(cell);
    let out = std::process::Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(template)
        .arg(cell)
        .output()
        .map_err(|e| crate::Error::io("running cp", e))?;
    if !out.status.success() {
        return Err(fail(
            format!("cp -a {} {}", template.display(), cell.display()),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    procs::evict_page_cache(&[cell, &cell.join("layers")])
}

/// Maintenance passes after a delete (each returning jobs) before the bench stops asking,
/// like the engine's merge worker.
const MAX_MAINTENANCE_ROUNDS: usize = 8;

/// The options of a delete with `strategy` (a built-in name).
pub fn delete_options(strategy: &str, qd: u32) -> Result<DeleteOptions> {
    let kind: StrategyKind = strategy.parse()?;
    Ok(DeleteOptions {
        queue_depth: qd,
        ..DeleteOptions::with(kind)
    })
}

/// Deletes the target of an idle disk in-process through the journal API (`delete_online`,
/// then every job run and swapped in, then the maintenance merges the policy asks for, as
/// the engine's merge worker does), measuring time, bytes and space.
pub fn idle_delete(
    cell: &Path,
    layout: &Layout,
    opts: &DeleteOptions,
    row: &mut MergeRow,
) -> Result<()> {
    let mut disk = Disk::open(
        cell,
        OpenOptions {
            cache: CacheMode::None,
            read_only: false,
        },
    )?;
    let before = allocated(cell);
    let sampler = PeakSampler::start(cell, Duration::from_millis(5));
    let cancel = AtomicBool::new(false);
    let name = layout.target_name();
    let start = Instant::now();
    let (rep, mut jobs) = disk.delete_online(&name, opts)?;
    row.gone_ms = start.elapsed().as_secs_f64() * 1000.0;
    if disk.list().iter().any(|c| c.name == name) {
        return Err(fail(
            "bench merge",
            format!("{name} is still listed after delete_online"),
        ));
    }
    let mut reports: Vec<MergeReport> = Vec::new();
    let mut rounds = 0;
    loop {
        for mut job in jobs.drain(..) {
            job.run(&cancel)?;
            reports.push(disk.finish_merge(job)?);
        }
        rounds += 1;
        if rounds > MAX_MAINTENANCE_ROUNDS {
            break;
        }
        jobs = disk.maintenance_merges(opts)?;
        if jobs.is_empty() {
            break;
        }
    }
    row.merge_ms = start.elapsed().as_secs_f64() * 1000.0;
    let peak = sampler.finish();
    drop(disk);
    fill_from_reports(row, &rep, &reports, opts);
    row.reclaimed_bytes = before as f64 - allocated(cell) as f64;
    row.peak_extra_sampled = peak.saturating_sub(before) as f64;
    Ok(())
}

/// The columns that come from the journal's own reports.
pub fn fill_from_reports(
    row: &mut MergeRow,
    rep: &DeleteReport,
    reports: &[MergeReport],
    opts: &DeleteOptions,
) {
    let mut picked: Vec<&str> = Vec::new();
    for r in reports.iter().filter(|r| !r.discarded) {
        if !picked.contains(&r.strategy.as_str()) {
            picked.push(&r.strategy);
        }
    }
    row.picked = if picked.is_empty() {
        format!("{} (relink only)", opts.strategy)
    } else {
        picked.join("+")
    };
    let copied: u64 = reports.iter().map(|r| r.bytes_copied).sum();
    row.bytes_copied = copied as f64;
    row.mb_per_s = if row.merge_ms > 0.0 {
        copied as f64 / (row.merge_ms / 1000.0) / 1e6
    } else {
        0.0
    };
    row.bytes_freed = (rep.bytes_freed + reports.iter().map(|r| r.bytes_freed).sum::<u64>()) as f64;
    row.peak_extra_bytes = reports
        .iter()
        .map(|r| r.peak_extra_bytes)
        .max()
        .unwrap_or(0) as f64;
}
