//! Incidents over HTTP (`docs/api.md` "Incidents"): create (idempotent), list, detail, cancel.
//! Handlers validate and authorise, then send a message to the incident directory.

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::AppState;
use super::auth::{Authorized, Policy};
use super::error::ApiError;
use super::json::JsonBody;
use crate::actors::incident::{IncidentError, OpenIncident, OpenRequest, Route};
use crate::domain::auth::{Principal, Role};
use crate::domain::events::Evidence;
use crate::domain::geo::LatLng;
use crate::domain::ids::{IncidentId, PatientId};
use crate::domain::incident::{Command, Incident, Priority, Source, Times};
use crate::domain::validation::{TextKind, check_id, check_text};
use crate::persistence::incidents::{
    self as store, IdempotencyState, NotificationView, StatusFilter,
};

/// Dispatchers (and admins), and patients for themselves.
pub struct ConsoleOrPatient;
impl Policy for ConsoleOrPatient {
    const ROLES: &'static [Role] = &[Role::Console, Role::Patient];
}

/// Who is calling in about the incident (patient data: stored as evidence, never logged).
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Caller {
    /// Its name, for people.
    #[serde(default)]
    pub name: Option<String>,
    /// Call-back number.
    #[serde(default)]
    pub phone: Option<String>,
}

/// `POST /api/v1/incidents` body.
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewIncident {
    /// The patient (a patient token may only name itself; omitted means itself).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub patient_id: Option<PatientId>,
    /// Where help is needed (defaults to the patient's home).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub location: Option<LatLng>,
    /// `emergency` (default), `urgent` or `non_urgent`.
    #[serde(default)]
    pub priority: Option<Priority>,
    /// What happened.
    #[serde(default)]
    pub description: Option<String>,
    /// Who is calling.
    #[serde(default)]
    pub caller: Option<Caller>,
}

/// The full incident as `docs/api.md` shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IncidentView {
    /// Its stable identifier.
    #[schema(value_type = String)]
    pub id: IncidentId,
    /// `INC-2026-000042`.
    pub reference: String,
    /// Lifecycle status.
    #[schema(value_type = String)]
    pub status: crate::domain::incident::IncidentStatus,
    /// Clinical priority: `emergency`, `urgent` or `non_urgent`.
    #[schema(value_type = String)]
    pub priority: Priority,
    /// What opened it: a wearable alarm, a patient request or a dispatcher.
    #[schema(value_type = String)]
    pub source: Source,
    /// The patient, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub patient_id: Option<PatientId>,
    /// Its position (WGS 84).
    #[schema(value_type = Object)]
    pub location: LatLng,
    /// What happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Opened at.
    pub created_at: DateTime<Utc>,
    /// Handed to dispatchers.
    pub escalated: bool,
    /// Unit on the job.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub assigned_unit_id: Option<crate::domain::ids::UnitId>,
    /// The hospital the patient is taken to.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub hospital_id: Option<crate::domain::ids::HospitalId>,
    /// ETA of the assigned unit in seconds (with dispatch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u32>,
    /// NEMSIS times.
    pub times: Times,
    /// Why it was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
    /// Offers made (with dispatch).
    #[schema(value_type = Vec<Object>)]
    pub offers: Vec<serde_json::Value>,
    /// Evidence, oldest first.
    #[schema(value_type = Vec<Object>)]
    pub evidence: Vec<serde_json::Value>,
    /// Next-of-kin notifications.
    #[schema(value_type = Vec<Object>)]
    pub notifications: Vec<NotificationView>,
    /// The invoice (with billing).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub invoice: Option<serde_json::Value>,
}

/// The incident without its evidence, offers and notifications.
pub fn summary_of(i: Incident) -> IncidentView {
    summary(i)
}

fn summary(i: Incident) -> IncidentView {
    IncidentView {
        id: i.id,
        reference: i.reference,
        status: i.status,
        priority: i.priority,
        source: i.source,
        patient_id: i.patient_id,
        location: i.location,
        description: i.description,
        created_at: i.created_at,
        escalated: i.escalated,
        assigned_unit_id: i.assigned_unit_id,
        hospital_id: i.hospital_id,
        eta_s: None,
        times: i.times,
        cancel_reason: i.cancel_reason,
        offers: Vec::new(),
        evidence: Vec::new(),
        notifications: Vec::new(),
        invoice: None,
    }
}

