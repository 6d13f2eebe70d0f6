//! Triage: the status of one reading (normal, abnormal, emergency) with human-readable reasons,
//! from operator-configurable threshold rules, NEWS2 and fall detection; and [`FallWatch`], the
//! fall grace-window state machine each per-device actor holds.
//!
//! Pure: no I/O, no clock reads and no timers (`now` is passed in; the actor schedules a tick
//! at [`FallWatch::deadline`]). A missing vital is missing: it never triggers a rule and is
//! never read as a default value.

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use super::news2::{self, News2, News2Risk};
use super::vitals::{Reading, Vital};

/// How urgent a reading is. Ordered, so `max()` is the worst.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriageStatus {
    /// Nothing to act on.
    Normal,
    /// Worth a look; no dispatch by itself.
    Abnormal,
    /// Open an incident now.
    Emergency,
}

impl TriageStatus {
    /// The wire name (`normal`, `abnormal`, `emergency`).
    pub fn as_str(self) -> &'static str {
        match self {
            TriageStatus::Normal => "normal",
            TriageStatus::Abnormal => "abnormal",
            TriageStatus::Emergency => "emergency",
        }
    }
}

/// Thresholds for one vital. All comparisons are strict (`value < below`, `value > above`); an
/// absent threshold never fires. In a rules file a table overrides only the keys it gives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Band {
    /// Emergency when the value is below this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub emergency_below: Option<f64>,
    /// Emergency when the value is above this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub emergency_above: Option<f64>,
    /// Abnormal when the value is below this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abnormal_below: Option<f64>,
    /// Abnormal when the value is above this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abnormal_above: Option<f64>,
}

impl Band {
    /// This band's keys where given, the `base` band's elsewhere.
    fn over(self, base: Band) -> Band {
        Band {
            emergency_below: self.emergency_below.or(base.emergency_below),
            emergency_above: self.emergency_above.or(base.emergency_above),
            abnormal_below: self.abnormal_below.or(base.abnormal_below),
            abnormal_above: self.abnormal_above.or(base.abnormal_above),
        }
    }

    /// The first rule that fires (emergency before abnormal) and its reason.
    fn classify(&self, vital: Vital, value: f64) -> Option<(TriageStatus, String)> {
        use TriageStatus::{Abnormal, Emergency};
        let rules = [
            (self.emergency_below, true, Emergency),
            (self.emergency_above, false, Emergency),
            (self.abnormal_below, true, Abnormal),
            (self.abnormal_above, false, Abnormal),
        ];
        rules.into_iter().find_map(|(threshold, below, status)| {
            let threshold = threshold?;
            let fires = if below {
                value < threshold
            } else {
                value > threshold
            };
            fires.then(|| {
                let side = if below { "below" } else { "above" };
                let (name, unit) = (vital.label(), vital.unit());
                let status_name = status.as_str();
                let reason =
                    format!("{name} {value}{unit} {side} {threshold}{unit} ({status_name})");
                (status, reason)
            })
        })
    }

    /// Checks the thresholds are finite and ordered
    /// `emergency_below ≤ abnormal_below ≤ abnormal_above ≤ emergency_above` (where given).
    fn validate(&self, name: &str) -> Result<(), RulesError> {
        let ordered = [
            ("emergency_below", self.emergency_below),
            ("abnormal_below", self.abnormal_below),
            ("abnormal_above", self.abnormal_above),
            ("emergency_above", self.emergency_above),
        ];
        let mut previous: Option<(&str, f64)> = None;
        for (key, value) in ordered {
            let Some(value) = value else { continue };
            if !value.is_finite() {
                return Err(RulesError::Inconsistent {
                    key: format!("{name}.{key}"),
                    message: "must be a finite number".into(),
                });
            }
            if let Some((before, limit)) = previous
                && value < limit
            {
                return Err(RulesError::Inconsistent {
                    key: format!("{name}.{key}"),
                    message: format!("{value} must not be below {name}.{before} ({limit})"),
                });
            }
            previous = Some((key, value));
        }
        Ok(())
    }
}

