//! What a unit actor shows of itself: [`UnitView`] for the API and [`UnitInspection`] for the
//! admin actor inspector.

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::AmbulanceActor;
use crate::domain::dispatch::{Capability, UnitStatus};
use crate::domain::geo::LatLng;
use crate::domain::ids::{IncidentId, OfferId, UnitId};

/// The unit as the API shows it.
#[derive(Message, Debug)]
#[rtype(result = "UnitView")]
pub struct ViewUnit;

/// A unit as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct UnitView {
    /// Its stable identifier.
    pub id: UnitId,
    /// Call sign.
    pub call_sign: String,
    /// `als` / `bls`.
    pub capability: Capability,
    /// Where the unit is in its duty cycle.
    pub status: UnitStatus,
    /// Last known position (WGS 84).
    pub location: LatLng,
    /// Fix time.
    pub fix_at: DateTime<Utc>,
    /// Home station.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<LatLng>,
    /// Current incident.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incident_id: Option<IncidentId>,
    /// Pending offer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_offer_id: Option<OfferId>,
    /// Connected crew sessions.
    pub crew_sessions: usize,
    /// Messages handled (admin).
    pub messages: u64,
    /// Last message (admin).
    pub last_message_at: Option<DateTime<Utc>>,
}

impl Handler<ViewUnit> for AmbulanceActor {
    type Result = MessageResult<ViewUnit>;

    fn handle(&mut self, _: ViewUnit, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.view())
    }
}

impl AmbulanceActor {
    /// The unit as the API shows it.
    pub(super) fn view(&self) -> UnitView {
        UnitView {
            id: self.record.id.clone(),
            call_sign: self.record.call_sign.clone(),
            capability: self.capability,
            status: self.status,
            location: self.record.location,
            fix_at: self.record.fix_at,
            base: self.record.base,
            incident_id: self.assignment,
            pending_offer_id: self.pending.as_ref().map(|p| p.offer_id),
            crew_sessions: self.sessions.len(),
            messages: self.messages,
            last_message_at: self.last_message_at,
        }
    }
}

/// The unit's full in-memory state, for the admin actor inspector.
#[derive(Message, Debug)]
#[rtype(result = "UnitInspection")]
pub struct InspectUnit;

/// A unit actor's full in-memory state, as the admin inspector shows it.
#[derive(Clone, Debug, Serialize)]
pub struct UnitInspection {
    /// The unit.
    pub id: UnitId,
    /// Its status.
    pub status: UnitStatus,
    /// Times the fleet started this unit's actor again after it stopped.
    pub restarts: u32,
    /// When it last handled a message.
    pub last_message_at: Option<DateTime<Utc>>,
    /// Everything else it holds.
    pub state: UnitState,
}

/// The in-memory part of a [`UnitInspection`].
#[derive(Clone, Debug, Serialize)]
pub struct UnitState {
    /// Radio call sign.
    pub call_sign: String,
    /// ALS or BLS.
    pub capability: Capability,
    /// Its status.
    pub status: UnitStatus,
    /// Last known position.
    pub position: LatLng,
    /// When that position was fixed.
    pub fix_at: DateTime<Utc>,
    /// Home station.
    pub base: Option<LatLng>,
    /// The incident it is committed to.
    pub assignment: Option<IncidentId>,
    /// The offer it holds, if any.
    pub pending_offer: Option<PendingOfferView>,
    /// Connected crew sessions.
    pub crew_sessions: usize,
    /// Messages handled since it started.
    pub messages: u64,
    /// A reported status not yet stored (its report was answered 503).
    pub unsaved_status_change_from: Option<UnitStatus>,
    /// How long until the next position fix is stored as an event, milliseconds.
    pub location_event_throttled_for_ms: Option<u128>,
}

/// The offer a unit holds, as inspected.
#[derive(Clone, Debug, Serialize)]
pub struct PendingOfferView {
    /// The offer.
    pub offer_id: OfferId,
    /// Its incident.
    pub incident_id: IncidentId,
    /// When it lapses.
    pub expires_at: DateTime<Utc>,
    /// Whether the offer is stored and its frame was pushed to the crew.
    pub frame_ready: bool,
}

impl Handler<InspectUnit> for AmbulanceActor {
    type Result = MessageResult<InspectUnit>;

    fn handle(&mut self, _: InspectUnit, _: &mut Self::Context) -> Self::Result {
        let pending_offer = self.pending.as_ref().map(|p| PendingOfferView {
            offer_id: p.offer_id,
            incident_id: p.incident_id,
            expires_at: p.expires_at,
            frame_ready: p.frame.is_some(),
        });
        MessageResult(UnitInspection {
            id: self.record.id.clone(),
            status: self.status,
            restarts: self.restarts,
            last_message_at: self.last_message_at,
            state: UnitState {
                call_sign: self.record.call_sign.clone(),
                capability: self.capability,
                status: self.status,
                position: self.record.location,
                fix_at: self.record.fix_at,
                base: self.record.base,
                assignment: self.assignment,
                pending_offer,
                crew_sessions: self.sessions.len(),
                messages: self.messages,
                unsaved_status_change_from: self.unsaved_status,
                location_event_throttled_for_ms: self
                    .last_location_event
                    .map(|t| 1000u128.saturating_sub(t.elapsed().as_millis())),
            },
        })
    }
}
