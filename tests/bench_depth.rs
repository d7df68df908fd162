//! `strata bench depth` end to end with tiny parameters and every target: the journal
//! in-process, raw fio, and Strata vs qemu-nbd over NBD in both cache modes. Needs fio (with
//! its nbd engine) and qemu-utils; fails with a clear message when they are missing. Asserts
//! only that every expected row exists with positive numbers: no timing thresholds.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

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

#[test]
fn depth_bench_writes_every_row() {
    require_tool("fio", "--version", "fio");
    let eng = Command::new("fio")
        .arg("--enghelp=nbd")
        .output()
        .expect("running fio");
    assert!(
        String::from_utf8_lossy(&eng.stdout).contains("uri"),
        "fio has no nbd engine (Debian's fio package has it)"
    );
    require_tool("qemu-img", "--version", "qemu-utils");
    require_tool("qemu-io", "--version", "qemu-utils");
    require_tool("qemu-nbd", "--version", "qemu-utils");

    let tmp = tempfile::tempdir().expect("tempdir");
    let out_dir = tmp.path().join("out");
    let work = tmp.path().join("work");
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "bench",
            "depth",
            "--size",
            "32M",
            "--depths",
            "1,2",
            "--runtime",
            "1",
            "--writes-per-layer",
            "32",
            "--guest-ops",
            "2000",
        ])
        .arg("--out")
        .arg(&out_dir)
        .arg("--workdir")
        .arg(&work)
        .output()
        .expect("running strata bench depth");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "strata bench depth failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("| workload | target | cache | depth 1 | depth 2 |"),
        "table printed: {stdout}"
    );
    assert!(stderr.contains("content check passed"), "{stderr}");

    let csv = std::fs::read_to_string(out_dir.join("depth.csv")).expect("depth.csv");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("depth,target,cache,workload,qd,iops,mb_per_s")
    );
    let mut seen = HashSet::new();
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 7, "row {line:?}");
        let iops: f64 = f[5].parse().expect("iops is a number");
        let mbps: f64 = f[6].parse().expect("mb_per_s is a number");
        assert!(
            iops > 0.0 && mbps > 0.0,
            "row {line:?} has a non-positive number"
        );
        assert!(
            seen.insert((
                f[0].to_string(),
                f[1].to_string(),
                f[2].to_string(),
                f[3].to_string(),
                f[4].to_string()
            )),
            "duplicate row {line:?}"
        );
    }
    let targets = [
        ("journal-api", "none"),
        ("raw-fio", "none"),
        ("strata-nbd", "none"),
        ("qcow2-nbd", "none"),
        ("strata-nbd", "writeback"),
        ("qcow2-nbd", "writeback"),
    ];
    let cells = [
        ("randread", "1"),
        ("randread", "32"),
        ("randwrite", "1"),
        ("randwrite", "32"),
        ("seqwrite", "32"),
        ("randwrite-flush8", "32"),
    ];
    for depth in ["1", "2"] {
        for (t, c) in targets {
            for (w, qd) in cells {
                let key = (
                    depth.to_string(),
                    t.to_string(),
                    c.to_string(),
                    w.to_string(),
                    qd.to_string(),
                );
                assert!(seen.contains(&key), "missing row {key:?} in\n{csv}");
            }
        }
        // The test guest through virtio-blk: every random cell (it has no sequential mode).
        for (w, qd) in cells.iter().filter(|(w, _)| *w != "seqwrite") {
            let key = (
                depth.to_string(),
                "guest-virtio".to_string(),
                "none".to_string(),
                w.to_string(),
                qd.to_string(),
            );
            assert!(seen.contains(&key), "missing row {key:?} in\n{csv}");
        }
    }
    assert_eq!(
        seen.len(),
        2 * (targets.len() * cells.len() + cells.len() - 1)
    );

    let md = std::fs::read_to_string(out_dir.join("depth.md")).expect("depth.md");
    assert!(md.contains("## strata-nbd vs qcow2-nbd"), "{md}");
    assert!(md.contains("randwrite qd32 **"), "{md}");
    assert!(md.contains("randwrite-flush8 qd32 **"), "{md}");
    assert!(md.contains("## guest-virtio vs journal-api"), "{md}");
    let svg = std::fs::read_to_string(out_dir.join("depth.svg")).expect("depth.svg");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(
        svg.matches(" KiB qd").count(),
        cells.len(),
        "one panel per workload"
    );
    // The scratch images are gone.
    let left: Vec<_> = std::fs::read_dir(&work)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "work directory not cleaned: {left:?}");
    assert!(Path::new(&out_dir).join("depth.csv").exists());
}
