//! `DeviceActor`: one per wearable. It holds a short window of readings and the device's
//! triage status, emits `vitals.status_changed` only when the status changes (persisted, with
//! the readings behind it as evidence), runs the fall grace window (which the wearer may cancel:
//! `device.fall_cancelled`), reports `device.offline` at the exact end of a silence (or at once
//! when the device says it is offline: [`ReportedOffline`]), and stops
//! when idle (the [`DeviceDirectory`](super::DeviceDirectory) starts a fresh one on the next
//! reading, which resumes from the persisted status, and records the silence of devices whose
//! actor is not running).
//!
//! Triage of a reading is pure and already done by the caller; this actor decides what the
//! reading means for the device over time. Handlers never panic; a persistence failure answers
//! the batch as unavailable and stops the actor so the next one reloads the persisted state.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use futures_util::future::OptionFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::readings::{
    Batch, Projected, WindowEntry, evidence, in_line, persist_changes, retained, take_readings,
};
use crate::actors::incident::{EmergencyDetected, HandoffError};
pub use crate::config::Retention;
use crate::domain::auth::Role;
use crate::domain::events::{DeviceEvent, NewEvent};
use crate::domain::ids::{DeviceId, IncidentId, PatientId};
use crate::domain::news2::News2;
use crate::domain::triage::{
    Assessment, FallEvent, FallSignal, FallWatch, TriageRules, TriageStatus, assess,
};
use crate::domain::vitals::Reading;
use crate::persistence::group::GroupCommit;
use crate::persistence::patients::DeviceState;
use crate::persistence::{Db, StoreError, events, patients};

/// Readings kept in the window (evidence for the next status change).
pub const WINDOW: usize = 10;
/// Pending messages a device mailbox holds before senders wait (back-pressure).
pub const MAILBOX_CAPACITY: usize = 64;

/// Triage settings shared by every device actor.
#[derive(Debug)]
pub struct TriageRuntime {
    /// The triage rules: thresholds, NEWS2 bands and the fall grace window.
    pub rules: TriageRules,
    /// Silence before `device.offline`.
    pub offline_after: Duration,
    /// Raw reading retention.
    pub retention: Retention,
    /// The group-commit writer status changes go through (shared with incidents and units).
    pub writer: GroupCommit,
    /// How many of a device's last stored readings a repeated delivery is recognised among
    /// ([`Settings::repeat_window`](crate::config::Settings::repeat_window)).
    pub repeat_window: usize,
}

/// One triaged reading for a device.
#[derive(Clone, Debug)]
pub struct Scored {
    /// Position in the request.
    pub index: usize,
    /// The reading.
    pub reading: Reading,
    /// Its triage.
    pub assessment: Assessment,
}

/// The verdict for one reading.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    /// The device.
    pub device_id: DeviceId,
    /// Its wearer.
    pub patient_id: PatientId,
    /// Status for this reading (includes the fall window's verdict for in-order readings).
    pub status: TriageStatus,
    /// Why, one entry per rule that fired (for people).
    pub reasons: Vec<String>,
    /// The (partial) NEWS2.
    pub news2: News2,
    /// The incident this reading was handed to, once incidents exist.
    pub incident_id: Option<IncidentId>,
}

/// What happened to one reading.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ReadingOutcome {
    /// Triaged and applied.
    Accepted(Accepted),
    /// The device is not registered.
    UnknownDevice,
    /// The reading names a different patient than the device is registered to.
    PatientMismatch,
    /// The device's state could not be loaded or persisted; retry later.
    Unavailable,
}

/// Triage readings (each with its position in the request, in request order) and apply them
/// to the device. Triage runs here, on the device's own arbiter, so a batch's devices are
/// scored in parallel and the HTTP handler holds no rule.
#[derive(Message, Debug)]
#[rtype(result = "Vec<(usize, ReadingOutcome)>")]
pub struct ProcessReadings(pub Vec<(usize, Reading)>);

impl Scored {
    /// `reading`, at `index` in its request, triaged by `rules`.
    pub fn new(rules: &TriageRules, index: usize, reading: Reading) -> Self {
        let assessment = assess(rules, &reading);
        Self {
            index,
            reading,
            assessment,
        }
    }
}

/// Evaluate timers as of `now`: the fall grace window, and silence longer than
/// `offline_after` (which records `device.offline` and stops the idle actor). Sent by the
/// actor's own timers; tests send it with a chosen time instead of sleeping.
#[derive(Message, Debug)]
#[rtype(result = "Option<TriageStatus>")]
pub struct CheckTimers {
    /// The time to evaluate at.
    pub now: DateTime<Utc>,
}

