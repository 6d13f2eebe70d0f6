//! Vitals ingest: `POST /api/v1/vitals` and the gateway WebSocket `GET /api/v1/ws/gateway`.
//!
//! Both take the same bodies and give the same answer. The body is parsed and validated by
//! `domain::vitals` on this worker thread, then handed to the [`DeviceRouter`], whose device
//! actors triage (`domain::triage`) and apply each reading wherever they run; the answer is
//! sent once the device state (and any status event) is durable. Admission control bounds the
//! readings in flight: beyond it, 503 + `Retry-After`.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::Utc;
use serde::Serialize;

use super::AppState;
use super::auth::{Authorized, Policy};
use super::error::ApiError;
use super::json::read_body;
use super::ws::{Incoming, Socket};
use crate::actors::device::DeviceRouter;
use crate::actors::device::ReadingOutcome;
use crate::domain::auth::Role;
use crate::domain::ids::{DeviceId, IncidentId};
use crate::domain::news2::{News2, News2Param, News2Risk};
use crate::domain::triage::TriageStatus;
use crate::domain::validation::FieldError;
use crate::domain::vitals::{BodyError, IngestLimits, parse_body};

/// Wearable gateways only.
pub struct GatewayOnly;
impl Policy for GatewayOnly {
    const ROLES: &'static [Role] = &[Role::Gateway];
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

fn body_error(e: BodyError) -> ApiError {
    let pointer = e.pointer().to_owned();
    let message = e.to_string();
    match e {
        BodyError::Malformed { .. } => ApiError::Malformed {
            detail: message.clone(),
            errors: vec![FieldError::new(pointer, message)],
        },
        BodyError::TooMany { .. } | BodyError::NotAReading { .. } => ApiError::Validation {
            detail: format!("{pointer}: {message}"),
            errors: vec![FieldError::new(pointer, message)],
        },
    }
}

/// Files each device outcome as a result or a rejection (its pointer follows `body`'s
/// shape); an `Unavailable` outcome fails the whole request.
fn file_outcomes(
    body: &[u8],
    outcomes: Vec<(usize, ReadingOutcome)>,
    results: &mut Vec<ReadingResult>,
    rejected: &mut Vec<Rejected>,
) -> Result<(), ApiError> {
    let mut shape = None;
    for (index, outcome) in outcomes {
        match outcome {
            ReadingOutcome::Accepted(a) => {
                results.push(ReadingResult {
                    index,
                    device_id: a.device_id,
                    status: a.status,
                    reasons: a.reasons,
                    news2: a.news2.into(),
                    incident_id: a.incident_id,
                });
            }
            ReadingOutcome::UnknownDevice => {
                let shape = *shape.get_or_insert_with(|| shape_of(body));
                rejected.push(Rejected {
                    index,
                    errors: vec![FieldError::new(
                        pointer(shape, index, "device_id"),
                        "unknown device: register it with POST /api/v1/devices",
                    )],
                });
            }
            ReadingOutcome::PatientMismatch => {
                let shape = *shape.get_or_insert_with(|| shape_of(body));
                rejected.push(Rejected {
                    index,
                    errors: vec![FieldError::new(
                        pointer(shape, index, "patient_id"),
                        "the device is registered to a different patient",
                    )],
                });
            }
            ReadingOutcome::Unavailable => {
                return Err(ApiError::Unavailable {
                    detail: "device state could not be stored; retry the request \
                             (repeated readings are recognised)"
                        .to_owned(),
                    retry_after_s: 1,
                });
            }
        }
    }
    Ok(())
}

/// Parses, triages and applies one ingest body.
pub async fn ingest_body(state: &AppState, body: &[u8]) -> Result<IngestResponse, ApiError> {
    ingest_with(state.devices.as_ref(), &state.ingest_gate, body).await
}

/// Parses one ingest body and applies its readings through `devices`, at most `gate`'s
/// permits of readings in flight.
pub async fn ingest_with(
    devices: &dyn DeviceRouter,
    gate: &Arc<tokio::sync::Semaphore>,
    body: &[u8],
) -> Result<IngestResponse, ApiError> {
    let now = Utc::now();
    let parsed = parse_body(body, now, &IngestLimits::default()).map_err(body_error)?;
    let total = parsed.items.len();
    let mut rejected = Vec::new();
    let mut readings = Vec::with_capacity(total);
    for item in parsed.items {
        match item.outcome {
            Ok(reading) => readings.push((item.index, reading)),
            Err(errors) => rejected.push(Rejected {
                index: item.index,
                errors,
            }),
        }
    }

    let mut results = Vec::with_capacity(readings.len());
    if !readings.is_empty() {
        let permits = u32::try_from(readings.len()).unwrap_or(u32::MAX);
        let _permit =
            gate.clone()
                .try_acquire_many_owned(permits)
                .map_err(|_| ApiError::Unavailable {
                    detail: "ingest is at capacity; retry shortly".to_owned(),
                    retry_after_s: 1,
                })?;
        let outcomes = devices.apply(readings).await;
        file_outcomes(body, outcomes, &mut results, &mut rejected)?;
    }
    rejected.sort_by_key(|r| r.index);
    // Nothing accepted (a single bad reading, or a batch of only bad ones): a 422 naming the
    // fields, rather than a 200 that reads like success.
    if results.is_empty() && !rejected.is_empty() {
        return Err(ApiError::fields(
            rejected.into_iter().flat_map(|r| r.errors).collect(),
        ));
    }
    Ok(IngestResponse {
        accepted: results.len(),
        rejected,
        results,
    })
}

/// Ingests one reading or a batch of up to 1,000 (native, legacy wearable or FHIR shapes).
#[utoipa::path(post, path = "/api/v1/vitals", tag = "vitals", security(("bearer" = [])),
    request_body(content = Object, description = "a reading, {readings: [..]}, or a FHIR Observation/Bundle"),
    responses((status = 200, body = IngestResponse),
              (status = 400, body = super::error::Problem),
              (status = 413, body = super::error::Problem),
              (status = 422, body = super::error::Problem),
              (status = 503, body = super::error::Problem)))]
