//! Results of the depth benchmark: CSV rows, the markdown report and its ratios (all against
//! baselines measured in the same run).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::Workload;

pub const TARGET_JOURNAL: &str = "journal-api";
pub const TARGET_RAW: &str = "raw-fio";
pub const TARGET_STRATA_NBD: &str = "strata-nbd";
pub const TARGET_QCOW2_NBD: &str = "qcow2-nbd";
/// The test guest through virtio-blk (`strata run --disk`).
pub const TARGET_GUEST: &str = "guest-virtio";

/// Target of the guest through virtio-blk over the journal driven directly (issue 9).
pub const GOAL_GUEST: f64 = 0.7;
/// Target of the journal over the raw file for writes (issue 9).
pub const GOAL_JOURNAL_WRITE: f64 = 0.8;

/// Target threshold of strata-nbd over qcow2-nbd for random reads at depth 64.
pub const GOAL_READ_DEEP: f64 = 1.3;
/// Target threshold for allocating random writes.
pub const GOAL_ALLOC_WRITE: f64 = 2.0;
/// No cell may be below this.
pub const GOAL_FLOOR: f64 = 1.0;

/// One CSV row.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub depth: usize,
    pub target: &'static str,
    pub cache: &'static str,
    pub workload: Workload,
    pub qd: u32,
    pub iops: f64,
    pub mb_per_s: f64,
}

pub const CSV_HEADER: &str = "depth,target,cache,workload,qd,iops,mb_per_s";

/// The CSV file's text.
pub fn csv(rows: &[Row]) -> String {
    let mut s = String::from(CSV_HEADER);
    s.push('\n');
    for r in rows {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{:.0},{:.4}",
            r.depth,
            r.target,
            r.cache,
            r.workload.name(),
            r.qd,
            r.iops,
            r.mb_per_s
        );
    }
    s
}

/// Reads rows back from [`csv`]'s output (to re-render a report without measuring again).
pub fn parse_csv(text: &str) -> Result<Vec<Row>, String> {
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some(CSV_HEADER) {
        return Err(format!("the first line is not {CSV_HEADER:?}"));
    }
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |what: &str| format!("line {}: {what}: {line:?}", i + 2);
        let f: Vec<&str> = line.trim().split(',').collect();
        if f.len() != 7 {
            return Err(bad("expected 7 fields"));
        }
        let target = [
            TARGET_JOURNAL,
            TARGET_RAW,
            TARGET_STRATA_NBD,
            TARGET_QCOW2_NBD,
            TARGET_GUEST,
        ]
        .into_iter()
        .find(|t| *t == f[1])
        .ok_or_else(|| bad("unknown target"))?;
        let cache = ["none", "writeback"]
            .into_iter()
            .find(|c| *c == f[2])
            .ok_or_else(|| bad("unknown cache mode"))?;
        rows.push(Row {
            depth: f[0].parse().map_err(|_| bad("bad depth"))?,
            target,
            cache,
            workload: Workload::from_name(f[3]).ok_or_else(|| bad("unknown workload"))?,
            qd: f[4].parse().map_err(|_| bad("bad qd"))?,
            iops: f[5].parse().map_err(|_| bad("bad iops"))?,
            mb_per_s: f[6].parse().map_err(|_| bad("bad mb_per_s"))?,
        });
    }
    Ok(rows)
}

/// A series: one target in one cache mode, one workload at one queue depth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Series {
    pub workload: Workload,
    pub qd: u32,
    pub target: &'static str,
    pub cache: &'static str,
}

impl Series {
    pub fn of(r: &Row) -> Series {
        Series {
            workload: r.workload,
            qd: r.qd,
            target: r.target,
            cache: r.cache,
        }
    }

    /// `randread qd32`.
    pub fn cell_label(&self) -> String {
        format!("{} qd{}", self.workload.name(), self.qd)
    }

    /// `strata-nbd/none`.
    pub fn target_label(&self) -> String {
        format!("{}/{}", self.target, self.cache)
    }
}

/// Targets in reading order: the journal, its physical limit, then the NBD pair.
pub fn target_rank(target: &str) -> usize {
    [
        TARGET_JOURNAL,
        TARGET_RAW,
        TARGET_GUEST,
        TARGET_STRATA_NBD,
        TARGET_QCOW2_NBD,
    ]
    .iter()
    .position(|t| *t == target)
    .unwrap_or(usize::MAX)
}

/// The headline number of a row: MB/s for sequential writes, IOPS otherwise.
pub fn headline(r: &Row) -> f64 {
    if r.workload == Workload::SeqWrite {
        r.mb_per_s
    } else {
        r.iops
    }
}

