//! Incidents: one supervised [`IncidentActor`] per incident, and the [`IncidentDirectory`], the
//! only place incidents are created.
//!
//! The directory keeps `patient → open incident` in memory (one open incident per patient; the
//! database's unique `open_patient_id` is the backstop across nodes) and serialises creation
//! per patient, so a burst of emergency readings and requests for one patient yields exactly
//! one incident; later ones attach as evidence. Every command runs through the pure state
//! machine (`domain::incident`); its events are appended to the event store, with the
//! projections, in one transaction *before* the actor's state changes or any effect runs.
//!
//! Supervision: each actor runs under an actix `Supervisor`. A fault stops the actor (handlers
//! never panic); the supervisor restarts it and it rebuilds its state from the event store. An
//! actor whose mailbox has closed anyway (a panic) is re-created by the directory.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use serde::Serialize;
use serde_json::json;
use tokio::sync::oneshot;

use super::fleet::{
    ACTOR_TIMEOUT, Commit, FindCandidates, Fleet, IncidentOver, PublishOffer, ReconcileUnits,
    Release, Reserve, StopWaiting, Uncommit, UnitAddr, UnitFree, WaitForUnit,
};
use super::handoff::EmergencyDetected;
use crate::config::DispatchSettings;
use crate::domain::dispatch::unit_claim;
use crate::domain::events::{ExpectedVersion, NewEvent, RecordedEvent};
use crate::domain::geo::LatLng;
use crate::domain::ids::{IncidentId, OfferId, PatientId, UnitId};
use crate::domain::incident::{
    Command, Incident, IncidentEvent, IncidentStatus, Priority, Rejection, Source, handle, replay,
};
use crate::persistence::events::{self, AppendError};
use crate::persistence::fleet::{self as fleet_store, OfferRecord};
use crate::persistence::group::GroupCommit;
use crate::persistence::incidents::{self as store, NewNotification};
use crate::persistence::{Db, DbConn, StoreError, patients};

/// Why an incident operation failed.
#[derive(Debug, thiserror::Error)]
pub enum IncidentError {
    /// The state machine refused the command (HTTP 409).
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// Another writer changed the incident first; retry (HTTP 409).
    #[error("the incident was changed concurrently; retry")]
    Conflict,
    /// No such incident (HTTP 404).
    #[error("no such incident")]
    NotFound,
    /// The patient named is not registered (HTTP 422).
    #[error("no patient with this id")]
    UnknownPatient,
    /// No location given and the patient has no home location (HTTP 422).
    #[error("a location is required (the patient has no home location on file)")]
    NoLocation,
    /// Storage failed or is unreachable (HTTP 503).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<AppendError> for IncidentError {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::Conflict { .. } => IncidentError::Conflict,
            AppendError::Store(s) => IncidentError::Store(s),
        }
    }
}

/// The event-store stream of an incident.
pub fn stream_of(id: IncidentId) -> String {
    format!("incident-{id}")
}

fn to_new_event(id: IncidentId, event: &IncidentEvent) -> NewEvent {
    let mut e = NewEvent::new(event.kind(), event.data());
    e.incident_id = Some(id.to_string());
    match event {
        IncidentEvent::Assigned { unit_id, .. } => e.unit_id = Some(unit_id.0.clone()),
        IncidentEvent::Created(i) if i.patient_id.is_some() => {}
        _ => {}
    }
    e
}

/// Folds stored events into state; kinds that are not incident events (notifications, …) are
/// skipped but still count towards the stream version.
fn rebuild(stored: &[RecordedEvent]) -> (Option<Incident>, i64) {
    let mut events = Vec::with_capacity(stored.len());
    for e in stored {
        if !IncidentEvent::KINDS.contains(&e.kind.as_str()) {
            continue;
        }
        match IncidentEvent::from_stored(&e.kind, &e.data) {
            Ok(event) => events.push(event),
            // Corruption, not a kind we do not fold: say so loudly (without the payload).
            Err(_) => {
                tracing::error!(event.seq = e.seq, event.kind = %e.kind, "stored incident event does not decode; skipped")
            }
        }
    }
    let version = stored.last().map_or(0, |e| e.version);
    (replay(events.iter()), version)
}

/// Outbox rows and `notification.queued` events telling the patient's next of kin about
/// `template` (one per contact and channel; the idempotency key makes a repeat a no-op).
fn next_of_kin_outbox(
    patient: Option<&crate::domain::patients::Patient>,
    id: IncidentId,
    template: &'static str,
) -> (Vec<NewNotification>, Vec<NewEvent>) {
    let mut outbox = Vec::new();
    let mut queued = Vec::new();
    for kin in patient.iter().flat_map(|p| p.next_of_kin.iter()) {
        let channels = [("sms", kin.phone.as_ref()), ("email", kin.email.as_ref())];
        for (channel, address) in channels {
            let Some(address) = address else { continue };
            let Some(known) = crate::domain::notify::Template::parse(template) else {
                tracing::error!(template, "unknown notification template; not queued");
                continue;
            };
            let notification_id = uuid::Uuid::now_v7().to_string();
            // A hash: the key is logged and sent to providers, and must not reveal the address.
            let key = crate::domain::notify::idempotency_key(&id.to_string(), address, known);
            let mut event = NewEvent::new(
                "notification.queued",
                json!({
                    "notification_id": notification_id,
                    "incident_id": id,
                    "recipient": kin.name,
                    "channel": channel,
                    "template": template,
                }),
            );
            event.incident_id = Some(id.to_string());
            queued.push(event);
            outbox.push(NewNotification {
                id: notification_id,
                incident_id: id,
                recipient_name: kin.name.clone(),
                channel,
                address: address.clone(),
                template,
                idempotency_key: key,
            });
        }
    }
    (outbox, queued)
}

/// Which next-of-kin message an incident event calls for (creation is queued by `create`).
fn template_for(event: &IncidentEvent) -> Option<&'static str> {
    match event {
        IncidentEvent::Assigned { .. } => Some("unit_assigned"),
        IncidentEvent::StatusChanged {
            to: IncidentStatus::AtHospital,
            ..
        } => Some("arrived_at_hospital"),
        IncidentEvent::Closed { .. } => Some("billing_outcome"),
        _ => None,
    }
}

/// The evidence `events` attach.
fn evidence_of(events: &[IncidentEvent]) -> impl Iterator<Item = &serde_json::Value> {
    events.iter().filter_map(|event| match event {
        IncidentEvent::EvidenceAdded { evidence } => Some(evidence),
        _ => None,
    })
}

/// Persists `events` (and their projections) at `expected` version; returns the new version.
async fn persist(
    conn: &mut DbConn,
    incident: &Incident,
    expected: i64,
    events: &[IncidentEvent],
    extra: Vec<NewEvent>,
    now: DateTime<Utc>,
) -> Result<i64, IncidentError> {
    let id = incident.id;
    let mut new: Vec<NewEvent> = events.iter().map(|e| to_new_event(id, e)).collect();
    new.extend(extra);
    // Next-of-kin messages the transition calls for are queued in the same transaction.
    let mut outbox = Vec::new();
    let templates: Vec<&'static str> = events.iter().filter_map(template_for).collect();
    if !templates.is_empty()
        && let Some(pid) = &incident.patient_id
    {
        let patient = patients::find_patient(conn, pid).await?;
        for template in templates {
            let (rows, queued) = next_of_kin_outbox(patient.as_ref(), id, template);
            outbox.extend(rows);
            new.extend(queued);
        }
    }
    let expected_version = if expected == 0 {
        ExpectedVersion::NoStream
    } else {
        ExpectedVersion::Exact(expected)
    };
    // The version the append makes (it fails unless the stream is at `expected`), so the
    // projection need not wait for it: on PostgreSQL all of it is one pipelined round trip.
    let version = expected + new.len() as i64;
    conn.try_both(
        async |c| {
            events::append(c, &stream_of(id), expected_version, &new, now).await?;
            Ok::<_, IncidentError>(())
        },
        async |c| {
            let evidence = evidence_of(events);
            c.try_both(
                async |c| {
                    if expected == 0 {
                        store::insert(c, incident, version, now).await
                    } else {
                        store::update(c, incident, version, now).await
                    }
                },
                async |c| {
                    c.try_both(
                        async |c| {
                            c.try_each(evidence, async |c, e| {
                                store::add_evidence(c, id, now, e).await
                            })
                            .await
                        },
                        async |c| store::queue_notifications(c, &outbox, now).await,
                    )
                    .await
                },
            )
            .await?;
            Ok(())
        },
    )
    .await?;
    Ok(version)
}

// ---------------------------------------------------------------------------------------------
// The incident actor

/// Run a command against the incident.
#[derive(Message, Debug)]
#[rtype(result = "Result<Incident, IncidentError>")]
pub struct Execute(pub Command);

/// Fault injection: stop the actor as a crash would (only reachable when the server runs with
/// `--enable-fault-injection`).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Crash;

/// The live state, for `/admin/actors/incident/{id}`.
#[derive(Message, Debug)]
#[rtype(result = "IncidentInspection")]
pub struct InspectIncident;

/// What an incident actor shows an ops engineer.
#[derive(Clone, Debug, Serialize)]
pub struct IncidentInspection {
    /// `incident`.
    pub kind: &'static str,
    /// Incident id.
    pub id: IncidentId,
    /// Current status (or `loading`/`unavailable`).
    pub status: String,
    /// Supervised restarts so far.
    pub restarts: u32,
    /// Messages handled.
    pub messages: u64,
    /// When the last message arrived.
    pub last_message_at: Option<DateTime<Utc>>,
    /// Stream version the state reflects.
    pub version: i64,
    /// The state machine's state.
    pub state: Option<serde_json::Value>,
    /// Pending timers (offer expiries) and the offers they guard.
    pub timers: Vec<serde_json::Value>,
}