async fn detail(state: &AppState, incident: Incident) -> Result<IncidentView, ApiError> {
    let id = incident.id;
    let (evidence, notifications, offers, invoice) = state
        .db
        .run(move |conn| async move {
            // Four independent reads: one round trip on PostgreSQL.
            let mut conn = conn.pipelined();
            let ((evidence, notifications), (offers, invoice)) = conn
                .try_both(
                    async |c| {
                        c.try_both(
                            async |c| store::evidence_for(c, id).await,
                            async |c| store::notifications_for(c, id).await,
                        )
                        .await
                    },
                    async |c| {
                        c.try_both(
                            async |c| crate::persistence::fleet::offers_for(c, id).await,
                            async |c| crate::persistence::invoices::for_incident(c, id).await,
                        )
                        .await
                    },
                )
                .await?;
            Ok::<_, crate::persistence::StoreError>((evidence, notifications, offers, invoice))
        })
        .await?;
    let mut view = summary(incident);
    view.evidence = evidence
        .into_iter()
        .map(|(at, mut e)| {
            if let Some(obj) = e.as_object_mut() {
                obj.insert("added_at".to_owned(), json!(at));
            }
            e
        })
        .collect();
    view.notifications = notifications;
    view.invoice = invoice.map(|inv| invoice_view(&inv));
    view.eta_s = offers
        .iter()
        .find(|o| o.status == "accepted")
        .map(|o| o.eta_s);
    view.offers = offers
        .into_iter()
        .filter_map(|o| serde_json::to_value(o).ok())
        .collect();
    Ok(view)
}

pub(crate) fn incident_error(e: IncidentError) -> ApiError {
    match e {
        IncidentError::Rejected(r) => ApiError::Conflict {
            detail: r.to_string(),
            extensions: Default::default(),
        },
        IncidentError::Conflict => ApiError::Conflict {
            detail: e.to_string(),
            extensions: Default::default(),
        },
        IncidentError::NotFound => ApiError::not_found("no incident with this id"),
        IncidentError::UnknownPatient => ApiError::field("/patient_id", e.to_string()),
        IncidentError::NoLocation => ApiError::field("/location", e.to_string()),
        IncidentError::Store(s) => s.into(),
        IncidentError::Actor(a) => a.into(),
    }
}

pub(crate) fn mailbox(_: actix::MailboxError) -> ApiError {
    ApiError::Unavailable {
        detail: "the incident directory is busy; retry shortly".to_owned(),
        retry_after_s: 1,
    }
}

/// Checks a new incident's fields (the REST body and the console's `create_incident` frame).
pub(crate) fn validate(body: &NewIncident) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    if let Some(patient) = &body.patient_id {
        check_id(&mut errors, "/patient_id", patient.as_str());
    }
    if let Some(l) = &body.location {
        l.validate("/location", &mut errors);
    }
    if let Some(d) = &body.description {
        check_text(&mut errors, "/description", d, TextKind::Lines, false, 2000);
    }
    if let Some(c) = &body.caller {
        if let Some(name) = &c.name {
            check_text(
                &mut errors,
                "/caller/name",
                name,
                TextKind::Line,
                false,
                200,
            );
        }
        if let Some(phone) = &c.phone {
            check_text(
                &mut errors,
                "/caller/phone",
                phone,
                TextKind::Line,
                false,
                32,
            );
        }
    }
    ApiError::check(errors)
}

/// A cancellation reason (the REST body and the console's `cancel` frame): text over one or
/// more lines, 1 to 500 characters once trimmed. Answers it trimmed.
pub(crate) fn cancel_reason(reason: &str) -> Result<String, ApiError> {
    let mut errors = Vec::new();
    check_text(&mut errors, "/reason", reason, TextKind::Lines, true, 500);
    ApiError::check(errors)?;
    Ok(reason.trim().to_owned())
}

fn source_for(principal: &Principal) -> Source {
    if principal.role == Role::Patient {
        Source::Request
    } else {
        Source::Console
    }
}

/// Maximum `Idempotency-Key` length (Stripe's limit).
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Opens an incident, or returns the patient's open one (200).
#[utoipa::path(post, path = "/api/v1/incidents", tag = "incidents", request_body = NewIncident,
    security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "retries with the same key return the first response")),
    responses((status = 201, body = IncidentView), (status = 200, body = IncidentView),
              (status = 409, body = super::error::Problem), (status = 422, body = super::error::Problem)))]
