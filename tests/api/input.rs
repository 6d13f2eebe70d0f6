//! What SHERS accepts as input, over real HTTP and WebSockets on both databases: no string a
//! client sends may carry a control character (a NUL used to be a 500 on PostgreSQL), a name
//! given twice in a JSON object is refused rather than read as its last value, and every
//! refusal is a 422 problem naming the field.
//!
//! The text cases cover every string field of every request body in the served OpenAPI
//! document (checked: a body field added without a case here fails the test), every WebSocket
//! command, the vitals shapes, and the ids taken from paths.

use std::collections::BTreeSet;

use futures_util::{SinkExt as _, StreamExt as _};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use shers::domain::auth::Role;
use shers::persistence::Backend;
use tokio_tungstenite::tungstenite::Message;

use crate::both_backends;
use crate::helpers::{TestApp, api};

both_backends!(
    control_characters_are_refused_in_every_field,
    duplicate_names_are_refused_everywhere
);

/// Which text a field holds: one line (names, ids, codes, dates), or lines (descriptions and
/// reasons, where line breaks are part of the text).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Line,
    Lines,
}

/// Who sends a request.
#[derive(Clone, Copy)]
enum Caller {
    Admin,
    Console,
    Crew,
}

/// One endpoint's body: a valid body, and the string fields to spoil in it.
struct BodyCase {
    method: Method,
    /// The path as the OpenAPI document names it.
    template: &'static str,
    /// The path the request goes to.
    path: String,
    caller: Caller,
    body: Value,
    fields: Vec<(&'static str, Kind)>,
}

/// Strings SHERS must refuse wherever text goes: NUL, another C0 control, DEL, a C1 control.
const EVERYWHERE: [&str; 4] = ["a\u{0}b", "a\u{1b}[2Jb", "a\u{7f}b", "a\u{85}b"];
/// Strings only multi-line text may hold.
const ONE_LINE_ONLY: [&str; 2] = ["two\nlines", "tab\there"];

/// `body` with the value at `pointer` set to `value` (the parent must exist).
fn with(body: &Value, pointer: &str, value: &str) -> Value {
    let mut body = body.clone();
    let (parent, last) = pointer.rsplit_once('/').unwrap();
    match body.pointer_mut(parent).unwrap() {
        Value::Object(map) => {
            map.insert(last.to_owned(), json!(value));
        }
        Value::Array(items) => items[last.parse::<usize>().unwrap()] = json!(value),
        other => panic!("{pointer}: parent is {other}"),
    }
    body
}

/// Every `(METHOD path, pointer)` of a string field in a request body the document declares.
fn documented_string_fields(openapi: &Value) -> BTreeSet<(String, String)> {
    fn walk(doc: &Value, schema: &Value, pointer: &str, out: &mut BTreeSet<String>) {
        if let Some(r) = schema["$ref"].as_str() {
            let name = r.rsplit('/').next().unwrap();
            return walk(doc, &doc["components"]["schemas"][name], pointer, out);
        }
        for alternative in schema["oneOf"].as_array().into_iter().flatten() {
            walk(doc, alternative, pointer, out);
        }
        let types: Vec<&str> = match &schema["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if types.contains(&"string") {
            out.insert(pointer.to_owned());
        }
        if let Some(props) = schema["properties"].as_object() {
            for (name, prop) in props {
                walk(doc, prop, &format!("{pointer}/{name}"), out);
            }
        }
        if schema["items"].is_object() {
            walk(doc, &schema["items"], &format!("{pointer}/0"), out);
        }
    }
    let mut fields = BTreeSet::new();
    for (path, ops) in openapi["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let schema = &op["requestBody"]["content"]["application/json"]["schema"];
            let mut found = BTreeSet::new();
            walk(openapi, schema, "", &mut found);
            for pointer in found {
                fields.insert((format!("{} {path}", method.to_uppercase()), pointer));
            }
        }
    }
    fields
}

/// Sends `body` and checks the answer is a 422 naming `pointer` (and, for a control
/// character, saying so).
async fn expect_refused(
    app: &TestApp,
    req: reqwest::RequestBuilder,
    what: &str,
    pointer: &str,
    control: bool,
) {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    let problem: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{what}: {problem}"
    );
    assert_eq!(content_type, "application/problem+json", "{what}");
    check_problem(&problem, what, pointer, control);
    let _ = app;
}

