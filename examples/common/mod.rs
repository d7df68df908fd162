//! What both examples share: a model of a view (block -> fill byte), writing through it,
//! comparing a view with it, running merge jobs, and the verification after reopening.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use journal::{
    CacheMode, CheckReport, Disk, MergeJob, MergeReport, OpenOptions, Volume, BLOCK_SIZE,
};

/// What a view holds: block number -> fill byte (missing = never written, reads as zero).
pub type Model = BTreeMap<u64, u8>;

/// Size of the examples' disks.
pub const DISK_SIZE: u64 = 64 << 20;

/// Turns a journal error into the message of the step that failed.
pub fn e(what: &'static str) -> impl Fn(journal::Error) -> String {
    move |err| format!("{what}: {err}")
}

/// Opens the disk with O_DIRECT.
pub fn open(dir: &Path, read_only: bool) -> Result<Disk, String> {
    Disk::open(
        dir,
        OpenOptions {
            cache: CacheMode::None,
            read_only,
        },
    )
    .map_err(e(if read_only { "reopen" } else { "open" }))
}

/// Writes blocks `first_block..first_block + blocks` of Now as `byte` (one write), in the
/// disk and the model.
pub fn write(
    now: &Volume,
    model: &mut Model,
    first_block: u64,
    blocks: u64,
    byte: u8,
) -> journal::Result<()> {
    let data = vec![byte; (blocks * BLOCK_SIZE) as usize];
    now.write_at(&data, first_block * BLOCK_SIZE, false)?;
    for b in first_block..first_block + blocks {
        model.insert(b, byte);
    }
    Ok(())
}

/// Reads every block the model knows plus every 499th never-written one and compares;
/// returns the blocks compared.
pub fn compare(view: Arc<Volume>, model: &Model, what: &str) -> Result<usize, String> {
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let untouched = (0..DISK_SIZE / BLOCK_SIZE)
        .step_by(499)
        .filter(|b| !model.contains_key(b));
    let blocks: Vec<u64> = model.keys().copied().chain(untouched).collect();
    for &b in &blocks {
        view.read_at(&mut buf, b * BLOCK_SIZE)
            .map_err(|e| format!("{what}: reading block {b}: {e}"))?;
        let want = model.get(&b).copied().unwrap_or(0);
        if let Some(i) = buf.iter().position(|&x| x != want) {
            return Err(format!(
                "{what}: block {b} byte {i} reads {:#04x}, expected {want:#04x}",
                buf[i]
            ));
        }
    }
    Ok(blocks.len())
}

/// Runs merge jobs to the end and swaps each in; returns their reports.
pub fn run_jobs(disk: &mut Disk, jobs: Vec<MergeJob>) -> Result<Vec<MergeReport>, String> {
    let cancel = AtomicBool::new(false);
    let mut reports = Vec::new();
    for mut job in jobs {
        job.run(&cancel).map_err(e("merge"))?;
        reports.push(disk.finish_merge(job).map_err(e("finish merge"))?);
    }
    Ok(reports)
}

/// Every checkpoint in `views` and Now read as their models, and `check` is clean: first
/// on `disk`, then closed and reopened read-only. Returns the last check's report.
pub fn verify(disk: Disk, views: &[(&str, &Model)], now: &Model) -> Result<CheckReport, String> {
    let dir = disk.dir().to_path_buf();
    let mut disk = Some(disk);
    let mut report = CheckReport::default();
    for when in ["", " after reopening"] {
        let d = match disk.take() {
            Some(d) => d,
            None => open(&dir, true)?,
        };
        for (name, model) in views {
            compare(
                d.checkpoint_view(name).map_err(e("view"))?,
                model,
                &format!("{name}{when}"),
            )?;
        }
        compare(d.now(), now, &format!("Now{when}"))?;
        report = d.check().map_err(e("check"))?;
        if !report.is_clean() {
            return Err(format!("check{when} found problems: {:?}", report.problems));
        }
    }
    Ok(report)
}

/// The exit of example `name`: "NAME: OK", or the failure on stderr.
pub fn finish(name: &str, result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => {
            println!("{name}: OK");
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("{name}: FAILED: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// A fresh temporary directory, or the failure for [`finish`].
pub fn tempdir() -> Result<tempfile::TempDir, String> {
    tempfile::tempdir().map_err(|err| format!("creating a temporary directory: {err}"))
}
