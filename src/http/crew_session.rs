//! The crew WebSocket session: the crew's frames in (accept, decline, location, status), and
//! what its unit tells it out ([`CrewPush`]: offers, withdrawals, assignments), serialised
//! here. The unit actor holds only the session's typed [`Recipient`](actix::Recipient).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::AppState;
use super::auth::Authorized;
use super::error::ApiError;
use super::fleet::{CrewOnly, bound_unit, busy, crew, crew_error};
use super::ws::{Incoming, Pusher, Socket};
use crate::actors::unit::{
    AttachSession, Crew, CrewError, CrewPush, DetachSession, OfferFrame, UnitAddr,
};
use crate::domain::dispatch::{CrewReport, UnitStatus};
use crate::domain::geo::LatLng;
use crate::domain::ids::{HospitalId, IncidentId, OfferId, UnitId};

static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

/// A push as the crew's client receives it (`type`-tagged, as documented in `docs/api.md`).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum CrewWire<'a> {
    Offer(&'a OfferFrame),
    OfferWithdrawn {
        offer_id: OfferId,
        reason: &'a str,
    },
    AssignmentEnded {
        incident_id: IncidentId,
        reason: &'a str,
    },
    Assigned {
        incident_id: IncidentId,
        #[serde(skip_serializing_if = "Option::is_none")]
        offer_id: Option<Option<OfferId>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<UnitStatus>,
    },
}

/// The text frame for one push.
fn push_frame(push: &CrewPush) -> String {
    let wire = match push {
        CrewPush::Offer(frame) => CrewWire::Offer(frame),
        CrewPush::OfferWithdrawn { offer_id, reason } => CrewWire::OfferWithdrawn {
            offer_id: *offer_id,
            reason,
        },
        CrewPush::Assigned {
            incident_id,
            offer_id,
        } => CrewWire::Assigned {
            incident_id: *incident_id,
            offer_id: Some(*offer_id),
            status: None,
        },
        CrewPush::AssignmentEnded {
            incident_id,
            reason,
        } => CrewWire::AssignmentEnded {
            incident_id: *incident_id,
            reason,
        },
        CrewPush::OnJob {
            incident_id,
            status,
        } => CrewWire::Assigned {
            incident_id: *incident_id,
            offer_id: None,
            status: Some(*status),
        },
    };
    serde_json::to_string(&wire).unwrap_or_default()
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum CrewFrame {
    Accept {
        offer_id: String,
    },
    Decline {
        offer_id: String,
        #[serde(default)]
        reason: Option<String>,
    },
    Location {
        lat: f64,
        lng: f64,
        #[serde(default)]
        at: Option<DateTime<Utc>>,
        #[serde(default)]
        speed_mps: Option<f64>,
        #[serde(default)]
        heading_deg: Option<f64>,
    },
    Status {
        status: CrewReport,
        #[serde(default)]
        hospital_id: Option<HospitalId>,
    },
}

async fn crew_frame(crew: &Crew, unit: &UnitId, text: &str) -> Value {
    let frame: CrewFrame = match super::json::parse_json(text.as_bytes()) {
        Ok(f) => f,
        Err(e) => return json!({"type": "error", "error": e.problem()}),
    };
    let error = |e: CrewError| json!({"type": "error", "error": crew_error(e).problem()});
    match frame {
        CrewFrame::Accept { offer_id: raw } => match raw.parse::<OfferId>() {
            Ok(offer) => match crew.accept(unit, offer).await {
                Ok(outcome) => {
                    json!({"type": "accept_result", "offer_id": offer, "outcome": outcome})
                }
                Err(CrewError::Lost(outcome)) => {
                    json!({"type": "accept_result", "offer_id": offer, "outcome": outcome})
                }
                Err(e) => error(e),
            },
            Err(_) => error(CrewError::UnknownOffer),
        },
        CrewFrame::Decline {
            offer_id: raw,
            reason,
        } => match raw.parse::<OfferId>() {
            Ok(offer) => match crew
                .decline(unit, offer, reason.unwrap_or_else(|| "declined".into()))
                .await
            {
                Ok(outcome) => {
                    json!({"type": "decline_result", "offer_id": offer, "outcome": outcome})
                }
                Err(e) => error(e),
            },
            Err(_) => error(CrewError::UnknownOffer),
        },
        CrewFrame::Location {
            lat,
            lng,
            at,
            speed_mps,
            heading_deg,
        } => {
            match crew
                .locate(unit, LatLng { lat, lng }, at, speed_mps, heading_deg)
                .await
            {
                Ok(()) => json!({"type": "location_ack"}),
                Err(e) => error(e),
            }
        }
        CrewFrame::Status {
            status,
            hospital_id,
        } => match crew.report(unit, status, hospital_id).await {
            Ok(update) => {
                json!({"type": "status_result", "unit_id": update.unit_id, "from": update.from, "to": update.to, "incident_id": update.incident_id})
            }
            Err(e) => error(e),
        },
    }
}

/// The crew WebSocket: offers are pushed; accept/decline/location/status frames come in.
/// A reconnecting crew gets its pending offer or assignment again.
#[utoipa::path(get, path = "/api/v1/ws/crew", tag = "crews", security(("bearer" = [])),
    params(("access_token" = Option<String>, Query, description = "the token, for clients that cannot set Authorization on an upgrade")),
    responses((status = 101, description = "WebSocket upgrade")))]
pub async fn crew_ws(
    auth: Authorized<CrewOnly>,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    let unit = bound_unit(&auth.principal)?;
    let addr = state
        .fleet
        .send(UnitAddr(unit.clone()))
        .await
        .map_err(busy)?
        .ok_or_else(|| ApiError::not_found("the token's unit is not registered"))?;
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    let mut socket = Socket::new(
        session,
        stream,
        state.settings.http.body_limit_bytes,
        state.closing.clone(),
    );
    let state: Arc<AppState> = state.into_inner();
    let session_id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
    let (recipient, mut pushed) = Pusher::<CrewPush>::start_for();
    addr.do_send(AttachSession {
        id: session_id,
        session: recipient,
    });
    actix_web::rt::spawn(async move {
        let crew = crew(&state);
        let reason = loop {
            let frame = tokio::select! {
                push = pushed.recv() => match push {
                    Some(push) => push_frame(&push),
                    // Too slow to keep up: the crew reconnects and is replayed its job.
                    None => break Some(actix_ws::CloseReason {
                        code: actix_ws::CloseCode::Again,
                        description: Some("too far behind; reconnect".to_owned()),
                    }),
                },
                incoming = socket.next() => match incoming {
                    Incoming::Text(text) => crew_frame(&crew, &unit, &text).await.to_string(),
                    Incoming::Binary => json!({"type": "error", "error": ApiError::UnsupportedMediaType.problem()}).to_string(),
                    Incoming::Tick => continue,
                    Incoming::Closed(reason) => break reason,
                },
            };
            if socket.send(frame).await.is_err() {
                break None;
            }
        };
        addr.do_send(DetachSession(session_id));
        socket.close(reason).await;
    });
    Ok(response)
}