/// The triage rule set. `Default` is the `docs/domain.md` rule set; a TOML rules file (see
/// [`TriageRules::from_toml_str`]) overrides only the keys it gives, unknown keys are rejected:
///
/// ```toml
/// fall_grace_s = 90
/// [heart_rate]
/// abnormal_above = 110
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "RulesFile")]
pub struct TriageRules {
    /// SpO2, %.
    pub spo2: Band,
    /// Heart rate, /min.
    pub heart_rate: Band,
    /// Body temperature, °C.
    pub temperature: Band,
    /// Respiration rate, /min.
    pub respiration_rate: Band,
    /// Seconds a detected fall waits for movement or a wearer cancel before it escalates.
    pub fall_grace_s: u64,
}

impl Default for TriageRules {
    fn default() -> Self {
        let band = |eb, ea, ab, aa| Band {
            emergency_below: eb,
            emergency_above: ea,
            abnormal_below: ab,
            abnormal_above: aa,
        };
        Self {
            spo2: band(Some(91.0), None, Some(95.0), None),
            heart_rate: band(Some(40.0), Some(150.0), Some(50.0), Some(100.0)),
            temperature: band(Some(35.0), Some(39.0), Some(36.0), Some(37.5)),
            respiration_rate: band(Some(8.0), Some(30.0), Some(10.0), Some(24.0)),
            fall_grace_s: 60,
        }
    }
}

/// A rules file as written: every key optional, unknown keys rejected.
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RulesFile {
    spo2: Band,
    heart_rate: Band,
    temperature: Band,
    respiration_rate: Band,
    fall_grace_s: Option<u64>,
}

impl From<RulesFile> for TriageRules {
    fn from(file: RulesFile) -> Self {
        let d = TriageRules::default();
        Self {
            spo2: file.spo2.over(d.spo2),
            heart_rate: file.heart_rate.over(d.heart_rate),
            temperature: file.temperature.over(d.temperature),
            respiration_rate: file.respiration_rate.over(d.respiration_rate),
            fall_grace_s: file.fall_grace_s.unwrap_or(d.fall_grace_s),
        }
    }
}

/// Longest accepted fall grace window, in seconds.
const MAX_FALL_GRACE_S: u64 = 3600;

impl TriageRules {
    /// Parses a rules file over the defaults and [validates](Self::validate) it.
    pub fn from_toml_str(s: &str) -> Result<Self, RulesError> {
        let rules: Self = toml::from_str(s)?;
        rules.validate()?;
        Ok(rules)
    }

    /// Checks each band is finite and ordered (`emergency_below ≤ abnormal_below ≤
    /// abnormal_above ≤ emergency_above`) and `fall_grace_s` is 1–3600. Call it on rules that
    /// were deserialised some other way (e.g. inside the config).
    pub fn validate(&self) -> Result<(), RulesError> {
        for (name, _, band) in self.bands() {
            band.validate(name)?;
        }
        if !(1..=MAX_FALL_GRACE_S).contains(&self.fall_grace_s) {
            return Err(RulesError::Inconsistent {
                key: "fall_grace_s".into(),
                message: format!("must be 1–{MAX_FALL_GRACE_S} seconds"),
            });
        }
        Ok(())
    }

