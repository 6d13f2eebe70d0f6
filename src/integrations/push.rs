//! Firebase Cloud Messaging HTTP v1: offers pushed to crews' phones when no crew WebSocket of
//! the unit is open.
//!
//! - **Auth**: the service account's RS256-signed JWT (scope `firebase.messaging`, `aud` the
//!   account's `token_uri`, one hour) exchanged at `token_uri` for a bearer token, cached until
//!   five minutes before it expires. Signed with `ring`, which rustls already links: no second
//!   crypto stack and no JWT crate for one signature.
//! - **Message**: data-only (`kind`, `offer_id`, `incident_id`, `reference`, `priority`,
//!   `expires_at`, all strings), Android priority `HIGH` with a TTL of the offer's time left and
//!   a collapse key per incident; APNs priority 10, expiring with the offer, with an alert that
//!   names no patient, for `ios`; Web Push `TTL` and `Urgency: high` for `web`. No patient data.
//! - **Errors**: 404 `UNREGISTERED` (or 400 `INVALID_ARGUMENT` about the token) is
//!   [`PushError::Unregistered`] (the caller deletes the token); 429 and 5xx are
//!   [`PushError::Transient`] with `Retry-After`; a 401 drops the cached token so the next try
//!   signs a new one. The caller retries, never past the offer's expiry.
//!
//! Never logs a token, a key or a message body.

use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::{PushSettings, Secret};
use crate::domain::ids::{IncidentId, OfferId};
use crate::domain::incident::Priority;
use crate::domain::push::{Platform, seconds_left};
use crate::integrations::notify::{form_encode, parse_retry_after};

/// The OAuth scope FCM's send endpoint needs.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// How long a signed assertion is valid (Google's maximum).
const ASSERTION_LIFETIME_S: i64 = 3_600;
/// A cached access token is replaced this long before it expires.
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// Why push could not be set up (start-up refuses to run with push half-configured).
#[derive(Debug, thiserror::Error)]
pub enum PushConfigError {
    /// The credentials file could not be read.
    #[error("push.fcm_credentials_file could not be read: {0}")]
    Read(std::io::Error),
    /// The credentials file is not a service account key.
    #[error("push.fcm_credentials_file is not a service account key: {0}")]
    Parse(String),
    /// No project id in the settings or the file.
    #[error("push.fcm_project_id is not set and the credentials file names no project_id")]
    NoProject,
    /// The HTTP client could not be built.
    #[error("the FCM HTTP client could not be built: {0}")]
    Client(reqwest::Error),
}

/// Why one push failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// FCM no longer knows the token: delete it.
    #[error("the token is not registered")]
    Unregistered,
    /// Worth trying again (429, 5xx, timeouts, connection errors, an expired access token).
    #[error("FCM unavailable: {reason}")]
    Transient {
        /// How long FCM asked us to wait, if it said.
        retry_after: Option<Duration>,
        /// What happened (no token, no body).
        reason: String,
    },
    /// Refused for good (another 4xx, or an access token refused by the token endpoint).
    #[error("FCM refused the message (HTTP {status}): {reason}")]
    Rejected {
        /// The HTTP status (0 when the token exchange failed for good).
        status: u16,
        /// FCM's status name or error text.
        reason: String,
    },
}

impl PushError {
    /// A short, stable name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PushError::Unregistered => "unregistered",
            PushError::Transient { .. } => "transient",
            PushError::Rejected { .. } => "rejected",
        }
    }
}

/// What an offer push says: ids, reference, priority and expiry, never the patient.
#[derive(Clone, Debug, PartialEq)]
pub struct OfferPush {
    /// The offer.
    pub offer_id: OfferId,
    /// Its incident.
    pub incident_id: IncidentId,
    /// The incident's reference (`INC-2026-000042`).
    pub reference: String,
    /// The incident's priority.
    pub priority: Priority,
    /// When the offer lapses.
    pub expires_at: DateTime<Utc>,
}

/// The parts of a service account key SHERS uses.
#[derive(Deserialize)]
struct ServiceAccountFile {
    client_email: String,
    private_key: String,
    token_uri: String,
    #[serde(default)]
    project_id: Option<String>,
}

/// A cached access token and when to stop using it.
struct Cached {
    token: Secret<String>,
    refresh_at: Instant,
}

/// The FCM HTTP v1 client.
pub struct FcmClient {
    http: reqwest::Client,
    send_url: String,
    token_uri: String,
    client_email: String,
    key: RsaKeyPair,
    rng: SystemRandom,
    cached: tokio::sync::Mutex<Option<Cached>>,
}

