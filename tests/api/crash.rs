//! Crash points: recovery is proven at every named point, not where a kill happened to land.
//!
//! For each point `shers fault points` lists, a real `shers serve --enable-fault-injection`
//! process armed with `SHERS_FAULT__CRASH_AT=<point>` runs an emergency as its clients would
//! (a gateway's reading, a crew accepting and reporting, billing through a fake Stripe and
//! the in-process insurer) until it aborts at that point. A new process on the same database
//! (unarmed) must then finish the emergency while the clients retry what failed, and the
//! invariants must hold: the incident ends, the unit is available and on no incident, at most
//! one charge and no refund unless the failure path asks for one, and every notification is
//! sent at least once. Each run has its own database, on SQLite and on PostgreSQL.
//!
//! `lease.*` points need a PostgreSQL cluster; `tests/api/cluster.rs` starts clusters, and
//! they are listed here as covered elsewhere only when a test there crashes at them.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix_web::{HttpRequest, HttpResponse, web};
use reqwest::StatusCode;
use serde_json::{Value, json};
use shers::domain::auth::Role;
use shers::persistence::{Backend, tokens};
use shers_test_support::FakeHttp;

use crate::both_backends;
use crate::helpers::{TestDb, api};

/// What the fake payment provider does with a charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Charge {
    /// Succeeds at once.
    Succeed,
    /// Declined (402, the intent left `requires_payment_method`): the saga compensates.
    Decline,
    /// The intent needs the cardholder (`requires_action`), who completes it before the saga's
    /// cancel arrives: the cancel is refused (400, `payment_intent_unexpected_state`), the
    /// intent reads `succeeded`, and the saga refunds it.
    CompletedBeforeCancel,
}

/// What the clients do besides the plain path.
#[derive(Clone, Copy, Debug)]
struct Scenario {
    /// The fake provider's answer to a charge.
    charge: Charge,
    /// One offer per round, and the nearer unit's crew declines its offer: the second round
    /// goes to the farther unit.
    decline_first: bool,
    /// A dispatcher cancels the incident once a unit is assigned.
    cancel: bool,
    /// The process runs as a one-node cluster on this Redis (and PostgreSQL): it takes the
    /// dispatch lease from the process before it, which was killed holding it.
    cluster: Option<&'static str>,
    /// The process relays the event store to a private exchange on RabbitMQ, and the run
    /// checks that every stored event reached it.
    amqp: bool,
}

const PLAIN: Scenario = Scenario {
    charge: Charge::Succeed,
    decline_first: false,
    cancel: false,
    cluster: None,
    amqp: false,
};

/// A Stripe stand-in that keeps what Stripe keeps: one intent per idempotency key (a replayed
/// key gets the first answer), and counts of every call.
struct Stripe {
    charge: Charge,
    intents: Mutex<HashMap<String, String>>,
    creates: AtomicUsize,
    cancels: AtomicUsize,
    /// Idempotency keys of the refunds asked for: a replayed key is the same refund.
    refunds: Mutex<Vec<String>>,
}

impl Stripe {
    fn new(charge: Charge) -> Self {
        Self {
            charge,
            intents: Mutex::new(HashMap::new()),
            creates: AtomicUsize::new(0),
            cancels: AtomicUsize::new(0),
            refunds: Mutex::new(Vec::new()),
        }
    }
}

async fn create(state: web::Data<Stripe>, req: HttpRequest) -> HttpResponse {
    state.creates.fetch_add(1, Ordering::SeqCst);
    let key = req
        .headers()
        .get("Idempotency-Key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let id = {
        let mut intents = state.intents.lock().unwrap();
        let n = intents.len();
        intents
            .entry(key)
            .or_insert_with(|| format!("pi_crash_{n}"))
            .clone()
    };
    match state.charge {
        Charge::Succeed => HttpResponse::Ok().json(
            json!({"id": id, "object": "payment_intent", "status": "succeeded", "amount": 1}),
        ),
        Charge::Decline => HttpResponse::PaymentRequired().json(json!({"error": {
            "type": "card_error", "code": "card_declined", "message": "Your card was declined.",
            "payment_intent": {"id": id, "object": "payment_intent", "amount": 1,
                               "status": "requires_payment_method"}}})),
        Charge::CompletedBeforeCancel => HttpResponse::Ok().json(
            json!({"id": id, "object": "payment_intent", "status": "requires_action", "amount": 1}),
        ),
    }
}

