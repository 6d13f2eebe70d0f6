//! The incident lifecycle as a pure state machine.
//!
//! `decide(state, command, now)` validates a command against the current state and returns the
//! events it produces (or a [`Rejection`]); `evolve(state, event)` applies one event. Together
//! they are the function `(state, command, now) → (state, events) | rejection`
//! ([`handle`]). The actor persists the events *before* acting on them, and a restarted actor
//! rebuilds its state by folding [`evolve`] over the stored events ([`replay`]).
//!
//! ```text
//! detected ─► dispatching ─► assigned ─► enroute ─► on_scene ─► transporting ─► at_hospital ─► billing ─► closed
//!    │             │  ▲ (round expired/declined → next round; after N rounds: escalated flag)
//!    └─────────────┴──┴──── cancelled (dispatcher or patient, any state before at_hospital)
//! ```
//!
//! Pure: no I/O, no clock reads; ids and references are chosen by the caller.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::geo::LatLng;
use super::ids::{HospitalId, IncidentId, PatientId, UnitId};

/// Where an incident is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IncidentStatus {
    /// Opened; dispatch not yet started.
    Detected,
    /// Looking for a unit (offers out, or escalated to dispatchers).
    Dispatching,
    /// A unit accepted (or was assigned by hand).
    Assigned,
    /// The unit is driving to the scene.
    Enroute,
    /// The unit is at the scene.
    OnScene,
    /// The unit is taking the patient to hospital.
    Transporting,
    /// The patient has been handed over at the hospital.
    AtHospital,
    /// The billing saga runs.
    Billing,
    /// Finished: billed and closed.
    Closed,
    /// Called off before reaching hospital.
    Cancelled,
}

impl IncidentStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [IncidentStatus; 10] = [
        IncidentStatus::Detected,
        IncidentStatus::Dispatching,
        IncidentStatus::Assigned,
        IncidentStatus::Enroute,
        IncidentStatus::OnScene,
        IncidentStatus::Transporting,
        IncidentStatus::AtHospital,
        IncidentStatus::Billing,
        IncidentStatus::Closed,
        IncidentStatus::Cancelled,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            IncidentStatus::Detected => "detected",
            IncidentStatus::Dispatching => "dispatching",
            IncidentStatus::Assigned => "assigned",
            IncidentStatus::Enroute => "enroute",
            IncidentStatus::OnScene => "on_scene",
            IncidentStatus::Transporting => "transporting",
            IncidentStatus::AtHospital => "at_hospital",
            IncidentStatus::Billing => "billing",
            IncidentStatus::Closed => "closed",
            IncidentStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether the incident is still open (not closed or cancelled).
    pub fn is_open(self) -> bool {
        !matches!(self, IncidentStatus::Closed | IncidentStatus::Cancelled)
    }

    /// Whether it may still be cancelled (any state before `at_hospital`).
    pub fn is_cancellable(self) -> bool {
        matches!(
            self,
            IncidentStatus::Detected
                | IncidentStatus::Dispatching
                | IncidentStatus::Assigned
                | IncidentStatus::Enroute
                | IncidentStatus::OnScene
                | IncidentStatus::Transporting
        )
    }
}

/// How urgent (`docs/api.md`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Life-threatening (NHS category 1 / 2).
    #[default]
    Emergency,
    /// Urgent (category 3).
    Urgent,
    /// Non-urgent (category 4).
    NonUrgent,
}

impl Priority {
    /// The wire name (as serialised).
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Emergency => "emergency",
            Priority::Urgent => "urgent",
            Priority::NonUrgent => "non_urgent",
        }
    }
}

/// Where an incident came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Triage of a wearable's readings.
    Wearable,
    /// A patient app or API request.
    Request,
    /// A dispatcher at a console.
    Console,
}

/// NEMSIS-style times (eTimes): each set once, never moved backwards.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Times {
    /// eTimes.01/.02: call received (incident created).
    pub call_received: Option<DateTime<Utc>>,
    /// eTimes.03: unit notified (first offer or manual assignment).
    pub unit_notified: Option<DateTime<Utc>>,
    /// eTimes.05: unit en route.
    pub unit_enroute: Option<DateTime<Utc>>,
    /// eTimes.06: arrived on scene.
    pub unit_on_scene: Option<DateTime<Utc>>,
    /// eTimes.09: left scene (transporting).
    pub unit_left_scene: Option<DateTime<Utc>>,
    /// eTimes.11: at destination.
    pub at_destination: Option<DateTime<Utc>>,
    /// Closed or cancelled.
    pub closed: Option<DateTime<Utc>>,
}

/// The state of one incident, rebuilt from its events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    /// Its stable identifier.
    pub id: IncidentId,
    /// Human-readable reference (`INC-2026-000042`).
    pub reference: String,
    /// Lifecycle status.
    pub status: IncidentStatus,
    /// Clinical priority: `emergency`, `urgent` or `non_urgent`.
    pub priority: Priority,
    /// What opened it: a wearable alarm, a patient request or a dispatcher.
    pub source: Source,
    /// The patient, when known.
    pub patient_id: Option<PatientId>,
    /// Where help is needed.
    pub location: LatLng,
    /// Free text from the caller or dispatcher (may contain anything; never logged).
    pub description: Option<String>,
    /// When it was opened.
    pub created_at: DateTime<Utc>,
    /// Handed to the dispatchers because automatic dispatch found nobody.
    pub escalated: bool,
    /// The unit on the job.
    pub assigned_unit_id: Option<UnitId>,
    /// The destination hospital.
    pub hospital_id: Option<HospitalId>,
    /// Offer rounds started so far.
    pub dispatch_round: u32,
    /// NEMSIS times.
    pub times: Times,
    /// Evidence items attached (readings and notes).
    pub evidence_count: u32,
    /// Why it was cancelled.
    pub cancel_reason: Option<String>,
}

/// What a caller asks of an incident.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Open a new incident (only valid when there is none).
    Open {
        /// Chosen id.
        id: IncidentId,
        /// Chosen reference.
        reference: String,
        /// Clinical priority: `emergency`, `urgent` or `non_urgent`.
        priority: Priority,
        /// What opened it: a wearable alarm, a patient request or a dispatcher.
        source: Source,
        /// The patient, when known.
        patient_id: Option<PatientId>,
        /// Where the patient is (WGS 84).
        location: LatLng,
        /// Free text from whoever opened it (never logged).
        description: Option<String>,
        /// Initial evidence (e.g. the readings behind a triage verdict).
        evidence: Option<serde_json::Value>,
    },
    /// Attach evidence (a later emergency reading, a note) to an open incident.
    AddEvidence {
        /// The evidence.
        evidence: serde_json::Value,
    },
    /// Start looking for a unit (`detected → dispatching`).
    StartDispatch,
    /// A round of offers went out to these units (sets eTimes.03 the first time).
    RecordOffers {
        /// Units offered.
        unit_ids: Vec<UnitId>,
    },
    /// No unit could be found automatically: hand it to the dispatchers.
    Escalate {
        /// Why, in words for people (stored, and shown to dispatchers).
        reason: String,
    },
    /// A unit takes the job (accepted offer, or a dispatcher's manual assignment).
    Assign {
        /// The unit.
        unit_id: UnitId,
        /// Assigned by hand by a dispatcher.
        manual: bool,
    },
    /// The crew is driving to the scene.
    ReportEnroute,
    /// The crew arrived.
    ReportOnScene,
    /// The crew leaves with the patient.
    ReportTransporting {
        /// The hospital the patient is taken to.
        hospital_id: HospitalId,
    },
    /// Handed over at the hospital.
    ReportAtHospital,
    /// The billing saga starts.
    StartBilling,
    /// Billing ended: the incident is finished.
    Close {
        /// Outcome summary (`paid`, `failed`, …).
        outcome: String,
    },
    /// Call it off.
    Cancel {
        /// Why, in words for people (stored, and shown to dispatchers).
        reason: String,
        /// Who (`console`, `patient`, `admin`).
        by: String,
    },
}