/// The wearer said "I'm OK" (the device's button, through its gateway, or the patient app):
/// a running fall watch stands down, stored as `device.fall_cancelled` with the device's state
/// (so a restarted actor does not resume it).
#[derive(Message, Debug)]
#[rtype(result = "Result<FallCancelled, StoreError>")]
pub struct CancelFall {
    /// The instant to evaluate the timers at.
    pub now: DateTime<Utc>,
    /// Who sent it (`gateway` or `patient`).
    pub by: Role,
}

/// What a wearer's "I'm OK" did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallCancelled {
    /// A running fall watch stood down; no escalation follows.
    Cancelled,
    /// No fall watch was running (none started, it stood down already, or its grace window had
    /// run out and it escalates).
    NoWatch,
    /// No such device is registered.
    UnknownDevice,
}

/// The actor's live state, for `/admin/actors/device/{id}`.
#[derive(Message, Debug)]
#[rtype(result = "DeviceInspection")]
pub struct InspectDevice;

/// A device actor's state, as the admin inspector shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceInspection {
    /// The device.
    pub id: DeviceId,
    /// Messages handled since it started.
    pub messages: u64,
    /// When it last handled a message.
    pub last_message_at: Option<DateTime<Utc>>,
    /// Where it is in its life, with its live state once ready.
    pub state: DevicePhase,
}

/// Where a device actor is in its life.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum DevicePhase {
    /// Its registration is being read.
    Loading,
    /// No such device is registered (the actor stops after answering).
    UnknownDevice,
    /// Its registration could not be read (the actor stops after answering).
    Failed,
    /// Taking readings.
    Ready {
        /// The wearer.
        patient_id: PatientId,
        /// The device's triage status.
        status: TriageStatus,
        /// When its newest applied reading was measured.
        last_measured_at: Option<DateTime<Utc>>,
        /// The fall grace window.
        fall_watch: FallWatch,
        /// When a running fall watch escalates.
        fall_deadline: Option<DateTime<Utc>>,
        /// The last readings (the evidence an emergency carries).
        window: Vec<Reading>,
    },
}

impl DevicePhase {
    /// The status to list the actor under: its triage status once ready, else its phase.
    pub fn status(&self) -> &'static str {
        match self {
            DevicePhase::Loading => "loading",
            DevicePhase::UnknownDevice => "unknown_device",
            DevicePhase::Failed => "failed",
            DevicePhase::Ready { status, .. } => status.as_str(),
        }
    }
}

/// A summary line for `/admin/actors`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceSummary {
    /// Device id.
    pub id: DeviceId,
    /// Current status.
    pub status: String,
    /// When the last message arrived.
    pub last_message_at: Option<DateTime<Utc>>,
}

/// Ask for a [`DeviceSummary`].
#[derive(Message, Debug)]
#[rtype(result = "DeviceSummary")]
pub struct Summarise;

pub(super) struct Live {
    pub(super) patient_id: PatientId,
    status: TriageStatus,
    pub(super) window: VecDeque<WindowEntry>,
    pub(super) last_measured: Option<DateTime<Utc>>,
    /// When the device is silent for the limit (`device.offline`) unless it is heard: the last
    /// reading's arrival plus the limit, or, for an actor started without a reading, its stored
    /// `heard_at` plus the limit (`None`: not heard since its last `device.offline`).
    offline_due: Option<DateTime<Utc>>,
    /// The newest in-order reading's own triage, a fall awaiting movement aside (what the
    /// status returns to after a fall alert is cancelled).
    last_assessed: TriageStatus,
    pub(super) fall: FallWatch,
    /// The last few stored readings, so a repeated delivery applies nothing.
    pub(super) recent: super::readings::Recent,
    offline_timer: Option<SpawnHandle>,
    fall_timer: Option<SpawnHandle>,
}

enum Phase {
    /// Waiting for the registration: loaded by the directory with the rest of its batch
    /// (`Some`) or by the actor itself.
    Loading(Option<Preload>),
    Unknown,
    Failed,
    Ready(Box<Live>),
}

/// A device's registration, loaded by the directory for a batch of new devices at once
/// (`None`: not registered).
pub type Preload = tokio::sync::oneshot::Receiver<Result<Option<DeviceState>, StoreError>>;

