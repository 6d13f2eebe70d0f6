//! Event envelopes: what the event store records and what consoles receive.
//!
//! An event is `{seq, at, kind, incident_id?, unit_id?, device_id?, data}` (`docs/api.md` "Event
//! stream"). `seq` is global and gap-free; `version` orders events within one stream (one
//! incident, one unit, one device) and is the optimistic-concurrency check on append.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::billing::{Coverage, InvoiceStatus, Step};
use super::dispatch::UnitStatus;
use super::ids::{DeviceId, IncidentId, OfferId, PatientId, UnitId};
use super::triage::TriageStatus;
use super::vitals::Reading;

/// An event to append (no sequence or time yet).
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// Stable kind name, e.g. `incident.created`.
    pub kind: String,
    /// The incident this event concerns, if any.
    pub incident_id: Option<IncidentId>,
    /// The unit this event concerns, if any.
    pub unit_id: Option<UnitId>,
    /// The device this event concerns, if any.
    pub device_id: Option<DeviceId>,
    /// Event-specific data.
    pub data: serde_json::Value,
}

impl NewEvent {
    /// An event of `kind` with `data` and no correlation ids.
    pub fn new(kind: impl Into<String>, data: serde_json::Value) -> Self {
        Self {
            kind: kind.into(),
            incident_id: None,
            unit_id: None,
            device_id: None,
            data,
        }
    }
}

/// An event as stored: with its global sequence, stream version and time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RecordedEvent {
    /// Global, gap-free, increasing sequence.
    pub seq: i64,
    /// When it was recorded.
    pub at: DateTime<Utc>,
    /// Stable kind name.
    pub kind: String,
    /// The incident this event concerns, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incident_id: Option<IncidentId>,
    /// The unit this event concerns, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit_id: Option<UnitId>,
    /// The device this event concerns, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<DeviceId>,
    /// Event-specific data.
    pub data: serde_json::Value,
    /// The stream this event belongs to (not part of the console frame): a stream name such as
    /// `incident-<uuid>` or `unit-<id>`, not an id, so it stays text.
    #[serde(skip)]
    pub stream_id: String,
    /// Position within the stream, starting at 1 (not part of the console frame).
    #[serde(skip)]
    pub version: i64,
}

/// What the appender believes the stream's current version is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append regardless of the current version (for streams with a single writer by design).
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream's last version must be exactly this.
    Exact(i64),
}

impl ExpectedVersion {
    /// Whether a stream whose last version is `actual` (0 = empty) satisfies the expectation.
    pub fn matches(self, actual: i64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == 0,
            ExpectedVersion::Exact(v) => v == actual,
        }
    }
}

/// The data of an adjacently tagged event (`{kind, data}`): serialising these plain types
/// cannot fail, so the `Null` fallback is never taken.
fn data_of(event: &impl Serialize) -> serde_json::Value {
    match serde_json::to_value(event) {
        Ok(serde_json::Value::Object(mut envelope)) => {
            envelope.remove("data").unwrap_or(serde_json::Value::Null)
        }
        _ => serde_json::Value::Null,
    }
}

/// What a unit's stream records (`unit-{id}`). The serde form is the stored envelope,
/// `{"kind": "unit.status_changed", "data": {…}}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", content = "data")]
pub enum UnitEvent {
    /// `unit.status_changed`: a status change, or a correction at start-up.
    #[serde(rename = "unit.status_changed")]
    StatusChanged {
        /// The unit.
        unit_id: UnitId,
        /// Status before.
        from: UnitStatus,
        /// Status after.
        to: UnitStatus,
        /// The incident the unit is on after the change.
        incident_id: Option<IncidentId>,
        /// Set when the change reconciles the unit with the open incidents at start-up.
        #[serde(flatten)]
        reconciled: Option<Reconciled>,
    },
    /// `unit.location`: a position fix (stored at most once a second per unit).
    #[serde(rename = "unit.location")]
    Location {
        /// The unit.
        unit_id: UnitId,
        /// Latitude in degrees (WGS 84, -90 to 90).
        lat: f64,
        /// Longitude in degrees (WGS 84, -180 to 180).
        lng: f64,
        /// When measured.
        at: DateTime<Utc>,
        /// Speed, m/s.
        speed_mps: Option<f64>,
        /// Heading, degrees.
        heading_deg: Option<f64>,
        /// The unit's status at the time.
        status: UnitStatus,
    },
}

