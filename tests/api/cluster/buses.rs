//! The buses on a three-node cluster (issue 25): real `shers serve` processes sharing
//! PostgreSQL and Redis, every node with `SHERS_AMQP__*` and `SHERS_MQTT__*` set, against the
//! shared RabbitMQ and Mosquitto. Each test has its own exchange, queue prefix, topic prefix
//! and MQTT client ids (`shers-<node>-<suffix>`), so tests never meet on the brokers.
//!
//! - readings over AMQP and MQTT reach the node holding each device's shard, whichever node
//!   the broker gave them to, and every node consumes both;
//! - exactly one node (the dispatch holder) relays the event store, and after kill -9 of it the
//!   next holder carries on from the stored cursor, losing nothing;
//! - an MQTT `offline` status received by a node that does not hold the device's shard is
//!   recorded once, by the holder (`POST /internal/v1/devices/offline`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::ExchangeKind;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use shers::persistence::{cursors, events, patients};

use super::{Cluster, DEVICE_SHARDS, SCENE};
use crate::amqp::{Bus, broker, shers_wearable};
use crate::helpers::{PATIENCE, api, eventually};
use crate::mqtt::Client;

/// Events the relay reads, publishes and confirms per step (`src/bus/amqp/relay.rs`): the most
/// a failover may publish twice.
const RELAY_BATCH: usize = 256;