/// What every incident actor needs besides its own state.
#[derive(Clone)]
pub struct IncidentDeps {
    /// The database.
    pub db: Db,
    /// The directory (told when an incident ends).
    pub directory: Option<Addr<IncidentDirectory>>,
    /// The fleet (dispatch); `None` leaves incidents waiting in `dispatching`.
    pub fleet: Option<Addr<Fleet>>,
    /// Offer timing and rounds.
    pub dispatch: DispatchSettings,
    /// The group-commit writer every incident change goes through.
    pub writer: GroupCommit,
}

#[derive(Clone, Debug, Serialize)]
struct PendingOffer {
    unit_id: UnitId,
    round: u32,
    expires_at: DateTime<Utc>,
}

/// The actor of one incident.
pub struct IncidentActor {
    id: IncidentId,
    db: Db,
    deps: IncidentDeps,
    directory: Option<Recipient<IncidentEnded>>,
    /// Offers out now, by id.
    pending: HashMap<OfferId, PendingOffer>,
    /// Units that declined or let an offer lapse (not offered again).
    excluded: HashSet<UnitId>,
    round_timer: Option<SpawnHandle>,
    state: Option<Incident>,
    version: i64,
    loaded: bool,
    /// Offers loaded in bulk with the state, to resume dispatch from when started.
    resume: Option<Vec<OfferRecord>>,
    restarts: u32,
    messages: u64,
    last_message_at: Option<DateTime<Utc>>,
}

impl IncidentActor {
    /// An actor that loads its state from the event store when started.
    pub fn recover(id: IncidentId, deps: IncidentDeps) -> Self {
        Self {
            id,
            db: deps.db.clone(),
            directory: deps.directory.clone().map(Addr::recipient),
            deps,
            pending: HashMap::new(),
            excluded: HashSet::new(),
            round_timer: None,
            state: None,
            version: 0,
            loaded: false,
            resume: None,
            restarts: 0,
            messages: 0,
            last_message_at: None,
        }
    }

    /// An actor for an incident whose events and offers were loaded in bulk (start-up): it
    /// resumes dispatching from them when started, without a query of its own.
    fn resumed(
        id: IncidentId,
        stored: &[RecordedEvent],
        offers: Vec<OfferRecord>,
        deps: IncidentDeps,
    ) -> Self {
        let (state, version) = rebuild(stored);
        Self {
            id,
            state,
            version,
            loaded: true,
            resume: Some(offers),
            ..Self::recover(IncidentId(uuid::Uuid::nil()), deps)
        }
    }

    /// An actor for an incident just created (its state is known; nothing to load).
    pub fn created(incident: Incident, version: i64, deps: IncidentDeps) -> Self {
        Self {
            id: incident.id,
            state: Some(incident),
            version,
            loaded: true,
            ..Self::recover(IncidentId(uuid::Uuid::nil()), deps)
        }
    }

    fn load(&mut self, ctx: &mut Context<Self>) {
        let db = self.db.clone();
        let stream = stream_of(self.id);
        let id = self.id;
        ctx.wait(
            async move {
                db.run(move |mut conn| async move {
                    let stored = events::read_stream(&mut conn, &stream).await?;
                    let offers = fleet_store::offers_for(&mut conn, id).await?;
                    Ok::<_, StoreError>((stored, offers))
                })
                .await
            }
            .into_actor(self)
            .map(|res, act, ctx| match res {
                Ok((stored, offers)) => {
                    let (state, version) = rebuild(&stored);
                    act.state = state;
                    act.version = version;
                    act.loaded = true;
                    act.resume_dispatch(offers, ctx);
                }
                Err(e) => {
                    tracing::warn!(incident.id = %act.id, error = %e, "could not load incident; will retry on the next message");
                    act.loaded = false;
                }
            }),
        );
    }
}

impl Actor for IncidentActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if !self.loaded {
            self.load(ctx);
        } else if let Some(offers) = self.resume.take() {
            self.resume_dispatch(offers, ctx);
        }
    }
}

impl Supervised for IncidentActor {
    fn restarting(&mut self, _: &mut Self::Context) {
        // Forget everything in memory: the event store is the truth.
        self.restarts += 1;
        self.state = None;
        self.version = 0;
        self.loaded = false;
        self.pending.clear();
        self.excluded.clear();
        self.round_timer = None;
        tracing::warn!(incident.id = %self.id, restarts = self.restarts, "incident actor restarting");
    }
}

impl Handler<Execute> for IncidentActor {
    type Result = AtomicResponse<Self, Result<Incident, IncidentError>>;

    fn handle(&mut self, msg: Execute, ctx: &mut Self::Context) -> Self::Result {
        self.messages += 1;
        let now = Utc::now();
        self.last_message_at = Some(now);
        if !self.loaded {
            // Loading failed earlier (database down): try again for the next caller.
            self.load(ctx);
            return AtomicResponse::new(Box::pin(fut::ready(Err(IncidentError::Store(
                StoreError::Unavailable("incident state not loaded yet; retry".into()),
            )))));
        }
        let Some(current) = self.state.clone() else {
            return AtomicResponse::new(Box::pin(fut::ready(Err(IncidentError::NotFound))));
        };
        let (next, events) = match handle(Some(&current), &msg.0, now) {
            Ok(outcome) => outcome,
            Err(rejection) => {
                return AtomicResponse::new(Box::pin(fut::ready(Err(rejection.into()))));
            }
        };
        if events.is_empty() {
            return AtomicResponse::new(Box::pin(fut::ready(Ok(next))));
        }
        let writer = self.deps.writer.clone();
        let expected = self.version;
        let to_store = next.clone();
        // A cancelled incident withdraws its offers in the same transaction.
        let withdrawn: Vec<(OfferId, PendingOffer)> = if next.status == IncidentStatus::Cancelled {
            self.pending.iter().map(|(k, v)| (*k, v.clone())).collect()
        } else {
            Vec::new()
        };
        let closing: Vec<(OfferId, UnitId)> = withdrawn
            .iter()
            .map(|(o, p)| (*o, p.unit_id.clone()))
            .collect();
        let assigned_before = current.assigned_unit_id.clone();
        let work = async move {
            writer
                .write(move |tx| {
                    // The writer may run this twice (see `GroupCommit::write`).
                    let (to_store, closing, events) =
                        (to_store.clone(), closing.clone(), events.clone());
                    Box::pin(async move {
                        let extra =
                            close_offers(tx, to_store.id, &closing, "withdrawn", "cancelled", now)
                                .await?;
                        persist(tx, &to_store, expected, &events, extra, now).await
                    })
                })
                .await
        };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(move |res, act, ctx| {
            match res {
                Ok(version) => {
                    act.version = version;
                    act.state = Some(next.clone());
                    if next.status == IncidentStatus::Cancelled {
                        act.end_dispatch(ctx, "cancelled");
                        if let (Some(unit), Some(fleet)) = (assigned_before, act.deps.fleet.clone())
                        {
                            let id = act.id;
                            actix::spawn(async move {
                                if let Ok(Some(addr)) = fleet.send(UnitAddr(unit)).await {
                                    addr.do_send(IncidentOver {
                                        incident_id: id,
                                        reason: "cancelled",
                                    });
                                }
                            });
                        }
                    }
                    if !next.status.is_open()
                        && let Some(directory) = &act.directory
                    {
                        directory.do_send(IncidentEnded {
                            id: next.id,
                            patient_id: next.patient_id.clone(),
                        });
                    }
                    Ok(next)
                }
                Err(IncidentError::Conflict) => {
                    // Someone else wrote this stream: our state is stale. Reload.
                    act.load(ctx);
                    Err(IncidentError::Conflict)
                }
                Err(e) => Err(e),
            }
        })))
    }
}

impl Handler<Crash> for IncidentActor {
    type Result = ();

    fn handle(&mut self, _: Crash, ctx: &mut Self::Context) {
        tracing::warn!(incident.id = %self.id, "fault injection: stopping the incident actor");
        ctx.stop();
    }
}

impl Handler<InspectIncident> for IncidentActor {
    type Result = MessageResult<InspectIncident>;

