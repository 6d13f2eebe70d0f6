//! The demo city: Edinburgh, with its real acute hospitals (positions approximate), five
//! ambulance stations, and a population of wearers with next of kin and insurance.
//!
//! Everything here is invented except the hospitals and the map: names are drawn from common
//! Scottish first names and surnames, phone numbers are fictional `555-01xx` numbers and emails
//! use `example.com`. The city is generated from a fixed seed, so every run (and a second run
//! on the same database) produces the same ids, and [`seed`] registers it through the public
//! API only, treating "already exists" as success.

use std::time::Duration;

use anyhow::Context as _;
use futures_util::{StreamExt as _, TryStreamExt as _};
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::client::{Api, ApiStatusError};
use super::rng::SimRng;
use crate::domain::geo::LatLng;
use crate::domain::ids::{DeviceId, PatientId};

/// The seed the city is generated from: fixed, so ids and positions are the same every run.
const CITY_SEED: u64 = 0x00ED_1B0B;
/// Requests in flight at once while seeding.
const SEED_CONCURRENCY: usize = 8;
/// The capability a crew looks for when taking an adult to hospital.
pub const EMERGENCY_DEPARTMENT: &str = "emergency_department";

/// A hospital to register.
#[derive(Clone, Debug)]
pub struct HospitalSpec {
    /// Its stable identifier.
    pub id: &'static str,
    /// Its name, for people.
    pub name: &'static str,
    /// Emergency entrance.
    pub location: LatLng,
    /// What the hospital treats (e.g. `cardiac`, `trauma`).
    pub capabilities: &'static [&'static str],
    /// Beds for ambulance arrivals.
    pub capacity: u32,
}

/// An ambulance to register.
#[derive(Clone, Debug)]
pub struct UnitSpec {
    /// Unit id.
    pub id: String,
    /// Radio call sign.
    pub call_sign: String,
    /// `als` or `bls`.
    pub capability: &'static str,
    /// Home station (where it starts and returns to).
    pub base: LatLng,
}

/// How a wearer's body reads when all is well.
#[derive(Clone, Copy, Debug)]
pub struct Baseline {
    /// Resting heart rate, /min.
    pub heart_rate_bpm: f64,
    /// Oxygen saturation, %.
    pub spo2_pct: f64,
    /// Respiration rate, /min.
    pub respiration_rate_bpm: f64,
    /// Body temperature, °C.
    pub body_temp_c: f64,
}

/// Insurance cover of a wearer.
#[derive(Clone, Debug)]
pub enum Cover {
    /// A policy that pays the whole bill.
    Full {
        /// The insurer, by name.
        provider: &'static str,
        /// Member number (also the payment customer reference).
        member_id: String,
    },
    /// A policy with a small remaining allowance: the patient pays the rest.
    Partial {
        /// The insurer, by name.
        provider: &'static str,
        /// Member number.
        member_id: String,
        /// Cover left, minor units.
        coverage_cents: i64,
    },
    /// No insurance: the patient pays everything.
    None,
}

/// A patient wearing a device.
#[derive(Clone, Debug)]
pub struct WearerSpec {
    /// Patient id.
    pub patient_id: PatientId,
    /// Device id.
    pub device_id: DeviceId,
    /// Device model.
    pub model: &'static str,
    /// Where they live (and, in the simulation, are).
    pub home: LatLng,
    /// Normal vitals.
    pub baseline: Baseline,
    /// Full name (registered, never logged).
    pub name: String,
    /// Date of birth, `YYYY-MM-DD`.
    pub date_of_birth: String,
    /// Next of kin as the API expects them.
    pub next_of_kin: Vec<Value>,
    /// Their insurance policy, if any.
    pub cover: Cover,
}

/// The whole city.
#[derive(Clone, Debug)]
pub struct City {
    /// The city's hospitals.
    pub hospitals: Vec<HospitalSpec>,
    /// Its ambulances, at their stations.
    pub units: Vec<UnitSpec>,
    /// The people wearing SHERS devices.
    pub wearers: Vec<WearerSpec>,
}