impl FcmClient {
    /// The client `settings` describe; `None` when push is off (no credentials file).
    pub fn from_settings(settings: &PushSettings) -> Result<Option<Self>, PushConfigError> {
        let Some(path) = &settings.fcm_credentials_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(PushConfigError::Read)?;
        Self::new(&text, settings).map(Some)
    }

    /// The client for the service account key `credentials` (its JSON text).
    pub fn new(credentials: &str, settings: &PushSettings) -> Result<Self, PushConfigError> {
        let file: ServiceAccountFile = serde_json::from_str(credentials)
            .map_err(|e| PushConfigError::Parse(format!("{e}")))?;
        let der = pem_body(&file.private_key)
            .ok_or_else(|| PushConfigError::Parse("private_key is not a PEM key".to_owned()))?;
        let key = RsaKeyPair::from_pkcs8(&der)
            .map_err(|e| PushConfigError::Parse(format!("private_key: {e}")))?;
        let project = settings
            .fcm_project_id
            .clone()
            .or(file.project_id)
            .filter(|p| !p.is_empty())
            .ok_or(PushConfigError::NoProject)?;
        let timeout = Duration::from_millis(settings.timeout_ms.max(1));
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| PushConfigError::Client(e.without_url()))?;
        Ok(Self {
            http,
            send_url: format!(
                "{}/v1/projects/{}/messages:send",
                settings.fcm_base_url.trim_end_matches('/'),
                utf8_percent(&project)
            ),
            token_uri: file.token_uri,
            client_email: file.client_email,
            key,
            rng: SystemRandom::new(),
            cached: tokio::sync::Mutex::new(None),
        })
    }

    /// Pushes `offer` to `token` on `platform`; the message FCM made, on success.
    pub async fn send(
        &self,
        token: &str,
        platform: Platform,
        offer: &OfferPush,
        now: DateTime<Utc>,
    ) -> Result<String, PushError> {
        let bearer = self.access_token(now).await?;
        let body = offer_message(token, platform, offer, now);
        let response = self
            .http
            .post(&self.send_url)
            .header(AUTHORIZATION, format!("Bearer {}", bearer.expose()))
            .json(&body)
            .send()
            .await
            .map_err(|e| transport("send", &e))?;
        let status = response.status();
        let retry_after = parse_retry_after(response.headers(), SystemTime::now());
        let bytes = response.bytes().await.map_err(|e| transport("send", &e))?;
        if status.is_success() {
            #[derive(Deserialize)]
            struct Sent {
                name: String,
            }
            return serde_json::from_slice::<Sent>(&bytes)
                .map(|s| s.name)
                .map_err(|_| PushError::Transient {
                    retry_after: None,
                    reason: "FCM's answer could not be read".to_owned(),
                });
        }
        if status == StatusCode::UNAUTHORIZED {
            // The access token was refused (revoked, or clocks disagree): sign a new one.
            *self.cached.lock().await = None;
        }
        Err(classify(status, retry_after, &bytes))
    }

    /// The cached access token, or a new one from the token endpoint.
    async fn access_token(&self, now: DateTime<Utc>) -> Result<Secret<String>, PushError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref()
            && Instant::now() < c.refresh_at
        {
            return Ok(Secret::new(c.token.expose().clone()));
        }
        let assertion = self.assertion(now)?;
        let form = form_encode(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", &assertion),
        ]);
        let response = self
            .http
            .post(&self.token_uri)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .map_err(|e| transport("token", &e))?;
        let status = response.status();
        let retry_after = parse_retry_after(response.headers(), SystemTime::now());
        let bytes = response.bytes().await.map_err(|e| transport("token", &e))?;
        if !status.is_success() {
            return Err(
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    PushError::Transient {
                        retry_after,
                        reason: format!("token endpoint answered {}", status.as_u16()),
                    }
                } else {
                    PushError::Rejected {
                        status: status.as_u16(),
                        reason: "the token endpoint refused the service account".to_owned(),
                    }
                },
            );
        }
        #[derive(Deserialize)]
        struct Granted {
            access_token: String,
            expires_in: u64,
        }
        let granted: Granted =
            serde_json::from_slice(&bytes).map_err(|_| PushError::Transient {
                retry_after: None,
                reason: "the token endpoint's answer could not be read".to_owned(),
            })?;
        let lifetime = Duration::from_secs(granted.expires_in).saturating_sub(REFRESH_MARGIN);
        *cached = Some(Cached {
            token: Secret::new(granted.access_token.clone()),
            refresh_at: Instant::now() + lifetime,
        });
        Ok(Secret::new(granted.access_token))
    }

    /// The signed JWT the token endpoint exchanges for an access token.
    fn assertion(&self, now: DateTime<Utc>) -> Result<String, PushError> {
        let iat = now.timestamp();
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = json!({
            "iss": self.client_email,
            "scope": FCM_SCOPE,
            "aud": self.token_uri,
            "iat": iat,
            "exp": iat.saturating_add(ASSERTION_LIFETIME_S),
        });
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{claims}");
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &self.rng,
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| PushError::Rejected {
                status: 0,
                reason: "the service account key could not sign".to_owned(),
            })?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }
}

