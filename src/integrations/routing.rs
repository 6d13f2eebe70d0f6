//! Road ETAs for dispatch ranking: the Google Routes and OSRM `table` adapters, a
//! straight-line stand-in, and the provider chain the fleet uses (`docs/interop.md` §5).
//!
//! - [`Routing`] is the port: seconds from each source to one destination, `None` when a source
//!   has no ETA from this provider. It returns a boxed future so the fleet can hold
//!   `Arc<dyn Routing>`.
//! - [`GoogleRouting`] calls `POST {base}/distanceMatrix/v2:computeRouteMatrix` (traffic-aware,
//!   at most [`GOOGLE_MAX_ELEMENTS`] elements a request), matches the answer by
//!   `originIndex`/`destinationIndex`, and keeps whole answers for at most
//!   [`GOOGLE_CACHE_TTL`] so a burst of emergencies is not a burst of billed requests.
//! - [`OsrmRouting`] calls `GET {base}/table/v1/driving/{lon,lat;…}`.
//! - Each adapter has its own [`CircuitBreaker`], so an outage costs one timeout per 30 s
//!   instead of one per dispatch.
//! - [`StraightLine`] never fails: haversine × road factor at a fixed speed
//!   ([`straight_line_eta_s`]).
//! - [`RoutingWithFallback`] asks the configured providers in order: a provider that fails
//!   hands the whole request to the next, a Google element without an ETA hands that unit
//!   alone to the next, and the straight line answers whatever is left. Every ETA carries the
//!   [`EtaSource`] that gave it.
//!
//! Scene and unit positions are patient locations: they never appear in logs or in error
//! messages (reqwest errors are stripped of their URL, which carries the coordinates). The
//! Google API key is never logged either.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::Secret;
use crate::domain::dispatch::{EtaSource, RoutedEta, straight_line_eta_s};
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

    /// What a `None` in an answer means: `false` (the default, OSRM's `null`) = unreachable by
    /// road, the unit is dropped; `true` (Google's element errors and `ROUTE_NOT_FOUND`) = no
    /// ETA from this provider, the unit alone is asked of the next provider.
    fn none_falls_back(&self) -> bool {
        false
    }

    /// The provider's circuit breaker, for metrics and health.
    fn breaker(&self) -> Option<&CircuitBreaker> {
        None
    }
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
    /// The router answered with an HTTP error status that says it is unhealthy or refusing
    /// service (OSRM: any without an OSRM error code; Google: 403, 429, 5xx).
    #[error("routing service answered HTTP {0}")]
    Status(u16),
    /// Google refused this request (a 4xx other than 403 and 429): the question was the
    /// problem, not the provider's health.
    #[error("routing service refused the request with HTTP {0}")]
    Refused(u16),
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
            RoutingError::Refused(_) => "refused",
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
            | RoutingError::Refused(_)
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
        let (base_url, client) = http_client(base_url, timeout)?;
        Ok(Self {
            client,
            base_url,
            breaker,
            clock,
        })
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

    fn breaker(&self) -> Option<&CircuitBreaker> {
        Some(&self.breaker)
    }
}