    /// The bands in the order their reasons are listed: SpO2, heart rate, temperature, RR.
    fn bands(&self) -> [(&'static str, Vital, &Band); 4] {
        [
            ("spo2", Vital::Spo2, &self.spo2),
            ("heart_rate", Vital::HeartRate, &self.heart_rate),
            ("temperature", Vital::Temperature, &self.temperature),
            (
                "respiration_rate",
                Vital::RespirationRate,
                &self.respiration_rate,
            ),
        ]
    }
}

/// A rules file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// Not TOML, an unknown key, or a value of the wrong type.
    #[error("triage rules: {0}")]
    Toml(#[from] toml::de::Error),
    /// Thresholds that contradict each other, or a value out of range.
    #[error("triage rules: {key}: {message}")]
    Inconsistent {
        /// The offending key, dotted (`heart_rate.emergency_below`).
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// What this reading's fall flag means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FallSignal {
    /// No fall reported.
    None,
    /// A fall with normal vitals: abnormal now; a [`FallWatch`] waits for movement.
    AwaitingMovement,
    /// A fall with abnormal or emergency vitals (thresholds or NEWS2): emergency at once.
    WithAbnormalVitals,
}

/// The triage of one reading.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Assessment {
    /// Worst of the threshold rules, NEWS2 and the fall signal.
    pub status: TriageStatus,
    /// Why, for people: one per fired rule, then NEWS2, then the fall.
    pub reasons: Vec<String>,
    /// The (possibly partial) NEWS2.
    pub news2: News2,
    /// What the fall flag means for this reading.
    pub fall: FallSignal,
}

/// Triage of one reading.
///
/// Status is the worst of: the threshold rules (per vital, the first rule that fires gives the
/// reason); NEWS2 (high → emergency, medium or low–medium → abnormal); and the fall signal
/// (fall with abnormal vitals → emergency, fall alone → abnormal). Readings are judged alone:
/// the grace window across readings is [`FallWatch`].
pub fn assess(rules: &TriageRules, reading: &Reading) -> Assessment {
    let mut reasons = Vec::new();
    let mut vitals = TriageStatus::Normal;
    for (_, vital, band) in rules.bands() {
        if let Some((status, reason)) = reading.vital(vital).and_then(|v| band.classify(vital, v)) {
            vitals = vitals.max(status);
            reasons.push(reason);
        }
    }
    let news2 = news2::score(reading);
    let news2_status = match news2.risk {
        News2Risk::High => TriageStatus::Emergency,
        News2Risk::Medium | News2Risk::LowMedium => TriageStatus::Abnormal,
        News2Risk::Low => TriageStatus::Normal,
    };
    if news2_status > TriageStatus::Normal {
        reasons.push(format!("NEWS2 {} ({})", news2.score, news2.risk.as_str()));
        vitals = vitals.max(news2_status);
    }
    let (fall, status) = match (reading.fall_detected, vitals) {
        (false, _) => (FallSignal::None, vitals),
        (true, TriageStatus::Normal) => {
            reasons.push("fall detected, awaiting movement".to_owned());
            (FallSignal::AwaitingMovement, TriageStatus::Abnormal)
        }
        (true, _) => {
            reasons.push("fall detected with abnormal vitals".to_owned());
            (FallSignal::WithAbnormalVitals, TriageStatus::Emergency)
        }
    };
    Assessment {
        status,
        reasons,
        news2,
        fall,
    }
}

/// Whether a device's reading timed `at` is newer than its newest applied reading `last` and
/// so may change the device's state. Timestamps count to the whole second (see [`FallWatch`]):
/// a reading in the same second as the newest arrived after it, so it is taken as newer;
/// one from an earlier second arrived out of order and must not roll the state back.
pub fn in_arrival_order(last: Option<DateTime<Utc>>, at: DateTime<Utc>) -> bool {
    last.is_none_or(|last| at.timestamp() >= last.timestamp())
}

/// What a [`FallWatch`] transition means for the actor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FallEvent {
    /// Nothing changed.
    None,
    /// A watch started; schedule a tick at [`FallWatch::deadline`].
    Started,
    /// The wearer moved or cancelled in time (or had already moved after the fall).
    StoodDown,
    /// The grace window ran out: set the status to emergency with
    /// [`FallWatch::escalation_reason`].
    Escalated,
}

/// The fall grace window for one device, as a pure state machine.
///
/// A reading with `fall_detected` whose assessment is [`FallSignal::AwaitingMovement`] starts a
/// watch (fall time = its timestamp, deadline = `now` + grace). Before the deadline, a later
/// reading with `moving: true` timed after the fall, or a wearer cancel, stands it down; at or
/// after the deadline the next call escalates. Safety-first details: a reading that itself
/// reports a fall never stands a watch down (movement must come after the fall), a new fall
/// does not extend a running watch, and an out-of-order reading timed before the fall cannot
/// stand it down. A fall reading that arrives after movement already seen at a later time is
/// answered at once (`StoodDown`, no watch).
///
/// Timestamps are compared to the whole second: wearables and gateways report seconds, and
/// sub-second parts from different clocks mean nothing. When a movement and the fall fall in
/// the same second, the order they arrived in decides: movement that arrives after the fall
/// stands it down (the wearer moved right after falling), a fall that arrives after movement
/// starts a watch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FallWatch {
    grace_s: u64,
    active: Option<ActiveFall>,
    /// Newest timestamp of a reading with `moving: true`.
    last_moving_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
struct ActiveFall {
    fall_at: DateTime<Utc>,
    deadline: DateTime<Utc>,
}

