//! The buses across broker restarts and outages, against private brokers on loopback
//! (docs/interop.md §1–2, issue 25 "Operations"): a RabbitMQ restart mid-stream stores every
//! reading exactly once and dead-letters nothing; the relay publishes what was committed while
//! the broker was down, skipping nothing; a transient failure (the database gone) holds a
//! delivery instead of dead-lettering it; MQTT readings flow again after a Mosquitto restart.
//! `/readyz` stays 200 throughout and says `connecting`, then `connected`.
//!
//! Each test runs its own broker (a RabbitMQ node or a Mosquitto in a temporary directory, on a
//! free port), so restarting it disturbs no other test. Without `rabbitmq-server` or
//! `mosquitto` installed the tests skip with a message, outside CI; in CI they fail.
//!
//! `/readyz`'s bus states are the process's (one static per bus): in this test binary they
//! include every other running test's connections, so "connecting" while our broker is down is
//! exact, and "connected" afterwards is waited for (the other tests' connections come up too);
//! that SHERS itself is back is also checked on the broker (a consumer on our queue) or on the
//! topics (SHERS answers).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;
use shers::config::{Retention, Secret};
use shers::domain::ids::DeviceId;
use shers::persistence::{Backend, events, readings};

use crate::amqp::{Bus, shers_wearable};
use crate::both_backends;
use crate::helpers::{
    TcpProxy, TestApp, TestDb, api, eventually, eventually_or_none, pg_host_port, with_database,
};
use crate::mqtt::{Client, normal, until_shers_listens};

both_backends!(
    amqp_ingest_stores_every_reading_once_across_a_broker_restart,
    the_relay_skips_nothing_committed_while_the_broker_was_down,
    a_delivery_failing_transiently_is_held_never_dead_lettered,
    mqtt_readings_flow_again_after_a_mosquitto_restart,
);

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// An installed program, from the usual system directories.
fn program(name: &str) -> Option<PathBuf> {
    [
        "/usr/sbin",
        "/usr/local/sbin",
        "/usr/bin",
        "/usr/local/bin",
        "/opt/homebrew/sbin",
        "/opt/homebrew/bin",
    ]
    .iter()
    .map(|dir| Path::new(dir).join(name))
    .find(|p| p.exists())
}

/// `Some(path)`, or `None` after saying the test is skipped (failing instead in CI).
fn installed(name: &str, package: &str) -> Option<PathBuf> {
    let found = program(name);
    if found.is_none() {
        assert!(!ci(), "CI=true and {name} is not installed ({package})");
        eprintln!("SKIPPED: private broker test, {name} is not installed ({package})");
    }
    found
}

/// A port that is free now (and, for RabbitMQ, whose distribution port `+ 20000` is too).
fn free_port(with_dist: bool) -> u16 {
    loop {
        let offset = u16::from_be_bytes(uuid::Uuid::new_v4().as_bytes()[..2].try_into().unwrap());
        let port = 20_000 + offset % 20_000;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && (!with_dist || free(port + 20_000)) {
            return port;
        }
    }
}

/// Runs a command to completion off the test's runtime (SHERS runs on it meanwhile).
async fn run(mut command: Command) -> std::process::ExitStatus {
    command.stdout(Stdio::null()).stderr(Stdio::null());
    tokio::task::spawn_blocking(move || command.status())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("could not run a broker command: {e}"))
}

async fn until_closed(port: u16, what: &str) {
    eventually(what, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
            .then_some(())
    })
    .await;
}

/// A RabbitMQ node of this test's own: a temporary directory (its config, database and logs),
/// a free port, guest/guest on loopback. Stopped and started again on the same directory, it
/// keeps its durable queues and persistent messages. Stopped on drop.
pub(crate) struct PrivateRabbit {
    server: PathBuf,
    ctl: PathBuf,
    dir: tempfile::TempDir,
    node: String,
    port: u16,
    running: bool,
}