/// A status transition to persist.
pub(super) struct Change {
    pub(super) from: TriageStatus,
    pub(super) to: TriageStatus,
    pub(super) reasons: Vec<String>,
    pub(super) measured_at: DateTime<Utc>,
    pub(super) evidence: Vec<Reading>,
}

/// The per-wearable actor.
pub struct DeviceActor {
    id: DeviceId,
    db: Db,
    runtime: Arc<TriageRuntime>,
    handoff: Recipient<EmergencyDetected>,
    phase: Phase,
    messages: u64,
    last_message_at: Option<DateTime<Utc>>,
    /// Answers whether the device's last change was stored: each batch (or fall verdict)
    /// stores its change only after the one before, so the actor goes on taking readings
    /// while an emergency is handed off and dispatched, and changes are still stored in order.
    stored: Option<oneshot::Receiver<bool>>,
}

impl DeviceActor {
    /// A device actor; it loads its registration when started.
    pub fn new(
        id: DeviceId,
        db: Db,
        runtime: Arc<TriageRuntime>,
        handoff: Recipient<EmergencyDetected>,
    ) -> Self {
        Self {
            id,
            db,
            runtime,
            handoff,
            phase: Phase::Loading(None),
            messages: 0,
            last_message_at: None,
            stored: None,
        }
    }

    /// Takes its registration from `preload` (the directory's load of a whole batch of new
    /// devices) instead of reading it itself; if that load is lost it reads it itself.
    pub fn preloaded(mut self, preload: Preload) -> Self {
        self.phase = Phase::Loading(Some(preload));
        self
    }

    fn live(&mut self) -> Option<&mut Live> {
        match &mut self.phase {
            Phase::Ready(live) => Some(live),
            _ => None,
        }
    }

    /// Arms the offline timer for the device's deadline (after a running fall watch, which
    /// keeps a device from going offline), or for the silence limit when it has none (an idle
    /// actor then stops).
    fn arm_offline_timer(&mut self, ctx: &mut Context<Self>) {
        let limit = self.runtime.offline_after;
        let Some(live) = self.live() else { return };
        let now = Utc::now();
        let target = match (live.offline_due, live.fall.deadline()) {
            (Some(due), Some(fall)) => Some(due.max(fall)),
            (due, fall) => due.or(fall),
        };
        let after = target.map_or(limit, |t| (t - now).to_std().unwrap_or(Duration::ZERO));
        let handle = ctx.run_later(after, |_, ctx| ctx.notify(CheckTimers { now: Utc::now() }));
        if let Some(live) = self.live()
            && let Some(old) = live.offline_timer.replace(handle)
        {
            ctx.cancel_future(old);
        }
    }

