//! The event stream for dispatch consoles (`docs/api.md` "Event stream"): a page of events, Server-
//! Sent Events honouring `Last-Event-ID`, and the console WebSocket. Every connected console
//! receives every event (fan-out), in sequence order, with no gap after a reconnect.

use std::sync::Arc;

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt as _;
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::auth::{Authorized, ConsoleOnly};
use super::error::ApiError;
use super::ws::{Incoming, Socket};
use actix::Addr;

use crate::actors::broadcaster::{Broadcast, Broadcaster, FeedItem, Stats, feed};
use crate::domain::events::RecordedEvent;
use crate::domain::ids::{IncidentId, UnitId};
use crate::persistence::{Db, events};

/// `?since=SEQ&limit=N`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Events after this sequence (default: the live head for streams, 0 for pages).
    pub since: Option<i64>,
    /// Page size (1–1000, default 100).
    pub limit: Option<i64>,
    /// The console WebSocket's token, read by `http::auth` (no other route takes one from
    /// its URL; here it is only let through).
    pub access_token: Option<String>,
}

fn query(req: &HttpRequest) -> Result<EventsQuery, ApiError> {
    let q = web::Query::<EventsQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::field("/query", e.to_string()))?
        .into_inner();
    if q.since.is_some_and(|s| s < 0) {
        return Err(ApiError::field(
            "/query/since",
            "must be a sequence number (≥ 0)",
        ));
    }
    Ok(q)
}

/// A page of events after `since`: `{items, next_cursor}` (`next_cursor` is the last `seq`).
#[utoipa::path(get, path = "/api/v1/events", tag = "events", security(("bearer" = [])),
    params(("since" = Option<i64>, Query), ("limit" = Option<i64>, Query)),
    responses((status = 200, description = "{items, next_cursor}")))]
pub async fn page(
    _auth: Authorized<ConsoleOnly>,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let q = query(&req)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::field(
            "/query/limit",
            "must be between 1 and 1000",
        ));
    }
    let since = q.since.unwrap_or(0);
    let items = state
        .db
        .run(move |mut conn| async move { events::read_since(&mut conn, since, limit).await })
        .await?;
    let next = items.last().map(|e| e.seq);
    Ok(HttpResponse::Ok().json(json!({"items": items, "next_cursor": next})))
}

async fn head(broadcaster: &Addr<Broadcaster>) -> Result<i64, ApiError> {
    broadcaster
        .send(Stats)
        .await
        .map(|(_, head)| head)
        .map_err(|_| ApiError::Unavailable {
            detail: "the event stream is restarting".into(),
            retry_after_s: 1,
        })
}

fn sse_frame(event: &Broadcast) -> Bytes {
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {}\n\n",
        event.seq,
        event.kind,
        &*event.json()
    ))
}

/// Server-Sent Events: every event after `since` (or after `Last-Event-ID`), then live.
#[utoipa::path(get, path = "/api/v1/events/stream", tag = "events", security(("bearer" = [])),
    params(("since" = Option<i64>, Query)),
    responses((status = 200, description = "text/event-stream; `id:` is the seq")))]
pub async fn stream(
    _auth: Authorized<ConsoleOnly>,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    sse(&state.db, &state.broadcaster, state.closing.clone(), &req).await
}

/// The SSE stream of `req` from `broadcaster`'s tail of `db`, ending when `closing` turns
/// true. A cluster node's front serves it from its own tail (`cluster::front`).
pub async fn sse(
    db: &Db,
    broadcaster: &Addr<Broadcaster>,
    mut closing: tokio::sync::watch::Receiver<bool>,
    req: &HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let q = query(req)?;
    let last_event_id = req
        .headers()
        .get("Last-Event-ID")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok());
    let since = match last_event_id.or(q.since) {
        Some(s) => s,
        None => head(broadcaster).await?,
    };
    let rx = feed(db.clone(), broadcaster.clone(), since);
    // The stream ends when the node hands over; the client reconnects with Last-Event-ID.
    let handing_over = async move {
        let _ = closing.wait_for(|closing| *closing).await;
    };
    let body = tokio_stream_from(rx).take_until(handing_over).map(|item| {
        Ok::<_, actix_web::Error>(match item {
            FeedItem::Event(e) => sse_frame(&e),
            FeedItem::Resync(seq) => Bytes::from(format!(
                "event: resync\ndata: {{\"type\":\"resync\",\"since\":{seq}}}\n\n"
            )),
        })
    });
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

