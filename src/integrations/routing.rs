//! Road ETAs for dispatch ranking: the OSRM `table` adapter, a straight-line stand-in, and the
//! fallback wrapper the fleet uses.
//!
//! - [`Routing`] is the port: seconds from each source to one destination, `None` when a source
//!   cannot reach it by road. It returns a boxed future so the fleet can hold
//!   `Arc<dyn Routing>`.
//! - [`OsrmRouting`] calls `GET {base}/table/v1/driving/{lon,lat;…}` with one shared
//!   `reqwest::Client` and a [`CircuitBreaker`], so an OSRM outage costs one timeout per
//!   30 s instead of one per dispatch.
//! - [`StraightLine`] never fails: haversine × road factor at a fixed speed
//!   ([`straight_line_eta_s`]).
//! - [`RoutingWithFallback`] tries the router and falls back to the straight line on any
//!   error, telling the caller which one answered.
//!
//! Scene and unit positions are patient locations: they never appear in logs or in error
//! messages (reqwest errors are stripped of their URL, which carries the coordinates).

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::domain::dispatch::straight_line_eta_s;
use crate::domain::geo::LatLng;

/// The future returned by [`Routing::durations`].
pub type DurationsFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Option<u32>>, RoutingError>> + Send + 'a>>;

/// A source of travel times.
pub trait Routing: Send + Sync {
    /// Travel time in whole seconds (rounded up) from each of `sources` to `destination`, in
    /// the order of `sources`; `None` means unreachable by road.
    fn durations<'a>(
        &'a self,
        sources: &'a [LatLng],
        destination: &'a LatLng,
    ) -> DurationsFuture<'a>;
}

/// Why a routing call failed. Messages carry no coordinates.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// The configured base URL is not an absolute http(s) URL.
    #[error("invalid routing base URL")]
    InvalidBaseUrl,
    /// The HTTP client could not be built.
    #[error("could not build the routing HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// No answer within the configured timeout.
    #[error("routing request timed out")]
    Timeout,
    /// Connection refused, reset, DNS failure and the like.
    #[error("routing request failed: {0}")]
    Transport(#[source] reqwest::Error),
    /// The router answered with an HTTP error status (and no OSRM error code).
    #[error("routing service answered HTTP {0}")]
    Status(u16),
    /// The router answered with an OSRM error code (`NoRoute`, `InvalidQuery`, …).
    #[error("routing service answered code {code}")]
    Osrm {
        /// The OSRM `code` field.
        code: String,
    },
    /// The body was not the expected JSON.
    #[error("routing response is not valid JSON: {0}")]
    Malformed(String),
    /// The JSON had the wrong shape (missing `durations`, wrong row count, negative values…).
    #[error("routing response has the wrong shape: {0}")]
    Shape(String),
    /// The circuit breaker is open: the call was refused without touching the network.
    #[error("routing circuit breaker is open")]
    CircuitOpen,
}

impl RoutingError {
    /// A short, stable name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            RoutingError::InvalidBaseUrl => "invalid_base_url",
            RoutingError::Client(_) => "client",
            RoutingError::Timeout => "timeout",
            RoutingError::Transport(_) => "transport",
            RoutingError::Status(_) => "status",
            RoutingError::Osrm { .. } => "osrm_code",
            RoutingError::Malformed(_) => "malformed",
            RoutingError::Shape(_) => "shape",
            RoutingError::CircuitOpen => "circuit_open",
        }
    }

    /// Whether this failure says the router is unhealthy and should count towards opening the
    /// breaker. An OSRM error code does not: the router answered coherently, the question was
    /// the problem (a scene on an island is `NoRoute` however healthy the router is).
    pub fn trips_breaker(&self) -> bool {
        match self {
            RoutingError::Timeout
            | RoutingError::Transport(_)
            | RoutingError::Status(_)
            | RoutingError::Malformed(_)
            | RoutingError::Shape(_) => true,
            RoutingError::InvalidBaseUrl
            | RoutingError::Client(_)
            | RoutingError::Osrm { .. }
            | RoutingError::CircuitOpen => false,
        }
    }
}

