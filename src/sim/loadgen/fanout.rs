//! The `fanout` scenario: C console WebSockets listen while U units each report a position
//! every second over REST (each becomes a `unit.location` event, persisted at most once a
//! second per unit). For every event of this run's units, at every console: the time from
//! the event's `at` — the timestamp the server gives the event as it appends it to the store,
//! inside the write transaction — to the frame's arrival, on the host's wall clock (server and
//! loadgen share it). Every console must receive every event: after the generators stop and
//! the consoles catch up, each console's sequence numbers are checked against the gap-free
//! window from the run's first to its last event.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::fixtures::{Fixtures, Point, Unit};
use super::progress::Progress;
use super::report::{Figure, Report, Series};
use super::{LoadgenArgs, Scenario, measure_for};
use crate::sim::client::{Api, Ws};
use crate::sim::rng::SimRng;

/// Target p99 append→receipt, ms (issue 8).
pub const TARGET_P99_MS: f64 = 50.0;
/// Between two position reports of a unit: just over the server's one-event-a-second
/// throttle, so each report becomes an event.
const REPORT_INTERVAL: Duration = Duration::from_millis(1_020);
/// How long the consoles get to catch up after the last event.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Contiguous runs of received sequence numbers (inclusive).
#[derive(Debug, Default)]
struct Runs(Vec<(i64, i64)>);

impl Runs {
    /// Records `seq`; false when it is not after the last one (a duplicate or reordering).
    fn push(&mut self, seq: i64) -> bool {
        match self.0.last_mut() {
            Some((_, end)) if seq == *end + 1 => *end = seq,
            Some((_, end)) if seq <= *end => return false,
            _ => self.0.push((seq, seq)),
        }
        true
    }

    /// How many of `first..=last` were received.
    fn within(&self, first: i64, last: i64) -> i64 {
        self.0
            .iter()
            .map(|&(a, b)| (b.min(last) - a.max(first) + 1).max(0))
            .sum()
    }
}

/// What one console saw.
#[derive(Debug, Default)]
struct Tally {
    runs: Runs,
    latencies_ms: Vec<f64>,
    /// First and last sequence of this run's events.
    ours: Option<(i64, i64)>,
    resyncs: u64,
    out_of_order: u64,
    bad_frames: u64,
    broken: bool,
}

/// The fields loadgen reads from a console frame (the event's `data` is skipped).
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(default, rename = "type", borrow)]
    control: Option<&'a str>,
    #[serde(default)]
    seq: Option<i64>,
    #[serde(default, borrow)]
    at: Option<&'a str>,
    #[serde(default, borrow)]
    kind: Option<&'a str>,
    #[serde(default, borrow)]
    unit_id: Option<&'a str>,
}

struct Shared {
    /// Unit ids of this run start with it.
    unit_prefix: String,
    /// The highest sequence any console has seen.
    head: AtomicI64,
    progress: Arc<Progress>,
}

impl Tally {
    fn on_frame(&mut self, received: DateTime<Utc>, text: &str, shared: &Shared) {
        let Ok(frame) = serde_json::from_str::<Frame<'_>>(text) else {
            self.bad_frames += 1;
            return;
        };
        match (frame.control, frame.seq) {
            (Some("resync"), _) => self.resyncs += 1,
            (Some(_), _) => {}
            (None, Some(seq)) => {
                if !self.runs.push(seq) {
                    self.out_of_order += 1;
                }
                shared.head.fetch_max(seq, Ordering::Relaxed);
                shared.progress.worked(1);
                let ours = frame.kind == Some("unit.location")
                    && frame
                        .unit_id
                        .is_some_and(|u| u.starts_with(&shared.unit_prefix));
                if !ours {
                    return;
                }
                self.ours = Some(
                    self.ours
                        .map_or((seq, seq), |(a, b)| (a.min(seq), b.max(seq))),
                );
                match frame.at.map(DateTime::parse_from_rfc3339) {
                    Some(Ok(at)) => {
                        let micros = received.timestamp_micros() - at.timestamp_micros();
                        self.latencies_ms.push(micros.max(0) as f64 / 1_000.0);
                        shared.progress.sample();
                    }
                    _ => self.bad_frames += 1,
                }
            }
            (None, None) => self.bad_frames += 1,
        }
    }
}

