//! Fleet over HTTP (`docs/api.md` "Reference data" and "Crews"): units, hospitals, offers, crew
//! status and position, manual assignment, and the crew WebSocket.

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::AppState;
use super::auth::{AdminOnly, Authorized, ConsoleOnly, Policy};
use super::error::ApiError;
use super::json::JsonBody;
use super::path_id;
use crate::actors::incident::{IncidentError, ManualAssign, ToIncident};
use crate::actors::unit::{
    AllUnits, ListHospitals, RegisterHospital, RegisterUnit, UnitAddr, ViewUnit,
};
use crate::actors::unit::{Crew, CrewError};
use crate::domain::auth::{Principal, Role};
use crate::domain::dispatch::{Capability, CrewReport, UnitStatus};
use crate::domain::geo::LatLng;
use crate::domain::ids::{HospitalId, OfferId, UnitId};
use crate::domain::push::{MAX_TOKEN_LEN, MAX_TOKENS_PER_UNIT, Platform};
use crate::domain::validation::{FieldError, TextKind, check_id, check_text};
use crate::persistence::StoreError;
use crate::persistence::fleet::{HospitalRecord, UnitRecord};
use crate::persistence::push_tokens;

/// Crews (bound to a unit).
pub struct CrewOnly;
impl Policy for CrewOnly {
    const ROLES: &'static [Role] = &[Role::Crew];
}

/// Crews, dispatchers and admins.
pub struct CrewOrConsole;
impl Policy for CrewOrConsole {
    const ROLES: &'static [Role] = &[Role::Crew, Role::Console];
}

pub(crate) fn crew(state: &AppState) -> Crew {
    Crew {
        fleet: state.fleet.clone(),
        incidents: state.incidents.clone(),
        db: state.db.clone(),
        billing: Some(state.billing.clone()),
    }
}

pub(super) fn busy<E>(_: E) -> ApiError {
    ApiError::Unavailable {
        detail: "the fleet is busy; retry shortly".into(),
        retry_after_s: 1,
    }
}

pub(crate) fn crew_error(e: CrewError) -> ApiError {
    match e {
        CrewError::UnknownUnit => ApiError::not_found("no such unit"),
        CrewError::UnknownOffer => ApiError::not_found("no such offer for this unit"),
        CrewError::Lost(outcome) => {
            let mut ext = serde_json::Map::new();
            ext.insert("outcome".into(), json!(outcome));
            ApiError::Conflict {
                detail: format!(
                    "the offer can no longer be accepted: {}",
                    json!(outcome).as_str().unwrap_or("")
                ),
                extensions: ext,
            }
        }
        CrewError::Rejected(reason) => ApiError::Conflict {
            detail: reason,
            extensions: Default::default(),
        },
        CrewError::Invalid(pointer, message) => ApiError::field(pointer, message),
        CrewError::Store(e) => e.into(),
        CrewError::NotStored(e) => {
            tracing::warn!(error.cause = %e, "crew report not stored");
            ApiError::Unavailable {
                detail: "the report could not be stored; the unit keeps its earlier status, \
                         send the report again"
                    .to_owned(),
                retry_after_s: 1,
            }
        }
        CrewError::Actor(e) => e.into(),
    }
}

/// A unit named in a body at `/unit_id` must be a well-formed id (422 otherwise), before any
/// lookup.
pub(crate) fn unit_id_field(unit: &UnitId) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    check_id(&mut errors, "/unit_id", unit.as_str());
    ApiError::check(errors)
}

fn own_unit(principal: &Principal, unit: &UnitId) -> Result<(), ApiError> {
    if principal.role == Role::Crew && principal.unit_id.as_ref() != Some(unit) {
        return Err(ApiError::Forbidden {
            detail: "a crew token may only act for its own unit".into(),
        });
    }
    Ok(())
}

pub(super) fn bound_unit(principal: &Principal) -> Result<UnitId, ApiError> {
    principal
        .unit_id
        .clone()
        .ok_or_else(|| ApiError::Forbidden {
            detail: "the token is not bound to a unit".into(),
        })
}

