//! Per-run fixtures, created through the public API with the admin token: patients and their
//! wearables, ambulance units with crew tokens, console and gateway tokens. Every id carries
//! the run's random prefix and every position lies in the run's random region, so repeated
//! runs against one server never share a unit or a patient. [`Fixtures::cleanup`] puts the
//! run's units out of service and revokes its tokens.

use std::sync::Mutex;

use anyhow::{Context as _, bail};
use futures_util::{StreamExt as _, TryStreamExt as _};
use serde_json::{Value, json};

use crate::domain::ids::{DeviceId, PatientId};
use crate::sim::client::{Api, ApiStatusError};
use crate::sim::rng::SimRng;

/// A position.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lng: f64,
}

impl Point {
    /// The point `north_km` north and `east_km` east of this one (flat-earth, fine for tens of
    /// kilometres).
    pub fn offset_km(self, north_km: f64, east_km: f64) -> Self {
        let lat = self.lat + north_km / 111.2;
        let lng = self.lng + east_km / (111.2 * self.lat.to_radians().cos().max(0.1));
        Self { lat, lng }
    }

    /// `{lat, lng}`.
    pub fn json(self) -> Value {
        json!({"lat": self.lat, "lng": self.lng})
    }
}

/// A registered patient and their wearable.
#[derive(Clone, Debug)]
pub struct Wearer {
    /// Device id.
    pub device_id: DeviceId,
    /// Patient id.
    pub patient_id: PatientId,
}

/// A registered unit and its crew token.
#[derive(Clone, Debug)]
pub struct Unit {
    /// Unit id.
    pub id: String,
    /// Where it was registered (its base).
    pub home: Point,
    /// A crew token bound to it.
    pub crew_token: String,
}

/// What cleanup did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cleanup {
    /// Units put out of service.
    pub units: u64,
    /// Tokens revoked.
    pub tokens: u64,
    /// Calls that failed.
    pub failures: u64,
}

/// The run's fixtures and the admin client that creates them.
#[derive(Debug)]
pub struct Fixtures {
    admin: Api,
    prefix: String,
    center: Point,
    concurrency: usize,
    seed: u64,
    tokens: Mutex<Vec<String>>,
    units: Mutex<Vec<String>>,
}

impl Fixtures {
    /// Checks that `token` is an admin token at `url` and picks the run's prefix and region.
    pub async fn new(url: &str, token: &str, concurrency: usize) -> anyhow::Result<Self> {
        let admin = Api::new(url, token)?;
        let me = admin
            .get("/api/v1/whoami")
            .await
            .context("checking the admin token")?;
        if me["role"] != "admin" {
            bail!("--token must be an admin token (it is {})", me["role"]);
        }
        let mut rng = SimRng::from_entropy();
        let prefix = format!("lg-{:08x}", rng.next_u64() as u32);
        // A region of its own (straight-line ETA works anywhere): mid latitudes, any longitude.
        let center = Point {
            lat: rng.range(-50.0, 50.0),
            lng: rng.range(-170.0, 170.0),
        };
        Ok(Self {
            admin,
            prefix,
            center,
            concurrency,
            seed: rng.next_u64(),
            tokens: Mutex::new(Vec::new()),
            units: Mutex::new(Vec::new()),
        })
    }

    /// The run's prefix (`lg-1a2b3c4d`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The centre of the run's region.
    pub fn center(&self) -> Point {
        self.center
    }

