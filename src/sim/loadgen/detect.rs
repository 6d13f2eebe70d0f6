//! The `detect-to-offer` scenario: with background vitals (devices at 1 Hz, normal) and every
//! unit's crew connected and sending a location fix each second, probe one emergency at a
//! time. A probe posts an emergency reading located near a random unit and times it until the
//! first offer frame for that incident arrives on a crew WebSocket. The incident is then
//! cancelled as a console (every offered unit is available again as soon as its withdrawal
//! arrives, which the probe waits for) and the wearer is sent a normal reading, so the next
//! probe with that wearer is a fresh onset.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::crews::Crews;
use super::fixtures::{Fixtures, Point, Unit, Wearer};
use super::ingest::{self, Feed};
use super::progress::Progress;
use super::report::{Figure, Report, Series};
use super::stats::ms;
use super::vitals;
use super::{LoadgenArgs, Scenario, measure_for};
use crate::sim::client::Api;
use crate::sim::rng::SimRng;

/// Target median, ms (issue 8).
pub const TARGET_P50_MS: f64 = 2.0;
/// Target p99, ms (issue 8).
pub const TARGET_P99_MS: f64 = 10.0;
/// Wearers the probes take turns with (a wearer is reused only after the others).
const PROBE_WEARERS: usize = 32;
/// How long a probe waits for its offer before counting an error.
const OFFER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a probe waits for the offered units to be released.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the probes measured.
#[derive(Debug, Default)]
struct Probes {
    to_offer_ms: Vec<f64>,
    to_answer_ms: Vec<f64>,
    count: u64,
    errors: u64,
    no_incident: u64,
    no_offer: u64,
    release_timeouts: u64,
    offers: u64,
}

/// The probe's tools.
struct Prober<'a> {
    gateway: &'a Api,
    console: &'a Api,
    crews: &'a Crews,
    units: &'a [Unit],
    wearers: &'a [Wearer],
    gap: Duration,
    progress: Arc<Progress>,
}

/// `--scenario detect-to-offer`.
// Long on purpose: a load scenario read top to bottom (set up, drive, measure, report).
pub async fn run(args: &LoadgenArgs, fixtures: &Fixtures) -> anyhow::Result<Report> {
    let devices = args.pick(args.devices, 10_000, 20);
    let hz = args.pick(args.hz, 1.0, 1.0);
    let batch = args.pick(args.batch, 500, 10).clamp(1, 1000);
    let connections = args.pick(args.connections, 4, 1).max(1);
    let unit_count = args.pick(args.units, 500, 6).max(1);
    let warmup = Duration::from_secs_f64(args.pick(args.warmup, 5.0, 0.5).max(0.0));
    let gap = Duration::from_millis(args.pick(args.probe_gap_ms, 20, 20));
    let duration = args.duration();
    let mut report = Report::new(Scenario::DetectToOffer);
    report.param("devices", devices);
    report.param("hz", hz);
    report.param("batch", batch);
    report.param("connections", connections);
    report.param("units", unit_count);
    report.param("warmup_s", warmup.as_secs_f64());
    report.param("probe_gap_ms", gap.as_millis() as u64);

    // Units scattered over a square with roughly 1.5 km between neighbours; wearers too.
    let setup = Instant::now();
    let center = fixtures.center();
    let half_km = (unit_count as f64).sqrt() * 0.75;
    let mut rng = fixtures.rng(2);
    let scatter = |rng: &mut SimRng| {
        center.offset_km(rng.range(-half_km, half_km), rng.range(-half_km, half_km))
    };
    let positions: Vec<Point> = (0..unit_count).map(|_| scatter(&mut rng)).collect();
    let homes: Vec<Point> = (0..devices).map(|_| scatter(&mut rng)).collect();
    eprintln!("setup: registering {devices} wearers and {unit_count} units");
    let background = fixtures.wearers("bg", devices, |i| homes[i]).await?;
    let probes = fixtures.wearers("probe", PROBE_WEARERS, |_| center).await?;
    let units = fixtures.units("det", &positions).await?;
    let gateway = fixtures
        .admin()
        .with_token(&fixtures.token("gateway", None).await?);
    let console = fixtures
        .admin()
        .with_token(&fixtures.token("console", None).await?);
    let crew_api = match &args.crew_url {
        Some(url) => crate::sim::client::Api::new(url, fixtures.admin().token())?,
        None => fixtures.admin().clone(),
    };
    let crews = Crews::connect(&crew_api, &units, true, fixtures.concurrency(), &mut rng).await?;
    let templates = vitals::templates(&background, batch, &mut rng, 0.0);
    let feed = Feed {
        interval: vitals::batch_interval(&templates, hz),
        templates: Arc::new(templates),
        connections,
    };
    report.setup_s = setup.elapsed().as_secs_f64();

    // Background load, warm-up, then probes until the duration is over.
    let (stop_tx, stop_rx) = watch::channel(false);
    let background_load = {
        let gateway = gateway.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move { ingest::drive(&gateway, feed, stop, None).await })
    };
    eprintln!("warm-up: {:.1} s of background load", warmup.as_secs_f64());
    tokio::time::sleep(warmup).await;
    let progress = Progress::new("detect-to-offer", "probes", duration);
    let ticker = progress.show();
    let (done_tx, done_rx) = watch::channel(false);
    let timer = tokio::spawn(async move {
        measure_for(duration).await;
        let _ = done_tx.send(true);
    });
    let started = Instant::now();
    let prober = Prober {
        gateway: &gateway,
        console: &console,
        crews: &crews,
        units: &units,
        wearers: &probes,
        gap,
        progress: progress.clone(),
    };
    let measured = prober.run(done_rx, &mut rng).await;
    report.measured_s = started.elapsed().as_secs_f64();
    timer.abort();
    drop(ticker);
    let _ = stop_tx.send(true);
    let background = background_load
        .await
        .context("the background feed panicked")??;
    let socket_errors = crews.board.errors();
    crews.close().await;

    let per_s = measured.count as f64 / report.measured_s.max(1e-9);
    report.count("probes", measured.count);
    report.count("probe_no_incident", measured.no_incident);
    report.count("probe_no_offer", measured.no_offer);
    report.count("probe_http_errors", measured.errors);
    report.count("offers_seen", measured.offers);
    report.count("release_timeouts", measured.release_timeouts);
    report.count("crew_socket_errors", socket_errors);
    report.count("background_readings_accepted", background.accepted);
    report.count("background_throttled", background.throttled);
    report.count("background_failed", background.failed);
    report.series.push(Series::new(
        "reading→offer frame",
        measured.to_offer_ms,
        per_s,
        "probes/s",
        measured.errors + measured.no_incident + measured.no_offer,
    ));
    report.target(Figure::P50Ms, TARGET_P50_MS);
    report.target(Figure::P99Ms, TARGET_P99_MS);
    report.series.push(Series::new(
        "reading→HTTP answer",
        measured.to_answer_ms,
        per_s,
        "probes/s",
        measured.errors,
    ));
    let background_rate = background.accepted as f64 / background.elapsed.as_secs_f64().max(1e-9);
    report.series.push(Series::new(
        "background batch",
        background.latencies_ms,
        background_rate,
        "readings/s",
        background.throttled + background.failed,
    ));
    Ok(report)
}

