//! Admin endpoints (role `admin`): API token management. Live actor inspection joins here as
//! the actors arrive.

use actix_web::{HttpResponse, web};
use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::{AdminOnly, AuthService, Authorized};
use super::error::ApiError;
use super::json::JsonBody;
use crate::actors::device::{DeviceView, LiveDevice};
use crate::domain::auth::{Role, validate_new_token};
use crate::domain::ids::{DeviceId, PatientId, TokenId, UnitId};
use crate::persistence::tokens::{self, TokenRecord};

/// `POST /admin/tokens` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// `admin`, `console`, `crew`, `gateway` or `patient`.
    #[schema(value_type = String)]
    pub role: Role,
    /// Unit a crew token acts for.
    #[schema(value_type = Option<String>)]
    pub unit_id: Option<UnitId>,
    /// Patient a patient token acts for.
    #[schema(value_type = Option<String>)]
    pub patient_id: Option<PatientId>,
    /// A label for people (e.g. the console's desk).
    pub name: String,
}

/// A created token: the secret is shown once.
#[derive(Serialize)]
pub struct CreatedTokenBody {
    /// The bearer token.
    pub token: String,
    /// Its record.
    #[serde(flatten)]
    pub record: TokenRecord,
}

/// A page of tokens.
#[derive(Serialize)]
pub struct TokenPage {
    /// The tokens (never their secrets).
    pub items: Vec<TokenRecord>,
    /// Always null: token lists are short.
    pub next_cursor: Option<String>,
}

/// Creates an API token.
#[utoipa::path(post, path = "/admin/tokens", tag = "admin", request_body = CreateToken,
    security(("bearer" = [])),
    responses((status = 201, description = "token created; the secret is shown once"),
              (status = 422, body = super::error::Problem)))]
pub async fn create_token(
    _auth: Authorized<AdminOnly>,
    state: web::Data<AppState>,
    body: JsonBody<CreateToken>,
) -> Result<HttpResponse, ApiError> {
    let body = body.0;
    let name = validate_new_token(
        body.role,
        body.unit_id.as_ref(),
        body.patient_id.as_ref(),
        &body.name,
    )
    .map_err(ApiError::fields)?;
    let created = state
        .db
        .run(move |mut conn| async move {
            tokens::create(
                &mut conn,
                body.role,
                body.unit_id.as_ref(),
                body.patient_id.as_ref(),
                &name,
                Utc::now(),
            )
            .await
        })
        .await?;
    tracing::info!(token.id = %created.record.id, token.role = %created.record.role, "token created");
    Ok(HttpResponse::Created().json(CreatedTokenBody {
        token: created.token,
        record: created.record,
    }))
}

/// Lists API tokens (without secrets).
#[utoipa::path(get, path = "/admin/tokens", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "every token, newest first")))]
pub async fn list_tokens(
    _auth: Authorized<AdminOnly>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let items = state
        .db
        .run(|mut conn| async move { tokens::list(&mut conn).await })
        .await?;
    Ok(HttpResponse::Ok().json(TokenPage {
        items,
        next_cursor: None,
    }))
}

/// Revokes an API token; it stops working at once on this node.
#[utoipa::path(post, path = "/admin/tokens/{id}/revoke", tag = "admin",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "token id")),
    responses((status = 204, description = "revoked"), (status = 404, body = super::error::Problem)))]
pub async fn revoke_token(
    _auth: Authorized<AdminOnly>,
    state: web::Data<AppState>,
    auth_service: web::Data<AuthService>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id: TokenId = id
        .parse()
        .map_err(|_| ApiError::not_found("no live token with that id"))?;
    state
        .db
        .run(move |mut conn| async move { tokens::revoke(&mut conn, id, Utc::now()).await })
        .await
        .map_err(|e| match e {
            crate::persistence::StoreError::NotFound => {
                ApiError::not_found("no live token with that id")
            }
            other => other.into(),
        })?;
    auth_service.invalidate();
    tracing::info!(token.id = %id, "token revoked");
    Ok(HttpResponse::NoContent().finish())
}

