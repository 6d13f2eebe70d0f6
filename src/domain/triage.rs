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
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum TriageStatus {
    /// Nothing to act on.
    #[default]
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

/// The triage rule set. `Default` is the `domain.md` rule set; a TOML rules file (see
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
/// reading with `moving: true` and a timestamp strictly after the fall, or a wearer cancel,
/// stands it down; at or after the deadline the next call escalates. Safety-first details: a
/// reading that itself reports a fall never stands a watch down (movement must come after
/// the fall), a new fall does not extend a running watch, and an out-of-order reading timed
/// before the fall cannot stand it down. A fall reading that arrives after movement already
/// seen at a later time is answered at once (`StoodDown`, no watch).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FallWatch {
    grace_s: u64,
    active: Option<ActiveFall>,
    /// Newest timestamp of a reading with `moving: true`.
    last_moving_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
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
            if self.last_moving_at.is_some_and(|m| m > reading.timestamp) {
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
            if self.active.is_some_and(|a| reading.timestamp > a.fall_at) {
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
