//! The `mqtt-ingest` scenario: devices publish readings at QoS 1 to
//! `<prefix>/<device>/vitals` (one native reading, or with `--batch N` a `{"readings":[…]}`
//! of N readings of that device), paced (devices × Hz messages a second) or flat out.
//!
//! The broker's PUBACK says only that Mosquitto has the message. What the server applied is
//! read from its `/metrics` (`shers_mqtt_consumed_total`, and `shers_mqtt_rejected_total`).
//! After the publishers stop, loadgen waits until the server has accounted for every
//! acknowledged message, or its counters stop moving: a broker that queued more for SHERS's
//! session than its `max_queued_messages` dropped the rest, and the report counts them
//! (`messages_unanswered`). **Applied readings/s** = readings applied ÷ (first publish → the
//! last counter step). The latency series is publish → PUBACK from the broker.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{Mutex, watch};

use super::bus::{self, Schedule, Stamped};
use super::progress::Progress;
use super::report::{Report, Series};
use super::stats::ms;
use super::{LoadgenArgs, Scenario, fixtures::Fixtures, measure_for};

/// QoS 1 publishes a client keeps unacknowledged at most.
const INFLIGHT: u16 = 256;
/// The server's counters of vitals messages it answered (applied, or refused on the error
/// topic).
const APPLIED: &[&str] = &["shers_mqtt_consumed_total", "shers_mqtt_rejected_total"];

/// What one connection's event loop saw.
#[derive(Debug, Default)]
struct Acks {
    latencies_ms: Vec<f64>,
    acked: u64,
    broken: bool,
}

struct Shared {
    messages: Vec<Stamped>,
    schedule: Schedule,
    next: AtomicU64,
}

