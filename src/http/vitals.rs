//! Vitals ingest: `POST /api/v1/vitals` and the gateway WebSocket `GET /api/v1/ws/gateway`.
//!
//! Both take the same bodies and give the same answer. The body is parsed and validated by
//! `domain::vitals` on this worker thread, then handed to the [`DeviceRouter`], whose device
//! actors triage (`domain::triage`) and apply each reading wherever they run; the answer is
//! sent once the device state (and any status event) is durable. Admission control bounds the
//! readings in flight: beyond it, 503 + `Retry-After`.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};

use super::AppState;
use super::auth::{Authorized, Policy};
use super::error::ApiError;
use super::json::read_body;
use super::ws::{Incoming, Socket};
use crate::actors::device::DeviceRouter;
use crate::domain::auth::Role;
use crate::ingest::{IngestResponse, ingest_with};

/// Wearable gateways only.
pub struct GatewayOnly;
impl Policy for GatewayOnly {
    const ROLES: &'static [Role] = &[Role::Gateway];
}

/// Parses, triages and applies one ingest body.
pub async fn ingest_body(state: &AppState, body: &[u8]) -> Result<IngestResponse, ApiError> {
    Ok(ingest_with(state.devices.as_ref(), &state.ingest_gate, body).await?)
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
                        Err(err) => serde_json::to_string(&ApiError::from(err).problem()),
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
