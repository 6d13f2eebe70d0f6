//! Simulated ambulance crews, one task per unit acting with the unit's crew token.
//!
//! A crew keeps its crew WebSocket open (reconnecting with backoff), answers offers after a
//! human moment (usually accepting, sometimes declining), then works the job the way a crew
//! app would: `enroute` after turnout, driving to the scene in a straight line at road speed
//! with a position fix about every simulated second, `on_scene` on arrival, a few minutes with
//! the patient, `transporting` to the nearest hospital with a free emergency bed, `at_hospital`
//! on arrival. Billing then closes the incident, the server frees the unit
//! (`assignment_ended`) and the crew drives back to its station, open for the next offer.
//!
//! Accept, decline and position fixes go over the WebSocket; status reports go over REST so
//! each one gets its own answer. When a report is refused (the incident was cancelled under
//! it, say) the crew asks the server what its unit is doing and carries on from there; a
//! crew that reconnects after a restart resumes the job the server replays to it. The
//! simulation's admin client is used only to look up a job the crew was not offered itself
//! (a dispatcher's manual assignment, or a job resumed after a restart).

use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

use super::city::{EMERGENCY_DEPARTMENT, HospitalSpec, UnitSpec};
use super::client::{Api, Ws};
use super::clock::Clock;
use super::rng::SimRng;
use crate::domain::geo::LatLng;

/// Simulated seconds between two position fixes while driving.
const FIX_EVERY_S: f64 = 1.0;
/// Simulated seconds between two position fixes while parked (keeps the fix fresh enough to be
/// dispatched: the server only considers fixes younger than 30 minutes).
const PARKED_FIX_EVERY_S: f64 = 30.0;
/// However fast the simulation runs, a crew wakes up (and sends a fix) at most this often; the
/// server keeps one `unit.location` event per second per unit anyway.
const MIN_TICK_WALL: Duration = Duration::from_millis(250);
/// Simulated seconds a crew takes to answer an offer.
const DECIDE_S: (f64, f64) = (3.0, 12.0);
/// How often a crew declines an offer.
const DECLINE_P: f64 = 0.08;
/// Why a crew declines.
const DECLINE_REASONS: &[&str] = &["restocking the vehicle", "crew meal break", "refuelling"];
/// Simulated seconds from accepting to driving off (turnout).
const TURNOUT_S: (f64, f64) = (15.0, 45.0);
/// Simulated seconds on scene with the patient.
const ON_SCENE_S: (f64, f64) = (120.0, 240.0);
/// Average road speed, km/h.
const SPEED_KMH: (f64, f64) = (40.0, 60.0);
/// Simulated seconds a crew waits at hospital for billing to close the incident before it
/// reports itself available anyway.
const HANDOVER_GIVE_UP_S: f64 = 600.0;
/// Simulated seconds before a refused or failed status report is tried again.
const RETRY_S: f64 = 5.0;
/// Failed reports in a row before the crew asks the server what its unit is doing.
const MAX_FAILURES: u32 = 3;
/// Closer than this to a destination counts as there, metres.
const ARRIVED_M: f64 = 30.0;
/// Reconnect backoff (wall clock).
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// A connection that lasted this long resets the backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

type Sink = SplitSink<Ws, Message>;

/// A straight drive from one place to another at a constant speed.
#[derive(Clone, Debug)]
struct Leg {
    from: LatLng,
    to: LatLng,
    start: Instant,
    wall: Duration,
    /// Simulated speed, m/s.
    speed_mps: f64,
}

impl Leg {
    fn new(from: LatLng, to: LatLng, speed_mps: f64, clock: Clock, now: Instant) -> Self {
        let distance = from.distance_m(&to);
        Self {
            from,
            to,
            start: now,
            wall: clock.wall(distance / speed_mps.max(1.0)),
            speed_mps,
        }
    }

    fn progress(&self, now: Instant) -> f64 {
        if self.wall.is_zero() {
            return 1.0;
        }
        (now.saturating_duration_since(self.start).as_secs_f64() / self.wall.as_secs_f64()).min(1.0)
    }

