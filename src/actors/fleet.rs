//! The fleet: one [`AmbulanceActor`] per unit, and the [`Fleet`] hub that keeps a spatial index
//! of units and the hospitals, ranks candidates for a scene, and finds destination hospitals.
//!
//! The unit's actor is the single arbiter of its commitments: it holds at most one pending
//! offer and one assignment, so a unit can never be committed to two incidents. Crew sessions
//! (WebSocket) register with their unit's actor, which pushes offer frames to them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};

use crate::domain::dispatch::{
    Candidate, CandidateQuery, Capability, CrewReport, FleetIndex, HospitalSnapshot,
    StatusRejection, UnitClaim, UnitSnapshot, UnitStatus, apply_report, choose_hospital, rank,
    reconcile_unit, shortlist,
};
use crate::domain::events::NewEvent;
use crate::domain::geo::LatLng;
use crate::domain::ids::{HospitalId, IncidentId, OfferId, UnitId};
use crate::domain::incident::Priority;
use crate::integrations::routing::RoutingWithFallback;
use crate::persistence::fleet::{self as store, HospitalRecord, UnitRecord};
use crate::persistence::group::GroupCommit;
use crate::persistence::{Db, StoreError};

/// Most time an actor waits for another actor's answer before giving up (no cross-actor wait
/// can deadlock the system for longer than this).
pub const ACTOR_TIMEOUT: Duration = Duration::from_secs(5);
/// Minimum interval between persisted `unit.location` events per unit.
pub const LOCATION_EVENT_INTERVAL: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Unit actor

#[derive(Clone, Debug, Serialize)]
struct PendingOffer {
    offer_id: OfferId,
    incident_id: IncidentId,
    expires_at: DateTime<Utc>,
    frame: Option<Value>,
}

/// The actor of one ambulance unit.
pub struct AmbulanceActor {
    record: UnitRecord,
    capability: Capability,
    status: UnitStatus,
    pending: Option<PendingOffer>,
    assignment: Option<IncidentId>,
    sessions: Vec<(u64, actix_ws::Session)>,
    writer: GroupCommit,
    fleet: Addr<Fleet>,
    last_location_event: Option<Instant>,
    /// Times this unit's actor was started again after stopping (see [`Fleet`]).
    restarts: u32,
    /// The status before a reported change that could not be stored (see [`ApplyReport`]).
    unsaved_status: Option<UnitStatus>,
    messages: u64,
    last_message_at: Option<DateTime<Utc>>,
}

/// When a unit's change is stored (dropped: stored in the background all the same).
type Stored = tokio::sync::oneshot::Receiver<Result<(), StoreError>>;

/// Why a unit refused a commitment.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UnitRefusal {
    /// The unit is not available (status given).
    #[error("unit is {0}")]
    Busy(&'static str),
    /// The offer is not (or no longer) this unit's pending offer.
    #[error("offer is not pending for this unit")]
    NotPending,
}

impl AmbulanceActor {
    fn snapshot(&self) -> UnitSnapshot {
        UnitSnapshot {
            id: self.record.id.clone(),
            capability: self.capability,
            status: self.status,
            position: self.record.location,
            fix_at: self.record.fix_at,
        }
    }

    fn changed(&mut self) {
        self.record.status = self.status.as_str().to_owned();
        self.record.current_incident_id = self.assignment.map(|i| i.to_string());
        self.fleet.do_send(UnitChanged(self.snapshot()));
    }

    fn push(&mut self, frame: &Value) {
        let text = frame.to_string();
        let sessions = self.sessions.clone();
        actix::spawn(async move {
            for (_, mut session) in sessions {
                let _ = session.text(text.clone()).await;
            }
        });
    }

    /// Appends `event` to the unit's stream and saves its projection, in one transaction, in
    /// the background; a failure is logged (the live state stays authoritative and is saved
    /// again with the next change). The answer says when it is stored, for a caller that
    /// acknowledges the change to someone (a crew's status report).
    fn persist_event(&self, event: NewEvent, what: &'static str) -> Stored {
        self.persist(event_with_unit(event, &self.record), what, false)
    }

    /// A position fix: stored with the other units' fixes, after a short wait (see
    /// `GroupCommit::append_unit_position`).
    fn persist_position(&self, event: NewEvent) {
        drop(self.persist(event_with_unit(event, &self.record), "location", true));
    }

    fn persist(&self, event: NewEvent, what: &'static str, position: bool) -> Stored {
        let writer = self.writer.clone();
        let record = self.record.clone();
        let (stored, answer) = tokio::sync::oneshot::channel();
        actix::spawn(async move {
            let id = record.id.clone();
            let stream = format!("unit-{id}");
            // Batched with the other units' changes: one statement saves every unit changed
            // in a batch, each with its latest state.
            let result = if position {
                writer
                    .append_unit_position(&stream, vec![event], record)
                    .await
            } else {
                writer.append_unit(&stream, vec![event], record).await
            };
            if let Err(e) = &result {
                tracing::warn!(unit.id = %id, error = %e, "unit {what} not persisted");
            }
            let _ = stored.send(result);
        });
        answer
    }

