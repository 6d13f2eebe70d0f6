//! The `amqp-ingest` scenario: SHERS wearable messages published to `wearable.data` on the
//! server's exchange, as SHERS's wearable service publishes them, with publisher confirms,
//! paced (devices × Hz readings a second) or flat out (`--flat-out`).
//!
//! The broker's confirm says only that RabbitMQ has the message. What the server applied is
//! read from its `/metrics` (`shers_amqp_consumed_total`: deliveries acknowledged once their
//! readings are applied, and `shers_amqp_rejected_total`: dead-lettered). After the publishers
//! stop, loadgen waits for the server to account for every confirmed message: the queue has
//! drained. **Applied readings/s** = readings confirmed ÷ (first publish → the last counter
//! step); it is the server's rate when the publishers outran it (flat out), else the offered
//! rate. The latency series is publish → broker confirm.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use tokio::sync::watch;

use super::bus::{self, Schedule, Stamped};
use super::progress::Progress;
use super::report::{Report, Series};
use super::stats::ms;
use super::{LoadgenArgs, Scenario, fixtures::Fixtures, measure_for};

/// SHERS's routing key for readings.
const WEARABLE_DATA: &str = "wearable.data";
/// Confirms a publisher waits for at most before it publishes more.
const WINDOW: usize = 256;
/// The server's counters of deliveries it answered.
const APPLIED: &[&str] = &["shers_amqp_consumed_total", "shers_amqp_rejected_total"];

/// What the publishers did.
#[derive(Debug, Default)]
struct Tally {
    latencies_ms: Vec<f64>,
    messages: u64,
    readings: u64,
    nacked: u64,
    failed: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies_ms.extend(other.latencies_ms);
        self.messages += other.messages;
        self.readings += other.readings;
        self.nacked += other.nacked;
        self.failed += other.failed;
    }
}

struct Shared {
    messages: Vec<Stamped>,
    exchange: String,
    schedule: Schedule,
    next: AtomicU64,
    progress: Arc<Progress>,
}

