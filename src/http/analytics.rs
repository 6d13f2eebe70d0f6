//! Response-time analytics for dispatch centres (`docs/api.md` "Analytics").

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::AppState;
use super::auth::{Authorized, ConsoleOnly};
use super::error::ApiError;
use crate::domain::analytics::{report_range, response_times};
use crate::domain::incident::Priority;
use crate::persistence::incidents as store;

/// `?from&to&priority`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeQuery {
    /// Start (RFC 3339; default 24 h before `to`).
    pub from: Option<DateTime<Utc>>,
    /// End, exclusive (default now).
    pub to: Option<DateTime<Utc>>,
    /// `emergency`, `urgent` or `non_urgent` (default all).
    pub priority: Option<Priority>,
}

/// Count, mean, p50, p90, threshold and compliance for each NEMSIS interval of the incidents
/// created in the range.
#[utoipa::path(get, path = "/api/v1/analytics/response-times", tag = "analytics", security(("bearer" = [])),
    params(("from" = Option<String>, Query), ("to" = Option<String>, Query), ("priority" = Option<String>, Query)),
    responses((status = 200, description = "{from, to, priority, intervals}"), (status = 422, body = super::error::Problem)))]
pub async fn response_times_handler(
    _auth: Authorized<ConsoleOnly>,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let q = web::Query::<RangeQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::field("/query", e.to_string()))?
        .into_inner();
    let (from, to) = report_range(q.from, q.to, Utc::now())
        .map_err(|e| ApiError::field(e.pointer, e.message))?;
    let priority = q.priority;
    let times =
        state
            .db
            .run(move |mut conn| async move {
                store::times_in_range(&mut conn, from, to, priority).await
            })
            .await?;
    let mut intervals = Map::new();
    for (name, stats) in response_times(times.iter(), &state.settings.analytics) {
        intervals.insert(
            name.to_owned(),
            serde_json::to_value(stats).unwrap_or(Value::Null),
        );
    }
    Ok(HttpResponse::Ok().json(json!({
        "from": from, "to": to, "priority": priority, "incidents": times.len(), "intervals": intervals,
    })))
}