    /// Persists the unit's status change (event + projection).
    fn persist_status(&self, from: UnitStatus) -> Stored {
        let mut event = NewEvent::new(
            "unit.status_changed",
            json!({"unit_id": self.record.id, "from": from, "to": self.status,
                   "incident_id": self.record.current_incident_id}),
        );
        event.incident_id = self.record.current_incident_id.clone();
        self.persist_event(event, "status")
    }

    /// Changes the status; the answer says when the change is stored (`None`: no change).
    fn set_status(&mut self, to: UnitStatus) -> Option<Stored> {
        let from = self.status;
        if from == to {
            return None;
        }
        self.status = to;
        self.changed();
        Some(self.persist_status(from))
    }
}

impl Actor for AmbulanceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(256);
    }
}

/// Hold the unit for an offer (only when available).
#[derive(Message, Debug)]
#[rtype(result = "Result<(), UnitRefusal>")]
pub struct Reserve {
    /// Offer.
    pub offer_id: OfferId,
    /// Incident.
    pub incident_id: IncidentId,
    /// Expiry.
    pub expires_at: DateTime<Utc>,
}

/// `event`, tagged with the unit it is about.
fn event_with_unit(mut event: NewEvent, record: &UnitRecord) -> NewEvent {
    event.unit_id = Some(record.id.0.clone());
    event
}

impl Handler<Reserve> for AmbulanceActor {
    type Result = Result<(), UnitRefusal>;

    fn handle(&mut self, msg: Reserve, _: &mut Self::Context) -> Self::Result {
        self.messages += 1;
        self.last_message_at = Some(Utc::now());
        if self.status != UnitStatus::Available || self.pending.is_some() {
            return Err(UnitRefusal::Busy(self.status.as_str()));
        }
        self.pending = Some(PendingOffer {
            offer_id: msg.offer_id,
            incident_id: msg.incident_id,
            expires_at: msg.expires_at,
            frame: None,
        });
        self.set_status(UnitStatus::Offered);
        Ok(())
    }
}

/// The offer is persisted: push it to the crew.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct PublishOffer {
    /// Offer.
    pub offer_id: OfferId,
    /// The frame (`api.md` "Crews").
    pub frame: Value,
}

impl Handler<PublishOffer> for AmbulanceActor {
    type Result = ();

    fn handle(&mut self, msg: PublishOffer, _: &mut Self::Context) {
        if let Some(p) = &mut self.pending
            && p.offer_id == msg.offer_id
        {
            p.frame = Some(msg.frame.clone());
            self.push(&msg.frame);
        }
    }
}

/// The offer ended without this unit (taken by another, expired, incident cancelled).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Release {
    /// Offer.
    pub offer_id: OfferId,
    /// `taken`, `expired` or `cancelled`.
    pub reason: &'static str,
}

impl Handler<Release> for AmbulanceActor {
    type Result = ();

    fn handle(&mut self, msg: Release, _: &mut Self::Context) {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.offer_id == msg.offer_id)
        {
            self.pending = None;
            if self.status == UnitStatus::Offered {
                self.set_status(UnitStatus::Available);
            }
            self.push(
                &json!({"type": "offer_withdrawn", "offer_id": msg.offer_id, "reason": msg.reason}),
            );
        }
    }
}

/// Commit the unit to an incident: its own pending offer (accept), or by hand (dispatcher).
#[derive(Message, Debug)]
#[rtype(result = "Result<Option<(OfferId, IncidentId)>, UnitRefusal>")]
pub struct Commit {
    /// Incident.
    pub incident_id: IncidentId,
    /// The accepted offer; `None` for a manual assignment.
    pub offer_id: Option<OfferId>,
}

impl Handler<Commit> for AmbulanceActor {
    /// On success, returns an offer for *another* incident that the manual assignment displaced
    /// (the caller tells that incident).
    type Result = Result<Option<(OfferId, IncidentId)>, UnitRefusal>;

    fn handle(&mut self, msg: Commit, _: &mut Self::Context) -> Self::Result {
        self.messages += 1;
        self.last_message_at = Some(Utc::now());
        let mut displaced = None;
        match msg.offer_id {
            Some(offer) => {
                if self.pending.as_ref().is_none_or(|p| p.offer_id != offer) {
                    return Err(UnitRefusal::NotPending);
                }
            }
            None => {
                if !matches!(self.status, UnitStatus::Available | UnitStatus::Offered) {
                    return Err(UnitRefusal::Busy(self.status.as_str()));
                }
                if let Some(p) = &self.pending
                    && p.incident_id != msg.incident_id
                {
                    displaced = Some((p.offer_id, p.incident_id));
                    self.push(&json!({"type": "offer_withdrawn", "offer_id": p.offer_id, "reason": "cancelled"}));
                }
            }
        }
        self.pending = None;
        self.assignment = Some(msg.incident_id);
        self.set_status(UnitStatus::Assigned);
        self.push(
            &json!({"type": "assigned", "incident_id": msg.incident_id, "offer_id": msg.offer_id}),
        );
        Ok(displaced)
    }
}

