//! Dispatch inside the incident actor: offer rounds (reserve, publish, expire, next round),
//! first-accept-wins, declines and manual assignment.

use std::collections::HashSet;
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::create::FirstRound;
use super::{IncidentActor, IncidentError, OfferGroup, PendingOffer, ToIncident, persist};
use crate::actors::error::ActorError;
use crate::actors::unit::{
    ACTOR_TIMEOUT, Commit, Fleet, OfferFrame, PublishOffer, Release, ReserveRound, ReservedUnit,
    StopWaiting, Uncommit, UnitAddr, WaitForUnit,
};
use crate::config::DispatchSettings;
use crate::domain::events::{NewEvent, OfferClosed};
use crate::domain::geo::LatLng;
use crate::domain::ids::{IncidentId, OfferId, UnitId};
use crate::domain::incident::{
    Command, Incident, IncidentEvent, IncidentStatus, Priority, Rejection, handle,
};
use crate::persistence::DbConn;
use crate::persistence::fleet::{self as fleet_store, OfferRecord};

pub(super) async fn close_offers(
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
            let closed = OfferClosed {
                offer_id: *offer,
                incident_id: incident,
                unit_id: unit,
                reason,
                at: now,
            };
            out.push(closed.to_new(status));
        }
    }
    Ok(out)
}

/// Why an offer could not be accepted (`docs/api.md`: 409 `{outcome}`).
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
    /// The offer this concerns.
    pub offer_id: OfferId,
    /// The crew's unit.
    pub unit_id: UnitId,
    /// The unit's actor, when the caller already has it: the fleet is not asked again.
    pub unit: Option<Addr<crate::actors::unit::AmbulanceActor>>,
}

/// A crew declines its offer.
#[derive(Message, Debug)]
#[rtype(result = "Result<OfferOutcome, IncidentError>")]
pub struct DeclineOffer {
    /// The offer this concerns.
    pub offer_id: OfferId,
    /// The crew's unit.
    pub unit_id: UnitId,
    /// Why, in words for people (stored, and shown to dispatchers).
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
/// The units reserved for a round, in rank order.
pub(super) type Reserved = Vec<ReservedUnit>;

/// Ranks and reserves a round's units with one message to the fleet; answers them with the
/// round's expiry.
pub(super) async fn reserve_round(
    fleet: Addr<Fleet>,
    id: IncidentId,
    scene: LatLng,
    priority: Priority,
    exclude: HashSet<UnitId>,
    settings: DispatchSettings,
) -> (Reserved, DateTime<Utc>) {
    let expires_at =
        Utc::now() + chrono::Duration::seconds(i64::try_from(settings.offer_ttl_s).unwrap_or(30));
    let reserved = fleet
        .send(ReserveRound {
            incident_id: id,
            scene,
            priority,
            exclude,
            k: settings.offers_per_round.max(1),
            expires_at,
        })
        // The fleet's own asks are bounded by ACTOR_TIMEOUT; allow for them and the ranking.
        .timeout(ACTOR_TIMEOUT * 2)
        .await
        .unwrap_or_default();
    (reserved, expires_at)
}

/// The stored offers of a reserved round.
pub(super) fn offer_records(
    incident: IncidentId,
    reserved: &Reserved,
    round: u32,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Vec<OfferRecord> {
    reserved
        .iter()
        .map(
            |ReservedUnit {
                 offer_id,
                 candidate: c,
                 ..
             }| OfferRecord {
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
                eta_source: c.eta_source.as_str().to_owned(),
                offered_at: now,
                expires_at,
                responded_at: None,
                decline_reason: None,
            },
        )
        .collect()
}

/// Sends each reserved unit its stored offer, for its crew.
pub(super) fn send_offers(
    state: &Incident,
    records: &[OfferRecord],
    reserved: &Reserved,
    expires_at: DateTime<Utc>,
) {
    let (priority, location) = (state.priority, state.location);
    for (record, ReservedUnit { addr, .. }) in records.iter().zip(reserved.iter()) {
        addr.do_send(PublishOffer {
            offer_id: record.id,
            frame: OfferFrame {
                offer_id: record.id,
                incident_id: record.incident_id,
                priority,
                location,
                eta_s: record.eta_s,
                eta_source: record.eta_source.clone(),
                expires_at,
            },
            reference: state.reference.clone(),
        });
    }
}

pub(super) fn release_all(reserved: &Reserved) {
    for ReservedUnit { offer_id, addr, .. } in reserved {
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
    pub(super) fn resume_dispatch(&mut self, offers: Vec<OfferRecord>, ctx: &mut Context<Self>) {
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
    pub(super) fn end_dispatch(&mut self, ctx: &mut Context<Self>, reason: &'static str) {
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
        let sns_topic = self.deps.sns_topic.clone();
        let expected = self.version;
        async move {
            writer
                .write(move |tx| {
                    // The writer may run this twice (see `GroupCommit::write`).
                    let (next, events, offers_to_insert, closing, sns_topic) = (
                        next.clone(),
                        events.clone(),
                        offers_to_insert.clone(),
                        closing.clone(),
                        sns_topic.clone(),
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
                        let topic = sns_topic.as_deref();
                        persist(tx, &next, expected, &events, extra, now, topic).await
                    })
                })
                .await
        }
    }
}

impl Handler<NextRound> for IncidentActor {
    type Result = AtomicResponse<Self, ()>;

    // Long on purpose: one offer round as its numbered steps (rank and reserve, escalate or
    // record, publish) in one atomic handler, on the dispatch hot path.
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
            let unit_ids: Vec<UnitId> = reserved.iter().map(|r| r.candidate.unit_id.clone()).collect();
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
                        crate::fault::crash_point("dispatch.after_round_stored");
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
pub(super) struct PublishFirstRound(pub(super) FirstRound);

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

    // Long on purpose: first accept wins, checked, committed on the unit and persisted in one
    // atomic step on the accept hot path; splitting it would add hops between them.
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
        let known = msg.unit.clone();
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
            let addr = match known.filter(Addr::connected) {
                Some(addr) => addr,
                None => fleet
                    .ok_or(IncidentError::NotFound)?
                    .send(UnitAddr(unit_id))
                    .await
                    .ok()
                    .flatten()
                    .ok_or(IncidentError::NotFound)?,
            };
            match addr
                .send(Commit {
                    incident_id: id,
                    offer_id: Some(offer_id),
                })
                .timeout(ACTOR_TIMEOUT)
                .await
            {
                Ok(Ok(_)) => crate::fault::crash_point("dispatch.after_unit_commit"),
                _ => return Ok((false, 0)),
            }
            match persist.await {
                Ok(v) => {
                    crate::fault::crash_point("dispatch.after_accept");
                    Ok((true, v))
                }
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

    // Long on purpose: the manual twin of AcceptOffer (decide, commit the unit, persist, undo
    // on failure) in one atomic step, read top to bottom.
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
                Err(e) => return Err(ActorError::mailbox("unit")(e).into()),
            };
            match persist.await {
                Ok(v) => {
                    // The unit was holding an offer for another incident: that one declines.
                    if let (Some((offer_id, other)), Some(directory)) = (displaced, directory) {
                        directory.do_send(ToIncident {
                            incident_id: other,
                            message: DeclineOffer {
                                offer_id,
                                unit_id,
                                reason: "reassigned by a dispatcher".into(),
                            },
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