    fn arm_fall_timer(&mut self, ctx: &mut Context<Self>) {
        let Some(live) = self.live() else { return };
        if let Some(old) = live.fall_timer.take() {
            ctx.cancel_future(old);
        }
        let Some(deadline) = live.fall.deadline() else {
            return;
        };
        let wait = (deadline - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        let handle = ctx.run_later(wait, |act, ctx| {
            ctx.notify(CheckTimers { now: Utc::now() });
            if let Some(live) = act.live() {
                live.fall_timer = None;
            }
        });
        if let Some(live) = self.live() {
            live.fall_timer = Some(handle);
        }
    }

    /// Records `device.offline` (a silence of `silent_s` seconds) unless the device was heard
    /// since `heard_before` or it is recorded already, after the device's earlier changes;
    /// then stops the actor when `stop`. The receiver answers whether it was recorded now.
    fn went_offline(
        &mut self,
        heard_before: DateTime<Utc>,
        silent_s: u64,
        stop: bool,
        ctx: &mut Context<Self>,
    ) -> oneshot::Receiver<Result<bool, StoreError>> {
        let writer = self.runtime.writer.clone();
        let id = self.id.clone();
        let (before, done) = self.next_in_line();
        let (answer, answered) = oneshot::channel();
        let work = async move {
            in_line(before).await?;
            let ids = vec![id];
            let recorded = writer
                .write(move |conn| {
                    let ids = ids.clone();
                    Box::pin(async move {
                        patients::record_offline(conn, &ids, heard_before, silent_s, Utc::now())
                            .await
                    })
                })
                .await;
            let _ = done.send(recorded.is_ok());
            recorded
        };
        ctx.wait(work.into_actor(self).map(move |res, act, ctx| {
            let outcome = match res {
                Ok(ids) if !ids.is_empty() => {
                    tracing::info!(device.id = %act.id, "device offline");
                    Ok(true)
                }
                Ok(_) => {
                    tracing::debug!(device.id = %act.id, "device heard meanwhile, or recorded offline already");
                    Ok(false)
                }
                Err(e) => {
                    tracing::warn!(device.id = %act.id, error = %e, "could not record device.offline; the offline sweep retries");
                    Err(e)
                }
            };
            let _ = answer.send(outcome);
            if stop {
                ctx.stop();
            }
        }));
        answered
    }

    /// A fall watch resumed from the stored state: its readings (the evidence of the change it
    /// caused, with the wearer's location) are read back first, then the watch is armed, to
    /// escalate on time (at once if overdue) with the evidence a never-stopped actor would have.
    fn resume_fall_watch(&mut self, ctx: &mut Context<Self>) {
        let (db, stream) = (self.db.clone(), format!("device-{}", self.id));
        ctx.wait(
            async move {
                db.run(move |mut conn| async move { events::read_stream(&mut conn, &stream).await })
                    .await
            }
            .into_actor(self)
            .map(|found, act, ctx| {
                let evidence = found.ok().and_then(|events| {
                    events
                        .into_iter()
                        .rev()
                        .find(|e| e.kind == "vitals.status_changed")
                        .and_then(|e| {
                            serde_json::from_value::<Vec<Reading>>(e.data["evidence"].clone()).ok()
                        })
                });
                if let (Some(live), Some(evidence)) = (act.live(), evidence) {
                    for reading in evidence.iter().rev().take(WINDOW).rev() {
                        live.window.push_back(WindowEntry::new(reading));
                    }
                }
                act.arm_fall_timer(ctx);
            }),
        );
    }

    /// Stores the device's row alone (no event), in line after its earlier changes: a fall
    /// watch that ended without changing the status.
    fn store_fall_watch(
        &mut self,
        ctx: &mut Context<Self>,
        patient_id: PatientId,
        leading: Vec<NewEvent>,
        projected: Projected,
    ) -> ResponseActFuture<Self, Result<TriageStatus, StoreError>> {
        let status = projected.status;
        let (writer, id) = (self.runtime.writer.clone(), self.id.clone());
        let (before, done) = self.next_in_line();
        self.arm_fall_timer(ctx);
        let work = async move {
            let stored = match in_line(before).await {
                Ok(()) => {
                    persist_changes(
                        &writer,
                        id,
                        patient_id,
                        (leading, Vec::new()),
                        Vec::new(),
                        projected,
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            let _ = done.send(stored.is_ok());
            stored
        };
        Box::pin(work.into_actor(self).map(move |res, act, ctx| match res {
            Ok(()) => Ok(status),
            Err(e) => {
                tracing::warn!(device.id = %act.id, error = %e, "fall watch end not persisted");
                ctx.stop();
                Err(e)
            }
        }))
    }

    /// This change's place in line: the answer of the change before it (if any), and the
    /// sender to answer for this one.
    fn next_in_line(&mut self) -> (Option<oneshot::Receiver<bool>>, oneshot::Sender<bool>) {
        let (done, stored) = oneshot::channel();
        (self.stored.replace(stored), done)
    }

    /// Applies one in-order reading to the live state; returns the effective status and a
    /// change to persist, if any.
    pub(super) fn apply(
        live: &mut Live,
        scored: &Scored,
        now: DateTime<Utc>,
    ) -> (TriageStatus, Vec<String>, Option<Change>) {
        let reading = &scored.reading;
        // A reading from the same second may carry an earlier sub-second part: keep the newest.
        live.last_measured = live.last_measured.max(Some(reading.timestamp));
        if live.window.len() >= WINDOW {
            live.window.pop_front();
        }
        live.window.push_back(WindowEntry::new(reading));
        // A reading with only `moving`/`fall_detected` says nothing about vitals: it must not
        // read as a return to normal, so it keeps the last vitals-based verdict.
        let mut status = if reading.has_vital_sign() {
            // The vitals' own verdict: a fall awaiting movement (normal vitals) is the fall
            // watch's to judge, and a wearer's "I'm OK" returns the status to that verdict.
            live.last_assessed = if scored.assessment.fall == FallSignal::AwaitingMovement {
                TriageStatus::Normal
            } else {
                scored.assessment.status
            };
            scored.assessment.status
        } else {
            live.last_assessed.max(scored.assessment.status)
        };
        let mut reasons = scored.assessment.reasons.clone();
        match live.fall.on_reading(reading, &scored.assessment, now) {
            FallEvent::Escalated => {
                status = TriageStatus::Emergency;
                reasons.push(live.fall.escalation_reason());
            }
            FallEvent::StoodDown => reasons.push("fall alert stood down: wearer moving".to_owned()),
            FallEvent::None | FallEvent::Started => {}
        }
        if live.fall.deadline().is_some() && status < TriageStatus::Abnormal {
            status = TriageStatus::Abnormal;
            reasons.push("fall detected, awaiting movement".to_owned());
        }
        let change = (status != live.status).then(|| Change {
            from: live.status,
            to: status,
            reasons: reasons.clone(),
            measured_at: reading.timestamp,
            evidence: evidence(&live.window, &reading.device_id),
        });
        live.status = status;
        (status, reasons, change)
    }
}

impl Actor for DeviceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        let db = self.db.clone();
        let id = self.id.clone();
        let grace = self.runtime.rules.fall_grace_s;
        let offline_after =
            chrono::Duration::from_std(self.runtime.offline_after).unwrap_or(chrono::Duration::MAX);
        let preload = match &mut self.phase {
            Phase::Loading(preload) => preload.take(),
            _ => None,
        };
        // `wait`: no reading is processed before the registration is known.
        ctx.wait(
            async move {
                if let Some(Ok(Ok(found))) = OptionFuture::from(preload).await {
                    return Ok(found);
                }
                db.run(move |mut conn| async move { patients::find_device(&mut conn, &id).await })
                    .await
            }
            .into_actor(self)
            .map(move |res, act, ctx| {
                act.phase = match res {
                    Ok(Some(state)) => Phase::Ready(Box::new(Live {
                        // Copied here, on the actor's thread: the loaded row was allocated
                        // on the loader's, and a long-lived string left among the batch's
                        // freed ones would keep their memory pages (about 10 MiB for
                        // 100,000 devices, `examples/scale_footprint`).
                        patient_id: PatientId(state.device.patient_id.as_str().to_owned()),
                        status: match state.last_status.as_deref() {
                            Some("emergency") => TriageStatus::Emergency,
                            Some("abnormal") => TriageStatus::Abnormal,
                            _ => TriageStatus::Normal,
                        },
                        window: VecDeque::with_capacity(WINDOW),
                        last_measured: state.last_seen_at,
                        offline_due: state.heard_at.map(|heard| heard + offline_after),
                        last_assessed: TriageStatus::Normal,
                        fall: {
                            let mut watch = FallWatch::new(grace);
                            if let Some((fall_at, deadline)) = state.fall {
                                watch.resume(fall_at, deadline);
                            }
                            watch
                        },
                        recent: super::readings::Recent::default(),
                        offline_timer: None,
                        fall_timer: None,
                    })),
                    Ok(None) => Phase::Unknown,
                    Err(e) => {
                        tracing::warn!(device.id = %act.id, error = %e, "could not load device");
                        Phase::Failed
                    }
                };
                if matches!(act.phase, Phase::Ready(_)) {
                    act.arm_offline_timer(ctx);
                    if act.live().is_some_and(|l| l.fall.active().is_some()) {
                        act.resume_fall_watch(ctx);
                    }
                }
            }),
        );
    }
}

impl Handler<ProcessReadings> for DeviceActor {
    type Result = ResponseActFuture<Self, Vec<(usize, ReadingOutcome)>>;

    // Long on purpose: the ingest hot path for one device batch (triage, hand-off, persist),
    // kept in one piece so a reading costs no extra hops on its way to an emergency.
    fn handle(&mut self, msg: ProcessReadings, ctx: &mut Self::Context) -> Self::Result {
        let now = Utc::now();
        self.messages += 1;
        self.last_message_at = Some(now);
        let id = self.id.clone();
        let refuse = |outcome: ReadingOutcome, readings: Vec<(usize, Reading)>| {
            readings
                .into_iter()
                .map(|(index, _)| (index, outcome.clone()))
                .collect::<Vec<_>>()
        };
        let live = match &mut self.phase {
            Phase::Ready(live) => live,
            // Answer, then stop: the next reading starts a fresh actor that looks again (the
            // device may have been registered meanwhile, or the database may be back).
            Phase::Unknown => {
                return Box::pin(
                    fut::ready(refuse(ReadingOutcome::UnknownDevice, msg.0)).map(
                        |outcomes, _, ctx: &mut Context<Self>| {
                            ctx.stop();
                            outcomes
                        },
                    ),
                );
            }
            Phase::Loading(_) | Phase::Failed => {
                return Box::pin(fut::ready(refuse(ReadingOutcome::Unavailable, msg.0)).map(
                    |outcomes, _, ctx: &mut Context<Self>| {
                        ctx.stop();
                        outcomes
                    },
                ));
            }
        };
        let patient_id = live.patient_id.clone();
        live.offline_due = Some(
            now + chrono::Duration::from_std(self.runtime.offline_after)
                .unwrap_or(chrono::Duration::MAX),
        );
        let Batch {
            mut outcomes,
            applied,
            changes,
            handoffs,
            evidence_rows,
            any_in_order,
            fall_changed,
        } = take_readings(live, &id, &self.runtime, msg.0, now);
        let final_status = live.status;
        let fall = live.fall.active();
        let last_seen = live.last_measured;
        self.arm_offline_timer(ctx);
        if any_in_order {
            self.arm_fall_timer(ctx);
        }

        let writer = self.runtime.writer.clone();
        let handoff = self.handoff.clone();
        let persist_id = id.clone();
        let persist_patient = patient_id.clone();
        // The hand-off goes first and the status change is stored once the incident exists:
        // an emergency must not wait for the device's own bookkeeping, not even by queueing
        // behind its batch in the writer. The answer waits for both; if the status change
        // failed, the batch is refused (and a retry is deduplicated into the same incident).
        // The actor is not held meanwhile: its next readings are triaged while this batch's
        // incident is dispatched, and their changes are stored after this one's.
        // Only a batch with a change to store takes a place in line.
        // (With `raw_retention = all`, every accepted reading is a row to store.)
        let to_store = !changes.is_empty() || !evidence_rows.is_empty() || fall_changed;
        let line = to_store.then(|| self.next_in_line());
        let work = async move {
            let mut incidents = Vec::with_capacity(handoffs.len());
            let mut handed_off = Ok(());
            for (slot, detected) in handoffs {
                match handoff.send(detected).await {
                    Ok(Ok(incident)) => incidents.push((slot, incident)),
                    Ok(Err(e)) => handed_off = Err(e),
                    Err(e) => {
                        handed_off =
                            Err(HandoffError::Unreachable(format!("incident hand-off: {e}")));
                    }
                }
                if handed_off.is_err() {
                    break;
                }
            }
            let (before, done) = match line {
                Some((before, done)) => (before, Some(done)),
                None => (None, None),
            };
            let stored = match in_line(before).await {
                Err(e) => Err(e),
                Ok(()) if !to_store => Ok(()),
                Ok(()) => {
                    persist_changes(
                        &writer,
                        persist_id,
                        persist_patient,
                        (Vec::new(), changes),
                        evidence_rows,
                        Projected {
                            status: final_status,
                            last_seen: last_seen.unwrap_or(now),
                            fall,
                        },
                    )
                    .await
                }
            };
            if let Some(done) = done {
                let _ = done.send(stored.is_ok());
            }
            stored?;
            handed_off.map(|()| incidents)
        };
        Box::pin(work.into_actor(self).map(
            move |result, act, ctx| match result {
                Ok(incidents) => {
                    for (slot, incident) in incidents {
                        if let Some((_, ReadingOutcome::Accepted(a))) = outcomes.get_mut(slot) {
                            a.incident_id = incident;
                        }
                    }
                    let window = act.runtime.repeat_window;
                    if let Some(live) = act.live() {
                        for (print, status) in applied {
                            live.recent.remember(print, status, window);
                        }
                    }
                    outcomes
                }
                Err(e) => {
                    tracing::warn!(device.id = %act.id, error = %e, "device state not persisted; batch refused");
                    ctx.stop();
                    outcomes
                        .into_iter()
                        .map(|(i, _)| (i, ReadingOutcome::Unavailable))
                        .collect()
                }
            },
        ))
    }
}

impl Handler<CheckTimers> for DeviceActor {
    type Result = ActorResponse<Self, Option<TriageStatus>>;

    fn handle(&mut self, msg: CheckTimers, ctx: &mut Self::Context) -> Self::Result {
        if let Some(live) = self.live()
            && live.fall.deadline().is_none()
        {
            let status = live.status;
            match live.offline_due {
                Some(due) if msg.now >= due => {
                    let silent_s = self.runtime.offline_after.as_secs();
                    // Answered by the stored event: the sweep retries a failure.
                    drop(self.went_offline(msg.now, silent_s, true, ctx));
                    // Answered now: the actor stops once `device.offline` is stored.
                    return ActorResponse::reply(Some(status));
                }
                // Started without a reading for a device not heard since it went offline:
                // nothing is left to watch.
                None => {
                    ctx.stop();
                    return ActorResponse::reply(Some(status));
                }
                Some(_) => {}
            }
        }
        let verdict = self.fall_verdict(msg.now, None, ctx);
        // A fall watch holds the offline timer back; after it, the silence counts again.
        self.arm_offline_timer(ctx);
        ActorResponse::r#async(verdict.map(|res, _, _| res.ok().map(|(status, _)| status)))
    }
}

impl Handler<CancelFall> for DeviceActor {
    type Result = ActorResponse<Self, Result<FallCancelled, StoreError>>;

    fn handle(&mut self, msg: CancelFall, ctx: &mut Self::Context) -> Self::Result {
        self.messages += 1;
        self.last_message_at = Some(msg.now);
        match &self.phase {
            Phase::Ready(_) => {}
            Phase::Unknown => {
                ctx.stop();
                return ActorResponse::reply(Ok(FallCancelled::UnknownDevice));
            }
            Phase::Loading(_) | Phase::Failed => {
                ctx.stop();
                return ActorResponse::reply(Err(StoreError::Unavailable(
                    "the device's state could not be loaded".to_owned(),
                )));
            }
        }
        let verdict = self.fall_verdict(msg.now, Some(msg.by), ctx);
        ActorResponse::r#async(verdict.map(|res, _, _| {
            res.map(|(_, stood_down)| {
                if stood_down {
                    FallCancelled::Cancelled
                } else {
                    FallCancelled::NoWatch
                }
            })
        }))
    }
}

