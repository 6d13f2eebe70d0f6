//! The [`IncidentDirectory`]: `patient → open incident`, routing to incident actors,
//! recovery at start and the messages that reach incidents from outside.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use tokio::sync::oneshot;

use super::references::{REFERENCE_BLOCK, ReferenceBlocks, ReferenceTicket};
use super::{
    Execute, IncidentActor, IncidentDeps, IncidentError, IncidentInspection, InspectIncident,
    NextRound, stream_of,
};
use crate::actors::error::ActorError;
use crate::actors::unit::{ReconcileUnits, UnitFree};
use crate::domain::dispatch::unit_claim;
use crate::domain::events::Evidence;
use crate::domain::geo::LatLng;
use crate::domain::ids::{DeviceId, IncidentId, PatientId};
use crate::domain::incident::{Command, Incident, Priority, Source};
use crate::domain::patients::Patient;
use crate::domain::vitals::{GeoPoint, Reading};
use crate::persistence::events::{self};
use crate::persistence::fleet::{self as fleet_store};
use crate::persistence::incidents::{self as store};
use crate::persistence::{Db, DbConn, StoreError};

/// A request to open an incident (or find the patient's open one).
#[derive(Clone, Debug)]
pub struct OpenRequest {
    /// What opened it: a wearable alarm, a patient request or a dispatcher.
    pub source: Source,
    /// Clinical priority: `emergency`, `urgent` or `non_urgent`.
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

pub(super) type Waiter = oneshot::Sender<Result<Opened, String>>;

/// The only place incidents are created.
pub struct IncidentDirectory {
    pub(super) db: Db,
    pub(super) deps: IncidentDeps,
    pub(super) incidents: HashMap<IncidentId, Addr<IncidentActor>>,
    pub(super) open_by_patient: HashMap<PatientId, IncidentId>,
    /// Patients whose incident is being created, with the requests waiting for it.
    pub(super) creating: HashMap<PatientId, Vec<(Waiter, Option<serde_json::Value>)>>,
    /// References reserved in advance (PostgreSQL).
    references: ReferenceBlocks,
    /// The directory's own connection for the reads a new incident waits for.
    pub(super) reader: Reader,
    /// Patients a new incident needs (next of kin, home location), so creating one reads
    /// nothing before its commit: filled by the patient API and by the first read.
    pub(super) patients: PatientCache,
}

/// How many patients the directory keeps at most (about 0.3 KiB each).
pub const PATIENT_CACHE_CAPACITY: usize = 100_000;

/// The directory's patients, bounded by [`PATIENT_CACHE_CAPACITY`]. Patients are created
/// once and not changed through the API, so an entry never goes stale; when full, an
/// arbitrary entry makes room (a miss only costs the read the cache saves).
pub(super) struct PatientCache {
    entries: HashMap<PatientId, Arc<Patient>>,
    capacity: usize,
}

impl Default for PatientCache {
    fn default() -> Self {
        Self::with_capacity(PATIENT_CACHE_CAPACITY)
    }
}

impl PatientCache {
    /// An empty cache holding at most `capacity` patients.
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The patient, if cached.
    pub(super) fn get(&self, id: &PatientId) -> Option<Arc<Patient>> {
        self.entries.get(id).cloned()
    }

    /// Caches `patient` (replacing an older copy).
    pub(super) fn put(&mut self, patient: Arc<Patient>) {
        if self.entries.len() >= self.capacity
            && !self.entries.contains_key(&patient.id)
            && let Some(evicted) = self.entries.keys().next().cloned()
        {
            self.entries.remove(&evicted);
        }
        self.entries.insert(patient.id.clone(), patient);
    }
}

/// Register a patient: stored, then cached, so new incidents for them read nothing before
/// their commit. `StoreError::Conflict` when the id is taken.
#[derive(Message, Debug)]
#[rtype(result = "Result<(), StoreError>")]
pub struct RegisterPatient(pub Patient);

impl Handler<RegisterPatient> for IncidentDirectory {
    type Result = ResponseActFuture<Self, Result<(), StoreError>>;

