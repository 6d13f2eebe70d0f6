//! The insurance verification service (`docs/api.md` "Billing and insurance"), mounted at
//! `/insurance/v1`: in-process by `shers serve`/`demo` (unless `insurance.embedded = false`),
//! or alone by `shers insurance`. Billing always calls it over HTTP.
//!
//! Service-to-service and administrative: every endpoint needs an `admin` token; the calls
//! billing makes (verify, release) also accept the server's own billing credential
//! ([`InsuranceCaller`]), which works on this process only.

use actix_web::{HttpResponse, web};
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;

use super::auth::{AdminOnly, Authorized, InsuranceCaller};
use super::error::ApiError;
use super::json::JsonBody;
use crate::domain::ids::PatientId;
use crate::domain::validation::{FieldError, TextKind, check_id, check_text};
use crate::persistence::insurance::{self as store, Policy};
use crate::persistence::{Db, StoreError};

/// The largest amount accepted (10 million in major units).
const MAX_AMOUNT_CENTS: i64 = 1_000_000_000;

/// `POST /insurance/v1/verify` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// The insured patient.
    #[schema(value_type = String)]
    pub patient_id: PatientId,
    /// The incident being billed (one claim per incident).
    pub incident_id: String,
    /// The bill, minor units; a positive integer.
    pub amount_cents: i64,
}

/// Verifies coverage and holds the covered amount:
/// `{verified, coverage_status, covered_cents, patient_due_cents, claim_id}`.
#[utoipa::path(post, path = "/insurance/v1/verify", tag = "insurance", request_body = VerifyRequest,
    security(("bearer" = [])),
    responses((status = 200, description = "the decision"), (status = 409, body = super::error::Problem),
              (status = 422, body = super::error::Problem)))]
pub async fn verify(
    _auth: InsuranceCaller,
    db: web::Data<Db>,
    body: JsonBody<VerifyRequest>,
) -> Result<HttpResponse, ApiError> {
    let b = body.0;
    let mut errors = Vec::new();
    check_id(&mut errors, "/patient_id", b.patient_id.as_str());
    check_id(&mut errors, "/incident_id", &b.incident_id);
    if b.amount_cents <= 0 || b.amount_cents > MAX_AMOUNT_CENTS {
        errors.push(FieldError::new(
            "/amount_cents",
            "must be a positive integer number of cents",
        ));
    }
    ApiError::check(errors)?;
    let decision = db
        .run(move |mut conn| async move {
            store::verify(
                &mut conn,
                &b.patient_id,
                &b.incident_id,
                b.amount_cents,
                Utc::now(),
            )
            .await
        })
        .await
        .map_err(|e| match e {
            StoreError::Conflict(detail) => ApiError::Conflict {
                detail,
                extensions: Default::default(),
            },
            other => other.into(),
        })?;
    Ok(HttpResponse::Ok().json(json!({
        "verified": true,
        "coverage_status": decision.coverage,
        "covered_cents": decision.covered_cents,
        "patient_due_cents": decision.patient_due_cents,
        "claim_id": decision.claim_id,
    })))
}

/// Releases a claim hold (compensation when billing fails); idempotent.
#[utoipa::path(post, path = "/insurance/v1/claims/{id}/release", tag = "insurance",
    security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, description = "released"), (status = 404, body = super::error::Problem)))]
pub async fn release(
    _auth: InsuranceCaller,
    db: web::Data<Db>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = super::path_id(id.into_inner(), "no such claim")?;
    let claim = id.clone();
    db.run(move |mut conn| async move { store::release(&mut conn, &claim, Utc::now()).await })
        .await
        .map_err(|e| match e {
            StoreError::NotFound => ApiError::not_found("no such claim"),
            other => other.into(),
        })?;
    Ok(HttpResponse::Ok().json(json!({"claim_id": id, "status": "released"})))
}

/// `POST /insurance/v1/policies` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPolicy {
    /// Insured patient.
    #[schema(value_type = String)]
    pub patient_id: PatientId,
    /// The insurer, by name.
    pub provider: String,
    /// Member number.
    pub member_id: String,
    /// Coverage available, minor units.
    pub coverage_cents: i64,
}

/// Creates or replaces a patient's policy.
#[utoipa::path(post, path = "/insurance/v1/policies", tag = "insurance", request_body = NewPolicy,
    security(("bearer" = [])), responses((status = 201, description = "the policy"), (status = 422, body = super::error::Problem)))]
pub async fn create_policy(
    _auth: Authorized<AdminOnly>,
    db: web::Data<Db>,
    body: JsonBody<NewPolicy>,
) -> Result<HttpResponse, ApiError> {
    let b = body.0;
    let mut errors = Vec::new();
    check_id(&mut errors, "/patient_id", b.patient_id.as_str());
    check_text(
        &mut errors,
        "/provider",
        &b.provider,
        TextKind::Line,
        true,
        200,
    );
    check_text(
        &mut errors,
        "/member_id",
        &b.member_id,
        TextKind::Line,
        true,
        100,
    );
    if b.coverage_cents < 0 || b.coverage_cents > MAX_AMOUNT_CENTS {
        errors.push(FieldError::new(
            "/coverage_cents",
            "must be a non-negative integer number of cents",
        ));
    }
    ApiError::check(errors)?;
    let policy = Policy {
        id: format!("pol_{}", uuid::Uuid::now_v7().simple()),
        patient_id: b.patient_id,
        provider: b.provider.trim().to_owned(),
        member_id: b.member_id.trim().to_owned(),
        remaining_cents: b.coverage_cents,
    };
    let stored = policy.clone();
    db.run(
        move |mut conn| async move { store::upsert_policy(&mut conn, &stored, Utc::now()).await },
    )
    .await?;
    Ok(HttpResponse::Created().json(policy))
}

/// Registers the insurance routes under `/insurance/v1`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/insurance/v1")
            .route("/verify", web::post().to(verify))
            .route("/claims/{id}/release", web::post().to(release))
            .route("/policies", web::post().to(create_policy)),
    );
}
