//! Simulated wearables behind one gateway: every device reports mostly normal vitals with a
//! little noise, and the gateway posts them in batches (`POST /api/v1/vitals`).
//!
//! Now and then someone in the city gets into trouble: their vitals deteriorate into the
//! emergency range, or they fall and do not get up (the server's fall grace window then
//! escalates), or they fall and get up again (a false alarm that stands down). Emergencies are
//! paced at a city-wide rate rather than rolled per wearer, so a demo is never quiet for long
//! and never flooded. Once the crew is on scene the wearer's vitals stabilise; when the
//! incident is closed (or cancelled) they are well again.
//!
//! The wearables only know what a gateway knows; to notice that help arrived and that an
//! incident ended, the simulation watches the open incidents with an admin token. Logs carry
//! device and incident ids only, never who the wearer is or where they live.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};
use tokio::time::{Instant, MissedTickBehavior};

use super::city::{Baseline, WearerSpec};
use super::client::Api;
use super::clock::Clock;
use super::rng::SimRng;

/// Simulated seconds between two readings of one device.
const READING_INTERVAL_S: f64 = 15.0;
/// Simulated seconds between two gateway batches.
const BATCH_INTERVAL_S: f64 = 5.0;
/// Simulated seconds between two looks at the open incidents.
const WATCH_INTERVAL_S: f64 = 10.0;
/// However fast the simulation runs, the gateway posts at most this often...
const MIN_BATCH_WALL: Duration = Duration::from_millis(100);
/// ...and the open incidents are read at most this often.
const MIN_WATCH_WALL: Duration = Duration::from_millis(500);
/// A wearer whose trouble led nowhere (no incident, or one never closed) recovers after this
/// many simulated seconds, so nobody stays ill forever.
const GIVE_UP_S: f64 = 2.0 * 3600.0;
/// The first trouble comes 1–2 times this many simulated seconds after the start, and is a
/// deterioration (dispatched at once, no fall grace window), so a fresh demo shows an
/// ambulance being offered a job within seconds of starting.
const FIRST_TROUBLE_S: f64 = 5.0;
/// Readings per request (the API takes up to 1,000).
const MAX_BATCH: usize = 1_000;
/// Incident statuses in which a crew is with the patient.
const HELP_ARRIVED: &[&str] = &["on_scene", "transporting", "at_hospital", "billing"];

/// What kind of emergency a deteriorating wearer has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Profile {
    /// Heart rate above 150.
    Tachycardia,
    /// Oxygen saturation below 91 with fast breathing.
    Hypoxia,
    /// Fever above 39 °C, fast pulse and breathing (NEWS2 high).
    Sepsis,
    /// Heart rate below 40.
    Bradycardia,
}

const PROFILES: &[Profile] = &[
    Profile::Tachycardia,
    Profile::Hypoxia,
    Profile::Sepsis,
    Profile::Bradycardia,
];

/// How a wearer is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Condition {
    /// Normal vitals, moving about now and then.
    Well,
    /// Emergency-range vitals until a crew is on scene.
    Deteriorating(Profile),
    /// Fell. The fall reading goes out once; then no movement, unless the wearer gets up
    /// (`gets_up_at`) before the grace window runs out.
    Fallen {
        fall_reported: bool,
        gets_up_at: Option<Instant>,
    },
    /// A crew is with them: stabilised vitals until the incident ends.
    UnderCare,
}

impl Condition {
    /// For logs.
    fn label(&self) -> &'static str {
        match self {
            Condition::Well => "well",
            Condition::Deteriorating(Profile::Tachycardia) => "deteriorating: tachycardia",
            Condition::Deteriorating(Profile::Hypoxia) => "deteriorating: hypoxia",
            Condition::Deteriorating(Profile::Sepsis) => "deteriorating: sepsis",
            Condition::Deteriorating(Profile::Bradycardia) => "deteriorating: bradycardia",
            Condition::Fallen {
                gets_up_at: None, ..
            } => "fell, not moving",
            Condition::Fallen { .. } => "fell, will get up",
            Condition::UnderCare => "under care",
        }
    }
}

struct Wearer {
    spec: WearerSpec,
    condition: Condition,
    next_reading: Instant,
    /// The incident of the current episode, once known.
    incident: Option<String>,
    /// When the current episode began.
    trouble_since: Option<Instant>,
}

impl Wearer {
    fn in_trouble(&self) -> bool {
        self.condition != Condition::Well || self.incident.is_some()
    }

    fn recover(&mut self) {
        self.condition = Condition::Well;
        self.incident = None;
        self.trouble_since = None;
    }
}

