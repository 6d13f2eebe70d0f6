//! The insurance verification service: coverage decisions, claim holds and releases,
//! validation of amounts, on both databases; and `shers insurance` standing alone.

use reqwest::StatusCode;
use serde_json::{Value, json};
use shers::domain::auth::Role;
use shers::persistence::Backend;

use crate::both_backends;
use crate::helpers::{TestApp, api};

both_backends!(coverage_decisions_and_claim_holds, bad_amounts_are_refused);

async fn coverage_decisions_and_claim_holds(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let policy = app
        .create_policy(
            Role::Admin,
            &json!({"patient_id": "p-1", "provider": "NHS", "member_id": "943 476 5919", "coverage_cents": 100_000}),
        )
        .await;
    assert_eq!(policy.status(), StatusCode::CREATED);
    let verify = |incident: &str, patient: &str, amount: i64| {
        let body = json!({"patient_id": patient, "incident_id": incident, "amount_cents": amount});
        let req = app.client.post(app.url(api::INSURANCE_VERIFY)).json(&body);
        async move { req }
    };
    let admin = app.token(Role::Admin).await;
    let send = |req: reqwest::RequestBuilder| {
        let admin = admin.clone();
        async move { req.bearer_auth(admin).send().await.unwrap() }
    };
    // Fully covered: 60,000 of 100,000.
    let full: Value = send(verify("inc-1", "p-1", 60_000).await)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(full["verified"], true);
    assert_eq!(full["coverage_status"], "fully_covered");
    assert_eq!(full["covered_cents"], 60_000);
    assert_eq!(full["patient_due_cents"], 0);
    // Partially covered: 40,000 left for a 70,000 bill.
    let partial: Value = send(verify("inc-2", "p-1", 70_000).await)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(partial["coverage_status"], "partially_covered");
    assert_eq!(partial["covered_cents"], 40_000);
    assert_eq!(partial["patient_due_cents"], 30_000);
    // Verifying the same incident again returns the same decision and holds nothing more.
    let again: Value = send(verify("inc-2", "p-1", 70_000).await)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again, partial);
    let changed = send(verify("inc-2", "p-1", 71_000).await).await;
    assert_eq!(changed.status(), StatusCode::CONFLICT);
    // No policy: the patient pays all.
    let none: Value = send(verify("inc-3", "p-2", 50_000).await)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(none["coverage_status"], "not_covered");
    assert_eq!(none["patient_due_cents"], 50_000);
    // Releasing the partial claim gives its 40,000 back: a new bill is fully covered again.
    let claim = partial["claim_id"].as_str().unwrap();
    let release = send(app.client.post(app.url(&api::release_claim(claim)))).await;
    assert_eq!(release.status(), StatusCode::OK);
    let twice = send(app.client.post(app.url(&api::release_claim(claim)))).await;
    assert_eq!(twice.status(), StatusCode::OK, "release is idempotent");
    let after: Value = send(verify("inc-4", "p-1", 40_000).await)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(after["coverage_status"], "fully_covered");
    let unknown = send(app.client.post(app.url(&api::release_claim("clm_nope")))).await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    // Only admins (service credentials) may call it.
    let resp = app.verify_insurance(Role::Console, &json!({})).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

async fn bad_amounts_are_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for (amount, pointer) in [
        (json!(-5), "/amount_cents"),
        (json!(0), "/amount_cents"),
        (json!("100"), "/amount_cents"),
        (json!(12.5), "/amount_cents"),
        (json!(null), "/amount_cents"),
    ] {
        let resp = app
            .verify_insurance(
                Role::Admin,
                &json!({"patient_id": "p", "incident_id": "i", "amount_cents": amount}),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY, "{amount}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["errors"][0]["pointer"], pointer, "{body}");
    }
}
