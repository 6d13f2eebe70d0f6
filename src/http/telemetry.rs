//! Request tracing and Prometheus metrics.
//!
//! The root span records method, route pattern and path, never the query string (WebSocket
//! tokens travel there) nor bodies. The metrics middleware counts requests and records latency
//! histograms by route pattern (bounded label cardinality), echoes the request id, and writes
//! one access-log event per request.

use std::sync::OnceLock;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{Error, HttpMessage as _};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Span;
use tracing_actix_web::{RequestId, RootSpanBuilder};

/// Root span without query strings or bodies.
pub struct ShersRootSpan;

impl RootSpanBuilder for ShersRootSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let request_id = request
            .extensions()
            .get::<RequestId>()
            .map(ToString::to_string)
            .unwrap_or_default();
        tracing::info_span!(
            "http.request",
            http.method = %request.method(),
            http.route = %request.match_pattern().unwrap_or_else(|| "unmatched".to_owned()),
            http.path = %request.path(),
            request_id = %request_id,
            http.status_code = tracing::field::Empty,
        )
    }

    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, Error>) {
        let status = match outcome {
            Ok(response) => response.status().as_u16(),
            Err(error) => error.as_response_error().status_code().as_u16(),
        };
        span.record("http.status_code", status);
    }
}

/// Latency buckets in seconds: dispatch targets are in milliseconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process-wide Prometheus recorder (metrics recorders are global by design; tests that
/// start several applications in one process share it).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("duration_seconds".to_owned()),
                LATENCY_BUCKETS,
            )
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first; then our handle renders nothing
        // but nothing else breaks.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Counts requests, records latency by route and logs one line per request.
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let route = req
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    let request_id = req.extensions().get::<RequestId>().map(ToString::to_string);
    let result = next.call(req).await;
    let elapsed = started.elapsed();
    let status = match &result {
        Ok(res) => res.status().as_u16(),
        Err(err) => err.as_response_error().status_code().as_u16(),
    };
    let labels = [
        ("method", method.clone()),
        ("route", route.clone()),
        ("status", status.to_string()),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!(
        "http_request_duration_seconds",
        &[("method", method.clone()), ("route", route.clone())]
    )
    .record(elapsed.as_secs_f64());
    let latency_ms = elapsed.as_secs_f64() * 1_000.0;
    if status >= 500 {
        tracing::event!(target: ACCESS_LOG, tracing::Level::WARN, http.status_code = status, latency_ms, "request failed");
    } else {
        tracing::event!(target: ACCESS_LOG, tracing::Level::INFO, http.status_code = status, latency_ms, "request completed");
    }
    let mut res = result?;
    if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(&id).ok()) {
        res.headers_mut()
            .insert(HeaderName::from_static("x-request-id"), id);
    }
    Ok(res)
}

/// The target of the access log (one event per request), so it can be filtered on its own:
/// `RUST_LOG=info,shers::access=warn` keeps only failed requests.
pub const ACCESS_LOG: &str = "shers::access";

/// Installs the global tracing subscriber: `RUST_LOG` levels (default `info`), text or JSON,
/// on standard error, coloured only when that is a terminal and `NO_COLOR` is unset.
/// Returns quietly if a subscriber is already installed (tests).
pub fn init_tracing(format: crate::config::LogFormat) {
    init_tracing_with_default(format, "info");
}

/// [`init_tracing`] with another filter for when `RUST_LOG` is unset (the demo keeps its
/// screen for what happens to patients and crews: `info,shers::access=warn`).
pub fn init_tracing_with_default(format: crate::config::LogFormat, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::fmt;
    // tracing-actix-web's own error event (one warning per 4xx, whatever RUST_LOG says) is
    // compiled out (`default-features = false`): the access log above has every status, and a
    // 5xx's cause is logged where it happens (`http::error`).
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colours_wanted());
    let _ = match format {
        crate::config::LogFormat::Text => builder.try_init(),
        crate::config::LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Whether log lines get ANSI colour codes: only when standard error (where they go) is a
/// terminal and `NO_COLOR` is unset or empty. A log file, a pipe or a log collector gets plain
/// text, which `grep` and the collectors' parsers read as it is.
fn colours_wanted() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