/// The wearable gateway simulation.
pub struct Wearables {
    gateway: Api,
    admin: Api,
    clock: Clock,
    rng: SimRng,
    wearers: Vec<Wearer>,
    /// Mean simulated seconds between two wearers getting into trouble.
    mean_gap_s: f64,
}

impl Wearables {
    /// Devices of `wearers`, posting with the `gateway` client and watching incidents with
    /// `admin`; someone gets into trouble `per_hour` times per simulated hour on average.
    pub fn new(
        gateway: Api,
        admin: Api,
        clock: Clock,
        rng: SimRng,
        wearers: Vec<WearerSpec>,
        per_hour: f64,
    ) -> Self {
        let now = Instant::now();
        Self {
            gateway,
            admin,
            clock,
            rng,
            wearers: wearers
                .into_iter()
                .map(|spec| Wearer {
                    spec,
                    condition: Condition::Well,
                    next_reading: now,
                    incident: None,
                    trouble_since: None,
                })
                .collect(),
            mean_gap_s: 3600.0 / per_hour.max(0.01),
        }
    }

    /// Streams vitals until dropped.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        // Devices were switched on at different moments: spread their readings out.
        for i in 0..self.wearers.len() {
            let offset = self.clock.wall(self.rng.range(0.0, READING_INTERVAL_S));
            if let Some(w) = self.wearers.get_mut(i) {
                w.next_reading = start + offset;
            }
        }
        let mut next_trouble = start + self.clock.wall(FIRST_TROUBLE_S * self.rng.range(1.0, 2.0));
        let mut first_trouble = true;
        let mut batches =
            tokio::time::interval(self.clock.wall_at_least(BATCH_INTERVAL_S, MIN_BATCH_WALL));
        batches.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut watch =
            tokio::time::interval(self.clock.wall_at_least(WATCH_INTERVAL_S, MIN_WATCH_WALL));
        watch.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = batches.tick() => {
                    let now = Instant::now();
                    if now >= next_trouble {
                        self.strike(now, first_trouble);
                        first_trouble = false;
                        // Paced, not Poisson: 0.5–1.5 × the mean gap.
                        next_trouble = now + self.clock.wall(self.mean_gap_s * self.rng.range(0.5, 1.5));
                    }
                    self.post_due(now).await;
                }
                _ = watch.tick() => self.watch_incidents().await,
            }
        }
    }

    /// Someone who is well gets into trouble; with `deteriorate`, always a deterioration.
    fn strike(&mut self, now: Instant, deteriorate: bool) {
        let candidates: Vec<usize> = self
            .wearers
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.in_trouble())
            .map(|(i, _)| i)
            .collect();
        let Some(&i) = self.rng.pick(&candidates) else {
            return;
        };
        let roll = self.rng.unit();
        let condition = if deteriorate || roll < 0.6 {
            Condition::Deteriorating(
                self.rng
                    .pick(PROFILES)
                    .copied()
                    .unwrap_or(Profile::Tachycardia),
            )
        } else {
            // Most people who fall stay down; one in four gets up in time.
            let gets_up = roll >= 0.9;
            Condition::Fallen {
                fall_reported: false,
                gets_up_at: gets_up.then(|| now + self.clock.wall(self.rng.range(15.0, 40.0))),
            }
        };
        if let Some(w) = self.wearers.get_mut(i) {
            tracing::debug!(device.id = %w.spec.device_id, condition = condition.label(), "a wearer gets into trouble");
            w.condition = condition;
            w.trouble_since = Some(now);
            // The device reports the change at once.
            w.next_reading = now;
        }
    }

    /// Posts the readings that are due, in batches, and notes the incidents they opened.
    async fn post_due(&mut self, now: Instant) {
        let interval = self.clock.wall(READING_INTERVAL_S);
        let mut due = Vec::new();
        let mut readings = Vec::new();
        for i in 0..self.wearers.len() {
            let Some(w) = self.wearers.get_mut(i) else {
                continue;
            };
            if w.next_reading > now {
                continue;
            }
            w.next_reading = (w.next_reading + interval).max(now);
            let reading = reading_of(w, &mut self.rng, now);
            due.push(i);
            readings.push(reading);
        }
        for (chunk_due, chunk) in due.chunks(MAX_BATCH).zip(readings.chunks(MAX_BATCH)) {
            let body = json!({ "readings": chunk });
            match self.gateway.post("/api/v1/vitals", &body).await {
                Ok(answer) => self.note_results(chunk_due, &answer),
                // Lost readings are like a gateway's dropped uplink: the next batch follows.
                Err(e) => {
                    tracing::warn!(error = %e, readings = chunk.len(), "vitals batch not accepted")
                }
            }
        }
    }

    fn note_results(&mut self, due: &[usize], answer: &Value) {
        let Some(results) = answer["results"].as_array() else {
            return;
        };
        for result in results {
            let (Some(index), Some(incident)) =
                (result["index"].as_u64(), result["incident_id"].as_str())
            else {
                continue;
            };
            let Some(w) = usize::try_from(index)
                .ok()
                .and_then(|k| due.get(k))
                .and_then(|&i| self.wearers.get_mut(i))
            else {
                continue;
            };
            if w.incident.is_none() {
                tracing::debug!(device.id = %w.spec.device_id, incident.id = incident, "wearer's emergency opened an incident");
            }
            w.incident = Some(incident.to_owned());
        }
    }

    /// Reads the open incidents: help arriving stabilises a wearer, an ended incident makes
    /// them well again.
    async fn watch_incidents(&mut self) {
        if !self.wearers.iter().any(Wearer::in_trouble) {
            return;
        }
        let open = match open_incidents(&self.admin).await {
            Ok(open) => open,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the open incidents");
                return;
            }
        };
        let give_up = self.clock.wall(GIVE_UP_S);
        for w in self.wearers.iter_mut().filter(|w| w.in_trouble()) {
            match open.get(w.spec.patient_id.as_str()) {
                Some((id, status)) => {
                    w.incident = Some(id.clone());
                    let helped = HELP_ARRIVED.contains(&status.as_str());
                    if helped
                        && matches!(
                            w.condition,
                            Condition::Deteriorating(_) | Condition::Fallen { .. }
                        )
                    {
                        tracing::debug!(device.id = %w.spec.device_id, incident.id = %id, "crew with the wearer: vitals stabilise");
                        w.condition = Condition::UnderCare;
                    }
                }
                None if w.incident.is_some() => {
                    tracing::debug!(device.id = %w.spec.device_id, incident.id = ?w.incident, "incident over: wearer well again");
                    w.recover();
                }
                None => {
                    if w.trouble_since.is_some_and(|t| t.elapsed() > give_up) {
                        w.recover();
                    }
                }
            }
        }
    }
}

