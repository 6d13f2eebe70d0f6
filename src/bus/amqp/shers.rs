//! SHERS's wire format for the lifecycle (docs/interop.md §1, "Publish"): which stored events
//! get a copy on SHERS's routing keys, and that copy's body with SHERS's field names.
//!
//! Pure: the relay gathers what an event lacks (the incident's patient and location, the
//! offer behind an assignment, the invoice) and hands it in; nothing here reads a store.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

use crate::domain::events::RecordedEvent;
use crate::domain::geo::LatLng;
use crate::domain::ids::{HospitalId, IncidentId, OfferId, PatientId, UnitId};

/// A stored event that SHERS's services also expect on one of their keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Copy {
    /// `vitals.status_changed` to emergency.
    TriageEmergency,
    /// `vitals.status_changed` to abnormal.
    TriageAbnormal,
    /// `dispatch.assigned`.
    UnitAssigned,
    /// The incident's unit is en route (`incident.status_changed` to `enroute`).
    Enroute,
    /// The unit is transporting the patient (`incident.status_changed` to `transporting`).
    PatientOnboard,
    /// The unit is at the hospital (`incident.status_changed` to `at_hospital`).
    ArrivedAtHospital,
    /// `billing.completed`.
    BillingCompleted,
    /// `billing.failed`.
    BillingFailed,
}

impl Copy {
    /// The copy `event` gets, if any.
    ///
    /// The unit statuses are read from the incident's own transitions, which a crew's report
    /// stores first (the unit's status follows in its own stream and may be reconciled after a
    /// crash): one copy per transition, whatever happened to the unit's stream.
    pub(crate) fn of(event: &RecordedEvent) -> Option<Self> {
        let to = event.data.get("to").and_then(Value::as_str);
        match (event.kind.as_str(), to) {
            ("vitals.status_changed", Some("emergency")) => Some(Self::TriageEmergency),
            ("vitals.status_changed", Some("abnormal")) => Some(Self::TriageAbnormal),
            ("dispatch.assigned", _) => Some(Self::UnitAssigned),
            ("incident.status_changed", Some("enroute")) => Some(Self::Enroute),
            ("incident.status_changed", Some("transporting")) => Some(Self::PatientOnboard),
            ("incident.status_changed", Some("at_hospital")) => Some(Self::ArrivedAtHospital),
            ("billing.completed", _) => Some(Self::BillingCompleted),
            ("billing.failed", _) => Some(Self::BillingFailed),
            _ => None,
        }
    }

    /// SHERS's routing key.
    pub(crate) fn routing_key(self) -> &'static str {
        match self {
            Self::TriageEmergency => "triage.status.emergency",
            Self::TriageAbnormal => "triage.status.abnormal",
            Self::UnitAssigned => "event.dispatch.unit_assigned",
            Self::Enroute => "event.dispatch.enroute",
            Self::PatientOnboard => "event.dispatch.patient_onboard",
            Self::ArrivedAtHospital => "event.dispatch.arrived_at_hospital",
            Self::BillingCompleted => "event.billing.completed",
            Self::BillingFailed => "event.billing.failed",
        }
    }
}

/// A routing key's family, the label of `shers_amqp_published_total`.
pub(crate) fn family(routing_key: &str) -> &'static str {
    if routing_key.starts_with("shers.event.") {
        "shers.event"
    } else if routing_key.starts_with("triage.status.") {
        "triage.status"
    } else if routing_key.starts_with("event.dispatch.") {
        "event.dispatch"
    } else if routing_key.starts_with("event.billing.") {
        "event.billing"
    } else {
        "other"
    }
}

/// RFC 3339 in UTC with `Z`, to the millisecond.
pub(crate) fn iso(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// What SHERS's bodies need to know of an incident.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct IncidentFacts {
    /// The patient, when known.
    pub patient_id: Option<PatientId>,
    /// Where help is needed.
    pub location: LatLng,
}

/// The unit on an incident and the offer it accepted (none for a dispatcher's assignment).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Assignment {
    /// The unit.
    pub unit_id: UnitId,
    /// The accepted offer: SHERS's `dispatch_id`.
    pub dispatch_id: Option<OfferId>,
    /// The offer's ETA to the scene, seconds.
    pub eta_s: Option<u32>,
}

