//! Results of `strata bench merge`: one CSV row per measured delete (or baseline), the
//! markdown tables with the same-run ratios the targets are stated in, and the plots.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::bars::{self, Panel};

/// The baselines' names in the strategy column.
pub const BASE_COPY: &str = "io_uring-copy";
pub const BASE_QEMU: &str = "qemu-img-commit";
/// The row describing the chain before any delete.
pub const BEFORE: &str = "before";
pub const LOAD_IDLE: &str = "idle";
pub const LOAD_FIO: &str = "fio-randwrite-4k-qd32";

/// Target: checkpoint gone from the tree within this many ms.
pub const GOAL_GONE_MS: f64 = 50.0;
/// Target: best strategy's copy rate over the io_uring copy's.
pub const GOAL_VS_COPY: f64 = 0.8;
/// Target: best strategy's rate of retiring the checkpoint's data over qemu-img commit's.
pub const GOAL_VS_QEMU: f64 = 2.0;
/// Target: foreground IOPS during a merge over without, with the default policy.
pub const GOAL_FG: f64 = 0.9;

/// One row. Missing numbers are NaN (an empty CSV cell).
#[derive(Clone, Debug, PartialEq)]
pub struct MergeRow {
    pub size_mib: u64,
    pub pattern: String,
    /// A strategy, a baseline ([`BASE_COPY`], [`BASE_QEMU`]) or [`BEFORE`].
    pub strategy: String,
    pub load: String,
    /// The strategies the merge jobs actually ran (what `auto` chose), `+`-joined.
    pub picked: String,
    pub gone_ms: f64,
    pub merge_ms: f64,
    /// Bytes copied per second of merge time (10^6).
    pub mb_per_s: f64,
    pub bytes_copied: f64,
    pub bytes_freed: f64,
    /// Host allocation of the disk before the delete minus after (idle runs).
    pub reclaimed_bytes: f64,
    /// The journal's own account of the most extra space the merge held at once.
    pub peak_extra_bytes: f64,
    /// The largest allocation above the starting one seen by sampling (idle runs).
    pub peak_extra_sampled: f64,
    /// Loaded cells: repetitions (each a fresh copy, its own A B A windows); the fg numbers
    /// are their medians, with the smallest and largest ratio.
    pub reps: f64,
    /// The longest merge of the repetitions (every one must have finished).
    pub merge_ms_max: f64,
    pub fg_iops: f64,
    pub fg_iops_ratio: f64,
    pub fg_iops_ratio_min: f64,
    pub fg_iops_ratio_max: f64,
    pub fg_p99_us: f64,
    pub fg_p99_ratio: f64,
    pub fg_p99_ratio_min: f64,
    pub fg_p99_ratio_max: f64,
    pub seqread_mb_per_s: f64,
    pub open_ms: f64,
    pub index_bytes: f64,
}

impl MergeRow {
    pub fn new(size_mib: u64, pattern: &str, strategy: &str, load: &str) -> MergeRow {
        MergeRow {
            size_mib,
            pattern: pattern.into(),
            strategy: strategy.into(),
            load: load.into(),
            picked: String::new(),
            gone_ms: f64::NAN,
            merge_ms: f64::NAN,
            mb_per_s: f64::NAN,
            bytes_copied: f64::NAN,
            bytes_freed: f64::NAN,
            reclaimed_bytes: f64::NAN,
            peak_extra_bytes: f64::NAN,
            peak_extra_sampled: f64::NAN,
            reps: f64::NAN,
            merge_ms_max: f64::NAN,
            fg_iops: f64::NAN,
            fg_iops_ratio: f64::NAN,
            fg_iops_ratio_min: f64::NAN,
            fg_iops_ratio_max: f64::NAN,
            fg_p99_us: f64::NAN,
            fg_p99_ratio: f64::NAN,
            fg_p99_ratio_min: f64::NAN,
            fg_p99_ratio_max: f64::NAN,
            seqread_mb_per_s: f64::NAN,
            open_ms: f64::NAN,
            index_bytes: f64::NAN,
        }
    }

