//! The whole lifecycle to `closed`: dispatch, crew reports, the billing saga through the
//! in-process insurance service (over HTTP) and the sandbox payment provider, compensation on
//! a declined charge, and the unit back to available.

use reqwest::StatusCode;
use serde_json::{Value, json};
use shers::domain::auth::Role;
use shers::persistence::{Backend, tokens};
use shers_test_support::FakeHttp;

use crate::both_backends;
use crate::helpers::{TestApp, TestDb, api};

both_backends!(
    partial_coverage_is_charged_and_closes,
    declined_charge_is_compensated
);

const SCENE: (f64, f64) = (51.5000, -0.1200);

async fn run_to_hospital(
    app: &TestApp,
    patient: &str,
    member_id: &str,
    coverage_cents: i64,
) -> String {
    let resp = app
        .create_patient(
            Role::Admin,
            &json!({"id": patient, "name": "Billed Patient", "home_location": {"lat": SCENE.0, "lng": SCENE.1},
                    "insurance": {"provider": "Acme Health", "member_id": member_id},
                    "next_of_kin": [{"name": "Kin", "email": "kin@example.org"}]}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = app
        .create_policy(
            Role::Admin,
            &json!({"patient_id": patient, "provider": "Acme Health", "member_id": member_id, "coverage_cents": coverage_cents}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    app.add_unit("A1", SCENE.0 + 0.002, SCENE.1, "als").await;
    let resp = app
        .create_hospital(Role::Admin,
            &json!({"id": "h1", "name": "General", "location": {"lat": SCENE.0 + 0.1, "lng": SCENE.1}, "capacity": 3}))
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let body: Value = app
        .create_incident(Role::Console, &json!({"patient_id": patient}))
        .await
        .json()
        .await
        .unwrap();
    let id = body["id"].as_str().unwrap().to_owned();
    let incident = app
        .wait_incident(&id, |i| {
            i["offers"]
                .as_array()
                .is_some_and(|o| o.iter().any(|o| o["status"] == "pending"))
        })
        .await;
    let offer = incident["offers"][0]["id"].as_str().unwrap().to_owned();
    let token = app.crew_token("A1").await;
    assert_eq!(
        app.accept_offer(&token, &offer).await.status(),
        StatusCode::OK
    );
    for s in ["enroute", "on_scene", "transporting", "at_hospital"] {
        let resp = app.unit_status(&token, "A1", s).await;
        assert_eq!(resp.status(), StatusCode::OK, "{s}");
    }
    id
}

async fn partial_coverage_is_charged_and_closes(backend: Backend) {
    let app = TestApp::builder(backend)
        .with_settings(|s| s.payments.provider = shers::config::PaymentProvider::Sandbox)
        .start()
        .await;
    let id = run_to_hospital(&app, "pb-1", "M-12345", 40_000).await;
    let incident = app.wait_incident(&id, |i| i["status"] == "closed").await;
    let invoice = &incident["invoice"];
    assert_eq!(invoice["status"], "paid", "{invoice}");
    // Tariff: 50,000 base + 15,000 ALS + 1,200 per km (scene → hospital about 11.1 km).
    let amount = invoice["amount_cents"].as_i64().unwrap();
    assert!((75_000..80_000).contains(&amount), "{amount}");
    assert_eq!(invoice["covered_cents"], 40_000);
    assert_eq!(invoice["patient_due_cents"], amount - 40_000);
    assert_eq!(invoice["sandbox"], true);
    let resp = app.invoice(&id, Role::Console).await;
    assert_eq!(resp.status(), StatusCode::OK);
    for kind in [
        "billing.started",
        "billing.insurance_verified",
        "billing.payment_succeeded",
        "billing.completed",
        "incident.closed",
    ] {
        assert_eq!(app.events_of(kind).await.len(), 1, "{kind}");
    }
    assert!(incident["times"]["closed"].is_string());
    // The unit is available again.
    crate::helpers::eventually("the unit available again", || async {
        let unit: Value = app.unit("A1", Role::Console).await.json().await.unwrap();
        (unit["status"] == "available").then_some(())
    })
    .await;
}

async fn declined_charge_is_compensated(backend: Backend) {
    let app = TestApp::builder(backend)
        .with_settings(|s| s.payments.provider = shers::config::PaymentProvider::Sandbox)
        .start()
        .await;
    // Sandbox rule: a member id ending in 0 is declined. Coverage 10,000 so a share is due.
    let id = run_to_hospital(&app, "pb-2", "M-12340", 10_000).await;
    let incident = app.wait_incident(&id, |i| i["status"] == "closed").await;
    let invoice = &incident["invoice"];
    assert_eq!(invoice["status"], "failed", "{invoice}");
    let steps: Vec<&str> = invoice["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert!(steps.contains(&"release_claim"), "{steps:?}");
    assert_eq!(steps.last(), Some(&"void_invoice"), "{steps:?}");
    assert_eq!(app.events_of("billing.payment_failed").await.len(), 1);
    assert!(!app.events_of("billing.compensated").await.is_empty());
    assert_eq!(app.events_of("billing.failed").await.len(), 1);
    // The claim hold was released: the policy covers its full 10,000 again.
    let check: Value = app
        .verify_insurance(
            Role::Admin,
            &json!({"patient_id": "pb-2", "incident_id": "other", "amount_cents": 10_000}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(check["coverage_status"], "fully_covered");
}

/// A Stripe-compatible fake that replays by `Idempotency-Key` (as Stripe does) and can hold its
/// first answer long enough for the test to kill SHERS mid-charge. The cluster tests drive it
/// too, through these fields (`requests`, `hold_first`, `intents`), so they stay as they are
/// rather than moving to the fake's own journal and [`FakeHttp::hold`].
pub(crate) mod fake_stripe {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use actix_web::{HttpRequest, HttpResponse, web};
    use serde_json::json;

    use shers_test_support::FakeHttp;

    #[derive(Default)]
    pub struct Stripe {
        pub requests: AtomicUsize,
        pub intents: Mutex<HashMap<String, String>>,
        pub hold_first: AtomicBool,
    }

    async fn payment_intent(state: web::Data<Stripe>, req: HttpRequest) -> HttpResponse {
        state.requests.fetch_add(1, Ordering::SeqCst);
        let key = req
            .headers()
            .get("Idempotency-Key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        // The charge happens (once per key) before any answer is sent.
        let id = {
            let mut intents = state.intents.lock().unwrap();
            let n = intents.len();
            intents
                .entry(key)
                .or_insert_with(|| format!("pi_{n:024}"))
                .clone()
        };
        if state.hold_first.swap(false, Ordering::SeqCst) {
            actix_web::rt::time::sleep(std::time::Duration::from_secs(30)).await;
        }
        HttpResponse::Ok()
            .json(json!({"id": id, "object": "payment_intent", "status": "succeeded", "amount": 1}))
    }

    pub fn start(state: Stripe) -> FakeHttp<Stripe> {
        FakeHttp::start(state, |cfg| {
            cfg.route("/v1/payment_intents", web::post().to(payment_intent));
        })
    }
}

both_backends!(a_crash_after_the_charge_never_charges_twice);

async fn a_crash_after_the_charge_never_charges_twice(backend: Backend) {
    use std::sync::atomic::Ordering;
    let fake = fake_stripe::start(fake_stripe::Stripe::default());
    let stripe = fake.state();
    stripe.hold_first.store(true, Ordering::SeqCst);
    // A plain port keeps `configure` `Copy`: both apps below use it.
    let port = fake.port();
    let configure = move |s: &mut shers::config::Settings| {
        s.payments.provider = shers::config::PaymentProvider::Stripe;
        s.payments.base_url = format!("http://127.0.0.1:{port}");
        s.payments.api_key = Some(shers::config::Secret::new("sk_test_fake".into()));
    };
    let app = TestApp::builder(backend)
        .with_settings(configure)
        .start()
        .await;
    let id = run_to_hospital(&app, "pc-1", "M-777", 0).await;
    // Wait until the charge request reached the provider (which charged and is holding its
    // answer), then kill SHERS without a graceful shutdown.
    crate::helpers::eventually("the charge at the provider", || async {
        (stripe.requests.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;
    assert_eq!(stripe.requests.load(Ordering::SeqCst), 1);
    let tdb = app.kill().await;
    // A new process resumes the saga: the charge is retried with the same idempotency key and
    // the provider replays the first result.
    let app = TestApp::builder(backend)
        .with_settings(configure)
        .start_on(tdb)
        .await;
    let incident = app.wait_incident(&id, |i| i["status"] == "closed").await;
    assert_eq!(
        incident["invoice"]["status"], "paid",
        "{}",
        incident["invoice"]
    );
    assert!(
        stripe.requests.load(Ordering::SeqCst) >= 2,
        "the charge was retried"
    );
    assert_eq!(
        stripe.intents.lock().unwrap().len(),
        1,
        "exactly one charge"
    );
    assert_eq!(app.events_of("billing.payment_succeeded").await.len(), 1);
}

both_backends!(full_coverage_charges_nothing_and_every_message_is_queued);

async fn full_coverage_charges_nothing_and_every_message_is_queued(backend: Backend) {
    let app = TestApp::builder(backend)
        .with_settings(|s| s.payments.provider = shers::config::PaymentProvider::Sandbox)
        .start()
        .await;
    let id = run_to_hospital(&app, "pf-1", "M-55555", 10_000_000).await;
    let incident = app.wait_incident(&id, |i| i["status"] == "closed").await;
    let invoice = &incident["invoice"];
    assert_eq!(invoice["status"], "paid");
    assert_eq!(invoice["patient_due_cents"], 0);
    assert_eq!(invoice["covered_cents"], invoice["amount_cents"]);
    let steps: Vec<&str> = invoice["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert!(
        !steps.contains(&"charge"),
        "a zero share charges nothing: {steps:?}"
    );
    assert!(app.events_of("billing.payment_succeeded").await.is_empty());
    // Next of kin hear about every stage (email; no SMTP configured here, so logged, not sent).
    let mut templates: Vec<String> =
        crate::helpers::eventually("the four notifications sent", || async {
            let detail: Value = app.incident(&id, Role::Console).await.json().await.unwrap();
            let sent: Vec<String> = detail["notifications"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["status"] == "sent")
                .map(|n| n["template"].as_str().unwrap().to_owned())
                .collect();
            (sent.len() >= 4).then_some(sent)
        })
        .await;
    templates.sort();
    assert_eq!(
        templates,
        [
            "arrived_at_hospital",
            "billing_outcome",
            "incident_created",
            "unit_assigned"
        ]
    );
}

#[actix_web::test]
async fn an_insurer_outage_is_retried_until_it_answers() {
    use actix_web::{HttpResponse, web};
    use shers_test_support::Nth;
    // A separate insurance service that is down (503) for its first two calls.
    async fn verify(Nth(n): Nth, body: web::Json<Value>) -> HttpResponse {
        if n < 2 {
            return HttpResponse::ServiceUnavailable().finish();
        }
        let amount = body["amount_cents"].as_i64().unwrap_or(0);
        HttpResponse::Ok().json(json!({"verified": true, "coverage_status": "fully_covered",
            "covered_cents": amount, "patient_due_cents": 0, "claim_id": "clm_ext"}))
    }
    let insurer = FakeHttp::start((), |cfg| {
        cfg.route(api::INSURANCE_VERIFY, web::post().to(verify));
    });
    let app = TestApp::builder(Backend::Sqlite)
        .with_settings(|s| {
            s.payments.provider = shers::config::PaymentProvider::Sandbox;
            s.insurance.base_url = Some(insurer.url().to_owned());
            s.insurance.api_token = Some(shers::config::Secret::new("external-token".into()));
        })
        .start()
        .await;
    let id = run_to_hospital(&app, "po-1", "M-1", 0).await;
    let incident = app.wait_incident(&id, |i| i["status"] == "closed").await;
    assert_eq!(incident["invoice"]["status"], "paid");
    assert_eq!(
        incident["invoice"]["covered_cents"],
        incident["invoice"]["amount_cents"]
    );
    assert_eq!(
        insurer.count_where(|r| r.path == api::INSURANCE_VERIFY),
        3,
        "two failures, then verified"
    );
    let steps = incident["invoice"]["steps"].as_array().unwrap();
    assert!(
        steps
            .iter()
            .filter(|s| s["step"] == "verify_insurance")
            .count()
            >= 3,
        "{steps:?}"
    );
}

both_backends!(the_same_billing_command_twice_charges_once);

async fn the_same_billing_command_twice_charges_once(backend: Backend) {
    use shers::actors::billing::StartBilling;
    use std::sync::atomic::Ordering;
    let fake = fake_stripe::start(fake_stripe::Stripe::default());
    let stripe = fake.state();
    let app = TestApp::builder(backend)
        .with_settings(|s| {
            s.payments.provider = shers::config::PaymentProvider::Stripe;
            s.payments.base_url = fake.url().to_owned();
            s.payments.api_key = Some(shers::config::Secret::new("sk_test_fake".into()));
        })
        .start()
        .await;
    let id = run_to_hospital(&app, "pt-1", "M-4242", 0).await;
    // Billing was started by the handover; a dispatcher's tool (or a retry) asks again, twice.
    for _ in 0..2 {
        app.billing.do_send(StartBilling(id.parse().unwrap()));
    }
    let incident = app.wait_incident(&id, |i| i["status"] == "closed").await;
    assert_eq!(incident["invoice"]["status"], "paid");
    // And once more after it finished.
    app.billing
        .send(StartBilling(id.parse().unwrap()))
        .await
        .unwrap();
    actix_web::rt::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(stripe.intents.lock().unwrap().len(), 1, "one charge");
    let steps: Vec<String> = incident["invoice"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{}:{}", s["step"], s["outcome"]))
        .collect();
    assert_eq!(
        stripe.requests.load(Ordering::SeqCst),
        1,
        "one charge request: {steps:?}"
    );
    assert_eq!(
        app.events_of("billing.started").await.len(),
        1,
        "one invoice"
    );
    assert_eq!(app.events_of("billing.completed").await.len(), 1);
}

both_backends!(a_processing_payment_is_read_again_not_created_again);

/// A payment the provider is still processing is re-read (`GET /v1/payment_intents/{id}`)
/// until it settles. Creating it again with the same idempotency key would get Stripe's
/// replay of the first answer, `processing`, for ever.
async fn a_processing_payment_is_read_again_not_created_again(backend: Backend) {
    use actix_web::{HttpRequest, HttpResponse, web};

    async fn create() -> HttpResponse {
        // Every create (a replay included) answers what the first one did.
        HttpResponse::Ok().json(
            json!({"id": "pi_slow", "object": "payment_intent", "status": "processing", "amount": 1}),
        )
    }
    async fn read(req: HttpRequest) -> HttpResponse {
        let id = req.match_info().get("id").unwrap_or_default().to_owned();
        HttpResponse::Ok()
            .json(json!({"id": id, "object": "payment_intent", "status": "succeeded", "amount": 1}))
    }
    let fake = FakeHttp::start((), |cfg| {
        cfg.route("/v1/payment_intents", web::post().to(create))
            .route("/v1/payment_intents/{id}", web::get().to(read));
    });
    let port = fake.port();
    let app = TestApp::builder(backend)
        .with_settings(move |s| {
            s.payments.provider = shers::config::PaymentProvider::Stripe;
            s.payments.base_url = format!("http://127.0.0.1:{port}");
            s.payments.api_key = Some(shers::config::Secret::new("sk_test_fake".into()));
        })
        .start()
        .await;
    let id = run_to_hospital(&app, "pp-1", "M-888", 0).await;
    let incident = app.wait_incident(&id, |i| i["status"] == "closed").await;
    assert_eq!(
        incident["invoice"]["status"], "paid",
        "{:#}",
        incident["invoice"]
    );
    let creates = fake.count_where(|r| r.method == "POST" && r.path == "/v1/payment_intents");
    let reads = fake.count_where(|r| {
        r.method == "GET"
            && r.path
                .strip_prefix("/v1/payment_intents/")
                .is_some_and(|id| !id.is_empty() && !id.contains('/'))
    });
    assert_eq!(creates, 1, "created once");
    assert!(reads >= 1, "read again");
}

both_backends!(billings_own_credential_is_good_for_its_insurance_calls_only);

/// Without `insurance.api_token`, billing presents a credential its server made at start and
/// holds in memory (here caught by a fake insurer it was pointed at): it is no API token (no
/// public route takes it), it works for billing's insurance calls on that same server, and it
/// dies with the process.
async fn billings_own_credential_is_good_for_its_insurance_calls_only(backend: Backend) {
    use actix_web::{HttpResponse, web};
    async fn verify(body: web::Json<Value>) -> HttpResponse {
        let amount = body["amount_cents"].as_i64().unwrap_or(0);
        HttpResponse::Ok().json(json!({"verified": true, "coverage_status": "fully_covered",
            "covered_cents": amount, "patient_due_cents": 0, "claim_id": "clm_fake"}))
    }
    let insurer = FakeHttp::start((), |cfg| {
        cfg.route(api::INSURANCE_VERIFY, web::post().to(verify));
    });
    let url = insurer.url().to_owned();
    let settings = move |s: &mut shers::config::Settings| {
        s.payments.provider = shers::config::PaymentProvider::Sandbox;
        s.insurance.base_url = Some(url.clone());
    };
    let app = TestApp::builder(backend)
        .with_settings(settings.clone())
        .start()
        .await;
    let id = run_to_hospital(&app, "pc-1", "M-1", 0).await;
    app.wait_incident(&id, |i| i["status"] == "closed").await;
    let credential = insurer
        .requests()
        .iter()
        .filter(|r| r.path == api::INSURANCE_VERIFY)
        .find_map(|r| {
            r.header("authorization")?
                .strip_prefix("Bearer ")
                .map(str::to_owned)
        })
        .unwrap();
    let client = reqwest::Client::new();
    let send = async |method: reqwest::Method, path: &str, body: &Value| {
        client
            .request(method, app.url(path))
            .bearer_auth(&credential)
            .json(body)
            .send()
            .await
            .unwrap()
            .status()
    };
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    let nothing = json!({});
    assert_eq!(
        send(get.clone(), api::ADMIN_TOKENS, &nothing).await,
        StatusCode::UNAUTHORIZED
    );
    let admin = json!({"role": "admin", "name": "stolen"});
    assert_eq!(
        send(post.clone(), api::ADMIN_TOKENS, &admin).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(get, api::WHOAMI, &nothing).await,
        StatusCode::UNAUTHORIZED
    );
    let policy = json!({"patient_id": "pc-1", "provider": "Acme Health", "member_id": "M-2",
                        "coverage_cents": 1});
    assert_eq!(
        send(post.clone(), api::INSURANCE_POLICIES, &policy).await,
        StatusCode::UNAUTHORIZED,
        "billing only verifies and releases claims"
    );
    let claim = json!({"patient_id": "pc-1", "incident_id": "inc-1", "amount_cents": 100});
    assert_eq!(
        send(post.clone(), api::INSURANCE_VERIFY, &claim).await,
        StatusCode::OK
    );

    // The next run of the server has a credential of its own; the old one is dead.
    let tdb = app.kill().await;
    let app = TestApp::builder(backend)
        .with_settings(settings)
        .start_on(tdb)
        .await;
    let resp = client
        .post(app.url(api::INSURANCE_VERIFY))
        .bearer_auth(&credential)
        .json(&claim)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

both_backends!(an_external_insurance_service_takes_the_configured_token);

/// A server whose insurance service runs apart (`shers insurance`, a real process on the same
/// database) bills through it with the configured `insurance.api_token`.
async fn an_external_insurance_service_takes_the_configured_token(backend: Backend) {
    use std::process::{Command, Stdio};
    let tdb = TestDb::new(backend).await;
    let db = tdb.migrated().await;
    let mut conn = db.conn().await.unwrap();
    let token = tokens::create(
        &mut conn,
        Role::Admin,
        None,
        None,
        "billing of the dispatch server",
        chrono::Utc::now(),
    )
    .await
    .unwrap()
    .token;
    drop(conn);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_shers"));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("SHERS_") || key == "DATABASE_URL" || key == "REDIS_URL" {
            command.env_remove(key.as_ref());
        }
    }
    let insurer = Killed(
        command
            .args(["insurance", "--bind", &format!("127.0.0.1:{port}")])
            .env("DATABASE_URL", &tdb.url)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    while !client
        .get(format!("{url}{}", api::HEALTHZ))
        .send()
        .await
        .is_ok_and(|r| r.status() == StatusCode::OK)
    {
        assert!(
            started.elapsed() < crate::helpers::PATIENCE,
            "shers insurance did not start"
        );
        actix_web::rt::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let app = TestApp::builder(backend)
        .with_settings(|s| {
            s.payments.provider = shers::config::PaymentProvider::Sandbox;
            s.insurance.base_url = Some(url.clone());
            s.insurance.api_token = Some(shers::config::Secret::new(token));
        })
        .start_on(tdb)
        .await;
    // The policy is stored through this server's own service (same database); the coverage
    // decision comes from the external one.
    let id = run_to_hospital(&app, "px-1", "M-8", 30_000).await;
    let incident = app.wait_incident(&id, |i| i["status"] == "closed").await;
    let invoice = &incident["invoice"];
    assert_eq!(invoice["status"], "paid", "{invoice}");
    assert_eq!(invoice["covered_cents"], 30_000, "{invoice}");
    drop(insurer);
}

/// A child process killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
