//! Test harness: [`TestDb`] (a fresh self-cleaning database per test), [`TestApp`] (the real
//! application on port 0 with typed request helpers), [`api`] (every path the tests call,
//! written once), a TCP proxy that can cut PostgreSQL, and the [`both_backends!`] macro that
//! runs a test on SQLite and on PostgreSQL. A fake of an outside HTTP service (OSRM, Stripe, an
//! insurer, Twilio) is `shers_test_support::FakeHttp`, the one the unit tests use too.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use actix_web::dev::ServerHandle;
use chrono::Utc;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl as _};
use serde_json::{Value, json};
use shers::app::Application;
use shers::config::{Secret, Settings};
use shers::domain::auth::Role;
use shers::domain::ids::{PatientId, UnitId};
use shers::persistence::{Backend, Db, migrations, tokens};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The paths of the endpoints the tests call, each written once (`src/http/mod.rs` routes
/// them). Ids are anything `Display`: a `&str`, a `String`, a parsed id.
///
/// Tests about paths themselves (the auth role matrix, unknown routes, every query parameter
/// of the OpenAPI document) keep their literal paths.
pub mod api {
    use std::fmt::Display;

    pub const DASHBOARD: &str = "/";
    pub const HEALTHZ: &str = "/healthz";
    pub const READYZ: &str = "/readyz";
    pub const METRICS: &str = "/metrics";
    pub const OPENAPI: &str = "/api/openapi.json";
    pub const WHOAMI: &str = "/api/v1/whoami";
    pub const DASHBOARD_CONFIG: &str = "/api/v1/dashboard/config";
    pub const PATIENTS: &str = "/api/v1/patients";
    pub const DEVICES: &str = "/api/v1/devices";
    pub const INCIDENTS: &str = "/api/v1/incidents";
    pub const UNITS: &str = "/api/v1/units";
    pub const HOSPITALS: &str = "/api/v1/hospitals";
    pub const VITALS: &str = "/api/v1/vitals";
    pub const EVENTS: &str = "/api/v1/events";
    pub const EVENTS_STREAM: &str = "/api/v1/events/stream";
    pub const RESPONSE_TIMES: &str = "/api/v1/analytics/response-times";
    pub const WS_CREW: &str = "/api/v1/ws/crew";
    pub const WS_CONSOLE: &str = "/api/v1/ws/console";
    pub const WS_GATEWAY: &str = "/api/v1/ws/gateway";
    pub const ADMIN_TOKENS: &str = "/admin/tokens";
    pub const ADMIN_ACTORS: &str = "/admin/actors";
    pub const INSURANCE_POLICIES: &str = "/insurance/v1/policies";
    pub const INSURANCE_VERIFY: &str = "/insurance/v1/verify";
    const OFFERS: &str = "/api/v1/offers";
    const INSURANCE_CLAIMS: &str = "/insurance/v1/claims";

    /// `path?query`, or `path` alone when `query` is empty.
    pub fn with_query(path: &str, query: &str) -> String {
        if query.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{query}")
        }
    }

    pub fn incident(id: impl Display) -> String {
        format!("{INCIDENTS}/{id}")
    }

    /// A wearer's "I'm OK" for device `id`.
    pub fn cancel_fall(id: impl Display) -> String {
        format!("{DEVICES}/{id}/fall/cancel")
    }

    pub fn cancel_incident(id: impl Display) -> String {
        format!("{INCIDENTS}/{id}/cancel")
    }

    pub fn assign(incident: impl Display) -> String {
        format!("{INCIDENTS}/{incident}/assign")
    }

    pub fn invoice(incident: impl Display) -> String {
        format!("{INCIDENTS}/{incident}/invoice")
    }

    pub fn unit(id: impl Display) -> String {
        format!("{UNITS}/{id}")
    }

    pub fn unit_status(id: impl Display) -> String {
        format!("{UNITS}/{id}/status")
    }

    pub fn unit_location(id: impl Display) -> String {
        format!("{UNITS}/{id}/location")
    }

    pub fn accept_offer(id: impl Display) -> String {
        format!("{OFFERS}/{id}/accept")
    }

    pub fn decline_offer(id: impl Display) -> String {
        format!("{OFFERS}/{id}/decline")
    }

    pub fn revoke_token(id: impl Display) -> String {
        format!("{ADMIN_TOKENS}/{id}/revoke")
    }

    /// `kind` is `incident` or `unit`.
    pub fn actor(kind: &str, id: impl Display) -> String {
        format!("{ADMIN_ACTORS}/{kind}/{id}")
    }

    /// Fault injection: stops the actor as a crash would.
    pub fn crash_actor(kind: &str, id: impl Display) -> String {
        format!("{}/crash", actor(kind, id))
    }

    pub fn release_claim(id: impl Display) -> String {
        format!("{INSURANCE_CLAIMS}/{id}/release")
    }
}