fn tokio_stream_from<T: 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Largest console frame (commands are small).
const CONSOLE_FRAME_LIMIT: usize = 64 * 1024;

#[derive(Debug, Default, Deserialize)]
struct Filter {
    #[serde(default)]
    kinds: Option<Vec<String>>,
    #[serde(default)]
    incident_id: Option<String>,
}

impl Filter {
    fn wants(&self, e: &RecordedEvent) -> bool {
        self.kinds.as_ref().is_none_or(|k| k.contains(&e.kind))
            && self
                .incident_id
                .as_ref()
                .is_none_or(|i| e.incident_id.is_some_and(|id| same_id(id, i)))
    }
}

/// Whether `filter` is `id` as text (exactly, as it is stored), without allocating: the filter
/// is what the console sent, and one that is not an incident id matches nothing.
fn same_id(id: IncidentId, filter: &str) -> bool {
    id.0.hyphenated()
        .encode_lower(&mut uuid::Uuid::encode_buffer())
        == filter
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ConsoleFrame {
    Subscribe {
        #[serde(default)]
        kinds: Option<Vec<String>>,
        #[serde(default)]
        incident_id: Option<String>,
    },
    /// Open an incident (as `POST /api/v1/incidents`).
    CreateIncident {
        #[serde(default)]
        request_id: Option<String>,
        #[serde(flatten)]
        incident: super::incidents::NewIncident,
    },
    /// Assign a unit by hand (as `POST /api/v1/incidents/{id}/assign`).
    Assign {
        #[serde(default)]
        request_id: Option<String>,
        incident_id: String,
        unit_id: UnitId,
    },
    /// Cancel (as `POST /api/v1/incidents/{id}/cancel`).
    Cancel {
        #[serde(default)]
        request_id: Option<String>,
        incident_id: String,
        reason: String,
    },
    /// Mark a unit out of service or back in service.
    UnitStatus {
        #[serde(default)]
        request_id: Option<String>,
        unit_id: UnitId,
        status: crate::domain::dispatch::CrewReport,
    },
}

/// Runs a console command; the answer is `{type: "command_result", request_id, result}` or
/// `{type: "error", request_id, error}` with the same problem+json as the REST twin.
async fn command(
    state: &AppState,
    principal: &crate::domain::auth::Principal,
    frame: ConsoleFrame,
) -> serde_json::Value {
    let (request_id, result) = match frame {
        ConsoleFrame::Subscribe { .. } => return json!({"type": "error"}),
        ConsoleFrame::CreateIncident {
            request_id,
            incident,
        } => (
            request_id,
            create_incident(state, principal, incident).await,
        ),
        ConsoleFrame::Assign {
            request_id,
            incident_id,
            unit_id,
        } => (request_id, assign(state, &incident_id, unit_id).await),
        ConsoleFrame::Cancel {
            request_id,
            incident_id,
            reason,
        } => (
            request_id,
            cancel(state, principal, &incident_id, reason).await,
        ),
        ConsoleFrame::UnitStatus {
            request_id,
            unit_id,
            status,
        } => (request_id, unit_status(state, unit_id, status).await),
    };
    match result {
        Ok(result) => json!({"type": "command_result", "request_id": request_id, "result": result}),
        Err(e) => json!({"type": "error", "request_id": request_id, "error": e.problem()}),
    }
}

/// `create_incident`: as `POST /api/v1/incidents`, with `created` in the answer.
async fn create_incident(
    state: &AppState,
    principal: &crate::domain::auth::Principal,
    incident: super::incidents::NewIncident,
) -> Result<serde_json::Value, ApiError> {
    super::incidents::validate(&incident)?;
    let (status, text, _) = super::incidents::open(state, principal, incident).await?;
    let mut body: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ApiError::Internal(e.into()))?;
    if let Some(o) = body.as_object_mut() {
        o.insert("created".into(), json!(status == 201));
    }
    Ok(body)
}

/// `assign`: as `POST /api/v1/incidents/{id}/assign`.
async fn assign(
    state: &AppState,
    incident_id: &str,
    unit_id: UnitId,
) -> Result<serde_json::Value, ApiError> {
    use crate::actors::incident::{ManualAssign, ToIncident};
    super::fleet::unit_id_field(&unit_id)?;
    let id = incident_id
        .parse()
        .map_err(|_| ApiError::not_found("no incident with this id"))?;
    let incident = state
        .incidents
        .send(ToIncident {
            incident_id: id,
            message: ManualAssign { unit_id },
        })
        .await
        .map_err(super::incidents::mailbox)?
        .map_err(super::incidents::incident_error)?;
    Ok(serde_json::to_value(super::incidents::summary_of(incident)).unwrap_or_default())
}

