//! A plain SVG plot of the depth benchmark: one panel per workload (and queue depth), the
//! headline number (IOPS, or MB/s for sequential writes) against chain depth, one line per
//! target and cache mode.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::report::{headline, target_rank, Row, Series};
use super::Workload;

const PANEL_W: f64 = 380.0;
const PANEL_H: f64 = 260.0;
const MARGIN_L: f64 = 64.0;
const MARGIN_R: f64 = 16.0;
const MARGIN_T: f64 = 34.0;
const MARGIN_B: f64 = 40.0;
const COLUMNS: usize = 3;
const LEGEND_H: f64 = 60.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#98df8a", "#ff7f0e", "#ffbb78", "#9467bd", "#7f7f7f",
];

/// A "nice" upper bound and step for an axis from 0 to `max`.
pub fn nice_axis(max: f64) -> (f64, f64) {
    if max <= 0.0 || !max.is_finite() {
        return (1.0, 0.25);
    }
    let raw_step = max / 4.0;
    let mag = 10f64.powf(raw_step.log10().floor());
    let norm = raw_step / mag;
    let step = mag
        * if norm <= 1.0 {
            1.0
        } else if norm <= 2.0 {
            2.0
        } else if norm <= 2.5 {
            2.5
        } else if norm <= 5.0 {
            5.0
        } else {
            10.0
        };
    ((max / step).ceil() * step, step)
}

pub(crate) fn fmt_tick(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}K", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.1}K", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG document.
pub fn svg(rows: &[Row], title: &str) -> String {
    let depths: Vec<usize> = rows
        .iter()
        .map(|r| r.depth)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let panels: Vec<(Workload, u32)> = rows
        .iter()
        .map(|r| (r.workload, r.qd))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut lines: Vec<(&'static str, &'static str)> = rows
        .iter()
        .map(|r| (r.target, r.cache))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    lines.sort_by_key(|&(t, c)| (target_rank(t), c));
    let nrows = panels.len().div_ceil(COLUMNS).max(1);
    let width = PANEL_W * COLUMNS as f64;
    let height = 30.0 + PANEL_H * nrows as f64 + LEGEND_H;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"##
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{}" y="20" text-anchor="middle" font-size="15">{}</text>"##,
        width / 2.0,
        esc(title)
    );
    for (pi, &(workload, qd)) in panels.iter().enumerate() {
        let ox = PANEL_W * (pi % COLUMNS) as f64;
        let oy = 30.0 + PANEL_H * (pi / COLUMNS) as f64;
        let (x0, x1) = (ox + MARGIN_L, ox + PANEL_W - MARGIN_R);
        let (y0, y1) = (oy + PANEL_H - MARGIN_B, oy + MARGIN_T);
        let unit = if workload == Workload::SeqWrite {
            "MB/s"
        } else {
            "IOPS"
        };
        let max = rows
            .iter()
            .filter(|r| r.workload == workload && r.qd == qd)
            .map(headline)
            .fold(0.0, f64::max);
        let (top, step) = nice_axis(max);
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle" font-size="13">{} {} KiB qd{} ({unit})</text>"##,
            (x0 + x1) / 2.0,
            oy + 20.0,
            workload.name(),
            workload.block_size() / 1024,
            qd
        );
        let _ = writeln!(
            s,
            r##"<rect x="{x0}" y="{y1}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
            x1 - x0,
            y0 - y1
        );
        let ypos = |v: f64| y0 - (v / top) * (y0 - y1);
        let mut t = 0.0;
        while t <= top + step / 2.0 {
            let y = ypos(t);
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#ddd"/>"##
            );
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                x0 - 4.0,
                y + 4.0,
                fmt_tick(t)
            );
            t += step;
        }
        let n = depths.len();
        let xpos = |i: usize| {
            if n <= 1 {
                (x0 + x1) / 2.0
            } else {
                x0 + 20.0 + (x1 - x0 - 40.0) * i as f64 / (n - 1) as f64
            }
        };
        for (i, d) in depths.iter().enumerate() {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{}" text-anchor="middle">{d}</text>"##,
                xpos(i),
                y0 + 14.0
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle">chain depth</text>"##,
            (x0 + x1) / 2.0,
            y0 + 30.0
        );
        for (li, &(target, cache)) in lines.iter().enumerate() {
            let color = COLORS[li % COLORS.len()];
            let dash = if cache == "writeback" {
                r##" stroke-dasharray="5,3""##
            } else {
                ""
            };
            let pts: Vec<(f64, f64)> = depths
                .iter()
                .enumerate()
                .filter_map(|(i, &d)| {
                    rows.iter()
                        .find(|r| {
                            r.depth == d
                                && r.target == target
                                && r.cache == cache
                                && r.workload == workload
                                && r.qd == qd
                        })
                        .map(|r| (xpos(i), ypos(headline(r))))
                })
                .collect();
            if pts.is_empty() {
                continue;
            }
            let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = writeln!(
                s,
                r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"##,
                path.join(" ")
            );
            for (x, y) in pts {
                let _ = writeln!(
                    s,
                    r##"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"/>"##
                );
            }
        }
    }
    let ly = 30.0 + PANEL_H * nrows as f64 + 10.0;
    for (li, &(target, cache)) in lines.iter().enumerate() {
        let color = COLORS[li % COLORS.len()];
        let x = 20.0 + (li % 4) as f64 * (width - 40.0) / 4.0;
        let y = ly + (li / 4) as f64 * 20.0;
        let dash = if cache == "writeback" {
            r##" stroke-dasharray="5,3""##
        } else {
            ""
        };
        let label = Series {
            workload: Workload::RandRead,
            qd: 0,
            target,
            cache,
        }
        .target_label();
        let _ = writeln!(
            s,
            r##"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" stroke-width="2"{dash}/>"##,
            x + 24.0
        );
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}">{}</text>"##,
            x + 30.0,
            y + 4.0,
            esc(&label)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::{TARGET_QCOW2_NBD, TARGET_STRATA_NBD};

    #[test]
    fn axis_is_nice_and_covers_the_max() {
        assert_eq!(nice_axis(9000.0), (10000.0, 2500.0));
        assert_eq!(nice_axis(130.0), (150.0, 50.0));
        let (top, step) = nice_axis(12345.0);
        assert!(top >= 12345.0 && step > 0.0);
        assert_eq!(nice_axis(0.0), (1.0, 0.25));
    }

    #[test]
    fn one_panel_per_workload_and_one_line_per_target() {
        let mut rows = Vec::new();
        for d in [1, 8, 64] {
            for (t, c) in [(TARGET_STRATA_NBD, "none"), (TARGET_QCOW2_NBD, "writeback")] {
                for (w, qd) in [
                    (Workload::RandRead, 1),
                    (Workload::RandRead, 32),
                    (Workload::SeqWrite, 32),
                ] {
                    rows.push(Row {
                        depth: d,
                        target: t,
                        cache: c,
                        workload: w,
                        qd,
                        iops: 1000.0 + d as f64,
                        mb_per_s: 50.0,
                    });
                }
            }
        }
        let svg = svg(&rows, "a < b");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a &lt; b"));
        assert_eq!(svg.matches("chain depth").count(), 3);
        assert_eq!(svg.matches("<polyline").count(), 6);
        assert_eq!(svg.matches("<circle").count(), 18);
        assert!(svg.contains("strata-nbd/none") && svg.contains("qcow2-nbd/writeback"));
        assert!(svg.contains("seqwrite 64 KiB qd32 (MB/s)"));
    }
}
