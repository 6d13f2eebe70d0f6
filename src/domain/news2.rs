//! NEWS2, the National Early Warning Score 2 (Royal College of Physicians, 2017), computed
//! from one [`Reading`] exactly per the table in `domain.md` (SpO2 scale 1).
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

use serde::Serialize;

use super::vitals::{Consciousness, Reading};

/// One of the seven NEWS2 parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct News2Component {
    /// Which parameter.
    pub param: News2Param,
    /// Its points, 0–3.
    pub points: u8,
}

/// A NEWS2 result; serialised as `{score, risk, missing, parameters, complete}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
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