pub async fn create(
    auth: Authorized<ConsoleOrPatient>,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: JsonBody<NewIncident>,
) -> Result<HttpResponse, ApiError> {
    let mut body = body.0;
    validate(&body)?;
    let principal = auth.principal;
    if principal.role == Role::Patient {
        match (&body.patient_id, &principal.patient_id) {
            (Some(named), Some(own)) if named != own => {
                return Err(ApiError::Forbidden {
                    detail: "a patient token may only request help for its own patient".to_owned(),
                });
            }
            _ => body.patient_id = principal.patient_id.clone(),
        }
    }
    let Some(key) = idempotency_key(&req)? else {
        let (status, text, id) = open(&state, &principal, body).await?;
        return Ok(respond(status, text, id));
    };
    let owner = principal.token_id.to_string();
    let claim = {
        let (owner, key) = (owner.clone(), key.clone());
        state
            .db
            .run(move |mut conn| async move {
                store::idempotency_claim(
                    &mut conn,
                    &owner,
                    &key,
                    "POST /api/v1/incidents",
                    Utc::now(),
                )
                .await
            })
            .await?
    };
    match claim {
        IdempotencyState::Done { status, body } => Ok(replayed(status, body)),
        IdempotencyState::InProgress => Err(ApiError::Conflict {
            detail: "a request with this Idempotency-Key is still being processed".to_owned(),
            extensions: Default::default(),
        }),
        IdempotencyState::New => {
            let result = open(&state, &principal, body).await;
            let record = result
                .as_ref()
                .ok()
                .map(|(status, text, _)| (*status, text.clone()));
            state
                .db
                .run(move |mut conn| async move {
                    store::idempotency_finish(
                        &mut conn,
                        &owner,
                        &key,
                        record.as_ref().map(|(s, b)| (*s, b.as_str())),
                    )
                    .await
                })
                .await?;
            let (status, text, id) = result?;
            Ok(respond(status, text, id))
        }
    }
}

/// The request's `Idempotency-Key`, if any: visible ASCII, 1 to 255 characters.
fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let key = match req.headers().get("Idempotency-Key") {
        None => None,
        Some(value) => match value.to_str() {
            // `to_str` lets a tab through; a key is one line.
            Ok(key) if TextKind::Line.forbidden(key).is_none() => Some(key.to_owned()),
            _ => {
                return Err(ApiError::field(
                    "/headers/Idempotency-Key",
                    "must be visible ASCII",
                ));
            }
        },
    };
    if key
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY)
    {
        return Err(ApiError::field(
            "/headers/Idempotency-Key",
            "must be 1 to 255 characters",
        ));
    }
    Ok(key)
}

/// The first answer to a request with this `Idempotency-Key`, again.
fn replayed(status: u16, body: String) -> HttpResponse {
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(status).unwrap_or(actix_web::http::StatusCode::OK),
    )
    .insert_header(("Idempotent-Replayed", "true"))
    .content_type("application/json")
    .body(body)
}

fn respond(status: u16, text: String, id: IncidentId) -> HttpResponse {
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(status).unwrap_or(actix_web::http::StatusCode::OK),
    )
    .insert_header(("Location", format!("/api/v1/incidents/{id}")))
    .content_type("application/json")
    .body(text)
}

/// Opens (or finds) the incident; returns the status (201 created / 200 existing), the body and
/// the id.
pub(crate) async fn open(
    state: &AppState,
    principal: &Principal,
    body: NewIncident,
) -> Result<(u16, String, IncidentId), ApiError> {
    let request = OpenRequest {
        source: source_for(principal),
        priority: body.priority.unwrap_or_default(),
        patient_id: body.patient_id,
        location: body.location,
        description: body.description,
        evidence: body.caller.map(|c| {
            Evidence::Caller {
                name: c.name,
                phone: c.phone,
            }
            .to_value()
        }),
    };
    let opened = state
        .incidents
        .send(OpenIncident(request))
        .await
        .map_err(mailbox)?
        .map_err(incident_error)?;
    let view = detail(state, opened.incident).await?;
    let text = serde_json::to_string(&view).map_err(|e| ApiError::Internal(e.into()))?;
    Ok((if opened.created { 201 } else { 200 }, text, view.id))
}

/// List query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// `open` (default), `closed` or `all`.
    #[serde(default)]
    pub status: StatusFilter,
    /// Page size, 1–200 (default 50).
    pub limit: Option<i64>,
    /// From the previous page's `next_cursor`.
    pub cursor: Option<String>,
}

/// A page of incidents.
#[derive(Debug, Serialize)]
pub struct IncidentPage {
    /// Incidents, newest first.
    pub items: Vec<IncidentView>,
    /// Pass as `cursor` for the next page; null at the end.
    pub next_cursor: Option<String>,
}

/// A cursor this API handed out: `<created_at µs>_<incident id>`.
fn parse_cursor(cursor: &str) -> Option<(DateTime<Utc>, String)> {
    let (micros, id) = cursor.split_once('_')?;
    let at = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
    let at = crate::domain::validation::storable_instant("/query/cursor", at).ok()?;
    let id: IncidentId = id.parse().ok()?;
    Some((at, id.to_string()))
}

/// Lists incidents (dispatchers), newest first, with cursor paging.
#[utoipa::path(get, path = "/api/v1/incidents", tag = "incidents", security(("bearer" = [])),
    params(("status" = Option<String>, Query, description = "open | closed | all"),
           ("limit" = Option<i64>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, description = "{items, next_cursor}")))]
