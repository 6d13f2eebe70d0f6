//! Benchmark: an emergency reading's arrival → its incident persisted.
//!
//! The ingest answer carries the incident id only after `incident.created` (with its projection
//! and outbox rows) has committed, so the HTTP round trip of an emergency reading bounds that
//! latency from above. Readings are sent one at a time to a freshly started server on loopback;
//! every patient is new, so every reading creates an incident. Also reports the resident
//! memory added per open incident (and its device actor).
//!
//! ```sh
//! cargo run --release --example detect_latency -- [--count 2000] [--database-url URL]
//! ```
//! Without `--database-url` a temporary SQLite file is used. A PostgreSQL URL should name an
//! empty, dedicated database.

use std::time::Instant;

use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};
use shers::app::Application;
use shers::config::{Secret, Settings};
use shers::domain::auth::Role;
use shers::domain::ids::{DeviceId, PatientId};
use shers::domain::patients::{Device, Patient};
use shers::persistence::{patients, tokens};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let count: usize = arg("--count").map_or(Ok(2000), |c| c.parse())?;
    let dir = tempfile::tempdir()?;
    let url = arg("--database-url")
        .unwrap_or_else(|| format!("sqlite://{}/bench.db", dir.path().display()));

    let mut settings = Settings {
        bind: "127.0.0.1:0".into(),
        ..Settings::default()
    };
    settings.database.url = Secret::new(url.clone());
    let app = Application::build(settings).await?;
    let port = app.port();
    let db = app.db().clone();
    actix_web::rt::spawn(app.run_until_stopped());

    let now = Utc::now();
    let mut conn = db.conn().await?;
    let gateway = tokens::create(&mut conn, Role::Gateway, None, None, "bench", now)
        .await?
        .token;
    for i in 0..count + 50 {
        let patient = Patient {
            id: PatientId(format!("bench-p{i}")),
            name: "Bench Patient".into(),
            date_of_birth: None,
            home_location: Some(shers::domain::geo::LatLng {
                lat: 51.5,
                lng: -0.12,
            }),
            insurance: None,
            next_of_kin: vec![],
            created_at: now,
        };
        patients::insert_patient(&mut conn, &patient).await?;
        let device = Device {
            id: DeviceId(format!("bench-d{i}")),
            patient_id: patient.id.clone(),
            model: None,
            registered_at: now,
        };
        patients::insert_device(&mut conn, &device).await?;
    }
    drop(conn);

    let client = reqwest::Client::new();
    let endpoint = format!("http://127.0.0.1:{port}/api/v1/vitals");
    let send = |i: usize| {
        let body = json!({
            "device_id": format!("bench-d{i}"),
            "timestamp": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            "heart_rate_bpm": 170, "spo2_pct": 85,
            "location": {"lat": 51.5 + i as f64 * 1e-4, "lng": -0.12}
        });
        let req = client.post(&endpoint).bearer_auth(&gateway).json(&body);
        async move {
            let resp: Value = req.send().await?.json().await?;
            anyhow::ensure!(
                resp["results"][0]["incident_id"].is_string(),
                "no incident: {resp}"
            );
            Ok::<_, anyhow::Error>(())
        }
    };
    for i in count..count + 50 {
        send(i).await?; // warm-up: connections, caches, code paths
    }
    let rss_before = rss_kib();
    let mut samples = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        let t = Instant::now();
        send(i).await?;
        samples.push(t.elapsed().as_secs_f64() * 1_000.0);
    }
    let total = started.elapsed().as_secs_f64();
    let rss_after = rss_kib();
    samples.sort_by(f64::total_cmp);
    let backend = if url.starts_with("sqlite") {
        "sqlite"
    } else {
        "postgres"
    };
    println!("backend={backend} incidents={count} sequential");
    println!(
        "reading -> incident persisted (ms): p50={:.2} p90={:.2} p99={:.2} max={:.2} ({:.0} incidents/s sequential)",
        percentile(&samples, 0.50),
        percentile(&samples, 0.90),
        percentile(&samples, 0.99),
        percentile(&samples, 1.0),
        count as f64 / total
    );
    println!(
        "RSS: {} KiB -> {} KiB: {:.1} KiB per open incident (incident actor + device actor + caches)",
        rss_before,
        rss_after,
        (rss_after.saturating_sub(rss_before)) as f64 / count as f64
    );
    Ok(())
}