/// Consecutive failures that open the breaker.
pub const BREAKER_FAILURE_THRESHOLD: u32 = 3;
/// How long an open breaker refuses calls before allowing one trial.
pub const BREAKER_OPEN_FOR: Duration = Duration::from_secs(30);

/// A clock for the breaker (injectable so tests need not wait 30 s).
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// A consecutive-failure circuit breaker with explicit time.
///
/// Closed: calls pass; [`BREAKER_FAILURE_THRESHOLD`] consecutive failures open it. Open: calls
/// are refused until [`BREAKER_OPEN_FOR`] has passed. Half-open: exactly one trial call passes
/// (others are refused); its success closes the breaker, its failure opens it for another
/// period. A trial whose outcome is never reported (the caller's future was dropped) is
/// considered lost after one open period, and a new trial is allowed.
#[derive(Debug)]
pub struct CircuitBreaker {
    state: Mutex<BreakerState>,
    failure_threshold: u32,
    open_for: Duration,
}

#[derive(Debug, Default)]
struct BreakerState {
    consecutive_failures: u32,
    /// Set while open or half-open.
    opened_at: Option<Instant>,
    /// Set while a half-open trial is in flight.
    trial_started: Option<Instant>,
}

/// What [`CircuitBreaker::acquire`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Closed: go ahead.
    Pass,
    /// Half-open: go ahead, this call decides whether the breaker closes.
    Trial,
    /// Open: fail fast.
    Refuse,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self::new(BREAKER_FAILURE_THRESHOLD, BREAKER_OPEN_FOR)
    }
}