/// `GET /admin/actors` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorsQuery {
    /// Only this kind (`device`, `unit`, `incident`).
    pub kind: Option<String>,
    /// Most actors listed per kind (default 100, at most 1000).
    pub limit: Option<usize>,
}

/// One live actor.
#[derive(Debug, Serialize)]
pub struct ActorSummary {
    /// `device`, `unit` or `incident`.
    pub kind: &'static str,
    /// Its id.
    pub id: String,
    /// Its status.
    pub status: String,
    /// Pending messages, when actix exposes it (it does not for `Addr`).
    pub mailbox_len: Option<usize>,
    /// Restarts so far.
    pub restarts: u32,
    /// When it last handled a message.
    pub last_message_at: Option<chrono::DateTime<Utc>>,
}

/// Live actor counts and a page of actors.
#[utoipa::path(get, path = "/admin/actors", tag = "admin", security(("bearer" = [])),
    params(("kind" = Option<String>, Query), ("limit" = Option<usize>, Query)),
    responses((status = 200, description = "{counts, items}")))]
pub async fn list_actors(
    _auth: Authorized<AdminOnly>,
    state: web::Data<AppState>,
    req: actix_web::HttpRequest,
) -> Result<HttpResponse, ApiError> {
    use crate::actors::incident::ListIncidents;
    use crate::actors::unit::{AllUnits, ViewUnit};
    let query = web::Query::<ActorsQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::field("/query", e.to_string()))?
        .into_inner();
    if let Some(kind) = &query.kind
        && !["device", "unit", "incident"].contains(&kind.as_str())
    {
        return Err(ApiError::field(
            "/query/kind",
            "must be device, unit or incident",
        ));
    }
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let wants = |k: &str| query.kind.as_deref().is_none_or(|q| q == k);
    let busy = |_| ApiError::Unavailable {
        detail: "actor directory busy".to_owned(),
        retry_after_s: 1,
    };
    let mut items = Vec::new();
    let page = state.devices.list(limit).await?;
    let devices = page.count;
    if wants("device") {
        items.extend(page.items.into_iter().map(device_summary));
    }
    let (incidents, page) = state
        .incidents
        .send(ListIncidents { limit })
        .await
        .map_err(busy)?;
    if wants("incident") {
        items.extend(page.into_iter().map(|i| ActorSummary {
            kind: "incident",
            id: i.id.to_string(),
            status: i.status,
            mailbox_len: None,
            restarts: i.restarts,
            last_message_at: i.last_message_at,
        }));
    }
    let units = state.fleet.send(AllUnits).await.map_err(busy)?;
    if wants("unit") {
        let views =
            futures_util::future::join_all(units.iter().take(limit).map(|a| a.send(ViewUnit)))
                .await;
        items.extend(views.into_iter().flatten().map(|u| ActorSummary {
            kind: "unit",
            id: u.id.0,
            status: u.status.as_str().to_owned(),
            mailbox_len: None,
            restarts: 0,
            last_message_at: u.last_message_at,
        }));
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "counts": {"device": devices, "unit": units.len(), "incident": incidents},
        "items": items,
    })))
}

/// A device actor as `/admin/actors` lists it.
fn device_summary(live: LiveDevice) -> ActorSummary {
    ActorSummary {
        kind: "device",
        id: live.summary.id.0,
        status: live.summary.status,
        mailbox_len: None,
        restarts: live.restarts,
        last_message_at: live.summary.last_message_at,
    }
}

/// A device actor's inspection as `/admin/actors/device/{id}` shows it.
fn device_view(view: DeviceView) -> HttpResponse {
    HttpResponse::Ok().json(ActorView {
        kind: "device",
        mailbox_len: None,
        view: DeviceApiView {
            status: view.inspection.state.status(),
            view,
        },
    })
}

/// One live actor's full in-memory state.
#[utoipa::path(get, path = "/admin/actors/{kind}/{id}", tag = "admin", security(("bearer" = [])),
    params(("kind" = String, Path), ("id" = String, Path)),
    responses((status = 200, description = "summary fields plus `state`"), (status = 404, body = super::error::Problem)))]
