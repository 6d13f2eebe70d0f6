//! The MQTT edge against a real broker: readings triaged (an emergency opens its incident),
//! refusals on the error topic as problem+json with pointers, repeats changing nothing, the
//! `offline` status, and a private Mosquitto running the shipped ACL.
//!
//! The broker is `SHERS_TEST_MQTT_URL` (default `mqtt://127.0.0.1:1883`, anonymous); each test
//! uses a topic prefix of its own. `SHERS_TEST_SKIP_MQTT=1` skips them (never in CI).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use reqwest::StatusCode;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS, SubscribeReasonCode};
use serde_json::{Value, json};
use shers::actors::device::Lookup;
use shers::config::Secret;
use shers::domain::ids::DeviceId;
use shers::persistence::Backend;
use tokio::sync::mpsc;

use crate::both_backends;
use crate::helpers::{PATIENCE, TestApp, api, eventually};

both_backends!(
    mqtt_readings_are_triaged_and_a_repeat_changes_nothing,
    mqtt_refusals_arrive_on_the_error_topic_with_pointers,
    mqtt_offline_status_records_device_offline_at_once,
    a_private_mosquitto_with_the_shipped_acl_keeps_devices_to_their_own_topics,
);

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The shared broker's URL, or `None` (with a message) when MQTT tests are skipped: asked to,
/// or no broker listens there outside CI.
pub(crate) fn broker() -> Option<String> {
    if std::env::var("SHERS_TEST_SKIP_MQTT").is_ok_and(|v| v == "1") {
        assert!(!ci(), "CI=true but SHERS_TEST_SKIP_MQTT=1");
        eprintln!("SKIPPED: MQTT test (SHERS_TEST_SKIP_MQTT=1)");
        return None;
    }
    let url =
        std::env::var("SHERS_TEST_MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".to_owned());
    let parsed = url::Url::parse(&url).unwrap();
    let address = (
        parsed.host_str().unwrap_or("127.0.0.1").to_owned(),
        parsed.port().unwrap_or(1883),
    );
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&address)
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    if !reachable {
        assert!(!ci(), "CI=true and no MQTT broker listens at {url}");
        eprintln!("SKIPPED: MQTT test, no broker at {url}; run scripts/test.sh");
        return None;
    }
    Some(url)
}