/// Something that happened to an incident. Stored with [`IncidentEvent::kind`] and
/// [`IncidentEvent::data`].
///
/// The serde form is that stored envelope, `{"kind": "incident.created", "data": {…}}`: the
/// `kind` tags are the stable names [`IncidentEvent::kind`] returns, and `data` holds the
/// variant's fields in snake_case (for `incident.created`, the whole [`Incident`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "data")]
pub enum IncidentEvent {
    /// `incident.created`.
    #[serde(rename = "incident.created")]
    Created(Box<Incident>),
    /// `incident.evidence_added`.
    #[serde(rename = "incident.evidence_added")]
    EvidenceAdded {
        /// The evidence.
        evidence: serde_json::Value,
    },
    /// `incident.status_changed`.
    #[serde(rename = "incident.status_changed")]
    StatusChanged {
        /// Old status.
        from: IncidentStatus,
        /// New status.
        to: IncidentStatus,
        /// When it happened (server clock).
        at: DateTime<Utc>,
    },
    /// `dispatch.offered`.
    #[serde(rename = "dispatch.offered")]
    Offered {
        /// Units offered.
        unit_ids: Vec<UnitId>,
        /// Round number (1-based).
        round: u32,
        /// When it happened (server clock).
        at: DateTime<Utc>,
    },
    /// `incident.escalated`.
    #[serde(rename = "incident.escalated")]
    Escalated {
        /// Why, in words for people (stored, and shown to dispatchers).
        reason: String,
        /// When it happened (server clock).
        at: DateTime<Utc>,
    },
    /// `dispatch.assigned`.
    #[serde(rename = "dispatch.assigned")]
    Assigned {
        /// The unit.
        unit_id: UnitId,
        /// By hand.
        manual: bool,
        /// When it happened (server clock).
        at: DateTime<Utc>,
    },
    /// `incident.destination_set` (the hospital chosen at transport).
    #[serde(rename = "incident.destination_set")]
    DestinationSet {
        /// The hospital chosen as destination.
        hospital_id: HospitalId,
    },
    /// `incident.cancelled`.
    #[serde(rename = "incident.cancelled")]
    Cancelled {
        /// Why, in words for people (stored, and shown to dispatchers).
        reason: String,
        /// The role of whoever did it (`console`, `admin`, `patient`).
        by: String,
        /// When it happened (server clock).
        at: DateTime<Utc>,
    },
    /// `incident.closed`.
    #[serde(rename = "incident.closed")]
    Closed {
        /// How billing ended (`paid` or `failed`).
        outcome: String,
        /// When it happened (server clock).
        at: DateTime<Utc>,
    },
}

/// Why a command was refused (HTTP 409).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The command does not apply in the current status.
    #[error("cannot {command} an incident that is {status}")]
    IllegalTransition {
        /// What was asked.
        command: &'static str,
        /// Current status.
        status: &'static str,
    },
    /// `Open` on an existing incident, or any other command on none.
    #[error("{0}")]
    Invalid(String),
}

impl Command {
    /// The command's snake_case name, as reported in [`Rejection::IllegalTransition`].
    pub fn name(&self) -> &'static str {
        match self {
            Command::Open { .. } => "open",
            Command::AddEvidence { .. } => "add_evidence",
            Command::StartDispatch => "start_dispatch",
            Command::RecordOffers { .. } => "record_offers",
            Command::Escalate { .. } => "escalate",
            Command::Assign { .. } => "assign",
            Command::ReportEnroute => "report_enroute",
            Command::ReportOnScene => "report_on_scene",
            Command::ReportTransporting { .. } => "report_transporting",
            Command::ReportAtHospital => "report_at_hospital",
            Command::StartBilling => "start_billing",
            Command::Close { .. } => "close",
            Command::Cancel { .. } => "cancel",
        }
    }

    /// Checks the command's own payload, whatever the state: free-text fields that say why or
    /// who (`reference`, `reason`, `by`, `outcome`) must not be blank, and a round of offers
    /// must name at least one unit.
    fn validate(&self) -> Result<(), Rejection> {
        fn required(field: &str, value: &str) -> Result<(), Rejection> {
            if value.trim().is_empty() {
                Err(Rejection::Invalid(format!("{field} must not be empty")))
            } else {
                Ok(())
            }
        }
        match self {
            Command::Open { reference, .. } => required("reference", reference),
            Command::RecordOffers { unit_ids } if unit_ids.is_empty() => {
                Err(Rejection::Invalid("unit_ids must not be empty".to_owned()))
            }
            Command::Escalate { reason } => required("reason", reason),
            Command::Close { outcome } => required("outcome", outcome),
            Command::Cancel { reason, by } => {
                required("reason", reason)?;
                required("by", by)
            }
            Command::AddEvidence { .. }
            | Command::StartDispatch
            | Command::RecordOffers { .. }
            | Command::Assign { .. }
            | Command::ReportEnroute
            | Command::ReportOnScene
            | Command::ReportTransporting { .. }
            | Command::ReportAtHospital
            | Command::StartBilling => Ok(()),
        }
    }
}

impl IncidentEvent {
    /// Every stored kind name, one per variant.
    pub const KINDS: [&'static str; 9] = [
        "incident.created",
        "incident.evidence_added",
        "incident.status_changed",
        "dispatch.offered",
        "incident.escalated",
        "dispatch.assigned",
        "incident.destination_set",
        "incident.cancelled",
        "incident.closed",
    ];

    /// The stable kind name the event is stored and streamed under (`incident.created`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            IncidentEvent::Created(_) => "incident.created",
            IncidentEvent::EvidenceAdded { .. } => "incident.evidence_added",
            IncidentEvent::StatusChanged { .. } => "incident.status_changed",
            IncidentEvent::Offered { .. } => "dispatch.offered",
            IncidentEvent::Escalated { .. } => "incident.escalated",
            IncidentEvent::Assigned { .. } => "dispatch.assigned",
            IncidentEvent::DestinationSet { .. } => "incident.destination_set",
            IncidentEvent::Cancelled { .. } => "incident.cancelled",
            IncidentEvent::Closed { .. } => "incident.closed",
        }
    }

    /// The event's data as a JSON object with snake_case fields, for the event store and the
    /// console stream: `incident.created` carries the whole [`Incident`] (ids, status,
    /// location, description, times; it holds no secrets), `incident.status_changed` carries
    /// `{from, to, at}`, `dispatch.assigned` `{unit_id, manual, at}`, and so on, field for field.
    ///
    /// [`IncidentEvent::from_stored`] reads it back exactly.
    pub fn data(&self) -> serde_json::Value {
        // Serialising these plain types cannot fail (no maps with non-string keys, no custom
        // serialisers; a non-finite coordinate becomes `null`), and the adjacently tagged form
        // is always `{kind, data}`, so the `Null` fallback is never taken.
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut envelope)) => {
                envelope.remove("data").unwrap_or(serde_json::Value::Null)
            }
            _ => serde_json::Value::Null,
        }
    }

    /// Reads an event back from its stored `kind` and `data` (the inverse of
    /// [`IncidentEvent::kind`] and [`IncidentEvent::data`]).
    ///
    /// Unknown fields in `data` are ignored, so events written by a newer version still load.
    /// The error says which kind failed and why; it is meant for operators and may quote a
    /// malformed value, so do not log it next to patient data.
    pub fn from_stored(kind: &str, data: &serde_json::Value) -> Result<IncidentEvent, String> {
        if !Self::KINDS.contains(&kind) {
            return Err(format!("unknown incident event kind `{kind}`"));
        }
        let mut envelope = serde_json::Map::new();
        envelope.insert(
            "kind".to_owned(),
            serde_json::Value::String(kind.to_owned()),
        );
        envelope.insert("data".to_owned(), data.clone());
        serde_json::from_value(serde_json::Value::Object(envelope))
            .map_err(|e| format!("malformed `{kind}` event data: {e}"))
    }
}

