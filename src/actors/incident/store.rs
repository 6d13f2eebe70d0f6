//! An incident's stream in the event store: appending a command's events with the
//! projections and the next-of-kin outbox in one transaction, and rebuilding state from it.

use chrono::{DateTime, Utc};

use crate::actors::error::ActorError;
use crate::domain::events::{ExpectedVersion, NewEvent, NotificationEvent, RecordedEvent};
use crate::domain::ids::IncidentId;
use crate::domain::incident::{Incident, IncidentEvent, IncidentStatus, Rejection, replay};
use crate::persistence::events::{self, AppendError};
use crate::persistence::incidents::{self as store, NewNotification};
use crate::persistence::{DbConn, StoreError, patients};

/// Why an incident operation failed.
#[derive(Debug, thiserror::Error)]
pub enum IncidentError {
    /// The state machine refused the command (HTTP 409).
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// Another writer changed the incident first; retry (HTTP 409).
    #[error("the incident was changed concurrently; retry")]
    Conflict,
    /// No such incident (HTTP 404).
    #[error("no such incident")]
    NotFound,
    /// The patient named is not registered (HTTP 422).
    #[error("no patient with this id")]
    UnknownPatient,
    /// No location given and the patient has no home location (HTTP 422).
    #[error("a location is required (the patient has no home location on file)")]
    NoLocation,
    /// Storage failed or is unreachable (HTTP 503).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An actor on the way did not answer (HTTP 503; retry).
    #[error(transparent)]
    Actor(#[from] ActorError),
}

impl From<AppendError> for IncidentError {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::Conflict { .. } => IncidentError::Conflict,
            AppendError::Store(s) => IncidentError::Store(s),
        }
    }
}

/// The event-store stream of an incident.
pub fn stream_of(id: IncidentId) -> String {
    format!("incident-{id}")
}

pub(super) fn to_new_event(id: IncidentId, event: &IncidentEvent) -> NewEvent {
    let mut e = NewEvent::new(event.kind(), event.data());
    e.incident_id = Some(id);
    match event {
        IncidentEvent::Assigned { unit_id, .. } => e.unit_id = Some(unit_id.clone()),
        IncidentEvent::Created(i) if i.patient_id.is_some() => {}
        _ => {}
    }
    e
}

/// Folds stored events into state; kinds that are not incident events (notifications, …) are
/// skipped but still count towards the stream version.
pub(super) fn rebuild(stored: &[RecordedEvent]) -> (Option<Incident>, i64) {
    let mut events = Vec::with_capacity(stored.len());
    for e in stored {
        if !IncidentEvent::KINDS.contains(&e.kind.as_str()) {
            continue;
        }
        match IncidentEvent::from_stored(&e.kind, &e.data) {
            Ok(event) => events.push(event),
            // Corruption, not a kind we do not fold: say so loudly (without the payload).
            Err(_) => {
                tracing::error!(event.seq = e.seq, event.kind = %e.kind, "stored incident event does not decode; skipped")
            }
        }
    }
    let version = stored.last().map_or(0, |e| e.version);
    (replay(events.iter()), version)
}

/// The recipient name of an SNS topic row (its subscribers are not known here).
pub(super) const SNS_TOPIC_RECIPIENT: &str = "SNS topic subscribers";

