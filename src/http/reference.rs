//! Reference data: patients and their wearables (`docs/api.md` "Reference data").
//!
//! Creating reference data needs `admin`; reading a patient needs `console` (or `admin`), or a
//! `patient` token bound to that patient.

use actix_web::{HttpResponse, web};
use chrono::Utc;

use super::AppState;
use super::auth::{AdminOnly, Authorized, Policy};
use super::error::ApiError;
use super::json::JsonBody;
use crate::actors::incident::RegisterPatient;
use crate::domain::auth::Role;
use crate::domain::ids::PatientId;
use crate::domain::patients::{NewDevice, NewPatient};
use crate::persistence::{StoreError, patients};

/// Dispatchers, admins, and patients (for their own record).
pub struct ConsoleOrPatient;
impl Policy for ConsoleOrPatient {
    const ROLES: &'static [Role] = &[Role::Console, Role::Patient];
}

/// Registers a patient with their next of kin and insurance.
#[utoipa::path(post, path = "/api/v1/patients", tag = "reference data",
    request_body = NewPatient, security(("bearer" = [])),
    responses((status = 201, body = crate::domain::patients::Patient),
              (status = 409, body = super::error::Problem),
              (status = 422, body = super::error::Problem)))]
pub async fn create_patient(
    _auth: Authorized<AdminOnly>,
    state: web::Data<AppState>,
    body: JsonBody<NewPatient>,
) -> Result<HttpResponse, ApiError> {
    let patient = body
        .0
        .validate(|| PatientId(uuid::Uuid::now_v7().to_string()), Utc::now())
        .map_err(ApiError::fields)?;
    state
        .incidents
        .send(RegisterPatient(patient.clone()))
        .await
        .map_err(crate::actors::error::ActorError::mailbox(
            "incident directory",
        ))?
        .map_err(|e| match e {
            StoreError::Conflict(_) => ApiError::Conflict {
                detail: "a patient with this id already exists".to_owned(),
                extensions: Default::default(),
            },
            other => other.into(),
        })?;
    tracing::info!(patient.id = %patient.id, "patient registered");
    Ok(HttpResponse::Created()
        .insert_header(("Location", format!("/api/v1/patients/{}", patient.id)))
        .json(patient))
}

/// A patient's record.
#[utoipa::path(get, path = "/api/v1/patients/{id}", tag = "reference data",
    params(("id" = String, Path, description = "patient id")), security(("bearer" = [])),
    responses((status = 200, body = crate::domain::patients::Patient),
              (status = 404, body = super::error::Problem)))]
pub async fn get_patient(
    auth: Authorized<ConsoleOrPatient>,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = PatientId(super::path_id(id.into_inner(), "no patient with this id")?);
    if auth.principal.role == Role::Patient && auth.principal.patient_id.as_ref() != Some(&id) {
        return Err(ApiError::Forbidden {
            detail: "a patient token may only read its own patient".to_owned(),
        });
    }
    let found = state
        .db
        .run(move |mut conn| async move { patients::find_patient(&mut conn, &id).await })
        .await?;
    match found {
        Some(patient) => Ok(HttpResponse::Ok().json(patient)),
        None => Err(ApiError::not_found("no patient with this id")),
    }
}

/// Registers a wearable for a patient.
#[utoipa::path(post, path = "/api/v1/devices", tag = "reference data",
    request_body = NewDevice, security(("bearer" = [])),
    responses((status = 201, body = crate::domain::patients::Device),
              (status = 409, body = super::error::Problem),
              (status = 422, body = super::error::Problem)))]
pub async fn create_device(
    _auth: Authorized<AdminOnly>,
    state: web::Data<AppState>,
    body: JsonBody<NewDevice>,
) -> Result<HttpResponse, ApiError> {
    let device = body.0.validate(Utc::now()).map_err(ApiError::fields)?;
    let outcome = crate::actors::device::register(&state.db, device.clone())
        .await
        .map_err(|e| match e {
            StoreError::Conflict(_) => ApiError::Conflict {
                detail: "a device with this id is already registered".to_owned(),
                extensions: Default::default(),
            },
            other => other.into(),
        })?;
    if !outcome {
        return Err(ApiError::field("/patient_id", "no patient with this id"));
    }
    tracing::info!(device.id = %device.id, "device registered");
    Ok(HttpResponse::Created().json(device))
}
