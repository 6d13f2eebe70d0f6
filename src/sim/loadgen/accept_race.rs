//! The `accept-race` scenario, in waves. Units stand in clusters of K (the server's offers per
//! round) far apart; a wave creates one incident per cluster at once (as a console, K at
//! most in flight per `--concurrency`), waits for the offers on the crews' WebSockets (the
//! created→offered time and the wave's offered-incidents rate), then every offered crew of
//! every incident accepts at the same moment over REST. Exactly one accept per incident must
//! win; anything else is a violation. The incidents are cancelled and the wave ends when every
//! unit has been released.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::crews::{Crews, Offered};
use super::fixtures::{Fixtures, Point, Unit};
use super::progress::Progress;
use super::report::{Figure, Report, Series};
use super::stats::ms;
use super::{LoadgenArgs, Scenario, measure_for};
use crate::sim::client::Api;

/// Target rate of incidents created→offered, per second (issue 8).
pub const TARGET_OFFERED_PER_S: f64 = 1_000.0;
/// Distance between cluster centres: far beyond any cluster's own units.
const CLUSTER_SPACING_KM: f64 = 25.0;
/// How long to wait for a wave's offers.
const OFFER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the units of a cancelled incident to be released.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Tallies over all waves.
#[derive(Debug, Default)]
struct Tally {
    waves: u64,
    incidents: u64,
    offered: u64,
    offer_phase: Duration,
    race_phase: Duration,
    to_offer_ms: Vec<f64>,
    accept_ms: Vec<f64>,
    accepts: u64,
    winners: u64,
    multiple_winners: u64,
    no_winner: u64,
    short_offers: u64,
    unoffered: u64,
    create_errors: u64,
    accept_errors: u64,
    cancel_errors: u64,
    release_timeouts: u64,
}

/// One incident of a wave.
struct Created {
    id: String,
    sent: Instant,
}

struct Waves<'a> {
    api: &'a Api,
    console: &'a Api,
    crews: &'a Crews,
    units: &'a [Unit],
    bodies: Vec<Value>,
    per_incident: usize,
    concurrency: usize,
    progress: &'a Progress,
}

/// `--scenario accept-race`.
// Long on purpose: a load scenario read top to bottom (set up, drive, measure, report).
pub async fn run(args: &LoadgenArgs, fixtures: &Fixtures) -> anyhow::Result<Report> {
    let per_incident = args.pick(args.crews_per_incident, 3, 3).max(1);
    let unit_count = args.pick(args.units, 600, 6).max(per_incident);
    let clusters = unit_count / per_incident;
    let concurrency = args.concurrency();
    let duration = args.duration();
    let mut report = Report::new(Scenario::AcceptRace);
    report.param("units", clusters * per_incident);
    report.param("clusters", clusters);
    report.param("crews_per_incident", per_incident);
    report.param("concurrency", concurrency);

    let setup = Instant::now();
    let center = fixtures.center();
    let columns = (clusters as f64).sqrt().ceil().max(1.0) as usize;
    let centers: Vec<Point> = (0..clusters)
        .map(|c| {
            center.offset_km(
                (c / columns) as f64 * CLUSTER_SPACING_KM,
                (c % columns) as f64 * CLUSTER_SPACING_KM,
            )
        })
        .collect();
    let mut rng = fixtures.rng(3);
    let positions: Vec<Point> = centers
        .iter()
        .flat_map(|c| std::iter::repeat_n(*c, per_incident))
        .map(|c| c.offset_km(rng.range(-0.15, 0.15), rng.range(-0.15, 0.15)))
        .collect();
    eprintln!(
        "setup: registering {} units in {clusters} clusters",
        positions.len()
    );
    let units = fixtures.units("race", &positions).await?;
    let console = fixtures
        .admin()
        .with_token(&fixtures.token("console", None).await?);
    let crews = Crews::connect(fixtures.admin(), &units, false, concurrency, &mut rng).await?;
    report.setup_s = setup.elapsed().as_secs_f64();

    let progress = Progress::new("accept-race", "incidents", duration);
    let ticker = progress.show();
    let waves = Waves {
        api: fixtures.admin(),
        console: &console,
        crews: &crews,
        units: &units,
        bodies: centers
            .iter()
            .map(|c| {
                json!({"location": c.json(), "priority": "emergency",
                       "description": "loadgen accept race"})
            })
            .collect(),
        per_incident,
        concurrency,
        progress: &progress,
    };
    let (done_tx, done) = watch::channel(false);
    let timer = tokio::spawn(async move {
        measure_for(duration).await;
        let _ = done_tx.send(true);
    });
    let started = Instant::now();
    let mut tally = Tally::default();
    loop {
        waves.wave(&mut tally).await;
        if *done.borrow() {
            break;
        }
    }
    report.measured_s = started.elapsed().as_secs_f64();
    timer.abort();
    drop(ticker);
    let socket_errors = crews.board.errors();
    crews.close().await;

    let violations = tally.multiple_winners + tally.no_winner;
    report.count("waves", tally.waves);
    report.count("incidents", tally.incidents);
    report.count("incidents_offered", tally.offered);
    report.count("accepts", tally.accepts);
    report.count("winners", tally.winners);
    report.count("violations", violations);
    report.count("violations_multiple_winners", tally.multiple_winners);
    report.count("violations_no_winner", tally.no_winner);
    report.count("short_offers", tally.short_offers);
    report.count("unoffered", tally.unoffered);
    report.count("create_errors", tally.create_errors);
    report.count("accept_errors", tally.accept_errors);
    report.count("cancel_errors", tally.cancel_errors);
    report.count("release_timeouts", tally.release_timeouts);
    report.count("crew_socket_errors", socket_errors);
    let accept_rate = tally.accepts as f64 / tally.race_phase.as_secs_f64().max(1e-9);
    report.series.push(Series::new(
        "accept",
        tally.accept_ms,
        accept_rate,
        "accepts/s",
        tally.accept_errors,
    ));
    let offered_rate = tally.offered as f64 / tally.offer_phase.as_secs_f64().max(1e-9);
    report.series.push(Series::new(
        "created→offered",
        tally.to_offer_ms,
        offered_rate,
        "incidents/s",
        tally.create_errors + tally.unoffered,
    ));
    report.target(Figure::Throughput, TARGET_OFFERED_PER_S);
    Ok(report)
}

