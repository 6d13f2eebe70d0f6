//! Node-to-node endpoints of a cluster (see [`crate::cluster`]); not part of the public API.
//! Only the cluster's nodes may call them, each with its own credential ([`FromNode`]); API
//! tokens, admin ones included, are refused.
//!
//! The hot-path bodies (emergencies, readings) are MessagePack, or JSON when sent as JSON
//! ([`super::wire`]).
//!
//! - `POST /internal/v1/emergencies` (the dispatch shard's server): an emergency detected by a
//!   device actor on another node, handed to this server's incidents as a local device actor
//!   would.
//! - `POST /internal/v1/readings` (cluster nodes): validated readings for the device shards
//!   this node serves.
//! - `POST /internal/v1/devices/fall/cancel` (cluster nodes): a wearer's "I'm OK" for a device
//!   of a shard this node serves.
//! - `POST /internal/v1/devices/offline` (cluster nodes): a device of a shard this node serves
//!   said it is offline (its MQTT status); `device.offline` is recorded now.
//! - `GET /internal/v1/actors/devices[/{id}]` (cluster nodes): the live device actors of the
//!   shards this node serves, for `/admin/actors` on the dispatch holder.

use actix_web::{HttpRequest, HttpResponse, web};

use serde::Deserialize;

use super::devices::{HandedOff, NodeDevices, ShardOutcomes, ShardReadings};
use super::wire;
use crate::actors::device::{CancelDeviceFall, ReportOffline};
use crate::actors::incident::{EmergencyDetected, HandoffError};
use crate::domain::ids::DeviceId;
use crate::http::AppState;
use crate::http::auth::FromNode;
use crate::http::error::ApiError;
use crate::http::json::{BodyLimit, parse_json, read_body};

/// Hands an emergency to the incidents: one incident per wearer, as on a single node.
pub async fn emergency(
    _auth: FromNode,
    state: web::Data<AppState>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, &mut payload).await?;
    let detected: EmergencyDetected = wire::read(&req, &body)?;
    let unavailable = |detail: &str| ApiError::Unavailable {
        detail: detail.to_owned(),
        retry_after_s: 1,
    };
    let incident_id = match state.incidents.send(detected).await {
        Ok(Ok(incident_id)) => incident_id,
        Ok(Err(HandoffError::Store(e))) => return Err(e.into()),
        Ok(Err(HandoffError::Unreachable(_))) | Err(_) => {
            return Err(unavailable(
                "the incident directory is unavailable; retry shortly",
            ));
        }
    };
    wire::answer(&req, &HandedOff { incident_id })
}

/// Applies readings to the device shards served here (the others' are answered unavailable).
pub async fn readings(
    _auth: FromNode,
    devices: web::Data<NodeDevices>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, &mut payload).await?;
    let ShardReadings(readings) = wire::read(&req, &body)?;
    let outcomes = devices.ingest_local(readings).await;
    wire::answer(&req, &ShardOutcomes(outcomes))
}

/// Sends a wearer's "I'm OK" to a device of a shard served here; answers what it did.
pub async fn cancel_fall(
    _auth: FromNode,
    devices: web::Data<NodeDevices>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, &mut payload).await?;
    let cancel: CancelDeviceFall = parse_json(&body)?;
    let done = devices.cancel_fall_local(cancel).await?;
    Ok(HttpResponse::Ok().json(done))
}

/// Records `device.offline` now for a device of a shard served here; answers whether it was
/// recorded (`false`: unknown, or not heard since its last `device.offline`).
pub async fn report_offline(
    _auth: FromNode,
    devices: web::Data<NodeDevices>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, &mut payload).await?;
    let ReportOffline { device_id } = parse_json(&body)?;
    let recorded = devices.report_offline_local(device_id).await?;
    Ok(HttpResponse::Ok().json(recorded))
}

/// `GET /internal/v1/actors/devices` query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    /// Most actors listed (default 100, at most 1000).
    limit: Option<usize>,
}

/// `GET /internal/v1/actors/devices`: the device actors of the shards this node serves.
async fn node_devices(
    _auth: FromNode,
    devices: web::Data<NodeDevices>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    Ok(HttpResponse::Ok().json(devices.list_local(limit).await))
}

/// `GET /internal/v1/actors/devices/{id}`: one device actor of a shard this node serves.
async fn node_device(
    _auth: FromNode,
    devices: web::Data<NodeDevices>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = crate::http::path_id(id.into_inner(), "no live device actor with this id")?;
    match devices.inspect_local(DeviceId(id)).await? {
        Some(view) => Ok(HttpResponse::Ok().json(view)),
        None => Err(ApiError::not_found("no live device actor with this id")),
    }
}

/// The routes of the dispatch shard's server, besides [`node_routes`].
pub fn dispatch_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/internal/v1/emergencies", web::post().to(emergency));
}

/// The routes of a cluster node's internal server; `devices` is served with them.
pub fn node_routes(cfg: &mut web::ServiceConfig, devices: web::Data<NodeDevices>) {
    // A batch that passed a front's limit is re-encoded field by field here: allow for that.
    cfg.service(
        web::resource("/internal/v1/readings")
            .app_data(devices.clone())
            .app_data(BodyLimit(INTERNAL_BODY_LIMIT))
            .route(web::post().to(readings)),
    )
    .service(
        web::resource("/internal/v1/devices/fall/cancel")
            .app_data(devices.clone())
            .route(web::post().to(cancel_fall)),
    )
    .service(
        web::resource("/internal/v1/devices/offline")
            .app_data(devices.clone())
            .route(web::post().to(report_offline)),
    )
    .service(
        web::resource("/internal/v1/actors/devices")
            .app_data(devices.clone())
            .route(web::get().to(node_devices)),
    )
    .service(
        web::resource("/internal/v1/actors/devices/{id}")
            .app_data(devices)
            .route(web::get().to(node_device)),
    );
}

/// The body limit of node-to-node requests (their bodies were already admitted by a front).
const INTERNAL_BODY_LIMIT: usize = 64 * 1024 * 1024;