/// The invoice behind a billing outcome.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct InvoiceFacts {
    /// The invoice id: SHERS's `billing_id`.
    pub id: String,
    /// The amount billed, in minor units.
    pub amount_cents: i64,
    /// The payment intent, once one exists.
    pub payment_reference: Option<String>,
}

/// `triage.status.*`: `{type, incident_id, patient_id, status, previous_status, metrics,
/// location, timestamp}` from a `vitals.status_changed`, with the patient's open incident when
/// relayed. `metrics` and `location` come from the newest reading behind the change, in
/// SHERS's wearable names.
pub(crate) fn triage(event: &RecordedEvent, open_incident: Option<IncidentId>) -> Value {
    let data = &event.data;
    let reading = data
        .get("evidence")
        .and_then(Value::as_array)
        .and_then(|r| r.last());
    let mut metrics = Map::new();
    if let Some(reading) = reading {
        for (ours, theirs) in [
            ("heart_rate_bpm", "heartRateBpm"),
            ("spo2_pct", "spO2Percentage"),
            ("respiration_rate_bpm", "respirationRateBpm"),
            ("body_temp_c", "bodyTemperatureCelsius"),
            ("steps", "stepsSinceLastReading"),
        ] {
            if let Some(v) = reading.get(ours).filter(|v| !v.is_null()) {
                metrics.insert(theirs.to_owned(), v.clone());
            }
        }
    }
    let location = reading
        .and_then(|r| r.get("location"))
        .filter(|l| !l.is_null())
        .map_or(Value::Null, |l| json!({"lat": l["lat"], "lng": l["lng"]}));
    let measured = data
        .get("measured_at")
        .and_then(Value::as_str)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map_or(event.at, |t| t.with_timezone(&Utc));
    json!({
        "type": "TriageStatus",
        "incident_id": open_incident,
        "patient_id": data.get("patient_id").cloned().unwrap_or(Value::Null),
        "status": data.get("to").cloned().unwrap_or(Value::Null),
        "previous_status": data.get("from").cloned().unwrap_or(Value::Null),
        "metrics": metrics,
        "location": location,
        "timestamp": measured.timestamp_millis(),
    })
}

/// The fields every `event.dispatch.*` body starts with.
fn dispatch_base(
    incident_id: IncidentId,
    incident: &IncidentFacts,
    assignment: &Assignment,
    status: &str,
    at: DateTime<Utc>,
) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("incident_id".into(), json!(incident_id));
    body.insert("dispatch_id".into(), json!(assignment.dispatch_id));
    body.insert("patient_id".into(), json!(incident.patient_id));
    body.insert("unit_id".into(), json!(assignment.unit_id));
    body.insert("status".into(), json!(status));
    body.insert("ts".into(), json!(iso(at)));
    body
}

/// `event.dispatch.unit_assigned`. The destination is chosen at transport, so the hospital
/// fields (optional in SHERS's shape) are absent here.
pub(crate) fn unit_assigned(
    event: &RecordedEvent,
    incident_id: IncidentId,
    incident: &IncidentFacts,
    assignment: &Assignment,
) -> Value {
    let mut body = dispatch_base(incident_id, incident, assignment, "unit_assigned", event.at);
    body.insert(
        "location".into(),
        json!({"lat": incident.location.lat, "lng": incident.location.lng}),
    );
    body.insert(
        "eta_minutes".into(),
        json!(assignment.eta_s.map(|s| s.div_ceil(60))),
    );
    Value::Object(body)
}

/// The time of an `incident.status_changed` (its `at`), else when it was recorded.
fn changed_at(event: &RecordedEvent) -> DateTime<Utc> {
    event
        .data
        .get("at")
        .and_then(Value::as_str)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map_or(event.at, |t| t.with_timezone(&Utc))
}

/// `event.dispatch.enroute`.
pub(crate) fn enroute(
    event: &RecordedEvent,
    incident_id: IncidentId,
    incident: &IncidentFacts,
    assignment: &Assignment,
) -> Value {
    Value::Object(dispatch_base(
        incident_id,
        incident,
        assignment,
        "enroute",
        changed_at(event),
    ))
}