/// Outbox rows and `notification.queued` events telling the patient's next of kin about
/// `template` (one per contact and channel, plus one for the SNS topic when `sns_topic` is
/// set; the idempotency key makes a repeat a no-op).
pub(super) fn next_of_kin_outbox(
    patient: Option<&crate::domain::patients::Patient>,
    id: IncidentId,
    template: &'static str,
    sns_topic: Option<&str>,
) -> (Vec<NewNotification>, Vec<NewEvent>) {
    let mut outbox = Vec::new();
    let mut queued = Vec::new();
    // One publish per incident and template to the SNS topic, whose subscribers filter on
    // the `patient_id` attribute (so a patient must be known).
    if let (Some(topic), Some(_), Some(known)) = (
        sns_topic,
        patient,
        crate::domain::notify::Template::parse(template),
    ) {
        let notification_id = uuid::Uuid::now_v7().to_string();
        let recipient = SNS_TOPIC_RECIPIENT;
        let event = NotificationEvent::Queued {
            notification_id: &notification_id,
            incident_id: id,
            recipient,
            channel: "sns",
            template,
        };
        queued.push(event.to_new());
        outbox.push(NewNotification {
            id: notification_id,
            incident_id: id,
            recipient_name: recipient.to_owned(),
            channel: "sns",
            address: topic.to_owned(),
            template,
            idempotency_key: crate::domain::notify::idempotency_key(&id.to_string(), topic, known),
        });
    }
    for kin in patient.iter().flat_map(|p| p.next_of_kin.iter()) {
        let channels = [("sms", kin.phone.as_ref()), ("email", kin.email.as_ref())];
        for (channel, address) in channels {
            let Some(address) = address else { continue };
            let Some(known) = crate::domain::notify::Template::parse(template) else {
                tracing::error!(template, "unknown notification template; not queued");
                continue;
            };
            let notification_id = uuid::Uuid::now_v7().to_string();
            // A hash: the key is logged and sent to providers, and must not reveal the address.
            let key = crate::domain::notify::idempotency_key(&id.to_string(), address, known);
            let event = NotificationEvent::Queued {
                notification_id: &notification_id,
                incident_id: id,
                recipient: &kin.name,
                channel,
                template,
            };
            queued.push(event.to_new());
            outbox.push(NewNotification {
                id: notification_id,
                incident_id: id,
                recipient_name: kin.name.clone(),
                channel,
                address: address.clone(),
                template,
                idempotency_key: key,
            });
        }
    }
    (outbox, queued)
}

/// Which next-of-kin message an incident event calls for (creation is queued by `create`).
fn template_for(event: &IncidentEvent) -> Option<&'static str> {
    match event {
        IncidentEvent::Assigned { .. } => Some("unit_assigned"),
        IncidentEvent::StatusChanged {
            to: IncidentStatus::AtHospital,
            ..
        } => Some("arrived_at_hospital"),
        IncidentEvent::Closed { .. } => Some("billing_outcome"),
        _ => None,
    }
}

/// The evidence `events` attach.
pub(super) fn evidence_of(events: &[IncidentEvent]) -> impl Iterator<Item = &serde_json::Value> {
    events.iter().filter_map(|event| match event {
        IncidentEvent::EvidenceAdded { evidence } => Some(evidence),
        _ => None,
    })
}

/// Persists `events` (and their projections) at `expected` version; returns the new version.
pub(super) async fn persist(
    conn: &mut DbConn,
    incident: &Incident,
    expected: i64,
    events: &[IncidentEvent],
    extra: Vec<NewEvent>,
    now: DateTime<Utc>,
    sns_topic: Option<&str>,
) -> Result<i64, IncidentError> {
    let id = incident.id;
    let mut new: Vec<NewEvent> = events.iter().map(|e| to_new_event(id, e)).collect();
    new.extend(extra);
    // Next-of-kin messages the transition calls for are queued in the same transaction.
    let mut outbox = Vec::new();
    let templates: Vec<&'static str> = events.iter().filter_map(template_for).collect();
    if !templates.is_empty()
        && let Some(pid) = &incident.patient_id
    {
        let patient = patients::find_patient(conn, pid).await?;
        for template in templates {
            let (rows, queued) = next_of_kin_outbox(patient.as_ref(), id, template, sns_topic);
            outbox.extend(rows);
            new.extend(queued);
        }
    }
    let expected_version = if expected == 0 {
        ExpectedVersion::NoStream
    } else {
        ExpectedVersion::Exact(expected)
    };
    // The version the append makes (it fails unless the stream is at `expected`), so the
    // projection need not wait for it: on PostgreSQL all of it is one pipelined round trip.
    let version = expected + new.len() as i64;
    conn.try_both(
        async |c| {
            events::append(c, &stream_of(id), expected_version, &new, now).await?;
            Ok::<_, IncidentError>(())
        },
        async |c| {
            let evidence = evidence_of(events);
            c.try_both(
                async |c| {
                    if expected == 0 {
                        store::insert(c, incident, version, now).await
                    } else {
                        store::update(c, incident, version, now).await
                    }
                },
                async |c| {
                    c.try_both(
                        async |c| {
                            c.try_each(evidence, async |c, e| {
                                store::add_evidence(c, id, now, e).await
                            })
                            .await
                        },
                        async |c| store::queue_notifications(c, &outbox, now).await,
                    )
                    .await
                },
            )
            .await?;
            Ok(())
        },
    )
    .await?;
    Ok(version)
}

// ---------------------------------------------------------------------------------------------
// The incident actor
