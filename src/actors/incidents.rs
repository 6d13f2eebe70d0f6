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

use std::collections::HashMap;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use serde::Serialize;
use serde_json::json;
use tokio::sync::oneshot;

use super::handoff::EmergencyDetected;
use crate::domain::events::{ExpectedVersion, NewEvent, RecordedEvent};
use crate::domain::geo::LatLng;
use crate::domain::ids::{IncidentId, PatientId};
use crate::domain::incident::{
    Command, Incident, IncidentEvent, Priority, Rejection, Source, handle, replay,
};
use crate::persistence::events::{self, AppendError};
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
    let expected_version = if expected == 0 {
        ExpectedVersion::NoStream
    } else {
        ExpectedVersion::Exact(expected)
    };
    let recorded = events::append(conn, &stream_of(id), expected_version, &new, now).await?;
    let version = recorded.last().map_or(expected, |e| e.version);
    if expected == 0 {
        store::insert(conn, incident, version, now).await?;
    } else {
        store::update(conn, incident, version, now).await?;
    }
    for event in events {
        if let IncidentEvent::EvidenceAdded { evidence } = event {
            store::add_evidence(conn, id, now, evidence).await?;
        }
    }
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
    /// Pending timers (none until dispatch arrives).
    pub timers: Vec<serde_json::Value>,
}

/// The actor of one incident.
pub struct IncidentActor {
    id: IncidentId,
    db: Db,
    directory: Option<Recipient<IncidentEnded>>,
    state: Option<Incident>,
    version: i64,
    loaded: bool,
    restarts: u32,
    messages: u64,
    last_message_at: Option<DateTime<Utc>>,
}

impl IncidentActor {
    /// An actor that loads its state from the event store when started.
    pub fn recover(id: IncidentId, db: Db, directory: Option<Recipient<IncidentEnded>>) -> Self {
        Self {
            id,
            db,
            directory,
            state: None,
            version: 0,
            loaded: false,
            restarts: 0,
            messages: 0,
            last_message_at: None,
        }
    }

    /// An actor for an incident just created (its state is known; nothing to load).
    pub fn created(
        incident: Incident,
        version: i64,
        db: Db,
        directory: Option<Recipient<IncidentEnded>>,
    ) -> Self {
        Self {
            id: incident.id,
            state: Some(incident),
            version,
            loaded: true,
            ..Self::recover(IncidentId(uuid::Uuid::nil()), db, directory)
        }
    }