    fn handle(&mut self, msg: RegisterPatient, _: &mut Self::Context) -> Self::Result {
        let patient = Arc::new(msg.0);
        let (db, stored) = (self.db.clone(), patient.clone());
        let write = async move {
            db.run(move |mut conn| async move {
                crate::persistence::patients::insert_patient(&mut conn, &stored).await
            })
            .await
        };
        Box::pin(write.into_actor(self).map(move |written, act, _| {
            written?;
            act.patients.put(patient);
            Ok(())
        }))
    }
}

/// A connection of the directory's own (PostgreSQL) for the reads a new incident waits for
/// (its patient). It is opened on the directory's thread, so an answer is read where it is
/// used: two thread hand-offs fewer than a pooled connection, whose I/O runs on the database
/// I/O thread (measured on the 2-core machine: a hand-off between threads costs about 0.1 ms).
/// Its statements are pipelined: concurrent creations share it. A read that fails on it is
/// retried on the pool, and the connection is opened again.
#[derive(Default)]
pub(super) struct Reader {
    /// Where it comes from (`None`: no reader, reads use the pool).
    db: Option<Db>,
    /// The open connection, shared for pipelined reads.
    pub(super) conn: Option<DbConn>,
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
            patients: PatientCache::default(),
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
    pub(super) fn reader(&mut self, ctx: &mut Context<Self>) -> Option<DbConn> {
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

    pub(super) fn start_actor(
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
    pub(super) fn actor_for(
        &mut self,
        id: IncidentId,
        ctx: &mut Context<Self>,
    ) -> Addr<IncidentActor> {
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

impl IncidentDirectory {
    /// A new incident's reference on PostgreSQL (`None` on SQLite, which allocates it inside
    /// the incident's own write), reserving the next block when this one runs low.
    pub(super) fn reserve_reference(
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

impl Handler<EmergencyDetected> for IncidentDirectory {
    type Result = ResponseActFuture<Self, Result<Option<IncidentId>, HandoffError>>;

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
            evidence: Some(
                Evidence::Vitals {
                    device_id: msg.device_id,
                    detected_at: msg.detected_at,
                    reasons: msg.reasons,
                    readings: msg.evidence,
                }
                .to_value(),
            ),
        };
        // Opened here, not through the mailbox: one hop fewer on the way to the offer.
        Box::pin(
            <Self as Handler<OpenIncident>>::handle(self, OpenIncident(request), ctx).map(
                |opened, _, _| match opened {
                    Ok(opened) => Ok(Some(opened.incident.id)),
                    Err(IncidentError::Store(e)) => Err(HandoffError::Store(e)),
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
                Err(e) => Err(ActorError::mailbox("incident")(e).into()),
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

/// Deliver `message` to incident `incident_id`'s actor, starting it from the store if it is
/// not live: the one way a crew's accept or decline, or a dispatcher's assignment, reaches an
/// incident by id (and the seam where a cluster forwards to the incident's owner).
#[derive(Debug)]
pub struct ToIncident<M> {
    /// The incident.
    pub incident_id: IncidentId,
    /// What it is asked.
    pub message: M,
}

impl<M, T> Message for ToIncident<M>
where
    M: Message<Result = Result<T, IncidentError>> + Send + 'static,
    T: Send + 'static,
{
    type Result = Result<T, IncidentError>;
}

impl<M, T> Handler<ToIncident<M>> for IncidentDirectory
where
    M: Message<Result = Result<T, IncidentError>> + Send + 'static,
    T: Send + 'static,
    IncidentActor: Handler<M>,
{
    type Result = ResponseFuture<Result<T, IncidentError>>;

    fn handle(&mut self, msg: ToIncident<M>, ctx: &mut Self::Context) -> Self::Result {
        let addr = self.actor_for(msg.incident_id, ctx);
        Box::pin(async move {
            addr.send(msg.message)
                .await
                .map_err(ActorError::mailbox("incident"))?
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

/// Why an emergency could not be handed to the incidents. The reading behind it is refused
/// (503) and sent again by its gateway; the repeat is recognised.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The incidents could not store it.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The incidents could not be reached: their directory is gone, or on a cluster no node
    /// holding dispatch answered in time.
    #[error("the incidents cannot be reached: {0}")]
    Unreachable(String),
}

/// The device actors' own answers are in the store's terms: a hand-off that could not be made
/// leaves the device's change unfinished, to be retried like any unavailable store.
impl From<HandoffError> for StoreError {
    fn from(e: HandoffError) -> Self {
        match e {
            HandoffError::Store(e) => e,
            HandoffError::Unreachable(why) => StoreError::Unavailable(why),
        }
    }
}

/// A wearer's readings are `emergency`: an incident is needed (or the open one gets evidence).
#[derive(Message, Clone, Debug, serde::Serialize, serde::Deserialize)]
#[rtype(result = "Result<Option<IncidentId>, HandoffError>")]
pub struct EmergencyDetected {
    /// The wearer.
    pub patient_id: PatientId,
    /// The device that reported it.
    pub device_id: DeviceId,
    /// Where, from the reading (the patient's home is the fallback downstream).
    pub location: Option<GeoPoint>,
    /// Why, for people.
    pub reasons: Vec<String>,
    /// The readings behind the verdict, newest last.
    pub evidence: Vec<Reading>,
    /// When the emergency reading was measured.
    pub detected_at: DateTime<Utc>,
    /// Whether this reading turned the device's status to emergency (false: still emergency).
    pub onset: bool,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn patient(id: &str) -> Arc<Patient> {
        Arc::new(Patient {
            id: PatientId::from(id),
            name: "N".to_owned(),
            date_of_birth: None,
            home_location: None,
            insurance: None,
            next_of_kin: Vec::new(),
            created_at: Utc::now(),
        })
    }

    #[test]
    fn the_patient_cache_is_bounded_and_keeps_the_newest() {
        let mut cache = PatientCache::with_capacity(2);
        cache.put(patient("a"));
        cache.put(patient("b"));
        cache.put(patient("c"));
        let held = ["a", "b", "c"]
            .iter()
            .filter(|id| cache.get(&PatientId::from(**id)).is_some())
            .count();
        assert_eq!(held, 2);
        assert!(
            cache.get(&PatientId::from("c")).is_some(),
            "the newest stays"
        );
        // Replacing an entry never evicts another.
        cache.put(patient("c"));
        let held = ["a", "b", "c"]
            .iter()
            .filter(|id| cache.get(&PatientId::from(**id)).is_some())
            .count();
        assert_eq!(held, 2);
    }
}