pub(crate) fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn ts(offset_s: i64) -> String {
    (Utc::now() - chrono::Duration::seconds(600) + chrono::Duration::seconds(offset_s))
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(crate) fn normal(device: &str, t: i64) -> Value {
    json!({"device_id": device, "timestamp": ts(t), "heart_rate_bpm": 72, "spo2_pct": 98,
           "respiration_rate_bpm": 14, "body_temp_c": 36.8})
}

fn emergency(device: &str, t: i64) -> Value {
    json!({"device_id": device, "timestamp": ts(t), "heart_rate_bpm": 165, "spo2_pct": 86,
           "location": {"lat": 51.51, "lng": -0.13}})
}

/// A test's own MQTT client (a device, or anyone), its packets forwarded to a channel.
pub(crate) struct Client {
    client: AsyncClient,
    packets: mpsc::UnboundedReceiver<Packet>,
}

impl Client {
    /// Connects to `url` as `id` (with `login`), clean session; waits for the CONNACK.
    pub(crate) async fn connect(url: &str, id: &str, login: Option<(&str, &str)>) -> Self {
        let mut options = MqttOptions::parse_url(format!("{url}?client_id={id}")).unwrap();
        options.set_keep_alive(Duration::from_secs(5));
        if let Some((user, password)) = login {
            options.set_credentials(user, password);
        }
        let (client, mut events) = AsyncClient::new(options, 64);
        let (tx, packets) = mpsc::unbounded_channel();
        actix_web::rt::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(packet)) => {
                        if tx.send(packet).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => actix_web::rt::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let mut me = Self { client, packets };
        me.next(|p| matches!(p, Packet::ConnAck(_)), PATIENCE)
            .await
            .expect("no CONNACK");
        me
    }

    /// The next packet `pick` wants, within `within`.
    async fn next(&mut self, pick: impl Fn(&Packet) -> bool, within: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.packets.recv()).await {
                Ok(Some(p)) if pick(&p) => return Some(p),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Subscribes to `filter` at QoS 1; what the broker granted.
    pub(crate) async fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        match self
            .next(|p| matches!(p, Packet::SubAck(_)), PATIENCE)
            .await
        {
            Some(Packet::SubAck(ack)) => ack.return_codes[0],
            other => panic!("no SUBACK: {other:?}"),
        }
    }

    pub(crate) async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// The next message on `topic`, within `within`.
    pub(crate) async fn message_on(&mut self, topic: &str, within: Duration) -> Option<Publish> {
        match self
            .next(
                |p| matches!(p, Packet::Publish(m) if m.topic == topic),
                within,
            )
            .await
        {
            Some(Packet::Publish(m)) => Some(m),
            _ => None,
        }
    }

    /// The next problem published on `topic`, as JSON.
    async fn problem_on(&mut self, topic: &str) -> Value {
        let message = self
            .message_on(topic, PATIENCE)
            .await
            .unwrap_or_else(|| panic!("no problem on {topic} within {PATIENCE:?}"));
        serde_json::from_slice(&message.payload).unwrap()
    }
}

/// Waits until SHERS answers on `prefix`: a body that is not JSON, published for `probe` again
/// and again, until its refusal comes back on `probe`'s error topic (`client` subscribed to
/// it). Until SHERS has subscribed, the broker drops what is published.
pub(crate) async fn until_shers_listens(client: &mut Client, prefix: &str, probe: &str) {
    let started = std::time::Instant::now();
    loop {
        client
            .publish(&format!("{prefix}/{probe}/vitals"), "probe: not JSON")
            .await;
        let error = format!("{prefix}/{probe}/error");
        if client
            .message_on(&error, Duration::from_millis(500))
            .await
            .is_some()
        {
            return;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "SHERS never subscribed to {prefix}"
        );
    }
}

/// A SHERS server taking MQTT from `url` under `prefix`.
async fn shers_on(backend: Backend, url: &str, prefix: &str) -> TestApp {
    let (url, prefix) = (url.to_owned(), prefix.to_owned());
    TestApp::builder(backend)
        .with_settings(move |s| {
            s.mqtt.url = Some(Secret::new(url));
            s.mqtt.topic_prefix = prefix;
            s.mqtt.client_id = Some(format!("shers-test-{}", unique()));
        })
        .start()
        .await
}

async fn messages_of(app: &TestApp, device: &str) -> u64 {
    let Some((addr, _)) = app
        .devices
        .send(Lookup(DeviceId::from(device)))
        .await
        .unwrap()
    else {
        return 0;
    };
    shers::actors::device::inspect(&addr)
        .await
        .map_or(0, |i| i.messages)
}

async fn mqtt_readings_are_triaged_and_a_repeat_changes_nothing(backend: Backend) {
    let Some(url) = broker() else { return };
    let prefix = format!("shers-test/{}", unique());
    let app = shers_on(backend, &url, &prefix).await;
    app.register_wearer("p-1", "watch-1").await;
    let mut device = Client::connect(&url, &format!("watch-1-{}", unique()), None).await;
    device.subscribe(&format!("{prefix}/+/error")).await;
    until_shers_listens(&mut device, &prefix, "probe").await;

    let reading = emergency("watch-1", 0).to_string();
    let topic = format!("{prefix}/watch-1/vitals");
    device.publish(&topic, reading.clone()).await;
    let created = eventually("the incident an MQTT reading opens", || async {
        let created = app.events_of("incident.created").await;
        (!created.is_empty()).then_some(created)
    })
    .await;
    assert_eq!(created[0].data["patient_id"], "p-1");
    assert_eq!(created[0].data["source"], "wearable");
    assert_eq!(created[0].data["location"]["lat"], 51.51);
    // The status change is stored once its incident exists.
    let changes = eventually("the status change stored", || async {
        let changes = app.events_of("vitals.status_changed").await;
        (!changes.is_empty()).then_some(changes)
    })
    .await;
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].device_id.as_deref(), Some("watch-1"));
    assert_eq!(changes[0].data["to"], "emergency");

    // The same message again, as the broker redelivers one whose PUBACK was lost: applied to
    // the device, and nothing changes.
    device.publish(&topic, reading).await;
    eventually("the repeated reading reaches its device", || async {
        (messages_of(&app, "watch-1").await >= 2).then_some(())
    })
    .await;
    assert_eq!(app.events_of("vitals.status_changed").await.len(), 1);
    assert_eq!(app.events_of("incident.created").await.len(), 1);
    let mut conn = app.db.conn().await.unwrap();
    let kept = shers::persistence::readings::count_for_device(&mut conn, &"watch-1".into())
        .await
        .unwrap();
    assert_eq!(kept, 1, "the repeat stored nothing");
    // Neither was refused.
    assert!(
        device
            .message_on(
                &format!("{prefix}/watch-1/error"),
                Duration::from_millis(300)
            )
            .await
            .is_none()
    );

    // /readyz shows the link without failing on it, and the counters exist.
    let resp = app.get(api::READYZ, None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["mqtt"] == "connected" || body["mqtt"] == "connecting",
        "{body}"
    );
    let metrics = app
        .get(api::METRICS, Some(shers::domain::auth::Role::Admin))
        .await
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("shers_mqtt_consumed_total"), "{metrics}");
    assert!(
        metrics.contains("shers_mqtt_rejected_total{reason=\"invalid_body\"}"),
        "{metrics}"
    );
}

