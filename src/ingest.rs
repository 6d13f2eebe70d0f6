//! One door for readings over every transport: an ingest body (one reading, a batch, a FHIR
//! Observation or Bundle; native or legacy shapes) is parsed and validated by
//! `domain::vitals`, admitted against the in-flight bound, and applied through the
//! [`DeviceRouter`] wherever the device actors run. `POST /api/v1/vitals`, the gateway
//! WebSocket and the buses (`bus/`) all call [`ingest_with`], so a reading means the same and a
//! refusal names the same fields whichever way it came.

use std::sync::Arc;

use chrono::Utc;
use serde::Serialize;

use crate::actors::device::{DeviceRouter, ReadingOutcome, register};
use crate::domain::ids::{DeviceId, IncidentId};
use crate::domain::news2::{News2, News2Param, News2Risk};
use crate::domain::patients::Device;
use crate::domain::triage::TriageStatus;
use crate::domain::validation::FieldError;
use crate::domain::vitals::{BodyError, IngestLimits, Reading, parse_body};
use crate::persistence::{Db, StoreError};

/// Why a whole ingest body was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The body is not JSON, not a reading, or too big a batch (400/422).
    #[error(transparent)]
    Body(#[from] BodyError),
    /// No reading was accepted: every one is refused, each problem with its pointer (422).
    #[error("no reading was accepted")]
    Refused(Vec<Rejected>),
    /// The in-flight bound is reached: retry shortly (503).
    #[error("ingest is at capacity; retry shortly")]
    AtCapacity,
    /// A device's state could not be stored or reached right now: retry (503; a repeated
    /// reading is recognised).
    #[error(
        "device state could not be stored; retry the request (repeated readings are recognised)"
    )]
    Unavailable,
}

impl IngestError {
    /// Whether sending the same body again later may succeed (capacity, a store or a shard
    /// moving), as opposed to a refusal of the body itself.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::AtCapacity | Self::Unavailable)
    }
}

/// NEWS2 as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct News2Brief {
    /// Aggregate of the parameters present.
    pub score: u8,
    /// `low`, `low_medium`, `medium` or `high`.
    #[schema(value_type = String)]
    pub risk: News2Risk,
    /// Parameters the reading did not supply (never counted as 0).
    #[schema(value_type = Vec<String>)]
    pub missing: Vec<News2Param>,
}

impl From<News2> for News2Brief {
    fn from(n: News2) -> Self {
        Self {
            score: n.score,
            risk: n.risk,
            missing: n.missing,
        }
    }
}

/// The triage of one accepted reading.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReadingResult {
    /// Position in the request.
    pub index: usize,
    /// The wearable that measured it.
    #[schema(value_type = String)]
    pub device_id: DeviceId,
    /// `normal`, `abnormal` or `emergency`.
    #[schema(value_type = String)]
    pub status: TriageStatus,
    /// Why, for people.
    pub reasons: Vec<String>,
    /// NEWS2 (partial when parameters are missing).
    pub news2: News2Brief,
    /// The incident the reading was handed to.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub incident_id: Option<IncidentId>,
}

/// A rejected reading and why.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Rejected {
    /// Position in the request.
    pub index: usize,
    /// Every problem, with a pointer into the request.
    #[schema(value_type = Vec<Object>)]
    pub errors: Vec<FieldError>,
    /// Why, as a label for metrics and logs (not part of the answer: `errors` says it to
    /// people).
    #[serde(skip)]
    pub reason: Refusal,
}

/// Why a reading was refused, as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// It failed validation (a field out of range, missing, malformed).
    Invalid,
    /// Its device is not registered.
    UnknownDevice,
    /// It names a patient SHERS does not know (a device to be bound to it).
    UnknownPatient,
    /// Its device is registered to a different patient.
    DeviceClaimed,
    /// Its device is not the one the transport identified (an MQTT topic's device).
    WrongDevice,
}

impl Refusal {
    /// The label: `invalid`, `unknown_device`, `unknown_patient`, `device_claimed`,
    /// `wrong_device`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::UnknownDevice => "unknown_device",
            Self::UnknownPatient => "unknown_patient",
            Self::DeviceClaimed => "device_claimed",
            Self::WrongDevice => "wrong_device",
        }
    }
}

/// The answer to an ingest body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IngestResponse {
    /// How many readings were accepted.
    pub accepted: usize,
    /// The readings refused, with reasons.
    pub rejected: Vec<Rejected>,
    /// The triage of each accepted reading.
    pub results: Vec<ReadingResult>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Single,
    Batch,
    Bundle,
}