/// Open incidents by patient id: `(incident id, status)`.
async fn open_incidents(admin: &Api) -> anyhow::Result<HashMap<String, (String, String)>> {
    let mut open = HashMap::new();
    let mut cursor: Option<String> = None;
    // Ten pages of 200 is far more than a city of this size ever has open.
    for _ in 0..10 {
        let path = match &cursor {
            Some(c) => format!("/api/v1/incidents?status=open&limit=200&cursor={c}"),
            None => "/api/v1/incidents?status=open&limit=200".to_owned(),
        };
        let page = admin.get(&path).await?;
        for item in page["items"].as_array().into_iter().flatten() {
            if let (Some(patient), Some(id), Some(status)) = (
                item["patient_id"].as_str(),
                item["id"].as_str(),
                item["status"].as_str(),
            ) {
                open.insert(patient.to_owned(), (id.to_owned(), status.to_owned()));
            }
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    Ok(open)
}

/// The vitals a wearer's device measures now (wall-clock timestamp: the server judges
/// timestamps against its own clock).
fn reading_of(w: &mut Wearer, rng: &mut SimRng, now: Instant) -> Value {
    let b = w.spec.baseline;
    let mut fall_detected = false;
    let mut moving = false;
    let vitals = match w.condition {
        Condition::Well => {
            moving = rng.chance(0.3);
            normal(b, rng)
        }
        Condition::Deteriorating(profile) => emergency(profile, b, rng),
        Condition::Fallen {
            fall_reported: false,
            gets_up_at,
        } => {
            fall_detected = true;
            w.condition = Condition::Fallen {
                fall_reported: true,
                gets_up_at,
            };
            normal(b, rng)
        }
        Condition::Fallen {
            gets_up_at: Some(up),
            ..
        } if now >= up => {
            // Up again: the movement stands the fall alert down.
            moving = true;
            w.recover();
            normal(b, rng)
        }
        Condition::Fallen { .. } => normal(b, rng),
        Condition::UnderCare => stabilised(b, rng),
    };
    let mut reading = json!({
        "device_id": w.spec.device_id,
        "timestamp": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        "heart_rate_bpm": vitals.heart_rate_bpm,
        "spo2_pct": vitals.spo2_pct,
        "respiration_rate_bpm": vitals.respiration_rate_bpm,
        "body_temp_c": vitals.body_temp_c,
        "moving": moving,
        "location": {
            "lat": w.spec.home.lat + rng.noise() * 0.00003,
            "lng": w.spec.home.lng + rng.noise() * 0.00005,
            "accuracy_m": 10.0,
        },
    });
    if fall_detected {
        reading["fall_detected"] = json!(true);
    }
    reading
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Normal vitals around the baseline, kept inside the normal band (and NEWS2 0).
fn normal(b: Baseline, rng: &mut SimRng) -> Baseline {
    Baseline {
        heart_rate_bpm: (b.heart_rate_bpm + rng.noise() * 2.5)
            .clamp(52.0, 90.0)
            .round(),
        spo2_pct: (b.spo2_pct + rng.noise() * 0.6).clamp(96.0, 100.0).round(),
        respiration_rate_bpm: (b.respiration_rate_bpm + rng.noise())
            .clamp(12.0, 20.0)
            .round(),
        body_temp_c: round1((b.body_temp_c + rng.noise() * 0.1).clamp(36.2, 37.4)),
    }
}

/// Emergency-range vitals (`docs/domain.md` thresholds) for `profile`.
fn emergency(profile: Profile, b: Baseline, rng: &mut SimRng) -> Baseline {
    let (hr, spo2, rr, temp) = match profile {
        Profile::Tachycardia => (
            rng.range(158.0, 178.0),
            rng.range(93.0, 95.0),
            rng.range(22.0, 26.0),
            b.body_temp_c,
        ),
        Profile::Hypoxia => (
            rng.range(112.0, 126.0),
            rng.range(84.0, 89.0),
            rng.range(31.0, 35.0),
            b.body_temp_c,
        ),
        Profile::Sepsis => (
            rng.range(122.0, 136.0),
            rng.range(92.0, 94.0),
            rng.range(25.0, 29.0),
            rng.range(39.4, 40.1),
        ),
        Profile::Bradycardia => (
            rng.range(32.0, 38.0),
            rng.range(93.0, 95.0),
            rng.range(10.0, 12.0),
            b.body_temp_c - 0.3,
        ),
    };
    Baseline {
        heart_rate_bpm: hr.round(),
        spo2_pct: spo2.round(),
        respiration_rate_bpm: rr.round(),
        body_temp_c: round1(temp),
    }
}

/// Vitals of a treated patient: still off, no longer an emergency.
fn stabilised(b: Baseline, rng: &mut SimRng) -> Baseline {
    Baseline {
        heart_rate_bpm: rng.range(92.0, 104.0).round(),
        spo2_pct: rng.range(94.0, 96.0).round(),
        respiration_rate_bpm: rng.range(18.0, 22.0).round(),
        body_temp_c: round1(b.body_temp_c),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::domain::triage::{TriageRules, TriageStatus, assess};
    use crate::domain::vitals::{IngestLimits, parse_body};

    /// The reading as the server parses and triages it (alone, without the fall window).
    fn triage(reading: &Value) -> (TriageStatus, bool) {
        let body = serde_json::to_vec(reading).unwrap();
        let parsed = parse_body(&body, Utc::now(), &IngestLimits::default()).unwrap();
        let reading = parsed.items[0].outcome.clone().unwrap();
        (
            assess(&TriageRules::default(), &reading).status,
            reading.fall_detected,
        )
    }

    #[test]
    fn simulated_readings_are_valid_and_triage_as_intended() {
        let mut rng = SimRng::new(3);
        let now = Instant::now();
        let city = super::super::city::City::edinburgh(50);
        for spec in city.wearers {
            let mut w = Wearer {
                spec,
                condition: Condition::Well,
                next_reading: now,
                incident: None,
                trouble_since: None,
            };
            for _ in 0..10 {
                w.condition = Condition::Well;
                assert_eq!(
                    triage(&reading_of(&mut w, &mut rng, now)),
                    (TriageStatus::Normal, false)
                );
                for &p in PROFILES {
                    w.condition = Condition::Deteriorating(p);
                    let (status, _) = triage(&reading_of(&mut w, &mut rng, now));
                    assert_eq!(status, TriageStatus::Emergency, "{p:?}");
                }
                w.condition = Condition::UnderCare;
                let (status, _) = triage(&reading_of(&mut w, &mut rng, now));
                assert_ne!(status, TriageStatus::Emergency);
            }
            // A fall is reported once (abnormal: the grace window decides), then no movement.
            w.condition = Condition::Fallen {
                fall_reported: false,
                gets_up_at: None,
            };
            assert_eq!(
                triage(&reading_of(&mut w, &mut rng, now)),
                (TriageStatus::Abnormal, true)
            );
            let after = reading_of(&mut w, &mut rng, now);
            assert_eq!(after["moving"], false);
            assert!(after.get("fall_detected").is_none());
            // One who gets up moves, and is well again.
            w.condition = Condition::Fallen {
                fall_reported: true,
                gets_up_at: Some(now),
            };
            assert_eq!(reading_of(&mut w, &mut rng, now)["moving"], true);
            assert_eq!(w.condition, Condition::Well);
        }
    }
}
