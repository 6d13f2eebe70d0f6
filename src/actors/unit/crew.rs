//! Crew actions (accept, decline, status reports, position fixes) orchestrated across the
//! unit's actor, the incident's actor and the fleet hub. Used by the crew REST endpoints and
//! the crew WebSocket alike, so both behave the same.

use actix::Addr;
use chrono::Utc;

use crate::actors::error::ActorError;
use crate::actors::incident::{
    AcceptOffer, DeclineOffer, IncidentDirectory, IncidentError, OfferOutcome, Route, ToIncident,
};
use crate::actors::unit::{
    ACTOR_TIMEOUT, AcceptRoute, ApplyReport, Commitments, Fleet, Locate, ReleaseBed, ReportFailure,
    StatusUpdate, TakeBed, UnitAddr, ViewUnit,
};
use crate::domain::dispatch::{CrewReport, apply_report};
use crate::domain::geo::LatLng;
use crate::domain::ids::{HospitalId, OfferId, UnitId};
use crate::domain::incident::{Command, IncidentStatus};
use crate::domain::validation::{TextKind, check_id, check_text};
use crate::persistence::fleet as fleet_store;
use crate::persistence::incidents as incident_store;

use crate::persistence::{Db, StoreError};

/// How far ahead of the server's clock a position fix may be (a crew device's clock drift).
const MAX_FIX_AHEAD: chrono::TimeDelta = chrono::TimeDelta::minutes(5);
/// How old a position fix may be: older fixes say nothing about where a unit is now.
const MAX_FIX_AGE: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// What crew actions need.
#[derive(Clone)]
pub struct Crew {
    /// The fleet hub.
    pub fleet: Addr<Fleet>,
    /// The incident directory.
    pub incidents: Addr<IncidentDirectory>,
    /// The database (offer look-ups).
    pub db: Db,
    /// Billing (started at hospital handover).
    pub billing: Option<Addr<crate::actors::billing::Billing>>,
}

