//! RabbitMQ ingest, against a real broker: SHERS's `wearable.data` messages become readings,
//! what can never apply is dead-lettered once, and a reading delivered twice changes nothing.
//!
//! Each test declares its own exchange and queue prefix (a random suffix), so tests never meet
//! each other or other users of the broker, and deletes them at the end.

use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use shers::config::Secret;
use shers::domain::auth::Role;
use shers::persistence::Backend;

use crate::both_backends;
use crate::helpers::{TestApp, api, eventually};

both_backends!(
    a_wearable_data_message_opens_an_incident_a_crew_is_offered,
    what_can_never_apply_is_dead_lettered_once,
    a_redelivered_reading_changes_nothing,
);

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The broker the tests use, or `None` (skipped) when there is none outside CI.
pub(crate) async fn broker() -> Option<String> {
    if std::env::var("SHERS_TEST_SKIP_AMQP").is_ok_and(|v| v == "1") {
        assert!(!ci(), "CI=true but SHERS_TEST_SKIP_AMQP=1");
        eprintln!("SKIPPED: AMQP test (SHERS_TEST_SKIP_AMQP=1)");
        return None;
    }
    let url = std::env::var("SHERS_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    match Connection::connect(&url, ConnectionProperties::default()).await {
        Ok(c) => {
            let _ = c.close(200, "probe".into()).await;
            Some(url)
        }
        Err(e) => {
            assert!(!ci(), "CI=true and RabbitMQ is unreachable: {e}");
            eprintln!("SKIPPED: AMQP test, broker unreachable ({e}); run scripts/test.sh");
            None
        }
    }
}

/// A channel in confirm mode: a publish is done when the broker has taken the message (for a
/// persistent one on a durable queue, written it to disk), as a wearable service publishes.
async fn confirming(connection: &Connection) -> Channel {
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    channel
}

/// A test's own names on the broker and a channel to it.
pub(crate) struct Bus {
    pub url: String,
    pub exchange: String,
    pub prefix: String,
    pub channel: Channel,
    connection: Connection,
}