/// Runs `$test(Backend)` as two tests, `$test::sqlite` and `$test::postgres`.
#[macro_export]
macro_rules! both_backends {
    ($($test:ident),* $(,)?) => {
        $(
            mod $test {
                #[actix_web::test]
                async fn sqlite() {
                    super::$test(shers::persistence::Backend::Sqlite).await
                }
                #[actix_web::test]
                async fn postgres() {
                    if $crate::helpers::postgres_available().await {
                        super::$test(shers::persistence::Backend::Postgres).await
                    }
                }
            }
        )*
    };
}

/// How long [`eventually`] waits for something that must happen: far beyond what it takes on
/// an idle machine, so a test fails only when it truly never happens, not when the machine is
/// busy (a shared CI runner, two CPU-bound neighbours).
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Polls `probe` (every 20 ms) until it gives `Some`, for up to [`PATIENCE`]; panics naming
/// `what` if it never does.
pub async fn eventually<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    match eventually_or_none(probe).await {
        Some(found) => found,
        None => panic!("{what}: not within {PATIENCE:?}"),
    }
}

/// Polls `probe` (every 20 ms) until it gives `Some`, for up to [`PATIENCE`]; `None` if it
/// never does (the caller says what it waited for).
pub async fn eventually_or_none<T, F, Fut>(mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = std::time::Instant::now();
    loop {
        if let Some(found) = probe().await {
            return Some(found);
        }
        if started.elapsed() >= PATIENCE {
            return None;
        }
        actix_web::rt::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Quiet logs unless `TEST_LOG=1`.
pub fn init() {
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    if std::env::var("TEST_LOG").is_ok_and(|v| v == "1") {
        shers::http::telemetry::init_tracing(shers::config::LogFormat::Text);
    }
}

fn admin_url() -> String {
    std::env::var("SHERS_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether PostgreSQL tests can run; in CI a missing server fails the test instead.
pub async fn postgres_available() -> bool {
    if std::env::var("SHERS_TEST_SKIP_POSTGRES").is_ok_and(|v| v == "1") {
        assert!(!ci(), "CI=true but SHERS_TEST_SKIP_POSTGRES=1");
        eprintln!("SKIPPED: PostgreSQL test (SHERS_TEST_SKIP_POSTGRES=1)");
        return false;
    }
    match AsyncPgConnection::establish(&admin_url()).await {
        Ok(_) => true,
        Err(e) => {
            assert!(!ci(), "CI=true and PostgreSQL is unreachable: {e}");
            eprintln!("SKIPPED: PostgreSQL test, server unreachable ({e}); run scripts/test.sh");
            false
        }
    }
}

/// Replaces the database name in a PostgreSQL URL.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{}", &base[..path_start], name);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A crew token bound to `unit`, stored straight in `db`.
pub async fn crew_token(db: &Db, unit: &str) -> String {
    let mut conn = db.conn().await.unwrap();
    tokens::create(
        &mut conn,
        Role::Crew,
        Some(&UnitId::from(unit)),
        None,
        "crew",
        Utc::now(),
    )
    .await
    .unwrap()
    .token
}

/// A fresh database for one test, removed on drop.
pub struct TestDb {
    pub url: String,
    pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        init();
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}/shers.db", dir.path().display());
                Self {
                    url,
                    pg_name: None,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let name = format!("shers_test_{}", uuid::Uuid::new_v4().simple());
                let mut admin = AsyncPgConnection::establish(&admin_url()).await.unwrap();
                diesel::sql_query(format!("CREATE DATABASE {name}"))
                    .execute(&mut admin)
                    .await
                    .unwrap();
                Self {
                    url: with_database(&admin_url(), &name),
                    pg_name: Some(name),
                    _dir: None,
                }
            }
        }
    }

    pub fn settings(&self) -> shers::config::DatabaseSettings {
        let mut s = shers::config::DatabaseSettings::default();
        s.url = Secret::new(self.url.clone());
        s.pool_size = 8;
        s.timeout_ms = 1_000;
        s
    }

    /// Opens a pool on this database without migrating it.
    pub async fn connect(&self) -> Db {
        Db::connect(&self.settings()).await.unwrap()
    }

    /// Opens a pool and applies the migrations.
    pub async fn migrated(&self) -> Db {
        let db = self.connect().await;
        migrations::run_pending(&db, &self.url).await.unwrap();
        db
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        let url = admin_url();
        // Drop needs async I/O; do it on a private runtime so it works from any context.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(mut admin) = AsyncPgConnection::establish(&url).await {
                    let _ =
                        diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .execute(&mut admin)
                            .await;
                }
            });
        })
        .join();
    }
}