/// A unit change that corrects the unit after a stop (see [`UnitEvent::StatusChanged`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reconciled {
    /// Always `true`: marks the change as a reconciliation.
    pub reconciled: bool,
    /// The incident the unit held before.
    pub previous_incident_id: Option<IncidentId>,
}

impl UnitEvent {
    /// The event to append, with its correlation ids.
    pub fn to_new(&self) -> NewEvent {
        let (kind, unit_id, incident_id) = match self {
            UnitEvent::StatusChanged {
                unit_id,
                incident_id,
                ..
            } => ("unit.status_changed", unit_id, *incident_id),
            UnitEvent::Location { unit_id, .. } => ("unit.location", unit_id, None),
        };
        let mut event = NewEvent::new(kind, data_of(self));
        event.unit_id = Some(unit_id.clone());
        event.incident_id = incident_id;
        event
    }
}

/// What a device's stream records (`device-{id}`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", content = "data")]
pub enum DeviceEvent {
    /// `vitals.status_changed`: the wearer's triage status changed.
    #[serde(rename = "vitals.status_changed")]
    StatusChanged {
        /// The device.
        device_id: DeviceId,
        /// Its wearer.
        patient_id: PatientId,
        /// Status before.
        from: TriageStatus,
        /// Status after.
        to: TriageStatus,
        /// Why, for people.
        reasons: Vec<String>,
        /// When the reading behind it was measured.
        measured_at: DateTime<Utc>,
        /// The readings behind it.
        evidence: Vec<Reading>,
    },
    /// `device.offline`: the device fell silent.
    #[serde(rename = "device.offline")]
    Offline {
        /// The device.
        device_id: DeviceId,
        /// Its wearer.
        patient_id: PatientId,
        /// Its last reading's time, if any.
        last_seen_at: Option<DateTime<Utc>>,
        /// The silence that counts as offline, seconds.
        silent_s: u64,
    },
    /// `device.fall_cancelled`: the wearer said "I'm OK" while a fall watch ran; it stands
    /// down without escalating.
    #[serde(rename = "device.fall_cancelled")]
    FallCancelled {
        /// The device.
        device_id: DeviceId,
        /// Its wearer.
        patient_id: PatientId,
        /// When the fall was detected (the reading's time).
        fall_at: DateTime<Utc>,
        /// When the watch would have escalated.
        deadline: DateTime<Utc>,
        /// When it was cancelled (server clock).
        cancelled_at: DateTime<Utc>,
        /// Who sent the cancel: `gateway` (the device's button) or `patient` (the app).
        by: crate::domain::auth::Role,
    },
}

impl DeviceEvent {
    /// The event to append, with its correlation id.
    pub fn to_new(&self) -> NewEvent {
        let (kind, device_id) = match self {
            DeviceEvent::StatusChanged { device_id, .. } => ("vitals.status_changed", device_id),
            DeviceEvent::Offline { device_id, .. } => ("device.offline", device_id),
            DeviceEvent::FallCancelled { device_id, .. } => ("device.fall_cancelled", device_id),
        };
        let mut event = NewEvent::new(kind, data_of(self));
        event.device_id = Some(device_id.clone());
        event
    }
}

/// The data of an untagged payload (a struct or an internally tagged enum): as with
/// [`data_of`], serialising these plain types cannot fail, so the `Null` fallback is never taken.
fn value_of(data: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(data).unwrap_or(serde_json::Value::Null)
}