    fn numbers(&self) -> [(&'static str, f64, usize); 21] {
        [
            ("gone_ms", self.gone_ms, 2),
            ("merge_ms", self.merge_ms, 1),
            ("mb_per_s", self.mb_per_s, 1),
            ("bytes_copied", self.bytes_copied, 0),
            ("bytes_freed", self.bytes_freed, 0),
            ("reclaimed_bytes", self.reclaimed_bytes, 0),
            ("peak_extra_bytes", self.peak_extra_bytes, 0),
            ("peak_extra_sampled", self.peak_extra_sampled, 0),
            ("reps", self.reps, 0),
            ("merge_ms_max", self.merge_ms_max, 1),
            ("fg_iops", self.fg_iops, 0),
            ("fg_iops_ratio", self.fg_iops_ratio, 3),
            ("fg_iops_ratio_min", self.fg_iops_ratio_min, 3),
            ("fg_iops_ratio_max", self.fg_iops_ratio_max, 3),
            ("fg_p99_us", self.fg_p99_us, 0),
            ("fg_p99_ratio", self.fg_p99_ratio, 3),
            ("fg_p99_ratio_min", self.fg_p99_ratio_min, 3),
            ("fg_p99_ratio_max", self.fg_p99_ratio_max, 3),
            ("seqread_mb_per_s", self.seqread_mb_per_s, 1),
            ("open_ms", self.open_ms, 2),
            ("index_bytes", self.index_bytes, 0),
        ]
    }
}

/// The median of `v` (NaN when empty; the mean of the middle two for an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn min_max(v: impl Iterator<Item = f64>) -> (f64, f64) {
    v.filter(|x| x.is_finite())
        .fold((f64::NAN, f64::NAN), |(lo, hi), x| (lo.min(x), hi.max(x)))
}

/// One row from the repetitions of a loaded cell: the first one's merge report and
/// measurements, the medians of the foreground numbers and of the merge time, the spread of
/// the ratios, the slowest removal from the tree and the longest merge.
pub fn aggregate(reps: &[MergeRow]) -> Option<MergeRow> {
    let mut row = reps.first()?.clone();
    let col = |f: fn(&MergeRow) -> f64| reps.iter().map(f).collect::<Vec<f64>>();
    row.reps = reps.len() as f64;
    row.gone_ms = min_max(reps.iter().map(|r| r.gone_ms)).1;
    row.merge_ms = median(&col(|r| r.merge_ms));
    row.merge_ms_max = min_max(reps.iter().map(|r| r.merge_ms)).1;
    row.fg_iops = median(&col(|r| r.fg_iops));
    row.fg_p99_us = median(&col(|r| r.fg_p99_us));
    row.fg_iops_ratio = median(&col(|r| r.fg_iops_ratio));
    (row.fg_iops_ratio_min, row.fg_iops_ratio_max) = min_max(reps.iter().map(|r| r.fg_iops_ratio));
    row.fg_p99_ratio = median(&col(|r| r.fg_p99_ratio));
    (row.fg_p99_ratio_min, row.fg_p99_ratio_max) = min_max(reps.iter().map(|r| r.fg_p99_ratio));
    Some(row)
}

/// The CSV header.
pub fn csv_header() -> String {
    let mut h = String::from("size_mib,pattern,strategy,load,picked");
    for (name, _, _) in MergeRow::new(0, "", "", "").numbers() {
        h.push(',');
        h.push_str(name);
    }
    h
}

fn cell(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        String::new()
    }
}

/// The CSV text.
pub fn csv(rows: &[MergeRow]) -> String {
    let mut s = csv_header();
    s.push('\n');
    for r in rows {
        let _ = write!(
            s,
            "{},{},{},{},{}",
            r.size_mib, r.pattern, r.strategy, r.load, r.picked
        );
        for (_, v, d) in r.numbers() {
            let _ = write!(s, ",{}", cell(v, d));
        }
        s.push('\n');
    }
    s
}

fn mib(v: f64) -> String {
    if v.is_finite() {
        format!("{:.1}", v / f64::from(1u32 << 20))
    } else {
        "-".into()
    }
}

fn num(v: f64, d: usize) -> String {
    if v.is_finite() {
        format!("{v:.d$}")
    } else {
        "-".into()
    }
}

fn ratio(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}x")
    } else {
        "-".into()
    }
}

/// A median ratio with its spread: `0.93x [0.88-0.97]` (no spread for one repetition).
fn spread(median: f64, lo: f64, hi: f64) -> String {
    if lo.is_finite() && hi.is_finite() && hi > lo {
        format!("{} [{lo:.2}-{hi:.2}]", ratio(median))
    } else {
        ratio(median)
    }
}

