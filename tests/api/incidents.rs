//! Incidents: dedup, idempotency, commands, supervision and recovery, on both databases.

use std::collections::HashSet;

use chrono::{Duration, SecondsFormat, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use shers::actors::incident::{IncidentError, Route};
use shers::domain::auth::Role;
use shers::domain::incident::Command;
use shers::persistence::Backend;

use crate::both_backends;
use crate::helpers::{TestApp, api};

both_backends!(
    wearable_emergencies_open_one_incident_per_patient,
    concurrent_readings_and_requests_make_one_incident,
    idempotency_key_replays_the_first_response,
    cancel_then_a_new_emergency_opens_a_new_incident,
    illegal_commands_are_rejected_not_applied,
    a_crashed_incident_actor_comes_back_with_its_state,
    open_incidents_survive_an_abrupt_stop,
    lists_page_with_cursors_and_filters,
    patients_act_only_for_themselves,
    references_are_unique_and_increase,
);

fn ts(offset_s: i64) -> String {
    (Utc::now() - Duration::seconds(600) + Duration::seconds(offset_s))
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn emergency(device: &str, t: i64) -> Value {
    json!({"device_id": device, "timestamp": ts(t), "heart_rate_bpm": 170, "spo2_pct": 85})
}

fn normal(device: &str, t: i64) -> Value {
    json!({"device_id": device, "timestamp": ts(t), "heart_rate_bpm": 70, "spo2_pct": 98})
}

async fn incident_of(app: &TestApp, reading: &Value) -> String {
    let body: Value = app.post_vitals(reading).await.json().await.unwrap();
    body["results"][0]["incident_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn count_incidents(app: &TestApp) -> usize {
    let page: Value = app
        .list_incidents("status=all&limit=200", Role::Console)
        .await
        .json()
        .await
        .unwrap();
    page["items"].as_array().unwrap().len()
}

async fn wearable_emergencies_open_one_incident_per_patient(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("p-1", "w1").await;
    let first = incident_of(&app, &emergency("w1", 0)).await;
    assert!(!first.is_empty());
    // E, E → one incident; E, N, E while open → still one.
    assert_eq!(incident_of(&app, &emergency("w1", 1)).await, first);
    app.post_vitals(&normal("w1", 2)).await;
    assert_eq!(incident_of(&app, &emergency("w1", 3)).await, first);
    assert_eq!(count_incidents(&app).await, 1);

    let detail: Value = app
        .incident(&first, Role::Console)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        detail["status"], "dispatching",
        "waits for the fleet (next issue)"
    );
    assert_eq!(detail["source"], "wearable");
    assert_eq!(detail["priority"], "emergency");
    assert_eq!(detail["patient_id"], "p-1");
    assert!(
        detail["reference"]
            .as_str()
            .unwrap()
            .starts_with(&format!("INC-{}-", Utc::now().format("%Y")))
    );
    assert!(detail["times"]["call_received"].is_string());
    // No location in the readings: the patient's home is used.
    assert_eq!(detail["location"], json!({"lat": 51.5, "lng": -0.12}));
    assert_eq!(detail["evidence"].as_array().unwrap().len(), 3, "{detail}");
    let notes = detail["notifications"].as_array().unwrap();
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0]["channel"], "sms");
    // The outbox worker may already have delivered it (to the log-only sink).
    assert!(
        ["queued", "sent"].contains(&notes[0]["status"].as_str().unwrap()),
        "{notes:?}"
    );
    assert!(
        notes[0].get("address").is_none(),
        "addresses stay in the outbox"
    );
    assert_eq!(app.events_of("notification.queued").await.len(), 1);
    let added = app.events_of("incident.evidence_added").await.len();
    assert_eq!(added, 3);
}

