//! The unit actor: one [`AmbulanceActor`] per ambulance, the single arbiter of its own
//! commitments. It holds at most one pending offer and one assignment, so a unit can never be
//! committed to two incidents; crew sessions register with it to receive offers.

use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::fleet::{Fleet, UnitChanged};
use crate::actors::pusher::PushOffer;
use crate::domain::dispatch::{
    Capability, CrewReport, StatusRejection, UnitClaim, UnitSnapshot, UnitStatus, apply_report,
    reconcile_unit,
};
use crate::domain::events::{NewEvent, Reconciled, UnitEvent};
use crate::domain::geo::LatLng;
use crate::domain::ids::{IncidentId, OfferId, UnitId};
use crate::domain::incident::Priority;
use crate::integrations::push::OfferPush;
use crate::persistence::StoreError;
use crate::persistence::fleet::UnitRecord;
use crate::persistence::group::GroupCommit;

/// Most time an actor waits for another actor's answer before giving up (no cross-actor wait
/// can deadlock the system for longer than this).
pub const ACTOR_TIMEOUT: Duration = Duration::from_secs(5);
/// Minimum interval between persisted `unit.location` events per unit.
pub const LOCATION_EVENT_INTERVAL: Duration = Duration::from_secs(1);
#[derive(Clone, Debug, Serialize)]
pub(super) struct PendingOffer {
    pub(super) offer_id: OfferId,
    pub(super) incident_id: IncidentId,
    pub(super) expires_at: DateTime<Utc>,
    pub(super) frame: Option<OfferFrame>,
}

/// An offer as its crew is shown it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OfferFrame {
    /// The offer.
    pub offer_id: OfferId,
    /// The incident offered.
    pub incident_id: IncidentId,
    /// Its priority.
    pub priority: Priority,
    /// Where the patient is.
    pub location: LatLng,
    /// Estimated drive, seconds.
    pub eta_s: u32,
    /// Which provider gave `eta_s` (`google`, `osrm`, `straight_line`).
    pub eta_source: String,
    /// When the offer lapses.
    pub expires_at: DateTime<Utc>,
}

/// What a unit tells its crew's connected sessions (they serialise it for the wire).
#[derive(Message, Clone, Debug, PartialEq)]
#[rtype(result = "()")]
pub enum CrewPush {
    /// A job is offered.
    Offer(OfferFrame),
    /// The offer ended without this unit.
    OfferWithdrawn {
        /// The offer.
        offer_id: OfferId,
        /// `taken`, `expired` or `cancelled`.
        reason: &'static str,
    },
    /// The unit was committed to an incident (its accepted offer, or by a dispatcher).
    Assigned {
        /// The incident.
        incident_id: IncidentId,
        /// The accepted offer; `None` when assigned by hand.
        offer_id: Option<OfferId>,
    },
    /// The incident the unit was on ended without it (cancelled).
    AssignmentEnded {
        /// The incident.
        incident_id: IncidentId,
        /// Why (`cancelled`).
        reason: &'static str,
    },
    /// Replayed to a session that (re)connects while the unit is on a job.
    OnJob {
        /// The incident.
        incident_id: IncidentId,
        /// The unit's status on it.
        status: UnitStatus,
    },
}

/// The actor of one ambulance unit.
pub struct AmbulanceActor {
    pub(super) record: UnitRecord,
    pub(super) capability: Capability,
    pub(super) status: UnitStatus,
    pub(super) pending: Option<PendingOffer>,
    pub(super) assignment: Option<IncidentId>,
    pub(super) sessions: Vec<(u64, Recipient<CrewPush>)>,
    writer: GroupCommit,
    fleet: Addr<Fleet>,
    pub(super) last_location_event: Option<Instant>,
    /// Times this unit's actor was started again after stopping (see [`Fleet`]).
    pub(super) restarts: u32,
    /// The status before a reported change that could not be stored (see [`ApplyReport`]).
    pub(super) unsaved_status: Option<UnitStatus>,
    pub(super) messages: u64,
    pub(super) last_message_at: Option<DateTime<Utc>>,
    /// Where an offer goes when no crew session is open (push to the crew's phones).
    pub(super) pusher: Option<Recipient<PushOffer>>,
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
    /// The actor of the unit `record` describes, as stored; `restarts` counts earlier starts.
    pub fn new(record: UnitRecord, writer: GroupCommit, fleet: Addr<Fleet>, restarts: u32) -> Self {
        let capability = Capability::parse(&record.capability).unwrap_or(Capability::Bls);
        let status = UnitStatus::parse(&record.status).unwrap_or(UnitStatus::Available);
        let assignment = record.current_incident_id;
        Self {
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
            writer,
            fleet,
            last_location_event: None,
            restarts,
            unsaved_status: None,
            messages: 0,
            last_message_at: None,
            pusher: None,
            record,
        }
    }

