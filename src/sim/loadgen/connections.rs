//! `--scenario connections`: does a crowd of connections starve the ones that matter?
//!
//! First the probes run alone for a baseline: `GET /healthz` (what an orchestrator asks) and
//! an authenticated `GET /api/v1/units` (what a console asks), each on its own keep-alive
//! connection every [`PROBE_GAP`]. Then the crowd arrives and the same probes run again:
//! `--consoles` console WebSockets held open and read (default 2,000), and `--slow` slow-header
//! connections (default 200), each sending a request line and then one header line a second,
//! never finishing its headers (a slowloris). The report has both phases' latencies, how many
//! probes failed, and how many slow connections the server closed and after how long.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::fixtures::Fixtures;
use super::report::{Figure, Report, Series};
use super::{LoadgenArgs, Scenario, measure_for};
use crate::sim::client::{Api, Ws};

/// Pause between two probes of one kind.
const PROBE_GAP: Duration = Duration::from_millis(50);
/// Longest baseline phase (it is never longer than the measured one).
const BASELINE: Duration = Duration::from_secs(3);
/// What `/healthz` in the crowd must stay under at p99: a tenth of the one-second timeout
/// orchestrators give a readiness probe by default.
const TARGET_P99_MS: f64 = 100.0;
/// A slow connection's pace: one more header line this often.
const DRIP: Duration = Duration::from_secs(1);

/// `--scenario connections`.
// Long on purpose: a load scenario read top to bottom (baseline, crowd, measure, report).
pub async fn run(args: &LoadgenArgs, fixtures: &Fixtures) -> anyhow::Result<Report> {
    let consoles = args.pick(args.consoles, 2_000, 5).max(1);
    let slow = args.pick(args.slow, 200, 5);
    let concurrency = args.concurrency();
    let mut report = Report::new(Scenario::Connections);
    report.param("consoles", consoles);
    report.param("slow_header_connections", slow);
    report.param("probe_gap_ms", PROBE_GAP.as_millis() as u64);
    let console = fixtures
        .admin()
        .with_token(&fixtures.token("console", None).await?);

    let baseline = BASELINE.min(args.duration());
    eprintln!("baseline: probes alone for {:.1} s", baseline.as_secs_f64());
    let (health_alone, units_alone) = probe_for(&console, baseline).await;

    let setup = Instant::now();
    eprintln!("crowd: {consoles} consoles, {slow} slow-header connections");
    let sockets: Vec<Ws> = futures_util::stream::iter(0..consoles)
        .map(|_| console.ws("/api/v1/ws/console"))
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()
        .context("connecting the consoles")?;
    report.setup_s = setup.elapsed().as_secs_f64();
    let (stop, stopped) = watch::channel(false);
    let broken = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|ws| tokio::spawn(read_until(ws, stopped.clone(), broken.clone())))
        .collect();
    let address = host_port(console.base_url())?;
    let dripping: Vec<_> = (0..slow)
        .map(|_| tokio::spawn(drip_headers(address.clone(), stopped.clone())))
        .collect();

    let started = Instant::now();
    let probes = tokio::spawn({
        let console = console.clone();
        let duration = args.duration();
        async move { probe_for(&console, duration).await }
    });
    measure_for(args.duration()).await;
    let (health_crowd, units_crowd) = probes.await.context("the probes panicked")?;
    report.measured_s = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    for r in readers {
        let _ = r.await;
    }
    let mut closed_after_s = Vec::new();
    let mut still_open = 0;
    for d in dripping {
        match d.await.unwrap_or(None) {
            Some(after) => closed_after_s.push(after.as_secs_f64() * 1_000.0),
            None => still_open += 1,
        }
    }
    report.count("consoles", consoles as u64);
    report.count("consoles_broken", broken.load(Ordering::Relaxed));
    report.count("slow_closed_by_server", closed_after_s.len() as u64);
    report.count("slow_still_open_at_end", still_open);
    // `/healthz` in the crowd last: the target is checked against it.
    for (name, probe, seconds) in [
        ("healthz alone", health_alone, baseline),
        ("units alone", units_alone, baseline),
        ("units in the crowd", units_crowd, args.duration()),
        ("healthz in the crowd", health_crowd, args.duration()),
    ] {
        let rate = probe.samples.len() as f64 / seconds.as_secs_f64().max(1e-9);
        report.series.push(Series::new(
            name,
            probe.samples,
            rate,
            "probes/s",
            probe.errors,
        ));
    }
    report.target(Figure::P99Ms, TARGET_P99_MS);
    if !closed_after_s.is_empty() {
        report.series.push(Series::new(
            "slow connection cut after",
            closed_after_s,
            0.0,
            "-",
            0,
        ));
    }
    Ok(report)
}