    fn handle(&mut self, _: InspectIncident, _: &mut Self::Context) -> Self::Result {
        MessageResult(IncidentInspection {
            kind: "incident",
            id: self.id,
            status: match (&self.state, self.loaded) {
                (Some(s), _) => s.status.as_str().to_owned(),
                (None, true) => "missing".to_owned(),
                (None, false) => "loading".to_owned(),
            },
            restarts: self.restarts,
            messages: self.messages,
            last_message_at: self.last_message_at,
            version: self.version,
            state: self
                .state
                .as_ref()
                .and_then(|s| serde_json::to_value(s).ok()),
            timers: Vec::new(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Dispatch: offer rounds, first accept wins, expiry, escalation, manual assignment

/// Closes pending offers in the store and returns the events that record it
/// (`dispatch.offer_<status>`).
/// Offers to close with one status and reason.
type OfferGroup<'a> = (&'a str, &'a str, Vec<(OfferId, UnitId)>);

async fn close_offers(
    tx: &mut DbConn,
    incident: IncidentId,
    offers: &[(OfferId, UnitId)],
    status: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<Vec<NewEvent>, IncidentError> {
    let mut out = Vec::with_capacity(offers.len());
    let decline = (status == "declined").then_some(reason);
    let ids: Vec<OfferId> = offers.iter().map(|(o, _)| *o).collect();
    let moved = fleet_store::close_offers(tx, &ids, status, now, decline).await?;
    for (offer, unit) in offers {
        if moved.contains(offer) {
            let mut e = NewEvent::new(
                format!("dispatch.offer_{status}"),
                json!({"offer_id": offer, "incident_id": incident, "unit_id": unit, "reason": reason, "at": now}),
            );
            e.incident_id = Some(incident.to_string());
            e.unit_id = Some(unit.0.clone());
            out.push(e);
        }
    }
    Ok(out)
}

/// Why an offer could not be accepted (`api.md`: 409 `{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OfferOutcome {
    /// This unit got the job.
    Assigned,
    /// Another unit was first.
    Taken,
    /// The offer lapsed.
    Expired,
    /// The incident was cancelled.
    Cancelled,
    /// The decline was recorded.
    Declined,
}

/// Start the next offer round (after creation, a decline, an expiry, or a unit freeing up).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct NextRound;

/// The offers of `round` lapsed.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct RoundExpired {
    /// The round.
    pub round: u32,
}

/// A crew accepts its offer.
#[derive(Message, Debug)]
#[rtype(result = "Result<OfferOutcome, IncidentError>")]
pub struct AcceptOffer {
    /// Offer.
    pub offer_id: OfferId,
    /// The crew's unit.
    pub unit_id: UnitId,
}

/// A crew declines its offer.
#[derive(Message, Debug)]
#[rtype(result = "Result<OfferOutcome, IncidentError>")]
pub struct DeclineOffer {
    /// Offer.
    pub offer_id: OfferId,
    /// The crew's unit.
    pub unit_id: UnitId,
    /// Why.
    pub reason: String,
}

/// A dispatcher assigns a unit by hand.
#[derive(Message, Debug)]
#[rtype(result = "Result<Incident, IncidentError>")]
pub struct ManualAssign {
    /// The unit.
    pub unit_id: UnitId,
}

/// Units reserved for one offer round: the offer id, the ranked candidate and its actor.
type Reserved = Vec<(
    OfferId,
    crate::domain::dispatch::Candidate,
    Addr<crate::actors::fleet::AmbulanceActor>,
)>;

/// Ranks the available units for a scene and reserves the best `offers_per_round` of them
/// for `incident` (each unit's actor arbitrates its own commitments). Nothing is stored.
async fn reserve_round(
    fleet: Addr<Fleet>,
    id: IncidentId,
    scene: LatLng,
    priority: Priority,
    exclude: HashSet<UnitId>,
    settings: DispatchSettings,
) -> (Reserved, DateTime<Utc>) {
    let candidates = fleet
        .send(FindCandidates {
            scene,
            priority,
            exclude,
        })
        .timeout(ACTOR_TIMEOUT)
        .await
        .unwrap_or_default();
    let expires_at =
        Utc::now() + chrono::Duration::seconds(i64::try_from(settings.offer_ttl_s).unwrap_or(30));
    let mut reserved = Vec::new();
    for c in candidates {
        if reserved.len() >= settings.offers_per_round.max(1) {
            break;
        }
        let Ok(Some(addr)) = fleet.send(UnitAddr(c.unit_id.clone())).await else {
            continue;
        };
        let offer_id = OfferId::new_v7();
        if let Ok(Ok(())) = addr
            .send(Reserve {
                offer_id,
                incident_id: id,
                expires_at,
            })
            .timeout(ACTOR_TIMEOUT)
            .await
        {
            reserved.push((offer_id, c, addr));
        }
    }
    (reserved, expires_at)
}

/// The stored offers of a reserved round.
fn offer_records(
    incident: IncidentId,
    reserved: &Reserved,
    round: u32,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Vec<OfferRecord> {
    reserved
        .iter()
        .map(|(offer_id, c, _)| OfferRecord {
            id: *offer_id,
            incident_id: incident,
            unit_id: c.unit_id.clone(),
            round,
            status: "pending".to_owned(),
            eta_s: c.eta_s,
            reason: serde_json::to_value(c.reason)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            offered_at: now,
            expires_at,
            responded_at: None,
            decline_reason: None,
        })
        .collect()
}

/// Sends each reserved unit its stored offer, for its crew.
fn send_offers(
    state: &Incident,
    records: &[OfferRecord],
    reserved: &Reserved,
    expires_at: DateTime<Utc>,
) {
    let (priority, location) = (state.priority, state.location);
    for (record, (_, _, addr)) in records.iter().zip(reserved.iter()) {
        addr.do_send(PublishOffer {
            offer_id: record.id,
            frame: json!({"type": "offer", "offer_id": record.id, "incident_id": record.incident_id,
                          "priority": priority, "location": location, "eta_s": record.eta_s,
                          "expires_at": expires_at}),
        });
    }
}

fn release_all(reserved: &Reserved) {
    for (offer_id, _, addr) in reserved {
        addr.do_send(Release {
            offer_id: *offer_id,
            reason: "cancelled",
        });
    }
}

fn ready<T: 'static>(v: T) -> AtomicResponse<IncidentActor, T> {
    AtomicResponse::new(Box::pin(fut::ready(v)))
}

impl IncidentActor {
    /// After loading: re-arm offer timers from the stored deadlines (expiring lapsed ones at
    /// once) and continue dispatching where it stopped.
    fn resume_dispatch(&mut self, offers: Vec<OfferRecord>, ctx: &mut Context<Self>) {
        self.pending.clear();
        self.excluded.clear();
        for o in offers {
            match o.status.as_str() {
                "pending" => {
                    self.pending.insert(
                        o.id,
                        PendingOffer {
                            unit_id: o.unit_id,
                            round: o.round,
                            expires_at: o.expires_at,
                        },
                    );
                }
                "declined" | "expired" => {
                    self.excluded.insert(o.unit_id);
                }
                _ => {}
            }
        }
        let Some(state) = &self.state else { return };
        if state.status != IncidentStatus::Dispatching || self.deps.fleet.is_none() {
            return;
        }
        if !self.pending.is_empty() {
            // Offers outstanding at a crash: the units' reservations did not survive the
            // restart, so withdraw them (without counting against the units) and offer again.
            ctx.notify(ReofferAfterRestart);
        } else if state.escalated {
            self.wait_for_unit();
        } else {
            ctx.notify(NextRound);
        }
    }

    /// A round's offers are stored: track them, tell the crews, and arm the round's expiry.
    fn publish_round(
        &mut self,
        records: &[OfferRecord],
        reserved: &Reserved,
        round: u32,
        expires_at: DateTime<Utc>,
        ctx: &mut Context<Self>,
    ) {
        let Some(state) = &self.state else { return };
        send_offers(state, records, reserved, expires_at);
        self.track_round(records, round, expires_at, ctx);
    }

    /// Tracks a round's offers (already sent to the crews) and arms the round's expiry.
    fn track_round(
        &mut self,
        records: &[OfferRecord],
        round: u32,
        expires_at: DateTime<Utc>,
        ctx: &mut Context<Self>,
    ) {
        for record in records {
            self.pending.insert(
                record.id,
                PendingOffer {
                    unit_id: record.unit_id.clone(),
                    round,
                    expires_at,
                },
            );
        }
        self.arm_round_timer(round, expires_at, ctx);
    }

    fn arm_round_timer(&mut self, round: u32, due: DateTime<Utc>, ctx: &mut Context<Self>) {
        if let Some(old) = self.round_timer.take() {
            ctx.cancel_future(old);
        }
        let wait = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        self.round_timer =
            Some(ctx.run_later(wait, move |_, ctx| ctx.notify(RoundExpired { round })));
    }

    fn wait_for_unit(&self) {
        if let (Some(fleet), Some(state)) = (&self.deps.fleet, &self.state) {
            fleet.do_send(WaitForUnit {
                incident_id: state.id,
                priority: state.priority,
                since: state.created_at,
            });
        }
    }

    /// The incident no longer needs units: withdraw offers (already closed in the store) and
    /// stop timers.
    fn end_dispatch(&mut self, ctx: &mut Context<Self>, reason: &'static str) {
        if let Some(t) = self.round_timer.take() {
            ctx.cancel_future(t);
        }
        let pending: Vec<(OfferId, UnitId)> =
            self.pending.drain().map(|(o, p)| (o, p.unit_id)).collect();
        if let Some(fleet) = self.deps.fleet.clone() {
            fleet.do_send(StopWaiting(self.id));
            actix::spawn(async move {
                for (offer_id, unit) in pending {
                    if let Ok(Some(addr)) = fleet.send(UnitAddr(unit)).await {
                        addr.do_send(Release { offer_id, reason });
                    }
                }
            });
        }
    }

    /// Persists `events` for `next` with extra raw events, in one transaction.
    fn commit(
        &mut self,
        next: Incident,
        events: Vec<IncidentEvent>,
        offers_to_insert: Vec<OfferRecord>,
        closing: Vec<(OfferId, UnitId, &'static str, String)>,
        now: DateTime<Utc>,
    ) -> impl std::future::Future<Output = Result<i64, IncidentError>> + 'static {
        let writer = self.deps.writer.clone();
        let expected = self.version;
        async move {
            writer
                .write(move |tx| {
                    // The writer may run this twice (see `GroupCommit::write`).
                    let (next, events, offers_to_insert, closing) = (
                        next.clone(),
                        events.clone(),
                        offers_to_insert.clone(),
                        closing.clone(),
                    );
                    Box::pin(async move {
                        // One statement per distinct (status, reason): an accept closes
                        // the winner's offer and withdraws the others in two.
                        let mut extra = Vec::new();
                        let mut groups: Vec<OfferGroup<'_>> = Vec::new();
                        for (offer, unit, status, reason) in &closing {
                            match groups
                                .iter_mut()
                                .find(|(s, r, _)| s == status && r == reason)
                            {
                                Some((_, _, offers)) => offers.push((*offer, unit.clone())),
                                None => groups.push((status, reason, vec![(*offer, unit.clone())])),
                            }
                        }
                        // The closes and the new offers go out together (pipelined on
                        // PostgreSQL); the events they make follow with the projection.
                        let (closed, ()) = tx
                            .try_both(
                                async |c| {
                                    c.try_each(&groups, async |c, (status, reason, offers)| {
                                        close_offers(c, next.id, offers, status, reason, now).await
                                    })
                                    .await
                                },
                                async |c| {
                                    fleet_store::insert_offers(c, &offers_to_insert).await?;
                                    Ok(())
                                },
                            )
                            .await?;
                        extra.extend(closed.into_iter().flatten());
                        persist(tx, &next, expected, &events, extra, now).await
                    })
                })
                .await
        }
    }
}

impl Handler<NextRound> for IncidentActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: NextRound, _: &mut Self::Context) -> Self::Result {
        let (Some(fleet), Some(state)) = (self.deps.fleet.clone(), self.state.clone()) else {
            return ready(());
        };
        if state.status != IncidentStatus::Dispatching || !self.pending.is_empty() {
            return ready(());
        }
        let settings = self.deps.dispatch.clone();
        let exclude = self.excluded.clone();
        let id = state.id;
        let round = state.dispatch_round + 1;
        let max_rounds = settings.max_rounds.max(1);
        // 1. Rank and reserve units (no state change yet). Once the rounds are used up the
        // incident is escalated; after that it keeps offering to units as they become free
        // (dispatchers may also assign by hand), without reserving units it cannot offer to.
        let out_of_rounds = round > max_rounds && !state.escalated;
        let find: std::pin::Pin<Box<dyn std::future::Future<Output = (Reserved, DateTime<Utc>)>>> =
            if out_of_rounds {
                Box::pin(fut::ready((Vec::new(), Utc::now())))
            } else {
                Box::pin(reserve_round(
                    fleet,
                    id,
                    state.location,
                    state.priority,
                    exclude,
                    settings,
                ))
            };
        AtomicResponse::new(Box::pin(find.into_actor(self).then(move |(reserved, expires_at), act, _| {
            let now = Utc::now();
            // 2a. Nobody: escalate to the dispatchers (once) and wait for a free unit.
            if reserved.is_empty() {
                release_all(&reserved);
                let reason = if out_of_rounds {
                    format!("no unit accepted after {max_rounds} rounds")
                } else {
                    "no available unit".to_owned()
                };
                let outcome = handle(Some(&state), &Command::Escalate { reason }, now);
                let fut: std::pin::Pin<Box<dyn ActorFuture<Self, Output = ()>>> = match outcome {
                    Ok((next, events)) if !events.is_empty() => Box::pin(
                        act.commit(next.clone(), events, Vec::new(), Vec::new(), now)
                            .into_actor(act)
                            .map(move |res, act, _| match res {
                                Ok(v) => {
                                    act.version = v;
                                    act.state = Some(next);
                                    act.wait_for_unit();
                                }
                                Err(e) => tracing::warn!(incident.id = %act.id, error = %e, "escalation not persisted"),
                            }),
                    ),
                    _ => {
                        act.wait_for_unit();
                        Box::pin(fut::ready(()))
                    }
                };
                return fut;
            }
            // 2b. Record the round and its offers before anyone is told.
            let unit_ids: Vec<UnitId> = reserved.iter().map(|(_, c, _)| c.unit_id.clone()).collect();
            let (next, events) = match handle(Some(&state), &Command::RecordOffers { unit_ids }, now) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(incident.id = %act.id, error = %e, "offer round refused");
                    release_all(&reserved);
                    return Box::pin(fut::ready(()));
                }
            };
            let records = offer_records(state.id, &reserved, round, now, expires_at);
            Box::pin(act.commit(next.clone(), events, records.clone(), Vec::new(), now).into_actor(act).map(
                move |res, act, ctx| match res {
                    Ok(version) => {
                        act.version = version;
                        act.state = Some(next);
                        act.publish_round(&records, &reserved, round, expires_at, ctx);
                    }
                    Err(e) => {
                        tracing::warn!(incident.id = %act.id, error = %e, "offer round not persisted; units released");
                        release_all(&reserved);
                        ctx.run_later(Duration::from_secs(1), |_, ctx| ctx.notify(NextRound));
                    }
                },
            ))
        })))
    }
}

