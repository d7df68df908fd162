//! Grouped bar charts in plain SVG (the merge benchmark's plots), on the axis helpers of the
//! depth plot.

use std::fmt::Write as _;

use super::plot::{esc, fmt_tick, nice_axis};

const PANEL_W: f64 = 560.0;
const PANEL_H: f64 = 300.0;
const MARGIN_L: f64 = 64.0;
const MARGIN_T: f64 = 34.0;
const MARGIN_B: f64 = 56.0;
const LEGEND_W: f64 = 190.0;
const COLORS: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// One panel: for every group (x axis), one bar per series; missing values leave a gap.
#[derive(Clone, Debug, Default)]
pub struct Panel {
    pub title: String,
    pub groups: Vec<String>,
    pub series: Vec<String>,
    /// `values[group][series]`.
    pub values: Vec<Vec<Option<f64>>>,
    /// A dashed horizontal reference line (e.g. 1.0 for ratios).
    pub reference: Option<f64>,
}

/// The panels stacked vertically, each with its legend on the right.
pub fn svg(title: &str, panels: &[Panel]) -> String {
    let width = PANEL_W + LEGEND_W;
    let height = 30.0 + PANEL_H * panels.len().max(1) as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"##
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"##,
        width / 2.0,
        esc(title)
    );
    for (pi, p) in panels.iter().enumerate() {
        panel(&mut s, p, 30.0 + PANEL_H * pi as f64);
    }
    s.push_str("</svg>\n");
    s
}

fn panel(s: &mut String, p: &Panel, oy: f64) {
    let (x0, x1) = (MARGIN_L, PANEL_W - 10.0);
    let (y0, y1) = (oy + PANEL_H - MARGIN_B, oy + MARGIN_T);
    let max = p
        .values
        .iter()
        .flatten()
        .flatten()
        .copied()
        .chain(p.reference)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let (top, step) = nice_axis(max);
    let ypos = |v: f64| y0 - (v.max(0.0) / top) * (y0 - y1);
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle" font-size="13">{}</text>"##,
        (x0 + x1) / 2.0,
        oy + 20.0,
        esc(&p.title)
    );
    let _ = writeln!(
        s,
        r##"<rect x="{x0}" y="{y1}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        x1 - x0,
        y0 - y1
    );
    let mut t = 0.0;
    while t <= top + step / 2.0 {
        let y = ypos(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 - 4.0,
            y + 4.0,
            if top < 10.0 {
                format!("{t:.2}")
            } else {
                fmt_tick(t)
            }
        );
        t += step;
    }
    let groups = p.groups.len().max(1);
    let gw = (x1 - x0) / groups as f64;
    let bw = (gw - 12.0) / p.series.len().max(1) as f64;
    for (gi, g) in p.groups.iter().enumerate() {
        let gx = x0 + gw * gi as f64 + 6.0;
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"##,
            gx + (gw - 12.0) / 2.0,
            y0 + 14.0,
            esc(g)
        );
        for (si, v) in p
            .values
            .get(gi)
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .enumerate()
        {
            let Some(v) = v.filter(|v| v.is_finite()) else {
                continue;
            };
            let y = ypos(v);
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {}</title></rect>"##,
                gx + bw * si as f64,
                (bw - 1.0).max(1.0),
                (y0 - y).max(0.5),
                COLORS[si % COLORS.len()],
                esc(p.series.get(si).map_or("", String::as_str)),
                fmt_value(v)
            );
        }
    }
    if let Some(r) = p.reference {
        let y = ypos(r);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#000" stroke-dasharray="4,3"/>"##
        );
    }
    for (si, name) in p.series.iter().enumerate() {
        let y = y1 + 14.0 * si as f64;
        let _ = writeln!(
            s,
            r##"<rect x="{}" y="{:.1}" width="10" height="10" fill="{}"/><text x="{}" y="{:.1}">{}</text>"##,
            PANEL_W,
            y,
            COLORS[si % COLORS.len()],
            PANEL_W + 14.0,
            y + 9.0,
            esc(name)
        );
    }
}

fn fmt_value(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_legend_and_gaps() {
        let p = Panel {
            title: "merge <s>".into(),
            groups: vec!["64M seq".into(), "64M scat".into()],
            series: vec!["relink".into(), "compact".into(), "qemu".into()],
            values: vec![
                vec![Some(0.1), Some(2.0), None],
                vec![Some(0.2), Some(f64::NAN), Some(4.0)],
            ],
            reference: Some(1.0),
        };
        let svg = svg("t", &[p.clone(), p]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("merge &lt;s&gt;"));
        // 4 finite bars per panel, 3 legend squares per panel.
        assert_eq!(svg.matches("<title>").count(), 8);
        assert_eq!(svg.matches(r#"width="10" height="10""#).count(), 6);
        assert_eq!(svg.matches("stroke-dasharray").count(), 2);
        assert!(svg.contains("<title>qemu: 4.00</title>"));
    }
}