fn cases(rows: &[MergeRow]) -> Vec<(u64, String)> {
    rows.iter()
        .map(|r| (r.size_mib, r.pattern.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn find<'a>(
    rows: &'a [MergeRow],
    size: u64,
    pattern: &str,
    strategy: &str,
    load: &str,
) -> Option<&'a MergeRow> {
    rows.iter().find(|r| {
        r.size_mib == size && r.pattern == pattern && r.strategy == strategy && r.load == load
    })
}

/// A foreground number with its ratio to no merge: `9000 (0.95x [0.90-1.02])`.
fn measured(v: f64, median: f64, lo: f64, hi: f64) -> String {
    if v.is_finite() {
        format!("{v:.0} ({})", spread(median, lo, hi))
    } else {
        "-".into()
    }
}

/// Rate of retiring the deleted checkpoint's data: held bytes per second of merge time.
fn held_rate(r: &MergeRow) -> f64 {
    r.size_mib as f64 * f64::from(1u32 << 20) / (r.merge_ms / 1000.0) / 1e6
}

/// The markdown report: one table per case, then the baselines and the targets.
pub fn markdown(rows: &[MergeRow], preamble: &str, default_strategy: &str) -> String {
    let mut s = String::from(preamble);
    for (size, pattern) in cases(rows) {
        let _ = write!(
            s,
            "\n## {size} MiB {pattern}\n\n\
             | strategy | load | ran | gone ms | merge s (longest) | MB/s | copied MiB | freed MiB | reclaimed MiB | peak extra MiB (journal / sampled) | fg IOPS (x no merge: median [min-max]) | fg p99 us (x no merge) | seq read MB/s | open ms | index KiB |\n\
             |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        );
        for r in rows
            .iter()
            .filter(|r| r.size_mib == size && r.pattern == pattern)
        {
            let fg = measured(
                r.fg_iops,
                r.fg_iops_ratio,
                r.fg_iops_ratio_min,
                r.fg_iops_ratio_max,
            );
            let p99 = measured(
                r.fg_p99_us,
                r.fg_p99_ratio,
                r.fg_p99_ratio_min,
                r.fg_p99_ratio_max,
            );
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {fg} | {p99} | {} | {} | {} |",
                r.strategy,
                r.load,
                if r.picked.is_empty() { "-" } else { &r.picked },
                num(r.gone_ms, 1),
                if r.merge_ms_max.is_finite() && r.reps > 1.0 {
                    format!(
                        "{} ({})",
                        num(r.merge_ms / 1000.0, 2),
                        num(r.merge_ms_max / 1000.0, 2)
                    )
                } else {
                    num(r.merge_ms / 1000.0, 2)
                },
                num(r.mb_per_s, 1),
                mib(r.bytes_copied),
                mib(r.bytes_freed),
                mib(r.reclaimed_bytes),
                mib(r.peak_extra_bytes),
                mib(r.peak_extra_sampled),
                num(r.seqread_mb_per_s, 1),
                num(r.open_ms, 1),
                num(r.index_bytes / 1024.0, 0),
            );
        }
    }
    s.push_str(&targets(rows, default_strategy));
    s
}

fn is_strategy(r: &MergeRow) -> bool {
    ![BASE_COPY, BASE_QEMU, BEFORE].contains(&r.strategy.as_str())
}

/// The targets of the issue, per case, from this run's numbers.
pub fn targets(rows: &[MergeRow], default_strategy: &str) -> String {
    let mut s = String::from(
        "\n## Targets (same-run ratios)\n\n\
         | case | slowest gone ms (goal <= 50) | best copying strategy (idle) | its MB/s / io_uring copy (goal >= 0.8x) | data retired per s / qemu-img commit (goal >= 2x) | default policy fg IOPS during merge (goal >= 0.9x; median [min-max]) | its fg p99 (x no merge) | every merge finished under load (longest s) |\n\
         |---|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for (size, pattern) in cases(rows) {
        let here: Vec<&MergeRow> = rows
            .iter()
            .filter(|r| r.size_mib == size && r.pattern == pattern)
            .collect();
        let gone = here
            .iter()
            .filter(|r| is_strategy(r))
            .map(|r| r.gone_ms)
            .filter(|v| v.is_finite())
            .fold(f64::NAN, f64::max);
        let best = here
            .iter()
            .filter(|r| is_strategy(r) && r.load == LOAD_IDLE)
            .filter(|r| r.bytes_copied > 0.0 && r.mb_per_s.is_finite())
            .max_by(|a, b| a.mb_per_s.total_cmp(&b.mb_per_s));
        let copy = find(rows, size, &pattern, BASE_COPY, LOAD_IDLE);
        let qemu = find(rows, size, &pattern, BASE_QEMU, LOAD_IDLE);
        let vs_copy = best
            .zip(copy)
            .map_or(f64::NAN, |(b, c)| b.mb_per_s / c.mb_per_s);
        let vs_qemu = best
            .zip(qemu)
            .map_or(f64::NAN, |(b, q)| held_rate(b) / held_rate(q));
        let def = find(rows, size, &pattern, default_strategy, LOAD_FIO);
        let fg = def.map_or(f64::NAN, |r| r.fg_iops_ratio);
        let fg_spread = def.map_or("-".into(), |r| {
            spread(r.fg_iops_ratio, r.fg_iops_ratio_min, r.fg_iops_ratio_max)
        });
        let p99 = def.map_or("-".into(), |r| {
            spread(r.fg_p99_ratio, r.fg_p99_ratio_min, r.fg_p99_ratio_max)
        });
        // A loaded cell is a row only when every merge of every repetition finished.
        let loaded: Vec<&&MergeRow> = here
            .iter()
            .filter(|r| is_strategy(r) && r.load == LOAD_FIO)
            .collect();
        let longest = loaded
            .iter()
            .map(|r| r.merge_ms_max.max(r.merge_ms))
            .fold(f64::NAN, f64::max);
        let finished = if loaded.is_empty() {
            "-".to_string()
        } else {
            let n: f64 = loaded.iter().map(|r| r.reps.max(1.0)).sum();
            format!("yes, {n:.0} merges ({} s)", num(longest / 1000.0, 1))
        };
        let mark = |v: f64, goal: f64, above: bool| {
            if !v.is_finite() {
                String::new()
            } else if (above && v >= goal) || (!above && v <= goal) {
                " met".into()
            } else {
                " MISSED".into()
            }
        };
        let _ = writeln!(
            s,
            "| {size} MiB {pattern} | {}{} | {} | {}{} | {}{} | {fg_spread}{} | {p99} | {finished} |",
            num(gone, 1),
            mark(gone, GOAL_GONE_MS, false),
            best.map_or("-".to_string(), |b| format!(
                "{} ({})",
                b.strategy, b.picked
            )),
            ratio(vs_copy),
            mark(vs_copy, GOAL_VS_COPY, true),
            ratio(vs_qemu),
            mark(vs_qemu, GOAL_VS_QEMU, true),
            mark(fg, GOAL_FG, true),
        );
    }
    s
}

/// The plots: merge time and copy rate of every strategy and baseline (idle), and the
/// foreground IOPS ratio under load, one group per case.
pub fn svg(rows: &[MergeRow], title: &str) -> String {
    let cs = cases(rows);
    let groups: Vec<String> = cs.iter().map(|(s, p)| format!("{s} MiB {p}")).collect();
    let mut names: Vec<String> = Vec::new();
    for r in rows.iter().filter(|r| r.strategy != BEFORE) {
        if !names.contains(&r.strategy) {
            names.push(r.strategy.clone());
        }
    }
    let panel = |title: &str, load: &str, f: &dyn Fn(&MergeRow) -> f64, only_strategies: bool| {
        let series: Vec<String> = names
            .iter()
            .filter(|n| !only_strategies || ![BASE_COPY, BASE_QEMU].contains(&n.as_str()))
            .cloned()
            .collect();
        let values = cs
            .iter()
            .map(|(size, pattern)| {
                series
                    .iter()
                    .map(|n| {
                        find(rows, *size, pattern, n, load)
                            .map(f)
                            .filter(|v| v.is_finite())
                    })
                    .collect()
            })
            .collect();
        Panel {
            title: title.into(),
            groups: groups.clone(),
            series,
            values,
            reference: None,
        }
    };
    let mut fg = panel(
        "foreground IOPS during the merge / without (fio 4 KiB randwrite qd32 over NBD)",
        LOAD_FIO,
        &|r| r.fg_iops_ratio,
        true,
    );
    fg.reference = Some(1.0);
    let panels = [
        panel(
            "merge time, idle (s; lower is better)",
            LOAD_IDLE,
            &|r| r.merge_ms / 1000.0,
            false,
        ),
        panel(
            "bytes copied per second, idle (MB/s)",
            LOAD_IDLE,
            &|r| r.mb_per_s,
            false,
        ),
        fg,
    ];
    bars::svg(title, &panels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<MergeRow> {
        let mut v = Vec::new();
        let mut copy = MergeRow::new(64, "scattered", BASE_COPY, LOAD_IDLE);
        copy.merge_ms = 100.0;
        copy.mb_per_s = 671.1;
        copy.bytes_copied = (64 << 20) as f64;
        v.push(copy);
        let mut q = MergeRow::new(64, "scattered", BASE_QEMU, LOAD_IDLE);
        q.merge_ms = 1000.0;
        v.push(q);
        let mut a = MergeRow::new(64, "scattered", "auto", LOAD_IDLE);
        a.picked = "compact-into-child".into();
        a.gone_ms = 3.0;
        a.merge_ms = 200.0;
        a.mb_per_s = 335.5;
        a.bytes_copied = (64 << 20) as f64;
        v.push(a);
        let mut f = MergeRow::new(64, "scattered", "auto", LOAD_FIO);
        f.gone_ms = 60.0;
        f.fg_iops = 9000.0;
        f.fg_iops_ratio = 0.95;
        f.fg_iops_ratio_min = 0.9;
        f.fg_iops_ratio_max = 1.02;
        f.fg_p99_ratio = 1.5;
        f.reps = 3.0;
        f.merge_ms = 900.0;
        f.merge_ms_max = 1250.0;
        v.push(f);
        v
    }

    #[test]
    fn csv_columns_and_empty_cells() {
        let c = csv(&sample());
        let mut lines = c.lines();
        let header = lines.next().unwrap();
        assert_eq!(header, csv_header());
        assert!(header.starts_with("size_mib,pattern,strategy,load,picked,gone_ms,merge_ms"));
        assert_eq!(header.split(',').count(), 26);
        for l in lines {
            assert_eq!(l.split(',').count(), 26, "{l}");
        }
        assert!(
            c.contains("64,scattered,auto,idle,compact-into-child,3.00,200.0,335.5,67108864,"),
            "{c}"
        );
    }

    #[test]
    fn markdown_targets() {
        let md = markdown(&sample(), "# T\n", "auto");
        assert!(md.contains("## 64 MiB scattered"), "{md}");
        // 335.5 / 671.1 = 0.50x missed; held rate 64 MiB in 0.2 s vs 1 s = 5x met;
        // slowest gone 60 ms missed; fg 0.95 met.
        assert!(md.contains("| 64 MiB scattered | 60.0 MISSED | auto (compact-into-child) | 0.50x MISSED | 5.00x met | 0.95x [0.90-1.02] met | 1.50x | yes, 3 merges (1.2 s) |"), "{md}");
        assert!(
            md.contains("| auto | fio-randwrite-4k-qd32 | - | 60.0 | 0.90 (1.25) |"),
            "{md}"
        );
        assert!(md.contains("9000 (0.95x [0.90-1.02])"), "{md}");
        let svg = svg(&sample(), "t");
        assert_eq!(svg.matches("<title>").count(), 3 + 2 + 1, "{svg}");
    }

    #[test]
    fn repetitions_aggregate_to_medians_and_spread() {
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
        assert!(aggregate(&[]).is_none());
        let reps: Vec<MergeRow> = [
            (0.8, 2.0, 10.0, 1000.0),
            (1.0, 1.0, 30.0, 3000.0),
            (0.9, 1.5, 20.0, 2000.0),
        ]
        .iter()
        .map(|&(ratio, p99, gone, merge)| {
            let mut r = MergeRow::new(256, "scattered", "auto", LOAD_FIO);
            r.fg_iops_ratio = ratio;
            r.fg_p99_ratio = p99;
            r.fg_iops = ratio * 1000.0;
            r.fg_p99_us = p99 * 100.0;
            r.gone_ms = gone;
            r.merge_ms = merge;
            r.bytes_copied = merge;
            r
        })
        .collect();
        let a = aggregate(&reps).unwrap();
        assert_eq!(a.reps, 3.0);
        assert_eq!(
            (a.fg_iops_ratio, a.fg_iops_ratio_min, a.fg_iops_ratio_max),
            (0.9, 0.8, 1.0)
        );
        assert_eq!(
            (a.fg_p99_ratio, a.fg_p99_ratio_min, a.fg_p99_ratio_max),
            (1.5, 1.0, 2.0)
        );
        assert_eq!(a.fg_iops, 900.0);
        assert_eq!(a.gone_ms, 30.0, "the slowest removal");
        assert_eq!((a.merge_ms, a.merge_ms_max), (2000.0, 3000.0));
        assert_eq!(a.bytes_copied, 1000.0, "the first repetition's report");
    }
}