/// The first round, stored with the incident and already sent to the crews by the directory:
/// track it and arm the expiry.
#[derive(Message)]
#[rtype(result = "()")]
struct PublishFirstRound(FirstRound);

impl Handler<PublishFirstRound> for IncidentActor {
    type Result = ();

    fn handle(&mut self, msg: PublishFirstRound, ctx: &mut Self::Context) {
        let FirstRound {
            records,
            expires_at,
            ..
        } = msg.0;
        self.track_round(&records, 1, expires_at, ctx);
    }
}

/// Offers recovered as pending after a restart are withdrawn and the round is run again.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ReofferAfterRestart;

impl Handler<ReofferAfterRestart> for IncidentActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: ReofferAfterRestart, _: &mut Self::Context) -> Self::Result {
        let Some(state) = self.state.clone() else {
            return ready(());
        };
        let closing: Vec<(OfferId, UnitId, &'static str, String)> = self
            .pending
            .iter()
            .map(|(o, p)| (*o, p.unit_id.clone(), "withdrawn", "restart".to_owned()))
            .collect();
        if closing.is_empty() {
            return ready(());
        }
        let now = Utc::now();
        AtomicResponse::new(Box::pin(
            self.commit(state, Vec::new(), Vec::new(), closing, now)
                .into_actor(self)
                .map(|res, act, ctx| match res {
                    Ok(v) => {
                        act.version = v;
                        act.pending.clear();
                        ctx.notify(NextRound);
                    }
                    Err(e) => {
                        tracing::warn!(incident.id = %act.id, error = %e, "could not withdraw offers after restart; retrying");
                        ctx.run_later(Duration::from_secs(1), |_, ctx| ctx.notify(ReofferAfterRestart));
                    }
                }),
        ))
    }
}

impl Handler<RoundExpired> for IncidentActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: RoundExpired, _: &mut Self::Context) -> Self::Result {
        self.round_timer = None;
        let Some(state) = self.state.clone() else {
            return ready(());
        };
        let lapsed: Vec<(OfferId, UnitId)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.round == msg.round)
            .map(|(o, p)| (*o, p.unit_id.clone()))
            .collect();
        if lapsed.is_empty() {
            return ready(());
        }
        let now = Utc::now();
        let closing = lapsed
            .iter()
            .map(|(o, u)| (*o, u.clone(), "expired", "no answer in time".to_owned()))
            .collect();
        AtomicResponse::new(Box::pin(self.commit(state.clone(), Vec::new(), Vec::new(), closing, now).into_actor(self).map(
            move |res, act, ctx| {
                match res {
                    Ok(v) => act.version = v,
                    Err(e) => tracing::warn!(incident.id = %act.id, error = %e, "offer expiry not persisted"),
                }
                let fleet = act.deps.fleet.clone();
                for (offer_id, unit) in lapsed {
                    act.pending.remove(&offer_id);
                    act.excluded.insert(unit.clone());
                    if let Some(fleet) = fleet.clone() {
                        actix::spawn(async move {
                            if let Ok(Some(addr)) = fleet.send(UnitAddr(unit)).await {
                                addr.do_send(Release { offer_id, reason: "expired" });
                            }
                        });
                    }
                }
                ctx.notify(NextRound);
            },
        )))
    }
}

impl Handler<AcceptOffer> for IncidentActor {
    type Result = AtomicResponse<Self, Result<OfferOutcome, IncidentError>>;

    fn handle(&mut self, msg: AcceptOffer, _: &mut Self::Context) -> Self::Result {
        let Some(state) = self.state.clone() else {
            return ready(Err(IncidentError::NotFound));
        };
        if state.status == IncidentStatus::Cancelled {
            return ready(Ok(OfferOutcome::Cancelled));
        }
        if state.assigned_unit_id.as_ref() == Some(&msg.unit_id) {
            return ready(Ok(OfferOutcome::Assigned)); // a retried accept
        }
        let Some(offer) = self.pending.get(&msg.offer_id).cloned() else {
            return ready(Ok(if state.assigned_unit_id.is_some() {
                OfferOutcome::Taken
            } else {
                OfferOutcome::Expired
            }));
        };
        if offer.unit_id != msg.unit_id {
            return ready(Ok(OfferOutcome::Taken));
        }
        let now = Utc::now();
        if now >= offer.expires_at {
            return ready(Ok(OfferOutcome::Expired));
        }
        let (next, events) = match handle(
            Some(&state),
            &Command::Assign {
                unit_id: msg.unit_id.clone(),
                manual: false,
            },
            now,
        ) {
            Ok(x) => x,
            Err(_) => return ready(Ok(OfferOutcome::Taken)),
        };
        let fleet = self.deps.fleet.clone();
        let (id, offer_id, unit_id) = (self.id, msg.offer_id, msg.unit_id.clone());
        let mut closing: Vec<(OfferId, UnitId, &'static str, String)> =
            vec![(offer_id, unit_id.clone(), "accepted", "accepted".to_owned())];
        closing.extend(
            self.pending
                .iter()
                .filter(|(o, _)| **o != offer_id)
                .map(|(o, p)| (*o, p.unit_id.clone(), "withdrawn", "taken".to_owned())),
        );
        let persist = self.commit(next.clone(), events, Vec::new(), closing, now);
        // The unit must still hold the offer (it is the arbiter of its own commitments).
        let work = async move {
            let fleet = fleet.ok_or(IncidentError::NotFound)?;
            let addr = fleet
                .send(UnitAddr(unit_id))
                .await
                .ok()
                .flatten()
                .ok_or(IncidentError::NotFound)?;
            match addr
                .send(Commit {
                    incident_id: id,
                    offer_id: Some(offer_id),
                })
                .timeout(ACTOR_TIMEOUT)
                .await
            {
                Ok(Ok(_)) => {}
                _ => return Ok((false, 0)),
            }
            match persist.await {
                Ok(v) => Ok((true, v)),
                Err(e) => {
                    addr.do_send(Uncommit { incident_id: id });
                    Err(e)
                }
            }
        };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(
            move |res, act, ctx| match res {
                Ok((true, version)) => {
                    act.version = version;
                    act.state = Some(next);
                    act.pending.remove(&offer_id);
                    act.end_dispatch(ctx, "taken");
                    Ok(OfferOutcome::Assigned)
                }
                Ok((false, _)) => Ok(OfferOutcome::Expired),
                Err(e) => Err(e),
            },
        )))
    }
}

