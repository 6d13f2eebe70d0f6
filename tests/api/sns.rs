//! Amazon SNS next-of-kin messages against moto's server, a real SNS (and IAM)
//! implementation: each test starts a private `moto_server` on a free port with signature
//! checking on, makes an IAM user and key in it, points SHERS at it, runs an emergency and
//! reads what moto received from `GET /moto-api/data.json` (`sns.SMS` for texts,
//! `sns.Topic[].sent_notifications` for topic messages).
//!
//! `moto_server` comes from `SHERS_TEST_MOTO_SERVER` (scripts/test.sh sets it), the CI tools
//! environment (`target/ci-tools/venv`, made by .ci/run) or the `PATH`. Without it the tests
//! skip with a message, outside CI; in CI they fail.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};
use shers::config::Secret;
use shers::domain::auth::Role;
use shers::integrations::notify::form_encode;
use shers::integrations::sigv4;
use shers::persistence::Backend;
use shers_test_support::{FakeHttp, Nth};

use crate::both_backends;
use crate::helpers::{TestApp, eventually};

both_backends!(
    sns_sends_next_of_kin_texts_as_transactional_sms,
    sns_publishes_once_per_incident_and_template_to_the_topic,
    a_topic_that_does_not_exist_fails_the_notification_at_once,
    a_wrong_secret_is_refused_by_the_signature_check_and_not_retried,
    throttling_and_a_503_are_retried_until_sns_accepts,
);