pub async fn ingest(
    _auth: Authorized<GatewayOnly>,
    state: web::Data<AppState>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, &mut payload).await?;
    let response = ingest_body(&state, &body).await?;
    Ok(HttpResponse::Ok().json(response))
}

/// The gateway WebSocket: each text frame is an ingest body, answered by one frame.
#[utoipa::path(get, path = "/api/v1/ws/gateway", tag = "vitals", security(("bearer" = [])),
    params(("access_token" = Option<String>, Query, description = "the token, for clients that cannot set Authorization on an upgrade")),
    responses((status = 101, description = "WebSocket upgrade")))]
pub async fn gateway_ws(
    _auth: Authorized<GatewayOnly>,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    gateway_session(
        state.devices.clone(),
        state.ingest_gate.clone(),
        state.settings.http.body_limit_bytes,
        state.closing.clone(),
        &req,
        body,
    )
}

/// Upgrades `req` to a gateway WebSocket whose frames are applied through `ingest`; it closes
/// when `closing` turns true. A cluster node's front serves it with the node's device shards.
pub fn gateway_session(
    devices: Arc<dyn DeviceRouter>,
    gate: Arc<tokio::sync::Semaphore>,
    frame_limit: usize,
    closing: tokio::sync::watch::Receiver<bool>,
    req: &HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    let (response, session, stream) = actix_ws::handle(req, body)?;
    let mut socket = Socket::new(session, stream, frame_limit, closing);
    actix_web::rt::spawn(async move {
        let reason = loop {
            let reply = match socket.next().await {
                Incoming::Text(text) => {
                    match ingest_with(devices.as_ref(), &gate, text.as_bytes()).await {
                        Ok(answer) => serde_json::to_string(&answer),
                        Err(err) => serde_json::to_string(&err.problem()),
                    }
                }
                Incoming::Binary => {
                    serde_json::to_string(&ApiError::UnsupportedMediaType.problem())
                }
                Incoming::Tick => continue,
                Incoming::Closed(reason) => break reason,
            };
            let Ok(reply) = reply else { break None };
            if socket.send(reply).await.is_err() {
                break None;
            }
        };
        socket.close(reason).await;
    });
    Ok(response)
}