/// Validates `command` against the current state and returns the events it produces.
///
/// - `state` is `None` until the incident exists: only [`Command::Open`] is valid then, and
///   `Open` on an existing incident is [`Rejection::Invalid`].
/// - A malformed command (blank reason, no units offered, …) is [`Rejection::Invalid`] in any
///   state, checked before the status.
/// - A command that does not fit the status is [`Rejection::IllegalTransition`]; the edges are
///   the ones drawn in the module docs, nothing is skipped.
/// - Repeating a step in the status it leads to (`ReportEnroute` when already `enroute`,
///   `StartDispatch` when `dispatching`, `Close` when `closed`, `Cancel` when `cancelled`,
///   `Escalate` when already escalated, `ReportTransporting` to the same hospital) is accepted
///   with no events, so a crew or a saga retrying a report is not told off. Anything further
///   back is refused.
/// - [`Command::Assign`] is legal only while `dispatching`: the first accept moves the incident
///   to `assigned`, so a second one is refused (first accept wins).
///
/// Every event that carries a time carries `now`; the caller owns the clock.
pub fn decide(
    state: Option<&Incident>,
    command: &Command,
    now: DateTime<Utc>,
) -> Result<Vec<IncidentEvent>, Rejection> {
    command.validate()?;
    match (state, command) {
        (
            None,
            Command::Open {
                id,
                reference,
                priority,
                source,
                patient_id,
                location,
                description,
                evidence,
            },
        ) => {
            // The created incident has no evidence yet: the initial evidence, if any, follows
            // as its own `incident.evidence_added` event (the only place the evidence itself is
            // stored), which brings `evidence_count` to 1. Counting it in `Created` as well
            // would count it twice on replay.
            let incident = Incident {
                id: *id,
                reference: reference.clone(),
                status: IncidentStatus::Detected,
                priority: *priority,
                source: *source,
                patient_id: patient_id.clone(),
                location: *location,
                description: description.clone(),
                created_at: now,
                escalated: false,
                assigned_unit_id: None,
                hospital_id: None,
                dispatch_round: 0,
                times: Times {
                    call_received: Some(now),
                    ..Times::default()
                },
                evidence_count: 0,
                cancel_reason: None,
            };
            let mut events = vec![IncidentEvent::Created(Box::new(incident))];
            if let Some(evidence) = evidence {
                events.push(IncidentEvent::EvidenceAdded {
                    evidence: evidence.clone(),
                });
            }
            Ok(events)
        }
        (Some(_), Command::Open { .. }) => {
            Err(Rejection::Invalid("incident already exists".to_owned()))
        }
        (None, _) => Err(Rejection::Invalid("no such incident".to_owned())),
        (Some(incident), command) => decide_existing(incident, command, now),
    }
}

/// [`decide`] for a command other than `Open` on an incident that exists.
///
/// Long on purpose: one match over every command, each arm the whole rule for that command,
/// so the state machine can be read (and reviewed against docs/domain.md) in one place.
fn decide_existing(
    incident: &Incident,
    command: &Command,
    now: DateTime<Utc>,
) -> Result<Vec<IncidentEvent>, Rejection> {
    use IncidentStatus as S;

    let status = incident.status;
    let illegal = || Rejection::IllegalTransition {
        command: command.name(),
        status: status.as_str(),
    };
    // A plain step `from → to`: one status change; a no-op when already at `to`.
    let step = |from: S, to: S| -> Result<Vec<IncidentEvent>, Rejection> {
        if status == from {
            Ok(vec![changed(from, to, now)])
        } else if status == to {
            Ok(Vec::new())
        } else {
            Err(illegal())
        }
    };

    match command {
        Command::Open { .. } => Err(Rejection::Invalid("incident already exists".to_owned())),
        Command::AddEvidence { evidence } if status.is_open() => {
            Ok(vec![IncidentEvent::EvidenceAdded {
                evidence: evidence.clone(),
            }])
        }
        Command::StartDispatch => step(S::Detected, S::Dispatching),
        Command::RecordOffers { unit_ids } if status == S::Dispatching => {
            Ok(vec![IncidentEvent::Offered {
                unit_ids: unit_ids.clone(),
                round: incident.dispatch_round.saturating_add(1),
                at: now,
            }])
        }
        Command::Escalate { .. } if status == S::Dispatching && incident.escalated => {
            Ok(Vec::new())
        }
        Command::Escalate { reason } if status == S::Dispatching => {
            Ok(vec![IncidentEvent::Escalated {
                reason: reason.clone(),
                at: now,
            }])
        }
        Command::Assign { unit_id, manual } if status == S::Dispatching => Ok(vec![
            IncidentEvent::Assigned {
                unit_id: unit_id.clone(),
                manual: *manual,
                at: now,
            },
            changed(S::Dispatching, S::Assigned, now),
        ]),
        Command::ReportEnroute => step(S::Assigned, S::Enroute),
        Command::ReportOnScene => step(S::Enroute, S::OnScene),
        Command::ReportTransporting { hospital_id } if status == S::OnScene => Ok(vec![
            IncidentEvent::DestinationSet {
                hospital_id: hospital_id.clone(),
            },
            changed(S::OnScene, S::Transporting, now),
        ]),
        // A retry names the same hospital; a different one is not a repeat (diversion is not
        // modelled), so it is refused rather than silently ignored.
        Command::ReportTransporting { hospital_id }
            if status == S::Transporting && incident.hospital_id.as_ref() == Some(hospital_id) =>
        {
            Ok(Vec::new())
        }
        Command::ReportAtHospital => step(S::Transporting, S::AtHospital),
        Command::StartBilling => step(S::AtHospital, S::Billing),
        Command::Close { outcome } if status == S::Billing => Ok(vec![
            IncidentEvent::Closed {
                outcome: outcome.clone(),
                at: now,
            },
            changed(S::Billing, S::Closed, now),
        ]),
        // The first outcome stands; the incident does not keep it, so a retry cannot be
        // compared with it and is simply accepted.
        Command::Close { .. } if status == S::Closed => Ok(Vec::new()),
        Command::Cancel { .. } if status == S::Cancelled => Ok(Vec::new()),
        Command::Cancel { reason, by } if status.is_cancellable() => Ok(vec![
            IncidentEvent::Cancelled {
                reason: reason.clone(),
                by: by.clone(),
                at: now,
            },
            changed(status, S::Cancelled, now),
        ]),
        Command::AddEvidence { .. }
        | Command::RecordOffers { .. }
        | Command::Escalate { .. }
        | Command::Assign { .. }
        | Command::ReportTransporting { .. }
        | Command::Close { .. }
        | Command::Cancel { .. } => Err(illegal()),
    }
}

/// A `StatusChanged` event.
fn changed(from: IncidentStatus, to: IncidentStatus, at: DateTime<Utc>) -> IncidentEvent {
    IncidentEvent::StatusChanged { from, to, at }
}

/// Sets a time that is not set yet; a set time is never moved (NEMSIS times are recorded once).
fn set_once(slot: &mut Option<DateTime<Utc>>, at: DateTime<Utc>) {
    if slot.is_none() {
        *slot = Some(at);
    }
}

