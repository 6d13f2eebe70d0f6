//! A stand-in road router for benchmarks: answers the Google Routes `computeRouteMatrix` and
//! the OSRM `table` requests SHERS makes (`docs/interop.md` §5) after a fixed delay, so
//! `scripts/routing-bench.sh` can compare reading → offer with each provider against the
//! straight line without calling a billed or remote service. It checks nothing (no API key)
//! and must never stand in for a real router: its durations are made up (100 s, 110 s, …
//! per origin, in order).

use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use serde_json::{Value, json};

/// Options of `shers fake-routing`.
#[derive(Clone, Debug, clap::Args)]
pub struct FakeRoutingArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:18700")]
    pub bind: String,
    /// How long every answer is held, milliseconds (a router's round trip).
    #[arg(long, default_value_t = 20)]
    pub delay_ms: u64,
}

/// The made-up duration of the `i`-th origin, seconds.
fn duration_s(i: usize) -> usize {
    100usize.saturating_add(i.saturating_mul(10))
}

async fn google(delay: web::Data<Duration>, body: web::Json<Value>) -> HttpResponse {
    tokio::time::sleep(**delay).await;
    let n = body["origins"].as_array().map_or(0, Vec::len);
    let elements: Vec<Value> = (0..n)
        .map(|i| {
            json!({"originIndex": i, "destinationIndex": 0, "status": {},
                   "condition": "ROUTE_EXISTS", "duration": format!("{}s", duration_s(i)),
                   "distanceMeters": 1000})
        })
        .collect();
    HttpResponse::Ok().json(elements)
}

async fn osrm(delay: web::Data<Duration>, coords: web::Path<String>) -> HttpResponse {
    tokio::time::sleep(**delay).await;
    let n = coords.split(';').count().saturating_sub(1);
    let durations: Vec<Vec<usize>> = (0..n).map(|i| vec![duration_s(i)]).collect();
    HttpResponse::Ok().json(json!({"code": "Ok", "durations": durations}))
}

/// Serves until interrupted.
pub async fn run(args: FakeRoutingArgs) -> anyhow::Result<()> {
    let delay = web::Data::new(Duration::from_millis(args.delay_ms));
    println!(
        "fake routing on http://{} ({} ms a call): Google at /distanceMatrix/v2:computeRouteMatrix, \
         OSRM at /table/v1/driving/…",
        args.bind, args.delay_ms
    );
    HttpServer::new(move || {
        App::new()
            .app_data(delay.clone())
            .route(
                "/distanceMatrix/v2:computeRouteMatrix",
                web::post().to(google),
            )
            .route("/table/v1/driving/{coords}", web::get().to(osrm))
    })
    .bind(&args.bind)?
    .run()
    .await?;
    Ok(())
}