const REGION: &str = "us-east-1";
const PHONE: &str = "+447700900123";

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// `moto_server`: `SHERS_TEST_MOTO_SERVER`, the CI tools environment, or the `PATH`.
fn moto_server() -> Option<PathBuf> {
    if let Some(given) = std::env::var_os("SHERS_TEST_MOTO_SERVER") {
        return Some(PathBuf::from(given));
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let ci_venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-tools/venv/bin");
    std::iter::once(ci_venv)
        .chain(on_path)
        .map(|dir| dir.join("moto_server"))
        .find(|p| p.is_file())
}

/// A signed Query API call (`POST /`); the status and the XML answer.
async fn aws_call(
    url: &str,
    service: &str,
    (key_id, secret): (&str, &str),
    params: &[(&str, &str)],
) -> (u16, String) {
    let body = form_encode(params);
    let host = url.trim_start_matches("http://").trim_end_matches('/');
    let now = Utc::now();
    let date = sigv4::amz_date(now);
    let content_type = "application/x-www-form-urlencoded; charset=utf-8";
    let headers = [
        ("content-type", content_type),
        ("host", host),
        ("x-amz-date", date.as_str()),
    ];
    let signer = sigv4::Signer {
        access_key_id: key_id,
        secret_access_key: secret,
        region: REGION,
        service,
    };
    let authorization = sigv4::authorization(
        &signer,
        &sigv4::Request {
            method: "POST",
            path: "/",
            query: &[],
            headers: &headers,
            body: body.as_bytes(),
        },
        now,
    );
    let resp = reqwest::Client::new()
        .post(format!("{url}/"))
        .header("content-type", content_type)
        .header("x-amz-date", &date)
        .header("authorization", authorization)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// The text of the first `<tag>` in `xml`.
fn xml(xml: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("no <{tag}> in {xml}"))
        + open.len();
    let end = start + xml[start..].find(&format!("</{tag}>")).unwrap();
    xml[start..end].trim().to_owned()
}

/// A moto server of this test's own, checking signatures, with an IAM user allowed
/// everything whose keys SHERS signs with. Killed on drop.
struct Moto {
    child: Child,
    url: String,
    key_id: String,
    secret: String,
}

impl Moto {
    /// `None` (after a message) when moto_server is not installed, outside CI.
    async fn start() -> Option<Self> {
        shers_test_support::install_crypto();
        let Some(binary) = moto_server() else {
            assert!(
                !ci(),
                "CI=true and moto_server is not installed (pip install 'moto[server]')"
            );
            eprintln!(
                "SKIPPED: SNS test, moto_server is not installed (pip install 'moto[server]')"
            );
            return None;
        };
        let port = shers_test_support::free_port();
        let child = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            // The first three calls (the IAM set-up below) go unauthenticated; every later one
            // must carry a valid signature of a known key.
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", binary.display()));
        let url = format!("http://127.0.0.1:{port}");
        let mut moto = Self {
            child,
            url,
            key_id: String::new(),
            secret: String::new(),
        };
        let state = format!("{}/moto-api/data.json", moto.url);
        eventually("moto_server listening", || async {
            reqwest::get(&state).await.ok().map(|_| ())
        })
        .await;
        let anyone = ("AKIDSETUP", "setup");
        let iam = |params: Vec<(&'static str, String)>| {
            let url = moto.url.clone();
            async move {
                let mut pairs: Vec<(&str, &str)> = vec![("Version", "2010-05-08")];
                pairs.extend(params.iter().map(|(k, v)| (*k, v.as_str())));
                let (status, body) = aws_call(&url, "iam", anyone, &pairs).await;
                assert_eq!(status, 200, "{body}");
                body
            }
        };
        iam(vec![
            ("Action", "CreateUser".into()),
            ("UserName", "shers".into()),
        ])
        .await;
        let key = iam(vec![
            ("Action", "CreateAccessKey".into()),
            ("UserName", "shers".into()),
        ])
        .await;
        let policy = json!({"Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]});
        iam(vec![
            ("Action", "PutUserPolicy".into()),
            ("UserName", "shers".into()),
            ("PolicyName", "all".into()),
            ("PolicyDocument", policy.to_string()),
        ])
        .await;
        moto.key_id = xml(&key, "AccessKeyId");
        moto.secret = xml(&key, "SecretAccessKey");
        Some(moto)
    }

    /// Creates a topic (a signed call: the key works) and returns its ARN.
    async fn create_topic(&self, name: &str) -> String {
        let (status, body) = aws_call(
            &self.url,
            "sns",
            (&self.key_id, &self.secret),
            &[
                ("Action", "CreateTopic"),
                ("Version", "2010-03-31"),
                ("Name", name),
            ],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        xml(&body, "TopicArn")
    }

    /// moto's SNS state.
    async fn sns_state(&self) -> Value {
        let all: Value = reqwest::get(format!("{}/moto-api/data.json", self.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        all["sns"].clone()
    }

    /// SHERS' SNS settings for this server.
    fn configure(&self, s: &mut shers::config::Settings, base_url: &str, topic: Option<&str>) {
        s.notify.sns_region = Some(REGION.to_owned());
        s.notify.sns_access_key_id = Some(self.key_id.clone());
        s.notify.sns_secret_access_key = Some(Secret::new(self.secret.clone()));
        s.notify.sns_base_url = Some(base_url.to_owned());
        s.notify.sns_topic_arn = topic.map(str::to_owned);
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A patient with one next of kin, a fall with abnormal vitals (an emergency); the incident.
async fn emergency(app: &TestApp) -> String {
    app.register_wearer("p-1", "w1").await;
    let ts =
        (Utc::now() - chrono::Duration::seconds(30)).to_rfc3339_opts(SecondsFormat::Millis, true);
    let body: Value = app
        .post_vitals(&json!({"device_id": "w1", "timestamp": ts, "fall_detected": true, "heart_rate_bpm": 160}))
        .await
        .json()
        .await
        .unwrap();
    body["results"][0]["incident_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The incident's notification on `channel` once it is no longer queued.
async fn settled(app: &TestApp, incident: &str, channel: &str) -> Value {
    eventually("the notification settled", || async {
        let detail: Value = app
            .incident(incident, Role::Console)
            .await
            .json()
            .await
            .unwrap();
        detail["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["channel"] == channel && n["status"] != "queued")
            .cloned()
    })
    .await
}

async fn sns_sends_next_of_kin_texts_as_transactional_sms(backend: Backend) {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let app = TestApp::builder(backend)
        .with_settings(|s| moto.configure(s, &moto.url, None))
        .start()
        .await;
    let incident = emergency(&app).await;
    let note = settled(&app, &incident, "sms").await;
    assert_eq!(note["status"], "sent", "{note}");
    assert_eq!(note["attempts"], 1, "{note}");
    let sms = moto.sns_state().await["SMS"].clone();
    let sms = sms.as_array().unwrap();
    assert_eq!(sms.len(), 1, "{sms:?}");
    assert_eq!(sms[0]["phone_number"], PHONE);
    let text = sms[0]["message"].as_str().unwrap();
    assert!(
        text.contains("INC-"),
        "the text names the reference: {text}"
    );
    assert_eq!(app.events_of("notification.sent").await.len(), 1);
}

async fn sns_publishes_once_per_incident_and_template_to_the_topic(backend: Backend) {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let topic = moto.create_topic("next-of-kin").await;
    let app = TestApp::builder(backend)
        .with_settings(|s| moto.configure(s, &moto.url, Some(&topic)))
        .start()
        .await;
    let incident = emergency(&app).await;
    let note = settled(&app, &incident, "sns").await;
    assert_eq!(note["status"], "sent", "{note}");
    assert_eq!(note["template"], "incident_created");
    // The next of kin's phone is not texted by SNS in topic mode (no SMS provider here).
    let state = moto.sns_state().await;
    assert_eq!(state["SMS"], json!([]), "{state}");
    let topics = state["Topic"].as_array().unwrap();
    let ours = topics.iter().find(|t| t["arn"] == topic.as_str()).unwrap();
    // [message id, message, subject, attributes, group id]
    let sent = ours["sent_notifications"].as_array().unwrap();
    assert_eq!(sent.len(), 1, "one per incident and template: {sent:?}");
    assert!(sent[0][1].as_str().unwrap().contains("INC-"), "{sent:?}");
    assert_eq!(
        sent[0][3]["patient_id"],
        json!({"Type": "String", "Value": "p-1"})
    );
}

async fn a_topic_that_does_not_exist_fails_the_notification_at_once(backend: Backend) {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let missing = format!("arn:aws:sns:{REGION}:123456789012:no-such-topic");
    let app = TestApp::builder(backend)
        .with_settings(|s| moto.configure(s, &moto.url, Some(&missing)))
        .start()
        .await;
    let incident = emergency(&app).await;
    let note = settled(&app, &incident, "sns").await;
    assert_eq!(note["status"], "failed", "{note}");
    assert_eq!(note["attempts"], 1, "a 4xx is not retried: {note}");
    let error = note["last_error"].as_str().unwrap();
    assert!(
        error.contains("HTTP 404") && error.contains("NotFound"),
        "{error}"
    );
    assert_eq!(app.events_of("notification.failed").await.len(), 1);
}

async fn a_wrong_secret_is_refused_by_the_signature_check_and_not_retried(backend: Backend) {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let app = TestApp::builder(backend)
        .with_settings(|s| {
            moto.configure(s, &moto.url, None);
            s.notify.sns_secret_access_key = Some(Secret::new("not-the-secret".into()));
        })
        .start()
        .await;
    let incident = emergency(&app).await;
    let note = settled(&app, &incident, "sms").await;
    assert_eq!(note["status"], "failed", "{note}");
    assert_eq!(note["attempts"], 1, "{note}");
    let error = note["last_error"].as_str().unwrap();
    assert!(error.contains("SignatureDoesNotMatch"), "{error}");
    assert_eq!(moto.sns_state().await["SMS"], json!([]));
}

/// The front's upstream (moto).
struct Front {
    moto: String,
}

/// Answers the first call with a 503 and the second with a `Throttling` error (both with
/// `Retry-After: 1`), then relays calls to moto unchanged (the `Host` too: it is signed).
async fn front(
    front: web::Data<Front>,
    Nth(n): Nth,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let error = |code: &str| {
        format!(
            "<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code>\
             <Message>slow down</Message></Error><RequestId>r</RequestId></ErrorResponse>"
        )
    };
    match n {
        0 => HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "1"))
            .body(error("ServiceUnavailable")),
        1 => HttpResponse::BadRequest()
            .insert_header(("Retry-After", "1"))
            .body(error("Throttling")),
        _ => {
            let mut relay = reqwest::Client::new().post(format!("{}/", front.moto));
            for name in ["host", "content-type", "x-amz-date", "authorization"] {
                if let Some(v) = req.headers().get(name) {
                    relay = relay.header(name, v.as_bytes());
                }
            }
            let resp = relay.body(body).send().await.unwrap();
            let status = actix_web::http::StatusCode::from_u16(resp.status().as_u16()).unwrap();
            HttpResponse::build(status).body(resp.bytes().await.unwrap())
        }
    }
}

async fn throttling_and_a_503_are_retried_until_sns_accepts(backend: Backend) {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let relay = FakeHttp::start(
        Front {
            moto: moto.url.clone(),
        },
        |cfg| {
            cfg.route("/", web::post().to(front));
        },
    );
    let app = TestApp::builder(backend)
        .with_settings(|s| moto.configure(s, relay.url(), None))
        .start()
        .await;
    let incident = emergency(&app).await;
    let note = settled(&app, &incident, "sms").await;
    assert_eq!(note["status"], "sent", "{note}");
    assert_eq!(
        note["attempts"], 3,
        "a 503, a Throttling, then accepted: {note}"
    );
    assert_eq!(relay.count(), 3);
    let sms = moto.sns_state().await["SMS"].clone();
    assert_eq!(sms.as_array().unwrap().len(), 1, "{sms}");
    assert_eq!(sms[0]["phone_number"], PHONE);
    // The retries signed the same body.
    let sent = relay.requests();
    assert_eq!(sent[0].text(), sent[2].text());
    assert!(sent[2].text().contains("AWS.SNS.SMS.SMSType"));
    assert!(sent[2].text().contains("Transactional"));
}
