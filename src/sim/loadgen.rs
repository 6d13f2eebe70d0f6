//! `shers loadgen`: load scenarios against a running SHERS, through its public HTTP/WebSocket
//! API only (issue 8).
//!
//! Scenarios:
//!
//! - `ingest`: devices × Hz readings in HTTP batches, paced, over several connections; reports
//!   readings/s accepted and request latency.
//! - `detect-to-offer`: background vitals and unit locations at 1 Hz, then repeatedly one
//!   emergency reading → the offer frame on a crew WebSocket.
//! - `accept-race`: waves of concurrent incidents, each offered to a cluster of crews who all
//!   accept at once: exactly one winner per incident; created→offered rate; accept latency.
//! - `fanout`: many console WebSockets; each event's append time (`at`) → receipt at every
//!   console; every console must see every event.
//! - `connections`: `/healthz` and a console read, alone and then beside thousands of open
//!   console WebSockets and slow-header (slowloris) connections.
//! - `amqp-ingest`: SHERS wearable messages (single or batched) published to `wearable.data`
//!   with publisher confirms; readings/s the server applied, from its `/metrics`.
//! - `mqtt-ingest`: readings at QoS 1 on `<prefix>/<device>/vitals` (single or batched);
//!   readings/s the server applied, from its `/metrics`.
//! - `relay-lag`: unit positions at ~1,000 events/s; each event's append time (`at`) →
//!   delivery on `shers.event.#` to loadgen's own queue.
//!
//! The brokers count as public interfaces: the bus scenarios publish and consume there, and
//! read the server's counters on `/metrics` (admin token), never its internals.
//!
//! Every run creates its own fixtures (patients, devices, units, tokens) with the admin token
//! under a random per-run prefix and a random region, so runs never meet each other's units.
//! At the end every unit the run registered is put **out of service** (so later incidents are
//! never offered to a crew nobody drives) and every token it minted is revoked. Devices stay
//! registered: the server reports them `device.offline` after its silence threshold.
//!
//! Latency is measured with [`std::time::Instant`] where loadgen both sends and receives;
//! fan-out uses the server's append timestamp against loadgen's wall clock (same host).
//! Percentiles come from the full sample set (nearest rank); nothing is dropped.
//!
//! This module must not reach into actors or the database: only [`super::client`].

mod accept_race;
mod amqp_ingest;
mod bus;
mod connections;
mod crews;
mod detect;
mod fanout;
mod fixtures;
mod ingest;
mod mqtt_ingest;
mod progress;
mod relay_lag;
mod report;
mod stats;
mod svg;
mod vitals;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use serde::Serialize;

pub use report::{Figure, Report, Series, TargetCheck};
pub use stats::Summary;

/// The load scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Vitals ingest over HTTP batches: readings/s accepted and request latency.
    Ingest,
    /// Emergency reading → offer frame on a crew WebSocket, under background load.
    DetectToOffer,
    /// Several crews accept the same offer at once: exactly one wins; created→offered rate.
    AcceptRace,
    /// Console WebSocket fan-out: event append → receipt at every console; nothing missing.
    Fanout,
    /// Probes alone, then beside many open consoles and slow-header connections.
    Connections,
    /// SHERS wearable messages over RabbitMQ: readings/s applied; publish→confirm latency.
    AmqpIngest,
    /// Readings over MQTT (QoS 1): readings/s applied; publish→PUBACK latency.
    MqttIngest,
    /// Event append (`at`) → delivery on `shers.event.#` under ~1,000 events/s.
    RelayLag,
}

impl Scenario {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::DetectToOffer => "detect-to-offer",
            Self::AcceptRace => "accept-race",
            Self::Fanout => "fanout",
            Self::Connections => "connections",
            Self::AmqpIngest => "amqp-ingest",
            Self::MqttIngest => "mqtt-ingest",
            Self::RelayLag => "relay-lag",
        }
    }
}

