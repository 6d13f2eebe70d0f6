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
    /// Finished.
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

/// How urgent (`api.md`).
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
    /// Id.
    pub id: IncidentId,
    /// Human-readable reference (`INC-2026-000042`).
    pub reference: String,
    /// Lifecycle status.
    pub status: IncidentStatus,
    /// Priority.
    pub priority: Priority,
    /// Origin.
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
        /// Priority.
        priority: Priority,
        /// Origin.
        source: Source,
        /// Patient.
        patient_id: Option<PatientId>,
        /// Location.
        location: LatLng,
        /// Description.
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
        /// Why.
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
        /// Destination.
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
        /// Why.
        reason: String,
        /// Who (`console`, `patient`, `admin`).
        by: String,
    },
}

/// Something that happened to an incident. Stored with [`IncidentEvent::kind`] and
/// [`IncidentEvent::data`].
#[derive(Clone, Debug, PartialEq)]
pub enum IncidentEvent {
    /// `incident.created`.
    Created(Box<Incident>),
    /// `incident.evidence_added`.
    EvidenceAdded {
        /// The evidence.
        evidence: serde_json::Value,
    },
    /// `incident.status_changed`.
    StatusChanged {
        /// Old status.
        from: IncidentStatus,
        /// New status.
        to: IncidentStatus,
        /// When.
        at: DateTime<Utc>,
    },
    /// `dispatch.offered`.
    Offered {
        /// Units offered.
        unit_ids: Vec<UnitId>,
        /// Round number (1-based).
        round: u32,
        /// When.
        at: DateTime<Utc>,
    },
    /// `incident.escalated`.
    Escalated {
        /// Why.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// `dispatch.assigned`.
    Assigned {
        /// The unit.
        unit_id: UnitId,
        /// By hand.
        manual: bool,
        /// When.
        at: DateTime<Utc>,
    },
    /// `incident.destination_set` (the hospital chosen at transport).
    DestinationSet {
        /// Hospital.
        hospital_id: HospitalId,
    },
    /// `incident.cancelled`.
    Cancelled {
        /// Why.
        reason: String,
        /// Who.
        by: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// `incident.closed`.
    Closed {
        /// Outcome.
        outcome: String,
        /// When.
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