/// `POST /api/v1/units` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUnit {
    /// Unit id.
    pub id: String,
    /// Radio call sign.
    pub call_sign: String,
    /// `als` or `bls`.
    #[schema(value_type = String)]
    pub capability: Capability,
    /// Current position.
    #[schema(value_type = Object)]
    pub location: LatLng,
    /// Home station.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub base: Option<LatLng>,
}

/// Registers an ambulance unit (available at its location).
#[utoipa::path(post, path = "/api/v1/units", tag = "fleet", request_body = NewUnit, security(("bearer" = [])),
    responses((status = 201, description = "the unit"), (status = 409, body = super::error::Problem), (status = 422, body = super::error::Problem)))]
pub async fn create_unit(
    _auth: Authorized<AdminOnly>,
    state: web::Data<AppState>,
    body: JsonBody<NewUnit>,
) -> Result<HttpResponse, ApiError> {
    let body = body.0;
    let mut errors = Vec::new();
    check_id(&mut errors, "/id", &body.id);
    check_text(
        &mut errors,
        "/call_sign",
        &body.call_sign,
        TextKind::Line,
        true,
        64,
    );
    body.location.validate("/location", &mut errors);
    if let Some(b) = &body.base {
        b.validate("/base", &mut errors);
    }
    ApiError::check(errors)?;
    let now = Utc::now();
    let record = UnitRecord {
        id: UnitId(body.id),
        call_sign: body.call_sign.trim().to_owned(),
        capability: body.capability.as_str().to_owned(),
        status: UnitStatus::Available.as_str().to_owned(),
        location: body.location,
        fix_at: now,
        base: body.base,
        current_incident_id: None,
    };
    let view = state
        .fleet
        .send(RegisterUnit(record))
        .await
        .map_err(busy)?
        .map_err(|e| match e {
            StoreError::Conflict(_) => ApiError::Conflict {
                detail: "a unit with this id exists".into(),
                extensions: Default::default(),
            },
            other => other.into(),
        })?;
    Ok(HttpResponse::Created().json(view))
}

/// Every unit with its live status and position.
#[utoipa::path(get, path = "/api/v1/units", tag = "fleet", security(("bearer" = [])),
    responses((status = 200, description = "{items, next_cursor}")))]
pub async fn list_units(
    _auth: Authorized<CrewOrConsole>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let addrs = state.fleet.send(AllUnits).await.map_err(busy)?;
    let views = futures_util::future::join_all(addrs.iter().map(|a| a.send(ViewUnit))).await;
    let items: Vec<_> = views.into_iter().flatten().collect();
    Ok(HttpResponse::Ok().json(json!({"items": items, "next_cursor": null})))
}

/// One unit.
#[utoipa::path(get, path = "/api/v1/units/{id}", tag = "fleet", security(("bearer" = [])),
    params(("id" = String, Path)), responses((status = 200, description = "the unit"), (status = 404, body = super::error::Problem)))]
pub async fn get_unit(
    _auth: Authorized<CrewOrConsole>,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let unit = path_id(id.into_inner(), "no such unit")?;
    let addr = state
        .fleet
        .send(UnitAddr(UnitId(unit)))
        .await
        .map_err(busy)?
        .ok_or_else(|| ApiError::not_found("no such unit"))?;
    Ok(HttpResponse::Ok().json(addr.send(ViewUnit).await.map_err(busy)?))
}

/// `POST /api/v1/units/{id}/push-tokens` body: a crew phone's push registration.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushTokenBody {
    /// The FCM registration token of the crew's app.
    pub token: String,
    /// `android`, `ios` or `web`.
    pub platform: Platform,
}

/// A push token as registered.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PushTokenView {
    /// The unit.
    #[schema(value_type = String)]
    pub unit_id: UnitId,
    /// The token.
    pub token: String,
    /// Its platform.
    pub platform: Platform,
    /// When it was registered.
    pub registered_at: DateTime<Utc>,
}