async fn mqtt_refusals_arrive_on_the_error_topic_with_pointers(backend: Backend) {
    let Some(url) = broker() else { return };
    let prefix = format!("shers-test/{}", unique());
    let app = shers_on(backend, &url, &prefix).await;
    app.register_wearer("p-1", "w1").await;
    app.register_wearer("p-2", "w2").await;
    let mut device = Client::connect(&url, &format!("w1-{}", unique()), None).await;
    device.subscribe(&format!("{prefix}/+/error")).await;
    until_shers_listens(&mut device, &prefix, "probe").await;
    let (vitals, error) = (format!("{prefix}/w1/vitals"), format!("{prefix}/w1/error"));

    // Not JSON: the 400 SHERS answers over HTTP, with its pointer.
    device.publish(&vitals, "{\"device_id\": ").await;
    let problem = device.problem_on(&error).await;
    assert_eq!(problem["status"], 400, "{problem}");
    assert!(problem["type"].is_string() && problem["title"].is_string());
    assert!(problem["errors"][0]["pointer"].is_string(), "{problem}");

    // A reading naming another device than the topic's: refused, and not applied to w2.
    device
        .publish(&vitals, emergency("w2", 0).to_string())
        .await;
    let problem = device.problem_on(&error).await;
    assert_eq!(problem["status"], 422, "{problem}");
    assert_eq!(problem["errors"][0]["pointer"], "/device_id", "{problem}");

    // A batch with one bad reading: the others are applied, the bad one refused alone.
    let batch = json!({"readings": [
        normal("w1", 1),
        {"device_id": "w1", "timestamp": ts(2), "heart_rate_bpm": "fast"},
        emergency("w1", 3),
    ]});
    device.publish(&vitals, batch.to_string()).await;
    let problem = device.problem_on(&error).await;
    assert_eq!(problem["status"], 422, "{problem}");
    assert_eq!(
        problem["errors"],
        json!([{"pointer": "/readings/1/heart_rate_bpm",
                "message": problem["errors"][0]["message"]}]),
        "{problem}"
    );
    let changes = eventually("the batch's emergency applied", || async {
        let changes = app.events_of("vitals.status_changed").await;
        (!changes.is_empty()).then_some(changes)
    })
    .await;
    assert!(
        changes.iter().all(|c| c.device_id.as_deref() == Some("w1")),
        "the reading naming w2 was applied: {changes:?}"
    );
    assert_eq!(changes.last().unwrap().data["to"], "emergency");
    // One problem per refused reading: nothing more came for that batch.
    assert!(
        device
            .message_on(&error, Duration::from_millis(500))
            .await
            .is_none()
    );

    // An unknown status is refused too; a topic naming no valid device is acknowledged and
    // dropped (no error topic to answer on).
    device
        .publish(&format!("{prefix}/w1/status"), "sleepy")
        .await;
    let problem = device.problem_on(&error).await;
    assert_eq!(problem["status"], 422, "{problem}");
    device
        .publish(
            &format!("{prefix}/w 1/vitals"),
            normal("w 1", 4).to_string(),
        )
        .await;
    let metrics = eventually("the bad topic counted", || async {
        let metrics = app
            .get(api::METRICS, Some(shers::domain::auth::Role::Admin))
            .await
            .text()
            .await
            .unwrap();
        metrics
            .contains("shers_mqtt_rejected_total{reason=\"bad_topic\"}")
            .then_some(metrics)
    })
    .await;
    assert!(
        metrics.contains("shers_mqtt_rejected_total{reason=\"wrong_device\"}"),
        "{metrics}"
    );
}

