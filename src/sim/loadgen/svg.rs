//! A latency histogram as a small hand-written SVG document (no plotting crate): linear
//! buckets from 0 to a round value above the p99, one overflow bar for the tail beyond it,
//! axis ticks and labels, and dashed p50 / p99 marker lines.

use std::fmt::Write as _;

use super::stats::percentile;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 540.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 40.0;
const TOP: f64 = 60.0;
const BOTTOM: f64 = 70.0;
/// Buckets between 0 and the range's upper bound.
const BUCKETS: usize = 40;
/// Width reserved at the right for the overflow bar.
const OVERFLOW_GAP: f64 = 60.0;

/// The histogram of `sorted_ms` (ascending, milliseconds) titled `title`.
// Long on purpose: one SVG drawn top to bottom (axes, bars, overflow, percentile marks).
pub fn histogram(title: &str, sorted_ms: &[f64]) -> String {
    let p50 = percentile(sorted_ms, 0.50);
    let p99 = percentile(sorted_ms, 0.99);
    let max = sorted_ms.last().copied().unwrap_or(0.0);
    // Show the body and a bit of tail; the rest goes to the overflow bar.
    let upper = nice_ceil((p99 * 1.5).max(p50 * 2.0).min(max).max(0.001));
    let mut counts = [0usize; BUCKETS];
    let mut overflow = 0usize;
    for &x in sorted_ms {
        if x > upper {
            overflow += 1;
        } else {
            let i = ((x / upper) * BUCKETS as f64) as usize;
            counts[i.min(BUCKETS - 1)] += 1;
        }
    }
    let tallest = counts.iter().copied().max().unwrap_or(0).max(overflow);
    let y_max = nice_ceil((tallest as f64).max(1.0));

    let plot_w = WIDTH - LEFT - RIGHT - OVERFLOW_GAP;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x_of = |ms: f64| LEFT + (ms / upper).clamp(0.0, 1.0) * plot_w;
    let y_of = |n: f64| TOP + plot_h - (n / y_max) * plot_h;
    let bar_w = plot_w / BUCKETS as f64;

    let mut svg = String::with_capacity(16 * 1024);
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="15">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );

    let overflow_x = LEFT + plot_w + OVERFLOW_GAP / 2.0 - bar_w / 2.0;
    // Axes, ticks, grid and labels first, so the bars cover the grid.
    let axis_y = TOP + plot_h;
    let _ = writeln!(
        svg,
        r#"<line x1="{LEFT}" y1="{axis_y}" x2="{:.1}" y2="{axis_y}" stroke="black"/>"#,
        LEFT + plot_w + OVERFLOW_GAP
    );
    let _ = writeln!(
        svg,
        r#"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{axis_y}" stroke="black"/>"#
    );
    for k in 0..=5 {
        let ms = upper * f64::from(k) / 5.0;
        let x = x_of(ms);
        let _ = writeln!(
            svg,
            r#"<line x1="{x:.1}" y1="{axis_y}" x2="{x:.1}" y2="{:.1}" stroke="black"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            axis_y + 5.0,
            axis_y + 20.0,
            fmt_ms(ms)
        );
        let n = y_max * f64::from(k) / 5.0;
        let y = y_of(n);
        let _ = writeln!(
            svg,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{LEFT}" y2="{y:.1}" stroke="black"/><line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#dddddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT - 5.0,
            LEFT + plot_w,
            LEFT - 8.0,
            y + 4.0,
            n.round()
        );
    }
    if overflow > 0 {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">&gt; {}</text>"#,
            overflow_x + bar_w.max(4.0) / 2.0,
            axis_y + 36.0,
            fmt_ms(upper)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">latency (ms)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 20.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">samples</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );

    // Bars.
    for (i, &n) in counts.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let x = LEFT + i as f64 * bar_w;
        let y = y_of(n as f64);
        let _ = writeln!(
            svg,
            r##"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="#4c78a8"><title>{:.3}–{:.3} ms: {n}</title></rect>"##,
            (bar_w - 1.0).max(0.5),
            TOP + plot_h - y,
            upper * i as f64 / BUCKETS as f64,
            upper * (i + 1) as f64 / BUCKETS as f64,
        );
    }
    if overflow > 0 {
        let y = y_of(overflow as f64);
        let _ = writeln!(
            svg,
            r##"<rect x="{overflow_x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="#e45756"><title>&gt; {} ms: {overflow}</title></rect>"##,
            bar_w.max(4.0),
            TOP + plot_h - y,
            fmt_ms(upper),
        );
    }

    // Percentile markers (at the overflow bar when beyond the range).
    if !sorted_ms.is_empty() {
        for (label, value, colour, dy) in
            [("p50", p50, "#1b7837", 0.0), ("p99", p99, "#c51b7d", 16.0)]
        {
            let x = if value > upper {
                overflow_x + bar_w.max(4.0) / 2.0
            } else {
                x_of(value)
            };
            let _ = writeln!(
                svg,
                r#"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{axis_y}" stroke="{colour}" stroke-width="2" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" fill="{colour}">{label} {} ms</text>"#,
                x + 4.0,
                TOP + 12.0 + dy,
                fmt_ms(value)
            );
        }
    } else {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">no samples</text>"#,
            LEFT + plot_w / 2.0,
            TOP + plot_h / 2.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The smallest of 1, 2, 2.5, 5 × 10^k that is ≥ `x` (x > 0).
fn nice_ceil(x: f64) -> f64 {
    let exp = x.log10().floor();
    let base = 10f64.powf(exp);
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * base)
        .find(|v| *v >= x * (1.0 - 1e-9))
        .unwrap_or(10.0 * base)
}

fn fmt_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 1.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.3}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_bounds() {
        assert_eq!(nice_ceil(3.2), 5.0);
        assert_eq!(nice_ceil(0.021), 0.025);
        assert_eq!(nice_ceil(100.0), 100.0);
        assert_eq!(nice_ceil(101.0), 200.0);
    }

    #[test]
    fn a_document_with_bars_markers_and_an_overflow_bar() {
        let mut samples: Vec<f64> = (0..1000).map(|i| 1.0 + f64::from(i % 50) / 10.0).collect();
        samples.push(250.0);
        samples.sort_by(f64::total_cmp);
        let svg = histogram("a <title> & more", &samples);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &lt;title&gt; &amp; more"));
        assert!(svg.contains(">p50 "), "p50 marker");
        assert!(svg.contains(">p99 "), "p99 marker");
        assert!(svg.contains("latency (ms)"));
        assert!(
            svg.contains("#e45756"),
            "the tail beyond the range has its own bar"
        );
        assert_eq!(svg.matches("<svg").count(), 1);
    }

    #[test]
    fn empty_input_is_still_a_document() {
        let svg = histogram("nothing", &[]);
        assert!(svg.contains("no samples"));
    }
}