/// Checks a push token at `pointer`: present, not longer than FCM could make it, one word.
fn check_push_token(pointer: &str, token: &str) -> Result<(), ApiError> {
    if token.is_empty() {
        return Err(ApiError::field(pointer, "must not be empty"));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(ApiError::field(
            pointer,
            format!("must be at most {MAX_TOKEN_LEN} bytes"),
        ));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ApiError::field(
            pointer,
            "must not contain spaces or control characters",
        ));
    }
    Ok(())
}

/// The unit `id` names, which must exist.
async fn existing_unit(state: &AppState, id: String) -> Result<UnitId, ApiError> {
    let unit = UnitId(path_id(id, "no such unit")?);
    state
        .fleet
        .send(UnitAddr(unit.clone()))
        .await
        .map_err(busy)?
        .ok_or_else(|| ApiError::not_found("no such unit"))?;
    Ok(unit)
}

/// A crew registers its phone for offers pushed while its app is not connected (a token
/// registered before, for this unit or another, moves here; the unit keeps its newest 16).
#[utoipa::path(post, path = "/api/v1/units/{id}/push-tokens", tag = "crews", request_body = PushTokenBody,
    security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 201, body = PushTokenView), (status = 403, body = super::error::Problem),
        (status = 404, body = super::error::Problem), (status = 422, body = super::error::Problem)))]
pub async fn register_push_token(
    auth: Authorized<CrewOnly>,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: JsonBody<PushTokenBody>,
) -> Result<HttpResponse, ApiError> {
    let unit = UnitId(path_id(id.into_inner(), "no such unit")?);
    own_unit(&auth.principal, &unit)?;
    let PushTokenBody { token, platform } = body.0;
    check_push_token("/token", &token)?;
    let unit = existing_unit(&state, unit.0).await?;
    let now = Utc::now();
    let (u, t) = (unit.clone(), token.clone());
    state
        .db
        .run(move |mut conn| async move {
            push_tokens::register(&mut conn, &u, &t, platform, now, MAX_TOKENS_PER_UNIT).await
        })
        .await
        .map_err(ApiError::from)?;
    tracing::info!(unit.id = %unit, platform = platform.as_str(), "push token registered");
    Ok(HttpResponse::Created().json(PushTokenView {
        unit_id: unit,
        token,
        platform,
        registered_at: now,
    }))
}

/// A crew removes its phone's push registration (204 whether or not it was registered).
#[utoipa::path(delete, path = "/api/v1/units/{id}/push-tokens/{token}", tag = "crews",
    security(("bearer" = [])), params(("id" = String, Path), ("token" = String, Path)),
    responses((status = 204), (status = 403, body = super::error::Problem), (status = 404, body = super::error::Problem)))]
