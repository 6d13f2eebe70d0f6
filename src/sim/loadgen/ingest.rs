//! The `ingest` scenario, and the paced vitals feed it shares with detect-to-offer's
//! background load: prebuilt batches sent on a fixed schedule over several connections.
//!
//! Each connection is a worker that takes the next batch number, waits for its slot on the
//! schedule (devices × Hz readings a second) and sends it. When the server falls behind,
//! slots are already due and every worker sends back to back: the feed saturates with that
//! many requests in flight. Latency is one request's round trip (send → body read).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use serde::Deserialize;
use serde::de::IgnoredAny;
use tokio::sync::watch;

use super::progress::Progress;
use super::report::{Figure, Report, Series};
use super::stats::ms;
use super::vitals::{self, BatchTemplate};
use super::{LoadgenArgs, Scenario, fixtures::Fixtures, measure_for};
use crate::sim::client::Api;

/// The readings/s target of issue 8.
pub const TARGET_READINGS_PER_S: f64 = 100_000.0;
/// Longest pause a worker honours after a 503's `Retry-After`.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What to send and how fast.
#[derive(Clone, Debug)]
pub struct Feed {
    /// The batches, sent round-robin.
    pub templates: Arc<Vec<BatchTemplate>>,
    /// Time between consecutive batches on the schedule.
    pub interval: Duration,
    /// Requests in flight at most (one worker each).
    pub connections: usize,
}

/// What a feed did.
#[derive(Debug, Default)]
pub struct FeedOutcome {
    /// Request round trips, ms.
    pub latencies_ms: Vec<f64>,
    /// Requests answered 200.
    pub requests: u64,
    /// Readings accepted.
    pub accepted: u64,
    /// Readings rejected by validation.
    pub rejected: u64,
    /// Requests answered 503/429 (admission control).
    pub throttled: u64,
    /// Requests that failed otherwise.
    pub failed: u64,
    /// From the first slot to the last answer.
    pub elapsed: Duration,
}

impl FeedOutcome {
    fn merge(&mut self, other: FeedOutcome) {
        self.latencies_ms.extend(other.latencies_ms);
        self.requests += other.requests;
        self.accepted += other.accepted;
        self.rejected += other.rejected;
        self.throttled += other.throttled;
        self.failed += other.failed;
    }
}

#[derive(Deserialize)]
struct IngestAnswer {
    accepted: u64,
    rejected: Vec<IgnoredAny>,
}

struct Shared {
    http: reqwest::Client,
    url: String,
    auth: HeaderValue,
    feed: Feed,
    next: AtomicU64,
    start: Instant,
    progress: Option<Arc<Progress>>,
}

/// Sends `feed` as `gateway` until `stop` turns true; then waits for the requests in flight.
pub async fn drive(
    gateway: &Api,
    feed: Feed,
    stop: watch::Receiver<bool>,
    progress: Option<Arc<Progress>>,
) -> anyhow::Result<FeedOutcome> {
    let auth = HeaderValue::from_str(&format!("Bearer {}", gateway.token()))
        .context("the gateway token is not a valid header value")?;
    let connections = feed.connections.max(1);
    let shared = Arc::new(Shared {
        http: gateway.http().clone(),
        url: format!("{}/api/v1/vitals", gateway.base_url()),
        auth,
        feed,
        next: AtomicU64::new(0),
        start: Instant::now(),
        progress,
    });
    let workers: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(worker(shared.clone(), stop.clone())))
        .collect();
    let mut total = FeedOutcome::default();
    for w in workers {
        total.merge(w.await.context("an ingest worker panicked")?);
    }
    total.elapsed = shared.start.elapsed();
    Ok(total)
}