impl CircuitBreaker {
    /// A closed breaker opening after `failure_threshold` (at least 1) consecutive failures
    /// for `open_for`.
    pub fn new(failure_threshold: u32, open_for: Duration) -> Self {
        Self {
            state: Mutex::new(BreakerState::default()),
            failure_threshold: failure_threshold.max(1),
            open_for,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BreakerState> {
        // The state stays consistent even if a holder panicked: every update is one assignment.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks to make a call at `now`.
    pub fn acquire(&self, now: Instant) -> Admission {
        let mut st = self.lock();
        let Some(opened_at) = st.opened_at else {
            return Admission::Pass;
        };
        if now.saturating_duration_since(opened_at) < self.open_for {
            return Admission::Refuse;
        }
        match st.trial_started {
            Some(t) if now.saturating_duration_since(t) < self.open_for => Admission::Refuse,
            _ => {
                st.trial_started = Some(now);
                Admission::Trial
            }
        }
    }

    /// Reports a successful call: the breaker closes.
    pub fn on_success(&self) {
        let mut st = self.lock();
        if st.opened_at.is_some() {
            tracing::info!("routing circuit breaker closed");
        }
        *st = BreakerState::default();
    }

    /// Reports a failed call at `now`.
    pub fn on_failure(&self, now: Instant) {
        let mut st = self.lock();
        if st.opened_at.is_some() {
            // A failed trial (or a late failure of a call admitted before opening).
            st.opened_at = Some(now);
            st.trial_started = None;
            return;
        }
        st.consecutive_failures = st.consecutive_failures.saturating_add(1);
        if st.consecutive_failures >= self.failure_threshold {
            st.opened_at = Some(now);
            st.trial_started = None;
            tracing::warn!(
                failures = st.consecutive_failures,
                open_for_s = self.open_for.as_secs(),
                "routing circuit breaker opened"
            );
        }
    }

    /// Whether calls are currently refused or limited to a trial.
    pub fn is_open(&self) -> bool {
        self.lock().opened_at.is_some()
    }
}

/// The OSRM `table` service as a [`Routing`] adapter.
pub struct OsrmRouting {
    client: reqwest::Client,
    base_url: String,
    breaker: CircuitBreaker,
    clock: Clock,
}

impl std::fmt::Debug for OsrmRouting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OsrmRouting")
            .field("base_url", &self.base_url)
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

impl OsrmRouting {
    /// An adapter for the OSRM server at `base_url` (e.g. `http://osrm:5000`), each call
    /// limited to `timeout` (connect included), with the default breaker (3 failures, 30 s).
    ///
    /// A rustls crypto provider must be installed first (`app` and the CLI do it).
    pub fn new(base_url: &str, timeout: Duration) -> Result<Self, RoutingError> {
        Self::with_clock(
            base_url,
            timeout,
            CircuitBreaker::default(),
            Arc::new(Instant::now),
        )
    }

    /// Like [`OsrmRouting::new`] with an explicit breaker and clock (tests move the clock).
    pub fn with_clock(
        base_url: &str,
        timeout: Duration,
        breaker: CircuitBreaker,
        clock: Clock,
    ) -> Result<Self, RoutingError> {
        let base_url = base_url.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&base_url).map_err(|_| RoutingError::InvalidBaseUrl)?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.cannot_be_a_base() {
            return Err(RoutingError::InvalidBaseUrl);
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| RoutingError::Client(e.without_url()))?;
        Ok(Self {
            client,
            base_url,
            breaker,
            clock,
        })
    }

    /// The breaker, for health reporting.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// The request URL: sources first, destination last, `lon,lat` with 6 decimals.
    fn table_url(&self, sources: &[LatLng], destination: &LatLng) -> String {
        let n = sources.len();
        let mut url = format!("{}/table/v1/driving/", self.base_url);
        for (i, p) in sources
            .iter()
            .chain(std::iter::once(destination))
            .enumerate()
        {
            if i > 0 {
                url.push(';');
            }
            let _ = write!(url, "{:.6},{:.6}", p.lng, p.lat);
        }
        url.push_str("?sources=");
        for i in 0..n {
            if i > 0 {
                url.push(';');
            }
            let _ = write!(url, "{i}");
        }
        let _ = write!(url, "&destinations={n}&annotations=duration");
        url
    }

    async fn call(
        &self,
        sources: &[LatLng],
        destination: &LatLng,
    ) -> Result<Vec<Option<u32>>, RoutingError> {
        let response = self
            .client
            .get(self.table_url(sources, destination))
            .send()
            .await
            .map_err(classify)?;
        let status = response.status();
        let body = response.bytes().await.map_err(classify)?;
        if !status.is_success() {
            // OSRM answers 400 with `{code, message}` for bad queries; anything else is HTTP.
            return Err(match serde_json::from_slice::<TableResponse>(&body) {
                Ok(t) if t.code != "Ok" => RoutingError::Osrm { code: t.code },
                _ => RoutingError::Status(status.as_u16()),
            });
        }
        let table: TableResponse = serde_json::from_slice(&body).map_err(|e| {
            RoutingError::Malformed(format!(
                "{:?} error at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        if table.code != "Ok" {
            return Err(RoutingError::Osrm { code: table.code });
        }
        parse_durations(table.durations, sources.len())
    }
}

impl Routing for OsrmRouting {
    fn durations<'a>(
        &'a self,
        sources: &'a [LatLng],
        destination: &'a LatLng,
    ) -> DurationsFuture<'a> {
        Box::pin(async move {
            if sources.is_empty() {
                return Ok(Vec::new());
            }
            if self.breaker.acquire((self.clock)()) == Admission::Refuse {
                return Err(RoutingError::CircuitOpen);
            }
            let result = self.call(sources, destination).await;
            match &result {
                Err(e) if e.trips_breaker() => self.breaker.on_failure((self.clock)()),
                _ => self.breaker.on_success(),
            }
            result
        })
    }
}

/// The part of an OSRM `table` answer we read.
#[derive(Deserialize)]
struct TableResponse {
    code: String,
    #[serde(default)]
    durations: Option<Vec<Vec<Option<f64>>>>,
}

/// Maps a reqwest error to ours, dropping the URL (it holds coordinates).
fn classify(e: reqwest::Error) -> RoutingError {
    if e.is_timeout() {
        RoutingError::Timeout
    } else if e.is_decode() {
        RoutingError::Malformed("undecodable body".to_owned())
    } else {
        RoutingError::Transport(e.without_url())
    }
}

/// Checks the `durations` matrix (one row per source, one column) and rounds up.
fn parse_durations(
    durations: Option<Vec<Vec<Option<f64>>>>,
    n: usize,
) -> Result<Vec<Option<u32>>, RoutingError> {
    let rows = durations.ok_or_else(|| RoutingError::Shape("no durations".to_owned()))?;
    if rows.len() != n {
        return Err(RoutingError::Shape(format!(
            "{} rows for {n} sources",
            rows.len()
        )));
    }
    rows.into_iter()
        .map(|row| match row.as_slice() {
            [None] => Ok(None),
            // `as` saturates: a duration beyond u32::MAX seconds is unreachable in practice.
            [Some(s)] if s.is_finite() && *s >= 0.0 => Ok(Some(s.ceil() as u32)),
            [Some(_)] => Err(RoutingError::Shape(
                "negative or non-finite duration".to_owned(),
            )),
            _ => Err(RoutingError::Shape(format!(
                "row of {} columns, expected 1",
                row.len()
            ))),
        })
        .collect()
}

/// Straight-line ETAs ([`straight_line_eta_s`]); never fails, never unreachable.
#[derive(Clone, Copy, Debug, Default)]
pub struct StraightLine;

impl StraightLine {
    /// The ETAs, synchronously.
    pub fn etas(sources: &[LatLng], destination: &LatLng) -> Vec<Option<u32>> {
        sources
            .iter()
            .map(|s| Some(straight_line_eta_s(s, destination)))
            .collect()
    }
}

impl Routing for StraightLine {
    fn durations<'a>(
        &'a self,
        sources: &'a [LatLng],
        destination: &'a LatLng,
    ) -> DurationsFuture<'a> {
        let etas = Self::etas(sources, destination);
        Box::pin(async move { Ok(etas) })
    }
}

/// A router with a straight-line fallback, as the fleet uses it.
#[derive(Clone, Default)]
pub struct RoutingWithFallback {
    primary: Option<Arc<dyn Routing>>,
}

impl std::fmt::Debug for RoutingWithFallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutingWithFallback")
            .field("primary", &self.primary.is_some())
            .finish()
    }
}