    /// A generator for `purpose`, seeded from the run (reproducible within a run's logic).
    pub fn rng(&self, purpose: u64) -> SimRng {
        SimRng::new(self.seed ^ purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// The admin client.
    pub fn admin(&self) -> &Api {
        &self.admin
    }

    /// Requests in flight while creating fixtures.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Mints a token (`console`, `gateway`, `crew` with `unit`) and remembers it for revocation.
    pub async fn token(&self, role: &str, unit: Option<&str>) -> anyhow::Result<String> {
        let name = format!("{} {role}", self.prefix);
        let created = post_patiently(
            &self.admin,
            "/admin/tokens",
            &json!({"role": role, "unit_id": unit, "name": name}),
        )
        .await
        .with_context(|| format!("minting a {role} token"))?;
        let (Some(token), Some(id)) = (created["token"].as_str(), created["id"].as_str()) else {
            bail!("POST /admin/tokens answered without a token: {created}");
        };
        lock(&self.tokens).push(id.to_owned());
        Ok(token.to_owned())
    }

    /// Registers `n` patients, each with one wearable, named `{prefix}-{tag}-{i}`, at home at
    /// `home(i)` (no next of kin: nobody is messaged).
    pub async fn wearers(
        &self,
        tag: &str,
        n: usize,
        home: impl Fn(usize) -> Point,
    ) -> anyhow::Result<Vec<Wearer>> {
        let admin = &self.admin;
        let wearers: Vec<(Wearer, Point)> = (0..n)
            .map(|i| {
                let wearer = Wearer {
                    patient_id: PatientId(format!("{}-{tag}-p{i}", self.prefix)),
                    device_id: DeviceId(format!("{}-{tag}-d{i}", self.prefix)),
                };
                (wearer, home(i))
            })
            .collect();
        futures_util::stream::iter(wearers.iter())
            .map(|(w, home)| async move {
                post_patiently(
                    admin,
                    "/api/v1/patients",
                    &json!({"id": w.patient_id, "name": "Loadgen Wearer",
                            "home_location": home.json(), "next_of_kin": []}),
                )
                .await?;
                post_patiently(
                    admin,
                    "/api/v1/devices",
                    &json!({"id": w.device_id, "patient_id": w.patient_id,
                            "model": "loadgen"}),
                )
                .await?;
                anyhow::Ok(())
            })
            .buffer_unordered(self.concurrency)
            .try_collect::<()>()
            .await
            .context("registering wearers")?;
        Ok(wearers.into_iter().map(|(w, _)| w).collect())
    }

    /// Registers one unit per position (`{prefix}-{tag}-{i}`, alternately ALS and BLS) and
    /// mints a crew token for each.
    pub async fn units(&self, tag: &str, positions: &[Point]) -> anyhow::Result<Vec<Unit>> {
        let mut units: Vec<(usize, Unit)> =
            futures_util::stream::iter(positions.iter().enumerate())
                .map(|(i, &home)| async move {
                    let id = format!("{}-{tag}-{i}", self.prefix);
                    let capability = if i % 2 == 0 { "als" } else { "bls" };
                    self.admin
                        .post(
                            "/api/v1/units",
                            &json!({"id": id, "call_sign": id, "capability": capability,
                                "location": home.json()}),
                        )
                        .await?;
                    lock(&self.units).push(id.clone());
                    let crew_token = self.token("crew", Some(&id)).await?;
                    anyhow::Ok((
                        i,
                        Unit {
                            id,
                            home,
                            crew_token,
                        },
                    ))
                })
                .buffer_unordered(self.concurrency)
                .try_collect()
                .await
                .context("registering units")?;
        units.sort_by_key(|(i, _)| *i);
        Ok(units.into_iter().map(|(_, u)| u).collect())
    }

    /// Puts every unit of the run out of service and revokes every token it minted. Failures
    /// are counted, not raised: cleanup runs after errors too.
    pub async fn cleanup(&self) -> Cleanup {
        let units = std::mem::take(&mut *lock(&self.units));
        let tokens = std::mem::take(&mut *lock(&self.tokens));
        let admin = &self.admin;
        let body = json!({"status": "out_of_service"});
        let units_done: Vec<bool> = futures_util::stream::iter(units.iter())
            .map(|id| {
                let body = &body;
                async move {
                    post_patiently(admin, &format!("/api/v1/units/{id}/status"), body)
                        .await
                        .map_err(|e| eprintln!("cleanup: {e:#}"))
                        .is_ok()
                }
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        let empty = json!({});
        let tokens_done: Vec<bool> = futures_util::stream::iter(tokens.iter())
            .map(|id| {
                let empty = &empty;
                async move {
                    post_patiently(admin, &format!("/admin/tokens/{id}/revoke"), empty)
                        .await
                        .map_err(|e| eprintln!("cleanup: {e:#}"))
                        .is_ok()
                }
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        let ok = |v: &[bool]| v.iter().filter(|b| **b).count() as u64;
        let done = Cleanup {
            units: ok(&units_done),
            tokens: ok(&tokens_done),
            failures: (units_done.len() + tokens_done.len()) as u64
                - ok(&units_done)
                - ok(&tokens_done),
        };
        if done.failures > 0 {
            eprintln!(
                "cleanup: {} call(s) failed (units out of service {}/{}, tokens revoked {}/{})",
                done.failures,
                done.units,
                units.len(),
                done.tokens,
                tokens.len()
            );
        }
        done
    }
}

/// Attempts at a fixture call that the server answers 503/429 (busy) before giving up.
const ATTEMPTS: u32 = 6;

/// `POST` as [`Api::post`], retried with a growing pause (0.5 s, 0.75 s …) after a 503/429:
/// the server's admission control, or a database pool wait while it persists a burst (600
/// units going out of service at once, say).
async fn post_patiently(api: &Api, path: &str, body: &Value) -> anyhow::Result<Value> {
    let mut attempt = 1;
    loop {
        match api.post(path, body).await {
            Err(e) if attempt < ATTEMPTS && busy(&e) => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(250 * u64::from(attempt)))
                    .await;
            }
            other => return other,
        }
    }
}

/// Whether the server said it is busy (try again later).
fn busy(error: &anyhow::Error) -> bool {
    error.downcast_ref::<ApiStatusError>().is_some_and(|e| {
        e.status == reqwest::StatusCode::SERVICE_UNAVAILABLE
            || e.status == reqwest::StatusCode::TOO_MANY_REQUESTS
    })
}

/// Locks a mutex whose data stays valid even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_roughly_kilometres() {
        let p = Point {
            lat: 60.0,
            lng: 10.0,
        };
        let q = p.offset_km(1.0, 1.0);
        assert!((q.lat - p.lat - 1.0 / 111.2).abs() < 1e-9);
        assert!((q.lng - p.lng - 2.0 / 111.2).abs() < 1e-6, "cos 60° = 0.5");
    }
}
