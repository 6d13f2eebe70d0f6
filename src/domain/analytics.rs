//! Response-time analytics over NEMSIS intervals (pure): count, mean, p50, p90 and compliance
//! against a threshold for each interval.
//!
//! Intervals (docs/domain.md): call→notified (eTimes.01→.03), turnout (.03→.05), travel
//! (.05→.06), response (.03→.06), on scene (.06→.09), transport (.09→.11), total
//! (.01→closed). Percentiles use the nearest-rank method on the sorted durations.

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use super::incident::Times;
use super::validation::{FieldError, storable_instant};

/// The range a report covers when the request names no start: this long before its end.
pub const DEFAULT_RANGE: TimeDelta = TimeDelta::hours(24);

/// The `[from, to)` range of a report: `to` defaults to `now`, `from` to [`DEFAULT_RANGE`]
/// before `to`. Both must be storable instants ([`storable_instant`]) and `from` before `to`;
/// the error points at the query parameter at fault (`/query/from`, `/query/to`).
pub fn report_range(
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), FieldError> {
    let to = storable_instant("/query/to", to.unwrap_or(now))?;
    let from = match from {
        Some(from) => storable_instant("/query/from", from)?,
        // `to` is storable, so this fails only at the very start of the storable range.
        None => to
            .checked_sub_signed(DEFAULT_RANGE)
            .and_then(|from| storable_instant("/query/from", from).ok())
            .ok_or_else(|| {
                FieldError::new("/query/to", "must leave room for the default 24 h range")
            })?,
    };
    if from >= to {
        return Err(FieldError::new("/query/from", "must be before `to`"));
    }
    Ok((from, to))
}

/// The intervals, in report order.
pub const INTERVALS: [&str; 7] = [
    "call_to_notified",
    "turnout",
    "travel",
    "response",
    "on_scene",
    "transport",
    "total",
];

/// Threshold per interval in seconds (`None`: no standard, compliance not reported).
/// Defaults: NFPA 1710 call processing 64 s, turnout 60 s, travel 240 s (first unit), response
/// 300 s (turnout + travel), NHS hospital handover-style on-scene/transport have no default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    /// Call received → unit notified.
    pub call_to_notified: Option<u64>,
    /// Notified → en route.
    pub turnout: Option<u64>,
    /// En route → on scene.
    pub travel: Option<u64>,
    /// Notified → on scene.
    pub response: Option<u64>,
    /// On scene → left scene.
    pub on_scene: Option<u64>,
    /// Left scene → at destination.
    pub transport: Option<u64>,
    /// Call received → closed.
    pub total: Option<u64>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            call_to_notified: Some(64),
            turnout: Some(60),
            travel: Some(240),
            response: Some(300),
            on_scene: None,
            transport: None,
            total: None,
        }
    }
}

impl Thresholds {
    fn get(&self, interval: &str) -> Option<u64> {
        match interval {
            "call_to_notified" => self.call_to_notified,
            "turnout" => self.turnout,
            "travel" => self.travel,
            "response" => self.response,
            "on_scene" => self.on_scene,
            "transport" => self.transport,
            "total" => self.total,
            _ => None,
        }
    }
}

/// Figures for one interval.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IntervalStats {
    /// Incidents with both ends of the interval.
    pub count: usize,
    /// Mean, seconds.
    pub mean_s: Option<f64>,
    /// Median (nearest rank), seconds.
    pub p50_s: Option<f64>,
    /// 90th percentile (nearest rank), seconds.
    pub p90_s: Option<f64>,
    /// The standard, seconds.
    pub threshold_s: Option<u64>,
    /// Share at or under the threshold, percent.
    pub compliance_pct: Option<f64>,
}

/// The seconds of `interval` for one incident, when both ends are known.
pub fn interval_s(times: &Times, interval: &str) -> Option<f64> {
    let (a, b) = match interval {
        "call_to_notified" => (times.call_received, times.unit_notified),
        "turnout" => (times.unit_notified, times.unit_enroute),
        "travel" => (times.unit_enroute, times.unit_on_scene),
        "response" => (times.unit_notified, times.unit_on_scene),
        "on_scene" => (times.unit_on_scene, times.unit_left_scene),
        "transport" => (times.unit_left_scene, times.at_destination),
        "total" => (times.call_received, times.closed),
        _ => (None, None),
    };
    let (a, b) = (a?, b?);
    let ms = (b - a).num_milliseconds();
    (ms >= 0).then(|| ms as f64 / 1000.0)
}

fn nearest_rank(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted.get(rank.min(sorted.len()) - 1).copied()
}