/// Applies one event to the state.
///
/// Events are facts already decided, so `evolve` does not re-check them; it only keeps the
/// state's own rules: times are set once (never overwritten, so never moved backwards) and
/// `dispatch_round` never decreases.
///
/// - `Created` on `None` gives the incident; on an existing incident it is ignored (a stream
///   has one creation, the first one wins). Any other event on `None` gives `None`.
/// - `StatusChanged` sets the status and the NEMSIS time of the status it enters: `enroute` →
///   `unit_enroute`, `on_scene` → `unit_on_scene`, `transporting` → `unit_left_scene`,
///   `at_hospital` → `at_destination`, `closed`/`cancelled` → `closed`.
/// - `Offered` sets `dispatch_round` to the round and `unit_notified` the first time.
/// - `Assigned` sets `assigned_unit_id` and `unit_notified` if no offer set it (a manual
///   assignment notifies the unit). `escalated` stays `true` if it was: it records that
///   automatic dispatch failed, which stays true after a dispatcher steps in.
/// - `Escalated`, `DestinationSet`, `EvidenceAdded` (counts one), `Cancelled` (reason, closed
///   time) and `Closed` (closed time) set what their names say.
pub fn evolve(state: Option<Incident>, event: &IncidentEvent) -> Option<Incident> {
    let mut incident = match (state, event) {
        (None, IncidentEvent::Created(created)) => return Some(created.as_ref().clone()),
        (None, _) => return None,
        (Some(incident), _) => incident,
    };
    match event {
        IncidentEvent::Created(_) => {}
        IncidentEvent::EvidenceAdded { .. } => {
            incident.evidence_count = incident.evidence_count.saturating_add(1);
        }
        IncidentEvent::StatusChanged { to, at, .. } => {
            incident.status = *to;
            let times = &mut incident.times;
            let slot = match to {
                IncidentStatus::Enroute => Some(&mut times.unit_enroute),
                IncidentStatus::OnScene => Some(&mut times.unit_on_scene),
                IncidentStatus::Transporting => Some(&mut times.unit_left_scene),
                IncidentStatus::AtHospital => Some(&mut times.at_destination),
                IncidentStatus::Closed | IncidentStatus::Cancelled => Some(&mut times.closed),
                IncidentStatus::Detected
                | IncidentStatus::Dispatching
                | IncidentStatus::Assigned
                | IncidentStatus::Billing => None,
            };
            if let Some(slot) = slot {
                set_once(slot, *at);
            }
        }
        IncidentEvent::Offered { round, at, .. } => {
            incident.dispatch_round = incident.dispatch_round.max(*round);
            set_once(&mut incident.times.unit_notified, *at);
        }
        IncidentEvent::Escalated { .. } => incident.escalated = true,
        IncidentEvent::Assigned { unit_id, at, .. } => {
            incident.assigned_unit_id = Some(unit_id.clone());
            set_once(&mut incident.times.unit_notified, *at);
        }
        IncidentEvent::DestinationSet { hospital_id } => {
            incident.hospital_id = Some(hospital_id.clone());
        }
        IncidentEvent::Cancelled { reason, at, .. } => {
            incident.cancel_reason = Some(reason.clone());
            set_once(&mut incident.times.closed, *at);
        }
        IncidentEvent::Closed { at, .. } => set_once(&mut incident.times.closed, *at),
    }
    Some(incident)
}

/// Decides and applies: the new state and the events to persist (in order, before acting on
/// them).
///
/// An accepted command with no events (an idempotent repeat) returns the state unchanged and
/// an empty list: there is nothing to store.
pub fn handle(
    state: Option<&Incident>,
    command: &Command,
    now: DateTime<Utc>,
) -> Result<(Incident, Vec<IncidentEvent>), Rejection> {
    let events = decide(state, command, now)?;
    let next = events.iter().fold(state.cloned(), evolve);
    // `decide` only accepts a command on no incident when it creates one, so `None` here
    // cannot happen; it is refused rather than assumed.
    next.map(|incident| (incident, events))
        .ok_or_else(|| Rejection::Invalid("no such incident".to_owned()))
}