/// Options of `shers loadgen`. Size flags left out take the scenario's default (or its tiny
/// default with `--smoke`).
#[derive(Debug, Clone, Args)]
pub struct LoadgenArgs {
    /// Base URL of the SHERS server, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    pub url: String,
    /// An admin token (fixtures and the other roles' tokens are created with it).
    #[arg(long)]
    pub token: String,
    /// What to measure.
    #[arg(long, value_enum)]
    pub scenario: Scenario,
    /// Length of the measured phase, seconds (default 30; 2 with --smoke).
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// Tiny sizes and a couple of seconds, for CI.
    #[arg(long)]
    pub smoke: bool,
    /// Wearables sending vitals (ingest: 10000; detect-to-offer background: 10000; amqp-ingest,
    /// mqtt-ingest: 2000).
    #[arg(long, value_name = "N")]
    pub devices: Option<usize>,
    /// Readings per second per device (ingest: 10; detect-to-offer background: 1; amqp-ingest,
    /// mqtt-ingest: 1 message a second per device).
    #[arg(long, value_name = "HZ")]
    pub hz: Option<f64>,
    /// Readings per HTTP batch (default 500; the API takes up to 1000); per AMQP message
    /// (devices' messages in `{"readings":[…]}`) or MQTT message (one device's; both default 1).
    #[arg(long, value_name = "N")]
    pub batch: Option<usize>,
    /// Concurrent ingest connections (ingest: 8; detect-to-offer background: 4; AMQP and MQTT
    /// publishers: 4).
    #[arg(long, value_name = "N")]
    pub connections: Option<usize>,
    /// Ambulance units (detect-to-offer: 500 at 1 Hz; accept-race: 600, i.e. 200 clusters;
    /// fanout: 50 event sources at 1 Hz; relay-lag: 1000 at ~1 Hz).
    #[arg(long, value_name = "N")]
    pub units: Option<usize>,
    /// Console WebSockets (fanout: default 500; connections: 2000).
    #[arg(long, value_name = "N")]
    pub consoles: Option<usize>,
    /// Slow-header connections (connections; default 200).
    #[arg(long, value_name = "N")]
    pub slow: Option<usize>,
    /// Crews offered each accept-race incident: set it to the server's
    /// `dispatch.offers_per_round` (default 3).
    #[arg(long, value_name = "K")]
    pub crews_per_incident: Option<usize>,
    /// Requests in flight while creating fixtures and incident waves (default 16).
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Seconds of background load before detect-to-offer or relay-lag starts measuring
    /// (default 5).
    #[arg(long, value_name = "SECONDS")]
    pub warmup: Option<f64>,
    /// Pause between detect-to-offer probes, milliseconds (default 20).
    #[arg(long, value_name = "MS")]
    pub probe_gap_ms: Option<u64>,
    /// Where crews connect their WebSockets (default: `--url`). With a cluster, point `--url`
    /// at one node and this at another to measure a reading on one node reaching a crew on
    /// another (`detect-to-offer`).
    #[arg(long, value_name = "URL")]
    pub crew_url: Option<String>,
    /// Bus ingest: publish as fast as the broker confirms (AMQP) or the client's in-flight
    /// window allows (MQTT) instead of devices × Hz.
    #[arg(long)]
    pub flat_out: bool,
    /// The RabbitMQ the server uses (amqp-ingest, relay-lag).
    #[arg(
        long,
        value_name = "URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// The server's `amqp.exchange`.
    #[arg(long, value_name = "NAME", default_value = "amqp.topic")]
    pub amqp_exchange: String,
    /// The server's `amqp.queue_prefix` (its ingest queue must exist).
    #[arg(long, value_name = "PREFIX", default_value = "shers")]
    pub amqp_queue_prefix: String,
    /// The Mosquitto the server uses (mqtt-ingest).
    #[arg(long, value_name = "URL", default_value = "mqtt://127.0.0.1:1883")]
    pub mqtt_url: String,
    /// The server's `mqtt.topic_prefix`.
    #[arg(long, value_name = "PREFIX", default_value = "shers/devices")]
    pub mqtt_prefix: String,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the main latency histogram as SVG to this file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
}

impl LoadgenArgs {
    /// The measured phase's length.
    fn duration(&self) -> Duration {
        let seconds = self
            .duration
            .unwrap_or(if self.smoke { 2.0 } else { 30.0 })
            .max(0.1);
        Duration::from_secs_f64(seconds)
    }

    /// `given`, else the scenario's normal or smoke default.
    fn pick<T: Copy>(&self, given: Option<T>, normal: T, smoke: T) -> T {
        given.unwrap_or(if self.smoke { smoke } else { normal })
    }

    fn concurrency(&self) -> usize {
        self.pick(self.concurrency, 16, 4).max(1)
    }
}

/// Runs the chosen scenario, prints its summary table on stdout and writes the optional JSON
/// and SVG files. Returns the report (tests assert on it).
pub async fn run(args: LoadgenArgs) -> anyhow::Result<Report> {
    let started = std::time::Instant::now();
    let fixtures = fixtures::Fixtures::new(&args.url, &args.token, args.concurrency()).await?;
    eprintln!(
        "loadgen {}: run {} against {}",
        args.scenario.name(),
        fixtures.prefix(),
        args.url
    );
    let outcome = match args.scenario {
        Scenario::Ingest => ingest::run(&args, &fixtures).await,
        Scenario::DetectToOffer => detect::run(&args, &fixtures).await,
        Scenario::AcceptRace => accept_race::run(&args, &fixtures).await,
        Scenario::Fanout => fanout::run(&args, &fixtures).await,
        Scenario::Connections => connections::run(&args, &fixtures).await,
        Scenario::AmqpIngest => amqp_ingest::run(&args, &fixtures).await,
        Scenario::MqttIngest => mqtt_ingest::run(&args, &fixtures).await,
        Scenario::RelayLag => relay_lag::run(&args, &fixtures).await,
    };
    // Clean up whatever happened: units out of service, tokens revoked.
    let cleanup = fixtures.cleanup().await;
    let mut report = outcome?;
    report.run_id = fixtures.prefix().to_owned();
    report.url = args.url.clone();
    report.smoke = args.smoke;
    report.total_s = started.elapsed().as_secs_f64();
    report
        .counters
        .insert("cleanup_failures".into(), cleanup.failures);
    report
        .counters
        .insert("units_out_of_service".into(), cleanup.units);
    report
        .counters
        .insert("tokens_revoked".into(), cleanup.tokens);

    print!("{}", report.table());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).context("serialising the report")?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, report.svg())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// Waits `duration`, or less if the operator presses Ctrl-C.
async fn measure_for(duration: Duration) {
    let interrupted = async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => eprintln!("\ninterrupted: stopping and cleaning up"),
            // No signal handling here: only the timer ends the phase.
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = tokio::time::sleep(duration) => {}
        () = interrupted => {}
    }
}