/// Builds a [`TestApp`].
pub struct TestAppBuilder {
    backend: Backend,
    settings: Settings,
    database_url: Option<String>,
}

impl TestAppBuilder {
    /// Changes a setting before start.
    pub fn with_settings(mut self, f: impl FnOnce(&mut Settings)) -> Self {
        f(&mut self.settings);
        self
    }

    /// Connects the app through `url` (e.g. a proxy) instead of directly.
    pub fn database_url(mut self, url: String) -> Self {
        self.database_url = Some(url);
        self
    }

    pub async fn start(self) -> TestApp {
        let db_guard = TestDb::new(self.backend).await;
        self.start_on(db_guard).await
    }

    pub async fn start_on(mut self, db_guard: TestDb) -> TestApp {
        let mut db_settings = db_guard.settings();
        if let Some(url) = self.database_url.take() {
            db_settings.url = Secret::new(url);
        }
        self.settings.database = db_settings;
        let app = Application::build(self.settings).await.unwrap();
        let port = app.port();
        let db = app.db().clone();
        let devices = app
            .devices()
            .expect("a server standing alone runs its own device actors")
            .clone();
        let incidents = app.incidents().clone();
        let billing = app.billing().clone();
        let broadcaster = app.broadcaster().clone();
        let fleet = app.fleet().clone();
        let handle = app.handle();
        actix_web::rt::spawn(app.run_until_stopped());
        TestApp {
            address: format!("http://127.0.0.1:{port}"),
            db,
            devices,
            incidents,
            billing,
            broadcaster,
            fleet,
            handle,
            client: reqwest::Client::new(),
            tokens: Mutex::new(HashMap::new()),
            db_guard: Some(db_guard),
        }
    }
}

/// The running application and typed helpers to talk to it.
pub struct TestApp {
    pub address: String,
    pub db: Db,
    pub devices: actix::Addr<shers::actors::device::DeviceDirectory>,
    pub incidents: actix::Addr<shers::actors::incident::IncidentDirectory>,
    pub billing: actix::Addr<shers::actors::billing::Billing>,
    pub broadcaster: actix::Addr<shers::actors::broadcaster::Broadcaster>,
    pub fleet: actix::Addr<shers::actors::unit::Fleet>,
    pub client: reqwest::Client,
    handle: ServerHandle,
    tokens: Mutex<HashMap<Role, String>>,
    db_guard: Option<TestDb>,
}

