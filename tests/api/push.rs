//! Offers pushed to crews' phones through FCM HTTP v1, against a local FCM that checks what
//! Google checks: the service account's RS256 JWT, verified with the public half of the test key
//! (`tests/fixtures/fcm-test-key.pub.pem`), its scope, audience and lifetime, and the bearer
//! token on every send. It scripts `UNREGISTERED`, 429 with `Retry-After` and 503 per device.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use shers::domain::auth::Role;
use shers::domain::ids::UnitId;
use shers::persistence::{Backend, push_tokens};
use shers_test_support::FakeHttp;

use crate::both_backends;
use crate::helpers::{TestApp, eventually};

const SCENE: (f64, f64) = (51.5000, -0.1200);
const PROJECT: &str = "shers-test";
const CLIENT_EMAIL: &str = "dispatch@shers-test.iam.gserviceaccount.com";
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// One scripted answer of the fake's `messages:send` for a device token.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Unregistered,
    /// 429 with `Retry-After` (seconds).
    Throttled(u64),
    /// 503, with `Retry-After` (seconds) when given.
    Unavailable(Option<u64>),
}

#[derive(Default)]
struct Fcm {
    /// The token endpoint's URL (the JWT's audience), set once the fake runs.
    token_uri: Mutex<String>,
    /// Access tokens handed out.
    issued: Mutex<Vec<String>>,
    /// Why assertions were refused (must stay empty).
    refused: Mutex<Vec<String>>,
    /// Answers to give a device token before accepting its messages.
    script: Mutex<HashMap<String, VecDeque<Answer>>>,
    /// Messages accepted, as sent.
    accepted: Mutex<Vec<Value>>,
}

fn public_key_der() -> Vec<u8> {
    let pem = include_str!("../fixtures/fcm-test-key.pub.pem");
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(b64).unwrap()
}

fn form_value<'a>(form: &'a str, key: &str) -> Option<&'a str> {
    form.split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Checks the assertion as Google's token endpoint does; `Err` names what is wrong.
fn check_assertion(jwt: &str, audience: &str) -> Result<(), String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        return Err("not three parts".into());
    };
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|e| format!("signature encoding: {e}"))?;
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        public_key_der(),
    )
    .verify(format!("{header}.{claims}").as_bytes(), &signature)
    .map_err(|_| "RS256 signature does not verify".to_owned())?;
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap())
        .map_err(|e| format!("header: {e}"))?;
    if header["alg"] != "RS256" {
        return Err(format!("alg {}", header["alg"]));
    }
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap())
        .map_err(|e| format!("claims: {e}"))?;
    let now = chrono::Utc::now().timestamp();
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap_or(0),
        claims["exp"].as_i64().unwrap_or(0),
    );
    let checks = [
        (claims["iss"] == CLIENT_EMAIL, "iss"),
        (claims["scope"] == SCOPE, "scope"),
        (claims["aud"] == audience, "aud"),
        ((now - iat).abs() < 120, "iat"),
        (exp - iat == 3600, "exp"),
    ];
    match checks.iter().find(|(ok, _)| !ok) {
        Some((_, claim)) => Err(format!("claim {claim}: {claims}")),
        None => Ok(()),
    }
}

async fn token(state: web::Data<Fcm>, body: String) -> HttpResponse {
    let grant = form_value(&body, "grant_type").unwrap_or_default();
    let assertion = form_value(&body, "assertion").unwrap_or_default();
    let audience = state.token_uri.lock().unwrap().clone();
    let verdict = if grant != "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer" {
        Err(format!("grant_type {grant}"))
    } else {
        check_assertion(assertion, &audience)
    };
    if let Err(why) = verdict {
        state.refused.lock().unwrap().push(why);
        return HttpResponse::BadRequest().json(json!({"error": "invalid_grant"}));
    }
    let mut issued = state.issued.lock().unwrap();
    let access = format!("ya29.test-{}", issued.len());
    issued.push(access.clone());
    HttpResponse::Ok()
        .json(json!({"access_token": access, "expires_in": 3599, "token_type": "Bearer"}))
}