/// `--scenario mqtt-ingest`.
pub async fn run(args: &LoadgenArgs, fixtures: &Fixtures) -> anyhow::Result<Report> {
    let devices = args.pick(args.devices, 2_000, 20).max(1);
    let hz = args.pick(args.hz, 1.0, 2.0);
    let batch = args.pick(args.batch, 1, 1).clamp(1, 1000);
    let connections = args.pick(args.connections, 4, 1).max(1);
    let rate = if args.flat_out {
        0.0
    } else {
        devices as f64 * hz * batch as f64
    };
    let duration = args.duration();
    let mut report = Report::new(Scenario::MqttIngest);
    report.param("devices", devices);
    report.param("hz", hz);
    report.param("batch", batch);
    report.param("connections", connections);
    report.param("flat_out", args.flat_out);
    report.param("offered_readings_per_s", rate);
    report.param("topic_prefix", args.mqtt_prefix.as_str());

    let setup = Instant::now();
    eprintln!("setup: registering {devices} wearers");
    let wearers = fixtures
        .wearers("mqtt", devices, |_| fixtures.center())
        .await?;
    let mut rng = fixtures.rng(12);
    let messages = bus::mqtt_messages(&wearers, &args.mqtt_prefix, batch, &mut rng);
    let admin = fixtures.admin().clone();
    let baseline = bus::counters(&admin, APPLIED).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut clients = Vec::with_capacity(connections);
    let mut loops = Vec::with_capacity(connections);
    for i in 0..connections {
        let id = format!("{}-{i}", fixtures.prefix());
        let mut options = MqttOptions::parse_url(format!("{}?client_id={id}", args.mqtt_url))
            .context("--mqtt-url")?;
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_inflight(INFLIGHT)
            .set_max_packet_size(1024 * 1024, 1024 * 1024);
        let (client, events) = AsyncClient::new(options, usize::from(INFLIGHT));
        let acks = Arc::new(Mutex::new(Acks::default()));
        let (up_tx, up_rx) = tokio::sync::oneshot::channel();
        loops.push((tokio::spawn(event_loop(events, acks.clone(), up_tx)), acks));
        tokio::time::timeout(Duration::from_secs(10), up_rx)
            .await
            .context("no CONNACK from the MQTT broker (--mqtt-url)")?
            .context("the MQTT connection failed")?;
        clients.push(client);
    }
    report.setup_s = setup.elapsed().as_secs_f64();

    let progress = Progress::new("mqtt-ingest", "messages", duration);
    let ticker = progress.show();
    let shared = Arc::new(Shared {
        messages,
        schedule: Schedule::new(rate, batch as f64),
        next: AtomicU64::new(0),
    });
    let workers: Vec<_> = clients
        .iter()
        .map(|c| {
            tokio::spawn(publish(
                shared.clone(),
                c.clone(),
                progress.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();
    measure_for(duration).await;
    let _ = stop_tx.send(true);
    let mut sent = 0;
    let mut failed = 0;
    for w in workers {
        let (s, f) = w.await.context("an MQTT publisher panicked")?;
        sent += s;
        failed += f;
    }
    // The last PUBACKs.
    let settle = Instant::now();
    let mut acks = Acks::default();
    loop {
        let mut acked = 0;
        for (_, a) in &loops {
            acked += a.lock().await.acked;
        }
        if acked >= sent || settle.elapsed() > Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let published_s = shared.schedule.start.elapsed().as_secs_f64();
    let during = bus::counters(&admin, APPLIED).await? - baseline;
    drop(ticker);
    for c in &clients {
        let _ = c.try_disconnect();
    }
    for (task, a) in loops {
        task.abort();
        let mut a = a.lock().await;
        acks.latencies_ms.append(&mut a.latencies_ms);
        acks.acked += a.acked;
        acks.broken |= a.broken;
    }
    eprintln!(
        "published {} messages ({} acknowledged); waiting for the server to apply them",
        sent, acks.acked
    );
    let (answered, last) = bus::drain(&admin, APPLIED, baseline, acks.acked as f64).await?;
    let applied_s = last
        .saturating_duration_since(shared.schedule.start)
        .as_secs_f64();
    let answered = answered.max(0.0) as u64;
    let rejected = bus::counters(&admin, &["shers_mqtt_rejected_total"]).await?;

    report.measured_s = applied_s;
    report.count("messages_sent", sent);
    report.count("messages_acknowledged", acks.acked);
    report.count("readings_acknowledged", acks.acked * batch as u64);
    report.count("publish_failures", failed);
    report.count("connection_lost", u64::from(acks.broken));
    report.count("messages_answered", answered);
    report.count("messages_unanswered", acks.acked.saturating_sub(answered));
    report.count("messages_answered_while_publishing", during.max(0.0) as u64);
    report.count("rejected_total_after", rejected.max(0.0) as u64);
    report.param("published_s", published_s);
    report.param("drained_s", applied_s);
    report.param(
        "published_readings_per_s",
        (acks.acked * batch as u64) as f64 / published_s.max(1e-9),
    );
    let errors = failed + sent.saturating_sub(acks.acked);
    report.series.push(Series::new(
        "publish→puback",
        acks.latencies_ms,
        (answered.min(acks.acked) * batch as u64) as f64 / applied_s.max(1e-9),
        "readings/s applied",
        errors,
    ));
    Ok(report)
}

/// Drives one connection: signals the first CONNACK, timestamps each outgoing PUBLISH by
/// packet id and its PUBACK.
async fn event_loop(
    mut events: rumqttc::EventLoop,
    acks: Arc<Mutex<Acks>>,
    up: tokio::sync::oneshot::Sender<()>,
) {
    let mut up = Some(up);
    let mut sent: HashMap<u16, Instant> = HashMap::new();
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Some(up) = up.take() {
                    let _ = up.send(());
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                sent.insert(pkid, Instant::now());
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let mut a = acks.lock().await;
                a.acked += 1;
                if let Some(at) = sent.remove(&ack.pkid) {
                    a.latencies_ms.push(ms(at.elapsed()));
                }
            }
            Ok(_) => {}
            Err(_) => {
                acks.lock().await.broken = true;
                // A publisher's connection failing ends its part of the run (counted).
                return;
            }
        }
    }
}

/// One publisher: the next message on the schedule, QoS 1. Returns (sent, failed).
async fn publish(
    shared: Arc<Shared>,
    client: AsyncClient,
    progress: Arc<Progress>,
    mut stop: watch::Receiver<bool>,
) -> (u64, u64) {
    let (mut sent, mut failed) = (0, 0);
    let count = shared.messages.len() as u64;
    while count > 0 && !*stop.borrow() {
        let n = shared.next.fetch_add(1, Ordering::Relaxed);
        let due = shared.schedule.due(n);
        if due > Instant::now() {
            tokio::select! {
                () = tokio::time::sleep_until(due.into()) => {}
                _ = stop.changed() => break,
            }
        }
        let message = &shared.messages[(n % count) as usize];
        let body = message.render(Utc::now());
        // Waits while the client's request queue is full (the in-flight window is).
        let published = tokio::select! {
            r = client.publish(message.topic.as_str(), QoS::AtLeastOnce, false, body) => r,
            _ = stop.changed() => break,
        };
        match published {
            Ok(()) => {
                sent += 1;
                progress.sample();
                progress.worked(1);
            }
            Err(_) => {
                failed += 1;
                progress.error();
                break;
            }
        }
    }
    (sent, failed)
}