    fn position(&self, now: Instant) -> LatLng {
        let f = self.progress(now);
        LatLng {
            lat: self.from.lat + (self.to.lat - self.from.lat) * f,
            lng: self.from.lng + (self.to.lng - self.from.lng) * f,
        }
    }

    fn arrived(&self, now: Instant) -> bool {
        self.progress(now) >= 1.0
    }

    /// Compass heading, degrees from north.
    fn heading_deg(&self) -> f64 {
        let (lat1, lat2) = (self.from.lat.to_radians(), self.to.lat.to_radians());
        let dlng = (self.to.lng - self.from.lng).to_radians();
        let y = dlng.sin() * lat2.cos();
        let x = lat1.cos() * lat2.sin() - lat1.sin() * lat2.cos() * dlng.cos();
        (y.atan2(x).to_degrees() + 360.0) % 360.0
    }
}

/// The incident a crew is working.
#[derive(Clone, Debug)]
struct Job {
    incident_id: String,
    scene: LatLng,
}

/// Where a crew is in its duty cycle (the crew's view; the server's is the unit status).
#[derive(Clone, Debug)]
enum Phase {
    /// Free: parked at the station or driving back to it.
    Idle,
    /// Thinking about an offer.
    Deciding {
        offer_id: String,
        job: Job,
        at: Instant,
        accept: bool,
    },
    /// Accepted; waiting for the server's answer.
    Accepting { offer_id: String, job: Job },
    /// Getting into the vehicle.
    Turnout { job: Job, until: Instant },
    /// Driving to the scene (the route leads there).
    ToScene { job: Job },
    /// With the patient.
    OnScene { job: Job, until: Instant },
    /// Driving to hospital (the route leads there).
    ToHospital { job: Job },
    /// Handing over; billing closes the incident and frees the unit.
    Handover { job: Job, until: Instant },
    /// Lost track: ask the server what the unit is doing at `at`.
    Resync { at: Instant },
}

impl Phase {
    fn incident(&self) -> Option<&str> {
        match self {
            Phase::Deciding { job, .. }
            | Phase::Accepting { job, .. }
            | Phase::Turnout { job, .. }
            | Phase::ToScene { job }
            | Phase::OnScene { job, .. }
            | Phase::ToHospital { job }
            | Phase::Handover { job, .. } => Some(&job.incident_id),
            Phase::Idle | Phase::Resync { .. } => None,
        }
    }

    /// On a job the crew has committed to (not merely offered).
    fn committed_to(&self, incident: &str) -> bool {
        !matches!(self, Phase::Deciding { .. } | Phase::Accepting { .. })
            && self.incident() == Some(incident)
    }
}

/// One simulated crew.
pub struct Crew {
    api: Api,
    admin: Api,
    unit: UnitSpec,
    hospitals: Arc<[HospitalSpec]>,
    clock: Clock,
    rng: SimRng,
    position: LatLng,
    route: Option<Leg>,
    phase: Phase,
    last_fix: Option<Instant>,
    retry_at: Option<Instant>,
    failures: u32,
}

impl Crew {
    /// The crew of `unit`, acting with `api` (its crew token); `admin` looks up jobs it was
    /// not offered itself.
    pub fn new(
        api: Api,
        admin: Api,
        unit: UnitSpec,
        hospitals: Arc<[HospitalSpec]>,
        clock: Clock,
        rng: SimRng,
    ) -> Self {
        let position = unit.base;
        Self {
            api,
            admin,
            unit,
            hospitals,
            clock,
            rng,
            position,
            route: None,
            phase: Phase::Idle,
            last_fix: None,
            retry_at: None,
            failures: 0,
        }
    }

