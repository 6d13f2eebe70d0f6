//! Vitals ingest over HTTP and WebSocket, the device actors, status events and the fall window.

use chrono::{Duration, SecondsFormat, Utc};
use futures_util::{SinkExt as _, StreamExt as _};
use proptest::strategy::{Strategy, ValueTree};
use reqwest::StatusCode;
use serde_json::{Value, json};
use shers::actors::device::CheckTimers;
use shers::actors::device::Lookup;
use shers::domain::auth::Role;
use shers::domain::ids::DeviceId;
use shers::domain::triage::TriageStatus;
use shers::persistence::Backend;

use crate::both_backends;
use crate::helpers::{TestApp, api};

both_backends!(
    emergency_reading_is_triaged_and_recorded,
    status_events_only_on_change,
    batches_accept_good_and_reject_bad,
    fall_without_movement_escalates,
    fall_with_movement_stands_down,
    movement_in_the_same_second_as_the_fall_stands_it_down,
    a_device_takes_readings_while_its_emergency_is_dispatched,
    retention_all_keeps_every_reading,
    a_repeated_reading_is_answered_as_before_and_stores_nothing,
    a_single_node_serves_no_node_to_node_endpoint,
    a_running_fall_watch_escalates_after_a_restart_without_another_reading,
);

fn ts(offset_s: i64) -> String {
    (Utc::now() - Duration::seconds(600) + Duration::seconds(offset_s))
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn normal(device: &str, t: i64) -> Value {
    json!({"device_id": device, "timestamp": ts(t), "heart_rate_bpm": 72, "spo2_pct": 98,
           "respiration_rate_bpm": 14, "body_temp_c": 36.8})
}

fn emergency(device: &str, t: i64) -> Value {
    json!({"device_id": device, "timestamp": ts(t), "heart_rate_bpm": 165, "spo2_pct": 86,
           "location": {"lat": 51.51, "lng": -0.13}})
}

async fn emergency_reading_is_triaged_and_recorded(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("p-1", "watch-1").await;
    let resp = app.post_vitals(&emergency("watch-1", 0)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["rejected"], json!([]));
    let result = &body["results"][0];
    assert_eq!(result["index"], 0);
    assert_eq!(result["device_id"], "watch-1");
    assert_eq!(result["status"], "emergency");
    let reasons = result["reasons"].as_array().unwrap();
    assert!(
        reasons.iter().any(|r| r.as_str().unwrap().contains("SpO2")),
        "{reasons:?}"
    );
    assert!(
        result["news2"]["missing"]
            .as_array()
            .unwrap()
            .contains(&json!("systolic_bp"))
    );

    let changes = app.events_of("vitals.status_changed").await;
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].device_id.as_deref(), Some("watch-1"));
    assert_eq!(changes[0].data["to"], "emergency");
    assert_eq!(changes[0].data["evidence"][0]["heart_rate_bpm"], 165.0);
    // The hand-off opened the patient's incident at the reading's location.
    let created = app.events_of("incident.created").await;
    assert_eq!(created.len(), 1);
    assert_eq!(
        result["incident_id"],
        created[0].incident_id.unwrap().to_string()
    );
    assert_eq!(created[0].data["patient_id"], "p-1");
    assert_eq!(created[0].data["source"], "wearable");
    assert_eq!(created[0].data["location"]["lat"], 51.51);
    // Evidence readings are retained by default.
    let mut conn = app.db.conn().await.unwrap();
    let kept = shers::persistence::readings::count_for_device(&mut conn, &"watch-1".into())
        .await
        .unwrap();
    assert_eq!(kept, 1);
}

