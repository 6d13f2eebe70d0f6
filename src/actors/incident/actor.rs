//! The [`IncidentActor`]: one supervised actor per incident, running every command through
//! the pure state machine and storing its events before its state changes.

use std::collections::{HashMap, HashSet};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{
    IncidentDirectory, IncidentEnded, IncidentError, close_offers, persist, rebuild, stream_of,
};
use crate::actors::error::ActorError;
use crate::actors::unit::{Fleet, IncidentOver, UnitAddr};
use crate::config::DispatchSettings;
use crate::domain::events::RecordedEvent;
use crate::domain::ids::{IncidentId, OfferId, UnitId};
use crate::domain::incident::{Command, Incident, IncidentStatus, handle};
use crate::persistence::events::{self};
use crate::persistence::fleet::{self as fleet_store, OfferRecord};
use crate::persistence::group::GroupCommit;
use crate::persistence::{Db, StoreError};

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
    /// The Amazon SNS topic next-of-kin messages are also published to, once per incident and
    /// template (`notify.sns_topic_arn`, with SNS configured); `None` queues no topic rows.
    pub sns_topic: Option<std::sync::Arc<str>>,
}

#[derive(Clone, Debug, Serialize)]
pub(super) struct PendingOffer {
    pub(super) unit_id: UnitId,
    pub(super) round: u32,
    pub(super) expires_at: DateTime<Utc>,
}

/// The actor of one incident.
pub struct IncidentActor {
    pub(super) id: IncidentId,
    db: Db,
    pub(super) deps: IncidentDeps,
    directory: Option<Recipient<IncidentEnded>>,
    /// Offers out now, by id.
    pub(super) pending: HashMap<OfferId, PendingOffer>,
    /// Units that declined or let an offer lapse (not offered again).
    pub(super) excluded: HashSet<UnitId>,
    pub(super) round_timer: Option<SpawnHandle>,
    pub(super) state: Option<Incident>,
    pub(super) version: i64,
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
    pub(super) fn resumed(
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

    // Long on purpose: decide, persist and apply one command as a single atomic step, read
    // top to bottom (with the reload on a concurrent writer).
    fn handle(&mut self, msg: Execute, ctx: &mut Self::Context) -> Self::Result {
        self.messages += 1;
        let now = Utc::now();
        self.last_message_at = Some(now);
        if !self.loaded {
            // Loading failed earlier (database down): try again for the next caller.
            self.load(ctx);
            return AtomicResponse::new(Box::pin(fut::ready(Err(IncidentError::Actor(
                ActorError::NotReady("incident"),
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
        let crash_at = stored_point(&msg.0);
        let writer = self.deps.writer.clone();
        let sns_topic = self.deps.sns_topic.clone();
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
                    let (to_store, closing, events, sns_topic) = (
                        to_store.clone(),
                        closing.clone(),
                        events.clone(),
                        sns_topic.clone(),
                    );
                    Box::pin(async move {
                        let extra =
                            close_offers(tx, to_store.id, &closing, "withdrawn", "cancelled", now)
                                .await?;
                        let topic = sns_topic.as_deref();
                        persist(tx, &to_store, expected, &events, extra, now, topic).await
                    })
                })
                .await
        };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(move |res, act, ctx| {
            match res {
                Ok(version) => {
                    crate::fault::crash_point_opt(crash_at);
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
pub(super) type OfferGroup<'a> = (&'a str, &'a str, Vec<(OfferId, UnitId)>);

/// The crash point reached once `command` is stored (see [`crate::fault`]).
fn stored_point(command: &Command) -> Option<&'static str> {
    Some(match command {
        Command::ReportEnroute => "incident.stored_report_enroute",
        Command::ReportOnScene => "incident.stored_report_on_scene",
        Command::ReportTransporting { .. } => "incident.stored_report_transporting",
        Command::ReportAtHospital => "incident.stored_report_at_hospital",
        Command::StartBilling => "incident.stored_start_billing",
        Command::Close { .. } => "incident.stored_close",
        Command::Cancel { .. } => "incident.stored_cancel",
        _ => return None,
    })
}
