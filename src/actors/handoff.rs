//! The hand-off from triage to incidents: a device that turns `emergency` tells the incident
//! directory who, where and why through [`EmergencyDetected`].
//!
//! The [`IncidentDirectory`](super::incidents::IncidentDirectory) receives it: it opens the
//! patient's incident, or attaches the readings to the open one, and answers its id.

use actix::prelude::*;
use chrono::{DateTime, Utc};

use crate::domain::ids::{DeviceId, IncidentId, PatientId};
use crate::domain::vitals::{GeoPoint, Reading};
use crate::persistence::StoreError;

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
