//! Vital-sign readings: the normalised [`Reading`], and the ingest parser that turns a request
//! body into readings or per-field errors ([`parse_body`]).
//!
//! Four shapes are accepted and normalised to the same [`Reading`]: the native reading, the
//! legacy wearable shape (`device`, `metrics`), a FHIR R4 `Observation`, and a FHIR `Bundle` of
//! Observations; a body is one of those or a batch `{"readings": [..]}` of them. Values are
//! checked against the physiological ranges in `domain.md`.
//!
//! Pure: no I/O and no clock reads (`now` is passed in). It must not clamp or guess a value,
//! must not panic on any input, and must not let one bad reading fail the rest of its batch.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, TimeDelta, Utc};
use serde::de::{Deserializer, IgnoredAny, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use serde_path_to_error::Segment;

pub use super::validation::FieldError;
use super::validation::push_pointer_token;

/// A position fix in WGS 84 degrees.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GeoPoint {
    /// Latitude, −90..=90.
    pub lat: f64,
    /// Longitude, −180..=180.
    pub lng: f64,
    /// Horizontal accuracy radius in metres (≥ 0), when the device reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_m: Option<f64>,
}

/// Level of consciousness on the ACVPU scale (NEWS2 scores anything but `alert` as 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consciousness {
    /// Alert.
    Alert,
    /// New confusion.
    Confusion,
    /// Responds to voice.
    Voice,
    /// Responds to pain.
    Pain,
    /// Unresponsive.
    Unresponsive,
}

/// A measured vital sign, with its name, unit and valid range for messages and rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Vital {
    /// Heart rate, beats per minute.
    HeartRate,
    /// Peripheral oxygen saturation, percent.
    Spo2,
    /// Respiration rate, breaths per minute.
    RespirationRate,
    /// Body temperature, degrees Celsius.
    Temperature,
    /// Systolic blood pressure, mmHg.
    SystolicBp,
    /// Diastolic blood pressure, mmHg.
    DiastolicBp,
}

impl Vital {
    /// Every vital, in [`Measures`] slot order (`vital as usize`).
    const ALL: [Vital; 6] = [
        Vital::HeartRate,
        Vital::Spo2,
        Vital::RespirationRate,
        Vital::Temperature,
        Vital::SystolicBp,
        Vital::DiastolicBp,
    ];

    /// Name for people, as used in error messages and triage reasons ("heart rate").
    pub fn label(self) -> &'static str {
        match self {
            Vital::HeartRate => "heart rate",
            Vital::Spo2 => "SpO2",
            Vital::RespirationRate => "respiration rate",
            Vital::Temperature => "temperature",
            Vital::SystolicBp => "systolic BP",
            Vital::DiastolicBp => "diastolic BP",
        }
    }

    /// Unit suffix printed right after a value ("/min", "%", " °C", " mmHg").
    pub fn unit(self) -> &'static str {
        match self {
            Vital::HeartRate | Vital::RespirationRate => "/min",
            Vital::Spo2 => "%",
            Vital::Temperature => " °C",
            Vital::SystolicBp | Vital::DiastolicBp => " mmHg",
        }
    }

    /// The physiologically plausible range, inclusive (`domain.md`); values outside it are
    /// rejected, never clamped.
    pub fn valid_range(self) -> (f64, f64) {
        match self {
            Vital::HeartRate => (20.0, 300.0),
            Vital::Spo2 => (50.0, 100.0),
            Vital::RespirationRate => (0.0, 80.0),
            Vital::Temperature => (25.0, 45.0),
            Vital::SystolicBp => (40.0, 300.0),
            Vital::DiastolicBp => (20.0, 200.0),
        }
    }

    /// The vital a LOINC code stands for, if it is one we triage.
    fn from_loinc(code: &str) -> Option<Self> {
        Some(match code {
            "8867-4" => Vital::HeartRate,
            "9279-1" => Vital::RespirationRate,
            "2708-6" | "59408-5" => Vital::Spo2,
            "8310-5" => Vital::Temperature,
            "8480-6" => Vital::SystolicBp,
            "8462-4" => Vital::DiastolicBp,
            _ => return None,
        })
    }

    /// The UCUM unit codes accepted for this vital in FHIR (`[degF]` is converted).
    fn ucum(self) -> &'static [&'static str] {
        match self {
            Vital::HeartRate | Vital::RespirationRate => &["/min"],
            Vital::Spo2 => &["%"],
            Vital::Temperature => &["Cel", "[degF]"],
            Vital::SystolicBp | Vital::DiastolicBp => &["mm[Hg]"],
        }
    }
}