    pub(super) fn snapshot(&self) -> UnitSnapshot {
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
        self.record.current_incident_id = self.assignment;
        self.fleet.do_send(UnitChanged(self.snapshot()));
    }

    fn push(&mut self, push: CrewPush) {
        for (_, session) in &self.sessions {
            session.do_send(push.clone());
        }
    }

    /// Appends `event` to the unit's stream and saves its projection, in one transaction, in
    /// the background; a failure is logged (the live state stays authoritative and is saved
    /// again with the next change). The answer says when it is stored, for a caller that
    /// acknowledges the change to someone (a crew's status report).
    fn persist_event(&self, event: NewEvent, what: &'static str) -> Stored {
        self.persist(event_with_unit(event, &self.record), what, false, None)
    }

    /// A position fix: stored with the other units' fixes, after a short wait (see
    /// `GroupCommit::append_unit_position`).
    fn persist_position(&self, event: NewEvent) {
        drop(self.persist(event_with_unit(event, &self.record), "location", true, None));
    }

    /// Stores `event` with the unit's row; `crash_at` is the crash point reached once it is
    /// stored.
    fn persist(
        &self,
        event: NewEvent,
        what: &'static str,
        position: bool,
        crash_at: Option<&'static str>,
    ) -> Stored {
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
            match &result {
                Ok(_) => crate::fault::crash_point_opt(crash_at),
                // The writer is behind and dropped the fix (counted by the writer): not worth a
                // warning per fix and unit while it catches up.
                Err(e @ StoreError::Busy(_)) if position => {
                    tracing::debug!(unit.id = %id, error = %e, "unit {what} not persisted");
                }
                Err(e) => tracing::warn!(unit.id = %id, error = %e, "unit {what} not persisted"),
            }
            let _ = stored.send(result);
        });
        answer
    }

    /// Persists the unit's status change (event + projection).
    fn persist_status(&self, from: UnitStatus) -> Stored {
        let event = UnitEvent::StatusChanged {
            unit_id: self.record.id.clone(),
            from,
            to: self.status,
            incident_id: self.assignment,
            reconciled: None,
        };
        let crash_at = match self.status {
            UnitStatus::Assigned => Some("unit.stored_assigned"),
            UnitStatus::Enroute => Some("unit.stored_enroute"),
            UnitStatus::OnScene => Some("unit.stored_on_scene"),
            UnitStatus::Transporting => Some("unit.stored_transporting"),
            UnitStatus::AtHospital => Some("unit.stored_at_hospital"),
            UnitStatus::Available => Some("unit.stored_available"),
            _ => None,
        };
        self.persist(
            event_with_unit(event.to_new(), &self.record),
            "status",
            false,
            crash_at,
        )
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
    /// The offer this concerns.
    pub offer_id: OfferId,
    /// The incident this concerns.
    pub incident_id: IncidentId,
    /// When the offer lapses unless a crew accepts it.
    pub expires_at: DateTime<Utc>,
}

/// `event`, tagged with the unit it is about.
fn event_with_unit(mut event: NewEvent, record: &UnitRecord) -> NewEvent {
    event.unit_id = Some(record.id.clone());
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
    /// The offer this concerns.
    pub offer_id: OfferId,
    /// What the crew is shown.
    pub frame: OfferFrame,
    /// The incident's reference (for a push to the crew's phones).
    pub reference: String,
}

impl Handler<PublishOffer> for AmbulanceActor {
    type Result = ();