/// Undo a [`Commit`] the incident did not take (its offer was already taken).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Uncommit {
    /// Incident.
    pub incident_id: IncidentId,
}

impl Handler<Uncommit> for AmbulanceActor {
    type Result = ();

    fn handle(&mut self, msg: Uncommit, _: &mut Self::Context) {
        if self.assignment == Some(msg.incident_id) {
            self.assignment = None;
            if self.status == UnitStatus::Assigned {
                self.set_status(UnitStatus::Available);
            }
        }
    }
}

/// At start-up: the claim of the open incident holding this unit, if any, which the unit's
/// stored state is made to agree with (see [`reconcile_unit`]). Answers whether it changed.
#[derive(Message, Debug)]
#[rtype(result = "bool")]
pub struct Reconcile(pub Option<(IncidentId, UnitClaim)>);

impl Handler<Reconcile> for AmbulanceActor {
    type Result = bool;

    fn handle(&mut self, msg: Reconcile, _: &mut Self::Context) -> bool {
        let Some((status, assignment)) = reconcile_unit(self.status, self.assignment, msg.0) else {
            return false;
        };
        tracing::warn!(
            unit.id = %self.record.id,
            from = self.status.as_str(),
            to = status.as_str(),
            incident.id = ?assignment,
            "unit state reconciled with its incident (a unit change was not stored before a stop)"
        );
        // A status change like any other for consoles (the status may even be the same,
        // with the assignment corrected), marked as a reconciliation.
        let mut event = NewEvent::new(
            "unit.status_changed",
            json!({"unit_id": self.record.id, "from": self.status, "to": status,
                   "incident_id": assignment, "reconciled": true,
                   "previous_incident_id": self.assignment}),
        );
        event.incident_id = assignment.map(|i| i.to_string());
        self.assignment = assignment;
        self.status = status;
        self.changed();
        drop(self.persist_event(event, "reconciliation"));
        true
    }
}

/// Make every unit agree with the open incidents' claims on them (start-up, after the open
/// incidents are recovered): unit → (incident, claim). Answers how many units changed.
#[derive(Message, Debug)]
#[rtype(result = "usize")]
pub struct ReconcileUnits(pub HashMap<UnitId, (IncidentId, UnitClaim)>);

impl Handler<ReconcileUnits> for Fleet {
    type Result = ResponseFuture<usize>;

    fn handle(&mut self, mut msg: ReconcileUnits, _: &mut Self::Context) -> Self::Result {
        let asks: Vec<_> = self
            .units
            .iter()
            .map(|(id, entry)| entry.addr.send(Reconcile(msg.0.remove(id))))
            .collect();
        for (unit, (incident, _)) in msg.0 {
            tracing::warn!(unit.id = %unit, incident.id = %incident, "an open incident holds an unknown unit");
        }
        Box::pin(async move {
            futures_util::future::join_all(asks)
                .await
                .into_iter()
                .filter(|changed| matches!(changed, Ok(true)))
                .count()
        })
    }
}

/// The incident the unit is on ended (cancelled): back to available.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct IncidentOver {
    /// Incident.
    pub incident_id: IncidentId,
    /// Why (`cancelled`).
    pub reason: &'static str,
}

impl Handler<IncidentOver> for AmbulanceActor {
    type Result = ();

    fn handle(&mut self, msg: IncidentOver, _: &mut Self::Context) {
        if self.assignment == Some(msg.incident_id) {
            self.assignment = None;
            self.push(&json!({"type": "assignment_ended", "incident_id": msg.incident_id, "reason": msg.reason}));
            if self.status != UnitStatus::OutOfService {
                self.set_status(UnitStatus::Available);
            }
        }
    }
}

/// The crew reports a status. Answered once the change is stored: a crew or dispatcher told
/// "out of service" must not find the unit available after a crash.
#[derive(Message, Debug)]
#[rtype(result = "Result<StatusUpdate, ReportFailure>")]
pub struct ApplyReport(pub CrewReport);

/// Why a status report was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ReportFailure {
    /// It does not fit the unit's status.
    #[error("{}", .0.reason)]
    Rejected(StatusRejection),
    /// It could not be stored (it is applied: the unit's live state is authoritative); the
    /// same report sent again stores it.
    #[error("the status could not be stored: {0}")]
    NotStored(StoreError),
}