/// One normalised reading from a wearable, whatever shape it arrived in.
///
/// Every field has been validated: vitals are finite and inside [`Vital::valid_range`],
/// diastolic < systolic, the timestamp is within the ingest window, and the reading carries
/// something to triage (see [`parse_body`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reading {
    /// The device that sent it (1–128 characters).
    pub device_id: String,
    /// The patient, when the sender names one.
    pub patient_id: Option<String>,
    /// When it was measured (UTC).
    pub timestamp: DateTime<Utc>,
    /// Heart rate, beats per minute.
    pub heart_rate_bpm: Option<f64>,
    /// Peripheral oxygen saturation, percent.
    pub spo2_pct: Option<f64>,
    /// Respiration rate, breaths per minute.
    pub respiration_rate_bpm: Option<f64>,
    /// Body temperature, °C (Fahrenheit input converted and rounded to 0.01 °C).
    pub body_temp_c: Option<f64>,
    /// Systolic blood pressure, mmHg.
    pub systolic_bp_mmhg: Option<f64>,
    /// Diastolic blood pressure, mmHg.
    pub diastolic_bp_mmhg: Option<f64>,
    /// The device detected a hard fall (absent means `false`).
    pub fall_detected: bool,
    /// The wearer is moving; `Some(true)` stands a fall watch down.
    pub moving: Option<bool>,
    /// On supplemental oxygen (NEWS2 "air or oxygen"); absent means unknown, not air.
    pub on_oxygen: Option<bool>,
    /// Level of consciousness (ACVPU).
    pub consciousness: Option<Consciousness>,
    /// Where the wearer is.
    pub location: Option<GeoPoint>,
    /// Steps since the previous reading (legacy shape only).
    pub steps: Option<u32>,
}

impl Reading {
    /// Whether the reading carries a vital sign: a measured [`Vital`] or consciousness.
    ///
    /// `fall_detected` and `moving` are not vital signs, but [`parse_body`] also accepts a
    /// reading that carries only `fall_detected: true` or `moving: true` (see there).
    pub fn has_vital_sign(&self) -> bool {
        Vital::ALL.iter().any(|&v| self.vital(v).is_some()) || self.consciousness.is_some()
    }

    /// The value of one measured vital, if the reading has it.
    pub fn vital(&self, vital: Vital) -> Option<f64> {
        match vital {
            Vital::HeartRate => self.heart_rate_bpm,
            Vital::Spo2 => self.spo2_pct,
            Vital::RespirationRate => self.respiration_rate_bpm,
            Vital::Temperature => self.body_temp_c,
            Vital::SystolicBp => self.systolic_bp_mmhg,
            Vital::DiastolicBp => self.diastolic_bp_mmhg,
        }
    }
}

/// Limits applied to one ingest body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngestLimits {
    /// Most readings in a batch (or entries in a FHIR Bundle).
    pub max_batch: usize,
    /// How far ahead of `now` a timestamp may be.
    pub max_future: chrono::Duration,
    /// How far behind `now` a timestamp may be.
    pub max_age: chrono::Duration,
}

impl Default for IngestLimits {
    /// 1,000 readings, 5 minutes ahead, 24 hours old (`api.md`, `domain.md`).
    fn default() -> Self {
        Self {
            max_batch: 1000,
            max_future: TimeDelta::minutes(5),
            max_age: TimeDelta::hours(24),
        }
    }
}

/// A body that parsed as a whole: one outcome per reading.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedBody {
    /// Outcomes in request order.
    pub items: Vec<ParsedItem>,
}

/// The outcome for one reading of the body.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedItem {
    /// Position in the request: the batch index; for a top-level FHIR Bundle the index of the
    /// group's first entry. Readings from a Bundle nested in a batch share the batch index.
    pub index: usize,
    /// The reading, or every problem found with it (pointers into the request body).
    pub outcome: Result<Reading, Vec<FieldError>>,
}

/// Why a body could not be split into readings at all (nothing in it is accepted).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Not JSON (HTTP 400).
    #[error("malformed JSON at line {line} column {column}: {message}")]
    Malformed {
        /// What the JSON parser objected to.
        message: String,
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column of the problem.
        column: usize,
    },
    /// More readings than [`IngestLimits::max_batch`] (HTTP 422).
    #[error("{got} readings, at most {max} per request")]
    TooMany {
        /// `/readings` for a batch, `/entry` for a FHIR Bundle.
        pointer: String,
        /// The limit.
        max: usize,
        /// How many the body holds.
        got: usize,
    },
    /// Valid JSON, but not a shape of reading we know (HTTP 422).
    #[error("{message}")]
    NotAReading {
        /// Where in the body.
        pointer: String,
        /// What was expected.
        message: String,
    },
}

impl BodyError {
    /// JSON pointer for a problem+json `errors` entry (empty: the whole body).
    pub fn pointer(&self) -> &str {
        match self {
            BodyError::Malformed { .. } => "",
            BodyError::TooMany { pointer, .. } | BodyError::NotAReading { pointer, .. } => pointer,
        }
    }
}

