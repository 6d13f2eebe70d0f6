//! The hand-off from triage to incidents: a device that turns `emergency` tells the incident
//! directory who, where and why through [`EmergencyDetected`].
//!
//! Until the incident directory exists, [`HandoffRecorder`] receives the hand-off and records it
//! durably as a `triage.emergency_detected` event on the patient's stream — it does not pretend
//! to open an incident, so the reply carries no incident id.

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde_json::json;

use crate::domain::events::{ExpectedVersion, NewEvent};
use crate::domain::ids::{DeviceId, IncidentId, PatientId};
use crate::domain::vitals::{GeoPoint, Reading};
use crate::persistence::events::{self, AppendError};
use crate::persistence::{Db, StoreError};

/// A wearer's readings are `emergency`: an incident is needed (or the open one gets evidence).
#[derive(Message, Clone, Debug)]
#[rtype(result = "Result<Option<IncidentId>, StoreError>")]
pub struct EmergencyDetected {
    /// The wearer.
    pub patient_id: PatientId,
    /// The device that reported it.
    pub device_id: DeviceId,
    /// Where, from the reading (the patient's home is the fallback downstream).
    pub location: Option<GeoPoint>,
    /// Why, for people.
    pub reasons: Vec<String>,
    /// The readings behind the verdict, newest last.
    pub evidence: Vec<Reading>,
    /// When the emergency reading was measured.
    pub detected_at: DateTime<Utc>,
    /// Whether this reading turned the device's status to emergency (false: still emergency).
    pub onset: bool,
}

/// Records hand-offs as events until the incident directory takes them.
pub struct HandoffRecorder {
    db: Db,
}

impl HandoffRecorder {
    /// A recorder writing to `db`.
    pub fn new(db: Db) -> Self {
        Self { db }
    }
}

impl Actor for HandoffRecorder {
    type Context = Context<Self>;
}

impl Handler<EmergencyDetected> for HandoffRecorder {
    type Result = ResponseFuture<Result<Option<IncidentId>, StoreError>>;

    fn handle(&mut self, msg: EmergencyDetected, _: &mut Self::Context) -> Self::Result {
        let db = self.db.clone();
        Box::pin(async move {
            let mut event = NewEvent::new(
                "triage.emergency_detected",
                json!({
                    "patient_id": msg.patient_id,
                    "device_id": msg.device_id,
                    "location": msg.location,
                    "reasons": msg.reasons,
                    "detected_at": msg.detected_at,
                    "onset": msg.onset,
                    "evidence": msg.evidence,
                }),
            );
            event.device_id = Some(msg.device_id.0.clone());
            let stream = format!("patient-{}", msg.patient_id);
            db.run(move |mut conn| async move {
                events::append(
                    &mut conn,
                    &stream,
                    ExpectedVersion::Any,
                    &[event],
                    Utc::now(),
                )
                .await
                .map_err(|e| match e {
                    AppendError::Store(s) => s,
                    other => StoreError::Conflict(other.to_string()),
                })
            })
            .await?;
            Ok(None)
        })
    }
}