/// What a status report changed.
#[derive(Clone, Debug, Serialize)]
pub struct StatusUpdate {
    /// The unit.
    pub unit_id: UnitId,
    /// Status before.
    pub from: UnitStatus,
    /// Status after.
    pub to: UnitStatus,
    /// The incident it concerns.
    pub incident_id: Option<IncidentId>,
    /// Where the unit is.
    pub position: LatLng,
}

impl Handler<ApplyReport> for AmbulanceActor {
    type Result = ResponseActFuture<Self, Result<StatusUpdate, ReportFailure>>;

    fn handle(&mut self, msg: ApplyReport, _: &mut Self::Context) -> Self::Result {
        self.messages += 1;
        self.last_message_at = Some(Utc::now());
        let from = self.status;
        let to = match apply_report(from, msg.0) {
            Ok(to) => to,
            Err(rejection) => {
                return Box::pin(actix::fut::ready(Err(ReportFailure::Rejected(rejection))));
            }
        };
        let incident_id = self.assignment;
        if to == UnitStatus::Available {
            self.assignment = None;
        }
        // The change is recorded from the status the last stored change left.
        let recorded_from = match self.unsaved_status {
            Some(unsaved) if from == to => unsaved,
            _ => from,
        };
        let stored = match self.set_status(to) {
            Some(stored) => Some(stored),
            // A report sent again after its change could not be stored: store it now.
            None if self.unsaved_status.is_some() => Some(self.persist_status(recorded_from)),
            None => None,
        };
        let update = StatusUpdate {
            unit_id: self.record.id.clone(),
            from,
            to,
            incident_id,
            position: self.record.location,
        };
        // Other messages (offers, positions) are handled while the write is under way.
        let stored = async move {
            match stored {
                Some(answer) => answer.await.unwrap_or_else(|_| {
                    Err(StoreError::Unavailable(
                        "the unit's write was dropped".into(),
                    ))
                }),
                None => Ok(()),
            }
        };
        Box::pin(stored.into_actor(self).map(move |stored, act, _| {
            let current = act.status == to;
            match stored {
                Ok(()) => {
                    if current {
                        act.unsaved_status = None;
                    }
                    Ok(update)
                }
                Err(e) => {
                    if current {
                        act.unsaved_status = Some(recorded_from);
                    }
                    Err(ReportFailure::NotStored(e))
                }
            }
        }))
    }
}

/// Fault injection: stop the unit's actor as a crash would (only reachable when the server
/// runs with `--enable-fault-injection`); the fleet starts it again.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Crash;

impl Handler<Crash> for AmbulanceActor {
    type Result = ();

    fn handle(&mut self, _: Crash, ctx: &mut Self::Context) {
        tracing::warn!(unit.id = %self.record.id, "fault injection: stopping the unit actor");
        ctx.stop();
    }
}

/// Which incident the unit is on and its status (for report routing).
#[derive(Message, Debug)]
#[rtype(result = "(UnitStatus, Option<IncidentId>, Option<(OfferId, IncidentId)>)")]
pub struct Commitments;

impl Handler<Commitments> for AmbulanceActor {
    type Result = MessageResult<Commitments>;

    fn handle(&mut self, _: Commitments, _: &mut Self::Context) -> Self::Result {
        MessageResult((
            self.status,
            self.assignment,
            self.pending.as_ref().map(|p| (p.offer_id, p.incident_id)),
        ))
    }
}

/// A position fix from the crew's device.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Locate {
    /// Where.
    pub position: LatLng,
    /// When measured.
    pub at: DateTime<Utc>,
    /// Speed, m/s.
    pub speed_mps: Option<f64>,
    /// Heading, degrees.
    pub heading_deg: Option<f64>,
}

impl Handler<Locate> for AmbulanceActor {
    type Result = ();

    fn handle(&mut self, msg: Locate, _: &mut Self::Context) {
        if msg.at < self.record.fix_at {
            return; // an older fix never moves the unit back
        }
        self.record.location = msg.position;
        self.record.fix_at = msg.at;
        self.changed();
        let due = self
            .last_location_event
            .is_none_or(|t| t.elapsed() >= LOCATION_EVENT_INTERVAL);
        if due {
            self.last_location_event = Some(Instant::now());
            let event = NewEvent::new(
                "unit.location",
                json!({"unit_id": self.record.id, "lat": msg.position.lat, "lng": msg.position.lng,
                       "at": msg.at, "speed_mps": msg.speed_mps, "heading_deg": msg.heading_deg,
                       "status": self.record.status}),
            );
            self.persist_position(event);
        }
    }
}

/// A crew WebSocket connected: register it and replay what the crew must know.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachSession {
    /// Connection id.
    pub id: u64,
    /// The session.
    pub session: actix_ws::Session,
}

impl Handler<AttachSession> for AmbulanceActor {
    type Result = ();

