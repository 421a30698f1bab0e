//! The figures of the console's pages: this process's series read back from `metrics`' own
//! page (the one encoding, so the console shows what `/metrics` shows), and the inline SVG bar
//! charts, drawn on the server so that no script or external asset is needed.

use std::collections::BTreeMap;

use maud::{Markup, PreEscaped, html};

use crate::metrics;

/// What this process counted since it started.
#[derive(Debug, Default)]
pub struct Series {
    /// HTTP pushes by outcome (`stored`, `duplicate`, `refused_*`, ...), over every event type.
    pub push_outcomes: BTreeMap<String, f64>,
    /// Stream acknowledgements by status (`success`, `later`, ...).
    pub stream_acks: BTreeMap<String, f64>,
    pub push_ack: Latency,
    pub stream_ack: Latency,
}

/// A latency histogram summed up.
#[derive(Debug, Default, Clone)]
pub struct Latency {
    pub count: f64,
    pub sum: f64,
    /// (upper bound in seconds, cumulative count), ascending.
    pub buckets: Vec<(f64, f64)>,
}

impl Latency {
    pub fn mean_ms(&self) -> Option<f64> {
        (self.count > 0.0).then(|| 1000.0 * self.sum / self.count)
    }

    /// The bucket bound under which `q` of the observations fall (an upper estimate), in ms.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let wanted = q * self.count;
        self.buckets
            .iter()
            .find(|(_, cumulative)| *cumulative >= wanted)
            .map(|(le, _)| 1000.0 * le)
    }
}

impl Series {
    /// Reads this process's series (no database: the page is encoded without the scraped part).
    pub fn read() -> Series {
        let page = metrics::encode(None, None);
        let mut series = Series::default();
        for line in page.lines().filter(|l| !l.starts_with('#')) {
            let Some((name_labels, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match name_labels.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (name_labels, ""),
            };
            match name {
                "dingsync_events_received_total" => {
                    if let Some(outcome) = label(labels, "outcome") {
                        *series.push_outcomes.entry(outcome).or_default() += value;
                    }
                }
                "dingsync_stream_acks_total" => {
                    if let Some(status) = label(labels, "status") {
                        *series.stream_acks.entry(status).or_default() += value;
                    }
                }
                _ => {
                    for (prefix, latency) in [
                        ("dingsync_callback_ack_seconds", &mut series.push_ack),
                        ("dingsync_stream_ack_seconds", &mut series.stream_ack),
                    ] {
                        match name.strip_prefix(prefix) {
                            Some("_count") => latency.count = value,
                            Some("_sum") => latency.sum = value,
                            Some("_bucket") => {
                                let le = label(labels, "le")
                                    .and_then(|le| le.parse::<f64>().ok())
                                    .unwrap_or(f64::INFINITY);
                                latency.buckets.push((le, value));
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        series
    }
}

/// The value of `key` in `a="x",b="y"`.
fn label(labels: &str, key: &str) -> Option<String> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
    })
}

/// The colours of the bars, by series (the same order everywhere).
const COLOURS: [&str; 6] = [
    "#2f6fde", "#e0892b", "#3a9b5c", "#b04fc4", "#c4463a", "#6b7a8f",
];

/// A stacked bar chart: one bar per column, its parts by series (`names`), values `values[col][s]`.
/// `labels` names each column (every few are printed under the axis).
pub fn stacked_bars(
    title: &str,
    names: &[String],
    labels: &[String],
    values: &[Vec<f64>],
) -> Markup {
    const W: f64 = 640.0;
    const H: f64 = 200.0;
    const PAD_L: f64 = 40.0;
    const PAD_B: f64 = 24.0;
    let max = values
        .iter()
        .map(|col| col.iter().sum::<f64>())
        .fold(0.0_f64, f64::max)
        .max(1.0);
    let n = values.len().max(1) as f64;
    let slot = (W - PAD_L) / n;
    let bar = (slot * 0.8).max(1.0);
    let mut shapes = String::new();
    for (i, col) in values.iter().enumerate() {
        let mut y = H - PAD_B;
        for (s, v) in col.iter().enumerate() {
            if *v <= 0.0 {
                continue;
            }
            let h = v / max * (H - PAD_B - 10.0);
            y -= h;
            let x = PAD_L + i as f64 * slot + (slot - bar) / 2.0;
            shapes.push_str(&format!(
                r#"<rect x="{x:.1}" y="{y:.1}" width="{bar:.1}" height="{h:.1}" fill="{}"><title>{}: {}</title></rect>"#,
                COLOURS[s % COLOURS.len()],
                maud::html! { (names.get(s).map(String::as_str).unwrap_or("")) " " (labels.get(i).map(String::as_str).unwrap_or("")) }.into_string(),
                v
            ));
        }
    }
    let every = (values.len() / 6).max(1);
    let mut axis = String::new();
    for (i, text) in labels.iter().enumerate().filter(|(i, _)| i % every == 0) {
        let x = PAD_L + i as f64 * slot + slot / 2.0;
        axis.push_str(&format!(
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            H - 6.0,
            html! { (text) }.into_string()
        ));
    }
    html! {
        figure.chart {
            svg viewBox={ "0 0 " (W) " " (H) } role="img" aria-label=(title) {
                title { (title) }
                line x1=(PAD_L) y1=(H - PAD_B) x2=(W) y2=(H - PAD_B) stroke="#999" {}
                text x=(PAD_L - 4.0) y="16" text-anchor="end" { (format!("{max:.0}")) }
                text x=(PAD_L - 4.0) y=(H - PAD_B) text-anchor="end" { "0" }
                (PreEscaped(shapes))
                (PreEscaped(axis))
            }
            figcaption {
                @for (s, name) in names.iter().enumerate() {
                    span.key { span.swatch style={ "background:" (COLOURS[s % COLOURS.len()]) } {} (name) }
                }
            }
        }
    }
}

/// Horizontal bars, one per row: (label, value), longest scaled to the width; `limit` (if any)
/// drawn as a line at its place.
pub fn horizontal_bars(title: &str, rows: &[(String, f64)]) -> Markup {
    const W: f64 = 640.0;
    const ROW: f64 = 22.0;
    const LABEL: f64 = 260.0;
    let h = (rows.len().max(1) as f64) * ROW + 8.0;
    let max = rows
        .iter()
        .map(|(_, v)| *v)
        .fold(0.0_f64, f64::max)
        .max(1.0);
    html! {
        figure.chart {
            svg viewBox={ "0 0 " (W) " " (h) } role="img" aria-label=(title) {
                title { (title) }
                @for (i, (name, value)) in rows.iter().enumerate() {
                    @let y = 4.0 + i as f64 * ROW;
                    @let len = value / max * (W - LABEL - 60.0);
                    text x=(LABEL - 6.0) y=(y + 15.0) text-anchor="end" { (name) }
                    rect x=(LABEL) y=(y + 3.0) width=(format!("{len:.1}")) height=(ROW - 6.0)
                        fill=(COLOURS[0]) { title { (name) ": " (value) } }
                    text x=(LABEL + len + 4.0) y=(y + 15.0) { (value) }
                }
            }
        }
    }
}
