//! A delete under load: the disk served by `strata disk serve --api`, fio writing Now through
//! NBD, the delete sent over the control socket while fio runs, the merges followed through
//! `checkpoint status` until the worker is idle, and fio's completions split into the window
//! before the delete and the window of the merge.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use journal::{CacheMode, DeleteReport, MergeReport};
use serde_json::Value;

use super::fail;
use super::fio_load::{self, epoch_ms, FioLoad};
use super::merge_layout::Layout;
use super::merge_report::MergeRow;
use super::merge_run::fill_from_reports;
use super::procs::Server;
use crate::control::client::call;
use crate::control::Request;
use crate::Result;

/// Queue depth of the foreground load.
pub const LOAD_QD: u32 = 32;
/// Completions ignored at the start of the load (connection set-up, first allocations).
const WARMUP_MS: u64 = 1000;
/// The shortest merge window measured (a relink finishes at once).
const MIN_WINDOW_MS: u64 = 1000;
/// Longest wait for the merges of one delete.
const MERGE_TIMEOUT: Duration = Duration::from_secs(1800);

/// The state of the server's merge worker: ids running or queued, and finished reports.
struct Status {
    active: usize,
    /// Each ended merge's id, the delete that planned it, and its report.
    finished: Vec<(u64, Option<u64>, Option<MergeReport>)>,
}

/// The fields of a merge report the bench uses, from its JSON (None if absent).
fn report_from_json(v: &Value) -> Option<MergeReport> {
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    v.is_object().then(|| MergeReport {
        id: n("id"),
        checkpoint: v["checkpoint"].as_str().unwrap_or_default().to_string(),
        strategy: v["strategy"].as_str().unwrap_or_default().to_string(),
        bytes_copied: n("bytes_copied"),
        bytes_freed: n("bytes_freed"),
        peak_extra_bytes: n("peak_extra_bytes"),
        layers_before: n("layers_before") as usize,
        layers_after: n("layers_after") as usize,
        copy_seconds: v["copy_seconds"].as_f64().unwrap_or(0.0),
        discarded: v["discarded"].as_bool().unwrap_or(false),
        progressive: v["progressive"].as_bool().unwrap_or(false),
    })
}

fn status(api: &Path) -> Result<Status> {
    let v = call(api, &Request::CheckpointStatus)?;
    let active = v["merges"].as_array().map_or(0, Vec::len);
    let finished = v["finished"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| {
                    let id = f["status"]["id"].as_u64()?;
                    let report = report_from_json(&f["report"]);
                    Some((id, f["status"]["delete"].as_u64(), report))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Status { active, finished })
}

/// Waits until the worker has nothing queued or running, twice in a row 100 ms apart (it
/// starts maintenance merges right after a delete's jobs end).
fn wait_idle(api: &Path, load: &mut Option<&mut FioLoad>) -> Result<Status> {
    let start = Instant::now();
    let mut quiet = 0;
    loop {
        let st = status(api)?;
        if st.active == 0 {
            quiet += 1;
            if quiet >= 2 {
                return Ok(st);
            }
        } else {
            quiet = 0;
        }
        if let Some(l) = load.as_mut() {
            l.check_running()?;
        }
        if start.elapsed() > MERGE_TIMEOUT {
            return Err(fail(
                "bench merge",
                "the merges did not finish in 30 minutes",
            ));
        }
        std::thread::sleep(Duration::from_millis(if quiet > 0 { 100 } else { 25 }));
    }
}

/// Deletes the target of the served copy `cell` with `strategy` while fio writes Now.
pub fn loaded_delete(
    exe: &Path,
    cell: &Path,
    work: &Path,
    layout: &Layout,
    strategy: &str,
    baseline_secs: f64,
    row: &mut MergeRow,
) -> Result<()> {
    let nbd = work.join("nbd.sock");
    let api = work.join("api.sock");
    let server = Server::strata_api(exe, cell, &nbd, &api, CacheMode::None)?;
    // Merges the server starts by itself (maintenance on open) end before the reference.
    let before = wait_idle(&api, &mut None)?;
    let seen: HashSet<u64> = before.finished.iter().map(|(id, ..)| *id).collect();
    let mut load = FioLoad::start(&nbd, layout.disk_size, LOAD_QD, &work.join("fio-load"))?;
    std::thread::sleep(Duration::from_millis(WARMUP_MS) + Duration::from_secs_f64(baseline_secs));
    load.check_running()?;
    let name = layout.target_name();
    let t_delete = epoch_ms();
    let start = Instant::now();
    let reply = call(
        &api,
        &Request::CheckpointDelete {
            name: name.clone(),
            subtree: false,
            strategy: Some(strategy.to_string()),
            rate: None,
            wait: false,
        },
    )?;
    row.gone_ms = start.elapsed().as_secs_f64() * 1000.0;
    let list = call(&api, &Request::CheckpointList)?;
    if list["checkpoints"]
        .as_array()
        .is_some_and(|a| a.iter().any(|c| c["name"] == Value::String(name.clone())))
    {
        return Err(fail(
            "bench merge",
            format!("{name} is still listed after the delete"),
        ));
    }
    let deleted = &reply["deleted"];
    let jobs: Vec<u64> = deleted["jobs"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let after = wait_idle(&api, &mut Some(&mut load))?;
    row.merge_ms = start.elapsed().as_secs_f64() * 1000.0;
    let t_done = epoch_ms();
    // The reference is the load before the delete and after the merges (A B A: drift of a
    // shared machine spreads over both sides).
    let tail_ms = ((baseline_secs * 500.0) as u64).max(MIN_WINDOW_MS);
    let t_tail = t_done.max(t_delete + MIN_WINDOW_MS);
    let wait = (t_tail + tail_ms).saturating_sub(epoch_ms());
    std::thread::sleep(Duration::from_millis(wait + 100));
    let samples = load.stop()?;
    server.stop()?;

    let mut reports = Vec::new();
    for (id, delete, report) in after.finished {
        if seen.contains(&id) {
            continue;
        }
        match report {
            Some(r) => reports.push(r),
            None if crate::merge_progress::is_of(&jobs, id, delete) => {
                return Err(fail(
                    "bench merge",
                    format!("merge {id} of the delete did not finish"),
                ))
            }
            None => {}
        }
    }
    let rep = DeleteReport {
        bytes_freed: deleted["bytes_freed"].as_u64().unwrap_or(0),
        ..DeleteReport::default()
    };
    let opts = journal::DeleteOptions::with(strategy.parse()?);
    fill_from_reports(row, &rep, &reports, &opts);
    let first = load_start(&samples) + WARMUP_MS;
    let reference =
        fio_load::window_union(&samples, &[(first, t_delete), (t_tail, t_tail + tail_ms)]);
    let during = fio_load::window(&samples, t_delete, t_tail);
    let (Some(reference), Some(during)) = (reference, during) else {
        return Err(fail("bench merge", "fio completed nothing in a window"));
    };
    row.fg_iops = during.iops;
    row.fg_p99_us = during.p99_us;
    row.fg_iops_ratio = during.iops / reference.iops;
    row.fg_p99_ratio = during.p99_us / reference.p99_us;
    Ok(())
}

fn load_start(samples: &[fio_load::Sample]) -> u64 {
    samples.iter().map(|s| s.at_ms).min().unwrap_or(0)
}
