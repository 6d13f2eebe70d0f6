//! Operational endpoints: liveness, readiness, metrics, the OpenAPI document, `whoami`.
//!
//! `/healthz` and `/readyz` are the only endpoints without a token: orchestrators probe them
//! without credentials and they reveal nothing but up/down. Everything else needs a role.

use std::time::Duration;

use actix_web::{HttpResponse, web};
use serde::Serialize;

use super::AppState;
use super::auth::{AdminOnly, AnyRole, Authorized};
use super::error::ApiError;
use crate::persistence::migrations;

/// Liveness: the process is up and serving.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "alive")))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// The readiness verdict.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    /// `sqlite` or `postgres`.
    #[schema(value_type = String)]
    pub database: crate::persistence::Backend,
    /// Why not ready, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Each configured bus (`amqp`, `mqtt`): `connected` or `connecting`. A broker outage
    /// never makes the process unready.
    #[serde(flatten)]
    pub buses: crate::bus::Links,
}

/// How long a readiness probe waits for the database.
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

/// Readiness: the database answers and every embedded migration is applied; 503 otherwise.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let db = &state.db;
    let check = async move {
        let missing = db
            .run(|mut conn| async move { migrations::missing(&mut conn).await })
            .await
            .map_err(|e: crate::persistence::StoreError| e.to_string())?;
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("migrations not applied: {}", missing.join(", ")))
        }
    };
    let verdict = match tokio::time::timeout(READINESS_TIMEOUT, check).await {
        Ok(result) => result,
        Err(_) => Err("database did not answer in time".to_owned()),
    };
    match verdict {
        Ok(()) => HttpResponse::Ok().json(Readiness {
            status: "ready",
            database: db.backend(),
            reason: None,
            buses: crate::bus::links(),
        }),
        Err(reason) => {
            tracing::warn!(reason = %reason, "not ready");
            HttpResponse::ServiceUnavailable()
                .insert_header(("Retry-After", "2"))
                .json(Readiness {
                    status: "not_ready",
                    database: db.backend(),
                    reason: Some(reason),
                    buses: crate::bus::links(),
                })
        }
    }
}

/// Prometheus metrics in the text exposition format (role `admin`; configure the scraper
/// with a bearer token).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    security(("bearer" = [])),
    responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
pub async fn metrics(_auth: Authorized<AdminOnly>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(super::telemetry::prometheus().render())
}

/// The start page (static, embedded in the binary; no data without a token). The page may load
/// images from the configured map tile server and nothing else from outside.
pub async fn index(state: web::Data<AppState>) -> HttpResponse {
    let img_src = match state.settings.dashboard.tile_origin() {
        Some(origin) => format!("img-src 'self' data: {origin}"),
        None => "img-src 'self' data:".to_owned(),
    };
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((
            "Content-Security-Policy",
            format!(
                "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' \
                 'unsafe-inline'; {img_src}; object-src 'none'; frame-ancestors 'none'"
            ),
        ))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .body(include_str!("../../web/index.html"))
}

/// The dashboard's settings (map tiles).
#[utoipa::path(get, path = "/api/v1/dashboard/config", tag = "operations",
    security(("bearer" = [])),
    responses((status = 200, description = "{tile_url, tile_attribution}"),
               (status = 401, body = super::error::Problem)))]
pub async fn dashboard_config(
    _auth: Authorized<AnyRole>,
    state: web::Data<AppState>,
) -> HttpResponse {
    HttpResponse::Ok().json(&state.settings.dashboard)
}

/// Who the caller is (the dashboard's login check).
#[utoipa::path(get, path = "/api/v1/whoami", tag = "operations",
    security(("bearer" = [])),
    responses((status = 200, description = "the caller's role and binding"),
               (status = 401, body = super::error::Problem)))]
pub async fn whoami(auth: Authorized<AnyRole>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(&auth.principal))
}