impl Handler<DeclineOffer> for IncidentActor {
    type Result = AtomicResponse<Self, Result<OfferOutcome, IncidentError>>;

    fn handle(&mut self, msg: DeclineOffer, _: &mut Self::Context) -> Self::Result {
        let Some(state) = self.state.clone() else {
            return ready(Err(IncidentError::NotFound));
        };
        let Some(offer) = self.pending.get(&msg.offer_id).cloned() else {
            return ready(Ok(if state.status == IncidentStatus::Cancelled {
                OfferOutcome::Cancelled
            } else {
                OfferOutcome::Expired
            }));
        };
        if offer.unit_id != msg.unit_id {
            return ready(Ok(OfferOutcome::Taken));
        }
        let now = Utc::now();
        let closing = vec![(
            msg.offer_id,
            msg.unit_id.clone(),
            "declined",
            msg.reason.clone(),
        )];
        let fleet = self.deps.fleet.clone();
        AtomicResponse::new(Box::pin(
            self.commit(state, Vec::new(), Vec::new(), closing, now)
                .into_actor(self)
                .map(move |res, act, ctx| {
                    let version = res?;
                    act.version = version;
                    act.pending.remove(&msg.offer_id);
                    act.excluded.insert(msg.unit_id.clone());
                    if let Some(fleet) = fleet {
                        let (unit, offer_id) = (msg.unit_id, msg.offer_id);
                        actix::spawn(async move {
                            if let Ok(Some(addr)) = fleet.send(UnitAddr(unit)).await {
                                addr.do_send(Release {
                                    offer_id,
                                    reason: "declined",
                                });
                            }
                        });
                    }
                    if act.pending.is_empty() {
                        if let Some(t) = act.round_timer.take() {
                            ctx.cancel_future(t);
                        }
                        ctx.notify(NextRound);
                    }
                    Ok(OfferOutcome::Declined)
                }),
        ))
    }
}

impl Handler<ManualAssign> for IncidentActor {
    type Result = AtomicResponse<Self, Result<Incident, IncidentError>>;

    fn handle(&mut self, msg: ManualAssign, _: &mut Self::Context) -> Self::Result {
        let Some(state) = self.state.clone() else {
            return ready(Err(IncidentError::NotFound));
        };
        let now = Utc::now();
        let (next, events) = match handle(
            Some(&state),
            &Command::Assign {
                unit_id: msg.unit_id.clone(),
                manual: true,
            },
            now,
        ) {
            Ok(x) => x,
            Err(e) => return ready(Err(e.into())),
        };
        let closing: Vec<(OfferId, UnitId, &'static str, String)> = self
            .pending
            .iter()
            .map(|(o, p)| {
                (
                    *o,
                    p.unit_id.clone(),
                    "withdrawn",
                    "manual assignment".to_owned(),
                )
            })
            .collect();
        let persist = self.commit(next.clone(), events, Vec::new(), closing, now);
        let (fleet, directory, id, unit_id) = (
            self.deps.fleet.clone(),
            self.deps.directory.clone(),
            self.id,
            msg.unit_id,
        );
        let work = async move {
            let fleet = fleet.ok_or(IncidentError::NotFound)?;
            let addr = fleet
                .send(UnitAddr(unit_id.clone()))
                .await
                .ok()
                .flatten()
                .ok_or(IncidentError::Rejected(Rejection::Invalid(
                    "no such unit".into(),
                )))?;
            let displaced = match addr
                .send(Commit {
                    incident_id: id,
                    offer_id: None,
                })
                .timeout(ACTOR_TIMEOUT)
                .await
            {
                Ok(Ok(d)) => d,
                Ok(Err(refusal)) => {
                    return Err(IncidentError::Rejected(Rejection::Invalid(format!(
                        "cannot assign {unit_id}: {refusal}"
                    ))));
                }
                Err(_) => {
                    return Err(IncidentError::Store(StoreError::Unavailable(
                        "unit did not answer".into(),
                    )));
                }
            };
            match persist.await {
                Ok(v) => {
                    // The unit was holding an offer for another incident: that one declines.
                    if let (Some((offer_id, other)), Some(directory)) = (displaced, directory) {
                        directory.do_send(ForwardDecline {
                            incident_id: other,
                            offer_id,
                            unit_id,
                            reason: "reassigned by a dispatcher".into(),
                        });
                    }
                    Ok(v)
                }
                Err(e) => {
                    addr.do_send(Uncommit { incident_id: id });
                    Err(e)
                }
            }
        };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(move |res, act, ctx| {
            let version = res?;
            act.version = version;
            act.state = Some(next.clone());
            act.end_dispatch(ctx, "taken");
            Ok(next)
        })))
    }
}

// ---------------------------------------------------------------------------------------------
// The directory

/// A request to open an incident (or find the patient's open one).
#[derive(Clone, Debug)]
pub struct OpenRequest {
    /// Origin.
    pub source: Source,
    /// Priority.
    pub priority: Priority,
    /// The patient, when known.
    pub patient_id: Option<PatientId>,
    /// Where; the patient's home when absent.
    pub location: Option<LatLng>,
    /// Free text.
    pub description: Option<String>,
    /// Evidence to attach (readings behind a triage verdict).
    pub evidence: Option<serde_json::Value>,
}

/// The outcome of an [`OpenIncident`].
#[derive(Clone, Debug)]
pub struct Opened {
    /// The incident (new, or the patient's open one).
    pub incident: Incident,
    /// Whether this request created it.
    pub created: bool,
}

/// Open an incident, or return the patient's open one.
#[derive(Message, Debug)]
#[rtype(result = "Result<Opened, IncidentError>")]
pub struct OpenIncident(pub OpenRequest);

/// Run a command on an incident by id.
#[derive(Message, Debug)]
#[rtype(result = "Result<Incident, IncidentError>")]
pub struct Route {
    /// The incident.
    pub id: IncidentId,
    /// The command.
    pub command: Command,
}

/// An incident closed or was cancelled: the patient may get a new one.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct IncidentEnded {
    /// The incident.
    pub id: IncidentId,
    /// Its patient.
    pub patient_id: Option<PatientId>,
}

/// Recover every open incident from the store (at start-up).
#[derive(Message, Debug)]
#[rtype(result = "Result<usize, StoreError>")]
pub struct Recover;

/// The actor of an incident, if live (admin, tests).
#[derive(Message, Debug)]
#[rtype(result = "Option<Addr<IncidentActor>>")]
pub struct LookupIncident(pub IncidentId);

/// A page of live incident actors for `/admin/actors`.
#[derive(Message, Debug)]
#[rtype(result = "(usize, Vec<IncidentInspection>)")]
pub struct ListIncidents {
    /// Most entries.
    pub limit: usize,
}

type Waiter = oneshot::Sender<Result<Opened, String>>;

/// The only place incidents are created.
pub struct IncidentDirectory {
    db: Db,
    deps: IncidentDeps,
    incidents: HashMap<IncidentId, Addr<IncidentActor>>,
    open_by_patient: HashMap<PatientId, IncidentId>,
    /// Patients whose incident is being created, with the requests waiting for it.
    creating: HashMap<PatientId, Vec<(Waiter, Option<serde_json::Value>)>>,
    /// References reserved in advance (PostgreSQL).
    references: ReferenceBlocks,
    /// The directory's own connection for the reads a new incident waits for.
    reader: Reader,
}

/// A connection of the directory's own (PostgreSQL) for the reads a new incident waits for
/// (its patient). It is opened on the directory's thread, so an answer is read where it is
/// used: two thread hand-offs fewer than a pooled connection, whose I/O runs on the database
/// I/O thread (measured on the 2-core machine: a hand-off between threads costs about 0.1 ms).
/// Its statements are pipelined: concurrent creations share it. A read that fails on it is
/// retried on the pool, and the connection is opened again.
#[derive(Default)]
struct Reader {
    /// Where it comes from (`None`: no reader, reads use the pool).
    db: Option<Db>,
    /// The open connection, shared for pipelined reads.
    conn: Option<DbConn>,
    opening: bool,
}

impl IncidentDirectory {
    /// An empty directory; send [`Recover`] to load open incidents. `deps.directory` is filled
    /// in when the directory starts.
    pub fn new(deps: IncidentDeps) -> Self {
        Self {
            db: deps.db.clone(),
            deps,
            incidents: HashMap::new(),
            open_by_patient: HashMap::new(),
            creating: HashMap::new(),
            references: ReferenceBlocks::default(),
            reader: Reader::default(),
        }
    }

    /// Reads a new incident waits for go through a connection of the directory's own, opened
    /// from `db` (a one-connection pool whose connection is opened on the thread that first
    /// uses it: [`Db::connect_writer`]). PostgreSQL only; SQLite reads inside the write.
    pub fn with_reader(mut self, db: Db) -> Self {
        if db.backend() == crate::persistence::Backend::Postgres {
            self.reader.db = Some(db);
        }
        self
    }

    /// A handle on the reader connection, or `None` (the pool is used) while it is being
    /// opened, which this starts when needed.
    fn reader(&mut self, ctx: &mut Context<Self>) -> Option<DbConn> {
        if self.reader.conn.as_mut().is_some_and(DbConn::is_broken) {
            tracing::warn!("directory reader lost; opening another");
            self.reader.conn = None;
        }
        if let Some(conn) = &self.reader.conn {
            return conn.fork();
        }
        let db = self.reader.db.clone()?;
        if !self.reader.opening {
            self.reader.opening = true;
            ctx.spawn(
                async move { db.conn().await.map(DbConn::pipelined) }
                    .into_actor(self)
                    .map(|opened, act, _| {
                        act.reader.opening = false;
                        match opened {
                            Ok(conn) => act.reader.conn = Some(conn),
                            Err(e) => tracing::warn!(error = %e, "directory reader not opened"),
                        }
                    }),
            );
        }
        None
    }