async fn send(state: web::Data<Fcm>, req: HttpRequest, body: web::Json<Value>) -> HttpResponse {
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    if !state.issued.lock().unwrap().contains(&bearer) {
        return HttpResponse::Unauthorized()
            .json(json!({"error": {"code": 401, "status": "UNAUTHENTICATED"}}));
    }
    if req.match_info().get("project") != Some(PROJECT) {
        return HttpResponse::NotFound()
            .json(json!({"error": {"code": 404, "status": "NOT_FOUND", "message": "project"}}));
    }
    let device = body["message"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let next = state
        .script
        .lock()
        .unwrap()
        .get_mut(&device)
        .and_then(VecDeque::pop_front);
    match next {
        Some(Answer::Unregistered) => HttpResponse::NotFound().json(json!({"error": {
            "code": 404, "status": "NOT_FOUND", "message": "Requested entity was not found.",
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                         "errorCode": "UNREGISTERED"}]}})),
        Some(Answer::Throttled(s)) => HttpResponse::TooManyRequests()
            .insert_header(("Retry-After", s.to_string()))
            .json(
                json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
                "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                             "errorCode": "QUOTA_EXCEEDED"}]}}),
            ),
        Some(Answer::Unavailable(after)) => {
            let mut answer = HttpResponse::ServiceUnavailable();
            if let Some(s) = after {
                answer.insert_header(("Retry-After", s.to_string()));
            }
            answer.json(json!({"error": {"code": 503, "status": "UNAVAILABLE"}}))
        }
        None => {
            let mut accepted = state.accepted.lock().unwrap();
            accepted.push(body.into_inner());
            HttpResponse::Ok()
                .json(json!({"name": format!("projects/{PROJECT}/messages/{}", accepted.len())}))
        }
    }
}

fn fake_fcm() -> FakeHttp<Fcm> {
    let fake = FakeHttp::start(Fcm::default(), |cfg| {
        cfg.route("/token", web::post().to(token))
            .route("/v1/projects/{project}/messages:send", web::post().to(send));
    });
    *fake.state().token_uri.lock().unwrap() = format!("{}/token", fake.url());
    fake
}

/// A service account key file for the fake: the committed test key, the fake's token URI.
fn credentials(fcm: &FakeHttp<Fcm>, dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("service-account.json");
    let file = json!({
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "test",
        "private_key": include_str!("../fixtures/fcm-test-key.pem"),
        "client_email": CLIENT_EMAIL,
        "token_uri": format!("{}/token", fcm.url()),
    });
    std::fs::write(&path, file.to_string()).unwrap();
    path.to_string_lossy().into_owned()
}

async fn app_with_push(
    backend: Backend,
    fcm: &FakeHttp<Fcm>,
    dir: &tempfile::TempDir,
    offer_ttl_s: u64,
    offers_per_round: usize,
) -> TestApp {
    let file = credentials(fcm, dir);
    let base = fcm.url().to_owned();
    TestApp::builder(backend)
        .with_settings(move |s| {
            s.push.fcm_credentials_file = Some(file);
            s.push.fcm_base_url = base;
            s.dispatch.offer_ttl_s = offer_ttl_s;
            s.dispatch.offers_per_round = offers_per_round;
        })
        .start()
        .await
}

async fn register(
    app: &TestApp,
    crew: &str,
    unit: &str,
    token: &str,
    platform: &str,
) -> reqwest::Response {
    app.crew_post(
        crew,
        &format!("/api/v1/units/{unit}/push-tokens"),
        &json!({"token": token, "platform": platform}),
    )
    .await
}

async fn tokens_of(app: &TestApp, unit: &str) -> Vec<String> {
    let mut conn = app.db.conn().await.unwrap();
    push_tokens::for_unit(&mut conn, &UnitId::from(unit))
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.token)
        .collect()
}

async fn open_incident(app: &TestApp) -> Value {
    app.create_incident(
        Role::Console,
        &json!({"location": {"lat": SCENE.0, "lng": SCENE.1}, "priority": "emergency"}),
    )
    .await
    .json()
    .await
    .unwrap()
}

both_backends!(
    an_offer_nobody_hears_is_pushed_to_the_crews_phones,
    a_push_is_never_retried_past_its_offer,
    push_tokens_belong_to_the_crew_of_their_unit
);

