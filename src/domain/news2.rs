//! NEWS2, the National Early Warning Score 2 (Royal College of Physicians, 2017), computed
//! from one [`Reading`] exactly per the table in `docs/domain.md` (SpO2 scale 1).
//!
//! Pure scoring. It must not guess a missing parameter (wearables rarely send blood pressure,
//! consciousness or oxygen use): a missing parameter is listed in [`News2::missing`], never
//! scored 0, and the risk is that of the partial aggregate. It does not decide the triage
//! status; `super::triage` does.
//!
//! Rounding: the table's bands are whole numbers (temperature: tenths), readings are floats.
//! Respiration rate, SpO2, systolic BP and pulse are rounded to the nearest whole number and
//! temperature to one decimal, halves away from zero, before banding (so 20.4/min scores as 20,
//! 36.04 °C as 36.0 and 36.06 °C as 36.1). The triage thresholds compare the raw value instead.

use serde::{Deserialize, Serialize};

use super::vitals::{Consciousness, Reading};

/// One of the seven NEWS2 parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum News2Param {
    /// Respiration rate, per minute.
    RespirationRate,
    /// SpO2 on scale 1 (no hypercapnic respiratory failure target).
    Spo2,
    /// Breathing air or on supplemental oxygen.
    AirOrOxygen,
    /// Systolic blood pressure, mmHg.
    SystolicBp,
    /// Pulse, per minute.
    Pulse,
    /// Level of consciousness (ACVPU).
    Consciousness,
    /// Temperature, °C.
    Temperature,
}

/// Clinical risk band of a NEWS2 aggregate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum News2Risk {
    /// Aggregate 0–4 and no parameter scoring 3.
    Low,
    /// Aggregate 0–4 with one parameter scoring 3 (urgent ward-based review).
    LowMedium,
    /// Aggregate 5–6.
    Medium,
    /// Aggregate 7 or more.
    High,
}

impl News2Risk {
    /// The wire name (`low`, `low_medium`, `medium`, `high`).
    pub fn as_str(self) -> &'static str {
        match self {
            News2Risk::Low => "low",
            News2Risk::LowMedium => "low_medium",
            News2Risk::Medium => "medium",
            News2Risk::High => "high",
        }
    }
}

/// The points one present parameter scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct News2Component {
    /// Which parameter.
    pub param: News2Param,
    /// Its points, 0–3.
    pub points: u8,
}

/// A NEWS2 result; serialised as `{score, risk, missing, parameters, complete}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct News2 {
    /// Aggregate of the present parameters (0–20).
    pub score: u8,
    /// Risk band of that aggregate.
    pub risk: News2Risk,
    /// Parameters the reading did not supply, in table order.
    pub missing: Vec<News2Param>,
    /// Points per present parameter, in table order.
    pub parameters: Vec<News2Component>,
    /// Whether all seven parameters were present.
    pub complete: bool,
}

/// Scores one reading. Never fails: an absent parameter is listed as missing.
pub fn score(reading: &Reading) -> News2 {
    let points = [
        (
            News2Param::RespirationRate,
            reading.respiration_rate_bpm.map(respiration_points),
        ),
        (News2Param::Spo2, reading.spo2_pct.map(spo2_points)),
        (
            News2Param::AirOrOxygen,
            reading.on_oxygen.map(|oxygen| if oxygen { 2 } else { 0 }),
        ),
        (
            News2Param::SystolicBp,
            reading.systolic_bp_mmhg.map(systolic_points),
        ),
        (News2Param::Pulse, reading.heart_rate_bpm.map(pulse_points)),
        (
            News2Param::Consciousness,
            reading.consciousness.map(|c| match c {
                Consciousness::Alert => 0,
                _ => 3,
            }),
        ),
        (
            News2Param::Temperature,
            reading.body_temp_c.map(temperature_points),
        ),
    ];
    let mut parameters = Vec::with_capacity(points.len());
    let mut missing = Vec::new();
    for (param, points) in points {
        match points {
            Some(points) => parameters.push(News2Component { param, points }),
            None => missing.push(param),
        }
    }
    let score: u8 = parameters.iter().map(|c| c.points).sum();
    let risk = match score {
        7.. => News2Risk::High,
        5.. => News2Risk::Medium,
        _ if parameters.iter().any(|c| c.points == 3) => News2Risk::LowMedium,
        _ => News2Risk::Low,
    };
    News2 {
        score,
        risk,
        complete: missing.is_empty(),
        missing,
        parameters,
    }
}

/// Rounded to a whole number, halves away from zero (out-of-range floats saturate).
fn whole(x: f64) -> i64 {
    x.round() as i64
}

fn respiration_points(rate: f64) -> u8 {
    match whole(rate) {
        ..=8 => 3,
        9..=11 => 1,
        12..=20 => 0,
        21..=24 => 2,
        _ => 3,
    }
}