/// `cancel`: as `POST /api/v1/incidents/{id}/cancel`, on behalf of the principal's role.
async fn cancel(
    state: &AppState,
    principal: &crate::domain::auth::Principal,
    incident_id: &str,
    reason: String,
) -> Result<serde_json::Value, ApiError> {
    use crate::actors::incident::Route;
    use crate::domain::incident::Command;
    let reason = super::incidents::cancel_reason(&reason)?;
    let id = incident_id
        .parse()
        .map_err(|_| ApiError::not_found("no incident with this id"))?;
    let incident = state
        .incidents
        .send(Route {
            id,
            command: Command::Cancel {
                reason,
                by: principal.role.as_str().to_owned(),
            },
        })
        .await
        .map_err(super::incidents::mailbox)?
        .map_err(super::incidents::incident_error)?;
    Ok(serde_json::to_value(super::incidents::summary_of(incident)).unwrap_or_default())
}

/// `unit_status`: a dispatcher takes a unit out of service or puts it back.
async fn unit_status(
    state: &AppState,
    unit_id: UnitId,
    status: crate::domain::dispatch::CrewReport,
) -> Result<serde_json::Value, ApiError> {
    use crate::domain::dispatch::CrewReport;
    super::fleet::unit_id_field(&unit_id)?;
    if !matches!(status, CrewReport::Available | CrewReport::OutOfService) {
        return Err(ApiError::field(
            "/status",
            "dispatchers may only set available or out_of_service",
        ));
    }
    let update = super::fleet::crew(state)
        .report(&unit_id, status, None)
        .await
        .map_err(super::fleet::crew_error)?;
    Ok(serde_json::to_value(update).unwrap_or_default())
}

/// The console WebSocket: replays events after `since`, then streams live ones; each event is
/// one text frame holding exactly the event; other frames carry a `type`.
#[utoipa::path(get, path = "/api/v1/ws/console", tag = "events", security(("bearer" = [])),
    params(("since" = Option<i64>, Query),
           ("access_token" = Option<String>, Query, description = "the token, for clients that cannot set Authorization on an upgrade")),
    responses((status = 101, description = "WebSocket upgrade")))]
pub async fn console_ws(
    auth: Authorized<ConsoleOnly>,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    let q = query(&req)?;
    let since = match q.since {
        Some(s) => s,
        None => head(&state.broadcaster).await?,
    };
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    let mut socket = Socket::new(session, stream, CONSOLE_FRAME_LIMIT, state.closing.clone());
    let state: Arc<AppState> = state.into_inner();
    let mut rx = feed(state.db.clone(), state.broadcaster.clone(), since);
    let principal = auth.principal;
    actix_web::rt::spawn(async move {
        let mut filter = Filter::default();
        let mut last_seq = since;
        let reason = loop {
            let frame = tokio::select! {
                item = rx.recv() => match item {
                    Some(FeedItem::Event(e)) => {
                        last_seq = e.seq;
                        if !filter.wants(&e) {
                            continue;
                        }
                        e.json()
                    }
                    Some(FeedItem::Resync(seq)) => json!({"type": "resync", "since": seq}).to_string().into(),
                    None => break None,
                },
                incoming = socket.next() => match incoming {
                    Incoming::Text(text) => {
                        let reply = match super::json::parse_json::<ConsoleFrame>(text.as_bytes()) {
                            Ok(ConsoleFrame::Subscribe { kinds, incident_id }) => {
                                filter = Filter { kinds, incident_id };
                                json!({"type": "subscribed", "kinds": filter.kinds, "incident_id": filter.incident_id})
                            }
                            Ok(other) => command(&state, &principal, other).await,
                            Err(e) => json!({"type": "error", "error": e.problem()}),
                        };
                        reply.to_string().into()
                    }
                    Incoming::Binary => continue,
                    // Consoles also get a text heartbeat carrying the last sequence seen.
                    Incoming::Tick => json!({"type": "heartbeat", "seq": last_seq}).to_string().into(),
                    Incoming::Closed(reason) => break reason,
                },
            };
            if socket.send(frame).await.is_err() {
                break None;
            }
        };
        socket.close(reason).await;
    });
    Ok(response)
}