/// Edinburgh's hospitals that take ambulance arrivals (positions approximate).
const HOSPITALS: &[HospitalSpec] = &[
    HospitalSpec {
        id: "edi-rie",
        name: "Royal Infirmary of Edinburgh",
        location: LatLng {
            lat: 55.9216,
            lng: -3.1366,
        },
        capabilities: &[EMERGENCY_DEPARTMENT, "major_trauma", "stroke", "cardiac"],
        capacity: 24,
    },
    HospitalSpec {
        id: "edi-wgh",
        name: "Western General Hospital",
        location: LatLng {
            lat: 55.9623,
            lng: -3.2349,
        },
        capabilities: &[EMERGENCY_DEPARTMENT, "stroke", "oncology"],
        capacity: 16,
    },
    HospitalSpec {
        id: "edi-sjh",
        name: "St John's Hospital, Livingston",
        location: LatLng {
            lat: 55.8917,
            lng: -3.5235,
        },
        capabilities: &[EMERGENCY_DEPARTMENT],
        capacity: 12,
    },
    HospitalSpec {
        id: "edi-rhcyp",
        name: "Royal Hospital for Children and Young People",
        location: LatLng {
            lat: 55.9232,
            lng: -3.1348,
        },
        capabilities: &["paediatric_emergency"],
        capacity: 8,
    },
    HospitalSpec {
        id: "edi-lctc",
        name: "Leith Community Treatment Centre",
        location: LatLng {
            lat: 55.9706,
            lng: -3.1739,
        },
        capabilities: &["minor_injuries"],
        capacity: 4,
    },
];

/// Ambulance stations: code, name, position. Four units each.
const STATIONS: &[(&str, &str, f64, f64)] = &[
    ("lei", "Leith", 55.9745, -3.1690),
    ("cre", "Crewe Toll", 55.9650, -3.2300),
    ("tol", "Tollcross", 55.9430, -3.2040),
    ("sig", "Sighthill", 55.9225, -3.2890),
    ("lfr", "Little France", 55.9290, -3.1290),
];
/// Units per station.
const UNITS_PER_STATION: usize = 4;

/// Neighbourhood centres the population is spread around.
const NEIGHBOURHOODS: &[(f64, f64)] = &[
    (55.9727, -3.1730), // Leith
    (55.9535, -3.1140), // Portobello
    (55.9285, -3.2095), // Morningside
    (55.9415, -3.2810), // Corstorphine
    (55.9370, -3.2370), // Gorgie
    (55.9370, -3.1930), // Marchmont
    (55.9585, -3.2085), // Stockbridge
    (55.9380, -3.1770), // Newington
    (55.9320, -3.1380), // Craigmillar
    (55.9090, -3.1320), // Gilmerton
    (55.9070, -3.2570), // Colinton
    (55.9790, -3.2250), // Granton
    (55.9495, -3.1900), // Old Town
    (55.9560, -3.1950), // New Town
    (55.9550, -3.2400), // Craigleith
    (55.9130, -3.1600), // Liberton
    (55.9080, -3.2200), // Oxgangs
    (55.9620, -3.1500), // Restalrig
];

