//! Showing merges to a person: the progress display of `strata disk delete` and
//! `strata checkpoint delete --wait` (an indicatif bar per merge on a terminal, plain lines
//! otherwise), the table of `strata checkpoint status`, and running a delete's merges in the
//! foreground on a stopped disk.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use journal::{Disk, MergeEvent, MergeJob, MergeReport, MergeStatus};
use serde::Deserialize;
use serde_json::Value;

use crate::disk_cmd::human;
use crate::{Error, Result};

/// Plain progress lines: at most one per merge this often (and one per state change).
const LINE_EVERY: Duration = Duration::from_secs(2);

/// One merge as displayed: a [`MergeStatus`], locally or as sent over the control socket.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct MergeView {
    pub id: u64,
    pub checkpoint: String,
    pub strategy: String,
    pub state: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub rate_bytes_per_sec: f64,
    pub eta_secs: Option<f64>,
    /// The deferred delete that planned this merge (absent for maintenance merges).
    #[serde(default)]
    pub delete: Option<u64>,
}

impl From<MergeStatus> for MergeView {
    fn from(s: MergeStatus) -> MergeView {
        MergeView {
            id: s.id,
            checkpoint: s.checkpoint,
            strategy: s.strategy,
            state: s.state,
            bytes_done: s.bytes_done,
            bytes_total: s.bytes_total,
            rate_bytes_per_sec: s.rate_bytes_per_sec,
            eta_secs: s.eta_secs,
            delete: s.delete,
        }
    }
}

impl MergeView {
    /// The merges in a `checkpoint-status` reply's list (entries that do not parse are
    /// skipped: a newer server may send more than this client knows).
    pub fn list(v: &Value) -> Vec<MergeView> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| {
                        serde_json::from_value(m.get("status").unwrap_or(m).clone()).ok()
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// True for merge `ids` or one a delete in `ids` planned.
    pub fn is_of(&self, ids: &[u64]) -> bool {
        is_of(ids, self.id, self.delete)
    }

    /// "merge ID (what, strategy)", or "delete ID (...)" for a delete whose strategy has not
    /// planned yet (its id is the delete's, not a merge's).
    fn label(&self) -> String {
        let what = if self.checkpoint.is_empty() {
            "maintenance".to_string()
        } else {
            format!("{:?}", self.checkpoint)
        };
        let kind = if self.state == PLANNING {
            "delete"
        } else {
            "merge"
        };
        format!("{kind} {} ({what}, {})", self.id, self.strategy)
    }

    /// One line: what, state, bytes done / total, rate, ETA.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{}: {}, {} / {}",
            self.label(),
            self.state,
            human(self.bytes_done),
            human(self.bytes_total)
        );
        if self.rate_bytes_per_sec > 0.0 {
            s.push_str(&format!(", {:.1} MB/s", self.rate_bytes_per_sec / 1e6));
        }
        if let Some(eta) = self.eta_secs {
            s.push_str(&format!(", ETA {}", secs(eta)));
        }
        s
    }
}

/// What the status of a delete whose strategy has not planned yet says.
pub const PLANNING: &str = "planning";

/// True when merge `id`, planned by `delete` (if any), is one of `ids` or was planned by a
/// delete in `ids` (a delete's id stands for the merges it planned).
pub fn is_of(ids: &[u64], id: u64, delete: Option<u64>) -> bool {
    ids.contains(&id) || delete.is_some_and(|d| ids.contains(&d))
}

fn secs(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "?".into();
    }
    let s = s.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// The table of `strata checkpoint status`.
pub fn format_status(running: &[MergeView], finished: &[MergeView]) -> String {
    let mut out = String::new();
    if running.is_empty() {
        out.push_str("no merges running or queued\n");
    } else {
        out.push_str(&format!(
            "{:>5}  {:<20} {:<20} {:<12} {:>11} {:>11} {:>10} {:>8}\n",
            "ID", "CHECKPOINT", "STRATEGY", "STATE", "DONE", "TOTAL", "MB/s", "ETA"
        ));
        for m in running {
            let what = if m.checkpoint.is_empty() {
                "(maintenance)"
            } else {
                &m.checkpoint
            };
            out.push_str(&format!(
                "{:>5}  {:<20} {:<20} {:<12} {:>11} {:>11} {:>10.1} {:>8}\n",
                m.id,
                what,
                m.strategy,
                m.state,
                human(m.bytes_done),
                human(m.bytes_total),
                m.rate_bytes_per_sec / 1e6,
                m.eta_secs.map(secs).unwrap_or_else(|| "-".into()),
            ));
        }
    }
    if !finished.is_empty() {
        out.push_str("recently finished:\n");
        for m in finished {
            out.push_str(&format!("  {}\n", m.line()));
        }
    }
    out
}

/// Progress of merges on stderr: a bar per merge on a terminal, plain lines otherwise.
pub struct Display {
    bars: Option<(MultiProgress, HashMap<u64, ProgressBar>)>,
    /// Plain lines: the last state printed and when, per merge.
    printed: HashMap<u64, (String, Instant)>,
}

impl Display {
    /// Bars when stderr is a terminal.
    pub fn new() -> Display {
        Display::with_bars(std::io::stderr().is_terminal())
    }

    pub fn with_bars(bars: bool) -> Display {
        Display {
            bars: bars.then(|| {
                (
                    MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
                    HashMap::new(),
                )
            }),
            printed: HashMap::new(),
        }
    }