/// The intent as it is now (only `CompletedBeforeCancel` ever has one read back).
async fn retrieve(state: web::Data<Stripe>, req: HttpRequest) -> HttpResponse {
    let id = req.match_info().get("id").unwrap_or_default().to_owned();
    let status = match state.charge {
        Charge::CompletedBeforeCancel | Charge::Succeed => "succeeded",
        Charge::Decline => "requires_payment_method",
    };
    HttpResponse::Ok()
        .json(json!({"id": id, "object": "payment_intent", "status": status, "amount": 1}))
}

async fn cancel(state: web::Data<Stripe>, req: HttpRequest) -> HttpResponse {
    state.cancels.fetch_add(1, Ordering::SeqCst);
    let id = req.match_info().get("id").unwrap_or_default().to_owned();
    if state.charge == Charge::CompletedBeforeCancel {
        return HttpResponse::BadRequest().json(json!({"error": {
            "type": "invalid_request_error", "code": "payment_intent_unexpected_state",
            "message": "You cannot cancel this PaymentIntent because it has a status of succeeded.",
            "payment_intent": {"id": id, "object": "payment_intent", "amount": 1,
                               "status": "succeeded"}}}));
    }
    HttpResponse::Ok()
        .json(json!({"id": id, "object": "payment_intent", "status": "canceled", "amount": 1}))
}

