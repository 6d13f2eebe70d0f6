//! The HTTP error boundary: one enum, one `application/problem+json` envelope.
//!
//! Every handler and extractor returns [`ApiError`]. Each variant maps to one status and one
//! problem `type`; unexpected errors are logged with their cause chain and answered with an
//! opaque 500 (never a stack trace, never patient data).

use std::fmt;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::actors::device::DeviceError;
use crate::domain::validation::FieldError;
use crate::domain::vitals::BodyError;
use crate::ingest::IngestError;
use crate::persistence::StoreError;

/// Base of every problem `type` URI.
pub const PROBLEM_BASE: &str = "https://shers.dev/problems/";

/// The problem+json body (RFC 9457).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// URI identifying the problem kind.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the problem kind.
    pub title: &'static str,
    /// HTTP status.
    pub status: u16,
    /// Explanation of this occurrence.
    pub detail: String,
    /// Field-level problems, each with a JSON pointer into the request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    pub errors: Vec<FieldError>,
    /// Extension members (e.g. `outcome` for a lost offer race).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extensions: Map<String, Value>,
}

/// Every error an endpoint can answer with. `Debug` prints only the status and kind, because
/// middleware logs it and details may echo request content.
pub enum ApiError {
    /// 400: the body is not valid JSON (or not the expected shape at all).
    Malformed {
        /// What is wrong.
        detail: String,
        /// Where, when known.
        errors: Vec<FieldError>,
    },
    /// 401: no token, or an unknown or revoked one.
    Unauthorized,
    /// 403: a valid token whose role may not use this endpoint.
    Forbidden {
        /// Which roles may.
        detail: String,
    },
    /// 404: no such resource or route.
    NotFound {
        /// What was not found.
        detail: String,
    },
    /// 405: the route exists but not with this method.
    MethodNotAllowed,
    /// 409: the request conflicts with the current state.
    Conflict {
        /// What went wrong, for people.
        detail: String,
        /// Extension members, e.g. `{"outcome": "taken"}`.
        extensions: Map<String, Value>,
    },
    /// 413: the body is larger than the limit.
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// 415: the body is not JSON.
    UnsupportedMediaType,
    /// 422: valid JSON that fails validation.
    Validation {
        /// What went wrong, for people.
        detail: String,
        /// Each problem with its pointer.
        errors: Vec<FieldError>,
    },
    /// 429: this caller is sending faster than we accept.
    TooManyRequests {
        /// Seconds to wait.
        retry_after_s: u32,
    },
    /// 503: a dependency (the database) is down or the node is overloaded.
    Unavailable {
        /// What is unavailable.
        detail: String,
        /// Seconds to wait.
        retry_after_s: u32,
    },
    /// 500: a bug or an unexpected failure; details only in the log.
    Internal(anyhow::Error),
}

impl ApiError {
    /// A 422 with a single field problem.
    pub fn field(pointer: impl Into<String>, message: impl Into<String>) -> Self {
        let error = FieldError::new(pointer, message);
        Self::Validation {
            detail: format!("{}: {}", error.pointer, error.message),
            errors: vec![error],
        }
    }

    /// A 422 listing every field problem (the detail joins them for people).
    pub fn fields(errors: Vec<FieldError>) -> Self {
        let detail = errors
            .iter()
            .map(|e| format!("{}: {}", e.pointer, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        Self::Validation { detail, errors }
    }

    /// `Ok` when `errors` is empty, otherwise [`ApiError::fields`].
    pub fn check(errors: Vec<FieldError>) -> Result<(), Self> {
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Self::fields(errors))
        }
    }

