//! Extreme input never breaks the server: every query parameter of every endpoint (read from
//! the served OpenAPI document, so a new endpoint is covered the day it is added), the headers
//! that carry values, and the date and number fields of request bodies are fed extreme dates
//! and numbers, first a fixed list of known edges and then values drawn by proptest. Every
//! request must be answered, never with a 5xx, and the server must still be healthy after.
//! An answer of 401/403 would mean the value never reached the handler, so it fails too.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use reqwest::Method;
use serde_json::{Value, json};
use shers::domain::auth::Role;
use shers::persistence::Backend;

use crate::both_backends;
use crate::helpers::{TestApp, api};

both_backends!(extreme_values_never_fail_a_request);

/// Dates at and past the edges of what chrono, PostgreSQL and SQLite can hold.
const EDGE_DATES: &[&str] = &[
    "-262143-01-01T00:00:00Z",
    "+262142-12-31T23:59:59Z",
    "-4714-11-24T00:00:00Z",
    "0000-01-01T00:00:00Z",
    "1969-12-31T23:59:59Z",
    "1970-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "+10000-01-01T00:00:00Z",
    "+294277-01-01T00:00:00Z",
    "2026-02-30T00:00:00Z",
];

/// Numbers at and past the edges of the integer and float types.
const EDGE_NUMBERS: &[&str] = &[
    "-9223372036854775808",
    "9223372036854775807",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "4294967296",
    "2147483648",
    "-2147483649",
    "-1",
    "0",
    "1e308",
    "-1e308",
    "1e309",
    "NaN",
    "inf",
    "-0",
    "0.000001",
];

/// Other shapes: cursors with extreme halves, empties, junk.
const EDGE_OTHERS: &[&str] = &[
    "",
    "9223372036854775807_x",
    "-9223372036854775808_x",
    "253402300800000000_x",
    "-62135596800000000_x",
    "_",
    "%00",
    "%FF%FE",
    "all",
    "emergency",
];

/// The edge values for a query string (percent-encoded where they need it).
fn edge_values() -> Vec<String> {
    EDGE_DATES
        .iter()
        .chain(EDGE_NUMBERS)
        .chain(EDGE_OTHERS)
        .map(|v| v.replace('+', "%2B"))
        .collect()
}

/// Every `(method, path, query parameter)` the OpenAPI document declares.
fn query_parameters(openapi: &Value) -> Vec<(Method, String, String)> {
    let mut out = Vec::new();
    for (path, ops) in openapi["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            for p in op["parameters"].as_array().into_iter().flatten() {
                if p["in"] == "query" {
                    let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                    out.push((method, path.clone(), p["name"].as_str().unwrap().to_owned()));
                }
            }
        }
    }
    out
}

/// A value for a query parameter drawn from the whole range of each kind: any i64, any date
/// chrono can print (years ±262,143), any f64's text, short junk.
fn any_query_value() -> impl Strategy<Value = String> {
    let min = chrono::DateTime::<chrono::Utc>::MIN_UTC.timestamp();
    let max = chrono::DateTime::<chrono::Utc>::MAX_UTC.timestamp();
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| n.to_string()),
        (min..=max).prop_map(|s| {
            chrono::DateTime::from_timestamp(s, 0)
                .map(|d| d.to_rfc3339().replace('+', "%2B"))
                .unwrap_or_default()
        }),
        (any::<i64>(), "[a-z0-9-]{0,8}").prop_map(|(n, id)| format!("{n}_{id}")),
        "[ -~]{0,12}".prop_map(|s| { s.bytes().map(|b| format!("%{b:02X}")).collect::<String>() }),
    ]
}

/// A request body with `hole` replaced by each extreme JSON value.
struct BodyCase {
    method: Method,
    path: String,
    role: BodyRole,
    template: Value,
}

#[derive(Clone, Copy)]
enum BodyRole {
    Admin,
    Console,
    Gateway,
    Crew,
}

const HOLE: &str = "<HOLE>";

fn fill(template: &Value, hole: &Value) -> Value {
    match template {
        Value::String(s) if s == HOLE => hole.clone(),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), fill(v, hole)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| fill(v, hole)).collect()),
        other => other.clone(),
    }
}

