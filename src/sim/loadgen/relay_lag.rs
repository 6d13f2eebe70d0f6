//! The `relay-lag` scenario: commit → AMQP delivery. U units report a position every ~1.02 s
//! over REST (each a `unit.location` event: U ≈ events/s, 1,000 by default) while loadgen
//! consumes `shers.event.#` from its own exclusive queue bound on the server's exchange.
//!
//! The lag of one event is the time from its `at` — the timestamp the server gives the event
//! as it appends it to the store, inside the write transaction, so at most the commit's own
//! duration before the commit — to the delivery's arrival at loadgen's consumer, on the host's
//! wall clock (server, broker and loadgen share it). It includes the relay's wake-up, the read
//! of the batch, publishing, RabbitMQ routing and delivery to the consumer; not the
//! relay's wait for confirms (a consumer may get a message before its publisher's confirm).
//! Only events of this run's units, appended after the warm-up, are timed; each is counted
//! once (a republished batch repeats `message_id`s).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use futures_util::StreamExt as _;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde::Deserialize;
use tokio::sync::watch;

use super::fanout::report_positions;
use super::fixtures::{Fixtures, Point};
use super::progress::Progress;
use super::report::{Figure, Report, Series};
use super::{LoadgenArgs, Scenario, measure_for};
use crate::sim::rng::SimRng;

/// The load: events a second through the relay.
pub const TARGET_EVENTS_PER_S: f64 = 1_000.0;
/// How long the consumer waits for stragglers after the last report.
const QUIET: Duration = Duration::from_secs(3);

/// The part of the `shers.event.*` envelope that matters here.
#[derive(Deserialize)]
struct Envelope {
    seq: i64,
    at: DateTime<Utc>,
    #[serde(default)]
    unit_id: Option<String>,
}

/// What the consumer saw.
#[derive(Debug, Default)]
struct Seen {
    lags_ms: Vec<f64>,
    /// Deliveries of any event (the server's whole stream).
    deliveries: u64,
    /// Deliveries of this run's events that repeated a sequence already seen.
    repeats: u64,
    /// This run's events appended before the warm-up ended (not timed).
    warming: u64,
    /// Bodies that were not an event envelope.
    bad: u64,
    /// Timed events whose receipt came before their `at` (clock trouble; timed as 0).
    negative: u64,
}

/// What one delivery was.
#[derive(Debug, PartialEq, Eq)]
enum Delivered {
    /// An event of another run, or of none.
    Other,
    /// This run's event, first seen.
    Ours,
    /// This run's event again (a republished batch).
    Repeat,
}

impl Seen {
    /// Counts one delivery received at `received`: events of units named `prefix…` are
    /// this run's; those appended from `timed_from` on are timed, each sequence once.
    fn classify(
        &mut self,
        body: &[u8],
        received: DateTime<Utc>,
        prefix: &str,
        timed_from: DateTime<Utc>,
        seqs: &mut HashSet<i64>,
    ) -> Delivered {
        self.deliveries += 1;
        let Ok(event) = serde_json::from_slice::<Envelope>(body) else {
            self.bad += 1;
            return Delivered::Other;
        };
        if !event.unit_id.is_some_and(|u| u.starts_with(prefix)) {
            return Delivered::Other;
        }
        if !seqs.insert(event.seq) {
            self.repeats += 1;
            return Delivered::Repeat;
        }
        if event.at < timed_from {
            self.warming += 1;
        } else {
            let lag = (received - event.at).num_microseconds().unwrap_or(0) as f64 / 1e3;
            if lag < 0.0 {
                self.negative += 1;
            }
            self.lags_ms.push(lag.max(0.0));
        }
        Delivered::Ours
    }
}

