//! The AMQP publish relay against a real RabbitMQ (docs/interop.md §1, "Publish"): an
//! emergency's lifecycle on SHERS's routing keys with SHERS's fields and properties, every
//! stored event on `shers.event.<kind>` in sequence order with the envelope `/api/v1/events`
//! shows, and a restart carrying on from the stored cursor. (A kill -9 between publish and
//! cursor store is `bus.after_publish` in `tests/api/crash.rs`.)
//!
//! Each test declares its own exchange and binds its own queue to it, so tests never see each
//! other. The broker is `SHERS_TEST_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`);
//! with `SHERS_TEST_SKIP_AMQP=1` the tests return at once, saying so.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use reqwest::StatusCode;
use serde_json::{Value, json};
use shers::config::{PaymentProvider, Secret, Settings};
use shers::domain::auth::Role;
use shers::persistence::{Backend, cursors, events};

use crate::both_backends;
use crate::helpers::{PATIENCE, TestApp, api, eventually};

/// The broker the tests use, or `None` (with a message) when told to skip.
pub(crate) fn amqp_url() -> Option<String> {
    if std::env::var("SHERS_TEST_SKIP_AMQP").is_ok_and(|v| v == "1") {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci, "CI=true but SHERS_TEST_SKIP_AMQP=1");
        eprintln!("SKIPPED: AMQP test (SHERS_TEST_SKIP_AMQP=1)");
        return None;
    }
    Some(
        std::env::var("SHERS_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
    )
}

/// One received message: routing key, the properties the contract names, and the body.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    pub routing_key: String,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub app_id: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub body: Value,
}

/// A private exchange (named like the test, with a random suffix) and a queue bound to all of
/// it (`#`), declared before the application starts so nothing it publishes is missed.
pub(crate) struct Tap {
    pub exchange: String,
    pub prefix: String,
    queue: String,
    channel: Channel,
    _connection: Connection,
    pub seen: Vec<Received>,
}

impl Tap {
    pub(crate) async fn new(url: &str, test: &str) -> Tap {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let exchange = format!("test.{test}.{}", &suffix[..8]);
        let prefix = format!("t{}", &suffix[..12]);
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("RabbitMQ reachable (set SHERS_TEST_SKIP_AMQP=1 to skip)");
        let channel = connection.create_channel().await.unwrap();
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let queue = format!("{prefix}.q.tap");
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        Tap {
            exchange,
            prefix,
            queue,
            channel,
            _connection: connection,
            seen: Vec::new(),
        }
    }

    /// Settings that point the relay at this tap's exchange (ingest off: not under test).
    pub(crate) fn configure(&self, url: &str, s: &mut Settings) {
        s.amqp.url = Some(Secret::new(url.to_owned()));
        s.amqp.exchange = self.exchange.clone();
        s.amqp.queue_prefix = self.prefix.clone();
        s.amqp.ingest = false;
        s.amqp.publish = true;
    }

