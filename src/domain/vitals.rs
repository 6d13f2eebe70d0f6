//! Vital-sign readings: the normalised [`Reading`], and the ingest parser that turns a request
//! body into readings or per-field errors ([`parse_body`]).
//!
//! Four shapes are accepted and normalised to the same [`Reading`]: the native reading, the
//! legacy wearable shape (`device`, `metrics`), a FHIR R4 `Observation`, and a FHIR `Bundle` of
//! Observations; a body is one of those or a batch `{"readings": [..]}` of them. Values are
//! checked against the physiological ranges in `docs/domain.md`.
//!
//! Pure: no I/O and no clock reads (`now` is passed in). It must not clamp or guess a value,
//! must not panic on any input, and must not let one bad reading fail the rest of its batch.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;

use chrono::{DateTime, TimeDelta, Utc};
use serde::de::value::MapAccessDeserializer;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use serde_path_to_error::Segment;

use super::ids::{DeviceId, PatientId};
use super::strict_json::{self, StrictError};
pub use super::validation::FieldError;
use super::validation::{TextKind, push_pointer_token};

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
    /// Alert (the A of ACVPU).
    Alert,
    /// New confusion.
    Confusion,
    /// Responds to voice.
    Voice,
    /// Responds to pain.
    Pain,
    /// Unresponsive (the U of ACVPU).
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

    /// The physiologically plausible range, inclusive (`docs/domain.md`); values outside it are
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// The device that sent it (1–128 characters, one line without control characters).
    pub device_id: DeviceId,
    /// The patient, when the sender names one.
    pub patient_id: Option<PatientId>,
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
    /// A digest of everything the reading says (device, patient, time and every value), equal
    /// for equal readings: how a repeated delivery of one reading (a broker's redelivery, a
    /// client's retry) is recognised without keeping the reading.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::hash::DefaultHasher::new();
        self.device_id.as_str().hash(&mut h);
        self.patient_id.as_ref().map(|p| p.as_str()).hash(&mut h);
        self.timestamp.timestamp_micros().hash(&mut h);
        for v in [
            self.heart_rate_bpm,
            self.spo2_pct,
            self.respiration_rate_bpm,
            self.body_temp_c,
            self.systolic_bp_mmhg,
            self.diastolic_bp_mmhg,
        ] {
            v.map(f64::to_bits).hash(&mut h);
        }
        self.fall_detected.hash(&mut h);
        self.moving.hash(&mut h);
        self.on_oxygen.hash(&mut h);
        self.consciousness.hash(&mut h);
        self.location
            .map(|l| {
                (
                    l.lat.to_bits(),
                    l.lng.to_bits(),
                    l.accuracy_m.map(f64::to_bits),
                )
            })
            .hash(&mut h);
        self.steps.hash(&mut h);
        h.finish()
    }

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
    /// 1,000 readings, 5 minutes ahead, 24 hours old (`docs/api.md`, `docs/domain.md`).
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
/// `body_temp_c` and `body_temp_f`); `device_id` and `patient_id` are 1–128 characters, one
/// line without control characters ([`TextKind::Line`]). A FHIR resource is read as strict
/// JSON (`domain::strict_json`); the typed shapes refuse a duplicated field themselves.
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
    // serde_json also fills a struct from an array; only an object is a reading shape.
    if !text.trim_start().starts_with('{') {
        return Err(not_a_reading());
    }
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
        let value = strict_json::from_str(text).map_err(|e| strict_error("", e))?;
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
        } else if let Some(found) = TextKind::Line.forbidden(id) {
            self.add(tail, TextKind::Line.message(found));
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

/// Whether `id` is acceptable as a device or patient id in a reading: 1 to [`MAX_ID_CHARS`]
/// characters, one line without control characters.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && (id.len() <= MAX_ID_CHARS || id.chars().count() <= MAX_ID_CHARS)
        && TextKind::Line.forbidden(id).is_none()
}

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
        device_id: DeviceId(device_id),
        patient_id: patient_id.map(PatientId),
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
    #[serde(deserialize_with = "object")]
    location: Option<RawLocation>,
    #[serde(deserialize_with = "object")]
    device: Option<LegacyDevice>,
    #[serde(deserialize_with = "object")]
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