pub async fn inspect_actor(
    _auth: Authorized<AdminOnly>,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    use crate::actors::incident::{InspectIncident, LookupIncident};
    use crate::actors::unit::{InspectUnit, UnitAddr};
    let (kind, id) = path.into_inner();
    let gone = || ApiError::not_found(format!("no live {kind} actor with this id"));
    let id = super::path_id(id, "no live actor with this id")?;
    match kind.as_str() {
        "device" => match state.devices.inspect(DeviceId(id)).await? {
            Some(view) => Ok(device_view(view)),
            None => Err(gone()),
        },
        "incident" => {
            let incident: crate::domain::ids::IncidentId = id.parse().map_err(|_| gone())?;
            let addr = state
                .incidents
                .send(LookupIncident(incident))
                .await
                .ok()
                .flatten()
                .ok_or_else(gone)?;
            let view = addr.send(InspectIncident).await.map_err(|_| gone())?;
            Ok(HttpResponse::Ok().json(view))
        }
        "unit" => {
            let addr = state
                .fleet
                .send(UnitAddr(crate::domain::ids::UnitId(id.clone())))
                .await
                .ok()
                .flatten()
                .ok_or_else(gone)?;
            let view = addr.send(InspectUnit).await.map_err(|_| gone())?;
            Ok(HttpResponse::Ok().json(ActorView {
                kind: "unit",
                // actix does not expose the queue length of an `Addr`.
                mailbox_len: None,
                view,
            }))
        }
        _ => Err(gone()),
    }
}

/// A device actor's inspection with its restart count and its listing status.
#[derive(Serialize)]
struct DeviceApiView {
    status: &'static str,
    #[serde(flatten)]
    view: DeviceView,
}

/// An actor's inspection as the API shows it: its kind and mailbox length around what the
/// actor reports of itself.
#[derive(Serialize)]
struct ActorView<T: Serialize> {
    kind: &'static str,
    mailbox_len: Option<usize>,
    #[serde(flatten)]
    view: T,
}

/// Fault injection: stops an incident actor as a crash would (404 unless the server runs with
/// `--enable-fault-injection`).
#[utoipa::path(post, path = "/admin/actors/incident/{id}/crash", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 202, description = "crash injected"), (status = 404, body = super::error::Problem)))]
pub async fn crash_incident(
    _auth: Authorized<AdminOnly>,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    use crate::actors::incident::{Crash, LookupIncident};
    if !state.settings.admin.enable_fault_injection {
        return Err(ApiError::not_found("fault injection is disabled"));
    }
    let gone = || ApiError::not_found("no live incident actor with this id");
    let incident: crate::domain::ids::IncidentId = id.parse().map_err(|_| gone())?;
    let addr = state
        .incidents
        .send(LookupIncident(incident))
        .await
        .ok()
        .flatten()
        .ok_or_else(gone)?;
    addr.do_send(Crash);
    Ok(HttpResponse::Accepted().json(serde_json::json!({"crashed": incident})))
}

/// Fault injection: stops a unit's actor as a crash would; the fleet starts it again from the
/// unit's stored state (404 unless the server runs with `--enable-fault-injection`).
#[utoipa::path(post, path = "/admin/actors/unit/{id}/crash", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 202, description = "crash injected"), (status = 404, body = super::error::Problem)))]
pub async fn crash_unit(
    _auth: Authorized<AdminOnly>,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    use crate::actors::unit::{Crash, UnitAddr};
    if !state.settings.admin.enable_fault_injection {
        return Err(ApiError::not_found("fault injection is disabled"));
    }
    let unit = UnitId(super::path_id(
        id.into_inner(),
        "no live unit actor with this id",
    )?);
    let addr = state
        .fleet
        .send(UnitAddr(unit.clone()))
        .await
        .ok()
        .flatten()
        .ok_or_else(|| ApiError::not_found("no live unit actor with this id"))?;
    addr.do_send(Crash);
    Ok(HttpResponse::Accepted().json(serde_json::json!({"crashed": unit})))
}