/// Where a body's readings sit, for error pointers (only computed when a reading is refused
/// after parsing, which is rare).
fn shape_of(body: &[u8]) -> Shape {
    #[derive(serde::Deserialize)]
    struct Probe<'a> {
        readings: Option<serde::de::IgnoredAny>,
        #[serde(rename = "resourceType", borrow)]
        resource_type: Option<&'a str>,
    }
    match serde_json::from_slice::<Probe<'_>>(body) {
        Ok(p) if p.readings.is_some() => Shape::Batch,
        Ok(p) if p.resource_type == Some("Bundle") => Shape::Bundle,
        _ => Shape::Single,
    }
}

fn pointer(shape: Shape, index: usize, field: &str) -> String {
    match (shape, field) {
        (Shape::Single, f) => format!("/{f}"),
        (Shape::Batch, f) => format!("/readings/{index}/{f}"),
        (Shape::Bundle, "device_id") => format!("/entry/{index}/resource/device/identifier/value"),
        (Shape::Bundle, _) => format!("/entry/{index}/resource/subject/reference"),
    }
}

/// Files each device outcome as a result or a rejection (its pointer follows `body`'s
/// shape); an `Unavailable` outcome fails the whole body.
fn file_outcomes(
    body: &[u8],
    outcomes: Vec<(usize, Filed)>,
    results: &mut Vec<ReadingResult>,
    rejected: &mut Vec<Rejected>,
) -> Result<(), IngestError> {
    let mut shape = None;
    for (index, outcome) in outcomes {
        let (field, message, reason) = match outcome {
            Filed::Device(ReadingOutcome::Accepted(a)) => {
                results.push(ReadingResult {
                    index,
                    device_id: a.device_id,
                    status: a.status,
                    reasons: a.reasons,
                    news2: a.news2.into(),
                    incident_id: a.incident_id,
                });
                continue;
            }
            Filed::Device(ReadingOutcome::Unavailable) => return Err(IngestError::Unavailable),
            Filed::Device(ReadingOutcome::UnknownDevice) => (
                "device_id",
                "unknown device: register it with POST /api/v1/devices",
                Refusal::UnknownDevice,
            ),
            Filed::Device(ReadingOutcome::PatientMismatch) => (
                "patient_id",
                "the device is registered to a different patient",
                Refusal::DeviceClaimed,
            ),
            Filed::UnknownPatient => (
                "patient_id",
                "unknown patient: the device cannot be bound to it",
                Refusal::UnknownPatient,
            ),
        };
        let shape = *shape.get_or_insert_with(|| shape_of(body));
        rejected.push(Rejected {
            index,
            errors: vec![FieldError::new(pointer(shape, index, field), message)],
            reason,
        });
    }
    Ok(())
}

/// A device's answer, or what the ingest itself found.
enum Filed {
    Device(ReadingOutcome),
    /// The reading's device is unknown and so is the patient it names.
    UnknownPatient,
}

/// What becomes of a reading from a device SHERS does not know.
#[derive(Clone, Copy)]
pub enum UnknownDevices<'a> {
    /// It is refused: devices are registered first (`POST /api/v1/devices`).
    Refuse,
    /// The device is bound to the patient the reading names, when that patient exists (as
    /// SHERS's wearable service did), and the reading applied.
    BindToPatient(&'a Db),
}

/// Parses one ingest body and applies its readings through `devices`, at most `gate`'s
/// permits of readings in flight; readings of unknown devices are refused.
pub async fn ingest_with(
    devices: &dyn DeviceRouter,
    gate: &Arc<tokio::sync::Semaphore>,
    body: &[u8],
) -> Result<IngestResponse, IngestError> {
    ingest(devices, gate, body, Expect::default()).await
}

/// What a transport knows of a body before it is read.
#[derive(Clone, Copy)]
pub struct Expect<'a> {
    /// What becomes of readings from unknown devices.
    pub unknown: UnknownDevices<'a>,
    /// The device every reading must come from (an MQTT topic's), when the transport
    /// identified it; a reading naming another device is refused.
    pub device: Option<&'a str>,
}

impl Default for Expect<'_> {
    fn default() -> Self {
        Self {
            unknown: UnknownDevices::Refuse,
            device: None,
        }
    }
}

