//! Operational endpoints: readiness against a real outage, metrics, OpenAPI.

use reqwest::StatusCode;
use serde_json::Value;
use shers::domain::auth::Role;
use shers::persistence::Backend;

use crate::helpers::{TestApp, api, app_behind_a_proxy};

async fn wait_for_status(app: &TestApp, path: &str, want: StatusCode) -> Value {
    let what = format!("{path} answering {want}");
    crate::helpers::eventually(&what, || async {
        let resp = app.get(path, None).await;
        if resp.status() == want {
            Some(resp.json().await.unwrap())
        } else {
            None
        }
    })
    .await
}

#[actix_web::test]
async fn readyz_follows_a_postgres_outage_through_a_proxy() {
    if !crate::helpers::postgres_available().await {
        return;
    }
    let (app, proxy) = app_behind_a_proxy().await;
    let body = wait_for_status(&app, api::READYZ, StatusCode::OK).await;
    assert_eq!(body["database"], "postgres");

    proxy.cut();
    let body = wait_for_status(&app, api::READYZ, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(body["status"], "not_ready");
    // Liveness is unaffected: the process is fine, its dependency is not.
    assert_eq!(app.get(api::HEALTHZ, None).await.status(), StatusCode::OK);

    proxy.restore();
    wait_for_status(&app, api::READYZ, StatusCode::OK).await;
}

fn emergency(device: &str) -> Value {
    serde_json::json!({
        "device_id": device,
        "timestamp": chrono::Utc::now().to_rfc3339(),
        "heart_rate_bpm": 170,
        "spo2_pct": 85
    })
}

/// The incident a reading opened, or why none was.
async fn opens_incident(app: &TestApp, device: &str) -> Result<String, String> {
    let resp = app.post_vitals(&emergency(device)).await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or_default();
    match body["results"][0]["incident_id"].as_str() {
        Some(id) if status.is_success() => Ok(id.to_owned()),
        _ => Err(format!("{status}: {body}")),
    }
}

/// Every connection SHERS holds to PostgreSQL is cut (the writer's, the pool's and the incident
/// directory's own reader): once the database is back, the next emergency opens its incident at
/// the first try, with its patient's next of kin notified, and so does the one after it.
#[actix_web::test]
async fn emergencies_open_incidents_again_after_a_postgres_outage() {
    if !crate::helpers::postgres_available().await {
        return;
    }
    let (app, proxy) = app_behind_a_proxy().await;
    for n in 1..=3 {
        app.register_wearer(&format!("p-{n}"), &format!("w{n}"))
            .await;
    }
    opens_incident(&app, "w1").await.unwrap();

    proxy.cut();
    wait_for_status(&app, api::READYZ, StatusCode::SERVICE_UNAVAILABLE).await;
    proxy.restore();
    wait_for_status(&app, api::READYZ, StatusCode::OK).await;

    // Connections that died in the outage are replaced before use: no reading fails for them.
    let second = opens_incident(&app, "w2").await.unwrap();
    let incident = app
        .wait_incident(&second, |i| i["status"] == "dispatching")
        .await;
    assert_eq!(incident["patient_id"], "p-2");
    assert_eq!(
        incident["notifications"].as_array().unwrap().len(),
        1,
        "{incident}"
    );

    let third = opens_incident(&app, "w3").await;
    assert!(third.is_ok(), "{third:?}");
    let listed: Value = app
        .list_incidents("status=all&limit=10", Role::Console)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 3, "{listed}");
}

#[actix_web::test]
async fn readyz_is_503_while_migrations_are_missing() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    assert_eq!(app.get(api::READYZ, None).await.status(), StatusCode::OK);
    let url = match &app.db {
        shers::persistence::Db::Sqlite(_) => app_db_url(&app).await,
        shers::persistence::Db::Postgres(_) => unreachable!(),
    };
    shers::persistence::migrations::revert_all(&app.db, &url)
        .await
        .unwrap();
    let resp = app.get(api::READYZ, None).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "2");
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("migrations not applied"),
        "{body}"
    );
}

async fn app_db_url(app: &TestApp) -> String {
    #[derive(diesel::QueryableByName)]
    struct File {
        #[diesel(sql_type = diesel::sql_types::Text)]
        file: String,
    }
    let mut conn = app.db.conn().await.unwrap();
    let rows: Vec<File> = shers::db_run!(&mut conn, |c| {
        diesel_async::RunQueryDsl::load(
            diesel::sql_query("SELECT file FROM pragma_database_list WHERE name = 'main'"),
            c,
        )
        .await
        .unwrap()
    });
    format!("sqlite://{}", rows[0].file)
}

#[actix_web::test]
async fn metrics_count_requests_by_route() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    for _ in 0..3 {
        app.get(api::WHOAMI, Some(Role::Console)).await;
    }
    let text = app
        .get(api::METRICS, Some(Role::Admin))
        .await
        .text()
        .await
        .unwrap();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("http_requests_total{")
                && l.contains("route=\"/api/v1/whoami\"")
                && l.contains("status=\"200\"")
        })
        .unwrap_or_else(|| panic!("no whoami counter in\n{text}"));
    let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 3.0, "{line}");
    assert!(
        text.contains("http_request_duration_seconds_bucket{"),
        "latency histogram present"
    );
}

#[actix_web::test]
async fn openapi_document_lists_the_endpoints() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let doc: Value = app
        .get(api::OPENAPI, Some(Role::Gateway))
        .await
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/v1/whoami",
        "/admin/tokens",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from OpenAPI"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

#[actix_web::test]
async fn the_dashboard_is_served_and_inserts_data_as_text_only() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let resp = app.get(api::DASHBOARD, None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'self'")
    );
    let page = resp.text().await.unwrap();
    assert!(
        page.contains("/api/v1/ws/console"),
        "the dashboard streams events live"
    );
    assert!(page.contains("textContent"));
    for unsafe_sink in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
    ] {
        assert!(
            !page.contains(unsafe_sink),
            "the dashboard must not use {unsafe_sink}"
        );
    }
    assert!(
        !page.contains("src=\"http") && !page.contains("href=\"http") && !page.contains("@import"),
        "no CDN or external resources"
    );
}

#[actix_web::test]
async fn a_tile_server_is_allowed_by_the_csp_and_offered_to_the_dashboard() {
    let plain = TestApp::spawn(Backend::Sqlite).await;
    let csp = plain.get(api::DASHBOARD, None).await.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("img-src 'self' data:;"), "{csp}");
    let config: Value = plain
        .dashboard_config(Role::Console)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(config["tile_url"], Value::Null);

    let app = TestApp::builder(Backend::Sqlite)
        .with_settings(|s| {
            s.dashboard.tile_url = Some("http://127.0.0.1:8099/osm/{z}/{x}/{y}.png".into());
            s.dashboard.tile_attribution = Some("© OpenStreetMap contributors".into());
        })
        .start()
        .await;
    let csp = app.get(api::DASHBOARD, None).await.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("img-src 'self' data: http://127.0.0.1:8099;"),
        "{csp}"
    );
    let unauthenticated = app.get(api::DASHBOARD_CONFIG, None).await;
    assert_eq!(unauthenticated.status(), StatusCode::UNAUTHORIZED);
    let config: Value = app
        .dashboard_config(Role::Console)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        config["tile_url"],
        "http://127.0.0.1:8099/osm/{z}/{x}/{y}.png"
    );
    assert_eq!(config["tile_attribution"], "© OpenStreetMap contributors");
}
