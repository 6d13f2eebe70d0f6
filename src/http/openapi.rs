//! The generated OpenAPI document served at `/api/openapi.json`.

use std::sync::OnceLock;

use actix_web::HttpResponse;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::auth::{AnyRole, Authorized};

/// Registers the bearer security scheme.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(title = "SHERS", description = "Smart Healthcare Emergency Response System API"),
    paths(
        super::ops::healthz,
        super::ops::readyz,
        super::ops::metrics,
        serve,
        super::ops::whoami,
        super::ops::dashboard_config,
        super::admin::create_token,
        super::admin::list_tokens,
        super::admin::revoke_token,
        super::admin::list_actors,
        super::admin::inspect_actor,
        super::admin::crash_incident,
        super::admin::crash_unit,
        super::reference::create_patient,
        super::reference::get_patient,
        super::reference::create_device,
        super::devices::cancel_fall,
        super::vitals::ingest,
        super::events::page,
        super::analytics::response_times_handler,
        super::events::stream,
        super::events::console_ws,
        super::incidents::create,
        super::incidents::list,
        super::incidents::get,
        super::incidents::cancel,
        super::incidents::invoice,
        super::fleet::assign,
        super::fleet::create_unit,
        super::fleet::list_units,
        super::fleet::get_unit,
        super::fleet::unit_location,
        super::fleet::unit_status,
        super::fleet::register_push_token,
        super::fleet::remove_push_token,
        super::fleet::create_hospital,
        super::fleet::list_hospitals,
        super::fleet::accept_offer,
        super::fleet::decline_offer,
        super::crew_session::crew_ws,
        super::insurance::verify,
        super::insurance::release,
        super::insurance::create_policy,
        super::vitals::gateway_ws,
    ),
    components(schemas(super::error::Problem, super::ops::Readiness, super::admin::CreateToken)),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

/// The serialised document, built once.
pub fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .unwrap_or_else(|_| "{}".to_owned())
    })
}

/// The generated OpenAPI document (any role).
#[utoipa::path(get, path = "/api/openapi.json", tag = "operations",
    security(("bearer" = [])),
    responses((status = 200, description = "OpenAPI 3.1 document")))]
pub async fn serve(_auth: Authorized<AnyRole>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(document())
}