fn check_problem(problem: &Value, what: &str, pointer: &str, control: bool) {
    assert_eq!(problem["status"], 422, "{what}: {problem}");
    let error = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["pointer"] == pointer)
        .unwrap_or_else(|| panic!("{what}: no error at {pointer}: {problem}"));
    if control {
        let message = error["message"].as_str().unwrap();
        assert!(message.contains("control characters"), "{what}: {problem}");
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends one frame and returns its answer (events, heartbeats and pushed offers skipped).
async fn command(socket: &mut Socket, frame: &Value) -> Value {
    socket.send(Message::text(frame.to_string())).await.unwrap();
    answer(socket).await
}

/// The next answer to a client frame on a console or crew socket.
async fn answer(socket: &mut Socket) -> Value {
    const ANSWERS: [&str; 7] = [
        "error",
        "command_result",
        "subscribed",
        "accept_result",
        "decline_result",
        "location_ack",
        "status_result",
    ];
    loop {
        let message = tokio::time::timeout(crate::helpers::PATIENCE, socket.next())
            .await
            .expect("an answer within 10 s")
            .unwrap()
            .unwrap();
        if let Message::Text(text) = message {
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["type"].as_str().is_some_and(|t| ANSWERS.contains(&t)) {
                return v;
            }
        }
    }
}

/// Long on purpose: one table of every body field, then the WebSocket commands, the vitals
/// shapes and the path ids, each spoiled with every string SHERS refuses there.
async fn control_characters_are_refused_in_every_field(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("p-1", "d-1").await;
    app.add_unit("UNIT-1", 51.5, -0.12, "als").await;
    let admin = app.token(Role::Admin).await;
    let console = app.token(Role::Console).await;
    let crew = app.crew_token("UNIT-1").await;
    let incident: Value = app
        .create_incident(
            Role::Console,
            &json!({"location": {"lat": 51.6, "lng": -0.2}, "priority": "urgent"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let incident = incident["id"].as_str().unwrap().to_owned();
    let offer = "00000000-0000-7000-8000-000000000000";
    let now = chrono::Utc::now().to_rfc3339();

    use Kind::{Line, Lines};
    let cases = vec![
        BodyCase {
            method: Method::POST,
            template: "/admin/tokens",
            path: api::ADMIN_TOKENS.into(),
            caller: Caller::Admin,
            body: json!({"role": "crew", "unit_id": "M-1", "name": "Medic 1"}),
            fields: vec![
                ("/role", Line),
                ("/unit_id", Line),
                ("/patient_id", Line),
                ("/name", Line),
            ],
        },
        BodyCase {
            method: Method::POST,
            template: "/api/v1/patients",
            path: api::PATIENTS.into(),
            caller: Caller::Admin,
            body: json!({"id": "p-2", "name": "Ada", "date_of_birth": "1950-12-10",
                "insurance": {"provider": "NHS", "member_id": "1"},
                "next_of_kin": [{"name": "Byron", "relation": "son", "phone": "+447700900123",
                                 "email": "byron@example.org"}]}),
            fields: vec![
                ("/id", Line),
                ("/name", Line),
                ("/date_of_birth", Line),
                ("/insurance/provider", Line),
                ("/insurance/member_id", Line),
                ("/next_of_kin/0/name", Line),
                ("/next_of_kin/0/relation", Line),
                ("/next_of_kin/0/phone", Line),
                ("/next_of_kin/0/email", Line),
            ],
        },
        BodyCase {
            method: Method::POST,
            template: "/api/v1/devices",
            path: api::DEVICES.into(),
            caller: Caller::Admin,
            body: json!({"id": "d-2", "patient_id": "p-1", "model": "watch"}),
            fields: vec![("/id", Line), ("/patient_id", Line), ("/model", Line)],
        },
        BodyCase {
            method: Method::POST,
            template: "/api/v1/units",
            path: api::UNITS.into(),
            caller: Caller::Admin,
            body: json!({"id": "U-2", "call_sign": "Two", "capability": "bls",
                         "location": {"lat": 51.5, "lng": -0.1}}),
            fields: vec![("/id", Line), ("/call_sign", Line), ("/capability", Line)],
        },
        BodyCase {
            method: Method::POST,
            template: "/api/v1/hospitals",
            path: api::HOSPITALS.into(),
            caller: Caller::Admin,
            body: json!({"id": "H-2", "name": "St Elsewhere", "location": {"lat": 51.5, "lng": -0.1},
                         "capabilities": ["stroke"], "capacity": 4}),
            fields: vec![("/id", Line), ("/name", Line), ("/capabilities/0", Line)],
        },
        BodyCase {
            method: Method::POST,
            template: "/api/v1/incidents",
            path: api::INCIDENTS.into(),
            caller: Caller::Console,
            body: json!({"patient_id": "p-1", "location": {"lat": 51.5, "lng": -0.1},
                         "priority": "urgent", "description": "fell",
                         "caller": {"name": "Neighbour", "phone": "+447700900124"}}),
            fields: vec![
                ("/patient_id", Line),
                ("/priority", Line),
                ("/description", Lines),
                ("/caller/name", Line),
                ("/caller/phone", Line),
            ],
        },
        BodyCase {
            method: Method::POST,
            template: "/api/v1/incidents/{id}/assign",
            path: api::assign(&incident),
            caller: Caller::Console,
            body: json!({"unit_id": "UNIT-1"}),
            fields: vec![("/unit_id", Line)],
        },
        BodyCase {
            method: Method::POST,
            template: "/api/v1/incidents/{id}/cancel",
            path: api::cancel_incident(&incident),
            caller: Caller::Console,
            body: json!({"reason": "duplicate call"}),
            fields: vec![("/reason", Lines)],
        },
        BodyCase {
            method: Method::POST,
            template: "/api/v1/offers/{id}/decline",
            path: api::decline_offer(offer),
            caller: Caller::Crew,
            body: json!({"reason": "puncture"}),
            fields: vec![("/reason", Lines)],
        },
        BodyCase {
            method: Method::POST,
            template: "/api/v1/units/{id}/location",
            path: api::unit_location("UNIT-1"),
            caller: Caller::Crew,
            body: json!({"lat": 51.5, "lng": -0.1, "at": now}),
            fields: vec![("/at", Line)],
        },
        BodyCase {
            method: Method::POST,
            template: "/api/v1/units/{id}/status",
            path: api::unit_status("UNIT-1"),
            caller: Caller::Crew,
            body: json!({"status": "transporting", "hospital_id": "H-1"}),
            fields: vec![("/status", Line), ("/hospital_id", Line)],
        },
        BodyCase {
            method: Method::POST,
            template: "/api/v1/units/{id}/push-tokens",
            path: "/api/v1/units/UNIT-1/push-tokens".into(),
            caller: Caller::Crew,
            body: json!({"token": "fcm-token-1", "platform": "android"}),
            fields: vec![("/token", Line), ("/platform", Line)],
        },
        BodyCase {
            method: Method::POST,
            template: "/insurance/v1/policies",
            path: api::INSURANCE_POLICIES.into(),
            caller: Caller::Admin,
            body: json!({"patient_id": "p-1", "provider": "NHS", "member_id": "1",
                         "coverage_cents": 100}),
            fields: vec![
                ("/patient_id", Line),
                ("/provider", Line),
                ("/member_id", Line),
            ],
        },
        BodyCase {
            method: Method::POST,
            template: "/insurance/v1/verify",
            path: api::INSURANCE_VERIFY.into(),
            caller: Caller::Admin,
            body: json!({"patient_id": "p-1", "incident_id": incident, "amount_cents": 100}),
            fields: vec![("/patient_id", Line), ("/incident_id", Line)],
        },
    ];

    // Every string field the document declares has its case.
    let openapi: Value = app
        .get(api::OPENAPI, Some(Role::Admin))
        .await
        .json()
        .await
        .unwrap();
    let covered: BTreeSet<(String, String)> = cases
        .iter()
        .flat_map(|c| {
            c.fields
                .iter()
                .map(|(p, _)| (format!("{} {}", c.method, c.template), (*p).to_owned()))
        })
        .collect();
    let missing: Vec<_> = documented_string_fields(&openapi)
        .difference(&covered)
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "string fields without a case: {missing:?}"
    );

    for case in &cases {
        let token = match case.caller {
            Caller::Admin => &admin,
            Caller::Console => &console,
            Caller::Crew => &crew,
        };
        for (pointer, kind) in &case.fields {
            let refused = EVERYWHERE.iter().map(|v| (*v, true)).chain(
                ONE_LINE_ONLY
                    .iter()
                    .filter(|_| *kind == Line)
                    .map(|v| (*v, false)),
            );
            for (value, control) in refused {
                let body = with(&case.body, pointer, value);
                let what = format!("{} {} {pointer}={value:?}", case.method, case.path);
                let req = app
                    .client
                    .request(case.method.clone(), app.url(&case.path))
                    .bearer_auth(token)
                    .json(&body);
                expect_refused(&app, req, &what, pointer, control).await;
            }
        }
    }

    // Line breaks are part of a description.
    let resp = app
        .create_incident(
            Role::Console,
            &json!({"location": {"lat": 51.4, "lng": -0.3},
                    "description": "fell on the stairs\r\nconscious,\tbreathing"}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);

    // The console's commands.
    let (mut socket, _) = tokio_tungstenite::connect_async(app.ws_console_url(0, &console))
        .await
        .unwrap();
    let frames: Vec<(Value, &str, Kind)> = vec![
        (
            json!({"type": "create_incident", "location": {"lat": 51.5, "lng": -0.1},
                   "description": "<>"}),
            "/description",
            Lines,
        ),
        (
            json!({"type": "cancel", "incident_id": incident, "reason": "<>"}),
            "/reason",
            Lines,
        ),
        (
            json!({"type": "assign", "incident_id": incident, "unit_id": "<>"}),
            "/unit_id",
            Line,
        ),
        (
            json!({"type": "unit_status", "unit_id": "<>", "status": "available"}),
            "/unit_id",
            Line,
        ),
        (
            json!({"type": "assign", "request_id": "<>", "incident_id": incident,
                   "unit_id": "UNIT-1"}),
            "/request_id",
            Lines,
        ),
        (
            json!({"type": "subscribe", "incident_id": "<>"}),
            "/incident_id",
            Lines,
        ),
    ];
    for (frame, pointer, kind) in &frames {
        let field = &pointer[1..];
        let one_line = ONE_LINE_ONLY.iter().filter(|_| *kind == Line);
        for value in EVERYWHERE.iter().chain(one_line) {
            let mut frame = frame.clone();
            frame[field] = json!(value);
            let answer = command(&mut socket, &frame).await;
            let what = format!("console {frame}");
            assert_eq!(answer["type"], "error", "{what}: {answer}");
            check_problem(&answer["error"], &what, pointer, EVERYWHERE.contains(value));
        }
    }

    // The crew's frames.
    let (mut socket, _) = tokio_tungstenite::connect_async(app.ws_crew_url(&crew))
        .await
        .unwrap();
    let frames: Vec<(Value, &str, Kind)> = vec![
        (
            json!({"type": "decline", "offer_id": offer, "reason": "<>"}),
            "/reason",
            Lines,
        ),
        (
            json!({"type": "status", "status": "transporting", "hospital_id": "<>"}),
            "/hospital_id",
            Line,
        ),
        (
            json!({"type": "accept", "offer_id": "<>"}),
            "/offer_id",
            Lines,
        ),
    ];
    for (frame, pointer, kind) in &frames {
        let field = &pointer[1..];
        let one_line = ONE_LINE_ONLY.iter().filter(|_| *kind == Line);
        for value in EVERYWHERE.iter().chain(one_line) {
            let mut frame = frame.clone();
            frame[field] = json!(value);
            let answer = command(&mut socket, &frame).await;
            let what = format!("crew {frame}");
            assert_eq!(answer["type"], "error", "{what}: {answer}");
            check_problem(&answer["error"], &what, pointer, EVERYWHERE.contains(value));
        }
    }

    // Vitals, in each shape.
    let reading = json!({"device_id": "d-1", "patient_id": "p-1", "timestamp": now,
                         "heart_rate_bpm": 72});
    let legacy = json!({"patient_id": "p-1", "device": {"id": "d-1", "model": "w"},
                        "timestamp": now, "metrics": {"heartRateBpm": 72}});
    let fhir = json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/p-1"}, "device": {"identifier": {"value": "d-1"}},
        "effectiveDateTime": now,
        "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org",
                          "code": "/min"}});
    let vitals = [
        (reading.clone(), "/device_id", "/device_id"),
        (reading.clone(), "/patient_id", "/patient_id"),
        (
            json!({"readings": [reading]}),
            "/readings/0/device_id",
            "/readings/0/device_id",
        ),
        (legacy, "/device/id", "/device/id"),
        (
            fhir.clone(),
            "/device/identifier/value",
            "/device/identifier/value",
        ),
        (fhir.clone(), "/subject/reference", "/subject/reference"),
        (fhir, "/status", "/status"),
    ];
    let gateway = app.token(Role::Gateway).await;
    for (body, field, pointer) in &vitals {
        for value in EVERYWHERE {
            let value = if *field == "/subject/reference" {
                format!("Patient/{value}")
            } else {
                value.to_owned()
            };
            let body = with(body, field, &value);
            let req = app
                .client
                .post(app.url(api::VITALS))
                .bearer_auth(&gateway)
                .json(&body);
            let what = format!("vitals {body}");
            expect_refused(&app, req, &what, pointer, true).await;
        }
    }

    // Ids in paths name nothing: 404, never a lookup.
    let paths = [
        (Method::GET, format!("{}/p%00", api::PATIENTS), &admin, None),
        (Method::GET, api::unit("U%00"), &console, None),
        (
            Method::POST,
            api::unit_location("U%00"),
            &crew,
            Some(json!({"lat": 51.5, "lng": -0.1})),
        ),
        (
            Method::POST,
            api::unit_status("U%00"),
            &console,
            Some(json!({"status": "available"})),
        ),
        (Method::GET, api::actor("device", "d%00"), &admin, None),
        (Method::GET, api::actor("unit", "U%01"), &admin, None),
        (Method::POST, api::release_claim("c%00"), &admin, None),
    ];
    for (method, path, token, body) in paths {
        let mut req = app
            .client
            .request(method.clone(), app.url(&path))
            .bearer_auth(token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method} {path}");
    }
    let resp = app.list_incidents("cursor=1_%00", Role::Console).await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);

    // Nothing was stored, and the server is well.
    let tokens = app.tokens(Role::Admin).await.text().await.unwrap();
    assert!(!tokens.contains("\\u0000"), "{tokens}");
    let page = app
        .events_page(Some(0), Some(1000), Role::Console)
        .await
        .text()
        .await
        .unwrap();
    assert!(!page.contains("\\u0000"), "an event holds a NUL");
    assert_eq!(app.get(api::READYZ, None).await.status(), StatusCode::OK);
}

