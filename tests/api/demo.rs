//! `shers demo` end to end: the real binary seeds Edinburgh, runs its wearables and crews at
//! twenty times real speed for a minute and stops; by then incidents have gone the whole way
//! from a wearable alarm to `closed` with a paid invoice, on SQLite and on PostgreSQL. With
//! SHERS's own logs at `debug` for the whole run, no name, phone or email of a patient behind
//! an incident, or of their next of kin, appears in anything the process printed.

use std::collections::HashMap;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shers::domain::billing::InvoiceStatus;
use shers::domain::incident::IncidentStatus;
use shers::persistence::incidents::{self, StatusFilter};
use shers::persistence::{Backend, invoices, patients};

use crate::both_backends;
use crate::helpers::{TestDb, api};

both_backends!(twenty_simulated_minutes_close_and_bill_incidents);

/// How long the demo runs (wall clock) and how fast.
const DURATION_S: &str = "60";
const TIME_SCALE: &str = "20";
/// Beyond this (the minute, start-up and a graceful stop, with room for a busy machine) the
/// child is killed and the test fails.
const HARD_LIMIT: Duration = Duration::from_secs(120);

fn read_all(mut from: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = from.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `shers demo` on `url`, with nothing from the caller's environment configuring it.
fn start_demo(url: &str) -> Child {
    let mut command = demo_command(url);
    command.args(["--time-scale", TIME_SCALE, "--duration", DURATION_S]);
    // Everything SHERS logs at debug (the simulators' progress for the failure message, and
    // every line the patient-data check below reads); other crates at warn.
    command.env("RUST_LOG", "warn,shers=debug");
    command.spawn().unwrap()
}

/// `shers demo` on `url` with its defaults, nothing from the caller's environment
/// configuring it (`RUST_LOG` included).
fn demo_command(url: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shers"));
    command
        .args(["demo", "--bind", "127.0.0.1:0", "--database-url", url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("SHERS_")
            || key == "DATABASE_URL"
            || key == "REDIS_URL"
            || key == "RUST_LOG"
        {
            command.env_remove(key.as_ref());
        }
    }
    command
}

/// `key=value` pairs of the summary line.
fn summary_counts(line: &str) -> HashMap<String, i64> {
    line.split([' ', ';'])
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect()
}

async fn twenty_simulated_minutes_close_and_bill_incidents(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut child = start_demo(&db.url);
    let stdout = read_all(child.stdout.take().unwrap());
    let stderr = read_all(child.stderr.take().unwrap());
    let started = Instant::now();
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > HARD_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        actix_web::rt::time::sleep(Duration::from_millis(250)).await;
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    let context = format!(
        "stdout:\n{stdout}\nstderr (last lines):\n{}",
        tail(&stderr, 60)
    );
    let exit = exit.unwrap_or_else(|| panic!("demo still running after {HARD_LIMIT:?}\n{context}"));
    assert!(exit.success(), "demo failed: {exit}\n{context}");

    // The dashboard address carries the port the OS picked.
    let port: u16 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("dashboard: http://127.0.0.1:"))
        .and_then(|rest| rest.strip_suffix('/'))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no dashboard line\n{context}"));
    assert_ne!(port, 0);

    let line = stdout
        .lines()
        .find(|l| l.starts_with("demo summary: "))
        .unwrap_or_else(|| panic!("no summary line\n{context}"));
    let counts = summary_counts(line);
    let count = |key: &str| counts.get(key).copied().unwrap_or(-1);
    assert!(
        count("closed") >= 1,
        "no incident closed: {line}\n{context}"
    );
    assert!(count("paid") >= 1, "no invoice paid: {line}\n{context}");
    assert_eq!(
        count("created"),
        count("closed") + count("cancelled") + count("open"),
        "{line}"
    );

    // The database agrees: a closed incident whose invoice was paid.
    let store = db.connect().await;
    let mut conn = store.conn().await.unwrap();
    let finished = incidents::page(&mut conn, StatusFilter::Closed, None, 200)
        .await
        .unwrap();
    let closed: Vec<_> = finished
        .iter()
        .filter(|i| i.status == IncidentStatus::Closed)
        .collect();
    assert_eq!(closed.len() as i64, count("closed"), "{line}");
    let mut paid = 0;
    for incident in &closed {
        let invoice = invoices::for_incident(&mut conn, incident.id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("closed incident {} has no invoice", incident.id));
        assert!(
            matches!(
                invoice.saga.status,
                InvoiceStatus::Paid | InvoiceStatus::Failed
            ),
            "a closed incident's billing has finished: {:?}",
            invoice.saga.status
        );
        paid += i64::from(invoice.saga.status == InvoiceStatus::Paid);
        // Wearables opened these, and crews took them all the way.
        assert!(incident.patient_id.is_some());
        assert!(incident.times.at_destination.is_some());
    }
    assert!(paid >= 1, "{line}");

    // Patient data never reaches the logs: the people behind every incident, looked up in the
    // database, are absent from the process's output (stdout included: it has the tokens).
    let everything = incidents::page(&mut conn, StatusFilter::All, None, 1_000)
        .await
        .unwrap();
    let mut secrets = Vec::new();
    for incident in &everything {
        let Some(patient_id) = &incident.patient_id else {
            continue;
        };
        let patient = patients::find_patient(&mut conn, patient_id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("incident {} names an unknown patient", incident.id));
        secrets.push(patient.name);
        for kin in patient.next_of_kin {
            secrets.push(kin.name);
            secrets.extend(kin.phone);
            secrets.extend(kin.email);
        }
    }
    assert!(
        secrets.len() >= 2 * everything.len(),
        "the demo's patients have names and next of kin: {secrets:?}"
    );
    let output = format!("{stdout}\n{stderr}");
    assert!(
        stderr.lines().count() > 100,
        "the debug log is there to be checked:\n{}",
        tail(&stderr, 20)
    );
    for secret in &secrets {
        assert!(
            !output.contains(secret.as_str()),
            "patient data in the demo's output: {secret:?}\n{}",
            output
                .lines()
                .filter(|l| l.contains(secret.as_str()))
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// What a person sees who runs the README's first command: at the default settings, an
/// ambulance is offered a job within 30 s of the start, and the dashboard URL and the tokens
/// are still on screen then (printed again once the city is seeded, and request logs kept off
/// the screen). SIGTERM then stops the demo promptly and cleanly.
#[actix_web::test]
async fn a_fresh_demo_offers_an_ambulance_within_30_seconds() {
    /// The promise to a new user.
    const FIRST_OFFER_WITHIN: Duration = Duration::from_secs(30);
    /// Lines that may follow the banner before it scrolls off a 24-line terminal.
    const SCREEN_LINES: usize = 24;
    let db = TestDb::new(Backend::Sqlite).await;
    let started = Instant::now();
    let mut child = demo_command(&db.url).spawn().unwrap();
    let stdout = lines_of(child.stdout.take().unwrap());
    let stderr = lines_of(child.stderr.take().unwrap());
    let output =
        |lines: &std::sync::Arc<std::sync::Mutex<Vec<String>>>| lines.lock().unwrap().clone();

    // The banner: port and console token.
    let (port, console) = loop {
        let out = output(&stdout);
        let port = out.iter().find_map(|l| {
            l.strip_prefix("dashboard: http://127.0.0.1:")
                .and_then(|rest| rest.strip_suffix('/'))
                .and_then(|p| p.parse::<u16>().ok())
        });
        let token = out
            .iter()
            .find_map(|l| l.strip_prefix("console token: ").map(str::to_owned));
        if let (Some(port), Some(token)) = (port, token) {
            break (port, token);
        }
        assert!(
            started.elapsed() < FIRST_OFFER_WITHIN,
            "no banner: {out:?}\n{:?}",
            output(&stderr)
        );
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    };

    // Watch the event stream as a console would until a crew is offered the job.
    let client = reqwest::Client::new();
    let offered_after = loop {
        let page: serde_json::Value = match client
            .get(format!(
                "http://127.0.0.1:{port}{}?since=0&limit=1000",
                api::EVENTS
            ))
            .bearer_auth(&console)
            .send()
            .await
        {
            Ok(resp) => resp.json().await.unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        };
        let offered = page["items"]
            .as_array()
            .is_some_and(|items| items.iter().any(|e| e["kind"] == "dispatch.offered"));
        if offered {
            break started.elapsed();
        }
        if started.elapsed() > FIRST_OFFER_WITHIN {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "no offer within {FIRST_OFFER_WITHIN:?} of start\nstdout: {:?}\nstderr tail:\n{}",
                output(&stdout),
                tail(&output(&stderr).join("\n"), 40)
            );
        }
        actix_web::rt::time::sleep(Duration::from_millis(250)).await;
    };

    // The banner came again after the city was seeded, and little has been logged since.
    let banners = output(&stdout)
        .iter()
        .filter(|l| l.starts_with("console token: "))
        .count();
    assert!(
        banners >= 2,
        "the banner is printed again once seeded: {:?}",
        output(&stdout)
    );
    let err = output(&stderr);
    let seeded = err
        .iter()
        .position(|l| l.contains("demo city seeded"))
        .unwrap_or_else(|| panic!("no 'demo city seeded' line:\n{}", err.join("\n")));
    let since_banner = &err[seeded + 1..];
    assert!(
        since_banner.len() < SCREEN_LINES,
        "{} lines logged after the banner in {offered_after:?}; it has scrolled away:\n{}",
        since_banner.len(),
        since_banner.join("\n")
    );
    assert!(
        !err.iter().any(|l| l.contains("request completed")),
        "request logs on the demo's screen"
    );

    // SIGTERM stops the simulators, then the server, and the summary is printed.
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let stopping = Instant::now();
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if stopping.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("the demo did not stop within 15 s of SIGTERM");
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        exit.success(),
        "{exit}\n{}",
        tail(&output(&stderr).join("\n"), 30)
    );
    // Give the reader a moment to take the last lines.
    actix_web::rt::time::sleep(Duration::from_millis(200)).await;
    assert!(
        output(&stdout)
            .iter()
            .any(|l| l.starts_with("demo summary: ")),
        "{:?}",
        output(&stdout)
    );
}

/// Collects a child's output line by line as it comes.
fn lines_of(from: impl Read + Send + 'static) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::BufRead as _;
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
    lines
}