/// Statistics for every interval over `incidents`' times.
pub fn response_times<'a>(
    incidents: impl IntoIterator<Item = &'a Times> + Clone,
    thresholds: &Thresholds,
) -> Vec<(&'static str, IntervalStats)> {
    INTERVALS
        .iter()
        .map(|&name| {
            let mut values: Vec<f64> = incidents
                .clone()
                .into_iter()
                .filter_map(|t| interval_s(t, name))
                .collect();
            values.sort_by(f64::total_cmp);
            let count = values.len();
            let threshold_s = thresholds.get(name);
            let mean_s = (count > 0).then(|| values.iter().sum::<f64>() / count as f64);
            let compliance_pct = threshold_s.filter(|_| count > 0).map(|t| {
                let within = values.iter().filter(|v| **v <= t as f64).count();
                within as f64 * 100.0 / count as f64
            });
            (
                name,
                IntervalStats {
                    count,
                    mean_s,
                    p50_s: nearest_rank(&values, 0.5),
                    p90_s: nearest_rank(&values, 0.9),
                    threshold_s,
                    compliance_pct,
                },
            )
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use chrono::Duration;
    use proptest::prelude::*;

    /// Any instant chrono can represent, with the extremes and the edges of the storable
    /// range weighted in.
    fn any_instant() -> impl Strategy<Value = DateTime<Utc>> {
        let min = DateTime::<Utc>::MIN_UTC.timestamp();
        let max = DateTime::<Utc>::MAX_UTC.timestamp();
        prop_oneof![
            min..=max,
            Just(min),
            Just(max),
            -86_400i64..86_400,
            (crate::domain::validation::LATEST_INSTANT_S - 86_400)
                ..=crate::domain::validation::LATEST_INSTANT_S + 1,
        ]
        .prop_map(|s| DateTime::from_timestamp(s, 0).unwrap_or(DateTime::<Utc>::MIN_UTC))
    }

    proptest! {
        #[test]
        fn report_range_never_panics_and_returns_an_ordered_storable_range(
            from in proptest::option::of(any_instant()),
            to in proptest::option::of(any_instant()),
            now in any_instant(),
        ) {
            match report_range(from, to, now) {
                Ok((f, t)) => {
                    prop_assert!(f < t);
                    prop_assert!(storable_instant("", f).is_ok());
                    prop_assert!(storable_instant("", t).is_ok());
                }
                Err(e) => prop_assert!(e.pointer == "/query/from" || e.pointer == "/query/to"),
            }
        }
    }

    #[test]
    fn report_range_defaults_and_rejects_what_cannot_be_stored() {
        let now: DateTime<Utc> = "2026-11-23T08:00:00Z".parse().unwrap();
        assert_eq!(
            report_range(None, None, now).unwrap(),
            (now - Duration::hours(24), now)
        );
        let err = report_range(None, Some(DateTime::<Utc>::MIN_UTC), now).unwrap_err();
        assert_eq!(err.pointer, "/query/to");
        let epoch = DateTime::<Utc>::UNIX_EPOCH;
        assert_eq!(
            report_range(None, Some(epoch), now).unwrap_err().pointer,
            "/query/to"
        );
        let err = report_range(Some(DateTime::<Utc>::MAX_UTC), None, now).unwrap_err();
        assert_eq!(err.pointer, "/query/from");
        assert_eq!(
            report_range(Some(now), Some(now), now).unwrap_err().pointer,
            "/query/from"
        );
    }

    fn times(turnout_s: i64) -> Times {
        let t0: DateTime<Utc> = "2026-11-23T08:00:00Z".parse().unwrap();
        Times {
            call_received: Some(t0),
            unit_notified: Some(t0 + Duration::seconds(30)),
            unit_enroute: Some(t0 + Duration::seconds(30 + turnout_s)),
            ..Times::default()
        }
    }

    #[test]
    fn hand_computed_figures() {
        // Turnouts 10, 20, …, 100 s.
        let data: Vec<Times> = (1..=10).map(|i| times(i * 10)).collect();
        let stats = response_times(data.iter(), &Thresholds::default());
        let turnout = &stats.iter().find(|(n, _)| *n == "turnout").unwrap().1;
        assert_eq!(turnout.count, 10);
        assert_eq!(turnout.mean_s, Some(55.0));
        assert_eq!(turnout.p50_s, Some(50.0), "nearest rank: 5th of 10");
        assert_eq!(turnout.p90_s, Some(90.0), "nearest rank: 9th of 10");
        assert_eq!(turnout.threshold_s, Some(60));
        assert_eq!(
            turnout.compliance_pct,
            Some(60.0),
            "10..60 s are within 60 s"
        );
        let call = &stats
            .iter()
            .find(|(n, _)| *n == "call_to_notified")
            .unwrap()
            .1;
        assert_eq!(
            (call.count, call.mean_s, call.compliance_pct),
            (10, Some(30.0), Some(100.0))
        );
        let travel = &stats.iter().find(|(n, _)| *n == "travel").unwrap().1;
        assert_eq!(
            (
                travel.count,
                travel.mean_s,
                travel.p50_s,
                travel.compliance_pct
            ),
            (0, None, None, None)
        );
    }
}