impl TestApp {
    pub fn builder(backend: Backend) -> TestAppBuilder {
        init();
        let mut settings = Settings::default();
        settings.bind = "127.0.0.1:0".to_owned();
        settings.http.workers = Some(1);
        settings.http.shutdown_timeout_s = 1;
        TestAppBuilder {
            backend,
            settings,
            database_url: None,
        }
    }

    pub async fn spawn(backend: Backend) -> TestApp {
        Self::builder(backend).start().await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// Creates a token with `role` directly in the database.
    pub async fn create_token(&self, role: Role) -> String {
        let unit = (role == Role::Crew).then(|| UnitId::from("UNIT-1"));
        let patient = (role == Role::Patient).then(|| PatientId::from("patient-1"));
        let mut conn = self.db.conn().await.unwrap();
        tokens::create(
            &mut conn,
            role,
            unit.as_ref(),
            patient.as_ref(),
            "test",
            Utc::now(),
        )
        .await
        .unwrap()
        .token
    }

    /// A crew token bound to `unit`.
    pub async fn crew_token(&self, unit: &str) -> String {
        crew_token(&self.db, unit).await
    }

    /// Registers a unit at a position, as admin.
    pub async fn add_unit(&self, id: &str, lat: f64, lng: f64, capability: &str) {
        let resp = self
            .create_unit(
                Role::Admin,
                &json!({"id": id, "call_sign": id, "capability": capability,
                        "location": {"lat": lat, "lng": lng}}),
            )
            .await;
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    }

    /// Posts as a crew with `token`.
    pub async fn crew_post(&self, token: &str, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Polls `GET /api/v1/incidents/{id}` until `pred` holds (or panics after [`PATIENCE`]).
    pub async fn wait_incident(&self, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let last = std::cell::RefCell::new(Value::Null);
        let found = eventually_or_none(|| async {
            let seen: Value = self.incident(id, Role::Console).await.json().await.unwrap();
            let hit = pred(&seen);
            *last.borrow_mut() = seen.clone();
            hit.then_some(seen)
        })
        .await;
        found.unwrap_or_else(|| {
            panic!(
                "incident never reached the expected state: {}",
                last.borrow()
            )
        })
    }

    /// A cached token for `role`.
    pub async fn token(&self, role: Role) -> String {
        if let Some(t) = self.tokens.lock().unwrap().get(&role) {
            return t.clone();
        }
        let token = self.create_token(role).await;
        self.tokens.lock().unwrap().insert(role, token.clone());
        token
    }

    pub async fn get(&self, path: &str, role: Option<Role>) -> reqwest::Response {
        let mut req = self.client.get(self.url(path));
        if let Some(role) = role {
            req = req.bearer_auth(self.token(role).await);
        }
        req.send().await.unwrap()
    }

    pub async fn post_json(
        &self,
        path: &str,
        role: Option<Role>,
        body: &Value,
    ) -> reqwest::Response {
        let mut req = self.client.post(self.url(path)).json(body);
        if let Some(role) = role {
            req = req.bearer_auth(self.token(role).await);
        }
        req.send().await.unwrap()
    }

    /// Registers a patient (with one next of kin) and a device for them, as admin.
    pub async fn register_wearer(&self, patient: &str, device: &str) {
        let resp = self
            .create_patient(
                Role::Admin,
                &json!({
                    "id": patient, "name": "Test Patient",
                    "home_location": {"lat": 51.5, "lng": -0.12},
                    "next_of_kin": [{"name": "Kin", "phone": "+447700900123"}]
                }),
            )
            .await;
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
        let resp = self
            .create_device(
                Role::Admin,
                &json!({"id": device, "patient_id": patient, "model": "test-watch"}),
            )
            .await;
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    }

    /// Posts an ingest body as a gateway.
    pub async fn post_vitals(&self, body: &Value) -> reqwest::Response {
        self.post_json(api::VITALS, Some(Role::Gateway), body).await
    }

    /// Every stored event of `kind`, in order.
    pub async fn events_of(&self, kind: &str) -> Vec<shers::domain::events::RecordedEvent> {
        let mut conn = self.db.conn().await.unwrap();
        shers::persistence::events::read_since(&mut conn, 0, 100_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == kind)
            .collect()
    }

    /// Stops the server abruptly (no drain) and returns the database guard so a new app can
    /// start on the same database. Its device actors stop with it, timers and all, as they
    /// would with the process (the other actors live on in this test process).
    pub async fn kill(mut self) -> TestDb {
        self.handle.stop(false).await;
        let _ = self.devices.send(shers::actors::device::Retire).await;
        self.db_guard.take().unwrap()
    }

    /// `POST /api/v1/devices/{id}/fall/cancel` as the holder of `token`.
    pub async fn cancel_fall(&self, device: &str, token: &str) -> reqwest::Response {
        self.client
            .post(self.url(&api::cancel_fall(device)))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }
}

/// Typed requests: one method per endpoint call the tests make, each building its path from
/// [`api`]. They return the response untouched, so a test checks status and body as before.
/// Console and admin calls take the [`Role`] (its cached token); crew calls take the crew's
/// own token, bound to its unit.
impl TestApp {
    /// `GET /api/v1/whoami` as the holder of `token`.
    pub async fn whoami(&self, token: &str) -> reqwest::Response {
        self.client
            .get(self.url(api::WHOAMI))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn dashboard_config(&self, role: Role) -> reqwest::Response {
        self.get(api::DASHBOARD_CONFIG, Some(role)).await
    }

    pub async fn create_patient(&self, role: Role, body: &Value) -> reqwest::Response {
        self.post_json(api::PATIENTS, Some(role), body).await
    }

    pub async fn create_device(&self, role: Role, body: &Value) -> reqwest::Response {
        self.post_json(api::DEVICES, Some(role), body).await
    }

    /// `POST /api/v1/incidents`.
    pub async fn create_incident(&self, role: Role, body: &Value) -> reqwest::Response {
        self.post_json(api::INCIDENTS, Some(role), body).await
    }

    /// `GET /api/v1/incidents/{id}`.
    pub async fn incident(&self, id: impl Display, role: Role) -> reqwest::Response {
        self.get(&api::incident(id), Some(role)).await
    }

    /// `GET /api/v1/incidents?{query}` (no `?` when `query` is empty).
    pub async fn list_incidents(&self, query: &str, role: Role) -> reqwest::Response {
        self.get(&api::with_query(api::INCIDENTS, query), Some(role))
            .await
    }

    /// `POST /api/v1/incidents/{id}/cancel` with `{"reason": reason}`.
    pub async fn cancel_incident(
        &self,
        id: impl Display,
        role: Role,
        reason: &str,
    ) -> reqwest::Response {
        self.post_json(
            &api::cancel_incident(id),
            Some(role),
            &json!({"reason": reason}),
        )
        .await
    }

    /// `POST /api/v1/incidents/{incident}/assign` with `{"unit_id": unit}`.
    pub async fn assign(
        &self,
        incident: impl Display,
        unit: &str,
        role: Role,
    ) -> reqwest::Response {
        self.post_json(
            &api::assign(incident),
            Some(role),
            &json!({"unit_id": unit}),
        )
        .await
    }

    /// `GET /api/v1/incidents/{incident}/invoice`.
    pub async fn invoice(&self, incident: impl Display, role: Role) -> reqwest::Response {
        self.get(&api::invoice(incident), Some(role)).await
    }

    pub async fn create_unit(&self, role: Role, body: &Value) -> reqwest::Response {
        self.post_json(api::UNITS, Some(role), body).await
    }

    /// `GET /api/v1/units/{id}`.
    pub async fn unit(&self, id: &str, role: Role) -> reqwest::Response {
        self.get(&api::unit(id), Some(role)).await
    }

    /// `GET /api/v1/units`.
    pub async fn units(&self, role: Role) -> reqwest::Response {
        self.get(api::UNITS, Some(role)).await
    }

    /// `POST /api/v1/units/{unit}/status` with `{"status": status}`, as the holder of `token`
    /// (the unit's crew, or a console's token for available / out of service).
    pub async fn unit_status(&self, token: &str, unit: &str, status: &str) -> reqwest::Response {
        self.crew_post(token, &api::unit_status(unit), &json!({"status": status}))
            .await
    }

    pub async fn create_hospital(&self, role: Role, body: &Value) -> reqwest::Response {
        self.post_json(api::HOSPITALS, Some(role), body).await
    }

    /// `GET /api/v1/hospitals`.
    pub async fn hospitals(&self, role: Role) -> reqwest::Response {
        self.get(api::HOSPITALS, Some(role)).await
    }

    /// `POST /api/v1/offers/{offer}/accept` (body `{}`) as a crew.
    pub async fn accept_offer(&self, token: &str, offer: impl Display) -> reqwest::Response {
        self.crew_post(token, &api::accept_offer(offer), &json!({}))
            .await
    }

    /// `POST /api/v1/offers/{offer}/decline` with `{"reason": reason}` as a crew.
    pub async fn decline_offer(
        &self,
        token: &str,
        offer: impl Display,
        reason: &str,
    ) -> reqwest::Response {
        self.crew_post(
            token,
            &api::decline_offer(offer),
            &json!({"reason": reason}),
        )
        .await
    }

    /// `GET /api/v1/events`, with `since` and `limit` when given.
    pub async fn events_page(
        &self,
        since: Option<i64>,
        limit: Option<i64>,
        role: Role,
    ) -> reqwest::Response {
        let query: Vec<String> = [("since", since), ("limit", limit)]
            .into_iter()
            .filter_map(|(name, value)| value.map(|v| format!("{name}={v}")))
            .collect();
        self.get(&api::with_query(api::EVENTS, &query.join("&")), Some(role))
            .await
    }

    /// `GET /api/v1/analytics/response-times?{query}` (no `?` when `query` is empty).
    pub async fn response_times(&self, query: &str, role: Role) -> reqwest::Response {
        self.get(&api::with_query(api::RESPONSE_TIMES, query), Some(role))
            .await
    }

    /// `GET /admin/tokens`.
    pub async fn tokens(&self, role: Role) -> reqwest::Response {
        self.get(api::ADMIN_TOKENS, Some(role)).await
    }

    /// `POST /admin/tokens`.
    pub async fn issue_token(&self, role: Role, body: &Value) -> reqwest::Response {
        self.post_json(api::ADMIN_TOKENS, Some(role), body).await
    }

    /// `POST /admin/tokens/{id}/revoke` (body `{}`).
    pub async fn revoke_token(&self, id: &str, role: Role) -> reqwest::Response {
        self.post_json(&api::revoke_token(id), Some(role), &json!({}))
            .await
    }

    /// `GET /admin/actors?kind={kind}`.
    pub async fn actors(&self, kind: &str, role: Role) -> reqwest::Response {
        self.get(
            &api::with_query(api::ADMIN_ACTORS, &format!("kind={kind}")),
            Some(role),
        )
        .await
    }

    /// `GET /admin/actors/{kind}/{id}`.
    pub async fn actor(&self, kind: &str, id: impl Display, role: Role) -> reqwest::Response {
        self.get(&api::actor(kind, id), Some(role)).await
    }

    /// `POST /admin/actors/{kind}/{id}/crash` (body `{}`; needs fault injection enabled).
    pub async fn crash_actor(&self, kind: &str, id: impl Display, role: Role) -> reqwest::Response {
        self.post_json(&api::crash_actor(kind, id), Some(role), &json!({}))
            .await
    }

    pub async fn create_policy(&self, role: Role, body: &Value) -> reqwest::Response {
        self.post_json(api::INSURANCE_POLICIES, Some(role), body)
            .await
    }

    /// `POST /insurance/v1/verify`.
    pub async fn verify_insurance(&self, role: Role, body: &Value) -> reqwest::Response {
        self.post_json(api::INSURANCE_VERIFY, Some(role), body)
            .await
    }

    /// `ws://` form of `path_and_query` on this app.
    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!(
            "{}{path_and_query}",
            self.address.replacen("http://", "ws://", 1)
        )
    }

    /// The crew WebSocket, authenticated by `token` in the query string.
    pub fn ws_crew_url(&self, token: &str) -> String {
        self.ws_url(&format!("{}?access_token={token}", api::WS_CREW))
    }

    /// The console WebSocket, replaying from after `since`.
    pub fn ws_console_url(&self, since: i64, token: &str) -> String {
        self.ws_url(&format!(
            "{}?since={since}&access_token={token}",
            api::WS_CONSOLE
        ))
    }

    /// The gateway WebSocket, with `token` in the query string when given.
    pub fn ws_gateway_url(&self, token: Option<&str>) -> String {
        match token {
            Some(token) => self.ws_url(&format!("{}?access_token={token}", api::WS_GATEWAY)),
            None => self.ws_url(api::WS_GATEWAY),
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        actix_web::rt::spawn(async move { handle.stop(false).await });
    }
}

/// A TCP proxy in front of a server that a test can cut (every connection reset, new ones
/// refused) and restore, to simulate a database outage.
pub struct TcpProxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
    /// Bearer credentials seen in HTTP requests passing through (a tapped proxy only).
    bearers: Arc<Mutex<Vec<String>>>,
}

impl TcpProxy {
    pub async fn start(upstream: String) -> TcpProxy {
        Self::start_with(upstream, false).await
    }

    /// A proxy that also notes every `Authorization: Bearer` credential of the HTTP requests
    /// passing through it, as anyone on the wire could ([`TcpProxy::bearers`]).
    pub async fn tapped(upstream: String) -> TcpProxy {
        Self::start_with(upstream, true).await
    }

    /// The bearer credentials a tapped proxy has seen, in order.
    pub fn bearers(&self) -> Vec<String> {
        self.bearers.lock().unwrap().clone()
    }

    async fn start_with(upstream: String, tap: bool) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let bearers: Arc<Mutex<Vec<String>>> = Arc::default();
        let accept = {
            let cut = cut.clone();
            let connections = connections.clone();
            let bearers = bearers.clone();
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if AtomicBool::load(&cut, Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let upstream = upstream.clone();
                    let bearers = bearers.clone();
                    let task = tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        if tap {
                            relay_noting_bearers(inbound, outbound, bearers).await;
                        } else {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().unwrap().push(task);
                }
            })
        };
        TcpProxy {
            port,
            cut,
            connections,
            accept,
            bearers,
        }
    }