/// Parses and validates an ingest body into readings.
///
/// The body is one reading, a batch `{"readings": [..]}` (at most `limits.max_batch`), a FHIR
/// `Observation` or a FHIR `Bundle` (see the module docs); batch items may be any reading shape,
/// detected per item. Each reading either normalises to a [`Reading`] or yields every problem
/// found with it; one bad reading never fails the others.
///
/// A reading must carry something to triage: a vital sign ([`Reading::has_vital_sign`]), or
/// `fall_detected: true` (a fall alert without vitals is exactly what must not be dropped), or
/// `moving: true` (the movement signal that stands a fall watch down). Other rules: a present
/// field must not be `null` (omit it instead); each vital may be given once (e.g. not both
/// `body_temp_c` and `body_temp_f`); `device_id` and `patient_id` are 1–128 characters.
///
/// FHIR: device `device.identifier.value`, time `effectiveDateTime` or `effectiveInstant`,
/// patient `subject.reference` (`Patient/<id>`); each Observation's value and its `component`s
/// are read by LOINC code (system `http://loinc.org`) with the UCUM unit in `valueQuantity.code`
/// (or `unit` when `code` is absent). Unknown codes are ignored; Observations with status
/// `entered-in-error` or `cancelled` are skipped; a Bundle's Observations are grouped into one
/// reading per (device, time), and a group with no known vital is an error.
pub fn parse_body(
    body: &[u8],
    now: DateTime<Utc>,
    limits: &IngestLimits,
) -> Result<ParsedBody, BodyError> {
    let text = std::str::from_utf8(body).map_err(|e| invalid_utf8(body, &e))?;
    let probe: Probe<'_> = serde_json::from_str(text).map_err(|e| probe_error(text, &e))?;
    let ctx = Ctx {
        latest: now.checked_add_signed(limits.max_future),
        earliest: now.checked_sub_signed(limits.max_age),
        limits,
    };
    let mut items = Vec::new();
    if let Some(readings) = probe.readings {
        if readings.len() > limits.max_batch {
            return Err(BodyError::TooMany {
                pointer: "/readings".into(),
                max: limits.max_batch,
                got: readings.len(),
            });
        }
        items.reserve(readings.len());
        for (index, raw) in readings.into_iter().enumerate() {
            parse_item(raw.get(), index, Base::Batch(index), &ctx, &mut items);
        }
    } else if probe.resource_type.is_some() {
        let value: Value = serde_json::from_str(text).map_err(|e| malformed(&e))?;
        fhir_resource(&value, "", None, &ctx, &mut items)?;
    } else {
        parse_item(text, 0, Base::Path(""), &ctx, &mut items);
    }
    Ok(ParsedBody { items })
}

/// What the body is: a batch, a FHIR resource, or (neither) a single reading.
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default, deserialize_with = "non_null")]
    readings: Option<Vec<&'a RawValue>>,
    #[serde(rename = "resourceType", default)]
    resource_type: Option<IgnoredAny>,
}

/// Validation context shared by every reading of one body.
struct Ctx<'a> {
    /// Newest acceptable timestamp (`None`: no bound representable).
    latest: Option<DateTime<Utc>>,
    /// Oldest acceptable timestamp.
    earliest: Option<DateTime<Utc>>,
    limits: &'a IngestLimits,
}

/// Where a reading sits in the body, to prefix its field pointers.
#[derive(Clone, Copy)]
enum Base<'a> {
    /// `/readings/<i>`.
    Batch(usize),
    /// A literal prefix (`""` for a top-level reading; FHIR builds full pointers).
    Path(&'a str),
}

impl Base<'_> {
    fn join(self, tail: &str) -> String {
        match self {
            Base::Batch(i) => format!("/readings/{i}{tail}"),
            Base::Path(prefix) => format!("{prefix}{tail}"),
        }
    }
}

/// The problems found with one reading so far.
struct Problems<'a> {
    base: Base<'a>,
    list: Vec<FieldError>,
}

impl<'a> Problems<'a> {
    fn new(base: Base<'a>) -> Self {
        Self {
            base,
            list: Vec::new(),
        }
    }

    fn add(&mut self, tail: &str, message: impl Into<String>) {
        self.list
            .push(FieldError::new(self.base.join(tail), message));
    }

    fn check_id(&mut self, tail: &str, id: &str) {
        if id.is_empty() {
            self.add(tail, "must not be empty");
        } else if id.len() > MAX_ID_CHARS && id.chars().count() > MAX_ID_CHARS {
            self.add(tail, format!("must be at most {MAX_ID_CHARS} characters"));
        }
    }

    fn check_time(&mut self, tail: &str, at: DateTime<Utc>, ctx: &Ctx<'_>) {
        if ctx.latest.is_some_and(|latest| at > latest) {
            let ahead = human(ctx.limits.max_future);
            self.add(tail, format!("{at:?} is more than {ahead} in the future"));
        } else if ctx.earliest.is_some_and(|earliest| at < earliest) {
            let age = human(ctx.limits.max_age);
            self.add(tail, format!("{at:?} is older than {age}"));
        }
    }
}

/// Longest device or patient id, in characters.
const MAX_ID_CHARS: usize = 128;

const NO_VITAL: &str = "no vital sign: give at least one of heart_rate_bpm, spo2_pct, \
    respiration_rate_bpm, body_temp_c, systolic_bp_mmhg, diastolic_bp_mmhg, consciousness, \
    or fall_detected: true or moving: true";

/// A vital value and the pointer (tail) of the field it came from.
struct Measure {
    value: f64,
    at: Cow<'static, str>,
}

/// One slot per [`Vital`], indexed by `vital as usize`.
type Measures = [Option<Measure>; 6];

fn value_of(measures: &Measures, vital: Vital) -> Option<f64> {
    measures[vital as usize].as_ref().map(|m| m.value)
}

