//! Creating an incident: the directory's [`OpenIncident`] handler, the patient prefetch,
//! the first offer round reserved before the commit, and human references from blocks.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use tokio::sync::oneshot;

use super::directory::Waiter;
use super::references::ReferenceTicket;
use super::{
    Execute, IncidentActor, IncidentDirectory, IncidentError, InspectIncident, NextRound,
    OpenIncident, OpenRequest, Opened, PublishFirstRound, Reserved, evidence_of,
    next_of_kin_outbox, offer_records, persist, release_all, reserve_round, send_offers,
    to_new_event,
};
use crate::actors::error::ActorError;
use crate::domain::events::NewEvent;
use crate::domain::ids::{IncidentId, PatientId};
use crate::domain::incident::{Command, Incident, IncidentEvent, handle};
use crate::domain::patients::Patient;
use crate::persistence::fleet::{self as fleet_store, OfferRecord};
use crate::persistence::group::GroupCommit;
use crate::persistence::incidents::{self as store};
use crate::persistence::{Db, DbConn, StoreError, patients};

/// Creates an incident in one transaction: reference, events (created, evidence, dispatch
/// started, next-of-kin notifications queued) and projections.
/// A first offer round reserved before the incident is stored.
pub(super) struct FirstRound {
    pub(super) reserved: Reserved,
    pub(super) records: Vec<OfferRecord>,
    pub(super) expires_at: DateTime<Utc>,
}

/// What a new incident needs before its write: the patient and the reference. On PostgreSQL
/// both are ready before the write, so the writer's batch does not wait a round trip for them:
/// the patient is read on a pooled connection while the first offer round is reserved, and the
/// reference comes from a block reserved in advance ([`ReferenceBlocks`]). On SQLite, whose
/// writes all queue for one lock, both are read and allocated inside the write itself (`None`
/// here).
#[derive(Clone)]
struct Prefetched {
    patient: Option<Arc<Patient>>,
    reference: String,
}