impl RoutingWithFallback {
    /// Uses `primary` when given (e.g. [`OsrmRouting`]); `None` = straight line only (no
    /// routing URL configured).
    pub fn new(primary: Option<Arc<dyn Routing>>) -> Self {
        Self { primary }
    }

    /// Whether a router is configured.
    pub fn has_primary(&self) -> bool {
        self.primary.is_some()
    }

    /// ETAs from each source to `destination` and whether they are routed (`true`) or
    /// straight-line (`false`).
    ///
    /// Any router error (including an open breaker, or an answer of the wrong length) falls
    /// back to the straight line, logged at warn with the error kind only (open breaker at
    /// debug: the breaker logged its opening once). Routed `None` entries (unreachable) are
    /// passed through for [`crate::domain::dispatch::rank`] to drop.
    pub async fn etas(&self, sources: &[LatLng], destination: &LatLng) -> (Vec<Option<u32>>, bool) {
        if let Some(primary) = &self.primary {
            match primary.durations(sources, destination).await {
                Ok(etas) if etas.len() == sources.len() => return (etas, true),
                Ok(etas) => tracing::warn!(
                    error.kind = "shape",
                    expected = sources.len(),
                    got = etas.len(),
                    "routing answered the wrong number of ETAs; using straight-line ETAs"
                ),
                Err(RoutingError::CircuitOpen) => tracing::debug!(
                    error.kind = "circuit_open",
                    "routing circuit open; using straight-line ETAs"
                ),
                Err(e) => tracing::warn!(
                    error.kind = e.kind(),
                    error = %e,
                    "routing failed; using straight-line ETAs"
                ),
            }
        }
        (StraightLine::etas(sources, destination), false)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use actix_web::{HttpRequest, HttpResponse, web};
    use serde_json::json;

    use super::*;
    use shers_test_support::{FakeHttp, Recorded, free_port, install_crypto};

    /// Unit positions (Berlin) and the scene; the adapter sends them as lon,lat.
    const SOURCES: [LatLng; 3] = [
        LatLng {
            lat: 52.517037,
            lng: 13.388860,
        },
        LatLng {
            lat: 52.529407,
            lng: 13.397634,
        },
        LatLng {
            lat: 52.523219,
            lng: 13.428555,
        },
    ];
    const SCENE: LatLng = LatLng {
        lat: 52.52,
        lng: 13.40,
    };

    // ---- the breaker on its own, with explicit time --------------------------------------

    #[test]
    fn breaker_opens_after_three_consecutive_failures() {
        let b = CircuitBreaker::default();
        let t = Instant::now();
        for _ in 0..2 {
            assert_eq!(b.acquire(t), Admission::Pass);
            b.on_failure(t);
        }
        // A success in between resets the count.
        b.on_success();
        for _ in 0..2 {
            assert_eq!(b.acquire(t), Admission::Pass);
            b.on_failure(t);
        }
        assert!(!b.is_open());
        assert_eq!(b.acquire(t), Admission::Pass);
        b.on_failure(t);
        assert!(b.is_open());
        assert_eq!(b.acquire(t), Admission::Refuse);
        assert_eq!(
            b.acquire(t + Duration::from_millis(29_999)),
            Admission::Refuse
        );
    }

    #[test]
    fn breaker_half_open_allows_one_trial() {
        let b = CircuitBreaker::new(3, Duration::from_secs(30));
        let t = Instant::now();
        for _ in 0..3 {
            b.on_failure(t);
        }
        let t30 = t + Duration::from_secs(30);
        assert_eq!(b.acquire(t30), Admission::Trial);
        // While the trial is in flight everyone else fails fast.
        assert_eq!(b.acquire(t30 + Duration::from_secs(1)), Admission::Refuse);
        // The trial fails: open for another 30 s from then.
        let t31 = t30 + Duration::from_secs(1);
        b.on_failure(t31);
        assert_eq!(b.acquire(t31 + Duration::from_secs(29)), Admission::Refuse);
        let t61 = t31 + Duration::from_secs(30);
        assert_eq!(b.acquire(t61), Admission::Trial);
        b.on_success();
        assert!(!b.is_open());
        assert_eq!(b.acquire(t61), Admission::Pass);
        // Closed again: it takes three fresh failures to open.
        b.on_failure(t61);
        b.on_failure(t61);
        assert_eq!(b.acquire(t61), Admission::Pass);
    }

    #[test]
    fn breaker_replaces_a_lost_trial() {
        let b = CircuitBreaker::new(1, Duration::from_secs(30));
        let t = Instant::now();
        b.on_failure(t);
        let t30 = t + Duration::from_secs(30);
        assert_eq!(b.acquire(t30), Admission::Trial);
        // The trial's caller went away without reporting; after one more period a new trial
        // is allowed rather than staying open forever.
        assert_eq!(b.acquire(t30 + Duration::from_secs(29)), Admission::Refuse);
        assert_eq!(b.acquire(t30 + Duration::from_secs(30)), Admission::Trial);
    }

    // ---- response parsing and the request URL --------------------------------------------

    #[test]
    fn durations_are_rounded_up_and_shapes_checked() {
        let rows = |v: serde_json::Value| serde_json::from_value(v).unwrap();
        assert_eq!(
            parse_durations(
                Some(rows(json!([[254.3], [0.0], [100.0], [0.0001], [null]]))),
                5
            )
            .unwrap(),
            [Some(255), Some(0), Some(100), Some(1), None]
        );
        for (durations, n) in [
            (None, 1),
            (Some(rows(json!([[1.0]]))), 2),
            (Some(rows(json!([[1.0, 2.0]]))), 1),
            (Some(rows(json!([[]]))), 1),
            (Some(rows(json!([[-1.0]]))), 1),
        ] {
            assert!(matches!(
                parse_durations(durations, n),
                Err(RoutingError::Shape(_))
            ));
        }
    }

    #[test]
    fn base_url_is_checked() {
        install_crypto();
        for bad in ["not a url", "ftp://osrm:5000", "mailto:ops@example.org", ""] {
            assert!(
                matches!(
                    OsrmRouting::new(bad, Duration::from_secs(1)),
                    Err(RoutingError::InvalidBaseUrl)
                ),
                "{bad}"
            );
        }
        let osrm = OsrmRouting::new("http://osrm:5000/", Duration::from_secs(1)).unwrap();
        assert_eq!(
            osrm.table_url(
                &[LatLng {
                    lat: -33.8688,
                    lng: -151.2093
                }],
                &LatLng { lat: 0.0, lng: 1.5 }
            ),
            "http://osrm:5000/table/v1/driving/-151.209300,-33.868800;1.500000,0.000000\
             ?sources=0&destinations=1&annotations=duration"
        );
    }

    // ---- a real local fake OSRM -----------------------------------------------------------

    /// How the fake behaves (its journal keeps the requests).
    #[derive(Default)]
    struct FakeOsrm {
        /// For mode `flaky`: answer 200 when true, 500 when false.
        healthy: AtomicBool,
    }

    /// `/{mode}/table/v1/driving/{coords}`: the first path segment picks the behaviour, so
    /// one server plays every scenario (the adapter's base URL is `http://addr/{mode}`).
    async fn table(req: HttpRequest, fake: web::Data<FakeOsrm>) -> HttpResponse {
        let ok = |durations: serde_json::Value| {
            HttpResponse::Ok().json(json!({"code": "Ok", "durations": durations}))
        };
        match req.match_info().get("mode").unwrap_or_default() {
            "ok" => ok(json!([[254.3], [0.0], [100.0]])),
            "nulls" => ok(json!([[null], [61.2], [null]])),
            "one" => ok(json!([[42.0]])),
            "down" => HttpResponse::InternalServerError().body("internal error"),
            "noroute" => HttpResponse::Ok().json(json!({
                "code": "NoRoute", "message": "Impossible route between points"
            })),
            "invalid" => HttpResponse::BadRequest().json(json!({
                "code": "InvalidQuery", "message": "Query string malformed"
            })),
            "garbage" => HttpResponse::Ok()
                .content_type("application/json")
                .body("<html>gateway</html>"),
            "shape" => ok(json!([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])),
            "flaky" if fake.healthy.load(Ordering::SeqCst) => ok(json!([[42.0]])),
            "flaky" => HttpResponse::InternalServerError().finish(),
            _ => HttpResponse::NotFound().finish(),
        }
    }

    /// The fake OSRM server, with the adapter built against it.
    struct Fake(FakeHttp<FakeOsrm>);

    impl std::ops::Deref for Fake {
        type Target = FakeHttp<FakeOsrm>;

        fn deref(&self) -> &Self::Target {
            &self.0
        }
    }

    impl Fake {
        async fn start() -> Self {
            Self(FakeHttp::start(FakeOsrm::default(), |cfg| {
                cfg.route("/{mode}/table/v1/driving/{coords}", web::get().to(table));
            }))
        }

        async fn stop(self) {
            self.0.stop().await;
        }

        fn base(&self, mode: &str) -> String {
            format!("{}/{mode}", self.url())
        }

        fn osrm(&self, mode: &str) -> OsrmRouting {
            OsrmRouting::new(&self.base(mode), Duration::from_secs(2)).unwrap()
        }
    }

    /// A clock the test moves by hand.
    fn manual_clock() -> (Clock, Arc<Mutex<Instant>>) {
        let now = Arc::new(Mutex::new(Instant::now()));
        let read = now.clone();
        (Arc::new(move || *read.lock().unwrap()), now)
    }

    fn advance(clock: &Mutex<Instant>, by: Duration) {
        let mut t = clock.lock().unwrap();
        *t += by;
    }

    #[actix_web::test]
    async fn normal_table_sends_the_osrm_request_and_rounds_up() {
        let fake = Fake::start().await;
        let osrm = fake.osrm("ok");
        let etas = osrm.durations(&SOURCES, &SCENE).await.unwrap();
        assert_eq!(etas, [Some(255), Some(0), Some(100)]);
        assert_eq!(
            fake.requests()
                .iter()
                .map(Recorded::path_and_query)
                .collect::<Vec<_>>(),
            [
                "/ok/table/v1/driving/13.388860,52.517037;13.397634,52.529407;\
              13.428555,52.523219;13.400000,52.520000\
              ?sources=0;1;2&destinations=3&annotations=duration"
            ]
        );
        // No sources, no request.
        assert_eq!(osrm.durations(&[], &SCENE).await.unwrap(), []);
        assert_eq!(fake.count(), 1);
        fake.stop().await;
    }

    #[actix_web::test]
    async fn null_entries_are_unreachable() {
        let fake = Fake::start().await;
        let etas = fake
            .osrm("nulls")
            .durations(&SOURCES, &SCENE)
            .await
            .unwrap();
        assert_eq!(etas, [None, Some(62), None]);
        fake.stop().await;
    }

    #[actix_web::test]
    async fn errors_are_classified() {
        let fake = Fake::start().await;
        let err = |mode: &'static str| {
            let osrm = fake.osrm(mode);
            async move { osrm.durations(&SOURCES, &SCENE).await.unwrap_err() }
        };
        assert!(matches!(err("down").await, RoutingError::Status(500)));
        assert!(matches!(err("nowhere").await, RoutingError::Status(404)));
        assert!(matches!(err("noroute").await, RoutingError::Osrm { code } if code == "NoRoute"));
        assert!(
            matches!(err("invalid").await, RoutingError::Osrm { code } if code == "InvalidQuery")
        );
        assert!(matches!(err("garbage").await, RoutingError::Malformed(_)));
        assert!(matches!(err("shape").await, RoutingError::Shape(_)));
        // Wrong row count: three sources, one row.
        assert!(matches!(err("one").await, RoutingError::Shape(_)));
        fake.stop().await;
    }