/// Range checks shared by every shape: finite, inside the valid range, diastolic < systolic.
fn check_measures(p: &mut Problems<'_>, measures: &Measures) {
    for (vital, slot) in Vital::ALL.into_iter().zip(measures) {
        let Some(m) = slot else { continue };
        let (lo, hi) = vital.valid_range();
        let unit = vital.unit();
        if !m.value.is_finite() {
            p.add(&m.at, "must be a finite number");
        } else if !(lo..=hi).contains(&m.value) {
            let name = vital.label();
            p.add(
                &m.at,
                format!("{name} {}{unit} outside {lo}–{hi}{unit}", m.value),
            );
        }
    }
    let sys = &measures[Vital::SystolicBp as usize];
    let dia = &measures[Vital::DiastolicBp as usize];
    if let (Some(sys), Some(dia)) = (sys, dia)
        && dia.value >= sys.value
    {
        let message = format!(
            "diastolic BP {} mmHg must be below systolic BP {} mmHg",
            dia.value, sys.value
        );
        p.add(&dia.at, message);
    }
}

/// A reading with the given identity and vitals and nothing else.
fn base_reading(
    device_id: String,
    patient_id: Option<String>,
    timestamp: DateTime<Utc>,
    m: &Measures,
) -> Reading {
    Reading {
        device_id,
        patient_id,
        timestamp,
        heart_rate_bpm: value_of(m, Vital::HeartRate),
        spo2_pct: value_of(m, Vital::Spo2),
        respiration_rate_bpm: value_of(m, Vital::RespirationRate),
        body_temp_c: value_of(m, Vital::Temperature),
        systolic_bp_mmhg: value_of(m, Vital::SystolicBp),
        diastolic_bp_mmhg: value_of(m, Vital::DiastolicBp),
        fall_detected: false,
        moving: None,
        on_oxygen: None,
        consciousness: None,
        location: None,
        steps: None,
    }
}

/// °F → °C, rounded to 0.01 °C so that e.g. 102.2 °F is exactly 39.0 °C at the rule boundary.
fn fahrenheit_to_celsius(f: f64) -> f64 {
    ((f - 32.0) * 5.0 / 9.0 * 100.0).round() / 100.0
}

// ---------------------------------------------------------------------------------------------
// Native and legacy shapes (typed fast path)

/// Superset of the native and legacy shapes; FHIR is recognised by `resourceType`.
#[derive(Default, Deserialize)]
#[serde(default)]
struct RawReading {
    #[serde(deserialize_with = "non_null")]
    device_id: Option<String>,
    #[serde(deserialize_with = "non_null")]
    patient_id: Option<String>,
    #[serde(deserialize_with = "non_null")]
    timestamp: Option<RawTime>,
    #[serde(deserialize_with = "non_null")]
    heart_rate_bpm: Option<f64>,
    #[serde(deserialize_with = "non_null")]
    spo2_pct: Option<f64>,
    #[serde(deserialize_with = "non_null")]
    respiration_rate_bpm: Option<f64>,
    #[serde(deserialize_with = "non_null")]
    body_temp_c: Option<f64>,
    #[serde(deserialize_with = "non_null")]
    body_temp_f: Option<f64>,
    #[serde(deserialize_with = "non_null")]
    systolic_bp_mmhg: Option<f64>,
    #[serde(deserialize_with = "non_null")]
    diastolic_bp_mmhg: Option<f64>,
    #[serde(deserialize_with = "non_null")]
    fall_detected: Option<bool>,
    #[serde(deserialize_with = "non_null")]
    moving: Option<bool>,
    #[serde(deserialize_with = "non_null")]
    on_oxygen: Option<bool>,
    #[serde(deserialize_with = "non_null")]
    consciousness: Option<Consciousness>,
    #[serde(deserialize_with = "non_null")]
    location: Option<RawLocation>,
    #[serde(deserialize_with = "non_null")]
    device: Option<LegacyDevice>,
    #[serde(deserialize_with = "non_null")]
    metrics: Option<LegacyMetrics>,
    #[serde(rename = "resourceType")]
    resource_type: Option<IgnoredAny>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct LegacyDevice {
    #[serde(deserialize_with = "non_null")]
    id: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct LegacyMetrics {
    #[serde(deserialize_with = "non_null")]
    heart_rate_bpm: Option<f64>,
    #[serde(rename = "spO2Percentage", deserialize_with = "non_null")]
    spo2_percentage: Option<f64>,
    #[serde(deserialize_with = "non_null")]
    respiration_rate_bpm: Option<f64>,
    #[serde(deserialize_with = "non_null")]
    body_temperature_celsius: Option<f64>,
    #[serde(deserialize_with = "non_null")]
    steps_since_last_reading: Option<u32>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawLocation {
    #[serde(deserialize_with = "non_null")]
    lat: Option<f64>,
    #[serde(deserialize_with = "non_null")]
    lng: Option<f64>,
    #[serde(deserialize_with = "non_null")]
    accuracy_m: Option<f64>,
}

/// Deserialises a field that is present, rejecting `null` (plain `Option` would read it as
/// absent, hiding a sender bug).
fn non_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// A timestamp as sent: `None` when it is a string or integer that is not a valid time (a
/// validation problem reported with the others, not a type error).
struct RawTime(Option<DateTime<Utc>>);

impl<'de> Deserialize<'de> for RawTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawTimeVisitor)
    }
}

