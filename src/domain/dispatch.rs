//! Dispatch rules: which ambulance units may be offered a job, in what order, and which
//! hospital takes the patient.
//!
//! The flow (`docs/domain.md`, "Dispatch"):
//!
//! 1. [`shortlist`]: available units with a fresh position fix, not excluded, the nearest N by
//!    straight-line (haversine) distance, with a straight-line ETA ([`straight_line_eta_s`]).
//!    For a large fleet the caller first narrows the fleet with the [`FleetIndex`] R-tree.
//! 2. The caller asks the routing adapter for road ETAs of that shortlist (I/O lives in
//!    `integrations::routing`, not here).
//! 3. [`rank`]: routed ETAs replace the straight-line ones, unreachable units are dropped, and
//!    the list is ordered by the capability policy ([`ALS_PREFERENCE_S`]).
//!
//! The crew status machine ([`apply_report`]) and the hospital choice ([`choose_hospital`]) live
//! here too.
//!
//! Pure: no I/O, no clock reads (`now` is passed in), no actix.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use rstar::RTree;
use rstar::primitives::GeomWithData;
use serde::{Deserialize, Serialize};

use super::geo::LatLng;
use super::ids::{HospitalId, IncidentId, UnitId};
use super::incident::{IncidentStatus, Priority};

/// What a unit's crew and kit can do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    /// Advanced life support (paramedic crew, drugs, monitor/defibrillator).
    Als,
    /// Basic life support.
    Bls,
}

impl Capability {
    /// Every capability.
    pub const ALL: [Capability; 2] = [Capability::Als, Capability::Bls];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Als => "als",
            Capability::Bls => "bls",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// Where a unit is in its duty cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UnitStatus {
    /// In service and free: the only dispatchable status.
    Available,
    /// Holding an offer it has not answered yet.
    Offered,
    /// Accepted an offer (or was assigned by a dispatcher).
    Assigned,
    /// Driving to the scene.
    Enroute,
    /// At the scene.
    OnScene,
    /// Taking the patient to hospital.
    Transporting,
    /// At the hospital, handing over.
    AtHospital,
    /// Off duty, broken down, restocking.
    OutOfService,
}