/// `--scenario fanout`.
// Long on purpose: a load scenario read top to bottom (set up, drive, measure, report).
pub async fn run(args: &LoadgenArgs, fixtures: &Fixtures) -> anyhow::Result<Report> {
    let consoles = args.pick(args.consoles, 500, 5).max(1);
    let sources = args.pick(args.units, 50, 3).max(1);
    let concurrency = args.concurrency();
    let duration = args.duration();
    let mut report = Report::new(Scenario::Fanout);
    report.param("consoles", consoles);
    report.param("units", sources);
    report.param("report_interval_ms", REPORT_INTERVAL.as_millis() as u64);

    let setup = Instant::now();
    let center = fixtures.center();
    let mut rng = fixtures.rng(4);
    let positions: Vec<Point> = (0..sources)
        .map(|_| center.offset_km(rng.range(-5.0, 5.0), rng.range(-5.0, 5.0)))
        .collect();
    eprintln!("setup: {sources} units, {consoles} consoles");
    let units = fixtures.units("fan", &positions).await?;
    let console = fixtures
        .admin()
        .with_token(&fixtures.token("console", None).await?);
    let sockets: Vec<Ws> = futures_util::stream::iter(0..consoles)
        .map(|_| console.ws("/api/v1/ws/console"))
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()
        .context("connecting the consoles")?;
    report.setup_s = setup.elapsed().as_secs_f64();

    let progress = Progress::new("fanout", "frames", duration);
    let shared = Arc::new(Shared {
        unit_prefix: format!("{}-fan-", fixtures.prefix()),
        head: AtomicI64::new(0),
        progress: progress.clone(),
    });
    let (stop_readers, readers_stop) = watch::channel(false);
    let positions_seen: Vec<Arc<AtomicI64>> =
        (0..consoles).map(|_| Arc::new(AtomicI64::new(0))).collect();
    let readers: Vec<_> = sockets
        .into_iter()
        .zip(&positions_seen)
        .map(|(ws, seen)| {
            tokio::spawn(read_console(
                ws,
                shared.clone(),
                seen.clone(),
                readers_stop.clone(),
            ))
        })
        .collect();

    let ticker = progress.show();
    let started = Instant::now();
    let (stop_generators, generators_stop) = watch::channel(false);
    let generators: Vec<_> = units
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
    measure_for(duration).await;
    let _ = stop_generators.send(true);
    let mut report_errors = 0;
    for g in generators {
        report_errors += g.await.unwrap_or(1);
    }
    report.measured_s = started.elapsed().as_secs_f64();

    // Location events are appended just after the report is answered: give them a moment,
    // then let every console reach the highest sequence any console has seen.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let drained = wait_for_consoles(&shared, &positions_seen).await;
    drop(ticker);
    let _ = stop_readers.send(true);
    let mut tallies = Vec::with_capacity(readers.len());
    for r in readers {
        tallies.push(r.await.context("a console reader panicked")?);
    }

    // The window: this run's first to last event (the sequence is gap-free).
    let first = tallies.iter().filter_map(|t| t.ours.map(|o| o.0)).min();
    let last = tallies.iter().filter_map(|t| t.ours.map(|o| o.1)).max();
    let (window, missing, consoles_missing) = match (first, last) {
        (Some(a), Some(b)) => {
            let window = b - a + 1;
            let per_console: Vec<i64> = tallies
                .iter()
                .map(|t| window - t.runs.within(a, b))
                .collect();
            (
                window,
                per_console.iter().sum::<i64>(),
                per_console.iter().filter(|m| **m > 0).count(),
            )
        }
        _ => (0, 0, 0),
    };
    let events_ours = tallies
        .iter()
        .map(|t| t.latencies_ms.len())
        .max()
        .unwrap_or(0);
    let mut samples = Vec::new();
    for t in &mut tallies {
        samples.append(&mut t.latencies_ms);
    }
    report.count("consoles", consoles as u64);
    report.count("events_generated", events_ours as u64);
    report.count("events_in_window", window.max(0) as u64);
    report.count("missing", missing.max(0) as u64);
    report.count("consoles_missing_events", consoles_missing as u64);
    report.count("resyncs", tallies.iter().map(|t| t.resyncs).sum());
    report.count("out_of_order", tallies.iter().map(|t| t.out_of_order).sum());
    report.count("bad_frames", tallies.iter().map(|t| t.bad_frames).sum());
    report.count(
        "broken_consoles",
        tallies.iter().filter(|t| t.broken).count() as u64,
    );
    report.count("location_report_errors", report_errors);
    report.count("drain_timed_out", u64::from(!drained));
    let receipts = samples.len() as f64;
    report.series.push(Series::new(
        "append→console",
        samples,
        receipts / report.measured_s.max(1e-9),
        "receipts/s",
        missing.max(0) as u64,
    ));
    report.target(Figure::P99Ms, TARGET_P99_MS);
    Ok(report)
}