impl Waves<'_> {
    // Long on purpose: one wave of the race in order (create, wait for offers, accept at once).
    async fn wave(&self, tally: &mut Tally) {
        tally.waves += 1;
        // Create one incident per cluster, `concurrency` requests in flight.
        let wave_start = Instant::now();
        let created: Vec<Option<Created>> = futures_util::stream::iter(self.bodies.iter())
            .map(|body| async move {
                let sent = Instant::now();
                let answer = self.console.post("/api/v1/incidents", body).await.ok()?;
                let id = answer["id"].as_str()?.to_owned();
                Some(Created { id, sent })
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        let created: Vec<Created> = created
            .into_iter()
            .filter_map(|c| {
                if c.is_none() {
                    tally.create_errors += 1;
                    self.progress.error();
                }
                c
            })
            .collect();
        tally.incidents += created.len() as u64;

        // Wait for every incident's offers; the phase ends at the last first offer.
        let k = self.per_incident;
        let offers: Vec<Vec<Offered>> =
            futures_util::future::join_all(created.iter().map(|c| async move {
                let track = self.crews.board.track(&c.id);
                track.wait(OFFER_TIMEOUT, |s| s.offers.len() >= k).await;
                track.read(|s| s.offers.clone())
            }))
            .await;
        let mut last_offer = wave_start;
        for c in &created {
            let first = self.crews.board.track(&c.id).read(|s| s.first_offer_at);
            if let Some(at) = first {
                tally
                    .to_offer_ms
                    .push(ms(at.saturating_duration_since(c.sent)));
                tally.offered += 1;
                last_offer = last_offer.max(at);
                self.progress.sample();
                self.progress.worked(1);
            }
        }
        tally.offer_phase += last_offer.saturating_duration_since(wave_start);

        // Every offered crew of every incident accepts at once.
        let race_start = Instant::now();
        let races: Vec<(usize, Vec<Accepted>)> =
            futures_util::stream::iter(offers.iter().filter(|o| !o.is_empty()))
                .map(|offers| async move {
                    let race =
                        futures_util::future::join_all(offers.iter().map(|o| self.accept(o))).await;
                    (offers.len(), race)
                })
                .buffer_unordered(self.concurrency)
                .collect()
                .await;
        tally.race_phase += race_start.elapsed();
        for (offered, race) in &races {
            let winners = race.iter().filter(|a| a.outcome == Outcome::Won).count();
            tally.winners += winners as u64;
            match winners {
                1 => {}
                0 => tally.no_winner += 1,
                _ => tally.multiple_winners += 1,
            }
            if *offered < k {
                tally.short_offers += 1;
            }
            for a in race {
                tally.accepts += 1;
                if a.outcome == Outcome::Failed {
                    tally.accept_errors += 1;
                    self.progress.error();
                } else {
                    tally.accept_ms.push(a.latency_ms);
                }
            }
        }
        tally.unoffered += offers.iter().filter(|o| o.is_empty()).count() as u64;

        // Cancel, then wait until every unit has been released.
        let cancel = json!({"reason": "loadgen race done"});
        let cancelled: Vec<bool> = futures_util::stream::iter(created.iter())
            .map(|c| {
                let cancel = &cancel;
                async move {
                    self.console
                        .post(&format!("/api/v1/incidents/{}/cancel", c.id), cancel)
                        .await
                        .is_ok()
                }
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        tally.cancel_errors += cancelled.iter().filter(|ok| !**ok).count() as u64;
        let released: Vec<bool> =
            futures_util::future::join_all(created.iter().map(|c| async move {
                self.crews
                    .board
                    .track(&c.id)
                    .wait(RELEASE_TIMEOUT, |s| s.released >= s.offers.len())
                    .await
            }))
            .await;
        tally.release_timeouts += released.iter().filter(|ok| !**ok).count() as u64;
        for c in &created {
            self.crews.board.forget(&c.id);
        }
    }

    async fn accept(&self, offer: &Offered) -> Accepted {
        let crew = self.api.with_token(&self.units[offer.unit].crew_token);
        let path = format!("/api/v1/offers/{}/accept", offer.offer_id);
        let sent = Instant::now();
        let answer = crew.post_raw(&path, &json!({})).await;
        let outcome = match answer {
            Ok(resp) => {
                let status = resp.status();
                let body: Value = resp.json().await.unwrap_or_default();
                match (status, body["outcome"].as_str()) {
                    (StatusCode::OK, Some("assigned")) => Outcome::Won,
                    (StatusCode::CONFLICT, Some(_)) => Outcome::Lost,
                    _ => Outcome::Failed,
                }
            }
            Err(_) => Outcome::Failed,
        };
        Accepted {
            outcome,
            latency_ms: ms(sent.elapsed()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Won,
    Lost,
    Failed,
}

struct Accepted {
    outcome: Outcome,
    latency_ms: f64,
}