/// `--scenario amqp-ingest`.
pub async fn run(args: &LoadgenArgs, fixtures: &Fixtures) -> anyhow::Result<Report> {
    let devices = args.pick(args.devices, 2_000, 20).max(1);
    let hz = args.pick(args.hz, 1.0, 2.0);
    let batch = args.pick(args.batch, 1, 1).clamp(1, 1000);
    let connections = args.pick(args.connections, 4, 1).max(1);
    let rate = if args.flat_out {
        0.0
    } else {
        devices as f64 * hz
    };
    let duration = args.duration();
    let mut report = Report::new(Scenario::AmqpIngest);
    report.param("devices", devices);
    report.param("hz", hz);
    report.param("batch", batch);
    report.param("connections", connections);
    report.param("flat_out", args.flat_out);
    report.param("offered_readings_per_s", rate);
    report.param("exchange", args.amqp_exchange.as_str());

    let setup = Instant::now();
    eprintln!("setup: registering {devices} wearers");
    let wearers = fixtures
        .wearers("amqp", devices, |_| fixtures.center())
        .await?;
    let mut rng = fixtures.rng(11);
    let messages = bus::shers_messages(&wearers, batch, &mut rng);
    let per_message = wearers.len() as f64 / messages.len().max(1) as f64;
    let mut publishers = Vec::with_capacity(connections);
    for i in 0..connections {
        let connection = Connection::connect(
            &args.amqp_url,
            ConnectionProperties::default()
                .with_connection_name(format!("{} loadgen {i}", fixtures.prefix()).into()),
        )
        .await
        .context("connecting to RabbitMQ (--amqp-url)")?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        publishers.push((connection, channel));
    }
    if let Some((_, channel)) = publishers.first() {
        // The server's queue must exist (it declares it when it starts consuming): a
        // message published before would be dropped by the exchange.
        let queue = format!("{}.q.wearable-data", args.amqp_queue_prefix);
        let q = channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| {
                format!("the server's ingest queue {queue} does not exist (amqp.url set? --amqp-queue-prefix?)")
            })?;
        report.count("queue_depth_before", u64::from(q.message_count()));
    }
    let admin = fixtures.admin().clone();
    let baseline = bus::counters(&admin, APPLIED).await?;
    report.setup_s = setup.elapsed().as_secs_f64();

    let progress = Progress::new("amqp-ingest", "readings", duration);
    let ticker = progress.show();
    let shared = Arc::new(Shared {
        messages,
        exchange: args.amqp_exchange.clone(),
        schedule: Schedule::new(rate, per_message),
        next: AtomicU64::new(0),
        progress: progress.clone(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let workers: Vec<_> = publishers
        .iter()
        .map(|(_, channel)| tokio::spawn(publish(shared.clone(), channel.clone(), stop_rx.clone())))
        .collect();
    measure_for(duration).await;
    let _ = stop_tx.send(true);
    let mut tally = Tally::default();
    for w in workers {
        tally.merge(w.await.context("an AMQP publisher panicked")?);
    }
    let published_s = shared.schedule.start.elapsed().as_secs_f64();
    let during = bus::counters(&admin, APPLIED).await? - baseline;
    drop(ticker);
    for (connection, _) in &publishers {
        let _ = connection.close(200, "loadgen done".into()).await;
    }
    eprintln!(
        "published {} messages; waiting for the server to apply them",
        tally.messages
    );
    let (answered, last) = bus::drain(&admin, APPLIED, baseline, tally.messages as f64).await?;
    let rejected = bus::counters(&admin, &["shers_amqp_rejected_total"]).await?;
    let applied_s = last
        .saturating_duration_since(shared.schedule.start)
        .as_secs_f64();
    let answered = answered.max(0.0) as u64;
    let applied_readings = if tally.messages > 0 {
        tally.readings as f64 * (answered as f64 / tally.messages as f64).min(1.0)
    } else {
        0.0
    };

    report.measured_s = applied_s;
    report.count("messages_confirmed", tally.messages);
    report.count("readings_confirmed", tally.readings);
    report.count("messages_nacked", tally.nacked);
    report.count("publish_failures", tally.failed);
    report.count("messages_answered", answered);
    report.count(
        "messages_unanswered",
        tally.messages.saturating_sub(answered),
    );
    report.count("messages_answered_while_publishing", during.max(0.0) as u64);
    report.count("rejected_total_after", rejected.max(0.0) as u64);
    report.param("published_s", published_s);
    report.param("drained_s", applied_s);
    report.param(
        "published_readings_per_s",
        tally.readings as f64 / published_s.max(1e-9),
    );
    report.series.push(Series::new(
        "publish→confirm",
        tally.latencies_ms,
        applied_readings / applied_s.max(1e-9),
        "readings/s applied",
        tally.nacked + tally.failed,
    ));
    Ok(report)
}

/// One publisher: takes the next message number, waits for its slot (collecting confirms
/// meanwhile), publishes, and keeps at most [`WINDOW`] confirms outstanding.
async fn publish(
    shared: Arc<Shared>,
    channel: lapin::Channel,
    mut stop: watch::Receiver<bool>,
) -> Tally {
    let mut tally = Tally::default();
    let mut pending = FuturesUnordered::new();
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let count = shared.messages.len() as u64;
    'outer: while count > 0 && !*stop.borrow() {
        let n = shared.next.fetch_add(1, Ordering::Relaxed);
        let due = shared.schedule.due(n);
        loop {
            let full = pending.len() >= WINDOW;
            if !full && due <= Instant::now() {
                break;
            }
            tokio::select! {
                Some(done) = pending.next(), if !pending.is_empty() => settle(&mut tally, &shared, done),
                () = tokio::time::sleep_until(due.into()), if !full => {}
                _ = stop.changed() => break 'outer,
            }
        }
        let message = &shared.messages[(n % count) as usize];
        let body = message.render(Utc::now());
        let sent = Instant::now();
        let readings = message.readings() as u64;
        match channel
            .basic_publish(
                shared.exchange.as_str().into(),
                WEARABLE_DATA.into(),
                BasicPublishOptions::default(),
                &body,
                properties.clone(),
            )
            .await
        {
            Ok(confirm) => pending.push(async move { (sent, readings, confirm.await) }),
            Err(_) => {
                tally.failed += 1;
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop.changed() => break,
                }
            }
        }
    }
    while let Some(done) = pending.next().await {
        settle(&mut tally, &shared, done);
    }
    tally
}

fn settle(
    tally: &mut Tally,
    shared: &Shared,
    (sent, readings, confirmed): (Instant, u64, lapin::Result<Confirmation>),
) {
    match confirmed {
        Ok(Confirmation::Ack(_)) => {
            tally.latencies_ms.push(ms(sent.elapsed()));
            tally.messages += 1;
            tally.readings += readings;
            shared.progress.sample();
            shared.progress.worked(readings);
        }
        Ok(_) => {
            tally.nacked += 1;
            shared.progress.error();
        }
        Err(_) => {
            tally.failed += 1;
            shared.progress.error();
        }
    }
}