/// The HTTP v1 `messages:send` body for `offer` to `token` on `platform` at `now`.
pub fn offer_message(
    token: &str,
    platform: Platform,
    offer: &OfferPush,
    now: DateTime<Utc>,
) -> Value {
    let left = seconds_left(now, offer.expires_at);
    let expires_at = offer
        .expires_at
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut message = json!({
        "token": token,
        "data": {
            "kind": "dispatch.offer",
            "offer_id": offer.offer_id.to_string(),
            "incident_id": offer.incident_id.to_string(),
            "reference": offer.reference,
            "priority": offer.priority.as_str(),
            "expires_at": expires_at,
        },
        "android": {
            "priority": "HIGH",
            "ttl": format!("{left}s"),
            "collapse_key": format!("offer-{}", offer.incident_id),
        },
    });
    match platform {
        Platform::Android => {}
        Platform::Ios => {
            message["apns"] = json!({
                "headers": {
                    "apns-priority": "10",
                    "apns-expiration": offer.expires_at.timestamp().to_string(),
                    "apns-collapse-id": format!("offer-{}", offer.incident_id),
                },
                "payload": {"aps": {
                    "alert": {
                        "title": "Dispatch offer",
                        "body": format!("{} {} — respond now", offer.priority.as_str(), offer.reference),
                    },
                    "sound": "default",
                }},
            });
        }
        Platform::Web => {
            message["webpush"] = json!({
                "headers": {"TTL": left.to_string(), "Urgency": "high"},
            });
        }
    }
    json!({ "message": message })
}