/// The device said it is offline (its MQTT status, usually its Will): record `device.offline`
/// now rather than at the end of the silence. Answers whether it was recorded now (`false`:
/// no such device, or not heard since its last `device.offline`).
#[derive(Message, Debug)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct ReportedOffline {
    /// Readings whose stored `heard_at` mark is before this count as heard before the report.
    pub heard_before: DateTime<Utc>,
}

impl Handler<ReportedOffline> for DeviceActor {
    type Result = ResponseFuture<Result<bool, StoreError>>;

    fn handle(&mut self, msg: ReportedOffline, ctx: &mut Self::Context) -> Self::Result {
        self.messages += 1;
        self.last_message_at = Some(Utc::now());
        let Some(live) = self.live() else {
            let known = !matches!(self.phase, Phase::Unknown);
            ctx.stop();
            return Box::pin(async move {
                if known {
                    Err(StoreError::Unavailable(
                        "the device's state could not be loaded".to_owned(),
                    ))
                } else {
                    Ok(false)
                }
            });
        };
        // Nothing more to wait for: the silence timer finds the device recorded already.
        live.offline_due = None;
        // A running fall watch keeps the actor (it escalates on time, offline or not).
        let stop = live.fall.deadline().is_none();
        let recorded = self.went_offline(msg.heard_before, 0, stop, ctx);
        Box::pin(async move {
            recorded.await.unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "the device actor stopped".to_owned(),
                ))
            })
        })
    }
}