/// Reads one console until told to stop; `seen` follows the last sequence received.
async fn read_console(
    ws: Ws,
    shared: Arc<Shared>,
    seen: Arc<AtomicI64>,
    mut stop: watch::Receiver<bool>,
) -> Tally {
    let (mut sink, mut stream) = ws.split();
    let mut tally = Tally::default();
    loop {
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    tally.on_frame(Utc::now(), text.as_str(), &shared);
                    if let Some(&(_, last)) = tally.runs.0.last() {
                        seen.store(last, Ordering::Relaxed);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    tally.broken = true;
                    return tally;
                }
            },
            _ = stop.changed() => {
                let _ = sink.send(Message::Close(None)).await;
                return tally;
            }
        }
    }
}

/// Reports `unit`'s position (near its base) every [`REPORT_INTERVAL`] until `stop`; returns
/// the failed reports.
pub(super) async fn report_positions(
    crew: Api,
    unit: Unit,
    mut rng: SimRng,
    mut stop: watch::Receiver<bool>,
) -> u64 {
    let path = format!("/api/v1/units/{}/location", unit.id);
    let phase = REPORT_INTERVAL.mul_f64(rng.range(0.0, 1.0));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + phase, REPORT_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut errors = 0;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return errors,
        }
        let at = unit
            .home
            .offset_km(rng.range(-0.2, 0.2), rng.range(-0.2, 0.2));
        if crew
            .post(&path, &json!({"lat": at.lat, "lng": at.lng}))
            .await
            .is_err()
        {
            errors += 1;
        }
    }
}

/// Waits until every console has received the highest sequence seen by any; false on timeout.
async fn wait_for_consoles(shared: &Shared, seen: &[Arc<AtomicI64>]) -> bool {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let head = shared.head.load(Ordering::Relaxed);
        if seen.iter().all(|s| s.load(Ordering::Relaxed) >= head) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_count_what_arrived_in_a_window() {
        let mut runs = Runs::default();
        for seq in [5, 6, 7, 9, 10] {
            assert!(runs.push(seq));
        }
        assert!(!runs.push(10), "a duplicate");
        assert_eq!(runs.within(5, 10), 5, "8 is missing");
        assert_eq!(runs.within(6, 9), 3);
        assert_eq!(runs.within(11, 20), 0);
    }

    #[test]
    fn frames_are_classified() {
        let progress = Progress::new("t", "frames", Duration::from_secs(1));
        let shared = Shared {
            unit_prefix: "lg-1-fan-".into(),
            head: AtomicI64::new(0),
            progress,
        };
        let mut tally = Tally::default();
        let at = Utc::now();
        let event = json!({"seq": 3, "at": at, "kind": "unit.location",
                           "unit_id": "lg-1-fan-0", "data": {"lat": 1.0}})
        .to_string();
        tally.on_frame(at + chrono::Duration::milliseconds(4), &event, &shared);
        tally.on_frame(at, r#"{"type":"heartbeat","seq":3}"#, &shared);
        tally.on_frame(at, r#"{"type":"resync","since":3}"#, &shared);
        let other =
            json!({"seq": 4, "at": at, "kind": "unit.location", "unit_id": "x"}).to_string();
        tally.on_frame(at, &other, &shared);
        assert_eq!(tally.ours, Some((3, 3)));
        assert_eq!(tally.latencies_ms, [4.0]);
        assert_eq!(tally.resyncs, 1);
        assert_eq!(tally.runs.within(3, 4), 2);
        assert_eq!(shared.head.load(Ordering::Relaxed), 4);
    }
}
