//! What a run reports: series of latency samples with their throughput and errors, scenario
//! counters (violations, missing events …), checks against the targets; printed as a
//! table, written as JSON or as an SVG histogram.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use super::Scenario;
use super::stats::Summary;

/// The result of one loadgen run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Which scenario ran.
    pub scenario: Scenario,
    /// The run's fixture prefix (patients, devices, units and tokens carry it).
    pub run_id: String,
    /// The server.
    pub url: String,
    /// Whether this was a `--smoke` run (figures meaningless).
    pub smoke: bool,
    /// When the run started.
    pub started_at: DateTime<Utc>,
    /// Seconds spent creating fixtures and connecting.
    pub setup_s: f64,
    /// Seconds of the measured phase.
    pub measured_s: f64,
    /// Seconds for the whole run, cleanup included.
    pub total_s: f64,
    /// The sizes used.
    pub parameters: BTreeMap<String, Value>,
    /// Latency series; the first is the scenario's main one (the SVG shows it).
    pub series: Vec<Series>,
    /// Scenario counts: violations, missing events, throttled requests, cleanup …
    pub counters: BTreeMap<String, u64>,
    /// The targets and whether this run met them.
    pub targets: Vec<TargetCheck>,
}

/// One latency series.
#[derive(Debug, Serialize)]
pub struct Series {
    /// What was timed, e.g. `reading→offer`.
    pub name: String,
    /// Mean and percentiles of the samples.
    #[serde(flatten)]
    pub summary: Summary,
    /// Work done per second during the measured phase.
    pub throughput: f64,
    /// What `throughput` counts, e.g. `readings/s`.
    pub throughput_unit: String,
    /// Failed attempts (not in the samples).
    pub errors: u64,
    /// The samples, sorted (milliseconds).
    #[serde(skip)]
    pub sorted_ms: Vec<f64>,
}

impl Series {
    /// A series over `samples` (milliseconds, any order).
    pub fn new(
        name: &str,
        mut samples: Vec<f64>,
        throughput: f64,
        throughput_unit: &str,
        errors: u64,
    ) -> Self {
        let summary = Summary::of(&mut samples);
        Self {
            name: name.to_owned(),
            summary,
            throughput,
            throughput_unit: throughput_unit.to_owned(),
            errors,
            sorted_ms: samples,
        }
    }
}

/// Which figure a target constrains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Figure {
    /// Median latency, ms.
    P50Ms,
    /// 99th percentile latency, ms.
    P99Ms,
    /// Throughput, in the series' unit.
    Throughput,
}

/// A target from the issue and whether the run met it.
#[derive(Debug, Serialize)]
pub struct TargetCheck {
    /// The series it applies to.
    pub series: String,
    /// The figure.
    pub figure: Figure,
    /// `<=` or `>=`.
    pub comparison: &'static str,
    /// The target value.
    pub target: f64,
    /// What this run measured.
    pub measured: f64,
    /// Whether it was met.
    pub met: bool,
}

impl Report {
    /// An empty report for `scenario`, started now.
    pub fn new(scenario: Scenario) -> Self {
        Self {
            scenario,
            run_id: String::new(),
            url: String::new(),
            smoke: false,
            started_at: Utc::now(),
            setup_s: 0.0,
            measured_s: 0.0,
            total_s: 0.0,
            parameters: BTreeMap::new(),
            series: Vec::new(),
            counters: BTreeMap::new(),
            targets: Vec::new(),
        }
    }

    /// Records a size used.
    pub fn param(&mut self, name: &str, value: impl Into<Value>) {
        self.parameters.insert(name.to_owned(), value.into());
    }

    /// Records a count.
    pub fn count(&mut self, name: &str, value: u64) {
        self.counters.insert(name.to_owned(), value);
    }

    /// Checks the last added series against a target: `figure <= limit` (latency) or
    /// `figure >= limit` (throughput).
    pub fn target(&mut self, figure: Figure, limit: f64) {
        let Some(series) = self.series.last() else {
            return;
        };
        let (measured, comparison, met) = match figure {
            Figure::P50Ms => (series.summary.p50_ms, "<=", series.summary.p50_ms <= limit),
            Figure::P99Ms => (series.summary.p99_ms, "<=", series.summary.p99_ms <= limit),
            Figure::Throughput => (series.throughput, ">=", series.throughput >= limit),
        };
        let met = met && series.summary.samples > 0;
        self.targets.push(TargetCheck {
            series: series.name.clone(),
            figure,
            comparison,
            target: limit,
            measured,
            met,
        });
    }

    /// The summary table (and counters and targets) as printed on stdout.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16} {:<20} {:>9} {:>22} {:>9} {:>9} {:>9} {:>9} {:>7}",
            "scenario",
            "series",
            "samples",
            "throughput",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "errors"
        );
        for s in &self.series {
            let throughput = format!("{} {}", group(s.throughput), s.throughput_unit);
            let _ = writeln!(
                out,
                "{:<16} {:<20} {:>9} {:>22} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7}",
                self.scenario.name(),
                s.name,
                s.summary.samples,
                throughput,
                s.summary.p50_ms,
                s.summary.p90_ms,
                s.summary.p99_ms,
                s.summary.max_ms,
                s.errors
            );
        }
        let counters: Vec<String> = self
            .counters
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "counts: {}", counters.join(" "));
        for t in &self.targets {
            let verdict = match (self.smoke, t.met) {
                (true, _) => "n/a (smoke)",
                (false, true) => "met",
                (false, false) => "MISSED",
            };
            let _ = writeln!(
                out,
                "target: {} {:?} {} {} (measured {:.2}): {verdict}",
                t.series, t.figure, t.comparison, t.target, t.measured
            );
        }
        let _ = writeln!(
            out,
            "run {}: setup {:.1} s, measured {:.1} s, total {:.1} s",
            self.run_id, self.setup_s, self.measured_s, self.total_s
        );
        out
    }

    /// The main series' latency histogram as a standalone SVG document.
    pub fn svg(&self) -> String {
        let Some(main) = self.series.first() else {
            return super::svg::histogram("no samples", &[]);
        };
        let title = format!(
            "shers loadgen {}: {} (n={}, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms)",
            self.scenario.name(),
            main.name,
            main.summary.samples,
            main.summary.p50_ms,
            main.summary.p99_ms,
            main.summary.max_ms
        );
        super::svg::histogram(&title, &main.sorted_ms)
    }
}

/// `1234567.8` → `1,234,568` (whole numbers; one decimal below 100).
pub fn group(x: f64) -> String {
    if x.abs() < 100.0 {
        return format!("{x:.1}");
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if x < 0.0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping() {
        assert_eq!(group(1_234_567.8), "1,234,568");
        assert_eq!(group(100.0), "100");
        assert_eq!(group(12.34), "12.3");
        assert_eq!(group(999_999.0), "999,999");
    }

    #[test]
    fn targets_compare_the_right_figure() {
        let mut r = Report::new(Scenario::Fanout);
        r.series
            .push(Series::new("x", vec![1.0, 2.0, 30.0], 500.0, "ev/s", 0));
        r.target(Figure::P50Ms, 2.0);
        r.target(Figure::P99Ms, 10.0);
        r.target(Figure::Throughput, 1000.0);
        let met: Vec<bool> = r.targets.iter().map(|t| t.met).collect();
        assert_eq!(met, [true, false, false]);
        let table = r.table();
        assert!(table.contains("fanout"), "{table}");
        assert!(table.contains("MISSED"), "{table}");
    }
}