/// Deserialises a present field that must be a JSON object (serde_json would also fill a struct
/// from an array, e.g. read `[lng, lat]` as `{lat, lng}`).
fn object<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct ObjectVisitor<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(MapAccessDeserializer::new(map))
        }
    }

    d.deserialize_map(ObjectVisitor(PhantomData)).map(Some)
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
    /// Checks and converts every field of a native or legacy reading, collecting every
    /// problem with its pointer. Long on purpose: one block per field, in document order.
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
    // serde_json also fills a struct from an array; only an object is a reading.
    if !raw.trim_start().starts_with('{') {
        let error = FieldError::new(base.join(""), "expected a reading object");
        out.push(ParsedItem {
            index,
            outcome: Err(vec![error]),
        });
        return;
    }
    match serde_json::from_str::<RawReading>(raw) {
        Ok(reading) if reading.resource_type.is_none() => out.push(ParsedItem {
            index,
            outcome: reading.normalise(base, ctx),
        }),
        Ok(_) => {
            let prefix = base.join("");
            let nested = strict_json::from_str(raw)
                .map_err(|e| strict_error(&prefix, e))
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
    if let Some(duplicate) = duplicate_at(raw, first) {
        return FieldError::new(base.join(&duplicate.pointer), duplicate.message);
    }
    let mut pointer = base.join("");
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

/// Where a duplicated field is, when `e` is serde's "duplicate field" error: serde reports it
/// at the enclosing object, strict JSON at the name itself (read again only on this path).
fn duplicate_at(text: &str, e: &serde_json::Error) -> Option<FieldError> {
    if !e.to_string().starts_with("duplicate field") {
        return None;
    }
    match strict_json::from_str(text) {
        Err(StrictError::Refused(refused)) => Some(refused),
        _ => None,
    }
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

/// A FHIR resource (read as a `Value`, unlike the typed shapes) that strict JSON refused: a
/// duplicated name or a control character, at `prefix` + its pointer.
fn strict_error(prefix: &str, e: StrictError) -> BodyError {
    match e {
        StrictError::Syntax(e) => malformed(&e),
        StrictError::Refused(refused) => BodyError::NotAReading {
            pointer: format!("{prefix}{}", refused.pointer),
            message: refused.message,
        },
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
    if let Some(duplicate) = duplicate_at(text, e) {
        return BodyError::NotAReading {
            pointer: duplicate.pointer,
            message: duplicate.message,
        };
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
        not_a_reading()
    }
}

fn not_a_reading() -> BodyError {
    BodyError::NotAReading {
        pointer: String::new(),
        message: "expected a reading object, {\"readings\": [..]}, or a FHIR Observation or Bundle"
            .into(),
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
    rejected: bool,
    problems: Vec<FieldError>,
}

/// What one Observation contributes.
struct ObservationParts {
    key: Option<(String, DateTime<Utc>)>,
    time_at: String,
    patient: Option<(String, String)>,
    measures: Vec<(Vital, Measure)>,
    /// Whether a value with a known LOINC code was rejected (so "no vital sign" would repeat it).
    rejected: bool,
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
        let known = parts.key.as_ref().and_then(|key| by_key.get(key));
        let slot = match known {
            Some(&slot) => slot,
            None => {
                if let Some(key) = &parts.key {
                    by_key.insert(key.clone(), groups.len());
                }
                groups.push(Group {
                    index,
                    at,
                    key: parts.key.clone(),
                    time_at: parts.time_at.clone(),
                    patient: None,
                    measures: Default::default(),
                    rejected: false,
                    problems: Vec::new(),
                });
                groups.len() - 1
            }
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
        self.rejected |= parts.rejected;
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
                if !self.rejected && self.measures.iter().all(Option::is_none) {
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

/// Reads one FHIR `Observation` into its parts. Long on purpose: one arm per LOINC code
/// SHERS understands, each with its unit checks.
fn read_observation(obs: &Value, at: &str) -> ObservationParts {
    let mut problems = Vec::new();
    let mut fail =
        |pointer: String, message: &str| problems.push(FieldError::new(pointer, message));

    let device_at = format!("{at}/device/identifier/value");
    let device_id = match obs.pointer("/device/identifier/value").map(Value::as_str) {
        Some(Some(id)) if valid_id(id) => Some(id),
        Some(Some(_)) => {
            fail(
                device_at,
                "must be 1–128 characters, one line without control characters",
            );
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
            Some(id) if valid_id(id) => Some((id.to_owned(), at)),
            _ => {
                fail(at, "expected a Patient/<id> reference");
                None
            }
        }
    });

    let mut measures = Vec::new();
    let mut rejected = false;
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
        match quantity(node, vital, &node_at) {
            Ok(Some(measure)) => measures.push((vital, measure)),
            Ok(None) => {}
            Err(problem) => {
                problems.push(problem);
                rejected = true;
            }
        }
    }

    ObservationParts {
        key: device_id.zip(timestamp).map(|(d, t)| (d.to_owned(), t)),
        time_at,
        patient,
        measures,
        rejected,
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

/// The `valueQuantity` of an Observation or component at `at`, unit-checked and converted to
/// our units; `Ok(None)` when the value is explained as absent (`dataAbsentReason`).
fn quantity(node: &Value, vital: Vital, at: &str) -> Result<Option<Measure>, FieldError> {
    let Some(q) = node.get("valueQuantity") else {
        if node.get("dataAbsentReason").is_some() {
            return Ok(None);
        }
        let message = format!("required for {}", vital.label());
        return Err(FieldError::new(format!("{at}/valueQuantity"), message));
    };
    let value_at = format!("{at}/valueQuantity/value");
    let Some(value) = q.get("value").and_then(Value::as_f64) else {
        return Err(FieldError::new(value_at, "must be a number"));
    };
    if q.get("system").is_some_and(|s| s != UCUM) {
        let message = format!("must be {UCUM}");
        return Err(FieldError::new(
            format!("{at}/valueQuantity/system"),
            message,
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
            let (expected, name) = (expected.join(" or "), vital.label());
            let message = format!("unit {got} is not {expected} for {name}");
            return Err(FieldError::new(
                format!("{at}/valueQuantity/{field}"),
                message,
            ));
        }
    };
    Ok(Some(Measure {
        value,
        at: Cow::Owned(value_at),
    }))
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        "2026-11-23T08:05:00Z".parse().unwrap()
    }

    fn ts() -> DateTime<Utc> {
        "2026-11-23T08:00:00Z".parse().unwrap()
    }

    fn parse(body: &Value) -> ParsedBody {
        parse_body(body.to_string().as_bytes(), now(), &IngestLimits::default()).unwrap()
    }

    fn body_error(body: &[u8]) -> BodyError {
        parse_body(body, now(), &IngestLimits::default()).unwrap_err()
    }

    /// The only reading of a body, which must be valid.
    fn one(body: &Value) -> Reading {
        let mut items = parse(body).items;
        assert_eq!(items.len(), 1, "{items:?}");
        items.remove(0).outcome.unwrap()
    }

    /// The errors of the only reading of a body, which must be invalid.
    fn errors(body: &Value) -> Vec<FieldError> {
        let mut items = parse(body).items;
        assert_eq!(items.len(), 1, "{items:?}");
        items.remove(0).outcome.unwrap_err()
    }

    fn pointers(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.pointer.as_str()).collect()
    }

    fn native() -> Value {
        json!({
            "device_id": "dev-1",
            "patient_id": "p-1",
            "timestamp": "2026-11-23T08:00:00Z",
            "heart_rate_bpm": 72,
            "spo2_pct": 97,
            "respiration_rate_bpm": 16,
            "body_temp_c": 37.0,
        })
    }

    fn with(mut value: Value, key: &str, field: Value) -> Value {
        value[key] = field;
        value
    }

    fn without(mut value: Value, key: &str) -> Value {
        value.as_object_mut().unwrap().remove(key);
        value
    }

    fn expected() -> Reading {
        Reading {
            device_id: "dev-1".into(),
            patient_id: Some("p-1".into()),
            timestamp: ts(),
            heart_rate_bpm: Some(72.0),
            spo2_pct: Some(97.0),
            respiration_rate_bpm: Some(16.0),
            body_temp_c: Some(37.0),
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

    fn quantity(value: Value, code: &str) -> Value {
        json!({"value": value, "unit": code, "system": UCUM, "code": code})
    }

    fn coded(loinc: &str) -> Value {
        json!({"coding": [{"system": LOINC, "code": loinc}]})
    }

    fn observation(loinc: &str, value: Value, unit: &str) -> Value {
        json!({
            "resourceType": "Observation",
            "status": "final",
            "code": coded(loinc),
            "subject": {"reference": "Patient/p-1"},
            "device": {"identifier": {"value": "dev-1"}},
            "effectiveDateTime": "2026-11-23T08:00:00Z",
            "valueQuantity": quantity(value, unit),
        })
    }

    fn bp_panel(systolic: Value, diastolic: Value) -> Value {
        json!({
            "resourceType": "Observation",
            "status": "final",
            "code": coded("85354-9"),
            "subject": {"reference": "Patient/p-1"},
            "device": {"identifier": {"value": "dev-1"}},
            "effectiveInstant": "2026-11-23T08:00:00.000Z",
            "component": [
                {"code": coded("8480-6"), "valueQuantity": quantity(systolic, "mm[Hg]")},
                {"code": coded("8462-4"), "valueQuantity": quantity(diastolic, "mm[Hg]")},
            ],
        })
    }

    fn bundle(resources: Vec<Value>) -> Value {
        let entry: Vec<Value> = resources
            .into_iter()
            .map(|r| json!({"resource": r}))
            .collect();
        json!({"resourceType": "Bundle", "type": "collection", "entry": entry})
    }

    #[test]
    fn every_shape_normalises_to_the_same_reading() {
        let epoch_ms = ts().timestamp_millis();
        let shapes = [
            native(),
            with(native(), "timestamp", json!(epoch_ms)),
            with(native(), "timestamp", json!("2026-11-23T09:00:00+01:00")),
            with(without(native(), "body_temp_c"), "body_temp_f", json!(98.6)),
            json!({
                "patient_id": "p-1",
                "device": {"id": "dev-1", "model": "W-2"},
                "timestamp": "2026-11-23T08:00:00Z",
                "metrics": {
                    "heartRateBpm": 72,
                    "spO2Percentage": 97,
                    "respirationRateBpm": 16,
                    "bodyTemperatureCelsius": 37.0,
                },
            }),
            bundle(vec![
                observation("8867-4", json!(72), "/min"),
                observation("59408-5", json!(97), "%"),
                observation("9279-1", json!(16), "/min"),
                observation("8310-5", json!(98.6), "[degF]"),
            ]),
        ];
        for shape in shapes {
            assert_eq!(one(&shape), expected(), "{shape}");
            let batch = json!({"readings": [shape]});
            assert_eq!(one(&batch), expected(), "{batch}");
        }
    }

    #[test]
    fn fhir_blood_pressure_components_match_the_native_reading() {
        let native = json!({
            "device_id": "dev-1",
            "patient_id": "p-1",
            "timestamp": "2026-11-23T08:00:00Z",
            "systolic_bp_mmhg": 128,
            "diastolic_bp_mmhg": 82,
        });
        let fhir = one(&bp_panel(json!(128), json!(82)));
        assert_eq!(fhir, one(&native));
        assert_eq!(fhir.systolic_bp_mmhg, Some(128.0));
        assert_eq!(fhir.diastolic_bp_mmhg, Some(82.0));
    }

    #[test]
    fn a_bundle_groups_observations_by_device_and_time() {
        let mut other = observation("8867-4", json!(90), "/min");
        other["device"]["identifier"]["value"] = json!("dev-2");
        let mut spo2 = observation("2708-6", json!(97), "%");
        spo2["code"]["coding"]
            .as_array_mut()
            .unwrap()
            .push(json!({"system": LOINC, "code": "59408-5"}));
        let body = bundle(vec![
            json!({"resourceType": "Patient", "id": "p-1"}),
            observation("8867-4", json!(72), "/min"),
            other,
            bp_panel(json!(128), json!(82)),
            spo2,
            observation("29463-7", json!(70), "kg"),
        ]);
        let items = parse(&body).items;
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].index, 1);
        let first = items[0].outcome.as_ref().unwrap();
        assert_eq!(
            (first.heart_rate_bpm, first.spo2_pct, first.systolic_bp_mmhg),
            (Some(72.0), Some(97.0), Some(128.0))
        );
        assert_eq!(items[1].index, 2);
        assert_eq!(items[1].outcome.as_ref().unwrap().device_id.0, "dev-2");
    }

    #[test]
    fn fhir_skips_cancelled_observations_and_unknown_codes() {
        let mut cancelled = observation("8867-4", json!(500), "/min");
        cancelled["status"] = json!("entered-in-error");
        let items = parse(&bundle(vec![
            cancelled,
            observation("8867-4", json!(72), "/min"),
        ]))
        .items;
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].index, 1);
        assert!(items[0].outcome.is_ok());

        let weight_only = errors(&observation("29463-7", json!(70), "kg"));
        assert_eq!(pointers(&weight_only), [""]);
        assert!(weight_only[0].message.starts_with("no vital sign"));
    }

    #[test]
    fn legacy_location_and_steps_are_kept() {
        let reading = one(&json!({
            "patient_id": "p-1",
            "device": {"id": "dev-1", "model": "W-2"},
            "location": {"lat": 51.5, "lng": -0.12},
            "timestamp": "2026-11-23T08:00:00Z",
            "metrics": {"heartRateBpm": 72, "stepsSinceLastReading": 40},
        }));
        let location = GeoPoint {
            lat: 51.5,
            lng: -0.12,
            accuracy_m: None,
        };
        assert_eq!(reading.location, Some(location));
        assert_eq!(reading.steps, Some(40));
    }

    #[test]
    fn native_optional_fields_and_unknown_fields() {
        let body = json!({
            "device_id": "dev-1",
            "timestamp": "2026-11-23T08:00:00Z",
            "fall_detected": true,
            "moving": false,
            "on_oxygen": true,
            "consciousness": "voice",
            "location": {"lat": -33.9, "lng": 151.2, "accuracy_m": 12.5},
            "firmware": {"version": [1, 2]},
        });
        let reading = one(&body);
        assert!(reading.fall_detected);
        assert_eq!(reading.moving, Some(false));
        assert_eq!(reading.on_oxygen, Some(true));
        assert_eq!(reading.consciousness, Some(Consciousness::Voice));
        assert_eq!(reading.location.unwrap().accuracy_m, Some(12.5));
        assert!(reading.has_vital_sign());
    }

    #[test]
    fn fahrenheit_is_converted_exactly_at_rule_boundaries() {
        for (f, c) in [(98.6, 37.0), (102.2, 39.0), (95.0, 35.0), (99.5, 37.5)] {
            let body = with(without(native(), "body_temp_c"), "body_temp_f", json!(f));
            assert_eq!(one(&body).body_temp_c, Some(c), "{f} °F");
        }
    }

    #[test]
    fn type_errors_name_the_field_in_every_shape() {
        for bad in [
            json!("72"),
            json!("NaN"),
            json!(null),
            json!(true),
            json!([72]),
        ] {
            let single = errors(&with(native(), "heart_rate_bpm", bad.clone()));
            assert_eq!(pointers(&single), ["/heart_rate_bpm"], "{bad}");

            let batch = json!({"readings": [native(), with(native(), "spo2_pct", bad.clone())]});
            let items = parse(&batch).items;
            assert!(items[0].outcome.is_ok());
            let errs = items[1].outcome.as_ref().unwrap_err();
            assert_eq!(pointers(errs), ["/readings/1/spo2_pct"], "{bad}");

            let legacy = json!({"readings": [{
                "device": {"id": "d"}, "timestamp": "2026-11-23T08:00:00Z",
                "metrics": {"heartRateBpm": bad},
            }]});
            let errs = errors(&legacy);
            assert_eq!(pointers(&errs), ["/readings/0/metrics/heartRateBpm"]);
        }
        let errs = errors(&with(native(), "heart_rate_bpm", json!("72")));
        assert_eq!(errs[0].message, "invalid type: string \"72\", expected f64");
    }

    #[test]
    fn nested_and_enum_type_errors_point_at_the_field() {
        let cases = [
            ("consciousness", json!("drowsy"), "/consciousness"),
            ("location", json!({"lat": "51", "lng": 0}), "/location/lat"),
            ("timestamp", json!(true), "/timestamp"),
            ("timestamp", json!(1.5e12), "/timestamp"),
            ("device_id", json!(42), "/device_id"),
            ("fall_detected", json!("yes"), "/fall_detected"),
            ("location", json!([-0.12, 51.5]), "/location"),
            ("metrics", json!([72]), "/metrics"),
            ("device", json!(null), "/device"),
        ];
        for (key, value, pointer) in cases {
            let errs = errors(&with(native(), key, value));
            assert_eq!(pointers(&errs), [pointer]);
        }
        let steps = json!({"device_id": "d", "timestamp": "2026-11-23T08:00:00Z",
            "metrics": {"heartRateBpm": 70, "stepsSinceLastReading": -1}});
        assert_eq!(
            pointers(&errors(&steps)),
            ["/metrics/stepsSinceLastReading"]
        );
    }

    #[test]
    fn values_outside_the_valid_ranges_are_rejected_not_clamped() {
        let cases = [
            ("heart_rate_bpm", 19.9, 20.0, 300.0, 300.1),
            ("spo2_pct", 49.0, 50.0, 100.0, 100.5),
            ("respiration_rate_bpm", -1.0, 0.0, 80.0, 81.0),
            ("body_temp_c", 24.9, 25.0, 45.0, 45.1),
            ("systolic_bp_mmhg", 39.0, 40.0, 300.0, 301.0),
            ("diastolic_bp_mmhg", 19.0, 20.0, 200.0, 201.0),
        ];
        let base = json!({"device_id": "d", "timestamp": "2026-11-23T08:00:00Z"});
        for (key, too_low, lo, hi, too_high) in cases {
            for ok in [lo, hi] {
                assert_eq!(
                    one(&with(base.clone(), key, json!(ok)))
                        .vital(Vital::ALL[cases.iter().position(|c| c.0 == key).unwrap()]),
                    Some(ok)
                );
            }
            for bad in [too_low, too_high] {
                let errs = errors(&with(base.clone(), key, json!(bad)));
                assert_eq!(pointers(&errs), [format!("/{key}")], "{key} {bad}");
                assert!(errs[0].message.contains("outside"), "{}", errs[0].message);
            }
        }
        let hot = with(base.clone(), "body_temp_f", json!(120));
        let errs = errors(&hot);
        assert_eq!(pointers(&errs), ["/body_temp_f"]);
        assert_eq!(errs[0].message, "temperature 48.89 °C outside 25–45 °C");
    }

    #[test]
    fn diastolic_must_be_below_systolic() {
        let base = json!({"device_id": "d", "timestamp": "2026-11-23T08:00:00Z"});
        for (sys, dia) in [(120, 120), (100, 130)] {
            let body = with(
                with(base.clone(), "systolic_bp_mmhg", json!(sys)),
                "diastolic_bp_mmhg",
                json!(dia),
            );
            assert_eq!(pointers(&errors(&body)), ["/diastolic_bp_mmhg"]);
        }
        let ok = with(
            with(base, "systolic_bp_mmhg", json!(120)),
            "diastolic_bp_mmhg",
            json!(119),
        );
        assert_eq!(one(&ok).diastolic_bp_mmhg, Some(119.0));
    }

    #[test]
    fn timestamps_outside_the_window_are_rejected() {
        let limits = IngestLimits::default();
        let at = |t: DateTime<Utc>| with(native(), "timestamp", json!(t.to_rfc3339()));
        assert!(
            parse(&at(now() + limits.max_future)).items[0]
                .outcome
                .is_ok()
        );
        assert!(parse(&at(now() - limits.max_age)).items[0].outcome.is_ok());

        let future = errors(&at(now() + limits.max_future + TimeDelta::seconds(1)));
        assert_eq!(pointers(&future), ["/timestamp"]);
        assert!(
            future[0]
                .message
                .ends_with("is more than 5 min in the future")
        );
        let old = errors(&at(now() - limits.max_age - TimeDelta::milliseconds(1)));
        assert_eq!(pointers(&old), ["/timestamp"]);
        assert!(old[0].message.ends_with("is older than 24 h"));

        for bad in [
            json!("yesterday"),
            json!("2026-11-23"),
            json!("2026-11-23T08:00:00"),
            json!(u64::MAX),
        ] {
            let errs = errors(&with(native(), "timestamp", bad));
            assert_eq!(errs, [FieldError::new("/timestamp", BAD_TIME)]);
        }
        assert_eq!(
            pointers(&errors(&without(native(), "timestamp"))),
            ["/timestamp"]
        );
    }

    #[test]
    fn every_problem_of_a_reading_is_reported() {
        let body = json!({"readings": [{
            "device_id": "",
            "heart_rate_bpm": 350,
            "spo2_pct": 20,
            "body_temp_c": 37,
            "body_temp_f": 99,
            "location": {"lat": 91, "accuracy_m": -1},
        }]});
        let errs = errors(&body);
        assert_eq!(
            pointers(&errs),
            [
                "/readings/0/device_id",
                "/readings/0/timestamp",
                "/readings/0/body_temp_f",
                "/readings/0/heart_rate_bpm",
                "/readings/0/spo2_pct",
                "/readings/0/location/lat",
                "/readings/0/location/lng",
                "/readings/0/location/accuracy_m",
            ]
        );
    }

    #[test]
    fn identity_rules() {
        let long = "x".repeat(129);
        assert_eq!(
            pointers(&errors(&without(native(), "device_id"))),
            ["/device_id"]
        );
        assert_eq!(
            pointers(&errors(&with(native(), "device_id", json!(long)))),
            ["/device_id"]
        );
        assert_eq!(
            pointers(&errors(&with(native(), "patient_id", json!("")))),
            ["/patient_id"]
        );
        assert_eq!(
            one(&with(native(), "device_id", json!("é".repeat(128))))
                .device_id
                .0
                .chars()
                .count(),
            128
        );
        let conflict = with(native(), "device", json!({"id": "other"}));
        assert_eq!(pointers(&errors(&conflict)), ["/device/id"]);
        let twice = with(native(), "metrics", json!({"heartRateBpm": 72}));
        assert_eq!(pointers(&errors(&twice)), ["/metrics/heartRateBpm"]);
    }

    #[test]
    fn a_reading_needs_something_to_triage() {
        let bare = json!({"device_id": "d", "timestamp": "2026-11-23T08:00:00Z",
            "location": {"lat": 1, "lng": 2}, "on_oxygen": false, "moving": false});
        let errs = errors(&json!({"readings": [bare.clone()]}));
        assert_eq!(pointers(&errs), ["/readings/0"]);
        assert!(errs[0].message.starts_with("no vital sign"));
        assert_eq!(pointers(&errors(&bare)), [""]);

        let fall = one(&with(bare.clone(), "fall_detected", json!(true)));
        assert!(fall.fall_detected && !fall.has_vital_sign());
        assert_eq!(
            one(&with(bare.clone(), "moving", json!(true))).moving,
            Some(true)
        );
        assert!(one(&with(bare, "consciousness", json!("alert"))).has_vital_sign());
    }

    #[test]
    fn a_batch_keeps_good_readings_beside_bad_ones() {
        let body = json!({"readings": [
            native(),
            with(native(), "heart_rate_bpm", json!(-5)),
            7,
            bundle(vec![observation("8867-4", json!(72), "/min")]),
            {"resourceType": "Patient"},
            ["dev-1", "p-1", "2026-11-23T08:00:00Z", 72],
        ]});
        let items = parse(&body).items;
        let summary: Vec<(usize, Result<(), Vec<&str>>)> = items
            .iter()
            .map(|i| {
                (
                    i.index,
                    i.outcome.as_ref().map(|_| ()).map_err(|e| pointers(e)),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (0, Ok(())),
                (1, Err(vec!["/readings/1/heart_rate_bpm"])),
                (2, Err(vec!["/readings/2"])),
                (3, Ok(())),
                (4, Err(vec!["/readings/4/resourceType"])),
                (5, Err(vec!["/readings/5"])),
            ]
        );
    }

    #[test]
    fn batch_size_is_limited() {
        let batch = |n: usize| json!({"readings": vec![native(); n]});
        assert_eq!(parse(&batch(1000)).items.len(), 1000);
        let err = body_error(batch(1001).to_string().as_bytes());
        assert_eq!(
            err,
            BodyError::TooMany {
                pointer: "/readings".into(),
                max: 1000,
                got: 1001
            }
        );
        assert_eq!(err.pointer(), "/readings");
        assert!(parse(&json!({"readings": []})).items.is_empty());

        let entries = vec![observation("8867-4", json!(72), "/min"); 1001];
        assert_eq!(
            body_error(bundle(entries).to_string().as_bytes()).pointer(),
            "/entry"
        );
    }

    #[test]
    fn malformed_bodies_are_not_json() {
        for (body, line, column) in [
            (&b""[..], 1, 0),
            (b"{\"device_id\": ", 1, 14),
            (b"{\n  \"readings\": [1,]\n}", 2, 18),
            (b"{\"readings\": 5, oops}", 1, 17),
            (b"{\"a\": \"\xff\"}", 1, 8),
            (b"{} {}", 1, 4),
        ] {
            match body_error(body) {
                BodyError::Malformed {
                    line: l, column: c, ..
                } => {
                    assert_eq!((l, c), (line, column), "{}", String::from_utf8_lossy(body))
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn json_that_is_not_a_reading_shape() {
        for body in ["42", "[]", "\"x\"", "null", "[{\"device_id\": \"d\"}]"] {
            let err = body_error(body.as_bytes());
            assert!(
                matches!(&err, BodyError::NotAReading { pointer, .. } if pointer.is_empty()),
                "{err:?}"
            );
        }
        for body in [
            r#"{"readings": {}}"#,
            r#"{"readings": null}"#,
            r#"{"readings": "x"}"#,
        ] {
            assert_eq!(body_error(body.as_bytes()).pointer(), "/readings", "{body}");
        }
        let patient = json!({"resourceType": "Patient", "id": "p"});
        assert_eq!(
            body_error(patient.to_string().as_bytes()).pointer(),
            "/resourceType"
        );
        let entries = json!({"resourceType": "Bundle", "entry": {}});
        assert_eq!(
            body_error(entries.to_string().as_bytes()).pointer(),
            "/entry"
        );
    }

    #[test]
    fn fhir_units_and_values_are_checked() {
        let wrong_unit = bundle(vec![
            observation("8867-4", json!(72), "/min"),
            observation("8310-5", json!(37), "K"),
        ]);
        assert_eq!(
            errors(&wrong_unit),
            [FieldError::new(
                "/entry/1/resource/valueQuantity/code",
                "unit \"K\" is not Cel or [degF] for temperature"
            )]
        );

        let mut unit_only = observation("8867-4", json!(72), "/min");
        unit_only["valueQuantity"] = json!({"value": 72, "unit": "bpm"});
        assert_eq!(pointers(&errors(&unit_only)), ["/valueQuantity/unit"]);
        unit_only["valueQuantity"] = json!({"value": 72, "unit": "/min"});
        assert_eq!(one(&unit_only).heart_rate_bpm, Some(72.0));

        let panel = bp_panel(json!(128), json!(82));
        let mut mmhg = panel.clone();
        mmhg["component"][1]["valueQuantity"]["code"] = json!("mmHg");
        assert_eq!(
            pointers(&errors(&mmhg)),
            ["/component/1/valueQuantity/code"]
        );
        let mut system = panel.clone();
        system["component"][0]["valueQuantity"]["system"] = json!("http://example.org");
        assert_eq!(
            pointers(&errors(&system)),
            ["/component/0/valueQuantity/system"]
        );

        let text = bundle(vec![observation("8867-4", json!("72"), "/min")]);
        assert_eq!(
            pointers(&errors(&text)),
            ["/entry/0/resource/valueQuantity/value"]
        );
        let high = json!({"readings": [bundle(vec![observation("8867-4", json!(400), "/min")])]});
        let errs = errors(&high);
        assert_eq!(
            pointers(&errs),
            ["/readings/0/entry/0/resource/valueQuantity/value"]
        );
        let inverted = bp_panel(json!(80), json!(90));
        assert_eq!(
            pointers(&errors(&inverted)),
            ["/component/1/valueQuantity/value"]
        );

        let mut absent = observation("8867-4", json!(72), "/min");
        let map = absent.as_object_mut().unwrap();
        map.remove("valueQuantity");
        map.insert("dataAbsentReason".into(), json!({"text": "off wrist"}));
        assert!(errors(&absent)[0].message.starts_with("no vital sign"));
    }

    #[test]
    fn duplicated_names_are_refused_where_they_are() {
        let at = |text: &str| -> Vec<String> {
            match parse_body(text.as_bytes(), now(), &IngestLimits::default()) {
                Ok(parsed) => parsed
                    .items
                    .into_iter()
                    .flat_map(|i| i.outcome.err().unwrap_or_default())
                    .map(|e| format!("{} {}", e.pointer, e.message))
                    .collect(),
                Err(e) => vec![format!("{} {e}", e.pointer())],
            }
        };
        let reading =
            r#"{"device_id": "d", "timestamp": "2026-11-23T08:00:00Z", "heart_rate_bpm": 72"#;
        assert_eq!(
            at(&format!(r#"{reading}, "heart_rate_bpm": 250}}"#)),
            ["/heart_rate_bpm duplicate field `heart_rate_bpm`"]
        );
        assert_eq!(
            at(&format!(
                r#"{{"readings": [{reading}}}, {reading}, "location": {{"lat": 1, "lat": 2, "lng": 3}}}}]}}"#
            )),
            ["/readings/1/location/lat duplicate field `lat`"]
        );
        assert_eq!(
            at(r#"{"readings": [], "readings": []}"#),
            ["/readings duplicate field `readings`"]
        );
        let mut fhir = observation("8867-4", json!(72), "/min").to_string();
        fhir.insert_str(1, r#""status": "final", "#);
        assert_eq!(at(&fhir), ["/status duplicate field `status`"]);
        let mut text = observation("8867-4", json!(72), "/min").to_string();
        text.insert_str(1, "\"note\": \"\\u0000\", ");
        assert_eq!(
            at(&text)[0],
            "/note must not contain control characters other than tab and line breaks (found U+0000)"
        );
    }

    #[test]
    fn fhir_identity_time_and_duplicates() {
        let mut anonymous = observation("8867-4", json!(72), "/min");
        anonymous.as_object_mut().unwrap().remove("device");
        anonymous["effectiveDateTime"] = json!("2026-11-23");
        anonymous["subject"]["reference"] = json!("Group/7");
        assert_eq!(
            pointers(&errors(&anonymous)),
            [
                "/device/identifier/value",
                "/effectiveDateTime",
                "/subject/reference"
            ]
        );

        let mut url = observation("8867-4", json!(72), "/min");
        url["subject"]["reference"] = json!("https://fhir.example/Patient/p-1/_history/2");
        assert_eq!(one(&url).patient_id, Some(PatientId::from("p-1")));

        let mut late = observation("8867-4", json!(72), "/min");
        late["effectiveDateTime"] = json!("2026-11-23T09:00:00Z");
        assert_eq!(pointers(&errors(&late)), ["/effectiveDateTime"]);

        let twice = bundle(vec![
            observation("8867-4", json!(72), "/min"),
            observation("8867-4", json!(74), "/min"),
        ]);
        assert_eq!(
            pointers(&errors(&twice)),
            ["/entry/1/resource/valueQuantity/value"]
        );

        let mut other_patient = observation("2708-6", json!(97), "%");
        other_patient["subject"]["reference"] = json!("Patient/p-2");
        let conflict = bundle(vec![
            observation("8867-4", json!(72), "/min"),
            other_patient,
        ]);
        assert_eq!(
            pointers(&errors(&conflict)),
            ["/entry/1/resource/subject/reference"]
        );
    }

    #[test]
    fn json_pointer_tokens_are_escaped() {
        let mut pointer = String::from("/readings/0");
        push_pointer_token(&mut pointer, "a/b~c");
        assert_eq!(pointer, "/readings/0/a~1b~0c");
    }

    mod never_panics {
        use super::*;
        use proptest::prelude::*;

        fn any_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                "[a-zA-Z0-9:./+ -]{0,30}".prop_map(Value::from),
                Just(json!("2026-11-23T08:00:00Z")),
                Just(json!("NaN")),
            ];
            leaf.prop_recursive(4, 64, 8, |inner| {
                let keys = prop_oneof![
                    "[a-zA-Z_]{1,12}",
                    Just("readings".to_owned()),
                    Just("resourceType".to_owned()),
                    Just("entry".to_owned()),
                    Just("resource".to_owned()),
                    Just("component".to_owned()),
                    Just("valueQuantity".to_owned()),
                    Just("metrics".to_owned()),
                    Just("device".to_owned()),
                    Just("location".to_owned()),
                ];
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                    prop::collection::btree_map(keys, inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Valid readings of each shape, to be mutated.
        fn seeds() -> Vec<Value> {
            let legacy = json!({"device": {"id": "d"}, "timestamp": 1_795_420_800_000_i64,
                "location": {"lat": 1, "lng": 2}, "metrics": {"heartRateBpm": 70}});
            vec![
                native(),
                legacy,
                bundle(vec![
                    observation("8867-4", json!(72), "/min"),
                    bp_panel(json!(120), json!(80)),
                ]),
                bp_panel(json!(120), json!(80)),
            ]
        }

        /// Replaces the value at a path (chosen by `choice`) with `replacement`.
        fn mutate(value: &mut Value, mut choice: usize, replacement: Value) {
            let mut node = value;
            loop {
                let len = match &*node {
                    Value::Object(m) => m.len(),
                    Value::Array(a) => a.len(),
                    _ => 0,
                };
                if len == 0 || choice.is_multiple_of(4) {
                    *node = replacement;
                    return;
                }
                let i = (choice / 4) % len;
                choice /= 7;
                node = match node {
                    Value::Object(m) => m.values_mut().nth(i).unwrap(),
                    Value::Array(a) => &mut a[i],
                    _ => unreachable!(),
                };
            }
        }

        proptest! {
            #[test]
            fn random_json(value in any_json()) {
                let _ = parse_body(value.to_string().as_bytes(), now(), &IngestLimits::default());
                let batch = json!({"readings": [value]});
                let _ = parse_body(batch.to_string().as_bytes(), now(), &IngestLimits::default());
            }

            #[test]
            fn mutated_readings(seed in 0..4_usize, choice in any::<usize>(), replacement in any_json(), batch in any::<bool>()) {
                let mut value = seeds().swap_remove(seed);
                mutate(&mut value, choice, replacement);
                let body = if batch { json!({"readings": [native(), value]}) } else { value };
                let parsed = parse_body(body.to_string().as_bytes(), now(), &IngestLimits::default());
                if batch {
                    let items = parsed.unwrap().items;
                    prop_assert!(items[0].outcome.is_ok());
                }
            }

            #[test]
            fn mangled_bytes(seed in 0..4_usize, at in any::<usize>(), byte in any::<u8>(), cut in any::<bool>()) {
                let mut bytes = seeds().swap_remove(seed).to_string().into_bytes();
                let at = at % bytes.len();
                if cut { bytes.truncate(at) } else { bytes[at] = byte }
                let _ = parse_body(&bytes, now(), &IngestLimits::default());
            }
        }
    }
}