async fn an_offer_nobody_hears_is_pushed_to_the_crews_phones(backend: Backend) {
    let fcm = fake_fcm();
    let dir = tempfile::tempdir().unwrap();
    let app = app_with_push(backend, &fcm, &dir, 60, 3).await;
    app.add_unit("P1", SCENE.0 + 0.001, SCENE.1, "als").await;
    app.add_unit("P2", SCENE.0 + 0.002, SCENE.1, "als").await;
    let (crew1, crew2) = (app.crew_token("P1").await, app.crew_token("P2").await);
    for (token, platform) in [
        ("p1-android", "android"),
        ("p1-iphone", "ios"),
        ("p1-gone", "web"),
        ("p1-busy", "android"),
    ] {
        let resp = register(&app, &crew1, "P1", token, platform).await;
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    }
    assert_eq!(
        register(&app, &crew2, "P2", "p2-phone", "android")
            .await
            .status(),
        201
    );
    {
        let mut script = fcm.state().script.lock().unwrap();
        script.insert("p1-gone".into(), VecDeque::from([Answer::Unregistered]));
        script.insert(
            "p1-busy".into(),
            VecDeque::from([Answer::Throttled(1), Answer::Unavailable(None)]),
        );
    }
    // P2's crew has its app open: its offer goes down the socket, not to its phone.
    let (_socket, _) = tokio_tungstenite::connect_async(&app.ws_crew_url(&crew2))
        .await
        .unwrap();
    eventually("P2's crew session registered", || async {
        let unit: Value = app.unit("P2", Role::Console).await.json().await.ok()?;
        (unit["crew_sessions"] == 1).then_some(())
    })
    .await;

    let incident = open_incident(&app).await;
    let id = incident["id"].as_str().unwrap().to_owned();
    let incident = app
        .wait_incident(&id, |i| crate::dispatch::pending_offers(i).len() == 2)
        .await;
    let offer_of = |unit: &str| {
        crate::dispatch::pending_offers(&incident)
            .into_iter()
            .find(|(_, u)| u == unit)
            .map(|(o, _)| o)
            .unwrap()
    };
    let p1_offer = offer_of("P1");
    let accepted = eventually("P1's phones to get the offer", || async {
        let accepted = fcm.state().accepted.lock().unwrap().clone();
        (accepted.len() >= 3).then_some(accepted)
    })
    .await;
    let mut devices: Vec<&str> = accepted
        .iter()
        .map(|m| m["message"]["token"].as_str().unwrap())
        .collect();
    devices.sort_unstable();
    assert_eq!(
        devices,
        ["p1-android", "p1-busy", "p1-iphone"],
        "{accepted:#?}"
    );
    for m in &accepted {
        let m = &m["message"];
        let data = m["data"].as_object().unwrap();
        // Data only, strings only, and nothing about the patient.
        let mut keys: Vec<&str> = data.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "expires_at",
                "incident_id",
                "kind",
                "offer_id",
                "priority",
                "reference"
            ]
        );
        assert!(m.get("notification").is_none());
        assert_eq!(data["kind"], "dispatch.offer");
        assert_eq!(data["offer_id"], p1_offer.as_str());
        assert_eq!(data["incident_id"], id.as_str());
        assert_eq!(data["reference"], incident["reference"]);
        assert_eq!(data["priority"], "emergency");
        assert_eq!(m["android"]["priority"], "HIGH");
        assert_eq!(m["android"]["collapse_key"], format!("offer-{id}"));
        let ttl: u64 = m["android"]["ttl"]
            .as_str()
            .and_then(|t| t.strip_suffix('s'))
            .and_then(|t| t.parse().ok())
            .unwrap();
        assert!((1..=60).contains(&ttl), "ttl {ttl}");
        let ios = m["token"] == "p1-iphone";
        assert_eq!(m.get("apns").is_some(), ios, "{m:#}");
        if ios {
            assert_eq!(m["apns"]["headers"]["apns-priority"], "10");
        }
    }
    // The throttled phone was tried three times (429, 503, taken); the unregistered one once,
    // and its token is gone; P2's phone never.
    let sends_to = |device: &str| {
        fcm.count_where(|r| {
            r.path.ends_with("messages:send")
                && serde_json::from_slice::<Value>(&r.body)
                    .is_ok_and(|b| b["message"]["token"] == device)
        })
    };
    assert_eq!(sends_to("p1-busy"), 3);
    assert_eq!(sends_to("p1-gone"), 1);
    assert_eq!(sends_to("p2-phone"), 0);
    eventually("the unregistered token deleted", || async {
        (!tokens_of(&app, "P1").await.contains(&"p1-gone".to_owned())).then_some(())
    })
    .await;
    assert_eq!(tokens_of(&app, "P1").await.len(), 3);
    // One signed assertion served every send (the access token is cached), and it verified.
    assert!(
        fcm.state().refused.lock().unwrap().is_empty(),
        "{:?}",
        fcm.state().refused.lock().unwrap()
    );
    assert_eq!(fcm.count_where(|r| r.path == "/token"), 1);
}