/// Checks `base_url` (absolute http(s), trailing slashes dropped) and builds a client whose
/// every call, connect included, is limited to `timeout`.
fn http_client(
    base_url: &str,
    timeout: Duration,
) -> Result<(String, reqwest::Client), RoutingError> {
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
    Ok((base_url, client))
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

/// The most elements (origins × destinations) Google accepts in one `computeRouteMatrix`
/// request; larger candidate sets are split.
pub const GOOGLE_MAX_ELEMENTS: usize = 625;
/// The Routes API path, under `routing.google_base_url`.
pub const GOOGLE_MATRIX_PATH: &str = "/distanceMatrix/v2:computeRouteMatrix";
/// The response fields asked for (`X-Goog-FieldMask`); Google bills by them.
pub const GOOGLE_FIELD_MASK: &str =
    "originIndex,destinationIndex,status,condition,duration,distanceMeters";
/// How long a whole Google answer (same origins, same destination) is reused.
pub const GOOGLE_CACHE_TTL: Duration = Duration::from_secs(30);
/// The most answers the Google cache holds (the oldest goes first when full).
pub const GOOGLE_CACHE_CAPACITY: usize = 1024;

/// The Google Routes API `computeRouteMatrix` as a [`Routing`] adapter.
///
/// Origins are the sources (candidate units), the one destination the scene; `DRIVE`,
/// `TRAFFIC_AWARE`. An element with a non-zero `status.code`, `condition: ROUTE_NOT_FOUND`, or
/// no usable `duration` is `None` ([`Routing::none_falls_back`]: the unit is asked of the next
/// provider). HTTP 403, 429, 5xx, timeouts and transport errors trip the breaker; other 4xx
/// answers ([`RoutingError::Refused`]) do not.
pub struct GoogleRouting {
    client: reqwest::Client,
    base_url: String,
    api_key: Secret<String>,
    breaker: CircuitBreaker,
    clock: Clock,
    cache: AnswerCache,
}

impl std::fmt::Debug for GoogleRouting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoogleRouting")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key)
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

impl GoogleRouting {
    /// An adapter for the Routes API at `base_url` (`https://routes.googleapis.com`), each
    /// call limited to `timeout`, with the default breaker (3 failures, 30 s) and a
    /// [`GOOGLE_CACHE_TTL`] answer cache.
    ///
    /// A rustls crypto provider must be installed first (`app` and the CLI do it).
    pub fn new(
        base_url: &str,
        api_key: Secret<String>,
        timeout: Duration,
    ) -> Result<Self, RoutingError> {
        Self::with_clock(
            base_url,
            api_key,
            timeout,
            CircuitBreaker::default(),
            Arc::new(Instant::now),
        )
    }

    /// Like [`GoogleRouting::new`] with an explicit breaker and clock (the clock also ages
    /// the cache; tests move it).
    pub fn with_clock(
        base_url: &str,
        api_key: Secret<String>,
        timeout: Duration,
        breaker: CircuitBreaker,
        clock: Clock,
    ) -> Result<Self, RoutingError> {
        let (base_url, client) = http_client(base_url, timeout)?;
        Ok(Self {
            client,
            base_url,
            api_key,
            breaker,
            clock,
            cache: AnswerCache::new(GOOGLE_CACHE_TTL, GOOGLE_CACHE_CAPACITY),
        })
    }

    /// One request for at most [`GOOGLE_MAX_ELEMENTS`] origins.
    async fn call(
        &self,
        sources: &[LatLng],
        destination: &LatLng,
    ) -> Result<Vec<Option<u32>>, RoutingError> {
        let waypoint = |p: &LatLng| MatrixWaypoint {
            waypoint: Waypoint {
                location: Location {
                    lat_lng: GoogleLatLng {
                        latitude: p.lat,
                        longitude: p.lng,
                    },
                },
            },
        };
        let body = MatrixRequest {
            origins: sources.iter().map(waypoint).collect(),
            destinations: vec![waypoint(destination)],
            travel_mode: "DRIVE",
            routing_preference: "TRAFFIC_AWARE",
        };
        let response = self
            .client
            .post(format!("{}{GOOGLE_MATRIX_PATH}", self.base_url))
            .header("X-Goog-Api-Key", self.api_key.expose())
            .header("X-Goog-FieldMask", GOOGLE_FIELD_MASK)
            .json(&body)
            .send()
            .await
            .map_err(classify)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(classify)?;
        if !status.is_success() {
            let code = status.as_u16();
            return Err(if code == 403 || code == 429 || status.is_server_error() {
                RoutingError::Status(code)
            } else {
                RoutingError::Refused(code)
            });
        }
        let elements: Vec<MatrixElement> = serde_json::from_slice(&bytes).map_err(|e| {
            RoutingError::Malformed(format!(
                "{:?} error at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        match_elements(elements, sources.len())
    }
}

impl Routing for GoogleRouting {
    fn durations<'a>(
        &'a self,
        sources: &'a [LatLng],
        destination: &'a LatLng,
    ) -> DurationsFuture<'a> {
        Box::pin(async move {
            if sources.is_empty() {
                return Ok(Vec::new());
            }
            let key = AnswerKey::new(sources, destination);
            if let Some(answer) = self.cache.get(&key, (self.clock)()) {
                metrics::counter!("shers_routing_cache_hits_total", "provider" => "google")
                    .increment(1);
                return Ok(answer);
            }
            if self.breaker.acquire((self.clock)()) == Admission::Refuse {
                return Err(RoutingError::CircuitOpen);
            }
            let mut answer = Vec::with_capacity(sources.len());
            let mut result = Ok(());
            for chunk in sources.chunks(GOOGLE_MAX_ELEMENTS) {
                match self.call(chunk, destination).await {
                    Ok(part) => answer.extend(part),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            match result {
                Err(e) => {
                    if e.trips_breaker() {
                        self.breaker.on_failure((self.clock)());
                    } else {
                        self.breaker.on_success();
                    }
                    Err(e)
                }
                Ok(()) => {
                    self.breaker.on_success();
                    self.cache.put(key, answer.clone(), (self.clock)());
                    Ok(answer)
                }
            }
        })
    }

    fn none_falls_back(&self) -> bool {
        true
    }

    fn breaker(&self) -> Option<&CircuitBreaker> {
        Some(&self.breaker)
    }
}

/// `computeRouteMatrix` request body.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MatrixRequest {
    origins: Vec<MatrixWaypoint>,
    destinations: Vec<MatrixWaypoint>,
    travel_mode: &'static str,
    routing_preference: &'static str,
}

#[derive(Serialize)]
struct MatrixWaypoint {
    waypoint: Waypoint,
}

#[derive(Serialize)]
struct Waypoint {
    location: Location,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Location {
    lat_lng: GoogleLatLng,
}

#[derive(Serialize)]
struct GoogleLatLng {
    latitude: f64,
    longitude: f64,
}

/// One element of a `computeRouteMatrix` answer. Indices default to 0 because proto3 JSON
/// omits zero values.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MatrixElement {
    #[serde(default)]
    origin_index: usize,
    #[serde(default)]
    destination_index: usize,
    #[serde(default)]
    status: Option<RpcStatus>,
    #[serde(default)]
    condition: Option<String>,
    #[serde(default)]
    duration: Option<String>,
}

/// `google.rpc.Status`; an absent or zero code is OK.
#[derive(Deserialize)]
struct RpcStatus {
    #[serde(default)]
    code: i32,
}

/// Places each element by its `originIndex` (never by its position in the array): one ETA per
/// origin, `None` for an element in error, without a route, or missing. An index out of range
/// or given twice makes the whole answer untrustworthy.
fn match_elements(
    elements: Vec<MatrixElement>,
    n: usize,
) -> Result<Vec<Option<u32>>, RoutingError> {
    let mut etas: Vec<Option<u32>> = vec![None; n];
    let mut seen = vec![false; n];
    for e in elements {
        if e.destination_index != 0 {
            return Err(RoutingError::Shape(format!(
                "destination index {} for one destination",
                e.destination_index
            )));
        }
        let Some(slot) = seen.get_mut(e.origin_index) else {
            return Err(RoutingError::Shape(format!(
                "origin index {} for {n} origins",
                e.origin_index
            )));
        };
        if std::mem::replace(slot, true) {
            return Err(RoutingError::Shape(format!(
                "origin index {} twice",
                e.origin_index
            )));
        }
        let failed = e.status.is_some_and(|s| s.code != 0)
            || e.condition.as_deref() == Some("ROUTE_NOT_FOUND");
        if !failed && let Some(eta) = e.duration.as_deref().and_then(parse_google_duration) {
            etas[e.origin_index] = Some(eta);
        }
    }
    Ok(etas)
}

/// A protobuf JSON duration (`"123s"`, `"12.5s"`) in whole seconds, rounded up.
fn parse_google_duration(d: &str) -> Option<u32> {
    let secs: f64 = d.strip_suffix('s')?.parse().ok()?;
    // `as` saturates: a duration beyond u32::MAX seconds is unreachable in practice.
    (secs.is_finite() && secs >= 0.0).then(|| secs.ceil() as u32)
}

/// A whole question: the origins and the destination, bit for bit.
#[derive(Clone, PartialEq, Eq, Hash)]
struct AnswerKey(Vec<(u64, u64)>);

impl AnswerKey {
    fn new(sources: &[LatLng], destination: &LatLng) -> Self {
        Self(
            sources
                .iter()
                .chain(std::iter::once(destination))
                .map(|p| (p.lat.to_bits(), p.lng.to_bits()))
                .collect(),
        )
    }
}

/// Cached answers by question, with when each was stored.
type Answers = HashMap<AnswerKey, (Instant, Vec<Option<u32>>)>;

/// Recent whole answers, bounded in age and in count.
struct AnswerCache {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<Answers>,
}

impl AnswerCache {
    fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Answers> {
        // Every update is one insert or remove: the map stays usable after a panic.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, key: &AnswerKey, now: Instant) -> Option<Vec<Option<u32>>> {
        let mut entries = self.lock();
        match entries.get(key) {
            Some((at, answer)) if now.saturating_duration_since(*at) < self.ttl => {
                Some(answer.clone())
            }
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn put(&self, key: AnswerKey, answer: Vec<Option<u32>>, now: Instant) {
        let mut entries = self.lock();
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            entries.retain(|_, (at, _)| now.saturating_duration_since(*at) < self.ttl);
            if entries.len() >= self.capacity {
                let oldest = entries
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    entries.remove(&oldest);
                }
            }
        }
        entries.insert(key, (now, answer));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// One link of the chain: a router and the source its ETAs are reported as.
#[derive(Clone)]
pub struct Provider {
    /// Reported with each ETA it gives (`google`, `osrm`).
    pub source: EtaSource,
    /// The adapter.
    pub router: Arc<dyn Routing>,
}

/// The ordered chain of ETA providers with the straight line last, as the fleet uses it.
#[derive(Clone, Default)]
pub struct RoutingWithFallback {
    providers: Vec<Provider>,
}

impl std::fmt::Debug for RoutingWithFallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutingWithFallback")
            .field("providers", &self.sources())
            .finish()
    }
}

impl RoutingWithFallback {
    /// Asks `providers` in this order; an empty chain is straight line only.
    pub fn new(providers: Vec<Provider>) -> Self {
        Self { providers }
    }

    /// The configured sources, in order (the straight line, always last, not included).
    pub fn sources(&self) -> Vec<EtaSource> {
        self.providers.iter().map(|p| p.source).collect()
    }

    /// One ETA per source (same order) with the provider that gave it; `None` = unreachable
    /// by road (an OSRM `null`), for [`crate::domain::dispatch::rank`] to drop.
    ///
    /// Each provider is asked for the units still without an ETA. Any error (an open breaker,
    /// an answer of the wrong length included) hands all of them to the next provider; a `None`
    /// from a provider whose [`Routing::none_falls_back`] hands that unit alone on. The straight
    /// line answers whatever is left. Failures are logged with their kind only (an open breaker
    /// at debug: the breaker logged its opening once) and counted per provider.
    pub async fn etas(&self, sources: &[LatLng], destination: &LatLng) -> Vec<Option<RoutedEta>> {
        let mut out: Vec<Option<RoutedEta>> = vec![None; sources.len()];
        let mut pending: Vec<usize> = (0..sources.len()).collect();
        for provider in &self.providers {
            if pending.is_empty() {
                break;
            }
            let name = provider.source.as_str();
            let asked: Vec<LatLng> = pending.iter().map(|&i| sources[i]).collect();
            let started = Instant::now();
            let result = provider.router.durations(&asked, destination).await;
            metrics::counter!("shers_routing_calls_total", "provider" => name).increment(1);
            metrics::histogram!("shers_routing_latency_seconds", "provider" => name)
                .record(started.elapsed().as_secs_f64());
            if let Some(breaker) = provider.router.breaker() {
                metrics::gauge!("shers_routing_breaker_open", "provider" => name)
                    .set(if breaker.is_open() { 1.0 } else { 0.0 });
            }
            let answer = match result {
                Ok(etas) if etas.len() == asked.len() => etas,
                Ok(etas) => {
                    metrics::counter!("shers_routing_failures_total", "provider" => name, "kind" => "shape")
                        .increment(1);
                    tracing::warn!(
                        routing.provider = name,
                        error.kind = "shape",
                        expected = asked.len(),
                        got = etas.len(),
                        "routing answered the wrong number of ETAs; asking the next provider"
                    );
                    continue;
                }
                Err(e) => {
                    metrics::counter!("shers_routing_failures_total", "provider" => name, "kind" => e.kind())
                        .increment(1);
                    if matches!(e, RoutingError::CircuitOpen) {
                        tracing::debug!(
                            routing.provider = name,
                            error.kind = "circuit_open",
                            "routing circuit open; asking the next provider"
                        );
                    } else {
                        tracing::warn!(
                            routing.provider = name,
                            error.kind = e.kind(),
                            error = %e,
                            "routing failed; asking the next provider"
                        );
                    }
                    continue;
                }
            };
            let falls_back = provider.router.none_falls_back();
            let mut still = Vec::new();
            for (i, eta) in pending.into_iter().zip(answer) {
                match eta {
                    Some(eta_s) => {
                        out[i] = Some(RoutedEta {
                            eta_s,
                            source: provider.source,
                        });
                    }
                    None if falls_back => still.push(i),
                    None => {}
                }
            }
            if !still.is_empty() {
                metrics::counter!("shers_routing_unanswered_total", "provider" => name)
                    .increment(still.len() as u64);
            }
            pending = still;
        }
        for i in pending {
            out[i] = Some(RoutedEta {
                eta_s: straight_line_eta_s(&sources[i], destination),
                source: EtaSource::StraightLine,
            });
        }
        out
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
        assert!(!osrm.breaker.is_open());
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
        assert!(!osrm.breaker.is_open());
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

    // ---- a real local fake Google Routes API ---------------------------------------------

    /// For mode `flaky`: the HTTP status to answer (200 = the `ok` answer).
    struct FakeGoogleState {
        status: std::sync::atomic::AtomicU16,
    }

    /// `/{mode}/distanceMatrix/v2:computeRouteMatrix`. `ok` answers origin 0 with
    /// `duration = 100 × (i + 1)` seconds, origin 1 with `ROUTE_NOT_FOUND`, origin 2 with an
    /// element error, any further origin like origin 0, all in reverse order (origin 0's
    /// `originIndex` omitted, as proto3 JSON omits zeros). `index` answers every origin with
    /// `i + 1` s. A number mode answers that HTTP status.
    async fn matrix(
        req: HttpRequest,
        body: web::Json<serde_json::Value>,
        fake: web::Data<FakeGoogleState>,
    ) -> HttpResponse {
        let n = body["origins"].as_array().map_or(0, Vec::len);
        let mode = req.match_info().get("mode").unwrap_or_default().to_owned();
        let status = match mode.as_str() {
            "flaky" => fake.status.load(Ordering::SeqCst),
            m => m.parse().unwrap_or(200),
        };
        if status != 200 {
            return HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap())
                .json(json!({"error": {"code": status, "status": "UNAVAILABLE"}}));
        }
        let mut elements: Vec<serde_json::Value> = (0..n)
            .map(|i| {
                let mut e = match (mode.as_str(), i) {
                    ("index", _) => json!({"status": {}, "condition": "ROUTE_EXISTS",
                        "duration": format!("{}s", i + 1), "distanceMeters": 1000}),
                    (_, 1) => json!({"status": {}, "condition": "ROUTE_NOT_FOUND"}),
                    (_, 2) => json!({"status": {"code": 3, "message": "INVALID_ARGUMENT"}}),
                    _ => json!({"status": {}, "condition": "ROUTE_EXISTS",
                        "duration": format!("{}.5s", 100 * (i + 1) - 1),
                        "distanceMeters": 1234}),
                };
                e["destinationIndex"] = json!(0);
                if i > 0 {
                    e["originIndex"] = json!(i);
                }
                e
            })
            .collect();
        elements.reverse();
        HttpResponse::Ok().json(elements)
    }

    struct FakeGoogle(FakeHttp<FakeGoogleState>);

    impl FakeGoogle {
        async fn start() -> Self {
            Self(FakeHttp::start(
                FakeGoogleState {
                    status: std::sync::atomic::AtomicU16::new(200),
                },
                |cfg| {
                    cfg.route(
                        "/{mode}/distanceMatrix/v2:computeRouteMatrix",
                        web::post().to(matrix),
                    );
                },
            ))
        }

        fn base(&self, mode: &str) -> String {
            format!("{}/{mode}", self.0.url())
        }

        fn google(&self, mode: &str) -> GoogleRouting {
            GoogleRouting::new(
                &self.base(mode),
                Secret::new("test-key".to_owned()),
                Duration::from_secs(2),
            )
            .unwrap()
        }

        fn google_with_clock(&self, mode: &str, clock: Clock) -> GoogleRouting {
            GoogleRouting::with_clock(
                &self.base(mode),
                Secret::new("test-key".to_owned()),
                Duration::from_secs(2),
                CircuitBreaker::default(),
                clock,
            )
            .unwrap()
        }
    }

    fn google_waypoint(p: &LatLng) -> serde_json::Value {
        json!({"waypoint": {"location": {"latLng": {"latitude": p.lat, "longitude": p.lng}}}})
    }

    #[actix_web::test]
    async fn google_request_follows_the_contract_and_answers_match_by_index() {
        let fake = FakeGoogle::start().await;
        let google = fake.google("ok");
        // Out of order, origin 1 ROUTE_NOT_FOUND, origin 2 an element error: no ETA for those.
        assert_eq!(
            google.durations(&SOURCES, &SCENE).await.unwrap(),
            [Some(100), None, None]
        );
        let requests = fake.0.requests();
        assert_eq!(requests.len(), 1);
        let r = &requests[0];
        assert_eq!(r.method, actix_web::http::Method::POST);
        assert_eq!(r.path, "/ok/distanceMatrix/v2:computeRouteMatrix");
        assert_eq!(r.header("x-goog-api-key"), Some("test-key"));
        assert_eq!(
            r.header("x-goog-fieldmask"),
            Some("originIndex,destinationIndex,status,condition,duration,distanceMeters")
        );
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body,
            json!({
                "origins": SOURCES.iter().map(google_waypoint).collect::<Vec<_>>(),
                "destinations": [google_waypoint(&SCENE)],
                "travelMode": "DRIVE",
                "routingPreference": "TRAFFIC_AWARE",
            })
        );
        assert!(google.none_falls_back());
        // No sources, no request; the key never shows in Debug.
        assert_eq!(google.durations(&[], &SCENE).await.unwrap(), []);
        assert_eq!(fake.0.count(), 1);
        assert!(!format!("{google:?}").contains("test-key"));
        fake.0.stop().await;
    }

    #[test]
    fn google_elements_are_placed_by_index_and_checked() {
        let parse = |v: serde_json::Value, n| match_elements(serde_json::from_value(v).unwrap(), n);
        assert_eq!(
            parse(
                json!([
                    {"originIndex": 2, "destinationIndex": 0, "duration": "7s"},
                    {"originIndex": 1, "duration": "0s", "status": {"code": 0}},
                    {"originIndex": 3, "duration": "12s", "condition": "ROUTE_NOT_FOUND"},
                    {"duration": "30.2s", "condition": "ROUTE_EXISTS"},
                    {"originIndex": 4, "duration": "soon"},
                    {"originIndex": 5, "duration": "-3s"},
                ]),
                7
            )
            .unwrap(),
            [Some(31), Some(0), Some(7), None, None, None, None]
        );
        for (bad, n) in [
            (json!([{"originIndex": 3, "duration": "1s"}]), 3),
            (json!([{"originIndex": 0}, {"originIndex": 0}]), 2),
            (json!([{"originIndex": 0, "destinationIndex": 1}]), 1),
        ] {
            assert!(matches!(parse(bad, n), Err(RoutingError::Shape(_))));
        }
        assert_eq!(parse_google_duration("123s"), Some(123));
        assert_eq!(parse_google_duration("123"), None);
    }

    #[actix_web::test]
    async fn google_splits_more_than_625_elements() {
        let fake = FakeGoogle::start().await;
        let sources: Vec<LatLng> = (0..700)
            .map(|i| LatLng {
                lat: 52.0 + f64::from(i) * 1e-4,
                lng: 13.0,
            })
            .collect();
        let etas = fake
            .google("index")
            .durations(&sources, &SCENE)
            .await
            .unwrap();
        let expected: Vec<Option<u32>> = (0..700u32).map(|i| Some(i % 625 + 1)).collect();
        assert_eq!(etas, expected);
        let sizes: Vec<usize> = fake
            .0
            .requests()
            .iter()
            .map(|r| {
                let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                body["origins"].as_array().unwrap().len()
            })
            .collect();
        assert_eq!(sizes, [625, 75]);
        fake.0.stop().await;
    }

    #[actix_web::test]
    async fn google_errors_are_classified_and_trip_the_breaker_when_they_should() {
        let fake = FakeGoogle::start().await;
        for code in [429u16, 503, 500, 403] {
            let google = fake.google(&code.to_string());
            for _ in 0..3 {
                let e = google.durations(&SOURCES, &SCENE).await.unwrap_err();
                assert!(matches!(e, RoutingError::Status(c) if c == code), "{e:?}");
            }
            assert!(google.breaker.is_open(), "{code}");
            assert!(matches!(
                google.durations(&SOURCES, &SCENE).await,
                Err(RoutingError::CircuitOpen)
            ));
        }
        assert_eq!(fake.0.count(), 12);
        // A refused question is not an outage.
        let google = fake.google("400");
        for _ in 0..4 {
            let e = google.durations(&SOURCES, &SCENE).await.unwrap_err();
            assert!(matches!(e, RoutingError::Refused(400)), "{e:?}");
        }
        assert!(!google.breaker.is_open());
        fake.0.stop().await;
    }

    #[actix_web::test]
    async fn google_timeout_trips_the_breaker() {
        let fake = FakeGoogle::start().await;
        fake.0.hold(usize::MAX);
        let google = GoogleRouting::new(
            &fake.base("ok"),
            Secret::new("k".to_owned()),
            Duration::from_millis(200),
        )
        .unwrap();
        for _ in 0..3 {
            let e = google.durations(&SOURCES, &SCENE).await.unwrap_err();
            assert!(matches!(e, RoutingError::Timeout), "{e:?}");
        }
        assert!(google.breaker.is_open());
        assert_eq!(fake.0.count(), 3);
        fake.0.stop().await;
    }

    #[actix_web::test]
    async fn google_answers_are_reused_for_at_most_30_s() {
        let fake = FakeGoogle::start().await;
        let (clock, now) = manual_clock();
        let google = fake.google_with_clock("ok", clock);
        let first = google.durations(&SOURCES, &SCENE).await.unwrap();
        advance(&now, Duration::from_secs(29));
        assert_eq!(google.durations(&SOURCES, &SCENE).await.unwrap(), first);
        assert_eq!(
            fake.0.count(),
            1,
            "same question within 30 s: no second call"
        );
        // Another question is asked.
        google.durations(&SOURCES[..2], &SCENE).await.unwrap();
        assert_eq!(fake.0.count(), 2);
        // 30 s after the first answer it is stale.
        advance(&now, Duration::from_secs(1));
        google.durations(&SOURCES, &SCENE).await.unwrap();
        assert_eq!(fake.0.count(), 3);
        // Failures are not cached.
        fake.0.state().status.store(503, Ordering::SeqCst);
        let flaky = fake.google("flaky");
        assert!(flaky.durations(&SOURCES, &SCENE).await.is_err());
        fake.0.state().status.store(200, Ordering::SeqCst);
        assert!(flaky.durations(&SOURCES, &SCENE).await.is_ok());
        assert_eq!(fake.0.count(), 5);
        fake.0.stop().await;
    }

    #[test]
    fn the_answer_cache_is_bounded() {
        let cache = AnswerCache::new(Duration::from_secs(30), 2);
        let t = Instant::now();
        let key = |i: u32| {
            AnswerKey::new(
                &[LatLng {
                    lat: f64::from(i),
                    lng: 0.0,
                }],
                &SCENE,
            )
        };
        cache.put(key(1), vec![Some(1)], t);
        cache.put(key(2), vec![Some(2)], t + Duration::from_secs(1));
        cache.put(key(3), vec![Some(3)], t + Duration::from_secs(2));
        assert_eq!(cache.len(), 2);
        let at = t + Duration::from_secs(3);
        assert_eq!(cache.get(&key(1), at), None, "the oldest went first");
        assert_eq!(cache.get(&key(2), at), Some(vec![Some(2)]));
        assert_eq!(cache.get(&key(3), at), Some(vec![Some(3)]));
        assert_eq!(cache.get(&key(3), t + Duration::from_secs(32)), None);
        assert_eq!(cache.len(), 1, "a stale entry read is dropped");
    }

    // ---- the provider chain ----------------------------------------------------------------

    /// `/count/table/v1/driving/{coords}` on the fake OSRM answers `200 + i` s per source.
    async fn counting_table(coords: web::Path<String>) -> HttpResponse {
        let n = coords.split(';').count().saturating_sub(1);
        let durations: Vec<Vec<f64>> = (0..n).map(|i| vec![200.0 + i as f64]).collect();
        HttpResponse::Ok().json(json!({"code": "Ok", "durations": durations}))
    }

    fn counting_osrm() -> FakeHttp<()> {
        FakeHttp::start((), |cfg| {
            cfg.route("/table/v1/driving/{coords}", web::get().to(counting_table));
        })
    }

    fn link(source: EtaSource, router: impl Routing + 'static) -> Provider {
        Provider {
            source,
            router: Arc::new(router),
        }
    }

    fn eta(eta_s: u32, source: EtaSource) -> Option<RoutedEta> {
        Some(RoutedEta { eta_s, source })
    }

    fn straight(i: usize) -> Option<RoutedEta> {
        eta(
            straight_line_eta_s(&SOURCES[i], &SCENE),
            EtaSource::StraightLine,
        )
    }

    #[actix_web::test]
    async fn units_without_a_google_eta_fall_back_alone() {
        let google = FakeGoogle::start().await;
        let osrm = counting_osrm();
        let chain = RoutingWithFallback::new(vec![
            link(EtaSource::Google, google.google("ok")),
            link(
                EtaSource::Osrm,
                OsrmRouting::new(osrm.url(), Duration::from_secs(2)).unwrap(),
            ),
        ]);
        assert_eq!(chain.sources(), [EtaSource::Google, EtaSource::Osrm]);
        assert_eq!(
            chain.etas(&SOURCES, &SCENE).await,
            [
                eta(100, EtaSource::Google),
                eta(200, EtaSource::Osrm),
                eta(201, EtaSource::Osrm)
            ]
        );
        // OSRM was asked about the two units Google had no ETA for, only.
        let osrm_asked = osrm.requests()[0].path.clone();
        assert!(
            osrm_asked.starts_with(
                "/table/v1/driving/13.397634,52.529407;13.428555,52.523219;13.400000,52.520000"
            ),
            "{osrm_asked}"
        );

        // Google alone: those two take the straight line.
        let chain = RoutingWithFallback::new(vec![link(EtaSource::Google, google.google("ok"))]);
        assert_eq!(
            chain.etas(&SOURCES, &SCENE).await,
            [eta(100, EtaSource::Google), straight(1), straight(2)]
        );
        osrm.stop().await;
        google.0.stop().await;
    }

    #[actix_web::test]
    async fn a_failing_google_hands_the_whole_request_on_and_its_breaker_opens() {
        let google = FakeGoogle::start().await;
        let osrm = counting_osrm();
        for code in ["429", "503"] {
            let chain = RoutingWithFallback::new(vec![
                link(EtaSource::Google, google.google(code)),
                link(
                    EtaSource::Osrm,
                    OsrmRouting::new(osrm.url(), Duration::from_secs(2)).unwrap(),
                ),
            ]);
            for _ in 0..5 {
                assert_eq!(
                    chain.etas(&SOURCES, &SCENE).await,
                    [
                        eta(200, EtaSource::Osrm),
                        eta(201, EtaSource::Osrm),
                        eta(202, EtaSource::Osrm)
                    ]
                );
            }
        }
        // Three calls each opened Google's breaker; OSRM's stayed closed and answered all ten.
        assert_eq!(google.0.count(), 6);
        assert_eq!(osrm.count(), 10);

        // OSRM down too: the straight line answers.
        let chain = RoutingWithFallback::new(vec![
            link(EtaSource::Google, google.google("503")),
            link(
                EtaSource::Osrm,
                OsrmRouting::new(
                    &format!("http://127.0.0.1:{}", free_port()),
                    Duration::from_secs(2),
                )
                .unwrap(),
            ),
        ]);
        assert_eq!(
            chain.etas(&SOURCES, &SCENE).await,
            [straight(0), straight(1), straight(2)]
        );
        osrm.stop().await;
        google.0.stop().await;
    }

    #[actix_web::test]
    async fn osrm_unreachable_units_stay_unreachable() {
        let fake = Fake::start().await;
        let chain = RoutingWithFallback::new(vec![link(EtaSource::Osrm, fake.osrm("nulls"))]);
        assert_eq!(
            chain.etas(&SOURCES, &SCENE).await,
            [None, eta(62, EtaSource::Osrm), None]
        );
        fake.stop().await;
    }

    #[actix_web::test]
    async fn an_empty_chain_is_the_straight_line() {
        let chain = RoutingWithFallback::default();
        assert!(chain.sources().is_empty());
        assert_eq!(
            chain.etas(&SOURCES, &SCENE).await,
            [straight(0), straight(1), straight(2)]
        );
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
    async fn an_answer_of_the_wrong_length_is_handed_on() {
        let chain = RoutingWithFallback::new(vec![link(EtaSource::Osrm, Short)]);
        assert_eq!(
            chain.etas(&SOURCES, &SCENE).await,
            [straight(0), straight(1), straight(2)]
        );
    }
}