impl UnitStatus {
    /// Every status, in duty-cycle order.
    pub const ALL: [UnitStatus; 8] = [
        UnitStatus::Available,
        UnitStatus::Offered,
        UnitStatus::Assigned,
        UnitStatus::Enroute,
        UnitStatus::OnScene,
        UnitStatus::Transporting,
        UnitStatus::AtHospital,
        UnitStatus::OutOfService,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            UnitStatus::Available => "available",
            UnitStatus::Offered => "offered",
            UnitStatus::Assigned => "assigned",
            UnitStatus::Enroute => "enroute",
            UnitStatus::OnScene => "on_scene",
            UnitStatus::Transporting => "transporting",
            UnitStatus::AtHospital => "at_hospital",
            UnitStatus::OutOfService => "out_of_service",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// A status report sent by a crew (the crew cannot report `offered` or `assigned`: those come
/// from the offer protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CrewReport {
    /// Left for the scene.
    Enroute,
    /// Arrived at the scene.
    OnScene,
    /// Left the scene with the patient.
    Transporting,
    /// Arrived at the hospital.
    AtHospital,
    /// Free for new work (after handover, or back in service).
    Available,
    /// Going off duty.
    OutOfService,
}

impl CrewReport {
    /// Every report.
    pub const ALL: [CrewReport; 6] = [
        CrewReport::Enroute,
        CrewReport::OnScene,
        CrewReport::Transporting,
        CrewReport::AtHospital,
        CrewReport::Available,
        CrewReport::OutOfService,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        self.target().as_str()
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The status this report asks for.
    pub fn target(self) -> UnitStatus {
        match self {
            CrewReport::Enroute => UnitStatus::Enroute,
            CrewReport::OnScene => UnitStatus::OnScene,
            CrewReport::Transporting => UnitStatus::Transporting,
            CrewReport::AtHospital => UnitStatus::AtHospital,
            CrewReport::Available => UnitStatus::Available,
            CrewReport::OutOfService => UnitStatus::OutOfService,
        }
    }
}

/// A crew report that does not fit the unit's current status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{reason}")]
pub struct StatusRejection {
    /// The unit's status when the report arrived.
    pub from: UnitStatus,
    /// The rejected report.
    pub report: CrewReport,
    /// Why, in words a crew member can act on.
    pub reason: String,
}

/// Applies a crew report to a unit's status.
///
/// Legal steps: `assigned → enroute → on_scene → transporting → at_hospital → available`, and
/// `available ⇄ out_of_service`. Repeating the current status is accepted and changes nothing
/// (crews tap twice; radios retry). Everything else is a [`StatusRejection`].
pub fn apply_report(
    current: UnitStatus,
    report: CrewReport,
) -> Result<UnitStatus, StatusRejection> {
    use UnitStatus as S;
    let target = report.target();
    let legal = target == current
        || matches!(
            (current, target),
            (S::Assigned, S::Enroute)
                | (S::Enroute, S::OnScene)
                | (S::OnScene, S::Transporting)
                | (S::Transporting, S::AtHospital)
                | (S::AtHospital, S::Available)
                | (S::Available, S::OutOfService)
                | (S::OutOfService, S::Available)
        );
    if legal {
        return Ok(target);
    }
    let reason = match (current, target) {
        (S::Offered | S::Assigned, S::OutOfService) => {
            "an offered or assigned unit cannot go out of service; decline or finish the job first"
                .to_owned()
        }
        (S::Offered, _) => format!(
            "an offered unit must accept or decline the offer before reporting {}",
            report.as_str()
        ),
        (S::Available, _) => format!(
            "an available unit must be assigned to a job before reporting {}",
            report.as_str()
        ),
        (S::OutOfService, _) => {
            "an out-of-service unit must report available before taking work".to_owned()
        }
        (S::Enroute | S::OnScene | S::Transporting | S::AtHospital, S::OutOfService) => format!(
            "a unit that is {} cannot go out of service; finish the job first",
            current.as_str()
        ),
        (_, _) => match next_step(current) {
            Some(next) => format!(
                "a unit that is {} must report {} next",
                current.as_str(),
                next.as_str()
            ),
            None => format!(
                "a unit that is {} cannot report {}",
                current.as_str(),
                report.as_str()
            ),
        },
    };
    Err(StatusRejection {
        from: current,
        report,
        reason,
    })
}

/// The report that moves a unit on a job forward.
fn next_step(current: UnitStatus) -> Option<CrewReport> {
    match current {
        UnitStatus::Assigned => Some(CrewReport::Enroute),
        UnitStatus::Enroute => Some(CrewReport::OnScene),
        UnitStatus::OnScene => Some(CrewReport::Transporting),
        UnitStatus::Transporting => Some(CrewReport::AtHospital),
        UnitStatus::AtHospital => Some(CrewReport::Available),
        UnitStatus::Available | UnitStatus::Offered | UnitStatus::OutOfService => None,
    }
}

/// What an open incident, recovered at start-up, says about the unit it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnitClaim {
    /// The unit works the incident in this status (the incident's own record of the crew's
    /// reports, stored before each report was answered).
    Holds(UnitStatus),
    /// The unit may still be on it (at the hospital while the incident is billed) or may
    /// already have reported available: whatever the unit says stands.
    Released,
}

/// The claim an incident in `status` holding a unit makes on it (`None`: no unit yet, or the
/// incident is over).
pub fn unit_claim(status: IncidentStatus) -> Option<UnitClaim> {
    use IncidentStatus as I;
    match status {
        I::Assigned => Some(UnitClaim::Holds(UnitStatus::Assigned)),
        I::Enroute => Some(UnitClaim::Holds(UnitStatus::Enroute)),
        I::OnScene => Some(UnitClaim::Holds(UnitStatus::OnScene)),
        I::Transporting => Some(UnitClaim::Holds(UnitStatus::Transporting)),
        I::AtHospital | I::Billing => Some(UnitClaim::Released),
        I::Detected | I::Dispatching | I::Closed | I::Cancelled => None,
    }
}

/// Reconciles a unit's stored state with the open incidents at start-up. Unit changes are
/// stored shortly after they happen, incidents' before they are answered, so a crash can
/// leave a unit behind its incident: an accept stored by the incident whose unit row still
/// says available, or a unit still assigned to an incident that has ended or never took it.
/// `claim` is the claim of the open incident holding this unit, if any. Returns the unit's
/// corrected status and assignment, or `None` if it is consistent.
pub fn reconcile_unit(
    status: UnitStatus,
    assignment: Option<IncidentId>,
    claim: Option<(IncidentId, UnitClaim)>,
) -> Option<(UnitStatus, Option<IncidentId>)> {
    use UnitStatus as S;
    let on_a_job = matches!(
        status,
        S::Assigned | S::Enroute | S::OnScene | S::Transporting | S::AtHospital
    );
    let corrected = match claim {
        Some((incident, UnitClaim::Holds(held))) => (held, Some(incident)),
        // Still at the hospital for it, or already free: both stand.
        Some((incident, UnitClaim::Released)) if assignment == Some(incident) => {
            (status, assignment)
        }
        Some((_, UnitClaim::Released)) | None => {
            if assignment.is_none() && !on_a_job {
                (status, None)
            } else if status == S::OutOfService {
                (S::OutOfService, None)
            } else {
                (S::Available, None)
            }
        }
    };
    (corrected != (status, assignment)).then_some(corrected)
}

/// Whether a unit in this status may be offered a job (only `available`).
pub fn is_dispatchable(status: UnitStatus) -> bool {
    status == UnitStatus::Available
}

/// What the dispatcher knows about one unit at a point in time.
#[derive(Clone, Debug, PartialEq)]
pub struct UnitSnapshot {
    /// The unit.
    pub id: UnitId,
    /// ALS or BLS.
    pub capability: Capability,
    /// Current duty status.
    pub status: UnitStatus,
    /// Last reported position.
    pub position: LatLng,
    /// When that position was measured (not when it was received).
    pub fix_at: DateTime<Utc>,
}

/// Roads are longer than the great circle: straight-line distance is multiplied by this.
pub const ROAD_FACTOR: f64 = 1.3;
/// Average speed assumed when no router answers, km/h.
pub const FALLBACK_SPEED_KMH: f64 = 50.0;
/// How many candidates get a routed ETA by default.
pub const DEFAULT_SHORTLIST: usize = 5;
/// The most candidates [`shortlist`] ever returns (routing cost grows with it).
pub const MAX_SHORTLIST: usize = 25;
/// For an emergency, an ALS unit ranks ahead of a BLS unit whose ETA is at most this many
/// seconds better (see [`rank`]).
pub const ALS_PREFERENCE_S: u32 = 120;

/// Default oldest usable position fix: 30 minutes.
pub const fn default_max_fix_age() -> chrono::Duration {
    chrono::Duration::minutes(30)
}

/// Straight-line ETA in whole seconds, rounded up: haversine distance × [`ROAD_FACTOR`] at
/// [`FALLBACK_SPEED_KMH`]. Saturates at `u32::MAX`; a non-finite input gives 0.
pub fn straight_line_eta_s(from: &LatLng, to: &LatLng) -> u32 {
    eta_for_distance_s(from.distance_m(to))
}

/// The straight-line ETA for a haversine distance in metres.
fn eta_for_distance_s(distance_m: f64) -> u32 {
    let speed_m_per_s = FALLBACK_SPEED_KMH * 1000.0 / 3600.0;
    // `as` saturates for large values and maps NaN to 0.
    (distance_m * ROAD_FACTOR / speed_m_per_s).ceil() as u32
}

/// Why a candidate was picked, reported with each offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PickReason {
    /// Ranked by routed (road) ETA.
    ClosestByEta,
    /// Ranked by straight-line ETA because routing was unavailable.
    ClosestByDistance,
    /// Chosen by a dispatcher.
    Manual,
}

/// Which provider gave a candidate its ETA (`docs/interop.md` §5), reported with each offer.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum EtaSource {
    /// The Google Routes API (`computeRouteMatrix`, traffic-aware).
    Google,
    /// An OSRM `table` service.
    Osrm,
    /// Haversine distance × [`ROAD_FACTOR`] at [`FALLBACK_SPEED_KMH`]: no router answered.
    #[default]
    StraightLine,
}

impl EtaSource {
    /// Every source, in the order a chain may end with.
    pub const ALL: [EtaSource; 3] = [EtaSource::Google, EtaSource::Osrm, EtaSource::StraightLine];

    /// The wire name (`google`, `osrm`, `straight_line`), as stored and served.
    pub fn as_str(self) -> &'static str {
        match self {
            EtaSource::Google => "google",
            EtaSource::Osrm => "osrm",
            EtaSource::StraightLine => "straight_line",
        }
    }

    /// The source with this wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

/// A routed ETA for one candidate: seconds and the provider that gave them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoutedEta {
    /// Travel time to the scene, whole seconds.
    pub eta_s: u32,
    /// Who answered.
    pub source: EtaSource,
}