async fn a_push_is_never_retried_past_its_offer(backend: Backend) {
    let fcm = fake_fcm();
    let dir = tempfile::tempdir().unwrap();
    // One unit a round, offers lapse after 2 s; L1's phone is asked to wait 3 s: its push is
    // not tried again. L2 (farther) gets the second round, and once that has lapsed too, a
    // retry of L1's push that ignored the expiry would have come.
    let app = app_with_push(backend, &fcm, &dir, 2, 1).await;
    app.add_unit("L1", SCENE.0 + 0.001, SCENE.1, "als").await;
    app.add_unit("L2", SCENE.0 + 0.01, SCENE.1, "als").await;
    for unit in ["L1", "L2"] {
        let crew = app.crew_token(unit).await;
        let phone = format!("{}-phone", unit.to_lowercase());
        assert_eq!(
            register(&app, &crew, unit, &phone, "android")
                .await
                .status(),
            201
        );
    }
    fcm.state().script.lock().unwrap().insert(
        "l1-phone".into(),
        VecDeque::from([Answer::Unavailable(Some(3)); 8]),
    );
    let incident = open_incident(&app).await;
    let id = incident["id"].as_str().unwrap().to_owned();
    let expired = |unit: &'static str| {
        move |i: &Value| {
            i["offers"].as_array().is_some_and(|o| {
                o.iter()
                    .any(|o| o["unit_id"] == unit && o["status"] == "expired")
            })
        }
    };
    let seen = app.wait_incident(&id, expired("L2")).await;
    let offer_of = |unit: &str| {
        seen["offers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["unit_id"] == unit)
            .map(|o| o["id"].as_str().unwrap().to_owned())
            .unwrap()
    };
    let sends_for = |offer: &str| {
        fcm.count_where(|r| {
            serde_json::from_slice::<Value>(&r.body)
                .is_ok_and(|b| b["message"]["data"]["offer_id"] == offer)
        })
    };
    assert_eq!(sends_for(&offer_of("L2")), 1, "L2's phone took its push");
    assert_eq!(
        sends_for(&offer_of("L1")),
        1,
        "L1's push was tried again after its offer lapsed"
    );
}

async fn push_tokens_belong_to_the_crew_of_their_unit(backend: Backend) {
    let fcm = fake_fcm();
    let dir = tempfile::tempdir().unwrap();
    let app = app_with_push(backend, &fcm, &dir, 60, 3).await;
    app.add_unit("T1", SCENE.0, SCENE.1, "als").await;
    app.add_unit("T2", SCENE.0, SCENE.1, "bls").await;
    let (crew1, crew2) = (app.crew_token("T1").await, app.crew_token("T2").await);
    // Only the unit's own crew registers; dispatchers and other crews are refused.
    assert_eq!(
        register(&app, &crew2, "T1", "x", "android").await.status(),
        403
    );
    let console = app.token(Role::Console).await;
    assert_eq!(
        register(&app, &console, "T1", "x", "android")
            .await
            .status(),
        403
    );
    let ghost = app.crew_token("T9").await;
    assert_eq!(
        register(&app, &ghost, "T9", "x", "android").await.status(),
        404
    );
    for (body, pointer) in [
        (json!({"token": "", "platform": "android"}), "/token"),
        (json!({"token": "a b", "platform": "android"}), "/token"),
        (
            json!({"token": "x".repeat(5000), "platform": "android"}),
            "/token",
        ),
        (
            json!({"token": "ok", "platform": "blackberry"}),
            "/platform",
        ),
        (json!({"platform": "android"}), "/token"),
    ] {
        let resp = app
            .crew_post(&crew1, "/api/v1/units/T1/push-tokens", &body)
            .await;
        assert_eq!(resp.status(), 422, "{body}");
        let problem: Value = resp.json().await.unwrap();
        assert!(
            problem["errors"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["pointer"] == pointer)),
            "{body}: {problem}"
        );
    }
    let created: Value = register(&app, &crew1, "T1", "phone-1", "ios")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(created["unit_id"], "T1");
    assert_eq!(created["platform"], "ios");
    assert!(created["registered_at"].is_string());
    // The same phone registered by the other unit's crew moves there.
    assert_eq!(
        register(&app, &crew2, "T2", "phone-1", "android")
            .await
            .status(),
        201
    );
    assert!(tokens_of(&app, "T1").await.is_empty());
    assert_eq!(tokens_of(&app, "T2").await, ["phone-1"]);
    // A unit keeps its newest sixteen.
    for n in 0..20 {
        assert_eq!(
            register(&app, &crew1, "T1", &format!("t1-{n:02}"), "web")
                .await
                .status(),
            201
        );
    }
    let kept = tokens_of(&app, "T1").await;
    assert_eq!(kept.len(), 16);
    assert!(!kept.contains(&"t1-00".to_owned()) && kept.contains(&"t1-19".to_owned()));
    // Removal: its own crew only; 204 whether or not it was there.
    let delete = |token: &str, unit: &str, bearer: &str| {
        app.client
            .delete(app.url(&format!("/api/v1/units/{unit}/push-tokens/{token}")))
            .bearer_auth(bearer.to_owned())
            .send()
    };
    assert_eq!(delete("phone-1", "T2", &crew1).await.unwrap().status(), 403);
    assert_eq!(delete("phone-1", "T2", &crew2).await.unwrap().status(), 204);
    assert_eq!(delete("phone-1", "T2", &crew2).await.unwrap().status(), 204);
    assert!(tokens_of(&app, "T2").await.is_empty());
    // Nothing was pushed: no offer was made.
    assert_eq!(fcm.count(), 0);
}