/// Every body field that holds a date or a number, one template per field.
fn body_cases() -> Vec<BodyCase> {
    let now = chrono::Utc::now().to_rfc3339();
    let mut cases = Vec::new();
    let mut case = |method: Method, path: &str, role: BodyRole, template: Value| {
        cases.push(BodyCase {
            method,
            path: path.to_owned(),
            role,
            template,
        });
    };
    let location = |at: Value, lat: Value, lng: Value, speed: Value, heading: Value| json!({"lat": lat, "lng": lng, "at": at, "speed_mps": speed, "heading_deg": heading});
    let (h, n, z) = (json!(HOLE), json!(55.95), json!(-3.19));
    for t in [
        location(h.clone(), n.clone(), z.clone(), json!(1), json!(1)),
        location(json!(now), h.clone(), z.clone(), json!(1), json!(1)),
        location(json!(now), n.clone(), h.clone(), json!(1), json!(1)),
        location(json!(now), n.clone(), z.clone(), h.clone(), json!(1)),
        location(json!(now), n.clone(), z.clone(), json!(1), h.clone()),
    ] {
        case(
            Method::POST,
            &api::unit_location("UNIT-1"),
            BodyRole::Crew,
            t,
        );
    }
    let reading = |field: &str| {
        let mut r = json!({"device_id": "x-1", "timestamp": now, "heart_rate_bpm": 72,
                           "spo2_pct": 97, "respiration_rate_bpm": 14, "body_temp_c": 36.8,
                           "systolic_bp_mmhg": 120, "location": {"lat": 55.95, "lng": -3.19}});
        if let Some((outer, inner)) = field.split_once('/') {
            r[outer][inner] = json!(HOLE);
        } else {
            r[field] = json!(HOLE);
        }
        r
    };
    for field in [
        "timestamp",
        "heart_rate_bpm",
        "spo2_pct",
        "respiration_rate_bpm",
        "body_temp_c",
        "systolic_bp_mmhg",
        "location/lat",
        "location/lng",
    ] {
        case(Method::POST, api::VITALS, BodyRole::Gateway, reading(field));
    }
    // A legacy wearable's epoch milliseconds.
    case(
        Method::POST,
        api::VITALS,
        BodyRole::Gateway,
        json!({"deviceId": "x-1", "ts": HOLE, "hr": 72}),
    );
    case(
        Method::POST,
        api::HOSPITALS,
        BodyRole::Admin,
        json!({"id": "H-X", "name": "X", "location": {"lat": 55.9, "lng": -3.2},
               "capacity": HOLE}),
    );
    case(
        Method::POST,
        api::UNITS,
        BodyRole::Admin,
        json!({"id": "U-X", "call_sign": "X", "capability": "als",
               "location": {"lat": HOLE, "lng": -3.2}}),
    );
    case(
        Method::POST,
        api::INCIDENTS,
        BodyRole::Console,
        json!({"location": {"lat": HOLE, "lng": -3.2}, "priority": "emergency",
               "description": "x"}),
    );
    case(
        Method::POST,
        api::INSURANCE_POLICIES,
        BodyRole::Admin,
        json!({"patient_id": "p-1", "insurer": "X", "policy_number": "P-1",
               "coverage_cents": HOLE}),
    );
    case(
        Method::POST,
        api::INSURANCE_VERIFY,
        BodyRole::Admin,
        json!({"patient_id": "p-1", "incident_id": "00000000-0000-0000-0000-000000000000",
               "amount_cents": HOLE}),
    );
    cases
}

/// JSON values for a hole: extreme numbers and dates, as numbers and as strings.
fn body_values() -> Vec<Value> {
    let mut values: Vec<Value> = vec![
        json!(i64::MIN),
        json!(i64::MAX),
        json!(u64::MAX),
        json!(f64::MAX),
        json!(f64::MIN),
        json!(f64::MIN_POSITIVE),
        json!(9_007_199_254_740_993_u64),
        json!(-1),
        json!(0),
        json!(null),
    ];
    values.extend(EDGE_DATES.iter().map(|d| json!(d)));
    values.extend(EDGE_NUMBERS.iter().map(|n| json!(n)));
    values
}