    /// A 404 for `what`.
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::NotFound {
            detail: what.into(),
        }
    }

    fn slug_title(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::Malformed { .. } => ("malformed-request", "Malformed request"),
            ApiError::Unauthorized => ("unauthorized", "Authentication required"),
            ApiError::Forbidden { .. } => ("forbidden", "Forbidden"),
            ApiError::NotFound { .. } => ("not-found", "Not found"),
            ApiError::MethodNotAllowed => ("method-not-allowed", "Method not allowed"),
            ApiError::Conflict { .. } => ("conflict", "Conflict"),
            ApiError::PayloadTooLarge { .. } => ("payload-too-large", "Payload too large"),
            ApiError::UnsupportedMediaType => ("unsupported-media-type", "Unsupported media type"),
            ApiError::Validation { .. } => ("validation", "Validation failed"),
            ApiError::TooManyRequests { .. } => ("too-many-requests", "Too many requests"),
            ApiError::Unavailable { .. } => ("unavailable", "Service unavailable"),
            ApiError::Internal(_) => ("internal", "Internal server error"),
        }
    }

    /// The problem body for this error.
    pub fn problem(&self) -> Problem {
        let (slug, title) = self.slug_title();
        let (detail, errors, extensions) = match self {
            ApiError::Malformed { detail, errors } | ApiError::Validation { detail, errors } => {
                (detail.clone(), errors.clone(), Map::new())
            }
            ApiError::Unauthorized => (
                "a valid bearer token is required (Authorization: Bearer <token>)".to_owned(),
                Vec::new(),
                Map::new(),
            ),
            ApiError::Forbidden { detail } | ApiError::NotFound { detail } => {
                (detail.clone(), Vec::new(), Map::new())
            }
            ApiError::MethodNotAllowed => (
                "this route does not accept that method".to_owned(),
                Vec::new(),
                Map::new(),
            ),
            ApiError::Conflict { detail, extensions } => {
                (detail.clone(), Vec::new(), extensions.clone())
            }
            ApiError::PayloadTooLarge { limit } => (
                format!("the request body exceeds the limit of {limit} bytes"),
                Vec::new(),
                Map::new(),
            ),
            ApiError::UnsupportedMediaType => (
                "the request body must be JSON (Content-Type: application/json)".to_owned(),
                Vec::new(),
                Map::new(),
            ),
            ApiError::TooManyRequests { retry_after_s } => (
                format!("slow down and retry after {retry_after_s} s"),
                Vec::new(),
                Map::new(),
            ),
            ApiError::Unavailable { detail, .. } => (detail.clone(), Vec::new(), Map::new()),
            ApiError::Internal(_) => (
                "an unexpected error occurred; it has been logged".to_owned(),
                Vec::new(),
                Map::new(),
            ),
        };
        Problem {
            kind: format!("{PROBLEM_BASE}{slug}"),
            title,
            status: self.status_code().as_u16(),
            detail,
            errors,
            extensions,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Titles only: details may echo request content and must not reach logs.
        f.write_str(self.slug_title().1)
    }
}

impl fmt::Debug for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (slug, _) = self.slug_title();
        write!(f, "ApiError({} {slug})", self.status_code().as_u16())
    }
}

impl std::error::Error for ApiError {}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Malformed { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(err) = self {
            tracing::error!(error.cause_chain = ?err, "unexpected error");
        }
        let mut response = HttpResponse::build(self.status_code());
        response.insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        ));
        match self {
            ApiError::Unauthorized => {
                response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            ApiError::TooManyRequests { retry_after_s }
            | ApiError::Unavailable { retry_after_s, .. } => {
                response.insert_header((header::RETRY_AFTER, retry_after_s.to_string()));
            }
            _ => {}
        }
        match serde_json::to_vec(&self.problem()) {
            Ok(body) => response.body(body),
            Err(_) => response.finish(),
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Body(e) => {
                let pointer = e.pointer().to_owned();
                let message = e.to_string();
                match e {
                    BodyError::Malformed { .. } => Self::Malformed {
                        detail: message.clone(),
                        errors: vec![FieldError::new(pointer, message)],
                    },
                    BodyError::TooMany { .. } | BodyError::NotAReading { .. } => Self::Validation {
                        detail: format!("{pointer}: {message}"),
                        errors: vec![FieldError::new(pointer, message)],
                    },
                }
            }
            IngestError::Refused(rejected) => {
                Self::fields(rejected.into_iter().flat_map(|r| r.errors).collect())
            }
            IngestError::AtCapacity | IngestError::Unavailable => Self::Unavailable {
                detail: e.to_string(),
                retry_after_s: 1,
            },
        }
    }
}

impl From<crate::actors::error::ActorError> for ApiError {
    fn from(err: crate::actors::error::ActorError) -> Self {
        ApiError::Unavailable {
            detail: err.to_string(),
            retry_after_s: 1,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound => ApiError::not_found("no such resource"),
            StoreError::Unavailable(cause) => {
                tracing::warn!(error.cause = %cause, "database unavailable");
                ApiError::Unavailable {
                    detail: "the database is unavailable; retry shortly".to_owned(),
                    retry_after_s: 2,
                }
            }
            StoreError::Busy(cause) => {
                tracing::warn!(error.cause = %cause, "database busy");
                ApiError::Unavailable {
                    detail: "the database is busy; retry shortly".to_owned(),
                    retry_after_s: 1,
                }
            }
            StoreError::Conflict(_) => ApiError::Conflict {
                detail: "the resource already exists or was changed concurrently".to_owned(),
                extensions: Map::new(),
            },
            other => ApiError::Internal(other.into()),
        }
    }
}