    fn handle(&mut self, msg: PublishOffer, _: &mut Self::Context) {
        if let Some(p) = &mut self.pending
            && p.offer_id == msg.offer_id
        {
            p.frame = Some(msg.frame.clone());
            if self.sessions.is_empty()
                && let Some(pusher) = &self.pusher
            {
                // Nobody is listening: wake the crew's phones.
                pusher.do_send(PushOffer {
                    unit_id: self.record.id.clone(),
                    offer: OfferPush {
                        offer_id: msg.frame.offer_id,
                        incident_id: msg.frame.incident_id,
                        reference: msg.reference,
                        priority: msg.frame.priority,
                        expires_at: msg.frame.expires_at,
                    },
                });
            }
            self.push(CrewPush::Offer(msg.frame));
            crate::fault::crash_point("dispatch.after_offer");
        }
    }
}

/// The offer ended without this unit (taken by another, expired, incident cancelled).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Release {
    /// The offer this concerns.
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
            self.push(CrewPush::OfferWithdrawn {
                offer_id: msg.offer_id,
                reason: msg.reason,
            });
        }
    }
}

/// Commit the unit to an incident: its own pending offer (accept), or by hand (dispatcher).
#[derive(Message, Debug)]
#[rtype(result = "Result<Option<(OfferId, IncidentId)>, UnitRefusal>")]
pub struct Commit {
    /// The incident this concerns.
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
                    self.push(CrewPush::OfferWithdrawn {
                        offer_id: p.offer_id,
                        reason: "cancelled",
                    });
                }
            }
        }
        self.pending = None;
        self.assignment = Some(msg.incident_id);
        self.set_status(UnitStatus::Assigned);
        self.push(CrewPush::Assigned {
            incident_id: msg.incident_id,
            offer_id: msg.offer_id,
        });
        Ok(displaced)
    }
}

/// Undo a [`Commit`] the incident did not take (its offer was already taken).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Uncommit {
    /// The incident this concerns.
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
        let event = UnitEvent::StatusChanged {
            unit_id: self.record.id.clone(),
            from: self.status,
            to: status,
            incident_id: assignment,
            reconciled: Some(Reconciled {
                reconciled: true,
                previous_incident_id: self.assignment,
            }),
        }
        .to_new();
        self.assignment = assignment;
        self.status = status;
        self.changed();
        drop(self.persist_event(event, "reconciliation"));
        true
    }
}

/// The incident the unit is on ended (cancelled): back to available.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct IncidentOver {
    /// The incident this concerns.
    pub incident_id: IncidentId,
    /// Why (`cancelled`).
    pub reason: &'static str,
}

impl Handler<IncidentOver> for AmbulanceActor {
    type Result = ();

    fn handle(&mut self, msg: IncidentOver, _: &mut Self::Context) {
        if self.assignment == Some(msg.incident_id) {
            self.assignment = None;
            self.push(CrewPush::AssignmentEnded {
                incident_id: msg.incident_id,
                reason: msg.reason,
            });
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
    /// The fix (WGS 84).
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
            let event = UnitEvent::Location {
                unit_id: self.record.id.clone(),
                lat: msg.position.lat,
                lng: msg.position.lng,
                at: msg.at,
                speed_mps: msg.speed_mps,
                heading_deg: msg.heading_deg,
                status: self.status,
            };
            self.persist_position(event.to_new());
        }
    }
}

/// A crew WebSocket connected: register it and replay what the crew must know.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachSession {
    /// Connection id.
    pub id: u64,
    /// Where the session receives what the unit tells its crew.
    pub session: Recipient<CrewPush>,
}

impl Handler<AttachSession> for AmbulanceActor {
    type Result = ();

    fn handle(&mut self, msg: AttachSession, _: &mut Self::Context) {
        if let Some(p) = &self.pending
            && let Some(frame) = &p.frame
        {
            msg.session.do_send(CrewPush::Offer(frame.clone()));
        }
        if let Some(incident_id) = self.assignment {
            msg.session.do_send(CrewPush::OnJob {
                incident_id,
                status: self.status,
            });
        }
        self.sessions.push((msg.id, msg.session));
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