async fn refund(state: web::Data<Stripe>, req: HttpRequest) -> HttpResponse {
    let key = req
        .headers()
        .get("Idempotency-Key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    state.refunds.lock().unwrap().push(key);
    HttpResponse::Ok().json(json!({"id": "re_crash", "object": "refund", "status": "succeeded"}))
}

fn fake_stripe(charge: Charge) -> FakeHttp<Stripe> {
    FakeHttp::start(Stripe::new(charge), |cfg| {
        cfg.route("/v1/payment_intents", web::post().to(create))
            .route("/v1/payment_intents/{id}", web::get().to(retrieve))
            .route("/v1/payment_intents/{id}/cancel", web::post().to(cancel))
            .route("/v1/refunds", web::post().to(refund));
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const SCENE: (f64, f64) = (51.5000, -0.1200);
/// The nearer unit (offered first) and the farther one.
const UNIT: &str = "CR1";
const UNIT_2: &str = "CR2";
const DEVICE: &str = "crash-watch";
const PATIENT: &str = "crash-patient";

/// One `shers serve` process at a time on one database and one port, restarted as needed.
struct Server {
    db: TestDb,
    port: u16,
    stripe_port: u16,
    offers_per_round: usize,
    redis: Option<&'static str>,
    /// `SHERS_AMQP__*` for every start (the relay on, ingest off).
    amqp: Vec<(&'static str, String)>,
    dir: tempfile::TempDir,
    child: Option<Child>,
    starts: usize,
    client: reqwest::Client,
}

impl Server {
    async fn new(backend: Backend, stripe_port: u16, scenario: Scenario) -> Self {
        let db = TestDb::new(backend).await;
        // Migrated once here, so every start below finds the schema.
        drop(db.migrated().await);
        Self {
            db,
            port: free_port(),
            stripe_port,
            offers_per_round: if scenario.decline_first { 1 } else { 3 },
            redis: scenario.cluster,
            amqp: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            starts: 0,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
        }
    }

    fn log(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("serve-{n}.log"))
    }

    /// Starts a process, armed with `crash_at` when given, and waits until it is ready.
    async fn start(&mut self, crash_at: Option<&str>) {
        self.start_attempt(crash_at, 0).await;
    }

    async fn start_attempt(&mut self, crash_at: Option<&str>, attempt: usize) {
        let file = std::fs::File::create(self.log(self.starts)).unwrap();
        self.starts += 1;
        let mut command = Command::new(env!("CARGO_BIN_EXE_shers"));
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("SHERS_") || key == "DATABASE_URL" || key == "REDIS_URL" {
                command.env_remove(key.as_ref());
            }
        }
        command
            .args([
                "serve",
                "--enable-fault-injection",
                "--bind",
                &format!("127.0.0.1:{}", self.port),
            ])
            .env("DATABASE_URL", &self.db.url)
            .env("SHERS_PAYMENTS__PROVIDER", "stripe")
            .env(
                "SHERS_PAYMENTS__BASE_URL",
                format!("http://127.0.0.1:{}", self.stripe_port),
            )
            .env("SHERS_PAYMENTS__API_KEY", "sk_test_crash")
            .env("SHERS_HTTP__WORKERS", "2")
            .env(
                "SHERS_DISPATCH__OFFERS_PER_ROUND",
                self.offers_per_round.to_string(),
            )
            .env("RUST_LOG", "info,shers::access=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        if let Some(point) = crash_at {
            command.env("SHERS_FAULT__CRASH_AT", point);
        }
        for (key, value) in &self.amqp {
            command.env(key, value);
        }
        if let Some(redis) = self.redis {
            command
                .env("REDIS_URL", redis)
                .env("SHERS_CLUSTER__NODE_ID", "crash-n1")
                .env("SHERS_CLUSTER__LEASE_MS", "1500");
        }
        self.child = Some(command.spawn().unwrap());
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Some(status) = self.exited() {
                // Another test took the port between two starts: move to a free one (the
                // clients follow `self.port`).
                let log = std::fs::read_to_string(self.log(self.starts - 1)).unwrap_or_default();
                if log.contains("Address already in use") && attempt < 5 {
                    self.port = free_port();
                    return Box::pin(self.start_attempt(crash_at, attempt + 1)).await;
                }
                // A point reached during start-up (recovery) is a crash like any other; the
                // driver sees the exit.
                if crash_at.is_some() {
                    return;
                }
                panic!("shers serve exited at start: {status}\n{}", self.logs());
            }
            let ready = self
                .client
                .get(self.url(api::READYZ))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("shers serve never became ready\n{}", self.logs());
    }

    /// The exit status if the process has ended.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every process's log, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        for n in 0..self.starts {
            let text = std::fs::read_to_string(self.log(n)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- start {n} ---\n"));
            out.push_str(&lines[lines.len().saturating_sub(30)..].join("\n"));
            out.push('\n');
        }
        out
    }

    async fn post(&self, token: &str, path: &str, body: &Value) -> Option<reqwest::Response> {
        self.client
            .post(self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .ok()
    }

    async fn get_json(&self, token: &str, path: &str) -> Option<Value> {
        let resp = self
            .client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .ok()?;
        if resp.status() != StatusCode::OK {
            return None;
        }
        resp.json().await.ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The tokens the clients use.
struct Tokens {
    admin: String,
    console: String,
    gateway: String,
    crews: HashMap<&'static str, String>,
}

impl Tokens {
    fn crew(&self, unit: &str) -> &str {
        &self.crews[unit]
    }
}

async fn tokens_for(server: &Server) -> Tokens {
    let db = server.db.connect().await;
    let mut conn = db.conn().await.unwrap();
    let mut mint = async |role| {
        tokens::create(
            &mut conn,
            role,
            None,
            None,
            "crash test",
            chrono::Utc::now(),
        )
        .await
        .unwrap()
        .token
    };
    let (admin, console, gateway) = (
        mint(Role::Admin).await,
        mint(Role::Console).await,
        mint(Role::Gateway).await,
    );
    drop(conn);
    Tokens {
        admin,
        console,
        gateway,
        crews: HashMap::from([
            (UNIT, crate::helpers::crew_token(&db, UNIT).await),
            (UNIT_2, crate::helpers::crew_token(&db, UNIT_2).await),
        ]),
    }
}

/// A patient with insurance (a partial cover, so the insurer opens a claim), next of kin, a
/// wearable, one unit near the scene and one hospital; stored through the API by an unarmed
/// process.
async fn seed(server: &Server, t: &Tokens) {
    let posts = [
        (
            api::PATIENTS,
            json!({"id": PATIENT, "name": "Crash Patient",
                   "home_location": {"lat": SCENE.0, "lng": SCENE.1},
                   "insurance": {"provider": "Acme Health", "member_id": "M-CRASH"},
                   "next_of_kin": [{"name": "Kin", "email": "kin@example.org"}]}),
        ),
        (
            api::INSURANCE_POLICIES,
            json!({"patient_id": PATIENT, "provider": "Acme Health", "member_id": "M-CRASH",
                   "coverage_cents": 10_000}),
        ),
        (
            api::DEVICES,
            json!({"id": DEVICE, "patient_id": PATIENT, "model": "test-watch"}),
        ),
        (
            api::UNITS,
            json!({"id": UNIT, "call_sign": UNIT, "capability": "als",
                   "location": {"lat": SCENE.0 + 0.002, "lng": SCENE.1}}),
        ),
        (
            api::UNITS,
            json!({"id": UNIT_2, "call_sign": UNIT_2, "capability": "bls",
                   "location": {"lat": SCENE.0 + 0.02, "lng": SCENE.1}}),
        ),
        (
            api::HOSPITALS,
            json!({"id": "h1", "name": "General", "capacity": 3,
                   "location": {"lat": SCENE.0 + 0.05, "lng": SCENE.1}}),
        ),
    ];
    for (path, body) in posts {
        let resp = server.post(&t.admin, path, &body).await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::CREATED,
            "{path}: {}",
            resp.text().await.unwrap()
        );
    }
}

fn emergency_reading() -> Value {
    json!({"device_id": DEVICE, "timestamp": chrono::Utc::now().to_rfc3339(),
           "heart_rate_bpm": 165, "spo2_pct": 86, "location": {"lat": SCENE.0, "lng": SCENE.1}})
}

/// What the run saw.
struct Outcome {
    crashed: bool,
    incident: Value,
}

/// Drives the emergency to its end as the gateway and the crew would, restarting the server
/// (unarmed) once it has crashed. Returns what the store says at the end.
async fn drive(server: &mut Server, t: &Tokens, point: &str, scenario: Scenario) -> Outcome {
    let mut crashed = false;
    let mut declined = false;
    let mut cancelled = false;
    let mut incident_id: Option<String> = None;
    let mut last_reading: Option<Instant> = None;
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{point}: the emergency did not end in 60 s (crashed: {crashed}, incident: {incident_id:?})\n{}",
            server.logs()
        );
        if let Some(status) = server.exited() {
            assert!(
                !crashed,
                "{point}: the unarmed process died too: {status}\n{}",
                server.logs()
            );
            crashed = true;
            server.child = None;
            server.start(None).await;
            continue;
        }
        let Some(id) = incident_id.clone() else {
            // The gateway sends the reading until it is answered, then once a second while
            // no incident is open (as a wearable keeps reporting).
            if last_reading.is_none_or(|at| at.elapsed() > Duration::from_secs(1)) {
                last_reading = Some(Instant::now());
                let _ = server
                    .post(&t.gateway, api::VITALS, &emergency_reading())
                    .await;
            }
            if let Some(list) = server.get_json(&t.console, api::INCIDENTS).await {
                incident_id = list["items"]
                    .as_array()
                    .and_then(|items| items.first())
                    .and_then(|i| i["id"].as_str())
                    .map(str::to_owned);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let Some(incident) = server.get_json(&t.console, &api::incident(&id)).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let status = incident["status"].as_str().unwrap_or_default().to_owned();
        let report = |s: &'static str| Some(json!({"status": s}));
        let unit = incident["assigned_unit_id"]
            .as_str()
            .unwrap_or(UNIT)
            .to_owned();
        let assigned = !matches!(
            status.as_str(),
            "detected" | "dispatching" | "closed" | "cancelled"
        );
        if scenario.cancel && assigned && !cancelled {
            // The dispatcher cancels (retried until it is answered).
            cancelled = server
                .post(
                    &t.console,
                    &api::cancel_incident(&id),
                    &json!({"reason": "called off by the caller"}),
                )
                .await
                .is_some_and(|r| r.status() == StatusCode::OK);
            continue;
        }
        let action = match status.as_str() {
            "detected" | "dispatching" => {
                let offers = crate::dispatch::pending_offers(&incident);
                if let Some((offer, unit)) = offers.iter().find(|(_, u)| u == UNIT || u == UNIT_2) {
                    let crew = t.crew(unit);
                    if scenario.decline_first && unit == UNIT && !declined {
                        declined = server
                            .post(crew, &api::decline_offer(offer), &json!({"reason": "tyre"}))
                            .await
                            .is_some_and(|r| r.status() == StatusCode::OK);
                    } else {
                        let _ = server
                            .post(crew, &api::accept_offer(offer), &json!({}))
                            .await;
                    }
                }
                None
            }
            "assigned" => report("enroute"),
            "enroute" => report("on_scene"),
            "on_scene" => report("transporting"),
            "transporting" => report("at_hospital"),
            "closed" | "cancelled" => {
                if let Some(done) = settled(server, t, &incident).await {
                    return Outcome {
                        crashed,
                        incident: done,
                    };
                }
                None
            }
            _ => None,
        };
        if let Some(body) = action {
            let _ = server
                .post(t.crew(&unit), &api::unit_status(&unit), &body)
                .await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The ended incident once both units are free and its notifications are all sent; `None`
/// while they are not (yet).
async fn settled(server: &Server, t: &Tokens, incident: &Value) -> Option<Value> {
    for unit in [UNIT, UNIT_2] {
        let unit = server.get_json(&t.console, &api::unit(unit)).await?;
        if unit["status"] != "available" || !unit["incident_id"].is_null() {
            return None;
        }
    }
    let sent = incident["notifications"]
        .as_array()
        .is_some_and(|n| !n.is_empty() && n.iter().all(|n| n["status"] == "sent"));
    sent.then(|| incident.clone())
}

/// Runs one point: seeds, arms, drives, checks the invariants. `Err` says what broke.
async fn run_point(backend: Backend, point: &'static str, scenario: Scenario) {
    let charge = scenario.charge;
    let stripe = fake_stripe(charge);
    let mut server = Server::new(backend, stripe.port(), scenario).await;
    let mut tap = None;
    if scenario.amqp {
        let Some(url) = crate::amqp_relay::amqp_url() else {
            return;
        };
        let private = crate::amqp_relay::Tap::new(&url, "crash").await;
        server.amqp = vec![
            ("SHERS_AMQP__URL", url),
            ("SHERS_AMQP__EXCHANGE", private.exchange.clone()),
            ("SHERS_AMQP__QUEUE_PREFIX", private.prefix.clone()),
            ("SHERS_AMQP__INGEST", "false".to_owned()),
        ];
        tap = Some(private);
    }
    let t = tokens_for(&server).await;
    server.start(None).await;
    seed(&server, &t).await;
    server.kill();
    server.start(Some(point)).await;
    let out = drive(&mut server, &t, point, scenario).await;
    let logs = server.logs();
    assert!(
        out.crashed,
        "{point}: the process never reached the point\n{logs}"
    );
    let incident = &out.incident;
    if scenario.cancel {
        assert_eq!(
            incident["status"], "cancelled",
            "{point}: {incident:#}\n{logs}"
        );
        assert!(
            incident["invoice"].is_null(),
            "{point}: a cancelled incident is not billed"
        );
    } else {
        assert_eq!(
            incident["status"], "closed",
            "{point}: {incident:#}\n{logs}"
        );
        let expected = match charge {
            Charge::Succeed => "paid",
            Charge::Decline | Charge::CompletedBeforeCancel => "failed",
        };
        assert_eq!(
            incident["invoice"]["status"], expected,
            "{point}: {:#}\n{logs}",
            incident["invoice"]
        );
    }
    let state = stripe.state();
    assert!(
        state.intents.lock().unwrap().len() <= 1,
        "{point}: more than one payment intent"
    );
    if charge == Charge::Succeed && !scenario.cancel {
        assert_eq!(
            state.intents.lock().unwrap().len(),
            1,
            "{point}: the patient's share was not charged"
        );
        assert_eq!(
            state.cancels.load(Ordering::SeqCst),
            0,
            "{point}: cancelled"
        );
    }
    let refunds = state.refunds.lock().unwrap().clone();
    let distinct: std::collections::HashSet<&String> = refunds.iter().collect();
    if charge == Charge::CompletedBeforeCancel {
        // The money was taken and the saga failed: refunded once (a retry after the crash
        // replays the same idempotency key, which is the same refund).
        assert_eq!(distinct.len(), 1, "{point}: refunds {refunds:?}\n{logs}");
    } else {
        assert!(
            refunds.is_empty(),
            "{point}: refunded, but nothing required a refund"
        );
    }
    // The store agrees: one billing outcome, one close.
    let db = server.db.connect().await;
    let mut conn = db.conn().await.unwrap();
    let all = shers::persistence::events::read_since(&mut conn, 0, 100_000)
        .await
        .unwrap();
    let count = |kind: &str| all.iter().filter(|e| e.kind == kind).count();
    assert_eq!(count("incident.created"), 1, "{point}: incidents");
    let (outcomes, ends) = if scenario.cancel {
        (0, "incident.cancelled")
    } else {
        (1, "incident.closed")
    };
    assert_eq!(
        count("billing.completed") + count("billing.failed"),
        outcomes,
        "{point}: billing outcomes"
    );
    assert_eq!(count(ends), 1, "{point}: {ends}");
    if let Some(mut tap) = tap {
        // Every committed event reached the exchange, and what the crash left unstored was
        // published again under the same message_id, with the same body.
        let head = all.last().map_or(0, |e| e.seq);
        tap.until(point, |seen| crate::amqp_relay::covers(seen, head))
            .await;
        let mut bodies: HashMap<String, Vec<&Value>> = HashMap::new();
        for m in &tap.seen {
            bodies
                .entry(m.message_id.clone().unwrap_or_default())
                .or_default()
                .push(&m.body);
        }
        let again: Vec<&String> = bodies
            .iter()
            .filter(|(_, b)| b.len() > 1)
            .map(|(id, _)| id)
            .collect();
        assert!(
            !again.is_empty(),
            "{point}: nothing was published again after the crash\n{logs}"
        );
        for (id, b) in &bodies {
            assert!(
                b.iter().all(|x| *x == b[0]),
                "{point}: {id} published again with another body"
            );
        }
    }
    server.kill();
}

/// The points a plain emergency reaches, in order: everything `shers fault points` lists
/// before its first comment-only section break (see `shers::fault::POINTS`).
fn plain_points() -> Vec<&'static str> {
    let all: Vec<&'static str> = shers::fault::POINTS.iter().map(|(n, _)| *n).collect();
    let end = all
        .iter()
        .position(|n| *n == "unit.stored_available")
        .unwrap();
    all[..=end].to_vec()
}

/// The points of a declined charge's compensation.
const DECLINE_POINTS: &[&str] = &[
    "billing.before_cancel_payment",
    "billing.after_cancel_payment",
    "billing.stored_cancel_payment",
    "billing.before_release_claim",
    "billing.after_release_claim",
    "billing.stored_release_claim",
    "billing.stored_void_invoice",
];

/// The points of a payment captured after all, refunded by the compensation.
const REFUND_POINTS: &[&str] = &[
    "billing.before_refund_payment",
    "billing.after_refund_payment",
    "billing.stored_refund_payment",
];

/// Runs `points` one after the other (each on its own database, process and port).
/// `SHERS_TEST_CRASH_POINTS=a,b` narrows a run to those points while working on them.
async fn run_all(backend: Backend, points: &[&'static str], scenario: Scenario) {
    let only = std::env::var("SHERS_TEST_CRASH_POINTS").unwrap_or_default();
    let points: Vec<&'static str> = points
        .iter()
        .copied()
        .filter(|p| only.is_empty() || only.split(',').any(|o| o == *p))
        .collect();
    // One point, one process at a time across every crash test: they run beside the rest of
    // the suite, whose cluster tests need CPU to renew their leases.
    let _one = ONE_AT_A_TIME.lock().await;
    for point in points {
        run_point(backend, point, scenario).await;
    }
}

/// The relay's points, on a process publishing to RabbitMQ.
const BUS_POINTS: &[&str] = &["bus.after_publish"];

/// Points of the other dispatch paths: a declined offer's next round, and a cancellation.
const DECLINED_OFFER_POINTS: &[&str] = &["dispatch.after_round_stored"];
const CANCEL_POINTS: &[&str] = &["incident.stored_cancel"];

/// The lease points: a node taking the dispatch shard over from a killed holder.
const LEASE_POINTS: &[&str] = &["lease.after_takeover", "lease.after_recover"];

/// Serialises the crash tests (see [`run_all`]).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

both_backends!(
    every_point_of_a_plain_emergency_recovers,
    every_point_of_a_declined_charge_recovers,
    every_point_of_a_refunded_charge_recovers,
    every_point_of_a_declined_offer_and_a_cancellation_recovers,
    every_point_of_the_amqp_relay_recovers
);

async fn every_point_of_the_amqp_relay_recovers(backend: Backend) {
    let relayed = Scenario {
        amqp: true,
        ..PLAIN
    };
    run_all(backend, BUS_POINTS, relayed).await;
}

async fn every_point_of_a_plain_emergency_recovers(backend: Backend) {
    run_all(backend, &plain_points(), PLAIN).await;
}

async fn every_point_of_a_declined_charge_recovers(backend: Backend) {
    let declined = Scenario {
        charge: Charge::Decline,
        ..PLAIN
    };
    run_all(backend, DECLINE_POINTS, declined).await;
}

async fn every_point_of_a_refunded_charge_recovers(backend: Backend) {
    let completed = Scenario {
        charge: Charge::CompletedBeforeCancel,
        ..PLAIN
    };
    run_all(backend, REFUND_POINTS, completed).await;
}

async fn every_point_of_a_declined_offer_and_a_cancellation_recovers(backend: Backend) {
    let decline_first = Scenario {
        decline_first: true,
        ..PLAIN
    };
    run_all(backend, DECLINED_OFFER_POINTS, decline_first).await;
    let cancel = Scenario {
        cancel: true,
        ..PLAIN
    };
    run_all(backend, CANCEL_POINTS, cancel).await;
}

/// Points no test here crashes at, each with the reason; the list must shrink, never hide a
/// point: a new point is either driven above or named here.
const NOT_DRIVEN_HERE: &[(&str, &str)] = &[];

#[test]
fn every_point_is_driven_by_a_test() {
    let driven: Vec<&str> = plain_points()
        .into_iter()
        .chain(DECLINE_POINTS.iter().copied())
        .chain(REFUND_POINTS.iter().copied())
        .chain(DECLINED_OFFER_POINTS.iter().copied())
        .chain(CANCEL_POINTS.iter().copied())
        .chain(BUS_POINTS.iter().copied())
        .chain(LEASE_POINTS.iter().copied())
        .chain(NOT_DRIVEN_HERE.iter().map(|(n, _)| *n))
        .collect();
    let missing: Vec<&str> = shers::fault::POINTS
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| !driven.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "crash points no test drives: {missing:?}"
    );
}

/// The lease points on a PostgreSQL cluster node: the process seeding the data is killed
/// holding every lease; the next one takes the dispatch shard over when the lease runs out and
/// crashes right after taking it (or after recovering it); the one after that finishes the
/// emergency. One cluster at a time with the cluster tests, which share Redis.
#[actix_web::test]
async fn the_lease_points_recover_on_a_cluster() {
    let Some(redis) = crate::cluster::redis_url() else {
        return;
    };
    if !crate::helpers::postgres_available().await {
        return;
    }
    let _cluster = crate::cluster::ONE_AT_A_TIME.lock().await;
    let redis: &'static str = Box::leak(redis.into_boxed_str());
    let cluster = Scenario {
        cluster: Some(redis),
        ..PLAIN
    };
    run_all(Backend::Postgres, LEASE_POINTS, cluster).await;
}