    #[actix_web::test]
    async fn timeout_is_an_error_and_trips_the_breaker() {
        let fake = Fake::start().await;
        // Every answer is held for as long as the fake lives: only the client's own timeout
        // can end a call.
        fake.hold(usize::MAX);
        let osrm = OsrmRouting::new(&fake.base("ok"), Duration::from_millis(200)).unwrap();
        for _ in 0..3 {
            let e = osrm.durations(&SOURCES, &SCENE).await.unwrap_err();
            assert!(matches!(e, RoutingError::Timeout), "{e:?}");
        }
        assert!(matches!(
            osrm.durations(&SOURCES, &SCENE).await,
            Err(RoutingError::CircuitOpen)
        ));
        assert_eq!(fake.count(), 3);
        fake.stop().await;
    }

    #[actix_web::test]
    async fn connection_refused_is_a_transport_error_without_coordinates() {
        install_crypto();
        let osrm = OsrmRouting::new(
            &format!("http://127.0.0.1:{}", free_port()),
            Duration::from_secs(2),
        )
        .unwrap();
        let e = osrm.durations(&SOURCES, &SCENE).await.unwrap_err();
        assert!(matches!(e, RoutingError::Transport(_)), "{e:?}");
        assert_eq!(e.kind(), "transport");
        let text = format!("{e} {e:?}");
        assert!(!text.contains("13.38") && !text.contains("52.5"), "{text}");
    }

