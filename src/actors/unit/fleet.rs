//! The [`Fleet`] hub: a spatial index of units and the hospitals. It ranks candidates for a
//! scene, starts (and restarts) unit actors, keeps incidents waiting for a free unit, and
//! finds destination hospitals.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use futures_util::future::join_all;

use super::{ACTOR_TIMEOUT, AmbulanceActor, Reconcile, Reserve, UnitView};
use crate::actors::pusher::PushOffer;
use crate::domain::dispatch::{
    Candidate, CandidateQuery, FleetIndex, HospitalSnapshot, UnitClaim, UnitSnapshot, UnitStatus,
    choose_hospital, rank, shortlist,
};
use crate::domain::geo::LatLng;
use crate::domain::ids::{HospitalId, IncidentId, OfferId, UnitId};
use crate::domain::incident::Priority;
use crate::integrations::routing::RoutingWithFallback;
use crate::persistence::fleet::{self as store, HospitalRecord, UnitRecord};
use crate::persistence::group::GroupCommit;
use crate::persistence::{Db, StoreError};

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
    /// The offers this fleet reserved units for: offer → (unit, incident, lapses at). A hint
    /// that routes a crew's accept to its incident without asking the unit first
    /// ([`AcceptRoute`]); the incident and the unit still decide. Lapsed ones are dropped by
    /// the sweep.
    offered: HashMap<OfferId, (UnitId, IncidentId, DateTime<Utc>)>,
    /// Where units send offers no crew session hears (push to phones); `None`: push is off.
    pusher: Option<Recipient<PushOffer>>,
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
            offered: HashMap::new(),
            pusher: None,
        }
    }

    /// Units push offers their crews' sessions would miss to `pusher` (set before start).
    pub fn with_pusher(mut self, pusher: Option<Recipient<PushOffer>>) -> Self {
        self.pusher = pusher;
        self
    }

    fn start_unit(
        &mut self,
        record: UnitRecord,
        restarts: u32,
        ctx: &mut Context<Self>,
    ) -> Addr<AmbulanceActor> {
        self.start_unit_with_view(record, restarts, ctx).0
    }

    /// [`Fleet::start_unit`], answering the new unit's view as well.
    fn start_unit_with_view(
        &mut self,
        record: UnitRecord,
        restarts: u32,
        ctx: &mut Context<Self>,
    ) -> (Addr<AmbulanceActor>, UnitView) {
        let mut actor = AmbulanceActor::new(record, self.writer.clone(), ctx.address(), restarts);
        actor.pusher = self.pusher.clone();
        let view = actor.view();
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
        (addr, view)
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
        let now = Utc::now();
        self.offered.retain(|_, (_, _, lapses)| *lapses > now);
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

/// Register a new unit: stored, then its actor started. Answers the unit as the API shows
/// it; `StoreError::Conflict` when the id is taken.
#[derive(Message, Debug)]
#[rtype(result = "Result<UnitView, StoreError>")]
pub struct RegisterUnit(pub UnitRecord);

impl Handler<RegisterUnit> for Fleet {
    type Result = ResponseActFuture<Self, Result<UnitView, StoreError>>;

    fn handle(&mut self, msg: RegisterUnit, _: &mut Self::Context) -> Self::Result {
        let (db, record) = (self.db.clone(), msg.0);
        let stored = record.clone();
        let write = async move {
            let now = stored.fix_at;
            db.run(move |mut conn| async move { store::insert_unit(&mut conn, &stored, now).await })
                .await
        };
        Box::pin(write.into_actor(self).map(move |written, act, ctx| {
            written?;
            Ok(act.start_unit_with_view(record, 0, ctx).1)
        }))
    }
}

/// Register a new hospital: stored, then offered as a destination. `StoreError::Conflict`
/// when the id is taken.
#[derive(Message, Debug)]
#[rtype(result = "Result<(), StoreError>")]
pub struct RegisterHospital(pub HospitalRecord);

impl Handler<RegisterHospital> for Fleet {
    type Result = ResponseActFuture<Self, Result<(), StoreError>>;

    fn handle(&mut self, msg: RegisterHospital, _: &mut Self::Context) -> Self::Result {
        let (db, record) = (self.db.clone(), msg.0);
        let stored = record.clone();
        let write = async move {
            db.run(move |mut conn| async move {
                store::insert_hospital(&mut conn, &stored, Utc::now()).await
            })
            .await
        };
        Box::pin(write.into_actor(self).map(move |written, act, _| {
            written?;
            act.add_hospital(record);
            Ok(())
        }))
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

/// Rank the units for a scene and reserve the best `k` that accept, in one message: the
/// incident gets its round back without asking for each unit's address and reservation in
/// turn. Units are asked concurrently; a unit that refuses (busy, or its actor stopped: the
/// sweep starts it again) is replaced by the next in rank. Answers the reserved units in
/// rank order with their offer ids.
#[derive(Message, Debug)]
#[rtype(result = "Vec<ReservedUnit>")]
pub struct ReserveRound {
    /// The incident offered.
    pub incident_id: IncidentId,
    /// The scene.
    pub scene: LatLng,
    /// Clinical priority: `emergency`, `urgent` or `non_urgent`.
    pub priority: Priority,
    /// Units that declined or let an offer lapse.
    pub exclude: HashSet<UnitId>,
    /// How many units to reserve.
    pub k: usize,
    /// When the offers lapse.
    pub expires_at: DateTime<Utc>,
}

/// A unit reserved for an offer round.
#[derive(Debug, Clone)]
pub struct ReservedUnit {
    /// The offer it is reserved under.
    pub offer_id: OfferId,
    /// Why it was chosen (rank, ETA).
    pub candidate: Candidate,
    /// Its actor.
    pub addr: Addr<AmbulanceActor>,
}

impl Handler<ReserveRound> for Fleet {
    type Result = ResponseActFuture<Self, Vec<ReservedUnit>>;

    fn handle(&mut self, msg: ReserveRound, _: &mut Self::Context) -> Self::Result {
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
        let mut positions = Vec::with_capacity(shortlisted.len());
        let mut addrs = HashMap::with_capacity(shortlisted.len());
        for c in &shortlisted {
            if let Some(e) = self.units.get(&c.unit_id) {
                positions.push(e.snapshot.position);
                if e.addr.connected() {
                    addrs.insert(c.unit_id.clone(), e.addr.clone());
                }
            }
        }
        let ReserveRound {
            incident_id,
            scene,
            priority,
            k,
            expires_at,
            ..
        } = msg;
        let round = async move {
            if shortlisted.is_empty() || k == 0 {
                return Vec::new();
            }
            let etas = routing.etas(&positions, &scene).await;
            let mut ranked = rank(shortlisted, Some(&etas), priority)
                .into_iter()
                .filter_map(|c| addrs.get(&c.unit_id).cloned().map(|addr| (c, addr)));
            let mut reserved = Vec::with_capacity(k);
            while reserved.len() < k {
                let batch: Vec<_> = ranked.by_ref().take(k - reserved.len()).collect();
                if batch.is_empty() {
                    break;
                }
                let asks = batch.into_iter().map(|(candidate, addr)| async move {
                    let offer_id = OfferId::new_v7();
                    let ask = addr.send(Reserve {
                        offer_id,
                        incident_id,
                        expires_at,
                    });
                    match ask.timeout(ACTOR_TIMEOUT).await {
                        Ok(Ok(())) => Some(ReservedUnit {
                            offer_id,
                            candidate,
                            addr,
                        }),
                        _ => None,
                    }
                });
                reserved.extend(join_all(asks).await.into_iter().flatten());
            }
            reserved
        };
        Box::pin(round.into_actor(self).map(move |reserved, act, _| {
            for unit in &reserved {
                act.offered.insert(
                    unit.offer_id,
                    (unit.candidate.unit_id.clone(), incident_id, expires_at),
                );
            }
            reserved
        }))
    }
}

/// Where a crew's accept goes: the unit's actor, and the incident its offer is for when this
/// fleet reserved the unit for that offer (`None`: ask the unit, e.g. after a restart).
#[derive(Message, Debug)]
#[rtype(result = "Option<(Addr<AmbulanceActor>, Option<IncidentId>)>")]
pub struct AcceptRoute {
    /// The crew's unit.
    pub unit_id: UnitId,
    /// The offer accepted.
    pub offer_id: OfferId,
}

impl Handler<AcceptRoute> for Fleet {
    type Result = ResponseActFuture<Self, Option<(Addr<AmbulanceActor>, Option<IncidentId>)>>;

    fn handle(&mut self, msg: AcceptRoute, ctx: &mut Self::Context) -> Self::Result {
        let incident = self
            .offered
            .get(&msg.offer_id)
            .filter(|(unit, _, _)| *unit == msg.unit_id)
            .map(|(_, incident, _)| *incident);
        Box::pin(
            <Self as Handler<UnitAddr>>::handle(self, UnitAddr(msg.unit_id), ctx)
                .map(move |addr, _, _| addr.map(|addr| (addr, incident))),
        )
    }
}

/// An incident waits for any unit (escalated); it is told when one frees up.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct WaitForUnit {
    /// The incident this concerns.
    pub incident_id: IncidentId,
    /// Clinical priority: `emergency`, `urgent` or `non_urgent`.
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

/// Hospitals as the API shows them, by id.
#[derive(Message, Debug)]
#[rtype(result = "Vec<HospitalRecord>")]
pub struct ListHospitals;

impl Handler<ListHospitals> for Fleet {
    type Result = MessageResult<ListHospitals>;

    fn handle(&mut self, _: ListHospitals, _: &mut Self::Context) -> Self::Result {
        let mut list: Vec<_> = self
            .hospitals
            .values()
            .map(|e| HospitalRecord {
                id: e.snapshot.id.clone(),
                name: e.name.clone(),
                location: e.snapshot.location,
                capabilities: e.snapshot.capabilities.clone(),
                capacity: e.snapshot.capacity,
                occupied: e.snapshot.occupied,
            })
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
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
