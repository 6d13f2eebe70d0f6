//! The auth matrix: every role against every endpoint group, plus missing, invalid and revoked
//! tokens and the WebSocket query-string token.

use reqwest::StatusCode;
use serde_json::{Value, json};
use shers::domain::auth::Role;
use shers::persistence::{Backend, tokens};

use crate::both_backends;
use crate::helpers::{TestApp, TestDb, api};

both_backends!(role_matrix, revoked_tokens_stop_working, token_admin_api);

/// (method, path, roles allowed; empty = public)
const ENDPOINTS: &[(&str, &str, &[Role])] = &[
    ("GET", "/", &[]),
    ("GET", "/healthz", &[]),
    ("GET", "/readyz", &[]),
    ("GET", "/metrics", &[Role::Admin]),
    ("GET", "/api/openapi.json", &Role::ALL),
    ("GET", "/api/v1/whoami", &Role::ALL),
    ("GET", "/api/v1/dashboard/config", &Role::ALL),
    ("GET", "/admin/tokens", &[Role::Admin]),
    ("GET", "/admin/actors", &[Role::Admin]),
    ("GET", "/api/v1/incidents", &[Role::Console]),
];

async fn role_matrix(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for (method, path, allowed) in ENDPOINTS {
        assert_eq!(*method, "GET");
        let public = allowed.is_empty();

        let anonymous = app.get(path, None).await;
        let expected = if public {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        assert_eq!(anonymous.status(), expected, "anonymous {path}");
        if !public {
            assert_eq!(
                anonymous.headers()["content-type"],
                "application/problem+json"
            );
            assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
        }

        let garbage = app
            .client
            .get(app.url(path))
            .bearer_auth("shers_not-a-real-token")
            .send()
            .await
            .unwrap();
        assert_eq!(garbage.status(), expected, "invalid token {path}");

        for role in Role::ALL {
            let resp = app.get(path, Some(role)).await;
            let ok = public || allowed.iter().any(|a| role.satisfies(*a));
            let expected = if ok {
                StatusCode::OK
            } else {
                StatusCode::FORBIDDEN
            };
            assert_eq!(resp.status(), expected, "{role} {path}");
            if !ok {
                let body: Value = resp.json().await.unwrap();
                assert_eq!(body["status"], 403);
                assert!(body["detail"].as_str().unwrap().contains(role.as_str()));
            }
        }
    }
}

both_backends!(query_tokens_open_only_the_websockets);

/// A token in the query string is read on the WebSocket routes only: on any other route it is
/// no credential, even dressed as a WebSocket upgrade.
async fn query_tokens_open_only_the_websockets(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let admin = app.token(Role::Admin).await;
    let upgrade = |req: reqwest::RequestBuilder| {
        req.header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
    };
    for (_, path, _) in ENDPOINTS
        .iter()
        .filter(|(_, _, allowed)| !allowed.is_empty())
    {
        let url = app.url(&format!("{path}?access_token={admin}"));
        let plain = app.client.get(&url).send().await.unwrap();
        assert_eq!(plain.status(), StatusCode::UNAUTHORIZED, "{path}");
        let dressed = upgrade(app.client.get(&url)).send().await.unwrap();
        assert_eq!(dressed.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    // A write dressed as an upgrade creates nothing.
    let before: Value = app.tokens(Role::Admin).await.json().await.unwrap();
    let url = app.url(&format!("{}?access_token={admin}", api::ADMIN_TOKENS));
    let post = upgrade(app.client.post(&url))
        .json(&json!({"role": "admin", "name": "sneaked in"}))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::UNAUTHORIZED);
    let after: Value = app.tokens(Role::Admin).await.json().await.unwrap();
    assert_eq!(after["items"], before["items"]);

    // The WebSocket routes still take it (browsers cannot set headers on an upgrade).
    app.add_unit("UNIT-1", 51.5, -0.12, "als").await;
    let crew = app.crew_token("UNIT-1").await;
    let console = app.token(Role::Console).await;
    let gateway = app.token(Role::Gateway).await;
    for url in [
        app.ws_crew_url(&crew),
        app.ws_console_url(0, &console),
        app.ws_gateway_url(Some(&gateway)),
    ] {
        let (mut socket, response) = tokio_tungstenite::connect_async(&url).await.unwrap();
        assert_eq!(response.status().as_u16(), 101, "{url}");
        socket.close(None).await.unwrap();
    }
    // ... and only as an upgrade, and only the token they are given.
    for path in [api::WS_CREW, api::WS_CONSOLE, api::WS_GATEWAY] {
        let url = app.url(&format!("{path}?access_token={admin}"));
        let plain = app.client.get(&url).send().await.unwrap();
        assert_eq!(plain.status(), StatusCode::UNAUTHORIZED, "{path}");
        let url = app.url(&format!("{path}?access_token=shers_not-a-real-token"));
        let forged = upgrade(app.client.get(&url)).send().await.unwrap();
        assert_eq!(forged.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
}

async fn revoked_tokens_stop_working(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let victim = app.create_token(Role::Gateway).await;
    assert_eq!(app.whoami(&victim).await.status(), StatusCode::OK);
    let list: Value = app.tokens(Role::Admin).await.json().await.unwrap();
    let id = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["role"] == "gateway")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let revoke = app.revoke_token(&id, Role::Admin).await;
    assert_eq!(revoke.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        app.whoami(&victim).await.status(),
        StatusCode::UNAUTHORIZED,
        "revocation is immediate"
    );
    let again = app.revoke_token(&id, Role::Admin).await;
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
}

async fn token_admin_api(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let created = app
        .issue_token(
            Role::Admin,
            &json!({"role": "crew", "unit_id": "M-12", "name": "Medic 12"}),
        )
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let body: Value = created.json().await.unwrap();
    let token = body["token"].as_str().unwrap().to_owned();
    assert_eq!(body["unit_id"], "M-12");
    let me: Value = app.whoami(&token).await.json().await.unwrap();
    assert_eq!(me["role"], "crew");
    assert_eq!(me["unit_id"], "M-12");

    let list: Value = app.tokens(Role::Admin).await.json().await.unwrap();
    let text = list.to_string();
    assert!(!text.contains(&token), "secrets are never listed");
    assert!(
        !text.contains(&shers::domain::auth::hash_token(&token)),
        "nor their hashes"
    );

    let missing_unit = app
        .issue_token(Role::Admin, &json!({"role": "crew", "name": "x"}))
        .await;
    assert_eq!(missing_unit.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = missing_unit.json().await.unwrap();
    assert_eq!(body["errors"][0]["pointer"], "/unit_id");

    let console = app
        .issue_token(Role::Console, &json!({"role": "admin", "name": "escalate"}))
        .await;
    assert_eq!(
        console.status(),
        StatusCode::FORBIDDEN,
        "consoles cannot mint tokens"
    );
}

both_backends!(acknowledged_tokens_survive_an_abrupt_stop);

async fn acknowledged_tokens_survive_an_abrupt_stop(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let created: Value = app
        .issue_token(
            Role::Admin,
            &json!({"role": "console", "name": "night desk"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    let tdb = app.kill().await;
    let app = TestApp::builder(backend).start_on(tdb).await;
    let resp = app.whoami(&token).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

both_backends!(a_server_mints_no_token_for_itself_and_sweeps_what_older_builds_left);

/// Billing's calls to the server's own insurance service carry a credential held in memory,
/// not an API token, so starts and crashes leave no admin token behind. The admin tokens older
/// builds minted for their own use (`billing (internal)`, `node <id> (internal)`, left live by
/// a crash) are revoked when a server starts; nobody else's are.
async fn a_server_mints_no_token_for_itself_and_sweeps_what_older_builds_left(backend: Backend) {
    let tdb = TestDb::new(backend).await;
    let db = tdb.migrated().await;
    let mut conn = db.conn().await.unwrap();
    let mut mint = async |role, name: &str| {
        tokens::create(&mut conn, role, None, None, name, chrono::Utc::now())
            .await
            .unwrap()
            .token
    };
    let legacy = [
        mint(Role::Admin, "billing (internal)").await,
        mint(Role::Admin, "node shers-1 (internal)").await,
    ];
    let kept = [
        mint(Role::Console, "night desk").await,
        mint(Role::Admin, "node maintenance (internal) runbook").await,
    ];
    drop(conn);
    let app = TestApp::builder(backend).start_on(tdb).await;
    for token in &legacy {
        assert_eq!(app.whoami(token).await.status(), StatusCode::UNAUTHORIZED);
    }
    for token in &kept {
        assert_eq!(app.whoami(token).await.status(), StatusCode::OK);
    }
    let live = live_tokens(&app.db).await;
    assert_eq!(
        live.len(),
        2,
        "only the operators' tokens are live: {live:?}"
    );

    // Abrupt stops and starts: nothing is minted, nothing piles up.
    let mut app = app;
    for _ in 0..3 {
        let tdb = app.kill().await;
        app = TestApp::builder(backend).start_on(tdb).await;
    }
    assert_eq!(live_tokens(&app.db).await, live);
}

/// The names of the live tokens.
async fn live_tokens(db: &shers::persistence::Db) -> Vec<String> {
    let mut conn = db.conn().await.unwrap();
    let mut names: Vec<String> = tokens::list(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.revoked_at.is_none())
        .map(|t| t.name)
        .collect();
    names.sort();
    names
}