    fn load(&mut self, ctx: &mut Context<Self>) {
        let db = self.db.clone();
        let stream = stream_of(self.id);
        ctx.wait(
            async move {
                db.run(move |mut conn| async move { events::read_stream(&mut conn, &stream).await })
                    .await
            }
            .into_actor(self)
            .map(|res, act, _| match res {
                Ok(stored) => {
                    let (state, version) = rebuild(&stored);
                    act.state = state;
                    act.version = version;
                    act.loaded = true;
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
        let db = self.db.clone();
        let expected = self.version;
        let to_store = next.clone();
        let work = async move {
            db.run(move |mut conn| async move {
                conn.write_transaction(async |tx| {
                    persist(tx, &to_store, expected, &events, Vec::new(), now).await
                })
                .await
            })
            .await
        };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(move |res, act, ctx| {
            match res {
                Ok(version) => {
                    act.version = version;
                    act.state = Some(next.clone());
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
    incidents: HashMap<IncidentId, Addr<IncidentActor>>,
    open_by_patient: HashMap<PatientId, IncidentId>,
    /// Patients whose incident is being created, with the requests waiting for it.
    creating: HashMap<PatientId, Vec<(Waiter, Option<serde_json::Value>)>>,
}

impl IncidentDirectory {
    /// An empty directory; send [`Recover`] to load open incidents.
    pub fn new(db: Db) -> Self {
        Self {
            db,
            incidents: HashMap::new(),
            open_by_patient: HashMap::new(),
            creating: HashMap::new(),
        }
    }

    fn start_actor(
        &mut self,
        actor: IncidentActor,
        ctx: &mut Context<Self>,
    ) -> Addr<IncidentActor> {
        let id = actor.id;
        let mut actor = Some(actor);
        let me = ctx.address().recipient();
        let db = self.db.clone();
        let addr = Supervisor::start(move |_| {
            actor
                .take()
                .unwrap_or_else(|| IncidentActor::recover(id, db, Some(me)))
        });
        self.incidents.insert(id, addr.clone());
        addr
    }

    /// The live actor of `id`, re-created from the store when missing or dead.
    fn actor_for(&mut self, id: IncidentId, ctx: &mut Context<Self>) -> Addr<IncidentActor> {
        match self.incidents.get(&id) {
            Some(addr) if addr.connected() => addr.clone(),
            _ => {
                let me = ctx.address().recipient();
                self.start_actor(IncidentActor::recover(id, self.db.clone(), Some(me)), ctx)
            }
        }
    }
}

impl Actor for IncidentDirectory {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1024);
    }
}

/// Creates an incident in one transaction: reference, events (created, evidence, dispatch
/// started, next-of-kin notifications queued) and projections.
async fn create(db: Db, req: OpenRequest) -> Result<(Incident, i64), IncidentError> {
    db.run(move |mut conn| async move {
        conn.write_transaction(async |tx| {
            let now = Utc::now();
            let patient = match &req.patient_id {
                Some(pid) => Some(
                    patients::find_patient(tx, pid)
                        .await?
                        .ok_or(IncidentError::UnknownPatient)?,
                ),
                None => None,
            };
            let location = req
                .location
                .or_else(|| patient.as_ref().and_then(|p| p.home_location))
                .ok_or(IncidentError::NoLocation)?;
            let reference = store::next_reference(tx, now).await?;
            let id = IncidentId::new_v7();
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
            let (dispatching, more) = handle(Some(&opened), &Command::StartDispatch, now)?;
            events.extend(more);

            let mut outbox = Vec::new();
            let mut queued = Vec::new();
            for kin in patient.iter().flat_map(|p| p.next_of_kin.iter()) {
                let channels = [("sms", kin.phone.as_ref()), ("email", kin.email.as_ref())];
                for (channel, address) in channels {
                    let Some(address) = address else { continue };
                    let notification_id = uuid::Uuid::now_v7().to_string();
                    let key = format!("{id}:{channel}:{address}:incident_created");
                    let mut event = NewEvent::new(
                        "notification.queued",
                        json!({
                            "notification_id": notification_id,
                            "incident_id": id,
                            "recipient": kin.name,
                            "channel": channel,
                            "template": "incident_created",
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
                        template: "incident_created",
                        idempotency_key: key,
                    });
                }
            }
            let version = persist(tx, &dispatching, 0, &events, queued, now).await?;
            store::queue_notifications(tx, &outbox, now).await?;
            Ok::<_, IncidentError>((dispatching, version))
        })
        .await
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
        Box::pin(create(db.clone(), req).into_actor(self).then(move |res, act, ctx| {
            let waiters = patient
                .as_ref()
                .and_then(|p| act.creating.remove(p))
                .unwrap_or_default();
            let result: Result<Opened, IncidentError> = match res {
                Ok((incident, version)) => {
                    if let Some(p) = &incident.patient_id {
                        act.open_by_patient.insert(p.clone(), incident.id);
                    }
                    let me = ctx.address().recipient();
                    let actor = IncidentActor::created(incident.clone(), version, db.clone(), Some(me));
                    act.start_actor(actor, ctx);
                    tracing::info!(incident.id = %incident.id, incident.reference = %incident.reference, "incident created");
                    Ok(Opened { incident, created: true })
                }
                Err(e) => Err(e),
            };
            let addr = result.as_ref().ok().and_then(|o| act.incidents.get(&o.incident.id).cloned());
            let existing_after_race = match (&result, &patient) {
                // Another node holds the patient's open incident (unique constraint).
                (Err(IncidentError::Store(StoreError::Conflict(_))), Some(p)) => Some(p.clone()),
                _ => None,
            };
            let db2 = db.clone();
            async move {
                let result = match (result, existing_after_race) {
                    (Err(_), Some(p)) => {
                        let found = db2
                            .run(move |mut conn| async move { store::open_for_patient(&mut conn, &p).await })
                            .await?;
                        match found {
                            Some(id) => {
                                let incident = db2
                                    .run(move |mut conn| async move { store::find(&mut conn, id).await })
                                    .await?
                                    .map(|(i, _)| i)
                                    .ok_or(IncidentError::NotFound)?;
                                Ok(Opened { incident, created: false })
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
                            Ok(Opened { incident, created: false })
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    let _ = waiter.send(answer);
                }
                result
            }
            .into_actor(act)
        }))
    }
}

impl Handler<EmergencyDetected> for IncidentDirectory {
    type Result = ResponseFuture<Result<Option<IncidentId>, StoreError>>;

    fn handle(&mut self, msg: EmergencyDetected, ctx: &mut Self::Context) -> Self::Result {
        let addr = ctx.address();
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
        Box::pin(async move {
            match addr.send(OpenIncident(request)).await {
                Ok(Ok(opened)) => Ok(Some(opened.incident.id)),
                Ok(Err(IncidentError::Store(e))) => Err(e),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "emergency hand-off did not open an incident");
                    Ok(None)
                }
                Err(e) => Err(StoreError::Unavailable(format!("incident directory: {e}"))),
            }
        })
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
                db.run(|mut conn| async move {
                    let ids = store::open_ids(&mut conn).await?;
                    let mut open = Vec::with_capacity(ids.len());
                    for id in ids {
                        if let Some((incident, _)) = store::find(&mut conn, id).await? {
                            open.push((id, incident.patient_id));
                        }
                    }
                    Ok::<_, StoreError>(open)
                })
                .await
            }
            .into_actor(self)
            .map(|res, act, ctx| {
                let open = res?;
                for (id, patient) in &open {
                    if let Some(p) = patient {
                        act.open_by_patient.insert(p.clone(), *id);
                    }
                    let me = ctx.address().recipient();
                    act.start_actor(IncidentActor::recover(*id, act.db.clone(), Some(me)), ctx);
                }
                tracing::info!(incidents.recovered = open.len(), "open incidents recovered");
                Ok(open.len())
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