/// The data of a `dispatch.offer_<status>` event: an offer was closed (accepted, declined,
/// expired or withdrawn). The status is part of the kind, so it is not a field here.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OfferClosed<'a> {
    /// The offer.
    pub offer_id: OfferId,
    /// Its incident.
    pub incident_id: IncidentId,
    /// The unit it was made to.
    pub unit_id: &'a UnitId,
    /// Why it was closed, for people.
    pub reason: &'a str,
    /// When (server clock).
    pub at: DateTime<Utc>,
}

impl OfferClosed<'_> {
    /// The `dispatch.offer_{status}` event to append, with its correlation ids.
    pub fn to_new(&self, status: &str) -> NewEvent {
        let mut event = NewEvent::new(format!("dispatch.offer_{status}"), value_of(self));
        event.incident_id = Some(self.incident_id);
        event.unit_id = Some(self.unit_id.clone());
        event
    }
}

/// Evidence attached to an incident (`incident.evidence_added`), when SHERS produces it
/// itself. The serde form is internally tagged: `{"kind": "vitals", …}`, `{"kind": "caller", …}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Evidence {
    /// A wearable's readings turned `emergency`.
    Vitals {
        /// The device that reported them.
        device_id: DeviceId,
        /// When the emergency reading was measured.
        detected_at: DateTime<Utc>,
        /// Why, for people.
        reasons: Vec<String>,
        /// The readings behind the verdict, newest last.
        readings: Vec<Reading>,
    },
    /// Who called it in (a console or patient request); either may be `null`.
    Caller {
        /// The caller's name, for people.
        name: Option<String>,
        /// Call-back number.
        phone: Option<String>,
    },
}

impl Evidence {
    /// The evidence as the incident stores it.
    pub fn to_value(&self) -> serde_json::Value {
        value_of(self)
    }
}

/// What the next-of-kin outbox records: `notification.queued` (on the incident's stream, with
/// the command that queued it) and the final delivery outcome (on `notifications-{incident}`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", content = "data")]
pub enum NotificationEvent<'a> {
    /// `notification.queued`: an outbox row was written.
    #[serde(rename = "notification.queued")]
    Queued {
        /// The outbox row.
        notification_id: &'a str,
        /// The incident it is about.
        incident_id: IncidentId,
        /// Who (a name: patient data).
        recipient: &'a str,
        /// `sms` or `email`.
        channel: &'a str,
        /// Template name.
        template: &'a str,
    },
    /// `notification.sent`: the provider took the message.
    #[serde(rename = "notification.sent")]
    Sent(DeliveryOutcome<'a>),
    /// `notification.failed`: delivery gave up (permanent error or attempts exhausted).
    #[serde(rename = "notification.failed")]
    Failed(DeliveryOutcome<'a>),
}

/// The data of `notification.sent` / `notification.failed`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeliveryOutcome<'a> {
    /// The outbox row.
    pub notification_id: &'a str,
    /// The incident it is about.
    pub incident_id: IncidentId,
    /// `sms`, `email`, `webhook` or `sns` (the SNS topic).
    pub channel: &'a str,
    /// Template name.
    pub template: &'a str,
    /// Attempts made, this one included.
    pub attempts: i32,
    /// The last error, if any (`null` when sent at the first try).
    pub reason: Option<&'a str>,
}

impl NotificationEvent<'_> {
    /// The event to append, with its correlation id.
    pub fn to_new(&self) -> NewEvent {
        let (kind, incident_id) = match self {
            NotificationEvent::Queued { incident_id, .. } => ("notification.queued", *incident_id),
            NotificationEvent::Sent(o) => ("notification.sent", o.incident_id),
            NotificationEvent::Failed(o) => ("notification.failed", o.incident_id),
        };
        let mut event = NewEvent::new(kind, data_of(self));
        event.incident_id = Some(incident_id);
        event
    }
}