/// A unit that may be offered the job, with its ETA to the scene.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Candidate {
    /// The unit.
    #[schema(value_type = String)]
    pub unit_id: UnitId,
    /// ALS or BLS.
    pub capability: Capability,
    /// Straight-line (haversine) distance to the scene, metres.
    pub distance_m: f64,
    /// ETA to the scene, seconds (routed or straight-line, see `reason`).
    pub eta_s: u32,
    /// How the ETA was obtained.
    pub reason: PickReason,
    /// Which provider gave `eta_s`.
    pub eta_source: EtaSource,
}

/// Parameters of a candidate search.
#[derive(Clone, Debug)]
pub struct CandidateQuery<'a> {
    /// The incident location.
    pub scene: LatLng,
    /// The time the search runs (passed in: the domain reads no clock).
    pub now: DateTime<Utc>,
    /// Units whose fix is older than this are skipped (default [`default_max_fix_age`]).
    pub max_fix_age: chrono::Duration,
    /// Units never to return (declined or let an offer expire in an earlier round).
    pub exclude: &'a HashSet<UnitId>,
    /// The incident's priority (drives the capability policy).
    pub priority: Priority,
    /// How many candidates to return ([`DEFAULT_SHORTLIST`]; capped at [`MAX_SHORTLIST`]).
    pub shortlist: usize,
}

impl<'a> CandidateQuery<'a> {
    /// A query with the default fix age (30 min) and shortlist size (5).
    pub fn new(
        scene: LatLng,
        now: DateTime<Utc>,
        exclude: &'a HashSet<UnitId>,
        priority: Priority,
    ) -> Self {
        Self {
            scene,
            now,
            max_fix_age: default_max_fix_age(),
            exclude,
            priority,
            shortlist: DEFAULT_SHORTLIST,
        }
    }

    /// Whether a unit may be offered this job: available, fix no older than `max_fix_age`
    /// (exactly `max_fix_age` is still fine; a fix from the future counts as fresh), and not
    /// excluded.
    pub fn accepts(&self, unit: &UnitSnapshot) -> bool {
        is_dispatchable(unit.status)
            && self.now - unit.fix_at <= self.max_fix_age
            && !self.exclude.contains(&unit.id)
    }
}

/// The straight-line shortlist for a scene.
///
/// Keeps units that [`CandidateQuery::accepts`], takes the `q.shortlist` nearest by haversine
/// distance (at most [`MAX_SHORTLIST`]; ties by id), gives each its straight-line ETA with
/// reason [`PickReason::ClosestByDistance`], and orders them by the capability policy
/// described on [`rank`]. Units with a non-finite position are skipped.
pub fn shortlist<'u>(
    units: impl IntoIterator<Item = &'u UnitSnapshot>,
    q: &CandidateQuery<'_>,
) -> Vec<Candidate> {
    let limit = q.shortlist.min(MAX_SHORTLIST);
    let mut candidates: Vec<Candidate> = units
        .into_iter()
        .filter(|u| q.accepts(u))
        .filter_map(|u| {
            let distance_m = q.scene.distance_m(&u.position);
            distance_m.is_finite().then(|| Candidate {
                unit_id: u.id.clone(),
                capability: u.capability,
                distance_m,
                eta_s: eta_for_distance_s(distance_m),
                reason: PickReason::ClosestByDistance,
                eta_source: EtaSource::StraightLine,
            })
        })
        .collect();
    candidates.sort_by(|a, b| {
        a.distance_m
            .total_cmp(&b.distance_m)
            .then_with(|| a.unit_id.cmp(&b.unit_id))
    });
    candidates.truncate(limit);
    sort_by_policy(&mut candidates, q.priority);
    candidates
}

/// Final ranking of a shortlist.
///
/// `routed`, when present, holds one ETA per candidate in the same order (`None` = unreachable
/// by road), each with the provider that gave it. Those values replace the straight-line ETAs;
/// the reason becomes [`PickReason::ClosestByEta`] for a routed source and stays
/// [`PickReason::ClosestByDistance`] for [`EtaSource::StraightLine`] (a unit no router could
/// answer for); unreachable candidates are dropped. If every value is `None` (or the slice does
/// not match the candidates one to one) the routers are not trusted: the straight-line ETAs
/// stay, with [`PickReason::ClosestByDistance`] and [`EtaSource::StraightLine`].
///
/// Capability policy: for [`Priority::Emergency`] an ALS unit ranks ahead of a BLS unit unless
/// the BLS unit is more than [`ALS_PREFERENCE_S`] (120 s) faster, i.e. ALS units are sorted as
/// if their ETA were 120 s shorter (an ALS exactly 120 s behind still wins). So an ALS unit
/// within 120 s of the best BLS ETA comes first; otherwise the order is pure ETA. For
/// `Urgent` and `NonUrgent` the order is pure ETA. Ties: distance, then unit id.
pub fn rank(
    mut candidates: Vec<Candidate>,
    routed: Option<&[Option<RoutedEta>]>,
    priority: Priority,
) -> Vec<Candidate> {
    if let Some(routed) = routed {
        let usable = routed.len() == candidates.len() && routed.iter().any(Option::is_some);
        if usable {
            candidates = candidates
                .into_iter()
                .zip(routed.iter().copied())
                .filter_map(|(mut c, eta)| {
                    let eta = eta?;
                    c.eta_s = eta.eta_s;
                    c.eta_source = eta.source;
                    c.reason = if eta.source == EtaSource::StraightLine {
                        PickReason::ClosestByDistance
                    } else {
                        PickReason::ClosestByEta
                    };
                    Some(c)
                })
                .collect();
        } else {
            for c in &mut candidates {
                c.reason = PickReason::ClosestByDistance;
                c.eta_source = EtaSource::StraightLine;
            }
        }
    }
    sort_by_policy(&mut candidates, priority);
    candidates
}

/// Sorts by the capability policy documented on [`rank`].
fn sort_by_policy(candidates: &mut [Candidate], priority: Priority) {
    let prefer_als = priority == Priority::Emergency;
    candidates.sort_by(|a, b| policy_order(a, b, prefer_als));
}

/// The capability policy as a total order: effective ETA (ALS bonus for emergencies), ALS
/// before BLS on an equal effective ETA, then real ETA, distance and id.
fn policy_order(a: &Candidate, b: &Candidate, prefer_als: bool) -> Ordering {
    let boosted = |c: &Candidate| prefer_als && c.capability == Capability::Als;
    let key = |c: &Candidate| {
        let eta = i64::from(c.eta_s);
        if boosted(c) {
            eta - i64::from(ALS_PREFERENCE_S)
        } else {
            eta
        }
    };
    key(a)
        .cmp(&key(b))
        .then_with(|| boosted(b).cmp(&boosted(a)))
        .then_with(|| a.eta_s.cmp(&b.eta_s))
        .then_with(|| a.distance_m.total_cmp(&b.distance_m))
        .then_with(|| a.unit_id.cmp(&b.unit_id))
}