pub async fn list(
    _auth: Authorized<super::auth::ConsoleOnly>,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let query = web::Query::<ListQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::field("/query", e.to_string()))?
        .into_inner();
    let limit = query.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::field("/query/limit", "must be between 1 and 200"));
    }
    let after = match &query.cursor {
        Some(c) => Some(
            parse_cursor(c)
                .ok_or_else(|| ApiError::field("/query/cursor", "is not a cursor from this API"))?,
        ),
        None => None,
    };
    let filter = query.status;
    let mut items = state
        .db
        .run(move |mut conn| async move { store::page(&mut conn, filter, after, limit + 1).await })
        .await?;
    let more = items.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    items.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_cursor = more
        .then(|| {
            items
                .last()
                .map(|i| format!("{}_{}", i.created_at.timestamp_micros(), i.id))
        })
        .flatten();
    Ok(HttpResponse::Ok().json(IncidentPage {
        items: items.into_iter().map(summary).collect(),
        next_cursor,
    }))
}

async fn load(state: &AppState, principal: &Principal, id: &str) -> Result<Incident, ApiError> {
    let id: IncidentId = id
        .parse()
        .map_err(|_| ApiError::not_found("no incident with this id"))?;
    let found = state
        .db
        .run(move |mut conn| async move { store::find(&mut conn, id).await })
        .await?
        .map(|(i, _)| i)
        .ok_or_else(|| ApiError::not_found("no incident with this id"))?;
    if principal.role == Role::Patient && found.patient_id.as_ref() != principal.patient_id.as_ref()
    {
        // Do not reveal other patients' incidents.
        return Err(ApiError::not_found("no incident with this id"));
    }
    Ok(found)
}

/// One incident in full.
#[utoipa::path(get, path = "/api/v1/incidents/{id}", tag = "incidents", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = IncidentView), (status = 404, body = super::error::Problem)))]
pub async fn get(
    auth: Authorized<ConsoleOrPatient>,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let incident = load(&state, &auth.principal, &id).await?;
    Ok(HttpResponse::Ok().json(detail(&state, incident).await?))
}

/// `POST /api/v1/incidents/{id}/cancel` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    /// Why, in words for people (stored, and shown to dispatchers).
    pub reason: String,
}

/// Cancels an incident (any state before `at_hospital`; 409 after).
#[utoipa::path(post, path = "/api/v1/incidents/{id}/cancel", tag = "incidents", request_body = CancelBody,
    security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = IncidentView), (status = 404, body = super::error::Problem),
              (status = 409, body = super::error::Problem)))]
pub async fn cancel(
    auth: Authorized<ConsoleOrPatient>,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: JsonBody<CancelBody>,
) -> Result<HttpResponse, ApiError> {
    let reason = cancel_reason(&body.0.reason)?;
    let incident = load(&state, &auth.principal, &id).await?;
    let updated = state
        .incidents
        .send(Route {
            id: incident.id,
            command: Command::Cancel {
                reason,
                by: auth.principal.role.as_str().to_owned(),
            },
        })
        .await
        .map_err(mailbox)?
        .map_err(incident_error)?;
    Ok(HttpResponse::Ok().json(detail(&state, updated).await?))
}

/// The invoice as `docs/api.md` shows it.
pub fn invoice_view(inv: &crate::persistence::invoices::Invoice) -> serde_json::Value {
    let saga = &inv.saga;
    let (covered, due) = saga.insurance.as_ref().map_or((0, saga.amount_cents), |d| {
        (d.covered_cents, d.patient_due_cents)
    });
    json!({
        "id": inv.id,
        "incident_id": saga.incident_id,
        "status": saga.status,
        "amount_cents": saga.amount_cents,
        "covered_cents": covered,
        "patient_due_cents": due,
        "currency": saga.currency,
        "provider": inv.provider,
        "sandbox": inv.provider == "sandbox",
        "failure": saga.failure,
        "steps": saga.steps,
    })
}

/// The invoice of an incident (console, or the bound patient).
#[utoipa::path(get, path = "/api/v1/incidents/{id}/invoice", tag = "billing", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, description = "the invoice"), (status = 404, body = super::error::Problem)))]
pub async fn invoice(
    auth: Authorized<ConsoleOrPatient>,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let incident = load(&state, &auth.principal, &id).await?;
    let key = incident.id;
    let found = state
        .db
        .run(move |mut conn| async move {
            crate::persistence::invoices::for_incident(&mut conn, key).await
        })
        .await?
        .ok_or_else(|| ApiError::not_found("this incident has no invoice yet"))?;
    Ok(HttpResponse::Ok().json(invoice_view(&found)))
}