impl FallWatch {
    /// An idle watch with a grace window of `fall_grace_s` seconds
    /// ([`TriageRules::fall_grace_s`]).
    pub fn new(fall_grace_s: u64) -> Self {
        Self {
            grace_s: fall_grace_s,
            active: None,
            last_moving_at: None,
        }
    }

    /// The running watch: when the wearer fell and when it escalates; `None` when idle.
    pub fn active(&self) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        self.active.map(|a| (a.fall_at, a.deadline))
    }

    /// Resumes a watch that was running when the device's state was last stored (the device
    /// actor restarted, or its shard moved to another node).
    pub fn resume(&mut self, fall_at: DateTime<Utc>, deadline: DateTime<Utc>) {
        self.active = Some(ActiveFall { fall_at, deadline });
    }

    /// Feeds one accepted reading and its assessment, received at `now`.
    pub fn on_reading(
        &mut self,
        reading: &Reading,
        assessment: &Assessment,
        now: DateTime<Utc>,
    ) -> FallEvent {
        if self.expire(now) {
            return FallEvent::Escalated;
        }
        if reading.fall_detected {
            if assessment.fall != FallSignal::AwaitingMovement || self.active.is_some() {
                return FallEvent::None;
            }
            if self
                .last_moving_at
                .is_some_and(|m| m.timestamp() > reading.timestamp.timestamp())
            {
                return FallEvent::StoodDown;
            }
            let grace = i64::try_from(self.grace_s)
                .ok()
                .and_then(TimeDelta::try_seconds)
                .unwrap_or(TimeDelta::MAX);
            self.active = Some(ActiveFall {
                fall_at: reading.timestamp,
                deadline: now
                    .checked_add_signed(grace)
                    .unwrap_or(DateTime::<Utc>::MAX_UTC),
            });
            return FallEvent::Started;
        }
        if reading.moving == Some(true) {
            self.last_moving_at = self.last_moving_at.max(Some(reading.timestamp));
            // Same second as the fall: this reading arrived after it, so it is later.
            if self
                .active
                .is_some_and(|a| reading.timestamp.timestamp() >= a.fall_at.timestamp())
            {
                self.active = None;
                return FallEvent::StoodDown;
            }
        }
        FallEvent::None
    }

    /// The wearer pressed "I'm OK" at `now`: stands a running watch down unless its deadline
    /// has passed (then it escalates).
    pub fn on_cancel(&mut self, now: DateTime<Utc>) -> FallEvent {
        if self.expire(now) {
            FallEvent::Escalated
        } else if self.active.take().is_some() {
            FallEvent::StoodDown
        } else {
            FallEvent::None
        }
    }

    /// The actor's timer fired at `now`: escalates a watch whose deadline has passed.
    pub fn on_tick(&mut self, now: DateTime<Utc>) -> FallEvent {
        if self.expire(now) {
            FallEvent::Escalated
        } else {
            FallEvent::None
        }
    }

    /// When the running watch escalates, if one is running.
    pub fn deadline(&self) -> Option<DateTime<Utc>> {
        self.active.map(|a| a.deadline)
    }

    /// The reason to record on escalation ("fall without movement for 60 s").
    pub fn escalation_reason(&self) -> String {
        format!("fall without movement for {} s", self.grace_s)
    }

    /// Ends a watch whose deadline is at or before `now`; true if it did.
    fn expire(&mut self, now: DateTime<Utc>) -> bool {
        let expired = self.active.is_some_and(|a| now >= a.deadline);
        if expired {
            self.active = None;
        }
        expired
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::domain::vitals::Consciousness;

    fn t0() -> DateTime<Utc> {
        "2026-11-23T08:00:00Z".parse().unwrap()
    }

    fn secs(s: i64) -> TimeDelta {
        TimeDelta::seconds(s)
    }

    fn empty() -> Reading {
        Reading {
            device_id: "d".into(),
            patient_id: None,
            timestamp: t0(),
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

    fn status_for(vital: Vital, value: f64) -> TriageStatus {
        let mut reading = empty();
        match vital {
            Vital::HeartRate => reading.heart_rate_bpm = Some(value),
            Vital::Spo2 => reading.spo2_pct = Some(value),
            Vital::RespirationRate => reading.respiration_rate_bpm = Some(value),
            Vital::Temperature => reading.body_temp_c = Some(value),
            Vital::SystolicBp | Vital::DiastolicBp => unreachable!(),
        }
        assess(&TriageRules::default(), &reading).status
    }

    #[test]
    fn default_threshold_boundaries() {
        use TriageStatus::{Abnormal as A, Emergency as E, Normal as N};
        let cases = [
            (
                Vital::HeartRate,
                [
                    (151.0, E),
                    (150.0, A),
                    (101.0, A),
                    (100.0, N),
                    (50.0, N),
                    (49.0, A),
                    (40.0, A),
                    (39.0, E),
                ],
            ),
            (
                Vital::Spo2,
                [
                    (100.0, N),
                    (95.0, N),
                    (94.9, A),
                    (94.0, A),
                    (91.0, A),
                    (90.9, E),
                    (90.0, E),
                    (50.0, E),
                ],
            ),
            (
                Vital::Temperature,
                [
                    (39.1, E),
                    (39.0, A),
                    (37.6, A),
                    (37.5, N),
                    (36.0, N),
                    (35.9, A),
                    (35.0, A),
                    (34.9, E),
                ],
            ),
            (
                Vital::RespirationRate,
                [
                    (31.0, E),
                    (30.0, A),
                    (25.0, A),
                    (24.0, N),
                    (10.0, N),
                    (9.0, A),
                    (8.0, A),
                    (7.0, E),
                ],
            ),
        ];
        for (vital, table) in cases {
            for (value, expected) in table {
                assert_eq!(status_for(vital, value), expected, "{vital:?} {value}");
            }
        }
    }

    #[test]
    fn threshold_reasons_name_value_threshold_and_level() {
        let rules = TriageRules::default();
        let reading = Reading {
            spo2_pct: Some(89.0),
            heart_rate_bpm: Some(151.0),
            body_temp_c: Some(37.6),
            respiration_rate_bpm: Some(9.0),
            ..empty()
        };
        let assessment = assess(&rules, &reading);
        assert_eq!(assessment.status, TriageStatus::Emergency);
        assert_eq!(
            assessment.reasons,
            [
                "SpO2 89% below 91% (emergency)",
                "heart rate 151/min above 150/min (emergency)",
                "temperature 37.6 °C above 37.5 °C (abnormal)",
                "respiration rate 9/min below 10/min (abnormal)",
                "NEWS2 7 (high)",
            ]
        );
        assert_eq!(assessment.fall, FallSignal::None);
    }

    #[test]
    fn missing_vitals_never_trigger() {
        let reading = Reading {
            consciousness: Some(Consciousness::Alert),
            ..empty()
        };
        let assessment = assess(&TriageRules::default(), &reading);
        assert_eq!(assessment.status, TriageStatus::Normal);
        assert!(assessment.reasons.is_empty());
        assert_eq!(assessment.news2.missing.len(), 6);
    }

    #[test]
    fn news2_raises_the_status_when_no_threshold_fires() {
        // RR 22 → 2, SpO2 96 → 0, oxygen → 2, systolic 100 → 2, pulse 95 → 1, alert, 37 °C.
        let high = Reading {
            respiration_rate_bpm: Some(22.0),
            spo2_pct: Some(96.0),
            on_oxygen: Some(true),
            systolic_bp_mmhg: Some(100.0),
            heart_rate_bpm: Some(95.0),
            consciousness: Some(Consciousness::Alert),
            body_temp_c: Some(37.0),
            ..empty()
        };
        let rules = TriageRules::default();
        let assessment = assess(&rules, &high);
        assert_eq!(
            (assessment.status, assessment.reasons),
            (TriageStatus::Emergency, vec!["NEWS2 7 (high)".to_owned()])
        );

        let medium = Reading {
            heart_rate_bpm: Some(80.0),
            ..high
        };
        let assessment = assess(&rules, &medium);
        assert_eq!(
            (assessment.status, assessment.reasons),
            (TriageStatus::Abnormal, vec!["NEWS2 6 (medium)".to_owned()])
        );

        let voice = Reading {
            consciousness: Some(Consciousness::Voice),
            ..empty()
        };
        let assessment = assess(&rules, &voice);
        assert_eq!(
            (assessment.status, assessment.reasons),
            (
                TriageStatus::Abnormal,
                vec!["NEWS2 3 (low_medium)".to_owned()]
            )
        );
    }

    #[test]
    fn fall_alone_is_abnormal_and_with_abnormal_vitals_an_emergency() {
        let rules = TriageRules::default();
        let fall = Reading {
            fall_detected: true,
            heart_rate_bpm: Some(72.0),
            ..empty()
        };
        let alone = assess(&rules, &fall);
        assert_eq!(alone.status, TriageStatus::Abnormal);
        assert_eq!(alone.fall, FallSignal::AwaitingMovement);
        assert_eq!(alone.reasons, ["fall detected, awaiting movement"]);

        let only_fall = assess(
            &rules,
            &Reading {
                fall_detected: true,
                ..empty()
            },
        );
        assert_eq!(only_fall.fall, FallSignal::AwaitingMovement);

        for abnormal in [
            Reading {
                heart_rate_bpm: Some(120.0),
                ..fall.clone()
            },
            Reading {
                consciousness: Some(Consciousness::Pain),
                ..fall.clone()
            },
        ] {
            let assessment = assess(&rules, &abnormal);
            assert_eq!(assessment.status, TriageStatus::Emergency);
            assert_eq!(assessment.fall, FallSignal::WithAbnormalVitals);
            assert_eq!(
                assessment.reasons.last().unwrap(),
                "fall detected with abnormal vitals"
            );
        }
    }

    #[test]
    fn status_orders_worst_last_and_serialises_snake_case() {
        let worst = [
            TriageStatus::Abnormal,
            TriageStatus::Emergency,
            TriageStatus::Normal,
        ]
        .into_iter()
        .max();
        assert_eq!(worst, Some(TriageStatus::Emergency));
        assert_eq!(
            serde_json::to_value(TriageStatus::Abnormal).unwrap(),
            "abnormal"
        );
        let assessment = assess(
            &TriageRules::default(),
            &Reading {
                fall_detected: true,
                ..empty()
            },
        );
        let json = serde_json::to_value(&assessment).unwrap();
        assert_eq!(json["status"], "abnormal");
        assert_eq!(json["fall"], "awaiting_movement");
        assert_eq!(json["news2"]["risk"], "low");
    }

    #[test]
    fn rules_default_and_round_trip() {
        assert_eq!(
            TriageRules::from_toml_str("").unwrap(),
            TriageRules::default()
        );
        let text = toml::to_string(&TriageRules::default()).unwrap();
        assert_eq!(
            TriageRules::from_toml_str(&text).unwrap(),
            TriageRules::default()
        );
        assert!(TriageRules::default().validate().is_ok());
    }

    #[test]
    fn partial_rules_override_only_their_keys() {
        let rules =
            TriageRules::from_toml_str("fall_grace_s = 90\n[heart_rate]\nabnormal_above = 110\n")
                .unwrap();
        let defaults = TriageRules::default();
        assert_eq!(rules.fall_grace_s, 90);
        assert_eq!(rules.heart_rate.abnormal_above, Some(110.0));
        assert_eq!(
            rules.heart_rate.emergency_above,
            defaults.heart_rate.emergency_above
        );
        assert_eq!(
            rules.heart_rate.abnormal_below,
            defaults.heart_rate.abnormal_below
        );
        assert_eq!(rules.spo2, defaults.spo2);
        let reading = Reading {
            heart_rate_bpm: Some(105.0),
            ..empty()
        };
        assert_eq!(assess(&rules, &reading).status, TriageStatus::Normal);
        assert_eq!(assess(&defaults, &reading).status, TriageStatus::Abnormal);
    }

    #[test]
    fn unknown_rule_keys_are_rejected() {
        for text in [
            "heartrate = 1",
            "[spo2]\nemergency_beneath = 90",
            "[blood_sugar]\nabnormal_above = 9",
        ] {
            let err = TriageRules::from_toml_str(text).unwrap_err();
            assert!(matches!(err, RulesError::Toml(_)), "{text}: {err}");
            assert!(err.to_string().contains("unknown field"), "{err}");
        }
        assert!(matches!(
            TriageRules::from_toml_str("fall_grace_s = \"60\"").unwrap_err(),
            RulesError::Toml(_)
        ));
    }

    #[test]
    fn inconsistent_rules_are_rejected_naming_the_key() {
        let cases = [
            (
                "[heart_rate]\nemergency_below = 55",
                "heart_rate.abnormal_below",
                "50 must not be below heart_rate.emergency_below (55)",
            ),
            (
                "[heart_rate]\nemergency_above = 90",
                "heart_rate.emergency_above",
                "90 must not be below heart_rate.abnormal_above (100)",
            ),
            (
                "[temperature]\nabnormal_below = 38.0",
                "temperature.abnormal_above",
                "37.5 must not be below temperature.abnormal_below (38)",
            ),
            (
                "[spo2]\nemergency_above = 94",
                "spo2.emergency_above",
                "94 must not be below spo2.abnormal_below (95)",
            ),
            (
                "[respiration_rate]\nabnormal_above = nan",
                "respiration_rate.abnormal_above",
                "must be a finite number",
            ),
            ("fall_grace_s = 0", "fall_grace_s", "must be 1–3600 seconds"),
        ];
        for (text, key, message) in cases {
            match TriageRules::from_toml_str(text).unwrap_err() {
                RulesError::Inconsistent { key: k, message: m } => {
                    assert_eq!((k.as_str(), m.as_str()), (key, message), "{text}")
                }
                other => panic!("{text}: {other}"),
            }
        }
        let err = TriageRules::from_toml_str("fall_grace_s = 0").unwrap_err();
        assert_eq!(
            err.to_string(),
            "triage rules: fall_grace_s: must be 1–3600 seconds"
        );
    }

    #[test]
    fn readings_in_the_same_second_are_in_arrival_order() {
        assert!(in_arrival_order(None, t0()));
        assert!(in_arrival_order(Some(t0()), t0()));
        assert!(in_arrival_order(Some(t0()), t0() + secs(1)));
        // Same second, earlier sub-second part: it arrived later, so it is newer.
        let late_in_second = t0() + TimeDelta::milliseconds(900);
        assert!(in_arrival_order(
            Some(late_in_second),
            t0() + TimeDelta::milliseconds(100)
        ));
        assert!(!in_arrival_order(
            Some(t0()),
            t0() - TimeDelta::milliseconds(1)
        ));
    }

    mod fall_watch {
        use super::*;

        fn fall(at: DateTime<Utc>) -> Reading {
            Reading {
                fall_detected: true,
                timestamp: at,
                ..empty()
            }
        }

        fn moving(at: DateTime<Utc>, moving: bool) -> Reading {
            Reading {
                moving: Some(moving),
                heart_rate_bpm: Some(72.0),
                timestamp: at,
                ..empty()
            }
        }

        /// Assesses and feeds one reading received at `now`.
        fn feed(watch: &mut FallWatch, reading: &Reading, now: DateTime<Utc>) -> FallEvent {
            let assessment = assess(&TriageRules::default(), reading);
            watch.on_reading(reading, &assessment, now)
        }

        fn started() -> FallWatch {
            let mut watch = FallWatch::new(60);
            assert_eq!(feed(&mut watch, &fall(t0()), t0()), FallEvent::Started);
            assert_eq!(watch.deadline(), Some(t0() + secs(60)));
            watch
        }

        #[test]
        fn movement_inside_the_window_stands_down() {
            let mut watch = started();
            assert_eq!(
                feed(&mut watch, &moving(t0() + secs(10), false), t0() + secs(10)),
                FallEvent::None
            );
            assert_eq!(
                feed(&mut watch, &moving(t0() + secs(20), true), t0() + secs(21)),
                FallEvent::StoodDown
            );
            assert_eq!(watch.deadline(), None);
            assert_eq!(watch.on_tick(t0() + secs(60)), FallEvent::None);
        }

        #[test]
        fn no_movement_escalates_at_the_deadline() {
            let mut watch = started();
            assert_eq!(watch.on_tick(t0() + secs(59)), FallEvent::None);
            assert_eq!(watch.on_tick(t0() + secs(60)), FallEvent::Escalated);
            assert_eq!(watch.deadline(), None);
            assert_eq!(watch.on_tick(t0() + secs(61)), FallEvent::None);
            assert_eq!(watch.escalation_reason(), "fall without movement for 60 s");
        }

        #[test]
        fn movement_arriving_after_the_deadline_is_too_late() {
            let mut watch = started();
            let late = moving(t0() + secs(30), true);
            assert_eq!(
                feed(&mut watch, &late, t0() + secs(61)),
                FallEvent::Escalated
            );
        }

        #[test]
        fn wearer_cancel() {
            let mut watch = started();
            assert_eq!(watch.on_cancel(t0() + secs(59)), FallEvent::StoodDown);
            assert_eq!(watch.on_cancel(t0() + secs(59)), FallEvent::None);

            let mut late = started();
            assert_eq!(late.on_cancel(t0() + secs(60)), FallEvent::Escalated);
        }

        #[test]
        fn out_of_order_movement_before_the_fall_does_not_stand_down() {
            let mut watch = started();
            let stale = moving(t0() - secs(5), true);
            assert_eq!(feed(&mut watch, &stale, t0() + secs(5)), FallEvent::None);
            let a_second_before = moving(t0() - TimeDelta::milliseconds(1), true);
            assert_eq!(
                feed(&mut watch, &a_second_before, t0() + secs(6)),
                FallEvent::None
            );
            assert_eq!(watch.on_tick(t0() + secs(60)), FallEvent::Escalated);
        }

        #[test]
        fn movement_in_the_same_second_as_the_fall_stands_it_down_by_arrival_order() {
            // Same timestamp, arriving after the fall: the wearer moved right after falling.
            let mut watch = started();
            let same_instant = moving(t0(), true);
            assert_eq!(
                feed(&mut watch, &same_instant, t0() + secs(1)),
                FallEvent::StoodDown
            );
            assert_eq!(watch.on_tick(t0() + secs(60)), FallEvent::None);

            // Same second, an earlier sub-second part from another clock: still after the fall.
            let mut fall_late_in_its_second = FallWatch::new(60);
            let fell = fall(t0() + TimeDelta::milliseconds(900));
            assert_eq!(
                feed(&mut fall_late_in_its_second, &fell, t0() + secs(1)),
                FallEvent::Started
            );
            let moved = moving(t0() + TimeDelta::milliseconds(100), true);
            assert_eq!(
                feed(&mut fall_late_in_its_second, &moved, t0() + secs(1)),
                FallEvent::StoodDown
            );

            // The other way round: movement first, then a fall in the same second is a new
            // fall after that movement, so it is watched.
            let mut moved_first = FallWatch::new(60);
            let moved = moving(t0() + TimeDelta::milliseconds(900), true);
            assert_eq!(feed(&mut moved_first, &moved, t0()), FallEvent::None);
            assert_eq!(
                feed(&mut moved_first, &fall(t0()), t0() + secs(1)),
                FallEvent::Started
            );
        }

        #[test]
        fn a_fall_reported_after_later_movement_is_already_answered() {
            let mut watch = FallWatch::new(60);
            assert_eq!(
                feed(&mut watch, &moving(t0() + secs(10), true), t0() + secs(10)),
                FallEvent::None
            );
            assert_eq!(
                feed(&mut watch, &fall(t0()), t0() + secs(11)),
                FallEvent::StoodDown
            );
            assert_eq!(watch.deadline(), None);
        }

        #[test]
        fn a_fall_reading_never_stands_itself_down_or_extends_the_window() {
            let mut watch = FallWatch::new(60);
            let fall_moving = Reading {
                moving: Some(true),
                ..fall(t0())
            };
            assert_eq!(feed(&mut watch, &fall_moving, t0()), FallEvent::Started);
            let again = Reading {
                moving: Some(true),
                ..fall(t0() + secs(30))
            };
            assert_eq!(feed(&mut watch, &again, t0() + secs(30)), FallEvent::None);
            assert_eq!(watch.deadline(), Some(t0() + secs(60)));
        }

        #[test]
        fn a_fall_with_abnormal_vitals_needs_no_watch() {
            let mut watch = FallWatch::new(60);
            let urgent = Reading {
                heart_rate_bpm: Some(160.0),
                ..fall(t0())
            };
            assert_eq!(feed(&mut watch, &urgent, t0()), FallEvent::None);
            assert_eq!(watch.deadline(), None);
        }

        #[test]
        fn grace_comes_from_the_rules() {
            let rules = TriageRules::from_toml_str("fall_grace_s = 90").unwrap();
            let mut watch = FallWatch::new(rules.fall_grace_s);
            assert_eq!(
                feed(&mut watch, &fall(t0()), t0() + secs(2)),
                FallEvent::Started
            );
            assert_eq!(watch.deadline(), Some(t0() + secs(92)));
            assert_eq!(watch.escalation_reason(), "fall without movement for 90 s");
        }
    }
}