impl PrivateRabbit {
    /// Starts a node; `None` (skipped with a message) when RabbitMQ is not installed.
    pub(crate) async fn start() -> Option<Self> {
        let server = installed("rabbitmq-server", "apt-get install rabbitmq-server")?;
        let ctl = installed("rabbitmqctl", "apt-get install rabbitmq-server")?;
        let dir = tempfile::Builder::new()
            .prefix("shers-rabbit-")
            .tempdir()
            .unwrap();
        // Debian's server drops to the `rabbitmq` user, which must write here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let port = free_port(true);
        // Its own config file, so the system's (a listener on 5672) does not apply.
        let conf = dir.path().join("rabbitmq.conf");
        std::fs::write(&conf, format!("listeners.tcp.local = 127.0.0.1:{port}\n")).unwrap();
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
        let node = format!(
            "shers-t-{}@localhost",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut me = Self {
            server,
            ctl,
            dir,
            node,
            port,
            running: false,
        };
        me.boot().await;
        Some(me)
    }

    pub(crate) fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Starts the node (again) and waits until it takes connections.
    pub(crate) async fn boot(&mut self) {
        let dir = self.dir.path();
        let mut command = Command::new(&self.server);
        command
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_DIST_PORT", (self.port + 20_000).to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .arg("-detached");
        let status = run(command).await;
        assert!(status.success(), "rabbitmq-server -detached: {status}");
        self.running = true;
        let url = self.url();
        eventually("the private RabbitMQ to take connections", || {
            let url = url.clone();
            async move {
                let c = Connection::connect(&url, ConnectionProperties::default())
                    .await
                    .ok()?;
                let _ = c.close(200, "probe".into()).await;
                Some(())
            }
        })
        .await;
    }

    /// Stops the node (its clients' connections are closed) and waits until it is gone. Sent
    /// as SIGTERM, on which RabbitMQ shuts down as `rabbitmqctl stop` does, but at once: the
    /// control tool first boots an Erlang VM of its own, seconds on a busy machine, and a
    /// test stopping the broker mid-stream must not see the stream end before the stop.
    pub(crate) async fn stop(&mut self) {
        let pid_file = self
            .dir
            .path()
            .join("mnesia")
            .join(format!("{}.pid", self.node));
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok());
        let command = match pid {
            Some(pid) => {
                let mut kill = Command::new("kill");
                kill.args(["-TERM", &pid.to_string()]);
                kill
            }
            None => {
                let mut ctl = Command::new(&self.ctl);
                ctl.args(["-n", &self.node, "stop"]);
                ctl
            }
        };
        let status = run(command).await;
        assert!(status.success(), "stopping the private RabbitMQ: {status}");
        self.running = false;
        until_closed(self.port, "the private RabbitMQ to stop").await;
        if let Some(pid) = pid {
            eventually("the private RabbitMQ's process to exit", || async move {
                (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
            })
            .await;
        }
    }

    /// `(ready, unacknowledged)` messages of `queue`, as the broker counts them.
    pub(crate) async fn counts(&self, queue: &str) -> (u64, u64) {
        let mut command = Command::new(&self.ctl);
        command.args([
            "-n",
            &self.node,
            "-q",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ]);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        text.lines()
            .filter_map(|line| {
                let mut cols = line.split_whitespace();
                (cols.next()? == queue).then_some(())?;
                Some((cols.next()?.parse().ok()?, cols.next()?.parse().ok()?))
            })
            .next()
            .unwrap_or_else(|| panic!("no queue {queue} on the private broker: {text}"))
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        if self.running {
            let _ = Command::new(&self.ctl)
                .args(["-n", &self.node, "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `/readyz`, which must answer 200 whatever the buses do: its body.
async fn readyz(app: &TestApp) -> Value {
    let resp = app.get(api::READYZ, None).await;
    assert_eq!(
        resp.status(),
        200,
        "a broker outage must not fail readiness"
    );
    resp.json().await.unwrap()
}

/// Waits until `/readyz` (answering 200 all along) says `bus` is `state`.
async fn until_bus(app: &TestApp, bus: &str, state: &str) {
    eventually(&format!("/readyz to say {bus}: {state}"), || async {
        (readyz(app).await[bus] == state).then_some(())
    })
    .await;
}

/// `(rows, distinct measurement times)` of the readings stored for `device`.
async fn rows_and_times(app: &TestApp, device: &str) -> (i64, i64) {
    #[derive(diesel::QueryableByName)]
    struct Counts {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        d: i64,
    }
    // The device id is the test's own (no quotes in it).
    let query = diesel::sql_query(format!(
        "SELECT COUNT(*) AS n, COUNT(DISTINCT measured_at) AS d FROM readings \
         WHERE device_id = '{device}'"
    ));
    let mut conn = app.db.conn().await.unwrap();
    let counts: Vec<Counts> = shers::db_run!(&mut conn, |c| {
        diesel_async::RunQueryDsl::load(query, c).await.unwrap()
    });
    (counts[0].n, counts[0].d)
}

async fn stored_readings(app: &TestApp, device: &str) -> i64 {
    let mut conn = app.db.conn().await.unwrap();
    readings::count_for_device(&mut conn, &DeviceId::from(device))
        .await
        .unwrap()
}

/// Publishes SHERS wearable readings of `device` one second apart, reading `i` at
/// `t0 + i` s, without waiting for each confirmation in turn.
async fn publish_readings(
    bus: &Bus,
    patient: &str,
    device: &str,
    t0: i64,
    range: std::ops::Range<i64>,
) {
    let mut confirms = Vec::new();
    for i in range {
        let body = shers_wearable(patient, device, t0 + i * 1000, false);
        let confirm = bus
            .channel
            .basic_publish(
                bus.exchange.as_str().into(),
                "wearable.data".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await
            .unwrap();
        confirms.push(confirm);
    }
    for confirm in confirms {
        let confirmation = confirm.await.unwrap();
        assert!(
            confirmation.is_ack(),
            "the broker refused a reading: {confirmation:?}"
        );
    }
}

async fn amqp_ingest_stores_every_reading_once_across_a_broker_restart(backend: Backend) {
    let Some(mut rabbit) = PrivateRabbit::start().await else {
        return;
    };
    let bus = Bus::new(rabbit.url()).await;
    let app = TestApp::builder(backend)
        .with_settings(|s| {
            bus.configure(s);
            // Every reading stored: each one can be counted.
            s.triage.raw_retention = Retention::All;
        })
        .start()
        .await;
    until_bus(&app, "amqp", "connected").await;
    app.register_wearer("bus-p1", "bus-w1").await;
    // One device, readings a second apart over the last half hour: one actor takes them in
    // order, many deliveries of the same device in flight at once.
    let t0 = crate::amqp::now_ms() - 30 * 60 * 1000;
    let (before, after) = (1_500_i64, 100_i64);
    publish_readings(&bus, "bus-p1", "bus-w1", t0, 0..before).await;
    eventually("the first readings stored", || async {
        (stored_readings(&app, "bus-w1").await >= 50).then_some(())
    })
    .await;

    // Down mid-stream: deliveries in flight are being applied as the connection goes.
    rabbit.stop().await;
    until_bus(&app, "amqp", "connecting").await;
    let stored_while_down = stored_readings(&app, "bus-w1").await;
    assert!(
        stored_while_down < before,
        "the broker went down after the whole stream was taken ({stored_while_down} of \
         {before}); nothing was mid-stream"
    );
    // Nothing more arrives while the broker is away, and readiness holds.
    readyz(&app).await;

    rabbit.boot().await;
    until_bus(&app, "amqp", "connected").await;
    let bus = bus.reopen().await;
    eventually("SHERS consuming its queue again", || async {
        (bus.depth(&bus.ingest_queue()).await.1 == 1).then_some(())
    })
    .await;
    publish_readings(&bus, "bus-p1", "bus-w1", t0, before..before + after).await;

    let total = before + after;
    let last = std::cell::Cell::new((0, (0, 0)));
    let done = eventually_or_none(|| async {
        let stored = stored_readings(&app, "bus-w1").await;
        let counts = rabbit.counts(&bus.ingest_queue()).await;
        last.set((stored, counts));
        (stored >= total && counts == (0, 0)).then_some(())
    })
    .await;
    assert!(
        done.is_some(),
        "every reading stored and acknowledged: (stored, (ready, unacked)) = {:?} of {total}",
        last.get()
    );
    // Exactly once: none lost, none stored twice, none dead-lettered.
    let (rows, times) = rows_and_times(&app, "bus-w1").await;
    assert_eq!(
        (rows, times),
        (total, total),
        "(rows, distinct times) of the readings stored"
    );
    assert_eq!(rabbit.counts(&bus.dead_letter_queue()).await, (0, 0));
    bus.clean().await;
}

/// A durable queue bound to `shers.event.#` on `exchange` (both declared before SHERS starts):
/// it, and every persistent message in it, survives the broker's restart.
async fn durable_tap(url: &str, exchange: &str, queue: &str) -> (Connection, Channel) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "shers.event.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (connection, channel)
}

/// One message on `shers.event.*`: its `message_id` and envelope.
#[derive(Debug)]
struct Relayed {
    message_id: String,
    body: Value,
}

/// Takes every message waiting in `queue` into `seen`.
async fn take(channel: &Channel, queue: &str, seen: &std::cell::RefCell<Vec<Relayed>>) {
    let mut into = Vec::new();
    while let Some(m) = channel
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        into.push(Relayed {
            message_id: m
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            body: serde_json::from_slice(&m.delivery.data).unwrap(),
        });
    }
    seen.borrow_mut().extend(into);
}

async fn head(app: &TestApp) -> i64 {
    let mut conn = app.db.conn().await.unwrap();
    events::last_seq(&mut conn).await.unwrap()
}

async fn open_incidents(app: &TestApp, n: usize) {
    for _ in 0..n {
        let resp = app
            .create_incident(
                shers::domain::auth::Role::Console,
                &serde_json::json!({"location": {"lat": 51.5, "lng": -0.12}}),
            )
            .await;
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    }
}

async fn the_relay_skips_nothing_committed_while_the_broker_was_down(backend: Backend) {
    let Some(mut rabbit) = PrivateRabbit::start().await else {
        return;
    };
    let url = rabbit.url();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let exchange = format!("t.relay.{suffix}");
    let queue = format!("t.{suffix}.q.events");
    let (_tap, channel) = durable_tap(&url, &exchange, &queue).await;
    let app = TestApp::builder(backend)
        .with_settings(|s| {
            s.amqp.url = Some(Secret::new(url.clone()));
            s.amqp.exchange = exchange.clone();
            s.amqp.queue_prefix = format!("t.{suffix}");
            s.amqp.ingest = false;
            s.amqp.publish = true;
        })
        .start()
        .await;
    until_bus(&app, "amqp", "connected").await;
    let seen = std::cell::RefCell::new(Vec::new());
    open_incidents(&app, 3).await;
    let first = head(&app).await;
    eventually("the first events relayed", || async {
        take(&channel, &queue, &seen).await;
        seen.borrow()
            .iter()
            .any(|m| m.body["seq"].as_i64() == Some(first))
            .then_some(())
    })
    .await;

    rabbit.stop().await;
    until_bus(&app, "amqp", "connecting").await;
    // Committed while the broker is away: the relay cannot publish them yet.
    open_incidents(&app, 10).await;
    let committed_while_down = head(&app).await;
    assert!(committed_while_down > first);
    readyz(&app).await;

    rabbit.boot().await;
    until_bus(&app, "amqp", "connected").await;
    // And more once it is back.
    open_incidents(&app, 3).await;
    let (_tap, channel) = durable_tap(&url, &exchange, &queue).await;
    // Everything in the store (which may still grow: dispatch retries) relayed.
    let stored = eventually("every committed event relayed", || async {
        take(&channel, &queue, &seen).await;
        let mut conn = app.db.conn().await.unwrap();
        let stored = events::read_since(&mut conn, 0, 100_000).await.unwrap();
        let last = stored.last()?.seq;
        seen.borrow()
            .iter()
            .any(|m| m.body["seq"].as_i64() == Some(last))
            .then_some(stored)
    })
    .await;
    let last = stored.last().map_or(0, |e| e.seq);
    assert!(last > committed_while_down);

    // In sequence order, none skipped: the first copy of each message, in arrival order, is
    // the event store itself.
    let mut first_copies: Vec<&Value> = Vec::new();
    let mut by_id: HashMap<&str, &Value> = HashMap::new();
    let seen = seen.into_inner();
    for m in &seen {
        let seq = m.body["seq"].as_i64().unwrap();
        if seq > last {
            continue;
        }
        assert_eq!(
            m.message_id,
            format!("shers-{seq}"),
            "one message id per event"
        );
        match by_id.get(m.message_id.as_str()) {
            // A repeat (published again after a lost confirm) is the same message.
            Some(earlier) => assert_eq!(*earlier, &m.body, "a repeat differs"),
            None => {
                by_id.insert(&m.message_id, &m.body);
                first_copies.push(&m.body);
            }
        }
    }
    let relayed: Vec<i64> = first_copies
        .iter()
        .map(|b| b["seq"].as_i64().unwrap())
        .collect();
    let expected: Vec<i64> = stored.iter().map(|e| e.seq).collect();
    assert_eq!(relayed, expected, "the relay's order is the store's");
    for (body, event) in first_copies.iter().zip(&stored) {
        assert_eq!(body["kind"], event.kind.as_str());
    }
}

/// A PostgreSQL database behind a proxy the test can cut, and the app's settings pointing at
/// it through the proxy; the direct URL for the test's own reads.
async fn behind_a_proxy() -> (TestDb, TcpProxy, String, String) {
    let tdb = TestDb::new(Backend::Postgres).await;
    let proxy = TcpProxy::start(pg_host_port(&tdb.url)).await;
    let name = tdb
        .url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let via_proxy = with_database(
        &tdb.url.replacen(
            &pg_host_port(&tdb.url),
            &format!("127.0.0.1:{}", proxy.port),
            1,
        ),
        &name,
    );
    let direct = tdb.url.clone();
    (tdb, proxy, via_proxy, direct)
}

/// What keeps the database from the application for a while: the PostgreSQL proxy cut, or a
/// SQLite write lock held by another connection.
enum Outage {
    Postgres(TcpProxy),
    Sqlite(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>),
}

async fn a_delivery_failing_transiently_is_held_never_dead_lettered(backend: Backend) {
    let Some(rabbit) = PrivateRabbit::start().await else {
        return;
    };
    let bus = Bus::new(rabbit.url()).await;
    let configure = |s: &mut shers::config::Settings| {
        bus.configure(s);
        s.triage.raw_retention = Retention::All;
    };
    let (app, proxy, direct) = match backend {
        Backend::Postgres => {
            let (tdb, proxy, via_proxy, direct) = behind_a_proxy().await;
            let app = TestApp::builder(backend)
                .with_settings(configure)
                .database_url(via_proxy)
                .start_on(tdb)
                .await;
            (app, Some(proxy), Some(direct))
        }
        Backend::Sqlite => (
            TestApp::builder(backend)
                .with_settings(configure)
                .start()
                .await,
            None,
            None,
        ),
    };
    until_bus(&app, "amqp", "connected").await;
    app.register_wearer("bus-p1", "bus-w1").await;
    let t0 = crate::amqp::now_ms() - 60_000;
    // One reading applied first: the device's actor is up.
    publish_readings(&bus, "bus-p1", "bus-w1", t0, 0..1).await;
    eventually("the first reading stored", || async {
        (stored_readings(&app, "bus-w1").await == 1).then_some(())
    })
    .await;

    // The database goes away while the next reading is delivered.
    let (outage, hold) = match proxy {
        Some(proxy) => {
            proxy.cut();
            // Every query fails at once or within the pool's 1 s timeout.
            (Outage::Postgres(proxy), Duration::from_secs(4))
        }
        // Another connection holds SQLite's write lock past its 10 s busy timeout.
        None => (sqlite_write_lock(&app).await, Duration::from_secs(13)),
    };
    let direct = match &direct {
        Some(url) => {
            let mut settings = shers::config::DatabaseSettings::default();
            settings.url = Secret::new(url.clone());
            settings.pool_size = 2;
            shers::persistence::Db::connect(&settings).await.unwrap()
        }
        None => app.db.clone(),
    };
    let stored = || async {
        let mut conn = direct.conn().await.unwrap();
        readings::count_for_device(&mut conn, &DeviceId::from("bus-w1"))
            .await
            .unwrap()
    };
    publish_readings(&bus, "bus-p1", "bus-w1", t0, 1..2).await;
    eventually("the reading delivered to SHERS", || async {
        (rabbit.counts(&bus.ingest_queue()).await == (0, 1)).then_some(())
    })
    .await;
    // Throughout the outage: held by SHERS (delivered, not acknowledged), not dead-lettered,
    // not stored.
    let until = std::time::Instant::now() + hold;
    while std::time::Instant::now() < until {
        assert_eq!(
            rabbit.counts(&bus.ingest_queue()).await,
            (0, 1),
            "(ready, unacknowledged) during the outage"
        );
        assert_eq!(rabbit.counts(&bus.dead_letter_queue()).await, (0, 0));
        assert_eq!(stored().await, 1, "stored during the outage");
        actix_web::rt::time::sleep(Duration::from_millis(250)).await;
    }

    // Back: the held delivery is applied and acknowledged, and nothing was dead-lettered.
    match outage {
        Outage::Postgres(proxy) => {
            proxy.restore();
            eventually("the reading applied", || async {
                (stored().await == 2).then_some(())
            })
            .await;
            drop(proxy);
        }
        Outage::Sqlite(release, holder) => {
            release.send(()).unwrap();
            tokio::task::spawn_blocking(move || holder.join().unwrap())
                .await
                .unwrap();
            eventually("the reading applied", || async {
                (stored().await == 2).then_some(())
            })
            .await;
        }
    }
    eventually("the delivery acknowledged", || async {
        (rabbit.counts(&bus.ingest_queue()).await == (0, 0)).then_some(())
    })
    .await;
    assert_eq!(rabbit.counts(&bus.dead_letter_queue()).await, (0, 0));
    assert_eq!(stored().await, 2, "applied once");
    bus.clean().await;
}

/// Takes SQLite's write lock on the app's database from a connection of the test's own
/// (`BEGIN IMMEDIATE`), held until the returned sender is sent to.
async fn sqlite_write_lock(app: &TestApp) -> Outage {
    use diesel::Connection as _;
    use diesel::RunQueryDsl as _;
    #[derive(diesel::QueryableByName)]
    struct File {
        #[diesel(sql_type = diesel::sql_types::Text)]
        file: String,
    }
    let mut conn = app.db.conn().await.unwrap();
    let rows: Vec<File> = shers::db_run!(&mut conn, |c| {
        diesel_async::RunQueryDsl::load(
            diesel::sql_query("SELECT file FROM pragma_database_list WHERE name = 'main'"),
            c,
        )
        .await
        .unwrap()
    });
    drop(conn);
    let path = rows[0].file.clone();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (locked, is_locked) = tokio::sync::oneshot::channel();
    let holder = std::thread::spawn(move || {
        let mut c = diesel::SqliteConnection::establish(&path).unwrap();
        diesel::sql_query("BEGIN IMMEDIATE")
            .execute(&mut c)
            .unwrap();
        locked.send(()).unwrap();
        let _ = released.recv();
        diesel::sql_query("COMMIT").execute(&mut c).unwrap();
    });
    is_locked.await.unwrap();
    Outage::Sqlite(release, holder)
}

/// A Mosquitto of this test's own on a free port (anonymous, persistent sessions kept in its
/// directory), stopped with SIGTERM (so it saves them) and started again on the same port.
struct PrivateMosquitto {
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateMosquitto {
    fn start() -> Option<Self> {
        let binary = installed("mosquitto", "apt-get install mosquitto")?;
        let dir = tempfile::Builder::new()
            .prefix("shers-mosquitto-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let port = free_port(false);
        // As whoever runs the tests (as root, Mosquitto would switch to its own user).
        let user = std::env::var("USER").unwrap_or_else(|_| "root".to_owned());
        std::fs::write(
            dir.path().join("mosquitto.conf"),
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {}/\nuser {user}\nlog_dest file {}\nlog_type all\n",
                dir.path().display(),
                dir.path().join("mosquitto.log").display()
            ),
        )
        .unwrap();
        let mut me = Self {
            binary,
            dir,
            port,
            child: None,
        };
        me.boot();
        Some(me)
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) and waits until it listens.
    fn boot(&mut self) {
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the private mosquitto did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it as an init system would (SIGTERM: it saves its sessions) and waits for it.
    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let status = run({
            let mut kill = Command::new("kill");
            kill.args(["-TERM", &child.id().to_string()]);
            kill
        })
        .await;
        assert!(status.success(), "kill -TERM mosquitto: {status}");
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        until_closed(self.port, "the private mosquitto to stop").await;
    }
}

impl Drop for PrivateMosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn mqtt_readings_flow_again_after_a_mosquitto_restart(backend: Backend) {
    let Some(mut mosquitto) = PrivateMosquitto::start() else {
        return;
    };
    let url = mosquitto.url();
    let prefix = format!("shers-test/{}", crate::mqtt::unique());
    let app = TestApp::builder(backend)
        .with_settings(|s| {
            s.mqtt.url = Some(Secret::new(url.clone()));
            s.mqtt.topic_prefix = prefix.clone();
            s.mqtt.client_id = Some(format!("shers-test-{}", crate::mqtt::unique()));
            s.triage.raw_retention = Retention::All;
        })
        .start()
        .await;
    app.register_wearer("mq-p1", "mq-w1").await;
    let topic = format!("{prefix}/mq-w1/vitals");
    let mut device = Client::connect(&url, &format!("dev-{}", crate::mqtt::unique()), None).await;
    device.subscribe(&format!("{prefix}/probe/error")).await;
    until_shers_listens(&mut device, &prefix, "probe").await;
    until_bus(&app, "mqtt", "connected").await;
    for t in 0..3 {
        device.publish(&topic, normal("mq-w1", t).to_string()).await;
    }
    eventually("the first readings applied", || async {
        (stored_readings(&app, "mq-w1").await == 3).then_some(())
    })
    .await;

    mosquitto.stop().await;
    until_bus(&app, "mqtt", "connecting").await;
    readyz(&app).await;
    mosquitto.boot();
    until_bus(&app, "mqtt", "connected").await;

    // A device connecting to the restarted broker: what it publishes reaches SHERS.
    let mut device = Client::connect(&url, &format!("dev-{}", crate::mqtt::unique()), None).await;
    device.subscribe(&format!("{prefix}/probe/error")).await;
    until_shers_listens(&mut device, &prefix, "probe").await;
    for t in 3..6 {
        device.publish(&topic, normal("mq-w1", t).to_string()).await;
    }
    eventually("the readings after the restart applied", || async {
        (stored_readings(&app, "mq-w1").await == 6).then_some(())
    })
    .await;
    assert_eq!(rows_and_times(&app, "mq-w1").await, (6, 6));
}