// Long on purpose: the load generator's send loop (pace, build, send, tally), kept in one
// piece so it measures the server rather than itself.
async fn worker(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) -> FeedOutcome {
    let mut tally = FeedOutcome::default();
    let templates = &shared.feed.templates;
    if templates.is_empty() {
        return tally;
    }
    loop {
        if *stop.borrow() {
            break;
        }
        let n = shared.next.fetch_add(1, Ordering::Relaxed);
        let due = shared.start + shared.feed.interval.mul_f64(n as f64);
        if due > Instant::now() {
            tokio::select! {
                () = tokio::time::sleep_until(due.into()) => {}
                _ = stop.changed() => break,
            }
        }
        let template = &templates[(n % templates.len() as u64) as usize];
        let body = template.render(Utc::now());
        let sent = Instant::now();
        let answer = shared
            .http
            .post(&shared.url)
            .header(AUTHORIZATION, shared.auth.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let backoff = match answer {
            Ok(resp) if resp.status() == StatusCode::OK => {
                match resp
                    .bytes()
                    .await
                    .map(|b| serde_json::from_slice::<IngestAnswer>(&b))
                {
                    Ok(Ok(a)) => {
                        tally.latencies_ms.push(ms(sent.elapsed()));
                        tally.requests += 1;
                        tally.accepted += a.accepted;
                        tally.rejected += a.rejected.len() as u64;
                        if let Some(p) = &shared.progress {
                            p.sample();
                            p.worked(a.accepted);
                        }
                    }
                    _ => tally.failed += 1,
                }
                None
            }
            Ok(resp)
                if matches!(
                    resp.status(),
                    StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
                ) =>
            {
                tally.throttled += 1;
                let seconds = resp
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1);
                Some(Duration::from_secs(seconds).min(MAX_BACKOFF))
            }
            Ok(_) | Err(_) => {
                tally.failed += 1;
                Some(Duration::from_millis(100))
            }
        };
        if let Some(pause) = backoff {
            if let Some(p) = &shared.progress {
                p.error();
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = stop.changed() => break,
            }
        }
    }
    tally
}

/// `--scenario ingest`.
pub async fn run(args: &LoadgenArgs, fixtures: &Fixtures) -> anyhow::Result<Report> {
    let devices = args.pick(args.devices, 10_000, 40).max(1);
    let hz = args.pick(args.hz, 10.0, 5.0);
    let batch = args.pick(args.batch, 500, 20).clamp(1, 1000);
    let connections = args.pick(args.connections, 8, 2).max(1);
    let duration = args.duration();
    let mut report = Report::new(Scenario::Ingest);
    report.param("devices", devices);
    report.param("hz", hz);
    report.param("batch", batch);
    report.param("connections", connections);
    report.param("target_readings_per_s", devices as f64 * hz);

    let setup = Instant::now();
    let center = fixtures.center();
    let mut rng = fixtures.rng(1);
    let homes: Vec<_> = (0..devices)
        .map(|_| center.offset_km(rng.range(-10.0, 10.0), rng.range(-10.0, 10.0)))
        .collect();
    eprintln!("setup: registering {devices} wearers");
    let wearers = fixtures.wearers("ing", devices, |i| homes[i]).await?;
    let gateway = fixtures
        .admin()
        .with_token(&fixtures.token("gateway", None).await?);
    let templates = vitals::templates(&wearers, batch, &mut rng, 0.01);
    let feed = Feed {
        interval: vitals::batch_interval(&templates, hz),
        templates: Arc::new(templates),
        connections,
    };
    report.setup_s = setup.elapsed().as_secs_f64();

    let progress = Progress::new("ingest", "readings", duration);
    let ticker = progress.show();
    let (stop_tx, stop_rx) = watch::channel(false);
    let driver = {
        let progress = progress.clone();
        let gateway = gateway.clone();
        tokio::spawn(async move { drive(&gateway, feed, stop_rx, Some(progress)).await })
    };
    measure_for(duration).await;
    let _ = stop_tx.send(true);
    let outcome = driver.await.context("the ingest driver panicked")??;
    drop(ticker);

    report.measured_s = outcome.elapsed.as_secs_f64();
    let throughput = outcome.accepted as f64 / report.measured_s.max(1e-9);
    report.count("requests", outcome.requests);
    report.count("readings_accepted", outcome.accepted);
    report.count("readings_rejected", outcome.rejected);
    report.count("throttled_requests", outcome.throttled);
    report.count("failed_requests", outcome.failed);
    report.series.push(Series::new(
        "batch request",
        outcome.latencies_ms,
        throughput,
        "readings/s",
        outcome.throttled + outcome.failed,
    ));
    report.target(Figure::Throughput, TARGET_READINGS_PER_S);
    Ok(report)
}