/// An R-tree of unit positions for nearest-unit queries over a large fleet.
///
/// Positions are stored as points on the unit sphere (`[x, y, z]` from latitude and
/// longitude), not as `[lng, lat]` degrees. The straight (chord) distance between two such
/// points grows monotonically with the great-circle distance, so the R-tree's Euclidean
/// nearest-neighbour order *is* the haversine order: no over-fetching, no distortion near the
/// poles (where a degree of longitude shrinks to nothing) and no seam at the antimeridian.
///
/// Updates are a remove plus an insert, both O(log n). Units with a non-finite position are
/// not indexed.
#[derive(Debug, Default)]
pub struct FleetIndex {
    tree: RTree<GeomWithData<[f64; 3], UnitId>>,
    points: HashMap<UnitId, [f64; 3]>,
}

impl FleetIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds an index in one pass (bulk load), later entries winning for repeated ids.
    pub fn from_positions<'a>(units: impl IntoIterator<Item = (&'a UnitId, LatLng)>) -> Self {
        let mut points = HashMap::new();
        for (id, position) in units {
            if let Some(p) = to_unit_sphere(&position) {
                points.insert(id.clone(), p);
            } else {
                points.remove(id);
            }
        }
        let tree = RTree::bulk_load(
            points
                .iter()
                .map(|(id, p)| GeomWithData::new(*p, id.clone()))
                .collect(),
        );
        Self { tree, points }
    }

    /// Adds a unit or moves it. Returns `false` (and leaves the unit out of the index) when
    /// the position is not finite.
    pub fn update(&mut self, unit_id: &UnitId, position: &LatLng) -> bool {
        self.remove(unit_id);
        let Some(p) = to_unit_sphere(position) else {
            return false;
        };
        self.tree.insert(GeomWithData::new(p, unit_id.clone()));
        self.points.insert(unit_id.clone(), p);
        true
    }

    /// Same as [`FleetIndex::update`].
    pub fn insert(&mut self, unit_id: &UnitId, position: &LatLng) -> bool {
        self.update(unit_id, position)
    }

    /// Removes a unit; returns whether it was indexed.
    pub fn remove(&mut self, unit_id: &UnitId) -> bool {
        match self.points.remove(unit_id) {
            Some(p) => self
                .tree
                .remove(&GeomWithData::new(p, unit_id.clone()))
                .is_some(),
            None => false,
        }
    }

    /// Whether a unit is indexed.
    pub fn contains(&self, unit_id: &UnitId) -> bool {
        self.points.contains_key(unit_id)
    }

    /// How many units are indexed.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether no unit is indexed.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Up to `n` units nearest to `scene` (great-circle order) for which `accept` returns
    /// true. Rejected units are skipped, so a fleet where most units are busy still yields `n`
    /// candidates if they exist; the walk costs O(log n) per visited unit.
    pub fn nearest(
        &self,
        scene: &LatLng,
        n: usize,
        accept: impl Fn(&UnitId) -> bool,
    ) -> Vec<UnitId> {
        let Some(q) = to_unit_sphere(scene) else {
            return Vec::new();
        };
        if n == 0 {
            return Vec::new();
        }
        self.tree
            .nearest_neighbor_iter(q)
            .filter(|e| accept(&e.data))
            .take(n)
            .map(|e| e.data.clone())
            .collect()
    }
}

/// A position as a point on the unit sphere, or `None` when it is not finite.
fn to_unit_sphere(p: &LatLng) -> Option<[f64; 3]> {
    if !p.lat.is_finite() || !p.lng.is_finite() {
        return None;
    }
    let (lat, lng) = (p.lat.to_radians(), p.lng.to_radians());
    Some([lat.cos() * lng.cos(), lat.cos() * lng.sin(), lat.sin()])
}

/// What the dispatcher knows about one hospital.
#[derive(Clone, Debug, PartialEq)]
pub struct HospitalSnapshot {
    /// The hospital.
    pub id: HospitalId,
    /// Its emergency entrance.
    pub location: LatLng,
    /// Services offered (e.g. `"stroke"`, `"trauma"`, `"cardiac"`), compared exactly.
    pub capabilities: Vec<String>,
    /// Beds for incoming emergency patients.
    pub capacity: u32,
    /// Beds taken (taken on transport, released at handover).
    pub occupied: u32,
}