/// Classifies an FCM error answer.
fn classify(status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> PushError {
    let error: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let error = &error["error"];
    let status_name = error["status"].as_str().unwrap_or_default();
    let details = error["details"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let fcm_code = details
        .iter()
        .find_map(|d| d["errorCode"].as_str())
        .unwrap_or_default();
    let about_token = details.iter().any(|d| {
        d["fieldViolations"].as_array().is_some_and(|v| {
            v.iter()
                .any(|f| f["field"].as_str().is_some_and(|f| f.contains("token")))
        })
    }) || error["message"]
        .as_str()
        .is_some_and(|m| m.contains("registration token"));
    if fcm_code == "UNREGISTERED"
        || (status == StatusCode::NOT_FOUND && status_name == "NOT_FOUND" && fcm_code.is_empty())
        || (status == StatusCode::BAD_REQUEST && status_name == "INVALID_ARGUMENT" && about_token)
    {
        return PushError::Unregistered;
    }
    if status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
        || status == StatusCode::UNAUTHORIZED
        || status == StatusCode::REQUEST_TIMEOUT
    {
        return PushError::Transient {
            retry_after,
            reason: format!(
                "HTTP {} {}",
                status.as_u16(),
                first_of(fcm_code, status_name)
            ),
        };
    }
    PushError::Rejected {
        status: status.as_u16(),
        reason: first_of(fcm_code, status_name).to_owned(),
    }
}

fn first_of<'a>(a: &'a str, b: &'a str) -> &'a str {
    if a.is_empty() { b } else { a }
}

fn transport(op: &str, e: &reqwest::Error) -> PushError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    PushError::Transient {
        retry_after: None,
        reason: format!("FCM {op} call {what}"),
    }
}

/// The DER inside a PEM block (`-----BEGIN PRIVATE KEY-----` …), whatever its line breaks
/// (a JSON key file carries them as `\n`).
fn pem_body(pem: &str) -> Option<Vec<u8>> {
    let start = pem.find("-----BEGIN ")?;
    let body_start = start + pem[start..].find('\n')? + 1;
    let end = body_start + pem[body_start..].find("-----END ")?;
    let b64: String = pem[body_start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    STANDARD.decode(b64).ok()
}

/// A project id as a path segment (ids are `[a-z0-9-]`; anything else is escaped).
fn utf8_percent(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> OfferPush {
        OfferPush {
            offer_id: OfferId(uuid::Uuid::nil()),
            incident_id: IncidentId(uuid::Uuid::nil()),
            reference: "INC-2026-000042".to_owned(),
            priority: Priority::Emergency,
            expires_at: DateTime::from_timestamp(1_800_000_045, 0).unwrap_or_default(),
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
    }

    #[test]
    fn an_android_message_is_data_only_high_priority_and_lives_as_long_as_the_offer() {
        let m = offer_message("tok", Platform::Android, &offer(), now());
        let m = &m["message"];
        assert_eq!(m["token"], "tok");
        assert!(m.get("notification").is_none(), "data-only");
        assert_eq!(m["android"]["priority"], "HIGH");
        assert_eq!(m["android"]["ttl"], "45s");
        assert!(
            m["android"]["collapse_key"]
                .as_str()
                .unwrap_or_default()
                .starts_with("offer-")
        );
        let data = m["data"].as_object().cloned().unwrap_or_default();
        let keys: Vec<&str> = data.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "expires_at",
                "incident_id",
                "kind",
                "offer_id",
                "priority",
                "reference"
            ]
        );
        assert!(
            data.values().all(Value::is_string),
            "FCM data values are strings"
        );
        assert_eq!(data["kind"], "dispatch.offer");
        assert!(m.get("apns").is_none() && m.get("webpush").is_none());
    }

    #[test]
    fn ios_and_web_get_their_own_blocks() {
        let ios = offer_message("tok", Platform::Ios, &offer(), now());
        assert_eq!(ios["message"]["apns"]["headers"]["apns-priority"], "10");
        assert_eq!(
            ios["message"]["apns"]["headers"]["apns-expiration"],
            "1800000045"
        );
        let web = offer_message("tok", Platform::Web, &offer(), now());
        assert_eq!(web["message"]["webpush"]["headers"]["TTL"], "45");
        assert_eq!(web["message"]["webpush"]["headers"]["Urgency"], "high");
    }

    #[test]
    fn errors_are_classified_as_fcm_documents_them() {
        let unregistered = br#"{"error":{"code":404,"status":"NOT_FOUND","message":"Requested entity was not found.","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
        assert_eq!(
            classify(StatusCode::NOT_FOUND, None, unregistered),
            PushError::Unregistered
        );
        let bad_token = br#"{"error":{"code":400,"status":"INVALID_ARGUMENT","message":"The registration token is not a valid FCM registration token","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"}]}}"#;
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, None, bad_token),
            PushError::Unregistered
        );
        let bad_ttl = br#"{"error":{"code":400,"status":"INVALID_ARGUMENT","message":"Invalid value at 'message.android.ttl'","details":[{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.android.ttl"}]}]}}"#;
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, None, bad_ttl).kind(),
            "rejected"
        );
        let wait = Some(Duration::from_secs(2));
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, wait, b"{}"),
            PushError::Transient {
                retry_after: wait,
                reason: "HTTP 429 ".to_owned()
            }
        );
        assert_eq!(
            classify(StatusCode::SERVICE_UNAVAILABLE, None, b"not json").kind(),
            "transient"
        );
        assert_eq!(
            classify(StatusCode::FORBIDDEN, None, b"{}").kind(),
            "rejected"
        );
    }

    #[test]
    fn pem_bodies_are_read_whatever_the_line_breaks() {
        let pem = "-----BEGIN PRIVATE KEY-----\nAAEC\nAwQ=\n-----END PRIVATE KEY-----\n";
        assert_eq!(pem_body(pem), Some(vec![0, 1, 2, 3, 4]));
        assert_eq!(pem_body("no key"), None);
    }

    #[test]
    fn a_key_that_is_not_rsa_pkcs8_is_refused_at_start() {
        let file = json!({"client_email": "a@b", "token_uri": "http://127.0.0.1:1/token",
            "project_id": "p", "private_key": "-----BEGIN PRIVATE KEY-----\nAAEC\n-----END PRIVATE KEY-----\n"});
        let e = FcmClient::new(&file.to_string(), &PushSettings::default()).err();
        assert!(matches!(e, Some(PushConfigError::Parse(_))), "{e:?}");
    }
}
