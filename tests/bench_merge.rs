//! `strata bench merge` end to end with tiny sizes: every strategy, idle and under the fio
//! load over NBD, both baselines. Needs fio (with its nbd engine) and qemu-utils. Asserts the
//! CSV's rows, columns and that the numbers are sane (positive where something must have
//! happened, ratios finite); never on how fast anything was.

use std::collections::HashMap;
use std::process::Command;

const STRATEGIES: [&str; 5] = [
    "relink",
    "compact-into-child",
    "compact-into-parent",
    "threshold",
    "auto",
];

fn require_tool(cmd: &str, arg: &str, package: &str) {
    let ok = Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`{cmd} {arg}` failed: this test needs {cmd} (apt-get install {package})"
    );
}

fn num(row: &HashMap<&str, &str>, col: &str) -> f64 {
    let v = row[col];
    v.parse()
        .unwrap_or_else(|_| panic!("column {col} is not a number: {v:?} in {row:?}"))
}

#[test]
fn merge_bench_writes_every_row_with_sane_values() {
    require_tool("fio", "--version", "fio");
    require_tool("qemu-img", "--version", "qemu-utils");
    require_tool("qemu-io", "--version", "qemu-utils");
    let tmp = tempfile::tempdir().expect("tempdir");
    let out_dir = tmp.path().join("out");
    let work = tmp.path().join("work");
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "bench",
            "merge",
            "--sizes",
            "2M",
            "--depth",
            "5",
            "--baseline-secs",
            "1",
            "--read-secs",
            "0.2",
            "--repeat",
            "2",
        ])
        .arg("--out")
        .arg(&out_dir)
        .arg("--workdir")
        .arg(&work)
        .output()
        .expect("running strata bench merge");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "strata bench merge failed: {stderr}");
    assert!(stderr.contains("blocks checked"), "{stderr}");

    let csv = std::fs::read_to_string(out_dir.join("merge.csv")).expect("merge.csv");
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    for col in [
        "size_mib",
        "pattern",
        "strategy",
        "load",
        "picked",
        "gone_ms",
        "merge_ms",
        "mb_per_s",
        "bytes_copied",
        "bytes_freed",
        "reclaimed_bytes",
        "peak_extra_bytes",
        "peak_extra_sampled",
        "reps",
        "merge_ms_max",
        "fg_iops",
        "fg_iops_ratio",
        "fg_iops_ratio_min",
        "fg_iops_ratio_max",
        "fg_p99_us",
        "fg_p99_ratio",
        "fg_p99_ratio_min",
        "fg_p99_ratio_max",
        "seqread_mb_per_s",
        "open_ms",
        "index_bytes",
    ] {
        assert!(
            header.contains(&col),
            "column {col} missing from {header:?}"
        );
    }
    let rows: Vec<HashMap<&str, &str>> = lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), header.len(), "row {l:?}");
            header.iter().copied().zip(f).collect()
        })
        .collect();
    let find = |pattern: &str, strategy: &str, load: &str| {
        let hits: Vec<&HashMap<&str, &str>> = rows
            .iter()
            .filter(|r| r["pattern"] == pattern && r["strategy"] == strategy && r["load"] == load)
            .collect();
        assert_eq!(hits.len(), 1, "{pattern} {strategy} {load} in\n{csv}");
        hits[0].clone()
    };
    for pattern in ["scattered", "sequential"] {
        let before = find(pattern, "before", "-");
        assert!(num(&before, "seqread_mb_per_s") > 0.0 && num(&before, "index_bytes") > 0.0);
        for base in ["io_uring-copy", "qemu-img-commit"] {
            let b = find(pattern, base, "idle");
            assert!(
                num(&b, "merge_ms") > 0.0 && num(&b, "mb_per_s") > 0.0,
                "{b:?}"
            );
            assert!(num(&b, "bytes_copied") >= (2 << 20) as f64, "{b:?}");
        }
        for s in STRATEGIES {
            for load in ["idle", "fio-randwrite-4k-qd32"] {
                let r = find(pattern, s, load);
                let gone = num(&r, "gone_ms");
                let merge = num(&r, "merge_ms");
                assert!(gone > 0.0 && merge >= gone, "{r:?}");
                assert!(!r["picked"].is_empty(), "{r:?}");
                assert!(
                    num(&r, "bytes_freed") > 0.0,
                    "the delete frees something: {r:?}"
                );
                assert!(num(&r, "seqread_mb_per_s") > 0.0 && num(&r, "open_ms") > 0.0);
                assert!(num(&r, "index_bytes") > 0.0);
                let copied = num(&r, "bytes_copied");
                match s {
                    "relink" => assert_eq!(copied, 0.0, "relink copies nothing: {r:?}"),
                    "compact-into-child" | "compact-into-parent" => {
                        assert!(copied > 0.0 && num(&r, "mb_per_s") > 0.0, "{r:?}");
                        assert!(num(&r, "peak_extra_bytes") > 0.0, "{r:?}");
                    }
                    _ => assert!(copied >= 0.0),
                }
                if load == "idle" {
                    assert!(r["fg_iops"].is_empty(), "no load, no IOPS: {r:?}");
                    assert_eq!(num(&r, "reps"), 1.0, "idle cells run once: {r:?}");
                    num(&r, "reclaimed_bytes");
                    num(&r, "peak_extra_sampled");
                } else {
                    assert!(
                        num(&r, "fg_iops") > 0.0 && num(&r, "fg_p99_us") > 0.0,
                        "{r:?}"
                    );
                    // Two repetitions: the median lies within their spread, and the
                    // longest merge is at least the median one.
                    assert_eq!(num(&r, "reps"), 2.0, "{r:?}");
                    for m in ["fg_iops_ratio", "fg_p99_ratio"] {
                        let (med, lo, hi) = (
                            num(&r, m),
                            num(&r, &format!("{m}_min")),
                            num(&r, &format!("{m}_max")),
                        );
                        assert!(med.is_finite() && lo > 0.0, "{m}: {r:?}");
                        assert!(lo <= med && med <= hi, "{m}: {r:?}");
                    }
                    assert!(num(&r, "merge_ms_max") >= merge, "{r:?}");
                }
            }
        }
    }
    assert_eq!(rows.len(), 2 * (3 + 2 * STRATEGIES.len()));

    let md = std::fs::read_to_string(out_dir.join("merge.md")).expect("merge.md");
    assert!(
        md.contains("## 2 MiB scattered") && md.contains("## 2 MiB sequential"),
        "{md}"
    );
    assert!(md.contains("## Targets (same-run ratios)"), "{md}");
    assert!(
        md.contains("yes, 10 merges"),
        "every loaded merge finished: {md}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| strategy | load | ran |"), "{stdout}");
    let svg = std::fs::read_to_string(out_dir.join("merge.svg")).expect("merge.svg");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.matches("<title>").count() > 10, "bars drawn");
    let left: Vec<_> = std::fs::read_dir(&work)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "work directory not cleaned: {left:?}");
}