    /// Takes every message waiting in the queue.
    pub(crate) async fn drain(&mut self) {
        while let Some(m) = self
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let p = &m.delivery.properties;
            self.seen.push(Received {
                routing_key: m.delivery.routing_key.to_string(),
                message_id: p.message_id().as_ref().map(|s| s.to_string()),
                correlation_id: p.correlation_id().as_ref().map(|s| s.to_string()),
                app_id: p.app_id().as_ref().map(|s| s.to_string()),
                content_type: p.content_type().as_ref().map(|s| s.to_string()),
                delivery_mode: *p.delivery_mode(),
                body: serde_json::from_slice(&m.delivery.data).unwrap(),
            });
        }
    }

    /// Drains until `done` holds for what was seen, for up to [`PATIENCE`].
    pub(crate) async fn until(&mut self, what: &str, done: impl Fn(&[Received]) -> bool) {
        let started = Instant::now();
        loop {
            self.drain().await;
            if done(&self.seen) {
                return;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "{what}: not within {PATIENCE:?}; seen {:?}",
                self.seen
                    .iter()
                    .map(|m| (&m.routing_key, &m.message_id))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The envelope messages' sequence numbers, in arrival order.
    pub(crate) fn envelope_seqs(&self) -> Vec<i64> {
        self.seen
            .iter()
            .filter(|m| m.routing_key.starts_with("shers.event."))
            .map(|m| m.body["seq"].as_i64().unwrap())
            .collect()
    }
}

/// Every sequence number from 1 to `head` was seen on `shers.event.*`.
pub(crate) fn covers(seen: &[Received], head: i64) -> bool {
    let seqs: BTreeSet<i64> = seen
        .iter()
        .filter(|m| m.routing_key.starts_with("shers.event."))
        .filter_map(|m| m.body["seq"].as_i64())
        .collect();
    (1..=head).all(|s| seqs.contains(&s))
}

both_backends!(
    the_lifecycle_reaches_shers_keys_and_every_event_its_own,
    a_restart_carries_on_from_the_stored_cursor,
    the_cursor_only_moves_forwards
);

async fn the_cursor_only_moves_forwards(backend: Backend) {
    let db = crate::helpers::TestDb::new(backend).await;
    let pool = db.migrated().await;
    let mut conn = pool.conn().await.unwrap();
    let now = chrono::Utc::now();
    assert_eq!(cursors::read(&mut conn, "amqp").await.unwrap(), 0);
    assert!(cursors::advance(&mut conn, "amqp", 5, now).await.unwrap());
    assert!(!cursors::advance(&mut conn, "amqp", 3, now).await.unwrap());
    assert!(!cursors::advance(&mut conn, "amqp", 5, now).await.unwrap());
    assert_eq!(cursors::read(&mut conn, "amqp").await.unwrap(), 5);
    assert!(cursors::advance(&mut conn, "amqp", 9, now).await.unwrap());
    assert_eq!(cursors::read(&mut conn, "amqp").await.unwrap(), 9);
    // Cursors are independent of each other.
    assert_eq!(cursors::read(&mut conn, "other").await.unwrap(), 0);
}

const SCENE: (f64, f64) = (51.5000, -0.1200);

/// A wearer with insurance (`member`: a member id ending in 0 is declined by the sandbox).
async fn wearer(app: &TestApp, patient: &str, device: &str, member: &str) {
    let resp = app
        .create_patient(
            Role::Admin,
            &json!({"id": patient, "name": "Relay Patient",
                    "home_location": {"lat": SCENE.0, "lng": SCENE.1},
                    "insurance": {"provider": "Acme Health", "member_id": member},
                    "next_of_kin": [{"name": "Kin", "email": "kin@example.org"}]}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = app
        .create_policy(
            Role::Admin,
            &json!({"patient_id": patient, "provider": "Acme Health", "member_id": member,
                    "coverage_cents": 10_000}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = app
        .create_device(
            Role::Admin,
            &json!({"id": device, "patient_id": patient, "model": "test-watch"}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
}

/// An emergency from `device`'s reading to its close, as the crew of `unit` reports it.
/// Returns the incident id and the accepted offer id.
async fn emergency(app: &TestApp, patient: &str, device: &str, unit: &str) -> (String, String) {
    let reading = json!({"device_id": device, "timestamp": chrono::Utc::now().to_rfc3339(),
                         "heart_rate_bpm": 165, "spo2_pct": 86,
                         "location": {"lat": SCENE.0, "lng": SCENE.1}});
    let resp = app.post_vitals(&reading).await;
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let id: String = eventually("the wearable's incident", || async {
        let list: Value = app
            .list_incidents("", Role::Console)
            .await
            .json()
            .await
            .ok()?;
        list["items"]
            .as_array()?
            .iter()
            .find(|i| i["patient_id"] == patient && i["status"] != "closed")
            .and_then(|i| i["id"].as_str().map(str::to_owned))
    })
    .await;
    let incident = app
        .wait_incident(&id, |i| {
            i["offers"]
                .as_array()
                .is_some_and(|o| o.iter().any(|o| o["status"] == "pending"))
        })
        .await;
    let offer = incident["offers"][0]["id"].as_str().unwrap().to_owned();
    let token = app.crew_token(unit).await;
    assert_eq!(
        app.accept_offer(&token, &offer).await.status(),
        StatusCode::OK
    );
    for s in ["enroute", "on_scene", "transporting", "at_hospital"] {
        let resp = app.unit_status(&token, unit, s).await;
        assert_eq!(resp.status(), StatusCode::OK, "{s}");
    }
    app.wait_incident(&id, |i| i["status"] == "closed").await;
    eventually("the unit available again", || async {
        let unit: Value = app.unit(unit, Role::Console).await.json().await.ok()?;
        (unit["status"] == "available").then_some(())
    })
    .await;
    (id, offer)
}

/// The one message on `key` correlated with `incident`.
fn one<'a>(seen: &'a [Received], key: &str, incident: &str) -> &'a Received {
    let found: Vec<&Received> = seen
        .iter()
        .filter(|m| m.routing_key == key && m.correlation_id.as_deref() == Some(incident))
        .collect();
    assert_eq!(found.len(), 1, "{key} for {incident}: {found:?}");
    found[0]
}

fn is_iso_z(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(s).is_ok())
}

async fn the_lifecycle_reaches_shers_keys_and_every_event_its_own(backend: Backend) {
    let Some(url) = amqp_url() else {
        return;
    };
    let mut tap = Tap::new(&url, "lifecycle").await;
    let app = TestApp::builder(backend)
        .with_settings(|s| {
            tap.configure(&url, s);
            s.payments.provider = PaymentProvider::Sandbox;
        })
        .start()
        .await;
    app.add_unit("R1", SCENE.0 + 0.002, SCENE.1, "als").await;
    let resp = app
        .create_hospital(
            Role::Admin,
            &json!({"id": "h1", "name": "General", "capacity": 3,
                    "location": {"lat": SCENE.0 + 0.05, "lng": SCENE.1}}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    wearer(&app, "rp-paid", "rw-paid", "M-PAID-1").await;
    wearer(&app, "rp-declined", "rw-declined", "M-DECL-0").await;
    let (paid, offer) = emergency(&app, "rp-paid", "rw-paid", "R1").await;
    let (declined, _) = emergency(&app, "rp-declined", "rw-declined", "R1").await;

    // Everything stored so far reaches the exchange.
    let stored = {
        let mut conn = app.db.conn().await.unwrap();
        events::read_since(&mut conn, 0, 100_000).await.unwrap()
    };
    let head = stored.last().unwrap().seq;
    tap.until("every stored event and both billing outcomes", |seen| {
        covers(seen, head)
            && seen.iter().any(|m| m.routing_key == "event.billing.failed")
            && seen
                .iter()
                .any(|m| m.routing_key == "event.billing.completed")
    })
    .await;

    // Every event on shers.event.<kind>, in sequence order, once (nothing failed here), with
    // the envelope /api/v1/events shows and the contract's properties.
    let seqs = tap.envelope_seqs();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
    let page: Value = app
        .events_page(Some(0), Some(1000), Role::Console)
        .await
        .json()
        .await
        .unwrap();
    let by_seq: HashMap<i64, &Value> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["seq"].as_i64().unwrap(), e))
        .collect();
    for m in tap
        .seen
        .iter()
        .filter(|m| m.routing_key.starts_with("shers.event."))
    {
        let seq = m.body["seq"].as_i64().unwrap();
        if seq > head {
            continue;
        }
        assert_eq!(&m.body, by_seq[&seq], "envelope of {seq}");
        assert_eq!(
            m.routing_key,
            format!("shers.event.{}", m.body["kind"].as_str().unwrap())
        );
        assert_eq!(
            m.message_id.as_deref(),
            Some(format!("shers-{seq}").as_str())
        );
        assert_eq!(m.correlation_id.as_deref(), m.body["incident_id"].as_str());
    }
    for m in &tap.seen {
        assert_eq!(m.app_id.as_deref(), Some("shers"), "{m:?}");
        assert_eq!(m.content_type.as_deref(), Some("application/json"), "{m:?}");
        assert_eq!(m.delivery_mode, Some(2), "{m:?}");
        assert!(!m.routing_key.starts_with("cmd."), "{m:?}");
    }

    // SHERS's keys, with SHERS's fields.
    let copy_id = |m: &Received| {
        let id = m.message_id.clone().unwrap();
        let (seq, key) = id
            .strip_prefix("shers-")
            .and_then(|rest| rest.split_once('-'))
            .unwrap();
        assert_eq!(key, m.routing_key, "{id}");
        seq.parse::<i64>().unwrap()
    };
    let triage: Vec<&Received> = tap
        .seen
        .iter()
        .filter(|m| m.routing_key == "triage.status.emergency")
        .filter(|m| m.body["patient_id"] == "rp-paid")
        .collect();
    assert_eq!(triage.len(), 1, "{triage:?}");
    let t = &triage[0].body;
    assert_eq!(t["type"], "TriageStatus");
    assert_eq!(t["status"], "emergency");
    assert_eq!(t["previous_status"], "normal");
    assert_eq!(t["metrics"]["heartRateBpm"], 165.0);
    assert_eq!(t["metrics"]["spO2Percentage"], 86.0);
    assert_eq!(t["location"], json!({"lat": SCENE.0, "lng": SCENE.1}));
    assert!(t["timestamp"].is_i64(), "{t}");
    assert!(
        stored
            .iter()
            .any(|e| e.seq == copy_id(triage[0]) && e.kind == "vitals.status_changed")
    );

    let assigned = one(&tap.seen, "event.dispatch.unit_assigned", &paid);
    let a = &assigned.body;
    assert_eq!(a["incident_id"], paid.as_str());
    assert_eq!(a["dispatch_id"], offer.as_str());
    assert_eq!(a["patient_id"], "rp-paid");
    assert_eq!(a["unit_id"], "R1");
    assert_eq!(a["status"], "unit_assigned");
    assert_eq!(a["location"], json!({"lat": SCENE.0, "lng": SCENE.1}));
    assert!(a["eta_minutes"].is_u64(), "{a}");
    assert!(is_iso_z(&a["ts"]), "{a}");
    assert!(
        stored
            .iter()
            .any(|e| e.seq == copy_id(assigned) && e.kind == "dispatch.assigned")
    );

    let enroute = &one(&tap.seen, "event.dispatch.enroute", &paid).body;
    assert_eq!(enroute["status"], "enroute");
    assert_eq!(enroute["dispatch_id"], offer.as_str());
    assert_eq!(enroute["unit_id"], "R1");
    assert_eq!(enroute["patient_id"], "rp-paid");
    assert!(is_iso_z(&enroute["ts"]), "{enroute}");
    let onboard = &one(&tap.seen, "event.dispatch.patient_onboard", &paid).body;
    assert_eq!(onboard["status"], "onboard");
    assert_eq!(onboard["ambulance_id"], "R1");
    assert!(is_iso_z(&onboard["onboard_time"]), "{onboard}");
    let arrived = &one(&tap.seen, "event.dispatch.arrived_at_hospital", &paid).body;
    assert_eq!(arrived["status"], "arrived");
    assert_eq!(arrived["hospital_id"], "h1");
    assert_eq!(arrived["dest_hospital_id"], "h1");
    assert_eq!(arrived["ambulance_id"], "R1");
    assert!(is_iso_z(&arrived["arrival_time"]), "{arrived}");

    let invoice: Value = app
        .invoice(&paid, Role::Console)
        .await
        .json()
        .await
        .unwrap();
    let completed = &one(&tap.seen, "event.billing.completed", &paid).body;
    assert_eq!(completed["status"], "COMPLETED");
    assert_eq!(completed["billing_id"], invoice["id"]);
    assert_eq!(completed["patient_id"], "rp-paid");
    assert_eq!(
        completed["amount"].as_f64().unwrap(),
        invoice["amount_cents"].as_f64().unwrap() / 100.0
    );
    assert!(is_iso_z(&completed["timestamp"]), "{completed}");
    assert!(completed.get("error").is_none(), "{completed}");
    let failed = &one(&tap.seen, "event.billing.failed", &declined).body;
    assert_eq!(failed["status"], "CANCELLED");
    assert_eq!(failed["patient_id"], "rp-declined");
    assert!(failed["error"].is_string(), "{failed}");
    assert!(
        tap.seen
            .iter()
            .all(|m| m.routing_key != "event.billing.completed"
                || m.correlation_id.as_deref() != Some(declined.as_str()))
    );
    // The relay's cursor reached the head.
    eventually("the cursor at the head", || async {
        let mut conn = app.db.conn().await.unwrap();
        let at = cursors::read(&mut conn, "amqp").await.unwrap();
        (at >= head).then_some(())
    })
    .await;
    // Its metrics are on /metrics.
    let metrics = app
        .get(api::METRICS, Some(Role::Admin))
        .await
        .text()
        .await
        .unwrap();
    for name in [
        "shers_amqp_published_total",
        "shers_amqp_relay_lag_events",
        "shers_amqp_relay_lag_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

async fn a_restart_carries_on_from_the_stored_cursor(backend: Backend) {
    let Some(url) = amqp_url() else {
        return;
    };
    let mut tap = Tap::new(&url, "restart").await;
    let builder = |tap: &Tap| TestApp::builder(backend).with_settings(|s| tap.configure(&url, s));
    let app = builder(&tap).start().await;
    app.register_wearer("rs-1", "rs-w1").await;
    app.register_wearer("rs-2", "rs-w2").await;
    let created: Value = app
        .create_incident(Role::Console, &json!({"patient_id": "rs-1"}))
        .await
        .json()
        .await
        .unwrap();
    let resp = app
        .cancel_incident(created["id"].as_str().unwrap(), Role::Console, "test")
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    // Quiet: the cancelled incident stores nothing more.
    let head = eventually("a quiet store", || async {
        let mut conn = app.db.conn().await.unwrap();
        let a = events::last_seq(&mut conn).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let b = events::last_seq(&mut conn).await.unwrap();
        (a == b).then_some(b)
    })
    .await;
    assert!(head > 0);
    tap.until("the first process's events", |seen| covers(seen, head))
        .await;
    eventually("the cursor stored at the head", || async {
        let mut conn = app.db.conn().await.unwrap();
        (cursors::read(&mut conn, "amqp").await.unwrap() >= head).then_some(())
    })
    .await;
    let before = tap.seen.len();
    let db = app.kill().await;

    let app = builder(&tap).start_on(db).await;
    let resp = app
        .create_incident(Role::Console, &json!({"patient_id": "rs-2"}))
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let head2 = {
        let mut conn = app.db.conn().await.unwrap();
        events::last_seq(&mut conn).await.unwrap()
    };
    assert!(head2 > head);
    tap.until("the second process's events", |seen| covers(seen, head2))
        .await;
    // Let a flood, if there were one, arrive.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tap.drain().await;
    let after: Vec<i64> = tap.seen[before..]
        .iter()
        .filter(|m| m.routing_key.starts_with("shers.event."))
        .map(|m| m.body["seq"].as_i64().unwrap())
        .collect();
    assert!(
        after.iter().all(|s| *s > head),
        "the restarted relay published again what its cursor had passed: {after:?}"
    );
    let ids: Vec<&str> = tap
        .seen
        .iter()
        .filter_map(|m| m.message_id.as_deref())
        .collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "a message was published twice");
}