    fn start_actor(
        &mut self,
        actor: IncidentActor,
        _ctx: &mut Context<Self>,
    ) -> Addr<IncidentActor> {
        let id = actor.id;
        let mut actor = Some(actor);
        let deps = self.deps.clone();
        let addr = Supervisor::start(move |_| {
            actor
                .take()
                .unwrap_or_else(|| IncidentActor::recover(id, deps))
        });
        self.incidents.insert(id, addr.clone());
        addr
    }

    /// The live actor of `id`, re-created from the store when missing or dead.
    fn actor_for(&mut self, id: IncidentId, ctx: &mut Context<Self>) -> Addr<IncidentActor> {
        match self.incidents.get(&id) {
            Some(addr) if addr.connected() => addr.clone(),
            _ => self.start_actor(IncidentActor::recover(id, self.deps.clone()), ctx),
        }
    }
}

impl Actor for IncidentDirectory {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1024);
        self.deps.directory = Some(ctx.address());
        // Opened now, on this thread, so that the first emergency does not wait for it.
        let _ = self.reader(ctx);
    }
}

/// Creates an incident in one transaction: reference, events (created, evidence, dispatch
/// started, next-of-kin notifications queued) and projections.
/// A first offer round reserved before the incident is stored.
struct FirstRound {
    reserved: Reserved,
    records: Vec<OfferRecord>,
    expires_at: DateTime<Utc>,
}

/// What a new incident needs before its write: the patient and the reference. On PostgreSQL
/// both are ready before the write, so the writer's batch does not wait a round trip for them:
/// the patient is read on a pooled connection while the first offer round is reserved, and the
/// reference comes from a block reserved in advance ([`ReferenceBlocks`]). On SQLite, whose
/// writes all queue for one lock, both are read and allocated inside the write itself (`None`
/// here).
#[derive(Clone)]
struct Prefetched {
    patient: Option<crate::domain::patients::Patient>,
    reference: String,
}