struct RawTimeVisitor;

impl Visitor<'_> for RawTimeVisitor {
    type Value = RawTime;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an RFC 3339 timestamp or integer epoch milliseconds")
    }

    fn visit_str<E>(self, s: &str) -> Result<RawTime, E> {
        Ok(RawTime(parse_rfc3339(s)))
    }

    fn visit_i64<E>(self, ms: i64) -> Result<RawTime, E> {
        Ok(RawTime(DateTime::from_timestamp_millis(ms)))
    }

    fn visit_u64<E>(self, ms: u64) -> Result<RawTime, E> {
        let ms = i64::try_from(ms).ok();
        Ok(RawTime(ms.and_then(DateTime::from_timestamp_millis)))
    }
}

fn parse_rfc3339(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

const BAD_TIME: &str =
    "expected an RFC 3339 timestamp with time zone or integer epoch milliseconds";

/// The first of `sources` that is present; a second one is an error (a vital is given once).
fn pick<const N: usize>(
    p: &mut Problems<'_>,
    sources: [(Option<f64>, &'static str); N],
) -> Option<Measure> {
    let mut found: Option<Measure> = None;
    for (value, at) in sources {
        let Some(value) = value else { continue };
        match &found {
            Some(first) => p.add(at, format!("given twice (also at {})", first.at)),
            None => {
                found = Some(Measure {
                    value,
                    at: Cow::Borrowed(at),
                })
            }
        }
    }
    found
}

impl RawReading {
    fn normalise(self, base: Base<'_>, ctx: &Ctx<'_>) -> Result<Reading, Vec<FieldError>> {
        let mut p = Problems::new(base);
        let legacy_id = self.device.and_then(|d| d.id);
        let (device_id, id_at) = match (self.device_id, legacy_id) {
            (Some(id), Some(legacy)) if id != legacy => {
                p.add("/device/id", "conflicts with device_id");
                (Some(id), "/device_id")
            }
            (Some(id), _) => (Some(id), "/device_id"),
            (None, Some(id)) => (Some(id), "/device/id"),
            (None, None) => {
                p.add("/device_id", "required");
                (None, "/device_id")
            }
        };
        if let Some(id) = &device_id {
            p.check_id(id_at, id);
        }
        if let Some(id) = &self.patient_id {
            p.check_id("/patient_id", id);
        }
        let timestamp = match self.timestamp {
            None => {
                p.add("/timestamp", "required");
                None
            }
            Some(RawTime(None)) => {
                p.add("/timestamp", BAD_TIME);
                None
            }
            Some(RawTime(Some(at))) => {
                p.check_time("/timestamp", at, ctx);
                Some(at)
            }
        };

        let m = self.metrics.unwrap_or_default();
        let measures: Measures = [
            pick(
                &mut p,
                [
                    (self.heart_rate_bpm, "/heart_rate_bpm"),
                    (m.heart_rate_bpm, "/metrics/heartRateBpm"),
                ],
            ),
            pick(
                &mut p,
                [
                    (self.spo2_pct, "/spo2_pct"),
                    (m.spo2_percentage, "/metrics/spO2Percentage"),
                ],
            ),
            pick(
                &mut p,
                [
                    (self.respiration_rate_bpm, "/respiration_rate_bpm"),
                    (m.respiration_rate_bpm, "/metrics/respirationRateBpm"),
                ],
            ),
            pick(
                &mut p,
                [
                    (self.body_temp_c, "/body_temp_c"),
                    (self.body_temp_f.map(fahrenheit_to_celsius), "/body_temp_f"),
                    (
                        m.body_temperature_celsius,
                        "/metrics/bodyTemperatureCelsius",
                    ),
                ],
            ),
            pick(&mut p, [(self.systolic_bp_mmhg, "/systolic_bp_mmhg")]),
            pick(&mut p, [(self.diastolic_bp_mmhg, "/diastolic_bp_mmhg")]),
        ];
        check_measures(&mut p, &measures);

        let fall_detected = self.fall_detected.unwrap_or(false);
        let triageable = measures.iter().any(Option::is_some)
            || self.consciousness.is_some()
            || fall_detected
            || self.moving == Some(true);
        if !triageable {
            p.add("", NO_VITAL);
        }
        let location = self.location.and_then(|l| l.check(&mut p));

        match (device_id, timestamp) {
            (Some(device_id), Some(timestamp)) if p.list.is_empty() => Ok(Reading {
                fall_detected,
                moving: self.moving,
                on_oxygen: self.on_oxygen,
                consciousness: self.consciousness,
                location,
                steps: m.steps_since_last_reading,
                ..base_reading(device_id, self.patient_id, timestamp, &measures)
            }),
            _ => Err(p.list),
        }
    }
}

impl RawLocation {
    fn check(self, p: &mut Problems<'_>) -> Option<GeoPoint> {
        let before = p.list.len();
        let mut coordinate = |value: Option<f64>, at: &str, limit: f64| match value {
            None => {
                p.add(at, "required");
                0.0
            }
            Some(v) if !(v.is_finite() && (-limit..=limit).contains(&v)) => {
                p.add(at, format!("{v} outside −{limit}..{limit}"));
                0.0
            }
            Some(v) => v,
        };
        let lat = coordinate(self.lat, "/location/lat", 90.0);
        let lng = coordinate(self.lng, "/location/lng", 180.0);
        if let Some(a) = self.accuracy_m
            && !(a.is_finite() && a >= 0.0)
        {
            p.add("/location/accuracy_m", "must be a finite number ≥ 0");
        }
        (p.list.len() == before).then_some(GeoPoint {
            lat,
            lng,
            accuracy_m: self.accuracy_m,
        })
    }
}

/// Parses one reading of any shape at `base` and appends its outcome(s) to `out`.
fn parse_item(raw: &str, index: usize, base: Base<'_>, ctx: &Ctx<'_>, out: &mut Vec<ParsedItem>) {
    match serde_json::from_str::<RawReading>(raw) {
        Ok(reading) if reading.resource_type.is_none() => out.push(ParsedItem {
            index,
            outcome: reading.normalise(base, ctx),
        }),
        Ok(_) => {
            let prefix = base.join("");
            let nested = serde_json::from_str::<Value>(raw)
                .map_err(|e| malformed(&e))
                .and_then(|value| fhir_resource(&value, &prefix, Some(index), ctx, out));
            if let Err(e) = nested {
                let error = FieldError::new(e.pointer(), e.to_string());
                out.push(ParsedItem {
                    index,
                    outcome: Err(vec![error]),
                });
            }
        }
        Err(e) => out.push(ParsedItem {
            index,
            outcome: Err(vec![type_error(raw, base, &e)]),
        }),
    }
}

/// Locates a serde error inside a reading. The fast path does not track paths (that costs an
/// allocation per key), so the failing reading is parsed again with `serde_path_to_error`.
fn type_error(raw: &str, base: Base<'_>, first: &serde_json::Error) -> FieldError {
    let mut pointer = base.join("");
    if !raw.trim_start().starts_with('{') {
        return FieldError::new(pointer, "expected a reading object");
    }
    let mut de = serde_json::Deserializer::from_str(raw);
    let message = match serde_path_to_error::deserialize::<_, RawReading>(&mut de) {
        Ok(_) => without_position(first),
        Err(e) => {
            for segment in e.path() {
                match segment {
                    Segment::Seq { index } => push_pointer_token(&mut pointer, &index.to_string()),
                    Segment::Map { key } => push_pointer_token(&mut pointer, key),
                    Segment::Enum { variant } => push_pointer_token(&mut pointer, variant),
                    Segment::Unknown => {}
                }
            }
            without_position(e.inner())
        }
    };
    FieldError::new(pointer, message)
}

/// serde_json's message without its " at line L column C" suffix (positions inside one reading
/// mean nothing to the sender; the pointer says where).
fn without_position(e: &serde_json::Error) -> String {
    let mut message = e.to_string();
    if e.line() > 0
        && let Some(at) = message.rfind(" at line ")
    {
        message.truncate(at);
    }
    message
}

fn malformed(e: &serde_json::Error) -> BodyError {
    BodyError::Malformed {
        message: without_position(e),
        line: e.line(),
        column: e.column(),
    }
}

fn invalid_utf8(body: &[u8], e: &std::str::Utf8Error) -> BodyError {
    let valid = &body[..e.valid_up_to()];
    let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    BodyError::Malformed {
        message: "invalid UTF-8".into(),
        line: 1 + valid.iter().filter(|&&b| b == b'\n').count(),
        column: 1 + valid.len() - line_start,
    }
}

/// Classifies a failure to read the body's outline: not JSON (400), or JSON of the wrong shape.
fn probe_error(text: &str, e: &serde_json::Error) -> BodyError {
    if !e.is_data() {
        return malformed(e);
    }
    // A type error stops the parser early; the rest of the body may still be broken JSON.
    if let Err(syntax) = serde_json::from_str::<IgnoredAny>(text) {
        return malformed(&syntax);
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let at_readings = serde_path_to_error::deserialize::<_, Probe<'_>>(&mut de).is_err_and(
        |e| matches!(e.path().iter().next(), Some(Segment::Map { key }) if key == "readings"),
    );
    if at_readings {
        BodyError::NotAReading {
            pointer: "/readings".into(),
            message: "must be an array of readings".into(),
        }
    } else {
        BodyError::NotAReading {
            pointer: String::new(),
            message: "expected a reading object, {\"readings\": [..]}, \
                      or a FHIR Observation or Bundle"
                .into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// FHIR R4 (slower `Value` path)

const LOINC: &str = "http://loinc.org";
const UCUM: &str = "http://unitsofmeasure.org";

/// Reads a FHIR `Observation` or `Bundle` at pointer `base`. `index` is the batch index when
/// the resource is a batch item, `None` at the top level (then Bundle entries give the index).
fn fhir_resource(
    value: &Value,
    base: &str,
    index: Option<usize>,
    ctx: &Ctx<'_>,
    out: &mut Vec<ParsedItem>,
) -> Result<(), BodyError> {
    match value.get("resourceType").and_then(Value::as_str) {
        Some("Observation") => {
            observations([(index.unwrap_or(0), base.to_owned(), value)], ctx, out);
            Ok(())
        }
        Some("Bundle") => {
            let entries = match value.get("entry") {
                None => &[][..],
                Some(Value::Array(entries)) => entries,
                Some(_) => {
                    return Err(BodyError::NotAReading {
                        pointer: format!("{base}/entry"),
                        message: "must be an array of entries".into(),
                    });
                }
            };
            if entries.len() > ctx.limits.max_batch {
                return Err(BodyError::TooMany {
                    pointer: format!("{base}/entry"),
                    max: ctx.limits.max_batch,
                    got: entries.len(),
                });
            }
            let found = entries.iter().enumerate().filter_map(|(i, entry)| {
                let resource = entry.get("resource")?;
                let is_observation = resource.get("resourceType")? == "Observation";
                is_observation.then(|| {
                    let at = format!("{base}/entry/{i}/resource");
                    (index.unwrap_or(i), at, resource)
                })
            });
            observations(found, ctx, out);
            Ok(())
        }
        _ => Err(BodyError::NotAReading {
            pointer: format!("{base}/resourceType"),
            message: "expected resourceType Observation or Bundle".into(),
        }),
    }
}

/// Observations sharing a device and effective time: they become one reading.
struct Group {
    index: usize,
    /// Pointer to the group's first Observation.
    at: String,
    /// Device id and time; `None` for an Observation that could not be keyed (it has errors).
    key: Option<(String, DateTime<Utc>)>,
    time_at: String,
    patient: Option<String>,
    measures: Measures,
    problems: Vec<FieldError>,
}

/// What one Observation contributes.
struct ObservationParts {
    key: Option<(String, DateTime<Utc>)>,
    time_at: String,
    patient: Option<(String, String)>,
    measures: Vec<(Vital, Measure)>,
    problems: Vec<FieldError>,
}

fn observations<'v>(
    found: impl IntoIterator<Item = (usize, String, &'v Value)>,
    ctx: &Ctx<'_>,
    out: &mut Vec<ParsedItem>,
) {
    let mut groups: Vec<Group> = Vec::new();
    let mut by_key: HashMap<(String, DateTime<Utc>), usize> = HashMap::new();
    for (index, at, obs) in found {
        let status = obs.get("status").and_then(Value::as_str);
        if matches!(status, Some("entered-in-error" | "cancelled")) {
            continue;
        }
        let parts = read_observation(obs, &at);
        let mut new_group = |key| {
            groups.push(Group {
                index,
                at: at.clone(),
                key,
                time_at: parts.time_at.clone(),
                patient: None,
                measures: Default::default(),
                problems: Vec::new(),
            });
            groups.len() - 1
        };
        let slot = match &parts.key {
            Some(key) => match by_key.get(key) {
                Some(&slot) => slot,
                None => {
                    let slot = new_group(Some(key.clone()));
                    by_key.insert(key.clone(), slot);
                    slot
                }
            },
            None => new_group(None),
        };
        if let Some(group) = groups.get_mut(slot) {
            group.absorb(parts);
        }
    }
    out.extend(groups.into_iter().map(|g| g.finish(ctx)));
}

impl Group {
    fn absorb(&mut self, parts: ObservationParts) {
        self.problems.extend(parts.problems);
        if let Some((patient, at)) = parts.patient {
            match &self.patient {
                Some(known) if *known != patient => self.problems.push(FieldError::new(
                    at,
                    format!(
                        "patient {patient} conflicts with {known} for the same device and time"
                    ),
                )),
                _ => self.patient = Some(patient),
            }
        }
        for (vital, measure) in parts.measures {
            let slot = &mut self.measures[vital as usize];
            match slot {
                Some(first) => self.problems.push(FieldError::new(
                    measure.at.into_owned(),
                    format!(
                        "{} given twice for the same device and time (also at {})",
                        vital.label(),
                        first.at
                    ),
                )),
                None => *slot = Some(measure),
            }
        }
    }

    fn finish(self, ctx: &Ctx<'_>) -> ParsedItem {
        let mut p = Problems {
            base: Base::Path(""),
            list: self.problems,
        };
        let outcome = match self.key {
            Some((device_id, timestamp)) => {
                p.check_time(&self.time_at, timestamp, ctx);
                check_measures(&mut p, &self.measures);
                if self.measures.iter().all(Option::is_none) {
                    p.add(
                        &self.at,
                        "no vital sign: no Observation for this device and time has a \
                         known LOINC code (8867-4, 9279-1, 2708-6, 59408-5, 8310-5, 8480-6, 8462-4)",
                    );
                }
                if p.list.is_empty() {
                    Ok(base_reading(
                        device_id,
                        self.patient,
                        timestamp,
                        &self.measures,
                    ))
                } else {
                    Err(p.list)
                }
            }
            None => Err(p.list),
        };
        ParsedItem {
            index: self.index,
            outcome,
        }
    }
}

fn read_observation(obs: &Value, at: &str) -> ObservationParts {
    let mut problems = Vec::new();
    let mut fail =
        |pointer: String, message: &str| problems.push(FieldError::new(pointer, message));

    let device_at = format!("{at}/device/identifier/value");
    let device_id = match obs.pointer("/device/identifier/value").map(Value::as_str) {
        Some(Some(id)) if !id.is_empty() && id.chars().count() <= MAX_ID_CHARS => Some(id),
        Some(Some(_)) => {
            fail(device_at, "must be 1–128 characters");
            None
        }
        _ => {
            fail(device_at, "required: the device id (a string)");
            None
        }
    };

    let (field, time) = match obs.get("effectiveDateTime") {
        Some(t) => ("effectiveDateTime", Some(t)),
        None => ("effectiveInstant", obs.get("effectiveInstant")),
    };
    let time_at = format!("{at}/{field}");
    let timestamp = match time.map(|t| t.as_str().and_then(parse_rfc3339)) {
        Some(Some(t)) => Some(t),
        Some(None) => {
            fail(
                time_at.clone(),
                "expected an RFC 3339 date-time with time zone",
            );
            None
        }
        None => {
            fail(
                format!("{at}/effectiveDateTime"),
                "required (or effectiveInstant)",
            );
            None
        }
    };

    let patient = obs.pointer("/subject/reference").and_then(|r| {
        let id = r
            .as_str()
            .and_then(|r| r.rsplit_once("Patient/"))
            .and_then(|(_, id)| id.split('/').next());
        let at = format!("{at}/subject/reference");
        match id {
            Some(id) if !id.is_empty() && id.chars().count() <= MAX_ID_CHARS => {
                Some((id.to_owned(), at))
            }
            _ => {
                fail(at, "expected a Patient/<id> reference");
                None
            }
        }
    });

    let mut measures = Vec::new();
    let components = obs
        .get("component")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let nodes = std::iter::once((None, obs))
        .chain(components.iter().enumerate().map(|(i, c)| (Some(i), c)));
    for (component, node) in nodes {
        let Some(vital) = node.get("code").and_then(loinc_vital) else {
            continue;
        };
        let node_at = match component {
            Some(i) => format!("{at}/component/{i}"),
            None => at.to_owned(),
        };
        if let Some(measure) = quantity(node, vital, &node_at, &mut problems) {
            measures.push((vital, measure));
        }
    }

    ObservationParts {
        key: device_id.zip(timestamp).map(|(d, t)| (d.to_owned(), t)),
        time_at,
        patient,
        measures,
        problems,
    }
}

/// The vital named by the first LOINC coding of a `CodeableConcept` that we know.
fn loinc_vital(code: &Value) -> Option<Vital> {
    code.get("coding")?.as_array()?.iter().find_map(|coding| {
        if coding.get("system")? != LOINC {
            return None;
        }
        Vital::from_loinc(coding.get("code")?.as_str()?)
    })
}

/// The `valueQuantity` of an Observation or component at `at`, unit-checked and in our units.
fn quantity(
    node: &Value,
    vital: Vital,
    at: &str,
    problems: &mut Vec<FieldError>,
) -> Option<Measure> {
    let Some(q) = node.get("valueQuantity") else {
        // A value explained as absent is missing, not wrong.
        if node.get("dataAbsentReason").is_none() {
            let message = format!("required for {}", vital.label());
            problems.push(FieldError::new(format!("{at}/valueQuantity"), message));
        }
        return None;
    };
    let value_at = format!("{at}/valueQuantity/value");
    let Some(value) = q.get("value").and_then(Value::as_f64) else {
        problems.push(FieldError::new(value_at, "must be a number"));
        return None;
    };
    if q.get("system").is_some_and(|s| s != UCUM) {
        problems.push(FieldError::new(
            format!("{at}/valueQuantity/system"),
            format!("must be {UCUM}"),
        ));
    }
    let (field, unit) = match (q.get("code"), q.get("unit")) {
        (Some(code), _) => ("code", code.as_str()),
        (None, Some(unit)) => ("unit", unit.as_str()),
        (None, None) => ("code", None),
    };
    let expected = vital.ucum();
    let value = match unit {
        Some("[degF]") if vital == Vital::Temperature => fahrenheit_to_celsius(value),
        Some(unit) if expected.contains(&unit) => value,
        _ => {
            let got = unit.map_or_else(|| "missing".to_owned(), |u| format!("{u:?}"));
            let message = format!(
                "unit {got} is not {} for {}",
                expected.join(" or "),
                vital.label()
            );
            problems.push(FieldError::new(
                format!("{at}/valueQuantity/{field}"),
                message,
            ));
            return None;
        }
    };
    Some(Measure {
        value,
        at: Cow::Owned(value_at),
    })
}

/// "5 min", "24 h" or "90 s", for messages.
fn human(d: TimeDelta) -> String {
    let s = d.num_seconds();
    if s != 0 && s % 3600 == 0 {
        format!("{} h", s / 3600)
    } else if s != 0 && s % 60 == 0 {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}