/// Why a crew action failed.
#[derive(Debug, thiserror::Error)]
pub enum CrewError {
    /// No such unit.
    #[error("no such unit")]
    UnknownUnit,
    /// No such offer for this unit.
    #[error("no such offer for this unit")]
    UnknownOffer,
    /// The offer can no longer be accepted (409 with `outcome`).
    #[error("the offer is {0:?}")]
    Lost(OfferOutcome),
    /// The report does not fit the unit's or the incident's state (409).
    #[error("{0}")]
    Rejected(String),
    /// Not valid input (422), with the field.
    #[error("{1}")]
    Invalid(&'static str, String),
    /// Storage is unavailable (503).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A report could not be stored: the unit keeps its earlier status (503; send it again).
    #[error("{0}; the unit keeps its earlier status, send the report again")]
    NotStored(StoreError),
    /// An actor on the way did not answer (503; retry).
    #[error(transparent)]
    Actor(#[from] ActorError),
}

impl From<IncidentError> for CrewError {
    fn from(e: IncidentError) -> Self {
        match e {
            IncidentError::Store(s) => CrewError::Store(s),
            IncidentError::Actor(a) => CrewError::Actor(a),
            IncidentError::NotFound => {
                CrewError::Rejected("the unit's incident no longer exists".into())
            }
            other => CrewError::Rejected(other.to_string()),
        }
    }
}

/// A failed send to a unit, the fleet or the incident directory.
fn gone(e: actix::MailboxError) -> CrewError {
    CrewError::Actor(ActorError::mailbox("dispatch")(e))
}

impl Crew {
    async fn unit(&self, unit: &UnitId) -> Result<Addr<super::AmbulanceActor>, CrewError> {
        self.fleet
            .send(UnitAddr(unit.clone()))
            .await
            .map_err(gone)?
            .ok_or(CrewError::UnknownUnit)
    }

    /// Why an offer the unit no longer holds cannot be accepted, from the store.
    async fn settled_outcome(
        &self,
        unit: &UnitId,
        offer_id: OfferId,
    ) -> Result<OfferOutcome, CrewError> {
        let db = self.db.clone();
        let found = db
            .run(move |mut conn| async move {
                let Some(offer) = fleet_store::find_offer(&mut conn, offer_id).await? else {
                    return Ok::<_, StoreError>(None);
                };
                let incident = incident_store::find(&mut conn, offer.incident_id).await?;
                Ok(Some((offer, incident.map(|(i, _)| i.status))))
            })
            .await?;
        let Some((offer, status)) = found else {
            return Err(CrewError::UnknownOffer);
        };
        if &offer.unit_id != unit {
            return Err(CrewError::UnknownOffer);
        }
        Ok(match (offer.status.as_str(), status) {
            ("accepted", _) => OfferOutcome::Assigned,
            (_, Some(IncidentStatus::Cancelled)) => OfferOutcome::Cancelled,
            ("expired", _) => OfferOutcome::Expired,
            _ => OfferOutcome::Taken,
        })
    }

    /// The crew of `unit` accepts `offer_id`: `Assigned`, or why not. The fleet is asked once
    /// (the unit's actor, and the offer's incident when it reserved the unit for it), the
    /// incident decides, and it commits the unit: one ask of each on the hot path. Without the
    /// fleet's hint (an offer made before a restart) the unit says which incident its pending
    /// offer is for.
    pub async fn accept(
        &self,
        unit: &UnitId,
        offer_id: OfferId,
    ) -> Result<OfferOutcome, CrewError> {
        let (addr, hinted) = self
            .fleet
            .send(AcceptRoute {
                unit_id: unit.clone(),
                offer_id,
            })
            .await
            .map_err(gone)?
            .ok_or(CrewError::UnknownUnit)?;
        let incident = match hinted {
            Some(incident_id) => Some(incident_id),
            None => match addr.send(Commitments).await.map_err(gone)? {
                (_, _, Some((offer, incident_id))) if offer == offer_id => Some(incident_id),
                _ => None,
            },
        };
        let decided = match incident {
            Some(incident_id) => self
                .incidents
                .send(ToIncident {
                    incident_id,
                    message: AcceptOffer {
                        offer_id,
                        unit_id: unit.clone(),
                        unit: Some(addr),
                    },
                })
                .timeout(ACTOR_TIMEOUT * 2)
                .await
                .map_err(gone)?,
            None => Err(IncidentError::NotFound),
        };
        let outcome = match decided {
            Ok(outcome) => outcome,
            // The incident has no live actor (closed, or never offered this): the store says.
            Err(IncidentError::NotFound) => self.settled_outcome(unit, offer_id).await?,
            Err(e) => return Err(e.into()),
        };
        match outcome {
            OfferOutcome::Assigned => Ok(outcome),
            lost => Err(CrewError::Lost(lost)),
        }
    }

    /// The crew of `unit` declines `offer_id`.
    pub async fn decline(
        &self,
        unit: &UnitId,
        offer_id: OfferId,
        reason: String,
    ) -> Result<OfferOutcome, CrewError> {
        let mut errors = Vec::new();
        check_text(&mut errors, "/reason", &reason, TextKind::Lines, false, 500);
        if let Some(e) = errors.pop() {
            return Err(CrewError::Invalid("/reason", e.message));
        }
        let addr = self.unit(unit).await?;
        let (_, _, pending) = addr.send(Commitments).await.map_err(gone)?;
        match pending {
            Some((offer, incident_id)) if offer == offer_id => Ok(self
                .incidents
                .send(ToIncident {
                    incident_id,
                    message: DeclineOffer {
                        offer_id,
                        unit_id: unit.clone(),
                        reason,
                    },
                })
                .timeout(ACTOR_TIMEOUT * 2)
                .await
                .map_err(gone)??),
            _ => Err(CrewError::Lost(self.settled_outcome(unit, offer_id).await?)),
        }
    }

    /// A position fix.
    pub async fn locate(
        &self,
        unit: &UnitId,
        position: LatLng,
        at: Option<chrono::DateTime<Utc>>,
        speed_mps: Option<f64>,
        heading_deg: Option<f64>,
    ) -> Result<(), CrewError> {
        let mut errors = Vec::new();
        position.validate("", &mut errors);
        if let Some(e) = errors.first() {
            return Err(CrewError::Invalid(
                if e.pointer.ends_with("lat") {
                    "/lat"
                } else {
                    "/lng"
                },
                e.message.clone(),
            ));
        }
        let now = Utc::now();
        let at = at.unwrap_or(now);
        if at > now + MAX_FIX_AHEAD {
            return Err(CrewError::Invalid(
                "/at",
                "must not be in the future".into(),
            ));
        }
        if at < now - MAX_FIX_AGE {
            return Err(CrewError::Invalid(
                "/at",
                "must be within the last 24 hours".into(),
            ));
        }
        let addr = self.unit(unit).await?;
        addr.send(Locate {
            position,
            at,
            speed_mps,
            heading_deg,
        })
        .await
        .map_err(gone)?;
        Ok(())
    }

    /// A status report; incident-related reports advance the incident first (it is the record),
    /// then the unit.
    pub async fn report(
        &self,
        unit: &UnitId,
        report: CrewReport,
        hospital_id: Option<HospitalId>,
    ) -> Result<StatusUpdate, CrewError> {
        if let Some(hospital) = &hospital_id {
            let mut errors = Vec::new();
            check_id(&mut errors, "/hospital_id", hospital.as_str());
            if let Some(e) = errors.pop() {
                return Err(CrewError::Invalid("/hospital_id", e.message));
            }
        }
        let addr = self.unit(unit).await?;
        let (status, assignment, _) = addr.send(Commitments).await.map_err(gone)?;
        apply_report(status, report).map_err(|r| CrewError::Rejected(r.reason))?;
        let route = |command: Command| {
            let incidents = self.incidents.clone();
            async move {
                let Some(id) = assignment else {
                    return Err(CrewError::Rejected("the unit has no incident".into()));
                };
                incidents
                    .send(Route { id, command })
                    .await
                    .map_err(gone)?
                    .map_err(CrewError::from)
            }
        };
        if status != report.target() {
            match report {
                CrewReport::Enroute => {
                    route(Command::ReportEnroute).await?;
                }
                CrewReport::OnScene => {
                    route(Command::ReportOnScene).await?;
                }
                CrewReport::Transporting => {
                    let view = addr.send(ViewUnit).await.map_err(gone)?;
                    let hospital = self
                        .fleet
                        .send(TakeBed {
                            from: view.location,
                            hospital_id: hospital_id.clone(),
                            needed: None,
                        })
                        .await
                        .map_err(gone)?
                        .map_err(|e| CrewError::Invalid("/hospital_id", e))?;
                    if let Err(e) = route(Command::ReportTransporting {
                        hospital_id: hospital.clone(),
                    })
                    .await
                    {
                        self.fleet.do_send(ReleaseBed(hospital));
                        return Err(e);
                    }
                }
                CrewReport::AtHospital => {
                    let incident = route(Command::ReportAtHospital).await?;
                    // Handover: the bed taken at transport is released, and billing starts
                    // (the billing saga itself arrives with the billing issue).
                    if let Some(h) = incident.hospital_id {
                        self.fleet.do_send(ReleaseBed(h));
                    }
                    let billed = route(Command::StartBilling).await?;
                    if let Some(billing) = &self.billing {
                        billing.do_send(crate::actors::billing::StartBilling(billed.id));
                    }
                }
                CrewReport::Available | CrewReport::OutOfService => {}
            }
        }
        addr.send(ApplyReport(report))
            .await
            .map_err(gone)?
            .map_err(|failure| match failure {
                ReportFailure::Rejected(r) => CrewError::Rejected(r.reason),
                ReportFailure::NotStored(e) => CrewError::NotStored(e),
            })
    }
}