/// Latencies of one kind of probe, and how many failed.
struct Probe {
    samples: Vec<f64>,
    errors: u64,
}

/// Probes `/healthz` and `/api/v1/units` every [`PROBE_GAP`] for `duration`, one keep-alive
/// client each.
async fn probe_for(console: &Api, duration: Duration) -> (Probe, Probe) {
    let health = probe(console.clone(), "/healthz", duration);
    let units = probe(console.clone(), "/api/v1/units", duration);
    tokio::join!(health, units)
}

async fn probe(api: Api, path: &'static str, duration: Duration) -> Probe {
    let mut probe = Probe {
        samples: Vec::new(),
        errors: 0,
    };
    let started = Instant::now();
    let url = format!("{}{path}", api.base_url());
    while started.elapsed() < duration {
        let sent = Instant::now();
        let answer = api
            .http()
            .get(&url)
            .bearer_auth(api.token())
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        match answer {
            Ok(r) if r.status().is_success() => {
                // The body is part of the answer.
                let _ = r.bytes().await;
                probe.samples.push(sent.elapsed().as_secs_f64() * 1_000.0);
            }
            _ => probe.errors += 1,
        }
        tokio::time::sleep(PROBE_GAP).await;
    }
    probe
}

/// Reads a console until told to stop, counting it if the server broke it.
async fn read_until(ws: Ws, mut stop: watch::Receiver<bool>, broken: Arc<AtomicU64>) {
    let (_sink, mut stream) = ws.split();
    loop {
        tokio::select! {
            frame = stream.next() => {
                if !matches!(frame, Some(Ok(_))) {
                    broken.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            _ = stop.changed() => return,
        }
    }
}

/// One slowloris connection: a request line, then a header line every [`DRIP`], never the
/// blank line. `Some(after)` when the server closed it, `None` if it was still open at stop.
async fn drip_headers(address: String, mut stop: watch::Receiver<bool>) -> Option<Duration> {
    let opened = Instant::now();
    let mut stream = TcpStream::connect(&address).await.ok()?;
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {address}\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return Some(opened.elapsed());
    }
    let mut buf = [0_u8; 512];
    let mut n = 0_u64;
    loop {
        tokio::select! {
            // An answer (408), the end of the stream or an error: the server let go of us.
            _ = stream.read(&mut buf) => return Some(opened.elapsed()),
            () = tokio::time::sleep(DRIP) => {
                n += 1;
                if stream.write_all(format!("X-Drip-{n}: 1\r\n").as_bytes()).await.is_err() {
                    return Some(opened.elapsed());
                }
            }
            _ = stop.changed() => return None,
        }
    }
}

/// `host:port` of an `http://` base URL.
fn host_port(base: &str) -> anyhow::Result<String> {
    let rest = base
        .strip_prefix("http://")
        .context("the connections scenario needs an http:// URL")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    Ok(if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_of_base_urls() {
        assert_eq!(
            host_port("http://127.0.0.1:8080").ok().as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(
            host_port("http://localhost/x").ok().as_deref(),
            Some("localhost:80")
        );
        assert!(host_port("https://x").is_err());
    }
}
