//! Latency statistics over a full sample set: sort once, nearest-rank percentiles. No
//! sampling, no dropped outliers.

use serde::Serialize;

/// Percentiles of one series, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// How many samples.
    pub samples: usize,
    /// Arithmetic mean, milliseconds.
    pub mean_ms: f64,
    /// Median (50th percentile, nearest rank), milliseconds.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest sample.
    pub max_ms: f64,
}

impl Summary {
    /// Sorts `samples` (milliseconds) in place and summarises them; all zero when empty.
    pub fn of(samples: &mut [f64]) -> Self {
        samples.sort_unstable_by(f64::total_cmp);
        if samples.is_empty() {
            return Self::default();
        }
        let sum: f64 = samples.iter().sum();
        Self {
            samples: samples.len(),
            mean_ms: sum / samples.len() as f64,
            p50_ms: percentile(samples, 0.50),
            p90_ms: percentile(samples, 0.90),
            p99_ms: percentile(samples, 0.99),
            max_ms: samples[samples.len() - 1],
        }
    }
}

/// The nearest-rank percentile `p` (0–1) of sorted samples: the smallest sample with at least
/// `p` of the samples at or below it (never interpolated towards a faster value).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Milliseconds in a duration, as a sample.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut s: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let summary = Summary::of(&mut s);
        assert_eq!(summary.samples, 100);
        assert_eq!(summary.p50_ms, 50.0);
        assert_eq!(summary.p90_ms, 90.0);
        assert_eq!(summary.p99_ms, 99.0);
        assert_eq!(summary.max_ms, 100.0);
        assert_eq!(summary.mean_ms, 50.5);
    }

    #[test]
    fn a_single_slow_sample_is_the_p99_of_few() {
        let mut s = vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 500.0];
        let summary = Summary::of(&mut s);
        assert_eq!(summary.p50_ms, 1.0);
        assert_eq!(summary.p99_ms, 500.0);
    }

    #[test]
    fn empty_is_all_zero() {
        assert_eq!(Summary::of(&mut []), Summary::default());
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