    #[actix_web::test]
    async fn breaker_opens_after_three_failures_and_recovers_half_open() {
        let fake = Fake::start().await;
        let (clock, now) = manual_clock();
        let osrm = OsrmRouting::with_clock(
            &fake.base("flaky"),
            Duration::from_secs(2),
            CircuitBreaker::default(),
            clock,
        )
        .unwrap();
        let one = [SOURCES[0]];

        for _ in 0..3 {
            assert!(matches!(
                osrm.durations(&one, &SCENE).await,
                Err(RoutingError::Status(500))
            ));
        }
        // Open: fail fast, the fake sees no fourth request.
        assert!(matches!(
            osrm.durations(&one, &SCENE).await,
            Err(RoutingError::CircuitOpen)
        ));
        assert_eq!(fake.count(), 3);
        advance(&now, Duration::from_secs(29));
        assert!(matches!(
            osrm.durations(&one, &SCENE).await,
            Err(RoutingError::CircuitOpen)
        ));
        assert_eq!(fake.count(), 3);

        // Half-open, router still down: the one trial goes out, fails, the breaker re-opens.
        advance(&now, Duration::from_secs(1));
        assert!(matches!(
            osrm.durations(&one, &SCENE).await,
            Err(RoutingError::Status(500))
        ));
        assert_eq!(fake.count(), 4);
        assert!(matches!(
            osrm.durations(&one, &SCENE).await,
            Err(RoutingError::CircuitOpen)
        ));
        assert_eq!(fake.count(), 4);

        // Half-open, router back: the trial succeeds and closes the breaker.
        fake.state().healthy.store(true, Ordering::SeqCst);
        advance(&now, Duration::from_secs(30));
        assert_eq!(osrm.durations(&one, &SCENE).await.unwrap(), [Some(42)]);
        assert!(!osrm.breaker().is_open());
        assert_eq!(osrm.durations(&one, &SCENE).await.unwrap(), [Some(42)]);
        assert_eq!(fake.count(), 6);
        fake.stop().await;
    }

