//! The console event stream: pages, SSE with Last-Event-ID, and the console WebSocket with
//! replay then live, no gap and no duplicate at the seam, fan-out to every console.

use futures_util::StreamExt as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use shers::domain::auth::Role;
use shers::persistence::Backend;

use crate::both_backends;
use crate::helpers::{TestApp, api};

both_backends!(
    consoles_see_every_event_in_order_across_the_seam,
    sse_resumes_from_last_event_id
);

async fn make_events(app: &TestApp, n: usize) {
    for i in 0..n {
        let resp = app
            .create_incident(
                Role::Console,
                &json!({"location": {"lat": 1.0 + i as f64 * 0.001, "lng": 2.0}}),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::CREATED);
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_event(socket: &mut Socket) -> Value {
    next_frame(socket, |v| {
        v.get("seq").is_some() && v.get("type").is_none()
    })
    .await
}

/// The next text frame `wanted` accepts (others are skipped), within [`PATIENCE`](crate::helpers::PATIENCE).
async fn next_frame(socket: &mut Socket, wanted: impl Fn(&Value) -> bool) -> Value {
    loop {
        let frame = tokio::time::timeout(crate::helpers::PATIENCE, socket.next())
            .await
            .expect("a frame")
            .unwrap()
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(t) = frame {
            let v: Value = serde_json::from_str(&t).unwrap();
            if wanted(&v) {
                return v;
            }
        }
    }
}

async fn connect(app: &TestApp, since: i64) -> Socket {
    let token = app.token(Role::Console).await;
    let url = app.ws_console_url(since, &token);
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

async fn consoles_see_every_event_in_order_across_the_seam(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    make_events(&app, 5).await; // history before anyone connects
    let first = connect(&app, 0).await;
    // Events keep being appended while the second console connects and replays.
    let writer = {
        let client = app.client.clone();
        let url = app.url(api::INCIDENTS);
        let token = app.token(Role::Console).await;
        actix_web::rt::spawn(async move {
            for i in 0..10 {
                client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({"location": {"lat": 10.0 + f64::from(i) * 0.001, "lng": 2.0}}))
                    .send()
                    .await
                    .unwrap();
            }
        })
    };
    let second = connect(&app, 0).await;
    writer.await.unwrap();
    let mut conn = app.db.conn().await.unwrap();
    let total = shers::persistence::events::last_seq(&mut conn)
        .await
        .unwrap();
    for mut socket in [first, second] {
        let mut seqs = Vec::new();
        while seqs.len() < total as usize {
            seqs.push(next_event(&mut socket).await["seq"].as_i64().unwrap());
        }
        assert_eq!(
            seqs,
            (1..=total).collect::<Vec<_>>(),
            "every event exactly once, in order"
        );
    }
    // Resume after a disconnect: only what came after.
    let mut resumed = connect(&app, total).await;
    make_events(&app, 1).await;
    let next = next_event(&mut resumed).await;
    assert_eq!(next["seq"].as_i64().unwrap(), total + 1);
    // A console can filter.
    let mut filtered = connect(&app, total).await;
    use futures_util::SinkExt as _;
    filtered
        .send(tokio_tungstenite::tungstenite::Message::text(
            json!({"type": "subscribe", "kinds": ["incident.created"]}).to_string(),
        ))
        .await
        .unwrap();
    // Events already in flight before the server read the subscribe frame (an earlier
    // incident escalating, say) still arrive unfiltered; the acknowledgement marks the point
    // from which the filter holds.
    next_frame(&mut filtered, |v| v["type"] == "subscribed").await;
    make_events(&app, 1).await;
    let only = next_event(&mut filtered).await;
    assert_eq!(only["kind"], "incident.created");
    // The page endpoint agrees.
    let page: Value = app
        .events_page(Some(total - 2), Some(2), Role::Console)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    assert_eq!(page["next_cursor"], total);
    let denied = app.events_page(None, None, Role::Crew).await;
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
}

async fn sse_resumes_from_last_event_id(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    make_events(&app, 3).await;
    let mut conn = app.db.conn().await.unwrap();
    let total = shers::persistence::events::last_seq(&mut conn)
        .await
        .unwrap();
    let token = app.token(Role::Console).await;
    let resp = app
        .client
        .get(app.url(api::EVENTS_STREAM))
        .bearer_auth(&token)
        .header("Last-Event-ID", (total - 2).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut resp = resp;
    let mut text = String::new();
    while text.matches("\n\n").count() < 2 {
        let chunk = tokio::time::timeout(crate::helpers::PATIENCE, resp.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let ids: Vec<i64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(ids, [total - 1, total]);
}

both_backends!(analytics_report_nemsis_intervals);

async fn analytics_report_nemsis_intervals(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.add_unit("AN1", 1.0, 2.0, "bls").await;
    let created: Value = app
        .create_incident(
            Role::Console,
            &json!({"location": {"lat": 1.001, "lng": 2.0}}),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    // Wait for the automatic offer, then let the crew accept and drive to the scene.
    let incident = app
        .wait_incident(&id, |i| {
            i["offers"]
                .as_array()
                .is_some_and(|o| o.iter().any(|o| o["status"] == "pending"))
        })
        .await;
    let offer = incident["offers"][0]["id"].as_str().unwrap().to_owned();
    let token = app.crew_token("AN1").await;
    app.accept_offer(&token, &offer).await;
    for s in ["enroute", "on_scene"] {
        let resp = app.unit_status(&token, "AN1", s).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let report: Value = app
        .response_times("", Role::Console)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(report["incidents"], 1);
    for interval in ["call_to_notified", "turnout", "travel", "response"] {
        let s = &report["intervals"][interval];
        assert_eq!(s["count"], 1, "{interval}: {s}");
        assert!(s["p50_s"].as_f64().unwrap() >= 0.0);
        assert_eq!(
            s["compliance_pct"], 100.0,
            "{interval} took well under its standard"
        );
    }
    assert_eq!(report["intervals"]["transport"]["count"], 0);
    assert_eq!(report["intervals"]["turnout"]["threshold_s"], 60);
    let urgent: Value = app
        .response_times("priority=urgent", Role::Console)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(urgent["incidents"], 0);
    let bad = app
        .response_times(
            "from=2026-11-23T10:00:00Z&to=2026-11-23T09:00:00Z",
            Role::Console,
        )
        .await;
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        app.response_times("", Role::Crew).await.status(),
        StatusCode::FORBIDDEN
    );
}

#[actix_web::test]
async fn console_commands_over_the_websocket() {
    use futures_util::SinkExt as _;
    use tokio_tungstenite::tungstenite::Message;
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.add_unit("C1", 5.0, 5.0, "als").await;
    let mut socket = connect(&app, 0).await;
    async fn answer(socket: &mut Socket, request_id: &str) -> Value {
        loop {
            let frame = tokio::time::timeout(crate::helpers::PATIENCE, socket.next())
                .await
                .expect("an answer")
                .unwrap()
                .unwrap();
            if let Message::Text(t) = frame {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["request_id"] == request_id {
                    return v;
                }
            }
        }
    }
    // Out of service first, so the new incident is not offered automatically.
    socket
        .send(Message::text(json!({"type": "unit_status", "request_id": "r0", "unit_id": "C1", "status": "out_of_service"}).to_string()))
        .await
        .unwrap();
    assert_eq!(
        answer(&mut socket, "r0").await["result"]["to"],
        "out_of_service"
    );
    socket
        .send(Message::text(json!({"type": "create_incident", "request_id": "r1", "location": {"lat": 5.001, "lng": 5.0}, "priority": "urgent"}).to_string()))
        .await
        .unwrap();
    let created = answer(&mut socket, "r1").await;
    assert_eq!(created["type"], "command_result", "{created}");
    assert_eq!(created["result"]["created"], true);
    let id = created["result"]["id"].as_str().unwrap().to_owned();
    // Back in service, then assigned by hand.
    socket
        .send(Message::text(json!({"type": "unit_status", "request_id": "r2", "unit_id": "C1", "status": "available"}).to_string()))
        .await
        .unwrap();
    answer(&mut socket, "r2").await;
    socket
        .send(Message::text(
            json!({"type": "assign", "request_id": "r3", "incident_id": id, "unit_id": "C1"})
                .to_string(),
        ))
        .await
        .unwrap();
    let assigned = answer(&mut socket, "r3").await;
    // The freed unit may have been offered automatically first; either way it ends on this job.
    let detail = app
        .wait_incident(&id, |i| {
            i["assigned_unit_id"] == "C1" || i["offers"].as_array().is_some_and(|o| !o.is_empty())
        })
        .await;
    assert!(
        assigned["type"] == "command_result"
            || detail["offers"].as_array().is_some_and(|o| !o.is_empty()),
        "{assigned}"
    );
    socket
        .send(Message::text(
            json!({"type": "cancel", "request_id": "r4", "incident_id": id, "reason": "test over"})
                .to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(
        answer(&mut socket, "r4").await["result"]["status"],
        "cancelled"
    );
    // Errors carry the problem+json of the REST twin.
    socket
        .send(Message::text(
            json!({"type": "cancel", "request_id": "r5", "incident_id": id, "reason": " "})
                .to_string(),
        ))
        .await
        .unwrap();
    let err = answer(&mut socket, "r5").await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["error"]["errors"][0]["pointer"], "/reason");
}

#[actix_web::test]
async fn a_slow_consumer_is_told_to_resync_and_loses_nothing() {
    use shers::actors::broadcaster::{FeedItem, SUBSCRIBER_BUFFER, feed};
    use shers::domain::events::{ExpectedVersion, NewEvent};
    let app = TestApp::spawn(Backend::Sqlite).await;
    let mut conn = app.db.conn().await.unwrap();
    let start = shers::persistence::events::last_seq(&mut conn)
        .await
        .unwrap();
    // A feed nobody reads for a while.
    let mut rx = feed(app.db.clone(), app.broadcaster.clone(), start);
    let n = SUBSCRIBER_BUFFER * 2;
    let batch: Vec<NewEvent> = (0..n)
        .map(|i| NewEvent::new("test.bulk", json!({"i": i})))
        .collect();
    shers::persistence::events::append(
        &mut conn,
        "bulk",
        ExpectedVersion::Any,
        &batch,
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    // Until the broadcaster has tailed them all and dropped this subscriber, whose buffer
    // overflowed.
    crate::helpers::eventually("the slow subscriber overflowed", || async {
        let (subscribers, head) = app
            .broadcaster
            .send(shers::actors::broadcaster::Stats)
            .await
            .unwrap();
        (subscribers == 0 && head >= start + n as i64).then_some(())
    })
    .await;
    let mut seqs = Vec::new();
    let mut resyncs = 0;
    while seqs.len() < n {
        match tokio::time::timeout(crate::helpers::PATIENCE, rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            FeedItem::Event(e) => seqs.push(e.seq),
            FeedItem::Resync(_) => resyncs += 1,
        }
    }
    assert!(resyncs >= 1, "the slow consumer was told to resync");
    let expected: Vec<i64> = (start + 1..=start + n as i64).collect();
    assert_eq!(seqs, expected, "and caught up with no gap and no duplicate");
}