/// What a billing saga records (`billing-{incident}`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", content = "data")]
pub enum BillingEvent {
    /// `billing.started`: the invoice was created.
    #[serde(rename = "billing.started")]
    Started {
        /// The incident billed.
        incident_id: IncidentId,
        /// The invoice.
        invoice_id: String,
        /// The amount, in minor units.
        amount_cents: i64,
        /// ISO currency code.
        currency: String,
        /// Scene to hospital, metres (rounded; a float, as stored so far).
        distance_m: f64,
        /// Whether the unit was advanced life support.
        als: bool,
    },
    /// `billing.insurance_verified`: the insurer decided.
    #[serde(rename = "billing.insurance_verified")]
    InsuranceVerified {
        /// The incident billed.
        incident_id: IncidentId,
        /// The kind of coverage.
        coverage_status: Coverage,
        /// Paid by the insurer, in minor units.
        covered_cents: i64,
        /// Owed by the patient, in minor units.
        patient_due_cents: i64,
    },
    /// `billing.payment_succeeded`.
    #[serde(rename = "billing.payment_succeeded")]
    PaymentSucceeded {
        /// The incident billed.
        incident_id: IncidentId,
        /// The payment intent's status.
        status: String,
    },
    /// `billing.payment_failed`: the charge came back unsuccessful (`status`) or was
    /// refused (`reason`); exactly one of the two is present.
    #[serde(rename = "billing.payment_failed")]
    PaymentFailed {
        /// The incident billed.
        incident_id: IncidentId,
        /// The payment intent's status, when the provider answered with one.
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<String>,
        /// Why the charge was refused, when it was.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// `billing.compensated`: a compensation step ran.
    #[serde(rename = "billing.compensated")]
    Compensated {
        /// The incident billed.
        incident_id: IncidentId,
        /// The compensation.
        step: Step,
    },
    /// `billing.completed`: the saga ended paid.
    #[serde(rename = "billing.completed")]
    Completed(BillingOutcome),
    /// `billing.failed`: the saga ended unpaid.
    #[serde(rename = "billing.failed")]
    Failed(BillingOutcome),
}

/// The data of `billing.completed` / `billing.failed`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BillingOutcome {
    /// The incident billed.
    pub incident_id: IncidentId,
    /// The invoice's final status.
    pub status: InvoiceStatus,
    /// Why it failed, if it did.
    pub reason: Option<String>,
}

impl BillingEvent {
    /// The event to append, with its correlation id.
    pub fn to_new(&self) -> NewEvent {
        let (kind, incident_id) = match self {
            BillingEvent::Started { incident_id, .. } => ("billing.started", incident_id),
            BillingEvent::InsuranceVerified { incident_id, .. } => {
                ("billing.insurance_verified", incident_id)
            }
            BillingEvent::PaymentSucceeded { incident_id, .. } => {
                ("billing.payment_succeeded", incident_id)
            }
            BillingEvent::PaymentFailed { incident_id, .. } => {
                ("billing.payment_failed", incident_id)
            }
            BillingEvent::Compensated { incident_id, .. } => ("billing.compensated", incident_id),
            BillingEvent::Completed(o) => ("billing.completed", &o.incident_id),
            BillingEvent::Failed(o) => ("billing.failed", &o.incident_id),
        };
        let mut event = NewEvent::new(kind, data_of(self));
        event.incident_id = Some(*incident_id);
        event
    }
}

#[cfg(test)]
mod typed_event_tests {
    use super::*;