fn find<'a>(
    rows: &'a [Row],
    depth: usize,
    target: &str,
    cache: &str,
    w: Workload,
    qd: u32,
) -> Option<&'a Row> {
    rows.iter().find(|r| {
        r.depth == depth && r.target == target && r.cache == cache && r.workload == w && r.qd == qd
    })
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|x| format!("{x:.2}x"))
        .unwrap_or_else(|| "n/a".into())
}

/// The goal of strata-nbd over qcow2-nbd for one cell, and how it is labelled.
pub fn goal(workload: Workload, depth: usize, deepest: usize) -> (f64, &'static str) {
    match workload {
        Workload::RandRead if depth == deepest => (GOAL_READ_DEEP, ">=1.3x (deepest)"),
        Workload::RandWrite => (GOAL_ALLOC_WRITE, ">=2x (allocating)"),
        _ => (GOAL_FLOOR, ">=1.0x"),
    }
}

/// The markdown report: the table of every series by depth, then the ratios.
pub fn markdown(rows: &[Row], preamble: &str) -> String {
    let depths: Vec<usize> = rows
        .iter()
        .map(|r| r.depth)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut series: Vec<Series> = rows
        .iter()
        .map(Series::of)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    series.sort_by_key(|se| (se.workload, se.qd, target_rank(se.target), se.cache));
    let (shallow, deepest) = (
        depths.first().copied().unwrap_or(0),
        depths.last().copied().unwrap_or(0),
    );
    let mut s = String::new();
    s.push_str(preamble);
    s.push_str("\n## Results (IOPS; MB/s for seqwrite)\n\n| workload | target | cache |");
    for d in &depths {
        let _ = write!(s, " depth {d} |");
    }
    s.push_str("\n|---|---|---|");
    s.push_str(&"---:|".repeat(depths.len()));
    s.push('\n');
    for se in &series {
        let _ = write!(s, "| {} | {} | {} |", se.cell_label(), se.target, se.cache);
        for &d in &depths {
            let v = find(rows, d, se.target, se.cache, se.workload, se.qd).map(headline);
            let _ = write!(s, " {} |", v.map(fmt_num).unwrap_or_else(|| "-".into()));
        }
        s.push('\n');
    }

    let _ = write!(s, "\n## Depth {deepest} / depth {shallow} (same target, same workload; 1.00x = no slowdown)\n\n");
    s.push_str(
        "raw-fio does not depend on depth: its ratio shows how much the host itself sped up or slowed down \
         between the two phases. The last column divides each ratio by raw-fio's for the same workload.\n\n",
    );
    s.push_str("| workload | target | ratio | / raw-fio's ratio |\n|---|---|---:|---:|\n");
    let depth_ratio = |target: &str, cache: &str, w: Workload, qd: u32| {
        let a = find(rows, deepest, target, cache, w, qd).map(headline);
        let b = find(rows, shallow, target, cache, w, qd).map(headline);
        a.zip(b).and_then(|(a, b)| ratio(a, b))
    };
    for se in &series {
        let r = depth_ratio(se.target, se.cache, se.workload, se.qd);
        let raw = depth_ratio(TARGET_RAW, "none", se.workload, se.qd);
        let norm = r.zip(raw).and_then(|(r, raw)| ratio(r, raw));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            se.cell_label(),
            se.target_label(),
            fmt_ratio(r),
            fmt_ratio(norm)
        );
    }

    s.push_str("\n## journal-api vs raw-fio (in-process journal over the physical limit)\n\n");
    s.push_str("| depth | workload | journal-api | raw-fio | ratio |\n|---:|---|---:|---:|---:|\n");
    for &d in &depths {
        for se in series.iter().filter(|se| se.target == TARGET_JOURNAL) {
            let j = find(rows, d, TARGET_JOURNAL, se.cache, se.workload, se.qd);
            let raw = find(rows, d, TARGET_RAW, "none", se.workload, se.qd);
            if let (Some(j), Some(raw)) = (j, raw) {
                let mark = if se.workload.is_write() && se.qd == 32 {
                    " **"
                } else {
                    ""
                };
                let _ = writeln!(
                    s,
                    "| {d} | {}{mark} | {} | {} | {} |",
                    se.cell_label(),
                    fmt_num(headline(j)),
                    fmt_num(headline(raw)),
                    fmt_ratio(ratio(headline(j), headline(raw)))
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "\n(** = cells with a target in issues 2 and 9: writes at qd32 >= {GOAL_JOURNAL_WRITE}x raw-fio; \
         raw-fio's randwrite overwrites a written file, the journal's writes all allocate; \
         randwrite-flush8 = a FLUSH after every 8 writes, fio `--fdatasync=8` for raw-fio.)"
    );

    let mut guest = String::new();
    for &d in &depths {
        for se in series.iter().filter(|se| se.target == TARGET_GUEST) {
            let (Some(g), Some(j)) = (
                find(rows, d, TARGET_GUEST, se.cache, se.workload, se.qd),
                find(rows, d, TARGET_JOURNAL, "none", se.workload, se.qd),
            ) else {
                continue;
            };
            let r = ratio(headline(g), headline(j));
            let met =
                if se.qd == 32 && matches!(se.workload, Workload::RandRead | Workload::RandWrite) {
                    if r.is_some_and(|r| r >= GOAL_GUEST) {
                        "met"
                    } else {
                        "MISSED"
                    }
                } else {
                    ""
                };
            let _ = writeln!(
                guest,
                "| {d} | {} | {} | {} | {} | {met} |",
                se.cell_label(),
                fmt_num(headline(g)),
                fmt_num(headline(j)),
                fmt_ratio(r)
            );
        }
    }
    if !guest.is_empty() {
        s.push_str("\n## guest-virtio vs journal-api (the test guest through virtio-blk over the journal driven directly)\n\n");
        let _ = writeln!(
            s,
            "Goal from issue 9: >= {GOAL_GUEST}x at qd32 for 4 KiB random reads and writes.\n"
        );
        s.push_str("| depth | workload | guest-virtio | journal-api | ratio | goal |\n|---:|---|---:|---:|---:|---|\n");
        s.push_str(&guest);
    }

    let mut pass = 0;
    let mut miss = Vec::new();
    let mut nbd = String::new();
    for &d in &depths {
        for se in series.iter().filter(|se| se.target == TARGET_STRATA_NBD) {
            let (Some(st), Some(q)) = (
                find(rows, d, TARGET_STRATA_NBD, se.cache, se.workload, se.qd),
                find(rows, d, TARGET_QCOW2_NBD, se.cache, se.workload, se.qd),
            ) else {
                continue;
            };
            let r = ratio(headline(st), headline(q));
            let (want, label) = goal(se.workload, d, deepest);
            let ok = r.is_some_and(|r| r >= want);
            if ok {
                pass += 1;
            } else {
                miss.push(format!("depth {d} {} cache {}", se.cell_label(), se.cache));
            }
            let _ = writeln!(
                nbd,
                "| {d} | {} | {} | {} | {} | {} | {} | {} |",
                se.cache,
                se.cell_label(),
                fmt_num(headline(st)),
                fmt_num(headline(q)),
                fmt_ratio(r),
                label,
                if ok { "met" } else { "MISSED" }
            );
        }
    }
    if !nbd.is_empty() {
        s.push_str("\n## strata-nbd vs qcow2-nbd (same fio job, same cache mode)\n\n");
        s.push_str("Goals from issue 2: >=1.3x qcow2's random-read IOPS at depth 64, >=2x on allocating random writes, never below 1.0x.\n\n");
        s.push_str("| depth | cache | workload | strata-nbd | qcow2-nbd | ratio | goal | |\n|---:|---|---|---:|---:|---:|---|---|\n");
        s.push_str(&nbd);
        let _ = writeln!(s, "\nGoals met in {pass} of {} cells.", pass + miss.len());
        if !miss.is_empty() {
            let _ = writeln!(s, "Missed: {}.", miss.join("; "));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        depth: usize,
        target: &'static str,
        cache: &'static str,
        w: Workload,
        qd: u32,
        iops: f64,
    ) -> Row {
        Row {
            depth,
            target,
            cache,
            workload: w,
            qd,
            iops,
            mb_per_s: iops * w.block_size() as f64 / 1e6,
        }
    }

    fn sample() -> Vec<Row> {
        let mut v = Vec::new();
        for d in [1, 64] {
            v.push(row(
                d,
                TARGET_JOURNAL,
                "none",
                Workload::RandWrite,
                32,
                30000.0,
            ));
            v.push(row(d, TARGET_RAW, "none", Workload::RandWrite, 32, 40000.0));
            v.push(row(
                d,
                TARGET_STRATA_NBD,
                "none",
                Workload::RandRead,
                32,
                12000.0,
            ));
            v.push(row(
                d,
                TARGET_QCOW2_NBD,
                "none",
                Workload::RandRead,
                32,
                if d == 64 { 6000.0 } else { 11000.0 },
            ));
            v.push(row(
                d,
                TARGET_STRATA_NBD,
                "none",
                Workload::RandWrite,
                32,
                9000.0,
            ));
            v.push(row(
                d,
                TARGET_QCOW2_NBD,
                "none",
                Workload::RandWrite,
                32,
                6000.0,
            ));
        }
        v
    }

    #[test]
    fn csv_has_header_and_rows() {
        let text = csv(&sample());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], CSV_HEADER);
        assert_eq!(lines.len(), 13);
        assert_eq!(lines[1], "1,journal-api,none,randwrite,32,30000,122.8800");
    }

    #[test]
    fn markdown_ratios_and_goals() {
        let md = markdown(&sample(), "# T\n");
        assert!(
            md.contains("| randread qd32 | strata-nbd | none | 12000 | 12000 |"),
            "{md}"
        );
        // Depth ratio of qcow2 reads: 6000 / 11000.
        assert!(
            md.contains("| randread qd32 | qcow2-nbd/none | 0.55x |"),
            "{md}"
        );
        // journal vs raw: 30000 / 40000.
        assert!(
            md.contains("| 1 | randwrite qd32 ** | 30000 | 40000 | 0.75x |"),
            "{md}"
        );
        // Deep reads: 2.00x >= 1.3x met; shallow reads 1.09x >= 1.0 met; writes 1.5x < 2x missed.
        assert!(
            md.contains(
                "| 64 | none | randread qd32 | 12000 | 6000 | 2.00x | >=1.3x (deepest) | met |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| 1 | none | randread qd32 | 12000 | 11000 | 1.09x | >=1.0x | met |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| 64 | none | randwrite qd32 | 9000 | 6000 | 1.50x | >=2x (allocating) | MISSED |"
            ),
            "{md}"
        );
        assert!(md.contains("Goals met in 2 of 4 cells."), "{md}");
    }

    #[test]
    fn guest_section_compares_with_the_journal_and_marks_the_goal() {
        let rows = vec![
            row(1, TARGET_JOURNAL, "none", Workload::RandWrite, 32, 1000.0),
            row(1, TARGET_GUEST, "none", Workload::RandWrite, 32, 500.0),
            row(1, TARGET_JOURNAL, "none", Workload::RandRead, 32, 1000.0),
            row(1, TARGET_GUEST, "none", Workload::RandRead, 32, 800.0),
            row(1, TARGET_JOURNAL, "none", Workload::RandWrite, 1, 100.0),
            row(1, TARGET_GUEST, "none", Workload::RandWrite, 1, 10.0),
        ];
        let md = markdown(&rows, "");
        let at = md
            .find("## guest-virtio vs journal-api")
            .expect("guest section");
        let sec = &md[at..];
        assert!(
            sec.contains("| 1 | randwrite qd32 | 500 | 1000 | 0.50x | MISSED |"),
            "{sec}"
        );
        assert!(
            sec.contains("| 1 | randread qd32 | 800 | 1000 | 0.80x | met |"),
            "{sec}"
        );
        assert!(
            sec.contains("| 1 | randwrite qd1 | 10.0 | 100 | 0.10x |  |"),
            "{sec}"
        );
        let back = parse_csv(&csv(&rows)).unwrap();
        assert_eq!(
            back[1].target, TARGET_GUEST,
            "the CSV reads the guest target back"
        );
        assert!(!markdown(&rows[..1], "").contains("guest-virtio vs"));
    }

    #[test]
    fn csv_round_trips() {
        let rows = sample();
        let back = parse_csv(&csv(&rows)).unwrap();
        assert_eq!(back.len(), rows.len());
        assert_eq!(back[0].target, TARGET_JOURNAL);
        assert_eq!(back[0].iops, 30000.0);
        assert_eq!(back[0].mb_per_s, 122.88);
        assert!(parse_csv("depth,x\n").is_err());
        let bad = format!("{CSV_HEADER}\n1,nope,none,randread,1,5,5\n");
        assert!(parse_csv(&bad)
            .unwrap_err()
            .contains("line 2: unknown target"));
    }

    #[test]
    fn goals_by_cell() {
        assert_eq!(goal(Workload::RandRead, 64, 64).0, 1.3);
        assert_eq!(goal(Workload::RandRead, 8, 64).0, 1.0);
        assert_eq!(goal(Workload::RandWrite, 1, 64).0, 2.0);
        assert_eq!(goal(Workload::SeqWrite, 64, 64).0, 1.0);
    }
}
