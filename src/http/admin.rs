//! Admin endpoints (role `admin`): API token management. Live actor inspection joins here as
//! the actors arrive.

use actix_web::{HttpResponse, web};
use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::{AdminOnly, AuthService, Authorized};
use super::error::ApiError;
use super::json::JsonBody;
use crate::domain::auth::{Role, validate_binding};
use crate::domain::ids::{PatientId, TokenId, UnitId};
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
    let name = body.name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(ApiError::field("/name", "must be 1 to 200 characters"));
    }
    validate_binding(body.role, body.unit_id.as_ref(), body.patient_id.as_ref()).map_err(|e| {
        let pointer = match e {
            crate::domain::auth::BindingError::CrewNeedsUnit
            | crate::domain::auth::BindingError::UnitNotAllowed => "/unit_id",
            _ => "/patient_id",
        };
        ApiError::field(pointer, e.to_string())
    })?;
    let name = name.to_owned();
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
