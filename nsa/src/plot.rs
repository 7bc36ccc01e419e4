//! `nsa autotune --show --plot out.svg`: time per variant over each kernel's buckets, one panel per kernel
//! (log-scale time; buckets in table order), as a dependency-free SVG.
use nsa_kernels::tuning::TuningTable;
use std::collections::BTreeMap;
use std::fmt::Write;

const PANEL_W: f64 = 640.0;
const PANEL_H: f64 = 220.0;
const MARGIN: f64 = 50.0;
const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// The SVG text for `table`.
pub fn svg(table: &TuningTable) -> String {
    let mut kernels: BTreeMap<&str, Vec<&nsa_kernels::tuning::Entry>> = BTreeMap::new();
    for entry in &table.entries {
        kernels.entry(entry.kernel.as_str()).or_default().push(entry);
    }
    let height = kernels.len() as f64 * (PANEL_H + MARGIN) + MARGIN;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="11">"#,
        w = PANEL_W + 2.0 * MARGIN + 160.0
    );
    let _ = writeln!(
        out,
        r#"<text x="{MARGIN}" y="20" font-size="13">nsa autotune: {}</text>"#,
        escape(&table.device.to_string())
    );
    for (panel, (kernel, entries)) in kernels.iter().enumerate() {
        let top = MARGIN + panel as f64 * (PANEL_H + MARGIN);
        let times: Vec<f64> = entries
            .iter()
            .flat_map(|e| e.times_ms.values().copied())
            .filter(|t| *t > 0.0)
            .collect();
        let (lo, hi) = times
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), t| (l.min(t.log10()), h.max(t.log10())));
        let span = (hi - lo).max(1e-3);
        let x = |i: usize| MARGIN + PANEL_W * (i as f64 + 0.5) / entries.len() as f64;
        let y = |ms: f64| top + PANEL_H - PANEL_H * (ms.log10() - lo) / span;
        let _ = writeln!(
            out,
            r##"<rect x="{MARGIN}" y="{top}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#888"/><text x="{MARGIN}" y="{}">{} (ms, log scale: {:.3e} – {:.3e})</text>"##,
            top - 6.0,
            escape(kernel),
            10f64.powf(lo),
            10f64.powf(hi)
        );
        let mut variants: Vec<&str> = entries
            .iter()
            .flat_map(|e| e.times_ms.keys().map(String::as_str))
            .collect();
        variants.sort();
        variants.dedup();
        for (v, variant) in variants.iter().enumerate() {
            let color = COLORS[v % COLORS.len()];
            let points: Vec<String> = entries
                .iter()
                .enumerate()
                .filter_map(|(i, e)| e.times_ms.get(*variant).map(|ms| format!("{:.1},{:.1}", x(i), y(*ms))))
                .collect();
            let _ = writeln!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.5"/><text x="{}" y="{}" fill="{color}">{}</text>"#,
                points.join(" "),
                MARGIN + PANEL_W + 10.0,
                top + 14.0 * (v as f64 + 1.0),
                escape(variant)
            );
        }
    }
    out.push_str("</svg>\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