pub async fn remove_push_token(
    auth: Authorized<CrewOnly>,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, token) = path.into_inner();
    let unit = UnitId(path_id(id, "no such unit")?);
    own_unit(&auth.principal, &unit)?;
    check_push_token("/token", &token).map_err(|_| ApiError::not_found("no such push token"))?;
    state
        .db
        .run(move |mut conn| async move { push_tokens::remove(&mut conn, &unit, &token).await })
        .await
        .map_err(ApiError::from)?;
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /api/v1/hospitals` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewHospital {
    /// Id (generated when absent).
    #[serde(default)]
    pub id: Option<String>,
    /// Its name, for people.
    pub name: String,
    /// Emergency entrance.
    #[schema(value_type = Object)]
    pub location: LatLng,
    /// Services (e.g. `stroke`, `trauma`).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Beds for ambulance arrivals.
    pub capacity: u32,
}

/// Registers a hospital.
#[utoipa::path(post, path = "/api/v1/hospitals", tag = "fleet", request_body = NewHospital, security(("bearer" = [])),
    responses((status = 201, description = "the hospital"), (status = 422, body = super::error::Problem)))]
pub async fn create_hospital(
    _auth: Authorized<AdminOnly>,
    state: web::Data<AppState>,
    body: JsonBody<NewHospital>,
) -> Result<HttpResponse, ApiError> {
    let body = body.0;
    let mut errors = Vec::new();
    if let Some(id) = &body.id {
        check_id(&mut errors, "/id", id);
    }
    check_text(&mut errors, "/name", &body.name, TextKind::Line, true, 200);
    for (i, capability) in body.capabilities.iter().enumerate() {
        let pointer = format!("/capabilities/{i}");
        check_text(&mut errors, &pointer, capability, TextKind::Line, true, 64);
    }
    body.location.validate("/location", &mut errors);
    if body.capacity > 10_000 {
        errors.push(FieldError::new("/capacity", "must be at most 10000"));
    }
    ApiError::check(errors)?;
    let record = HospitalRecord {
        id: HospitalId(body.id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string())),
        name: body.name.trim().to_owned(),
        location: body.location,
        capabilities: body.capabilities,
        capacity: body.capacity,
        occupied: 0,
    };
    state
        .fleet
        .send(RegisterHospital(record.clone()))
        .await
        .map_err(busy)?
        .map_err(|e| match e {
            StoreError::Conflict(_) => ApiError::Conflict {
                detail: "a hospital with this id exists".into(),
                extensions: Default::default(),
            },
            other => other.into(),
        })?;
    Ok(HttpResponse::Created().json(record))
}

/// Hospitals with capacity.
#[utoipa::path(get, path = "/api/v1/hospitals", tag = "fleet", security(("bearer" = [])),
    responses((status = 200, description = "{items, next_cursor}")))]
pub async fn list_hospitals(
    _auth: Authorized<CrewOrConsole>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let items = state.fleet.send(ListHospitals).await.map_err(busy)?;
    Ok(HttpResponse::Ok().json(json!({"items": items, "next_cursor": null})))
}

fn offer_id(raw: &str) -> Result<OfferId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::not_found("no such offer for this unit"))
}

/// The crew accepts an offer: `{outcome: "assigned"}`, or 409 `{outcome: taken|expired|cancelled}`.
#[utoipa::path(post, path = "/api/v1/offers/{id}/accept", tag = "crews", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, description = "{outcome: assigned}"), (status = 409, body = super::error::Problem)))]
pub async fn accept_offer(
    auth: Authorized<CrewOnly>,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let unit = bound_unit(&auth.principal)?;
    let outcome = crew(&state)
        .accept(&unit, offer_id(&id)?)
        .await
        .map_err(crew_error)?;
    Ok(HttpResponse::Ok().json(json!({"outcome": outcome})))
}

/// `POST /api/v1/offers/{id}/decline` body.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeclineBody {
    /// Why, for people (optional; at most 500 characters, line breaks allowed).
    #[serde(default)]
    pub reason: Option<String>,
}

/// The crew declines an offer; the next round skips this unit.
#[utoipa::path(post, path = "/api/v1/offers/{id}/decline", tag = "crews", security(("bearer" = [])),
    params(("id" = String, Path)), request_body(content = Option<DeclineBody>, description = "optional"),
    responses((status = 200, description = "{outcome: declined}"), (status = 409, body = super::error::Problem),
              (status = 422, body = super::error::Problem)))]
pub async fn decline_offer(
    auth: Authorized<CrewOnly>,
    state: web::Data<AppState>,
    id: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let unit = bound_unit(&auth.principal)?;
    let mut payload = payload;
    let bytes = super::json::read_body(&req, &mut payload).await?;
    let body: DeclineBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        DeclineBody::default()
    } else {
        super::json::parse_json(&bytes)?
    };
    let reason = body.reason.unwrap_or_else(|| "declined".into());
    let outcome = crew(&state)
        .decline(&unit, offer_id(&id)?, reason)
        .await
        .map_err(crew_error)?;
    Ok(HttpResponse::Ok().json(json!({"outcome": outcome})))
}

/// `POST /api/v1/units/{id}/location` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LocationBody {
    /// Latitude in degrees (WGS 84, -90 to 90).
    pub lat: f64,
    /// Longitude in degrees (WGS 84, -180 to 180).
    pub lng: f64,
    /// When measured (default: now).
    #[serde(default)]
    pub at: Option<DateTime<Utc>>,
    /// Speed, m/s.
    #[serde(default)]
    pub speed_mps: Option<f64>,
    /// Heading, degrees.
    #[serde(default)]
    pub heading_deg: Option<f64>,
}

/// A position fix for a unit (its crew).
#[utoipa::path(post, path = "/api/v1/units/{id}/location", tag = "crews", request_body = LocationBody,
    security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 204, description = "recorded"), (status = 422, body = super::error::Problem)))]
pub async fn unit_location(
    auth: Authorized<CrewOnly>,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: JsonBody<LocationBody>,
) -> Result<HttpResponse, ApiError> {
    let unit = UnitId(path_id(id.into_inner(), "no such unit")?);
    own_unit(&auth.principal, &unit)?;
    let b = body.0;
    crew(&state)
        .locate(
            &unit,
            LatLng {
                lat: b.lat,
                lng: b.lng,
            },
            b.at,
            b.speed_mps,
            b.heading_deg,
        )
        .await
        .map_err(crew_error)?;
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /api/v1/units/{id}/status` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusBody {
    /// `enroute`, `on_scene`, `transporting`, `at_hospital`, `available`, `out_of_service`.
    #[schema(value_type = String)]
    pub status: CrewReport,
    /// Destination when transporting (default: nearest with capacity).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub hospital_id: Option<HospitalId>,
}