async fn mqtt_offline_status_records_device_offline_at_once(backend: Backend) {
    let Some(url) = broker() else { return };
    let prefix = format!("shers-test/{}", unique());
    // The silence limit is far off: only the status can record it now.
    let app = {
        let (url, prefix) = (url.clone(), prefix.clone());
        TestApp::builder(backend)
            .with_settings(move |s| {
                s.mqtt.url = Some(Secret::new(url));
                s.mqtt.topic_prefix = prefix;
                s.mqtt.client_id = Some(format!("shers-test-{}", unique()));
                s.triage.device_offline_s = 3_600;
            })
            .start()
            .await
    };
    app.register_wearer("p-1", "w1").await;
    let mut device = Client::connect(&url, &format!("w1-{}", unique()), None).await;
    device.subscribe(&format!("{prefix}/+/error")).await;
    until_shers_listens(&mut device, &prefix, "probe").await;

    device
        .publish(&format!("{prefix}/w1/status"), "online")
        .await;
    device
        .publish(&format!("{prefix}/w1/vitals"), normal("w1", 0).to_string())
        .await;
    eventually("the reading applied", || async {
        (messages_of(&app, "w1").await >= 1).then_some(())
    })
    .await;
    assert!(app.events_of("device.offline").await.is_empty());

    // An unknown device's offline is ignored; w1's is recorded at once.
    device
        .publish(&format!("{prefix}/ghost/status"), "offline")
        .await;
    device
        .publish(&format!("{prefix}/w1/status"), "offline")
        .await;
    let offline = eventually("device.offline from the status", || async {
        let found = app.events_of("device.offline").await;
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert_eq!(offline.len(), 1);
    assert_eq!(offline[0].device_id.as_deref(), Some("w1"));
    assert_eq!(offline[0].data["patient_id"], "p-1");
    assert_eq!(offline[0].data["silent_s"], 0);
    assert!(offline[0].data["last_seen_at"].is_string());

    // Said again: recorded once. Heard again, then offline again: recorded again, without
    // waiting for the silence.
    device
        .publish(&format!("{prefix}/w1/status"), "offline")
        .await;
    // (Messages are applied concurrently: give the repeat its turn before the reading.)
    actix_web::rt::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.events_of("device.offline").await.len(), 1);
    device
        .publish(&format!("{prefix}/w1/vitals"), normal("w1", 5).to_string())
        .await;
    eventually("the device heard again", || async {
        let mut conn = app.db.conn().await.unwrap();
        let state = shers::persistence::patients::find_device(&mut conn, &"w1".into())
            .await
            .unwrap();
        state.and_then(|s| s.heard_at).map(|_| ())
    })
    .await;
    assert_eq!(app.events_of("device.offline").await.len(), 1);
    device
        .publish(&format!("{prefix}/w1/status"), "offline")
        .await;
    eventually("a second device.offline", || async {
        (app.events_of("device.offline").await.len() == 2).then_some(())
    })
    .await;
    assert!(
        device
            .message_on(&format!("{prefix}/w1/error"), Duration::from_millis(300))
            .await
            .is_none(),
        "online and offline are no refusals"
    );
}

/// Writes `lines` to `path`.
fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// A private Mosquitto on a free port: the shipped ACL, a password file made with
/// `mosquitto_passwd`, no anonymous clients, no persistence. Killed on drop.
struct PrivateBroker {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn binary(name: &str) -> String {
    for dir in [
        "/usr/sbin",
        "/usr/local/sbin",
        "/usr/bin",
        "/opt/homebrew/sbin",
    ] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path.display().to_string();
        }
    }
    name.to_owned()
}