    #[actix_web::test]
    async fn osrm_error_codes_do_not_trip_the_breaker() {
        let fake = Fake::start().await;
        let osrm = fake.osrm("noroute");
        for _ in 0..5 {
            assert!(matches!(
                osrm.durations(&SOURCES, &SCENE).await,
                Err(RoutingError::Osrm { .. })
            ));
        }
        assert_eq!(fake.count(), 5);
        assert!(!osrm.breaker().is_open());
        fake.stop().await;
    }

    #[actix_web::test]
    async fn straight_line_never_fails() {
        let etas = StraightLine.durations(&SOURCES, &SCENE).await.unwrap();
        let expected: Vec<Option<u32>> = SOURCES
            .iter()
            .map(|s| Some(straight_line_eta_s(s, &SCENE)))
            .collect();
        assert_eq!(etas, expected);
        assert!(etas.iter().all(|e| e.is_some_and(|s| s > 0)));
    }

    #[actix_web::test]
    async fn fallback_uses_the_router_when_it_answers() {
        let fake = Fake::start().await;
        let routing = RoutingWithFallback::new(Some(Arc::new(fake.osrm("nulls"))));
        assert_eq!(
            routing.etas(&SOURCES, &SCENE).await,
            (vec![None, Some(62), None], true)
        );
        fake.stop().await;
    }