    fn handle(&mut self, msg: AttachSession, _: &mut Self::Context) {
        let mut session = msg.session.clone();
        self.sessions.push((msg.id, msg.session));
        let mut replay = Vec::new();
        if let Some(p) = &self.pending
            && let Some(frame) = &p.frame
        {
            replay.push(frame.to_string());
        }
        if let Some(incident) = self.assignment {
            replay.push(
                json!({"type": "assigned", "incident_id": incident, "status": self.status})
                    .to_string(),
            );
        }
        actix::spawn(async move {
            for text in replay {
                let _ = session.text(text).await;
            }
        });
    }
}

/// A crew WebSocket disconnected.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct DetachSession(pub u64);

impl Handler<DetachSession> for AmbulanceActor {
    type Result = ();

    fn handle(&mut self, msg: DetachSession, _: &mut Self::Context) {
        self.sessions.retain(|(id, _)| *id != msg.0);
    }
}

/// The unit as the API shows it.
#[derive(Message, Debug)]
#[rtype(result = "UnitView")]
pub struct ViewUnit;

/// A unit as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct UnitView {
    /// Id.
    pub id: UnitId,
    /// Call sign.
    pub call_sign: String,
    /// `als` / `bls`.
    pub capability: Capability,
    /// Status.
    pub status: UnitStatus,
    /// Position.
    pub location: LatLng,
    /// Fix time.
    pub fix_at: DateTime<Utc>,
    /// Home station.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<LatLng>,
    /// Current incident.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incident_id: Option<IncidentId>,
    /// Pending offer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_offer_id: Option<OfferId>,
    /// Connected crew sessions.
    pub crew_sessions: usize,
    /// Messages handled (admin).
    pub messages: u64,
    /// Last message (admin).
    pub last_message_at: Option<DateTime<Utc>>,
}

impl Handler<ViewUnit> for AmbulanceActor {
    type Result = MessageResult<ViewUnit>;

    fn handle(&mut self, _: ViewUnit, _: &mut Self::Context) -> Self::Result {
        MessageResult(UnitView {
            id: self.record.id.clone(),
            call_sign: self.record.call_sign.clone(),
            capability: self.capability,
            status: self.status,
            location: self.record.location,
            fix_at: self.record.fix_at,
            base: self.record.base,
            incident_id: self.assignment,
            pending_offer_id: self.pending.as_ref().map(|p| p.offer_id),
            crew_sessions: self.sessions.len(),
            messages: self.messages,
            last_message_at: self.last_message_at,
        })
    }
}

/// The unit's full in-memory state, for the admin actor inspector.
#[derive(Message, Debug)]
#[rtype(result = "Value")]
pub struct InspectUnit;

impl Handler<InspectUnit> for AmbulanceActor {
    type Result = MessageResult<InspectUnit>;