/// Posts `raw` (JSON text that `json!` cannot write: a name twice) to `path`.
async fn post_raw(app: &TestApp, path: &str, token: &str, raw: &str) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(raw.to_owned())
        .send()
        .await
        .unwrap()
}

async fn duplicate_names_are_refused_everywhere(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("p-1", "d-1").await;
    let admin = app.token(Role::Admin).await;
    let console = app.token(Role::Console).await;
    let gateway = app.token(Role::Gateway).await;
    let tokens_before: Value = app.tokens(Role::Admin).await.json().await.unwrap();
    let now = chrono::Utc::now().to_rfc3339();

    let cases = [
        (
            api::ADMIN_TOKENS,
            &admin,
            r#"{"role": "console", "role": "admin", "name": "desk"}"#.to_owned(),
            "/role",
        ),
        (
            api::ADMIN_TOKENS,
            &admin,
            r#"{"role": "console", "name": "desk", "name": "desk"}"#.to_owned(),
            "/name",
        ),
        (
            api::PATIENTS,
            &admin,
            r#"{"id": "p-2", "name": "Ada", "next_of_kin": [
                {"name": "B", "phone": "+447700900123", "phone": "+447700900999"}]}"#
                .to_owned(),
            "/next_of_kin/0/phone",
        ),
        (
            api::UNITS,
            &admin,
            r#"{"id": "U-2", "id": "U-3", "call_sign": "X", "capability": "als",
                "location": {"lat": 51.5, "lng": -0.1}}"#
                .to_owned(),
            "/id",
        ),
        (
            api::HOSPITALS,
            &admin,
            r#"{"id": "H-2", "name": "X", "capacity": 1,
                "location": {"lat": 51.5, "lat": 89.0, "lng": -0.1}}"#
                .to_owned(),
            "/location/lat",
        ),
        (
            api::INCIDENTS,
            &console,
            r#"{"location": {"lat": 51.5, "lng": -0.1}, "priority": "non_urgent",
                "priority": "emergency"}"#
                .to_owned(),
            "/priority",
        ),
        (
            api::INSURANCE_POLICIES,
            &admin,
            r#"{"patient_id": "p-1", "provider": "X", "member_id": "1",
                "coverage_cents": 0, "coverage_cents": 100000}"#
                .to_owned(),
            "/coverage_cents",
        ),
        // Vitals refused them before; FHIR resources now too.
        (
            api::VITALS,
            &gateway,
            format!(
                r#"{{"device_id": "d-1", "timestamp": "{now}", "heart_rate_bpm": 72,
                    "heart_rate_bpm": 250}}"#
            ),
            "/heart_rate_bpm",
        ),
        (
            api::VITALS,
            &gateway,
            format!(
                r#"{{"resourceType": "Observation", "status": "final",
                    "code": {{"coding": [{{"system": "http://loinc.org", "code": "8867-4"}}]}},
                    "device": {{"identifier": {{"value": "d-1"}}}},
                    "effectiveDateTime": "{now}",
                    "valueQuantity": {{"value": 72, "value": 250, "unit": "/min",
                        "system": "http://unitsofmeasure.org", "code": "/min"}}}}"#
            ),
            "/valueQuantity/value",
        ),
    ];
    for (path, token, raw, pointer) in &cases {
        let resp = post_raw(&app, path, token, raw).await;
        let status = resp.status();
        let problem: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{raw}: {problem}");
        let errors = problem["errors"].as_array().unwrap();
        assert!(
            errors.iter().any(|e| e["pointer"] == *pointer
                && e["message"].as_str().unwrap().contains("duplicate")),
            "{raw}: {problem}"
        );
    }

    // Nothing was created.
    let tokens_after: Value = app.tokens(Role::Admin).await.json().await.unwrap();
    assert_eq!(tokens_after["items"], tokens_before["items"]);
    assert_eq!(
        app.get(&format!("{}/p-2", api::PATIENTS), Some(Role::Admin))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    for unit in ["U-2", "U-3"] {
        assert_eq!(
            app.unit(unit, Role::Console).await.status(),
            StatusCode::NOT_FOUND
        );
    }
    let hospitals: Value = app.hospitals(Role::Console).await.json().await.unwrap();
    assert!(!hospitals.to_string().contains("H-2"), "{hospitals}");
    let incidents: Value = app
        .list_incidents("status=all", Role::Console)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(incidents["items"], json!([]));
    assert!(app.events_of("vitals.status_changed").await.is_empty());

    // WebSocket frames: the console's and the crew's.
    let (mut socket, _) = tokio_tungstenite::connect_async(app.ws_console_url(0, &console))
        .await
        .unwrap();
    socket
        .send(Message::text(
            r#"{"type": "create_incident", "location": {"lat": 51.5, "lng": -0.1},
                "type": "subscribe"}"#,
        ))
        .await
        .unwrap();
    let reply = answer(&mut socket).await;
    assert_eq!(reply["type"], "error", "{reply}");
    check_problem(&reply["error"], "console frame", "/type", false);
    let incidents: Value = app
        .list_incidents("status=all", Role::Console)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(incidents["items"], json!([]));

    app.add_unit("UNIT-1", 51.5, -0.12, "als").await;
    let crew = app.crew_token("UNIT-1").await;
    let (mut socket, _) = tokio_tungstenite::connect_async(app.ws_crew_url(&crew))
        .await
        .unwrap();
    let reply = command(
        &mut socket,
        &json!({"type": "status", "status": "out_of_service"}),
    )
    .await;
    assert_eq!(reply["type"], "status_result", "{reply}");
    socket
        .send(Message::text(
            r#"{"type": "status", "status": "out_of_service", "status": "available"}"#,
        ))
        .await
        .unwrap();
    let reply = answer(&mut socket).await;
    assert_eq!(reply["type"], "error", "{reply}");
    check_problem(&reply["error"], "crew frame", "/status", false);
    let unit: Value = app
        .unit("UNIT-1", Role::Console)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        unit["status"], "out_of_service",
        "the refused frame changed nothing"
    );
}