/// The hospital to transport to: nearest by straight-line ETA from the scene among hospitals
/// with a free bed (`occupied < capacity`) and, when `needed` is given, that capability
/// (exact match). Ties by distance, then id. Returns the hospital and its ETA in seconds, or
/// `None` when no hospital qualifies.
pub fn choose_hospital(
    hospitals: &[HospitalSnapshot],
    scene: &LatLng,
    needed: Option<&str>,
) -> Option<(HospitalId, u32)> {
    hospitals
        .iter()
        .filter(|h| h.occupied < h.capacity)
        .filter(|h| needed.is_none_or(|cap| h.capabilities.iter().any(|c| c == cap)))
        .filter_map(|h| {
            let d = scene.distance_m(&h.location);
            d.is_finite().then(|| (h, d, eta_for_distance_s(d)))
        })
        .min_by(|a, b| {
            a.2.cmp(&b.2)
                .then_with(|| a.1.total_cmp(&b.1))
                .then_with(|| a.0.id.cmp(&b.0.id))
        })
        .map(|(h, _, eta)| (h.id.clone(), eta))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn units_are_reconciled_with_the_incidents_that_hold_them() {
        use UnitStatus as S;
        let x = IncidentId::new_v7();
        let y = IncidentId::new_v7();
        let holds = |s| Some((x, UnitClaim::Holds(s)));
        // Consistent: nothing to do.
        assert_eq!(reconcile_unit(S::Enroute, Some(x), holds(S::Enroute)), None);
        assert_eq!(reconcile_unit(S::Available, None, None), None);
        assert_eq!(reconcile_unit(S::OutOfService, None, None), None);
        // The accept was stored by the incident, not by the unit.
        assert_eq!(
            reconcile_unit(S::Available, None, holds(S::Assigned)),
            Some((S::Assigned, Some(x)))
        );
        // A report stored by the incident, not by the unit.
        assert_eq!(
            reconcile_unit(S::Enroute, Some(x), holds(S::OnScene)),
            Some((S::OnScene, Some(x)))
        );
        // The unit's offer was pending at the crash (it comes back available), or its accept
        // never reached the incident: nothing holds it.
        assert_eq!(
            reconcile_unit(S::Assigned, Some(y), None),
            Some((S::Available, None))
        );
        assert_eq!(
            reconcile_unit(S::Transporting, None, None),
            Some((S::Available, None))
        );
        // At the hospital while the incident is billed, or already available: both stand.
        let released = Some((x, UnitClaim::Released));
        assert_eq!(reconcile_unit(S::AtHospital, Some(x), released), None);
        assert_eq!(reconcile_unit(S::Available, Some(x), released), None);
        assert_eq!(reconcile_unit(S::Available, None, released), None);
        // Still assigned to an incident that has ended: freed, out of service kept.
        assert_eq!(
            reconcile_unit(S::AtHospital, Some(y), None),
            Some((S::Available, None))
        );
        assert_eq!(
            reconcile_unit(S::OutOfService, Some(y), None),
            Some((S::OutOfService, None))
        );
        // Every open status maps to a claim or to none.
        assert_eq!(
            unit_claim(IncidentStatus::Enroute),
            Some(UnitClaim::Holds(S::Enroute))
        );
        assert_eq!(
            unit_claim(IncidentStatus::Billing),
            Some(UnitClaim::Released)
        );
        assert_eq!(unit_claim(IncidentStatus::Dispatching), None);
    }

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
    }

    fn at(lat: f64, lng: f64) -> LatLng {
        LatLng { lat, lng }
    }

    /// A point `m` metres due north of `p` (1° of latitude = 111 195 m for our sphere).
    fn north_of(p: LatLng, m: f64) -> LatLng {
        at(p.lat + m / 111_194.93, p.lng)
    }

    const SCENE: LatLng = LatLng {
        lat: 52.52,
        lng: 13.40,
    };

    fn unit(id: &str, cap: Capability, status: UnitStatus, metres: f64) -> UnitSnapshot {
        UnitSnapshot {
            id: UnitId::from(id),
            capability: cap,
            status,
            position: north_of(SCENE, metres),
            fix_at: t0(),
        }
    }

    fn avail(id: &str, cap: Capability, metres: f64) -> UnitSnapshot {
        unit(id, cap, UnitStatus::Available, metres)
    }

    fn ids(cs: &[Candidate]) -> Vec<&str> {
        cs.iter().map(|c| c.unit_id.as_str()).collect()
    }

    fn cand(id: &str, cap: Capability, distance_m: f64, eta_s: u32) -> Candidate {
        Candidate {
            unit_id: UnitId::from(id),
            capability: cap,
            distance_m,
            eta_s,
            reason: PickReason::ClosestByDistance,
            eta_source: EtaSource::StraightLine,
        }
    }

    /// Routed ETAs as OSRM would give them.
    fn osrm(etas: &[Option<u32>]) -> Vec<Option<RoutedEta>> {
        etas.iter()
            .map(|e| {
                e.map(|eta_s| RoutedEta {
                    eta_s,
                    source: EtaSource::Osrm,
                })
            })
            .collect()
    }

    #[test]
    fn eta_formula_on_a_known_distance() {
        // 0.01° of longitude on the equator: 1 111.95 m; × 1.3 = 1 445.5 m at 13.89 m/s = 104.08 s.
        let a = at(0.0, 0.0);
        let b = at(0.0, 0.01);
        assert!((a.distance_m(&b) - 1_111.95).abs() < 0.1);
        assert_eq!(straight_line_eta_s(&a, &b), 105);
        // 10 km: 13 000 m at 50 km/h = 936 s exactly; rounding up must not add a second.
        assert_eq!(eta_for_distance_s(10_000.0), 936);
        assert_eq!(eta_for_distance_s(10_000.1), 937);
        assert_eq!(straight_line_eta_s(&a, &a), 0);
        assert_eq!(eta_for_distance_s(f64::NAN), 0);
        assert_eq!(eta_for_distance_s(f64::INFINITY), u32::MAX);
    }

    #[test]
    fn wire_names_round_trip() {
        for s in UnitStatus::ALL {
            assert_eq!(UnitStatus::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
        for r in CrewReport::ALL {
            assert_eq!(CrewReport::parse(r.as_str()), Some(r));
            assert_eq!(
                serde_json::to_value(r).unwrap(),
                serde_json::json!(r.as_str())
            );
        }
        for c in Capability::ALL {
            assert_eq!(Capability::parse(c.as_str()), Some(c));
            assert_eq!(
                serde_json::to_value(c).unwrap(),
                serde_json::json!(c.as_str())
            );
        }
        assert_eq!(UnitStatus::parse("Available"), None);
        assert_eq!(
            serde_json::to_value(PickReason::ClosestByEta).unwrap(),
            serde_json::json!("closest_by_eta")
        );
        assert_eq!(
            serde_json::to_value(cand("u1", Capability::Als, 10.0, 5)).unwrap(),
            serde_json::json!({
                "unit_id": "u1", "capability": "als", "distance_m": 10.0, "eta_s": 5,
                "reason": "closest_by_distance", "eta_source": "straight_line"
            })
        );
        for e in EtaSource::ALL {
            assert_eq!(EtaSource::parse(e.as_str()), Some(e));
            assert_eq!(
                serde_json::to_value(e).unwrap(),
                serde_json::json!(e.as_str())
            );
        }
        assert_eq!(EtaSource::parse("Google"), None);
    }

    #[test]
    fn apply_report_full_table() {
        use CrewReport as R;
        use UnitStatus as S;
        let legal: &[(S, R)] = &[
            (S::Assigned, R::Enroute),
            (S::Enroute, R::OnScene),
            (S::OnScene, R::Transporting),
            (S::Transporting, R::AtHospital),
            (S::AtHospital, R::Available),
            (S::Available, R::OutOfService),
            (S::OutOfService, R::Available),
        ];
        let mut ok = 0;
        for from in S::ALL {
            for report in R::ALL {
                let result = apply_report(from, report);
                if legal.contains(&(from, report)) || report.target() == from {
                    assert_eq!(result, Ok(report.target()), "{from:?} + {report:?}");
                    ok += 1;
                } else {
                    let rej = result.expect_err(&format!("{from:?} + {report:?}"));
                    assert_eq!((rej.from, rej.report), (from, report));
                    assert!(!rej.reason.is_empty());
                    assert_eq!(rej.to_string(), rej.reason);
                }
            }
        }
        // 7 moves + 6 idempotent repeats (offered and assigned cannot be reported).
        assert_eq!(ok, 13);

        let reason = |from, report| apply_report(from, report).unwrap_err().reason;
        assert_eq!(
            reason(S::Enroute, R::Transporting),
            "a unit that is enroute must report on_scene next"
        );
        assert_eq!(
            reason(S::Assigned, R::OnScene),
            "a unit that is assigned must report enroute next"
        );
        assert_eq!(
            reason(S::AtHospital, R::Enroute),
            "a unit that is at_hospital must report available next"
        );
        for from in [S::Offered, S::Assigned] {
            assert_eq!(
                reason(from, R::OutOfService),
                "an offered or assigned unit cannot go out of service; decline or finish the job first"
            );
        }
        assert_eq!(
            reason(S::OnScene, R::OutOfService),
            "a unit that is on_scene cannot go out of service; finish the job first"
        );
        assert_eq!(
            reason(S::Available, R::OnScene),
            "an available unit must be assigned to a job before reporting on_scene"
        );
        assert_eq!(
            reason(S::Offered, R::Enroute),
            "an offered unit must accept or decline the offer before reporting enroute"
        );
        assert_eq!(
            reason(S::OutOfService, R::Enroute),
            "an out-of-service unit must report available before taking work"
        );
    }

    #[test]
    fn only_available_is_dispatchable() {
        for s in UnitStatus::ALL {
            assert_eq!(is_dispatchable(s), s == UnitStatus::Available, "{s:?}");
        }
    }

    #[test]
    fn shortlist_keeps_fresh_available_not_excluded_units() {
        let exclude: HashSet<UnitId> = [UnitId::from("declined")].into_iter().collect();
        let q = CandidateQuery::new(SCENE, t0(), &exclude, Priority::Urgent);

        let mut exactly_30_min = avail("fix-30m", Capability::Bls, 100.0);
        exactly_30_min.fix_at = t0() - chrono::Duration::minutes(30);
        let mut stale = avail("fix-30m1s", Capability::Bls, 50.0);
        stale.fix_at = t0() - chrono::Duration::minutes(30) - chrono::Duration::seconds(1);
        let mut future_fix = avail("future-fix", Capability::Bls, 300.0);
        future_fix.fix_at = t0() + chrono::Duration::seconds(5);
        let mut nan = avail("nan", Capability::Bls, 1.0);
        nan.position = at(f64::NAN, 0.0);

        let units = vec![
            exactly_30_min,
            stale,
            future_fix,
            nan,
            avail("ok", Capability::Bls, 200.0),
            avail("declined", Capability::Bls, 10.0),
            unit("oos", Capability::Bls, UnitStatus::OutOfService, 20.0),
            unit("offered", Capability::Bls, UnitStatus::Offered, 20.0),
            unit("assigned", Capability::Als, UnitStatus::Assigned, 20.0),
            unit("enroute", Capability::Als, UnitStatus::Enroute, 20.0),
        ];
        let list = shortlist(&units, &q);
        assert_eq!(ids(&list), ["fix-30m", "ok", "future-fix"]);
        for c in &list {
            assert_eq!(c.reason, PickReason::ClosestByDistance);
            assert_eq!(
                c.eta_s,
                straight_line_eta_s(
                    &SCENE,
                    &units.iter().find(|u| u.id == c.unit_id).unwrap().position
                )
            );
        }
        assert!(
            (list[0].distance_m - 100.0).abs() < 0.5,
            "{}",
            list[0].distance_m
        );
    }

    #[test]
    fn shortlist_takes_the_nearest_n_capped_at_25() {
        let exclude = HashSet::new();
        let units: Vec<UnitSnapshot> = (0..40)
            .rev()
            .map(|i| {
                avail(
                    &format!("u{i:02}"),
                    Capability::Bls,
                    100.0 * f64::from(i + 1),
                )
            })
            .collect();
        let mut q = CandidateQuery::new(SCENE, t0(), &exclude, Priority::NonUrgent);
        let list = shortlist(&units, &q);
        assert_eq!(ids(&list), ["u00", "u01", "u02", "u03", "u04"]);
        assert!(list.windows(2).all(|w| w[0].eta_s <= w[1].eta_s));

        q.shortlist = 100;
        let list = shortlist(&units, &q);
        assert_eq!(list.len(), MAX_SHORTLIST);
        assert_eq!(list[24].unit_id.as_str(), "u24");

        q.shortlist = 0;
        assert!(shortlist(&units, &q).is_empty());
    }

    #[test]
    fn shortlist_ties_break_by_id() {
        let exclude = HashSet::new();
        let units = vec![
            avail("b", Capability::Bls, 500.0),
            avail("a", Capability::Bls, 500.0),
        ];
        let q = CandidateQuery::new(SCENE, t0(), &exclude, Priority::Urgent);
        assert_eq!(ids(&shortlist(&units, &q)), ["a", "b"]);
    }

    #[test]
    fn emergency_prefers_als_within_120_s_of_the_best_bls() {
        let exclude = HashSet::new();
        // ETA per metre: 1.3 / 13.889 = 0.0936 s. BLS at 1 km ≈ 94 s; ALS at 2 km ≈ 188 s
        // (94 s later: within 120 s).
        let units = vec![
            avail("bls-near", Capability::Bls, 1_000.0),
            avail("als-2km", Capability::Als, 2_000.0),
        ];
        let q = CandidateQuery::new(SCENE, t0(), &exclude, Priority::Emergency);
        let list = shortlist(&units, &q);
        assert_eq!(ids(&list), ["als-2km", "bls-near"]);
        assert!(list[0].eta_s - list[1].eta_s <= ALS_PREFERENCE_S);

        // Urgent: pure ETA order.
        let q = CandidateQuery::new(SCENE, t0(), &exclude, Priority::Urgent);
        assert_eq!(ids(&shortlist(&units, &q)), ["bls-near", "als-2km"]);
    }

    #[test]
    fn emergency_keeps_eta_order_when_als_is_more_than_120_s_behind() {
        let exclude = HashSet::new();
        // ALS at 3 km ≈ 281 s vs BLS at 1 km ≈ 94 s: 187 s behind.
        let units = vec![
            avail("als-3km", Capability::Als, 3_000.0),
            avail("bls-near", Capability::Bls, 1_000.0),
        ];
        let q = CandidateQuery::new(SCENE, t0(), &exclude, Priority::Emergency);
        assert_eq!(ids(&shortlist(&units, &q)), ["bls-near", "als-3km"]);
    }

    #[test]
    fn capability_policy_boundary_is_inclusive() {
        let bls = cand("bls", Capability::Bls, 1_000.0, 100);
        let als_120 = cand("als", Capability::Als, 3_000.0, 220);
        let als_121 = cand("als", Capability::Als, 3_000.0, 221);
        let order = |cs: Vec<Candidate>, p| ids(&rank(cs, None, p)).join(",");
        assert_eq!(
            order(vec![bls.clone(), als_120.clone()], Priority::Emergency),
            "als,bls"
        );
        assert_eq!(
            order(vec![bls.clone(), als_121], Priority::Emergency),
            "bls,als"
        );
        assert_eq!(order(vec![als_120, bls], Priority::NonUrgent), "bls,als");
    }

    #[test]
    fn rank_with_routed_etas_reorders_and_marks_closest_by_eta() {
        let cs = vec![
            cand("a", Capability::Bls, 1_000.0, 94),
            cand("b", Capability::Bls, 2_000.0, 188),
            cand("c", Capability::Bls, 3_000.0, 281),
        ];
        // "a" is behind a river: the road takes 600 s. "c" is on the motorway.
        let routed = osrm(&[Some(600), Some(200), Some(150)]);
        let ranked = rank(cs, Some(&routed), Priority::Urgent);
        assert_eq!(ids(&ranked), ["c", "b", "a"]);
        assert_eq!(
            ranked.iter().map(|c| c.eta_s).collect::<Vec<_>>(),
            [150, 200, 600]
        );
        assert!(ranked.iter().all(|c| c.reason == PickReason::ClosestByEta));
    }

    #[test]
    fn rank_applies_the_capability_policy_to_routed_etas() {
        let cs = vec![
            cand("bls", Capability::Bls, 1_000.0, 94),
            cand("als", Capability::Als, 5_000.0, 468),
        ];
        let routed = osrm(&[Some(300), Some(400)]);
        assert_eq!(
            ids(&rank(cs.clone(), Some(&routed), Priority::Emergency)),
            ["als", "bls"]
        );
        assert_eq!(
            ids(&rank(cs, Some(&routed), Priority::Urgent)),
            ["bls", "als"]
        );
    }

    #[test]
    fn rank_mixes_sources_unit_by_unit() {
        let cs = vec![
            cand("near", Capability::Bls, 1_000.0, 94),
            cand("far", Capability::Bls, 4_000.0, 375),
            cand("lost", Capability::Bls, 2_000.0, 188),
        ];
        // Google answered for two units; the third had no route there and fell back.
        let routed = [
            Some(RoutedEta {
                eta_s: 500,
                source: EtaSource::Google,
            }),
            Some(RoutedEta {
                eta_s: 120,
                source: EtaSource::Google,
            }),
            Some(RoutedEta {
                eta_s: 188,
                source: EtaSource::StraightLine,
            }),
        ];
        let ranked = rank(cs, Some(&routed), Priority::Urgent);
        assert_eq!(ids(&ranked), ["far", "lost", "near"]);
        let how: Vec<_> = ranked.iter().map(|c| (c.reason, c.eta_source)).collect();
        assert_eq!(
            how,
            [
                (PickReason::ClosestByEta, EtaSource::Google),
                (PickReason::ClosestByDistance, EtaSource::StraightLine),
                (PickReason::ClosestByEta, EtaSource::Google),
            ]
        );
    }

    #[test]
    fn rank_drops_unreachable_units() {
        let cs = vec![
            cand("island", Capability::Bls, 500.0, 47),
            cand("b", Capability::Bls, 2_000.0, 188),
            cand("c", Capability::Bls, 3_000.0, 281),
        ];
        let ranked = rank(
            cs,
            Some(&osrm(&[None, Some(300), Some(250)])),
            Priority::Urgent,
        );
        assert_eq!(ids(&ranked), ["c", "b"]);
        assert!(ranked.iter().all(|c| c.reason == PickReason::ClosestByEta));
    }

    #[test]
    fn rank_keeps_straight_line_when_everything_is_unreachable_or_misaligned() {
        let cs = vec![
            cand("b", Capability::Bls, 2_000.0, 188),
            cand("a", Capability::Bls, 1_000.0, 94),
        ];
        for routed in [osrm(&[None, None]), osrm(&[Some(10)])] {
            let ranked = rank(cs.clone(), Some(&routed), Priority::Urgent);
            assert_eq!(ids(&ranked), ["a", "b"]);
            assert_eq!(ranked[0].eta_s, 94);
            assert!(
                ranked
                    .iter()
                    .all(|c| c.reason == PickReason::ClosestByDistance)
            );
        }
        // No routing at all: straight-line ETAs sorted, reasons untouched.
        let ranked = rank(cs, None, Priority::Urgent);
        assert_eq!(ids(&ranked), ["a", "b"]);
    }

    #[test]
    fn rank_ties_break_by_distance_then_id() {
        let cs = vec![
            cand("z", Capability::Bls, 900.0, 100),
            cand("y", Capability::Bls, 800.0, 100),
            cand("x", Capability::Bls, 800.0, 100),
        ];
        assert_eq!(ids(&rank(cs, None, Priority::Urgent)), ["x", "y", "z"]);
    }

    /// A small deterministic generator (xorshift64*), so the test needs no `rand`.
    struct Rng(u64);

    impl Rng {
        fn next_f64(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        }

        fn range(&mut self, lo: f64, hi: f64) -> f64 {
            lo + (hi - lo) * self.next_f64()
        }
    }

    fn brute_force(
        units: &HashMap<UnitId, LatLng>,
        scene: &LatLng,
        n: usize,
        accept: impl Fn(&UnitId) -> bool,
    ) -> Vec<f64> {
        let mut d: Vec<f64> = units
            .iter()
            .filter(|(id, _)| accept(id))
            .map(|(_, p)| scene.distance_m(p))
            .collect();
        d.sort_by(f64::total_cmp);
        d.truncate(n);
        d
    }

    fn distances(units: &HashMap<UnitId, LatLng>, scene: &LatLng, ids: &[UnitId]) -> Vec<f64> {
        ids.iter().map(|id| scene.distance_m(&units[id])).collect()
    }

    fn assert_close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-3, "{x} vs {y}");
        }
    }

    #[test]
    fn fleet_index_matches_brute_force_on_2000_random_units() {
        // Three regions: mid latitudes, the Arctic (longitude degrees shrink) and the
        // antimeridian (longitude wraps).
        for (seed, (lat_lo, lat_hi), (lng_lo, lng_hi)) in [
            (1_u64, (51.0, 53.0), (12.0, 15.0)),
            (2, (68.0, 80.0), (10.0, 40.0)),
            (3, (-20.0, -15.0), (178.0, 182.0)),
        ] {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed);
            let mut units = HashMap::new();
            let mut index = FleetIndex::new();
            for i in 0..2_000 {
                let id = UnitId(format!("u{i}"));
                let mut lng = rng.range(lng_lo, lng_hi);
                if lng > 180.0 {
                    lng -= 360.0;
                }
                let p = at(rng.range(lat_lo, lat_hi), lng);
                assert!(index.insert(&id, &p));
                units.insert(id, p);
            }
            assert_eq!(index.len(), 2_000);
            for _ in 0..50 {
                let mut lng = rng.range(lng_lo, lng_hi);
                if lng > 180.0 {
                    lng -= 360.0;
                }
                let scene = at(rng.range(lat_lo, lat_hi), lng);
                let got = index.nearest(&scene, 10, |_| true);
                assert_close(
                    &distances(&units, &scene, &got),
                    &brute_force(&units, &scene, 10, |_| true),
                );
                // Reject two thirds of the fleet: still 10 results, the right ones.
                let accept =
                    |id: &UnitId| id.as_str()[1..].parse::<u32>().unwrap().is_multiple_of(3);
                let got = index.nearest(&scene, 10, accept);
                assert_eq!(got.len(), 10);
                assert!(got.iter().all(accept));
                assert_close(
                    &distances(&units, &scene, &got),
                    &brute_force(&units, &scene, 10, accept),
                );
            }
            // Bulk load gives the same answers.
            let bulk = FleetIndex::from_positions(units.iter().map(|(id, p)| (id, *p)));
            let scene = at((lat_lo + lat_hi) / 2.0, (lng_lo + lng_hi) / 2.0);
            let scene = at(
                scene.lat,
                if scene.lng > 180.0 {
                    scene.lng - 360.0
                } else {
                    scene.lng
                },
            );
            assert_close(
                &distances(&units, &scene, &bulk.nearest(&scene, 25, |_| true)),
                &brute_force(&units, &scene, 25, |_| true),
            );
        }
    }

    #[test]
    fn fleet_index_update_and_remove() {
        let mut index = FleetIndex::new();
        let (a, b, c) = (UnitId::from("a"), UnitId::from("b"), UnitId::from("c"));
        index.update(&a, &north_of(SCENE, 1_000.0));
        index.update(&b, &north_of(SCENE, 2_000.0));
        index.update(&c, &north_of(SCENE, 3_000.0));
        assert_eq!(index.nearest(&SCENE, 2, |_| true), [a.clone(), b.clone()]);

        // "c" drives to the scene: one entry, new place.
        index.update(&c, &north_of(SCENE, 10.0));
        assert_eq!(index.len(), 3);
        assert_eq!(
            index.nearest(&SCENE, 5, |_| true),
            [c.clone(), a.clone(), b.clone()]
        );

        assert!(index.remove(&a));
        assert!(!index.remove(&a));
        assert!(!index.contains(&a));
        assert_eq!(index.nearest(&SCENE, 5, |_| true), [c.clone(), b.clone()]);
        assert_eq!(
            index.nearest(&SCENE, 5, |id| id != &c),
            std::slice::from_ref(&b)
        );
        assert!(index.nearest(&SCENE, 0, |_| true).is_empty());

        // A non-finite position takes the unit out of the index.
        assert!(!index.update(&b, &at(f64::NAN, 1.0)));
        assert!(!index.contains(&b));
        assert_eq!(index.nearest(&SCENE, 5, |_| true), std::slice::from_ref(&c));
        assert!(index.nearest(&at(f64::NAN, 0.0), 5, |_| true).is_empty());

        assert!(index.remove(&c));
        assert!(index.is_empty());
        assert!(index.nearest(&SCENE, 5, |_| true).is_empty());
    }

    #[test]
    fn fleet_index_handles_10000_units_with_moves() {
        let mut rng = Rng(42);
        let mut index = FleetIndex::new();
        let ids: Vec<UnitId> = (0..10_000).map(|i| UnitId(format!("u{i}"))).collect();
        for id in &ids {
            index.update(id, &at(rng.range(51.0, 53.0), rng.range(12.0, 15.0)));
        }
        // Every unit moves five times; the index keeps one entry per unit.
        let mut last = HashMap::new();
        for _ in 0..5 {
            for id in &ids {
                let p = at(rng.range(51.0, 53.0), rng.range(12.0, 15.0));
                index.update(id, &p);
                last.insert(id.clone(), p);
            }
        }
        assert_eq!(index.len(), 10_000);
        assert_eq!(index.tree.size(), 10_000);
        let got = index.nearest(&SCENE, 25, |_| true);
        assert_close(
            &distances(&last, &SCENE, &got),
            &brute_force(&last, &SCENE, 25, |_| true),
        );
    }

    fn hospital(
        id: &str,
        metres: f64,
        caps: &[&str],
        capacity: u32,
        occupied: u32,
    ) -> HospitalSnapshot {
        HospitalSnapshot {
            id: HospitalId::from(id),
            location: north_of(SCENE, metres),
            capabilities: caps.iter().map(|c| (*c).to_owned()).collect(),
            capacity,
            occupied,
        }
    }

    #[test]
    fn choose_hospital_needs_a_free_bed() {
        let hospitals = vec![
            hospital("full", 500.0, &["trauma"], 10, 10),
            hospital("over-full", 600.0, &["trauma"], 10, 12),
            hospital("no-beds", 700.0, &["trauma"], 0, 0),
            hospital("far", 5_000.0, &["trauma"], 10, 9),
            hospital("farther", 9_000.0, &[], 10, 0),
        ];
        let (id, eta) = choose_hospital(&hospitals, &SCENE, None).unwrap();
        assert_eq!(id.as_str(), "far");
        assert_eq!(eta, straight_line_eta_s(&SCENE, &hospitals[3].location));
    }

    #[test]
    fn choose_hospital_needs_the_capability() {
        let hospitals = vec![
            hospital("general", 1_000.0, &["general"], 10, 0),
            hospital("stroke", 4_000.0, &["general", "stroke"], 10, 0),
            hospital("stroke-full", 2_000.0, &["stroke"], 5, 5),
        ];
        let pick = |needed| choose_hospital(&hospitals, &SCENE, needed).map(|(id, _)| id.0);
        assert_eq!(pick(Some("stroke")).as_deref(), Some("stroke"));
        assert_eq!(pick(None).as_deref(), Some("general"));
        assert_eq!(pick(Some("burns")), None);
        assert_eq!(pick(Some("Stroke")), None);
        assert_eq!(choose_hospital(&[], &SCENE, None), None);
    }
}