/// `event.dispatch.patient_onboard`.
pub(crate) fn patient_onboard(
    event: &RecordedEvent,
    incident_id: IncidentId,
    incident: &IncidentFacts,
    assignment: &Assignment,
) -> Value {
    let at = changed_at(event);
    let mut body = dispatch_base(incident_id, incident, assignment, "onboard", at);
    body.insert("ambulance_id".into(), json!(assignment.unit_id));
    body.insert("onboard_time".into(), json!(iso(at)));
    Value::Object(body)
}

/// `event.dispatch.arrived_at_hospital`.
pub(crate) fn arrived_at_hospital(
    event: &RecordedEvent,
    incident_id: IncidentId,
    incident: &IncidentFacts,
    assignment: &Assignment,
    hospital: Option<&HospitalId>,
) -> Value {
    let at = changed_at(event);
    let mut body = dispatch_base(incident_id, incident, assignment, "arrived", at);
    body.insert("ambulance_id".into(), json!(assignment.unit_id));
    body.insert("hospital_id".into(), json!(hospital));
    body.insert("dest_hospital_id".into(), json!(hospital));
    body.insert("arrival_time".into(), json!(iso(at)));
    Value::Object(body)
}

/// `event.billing.completed` / `event.billing.failed`: `amount` in major units (the invoice's
/// amount), `status` `COMPLETED` or `CANCELLED`, `error` the reason of a failure.
pub(crate) fn billing(
    event: &RecordedEvent,
    incident_id: IncidentId,
    incident: &IncidentFacts,
    invoice: Option<&InvoiceFacts>,
) -> Value {
    let completed = event.kind == "billing.completed";
    let mut body = Map::new();
    body.insert("billing_id".into(), json!(invoice.map(|i| &i.id)));
    body.insert("incident_id".into(), json!(incident_id));
    body.insert("patient_id".into(), json!(incident.patient_id));
    body.insert(
        "amount".into(),
        json!(invoice.map(|i| i.amount_cents as f64 / 100.0)),
    );
    body.insert(
        "status".into(),
        json!(if completed { "COMPLETED" } else { "CANCELLED" }),
    );
    if let Some(reference) = invoice.and_then(|i| i.payment_reference.as_ref()) {
        body.insert("payment_reference".into(), json!(reference));
    }
    if !completed {
        let error = event
            .data
            .get("reason")
            .filter(|r| !r.is_null())
            .cloned()
            .unwrap_or_else(|| json!("billing failed"));
        body.insert("error".into(), error);
    }
    body.insert("timestamp".into(), json!(iso(event.at)));
    Value::Object(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, data: Value) -> RecordedEvent {
        RecordedEvent {
            seq: 9,
            at: "2026-12-08T10:00:00.250Z".parse().unwrap_or_default(),
            kind: kind.into(),
            incident_id: None,
            unit_id: None,
            device_id: None,
            data,
            stream_id: "s".into(),
            version: 1,
        }
    }

    #[test]
    fn only_the_mapped_events_get_a_copy() {
        let cases = [
            (
                "vitals.status_changed",
                json!({"to": "emergency"}),
                Some("triage.status.emergency"),
            ),
            (
                "vitals.status_changed",
                json!({"to": "abnormal"}),
                Some("triage.status.abnormal"),
            ),
            ("vitals.status_changed", json!({"to": "normal"}), None),
            (
                "dispatch.assigned",
                json!({}),
                Some("event.dispatch.unit_assigned"),
            ),
            (
                "incident.status_changed",
                json!({"to": "enroute"}),
                Some("event.dispatch.enroute"),
            ),
            ("incident.status_changed", json!({"to": "on_scene"}), None),
            (
                "incident.status_changed",
                json!({"to": "transporting"}),
                Some("event.dispatch.patient_onboard"),
            ),
            (
                "incident.status_changed",
                json!({"to": "at_hospital"}),
                Some("event.dispatch.arrived_at_hospital"),
            ),
            ("unit.status_changed", json!({"to": "enroute"}), None),
            (
                "billing.completed",
                json!({}),
                Some("event.billing.completed"),
            ),
            ("billing.failed", json!({}), Some("event.billing.failed")),
            ("billing.started", json!({}), None),
        ];
        for (kind, data, key) in cases {
            assert_eq!(
                Copy::of(&event(kind, data.clone())).map(Copy::routing_key),
                key,
                "{kind} {data}"
            );
        }
        assert_eq!(family("shers.event.incident.created"), "shers.event");
        assert_eq!(family("event.billing.failed"), "event.billing");
    }

    #[test]
    fn triage_speaks_the_wearable_names_and_epoch_ms() {
        let e = event(
            "vitals.status_changed",
            json!({"device_id": "d", "patient_id": "p-1", "from": "normal", "to": "emergency",
                   "reasons": [], "measured_at": "2026-12-08T09:59:59Z",
                   "evidence": [{"heart_rate_bpm": 160.0, "spo2_pct": 85.0, "body_temp_c": null,
                                 "location": {"lat": 51.5, "lng": -0.12, "accuracy_m": 5.0}}]}),
        );
        let id = IncidentId(uuid::Uuid::nil());
        let body = triage(&e, Some(id));
        assert_eq!(
            body,
            json!({"type": "TriageStatus", "incident_id": "00000000-0000-0000-0000-000000000000",
                   "patient_id": "p-1", "status": "emergency", "previous_status": "normal",
                   "metrics": {"heartRateBpm": 160.0, "spO2Percentage": 85.0},
                   "location": {"lat": 51.5, "lng": -0.12}, "timestamp": 1_796_723_999_000_i64})
        );
        assert!(triage(&e, None)["incident_id"].is_null());
    }

    #[test]
    fn dispatch_and_billing_bodies_carry_shers_fields() {
        let id = IncidentId(uuid::Uuid::nil());
        let incident = IncidentFacts {
            patient_id: Some(PatientId::from("p-1")),
            location: LatLng { lat: 1.0, lng: 2.0 },
        };
        let manual = Assignment {
            unit_id: UnitId::from("U-1"),
            dispatch_id: None,
            eta_s: None,
        };
        let assigned = unit_assigned(
            &event("dispatch.assigned", json!({})),
            id,
            &incident,
            &manual,
        );
        assert_eq!(assigned["dispatch_id"], Value::Null);
        assert_eq!(assigned["eta_minutes"], Value::Null);
        assert_eq!(assigned["location"], json!({"lat": 1.0, "lng": 2.0}));
        assert_eq!(assigned["ts"], "2026-12-08T10:00:00.250Z");
        let offered = Assignment {
            eta_s: Some(61),
            ..manual.clone()
        };
        let assigned = unit_assigned(
            &event("dispatch.assigned", json!({})),
            id,
            &incident,
            &offered,
        );
        assert_eq!(assigned["eta_minutes"], 2);
        let change = event(
            "incident.status_changed",
            json!({"from": "on_scene", "to": "transporting", "at": "2026-12-08T10:05:00Z"}),
        );
        let onboard = patient_onboard(&change, id, &incident, &manual);
        assert_eq!(onboard["status"], "onboard");
        assert_eq!(onboard["ambulance_id"], "U-1");
        assert_eq!(onboard["onboard_time"], "2026-12-08T10:05:00.000Z");
        let hospital = HospitalId::from("h1");
        let arrived = arrived_at_hospital(&change, id, &incident, &manual, Some(&hospital));
        assert_eq!(arrived["status"], "arrived");
        assert_eq!(arrived["dest_hospital_id"], "h1");
        let invoice = InvoiceFacts {
            id: "inv_1".into(),
            amount_cents: 12_345,
            payment_reference: Some("pi_1".into()),
        };
        let done = billing(
            &event("billing.completed", json!({"reason": null})),
            id,
            &incident,
            Some(&invoice),
        );
        assert_eq!(done["amount"], 123.45);
        assert_eq!(done["status"], "COMPLETED");
        assert_eq!(done["payment_reference"], "pi_1");
        assert!(done.get("error").is_none());
        let failed = billing(
            &event("billing.failed", json!({"reason": "card_declined"})),
            id,
            &incident,
            None,
        );
        assert_eq!(failed["status"], "CANCELLED");
        assert_eq!(failed["error"], "card_declined");
        assert_eq!(failed["billing_id"], Value::Null);
    }
}