/// The patient and reference of a new incident (see [`Prefetched`]); `None` on SQLite. The
/// patient is read on `reader` when there is one, else (or if that fails) on the pool; the
/// flag says the reader failed (the directory then opens another).
async fn prefetch(
    db: &Db,
    reader: Option<DbConn>,
    patient_id: Option<PatientId>,
    cached: Option<Arc<Patient>>,
    reference: Option<ReferenceTicket>,
) -> (Result<Option<Prefetched>, IncidentError>, bool) {
    let Some(reference) = reference else {
        return (Ok(None), false);
    };
    let reference =
        async {
            match reference {
                ReferenceTicket::Ready(reference) => Ok(reference),
                ReferenceTicket::Waiting(answer) => answer.await.ok().flatten().ok_or_else(|| {
                    IncidentError::Actor(ActorError::Abandoned("incident directory"))
                }),
            }
        };
    let patient = async {
        if cached.is_some() || patient_id.is_none() {
            return (Ok(cached), false);
        }
        let mut reader_failed = false;
        if let Some(mut conn) = reader {
            match find_patient(&mut conn, patient_id.as_ref())
                .await
                .map(|p| p.map(Arc::new))
            {
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
            .await
            .map(|p| p.map(Arc::new));
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

/// The new incident's state and events: opened, dispatch started and, when a first round was
/// reserved, its offers recorded.
fn opened_state(
    open: &Command,
    first_offers: &[OfferRecord],
    now: DateTime<Utc>,
) -> Result<(Incident, Vec<IncidentEvent>), IncidentError> {
    let (opened, mut events) = handle(None, open, now)?;
    let (mut state, more) = handle(Some(&opened), &Command::StartDispatch, now)?;
    events.extend(more);
    if !first_offers.is_empty() {
        let unit_ids = first_offers.iter().map(|o| o.unit_id.clone()).collect();
        let (offered, more) = handle(Some(&state), &Command::RecordOffers { unit_ids }, now)?;
        events.extend(more);
        state = offered;
    }
    Ok((state, events))
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
    sns_topic: Option<std::sync::Arc<str>>,
) -> Result<(Incident, i64), IncidentError> {
    crate::fault::crash_point("incident.before_create");
    let one_statement = prefetched.is_some();
    writer
        .write_as(one_statement, move |tx| {
            // The writer may run this twice (see `GroupCommit::write`).
            let (req, first_offers, prefetched, sns_topic) = (
                req.clone(),
                first_offers.clone(),
                prefetched.clone(),
                sns_topic.clone(),
            );
            Box::pin(async move {
                let (patient, reference) = match prefetched {
                    Some(Prefetched { patient, reference }) => (patient, reference),
                    None => (
                        find_patient(tx, req.patient_id.as_ref())
                            .await?
                            .map(Arc::new),
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
                let (state, events) = opened_state(&open, &first_offers, now)?;
                let (outbox, queued) = next_of_kin_outbox(
                    patient.as_deref(),
                    id,
                    "incident_created",
                    sns_topic.as_deref(),
                );
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
                        async |c| {
                            let topic = sns_topic.as_deref();
                            persist(c, &state, 0, &events, queued, now, topic).await
                        },
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

impl IncidentDirectory {
    /// The patient's open incident (which gets `evidence`, if any), or the one being created
    /// for them right now; `None` when they have neither and a new one is to be opened.
    fn join_open(
        &mut self,
        patient: &PatientId,
        evidence: Option<&serde_json::Value>,
        ctx: &mut Context<Self>,
    ) -> Option<ResponseActFuture<Self, Result<Opened, IncidentError>>> {
        // The patient already has an open incident: return it (with the new evidence).
        if let Some(&id) = self.open_by_patient.get(patient) {
            let addr = self.actor_for(id, ctx);
            let evidence = evidence.cloned();
            return Some(Box::pin(
                async move {
                    let incident = match evidence {
                        Some(evidence) => addr
                            .send(Execute(Command::AddEvidence { evidence }))
                            .await
                            .map_err(ActorError::mailbox("incident"))??,
                        None => {
                            let inspection = addr
                                .send(InspectIncident)
                                .await
                                .map_err(ActorError::mailbox("incident"))?;
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
            ));
        }
        // It is being created right now: wait for that one.
        if let Some(waiters) = self.creating.get_mut(patient) {
            let (tx, rx) = oneshot::channel();
            waiters.push((tx, evidence.cloned()));
            return Some(Box::pin(
                async move {
                    match rx.await {
                        Ok(Ok(opened)) => Ok(opened),
                        Ok(Err(e)) => Err(IncidentError::Store(StoreError::Unavailable(e))),
                        Err(_) => Err(IncidentError::Actor(ActorError::Abandoned(
                            "incident directory",
                        ))),
                    }
                }
                .into_actor(self),
            ));
        }
        None
    }
}

impl Handler<OpenIncident> for IncidentDirectory {
    type Result = ResponseActFuture<Self, Result<Opened, IncidentError>>;

    // Long on purpose: the path from a detection to the first offer, read top to bottom
    // (reserve a round alongside the prefetch, one commit, settle); one piece, no extra hops.
    fn handle(&mut self, msg: OpenIncident, ctx: &mut Self::Context) -> Self::Result {
        let req = msg.0;
        if let Some(patient) = &req.patient_id {
            if let Some(joined) = self.join_open(patient, req.evidence.as_ref(), ctx) {
                return joined;
            }
            self.creating.insert(patient.clone(), Vec::new());
        }
        let db = self.db.clone();
        let patient = req.patient_id.clone();
        let writer = self.deps.writer.clone();
        let sns_topic = self.deps.sns_topic.clone();
        let fleet = self.deps.fleet.clone();
        let settings = self.deps.dispatch.clone();
        let id = IncidentId::new_v7();
        // The first offer round is reserved before the incident is stored, so the incident,
        // its dispatch start and its first offers share one commit: one fsync on the path from
        // the reading to the crew's offer frame instead of two.
        let now = Utc::now();
        let reference = self.reserve_reference(now, ctx);
        let cached = req.patient_id.as_ref().and_then(|p| self.patients.get(p));
        // A cached patient needs no read, so no reader connection either.
        let reader = if cached.is_some() {
            None
        } else {
            self.reader(ctx)
        };
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
                let prefetched = prefetch(
                    &prefetch_db,
                    reader,
                    req.patient_id.clone(),
                    cached,
                    reference,
                )
                .await;
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
            let read_patient = prefetched
                .as_ref()
                .ok()
                .and_then(|p| p.as_ref())
                .and_then(|p| p.patient.clone());
            let created = match prefetched {
                Ok(prefetched) => {
                    create(writer, id, req, records, prefetched, now, sns_topic).await
                }
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
            (created, first, timing, reader_failed, read_patient)
        };
        Box::pin(creation.into_actor(self).then(
            move |(res, first, (reserve, prefetch, store), reader_failed, read_patient),
                  act,
                  ctx| {
                if reader_failed {
                    // Opened again for the next incident.
                    act.reader.conn = None;
                }
                if let Some(patient) = read_patient {
                    act.patients.put(patient);
                }
                let waiters = patient
                    .as_ref()
                    .and_then(|p| act.creating.remove(p))
                    .unwrap_or_default();
                let result: Result<Opened, IncidentError> = match res {
                    Ok((incident, version)) => {
                        Ok(act.started(incident, version, first, (reserve, prefetch, store), ctx))
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
                settle(db.clone(), result, existing_after_race, waiters, addr).into_actor(act)
            },
        ))
    }
}

impl IncidentDirectory {
    /// A new incident is stored: the directory maps its patient to it, the crews hear of its
    /// first round at once, and its actor starts (and tracks that round, or starts one).
    fn started(
        &mut self,
        incident: Incident,
        version: i64,
        first: Option<FirstRound>,
        (reserve, prefetch, store): (Duration, Duration, Duration),
        ctx: &mut Context<Self>,
    ) -> Opened {
        crate::fault::crash_point("incident.after_create");
        if let Some(p) = &incident.patient_id {
            self.open_by_patient.insert(p.clone(), incident.id);
        }
        if let Some(first) = &first {
            send_offers(&incident, &first.records, &first.reserved, first.expires_at);
        }
        let actor = IncidentActor::created(incident.clone(), version, self.deps.clone());
        let addr = self.start_actor(actor, ctx);
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
        Opened {
            incident,
            created: true,
        }
    }
}

/// The end of a creation: when another writer holds the patient's open incident (the
/// database's unique constraint), that incident is the answer; then every request that
/// waited for this creation is answered, its evidence added.
async fn settle(
    db: Db,
    result: Result<Opened, IncidentError>,
    existing_after_race: Option<PatientId>,
    waiters: Vec<(Waiter, Option<serde_json::Value>)>,
    addr: Option<Addr<IncidentActor>>,
) -> Result<Opened, IncidentError> {
    let result = match (result, existing_after_race) {
        (Err(_), Some(p)) => {
            let found = db
                .run(move |mut conn| async move { store::open_for_patient(&mut conn, &p).await })
                .await?;
            match found {
                Some(id) => {
                    let incident = db
                        .run(move |mut conn| async move { store::find(&mut conn, id).await })
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