const FIRST_NAMES: &[&str] = &[
    "Agnes", "Alasdair", "Ann", "Archie", "Catriona", "Colin", "Duncan", "Eilidh", "Elspeth",
    "Euan", "Fiona", "Fraser", "Grace", "Hamish", "Iain", "Isla", "Jean", "Kirsty", "Lachlan",
    "Margaret", "Morag", "Murdo", "Niamh", "Rory", "Ross", "Shona", "Sheila", "Stuart", "Thomas",
    "Willie",
];
const SURNAMES: &[&str] = &[
    "Anderson",
    "Brown",
    "Campbell",
    "Clark",
    "Craig",
    "Douglas",
    "Ferguson",
    "Fraser",
    "Gordon",
    "Graham",
    "Hamilton",
    "Henderson",
    "Johnston",
    "Kerr",
    "MacDonald",
    "MacKenzie",
    "Morrison",
    "Murray",
    "Paterson",
    "Reid",
    "Robertson",
    "Ross",
    "Scott",
    "Smith",
    "Stewart",
    "Thomson",
    "Walker",
    "Watson",
    "Wilson",
    "Young",
];
const RELATIONS: &[&str] = &[
    "daughter",
    "son",
    "spouse",
    "partner",
    "sister",
    "brother",
    "neighbour",
];
const INSURERS: &[&str] = &["Thistle Health", "Forth Mutual", "Caledonian Care"];
const MODELS: &[&str] = &["Pulse S3", "VitalBand 2", "CareWatch Pro"];

/// Cover large enough never to run out during a demo (minor units).
const FULL_COVER_CENTS: i64 = 100_000_000;

impl City {
    /// Edinburgh with `patients` wearers (the same city every time for a given count).
    pub fn edinburgh(patients: usize) -> Self {
        let mut rng = SimRng::new(CITY_SEED);
        let hospitals = HOSPITALS.to_vec();
        let units = STATIONS
            .iter()
            .flat_map(|&(code, name, lat, lng)| {
                (1..=UNITS_PER_STATION).map(move |n| UnitSpec {
                    id: format!("edi-{code}-{n}"),
                    call_sign: format!("{name} {n}"),
                    // Half the fleet is paramedic-crewed (ALS), half technician-crewed (BLS).
                    capability: if n % 2 == 1 { "als" } else { "bls" },
                    base: LatLng { lat, lng },
                })
            })
            .collect();
        let wearers = (1..=patients).map(|n| wearer(n, &mut rng)).collect();
        Self {
            hospitals,
            units,
            wearers,
        }
    }
}