impl DeviceActor {
    /// Runs the fall watch at `now` (a tick, or a wearer cancel) and persists what follows.
    // Long on purpose: the fall watch's counterpart of ProcessReadings (verdict, status
    // change, hand-off, persist), read top to bottom.
    ///
    /// Answers the status and whether a running watch stood down (a wearer's cancel, `by`).
    fn fall_verdict(
        &mut self,
        now: DateTime<Utc>,
        cancel: Option<Role>,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<(TriageStatus, bool), StoreError>> {
        let id = self.id.clone();
        let Some(live) = self.live() else {
            return Box::pin(fut::ready(Err(StoreError::Unavailable(
                "the device is not ready".to_owned(),
            ))));
        };
        let watch = live.fall.active();
        let event = if cancel.is_some() {
            live.fall.on_cancel(now)
        } else {
            live.fall.on_tick(now)
        };
        let (to, reasons) = match event {
            FallEvent::Escalated => (TriageStatus::Emergency, vec![live.fall.escalation_reason()]),
            FallEvent::StoodDown => (
                live.last_assessed,
                vec!["fall alert cancelled by the wearer".to_owned()],
            ),
            FallEvent::None | FallEvent::Started => {
                let status = live.status;
                return Box::pin(fut::ready(Ok((status, false))));
            }
        };
        let stood_down = event == FallEvent::StoodDown;
        let from = live.status;
        let (patient_id, last_seen, fall) = (
            live.patient_id.clone(),
            live.last_measured.unwrap_or(now),
            live.fall.active(),
        );
        let leading: Vec<NewEvent> = match (cancel, watch) {
            (Some(by), Some((fall_at, deadline))) if stood_down => vec![
                DeviceEvent::FallCancelled {
                    device_id: id.clone(),
                    patient_id: patient_id.clone(),
                    fall_at,
                    deadline,
                    cancelled_at: now,
                    by,
                }
                .to_new(),
            ],
            _ => Vec::new(),
        };
        if to == from {
            // No status change, but the watch ended: store that, or it resumes after a restart.
            self.arm_offline_timer(ctx);
            let stored = self.store_fall_watch(
                ctx,
                patient_id,
                leading,
                Projected {
                    status: to,
                    last_seen,
                    fall,
                },
            );
            return Box::pin(stored.map(move |res, _, _| res.map(|status| (status, stood_down))));
        }
        live.status = to;
        let evidence: Vec<Reading> = evidence(&live.window, &id);
        let location = live.window.iter().rev().find_map(|r| r.location);
        let change = Change {
            from,
            to,
            reasons: reasons.clone(),
            measured_at: now,
            evidence: evidence.clone(),
        };
        let writer = self.runtime.writer.clone();
        let handoff = self.handoff.clone();
        let retention = self.runtime.retention;
        let rows = if retention == Retention::Evidence {
            evidence
                .iter()
                .map(|r| retained(r, &patient_id, to, now))
                .collect()
        } else {
            Vec::new()
        };
        self.arm_fall_timer(ctx);
        let (before, done) = self.next_in_line();
        let work = async move {
            let stored = match in_line(before).await {
                Ok(()) => {
                    persist_changes(
                        &writer,
                        id.clone(),
                        patient_id.clone(),
                        (leading, vec![change]),
                        rows,
                        Projected {
                            status: to,
                            last_seen,
                            fall,
                        },
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            let _ = done.send(stored.is_ok());
            stored?;
            if to == TriageStatus::Emergency {
                handoff
                    .send(EmergencyDetected {
                        patient_id,
                        device_id: id,
                        location,
                        reasons,
                        evidence,
                        detected_at: now,
                        onset: true,
                    })
                    .await
                    .map_err(|e| HandoffError::Unreachable(format!("incident hand-off: {e}")))??;
            }
            Ok::<_, StoreError>(())
        };
        Box::pin(work.into_actor(self).map(move |res, act, ctx| match res {
            Ok(()) => Ok((to, stood_down)),
            Err(e) => {
                tracing::warn!(device.id = %act.id, error = %e, "fall verdict not persisted");
                ctx.stop();
                Err(e)
            }
        }))
    }
}

impl Handler<InspectDevice> for DeviceActor {
    type Result = MessageResult<InspectDevice>;

    fn handle(&mut self, _: InspectDevice, _: &mut Self::Context) -> Self::Result {
        let state = match &self.phase {
            Phase::Loading(_) => DevicePhase::Loading,
            Phase::Unknown => DevicePhase::UnknownDevice,
            Phase::Failed => DevicePhase::Failed,
            Phase::Ready(live) => DevicePhase::Ready {
                patient_id: live.patient_id.clone(),
                status: live.status,
                last_measured_at: live.last_measured,
                fall_watch: live.fall.clone(),
                fall_deadline: live.fall.deadline(),
                window: evidence(&live.window, &self.id),
            },
        };
        MessageResult(DeviceInspection {
            id: self.id.clone(),
            messages: self.messages,
            last_message_at: self.last_message_at,
            state,
        })
    }
}

impl Handler<Summarise> for DeviceActor {
    type Result = MessageResult<Summarise>;

    fn handle(&mut self, _: Summarise, _: &mut Self::Context) -> Self::Result {
        let status = match &self.phase {
            Phase::Ready(live) => live.status.as_str().to_owned(),
            Phase::Loading(_) => "loading".to_owned(),
            Phase::Unknown => "unknown_device".to_owned(),
            Phase::Failed => "failed".to_owned(),
        };
        MessageResult(DeviceSummary {
            id: self.id.clone(),
            status,
            last_message_at: self.last_message_at,
        })
    }
}