    /// Shows the merges' current state.
    pub fn update(&mut self, merges: &[MergeView]) {
        for m in merges {
            match &mut self.bars {
                Some((multi, bars)) => {
                    let bar = bars.entry(m.id).or_insert_with(|| {
                        let style = ProgressStyle::with_template(
                            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> ");
                        multi.add(ProgressBar::new(m.bytes_total).with_style(style))
                    });
                    bar.set_length(m.bytes_total);
                    bar.set_position(m.bytes_done.min(m.bytes_total));
                    bar.set_message(format!("{} {}", m.label(), m.state));
                }
                None => {
                    let due = match self.printed.get(&m.id) {
                        None => true,
                        Some((state, at)) => *state != m.state || at.elapsed() >= LINE_EVERY,
                    };
                    if due {
                        eprintln!("{}", m.line());
                        self.printed.insert(m.id, (m.state.clone(), Instant::now()));
                    }
                }
            }
        }
    }

    /// Shows that a merge ended, with its report when it has one.
    pub fn ended(&mut self, m: &MergeView, report: Option<&MergeReport>) {
        let text = match report {
            Some(r) if r.discarded => format!(
                "{}: discarded (the tree changed while it ran; nothing lost)",
                m.label()
            ),
            Some(r) if r.strategy == "reclaim" => format!(
                "{}: done, {} freed in {:.1} s",
                m.label(),
                human(r.bytes_freed),
                r.copy_seconds
            ),
            Some(r) => format!(
                "{}: done, {} copied in {:.1} s, {} freed, layers {} -> {}",
                m.label(),
                human(r.bytes_copied),
                r.copy_seconds,
                human(r.bytes_freed),
                r.layers_before,
                r.layers_after
            ),
            None => format!("{}: {}", m.label(), m.state),
        };
        match &mut self.bars {
            Some((_, bars)) => match bars.remove(&m.id) {
                Some(bar) => bar.finish_with_message(text),
                None => eprintln!("{text}"),
            },
            None => eprintln!("{text}"),
        }
    }
}

impl Default for Display {
    fn default() -> Display {
        Display::new()
    }
}

/// Runs merges of a stopped disk in the foreground, one at a time, showing their progress,
/// then the maintenance merges the journal wants after them ([`Disk::run_merges`]). Returns
/// every report.
pub fn run_offline(
    disk: &mut Disk,
    jobs: Vec<MergeJob>,
    opts: &journal::DeleteOptions,
    display: &mut Display,
) -> Result<Vec<MergeReport>> {
    disk.run_merges(jobs, opts, &mut |ev| match ev {
        MergeEvent::Progress(s) => display.update(&[s.clone().into()]),
        MergeEvent::Done(s, r) => {
            let mut done = MergeView::from(s.clone());
            done.bytes_done = done.bytes_total;
            done.state = "done".into();
            display.ended(&done, Some(r));
        }
    })
    .map_err(|e| match &e {
        journal::Error::NoSpace { job, .. } => Error::Usage(format!(
            "merge {job} stopped: {}; the checkpoint is deleted and nothing is lost: free some space and run any delete (or serve the disk) to continue the merge",
            crate::cli::error_chain(&e)
        )),
        _ => e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: u64, state: &str) -> MergeView {
        MergeView {
            id,
            checkpoint: "a".into(),
            strategy: "compact-into-child".into(),
            state: state.into(),
            bytes_done: 1 << 20,
            bytes_total: 4 << 20,
            rate_bytes_per_sec: 2e6,
            eta_secs: Some(75.0),
            delete: None,
        }
    }

    #[test]
    fn lines_and_table() {
        let v = view(3, "copying");
        assert_eq!(
            v.line(),
            "merge 3 (\"a\", compact-into-child): copying, 1.0 MiB / 4.0 MiB, 2.0 MB/s, ETA 1m15s"
        );
        let t = format_status(&[v.clone(), view(4, "queued")], &[view(2, "done")]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("CHECKPOINT"), "{t}");
        assert!(
            lines[1].contains("copying") && lines[1].contains("1m15s"),
            "{t}"
        );
        assert!(lines[2].trim_start().starts_with('4'), "{t}");
        assert_eq!(lines[3], "recently finished:");
        assert_eq!(format_status(&[], &[]), "no merges running or queued\n");
        // A delete still planning is named as the delete it is.
        assert_eq!(
            view(5, PLANNING).line(),
            "delete 5 (\"a\", compact-into-child): planning, 1.0 MiB / 4.0 MiB, 2.0 MB/s, ETA 1m15s"
        );
    }

    #[test]
    fn views_parse_from_the_wire() {
        let v = serde_json::json!([
            {"id": 1, "checkpoint": "x", "strategy": "relink", "state": "queued",
             "bytes_done": 0, "bytes_total": 10, "rate_bytes_per_sec": 0.0, "eta_secs": null},
            {"status": {"id": 2, "checkpoint": "", "strategy": "auto", "state": "done",
             "bytes_done": 10, "bytes_total": 10, "rate_bytes_per_sec": 1.0, "eta_secs": 0.0},
             "report": {}},
            {"garbage": true}
        ]);
        let l = MergeView::list(&v);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].state, "queued");
        assert_eq!(l[1].id, 2);
        assert!(l[1].label().contains("maintenance"));
        assert!(MergeView::list(&serde_json::json!(null)).is_empty());
    }

    #[test]
    fn eta_text() {
        assert_eq!(secs(5.4), "5s");
        assert_eq!(secs(3725.0), "1h02m");
        assert_eq!(secs(f64::NAN), "?");
    }
}