    /// Works shifts until dropped: connects, serves, reconnects with backoff.
    pub async fn run(mut self) -> anyhow::Result<()> {
        self.take_over().await;
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.api.ws("/api/v1/ws/crew").await {
                Ok(ws) => {
                    let connected = Instant::now();
                    if let Err(e) = self.session(ws).await {
                        tracing::debug!(unit.id = %self.unit.id, error = %e, "crew connection lost");
                    }
                    if connected.elapsed() >= STABLE_CONNECTION {
                        backoff = BACKOFF_MIN;
                    }
                }
                Err(e) => {
                    tracing::debug!(unit.id = %self.unit.id, error = %e, "crew could not connect")
                }
            }
            let jitter = backoff.mul_f64(self.rng.range(0.0, 0.3));
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Starts from where the server has the unit (it may have moved in an earlier run) and
    /// puts it back in service if it was left out of service.
    async fn take_over(&mut self) {
        let Ok(unit) = self
            .api
            .get(&format!("/api/v1/units/{}", self.unit.id))
            .await
        else {
            return;
        };
        if let Ok(at) = serde_json::from_value::<LatLng>(unit["location"].clone()) {
            self.position = at;
        }
        if unit["status"] == "out_of_service" {
            let _ = self.report("available", None).await;
        }
        if unit["incident_id"].is_null() && self.away_from_base() {
            self.drive_home(Instant::now());
        }
    }

    async fn session(&mut self, ws: Ws) -> anyhow::Result<()> {
        let (mut tx, mut rx) = ws.split();
        // A fresh fix on every (re)connection: the unit is dispatchable at once.
        self.last_fix = None;
        // Whatever happened while disconnected, the server knows: it replays a pending offer,
        // and the unit's status says how far a job got (or that it is over).
        match self.phase {
            Phase::Deciding { .. } | Phase::Accepting { .. } => self.phase = Phase::Idle,
            Phase::Idle | Phase::Resync { .. } => {}
            _ => self.phase = Phase::Resync { at: Instant::now() },
        }
        let mut ticker =
            tokio::time::interval(self.clock.wall_at_least(FIX_EVERY_S, MIN_TICK_WALL));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                frame = rx.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        if let Ok(frame) = serde_json::from_str::<Value>(text.as_str()) {
                            self.on_frame(&frame).await;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => return Ok(()),
                    // Pings are answered by the WebSocket library while reading.
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                },
                _ = ticker.tick() => self.tick(&mut tx).await?,
            }
        }
    }

    /// A frame from the server.
    // Long on purpose: one arm per server frame type, read as the crew protocol.
    async fn on_frame(&mut self, frame: &Value) {
        let now = Instant::now();
        let text = |key: &str| frame[key].as_str().map(str::to_owned);
        match frame["type"].as_str().unwrap_or_default() {
            "offer" => {
                let (Some(offer_id), Some(incident_id), Ok(scene)) = (
                    text("offer_id"),
                    text("incident_id"),
                    serde_json::from_value::<LatLng>(frame["location"].clone()),
                ) else {
                    return;
                };
                if matches!(self.phase, Phase::Idle) {
                    let think = self.rng.range(DECIDE_S.0, DECIDE_S.1);
                    self.phase = Phase::Deciding {
                        offer_id,
                        job: Job { incident_id, scene },
                        at: now + self.clock.wall(think),
                        accept: !self.rng.chance(DECLINE_P),
                    };
                }
            }
            "offer_withdrawn" => {
                if let Phase::Deciding { offer_id, .. } | Phase::Accepting { offer_id, .. } =
                    &self.phase
                    && Some(offer_id.as_str()) == frame["offer_id"].as_str()
                {
                    self.phase = Phase::Idle;
                }
            }
            "accept_result" => {
                if let Phase::Accepting { offer_id, job } = &self.phase
                    && Some(offer_id.as_str()) == frame["offer_id"].as_str()
                {
                    if frame["outcome"] == "assigned" {
                        let job = job.clone();
                        self.start(job, "assigned", None, now);
                    } else {
                        self.phase = Phase::Idle;
                    }
                }
            }
            "assigned" => {
                let Some(incident_id) = text("incident_id") else {
                    return;
                };
                if self.phase.committed_to(&incident_id) {
                    return; // already working it (a replay after reconnecting)
                }
                // A replay after a restart says how far the job got; a fresh one is `assigned`.
                let status = text("status").unwrap_or_else(|| "assigned".to_owned());
                match &self.phase {
                    Phase::Deciding { job, .. } | Phase::Accepting { job, .. }
                        if job.incident_id == incident_id =>
                    {
                        let job = job.clone();
                        self.start(job, &status, None, now);
                    }
                    _ => match self.look_up(&incident_id).await {
                        Ok((job, hospital)) => self.start(job, &status, hospital, now),
                        Err(e) => {
                            tracing::debug!(unit.id = %self.unit.id, incident.id = %incident_id, error = %e, "could not look up the assigned job");
                            self.phase = Phase::Resync {
                                at: now + self.clock.wall(RETRY_S),
                            };
                        }
                    },
                }
            }
            "assignment_ended" if self.phase.incident() == frame["incident_id"].as_str() => {
                tracing::debug!(unit.id = %self.unit.id, incident.id = ?frame["incident_id"].as_str(),
                    reason = ?frame["reason"].as_str(), "job over; back to the station");
                self.phase = Phase::Idle;
                self.retry_at = None;
                self.drive_home(now);
            }
            "error" => {
                if matches!(self.phase, Phase::Accepting { .. }) {
                    self.phase = Phase::Idle;
                }
                tracing::debug!(unit.id = %self.unit.id, error = %frame["error"], "crew frame refused");
            }
            // location_ack, decline_result and anything newer need nothing.
            _ => {}
        }
    }

    /// Moves, sends a fix when due, and advances the job when its moment has come.
    async fn tick(&mut self, tx: &mut Sink) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut arrived = false;
        if let Some(leg) = &self.route {
            self.position = leg.position(now);
            arrived = leg.arrived(now);
        }
        let fix_due = self.route.is_some()
            || self
                .last_fix
                .is_none_or(|t| now.duration_since(t) >= self.clock.wall(PARKED_FIX_EVERY_S));
        if fix_due {
            self.send_fix(tx, now).await?;
        }
        if arrived {
            self.route = None;
        }
        if self.retry_at.is_some_and(|t| now < t) {
            return Ok(());
        }
        self.retry_at = None;
        self.advance(tx, now).await
    }

    // Long on purpose: the simulated crew's state machine, one arm per phase.
    async fn advance(&mut self, tx: &mut Sink, now: Instant) -> anyhow::Result<()> {
        match self.phase.clone() {
            Phase::Idle | Phase::Accepting { .. } => {}
            Phase::Deciding {
                offer_id,
                job,
                at,
                accept,
            } => {
                if now < at {
                    return Ok(());
                }
                if accept {
                    send(tx, json!({"type": "accept", "offer_id": offer_id})).await?;
                    self.phase = Phase::Accepting { offer_id, job };
                } else {
                    let reason = self.rng.pick(DECLINE_REASONS).copied().unwrap_or("busy");
                    tracing::debug!(unit.id = %self.unit.id, incident.id = %job.incident_id, "crew declines the offer");
                    send(
                        tx,
                        json!({"type": "decline", "offer_id": offer_id, "reason": reason}),
                    )
                    .await?;
                    self.phase = Phase::Idle;
                }
            }
            Phase::Turnout { job, until } => {
                if now >= until && self.reported("enroute", None, now).await {
                    self.drive_to(job.scene, now);
                    self.phase = Phase::ToScene { job };
                }
            }
            Phase::ToScene { job } => {
                if self.route.is_none() && self.reported("on_scene", None, now).await {
                    let stay = self.rng.range(ON_SCENE_S.0, ON_SCENE_S.1);
                    self.phase = Phase::OnScene {
                        job,
                        until: now + self.clock.wall(stay),
                    };
                }
            }
            Phase::OnScene { job, until } => {
                if now < until {
                    return Ok(());
                }
                let choice = self.choose_hospital().await;
                let hospital_id = choice.as_ref().map(|(id, _)| id.as_str());
                if self.reported("transporting", hospital_id, now).await {
                    match choice {
                        Some((_, at)) => {
                            self.drive_to(at, now);
                            self.phase = Phase::ToHospital { job };
                        }
                        // The server chose: ask it where to.
                        None => self.phase = Phase::Resync { at: now },
                    }
                }
            }
            Phase::ToHospital { job } => {
                if self.route.is_none() && self.reported("at_hospital", None, now).await {
                    self.phase = Phase::Handover {
                        job,
                        until: now + self.clock.wall(HANDOVER_GIVE_UP_S),
                    };
                }
            }
            Phase::Handover { job, until } => {
                if now >= until {
                    tracing::debug!(unit.id = %self.unit.id, incident.id = %job.incident_id, "incident not closed after handover; crew back in service");
                    if self.reported("available", None, now).await {
                        self.phase = Phase::Idle;
                        self.drive_home(now);
                    }
                }
            }
            Phase::Resync { at } => {
                if now >= at {
                    self.resync(now).await;
                }
            }
        }
        Ok(())
    }

    /// Starts (or resumes, after a restart) `job` from the unit status `status`.
    fn start(&mut self, job: Job, status: &str, hospital_id: Option<String>, now: Instant) {
        self.failures = 0;
        self.retry_at = None;
        self.route = None;
        match status {
            "assigned" => {
                tracing::debug!(unit.id = %self.unit.id, incident.id = %job.incident_id, "crew accepted the incident");
                let turnout = self.rng.range(TURNOUT_S.0, TURNOUT_S.1);
                self.phase = Phase::Turnout {
                    job,
                    until: now + self.clock.wall(turnout),
                };
            }
            "enroute" => {
                self.drive_to(job.scene, now);
                self.phase = Phase::ToScene { job };
            }
            "on_scene" => {
                self.position = job.scene;
                let stay = self.rng.range(ON_SCENE_S.0, ON_SCENE_S.1);
                self.phase = Phase::OnScene {
                    job,
                    until: now + self.clock.wall(stay),
                };
            }
            "transporting" => {
                let hospital = hospital_id
                    .and_then(|id| self.hospitals.iter().find(|h| h.id == id))
                    .or_else(|| self.nearest_ed())
                    .map(|h| (h.id.to_owned(), h.location));
                match hospital {
                    Some((_, at)) => {
                        self.drive_to(at, now);
                        self.phase = Phase::ToHospital { job };
                    }
                    None => self.phase = Phase::Resync { at: now },
                }
            }
            "at_hospital" => {
                self.phase = Phase::Handover {
                    job,
                    until: now + self.clock.wall(HANDOVER_GIVE_UP_S),
                };
            }
            _ => {
                self.phase = Phase::Idle;
                self.drive_home(now);
            }
        }
    }

    /// Asks the server what the unit is doing and carries on from there.
    async fn resync(&mut self, now: Instant) {
        self.failures = 0;
        let unit = match self
            .api
            .get(&format!("/api/v1/units/{}", self.unit.id))
            .await
        {
            Ok(unit) => unit,
            Err(e) => {
                tracing::debug!(unit.id = %self.unit.id, error = %e, "could not read the unit");
                self.phase = Phase::Resync {
                    at: now + self.clock.wall(RETRY_S),
                };
                return;
            }
        };
        let status = unit["status"].as_str().unwrap_or("available").to_owned();
        match unit["incident_id"].as_str() {
            Some(incident) => match self.look_up(incident).await {
                Ok((job, hospital)) => self.start(job, &status, hospital, now),
                Err(_) => {
                    self.phase = Phase::Resync {
                        at: now + self.clock.wall(RETRY_S),
                    }
                }
            },
            None => {
                self.phase = Phase::Idle;
                self.drive_home(now);
            }
        }
    }

    /// The scene and destination of an incident the crew was not offered itself.
    async fn look_up(&self, incident: &str) -> anyhow::Result<(Job, Option<String>)> {
        let detail = self
            .admin
            .get(&format!("/api/v1/incidents/{incident}"))
            .await?;
        let scene: LatLng = serde_json::from_value(detail["location"].clone())?;
        let hospital = detail["hospital_id"].as_str().map(str::to_owned);
        Ok((
            Job {
                incident_id: incident.to_owned(),
                scene,
            },
            hospital,
        ))
    }

    /// Reports a status over REST; on failure schedules a retry (or a resync) and says false.
    async fn reported(&mut self, status: &str, hospital_id: Option<&str>, now: Instant) -> bool {
        match self.report(status, hospital_id).await {
            Ok(()) => {
                self.failures = 0;
                true
            }
            Err(e) => {
                self.failures += 1;
                tracing::debug!(unit.id = %self.unit.id, status, error = %e, "status report failed");
                if self.failures >= MAX_FAILURES {
                    self.phase = Phase::Resync { at: now };
                } else {
                    self.retry_at = Some(now + self.clock.wall_at_least(RETRY_S, MIN_TICK_WALL));
                }
                false
            }
        }
    }

    async fn report(&self, status: &str, hospital_id: Option<&str>) -> anyhow::Result<()> {
        let mut body = json!({ "status": status });
        if let Some(h) = hospital_id {
            body["hospital_id"] = json!(h);
        }
        self.api
            .post(&format!("/api/v1/units/{}/status", self.unit.id), &body)
            .await
            .map(|_| ())
    }

    /// The nearest hospital with an emergency department and a free bed (from the live list),
    /// else the nearest emergency department; `None` leaves the choice to the server.
    async fn choose_hospital(&self) -> Option<(String, LatLng)> {
        let free: Vec<(String, LatLng)> = match self.api.get("/api/v1/hospitals").await {
            Ok(list) => list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|h| {
                    h["capabilities"]
                        .as_array()
                        .is_some_and(|c| c.iter().any(|c| c == EMERGENCY_DEPARTMENT))
                        && h["occupied"].as_u64() < h["capacity"].as_u64()
                })
                .filter_map(|h| {
                    Some((
                        h["id"].as_str()?.to_owned(),
                        serde_json::from_value(h["location"].clone()).ok()?,
                    ))
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        let here = self.position;
        free.into_iter()
            .min_by(|a, b| here.distance_m(&a.1).total_cmp(&here.distance_m(&b.1)))
            .or_else(|| self.nearest_ed().map(|h| (h.id.to_owned(), h.location)))
    }

    fn nearest_ed(&self) -> Option<&HospitalSpec> {
        let here = self.position;
        self.hospitals
            .iter()
            .filter(|h| h.capabilities.contains(&EMERGENCY_DEPARTMENT))
            .min_by(|a, b| {
                here.distance_m(&a.location)
                    .total_cmp(&here.distance_m(&b.location))
            })
    }

    fn drive_to(&mut self, to: LatLng, now: Instant) {
        let kmh = self.rng.range(SPEED_KMH.0, SPEED_KMH.1);
        self.route = Some(Leg::new(self.position, to, kmh / 3.6, self.clock, now));
    }

    fn away_from_base(&self) -> bool {
        self.position.distance_m(&self.unit.base) > ARRIVED_M
    }

    fn drive_home(&mut self, now: Instant) {
        if self.away_from_base() {
            self.drive_to(self.unit.base, now);
        } else {
            self.route = None;
        }
    }

    async fn send_fix(&mut self, tx: &mut Sink, now: Instant) -> anyhow::Result<()> {
        let mut fix = json!({
            "type": "location",
            "lat": self.position.lat,
            "lng": self.position.lng,
            "at": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        });
        if let Some(leg) = &self.route {
            fix["speed_mps"] = json!((leg.speed_mps * 10.0).round() / 10.0);
            fix["heading_deg"] = json!(leg.heading_deg().round());
        } else {
            fix["speed_mps"] = json!(0.0);
        }
        send(tx, fix).await?;
        self.last_fix = Some(now);
        Ok(())
    }
}

async fn send(tx: &mut Sink, frame: Value) -> anyhow::Result<()> {
    tx.send(Message::text(frame.to_string())).await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_leg_moves_in_a_straight_line_at_its_speed() {
        let clock = Clock::new(10.0).unwrap();
        let from = LatLng {
            lat: 55.95,
            lng: -3.20,
        };
        let to = LatLng {
            lat: 55.96,
            lng: -3.20,
        };
        let now = Instant::now();
        // About 1,112 m north at 13.9 m/s (50 km/h): 80 simulated seconds, 8 s of wall time.
        let leg = Leg::new(from, to, 50.0 / 3.6, clock, now);
        assert!((leg.wall.as_secs_f64() - 8.0).abs() < 0.1, "{:?}", leg.wall);
        let half = leg.position(now + leg.wall / 2);
        assert!((half.lat - 55.955).abs() < 1e-6);
        assert!(!leg.arrived(now + leg.wall / 2));
        assert!(leg.arrived(now + leg.wall));
        assert_eq!(leg.position(now + leg.wall * 2), to);
        assert!(leg.heading_deg().abs() < 1.0 || (leg.heading_deg() - 360.0).abs() < 1.0);
    }
}