    fn handle(&mut self, _: InspectUnit, _: &mut Self::Context) -> Self::Result {
        let pending = self.pending.as_ref().map(|p| {
            serde_json::json!({
                "offer_id": p.offer_id,
                "incident_id": p.incident_id,
                "expires_at": p.expires_at,
                "frame_ready": p.frame.is_some(),
            })
        });
        MessageResult(serde_json::json!({
            "kind": "unit",
            "id": self.record.id,
            "status": self.status,
            // actix does not expose the queue length of an `Addr`.
            "mailbox_len": null,
            // A stopped unit actor is started again by the fleet from the unit's stored state.
            "restarts": self.restarts,
            "last_message_at": self.last_message_at,
            "state": {
                "call_sign": self.record.call_sign,
                "capability": self.capability,
                "status": self.status,
                "position": self.record.location,
                "fix_at": self.record.fix_at,
                "base": self.record.base,
                "assignment": self.assignment,
                "pending_offer": pending,
                "crew_sessions": self.sessions.len(),
                "messages": self.messages,
                // A reported status not yet stored (its report answered 503).
                "unsaved_status_change_from": self.unsaved_status,
                "location_event_throttled_for_ms": self.last_location_event.map(|t| {
                    1000u128.saturating_sub(t.elapsed().as_millis())
                }),
            },
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// Fleet hub

/// A unit's live snapshot changed.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct UnitChanged(pub UnitSnapshot);

struct UnitEntry {
    addr: Addr<AmbulanceActor>,
    snapshot: UnitSnapshot,
    /// Times its actor was found stopped and started again from the store.
    restarts: u32,
}

struct HospitalEntry {
    name: String,
    snapshot: HospitalSnapshot,
}

/// The fleet hub.
pub struct Fleet {
    db: Db,
    writer: GroupCommit,
    routing: Arc<RoutingWithFallback>,
    units: HashMap<UnitId, UnitEntry>,
    index: FleetIndex,
    hospitals: HashMap<HospitalId, HospitalEntry>,
    /// Incidents waiting for a unit (escalated), served by priority then age.
    waiting: Vec<(Priority, DateTime<Utc>, IncidentId)>,
    on_unit_free: Option<Recipient<UnitFree>>,
}

impl Fleet {
    /// An empty fleet; send [`LoadFleet`] to load units and hospitals.
    pub fn new(db: Db, writer: GroupCommit, routing: Arc<RoutingWithFallback>) -> Self {
        Self {
            db,
            writer,
            routing,
            units: HashMap::new(),
            index: FleetIndex::new(),
            hospitals: HashMap::new(),
            waiting: Vec::new(),
            on_unit_free: None,
        }
    }

    fn start_unit(
        &mut self,
        record: UnitRecord,
        restarts: u32,
        ctx: &mut Context<Self>,
    ) -> Addr<AmbulanceActor> {
        let capability = Capability::parse(&record.capability).unwrap_or(Capability::Bls);
        let status = UnitStatus::parse(&record.status).unwrap_or(UnitStatus::Available);
        let assignment = record
            .current_incident_id
            .as_deref()
            .and_then(|s| s.parse().ok());
        let actor = AmbulanceActor {
            capability,
            // A pending offer does not survive a restart (the incident re-offers), so an
            // `offered` unit comes back available.
            status: if status == UnitStatus::Offered {
                UnitStatus::Available
            } else {
                status
            },
            pending: None,
            assignment,
            sessions: Vec::new(),
            writer: self.writer.clone(),
            fleet: ctx.address(),
            last_location_event: None,
            restarts,
            unsaved_status: None,
            messages: 0,
            last_message_at: None,
            record,
        };
        let snapshot = actor.snapshot();
        let addr = actor.start();
        self.index.update(&snapshot.id, &snapshot.position);
        self.units.insert(
            snapshot.id.clone(),
            UnitEntry {
                addr: addr.clone(),
                snapshot,
                restarts,
            },
        );
        addr
    }

    /// Starts unit `id`'s actor again from the unit's stored state, if it has stopped (a
    /// handler that panicked, or an injected crash): a unit is never left without an actor
    /// until the next server start. The stored state is the last change the writer saved;
    /// a pending offer is not kept (its incident offers again when it expires).
    fn revive(&mut self, id: UnitId) -> ResponseActFuture<Self, Option<Addr<AmbulanceActor>>> {
        let db = self.db.clone();
        let lookup = id.clone();
        let found = async move {
            db.run(move |mut conn| async move { store::find_unit(&mut conn, &lookup).await })
                .await
        };
        Box::pin(found.into_actor(self).map(move |found, act, ctx| {
            let restarts = match act.units.get(&id) {
                // Started again meanwhile (the sweep and a lookup raced).
                Some(entry) if entry.addr.connected() => return Some(entry.addr.clone()),
                Some(entry) => entry.restarts + 1,
                None => return None,
            };
            match found {
                Ok(Some(record)) => {
                    tracing::warn!(unit.id = %id, restarts, "unit actor had stopped; started again");
                    metrics::counter!("shers_actor_restarts_total", "kind" => "unit").increment(1);
                    Some(act.start_unit(record, restarts, ctx))
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(unit.id = %id, error = %e, "stopped unit actor not started again");
                    None
                }
            }
        }))
    }

    /// Every second: units whose actor has stopped are started again.
    fn sweep(&mut self, ctx: &mut Context<Self>) {
        let stopped: Vec<UnitId> = self
            .units
            .iter()
            .filter(|(_, e)| !e.addr.connected())
            .map(|(id, _)| id.clone())
            .collect();
        for id in stopped {
            let revived = self.revive(id);
            ctx.spawn(revived.map(|_, _, _| ()));
        }
    }
}

impl Actor for Fleet {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
        ctx.run_interval(Duration::from_secs(1), Self::sweep);
    }
}

/// Load units and hospitals from the store (start-up).
#[derive(Message, Debug)]
#[rtype(result = "Result<usize, StoreError>")]
pub struct LoadFleet;

impl Handler<LoadFleet> for Fleet {
    type Result = ResponseActFuture<Self, Result<usize, StoreError>>;

    fn handle(&mut self, _: LoadFleet, _: &mut Self::Context) -> Self::Result {
        let db = self.db.clone();
        Box::pin(
            async move {
                db.run(|mut conn| async move {
                    Ok::<_, StoreError>((
                        store::all_units(&mut conn).await?,
                        store::all_hospitals(&mut conn).await?,
                    ))
                })
                .await
            }
            .into_actor(self)
            .map(|res, act, ctx| {
                let (units, hospitals) = res?;
                let n = units.len();
                for u in units {
                    act.start_unit(u, 0, ctx);
                }
                for h in hospitals {
                    act.add_hospital(h);
                }
                Ok(n)
            }),
        )
    }
}

impl Fleet {
    fn add_hospital(&mut self, h: HospitalRecord) {
        self.hospitals.insert(
            h.id.clone(),
            HospitalEntry {
                name: h.name,
                snapshot: HospitalSnapshot {
                    id: h.id,
                    location: h.location,
                    capabilities: h.capabilities,
                    capacity: h.capacity,
                    occupied: h.occupied,
                },
            },
        );
    }
}

/// Where to send "a unit is free" (the incident directory), set at start-up.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetUnitFreeRecipient(pub Recipient<UnitFree>);

impl Handler<SetUnitFreeRecipient> for Fleet {
    type Result = ();

    fn handle(&mut self, msg: SetUnitFreeRecipient, _: &mut Self::Context) {
        self.on_unit_free = Some(msg.0);
    }
}

/// A unit became available while incidents wait: the best waiting incident should try again.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct UnitFree {
    /// The incident to serve.
    pub incident_id: IncidentId,
}

impl Handler<UnitChanged> for Fleet {
    type Result = ();

    fn handle(&mut self, msg: UnitChanged, _: &mut Self::Context) {
        let snapshot = msg.0;
        let became_free = snapshot.status == UnitStatus::Available
            && self
                .units
                .get(&snapshot.id)
                .is_some_and(|e| e.snapshot.status != UnitStatus::Available);
        self.index.update(&snapshot.id, &snapshot.position);
        if let Some(entry) = self.units.get_mut(&snapshot.id) {
            entry.snapshot = snapshot;
        }
        if became_free && !self.waiting.is_empty() {
            // Highest priority first (Emergency sorts first), then the oldest.
            self.waiting.sort();
            let (_, _, incident_id) = self.waiting.remove(0);
            if let Some(r) = &self.on_unit_free {
                r.do_send(UnitFree { incident_id });
            }
        }
    }
}

/// Register a new unit (already stored).
#[derive(Message, Debug)]
#[rtype(result = "Addr<AmbulanceActor>")]
pub struct RegisterUnit(pub UnitRecord);

impl Handler<RegisterUnit> for Fleet {
    type Result = MessageResult<RegisterUnit>;

    fn handle(&mut self, msg: RegisterUnit, ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.start_unit(msg.0, 0, ctx))
    }
}

/// Register a new hospital (already stored).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct RegisterHospital(pub HospitalRecord);

impl Handler<RegisterHospital> for Fleet {
    type Result = ();

    fn handle(&mut self, msg: RegisterHospital, _: &mut Self::Context) {
        self.add_hospital(msg.0);
    }
}

/// The actor of a unit.
#[derive(Message, Debug)]
#[rtype(result = "Option<Addr<AmbulanceActor>>")]
pub struct UnitAddr(pub UnitId);

impl Handler<UnitAddr> for Fleet {
    type Result = ResponseActFuture<Self, Option<Addr<AmbulanceActor>>>;

    fn handle(&mut self, msg: UnitAddr, _: &mut Self::Context) -> Self::Result {
        match self.units.get(&msg.0) {
            Some(entry) if entry.addr.connected() => {
                Box::pin(actix::fut::ready(Some(entry.addr.clone())))
            }
            Some(_) => self.revive(msg.0),
            None => Box::pin(actix::fut::ready(None)),
        }
    }
}

/// Every unit's actor (lists).
#[derive(Message, Debug)]
#[rtype(result = "Vec<Addr<AmbulanceActor>>")]
pub struct AllUnits;

impl Handler<AllUnits> for Fleet {
    type Result = MessageResult<AllUnits>;

    fn handle(&mut self, _: AllUnits, _: &mut Self::Context) -> Self::Result {
        let mut entries: Vec<_> = self.units.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        MessageResult(entries.into_iter().map(|(_, e)| e.addr.clone()).collect())
    }
}

/// Rank candidate units for a scene.
#[derive(Message, Debug)]
#[rtype(result = "Vec<Candidate>")]
pub struct FindCandidates {
    /// The scene.
    pub scene: LatLng,
    /// Priority.
    pub priority: Priority,
    /// Units that declined or let an offer lapse.
    pub exclude: HashSet<UnitId>,
}

impl Handler<FindCandidates> for Fleet {
    type Result = ResponseFuture<Vec<Candidate>>;

    fn handle(&mut self, msg: FindCandidates, _: &mut Self::Context) -> Self::Result {
        let now = Utc::now();
        let query = CandidateQuery::new(msg.scene, now, &msg.exclude, msg.priority);
        let units = &self.units;
        let near = self.index.nearest(&msg.scene, query.shortlist, |id| {
            units.get(id).is_some_and(|e| query.accepts(&e.snapshot))
        });
        let snapshots: Vec<UnitSnapshot> = near
            .iter()
            .filter_map(|id| self.units.get(id).map(|e| e.snapshot.clone()))
            .collect();
        let shortlisted = shortlist(snapshots.iter(), &query);
        let routing = self.routing.clone();
        let positions: Vec<LatLng> = shortlisted
            .iter()
            .filter_map(|c| self.units.get(&c.unit_id).map(|e| e.snapshot.position))
            .collect();
        let priority = msg.priority;
        let scene = msg.scene;
        Box::pin(async move {
            if shortlisted.is_empty() {
                return shortlisted;
            }
            let (etas, routed) = routing.etas(&positions, &scene).await;
            rank(shortlisted, routed.then_some(etas.as_slice()), priority)
        })
    }
}

/// An incident waits for any unit (escalated); it is told when one frees up.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct WaitForUnit {
    /// Incident.
    pub incident_id: IncidentId,
    /// Priority.
    pub priority: Priority,
    /// Since when.
    pub since: DateTime<Utc>,
}

impl Handler<WaitForUnit> for Fleet {
    type Result = ();