fn spo2_points(spo2: f64) -> u8 {
    match whole(spo2) {
        ..=91 => 3,
        92..=93 => 2,
        94..=95 => 1,
        _ => 0,
    }
}

fn systolic_points(systolic: f64) -> u8 {
    match whole(systolic) {
        ..=90 => 3,
        91..=100 => 2,
        101..=110 => 1,
        111..=219 => 0,
        _ => 3,
    }
}

fn pulse_points(pulse: f64) -> u8 {
    match whole(pulse) {
        ..=40 => 3,
        41..=50 => 1,
        51..=90 => 0,
        91..=110 => 1,
        111..=130 => 2,
        _ => 3,
    }
}

/// Banded in tenths of a degree: ≤35.0 → 3, 35.1–36.0 → 1, 36.1–38.0 → 0, 38.1–39.0 → 1,
/// ≥39.1 → 2.
fn temperature_points(celsius: f64) -> u8 {
    match whole(celsius * 10.0) {
        ..=350 => 3,
        351..=360 => 1,
        361..=380 => 0,
        381..=390 => 1,
        _ => 2,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use chrono::DateTime;

    fn empty() -> Reading {
        Reading {
            device_id: "d".into(),
            patient_id: None,
            timestamp: DateTime::UNIX_EPOCH,
            heart_rate_bpm: None,
            spo2_pct: None,
            respiration_rate_bpm: None,
            body_temp_c: None,
            systolic_bp_mmhg: None,
            diastolic_bp_mmhg: None,
            fall_detected: false,
            moving: None,
            on_oxygen: None,
            consciousness: None,
            location: None,
            steps: None,
        }
    }

    /// All seven parameters present and scoring 0.
    fn complete() -> Reading {
        Reading {
            respiration_rate_bpm: Some(16.0),
            spo2_pct: Some(98.0),
            on_oxygen: Some(false),
            systolic_bp_mmhg: Some(120.0),
            heart_rate_bpm: Some(70.0),
            consciousness: Some(Consciousness::Alert),
            body_temp_c: Some(37.0),
            ..empty()
        }
    }

    fn points_for(reading: &Reading, param: News2Param) -> Option<u8> {
        let news2 = score(reading);
        news2
            .parameters
            .iter()
            .find(|c| c.param == param)
            .map(|c| c.points)
    }

    fn check_bands(param: News2Param, set: fn(&mut Reading, f64), table: &[(f64, u8)]) {
        for &(value, expected) in table {
            let mut reading = empty();
            set(&mut reading, value);
            assert_eq!(
                points_for(&reading, param),
                Some(expected),
                "{param:?} {value}"
            );
        }
    }

    #[test]
    fn respiration_rate_bands() {
        let table = [
            (0.0, 3),
            (8.0, 3),
            (9.0, 1),
            (11.0, 1),
            (12.0, 0),
            (20.0, 0),
            (20.4, 0),
            (20.5, 2),
            (21.0, 2),
            (24.0, 2),
            (25.0, 3),
            (60.0, 3),
        ];
        check_bands(
            News2Param::RespirationRate,
            |r, v| r.respiration_rate_bpm = Some(v),
            &table,
        );
    }

    #[test]
    fn spo2_scale_1_bands() {
        let table = [
            (50.0, 3),
            (91.0, 3),
            (92.0, 2),
            (93.0, 2),
            (94.0, 1),
            (95.0, 1),
            (96.0, 0),
            (100.0, 0),
        ];
        check_bands(News2Param::Spo2, |r, v| r.spo2_pct = Some(v), &table);
    }

    #[test]
    fn systolic_bands() {
        let table = [
            (60.0, 3),
            (90.0, 3),
            (91.0, 2),
            (100.0, 2),
            (101.0, 1),
            (110.0, 1),
            (111.0, 0),
            (219.0, 0),
            (220.0, 3),
        ];
        check_bands(
            News2Param::SystolicBp,
            |r, v| r.systolic_bp_mmhg = Some(v),
            &table,
        );
    }

    #[test]
    fn pulse_bands() {
        let table = [
            (30.0, 3),
            (40.0, 3),
            (41.0, 1),
            (50.0, 1),
            (51.0, 0),
            (90.0, 0),
            (91.0, 1),
            (110.0, 1),
            (111.0, 2),
            (130.0, 2),
            (131.0, 3),
        ];
        check_bands(News2Param::Pulse, |r, v| r.heart_rate_bpm = Some(v), &table);
    }

    #[test]
    fn temperature_bands_in_tenths() {
        let table = [
            (34.0, 3),
            (35.0, 3),
            (35.04, 3),
            (35.1, 1),
            (36.0, 1),
            (36.04, 1),
            (36.06, 0),
            (36.1, 0),
            (38.0, 0),
            (38.1, 1),
            (39.0, 1),
            (39.1, 2),
            (41.0, 2),
        ];
        check_bands(
            News2Param::Temperature,
            |r, v| r.body_temp_c = Some(v),
            &table,
        );
    }

    #[test]
    fn air_or_oxygen_and_consciousness() {
        for (oxygen, expected) in [(true, 2), (false, 0)] {
            let reading = Reading {
                on_oxygen: Some(oxygen),
                ..empty()
            };
            assert_eq!(
                points_for(&reading, News2Param::AirOrOxygen),
                Some(expected)
            );
        }
        for (level, expected) in [
            (Consciousness::Alert, 0),
            (Consciousness::Confusion, 3),
            (Consciousness::Voice, 3),
            (Consciousness::Pain, 3),
            (Consciousness::Unresponsive, 3),
        ] {
            let reading = Reading {
                consciousness: Some(level),
                ..empty()
            };
            assert_eq!(
                points_for(&reading, News2Param::Consciousness),
                Some(expected)
            );
        }
    }

    #[test]
    fn aggregate_risk_bands() {
        type Adjust = fn(&mut Reading);
        let cases: [(Adjust, u8, News2Risk); 6] = [
            (|_| {}, 0, News2Risk::Low),
            // 1 + 1 + 2 = 4, no single 3
            (
                |r| {
                    r.heart_rate_bpm = Some(95.0);
                    r.body_temp_c = Some(38.5);
                    r.on_oxygen = Some(true)
                },
                4,
                News2Risk::Low,
            ),
            // a single 3, aggregate 3
            (
                |r| r.consciousness = Some(Consciousness::Confusion),
                3,
                News2Risk::LowMedium,
            ),
            // a 3 plus 2 = 5: medium, not low-medium
            (
                |r| {
                    r.spo2_pct = Some(90.0);
                    r.on_oxygen = Some(true)
                },
                5,
                News2Risk::Medium,
            ),
            (
                |r| {
                    r.respiration_rate_bpm = Some(22.0);
                    r.systolic_bp_mmhg = Some(95.0);
                    r.on_oxygen = Some(true)
                },
                6,
                News2Risk::Medium,
            ),
            (
                |r| {
                    r.respiration_rate_bpm = Some(25.0);
                    r.spo2_pct = Some(91.0);
                    r.on_oxygen = Some(true);
                    r.heart_rate_bpm = Some(131.0);
                    r.body_temp_c = Some(35.0);
                    r.systolic_bp_mmhg = Some(85.0);
                    r.consciousness = Some(Consciousness::Unresponsive)
                },
                20,
                News2Risk::High,
            ),
        ];
        for (i, (adjust, expected_score, expected_risk)) in cases.into_iter().enumerate() {
            let mut reading = complete();
            adjust(&mut reading);
            let news2 = score(&reading);
            assert_eq!(
                (news2.score, news2.risk),
                (expected_score, expected_risk),
                "case {i}"
            );
            assert!(news2.complete && news2.missing.is_empty());
        }
        let mut seven = complete();
        seven.respiration_rate_bpm = Some(25.0);
        seven.spo2_pct = Some(94.0);
        seven.on_oxygen = Some(true);
        seven.heart_rate_bpm = Some(95.0);
        assert_eq!(score(&seven).risk, News2Risk::High);
    }

    #[test]
    fn partial_scores_list_what_is_missing() {
        let reading = Reading {
            heart_rate_bpm: Some(135.0),
            spo2_pct: Some(93.0),
            ..empty()
        };
        let news2 = score(&reading);
        assert_eq!(news2.score, 5);
        assert_eq!(news2.risk, News2Risk::Medium);
        assert!(!news2.complete);
        assert_eq!(
            news2.missing,
            [
                News2Param::RespirationRate,
                News2Param::AirOrOxygen,
                News2Param::SystolicBp,
                News2Param::Consciousness,
                News2Param::Temperature,
            ]
        );
        let nothing = score(&empty());
        assert_eq!(
            (nothing.score, nothing.risk, nothing.missing.len()),
            (0, News2Risk::Low, 7)
        );
    }

    #[test]
    fn serialises_for_the_api() {
        let reading = Reading {
            consciousness: Some(Consciousness::Pain),
            ..complete()
        };
        let json = serde_json::to_value(score(&Reading {
            on_oxygen: None,
            ..reading
        }))
        .unwrap();
        assert_eq!(json["score"], 3);
        assert_eq!(json["risk"], "low_medium");
        assert_eq!(json["missing"], serde_json::json!(["air_or_oxygen"]));
        assert_eq!(
            json["parameters"][0],
            serde_json::json!({"param": "respiration_rate", "points": 0})
        );
        assert_eq!(json["complete"], false);
    }
}