    /// Resets every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Relays a connection both ways, noting the bearer credentials in what the client sends.
async fn relay_noting_bearers(
    inbound: TcpStream,
    outbound: TcpStream,
    bearers: Arc<Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (mut client_rx, mut client_tx) = inbound.into_split();
    let (mut server_rx, mut server_tx) = outbound.into_split();
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
    });
    let mut buf = vec![0_u8; 64 * 1024];
    while let Ok(n) = client_rx.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&buf[..n]);
        for line in text.split("\r\n") {
            let lower = line.to_ascii_lowercase();
            if let Some(credential) = lower
                .strip_prefix("authorization: bearer ")
                .map(|_| line["authorization: bearer ".len()..].trim().to_owned())
            {
                bearers.lock().unwrap().push(credential);
            }
        }
        if server_tx.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = server_tx.shutdown().await;
    let _ = down.await;
}

/// An app on PostgreSQL reached through a proxy the test can cut.
pub async fn app_behind_a_proxy() -> (TestApp, TcpProxy) {
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
    let app = TestApp::builder(Backend::Postgres)
        .database_url(via_proxy)
        .start_on(tdb)
        .await;
    (app, proxy)
}

/// `host:port` of a PostgreSQL URL.
pub fn pg_host_port(url: &str) -> String {
    let after = url.split_once("://").map_or(url, |(_, r)| r);
    let after = after.rsplit_once('@').map_or(after, |(_, r)| r);
    let host_port = after.split(['/', '?']).next().unwrap_or("127.0.0.1:5432");
    if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    }
}