/// Rebuilds the state from stored events, oldest first (`None` if they do not start with
/// `incident.created`).
pub fn replay<'a>(events: impl IntoIterator<Item = &'a IncidentEvent>) -> Option<Incident> {
    events.into_iter().fold(None, evolve)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};
    use serde_json::{Value, json};
    use uuid::Uuid;

    use IncidentStatus as S;

    fn t(minutes: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 8, 0, 0).unwrap() + Duration::minutes(minutes)
    }

    fn incident_id() -> IncidentId {
        IncidentId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0042))
    }

    fn open(evidence: Option<Value>) -> Command {
        Command::Open {
            id: incident_id(),
            reference: "INC-2026-000042".to_owned(),
            priority: Priority::Emergency,
            source: Source::Wearable,
            patient_id: Some(PatientId::from("p-1")),
            location: LatLng {
                lat: 51.5080,
                lng: -0.1281,
            },
            description: Some("fell down the stairs".to_owned()),
            evidence,
        }
    }

    fn assign(unit: &str, manual: bool) -> Command {
        Command::Assign {
            unit_id: UnitId::from(unit),
            manual,
        }
    }

    fn offers(units: &[&str]) -> Command {
        Command::RecordOffers {
            unit_ids: units.iter().map(|u| UnitId::from(*u)).collect(),
        }
    }

    fn transporting(hospital: &str) -> Command {
        Command::ReportTransporting {
            hospital_id: HospitalId::from(hospital),
        }
    }

    fn escalate() -> Command {
        Command::Escalate {
            reason: "no unit accepted after 3 rounds".to_owned(),
        }
    }

    fn close() -> Command {
        Command::Close {
            outcome: "paid".to_owned(),
        }
    }

    fn cancel() -> Command {
        Command::Cancel {
            reason: "patient is fine".to_owned(),
            by: "console".to_owned(),
        }
    }

    /// The commands that lead from nothing to `status`, one minute apart.
    fn path_to(status: IncidentStatus) -> Vec<Command> {
        if status == S::Cancelled {
            return vec![open(None), Command::StartDispatch, cancel()];
        }
        let happy = [
            open(None),
            Command::StartDispatch,
            offers(&["u1", "u2", "u3"]),
            assign("u1", false),
            Command::ReportEnroute,
            Command::ReportOnScene,
            transporting("h1"),
            Command::ReportAtHospital,
            Command::StartBilling,
            close(),
        ];
        let mut commands = Vec::new();
        for command in happy {
            let state = run(&commands).map(|(s, _)| s);
            if state.as_ref().map(|s| s.status) == Some(status) {
                break;
            }
            commands.push(command);
        }
        commands
    }

    /// Applies `commands` from nothing, the n-th at minute n; the state and every event.
    fn run(commands: &[Command]) -> Option<(Incident, Vec<IncidentEvent>)> {
        let mut state = None;
        let mut events = Vec::new();
        for (minute, command) in (0..).zip(commands) {
            let (next, new) = handle(state.as_ref(), command, t(minute))
                .unwrap_or_else(|e| panic!("{} refused: {e}", command.name()));
            state = Some(next);
            events.extend(new);
        }
        state.map(|s| (s, events))
    }

    /// An incident in `status`, reached through the real transitions.
    fn incident_in(status: IncidentStatus) -> Incident {
        let (incident, _) = run(&path_to(status)).unwrap();
        assert_eq!(incident.status, status);
        incident
    }

    /// One valid command of every kind.
    fn every_command() -> Vec<Command> {
        vec![
            open(None),
            Command::AddEvidence {
                evidence: json!({"note": "still conscious"}),
            },
            Command::StartDispatch,
            offers(&["u7"]),
            escalate(),
            assign("u9", true),
            Command::ReportEnroute,
            Command::ReportOnScene,
            transporting("h1"),
            Command::ReportAtHospital,
            Command::StartBilling,
            close(),
            cancel(),
        ]
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        /// Accepted with events.
        Legal,
        /// Accepted with no events.
        NoOp,
        /// `Rejection::IllegalTransition`.
        Illegal,
        /// `Rejection::Invalid`.
        Invalid,
    }

    /// The transition table, written out independently of `decide`.
    fn expected(status: IncidentStatus, command: &str) -> Outcome {
        use Outcome::*;
        let cancellable = matches!(
            status,
            S::Detected | S::Dispatching | S::Assigned | S::Enroute | S::OnScene | S::Transporting
        );
        match (command, status) {
            ("open", _) => Invalid,
            ("add_evidence", S::Closed | S::Cancelled) => Illegal,
            ("add_evidence", _) => Legal,
            ("start_dispatch", S::Detected) => Legal,
            ("start_dispatch", S::Dispatching) => NoOp,
            ("record_offers" | "escalate" | "assign", S::Dispatching) => Legal,
            ("report_enroute", S::Assigned) => Legal,
            ("report_enroute", S::Enroute) => NoOp,
            ("report_on_scene", S::Enroute) => Legal,
            ("report_on_scene", S::OnScene) => NoOp,
            ("report_transporting", S::OnScene) => Legal,
            ("report_transporting", S::Transporting) => NoOp,
            ("report_at_hospital", S::Transporting) => Legal,
            ("report_at_hospital", S::AtHospital) => NoOp,
            ("start_billing", S::AtHospital) => Legal,
            ("start_billing", S::Billing) => NoOp,
            ("close", S::Billing) => Legal,
            ("close", S::Closed) => NoOp,
            ("cancel", S::Cancelled) => NoOp,
            ("cancel", _) if cancellable => Legal,
            _ => Illegal,
        }
    }

    fn outcome(result: &Result<Vec<IncidentEvent>, Rejection>) -> Outcome {
        match result {
            Ok(events) if events.is_empty() => Outcome::NoOp,
            Ok(_) => Outcome::Legal,
            Err(Rejection::IllegalTransition { .. }) => Outcome::Illegal,
            Err(Rejection::Invalid(_)) => Outcome::Invalid,
        }
    }

    #[test]
    fn every_command_in_every_status_matches_the_table() {
        let mut legal = 0;
        for status in IncidentStatus::ALL {
            let incident = incident_in(status);
            for command in every_command() {
                let result = decide(Some(&incident), &command, t(100));
                assert_eq!(
                    outcome(&result),
                    expected(status, command.name()),
                    "{} in {}",
                    command.name(),
                    status.as_str()
                );
                match result {
                    Err(Rejection::IllegalTransition {
                        command: name,
                        status: st,
                    }) => {
                        assert_eq!(name, command.name());
                        assert_eq!(st, status.as_str());
                    }
                    Ok(events) if !events.is_empty() => legal += 1,
                    _ => {}
                }
            }
        }
        // add_evidence in the 8 open statuses, cancel in the 6 cancellable ones, the 8 forward
        // steps, and record_offers and escalate while dispatching.
        assert_eq!(legal, 8 + 6 + 8 + 2);
    }

    #[test]
    fn rejection_messages_name_the_command_and_status() {
        let incident = incident_in(S::Detected);
        let err = decide(Some(&incident), &Command::ReportOnScene, t(5)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot report_on_scene an incident that is detected"
        );
    }

    #[test]
    fn open_creates_a_detected_incident() {
        let (incident, events) = handle(None, &open(None), t(0)).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(
            events[0],
            IncidentEvent::Created(Box::new(incident.clone()))
        );
        assert_eq!(incident.status, S::Detected);
        assert_eq!(incident.id, incident_id());
        assert_eq!(incident.reference, "INC-2026-000042");
        assert_eq!(incident.created_at, t(0));
        assert_eq!(
            incident.times,
            Times {
                call_received: Some(t(0)),
                ..Times::default()
            }
        );
        assert_eq!(incident.evidence_count, 0);
        assert_eq!(incident.dispatch_round, 0);
        assert!(!incident.escalated);
        assert_eq!(incident.assigned_unit_id, None);
        assert_eq!(incident.hospital_id, None);
        assert_eq!(incident.cancel_reason, None);
    }

    #[test]
    fn open_with_evidence_adds_it_as_its_own_event() {
        let readings = json!({"heart_rate_bpm": 182, "spo2_pct": 84});
        let (incident, events) = handle(None, &open(Some(readings.clone())), t(0)).unwrap();
        assert_eq!(events.len(), 2);
        let IncidentEvent::Created(created) = &events[0] else {
            panic!("first event is {:?}", events[0]);
        };
        assert_eq!(created.evidence_count, 0);
        assert_eq!(
            events[1],
            IncidentEvent::EvidenceAdded { evidence: readings }
        );
        assert_eq!(incident.evidence_count, 1);
        assert_eq!(replay(&events), Some(incident));
    }

    #[test]
    fn open_on_an_existing_incident_and_commands_on_none_are_invalid() {
        let incident = incident_in(S::Detected);
        assert_eq!(
            decide(Some(&incident), &open(None), t(1)),
            Err(Rejection::Invalid("incident already exists".to_owned()))
        );
        for command in every_command().into_iter().skip(1) {
            assert_eq!(
                decide(None, &command, t(1)),
                Err(Rejection::Invalid("no such incident".to_owned())),
                "{}",
                command.name()
            );
            assert!(handle(None, &command, t(1)).is_err());
        }
    }

    #[test]
    fn malformed_commands_are_invalid_in_any_status() {
        let blank = [
            Command::RecordOffers { unit_ids: vec![] },
            Command::Escalate {
                reason: " ".to_owned(),
            },
            Command::Close {
                outcome: String::new(),
            },
            Command::Cancel {
                reason: String::new(),
                by: "console".to_owned(),
            },
            Command::Cancel {
                reason: "duplicate".to_owned(),
                by: String::new(),
            },
        ];
        for status in IncidentStatus::ALL {
            let incident = incident_in(status);
            for command in &blank {
                assert!(
                    matches!(
                        decide(Some(&incident), command, t(50)),
                        Err(Rejection::Invalid(_))
                    ),
                    "{} in {}",
                    command.name(),
                    status.as_str()
                );
            }
        }
        let Command::Open {
            id,
            priority,
            source,
            patient_id,
            location,
            description,
            evidence,
            ..
        } = open(None)
        else {
            unreachable!()
        };
        let blank_reference = Command::Open {
            id,
            reference: String::new(),
            priority,
            source,
            patient_id,
            location,
            description,
            evidence,
        };
        assert!(matches!(
            decide(None, &blank_reference, t(0)),
            Err(Rejection::Invalid(_))
        ));
    }

    #[test]
    fn happy_path_to_closed_sets_every_time_in_order() {
        let commands = [
            open(Some(json!({"news2": 9}))),
            Command::StartDispatch,
            offers(&["u1", "u2", "u3"]),
            assign("u2", false),
            Command::ReportEnroute,
            Command::ReportOnScene,
            transporting("h1"),
            Command::ReportAtHospital,
            Command::StartBilling,
            close(),
        ];
        let mut state: Option<Incident> = None;
        let mut all = Vec::new();
        let mut kinds = Vec::new();
        for (minute, command) in (0..).zip(&commands) {
            let (next, events) = handle(state.as_ref(), command, t(minute)).unwrap();
            kinds.push(events.iter().map(IncidentEvent::kind).collect::<Vec<_>>());
            for event in &events {
                if let IncidentEvent::StatusChanged { at, from, to } = event {
                    assert_eq!(*at, t(minute));
                    assert_eq!(Some(*from), state.as_ref().map(|s| s.status));
                    assert_eq!(*to, next.status);
                }
            }
            all.extend(events);
            state = Some(next);
        }
        assert_eq!(
            kinds,
            [
                vec!["incident.created", "incident.evidence_added"],
                vec!["incident.status_changed"],
                vec!["dispatch.offered"],
                vec!["dispatch.assigned", "incident.status_changed"],
                vec!["incident.status_changed"],
                vec!["incident.status_changed"],
                vec!["incident.destination_set", "incident.status_changed"],
                vec!["incident.status_changed"],
                vec!["incident.status_changed"],
                vec!["incident.closed", "incident.status_changed"],
            ]
        );
        let incident = state.unwrap();
        assert_eq!(incident.status, S::Closed);
        assert_eq!(
            incident.times,
            Times {
                call_received: Some(t(0)),
                unit_notified: Some(t(2)),
                unit_enroute: Some(t(4)),
                unit_on_scene: Some(t(5)),
                unit_left_scene: Some(t(6)),
                at_destination: Some(t(7)),
                closed: Some(t(9)),
            }
        );
        assert_eq!(incident.assigned_unit_id, Some(UnitId::from("u2")));
        assert_eq!(incident.hospital_id, Some(HospitalId::from("h1")));
        assert_eq!(incident.dispatch_round, 1);
        assert_eq!(incident.evidence_count, 1);
        assert!(!incident.escalated);
        assert_eq!(replay(&all), Some(incident));
    }

    #[test]
    fn each_forward_step_changes_exactly_its_status_and_time() {
        let steps: [(IncidentStatus, Command, IncidentStatus); 8] = [
            (S::Detected, Command::StartDispatch, S::Dispatching),
            (S::Dispatching, assign("u5", false), S::Assigned),
            (S::Assigned, Command::ReportEnroute, S::Enroute),
            (S::Enroute, Command::ReportOnScene, S::OnScene),
            (S::OnScene, transporting("h2"), S::Transporting),
            (S::Transporting, Command::ReportAtHospital, S::AtHospital),
            (S::AtHospital, Command::StartBilling, S::Billing),
            (S::Billing, close(), S::Closed),
        ];
        for (from, command, to) in steps {
            let before = incident_in(from);
            let (after, events) = handle(Some(&before), &command, t(60)).unwrap();
            assert_eq!(after.status, to);
            assert_eq!(
                events.last(),
                Some(&IncidentEvent::StatusChanged {
                    from,
                    to,
                    at: t(60)
                })
            );
            let mut expected = before.clone();
            expected.status = to;
            match to {
                S::Assigned => {
                    expected.assigned_unit_id = Some(UnitId::from("u5"));
                    // No offer went out on this path: assignment notifies the unit.
                    expected.times.unit_notified = Some(t(60));
                }
                S::Enroute => expected.times.unit_enroute = Some(t(60)),
                S::OnScene => expected.times.unit_on_scene = Some(t(60)),
                S::Transporting => {
                    expected.hospital_id = Some(HospitalId::from("h2"));
                    expected.times.unit_left_scene = Some(t(60));
                }
                S::AtHospital => expected.times.at_destination = Some(t(60)),
                S::Closed => expected.times.closed = Some(t(60)),
                _ => {}
            }
            if from == S::Dispatching {
                // `incident_in(Dispatching)` has had no offers yet.
                assert_eq!(before.times.unit_notified, None);
            }
            assert_eq!(after, expected, "{} → {}", from.as_str(), to.as_str());
        }
    }

    #[test]
    fn offers_count_rounds_and_notify_once() {
        let dispatching = incident_in(S::Dispatching);
        let (one, events) = handle(Some(&dispatching), &offers(&["u1", "u2"]), t(10)).unwrap();
        assert_eq!(
            events,
            [IncidentEvent::Offered {
                unit_ids: vec![UnitId::from("u1"), UnitId::from("u2")],
                round: 1,
                at: t(10),
            }]
        );
        assert_eq!(one.status, S::Dispatching);
        let (two, _) = handle(Some(&one), &offers(&["u3"]), t(11)).unwrap();
        assert_eq!(two.dispatch_round, 2);
        assert_eq!(two.times.unit_notified, Some(t(10)));
        let (assigned, _) = handle(Some(&two), &assign("u3", false), t(12)).unwrap();
        assert_eq!(assigned.times.unit_notified, Some(t(10)));
        assert_eq!(assigned.dispatch_round, 2);
    }

    #[test]
    fn escalate_then_manual_assign() {
        let dispatching = incident_in(S::Dispatching);
        let mut state = dispatching;
        for round in 1..=3 {
            state = handle(Some(&state), &offers(&["u1"]), t(10 + round))
                .unwrap()
                .0;
        }
        let (escalated, events) = handle(Some(&state), &escalate(), t(20)).unwrap();
        assert_eq!(
            events,
            [IncidentEvent::Escalated {
                reason: "no unit accepted after 3 rounds".to_owned(),
                at: t(20),
            }]
        );
        assert!(escalated.escalated);
        assert_eq!(escalated.status, S::Dispatching);

        // A second escalation (another timer firing) is a no-op.
        let (again, events) = handle(Some(&escalated), &escalate(), t(21)).unwrap();
        assert!(events.is_empty());
        assert_eq!(again, escalated);

        let (assigned, events) = handle(Some(&escalated), &assign("u8", true), t(22)).unwrap();
        assert_eq!(
            events,
            [
                IncidentEvent::Assigned {
                    unit_id: UnitId::from("u8"),
                    manual: true,
                    at: t(22),
                },
                IncidentEvent::StatusChanged {
                    from: S::Dispatching,
                    to: S::Assigned,
                    at: t(22),
                },
            ]
        );
        assert_eq!(assigned.status, S::Assigned);
        assert_eq!(assigned.assigned_unit_id, Some(UnitId::from("u8")));
        assert!(assigned.escalated, "escalation stays on record");
        assert_eq!(assigned.times.unit_notified, Some(t(11)));
        assert_eq!(assigned.dispatch_round, 3);
    }

    #[test]
    fn escalated_with_no_candidate_then_manual_assign_notifies_the_unit() {
        let dispatching = incident_in(S::Dispatching);
        let (escalated, _) = handle(Some(&dispatching), &escalate(), t(10)).unwrap();
        assert_eq!(escalated.times.unit_notified, None);
        let (assigned, _) = handle(Some(&escalated), &assign("u8", true), t(15)).unwrap();
        assert_eq!(assigned.times.unit_notified, Some(t(15)));
    }

    #[test]
    fn first_accept_wins() {
        let (mut state, _) = run(&[
            open(None),
            Command::StartDispatch,
            offers(&["u1", "u2", "u3"]),
        ])
        .unwrap();
        state = handle(Some(&state), &assign("u2", false), t(10)).unwrap().0;
        for unit in ["u1", "u3", "u2"] {
            assert_eq!(
                handle(Some(&state), &assign(unit, false), t(11)),
                Err(Rejection::IllegalTransition {
                    command: "assign",
                    status: "assigned",
                })
            );
        }
        assert_eq!(state.assigned_unit_id, Some(UnitId::from("u2")));
    }

    #[test]
    fn cancel_from_every_cancellable_status() {
        for status in IncidentStatus::ALL
            .into_iter()
            .filter(|s| s.is_cancellable())
        {
            let before = incident_in(status);
            let (after, events) = handle(Some(&before), &cancel(), t(70)).unwrap();
            assert_eq!(
                events,
                [
                    IncidentEvent::Cancelled {
                        reason: "patient is fine".to_owned(),
                        by: "console".to_owned(),
                        at: t(70),
                    },
                    IncidentEvent::StatusChanged {
                        from: status,
                        to: S::Cancelled,
                        at: t(70),
                    },
                ]
            );
            let mut expected = before.clone();
            expected.status = S::Cancelled;
            expected.cancel_reason = Some("patient is fine".to_owned());
            expected.times.closed = Some(t(70));
            assert_eq!(after, expected, "from {}", status.as_str());
        }
        assert_eq!(
            IncidentStatus::ALL
                .into_iter()
                .filter(|s| s.is_cancellable())
                .count(),
            6
        );
    }

    #[test]
    fn cancel_is_refused_from_at_hospital_on() {
        for status in [S::AtHospital, S::Billing, S::Closed] {
            let incident = incident_in(status);
            assert_eq!(
                decide(Some(&incident), &cancel(), t(70)),
                Err(Rejection::IllegalTransition {
                    command: "cancel",
                    status: status.as_str(),
                })
            );
        }
    }

    #[test]
    fn cancelling_twice_is_a_no_op_and_keeps_the_first_reason() {
        let cancelled = incident_in(S::Cancelled);
        let other = Command::Cancel {
            reason: "changed mind".to_owned(),
            by: "patient".to_owned(),
        };
        let (again, events) = handle(Some(&cancelled), &other, t(80)).unwrap();
        assert!(events.is_empty());
        assert_eq!(again, cancelled);
        assert_eq!(again.cancel_reason.as_deref(), Some("patient is fine"));
    }

    #[test]
    fn repeating_a_report_in_the_status_it_leads_to_is_a_no_op() {
        let repeats = [
            (S::Dispatching, Command::StartDispatch),
            (S::Enroute, Command::ReportEnroute),
            (S::OnScene, Command::ReportOnScene),
            (S::Transporting, transporting("h1")),
            (S::AtHospital, Command::ReportAtHospital),
            (S::Billing, Command::StartBilling),
            (S::Closed, close()),
            (S::Cancelled, cancel()),
        ];
        for (status, command) in repeats {
            let incident = incident_in(status);
            let (same, events) = handle(Some(&incident), &command, t(90)).unwrap();
            assert!(events.is_empty(), "{}", command.name());
            assert_eq!(same, incident, "{}", command.name());
        }
    }

    #[test]
    fn stale_or_different_reports_are_refused() {
        let on_scene = incident_in(S::OnScene);
        assert_eq!(
            decide(Some(&on_scene), &Command::ReportEnroute, t(90)),
            Err(Rejection::IllegalTransition {
                command: "report_enroute",
                status: "on_scene",
            })
        );
        let transporting_h1 = incident_in(S::Transporting);
        assert_eq!(
            decide(Some(&transporting_h1), &transporting("h2"), t(90)),
            Err(Rejection::IllegalTransition {
                command: "report_transporting",
                status: "transporting",
            })
        );
        // No skipping ahead either.
        let assigned = incident_in(S::Assigned);
        assert!(decide(Some(&assigned), &Command::ReportOnScene, t(90)).is_err());
    }

    #[test]
    fn evidence_is_counted_while_open_and_refused_after() {
        let evidence = Command::AddEvidence {
            evidence: json!({"heart_rate_bpm": 40}),
        };
        let billing = incident_in(S::Billing);
        let (after, events) = handle(Some(&billing), &evidence, t(90)).unwrap();
        assert_eq!(
            events,
            [IncidentEvent::EvidenceAdded {
                evidence: json!({"heart_rate_bpm": 40}),
            }]
        );
        assert_eq!(after.evidence_count, billing.evidence_count + 1);
        assert_eq!(after.status, S::Billing);
        for status in [S::Closed, S::Cancelled] {
            assert_eq!(
                decide(Some(&incident_in(status)), &evidence, t(90)),
                Err(Rejection::IllegalTransition {
                    command: "add_evidence",
                    status: status.as_str(),
                })
            );
        }
    }

    #[test]
    fn evolve_sets_times_once_only() {
        let mut incident = incident_in(S::Enroute);
        let enroute = incident.times.unit_enroute;
        assert!(enroute.is_some());
        // A duplicated or late event cannot move a recorded time.
        incident = evolve(
            Some(incident),
            &IncidentEvent::StatusChanged {
                from: S::Assigned,
                to: S::Enroute,
                at: t(500),
            },
        )
        .unwrap();
        assert_eq!(incident.times.unit_enroute, enroute);
        let notified = incident.times.unit_notified;
        incident = evolve(
            Some(incident),
            &IncidentEvent::Offered {
                unit_ids: vec![UnitId::from("u1")],
                round: 1,
                at: t(501),
            },
        )
        .unwrap();
        assert_eq!(incident.times.unit_notified, notified);
    }

    #[test]
    fn evolve_and_replay_need_a_creation_first() {
        let changed = IncidentEvent::StatusChanged {
            from: S::Detected,
            to: S::Dispatching,
            at: t(1),
        };
        assert_eq!(evolve(None, &changed), None);
        assert_eq!(replay([&changed]), None);
        assert_eq!(replay([]), None);

        // A second creation in a stream does not reset the incident.
        let (dispatching, events) = run(&path_to(S::Dispatching)).unwrap();
        let mut other = incident_in(S::Detected);
        other.reference = "INC-2026-000099".to_owned();
        let again = evolve(
            Some(dispatching.clone()),
            &IncidentEvent::Created(Box::new(other)),
        );
        assert_eq!(again, Some(dispatching.clone()));
        assert_eq!(replay(&events), Some(dispatching));
    }

    /// One event of every kind, with every optional field filled.
    fn every_event() -> Vec<IncidentEvent> {
        let mut incident = incident_in(S::Detected);
        incident.times.unit_notified = Some(t(3) + Duration::nanoseconds(123_456_789));
        incident.hospital_id = Some(HospitalId::from("h1"));
        incident.assigned_unit_id = Some(UnitId::from("u1"));
        incident.cancel_reason = Some("duplicate".to_owned());
        incident.escalated = true;
        incident.dispatch_round = 3;
        incident.evidence_count = 2;
        incident.priority = Priority::NonUrgent;
        incident.source = Source::Console;
        incident.location = LatLng {
            lat: -33.868_820_1,
            lng: 151.209_295_7,
        };
        vec![
            IncidentEvent::Created(Box::new(incident.clone())),
            IncidentEvent::Created(Box::new(Incident {
                patient_id: None,
                description: None,
                ..incident
            })),
            IncidentEvent::EvidenceAdded {
                evidence: json!({"readings": [{"heart_rate_bpm": 182.5}], "note": null}),
            },
            IncidentEvent::StatusChanged {
                from: S::OnScene,
                to: S::Transporting,
                at: t(1),
            },
            IncidentEvent::Offered {
                unit_ids: vec![UnitId::from("u1"), UnitId::from("u2")],
                round: 2,
                at: t(2),
            },
            IncidentEvent::Escalated {
                reason: "no candidate".to_owned(),
                at: t(3),
            },
            IncidentEvent::Assigned {
                unit_id: UnitId::from("u2"),
                manual: true,
                at: t(4),
            },
            IncidentEvent::DestinationSet {
                hospital_id: HospitalId::from("h9"),
            },
            IncidentEvent::Cancelled {
                reason: "patient is fine".to_owned(),
                by: "patient".to_owned(),
                at: t(5),
            },
            IncidentEvent::Closed {
                outcome: "paid".to_owned(),
                at: t(6),
            },
        ]
    }

    #[test]
    fn every_event_round_trips_through_kind_and_data() {
        let events = every_event();
        let mut kinds: Vec<&str> = events.iter().map(IncidentEvent::kind).collect();
        kinds.dedup();
        assert_eq!(kinds, IncidentEvent::KINDS);
        for event in events {
            let data = event.data();
            assert!(data.is_object(), "{}: {data}", event.kind());
            assert_eq!(
                IncidentEvent::from_stored(event.kind(), &data).as_ref(),
                Ok(&event)
            );
            // As text, the way a database column holds it.
            let stored: Value = serde_json::from_str(&data.to_string()).unwrap();
            assert_eq!(
                IncidentEvent::from_stored(event.kind(), &stored),
                Ok(event.clone())
            );
            let envelope = serde_json::to_value(&event).unwrap();
            assert_eq!(envelope["kind"], event.kind());
            assert_eq!(envelope["data"], data);
        }
    }

    #[test]
    fn event_data_is_readable_json() {
        let status = IncidentEvent::StatusChanged {
            from: S::OnScene,
            to: S::Transporting,
            at: t(1),
        };
        assert_eq!(
            status.data(),
            json!({"from": "on_scene", "to": "transporting", "at": "2026-11-23T08:01:00Z"})
        );
        let assigned = IncidentEvent::Assigned {
            unit_id: UnitId::from("u2"),
            manual: false,
            at: t(4),
        };
        assert_eq!(
            assigned.data(),
            json!({"unit_id": "u2", "manual": false, "at": "2026-11-23T08:04:00Z"})
        );
        let offered = IncidentEvent::Offered {
            unit_ids: vec![UnitId::from("u1")],
            round: 1,
            at: t(0),
        };
        assert_eq!(
            offered.data(),
            json!({"unit_ids": ["u1"], "round": 1, "at": "2026-11-23T08:00:00Z"})
        );
        assert_eq!(
            IncidentEvent::DestinationSet {
                hospital_id: HospitalId::from("h1")
            }
            .data(),
            json!({"hospital_id": "h1"})
        );
        let created = IncidentEvent::Created(Box::new(incident_in(S::Detected))).data();
        assert_eq!(created["id"], json!(incident_id().to_string()));
        assert_eq!(created["status"], "detected");
        assert_eq!(created["priority"], "emergency");
        assert_eq!(created["source"], "wearable");
        assert_eq!(created["times"]["call_received"], "2026-11-23T08:00:00Z");
        assert_eq!(created["times"]["unit_notified"], Value::Null);
        assert_eq!(created["location"], json!({"lat": 51.5080, "lng": -0.1281}));
    }

    #[test]
    fn from_stored_refuses_unknown_kinds_and_bad_data() {
        assert!(
            IncidentEvent::from_stored("incident.exploded", &json!({}))
                .unwrap_err()
                .contains("unknown incident event kind")
        );
        assert!(
            IncidentEvent::from_stored("incident.status_changed", &json!({"from": "detected"}))
                .unwrap_err()
                .contains("incident.status_changed")
        );
        assert!(
            IncidentEvent::from_stored(
                "dispatch.assigned",
                &json!({"unit_id": "u1", "manual": "yes", "at": "2026-11-23T08:00:00Z"})
            )
            .is_err()
        );
        assert!(IncidentEvent::from_stored("incident.created", &json!(null)).is_err());
        // Fields added by a later version are ignored.
        assert_eq!(
            IncidentEvent::from_stored(
                "incident.destination_set",
                &json!({"hospital_id": "h1", "eta_s": 300})
            ),
            Ok(IncidentEvent::DestinationSet {
                hospital_id: HospitalId::from("h1")
            })
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A step of a random run: the next command on the happy path for whatever the status
        /// is then (so runs get far), or any command at all.
        #[derive(Clone, Debug)]
        enum Step {
            Forward(UnitId, HospitalId),
            Any(Command),
        }

        fn unit() -> impl Strategy<Value = UnitId> {
            prop::sample::select(vec!["u1", "u2", "u3"]).prop_map(UnitId::from)
        }

        fn hospital() -> impl Strategy<Value = HospitalId> {
            prop::sample::select(vec!["h1", "h2"]).prop_map(HospitalId::from)
        }

        fn text() -> impl Strategy<Value = String> {
            prop::sample::select(vec!["", "no units", "paid", "patient is fine"])
                .prop_map(str::to_owned)
        }

        fn any_command() -> impl Strategy<Value = Command> {
            prop_oneof![
                1 => any::<bool>().prop_map(|e| open(e.then(|| json!({"news2": 7})))),
                3 => Just(Command::AddEvidence { evidence: json!({"note": "x"}) }),
                3 => Just(Command::StartDispatch),
                3 => prop::collection::vec(unit(), 0..3)
                    .prop_map(|unit_ids| Command::RecordOffers { unit_ids }),
                3 => text().prop_map(|reason| Command::Escalate { reason }),
                3 => (unit(), any::<bool>())
                    .prop_map(|(unit_id, manual)| Command::Assign { unit_id, manual }),
                3 => Just(Command::ReportEnroute),
                3 => Just(Command::ReportOnScene),
                3 => hospital().prop_map(|hospital_id| Command::ReportTransporting { hospital_id }),
                3 => Just(Command::ReportAtHospital),
                3 => Just(Command::StartBilling),
                3 => text().prop_map(|outcome| Command::Close { outcome }),
                1 => (text(), prop::sample::select(vec!["console", "patient", ""]))
                    .prop_map(|(reason, by)| Command::Cancel { reason, by: by.to_owned() }),
            ]
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                (unit(), hospital()).prop_map(|(u, h)| Step::Forward(u, h)),
                any_command().prop_map(Step::Any),
            ]
        }

        fn forward(status: IncidentStatus, unit_id: UnitId, hospital_id: HospitalId) -> Command {
            match status {
                S::Detected => Command::StartDispatch,
                S::Dispatching => Command::Assign {
                    unit_id,
                    manual: false,
                },
                S::Assigned => Command::ReportEnroute,
                S::Enroute => Command::ReportOnScene,
                S::OnScene => Command::ReportTransporting { hospital_id },
                S::Transporting => Command::ReportAtHospital,
                S::AtHospital => Command::StartBilling,
                S::Billing | S::Closed | S::Cancelled => close(),
            }
        }

        /// The edges of the lifecycle, written out independently of `decide`.
        fn allowed(from: IncidentStatus, to: IncidentStatus) -> bool {
            from == to
                || matches!(
                    (from, to),
                    (S::Detected, S::Dispatching)
                        | (S::Dispatching, S::Assigned)
                        | (S::Assigned, S::Enroute)
                        | (S::Enroute, S::OnScene)
                        | (S::OnScene, S::Transporting)
                        | (S::Transporting, S::AtHospital)
                        | (S::AtHospital, S::Billing)
                        | (S::Billing, S::Closed)
                        | (
                            S::Detected
                                | S::Dispatching
                                | S::Assigned
                                | S::Enroute
                                | S::OnScene
                                | S::Transporting,
                            S::Cancelled
                        )
                )
        }

        /// The NEMSIS times in the order they happen.
        fn ordered(times: &Times) -> [Option<DateTime<Utc>>; 7] {
            [
                times.call_received,
                times.unit_notified,
                times.unit_enroute,
                times.unit_on_scene,
                times.unit_left_scene,
                times.at_destination,
                times.closed,
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn random_runs_keep_the_invariants(
                steps in prop::collection::vec((step(), 0..=300_i64), 1..80),
            ) {
                let mut now = t(0);
                let (mut state, mut log) = handle(None, &open(None), now).unwrap();
                let mut ever_assigned = false;
                let mut ever_transporting = false;
                for (step, gap_s) in steps {
                    now += Duration::seconds(gap_s);
                    let command = match step {
                        Step::Forward(unit_id, hospital_id) => forward(state.status, unit_id, hospital_id),
                        Step::Any(command) => command,
                    };
                    let Ok((next, events)) = handle(Some(&state), &command, now) else {
                        continue;
                    };

                    // Closed and cancelled are final.
                    if !state.status.is_open() {
                        prop_assert!(events.is_empty(), "{} after {:?}", command.name(), state.status);
                    }
                    if events.is_empty() {
                        prop_assert_eq!(&next, &state);
                    }
                    // Status only moves along the drawn edges.
                    prop_assert!(allowed(state.status, next.status),
                        "{:?} → {:?} by {}", state.status, next.status, command.name());

                    // Times are set once, at `now`, and never move backwards.
                    for (before, after) in ordered(&state.times).into_iter().zip(ordered(&next.times)) {
                        match before {
                            Some(_) => prop_assert_eq!(after, before),
                            None => prop_assert!(after.is_none() || after == Some(now)),
                        }
                    }
                    let set: Vec<_> = ordered(&next.times).into_iter().flatten().collect();
                    prop_assert!(set.windows(2).all(|w| w[0] <= w[1]), "{:?}", next.times);

                    // Rounds never go down; the assigned unit and destination never change.
                    prop_assert!(next.dispatch_round >= state.dispatch_round);
                    if state.assigned_unit_id.is_some() {
                        prop_assert_eq!(&next.assigned_unit_id, &state.assigned_unit_id);
                    }
                    if state.hospital_id.is_some() {
                        prop_assert_eq!(&next.hospital_id, &state.hospital_id);
                    }

                    ever_assigned |= next.status == S::Assigned;
                    ever_transporting |= next.status == S::Transporting;
                    let assigned = match next.status {
                        S::Detected | S::Dispatching => false,
                        S::Cancelled => ever_assigned,
                        _ => true,
                    };
                    prop_assert_eq!(next.assigned_unit_id.is_some(), assigned);
                    let destination = match next.status {
                        S::Transporting | S::AtHospital | S::Billing | S::Closed => true,
                        S::Cancelled => ever_transporting,
                        _ => false,
                    };
                    prop_assert_eq!(next.hospital_id.is_some(), destination);
                    prop_assert_eq!(next.cancel_reason.is_some(), next.status == S::Cancelled);

                    for event in &events {
                        prop_assert_eq!(
                            IncidentEvent::from_stored(event.kind(), &event.data()),
                            Ok(event.clone())
                        );
                    }
                    log.extend(events);
                    state = next;
                    // Replaying everything stored gives the live state.
                    prop_assert_eq!(replay(&log), Some(state.clone()));
                }
            }
        }
    }
}