/// [`ingest_with`], for a transport that identifies the device or binds unknown devices.
pub async fn ingest(
    devices: &dyn DeviceRouter,
    gate: &Arc<tokio::sync::Semaphore>,
    body: &[u8],
    expect: Expect<'_>,
) -> Result<IngestResponse, IngestError> {
    let now = Utc::now();
    let parsed = parse_body(body, now, &IngestLimits::default()).map_err(IngestError::Body)?;
    let total = parsed.items.len();
    let mut rejected = Vec::new();
    let mut readings = Vec::with_capacity(total);
    let mut shape = None;
    for item in parsed.items {
        match item.outcome {
            Ok(reading)
                if expect
                    .device
                    .is_some_and(|d| d != reading.device_id.as_str()) =>
            {
                let shape = *shape.get_or_insert_with(|| shape_of(body));
                rejected.push(Rejected {
                    index: item.index,
                    errors: vec![FieldError::new(
                        pointer(shape, item.index, "device_id"),
                        "the reading names another device than the topic it was published on",
                    )],
                    reason: Refusal::WrongDevice,
                });
            }
            Ok(reading) => readings.push((item.index, reading)),
            Err(errors) => rejected.push(Rejected {
                index: item.index,
                errors,
                reason: Refusal::Invalid,
            }),
        }
    }

    let mut results = Vec::with_capacity(readings.len());
    if !readings.is_empty() {
        let permits = u32::try_from(readings.len()).unwrap_or(u32::MAX);
        let _permit = gate
            .clone()
            .try_acquire_many_owned(permits)
            .map_err(|_| IngestError::AtCapacity)?;
        let outcomes = match expect.unknown {
            UnknownDevices::Refuse => devices
                .apply(readings)
                .await
                .into_iter()
                .map(|(i, o)| (i, Filed::Device(o)))
                .collect(),
            UnknownDevices::BindToPatient(db) => apply_binding(devices, db, readings, now).await?,
        };
        file_outcomes(body, outcomes, &mut results, &mut rejected)?;
    }
    rejected.sort_by_key(|r| r.index);
    // Nothing accepted (a single bad reading, or a batch of only bad ones): a 422 naming the
    // fields, rather than a 200 that reads like success.
    if results.is_empty() && !rejected.is_empty() {
        return Err(IngestError::Refused(rejected));
    }
    Ok(IngestResponse {
        accepted: results.len(),
        rejected,
        results,
    })
}

/// Applies `readings`; those of unknown devices that name a known patient bind their device
/// to it and are applied again.
async fn apply_binding(
    devices: &dyn DeviceRouter,
    db: &Db,
    readings: Vec<(usize, Reading)>,
    now: chrono::DateTime<Utc>,
) -> Result<Vec<(usize, Filed)>, IngestError> {
    let copies: Vec<(usize, Reading)> = readings.clone();
    let mut outcomes: Vec<(usize, Filed)> = devices
        .apply(readings)
        .await
        .into_iter()
        .map(|(i, o)| (i, Filed::Device(o)))
        .collect();
    let mut again = Vec::new();
    for (slot, (index, outcome)) in outcomes.iter_mut().enumerate() {
        if !matches!(outcome, Filed::Device(ReadingOutcome::UnknownDevice)) {
            continue;
        }
        let Some(reading) = copies.iter().find(|(i, _)| i == index).map(|(_, r)| r) else {
            continue;
        };
        let Some(patient_id) = reading.patient_id.clone() else {
            continue;
        };
        let device = Device {
            id: reading.device_id.clone(),
            patient_id,
            model: None,
            registered_at: now,
        };
        match register(db, device).await {
            Ok(true) | Err(StoreError::Conflict(_)) => again.push((slot, reading.clone())),
            Ok(false) => *outcome = Filed::UnknownPatient,
            Err(e) => {
                tracing::warn!(error = %e, "binding a device to its patient failed");
                return Err(IngestError::Unavailable);
            }
        }
    }
    if !again.is_empty() {
        let slots: Vec<usize> = again.iter().map(|(slot, _)| *slot).collect();
        let retried = devices
            .apply(
                again
                    .into_iter()
                    .map(|(slot, r)| (outcomes[slot].0, r))
                    .collect(),
            )
            .await;
        for (slot, (_, outcome)) in slots.into_iter().zip(retried) {
            outcomes[slot].1 = Filed::Device(outcome);
        }
    }
    Ok(outcomes)
}