fn pick(rng: &mut SimRng, items: &[&'static str]) -> &'static str {
    rng.pick(items).copied().unwrap_or_default()
}

fn wearer(n: usize, rng: &mut SimRng) -> WearerSpec {
    let (lat, lng) = rng
        .pick(NEIGHBOURHOODS)
        .copied()
        .unwrap_or((55.9533, -3.1883));
    // About ±600 m around the neighbourhood centre.
    let home = LatLng {
        lat: lat + rng.range(-0.0055, 0.0055),
        lng: lng + rng.range(-0.0095, 0.0095),
    };
    let first = pick(rng, FIRST_NAMES);
    let surname = pick(rng, SURNAMES);
    let kin_first = pick(rng, FIRST_NAMES);
    let kin_surname = if rng.chance(0.7) {
        surname
    } else {
        pick(rng, SURNAMES)
    };
    let mut kin = json!({
        "name": format!("{kin_first} {kin_surname}"),
        "relation": pick(rng, RELATIONS),
        // Fictional numbers: 555-0100 to 555-0199 are reserved for fiction.
        "phone": format!("+1202555{:04}", 100 + rng.index(100)),
    });
    if rng.chance(0.6) {
        kin["email"] = json!(format!(
            "{}.{}{n}@example.com",
            kin_first.to_lowercase(),
            kin_surname.to_lowercase()
        ));
    }
    let year = 1930 + rng.index(66);
    let date_of_birth = format!("{year}-{:02}-{:02}", 1 + rng.index(12), 1 + rng.index(28));
    let baseline = Baseline {
        heart_rate_bpm: rng.range(60.0, 82.0).round(),
        spo2_pct: rng.range(96.5, 99.0).round(),
        respiration_rate_bpm: rng.range(13.0, 17.0).round(),
        body_temp_c: (rng.range(36.4, 37.0) * 10.0).round() / 10.0,
    };
    WearerSpec {
        patient_id: PatientId(format!("edi-p{n:04}")),
        device_id: DeviceId(format!("edi-w{n:04}")),
        model: pick(rng, MODELS),
        home,
        baseline,
        name: format!("{first} {surname}"),
        date_of_birth,
        next_of_kin: vec![kin],
        cover: cover(rng),
    }
}

/// Roughly 45% fully covered, 30% partially, 25% uninsured. Member numbers end in 1–8, except
/// a few that the sandbox payment provider declines (ending 0) so the dashboard also shows a
/// failed charge being compensated now and then.
fn cover(rng: &mut SimRng) -> Cover {
    let roll = rng.unit();
    let provider = pick(rng, INSURERS);
    let last_digit = if rng.chance(0.05) {
        0
    } else {
        1 + rng.index(8)
    };
    let prefix: String = provider.chars().take(2).collect();
    let member_id = format!(
        "{}{:05}{last_digit}",
        prefix.to_uppercase(),
        rng.index(100_000)
    );
    if roll < 0.45 {
        Cover::Full {
            provider,
            member_id,
        }
    } else if roll < 0.75 {
        Cover::Partial {
            provider,
            member_id,
            coverage_cents: 20_000 + 1_000 * rng.index(21) as i64,
        }
    } else {
        Cover::None
    }
}

/// What seeding produced: the tokens the simulators act with.
#[derive(Debug)]
pub struct Seeded {
    /// A gateway token for the wearables.
    pub gateway_token: String,
    /// A crew token per unit, in [`City::units`] order.
    pub crew_tokens: Vec<String>,
    /// Things created this run (the rest existed already).
    pub created: usize,
}

/// `POST path`; `201`/`200` (created) and `409` (already there) are both fine.
async fn ensure(api: &Api, path: &str, body: &Value) -> anyhow::Result<bool> {
    let resp = api.post_raw(path, body).await?;
    let status = resp.status();
    if status.is_success() {
        return Ok(true);
    }
    if status == StatusCode::CONFLICT {
        return Ok(false);
    }
    Err(ApiStatusError {
        method: "POST",
        path: path.to_owned(),
        status,
        body: resp.text().await.unwrap_or_default(),
    }
    .into())
}

/// A new token with `body` (`{role, unit_id?, name}`), as admin.
async fn token(api: &Api, body: Value) -> anyhow::Result<String> {
    let created = api.post("/admin/tokens", &body).await?;
    created["token"]
        .as_str()
        .map(str::to_owned)
        .context("POST /admin/tokens answered without a token")
}

/// Registers `city` through the API as `admin` (idempotent: existing things are kept) and
/// creates the simulators' tokens.
pub async fn seed(admin: &Api, city: &City) -> anyhow::Result<Seeded> {
    let mut created = 0;
    for h in &city.hospitals {
        let body = json!({"id": h.id, "name": h.name, "location": h.location,
                          "capabilities": h.capabilities, "capacity": h.capacity});
        created += usize::from(ensure(admin, "/api/v1/hospitals", &body).await?);
    }
    for u in &city.units {
        let body = json!({"id": u.id, "call_sign": u.call_sign, "capability": u.capability,
                          "location": u.base, "base": u.base});
        created += usize::from(ensure(admin, "/api/v1/units", &body).await?);
    }
    let per_wearer = futures_util::stream::iter(&city.wearers)
        .map(|w| seed_wearer(admin, w))
        .buffer_unordered(SEED_CONCURRENCY)
        .try_collect::<Vec<usize>>()
        .await?;
    created += per_wearer.iter().sum::<usize>();
    let gateway_token = token(
        admin,
        json!({"role": "gateway", "name": "demo wearable gateway"}),
    )
    .await?;
    let mut crew_tokens = Vec::with_capacity(city.units.len());
    for u in &city.units {
        let body =
            json!({"role": "crew", "unit_id": u.id, "name": format!("demo crew {}", u.call_sign)});
        crew_tokens.push(token(admin, body).await?);
    }
    Ok(Seeded {
        gateway_token,
        crew_tokens,
        created,
    })
}

/// Patient, device and policy of one wearer; how many of them were new.
async fn seed_wearer(admin: &Api, w: &WearerSpec) -> anyhow::Result<usize> {
    let insurance = match &w.cover {
        Cover::Full {
            provider,
            member_id,
        }
        | Cover::Partial {
            provider,
            member_id,
            ..
        } => json!({"provider": provider, "member_id": member_id}),
        Cover::None => Value::Null,
    };
    let mut patient = json!({
        "id": w.patient_id, "name": w.name, "date_of_birth": w.date_of_birth,
        "home_location": w.home, "next_of_kin": w.next_of_kin,
    });
    if !insurance.is_null() {
        patient["insurance"] = insurance;
    }
    let mut created =
        usize::from(with_retry(|| ensure(admin, "/api/v1/patients", &patient)).await?);
    let device = json!({"id": w.device_id, "patient_id": w.patient_id, "model": w.model});
    created += usize::from(with_retry(|| ensure(admin, "/api/v1/devices", &device)).await?);
    let policy = match &w.cover {
        Cover::Full {
            provider,
            member_id,
        } => Some((provider, member_id, FULL_COVER_CENTS)),
        Cover::Partial {
            provider,
            member_id,
            coverage_cents,
        } => Some((provider, member_id, *coverage_cents)),
        Cover::None => None,
    };
    if let Some((provider, member_id, coverage_cents)) = policy {
        // Creates or replaces the policy, so a second run starts with full cover again.
        let body = json!({"patient_id": w.patient_id, "provider": provider,
                          "member_id": member_id, "coverage_cents": coverage_cents});
        with_retry(|| ensure(admin, "/insurance/v1/policies", &body)).await?;
    }
    Ok(created)
}

/// Retries a seeding request a few times when the failure is transient (no answer, 429 or a
/// 5xx: the server may shed load while it starts); a refusal is returned at once.
async fn with_retry<F, Fut>(mut attempt: F) -> anyhow::Result<bool>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let mut delay = Duration::from_millis(200);
    let mut tries = 0;
    loop {
        match attempt().await {
            Ok(created) => return Ok(created),
            Err(e) if tries < 4 && transient(&e) => {
                tracing::debug!(error = %e, "seeding request failed; retrying");
                tries += 1;
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(e),
        }
    }
}

fn transient(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ApiStatusError>()
        .is_none_or(|s| s.status.is_server_error() || s.status == StatusCode::TOO_MANY_REQUESTS)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_city_is_the_same_every_time_and_well_formed() {
        let (a, b) = (City::edinburgh(200), City::edinburgh(200));
        assert_eq!(a.units.len(), 20);
        assert_eq!(a.hospitals.len(), 5);
        assert_eq!(a.wearers.len(), 200);
        for (x, y) in a.wearers.iter().zip(&b.wearers) {
            assert_eq!(x.patient_id, y.patient_id);
            assert_eq!(x.home, y.home);
            assert_eq!(x.name, y.name);
        }
        let als = a.units.iter().filter(|u| u.capability == "als").count();
        assert!(als > 0 && als < a.units.len(), "a mix of ALS and BLS");
        let insured =
            |pred: fn(&Cover) -> bool| a.wearers.iter().filter(|w| pred(&w.cover)).count();
        assert!(insured(|c| matches!(c, Cover::Full { .. })) > 50);
        assert!(insured(|c| matches!(c, Cover::Partial { .. })) > 30);
        assert!(insured(|c| matches!(c, Cover::None)) > 20);
        for w in &a.wearers {
            // Inside Edinburgh, and normal vitals.
            assert!((55.89..56.0).contains(&w.home.lat), "{:?}", w.home);
            assert!((-3.35..-3.05).contains(&w.home.lng), "{:?}", w.home);
            assert!((55.0..=90.0).contains(&w.baseline.heart_rate_bpm));
            assert!(w.baseline.spo2_pct >= 96.0);
            let phone = w.next_of_kin[0]["phone"].as_str().unwrap();
            assert!(phone.starts_with("+120255501"), "{phone}");
        }
    }
}