async fn status_events_only_on_change(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("p-1", "a").await;
    app.register_wearer("p-2", "b").await;
    // E, E → one event.
    for t in [0, 1] {
        assert_eq!(
            app.post_vitals(&emergency("a", t)).await.status(),
            StatusCode::OK
        );
    }
    // E, N, E → three events.
    for body in [emergency("b", 0), normal("b", 1), emergency("b", 2)] {
        assert_eq!(app.post_vitals(&body).await.status(), StatusCode::OK);
    }
    let events = app.events_of("vitals.status_changed").await;
    let for_device = |d: &str| {
        events
            .iter()
            .filter(|e| e.device_id.as_deref() == Some(d))
            .map(|e| e.data["to"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(for_device("a"), ["emergency"]);
    assert_eq!(for_device("b"), ["emergency", "normal", "emergency"]);

    // An out-of-order normal reading is answered but does not roll the state back.
    let late = app.post_vitals(&normal("b", -100)).await;
    let body: Value = late.json().await.unwrap();
    assert_eq!(body["results"][0]["status"], "normal");
    assert_eq!(app.events_of("vitals.status_changed").await.len(), 4);
    let (addr, _) = app
        .devices
        .send(Lookup(DeviceId::from("b")))
        .await
        .unwrap()
        .unwrap();
    let status = addr.send(CheckTimers { now: Utc::now() }).await.unwrap();
    assert_eq!(status, Some(TriageStatus::Emergency));
}

async fn batches_accept_good_and_reject_bad(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("p-1", "w1").await;
    let batch = json!({"readings": [
        normal("w1", 0),
        {"device_id": "w1", "timestamp": ts(1), "heart_rate_bpm": "fast"},
        {"device_id": "nobody", "timestamp": ts(2), "heart_rate_bpm": 80},
        {"device_id": "w1", "timestamp": ts(3)},
        {"device_id": "w1", "timestamp": ts(4), "systolic_bp_mmhg": 80, "diastolic_bp_mmhg": 90},
        {"device_id": "w1", "timestamp": (Utc::now() + Duration::hours(1)).to_rfc3339(), "heart_rate_bpm": 80},
        {"device_id": "w1", "patient_id": "someone-else", "timestamp": ts(6), "heart_rate_bpm": 80},
        emergency("w1", 7),
    ]});
    let resp = app.post_vitals(&batch).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["accepted"], 2);
    let rejected: Vec<(u64, String)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["errors"][0]["pointer"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        rejected,
        [
            (1, "/readings/1/heart_rate_bpm".to_owned()),
            (2, "/readings/2/device_id".to_owned()),
            (3, "/readings/3".to_owned()),
            (4, "/readings/4/diastolic_bp_mmhg".to_owned()),
            (5, "/readings/5/timestamp".to_owned()),
            (6, "/readings/6/patient_id".to_owned()),
        ],
        "{body}"
    );
    assert_eq!(body["results"][1]["index"], 7);
    assert_eq!(body["results"][1]["status"], "emergency");

    // A single bad reading is a 422 naming the field.
    for (reading, pointer) in [
        (
            json!({"device_id": "w1", "timestamp": ts(10), "heart_rate_bpm": "NaN"}),
            "/heart_rate_bpm",
        ),
        (
            json!({"device_id": "w1", "timestamp": ts(10), "heart_rate_bpm": 400}),
            "/heart_rate_bpm",
        ),
        (
            json!({"device_id": "ghost", "timestamp": ts(10), "heart_rate_bpm": 80}),
            "/device_id",
        ),
    ] {
        let resp = app.post_vitals(&reading).await;
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let problem: Value = resp.json().await.unwrap();
        assert_eq!(problem["errors"][0]["pointer"], pointer, "{problem}");
    }
}

async fn fall_without_movement_escalates(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("p-1", "f1").await;
    let fall =
        json!({"device_id": "f1", "timestamp": ts(0), "heart_rate_bpm": 80, "fall_detected": true});
    let body: Value = app.post_vitals(&fall).await.json().await.unwrap();
    assert_eq!(body["results"][0]["status"], "abnormal");
    let (addr, _) = app
        .devices
        .send(Lookup(DeviceId::from("f1")))
        .await
        .unwrap()
        .unwrap();
    let now = Utc::now();
    // Inside the grace window nothing happens…
    let status = addr
        .send(CheckTimers {
            now: now + Duration::seconds(30),
        })
        .await
        .unwrap();
    assert_eq!(status, Some(TriageStatus::Abnormal));
    // …after it, without movement, it escalates.
    let status = addr
        .send(CheckTimers {
            now: now + Duration::seconds(61),
        })
        .await
        .unwrap();
    assert_eq!(status, Some(TriageStatus::Emergency));
    let changes: Vec<String> = app
        .events_of("vitals.status_changed")
        .await
        .iter()
        .map(|e| e.data["to"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(changes, ["abnormal", "emergency"]);
    let created = app.events_of("incident.created").await;
    assert_eq!(created.len(), 1);
    assert!(
        created[0].data["description"]
            .as_str()
            .unwrap()
            .contains("fall without movement")
    );
}

async fn fall_with_movement_stands_down(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("p-1", "f2").await;
    let fall =
        json!({"device_id": "f2", "timestamp": ts(0), "heart_rate_bpm": 80, "fall_detected": true});
    app.post_vitals(&fall).await;
    let moving =
        json!({"device_id": "f2", "timestamp": ts(20), "heart_rate_bpm": 85, "moving": true});
    let body: Value = app.post_vitals(&moving).await.json().await.unwrap();
    assert_eq!(body["results"][0]["status"], "normal", "{body}");
    let (addr, _) = app
        .devices
        .send(Lookup(DeviceId::from("f2")))
        .await
        .unwrap()
        .unwrap();
    let status = addr
        .send(CheckTimers {
            now: Utc::now() + Duration::seconds(120),
        })
        .await
        .unwrap();
    assert_eq!(status, Some(TriageStatus::Normal));
    assert!(app.events_of("incident.created").await.is_empty());
}

/// A wearer who moves right after falling reports movement stamped with the fall's own second:
/// it arrived after the fall, so it stands the fall down, one request after the other or both
/// in one batch.
async fn movement_in_the_same_second_as_the_fall_stands_it_down(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("p-1", "f3").await;
    app.register_wearer("p-2", "f4").await;
    // One timestamp for both readings of a device, to the millisecond.
    let at = ts(0);
    let fall = |device: &str| json!({"device_id": device, "timestamp": at, "heart_rate_bpm": 80, "fall_detected": true});
    let moving = |device: &str| json!({"device_id": device, "timestamp": at, "heart_rate_bpm": 85, "moving": true});
    let body: Value = app.post_vitals(&fall("f3")).await.json().await.unwrap();
    assert_eq!(body["results"][0]["status"], "abnormal", "{body}");
    let body: Value = app.post_vitals(&moving("f3")).await.json().await.unwrap();
    assert_eq!(body["results"][0]["status"], "normal", "{body}");
    let batch = json!({"readings": [fall("f4"), moving("f4")]});
    let body: Value = app.post_vitals(&batch).await.json().await.unwrap();
    assert_eq!(body["results"][1]["status"], "normal", "{body}");
    for device in ["f3", "f4"] {
        let (addr, _) = app
            .devices
            .send(Lookup(DeviceId::from(device)))
            .await
            .unwrap()
            .unwrap();
        let status = addr
            .send(CheckTimers {
                now: Utc::now() + Duration::seconds(120),
            })
            .await
            .unwrap();
        assert_eq!(status, Some(TriageStatus::Normal), "{device}");
    }
    assert!(app.events_of("incident.created").await.is_empty());
}

/// The device actor is not held while its emergency is handed off and dispatched: with the
/// routing service holding the first round's ETA request open, an operator's inspection of
/// the same device is answered while the emergency's own request is still waiting; the
/// wearer's next reading, a change of status, is stored after the emergency's and answered
/// once it is; and the emergency still gets its incident once routing gives up.
async fn a_device_takes_readings_while_its_emergency_is_dispatched(backend: Backend) {
    // A routing service that accepts connections and answers nothing until released.
    let routing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let routing_port = routing.local_addr().unwrap().port();
    let (asked_tx, mut asked) = tokio::sync::mpsc::channel(8);
    let held = actix_web::rt::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = routing.accept().await {
            open.push(conn);
            let _ = asked_tx.send(()).await;
        }
    });
    let app = TestApp::builder(backend)
        .with_settings(|s| {
            s.routing.base_url = Some(format!("http://127.0.0.1:{routing_port}"));
            // The call is held until the test drops it: never a timeout, however busy the
            // machine.
            s.routing.timeout_ms = 60_000;
        })
        .start()
        .await;
    app.add_unit("U-1", 51.511, -0.13, "als").await;
    app.register_wearer("p-1", "d-1").await;

    let gateway = app.token(Role::Gateway).await;
    let post = |body: Value| {
        let (client, url, gateway) = (
            app.client.clone(),
            app.url("/api/v1/vitals"),
            gateway.clone(),
        );
        actix_web::rt::spawn(async move {
            let resp = client
                .post(url)
                .bearer_auth(gateway)
                .json(&body)
                .send()
                .await;
            resp.unwrap().json::<Value>().await.unwrap()
        })
    };
    let first = post(emergency("d-1", 0));
    // The first round is being ranked: dispatch is under way.
    asked
        .recv()
        .await
        .expect("dispatch asked the routing service");
    let inspected = app.get("/admin/actors/device/d-1", Some(Role::Admin)).await;
    assert_eq!(inspected.status(), 200);
    assert!(
        !first.is_finished(),
        "the device was inspected only after its emergency's dispatch"
    );
    let second = post(normal("d-1", 1));
    // Routing gives up (connections dropped): straight-line fallback, and the incident.
    held.abort();
    let first = first.await.unwrap();
    assert!(first["results"][0]["incident_id"].is_string(), "{first}");
    let second = second.await.unwrap();
    assert_eq!(second["results"][0]["status"], "normal", "{second}");
    // Stored in the order they were measured.
    let changes: Vec<String> = app
        .events_of("vitals.status_changed")
        .await
        .iter()
        .map(|e| e.data["to"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(changes, ["emergency", "normal"]);
}

async fn retention_all_keeps_every_reading(backend: Backend) {
    let app = TestApp::builder(backend)
        .with_settings(|s| s.triage.raw_retention = shers::config::Retention::All)
        .start()
        .await;
    app.register_wearer("p-1", "r1").await;
    let readings: Vec<Value> = (0..50).map(|t| normal("r1", t)).collect();
    let body: Value = app
        .post_vitals(&json!({"readings": readings}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["accepted"], 50);
    let mut conn = app.db.conn().await.unwrap();
    let kept = shers::persistence::readings::count_for_device(&mut conn, &"r1".into())
        .await
        .unwrap();
    assert_eq!(kept, 50);
}

async fn a_repeated_reading_is_answered_as_before_and_stores_nothing(backend: Backend) {
    let app = TestApp::builder(backend)
        .with_settings(|s| s.triage.raw_retention = shers::config::Retention::All)
        .start()
        .await;
    app.register_wearer("p-1", "r1").await;
    // Bodies built once: `ts` reads the clock.
    let calm = normal("r1", 0);
    let first: Value = app.post_vitals(&calm).await.json().await.unwrap();
    let abnormal = json!({"device_id": "r1", "timestamp": ts(1), "heart_rate_bpm": 118,
                          "spo2_pct": 98, "respiration_rate_bpm": 14, "body_temp_c": 36.8});
    let second: Value = app.post_vitals(&abnormal).await.json().await.unwrap();
    // Both again, as a client's retry or a broker's redelivery would send them.
    let again: Value = app
        .post_vitals(&json!({"readings": [calm, abnormal]}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["accepted"], 2, "{again}");
    assert_eq!(again["results"][0]["status"], first["results"][0]["status"]);
    assert_eq!(
        again["results"][1]["status"],
        second["results"][0]["status"]
    );
    assert_eq!(second["results"][0]["status"], "abnormal", "{second}");
    let mut conn = app.db.conn().await.unwrap();
    let kept = shers::persistence::readings::count_for_device(&mut conn, &"r1".into())
        .await
        .unwrap();
    assert_eq!(kept, 2, "the repeats stored nothing");
    let changes = app.events_of("vitals.status_changed").await.len();
    // A reading differing in one value is new.
    let mut changed = abnormal.clone();
    changed["heart_rate_bpm"] = json!(119);
    let third: Value = app.post_vitals(&changed).await.json().await.unwrap();
    assert_eq!(third["accepted"], 1);
    let kept = shers::persistence::readings::count_for_device(&mut conn, &"r1".into())
        .await
        .unwrap();
    assert_eq!(kept, 3);
    assert_eq!(app.events_of("vitals.status_changed").await.len(), changes);
}

#[actix_web::test]
async fn body_level_errors() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.register_wearer("p-1", "w1").await;
    let gateway = app.token(Role::Gateway).await;
    let send = |body: Vec<u8>| {
        let req = app
            .client
            .post(app.url(api::VITALS))
            .bearer_auth(&gateway)
            .header("content-type", "application/json")
            .body(body);
        async move { req.send().await.unwrap() }
    };
    // 1,001 readings.
    let many: Vec<Value> = (0..1001).map(|t| normal("w1", t % 500)).collect();
    let resp = send(json!({"readings": many}).to_string().into_bytes()).await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = resp.json().await.unwrap();
    assert_eq!(problem["errors"][0]["pointer"], "/readings");
    // 2 MB.
    let resp = send(vec![b' '; 2 * 1024 * 1024]).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Invalid JSON.
    let resp = send(b"{\"device_id\": \"w1\",".to_vec()).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // Wrong role.
    let resp = app
        .post_json(api::VITALS, Some(Role::Console), &normal("w1", 0))
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

#[actix_web::test]
async fn random_json_never_breaks_the_endpoint() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.register_wearer("p-1", "w1").await;
    let leaf = proptest::prop_oneof![
        proptest::strategy::Just(Value::Null),
        proptest::bool::ANY.prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        "[a-z_0-9]{0,12}".prop_map(Value::from),
        proptest::strategy::Just(Value::from("w1")),
        proptest::strategy::Just(Value::from(ts(0))),
    ];
    let keys = proptest::prop_oneof![
        proptest::strategy::Just("device_id".to_owned()),
        proptest::strategy::Just("timestamp".to_owned()),
        proptest::strategy::Just("heart_rate_bpm".to_owned()),
        proptest::strategy::Just("readings".to_owned()),
        proptest::strategy::Just("resourceType".to_owned()),
        proptest::strategy::Just("metrics".to_owned()),
        "[a-z]{1,6}",
    ];
    let json = leaf.prop_recursive(4, 48, 6, move |inner| {
        proptest::prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            proptest::collection::hash_map(keys.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for _ in 0..150 {
        let value = json.new_tree(&mut runner).unwrap().current();
        let resp = app.post_vitals(&value).await;
        let status = resp.status().as_u16();
        assert!(matches!(status, 200 | 400 | 422), "{status} for {value}");
        if status != 200 {
            assert_eq!(resp.headers()["content-type"], "application/problem+json");
        }
    }
    // The service is still healthy afterwards.
    assert_eq!(
        app.post_vitals(&normal("w1", 0)).await.status(),
        StatusCode::OK
    );
}

#[actix_web::test]
async fn gateway_websocket_round_trip() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.register_wearer("p-1", "ws1").await;
    let token = app.token(Role::Gateway).await;
    let url = app.ws_gateway_url(Some(&token));
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    use tokio_tungstenite::tungstenite::Message;
    socket
        .send(Message::text(emergency("ws1", 0).to_string()))
        .await
        .unwrap();
    let reply = next_text(&mut socket).await;
    assert_eq!(reply["results"][0]["status"], "emergency");
    let batch = json!({"readings": [normal("ws1", 1), normal("ws1", 2)]});
    socket.send(Message::text(batch.to_string())).await.unwrap();
    let reply = next_text(&mut socket).await;
    assert_eq!(reply["accepted"], 2);
    socket.send(Message::text("{not json")).await.unwrap();
    let reply = next_text(&mut socket).await;
    assert_eq!(reply["status"], 400);
    socket.close(None).await.unwrap();

    // Without a token the upgrade is refused.
    let bare = app.ws_gateway_url(None);
    assert!(tokio_tungstenite::connect_async(bare).await.is_err());
}

async fn next_text(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    loop {
        match socket.next().await.unwrap().unwrap() {
            tokio_tungstenite::tungstenite::Message::Text(t) => {
                return serde_json::from_str(&t).unwrap();
            }
            tokio_tungstenite::tungstenite::Message::Ping(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

#[actix_web::test]
async fn an_invalid_rules_file_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.toml");
    std::fs::write(
        &file,
        "[heart_rate]\nabnormal_above = 200\nemergency_above = 150\n",
    )
    .unwrap();
    let mut settings = shers::config::Settings::default();
    settings.triage.rules_file = Some(file.clone());
    let err = settings.triage.rules().unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("invalid triage rules file"), "{text}");
    assert!(text.contains("heart_rate"), "{text}");
    std::fs::write(&file, "[heart_rate]\nemergency_above = 160\n").unwrap();
    let rules = settings.triage.rules().unwrap();
    assert_eq!(rules.fall_grace_s, 60);
}

both_backends!(devices_first_seen_together_resume_from_their_stored_status);

/// After a restart, a batch whose devices have no actor yet: they are loaded together (one
/// query) and each resumes from its own stored status; an unregistered one is refused.
async fn devices_first_seen_together_resume_from_their_stored_status(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for (patient, device) in [("p-1", "a"), ("p-2", "b"), ("p-3", "c")] {
        app.register_wearer(patient, device).await;
    }
    assert_eq!(
        app.post_vitals(&emergency("a", 0)).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        app.post_vitals(&emergency("b", 0)).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        app.post_vitals(&normal("b", 1)).await.status(),
        StatusCode::OK
    );
    let before = app.events_of("vitals.status_changed").await.len();
    assert_eq!(before, 3);

    let tdb = app.kill().await;
    let app = TestApp::builder(backend).start_on(tdb).await;
    let batch = json!({"readings": [
        emergency("a", 10),
        normal("b", 10),
        emergency("c", 10),
        normal("a", 11),
        {"device_id": "nobody", "timestamp": ts(10), "heart_rate_bpm": 80},
    ]});
    let resp = app.post_vitals(&batch).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["accepted"], 4, "{body}");
    assert_eq!(body["rejected"][0]["index"], 4, "{body}");
    assert_eq!(
        body["rejected"][0]["errors"][0]["pointer"], "/readings/4/device_id",
        "{body}"
    );
    // a was in emergency and stays there until its normal reading; b was normal; c is new.
    let changes: Vec<(String, String, String)> = app
        .events_of("vitals.status_changed")
        .await
        .into_iter()
        .skip(before)
        .map(|e| {
            (
                e.device_id.unwrap().0,
                e.data["from"].as_str().unwrap().to_owned(),
                e.data["to"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut changes = changes;
    changes.sort();
    assert_eq!(
        changes,
        [
            ("a".into(), "emergency".into(), "normal".into()),
            ("c".into(), "normal".into(), "emergency".into()),
        ]
    );
}

both_backends!(silent_devices_go_offline_and_come_back);

async fn silent_devices_go_offline_and_come_back(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("p-1", "o1").await;
    app.post_vitals(&emergency("o1", 0)).await;
    let (addr, restarts) = app
        .devices
        .send(Lookup(DeviceId::from("o1")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(restarts, 0);
    // Before the silence limit nothing happens.
    let status = addr
        .send(CheckTimers {
            now: Utc::now() + Duration::seconds(200),
        })
        .await
        .unwrap();
    assert_eq!(status, Some(TriageStatus::Emergency));
    assert!(app.events_of("device.offline").await.is_empty());
    // After it, device.offline is recorded and the idle actor stops.
    addr.send(CheckTimers {
        now: Utc::now() + Duration::seconds(301),
    })
    .await
    .unwrap();
    crate::helpers::eventually("the idle actor stopped", || async {
        (!addr.connected()).then_some(())
    })
    .await;
    let offline = app.events_of("device.offline").await;
    assert_eq!(offline.len(), 1);
    assert_eq!(offline[0].device_id.as_deref(), Some("o1"));
    // The next reading restarts it transparently, resuming from the persisted status:
    // another emergency is not a status change.
    let body: Value = app
        .post_vitals(&emergency("o1", 5))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["results"][0]["status"], "emergency");
    let (_, restarts) = app
        .devices
        .send(Lookup(DeviceId::from("o1")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(restarts, 1);
    assert_eq!(app.events_of("vitals.status_changed").await.len(), 1);
    // An older reading than the last persisted one does not roll the state back either.
    let body: Value = app
        .post_vitals(&normal("o1", 1))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["accepted"], 1);
    assert_eq!(app.events_of("vitals.status_changed").await.len(), 1);
}

/// `POST /internal/v1/emergencies` is how a cluster node's device actors reach the dispatch
/// holder: a single node has no other nodes, so it serves no node-to-node endpoint to anyone,
/// an admin included (the hand-off itself is tested on a real cluster, `cluster.rs`).
async fn a_single_node_serves_no_node_to_node_endpoint(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("np-1", "nw-1").await;
    let body = json!({
        "patient_id": "np-1", "device_id": "nw-1", "location": {"lat": 51.5, "lng": -0.12},
        "reasons": ["heart rate 165 bpm"], "evidence": [], "detected_at": ts(0), "onset": true
    });
    let path = "/internal/v1/emergencies";
    assert_eq!(app.post_json(path, None, &body).await.status(), 404);
    for role in [Role::Admin, Role::Console, Role::Gateway] {
        assert_eq!(
            app.post_json(path, Some(role), &body).await.status(),
            404,
            "{role}"
        );
    }
    assert!(app.events_of("incident.created").await.is_empty());
}

/// A fall watch running when the server stops (a restart, or on a cluster the wearable's shard
/// moving to another node) is stored with the device: the next server starts the device's
/// actor at once and the watch escalates on time, though the wearable says nothing more.
async fn a_running_fall_watch_escalates_after_a_restart_without_another_reading(backend: Backend) {
    // A long grace: the first server's actor (which lives on in this test process after its
    // server stops) must not be the one that escalates.
    let grace = |s: &mut shers::config::Settings| s.triage.fall_grace_s = Some(600);
    let app = TestApp::builder(backend).with_settings(grace).start().await;
    app.register_wearer("p-1", "f1").await;
    let fall =
        json!({"device_id": "f1", "timestamp": ts(0), "heart_rate_bpm": 80, "fall_detected": true});
    let body: Value = app.post_vitals(&fall).await.json().await.unwrap();
    assert_eq!(body["results"][0]["status"], "abnormal");
    let tdb = app.kill().await;
    // The stored watch, as the first server left it, then moved on as if its grace were nearly
    // over.
    let db = tdb.connect().await;
    let mut conn = db.conn().await.unwrap();
    let stored = shers::persistence::patients::find_device(&mut conn, &DeviceId::from("f1"))
        .await
        .unwrap()
        .unwrap();
    let (fall_at, deadline) = stored.fall.expect("the running watch is stored");
    assert!(deadline > Utc::now() + Duration::seconds(500), "{deadline}");
    shers::persistence::patients::set_device_status(
        &mut conn,
        &DeviceId::from("f1"),
        "abnormal",
        stored.last_seen_at.unwrap(),
        Some((fall_at, Utc::now() + Duration::seconds(1))),
    )
    .await
    .unwrap();
    drop(conn);
    let app = TestApp::builder(backend)
        .with_settings(grace)
        .start_on(tdb)
        .await;
    let created =
        crate::helpers::eventually("the fall watch escalated after the restart", || async {
            let created = app.events_of("incident.created").await;
            (!created.is_empty()).then_some(created)
        })
        .await;
    assert!(
        created[0].data["description"]
            .as_str()
            .unwrap()
            .contains("fall without movement"),
        "{:?}",
        created[0].data
    );
    // Escalated: the stored watch is cleared, so a further restart does not repeat it.
    let changes: Vec<String> = app
        .events_of("vitals.status_changed")
        .await
        .iter()
        .map(|e| e.data["to"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(changes, ["abnormal", "emergency"]);
    let mut conn = app.db.conn().await.unwrap();
    let stored = shers::persistence::patients::find_device(&mut conn, &DeviceId::from("f1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.fall, None);
    assert_eq!(stored.last_status.as_deref(), Some("emergency"));
}

both_backends!(
    a_silent_device_goes_offline_on_time_after_a_restart,
    a_fall_cancel_stops_the_escalation,
    a_fall_cancel_after_a_restart_stands_the_resumed_watch_down,
    a_fall_cancel_is_false_without_a_watch_404_for_unknown_and_403_for_others,
);

/// A wearable read once, then the server died: the next server records its `device.offline`
/// once, not before the silence limit, though no further reading comes and no actor of the
/// device runs (the offline sweep of the stored `heard_at`).
async fn a_silent_device_goes_offline_on_time_after_a_restart(backend: Backend) {
    let limit_s = 2;
    let limit = |s: &mut shers::config::Settings| s.triage.device_offline_s = limit_s;
    let app = TestApp::builder(backend).with_settings(limit).start().await;
    app.register_wearer("p-1", "o1").await;
    let reading = normal("o1", 0);
    let heard = Utc::now();
    assert_eq!(app.post_vitals(&reading).await.status(), StatusCode::OK);
    let tdb = app.kill().await;

    let app = TestApp::builder(backend)
        .with_settings(limit)
        .start_on(tdb)
        .await;
    let offline = crate::helpers::eventually("device.offline after the restart", || async {
        let found = app.events_of("device.offline").await;
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert_eq!(offline.len(), 1, "{offline:?}");
    let event = &offline[0];
    assert_eq!(event.device_id.as_deref(), Some("o1"));
    assert_eq!(event.data["patient_id"], "p-1");
    assert_eq!(event.data["silent_s"], limit_s);
    let measured: chrono::DateTime<Utc> = reading["timestamp"].as_str().unwrap().parse().unwrap();
    let last_seen: chrono::DateTime<Utc> = event.data["last_seen_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(last_seen, measured);
    // Never early: not before the limit has passed since the reading was answered.
    assert!(
        event.at >= heard + Duration::seconds(limit_s as i64),
        "recorded at {} for a reading heard at {heard}",
        event.at
    );
    // Without an actor, and once: the stored mark is cleared, so no later sweep finds it.
    assert!(
        app.devices
            .send(Lookup(DeviceId::from("o1")))
            .await
            .unwrap()
            .is_none()
    );
    let mut conn = app.db.conn().await.unwrap();
    let stored = shers::persistence::patients::find_device(&mut conn, &DeviceId::from("o1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.heard_at, None);
    drop(conn);
    // Heard again, it is tracked again.
    assert_eq!(
        app.post_vitals(&normal("o1", 5)).await.status(),
        StatusCode::OK
    );
    let mut conn = app.db.conn().await.unwrap();
    let stored = shers::persistence::patients::find_device(&mut conn, &DeviceId::from("o1"))
        .await
        .unwrap()
        .unwrap();
    assert!(stored.heard_at.is_some_and(|h| h >= heard));
    assert_eq!(app.events_of("device.offline").await.len(), 1);
}

fn fall(device: &str, t: i64) -> Value {
    json!({"device_id": device, "timestamp": ts(t), "heart_rate_bpm": 80, "spo2_pct": 97,
           "fall_detected": true})
}

/// The device's actor, which must be running.
async fn actor_of(app: &TestApp, device: &str) -> actix::Addr<shers::actors::device::DeviceActor> {
    app.devices
        .send(Lookup(DeviceId::from(device)))
        .await
        .unwrap()
        .expect("the device's actor runs")
        .0
}

/// "I'm OK" from the wearer's app during the grace window: 200 `cancelled: true`, stored as
/// `device.fall_cancelled`, the status back to normal, the stored watch cleared, and the
/// deadline passes without an incident.
async fn a_fall_cancel_stops_the_escalation(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("patient-1", "f1").await;
    let body: Value = app.post_vitals(&fall("f1", 0)).await.json().await.unwrap();
    assert_eq!(body["results"][0]["status"], "abnormal", "{body}");
    let patient = app.token(Role::Patient).await;

    let resp = app.cancel_fall("f1", &patient).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"cancelled": true})
    );

    let cancelled = app.events_of("device.fall_cancelled").await;
    assert_eq!(cancelled.len(), 1);
    assert_eq!(cancelled[0].device_id.as_deref(), Some("f1"));
    assert_eq!(cancelled[0].stream_id, "device-f1");
    assert_eq!(cancelled[0].data["by"], "patient");
    assert_eq!(cancelled[0].data["patient_id"], "patient-1");
    assert!(cancelled[0].data["deadline"].is_string());
    // The grace window runs out (the timer's message, sent with a later time): nothing.
    let status = actor_of(&app, "f1")
        .await
        .send(CheckTimers {
            now: Utc::now() + Duration::seconds(120),
        })
        .await
        .unwrap();
    assert_eq!(status, Some(TriageStatus::Normal));
    assert!(app.events_of("incident.created").await.is_empty());
    let changes: Vec<String> = app
        .events_of("vitals.status_changed")
        .await
        .iter()
        .map(|e| e.data["to"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(changes, ["abnormal", "normal"]);
    // A restart finds no watch to resume.
    let mut conn = app.db.conn().await.unwrap();
    let stored = shers::persistence::patients::find_device(&mut conn, &DeviceId::from("f1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.fall, None);
    assert!(
        shers::persistence::patients::pending_falls(&mut conn)
            .await
            .unwrap()
            .is_empty()
    );
    drop(conn);
    // Said twice: nothing runs any more.
    let again: Value = app.cancel_fall("f1", &patient).await.json().await.unwrap();
    assert_eq!(again, json!({"cancelled": false}));
    assert_eq!(app.events_of("device.fall_cancelled").await.len(), 1);
}

/// A fall watch running when the server stopped is resumed by the next one; the gateway's
/// "I'm OK" reaches it there, and neither that server nor a later one escalates it.
async fn a_fall_cancel_after_a_restart_stands_the_resumed_watch_down(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("p-1", "f1").await;
    app.post_vitals(&fall("f1", 0)).await;
    let tdb = app.kill().await;
    let app = TestApp::builder(backend).start_on(tdb).await;

    let gateway = app.token(Role::Gateway).await;
    let resp = app.cancel_fall("f1", &gateway).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"cancelled": true})
    );
    let cancelled = app.events_of("device.fall_cancelled").await;
    assert_eq!(cancelled.len(), 1);
    assert_eq!(cancelled[0].data["by"], "gateway");
    let status = actor_of(&app, "f1")
        .await
        .send(CheckTimers {
            now: Utc::now() + Duration::seconds(120),
        })
        .await
        .unwrap();
    assert_eq!(status, Some(TriageStatus::Normal));
    assert!(app.events_of("incident.created").await.is_empty());

    let tdb = app.kill().await;
    let app = TestApp::builder(backend).start_on(tdb).await;
    let mut conn = app.db.conn().await.unwrap();
    let stored = shers::persistence::patients::find_device(&mut conn, &DeviceId::from("f1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.fall, None);
    assert_eq!(stored.last_status.as_deref(), Some("normal"));
    drop(conn);
    // The third server resumed nothing: no actor was started for the device.
    assert!(
        app.devices
            .send(Lookup(DeviceId::from("f1")))
            .await
            .unwrap()
            .is_none()
    );
}

/// Without a running watch the answer is `cancelled: false` and nothing is stored; an unknown
/// device is a 404; another patient's wearable, or a console, is refused.
async fn a_fall_cancel_is_false_without_a_watch_404_for_unknown_and_403_for_others(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("patient-1", "mine").await;
    app.register_wearer("p-2", "theirs").await;
    let (patient, gateway) = (
        app.token(Role::Patient).await,
        app.token(Role::Gateway).await,
    );

    // Never read, then read without a fall: nothing to cancel.
    let resp = app.cancel_fall("mine", &patient).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"cancelled": false})
    );
    app.post_vitals(&normal("mine", 0)).await;
    let resp = app.cancel_fall("mine", &gateway).await;
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"cancelled": false})
    );

    let resp = app.cancel_fall("nobody", &gateway).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");

    // Another patient's wearable, even with a watch running on it.
    app.post_vitals(&fall("theirs", 0)).await;
    let resp = app.cancel_fall("theirs", &patient).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let problem: Value = resp.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("own"),
        "{problem}"
    );
    for role in [Role::Console, Role::Admin, Role::Crew] {
        let token = app.token(role).await;
        assert_eq!(
            app.cancel_fall("theirs", &token).await.status(),
            StatusCode::FORBIDDEN,
            "{role}"
        );
    }
    let anonymous = app
        .client
        .post(app.url(&api::cancel_fall("theirs")))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert!(app.events_of("device.fall_cancelled").await.is_empty());
    // The refused cancels left the watch running.
    let inspected: Value = app
        .actor("device", "theirs", Role::Admin)
        .await
        .json()
        .await
        .unwrap();
    assert!(
        inspected["state"]["fall_deadline"].is_string(),
        "{inspected}"
    );
}
