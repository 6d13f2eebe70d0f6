//! Benchmark: an emergency reading arriving over HTTP → the offer frame on the crew's WebSocket.
//!
//! One unit near the scene with its crew connected; each iteration registers nothing new (the
//! patients and devices are created up front), posts one emergency reading, waits for the offer
//! frame, then cancels the incident so the unit is free for the next one. Straight-line ETA (no
//! routing service). Readings are sent one at a time.
//!
//! ```sh
//! cargo run --release --example offer_latency -- [--count 500] [--database-url URL]
//! ```

use std::time::Instant;

use chrono::{SecondsFormat, Utc};
use futures_util::StreamExt as _;
use serde_json::{Value, json};
use shers::app::Application;
use shers::config::{Secret, Settings};
use shers::domain::auth::Role;
use shers::domain::geo::LatLng;
use shers::domain::ids::{DeviceId, PatientId, UnitId};
use shers::domain::patients::{Device, Patient};
use shers::persistence::{patients, tokens};

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
    let count: usize = arg("--count").map_or(Ok(500), |c| c.parse())?;
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
    let admin = tokens::create(&mut conn, Role::Admin, None, None, "bench", now)
        .await?
        .token;
    let crew = tokens::create(
        &mut conn,
        Role::Crew,
        Some(&UnitId::from("B-1")),
        None,
        "bench",
        now,
    )
    .await?
    .token;
    for i in 0..count + 20 {
        let patient = Patient {
            id: PatientId(format!("p{i}")),
            name: "Bench".into(),
            date_of_birth: None,
            home_location: Some(LatLng {
                lat: 51.5,
                lng: -0.12,
            }),
            insurance: None,
            next_of_kin: vec![],
            created_at: now,
        };
        patients::insert_patient(&mut conn, &patient).await?;
        patients::insert_device(
            &mut conn,
            &Device {
                id: DeviceId(format!("d{i}")),
                patient_id: patient.id,
                model: None,
                registered_at: now,
            },
        )
        .await?;
    }
    drop(conn);
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    client
        .post(format!("{base}/api/v1/units"))
        .bearer_auth(&admin)
        .json(&json!({"id": "B-1", "call_sign": "B-1", "capability": "als", "location": {"lat": 51.501, "lng": -0.12}}))
        .send()
        .await?
        .error_for_status()?;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://127.0.0.1:{port}/api/v1/ws/crew?access_token={crew}"
    ))
    .await?;

    let mut samples = Vec::with_capacity(count);
    for i in 0..count + 20 {
        let body = json!({"device_id": format!("d{i}"), "timestamp": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
                          "heart_rate_bpm": 170, "spo2_pct": 85});
        let t = Instant::now();
        let post = client
            .post(format!("{base}/api/v1/vitals"))
            .bearer_auth(&gateway)
            .json(&body)
            .send();
        let (resp, offer) = futures_util::join!(post, async {
            loop {
                match ws.next().await {
                    Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                        let v: Value = serde_json::from_str(&t).unwrap_or_default();
                        if v["type"] == "offer" {
                            return Some(v);
                        }
                    }
                    Some(Ok(_)) => continue,
                    _ => return None,
                }
            }
        });
        let elapsed = t.elapsed().as_secs_f64() * 1_000.0;
        let offer = offer.ok_or_else(|| anyhow::anyhow!("crew socket closed"))?;
        resp?.error_for_status()?;
        if i >= 20 {
            samples.push(elapsed); // the first 20 warm up
        }
        let incident = offer["incident_id"].as_str().unwrap_or_default().to_owned();
        client
            .post(format!("{base}/api/v1/incidents/{incident}/cancel"))
            .bearer_auth(&admin)
            .json(&json!({"reason": "bench"}))
            .send()
            .await?
            .error_for_status()?;
        // Wait for the withdrawal so the unit is available again.
        loop {
            match ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))
                    if t.contains("offer_withdrawn") =>
                {
                    break;
                }
                Some(Ok(_)) => continue,
                _ => anyhow::bail!("crew socket closed"),
            }
        }
    }
    samples.sort_by(f64::total_cmp);
    let backend = if url.starts_with("sqlite") {
        "sqlite"
    } else {
        "postgres"
    };
    println!(
        "backend={backend} n={} reading -> offer frame on crew WS (ms): p50={:.2} p90={:.2} p99={:.2} max={:.2}",
        samples.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.9),
        percentile(&samples, 0.99),
        percentile(&samples, 1.0)
    );
    Ok(())
}
