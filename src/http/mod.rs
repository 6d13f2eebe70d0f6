//! actix-web: REST handlers, WebSocket endpoints, admin endpoints.
//!
//! Handlers validate, authorise and send a message (or read a read-model); they hold no
//! business rules. Every error leaves as problem+json ([`error::ApiError`]).

pub mod admin;
pub mod analytics;
pub mod auth;
pub mod crew_session;
pub mod devices;
pub mod error;
pub mod events;
pub mod fleet;
pub mod incidents;
pub mod insurance;
pub mod json;
pub mod openapi;
pub mod ops;
pub mod reference;
pub mod telemetry;
pub mod vitals;
pub mod ws;

use std::sync::Arc;

use actix_web::{HttpRequest, web};

use actix::Addr;

use crate::actors::device::DeviceRouter;
use crate::actors::device::TriageRuntime;
use crate::actors::incident::IncidentDirectory;
use crate::actors::unit::Fleet;
use crate::config::Settings;
use crate::domain::validation::valid_external_id;
use crate::persistence::Db;
use error::ApiError;

/// Shared state handed to every handler.
pub struct AppState {
    /// The database pool.
    pub db: Db,
    /// The effective settings.
    pub settings: Arc<Settings>,
    /// Triage rules and timers.
    pub triage: Arc<TriageRuntime>,
    /// The incident directory (creation, dedup, commands).
    pub incidents: Addr<IncidentDirectory>,
    /// The fleet hub (units, hospitals).
    pub fleet: Addr<Fleet>,
    /// The billing sagas.
    pub billing: Addr<crate::actors::billing::Billing>,
    /// The console event fan-out.
    pub broadcaster: Addr<crate::actors::broadcaster::Broadcaster>,
    /// The notification outbox worker.
    pub notifier: Addr<crate::actors::notifier::NotifierActor>,
    /// The wearables, wherever their actors run (this process, or a cluster's device shards):
    /// every ingest edge goes through it.
    pub devices: Arc<dyn DeviceRouter>,
    /// Admission control for ingest: one permit per reading being triaged.
    pub ingest_gate: Arc<tokio::sync::Semaphore>,
    /// Turns true when the node hands its work over: long-lived sessions (WebSocket, SSE)
    /// end so the drain does not wait on them, and their clients reconnect elsewhere.
    pub closing: tokio::sync::watch::Receiver<bool>,
}

/// The crew WebSocket.
pub const WS_CREW: &str = "/api/v1/ws/crew";
/// The console WebSocket.
pub const WS_CONSOLE: &str = "/api/v1/ws/console";
/// The gateway WebSocket.
pub const WS_GATEWAY: &str = "/api/v1/ws/gateway";

/// The WebSocket routes: the only ones that accept a token as `?access_token=` (browsers cannot
/// set an `Authorization` header on an upgrade). Every other route reads a token from the
/// header only, so tokens stay out of URLs and logs.
pub const WEBSOCKET_ROUTES: [&str; 3] = [WS_CREW, WS_CONSOLE, WS_GATEWAY];

/// Registers every route.
///
/// Long on purpose: the whole route table in one place, read top to bottom.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(ops::index))
        .route("/healthz", web::get().to(ops::healthz))
        .route("/readyz", web::get().to(ops::readyz))
        .route("/metrics", web::get().to(ops::metrics))
        .route("/api/openapi.json", web::get().to(openapi::serve))
        .route("/api/v1/whoami", web::get().to(ops::whoami))
        .route(
            "/api/v1/dashboard/config",
            web::get().to(ops::dashboard_config),
        )
        .route(
            "/api/v1/patients",
            web::post().to(reference::create_patient),
        )
        .route(
            "/api/v1/patients/{id}",
            web::get().to(reference::get_patient),
        )
        .route("/api/v1/devices", web::post().to(reference::create_device))
        .route(
            "/api/v1/devices/{id}/fall/cancel",
            web::post().to(devices::cancel_fall),
        )
        .service(
            web::resource("/api/v1/incidents")
                .route(web::get().to(incidents::list))
                .route(web::post().to(incidents::create))
                .default_service(web::to(method_not_allowed)),
        )
        .route("/api/v1/incidents/{id}", web::get().to(incidents::get))
        .route(
            "/api/v1/incidents/{id}/assign",
            web::post().to(fleet::assign),
        )
        .route(
            "/api/v1/incidents/{id}/invoice",
            web::get().to(incidents::invoice),
        )
        .service(
            web::resource("/api/v1/units")
                .route(web::get().to(fleet::list_units))
                .route(web::post().to(fleet::create_unit))
                .default_service(web::to(method_not_allowed)),
        )
        .route("/api/v1/units/{id}", web::get().to(fleet::get_unit))
        .route(
            "/api/v1/units/{id}/location",
            web::post().to(fleet::unit_location),
        )
        .route(
            "/api/v1/units/{id}/status",
            web::post().to(fleet::unit_status),
        )
        .route(
            "/api/v1/units/{id}/push-tokens",
            web::post().to(fleet::register_push_token),
        )
        .route(
            "/api/v1/units/{id}/push-tokens/{token}",
            web::delete().to(fleet::remove_push_token),
        )
        .service(
            web::resource("/api/v1/hospitals")
                .route(web::get().to(fleet::list_hospitals))
                .route(web::post().to(fleet::create_hospital))
                .default_service(web::to(method_not_allowed)),
        )
        .route(
            "/api/v1/offers/{id}/accept",
            web::post().to(fleet::accept_offer),
        )
        .route(
            "/api/v1/offers/{id}/decline",
            web::post().to(fleet::decline_offer),
        )
        .route(WS_CREW, web::get().to(crew_session::crew_ws))
        .route(
            "/api/v1/incidents/{id}/cancel",
            web::post().to(incidents::cancel),
        )
        .route(
            "/api/v1/analytics/response-times",
            web::get().to(analytics::response_times_handler),
        )
        .route("/api/v1/events", web::get().to(events::page))
        .route("/api/v1/events/stream", web::get().to(events::stream))
        .route(WS_CONSOLE, web::get().to(events::console_ws))
        .route("/api/v1/vitals", web::post().to(vitals::ingest))
        .route(WS_GATEWAY, web::get().to(vitals::gateway_ws))
        .service(
            web::resource("/admin/tokens")
                .route(web::get().to(admin::list_tokens))
                .route(web::post().to(admin::create_token))
                .default_service(web::to(method_not_allowed)),
        )
        .route(
            "/admin/tokens/{id}/revoke",
            web::post().to(admin::revoke_token),
        )
        .route("/admin/actors", web::get().to(admin::list_actors))
        .route(
            "/admin/actors/{kind}/{id}",
            web::get().to(admin::inspect_actor),
        )
        .route(
            "/admin/actors/incident/{id}/crash",
            web::post().to(admin::crash_incident),
        )
        .route(
            "/admin/actors/unit/{id}/crash",
            web::post().to(admin::crash_unit),
        );
}

/// A caller-chosen id (patient, unit, device, claim) taken from a path. An id that breaks the
/// id rule ([`valid_external_id`]) names nothing, so it is answered 404 with `not_found`
/// before any lookup sees it.
pub(crate) fn path_id(raw: String, not_found: &str) -> Result<String, ApiError> {
    if valid_external_id(&raw) {
        Ok(raw)
    } else {
        Err(ApiError::not_found(not_found))
    }
}

async fn method_not_allowed() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}

/// Fallback for unknown routes: a problem+json 404.
pub async fn not_found(req: HttpRequest) -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.path()
    )))
}
