//! The load generator against the real application, through its public API only: every
//! scenario runs with `--smoke` and must produce samples, accept-race must find exactly one
//! winner per incident and fan-out must lose no event. Timings are never asserted.

use clap::Parser;
use serde_json::Value;
use shers::domain::auth::Role;
use shers::persistence::Backend;
use shers::sim::loadgen::{LoadgenArgs, Report, run};

use crate::both_backends;
use crate::helpers::TestApp;

both_backends!(
    ingest_smoke,
    detect_to_offer_smoke_twice_on_one_server,
    accept_race_smoke,
    fanout_smoke
);

/// `shers loadgen` as the command line parses it.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: LoadgenArgs,
}

/// Runs `scenario` with `--smoke` (plus `extra` flags) and checks the JSON and SVG it wrote.
async fn smoke(app: &TestApp, scenario: &str, extra: &[&str]) -> Report {
    let admin = app.token(Role::Admin).await;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let svg = dir.path().join("latency.svg");
    let mut argv = vec![
        "loadgen",
        "--url",
        &app.address,
        "--token",
        &admin,
        "--scenario",
        scenario,
        "--smoke",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ];
    argv.extend_from_slice(extra);
    let report = run(Cli::try_parse_from(argv).unwrap().args).await.unwrap();

    let written: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(written["scenario"], scenario);
    assert_eq!(written["smoke"], true);
    assert_eq!(
        written["series"][0]["samples"],
        report.series[0].summary.samples
    );
    assert!(written["series"][0]["p99_ms"].is_number(), "{written}");
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("p99"), "a p99 marker");

    // The fleet is left out of service and the run's tokens revoked.
    assert_eq!(report.counters["cleanup_failures"], 0);
    let units: Value = app.units(Role::Console).await.json().await.unwrap();
    for unit in units["items"].as_array().unwrap() {
        if unit["id"]
            .as_str()
            .unwrap()
            .starts_with(report.run_id.as_str())
        {
            assert_eq!(unit["status"], "out_of_service", "{unit}");
        }
    }
    report
}

fn samples(report: &Report, series: usize) -> usize {
    report.series[series].summary.samples
}

async fn ingest_smoke(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let report = smoke(&app, "ingest", &[]).await;
    assert!(samples(&report, 0) > 0, "{}", report.table());
    assert!(report.counters["readings_accepted"] > 0);
    assert_eq!(
        report.counters["readings_rejected"],
        0,
        "{}",
        report.table()
    );
    assert_eq!(report.counters["failed_requests"], 0);
    // Normal vitals open no incident.
    assert!(app.events_of("incident.created").await.is_empty());
}

async fn detect_to_offer_smoke_twice_on_one_server(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // A second run must not be disturbed by the first's units (out of service by then).
    for _ in 0..2 {
        let report = smoke(&app, "detect-to-offer", &["--duration", "1.5"]).await;
        assert!(samples(&report, 0) > 0, "{}", report.table());
        assert_eq!(report.counters["probe_no_offer"], 0, "{}", report.table());
        assert_eq!(report.counters["probe_no_incident"], 0);
        assert_eq!(report.counters["release_timeouts"], 0);
        assert!(report.counters["background_readings_accepted"] > 0);
    }
}

async fn accept_race_smoke(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let report = smoke(&app, "accept-race", &[]).await;
    let table = report.table();
    assert!(samples(&report, 0) > 0, "accept samples: {table}");
    assert!(samples(&report, 1) > 0, "created→offered samples: {table}");
    assert_eq!(report.counters["violations"], 0, "{table}");
    assert_eq!(
        report.counters["winners"], report.counters["incidents_offered"],
        "one winner per offered incident: {table}"
    );
    assert_eq!(report.counters["unoffered"], 0, "{table}");
}

async fn fanout_smoke(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let report = smoke(&app, "fanout", &["--duration", "2.5"]).await;
    let table = report.table();
    assert!(samples(&report, 0) > 0, "{table}");
    assert!(report.counters["events_in_window"] > 0, "{table}");
    assert_eq!(report.counters["missing"], 0, "{table}");
    assert_eq!(report.counters["broken_consoles"], 0, "{table}");
    // Every console saw every one of the run's events.
    assert_eq!(
        samples(&report, 0) as u64,
        report.counters["consoles"] * report.counters["events_generated"],
        "{table}"
    );
}

both_backends!(connections_smoke);

async fn connections_smoke(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let report = smoke(&app, "connections", &["--duration", "1.5"]).await;
    let table = report.table();
    // Both probes answered alone and in the crowd, and no console was dropped.
    for series in 0..4 {
        assert!(samples(&report, series) > 0, "{table}");
        assert_eq!(report.series[series].errors, 0, "{table}");
    }
    assert_eq!(report.counters["consoles_broken"], 0, "{table}");
    assert_eq!(
        report.counters["slow_closed_by_server"] + report.counters["slow_still_open_at_end"],
        5,
        "{table}"
    );
}