impl PrivateBroker {
    fn start(users: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let acl = dir.path().join("acl");
        std::fs::copy(root.join("deploy/mosquitto/acl"), &acl).unwrap();
        let passwd = dir.path().join("passwd");
        write(&passwd, "");
        for (user, password) in users {
            let status = Command::new(binary("mosquitto_passwd"))
                .arg("-b")
                .arg(&passwd)
                .args([user, password])
                .status()
                .unwrap_or_else(|e| panic!("mosquitto_passwd (install mosquitto): {e}"));
            assert!(status.success(), "mosquitto_passwd failed");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.path().join("mosquitto.log");
        let conf = dir.path().join("mosquitto.conf");
        // Run as whoever runs the tests (as root, Mosquitto would switch to its own user, who
        // cannot read this directory).
        let user = std::env::var("USER").unwrap_or_else(|_| "root".to_owned());
        write(
            &conf,
            &format!(
                "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n\
                 acl_file {}\npersistence false\nuser {user}\nlog_dest file {}\nlog_type all\n",
                passwd.display(),
                acl.display(),
                log.display()
            ),
        );
        let child = Command::new(binary("mosquitto"))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("mosquitto (install mosquitto): {e}"));
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the private mosquitto did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

async fn a_private_mosquitto_with_the_shipped_acl_keeps_devices_to_their_own_topics(
    backend: Backend,
) {
    if broker().is_none() {
        return;
    }
    if Command::new(binary("mosquitto"))
        .arg("-h")
        .output()
        .is_err()
    {
        assert!(!ci(), "CI=true and mosquitto is not installed");
        eprintln!("SKIPPED: private Mosquitto test, mosquitto is not installed");
        return;
    }
    let broker = PrivateBroker::start(&[
        ("shers", "shers-secret"),
        ("dev-a", "a-secret"),
        ("dev-b", "b-secret"),
    ]);
    // The shipped ACL names SHERS's default prefix.
    let prefix = "shers/devices";
    let shers_url = format!("mqtt://shers:shers-secret@127.0.0.1:{}", broker.port);
    let app = shers_on(backend, &shers_url, prefix).await;
    app.register_wearer("p-a", "dev-a").await;
    app.register_wearer("p-b", "dev-b").await;

    let mut a = Client::connect(&broker.url(), "dev-a", Some(("dev-a", "a-secret"))).await;
    let mut b = Client::connect(&broker.url(), "dev-b", Some(("dev-b", "b-secret"))).await;
    // SHERS (its own user, its shared subscriptions) answers each device on its error topic,
    // and a device reads its own refusals only: dev-a never sees dev-b's.
    a.subscribe(&format!("{prefix}/+/error")).await;
    b.subscribe(&format!("{prefix}/+/error")).await;
    until_shers_listens(&mut a, prefix, "dev-a").await;
    until_shers_listens(&mut b, prefix, "dev-b").await;
    assert!(
        a.message_on(&format!("{prefix}/dev-b/error"), Duration::from_millis(300))
            .await
            .is_none(),
        "dev-a read dev-b's refusals"
    );

    // dev-a claims dev-b's topic: the broker drops it. Its own readings still reach SHERS.
    a.publish(
        &format!("{prefix}/dev-b/vitals"),
        emergency("dev-b", 0).to_string(),
    )
    .await;
    a.publish(&format!("{prefix}/dev-b/status"), "offline")
        .await;
    a.publish(
        &format!("{prefix}/dev-a/vitals"),
        emergency("dev-a", 0).to_string(),
    )
    .await;
    eventually("dev-a's own emergency applied", || async {
        let changes = app.events_of("vitals.status_changed").await;
        changes
            .iter()
            .any(|c| c.device_id.as_deref() == Some("dev-a"))
            .then_some(())
    })
    .await;
    let denied = eventually("the broker's denial in its log", || async {
        let log = std::fs::read_to_string(&broker.log).unwrap_or_default();
        (log.matches("Denied PUBLISH").count() >= 2).then_some(log)
    })
    .await;
    assert!(
        denied.contains(&format!("'{prefix}/dev-b/vitals'")),
        "{denied}"
    );
    // A moment for anything that did get through.
    actix_web::rt::time::sleep(Duration::from_millis(500)).await;
    let changes = app.events_of("vitals.status_changed").await;
    assert!(
        changes
            .iter()
            .all(|c| c.device_id.as_deref() == Some("dev-a")),
        "dev-b's topic took dev-a's publish: {changes:?}"
    );
    assert!(app.events_of("device.offline").await.is_empty());
    assert_eq!(app.events_of("incident.created").await.len(), 1);
}