/// A cluster whose every node speaks both buses, with the test's names on them.
struct BusCluster {
    cluster: Cluster,
    bus: Bus,
    mqtt_url: String,
    /// The MQTT topic prefix.
    prefix: String,
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Polls `probe` until it gives `Some`, for up to [`PATIENCE`]; panics naming `what`, with the
/// nodes' logs, if it never does.
async fn wait<T, F, Fut>(cluster: &Cluster, what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    match crate::helpers::eventually_or_none(probe).await {
        Some(found) => found,
        None => panic!("{what}: not within {PATIENCE:?}\n{}", cluster.logs()),
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl BusCluster {
    /// Three nodes on both buses; `None` (skipped, with a message) when a broker, PostgreSQL or
    /// Redis is missing outside CI. `before` runs once the test's names exist and before any
    /// node starts (to bind a queue that must miss nothing).
    async fn start(before: impl AsyncFnOnce(&Bus)) -> Option<Self> {
        let amqp = broker().await?;
        let mqtt_url = crate::mqtt::broker()?;
        let bus = Bus::new(amqp).await;
        before(&bus).await;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("shers-test/{suffix}");
        let env = vec![
            ("SHERS_AMQP__URL", leak(bus.url.clone())),
            ("SHERS_AMQP__EXCHANGE", leak(bus.exchange.clone())),
            ("SHERS_AMQP__QUEUE_PREFIX", leak(bus.prefix.clone())),
            ("SHERS_MQTT__URL", leak(mqtt_url.clone())),
            ("SHERS_MQTT__TOPIC_PREFIX", leak(prefix.clone())),
            // Nodes share one broker: each its own persistent session.
            (
                "SHERS_MQTT__CLIENT_ID",
                leak(format!("shers-{{node}}-{suffix}")),
            ),
        ];
        let Some(cluster) = Cluster::start_with(3, env).await else {
            bus.clean().await;
            return None;
        };
        let me = Self {
            cluster,
            bus,
            mqtt_url,
            prefix,
        };
        me.until_connected().await;
        Some(me)
    }

    /// Waits until every live node's `/readyz` says both buses are connected (its AMQP
    /// consumer is on the queue, its MQTT subscriptions granted).
    async fn until_connected(&self) {
        let c = &self.cluster;
        let started = Instant::now();
        let mut last = Vec::new();
        loop {
            last.clear();
            for i in (0..c.nodes.len()).filter(|&i| c.nodes[i].child.is_some()) {
                let body: Value = match c.client.get(c.url(i, api::READYZ)).send().await {
                    Ok(r) => r.json().await.unwrap_or(Value::Null),
                    Err(_) => Value::Null,
                };
                last.push(body);
            }
            if last
                .iter()
                .all(|b| b["amqp"] == "connected" && b["mqtt"] == "connected")
            {
                return;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "the nodes never connected to both buses: {last:?}\n{}",
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The index of the node holding `device`'s shard now.
    async fn holder_of(&self, device: &str) -> usize {
        let c = &self.cluster;
        let view = c.overview(0).await.expect("an overview");
        let shard = shers::domain::shards::device_shard(&device.into(), DEVICE_SHARDS as u16);
        let name = format!("devices/{shard}");
        let holder = view["shards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["shard"] == name.as_str() && l["live"] == true)
            .and_then(|l| l["holder"].as_str())
            .unwrap_or_else(|| panic!("nobody holds {name}: {view}"));
        c.index_of(holder)
    }

    /// `node`'s `/metrics`.
    async fn metrics(&self, node: usize) -> String {
        let c = &self.cluster;
        c.get(node, api::METRICS, &c.admin)
            .await
            .text()
            .await
            .unwrap()
    }

    async fn create_patient(&self, node: usize, id: &str) {
        let c = &self.cluster;
        let resp = c
            .post(
                node,
                api::PATIENTS,
                &c.admin,
                &json!({"id": id, "name": "Bus Patient",
                        "next_of_kin": [{"name": "Kin", "phone": "+447700900123"}]}),
            )
            .await;
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    }

    /// A device of the test's own on the MQTT broker.
    async fn mqtt_device(&self) -> Client {
        let id = format!("bus-cluster-{}", uuid::Uuid::new_v4().simple());
        Client::connect(&self.mqtt_url, &id, None).await
    }

    /// Waits until `device`'s live actor, on the holder of its shard (asked through a front,
    /// `/admin/actors/device/{id}`), has applied a reading; its inspection.
    async fn until_applied(&self, device: &str) -> Value {
        let c = &self.cluster;
        let path = format!("/admin/actors/device/{device}");
        wait(c, &format!("{device}'s reading applied"), || async {
            let resp = c.get(0, &path, &c.admin).await;
            if resp.status() != 200 {
                return None;
            }
            let view: Value = resp.json().await.ok()?;
            let applied = view["state"]["phase"] == "ready"
                && view["messages"].as_u64().is_some_and(|m| m >= 1)
                && view["state"]["last_measured_at"].is_string();
            applied.then_some(view)
        })
        .await
    }
}

/// The sum of the samples of `name` whose labels contain every one of `labels`.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Readings over AMQP (`wearable.data`, SHERS's wearable shape) and over MQTT
/// (`<prefix>/<device>/vitals`) for devices spread over every node's shards are applied by the
/// holder of each device's shard, whichever node the broker gave them to; every node consumes
/// both buses; an emergency among them opens one incident, offered to a unit.
#[actix_web::test]
async fn readings_over_both_buses_reach_their_shards_from_every_node() {
    let Some(bc) = BusCluster::start(async |_| {}).await else {
        return;
    };
    let c = &bc.cluster;
    let owner = c.wait_owner(None, Duration::from_secs(10)).await;
    // Every node is a competing consumer of the one ingest queue.
    eventually("three consumers on the ingest queue", || async {
        (bc.bus.depth(&bc.bus.ingest_queue()).await.1 == 3).then_some(())
    })
    .await;
    c.add_unit(owner, "BU-1", SCENE.0 + 0.001).await;

    const N: usize = 36;
    // AMQP: the patients exist, their devices do not (bound on first sight, as SHERS did).
    let amqp: Vec<String> = (0..N).map(|i| format!("ba-{i}")).collect();
    // MQTT: registered devices (the topic's device is the identity).
    let mqtt: Vec<String> = (0..N).map(|i| format!("bm-{i}")).collect();
    for (i, device) in mqtt.iter().enumerate() {
        bc.create_patient(i % 3, &format!("bap-{i}")).await;
        c.register_wearer(i % 3, &format!("bmp-{i}"), device).await;
    }
    let mut holders: HashMap<String, usize> = HashMap::new();
    for d in amqp.iter().chain(&mqtt) {
        holders.insert(d.clone(), bc.holder_of(d).await);
    }
    for devices in [&amqp, &mqtt] {
        let nodes: BTreeSet<usize> = devices.iter().map(|d| holders[d]).collect();
        assert_eq!(
            nodes.len(),
            3,
            "the devices land on every node: {holders:?}"
        );
    }
    // The emergency: a wearable on a node that does not hold dispatch.
    let sick = amqp
        .iter()
        .position(|d| holders[d] != owner)
        .expect("an AMQP device off the dispatch holder");

    let t = now_ms();
    for (i, device) in amqp.iter().enumerate() {
        let body = shers_wearable(&format!("bap-{i}"), device, t, i == sick);
        bc.bus.publish(&body).await;
    }
    let client = bc.mqtt_device().await;
    let at = now_rfc3339();
    for device in &mqtt {
        let reading = json!({"device_id": device, "timestamp": at, "heart_rate_bpm": 72,
                             "spo2_pct": 98, "respiration_rate_bpm": 14, "body_temp_c": 36.8});
        client
            .publish(
                &format!("{}/{device}/vitals", bc.prefix),
                reading.to_string(),
            )
            .await;
    }

    // Every reading stored, each device bound to its wearer.
    for device in amqp.iter().chain(&mqtt) {
        bc.until_applied(device).await;
    }
    let mut conn = c.db.conn().await.unwrap();
    for (i, device) in amqp.iter().enumerate() {
        let found = patients::find_device(&mut conn, &device.as_str().into())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{device} was not bound"));
        assert_eq!(found.device.patient_id.as_str(), format!("bap-{i}"));
    }
    drop(conn);

    // One incident, for the emergency's wearer, offered to the unit.
    let created = eventually("the emergency's incident", || async {
        let created = c.events_of("incident.created").await;
        (!created.is_empty()).then_some(created)
    })
    .await;
    let incident = created[0].incident_id.expect("an incident id").to_string();
    let front = (owner + 1) % 3;
    let offered = c
        .wait_offered(front, &incident, Duration::from_secs(15))
        .await;
    assert_eq!(offered["patient_id"], format!("bap-{sick}"), "{offered}");
    assert_eq!(offered["offers"][0]["unit_id"], "BU-1", "{offered}");
    assert_eq!(c.events_of("incident.created").await.len(), 1);

    // The live actor of every device, on its holder: normal but for the emergency.
    let actors: Value = c
        .get(front, "/admin/actors?kind=device&limit=1000", &c.admin)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(actors["counts"]["device"], 2 * N, "{actors}");
    let statuses: HashMap<&str, &str> = actors["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["id"].as_str().unwrap(), a["status"].as_str().unwrap()))
        .collect();
    for device in amqp.iter().chain(&mqtt) {
        let want = if *device == amqp[sick] {
            "emergency"
        } else {
            "normal"
        };
        assert_eq!(statuses.get(device.as_str()), Some(&want), "{actors}");
    }

    // Acknowledged, nothing dead-lettered.
    eventually("the ingest queue drained", || async {
        (bc.bus.depth(&bc.bus.ingest_queue()).await.0 == 0).then_some(())
    })
    .await;
    assert_eq!(bc.bus.depth(&bc.bus.dead_letter_queue()).await.0, 0);

    // The brokers split the messages over the nodes, and a node handed a reading for another
    // node's shard sent it there (`/internal/v1/readings` on the holders).
    let mut per_node = Vec::new();
    let mut forwarded = 0.0;
    for i in 0..3 {
        let m = bc.metrics(i).await;
        per_node.push((
            sample(&m, "shers_amqp_consumed_total", &[]),
            sample(&m, "shers_mqtt_consumed_total", &["kind=\"vitals\""]),
        ));
        forwarded += sample(
            &m,
            "http_requests_total",
            &["route=\"/internal/v1/readings\"", "status=\"200\""],
        );
    }
    eprintln!("consumed per node (amqp, mqtt): {per_node:?}; forwarded batches: {forwarded}");
    let amqp_total: f64 = per_node.iter().map(|p| p.0).sum();
    let mqtt_total: f64 = per_node.iter().map(|p| p.1).sum();
    assert!(amqp_total >= N as f64, "{per_node:?}");
    assert!(mqtt_total >= N as f64, "{per_node:?}");
    assert!(
        per_node.iter().filter(|p| p.0 > 0.0).count() >= 2,
        "RabbitMQ gave every message to one node: {per_node:?}"
    );
    assert!(
        per_node.iter().filter(|p| p.1 > 0.0).count() >= 2,
        "the shared subscription gave every message to one node: {per_node:?}"
    );
    assert!(forwarded > 0.0, "no reading went to another node's shard");
    bc.bus.clean().await;
}

/// A queue of the test's own bound to `shers.event.#` on the test's exchange.
struct EventTap {
    queue: String,
    /// `(seq, message_id)` of each message, in arrival order.
    seen: Vec<(i64, String)>,
}

impl EventTap {
    /// Declares the exchange (as SHERS does) and the queue, before any node starts.
    async fn bind(bus: &Bus) -> Self {
        bus.channel
            .exchange_declare(
                bus.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let queue = format!("{}.q.events", bus.prefix);
        bus.channel
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
        bus.channel
            .queue_bind(
                queue.as_str().into(),
                bus.exchange.as_str().into(),
                "shers.event.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        Self {
            queue,
            seen: Vec::new(),
        }
    }

    /// Takes what is waiting.
    async fn drain(&mut self, bus: &Bus) {
        while let Some(m) = bus
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let body: Value = serde_json::from_slice(&m.delivery.data).unwrap();
            let seq = body["seq"].as_i64().expect("an envelope with its seq");
            assert_eq!(
                m.delivery.routing_key.as_str(),
                format!("shers.event.{}", body["kind"].as_str().unwrap())
            );
            let id = m
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(ToString::to_string)
                .expect("a message_id");
            self.seen.push((seq, id));
        }
    }

    /// Drains until every stored event arrived and the stored cursor is at the head of the
    /// store; the stored events' sequence numbers.
    async fn until_caught_up(&mut self, bc: &BusCluster) -> Vec<i64> {
        let started = Instant::now();
        loop {
            self.drain(&bc.bus).await;
            let mut conn = bc.cluster.db.conn().await.unwrap();
            let stored: Vec<i64> = events::read_since(&mut conn, 0, 1_000_000)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.seq)
                .collect();
            let cursor = cursors::read(&mut conn, shers::bus::amqp::CURSOR)
                .await
                .unwrap();
            let arrived: BTreeSet<i64> = self.seen.iter().map(|s| s.0).collect();
            let head = stored.last().copied().unwrap_or(0);
            if cursor == head && stored.iter().all(|s| arrived.contains(s)) {
                return stored;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "the relay never caught up: cursor {cursor}, head {head}, {} of {} arrived\n{}",
                stored.iter().filter(|s| arrived.contains(s)).count(),
                stored.len(),
                bc.cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Which nodes have published anything (`shers_amqp_published_total` non-zero).
async fn publishers(bc: &BusCluster) -> Vec<usize> {
    let mut out = Vec::new();
    for i in (0..3).filter(|&i| bc.cluster.nodes[i].child.is_some()) {
        if sample(&bc.metrics(i).await, "shers_amqp_published_total", &[]) > 0.0 {
            out.push(i);
        }
    }
    out
}

/// Exactly one node relays the event store: the dispatch holder. Every stored event arrives
/// on `shers.event.<kind>` in sequence order. kill -9 of the holder while events are being
/// committed: every committed event still arrives (duplicates only under the same
/// `message_id`), and the next holder carries on from the stored cursor: what it publishes
/// again is past that cursor and at most one batch.
#[actix_web::test]
async fn one_node_relays_and_the_next_holder_carries_on_from_the_cursor() {
    let tap = std::cell::RefCell::new(None);
    let Some(bc) = BusCluster::start(async |bus: &Bus| {
        *tap.borrow_mut() = Some(EventTap::bind(bus).await);
    })
    .await
    else {
        return;
    };
    let mut tap = tap.into_inner().expect("bound");
    let mut bc = bc;
    let owner = bc.cluster.wait_owner(None, Duration::from_secs(10)).await;
    for i in 0..6 {
        bc.cluster
            .register_wearer(i % 3, &format!("rp-{i}"), &format!("rw-{i}"))
            .await;
    }
    bc.cluster.add_units_in_a_line(owner, "RU", 2).await;
    let crews = [
        bc.cluster.crew_token("RU-0").await,
        bc.cluster.crew_token("RU-1").await,
    ];
    // Events before the relay's first look: a status change of every wearer.
    let at = now_rfc3339();
    for i in 0..6 {
        let resp = bc
            .cluster
            .post(
                i % 3,
                api::VITALS,
                &bc.cluster.gateway,
                &json!({"device_id": format!("rw-{i}"), "timestamp": at,
                        "heart_rate_bpm": 125, "spo2_pct": 93}),
            )
            .await;
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    }

    // Caught up: every stored event once, in sequence order, from the dispatch holder alone.
    let stored = tap.until_caught_up(&bc).await;
    assert!(stored.len() >= 6, "{stored:?}");
    let arrived: Vec<i64> = tap.seen.iter().map(|s| s.0).collect();
    assert_eq!(arrived, stored, "every stored event once, in order");
    for (seq, id) in &tap.seen {
        assert_eq!(*id, format!("shers-{seq}"));
    }
    assert_eq!(publishers(&bc).await, vec![owner], "only the holder relays");

    // Events committed all along: units going out of service and back (dispatch work,
    // through a front that survives) and readings changing their wearers' status (stored by
    // the device shards' holders).
    let front = (owner + 1) % 3;
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let producer = {
        let (stop, produced) = (stop.clone(), produced.clone());
        let (client, base) = (bc.cluster.client.clone(), bc.cluster.url(front, ""));
        let gateway = bc.cluster.gateway.clone();
        let crews = crews.clone();
        actix_web::rt::spawn(async move {
            let send = async |path: &str, token: &str, body: Value| {
                let started = Instant::now();
                loop {
                    let sent = client
                        .post(format!("{base}{path}"))
                        .bearer_auth(token)
                        .json(&body)
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status().is_success() => return,
                        Ok(r) if r.status() == 503 => {}
                        Ok(r) => panic!("{path}: {} {}", r.status(), r.text().await.unwrap()),
                        Err(_) => {}
                    }
                    assert!(started.elapsed() < PATIENCE, "{path} never answered");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            let mut i: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                // Each unit in turn: out of service, then available again.
                let unit = (i / 2) % 2;
                let status = if (i / 4).is_multiple_of(2) {
                    "out_of_service"
                } else {
                    "available"
                };
                if i.is_multiple_of(2) {
                    send(
                        &api::unit_status(format!("RU-{unit}")),
                        &crews[unit as usize],
                        json!({"status": status}),
                    )
                    .await;
                }
                // Every wearer abnormal (the setup), then normal, then abnormal…
                let (hr, spo2) = if (i / 6).is_multiple_of(2) {
                    (72, 98)
                } else {
                    (125, 93)
                };
                let device = format!("rw-{}", i % 6);
                send(
                    api::VITALS,
                    &gateway,
                    json!({"device_id": device, "timestamp": now_rfc3339(),
                           "heart_rate_bpm": hr, "spo2_pct": spo2}),
                )
                .await;
                i += 1;
                produced.store(i, Ordering::Relaxed);
            }
        })
    };
    let produced_at_least = async |n: u64| {
        eventually(&format!("{n} rounds of events"), || async {
            (produced.load(Ordering::Relaxed) >= n).then_some(())
        })
        .await;
    };
    produced_at_least(15).await;
    bc.cluster.kill9(owner);
    // The cursor the dead holder stored last: nothing at or below it is published again.
    let stored_cursor = {
        let mut conn = bc.cluster.db.conn().await.unwrap();
        cursors::read(&mut conn, shers::bus::amqp::CURSOR)
            .await
            .unwrap()
    };
    let killed_at = produced.load(Ordering::Relaxed);
    let next = bc
        .cluster
        .wait_owner(Some(owner), Duration::from_secs(15))
        .await;
    produced_at_least(killed_at + 15).await;
    stop.store(true, Ordering::Relaxed);
    producer.await.unwrap();

    let stored = tap.until_caught_up(&bc).await;
    let mut times: HashMap<i64, usize> = HashMap::new();
    for (seq, id) in &tap.seen {
        assert_eq!(*id, format!("shers-{seq}"), "a repeat under another id");
        *times.entry(*seq).or_default() += 1;
    }
    let committed: BTreeSet<i64> = stored.iter().copied().collect();
    for seq in times.keys() {
        assert!(
            committed.contains(seq),
            "event {seq} published, never committed"
        );
    }
    let repeated: Vec<i64> = times
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, _)| *s)
        .collect();
    eprintln!(
        "{} events, {} messages, {} repeated after the failover (cursor {stored_cursor} at the kill)",
        stored.len(),
        tap.seen.len(),
        repeated.len()
    );
    assert!(
        repeated.iter().all(|s| *s > stored_cursor),
        "published again at or below the stored cursor {stored_cursor}: {repeated:?}"
    );
    assert!(
        repeated.len() <= RELAY_BATCH,
        "{} events published again",
        repeated.len()
    );
    assert!(times.values().all(|n| *n <= 2), "{times:?}");
    // Each message arrives in sequence order but for the repeated batch.
    let first: Vec<i64> = {
        let mut seen = BTreeSet::new();
        tap.seen
            .iter()
            .filter(|(s, _)| seen.insert(*s))
            .map(|(s, _)| *s)
            .collect()
    };
    assert_eq!(first, stored, "first arrivals in sequence order");
    assert_eq!(
        publishers(&bc).await,
        vec![next],
        "only the new holder relays"
    );
    bc.bus.clean().await;
}

/// An MQTT `offline` status goes to whichever node the shared subscription picks: for devices
/// on every node's shards, each is recorded once (by the shard's holder, over
/// `POST /internal/v1/devices/offline` when another node received it), and a repeat records
/// nothing more.
#[actix_web::test]
async fn mqtt_offline_on_another_nodes_shard_is_recorded_once() {
    let Some(bc) = BusCluster::start(async |_| {}).await else {
        return;
    };
    let c = &bc.cluster;
    const N: usize = 12;
    let devices: Vec<String> = (0..N).map(|i| format!("bo-{i}")).collect();
    for (i, device) in devices.iter().enumerate() {
        c.register_wearer(i % 3, &format!("bop-{i}"), device).await;
    }
    let mut on = BTreeSet::new();
    for d in &devices {
        on.insert(bc.holder_of(d).await);
    }
    assert_eq!(on.len(), 3, "the devices land on every node");

    // Heard first (a device never heard has nothing to go offline from).
    let client = bc.mqtt_device().await;
    let at = now_rfc3339();
    for device in &devices {
        let reading = json!({"device_id": device, "timestamp": at, "heart_rate_bpm": 72,
                             "spo2_pct": 98});
        client
            .publish(
                &format!("{}/{device}/vitals", bc.prefix),
                reading.to_string(),
            )
            .await;
    }
    for device in &devices {
        bc.until_applied(device).await;
    }

    for device in &devices {
        client
            .publish(&format!("{}/{device}/status", bc.prefix), "offline")
            .await;
    }
    let offline_of = async || {
        let mut by_device: HashMap<String, usize> = HashMap::new();
        for e in c.events_of("device.offline").await {
            *by_device
                .entry(e.device_id.as_deref().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
        by_device
    };
    eventually("every device offline", || async {
        let by_device = offline_of().await;
        devices
            .iter()
            .all(|d| by_device.contains_key(d))
            .then_some(())
    })
    .await;

    // Some went through another node than the holder.
    let mut forwarded = 0.0;
    for i in 0..3 {
        forwarded += sample(
            &bc.metrics(i).await,
            "http_requests_total",
            &["route=\"/internal/v1/devices/offline\"", "status=\"200\""],
        );
    }
    assert!(
        forwarded > 0.0,
        "no offline status reached another node's shard"
    );

    // Said again: applied (counted) by the nodes, recorded no more.
    for device in &devices {
        client
            .publish(&format!("{}/{device}/status", bc.prefix), "offline")
            .await;
    }
    eventually("every status applied", || async {
        let mut applied = 0.0;
        for i in 0..3 {
            applied += sample(
                &bc.metrics(i).await,
                "shers_mqtt_consumed_total",
                &["kind=\"status\""],
            );
        }
        (applied >= 2.0 * N as f64).then_some(())
    })
    .await;
    let by_device = offline_of().await;
    assert_eq!(by_device.len(), N, "{by_device:?}");
    assert!(by_device.values().all(|n| *n == 1), "{by_device:?}");
    bc.bus.clean().await;
}