    #[actix_web::test]
    async fn fallback_returns_straight_line_etas_when_routing_fails() {
        let fake = Fake::start().await;
        let straight = StraightLine::etas(&SOURCES, &SCENE);
        let routing = RoutingWithFallback::new(Some(Arc::new(fake.osrm("down"))));
        for _ in 0..5 {
            assert_eq!(
                routing.etas(&SOURCES, &SCENE).await,
                (straight.clone(), false)
            );
        }
        // Three failures opened the breaker; the last two never reached the fake.
        assert_eq!(fake.count(), 3);

        let routing = RoutingWithFallback::new(None);
        assert!(!routing.has_primary());
        assert_eq!(
            routing.etas(&SOURCES, &SCENE).await,
            (straight.clone(), false)
        );
        fake.stop().await;
    }

    /// A router that answers with the wrong number of ETAs.
    struct Short;

    impl Routing for Short {
        fn durations<'a>(
            &'a self,
            _sources: &'a [LatLng],
            _destination: &'a LatLng,
        ) -> DurationsFuture<'a> {
            Box::pin(async { Ok(vec![Some(1)]) })
        }
    }

    #[actix_web::test]
    async fn fallback_rejects_an_answer_of_the_wrong_length() {
        let routing = RoutingWithFallback::new(Some(Arc::new(Short)));
        assert_eq!(
            routing.etas(&SOURCES, &SCENE).await,
            (StraightLine::etas(&SOURCES, &SCENE), false)
        );
    }
}