    #[test]
    fn the_envelope_keeps_its_wire_shape_with_typed_ids() {
        let at: DateTime<Utc> = "2026-12-05T08:00:00Z".parse().unwrap_or_default();
        let id = "0190a1b2-0000-7000-8000-00000000000a";
        let event = RecordedEvent {
            seq: 7,
            at,
            kind: "dispatch.offer_accepted".into(),
            incident_id: id.parse().ok(),
            unit_id: Some(UnitId::from("U-1")),
            device_id: Some(DeviceId::from("d-1")),
            data: serde_json::json!({}),
            stream_id: format!("incident-{id}"),
            version: 3,
        };
        assert_eq!(
            serde_json::to_string(&event).unwrap_or_default(),
            format!(
                r#"{{"seq":7,"at":"2026-12-05T08:00:00Z","kind":"dispatch.offer_accepted","incident_id":"{id}","unit_id":"U-1","device_id":"d-1","data":{{}}}}"#
            )
        );
        let bare = RecordedEvent {
            incident_id: None,
            unit_id: None,
            device_id: None,
            ..event
        };
        assert_eq!(
            serde_json::to_string(&bare).unwrap_or_default(),
            r#"{"seq":7,"at":"2026-12-05T08:00:00Z","kind":"dispatch.offer_accepted","data":{}}"#
        );
    }

    #[test]
    fn unit_and_device_events_keep_their_stored_shape() {
        let at: DateTime<Utc> = "2026-12-05T08:00:00Z".parse().unwrap_or_default();
        let changed = UnitEvent::StatusChanged {
            unit_id: UnitId::from("U-1"),
            from: UnitStatus::Available,
            to: UnitStatus::Offered,
            incident_id: None,
            reconciled: None,
        }
        .to_new();
        assert_eq!(changed.kind, "unit.status_changed");
        assert_eq!(changed.unit_id, Some(UnitId::from("U-1")));
        assert_eq!(
            changed.data,
            serde_json::json!({"unit_id": "U-1", "from": "available", "to": "offered",
                               "incident_id": null})
        );
        let reconciled = UnitEvent::StatusChanged {
            unit_id: UnitId::from("U-1"),
            from: UnitStatus::Available,
            to: UnitStatus::Available,
            incident_id: None,
            reconciled: Some(Reconciled {
                reconciled: true,
                previous_incident_id: None,
            }),
        }
        .to_new();
        assert_eq!(reconciled.data["reconciled"], true);
        assert!(reconciled.data["previous_incident_id"].is_null());
        let offline = DeviceEvent::Offline {
            device_id: DeviceId::from("d-1"),
            patient_id: PatientId::from("p-1"),
            last_seen_at: Some(at),
            silent_s: 300,
        }
        .to_new();
        assert_eq!(offline.kind, "device.offline");
        assert_eq!(offline.device_id, Some(DeviceId::from("d-1")));
        assert_eq!(
            offline.data,
            serde_json::json!({"device_id": "d-1", "patient_id": "p-1",
                               "last_seen_at": "2026-12-05T08:00:00Z", "silent_s": 300})
        );
        let cancelled = DeviceEvent::FallCancelled {
            device_id: DeviceId::from("d-1"),
            patient_id: PatientId::from("p-1"),
            fall_at: at,
            deadline: at + chrono::Duration::seconds(60),
            cancelled_at: at + chrono::Duration::seconds(5),
            by: crate::domain::auth::Role::Patient,
        }
        .to_new();
        assert_eq!(cancelled.kind, "device.fall_cancelled");
        assert_eq!(cancelled.device_id, Some(DeviceId::from("d-1")));
        assert_eq!(
            cancelled.data,
            serde_json::json!({"device_id": "d-1", "patient_id": "p-1",
                               "fall_at": "2026-12-05T08:00:00Z",
                               "deadline": "2026-12-05T08:01:00Z",
                               "cancelled_at": "2026-12-05T08:00:05Z", "by": "patient"})
        );
    }