/// `--scenario relay-lag`.
pub async fn run(args: &LoadgenArgs, fixtures: &Fixtures) -> anyhow::Result<Report> {
    let units = args.pick(args.units, 1_000, 10).max(1);
    let warmup = Duration::from_secs_f64(args.warmup.unwrap_or(if args.smoke { 1.0 } else { 5.0 }));
    let duration = args.duration();
    let mut report = Report::new(Scenario::RelayLag);
    report.param("units", units);
    report.param("warmup_s", warmup.as_secs_f64());
    report.param("exchange", args.amqp_exchange.as_str());

    let setup = Instant::now();
    let center = fixtures.center();
    let mut rng = fixtures.rng(13);
    let positions: Vec<Point> = (0..units)
        .map(|_| center.offset_km(rng.range(-20.0, 20.0), rng.range(-20.0, 20.0)))
        .collect();
    eprintln!("setup: registering {units} units");
    let fleet = fixtures.units("rl", &positions).await?;

    let connection = Connection::connect(
        &args.amqp_url,
        ConnectionProperties::default()
            .with_connection_name(format!("{} loadgen relay-lag", fixtures.prefix()).into()),
    )
    .await
    .context("connecting to RabbitMQ (--amqp-url)")?;
    let channel = connection.create_channel().await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let queue = queue.name().as_str().to_owned();
    channel
        .queue_bind(
            queue.as_str().into(),
            args.amqp_exchange.as_str().into(),
            "shers.event.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("binding to the server's exchange (--amqp-exchange)")?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "loadgen-relay-lag".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    report.setup_s = setup.elapsed().as_secs_f64();

    let started = Instant::now();
    let timed_from = Utc::now()
        + chrono::TimeDelta::from_std(warmup).unwrap_or_else(|_| chrono::TimeDelta::seconds(5));
    let progress = Progress::new("relay-lag", "events", warmup + duration);
    let ticker = progress.show();
    let prefix = format!("{}-", fixtures.prefix());
    let (stop_consumer, mut consumer_stop) = watch::channel(false);
    let ours = Arc::new(AtomicU64::new(0));
    let reader = {
        let progress = progress.clone();
        let ours = ours.clone();
        tokio::spawn(async move {
            let mut seen = Seen::default();
            let mut seqs = HashSet::new();
            loop {
                let delivery = tokio::select! {
                    d = consumer.next() => d,
                    _ = consumer_stop.changed() => break,
                };
                let Some(Ok(delivery)) = delivery else { break };
                let received = Utc::now();
                if seen.classify(&delivery.data, received, &prefix, timed_from, &mut seqs)
                    == Delivered::Ours
                {
                    ours.fetch_add(1, Ordering::Relaxed);
                    progress.sample();
                    progress.worked(1);
                }
            }
            seen
        })
    };

    let (stop_generators, generators_stop) = watch::channel(false);
    let generators: Vec<_> = fleet
        .iter()
        .map(|unit| {
            let crew = fixtures.admin().with_token(&unit.crew_token);
            tokio::spawn(report_positions(
                crew,
                unit.clone(),
                SimRng::new(rng.next_u64()),
                generators_stop.clone(),
            ))
        })
        .collect();
    measure_for(warmup + duration).await;
    let _ = stop_generators.send(true);
    let mut report_errors = 0;
    for g in generators {
        report_errors += g.await.unwrap_or(1);
    }
    let measured = started.elapsed().saturating_sub(warmup);
    // Stragglers: until nothing of ours arrived for QUIET (at most 30 s).
    let waiting = Instant::now();
    let mut before = ours.load(Ordering::Relaxed);
    while !reader.is_finished() && waiting.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(QUIET).await;
        let now = ours.load(Ordering::Relaxed);
        if now == before {
            break;
        }
        before = now;
    }
    let _ = stop_consumer.send(true);
    let seen = reader.await.context("the AMQP consumer panicked")?;
    drop(ticker);
    let _ = connection.close(200, "loadgen done".into()).await;

    report.measured_s = measured.as_secs_f64();
    report.count("deliveries_all_events", seen.deliveries);
    report.count("events_timed", seen.lags_ms.len() as u64);
    report.count("events_during_warmup", seen.warming);
    report.count("repeated_deliveries", seen.repeats);
    report.count("bad_bodies", seen.bad);
    report.count("negative_lags", seen.negative);
    report.count("location_report_errors", report_errors);
    let rate = seen.lags_ms.len() as f64 / report.measured_s.max(1e-9);
    report.series.push(Series::new(
        "commit→delivery",
        seen.lags_ms,
        rate,
        "events/s",
        report_errors,
    ));
    report.target(Figure::Throughput, TARGET_EVENTS_PER_S * 0.95);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_are_timed_once_after_the_warm_up_and_only_ours() {
        let t0 = Utc::now();
        let from = t0 + chrono::TimeDelta::seconds(5);
        let mut seen = Seen::default();
        let mut seqs = HashSet::new();
        let event = |seq: i64, at: DateTime<Utc>, unit: &str| {
            serde_json::json!({"seq": seq, "at": at, "kind": "unit.location",
                               "unit_id": unit, "data": {}})
            .to_string()
            .into_bytes()
        };
        let ms = chrono::TimeDelta::milliseconds;
        let mut at =
            |body: Vec<u8>, received| seen.classify(&body, received, "lg-1-", from, &mut seqs);
        // During the warm-up: ours, not timed.
        assert_eq!(at(event(1, t0, "lg-1-rl-0"), t0 + ms(3)), Delivered::Ours);
        // Timed: 7 ms after its append.
        assert_eq!(
            at(event(2, from, "lg-1-rl-1"), from + ms(7)),
            Delivered::Ours
        );
        // The same sequence again (a republished batch): counted once.
        assert_eq!(
            at(event(2, from, "lg-1-rl-1"), from + ms(9)),
            Delivered::Repeat
        );
        // Another run's unit, a device event, a body that is not an event.
        assert_eq!(at(event(3, from, "lg-2-rl-0"), from), Delivered::Other);
        assert_eq!(
            at(
                serde_json::json!({"seq": 4, "at": from, "kind": "device.offline",
                                   "device_id": "d"})
                .to_string()
                .into_bytes(),
                from
            ),
            Delivered::Other
        );
        assert_eq!(at(b"not json".to_vec(), from), Delivered::Other);
        // A receipt before the append (clocks): timed as 0 and counted.
        assert_eq!(
            at(event(5, from + ms(2), "lg-1-rl-2"), from),
            Delivered::Ours
        );
        assert_eq!(seen.lags_ms, [7.0, 0.0]);
        assert_eq!(seen.deliveries, 7);
        assert_eq!(
            (seen.warming, seen.repeats, seen.bad, seen.negative),
            (1, 1, 1, 1)
        );
    }
}
