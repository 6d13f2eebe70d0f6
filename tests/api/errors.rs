//! The error contract over real HTTP: every failure is problem+json naming the field.

use reqwest::StatusCode;
use serde_json::{Value, json};
use shers::domain::auth::Role;
use shers::persistence::Backend;

use crate::helpers::{TestApp, api};

async fn problem(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    assert_eq!(
        resp.headers()["content-type"],
        "application/problem+json",
        "{status}"
    );
    (status, resp.json().await.unwrap())
}

#[actix_web::test]
async fn errors_are_problem_json() {
    let app = TestApp::builder(Backend::Sqlite)
        .with_settings(|s| s.http.body_limit_bytes = 2048)
        .start()
        .await;
    let admin = app.token(Role::Admin).await;
    let post = |body: Vec<u8>, content_type: &'static str| {
        let req = app
            .client
            .post(app.url(api::ADMIN_TOKENS))
            .bearer_auth(&admin)
            .header("content-type", content_type)
            .body(body);
        async move { req.send().await.unwrap() }
    };

    // 400: malformed JSON, with the position.
    let (status, body) =
        problem(post(b"{\"role\": \"admin\",".to_vec(), "application/json").await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["type"], "https://shers.dev/problems/malformed-request");
    assert!(
        body["detail"].as_str().unwrap().contains("line 1"),
        "{body}"
    );

    // 422: valid JSON, wrong type, with a pointer to the field.
    let (status, body) =
        problem(post(br#"{"role": 5, "name": "x"}"#.to_vec(), "application/json").await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["errors"][0]["pointer"], "/role");

    // 422: unknown field.
    let (status, body) = problem(
        post(
            br#"{"role": "admin", "name": "x", "rol": 1}"#.to_vec(),
            "application/json",
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["detail"].as_str().unwrap().contains("rol"), "{body}");

    // 415: not JSON.
    let (status, _) =
        problem(post(b"role=admin".to_vec(), "application/x-www-form-urlencoded").await).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // 413: over the body limit (declared and streamed).
    let big = json!({"role": "admin", "name": "x".repeat(4096)})
        .to_string()
        .into_bytes();
    let (status, body) = problem(post(big, "application/json").await).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        body["detail"],
        "the request body exceeds the limit of 2048 bytes"
    );

    // 404: unknown route; 405: known route, wrong method.
    let (status, body) = problem(app.get("/api/v1/nothing-here", Some(Role::Admin)).await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["detail"], "no route for GET /api/v1/nothing-here");
    let resp = app
        .client
        .delete(app.url(api::ADMIN_TOKENS))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    let (status, _) = problem(resp).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    // A request id comes back on every response.
    let resp = app.get(api::HEALTHZ, None).await;
    assert!(resp.headers().contains_key("x-request-id"));
}