/// A status report for a unit (its crew; dispatchers may set available/out of service).
#[utoipa::path(post, path = "/api/v1/units/{id}/status", tag = "crews", request_body = StatusBody,
    security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, description = "{unit_id, from, to, incident_id}"), (status = 409, body = super::error::Problem)))]
pub async fn unit_status(
    auth: Authorized<CrewOrConsole>,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: JsonBody<StatusBody>,
) -> Result<HttpResponse, ApiError> {
    let unit = UnitId(path_id(id.into_inner(), "no such unit")?);
    own_unit(&auth.principal, &unit)?;
    let b = body.0;
    if auth.principal.role != Role::Crew
        && !matches!(b.status, CrewReport::Available | CrewReport::OutOfService)
    {
        return Err(ApiError::field(
            "/status",
            "dispatchers may only set available or out_of_service",
        ));
    }
    let update = crew(&state)
        .report(&unit, b.status, b.hospital_id)
        .await
        .map_err(crew_error)?;
    Ok(HttpResponse::Ok().json(update))
}

/// `POST /api/v1/incidents/{id}/assign` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignBody {
    /// The unit to send.
    #[schema(value_type = String)]
    pub unit_id: UnitId,
}

/// A dispatcher assigns a unit by hand (also after escalation).
#[utoipa::path(post, path = "/api/v1/incidents/{id}/assign", tag = "incidents", request_body = AssignBody,
    security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, description = "the incident"), (status = 404, body = super::error::Problem), (status = 409, body = super::error::Problem)))]
pub async fn assign(
    _auth: Authorized<ConsoleOnly>,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: JsonBody<AssignBody>,
) -> Result<HttpResponse, ApiError> {
    let incident_id = id
        .parse()
        .map_err(|_| ApiError::not_found("no incident with this id"))?;
    let unit = body.0.unit_id;
    unit_id_field(&unit)?;
    if state
        .fleet
        .send(UnitAddr(unit.clone()))
        .await
        .map_err(busy)?
        .is_none()
    {
        return Err(ApiError::field("/unit_id", "no such unit"));
    }
    let incident = state
        .incidents
        .send(ToIncident {
            incident_id,
            message: ManualAssign { unit_id: unit },
        })
        .await
        .map_err(busy)?
        .map_err(|e| match e {
            IncidentError::NotFound => ApiError::not_found("no incident with this id"),
            IncidentError::Store(s) => s.into(),
            IncidentError::Actor(a) => a.into(),
            other => ApiError::Conflict {
                detail: other.to_string(),
                extensions: Default::default(),
            },
        })?;
    Ok(HttpResponse::Ok().json(super::incidents::summary_of(incident)))
}