/// The patient and reference of a new incident (see [`Prefetched`]); `None` on SQLite. The
/// patient is read on `reader` when there is one, else (or if that fails) on the pool; the
/// flag says the reader failed (the directory then opens another).
async fn prefetch(
    db: &Db,
    reader: Option<DbConn>,
    patient_id: Option<PatientId>,
    reference: Option<ReferenceTicket>,
) -> (Result<Option<Prefetched>, IncidentError>, bool) {
    let Some(reference) = reference else {
        return (Ok(None), false);
    };
    let reference = async {
        match reference {
            ReferenceTicket::Ready(reference) => Ok(reference),
            ReferenceTicket::Waiting(answer) => answer.await.ok().flatten().ok_or_else(|| {
                IncidentError::Store(StoreError::Unavailable(
                    "incident references could not be reserved".into(),
                ))
            }),
        }
    };
    let patient = async {
        if patient_id.is_none() {
            return (Ok(None), false);
        }
        let mut reader_failed = false;
        if let Some(mut conn) = reader {
            match find_patient(&mut conn, patient_id.as_ref()).await {
                Err(IncidentError::Store(e)) => {
                    tracing::warn!(error = %e, "directory reader failed; reading on the pool");
                    reader_failed = true;
                }
                found => return (found, false),
            }
        }
        let found = db
            .run(move |conn| async move {
                let mut conn = conn.pipelined();
                find_patient(&mut conn, patient_id.as_ref()).await
            })
            .await;
        (found, reader_failed)
    };
    let (reference, (patient, reader_failed)) =
        futures_util::future::join(reference, patient).await;
    let prefetched = match (patient, reference) {
        (Ok(patient), Ok(reference)) => Ok(Some(Prefetched { patient, reference })),
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    (prefetched, reader_failed)
}

/// How many incident references the directory reserves at a time on PostgreSQL.
const REFERENCE_BLOCK: i64 = 100;

/// A new incident's reference: at hand, or promised by the block being reserved.
enum ReferenceTicket {
    Ready(String),
    Waiting(oneshot::Receiver<Option<String>>),
}

/// Incident references reserved in advance (PostgreSQL), so a new incident does not commit
/// an upsert of its own on the way to its first offer (a durable commit: about a millisecond
/// on a loaded machine). One block is reserved at a time, the next when half of the current
/// one is used; an incident that finds none at hand waits for the block in flight, and the
/// waiters are served in arrival order. Numbers are unique and increase in the order incidents
/// are opened on one node; numbers unused when the server stops are never handed out (a gap
/// after a restart), and several nodes sharing a database interleave their blocks.
#[derive(Debug, Default)]
struct ReferenceBlocks {
    /// Year, next number, last number.
    current: Option<(i32, i64, i64)>,
    /// The block reserved while the current one still had numbers.
    upcoming: Option<(i32, i64, i64)>,
    refilling: bool,
    waiting: std::collections::VecDeque<oneshot::Sender<Option<String>>>,
}

/// Numbers left in `block` for `year`.
fn left(block: Option<(i32, i64, i64)>, year: i32) -> i64 {
    block
        .filter(|(y, _, _)| *y == year)
        .map_or(0, |(_, next, last)| (last - next + 1).max(0))
}

impl ReferenceBlocks {
    /// The next reserved reference of `year`, if one is at hand.
    fn take(&mut self, year: i32) -> Option<String> {
        if left(self.current, year) == 0 {
            self.current = self.upcoming.take();
        }
        match &mut self.current {
            Some((y, next, last)) if *y == year && *next <= *last => {
                let number = *next;
                *next += 1;
                Some(store::format_reference(year, number))
            }
            _ => None,
        }
    }

    /// Whether to reserve the next block now.
    fn wants_refill(&self, year: i32) -> bool {
        !self.refilling
            && self.upcoming.is_none()
            && (left(self.current, year) < REFERENCE_BLOCK / 2 || !self.waiting.is_empty())
    }

    /// A new block: the waiters are served from it first, in order.
    fn install(&mut self, year: i32, first: i64, last: i64) {
        if left(self.current, year) == 0 {
            self.current = Some((year, first, last));
        } else {
            self.upcoming = Some((year, first, last));
        }
        while let Some(waiter) = self.waiting.pop_front() {
            if waiter.is_closed() {
                continue;
            }
            match self.take(year) {
                Some(reference) => {
                    let _ = waiter.send(Some(reference));
                }
                None => {
                    self.waiting.push_front(waiter);
                    break;
                }
            }
        }
    }
}

impl IncidentDirectory {
    /// A new incident's reference on PostgreSQL (`None` on SQLite, which allocates it inside
    /// the incident's own write), reserving the next block when this one runs low.
    fn reserve_reference(
        &mut self,
        now: DateTime<Utc>,
        ctx: &mut Context<Self>,
    ) -> Option<ReferenceTicket> {
        if self.db.backend() != crate::persistence::Backend::Postgres {
            return None;
        }
        let year = chrono::Datelike::year(&now);
        let ticket = match self.references.take(year) {
            Some(reference) => ReferenceTicket::Ready(reference),
            None => {
                let (tx, rx) = oneshot::channel();
                self.references.waiting.push_back(tx);
                ReferenceTicket::Waiting(rx)
            }
        };
        self.refill_references(year, ctx);
        Some(ticket)
    }

    fn refill_references(&mut self, year: i32, ctx: &mut Context<Self>) {
        if !self.references.wants_refill(year) {
            return;
        }
        self.references.refilling = true;
        let db = self.db.clone();
        let reserve = async move {
            db.run(move |mut conn| async move {
                store::reserve_references(&mut conn, year, REFERENCE_BLOCK).await
            })
            .await
        };
        ctx.spawn(reserve.into_actor(self).map(move |reserved, act, ctx| {
            act.references.refilling = false;
            match reserved {
                Ok((first, last)) => {
                    act.references.install(year, first, last);
                    // More waiters than one block serves: reserve another.
                    if !act.references.waiting.is_empty() {
                        act.refill_references(year, ctx);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "incident references not reserved");
                    for waiter in act.references.waiting.drain(..) {
                        let _ = waiter.send(None);
                    }
                }
            }
        }));
    }
}

/// The patient `id` names (`UnknownPatient` if none), or `None` without an id.
async fn find_patient(
    conn: &mut DbConn,
    id: Option<&PatientId>,
) -> Result<Option<crate::domain::patients::Patient>, IncidentError> {
    match id {
        Some(pid) => Ok(Some(
            patients::find_patient(conn, pid)
                .await?
                .ok_or(IncidentError::UnknownPatient)?,
        )),
        None => Ok(None),
    }
}

/// Creates incident `id`, with its first offer round when one was reserved, in one commit.
/// On PostgreSQL, with the patient and reference prefetched, that is one statement
/// ([`store::create_pg`]), which the writer runs without a transaction when it is alone: one
/// round trip between the reading and the crews' offers.
async fn create(
    writer: GroupCommit,
    id: IncidentId,
    req: OpenRequest,
    first_offers: Vec<OfferRecord>,
    prefetched: Option<Prefetched>,
    now: DateTime<Utc>,
) -> Result<(Incident, i64), IncidentError> {
    let one_statement = prefetched.is_some();
    writer
        .write_as(one_statement, move |tx| {
            // The writer may run this twice (see `GroupCommit::write`).
            let (req, first_offers, prefetched) =
                (req.clone(), first_offers.clone(), prefetched.clone());
            Box::pin(async move {
                let (patient, reference) = match prefetched {
                    Some(Prefetched { patient, reference }) => (patient, reference),
                    None => (
                        find_patient(tx, req.patient_id.as_ref()).await?,
                        store::next_reference(tx, now).await?,
                    ),
                };
                let location = req
                    .location
                    .or_else(|| patient.as_ref().and_then(|p| p.home_location))
                    .ok_or(IncidentError::NoLocation)?;
                let open = Command::Open {
                    id,
                    reference,
                    priority: req.priority,
                    source: req.source,
                    patient_id: req.patient_id.clone(),
                    location,
                    description: req.description.clone(),
                    evidence: req.evidence.clone(),
                };
                let (opened, mut events) = handle(None, &open, now)?;
                let (mut state, more) = handle(Some(&opened), &Command::StartDispatch, now)?;
                events.extend(more);
                if !first_offers.is_empty() {
                    let unit_ids = first_offers.iter().map(|o| o.unit_id.clone()).collect();
                    let (offered, more) =
                        handle(Some(&state), &Command::RecordOffers { unit_ids }, now)?;
                    events.extend(more);
                    state = offered;
                }

                let (outbox, queued) = next_of_kin_outbox(patient.as_ref(), id, "incident_created");
                if one_statement && tx.backend() == crate::persistence::Backend::Postgres {
                    let mut new: Vec<NewEvent> =
                        events.iter().map(|e| to_new_event(id, e)).collect();
                    new.extend(queued);
                    let incident = store::NewIncident {
                        incident: &state,
                        events: &new,
                        evidence: evidence_of(&events).collect(),
                        outbox: &outbox,
                        offers: &first_offers,
                    };
                    let version = store::create_pg(tx, &incident, now).await?;
                    return Ok::<_, IncidentError>((state, version));
                }
                let (version, ()) = tx
                    .try_both(
                        async |c| persist(c, &state, 0, &events, queued, now).await,
                        async |c| {
                            c.try_both(
                                async |c| fleet_store::insert_offers(c, &first_offers).await,
                                async |c| store::queue_notifications(c, &outbox, now).await,
                            )
                            .await?;
                            Ok(())
                        },
                    )
                    .await?;
                Ok::<_, IncidentError>((state, version))
            })
        })
        .await
}

impl Handler<OpenIncident> for IncidentDirectory {
    type Result = ResponseActFuture<Self, Result<Opened, IncidentError>>;

    fn handle(&mut self, msg: OpenIncident, ctx: &mut Self::Context) -> Self::Result {
        let req = msg.0;
        if let Some(patient) = &req.patient_id {
            // The patient already has an open incident: return it (with the new evidence).
            if let Some(&id) = self.open_by_patient.get(patient) {
                let addr = self.actor_for(id, ctx);
                let evidence = req.evidence.clone();
                return Box::pin(
                    async move {
                        let incident = match evidence {
                            Some(evidence) => addr
                                .send(Execute(Command::AddEvidence { evidence }))
                                .await
                                .map_err(|_| {
                                    StoreError::Unavailable("incident actor gone".into())
                                })??,
                            None => {
                                let inspection =
                                    addr.send(InspectIncident).await.map_err(|_| {
                                        StoreError::Unavailable("incident actor gone".into())
                                    })?;
                                inspection
                                    .state
                                    .and_then(|s| serde_json::from_value(s).ok())
                                    .ok_or(IncidentError::NotFound)?
                            }
                        };
                        Ok(Opened {
                            incident,
                            created: false,
                        })
                    }
                    .into_actor(self),
                );
            }
            // It is being created right now: wait for that one.
            if let Some(waiters) = self.creating.get_mut(patient) {
                let (tx, rx) = oneshot::channel();
                waiters.push((tx, req.evidence.clone()));
                return Box::pin(
                    async move {
                        match rx.await {
                            Ok(Ok(opened)) => Ok(opened),
                            Ok(Err(e)) => Err(IncidentError::Store(StoreError::Unavailable(e))),
                            Err(_) => Err(IncidentError::Store(StoreError::Unavailable(
                                "incident creation was abandoned".into(),
                            ))),
                        }
                    }
                    .into_actor(self),
                );
            }
            self.creating.insert(patient.clone(), Vec::new());
        }
        let db = self.db.clone();
        let patient = req.patient_id.clone();
        let writer = self.deps.writer.clone();
        let fleet = self.deps.fleet.clone();
        let settings = self.deps.dispatch.clone();
        let id = IncidentId::new_v7();
        // The first offer round is reserved before the incident is stored, so the incident,
        // its dispatch start and its first offers share one commit: one fsync on the path from
        // the reading to the crew's offer frame instead of two.
        let now = Utc::now();
        let reference = self.reserve_reference(now, ctx);
        let reader = self.reader(ctx);
        let prefetch_db = db.clone();
        let creation = async move {
            let started = std::time::Instant::now();
            // The patient and reference are fetched while the first round is reserved.
            let reserve = async {
                let first = match (fleet, req.location) {
                    (Some(fleet), Some(scene)) => {
                        let (reserved, expires_at) =
                            reserve_round(fleet, id, scene, req.priority, HashSet::new(), settings)
                                .await;
                        (!reserved.is_empty()).then_some((reserved, expires_at))
                    }
                    _ => None,
                };
                (first, started.elapsed())
            };
            let fetch = async {
                let prefetched =
                    prefetch(&prefetch_db, reader, req.patient_id.clone(), reference).await;
                (prefetched, started.elapsed())
            };
            let ((first, reserved), ((prefetched, reader_failed), fetched)) =
                futures_util::future::join(reserve, fetch).await;
            let now = Utc::now();
            let first = first.map(|(reserved, expires_at)| FirstRound {
                records: offer_records(id, &reserved, 1, now, expires_at),
                reserved,
                expires_at,
            });
            let records = first
                .as_ref()
                .map(|f| f.records.clone())
                .unwrap_or_default();
            let fetched = fetched.max(reserved);
            let created = match prefetched {
                Ok(prefetched) => create(writer, id, req, records, prefetched, now).await,
                Err(e) => Err(e),
            };
            if created.is_err()
                && let Some(first) = &first
            {
                release_all(&first.reserved);
            }
            // Reserving, then waiting for the prefetch (run alongside), then the write.
            let timing = (
                reserved,
                fetched.saturating_sub(reserved),
                started.elapsed().saturating_sub(fetched),
            );
            (created, first, timing, reader_failed)
        };
        Box::pin(creation.into_actor(self).then(
            move |(res, first, (reserve, prefetch, store), reader_failed), act, ctx| {
                if reader_failed {
                    // Opened again for the next incident.
                    act.reader.conn = None;
                }
                let waiters = patient
                    .as_ref()
                    .and_then(|p| act.creating.remove(p))
                    .unwrap_or_default();
                let result: Result<Opened, IncidentError> = match res {
                    Ok((incident, version)) => {
                        if let Some(p) = &incident.patient_id {
                            act.open_by_patient.insert(p.clone(), incident.id);
                        }
                        // The crews hear of the first round at once; the new actor tracks it.
                        if let Some(first) = &first {
                            send_offers(
                                &incident,
                                &first.records,
                                &first.reserved,
                                first.expires_at,
                            );
                        }
                        let actor =
                            IncidentActor::created(incident.clone(), version, act.deps.clone());
                        let addr = act.start_actor(actor, ctx);
                        // Dispatch starts as soon as the incident exists (notifications are queued).
                        match first {
                            Some(first) => addr.do_send(PublishFirstRound(first)),
                            None => addr.do_send(NextRound),
                        }
                        tracing::info!(
                            incident.id = %incident.id,
                            incident.reference = %incident.reference,
                            reserve_ms = reserve.as_secs_f64() * 1e3,
                            prefetch_wait_ms = prefetch.as_secs_f64() * 1e3,
                            store_ms = store.as_secs_f64() * 1e3,
                            "incident created"
                        );
                        Ok(Opened {
                            incident,
                            created: true,
                        })
                    }
                    Err(e) => Err(e),
                };
                let addr = result
                    .as_ref()
                    .ok()
                    .and_then(|o| act.incidents.get(&o.incident.id).cloned());
                let existing_after_race = match (&result, &patient) {
                    // Another node holds the patient's open incident (unique constraint).
                    (Err(IncidentError::Store(StoreError::Conflict(_))), Some(p)) => {
                        Some(p.clone())
                    }
                    _ => None,
                };
                let db2 = db.clone();
                async move {
                    let result = match (result, existing_after_race) {
                        (Err(_), Some(p)) => {
                            let found = db2
                                .run(move |mut conn| async move {
                                    store::open_for_patient(&mut conn, &p).await
                                })
                                .await?;
                            match found {
                                Some(id) => {
                                    let incident = db2
                                        .run(move |mut conn| async move {
                                            store::find(&mut conn, id).await
                                        })
                                        .await?
                                        .map(|(i, _)| i)
                                        .ok_or(IncidentError::NotFound)?;
                                    Ok(Opened {
                                        incident,
                                        created: false,
                                    })
                                }
                                None => Err(IncidentError::Conflict),
                            }
                        }
                        (r, _) => r,
                    };
                    for (waiter, evidence) in waiters {
                        let answer = match &result {
                            Ok(opened) => {
                                let mut incident = opened.incident.clone();
                                if let (Some(evidence), Some(addr)) = (evidence, &addr)
                                    && let Ok(Ok(updated)) =
                                        addr.send(Execute(Command::AddEvidence { evidence })).await
                                {
                                    incident = updated;
                                }
                                Ok(Opened {
                                    incident,
                                    created: false,
                                })
                            }
                            Err(e) => Err(e.to_string()),
                        };
                        let _ = waiter.send(answer);
                    }
                    result
                }
                .into_actor(act)
            },
        ))
    }
}

impl Handler<EmergencyDetected> for IncidentDirectory {
    type Result = ResponseActFuture<Self, Result<Option<IncidentId>, StoreError>>;

    fn handle(&mut self, msg: EmergencyDetected, ctx: &mut Self::Context) -> Self::Result {
        let request = OpenRequest {
            source: Source::Wearable,
            priority: Priority::Emergency,
            patient_id: Some(msg.patient_id),
            location: msg.location.map(|g| LatLng {
                lat: g.lat,
                lng: g.lng,
            }),
            description: Some(msg.reasons.join("; ")),
            evidence: Some(json!({
                "kind": "vitals",
                "device_id": msg.device_id,
                "detected_at": msg.detected_at,
                "reasons": msg.reasons,
                "readings": msg.evidence,
            })),
        };
        // Opened here, not through the mailbox: one hop fewer on the way to the offer.
        Box::pin(
            <Self as Handler<OpenIncident>>::handle(self, OpenIncident(request), ctx).map(
                |opened, _, _| match opened {
                    Ok(opened) => Ok(Some(opened.incident.id)),
                    Err(IncidentError::Store(e)) => Err(e),
                    Err(e) => {
                        tracing::warn!(error = %e, "emergency hand-off did not open an incident");
                        Ok(None)
                    }
                },
            ),
        )
    }
}

impl Handler<Route> for IncidentDirectory {
    type Result = ResponseFuture<Result<Incident, IncidentError>>;

    fn handle(&mut self, msg: Route, ctx: &mut Self::Context) -> Self::Result {
        // An incident not in memory (closed, or unknown) gets an actor that loads its stream;
        // an empty stream answers NotFound.
        let addr = self.actor_for(msg.id, ctx);
        Box::pin(async move {
            match addr.send(Execute(msg.command.clone())).await {
                Ok(result) => result,
                // The mailbox closed (the actor died for good): the directory re-creates it on
                // the next message; tell this caller to retry.
                Err(_) => Err(IncidentError::Store(StoreError::Unavailable(
                    "incident actor restarting; retry".into(),
                ))),
            }
        })
    }
}

impl Handler<IncidentEnded> for IncidentDirectory {
    type Result = ();

    fn handle(&mut self, msg: IncidentEnded, _: &mut Self::Context) {
        if let Some(p) = msg.patient_id
            && self.open_by_patient.get(&p) == Some(&msg.id)
        {
            self.open_by_patient.remove(&p);
        }
    }
}

impl Handler<Recover> for IncidentDirectory {
    type Result = ResponseActFuture<Self, Result<usize, StoreError>>;

    fn handle(&mut self, _: Recover, _: &mut Self::Context) -> Self::Result {
        let db = self.db.clone();
        Box::pin(
            async move {
                // Three queries for all of them (ids, events, offers), not three per incident.
                db.run(|mut conn| async move {
                    let ids = store::open_ids(&mut conn).await?;
                    let streams: Vec<String> = ids.iter().map(|id| stream_of(*id)).collect();
                    let mut events = events::read_streams(&mut conn, &streams).await?;
                    let mut offers = fleet_store::offers_for_many(&mut conn, &ids).await?;
                    Ok::<_, StoreError>(
                        ids.into_iter()
                            .zip(streams)
                            .map(|(id, stream)| {
                                (
                                    id,
                                    events.remove(&stream).unwrap_or_default(),
                                    offers.remove(&id).unwrap_or_default(),
                                )
                            })
                            .collect::<Vec<_>>(),
                    )
                })
                .await
            }
            .into_actor(self)
            .map(|res, act, ctx| {
                let open = res?;
                let count = open.len();
                let mut claims = HashMap::new();
                for (id, stored, offers) in open {
                    let actor = IncidentActor::resumed(id, &stored, offers, act.deps.clone());
                    if let Some(state) = &actor.state {
                        if let Some(p) = state.patient_id.clone() {
                            act.open_by_patient.insert(p, id);
                        }
                        if let (Some(unit), Some(claim)) =
                            (state.assigned_unit_id.clone(), unit_claim(state.status))
                        {
                            claims.insert(unit, (id, claim));
                        }
                    }
                    act.start_actor(actor, ctx);
                }
                tracing::info!(incidents.recovered = count, "open incidents recovered");
                Ok::<_, StoreError>((count, claims))
            })
            .then(|recovered, act, _| {
                let fleet = act.deps.fleet.clone();
                async move {
                    let (count, claims) = recovered?;
                    // Units whose last change was not stored before the stop are made to agree
                    // with the incidents (which store theirs before answering).
                    if let Some(fleet) = fleet {
                        let changed = fleet.send(ReconcileUnits(claims)).await.unwrap_or(0);
                        if changed > 0 {
                            tracing::warn!(units = changed, "units reconciled with open incidents");
                        }
                    }
                    Ok(count)
                }
                .into_actor(act)
            }),
        )
    }
}

impl Handler<LookupIncident> for IncidentDirectory {
    type Result = Option<Addr<IncidentActor>>;

    fn handle(&mut self, msg: LookupIncident, _: &mut Self::Context) -> Self::Result {
        self.incidents
            .get(&msg.0)
            .filter(|a| a.connected())
            .cloned()
    }
}

impl Handler<ListIncidents> for IncidentDirectory {
    type Result = ResponseFuture<(usize, Vec<IncidentInspection>)>;

    fn handle(&mut self, msg: ListIncidents, _: &mut Self::Context) -> Self::Result {
        let live: Vec<_> = self
            .incidents
            .values()
            .filter(|a| a.connected())
            .cloned()
            .collect();
        let total = live.len();
        Box::pin(async move {
            let page = join_all(
                live.into_iter()
                    .take(msg.limit)
                    .map(|a| async move { a.send(InspectIncident).await.ok() }),
            )
            .await;
            (total, page.into_iter().flatten().collect())
        })
    }
}

/// Forward a crew's accept to the incident's actor.
#[derive(Message, Debug)]
#[rtype(result = "Result<OfferOutcome, IncidentError>")]
pub struct ForwardAccept {
    /// Incident.
    pub incident_id: IncidentId,
    /// Offer.
    pub offer_id: OfferId,
    /// Unit.
    pub unit_id: UnitId,
}

impl Handler<ForwardAccept> for IncidentDirectory {
    type Result = ResponseFuture<Result<OfferOutcome, IncidentError>>;

    fn handle(&mut self, msg: ForwardAccept, ctx: &mut Self::Context) -> Self::Result {
        let addr = self.actor_for(msg.incident_id, ctx);
        Box::pin(async move {
            addr.send(AcceptOffer {
                offer_id: msg.offer_id,
                unit_id: msg.unit_id,
            })
            .await
            .map_err(|_| {
                IncidentError::Store(StoreError::Unavailable(
                    "incident actor restarting; retry".into(),
                ))
            })?
        })
    }
}

/// Forward a crew's decline to the incident's actor.
#[derive(Message, Debug)]
#[rtype(result = "Result<OfferOutcome, IncidentError>")]
pub struct ForwardDecline {
    /// Incident.
    pub incident_id: IncidentId,
    /// Offer.
    pub offer_id: OfferId,
    /// Unit.
    pub unit_id: UnitId,
    /// Why.
    pub reason: String,
}

impl Handler<ForwardDecline> for IncidentDirectory {
    type Result = ResponseFuture<Result<OfferOutcome, IncidentError>>;

    fn handle(&mut self, msg: ForwardDecline, ctx: &mut Self::Context) -> Self::Result {
        let addr = self.actor_for(msg.incident_id, ctx);
        Box::pin(async move {
            addr.send(DeclineOffer {
                offer_id: msg.offer_id,
                unit_id: msg.unit_id,
                reason: msg.reason,
            })
            .await
            .map_err(|_| {
                IncidentError::Store(StoreError::Unavailable(
                    "incident actor restarting; retry".into(),
                ))
            })?
        })
    }
}

/// Forward a dispatcher's manual assignment to the incident's actor.
#[derive(Message, Debug)]
#[rtype(result = "Result<Incident, IncidentError>")]
pub struct ForwardManualAssign {
    /// Incident.
    pub incident_id: IncidentId,
    /// Unit.
    pub unit_id: UnitId,
}

impl Handler<ForwardManualAssign> for IncidentDirectory {
    type Result = ResponseFuture<Result<Incident, IncidentError>>;

    fn handle(&mut self, msg: ForwardManualAssign, ctx: &mut Self::Context) -> Self::Result {
        let addr = self.actor_for(msg.incident_id, ctx);
        Box::pin(async move {
            addr.send(ManualAssign {
                unit_id: msg.unit_id,
            })
            .await
            .map_err(|_| {
                IncidentError::Store(StoreError::Unavailable(
                    "incident actor restarting; retry".into(),
                ))
            })?
        })
    }
}

impl Handler<UnitFree> for IncidentDirectory {
    type Result = ();

    fn handle(&mut self, msg: UnitFree, ctx: &mut Self::Context) {
        let addr = self.actor_for(msg.incident_id, ctx);
        addr.do_send(NextRound);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn references_come_from_blocks_in_order_and_waiters_are_served_first() {
        let mut blocks = ReferenceBlocks::default();
        assert_eq!(blocks.take(2026), None);
        assert!(blocks.wants_refill(2026));
        let (tx, mut rx) = oneshot::channel();
        blocks.waiting.push_back(tx);
        blocks.install(2026, 1, 3);
        assert_eq!(rx.try_recv().unwrap(), Some("INC-2026-000001".to_owned()));
        assert_eq!(blocks.take(2026).as_deref(), Some("INC-2026-000002"));
        // Low: the next block is reserved while this one still has a number, and follows it.
        assert!(blocks.wants_refill(2026));
        blocks.install(2026, 4, 5);
        assert!(!blocks.wants_refill(2026), "one block ahead at most");
        let taken: Vec<_> = (0..4).map(|_| blocks.take(2026)).collect();
        assert_eq!(
            taken,
            [
                Some("INC-2026-000003".to_owned()),
                Some("INC-2026-000004".to_owned()),
                Some("INC-2026-000005".to_owned()),
                None
            ]
        );
        // A new year starts from its own block.
        blocks.install(2026, 6, 200);
        assert_eq!(blocks.take(2027), None);
    }
}