    fn handle(&mut self, msg: WaitForUnit, _: &mut Self::Context) {
        if !self.waiting.iter().any(|(_, _, id)| *id == msg.incident_id) {
            self.waiting
                .push((msg.priority, msg.since, msg.incident_id));
        }
    }
}

/// An incident no longer waits (assigned or cancelled).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct StopWaiting(pub IncidentId);

impl Handler<StopWaiting> for Fleet {
    type Result = ();

    fn handle(&mut self, msg: StopWaiting, _: &mut Self::Context) {
        self.waiting.retain(|(_, _, id)| *id != msg.0);
    }
}

/// Choose a destination hospital and take a bed there (or take the named one).
#[derive(Message, Debug)]
#[rtype(result = "Result<HospitalId, String>")]
pub struct TakeBed {
    /// Where the patient is.
    pub from: LatLng,
    /// The hospital the crew named, if any.
    pub hospital_id: Option<HospitalId>,
    /// A capability needed, if any.
    pub needed: Option<String>,
}

impl Handler<TakeBed> for Fleet {
    type Result = Result<HospitalId, String>;

    fn handle(&mut self, msg: TakeBed, _: &mut Self::Context) -> Self::Result {
        let chosen = match msg.hospital_id {
            Some(id) => {
                let entry = self
                    .hospitals
                    .get(&id)
                    .ok_or_else(|| "unknown hospital".to_owned())?;
                if entry.snapshot.occupied >= entry.snapshot.capacity {
                    return Err(format!("{} has no free capacity", entry.name));
                }
                id
            }
            None => {
                let snapshots: Vec<HospitalSnapshot> = self
                    .hospitals
                    .values()
                    .map(|e| e.snapshot.clone())
                    .collect();
                choose_hospital(&snapshots, &msg.from, msg.needed.as_deref())
                    .map(|(id, _)| id)
                    .ok_or_else(|| "no hospital with free capacity".to_owned())?
            }
        };
        if let Some(entry) = self.hospitals.get_mut(&chosen) {
            entry.snapshot.occupied += 1;
            let (db, id, occupied) = (self.db.clone(), chosen.clone(), entry.snapshot.occupied);
            actix::spawn(async move {
                let _ = db
                    .run(move |mut conn| async move {
                        store::set_occupied(&mut conn, &id, occupied).await
                    })
                    .await;
            });
        }
        Ok(chosen)
    }
}

/// Release a bed at handover.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ReleaseBed(pub HospitalId);

impl Handler<ReleaseBed> for Fleet {
    type Result = ();