    #[test]
    fn outbox_offer_and_evidence_payloads_keep_their_stored_shape() {
        let at: DateTime<Utc> = "2026-12-05T08:00:00Z".parse().unwrap_or_default();
        let incident = IncidentId(uuid::Uuid::nil());
        let nil = "00000000-0000-0000-0000-000000000000";
        let queued = NotificationEvent::Queued {
            notification_id: "n-1",
            incident_id: incident,
            recipient: "Ann",
            channel: "sms",
            template: "incident_created",
        }
        .to_new();
        assert_eq!(queued.kind, "notification.queued");
        assert_eq!(queued.incident_id, Some(incident));
        assert_eq!(
            queued.data,
            serde_json::json!({"notification_id": "n-1", "incident_id": nil, "recipient": "Ann",
                               "channel": "sms", "template": "incident_created"})
        );
        let failed = NotificationEvent::Failed(DeliveryOutcome {
            notification_id: "n-1",
            incident_id: incident,
            channel: "sms",
            template: "incident_created",
            attempts: 5,
            reason: None,
        })
        .to_new();
        assert_eq!(failed.kind, "notification.failed");
        assert_eq!(failed.incident_id, Some(incident));
        assert_eq!(
            failed.data,
            serde_json::json!({"notification_id": "n-1", "incident_id": nil, "channel": "sms",
                               "template": "incident_created", "attempts": 5, "reason": null})
        );
        let unit = UnitId::from("U-1");
        let closed = OfferClosed {
            offer_id: OfferId(uuid::Uuid::nil()),
            incident_id: incident,
            unit_id: &unit,
            reason: "taken",
            at,
        }
        .to_new("withdrawn");
        assert_eq!(closed.kind, "dispatch.offer_withdrawn");
        assert_eq!(closed.unit_id, Some(UnitId::from("U-1")));
        assert_eq!(
            closed.data,
            serde_json::json!({"offer_id": nil, "incident_id": nil, "unit_id": "U-1",
                               "reason": "taken", "at": "2026-12-05T08:00:00Z"})
        );
        let evidence = Evidence::Vitals {
            device_id: DeviceId::from("d-1"),
            detected_at: at,
            reasons: vec!["SpO2 low".into()],
            readings: Vec::new(),
        }
        .to_value();
        assert_eq!(
            evidence,
            serde_json::json!({"kind": "vitals", "device_id": "d-1",
                               "detected_at": "2026-12-05T08:00:00Z", "reasons": ["SpO2 low"],
                               "readings": []})
        );
        let caller = Evidence::Caller {
            name: Some("Ann".into()),
            phone: None,
        }
        .to_value();
        assert_eq!(
            caller,
            serde_json::json!({"kind": "caller", "name": "Ann", "phone": null})
        );
    }

    #[test]
    fn billing_events_keep_their_stored_shape() {
        let incident = IncidentId(uuid::Uuid::nil());
        let nil = "00000000-0000-0000-0000-000000000000";
        let started = BillingEvent::Started {
            incident_id: incident,
            invoice_id: "inv_1".into(),
            amount_cents: 12_345,
            currency: "EUR".into(),
            distance_m: 1500.0,
            als: true,
        }
        .to_new();
        assert_eq!(started.kind, "billing.started");
        assert_eq!(started.incident_id, Some(incident));
        assert_eq!(
            started.data,
            serde_json::json!({"incident_id": nil, "invoice_id": "inv_1", "amount_cents": 12_345,
                               "currency": "EUR", "distance_m": 1500.0, "als": true})
        );
        let declined = BillingEvent::PaymentFailed {
            incident_id: incident,
            status: None,
            reason: Some("card_declined".into()),
        }
        .to_new();
        assert_eq!(declined.kind, "billing.payment_failed");
        assert_eq!(
            declined.data,
            serde_json::json!({"incident_id": nil, "reason": "card_declined"})
        );
        let compensated = BillingEvent::Compensated {
            incident_id: incident,
            step: Step::VoidInvoice,
        }
        .to_new();
        assert_eq!(
            compensated.data,
            serde_json::json!({"incident_id": nil, "step": "void_invoice"})
        );
        let completed = BillingEvent::Completed(BillingOutcome {
            incident_id: incident,
            status: InvoiceStatus::Paid,
            reason: None,
        })
        .to_new();
        assert_eq!(completed.kind, "billing.completed");
        assert_eq!(
            completed.data,
            serde_json::json!({"incident_id": nil, "status": "paid", "reason": null})
        );
    }
}