async fn concurrent_readings_and_requests_make_one_incident(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("patient-1", "w1").await;
    let console = app.token(Role::Console).await;
    let gateway = app.token(Role::Gateway).await;
    let mut tasks = Vec::new();
    for i in 0..50_i64 {
        let client = app.client.clone();
        let (url, token) = (app.url(api::VITALS), gateway.clone());
        tasks.push(actix_web::rt::spawn(async move {
            let body: Value = client
                .post(url)
                .bearer_auth(token)
                .json(&emergency("w1", i))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            body["results"][0]["incident_id"]
                .as_str()
                .map(str::to_owned)
        }));
        let client = app.client.clone();
        let (url, token) = (app.url(api::INCIDENTS), console.clone());
        tasks.push(actix_web::rt::spawn(async move {
            let resp = client
                .post(url)
                .bearer_auth(token)
                .json(&json!({"patient_id": "patient-1", "description": "fell down"}))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let text = resp.text().await.unwrap();
            assert!(status == 201 || status == 200, "{status}: {text}");
            let body: Value = serde_json::from_str(&text).unwrap();
            body["id"].as_str().map(str::to_owned)
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        if let Some(id) = t.await.unwrap() {
            ids.insert(id);
        }
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(count_incidents(&app).await, 1);
    assert_eq!(app.events_of("incident.created").await.len(), 1);
}

async fn idempotency_key_replays_the_first_response(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let console = app.token(Role::Console).await;
    let post = |key: Option<&'static str>| {
        let mut req = app
            .client
            .post(app.url(api::INCIDENTS))
            .bearer_auth(&console)
            .json(
                &json!({"location": {"lat": 51.5, "lng": -0.1}, "priority": "urgent",
                          "caller": {"name": "A. Passer-by", "phone": "+447700900000"}}),
            );
        if let Some(key) = key {
            req = req.header("Idempotency-Key", key);
        }
        async move { req.send().await.unwrap() }
    };
    let first = post(Some("call-123")).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    let again = post(Some("call-123")).await;
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again, first);
    assert_eq!(count_incidents(&app).await, 1);
    // Without a key, the same request is a new (patientless) incident.
    assert_eq!(post(None).await.status(), StatusCode::CREATED);
    assert_eq!(count_incidents(&app).await, 2);
    assert_eq!(first["priority"], "urgent");
    assert_eq!(first["source"], "console");
    assert_eq!(first["evidence"][0]["kind"], "caller");
}

async fn cancel_then_a_new_emergency_opens_a_new_incident(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("p-1", "w1").await;
    let first = incident_of(&app, &emergency("w1", 0)).await;
    let resp = app
        .cancel_incident(&first, Role::Console, "false alarm, patient called back")
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "cancelled");
    assert_eq!(body["cancel_reason"], "false alarm, patient called back");
    assert!(body["times"]["closed"].is_string());
    // Cancelling again is a no-op, not an error.
    let again = app.cancel_incident(&first, Role::Console, "again").await;
    assert_eq!(again.status(), StatusCode::OK);
    let empty = app.cancel_incident(&first, Role::Console, " ").await;
    assert_eq!(empty.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // The patient can have a new incident now.
    app.post_vitals(&normal("w1", 1)).await;
    let second = incident_of(&app, &emergency("w1", 2)).await;
    assert!(!second.is_empty());
    assert_ne!(second, first);
    let unknown = app
        .cancel_incident(uuid::Uuid::now_v7(), Role::Console, "x")
        .await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
}

async fn illegal_commands_are_rejected_not_applied(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let created: Value = app
        .create_incident(
            Role::Console,
            &json!({"location": {"lat": 1.0, "lng": 2.0}}),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().parse().unwrap();
    let before = app.events_of("incident.status_changed").await.len();
    let result = app
        .incidents
        .send(Route {
            id,
            command: Command::ReportOnScene,
        })
        .await
        .unwrap();
    assert!(
        matches!(result, Err(IncidentError::Rejected(_))),
        "{result:?}"
    );
    assert_eq!(app.events_of("incident.status_changed").await.len(), before);
    // A legal one is applied and recorded.
    let assigned = app
        .incidents
        .send(Route {
            id,
            command: Command::Assign {
                unit_id: "M-1".into(),
                manual: true,
            },
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(assigned.status.as_str(), "assigned");
    // First assignment wins: a second one is refused.
    let second = app
        .incidents
        .send(Route {
            id,
            command: Command::Assign {
                unit_id: "M-2".into(),
                manual: true,
            },
        })
        .await
        .unwrap();
    assert!(matches!(second, Err(IncidentError::Rejected(_))));
    let detail: Value = app.incident(id, Role::Console).await.json().await.unwrap();
    assert_eq!(detail["assigned_unit_id"], "M-1");
    assert!(detail["times"]["unit_notified"].is_string());
}

async fn a_crashed_incident_actor_comes_back_with_its_state(backend: Backend) {
    let app = TestApp::builder(backend)
        .with_settings(|s| s.admin.enable_fault_injection = true)
        .start()
        .await;
    let created: Value = app
        .create_incident(
            Role::Console,
            &json!({"location": {"lat": 1.0, "lng": 2.0}, "description": "chest pain"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let before: Value = app
        .actor("incident", &id, Role::Admin)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(before["restarts"], 0);
    let crash = app.crash_actor("incident", &id, Role::Admin).await;
    assert_eq!(crash.status(), StatusCode::ACCEPTED);
    let after: Value = crate::helpers::eventually("the incident actor restarted", || async {
        let after: Value = app
            .actor("incident", &id, Role::Admin)
            .await
            .json()
            .await
            .unwrap();
        (after["restarts"] == 1 && after["status"] == "dispatching").then_some(after)
    })
    .await;
    assert_eq!(after["restarts"], 1, "{after}");
    assert_eq!(after["status"], before["status"]);
    assert_eq!(after["version"], before["version"]);
    assert_eq!(
        after["state"], before["state"],
        "rebuilt from the event store"
    );
    // It still works after the restart.
    let resp = app.cancel_incident(&id, Role::Console, "drill").await;
    assert_eq!(resp.status(), StatusCode::OK);

    // Without the flag the crash endpoint does not exist.
    let plain = TestApp::spawn(backend).await;
    let resp = plain.crash_actor("incident", &id, Role::Admin).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

async fn open_incidents_survive_an_abrupt_stop(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("p-1", "w1").await;
    app.register_wearer("p-2", "w2").await;
    let open = incident_of(&app, &emergency("w1", 0)).await;
    let cancelled = incident_of(&app, &emergency("w2", 0)).await;
    app.cancel_incident(&cancelled, Role::Console, "test").await;
    let assigned: Value = app
        .create_incident(
            Role::Console,
            &json!({"location": {"lat": 1.0, "lng": 2.0}}),
        )
        .await
        .json()
        .await
        .unwrap();
    let assigned_id = assigned["id"].as_str().unwrap().to_owned();
    app.incidents
        .send(Route {
            id: assigned_id.parse().unwrap(),
            command: Command::Assign {
                unit_id: "M-9".into(),
                manual: true,
            },
        })
        .await
        .unwrap()
        .unwrap();

    let tdb = app.kill().await;
    let app = TestApp::builder(backend).start_on(tdb).await;
    let actors: Value = app
        .actors("incident", Role::Admin)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(actors["counts"]["incident"], 2, "{actors}");
    let mut wanted = HashSet::new();
    wanted.insert((open.clone(), "dispatching".to_owned()));
    wanted.insert((assigned_id.clone(), "assigned".to_owned()));
    // Actors load asynchronously; poll until both report their state.
    crate::helpers::eventually("both recovered actors report their state", || async {
        let actors: Value = app
            .actors("incident", Role::Admin)
            .await
            .json()
            .await
            .unwrap();
        let seen: HashSet<(String, String)> = actors["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["id"].as_str().unwrap().to_owned(),
                    a["status"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        (seen == wanted).then_some(())
    })
    .await;
    // Dedup survives the restart: the patient's open incident is found again.
    assert_eq!(incident_of(&app, &emergency("w1", 10)).await, open);
    // And commands still apply to recovered incidents.
    let cancel = app
        .cancel_incident(&assigned_id, Role::Console, "stood down")
        .await;
    assert_eq!(cancel.status(), StatusCode::OK);
}

async fn lists_page_with_cursors_and_filters(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let body: Value = app
            .create_incident(
                Role::Console,
                &json!({"location": {"lat": 1.0 + f64::from(i), "lng": 2.0}}),
            )
            .await
            .json()
            .await
            .unwrap();
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    app.cancel_incident(&ids[0], Role::Console, "dup").await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("status=all&limit=2&cursor={c}"),
            None => "status=all&limit=2".to_owned(),
        };
        let page: Value = app
            .list_incidents(&query, Role::Console)
            .await
            .json()
            .await
            .unwrap();
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
    let open: Value = app
        .list_incidents("", Role::Console)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(open["items"].as_array().unwrap().len(), 4);
    let closed: Value = app
        .list_incidents("status=closed", Role::Console)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(closed["items"][0]["id"], ids[0].as_str());
    let bad = app.list_incidents("status=sideways", Role::Console).await;
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let bad = app.list_incidents("limit=0", Role::Console).await;
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

async fn patients_act_only_for_themselves(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("patient-1", "w1").await;
    app.register_wearer("someone-else", "w2").await;
    // A patient token (bound to patient-1) asks for help: its home location is used.
    let resp = app.create_incident(Role::Patient, &json!({})).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let mine: Value = resp.json().await.unwrap();
    assert_eq!(mine["patient_id"], "patient-1");
    assert_eq!(mine["source"], "request");
    let resp = app
        .create_incident(Role::Patient, &json!({"patient_id": "someone-else"}))
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let other = incident_of(&app, &emergency("w2", 0)).await;
    let resp = app.incident(&other, Role::Patient).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = app.list_incidents("", Role::Patient).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // Unknown patient named by a console: 422 on the field.
    let resp = app
        .create_incident(
            Role::Console,
            &json!({"patient_id": "nobody", "location": {"lat": 1, "lng": 1}}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errors"][0]["pointer"], "/patient_id");
    let id = mine["id"].as_str().unwrap();
    let resp = app.cancel_incident(id, Role::Patient, "I am fine").await;
    assert_eq!(resp.status(), StatusCode::OK);
}

/// References (`INC-<year>-<number>`) are unique; one after another, they increase (on
/// PostgreSQL they come from blocks reserved in advance, including across a block's end when
/// many are opened at once).
async fn references_are_unique_and_increase(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let open = |i: usize| {
        let app = &app;
        async move {
            let resp = app
                .create_incident(
                    Role::Console,
                    &json!({"location": {"lat": 10.0 + i as f64 * 0.001, "lng": 2.0}}),
                )
                .await;
            assert_eq!(resp.status(), StatusCode::CREATED);
            let body: Value = resp.json().await.unwrap();
            let reference = body["reference"].as_str().unwrap().to_owned();
            let number: u64 = reference.rsplit('-').next().unwrap().parse().unwrap();
            assert!(
                reference.starts_with(&format!("INC-{}-", chrono::Datelike::year(&Utc::now())))
            );
            number
        }
    };
    let mut sequential = Vec::new();
    for i in 0..5 {
        sequential.push(open(i).await);
    }
    assert!(
        sequential.windows(2).all(|w| w[0] < w[1]),
        "one after another: {sequential:?}"
    );
    // More at once than a block holds: all different, and all after the ones before.
    let burst = futures_util::future::join_all((5..135).map(open)).await;
    let distinct: HashSet<u64> = burst.iter().copied().collect();
    assert_eq!(distinct.len(), burst.len(), "unique: {burst:?}");
    assert!(burst.iter().all(|n| *n > sequential[4]));
    let after = open(135).await;
    assert!(burst.iter().all(|n| *n < after));
}
