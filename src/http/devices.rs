//! A wearer's "I'm OK": `POST /api/v1/devices/{id}/fall/cancel` stands down a running fall
//! watch before it escalates. The device's actor decides (and stores `device.fall_cancelled`);
//! the [`crate::actors::device::DeviceRouter`] takes it to the actor wherever it runs.

use actix_web::{HttpResponse, web};
use serde::Serialize;

use super::AppState;
use super::auth::{Authorized, Policy};
use super::error::ApiError;
use crate::actors::device::{CancelDeviceFall, FallCancelled};
use crate::domain::auth::Role;
use crate::domain::ids::DeviceId;
use crate::persistence::patients;

/// The device's gateway, or the patient app of its wearer.
pub struct GatewayOrPatient;
impl Policy for GatewayOrPatient {
    const ROLES: &'static [Role] = &[Role::Gateway, Role::Patient];
}

/// The answer to a fall cancel.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FallCancelAnswer {
    /// True when a running fall watch stood down; false when none was running (none started,
    /// it stood down already, or its grace window had run out and it escalated).
    pub cancelled: bool,
}

/// Cancels a running fall alert of a wearable ("I'm OK"): no incident is opened for it.
#[utoipa::path(post, path = "/api/v1/devices/{id}/fall/cancel", tag = "vitals",
    params(("id" = String, Path, description = "device id")), security(("bearer" = [])),
    responses((status = 200, body = FallCancelAnswer),
              (status = 403, body = super::error::Problem),
              (status = 404, body = super::error::Problem),
              (status = 503, body = super::error::Problem)))]
pub async fn cancel_fall(
    auth: Authorized<GatewayOrPatient>,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = DeviceId(id.into_inner());
    let principal = auth.principal;
    let lookup = id.clone();
    let device = state
        .db
        .run(move |mut conn| async move { patients::find_device(&mut conn, &lookup).await })
        .await?
        .ok_or_else(|| ApiError::not_found("no device with this id"))?;
    if principal.role == Role::Patient
        && principal.patient_id.as_ref() != Some(&device.device.patient_id)
    {
        return Err(ApiError::Forbidden {
            detail: "a patient token may only cancel its own wearable's fall alert".to_owned(),
        });
    }
    let done = state
        .devices
        .cancel_fall(CancelDeviceFall {
            device_id: id,
            by: principal.role,
        })
        .await?;
    let cancelled = match done {
        FallCancelled::Cancelled => true,
        FallCancelled::NoWatch => false,
        FallCancelled::UnknownDevice => return Err(ApiError::not_found("no device with this id")),
    };
    Ok(HttpResponse::Ok().json(FallCancelAnswer { cancelled }))
}