/// Sends one request and checks the answer: never a 5xx, never a dropped connection, never
/// turned away before the handler.
async fn check(app: &TestApp, req: reqwest::RequestBuilder, what: &str) {
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: no answer ({e})"));
    let status = resp.status();
    let body = if status.is_server_error() {
        resp.text().await.unwrap_or_default()
    } else {
        String::new()
    };
    assert!(!status.is_server_error(), "{what}: {status} {body}");
    assert!(
        status != 401 && status != 403,
        "{what}: {status}: the value never reached the handler"
    );
    let _ = app;
}

async fn extreme_values_never_fail_a_request(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register_wearer("p-1", "x-1").await;
    app.add_unit("UNIT-1", 55.95, -3.19, "als").await;
    let admin = app.token(Role::Admin).await;
    let crew = app.crew_token("UNIT-1").await;
    let token = |role: BodyRole| match role {
        BodyRole::Admin | BodyRole::Console => admin.clone(),
        BodyRole::Crew => crew.clone(),
        BodyRole::Gateway => String::new(),
    };
    let gateway = app.token(Role::Gateway).await;
    let console = app.token(Role::Console).await;

    let openapi: Value = app
        .get(api::OPENAPI, Some(Role::Admin))
        .await
        .json()
        .await
        .unwrap();
    // `access_token` (the WebSocket routes' credential) is the auth tests' business: here a
    // value must reach the handler.
    let params: Vec<_> = query_parameters(&openapi)
        .into_iter()
        .filter(|(_, _, name)| name != "access_token")
        .collect();
    assert!(
        params.len() >= 8,
        "the OpenAPI document lists too few query parameters: {params:?}"
    );
    let request = |method: &Method, path: &str, query: &str| {
        let url = app.url(&format!("{}?{query}", path.replace("{id}", "x")));
        app.client.request(method.clone(), url).bearer_auth(&admin)
    };

    // 1. Every query parameter, every edge value.
    for (method, path, name) in &params {
        for value in edge_values() {
            let what = format!("{method} {path}?{name}={value}");
            check(
                &app,
                request(method, path, &format!("{name}={value}")),
                &what,
            )
            .await;
        }
    }

    // 2. Headers that carry values.
    for value in EDGE_NUMBERS.iter().chain(EDGE_DATES) {
        let req = app
            .client
            .get(app.url(api::EVENTS_STREAM))
            .bearer_auth(&console)
            .header("Last-Event-ID", *value);
        check(&app, req, &format!("Last-Event-ID: {value}")).await;
    }

    // 3. Date and number fields of request bodies.
    for case in body_cases() {
        for value in body_values() {
            let body = fill(&case.template, &value);
            let bearer = match case.role {
                BodyRole::Gateway => gateway.clone(),
                role => token(role),
            };
            let req = app
                .client
                .request(case.method.clone(), app.url(&case.path))
                .bearer_auth(bearer)
                .json(&body);
            check(&app, req, &format!("{} {} {body}", case.method, case.path)).await;
        }
    }

    // 4. Drawn values: a random parameter (or two at once) with values from every range.
    let mut runner = TestRunner::new(Config {
        cases: 256,
        ..Config::default()
    });
    let strategy = (
        0..params.len(),
        any_query_value(),
        0..params.len(),
        any_query_value(),
    );
    for _ in 0..256 {
        let (i, a, j, b) = strategy.new_tree(&mut runner).unwrap().current();
        let (method, path, name) = &params[i];
        let (_, other_path, other) = &params[j];
        let query = if other_path == path && other != name {
            format!("{name}={a}&{other}={b}")
        } else {
            format!("{name}={a}")
        };
        let what = format!("{method} {path}?{query}");
        check(&app, request(method, path, &query), &what).await;
    }

    // Still healthy and answering.
    let health = app.get(api::READYZ, None).await;
    assert_eq!(health.status(), 200);
}