impl Bus {
    pub async fn new(url: String) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let connection = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = confirming(&connection).await;
        Self {
            url,
            exchange: format!("t.amqp.topic.{suffix}"),
            prefix: format!("t.{suffix}"),
            channel,
            connection,
        }
    }

    /// A new connection to the same broker and names (after the broker restarted).
    pub async fn reopen(&self) -> Self {
        let connection = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = confirming(&connection).await;
        Self {
            url: self.url.clone(),
            exchange: self.exchange.clone(),
            prefix: self.prefix.clone(),
            channel,
            connection,
        }
    }

    /// Points `settings` at this test's exchange and queues, ingest only.
    pub fn configure(&self, s: &mut shers::config::Settings) {
        s.amqp.url = Some(Secret::new(self.url.clone()));
        s.amqp.exchange = self.exchange.clone();
        s.amqp.queue_prefix = self.prefix.clone();
        s.amqp.publish = false;
    }

    /// Publishes `body` on `wearable.data` as SHERS's wearable service does (persistent, JSON).
    pub async fn publish(&self, body: &[u8]) {
        let confirmation = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                "wearable.data".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            confirmation.is_ack(),
            "the broker refused a message: {confirmation:?}"
        );
    }

    /// Messages ready in `queue` (declared passively: it must exist).
    pub async fn depth(&self, queue: &str) -> (u32, u32) {
        let q = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        (q.message_count(), q.consumer_count())
    }

    /// Takes every message from `queue` now.
    pub async fn drain(&self, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
        let mut out = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            out.push(m);
        }
        out
    }

    pub fn ingest_queue(&self) -> String {
        format!("{}.q.wearable-data", self.prefix)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.q.dead-letter", self.prefix)
    }

    /// Deletes what SHERS and the test declared.
    pub async fn clean(self) {
        for q in [self.ingest_queue(), self.dead_letter_queue()] {
            let _ = self
                .channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for x in [self.exchange.clone(), format!("{}.dlx", self.prefix)] {
            let _ = self
                .channel
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// Waits until the app's `/readyz` says RabbitMQ is connected (its queue is bound and
/// consumed from then on).
pub(crate) async fn until_connected(app: &TestApp) {
    eventually("the AMQP consumer to connect", || async {
        let body: Value = app.get(api::READYZ, None).await.json().await.ok()?;
        (body["amqp"] == "connected").then_some(())
    })
    .await;
}

/// The first `x-death` record's reason and queue.
fn death(properties: &BasicProperties) -> (String, String) {
    use lapin::types::AMQPValue;
    let text = |v: Option<&AMQPValue>| match v {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("not a string: {other:?}"),
    };
    let headers = properties.headers().as_ref().expect("headers");
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("no x-death header: {headers:?}");
    };
    let Some(AMQPValue::FieldTable(first)) = deaths.as_slice().first() else {
        panic!("empty x-death: {deaths:?}");
    };
    (
        text(first.inner().get("reason")),
        text(first.inner().get("queue")),
    )
}

pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A message as SHERS's wearable service publishes it (interop.md §1).
pub(crate) fn shers_wearable(patient: &str, device: &str, at_ms: i64, emergency: bool) -> Vec<u8> {
    let metrics = if emergency {
        json!({"heartRateBpm": 172, "spO2Percentage": 86.5, "respirationRateBpm": 27,
               "bodyTemperatureCelsius": 36.6, "stepsSinceLastReading": 0})
    } else {
        json!({"heartRateBpm": 72, "spO2Percentage": 98.1, "respirationRateBpm": 14,
               "bodyTemperatureCelsius": 36.8, "stepsSinceLastReading": 12})
    };
    serde_json::to_vec_pretty(&json!({
        "patient_id": patient,
        "device": {"id": device, "model": "HealthTracker v1"},
        "location": {"lat": 51.5003, "lng": -0.1201},
        "schemaVersion": "1.0",
        "timestamp": at_ms,
        "metrics": metrics,
    }))
    .unwrap()
}

pub(crate) async fn create_patient(app: &TestApp, id: &str) {
    let resp = app
        .create_patient(
            Role::Admin,
            &json!({"id": id, "name": "Bus Patient",
                    "home_location": {"lat": 51.5, "lng": -0.12},
                    "next_of_kin": [{"name": "Kin", "phone": "+447700900123"}]}),
        )
        .await;
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
}

/// The incidents of `patient`, as the console lists them.
async fn incidents_of(app: &TestApp, patient: &str) -> Vec<Value> {
    let body: Value = app
        .list_incidents("", Role::Console)
        .await
        .json()
        .await
        .unwrap();
    body["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i["patient_id"] == patient)
        .collect()
}

async fn a_wearable_data_message_opens_an_incident_a_crew_is_offered(backend: Backend) {
    let Some(url) = broker().await else { return };
    let bus = Bus::new(url).await;
    let app = TestApp::builder(backend)
        .with_settings(|s| bus.configure(s))
        .start()
        .await;
    until_connected(&app).await;
    app.add_unit("U1", 51.505, -0.12, "als").await;
    // The patient exists; the device does not yet: SHERS binds it to the message's patient.
    create_patient(&app, "bus-p1").await;

    bus.publish(&shers_wearable("bus-p1", "bus-w1", now_ms(), true))
        .await;

    let incident = eventually("an incident for the wearer", || async {
        incidents_of(&app, "bus-p1").await.into_iter().next()
    })
    .await;
    let id = incident["id"].as_str().unwrap().to_owned();
    let incident = app
        .wait_incident(&id, |i| {
            i["offers"]
                .as_array()
                .is_some_and(|o| o.iter().any(|o| o["unit_id"] == "U1"))
        })
        .await;
    assert_eq!(incident["patient_id"], "bus-p1");
    // The device is now the patient's; its status change is stored once the incident exists.
    let device = eventually("the device's emergency stored", || async {
        let mut conn = app.db.conn().await.ok()?;
        let state = shers::persistence::patients::find_device(&mut conn, &"bus-w1".into())
            .await
            .ok()??;
        (state.last_status.as_deref() == Some("emergency")).then_some(state)
    })
    .await;
    assert_eq!(device.device.patient_id.as_str(), "bus-p1");
    // Acknowledged: nothing left in the queue, nothing dead-lettered.
    eventually("the delivery to be acknowledged", || async {
        (bus.depth(&bus.ingest_queue()).await.0 == 0).then_some(())
    })
    .await;
    assert_eq!(bus.depth(&bus.dead_letter_queue()).await.0, 0);
    bus.clean().await;
}

async fn what_can_never_apply_is_dead_lettered_once(backend: Backend) {
    let Some(url) = broker().await else { return };
    let bus = Bus::new(url).await;
    let app = TestApp::builder(backend)
        .with_settings(|s| bus.configure(s))
        .start()
        .await;
    until_connected(&app).await;
    create_patient(&app, "bus-p1").await;
    app.register_wearer("bus-p2", "bus-w2").await;
    let t = now_ms();

    // Not JSON; an unknown patient (and device); a device claimed by another patient; a
    // reading out of every range; and one good message among them.
    let bad: [(&str, Vec<u8>); 4] = [
        ("invalid_body", b"{\"patient_id\": ".to_vec()),
        (
            "unknown_patient",
            shers_wearable("nobody", "bus-w9", t, false),
        ),
        (
            "device_claimed",
            shers_wearable("bus-p1", "bus-w2", t, false),
        ),
        (
            "invalid",
            serde_json::to_vec(&json!({
                "patient_id": "bus-p1", "device": {"id": "bus-w1"}, "schemaVersion": "1.0",
                "timestamp": t, "metrics": {"heartRateBpm": 900}}))
            .unwrap(),
        ),
    ];
    for (_, body) in &bad {
        bus.publish(body).await;
    }
    bus.publish(&shers_wearable("bus-p1", "bus-w1", t, false))
        .await;

    eventually("every bad message dead-lettered", || async {
        let (ready, _) = bus.depth(&bus.dead_letter_queue()).await;
        (ready as usize >= bad.len()).then_some(())
    })
    .await;
    // Give a redelivery loop the time to show itself: none comes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let messages = bus.drain(&bus.dead_letter_queue()).await;
    assert_eq!(messages.len(), bad.len(), "each dead-lettered exactly once");
    let mut bodies: Vec<&[u8]> = messages
        .iter()
        .map(|m| m.delivery.data.as_slice())
        .collect();
    for (reason, body) in &bad {
        let at = bodies
            .iter()
            .position(|b| b == body)
            .unwrap_or_else(|| panic!("the {reason} message was not dead-lettered as sent"));
        bodies.remove(at);
    }
    // The broker records why: rejected by SHERS's consumer, from SHERS's queue.
    for m in &messages {
        let (reason, queue) = death(&m.delivery.properties);
        assert_eq!(reason, "rejected");
        assert_eq!(queue, bus.ingest_queue());
    }
    assert_eq!(
        bus.depth(&bus.ingest_queue()).await.0,
        0,
        "nothing requeued"
    );
    // The good one was applied, and bound its device; the refused ones bound nothing.
    let mut conn = app.db.conn().await.unwrap();
    let device = shers::persistence::patients::find_device(&mut conn, &"bus-w1".into())
        .await
        .unwrap()
        .expect("the good message's device was bound");
    assert_eq!(device.device.patient_id.as_str(), "bus-p1");
    let stranger = shers::persistence::patients::find_device(&mut conn, &"bus-w9".into())
        .await
        .unwrap();
    assert!(
        stranger.is_none(),
        "a device was bound to an unknown patient"
    );
    // Each reason counted.
    let metrics = app
        .get(api::METRICS, Some(Role::Admin))
        .await
        .text()
        .await
        .unwrap();
    for (reason, _) in &bad {
        assert!(
            metrics.contains(&format!("shers_amqp_rejected_total{{reason=\"{reason}\"}}")),
            "{reason} not counted"
        );
    }
    bus.clean().await;
}

async fn a_redelivered_reading_changes_nothing(backend: Backend) {
    let Some(url) = broker().await else { return };
    let bus = Bus::new(url).await;
    let app = TestApp::builder(backend)
        .with_settings(|s| bus.configure(s))
        .start()
        .await;
    until_connected(&app).await;
    app.add_unit("U1", 51.505, -0.12, "als").await;
    create_patient(&app, "bus-p1").await;
    let body = shers_wearable("bus-p1", "bus-w1", now_ms(), true);
    bus.publish(&body).await;
    let incident = eventually("an incident for the wearer", || async {
        incidents_of(&app, "bus-p1").await.into_iter().next()
    })
    .await;
    // The status change is stored once the incident exists, and the delivery acknowledged
    // once both are.
    eventually("the first delivery acknowledged", || async {
        let (ready, _) = bus.depth(&bus.ingest_queue()).await;
        let stored = app.events_of("vitals.status_changed").await.len();
        (ready == 0 && stored == 1).then_some(())
    })
    .await;
    let changes = app.events_of("vitals.status_changed").await.len();
    // The same message again, as the broker redelivers it after a crash before the ack.
    bus.publish(&body).await;
    eventually("the repeat acknowledged", || async {
        (bus.depth(&bus.ingest_queue()).await.0 == 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.events_of("vitals.status_changed").await.len(), changes);
    let incidents = incidents_of(&app, "bus-p1").await;
    assert_eq!(incidents.len(), 1, "one incident: {incidents:?}");
    assert_eq!(incidents[0]["id"], incident["id"]);
    assert_eq!(bus.depth(&bus.dead_letter_queue()).await.0, 0);
    bus.clean().await;
}
