//! Next-of-kin notifications: the outbox worker delivers over a real HTTP client to a local
//! fake Twilio, honours `Retry-After`, records the outcome on the incident, and never drops an
//! alert whose reading had no vital signs.

use actix_web::{HttpResponse, web};
use chrono::{Duration, SecondsFormat, Utc};
use serde_json::{Value, json};
use shers::domain::auth::Role;
use shers::persistence::Backend;
use shers_test_support::{FakeHttp, Nth};

use crate::both_backends;
use crate::helpers::TestApp;

both_backends!(next_of_kin_get_an_sms_even_without_vitals);

/// How the fake Twilio answers (its journal keeps the requests).
struct Fake {
    fail_first_with_429: bool,
}

async fn send_message(fake: web::Data<Fake>, Nth(n): Nth) -> HttpResponse {
    if fake.fail_first_with_429 && n == 0 {
        return HttpResponse::TooManyRequests()
            .insert_header(("Retry-After", "1"))
            .finish();
    }
    HttpResponse::Created().json(json!({"sid": format!("SM{n:032}"), "status": "queued"}))
}

fn fake_twilio(fail_first_with_429: bool) -> FakeHttp<Fake> {
    FakeHttp::start(
        Fake {
            fail_first_with_429,
        },
        |cfg| {
            cfg.route(
                "/2010-04-01/Accounts/{sid}/Messages.json",
                web::post().to(send_message),
            );
        },
    )
}

async fn next_of_kin_get_an_sms_even_without_vitals(backend: Backend) {
    let twilio = fake_twilio(true);
    let app = TestApp::builder(backend)
        .with_settings(|s| {
            s.notify.sms_base_url = Some(twilio.url().to_owned());
            s.notify.sms_account_sid = Some("AC123".into());
            s.notify.sms_auth_token = Some(shers::config::Secret::new("tok".into()));
            s.notify.sms_from = Some("+15550000000".into());
        })
        .start()
        .await;
    app.register_wearer("p-1", "w1").await;
    // A fall with no vital signs at all, and abnormal vitals right after: emergency.
    let ts = (Utc::now() - Duration::seconds(30)).to_rfc3339_opts(SecondsFormat::Millis, true);
    let body: Value = app
        .post_vitals(&json!({"device_id": "w1", "timestamp": ts, "fall_detected": true, "heart_rate_bpm": 160}))
        .await
        .json()
        .await
        .unwrap();
    let incident = body["results"][0]["incident_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The worker retries after the 429's Retry-After and then delivers.
    let detail: Value = crate::helpers::eventually("the SMS delivered", || async {
        let detail: Value = app
            .incident(&incident, Role::Console)
            .await
            .json()
            .await
            .unwrap();
        (detail["notifications"][0]["status"] == "sent").then_some(detail)
    })
    .await;
    let note = &detail["notifications"][0];
    assert_eq!(note["status"], "sent", "{detail}");
    assert_eq!(note["attempts"], 2, "one 429, then delivered");
    assert_eq!(twilio.count(), 2);
    let sent = twilio.requests();
    let sent_body = sent[1].text();
    assert!(sent_body.contains("To=%2B447700900123"), "{sent_body}");
    assert!(sent_body.contains("From=%2B15550000000"), "{sent_body}");
    assert!(
        sent_body.contains("INC-"),
        "the message names the incident reference: {sent_body}"
    );
    assert!(
        sent[0]
            .header("authorization")
            .unwrap_or("")
            .starts_with("Basic ")
    );
    // The idempotency key is the same on the retry, and a hash: it is logged and sent in a
    // header, so it must not carry the next of kin's phone number.
    let keys: Vec<&str> = sent
        .iter()
        .map(|r| r.header("i-twilio-idempotency-token").unwrap_or(""))
        .collect();
    assert_eq!(keys[0], keys[1]);
    assert!(keys[0].starts_with("incident_created-"), "{keys:?}");
    assert!(!keys[0].contains("7700900123"), "{keys:?}");
    assert_eq!(app.events_of("notification.sent").await.len(), 1);
}