impl Prober<'_> {
    /// Probes one at a time until `done` turns true (at least one probe).
    async fn run(&self, done: watch::Receiver<bool>, rng: &mut SimRng) -> Probes {
        let mut out = Probes::default();
        let mut i = 0usize;
        loop {
            let wearer = &self.wearers[i % self.wearers.len()];
            let unit = &self.units[rng.index(self.units.len())];
            let scene = unit
                .home
                .offset_km(rng.range(-0.3, 0.3), rng.range(-0.3, 0.3));
            self.probe(wearer, scene, &mut out).await;
            i += 1;
            if *done.borrow() {
                break;
            }
            tokio::time::sleep(self.gap).await;
            if *done.borrow() {
                break;
            }
        }
        out
    }

    async fn probe(&self, wearer: &Wearer, scene: Point, out: &mut Probes) {
        out.count += 1;
        let body = vitals::emergency(wearer.device_id.as_str(), scene);
        let request = self
            .gateway
            .http()
            .post(format!("{}/api/v1/vitals", self.gateway.base_url()))
            .bearer_auth(self.gateway.token())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let sent = Instant::now();
        let answer = match request.send().await {
            Ok(resp) if resp.status().is_success() => resp.json::<Value>().await.ok(),
            _ => None,
        };
        let answered = sent.elapsed();
        let Some(answer) = answer else {
            out.errors += 1;
            self.progress.error();
            return;
        };
        out.to_answer_ms.push(ms(answered));
        let Some(incident) = answer["results"][0]["incident_id"].as_str() else {
            out.no_incident += 1;
            self.progress.error();
            self.reset(wearer).await;
            return;
        };
        let track = self.crews.board.track(incident);
        if track
            .wait(OFFER_TIMEOUT, |s| s.first_offer_at.is_some())
            .await
        {
            if let Some(at) = track.read(|s| s.first_offer_at) {
                out.to_offer_ms.push(ms(at.saturating_duration_since(sent)));
                self.progress.sample();
                self.progress.worked(1);
            }
        } else {
            out.no_offer += 1;
            self.progress.error();
        }
        // Free the units: cancel, then wait for each offered unit's release.
        let cancelled = self
            .console
            .post(
                &format!("/api/v1/incidents/{incident}/cancel"),
                &json!({"reason": "loadgen probe done"}),
            )
            .await;
        if cancelled.is_err() {
            out.errors += 1;
        }
        let released = track
            .wait(RELEASE_TIMEOUT, |s| s.released >= s.offers.len())
            .await;
        if !released {
            out.release_timeouts += 1;
        }
        out.offers += track.read(|s| s.offers.len()) as u64;
        self.crews.board.forget(incident);
        self.reset(wearer).await;
    }

    /// A normal reading, so the wearer's next emergency is an onset again.
    async fn reset(&self, wearer: &Wearer) {
        let _ = self
            .gateway
            .http()
            .post(format!("{}/api/v1/vitals", self.gateway.base_url()))
            .bearer_auth(self.gateway.token())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(vitals::normal(wearer.device_id.as_str()))
            .send()
            .await;
    }
}