impl From<DeviceError> for ApiError {
    fn from(err: DeviceError) -> Self {
        match err {
            DeviceError::Unreachable(cause) => {
                tracing::warn!(error.cause = %cause, "device unreachable");
                ApiError::Unavailable {
                    detail:
                        "the wearable's device actor cannot be reached right now; retry shortly"
                            .to_owned(),
                    retry_after_s: 1,
                }
            }
            DeviceError::Store(e) => e.into(),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> Self {
        ApiError::Internal(err)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(err: &ApiError) -> Value {
        serde_json::to_value(err.problem()).unwrap()
    }

    // Long on purpose: one exact problem+json per ApiError variant, listed side by side.
    #[test]
    fn every_variant_has_its_exact_json() {
        let p = |slug: &str| format!("{PROBLEM_BASE}{slug}");
        let cases = vec![
            (
                ApiError::Malformed {
                    detail: "expected value at line 1 column 2".into(),
                    errors: vec![FieldError::new("", "expected value at line 1 column 2")],
                },
                json!({"type": p("malformed-request"), "title": "Malformed request", "status": 400,
                       "detail": "expected value at line 1 column 2",
                       "errors": [{"pointer": "", "message": "expected value at line 1 column 2"}]}),
            ),
            (
                ApiError::Unauthorized,
                json!({"type": p("unauthorized"), "title": "Authentication required", "status": 401,
                       "detail": "a valid bearer token is required (Authorization: Bearer <token>)"}),
            ),
            (
                ApiError::Forbidden {
                    detail: "requires role admin".into(),
                },
                json!({"type": p("forbidden"), "title": "Forbidden", "status": 403,
                       "detail": "requires role admin"}),
            ),
            (
                ApiError::not_found("no incident abc"),
                json!({"type": p("not-found"), "title": "Not found", "status": 404,
                       "detail": "no incident abc"}),
            ),
            (
                ApiError::MethodNotAllowed,
                json!({"type": p("method-not-allowed"), "title": "Method not allowed", "status": 405,
                       "detail": "this route does not accept that method"}),
            ),
            (
                ApiError::Conflict {
                    detail: "offer already taken".into(),
                    extensions: json!({"outcome": "taken"}).as_object().cloned().unwrap(),
                },
                json!({"type": p("conflict"), "title": "Conflict", "status": 409,
                       "detail": "offer already taken", "outcome": "taken"}),
            ),
            (
                ApiError::PayloadTooLarge { limit: 1024 },
                json!({"type": p("payload-too-large"), "title": "Payload too large", "status": 413,
                       "detail": "the request body exceeds the limit of 1024 bytes"}),
            ),
            (
                ApiError::UnsupportedMediaType,
                json!({"type": p("unsupported-media-type"), "title": "Unsupported media type",
                       "status": 415,
                       "detail": "the request body must be JSON (Content-Type: application/json)"}),
            ),
            (
                ApiError::field("/readings/3/heart_rate_bpm", "must be between 20 and 300"),
                json!({"type": p("validation"), "title": "Validation failed", "status": 422,
                       "detail": "/readings/3/heart_rate_bpm: must be between 20 and 300",
                       "errors": [{"pointer": "/readings/3/heart_rate_bpm",
                                   "message": "must be between 20 and 300"}]}),
            ),
            (
                ApiError::TooManyRequests { retry_after_s: 1 },
                json!({"type": p("too-many-requests"), "title": "Too many requests", "status": 429,
                       "detail": "slow down and retry after 1 s"}),
            ),
            (
                ApiError::Unavailable {
                    detail: "the database is unavailable; retry shortly".into(),
                    retry_after_s: 2,
                },
                json!({"type": p("unavailable"), "title": "Service unavailable", "status": 503,
                       "detail": "the database is unavailable; retry shortly"}),
            ),
            (
                ApiError::Internal(anyhow::anyhow!("secret cause")),
                json!({"type": p("internal"), "title": "Internal server error", "status": 500,
                       "detail": "an unexpected error occurred; it has been logged"}),
            ),
        ];
        for (err, expected) in cases {
            assert_eq!(body(&err), expected, "{err:?}");
            assert_eq!(
                err.status_code().as_u16(),
                expected["status"].as_u64().unwrap() as u16
            );
        }
    }

    /// A busy database and an unreachable one are both 503s that say which it is.
    #[test]
    fn store_errors_say_whether_the_database_is_busy_or_unreachable() {
        let busy = ApiError::from(StoreError::Busy("every connection in use".into()));
        assert_eq!(
            body(&busy),
            json!({"type": format!("{PROBLEM_BASE}unavailable"), "title": "Service unavailable",
                   "status": 503, "detail": "the database is busy; retry shortly"})
        );
        assert_eq!(
            busy.error_response().headers().get("retry-after").unwrap(),
            "1"
        );
        let down = ApiError::from(StoreError::Unavailable("connection refused".into()));
        assert_eq!(
            down.problem().detail,
            "the database is unavailable; retry shortly"
        );
        assert_eq!(
            down.error_response().headers().get("retry-after").unwrap(),
            "2"
        );
    }

    #[test]
    fn headers_and_content_type() {
        let resp = ApiError::Unavailable {
            detail: "x".into(),
            retry_after_s: 2,
        }
        .error_response();
        assert_eq!(resp.headers().get("retry-after").unwrap(), "2");
        assert_eq!(
            resp.headers().get("content-type").unwrap(),
            "application/problem+json"
        );
        let resp = ApiError::Unauthorized.error_response();
        assert_eq!(resp.headers().get("www-authenticate").unwrap(), "Bearer");
    }
}
