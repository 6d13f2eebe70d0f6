//! Benchmark: memory for many live actors, and how fast a restart resumes open incidents.
//!
//! Phase `populate` (default): starts SHERS on a fresh database, registers `--devices` wearers,
//! sends one normal reading per device over HTTP (batches of 500: one device actor each), then
//! one emergency reading for each of the first `--incidents` devices (one open incident each),
//! and reports the resident memory at each step.
//!
//! Phase `restart` (`--restart`): starts SHERS on that database again and reports the time from
//! `Application::build` until every open incident's actor has loaded its state.
//!
//! ```sh
//! cargo run --release --example scale_footprint -- --database-url sqlite:///tmp/scale.db \
//!     [--devices 100000] [--incidents 10000]
//! cargo run --release --example scale_footprint -- --database-url sqlite:///tmp/scale.db --restart
//! ```
//! A PostgreSQL URL must name an empty, dedicated database.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};
use shers::actors::incident::ListIncidents;
use shers::app::Application;
use shers::config::{Secret, Settings};
use shers::domain::auth::Role;
use shers::domain::ids::{DeviceId, PatientId};
use shers::domain::patients::{Device, Patient};
use shers::persistence::{StoreError, patients, tokens};

/// The same allocator as the `shers` binary, so the memory figures match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn settings(url: &str) -> Settings {
    let mut settings = Settings {
        bind: "127.0.0.1:0".into(),
        ..Settings::default()
    };
    settings.database.url = Secret::new(url.to_owned());
    // Readings only leave evidence behind status changes; normal ones are not stored.
    settings.triage.max_in_flight_readings = 1_000_000;
    settings
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
    let url = arg("--database-url").context("--database-url is required")?;
    if args.iter().any(|a| a == "--restart") {
        return restart(&url).await;
    }
    let device_count: usize = arg("--devices").map_or(Ok(100_000), |c| c.parse())?;
    let incident_count: usize = arg("--incidents").map_or(Ok(10_000), |c| c.parse())?;

    let app = Application::build(settings(&url)).await?;
    let port = app.port();
    let db = app.db().clone();
    actix_web::rt::spawn(app.run_until_stopped());
    let rss_start = rss_mib();

    let now = Utc::now();
    let mut conn = db.conn().await?;
    let gateway = tokens::create(&mut conn, Role::Gateway, None, None, "scale", now)
        .await?
        .token;
    let t = Instant::now();
    for chunk in (0..device_count).collect::<Vec<_>>().chunks(5_000) {
        conn.write_transaction(async |tx| {
            for &i in chunk {
                let patient = Patient {
                    id: PatientId(format!("scale-p{i}")),
                    name: "Scale Patient".into(),
                    date_of_birth: None,
                    home_location: None,
                    insurance: None,
                    next_of_kin: vec![],
                    created_at: now,
                };
                patients::insert_patient(tx, &patient).await?;
                patients::insert_device(
                    tx,
                    &Device {
                        id: DeviceId(format!("scale-d{i}")),
                        patient_id: patient.id,
                        model: None,
                        registered_at: now,
                    },
                )
                .await?;
            }
            Ok::<_, StoreError>(())
        })
        .await?;
    }
    drop(conn);
    println!(
        "registered {device_count} wearers in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let client = reqwest::Client::new();
    let endpoint = format!("http://127.0.0.1:{port}/api/v1/vitals");
    let at = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    // Each request's body is built just before it is sent and freed after: the harness runs
    // in the server's process, and 100,000 prepared readings held for the whole run (about
    // 80 MiB as `serde_json::Value`s) would be counted as the server's memory.
    let post = |readings: std::ops::Range<usize>, reading: fn(usize, &str) -> Value, at: String| {
        let body = json!({ "readings": readings.map(|i| reading(i, &at)).collect::<Vec<_>>() });
        let req = client.post(&endpoint).bearer_auth(&gateway).json(&body);
        drop(body);
        async move {
            let resp = req.send().await?;
            let status = resp.status();
            anyhow::ensure!(
                status.is_success(),
                "ingest answered {status}: {}",
                resp.text().await.unwrap_or_default()
            );
            Ok::<_, anyhow::Error>(())
        }
    };

    let t = Instant::now();
    let normal = |i: usize, at: &str| {
        json!({"device_id": format!("scale-d{i}"), "timestamp": at,
           "heart_rate_bpm": 72, "spo2_pct": 98, "respiration_rate_bpm": 14})
    };
    send_all(|r| post(r, normal, at.clone()), device_count, 500, 4).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_devices = rss_mib();
    println!(
        "{device_count} device actors live after {:.1} s: RSS {rss_start:.0} -> {rss_devices:.0} MiB ({:.2} KiB per device actor)",
        t.elapsed().as_secs_f64(),
        (rss_devices - rss_start) * 1024.0 / device_count as f64
    );

    let t = Instant::now();
    let at = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    let emergency = |i: usize, at: &str| {
        json!({"device_id": format!("scale-d{i}"), "timestamp": at,
           "heart_rate_bpm": 170, "spo2_pct": 85,
           "location": {"lat": 51.5 + (i as f64) * 1e-5, "lng": -0.12}})
    };
    send_all(|r| post(r, emergency, at.clone()), incident_count, 100, 8).await?;
    let created = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_incidents = rss_mib();
    println!(
        "{incident_count} incidents opened in {created:.1} s ({:.0}/s): RSS {rss_devices:.0} -> {rss_incidents:.0} MiB ({:.2} KiB per incident)",
        incident_count as f64 / created,
        (rss_incidents - rss_devices) * 1024.0 / incident_count as f64
    );
    println!(
        "total: {device_count} device actors + {incident_count} incident actors: RSS {rss_incidents:.0} MiB (process start {rss_start:.0} MiB)"
    );
    Ok(())
}

/// Sends readings `0..count` as requests of `per_request` readings, `in_flight` at a time.
async fn send_all<F>(
    post: impl Fn(std::ops::Range<usize>) -> F,
    count: usize,
    per_request: usize,
    in_flight: usize,
) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    for group in (0..count).step_by(per_request * in_flight) {
        futures_util::future::try_join_all(
            (group..(group + per_request * in_flight).min(count))
                .step_by(per_request)
                .map(|start| post(start..(start + per_request).min(count))),
        )
        .await?;
    }
    Ok(())
}

async fn restart(url: &str) -> anyhow::Result<()> {
    let t = Instant::now();
    let app = Application::build(settings(url)).await?;
    let built = t.elapsed().as_secs_f64();
    let incidents = app.incidents().clone();
    actix_web::rt::spawn(app.run_until_stopped());
    loop {
        let (total, page) = incidents.send(ListIncidents { limit: usize::MAX }).await?;
        let loading = page.iter().filter(|i| i.status == "loading").count();
        if loading == 0 && page.len() == total {
            println!(
                "restart: {total} open incidents resumed in {:.2} s (Application::build {built:.2} s); RSS {:.0} MiB",
                t.elapsed().as_secs_f64(),
                rss_mib()
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