    fn handle(&mut self, msg: ReleaseBed, _: &mut Self::Context) {
        if let Some(entry) = self.hospitals.get_mut(&msg.0) {
            entry.snapshot.occupied = entry.snapshot.occupied.saturating_sub(1);
            let (db, id, occupied) = (self.db.clone(), msg.0, entry.snapshot.occupied);
            actix::spawn(async move {
                let _ = db
                    .run(move |mut conn| async move {
                        store::set_occupied(&mut conn, &id, occupied).await
                    })
                    .await;
            });
        }
    }
}

/// Hospitals as the API shows them.
#[derive(Message, Debug)]
#[rtype(result = "Vec<Value>")]
pub struct ListHospitals;

impl Handler<ListHospitals> for Fleet {
    type Result = MessageResult<ListHospitals>;

    fn handle(&mut self, _: ListHospitals, _: &mut Self::Context) -> Self::Result {
        let mut list: Vec<_> = self
            .hospitals
            .values()
            .map(|e| {
                json!({"id": e.snapshot.id, "name": e.name, "location": e.snapshot.location,
                       "capabilities": e.snapshot.capabilities, "capacity": e.snapshot.capacity,
                       "occupied": e.snapshot.occupied})
            })
            .collect();
        list.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        MessageResult(list)
    }
}

/// Where a hospital is (billing mileage).
#[derive(Message, Debug)]
#[rtype(result = "Option<LatLng>")]
pub struct HospitalLocation(pub HospitalId);

impl Handler<HospitalLocation> for Fleet {
    type Result = Option<LatLng>;

    fn handle(&mut self, msg: HospitalLocation, _: &mut Self::Context) -> Self::Result {
        self.hospitals.get(&msg.0).map(|h| h.snapshot.location)
    }
}
