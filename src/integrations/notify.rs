//! Notification delivery adapters: SMS through a Twilio-compatible API, email over SMTP, a
//! signed JSON webhook, and a log-only sink for demos.
//!
//! - [`Notifier`] is the port the outbox worker calls: one [`Outgoing`] message in, the
//!   provider's message id or a [`DeliveryError`] out. It returns a boxed future so the worker
//!   can hold `Arc<dyn Notifier>` per channel.
//! - [`DeliveryError`] says only whether to retry ([`DeliveryError::Transient`], possibly with
//!   the provider's `Retry-After`) or to give up ([`DeliveryError::Permanent`]); the schedule
//!   itself is [`crate::domain::notify::backoff`].
//! - [`TwilioSms`], [`SmtpEmail`] and [`SignedWebhook`] are real clients whose base URL comes
//!   from configuration, so tests point them at local fakes. Each passes the message's
//!   idempotency key to the provider (Twilio idempotency token, SMTP `Message-ID`,
//!   `X-Shers-Idempotency-Key`), which makes at-least-once delivery safe to retry.
//! - [`LogOnlyNotifier`] delivers nothing and logs that it did so.
//!
//! Messages are patient data. Nothing here logs or puts into an error a recipient address,
//! a subject, a body or a secret: only the notification id (the idempotency key, a hash),
//! the incident id, the channel, the template and an error kind or provider status code.
//! Provider error texts are dropped because they often echo the recipient's address.

use std::fmt::{self, Write as _};
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use hmac::digest::{Key, KeyInit};
use hmac::{Hmac, Mac};
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::AsyncSmtpTransportBuilder;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Secret;
pub use crate::domain::notify::Channel;
use crate::integrations::sigv4;

/// The future returned by [`Notifier::send`]: the provider's message id on success.
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<String, DeliveryError>> + Send + 'a>>;

/// A delivery channel's client.
pub trait Notifier: Send + Sync {
    /// Delivers `msg` once. Safe to call again with the same message after a
    /// [`DeliveryError::Transient`]: the idempotency key travels with every attempt.
    fn send<'a>(&'a self, msg: &'a Outgoing) -> SendFuture<'a>;

    /// A short, stable name of the provider (`twilio`, `smtp`, `webhook`, `sns`, `log`), for
    /// metrics and logs.
    fn provider(&self) -> &'static str;
}

/// Why a delivery failed. Reasons carry status codes and error kinds, never addresses or
/// message content.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// Worth retrying later (rate limit, provider outage, timeout, connection failure).
    #[error("transient delivery failure: {reason}")]
    Transient {
        /// How long the provider asked us to wait, if it said.
        retry_after: Option<Duration>,
        /// What happened, for logs and the outbox row.
        reason: String,
    },
    /// Retrying cannot help (invalid recipient, rejected request, wrong credentials).
    #[error("permanent delivery failure: {reason}")]
    Permanent {
        /// What happened, for logs and the outbox row.
        reason: String,
    },
}

impl DeliveryError {
    fn transient(reason: impl Into<String>) -> Self {
        DeliveryError::Transient {
            retry_after: None,
            reason: reason.into(),
        }
    }

    fn permanent(reason: impl Into<String>) -> Self {
        DeliveryError::Permanent {
            reason: reason.into(),
        }
    }

    /// Whether the delivery should be retried.
    pub fn is_transient(&self) -> bool {
        matches!(self, DeliveryError::Transient { .. })
    }

    /// The provider's requested delay, for [`crate::domain::notify::backoff`].
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DeliveryError::Transient { retry_after, .. } => *retry_after,
            DeliveryError::Permanent { .. } => None,
        }
    }

    /// The reason text (free of addresses and content).
    pub fn reason(&self) -> &str {
        match self {
            DeliveryError::Transient { reason, .. } | DeliveryError::Permanent { reason } => reason,
        }
    }

    /// `"transient"` or `"permanent"`, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DeliveryError::Transient { .. } => "transient",
            DeliveryError::Permanent { .. } => "permanent",
        }
    }
}

/// Why an adapter could not be built from its configuration. Messages carry no secrets.
#[derive(Debug, thiserror::Error)]
pub enum NotifierConfigError {
    /// The base or webhook URL is not an absolute http(s) URL.
    #[error("invalid notification URL")]
    InvalidUrl,
    /// The Twilio account SID is empty or not alphanumeric.
    #[error("invalid account SID")]
    InvalidAccountSid,
    /// The SMTP URL could not be parsed (its text is not repeated: it may hold a password).
    #[error("invalid SMTP URL")]
    InvalidSmtpUrl,
    /// The sender is not a valid email address.
    #[error("invalid sender address")]
    InvalidFrom,
    /// An SNS region, access key id or secret is empty or malformed.
    #[error("invalid SNS region or credentials")]
    InvalidSnsCredentials,
    /// The webhook signing secret is empty.
    #[error("empty webhook secret")]
    EmptySecret,
    /// The HTTP client could not be built.
    #[error("could not build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// One message for one recipient on one channel, as stored in the outbox.
#[derive(Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Which channel; an adapter refuses messages for another channel.
    pub channel: Channel,
    /// Phone number (E.164) for SMS, email address for email; ignored by the webhook, whose
    /// URL is configured.
    pub to: String,
    /// Email subject (ignored for SMS).
    pub subject: String,
    /// The text: the rendered SMS for [`Channel::Sms`], the email body otherwise.
    pub body: String,
    /// [`crate::domain::notify::idempotency_key`]; also the notification's id in logs.
    pub idempotency_key: String,
    /// The incident the message is about.
    pub incident_id: String,
    /// The template's wire name.
    pub template: String,
    /// The incident's patient, when known (the SNS topic's `patient_id` message attribute).
    pub patient_id: Option<String>,
}

impl fmt::Debug for Outgoing {
    /// Ids only: the address, subject and body are patient data.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outgoing")
            .field("channel", &self.channel)
            .field("idempotency_key", &self.idempotency_key)
            .field("incident_id", &self.incident_id)
            .field("template", &self.template)
            .finish_non_exhaustive()
    }
}

/// The longest `Retry-After` we accept from a provider; longer values are clamped.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Parses `Retry-After` as delay-seconds or an HTTP-date relative to `now`, clamped to
/// [`MAX_RETRY_AFTER`]. A date in the past means "now" (zero).
pub fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let delay = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
        let now = chrono::DateTime::<chrono::Utc>::from(now);
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// Classifies a non-2xx HTTP status: 408, 429 and 5xx are transient (with the provider's
/// `Retry-After`), every other status is permanent. `detail` is appended to the reason.
fn status_error(
    service: &str,
    status: StatusCode,
    headers: &HeaderMap,
    detail: &str,
) -> DeliveryError {
    let reason = format!("{service} answered HTTP {}{detail}", status.as_u16());
    if status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
    {
        DeliveryError::Transient {
            retry_after: parse_retry_after(headers, SystemTime::now()),
            reason,
        }
    } else {
        DeliveryError::Permanent { reason }
    }
}

/// Maps a reqwest error (sending or reading the body) to a transient failure, without its URL.
fn transport_error(service: &str, e: &reqwest::Error) -> DeliveryError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "response body failed"
    } else {
        "request failed"
    };
    DeliveryError::transient(format!("{service} {what}"))
}

fn check_channel(adapter: Channel, msg: &Outgoing) -> Result<(), DeliveryError> {
    if msg.channel == adapter {
        Ok(())
    } else {
        Err(DeliveryError::permanent(format!(
            "{} message given to the {} adapter",
            msg.channel.as_str(),
            adapter.as_str()
        )))
    }
}

/// Logs the outcome of one attempt: ids, channel, template, error kind and reason only.
fn log_outcome(msg: &Outgoing, result: &Result<String, DeliveryError>) {
    match result {
        Ok(_) => tracing::debug!(
            notification.id = %msg.idempotency_key,
            incident.id = %msg.incident_id,
            channel = msg.channel.as_str(),
            template = %msg.template,
            "notification delivered"
        ),
        Err(e) => tracing::warn!(
            notification.id = %msg.idempotency_key,
            incident.id = %msg.incident_id,
            channel = msg.channel.as_str(),
            template = %msg.template,
            error.kind = e.kind(),
            error.reason = e.reason(),
            retry_after_s = e.retry_after().map(|d| d.as_secs()),
            "notification delivery failed"
        ),
    }
}

/// A base URL without its trailing slash, checked to be absolute http(s).
fn checked_base(url: &str) -> Result<String, NotifierConfigError> {
    let url = url.trim_end_matches('/').to_owned();
    let parsed = reqwest::Url::parse(&url).map_err(|_| NotifierConfigError::InvalidUrl)?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.cannot_be_a_base() {
        return Err(NotifierConfigError::InvalidUrl);
    }
    Ok(url)
}

fn http_client(timeout: Duration) -> Result<reqwest::Client, NotifierConfigError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .map_err(|e| NotifierConfigError::Client(e.without_url()))
}

/// `application/x-www-form-urlencoded` encoding of `pairs` (WHATWG: alphanumerics and `*-._`
/// as-is, space as `+`, every other byte of the UTF-8 as `%XX`).
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    fn encode(out: &mut String, s: &str) {
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                    out.push(char::from(b));
                }
                b' ' => out.push('+'),
                _ => {
                    let _ = write!(out, "%{b:02X}");
                }
            }
        }
    }
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode(&mut out, k);
        out.push('=');
        encode(&mut out, v);
    }
    out
}

// ---- SMS -------------------------------------------------------------------------------

/// SMS through a Twilio-compatible Messages API.
pub struct TwilioSms {
    client: reqwest::Client,
    messages_url: String,
    account_sid: String,
    auth_token: Secret<String>,
    from: String,
}

impl fmt::Debug for TwilioSms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TwilioSms")
            .field("messages_url", &self.messages_url)
            .field("auth_token", &self.auth_token)
            .finish_non_exhaustive()
    }
}

/// The part of a Twilio answer we read: `sid` on success, `code` on error (its `message`
/// is ignored: it quotes the phone number).
#[derive(Deserialize)]
struct TwilioResponse {
    sid: Option<String>,
    code: Option<u32>,
}

/// The header carrying the idempotency key to Twilio.
pub const TWILIO_IDEMPOTENCY_HEADER: &str = "I-Twilio-Idempotency-Token";

impl TwilioSms {
    /// A client for `POST {base_url}/2010-04-01/Accounts/{account_sid}/Messages.json`
    /// (e.g. base `https://api.twilio.com`), authenticating with `account_sid:auth_token`,
    /// sending from the number `from`, each call limited to `timeout` (connect included).
    ///
    /// A rustls crypto provider must be installed first (`app` and the CLI do it).
    pub fn new(
        base_url: &str,
        account_sid: &str,
        auth_token: &str,
        from: &str,
        timeout: Duration,
    ) -> Result<Self, NotifierConfigError> {
        let base = checked_base(base_url)?;
        if account_sid.is_empty() || !account_sid.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(NotifierConfigError::InvalidAccountSid);
        }
        Ok(Self {
            client: http_client(timeout)?,
            messages_url: format!("{base}/2010-04-01/Accounts/{account_sid}/Messages.json"),
            account_sid: account_sid.to_owned(),
            auth_token: Secret::new(auth_token.to_owned()),
            from: from.to_owned(),
        })
    }

    async fn deliver(&self, msg: &Outgoing) -> Result<String, DeliveryError> {
        check_channel(Channel::Sms, msg)?;
        let form = form_encode(&[("To", &msg.to), ("From", &self.from), ("Body", &msg.body)]);
        let response = self
            .client
            .post(&self.messages_url)
            .basic_auth(&self.account_sid, Some(self.auth_token.expose()))
            .header(TWILIO_IDEMPOTENCY_HEADER, &msg.idempotency_key)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(reqwest::header::ACCEPT, "application/json")
            .body(form)
            .send()
            .await
            .map_err(|e| transport_error("twilio", &e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| transport_error("twilio", &e))?;
        let parsed = serde_json::from_slice::<TwilioResponse>(&body).ok();
        if !status.is_success() {
            let detail = match parsed.and_then(|r| r.code) {
                Some(code) => format!(" (error code {code})"),
                None => String::new(),
            };
            return Err(status_error("twilio", status, &headers, &detail));
        }
        match parsed.and_then(|r| r.sid) {
            Some(sid) if !sid.is_empty() => Ok(sid),
            // Accepted but unreadable: a retry carries the same idempotency token, so Twilio
            // will not send the text twice.
            _ => Err(DeliveryError::transient(format!(
                "twilio answered HTTP {} without a message sid",
                status.as_u16()
            ))),
        }
    }
}

impl Notifier for TwilioSms {
    fn send<'a>(&'a self, msg: &'a Outgoing) -> SendFuture<'a> {
        Box::pin(async move {
            let result = self.deliver(msg).await;
            log_outcome(msg, &result);
            result
        })
    }
    fn provider(&self) -> &'static str {
        "twilio"
    }
}

// ---- email -----------------------------------------------------------------------------

/// Email over SMTP with lettre.
///
/// The transport is built on first use, inside the caller's tokio runtime: lettre's pooled
/// transport spawns a task when built, which panics outside a runtime (stack pitfall 16).
pub struct SmtpEmail {
    builder: AsyncSmtpTransportBuilder,
    transport: OnceLock<AsyncSmtpTransport<Tokio1Executor>>,
    from: Mailbox,
}

impl fmt::Debug for SmtpEmail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold credentials and the builder shows them: print neither.
        f.debug_struct("SmtpEmail")
            .field("built", &self.transport.get().is_some())
            .finish_non_exhaustive()
    }
}

impl SmtpEmail {
    /// A client for `smtp_url` (lettre's URL syntax: `smtps://user:pass@host:465`,
    /// `smtp://host:587?tls=required`, or plain `smtp://host:port`, unencrypted, for local
    /// relays and tests), sending as `from` (`"SHERS <noreply@example.org>"`). Nothing is
    /// connected or spawned here, so this may run outside a runtime.
    pub fn new(smtp_url: &str, from: &str) -> Result<Self, NotifierConfigError> {
        let builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(smtp_url)
            .map_err(|_| NotifierConfigError::InvalidSmtpUrl)?;
        let from = from
            .parse::<Mailbox>()
            .map_err(|_| NotifierConfigError::InvalidFrom)?;
        Ok(Self {
            builder,
            transport: OnceLock::new(),
            from,
        })
    }

    /// Limits each SMTP command to `timeout` (lettre's default is 60 s).
    pub fn with_timeout(self, timeout: Duration) -> Self {
        Self {
            builder: self.builder.timeout(Some(timeout)),
            transport: OnceLock::new(),
            from: self.from,
        }
    }

    /// `<key@sender-domain>`: the same notification always has the same Message-ID, so a
    /// receiving system can drop a duplicate of a retried delivery. Keys that are not a valid
    /// dot-atom are replaced by their SHA-256.
    fn message_id(&self, key: &str) -> String {
        let atom_safe = !key.is_empty()
            && !key.starts_with('.')
            && !key.ends_with('.')
            && !key.contains("..")
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.=+".contains(c));
        let left = if atom_safe {
            key.to_owned()
        } else {
            Sha256::digest(key.as_bytes())
                .iter()
                .fold(String::with_capacity(64), |mut s, b| {
                    let _ = write!(s, "{b:02x}");
                    s
                })
        };
        format!("<{left}@{}>", self.from.email.domain())
    }

    async fn deliver(&self, msg: &Outgoing) -> Result<String, DeliveryError> {
        check_channel(Channel::Email, msg)?;
        let to = msg
            .to
            .parse::<Mailbox>()
            .map_err(|_| DeliveryError::permanent("invalid recipient address"))?;
        let message_id = self.message_id(&msg.idempotency_key);
        let email = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(msg.subject.as_str())
            .message_id(Some(message_id.clone()))
            .header(ContentType::TEXT_PLAIN)
            .body(msg.body.clone())
            .map_err(|_| DeliveryError::permanent("could not build the email"))?;
        let transport = self
            .transport
            .get_or_init(|| self.builder.clone().build::<Tokio1Executor>());
        match transport.send(email).await {
            Ok(_) => Ok(message_id),
            Err(e) => Err(smtp_error(&e)),
        }
    }
}

/// Maps a lettre error: 4xx replies are transient, 5xx permanent, anything on the way
/// (connection, TLS, timeout, garbled reply) transient. Only the reply code is kept: the
/// reply text often quotes the address.
fn smtp_error(e: &lettre::transport::smtp::Error) -> DeliveryError {
    let code = e.status().map(|c| c.to_string());
    if e.is_permanent() {
        DeliveryError::permanent(format!("smtp answered {}", code.unwrap_or_default()))
    } else if e.is_transient() {
        DeliveryError::transient(format!("smtp answered {}", code.unwrap_or_default()))
    } else if e.is_timeout() {
        DeliveryError::transient("smtp timed out")
    } else if e.is_tls() {
        DeliveryError::transient("smtp tls failed")
    } else if e.is_response() {
        DeliveryError::transient("smtp reply unreadable")
    } else if e.is_client() {
        DeliveryError::transient("smtp client error")
    } else {
        DeliveryError::transient("smtp connection failed")
    }
}

impl Notifier for SmtpEmail {
    fn send<'a>(&'a self, msg: &'a Outgoing) -> SendFuture<'a> {
        Box::pin(async move {
            let result = self.deliver(msg).await;
            log_outcome(msg, &result);
            result
        })
    }
    fn provider(&self) -> &'static str {
        "smtp"
    }
}

// ---- webhook ---------------------------------------------------------------------------

type HmacSha256 = Hmac<Sha256>;

/// The signature header: `sha256=<hex HMAC-SHA256 of the raw body>`.
pub const SIGNATURE_HEADER: &str = "X-Shers-Signature";
/// The idempotency header: the notification's key, the same on every retry.
pub const IDEMPOTENCY_HEADER: &str = "X-Shers-Idempotency-Key";

/// The signature header value for `body`: `"sha256=" + hex(HMAC-SHA256(secret, body))`.
/// Receivers recompute it over the raw body bytes and compare in constant time.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // RFC 2104 key preparation done here so construction is infallible: keys longer than the
    // block are hashed, then zero-padded to the 64-byte block.
    let mut block = [0u8; 64];
    if secret.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(secret));
    } else {
        block[..secret.len()].copy_from_slice(secret);
    }
    let mut mac = <HmacSha256 as KeyInit>::new(&Key::<HmacSha256>::from(block));
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A signed JSON POST to a fixed URL (a hospital's or insurer's intake endpoint).
pub struct SignedWebhook {
    client: reqwest::Client,
    url: String,
    secret: Secret<Vec<u8>>,
}

impl fmt::Debug for SignedWebhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedWebhook")
            .field("url", &self.url)
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

/// The webhook's JSON body.
#[derive(Serialize)]
struct WebhookPayload<'a> {
    incident_id: &'a str,
    template: &'a str,
    channel: &'static str,
    subject: &'a str,
    body: &'a str,
    idempotency_key: &'a str,
}

/// The part of a webhook answer we read (optional).
#[derive(Deserialize)]
struct WebhookResponse {
    id: Option<String>,
}

impl SignedWebhook {
    /// A client posting to `url`, signing with `secret` (non-empty), each call limited to
    /// `timeout` (connect included).
    ///
    /// A rustls crypto provider must be installed first (`app` and the CLI do it).
    pub fn new(url: &str, secret: &[u8], timeout: Duration) -> Result<Self, NotifierConfigError> {
        if secret.is_empty() {
            return Err(NotifierConfigError::EmptySecret);
        }
        Ok(Self {
            client: http_client(timeout)?,
            url: checked_base(url)?,
            secret: Secret::new(secret.to_vec()),
        })
    }

    async fn deliver(&self, msg: &Outgoing) -> Result<String, DeliveryError> {
        check_channel(Channel::Webhook, msg)?;
        let payload = serde_json::to_vec(&WebhookPayload {
            incident_id: &msg.incident_id,
            template: &msg.template,
            channel: Channel::Webhook.as_str(),
            subject: &msg.subject,
            body: &msg.body,
            idempotency_key: &msg.idempotency_key,
        })
        .map_err(|_| DeliveryError::permanent("could not serialize the webhook body"))?;
        let signature = sign(self.secret.expose(), &payload);
        let response = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .header(IDEMPOTENCY_HEADER, &msg.idempotency_key)
            .body(payload)
            .send()
            .await
            .map_err(|e| transport_error("webhook", &e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(status_error("webhook", status, response.headers(), ""));
        }
        // The receiver's id if it gives one, else our key (it identifies the delivery).
        let body = response.bytes().await.unwrap_or_default();
        Ok(serde_json::from_slice::<WebhookResponse>(&body)
            .ok()
            .and_then(|r| r.id)
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| msg.idempotency_key.clone()))
    }
}

impl Notifier for SignedWebhook {
    fn send<'a>(&'a self, msg: &'a Outgoing) -> SendFuture<'a> {
        Box::pin(async move {
            let result = self.deliver(msg).await;
            log_outcome(msg, &result);
            result
        })
    }
    fn provider(&self) -> &'static str {
        "webhook"
    }
}

// ---- Amazon SNS ------------------------------------------------------------------------

/// The Query API version SHERS speaks.
pub const SNS_API_VERSION: &str = "2010-03-31";
/// The `Content-Type` of a Query API request (signed, so it must be sent exactly so).
const SNS_CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";
/// Error codes AWS answers when it sheds load; retried even though they come with a 400.
const SNS_THROTTLING_CODES: [&str; 4] = [
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
];

/// Where an [`AmazonSns`] publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnsTarget {
    /// An SMS to each message's phone number (`PhoneNumber`), `Transactional`: the provider
    /// of the `sms` channel.
    Sms,
    /// One message per incident and template to this topic, with the `patient_id` message
    /// attribute: the provider of the `sns` channel.
    Topic(String),
}

/// Amazon SNS through its Query API (`POST /`, `Action=Publish`), signed with AWS Signature
/// Version 4 ([`crate::integrations::sigv4`]).
///
/// SNS has no idempotency token for standard topics and SMS: a retry after an answer that was
/// lost on the way may publish twice (at-least-once, like every channel here).
pub struct AmazonSns {
    client: reqwest::Client,
    url: String,
    host: String,
    region: String,
    access_key_id: String,
    secret_access_key: Secret<String>,
    target: SnsTarget,
}

impl fmt::Debug for AmazonSns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmazonSns")
            .field("url", &self.url)
            .field("region", &self.region)
            .field("target", &self.target)
            .field("secret_access_key", &self.secret_access_key)
            .finish_non_exhaustive()
    }
}

/// The text of the first `<tag>…</tag>` in `xml` (the Query API's answers are flat enough
/// that this needs no XML parser), entity-decoded for the five predefined entities.
fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)?.checked_add(open.len())?;
    let len = xml.get(start..)?.find(&close)?;
    let raw = xml.get(start..start.checked_add(len)?)?.trim();
    Some(
        raw.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

impl AmazonSns {
    /// The public endpoint of `region`: `https://sns.<region>.amazonaws.com`.
    pub fn default_base_url(region: &str) -> String {
        format!("https://sns.{region}.amazonaws.com")
    }

    /// A client for the SNS Query API at `base_url` (e.g. [`AmazonSns::default_base_url`]),
    /// signing for `region` with the given keys, publishing to `target`, each call limited to
    /// `timeout` (connect included).
    ///
    /// A rustls crypto provider must be installed first (`app` and the CLI do it).
    pub fn new(
        base_url: &str,
        region: &str,
        access_key_id: &str,
        secret_access_key: &str,
        target: SnsTarget,
        timeout: Duration,
    ) -> Result<Self, NotifierConfigError> {
        let base = checked_base(base_url)?;
        let parsed = reqwest::Url::parse(&base).map_err(|_| NotifierConfigError::InvalidUrl)?;
        let host = match (parsed.host_str(), parsed.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => return Err(NotifierConfigError::InvalidUrl),
        };
        let token_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !token_ok(region) || !token_ok(access_key_id) || secret_access_key.is_empty() {
            return Err(NotifierConfigError::InvalidSnsCredentials);
        }
        if matches!(&target, SnsTarget::Topic(arn) if !arn.starts_with("arn:")) {
            return Err(NotifierConfigError::InvalidSnsCredentials);
        }
        Ok(Self {
            client: http_client(timeout)?,
            url: format!("{base}/"),
            host,
            region: region.to_owned(),
            access_key_id: access_key_id.to_owned(),
            secret_access_key: Secret::new(secret_access_key.to_owned()),
            target,
        })
    }

    /// The form body publishing `msg` (patient data: never logged).
    pub fn publish_body(&self, msg: &Outgoing) -> Result<String, DeliveryError> {
        let mut pairs: Vec<(&str, &str)> =
            vec![("Action", "Publish"), ("Version", SNS_API_VERSION)];
        match &self.target {
            SnsTarget::Sms => {
                check_channel(Channel::Sms, msg)?;
                if msg.to.is_empty() {
                    return Err(DeliveryError::permanent("no phone number"));
                }
                pairs.extend([
                    ("PhoneNumber", msg.to.as_str()),
                    ("Message", msg.body.as_str()),
                    ("MessageAttributes.entry.1.Name", "AWS.SNS.SMS.SMSType"),
                    ("MessageAttributes.entry.1.Value.DataType", "String"),
                    (
                        "MessageAttributes.entry.1.Value.StringValue",
                        "Transactional",
                    ),
                ]);
            }
            SnsTarget::Topic(arn) => {
                check_channel(Channel::Sns, msg)?;
                pairs.extend([("TopicArn", arn.as_str()), ("Message", msg.body.as_str())]);
                if !msg.subject.is_empty() {
                    pairs.push(("Subject", msg.subject.as_str()));
                }
                if let Some(pid) = msg.patient_id.as_deref().filter(|p| !p.is_empty()) {
                    pairs.extend([
                        ("MessageAttributes.entry.1.Name", "patient_id"),
                        ("MessageAttributes.entry.1.Value.DataType", "String"),
                        ("MessageAttributes.entry.1.Value.StringValue", pid),
                    ]);
                }
            }
        }
        Ok(form_encode(&pairs))
    }

    async fn deliver(&self, msg: &Outgoing) -> Result<String, DeliveryError> {
        let body = self.publish_body(msg)?;
        let now = chrono::Utc::now();
        let amz_date = sigv4::amz_date(now);
        let signer = sigv4::Signer {
            access_key_id: &self.access_key_id,
            secret_access_key: self.secret_access_key.expose(),
            region: &self.region,
            service: "sns",
        };
        let signed = [
            ("content-type", SNS_CONTENT_TYPE),
            ("host", self.host.as_str()),
            ("x-amz-date", amz_date.as_str()),
        ];
        let authorization = sigv4::authorization(
            &signer,
            &sigv4::Request {
                method: "POST",
                path: "/",
                query: &[],
                headers: &signed,
                body: body.as_bytes(),
            },
            now,
        );
        let response = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, SNS_CONTENT_TYPE)
            .header("x-amz-date", &amz_date)
            .header(reqwest::header::AUTHORIZATION, authorization)
            .body(body)
            .send()
            .await
            .map_err(|e| transport_error("sns", &e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response
            .text()
            .await
            .map_err(|e| transport_error("sns", &e))?;
        if status.is_success() {
            return match xml_text(&text, "MessageId") {
                Some(id) if !id.is_empty() => Ok(id),
                // Perhaps published: retried rather than lost (a duplicate beats no message).
                _ => Err(DeliveryError::transient(format!(
                    "sns answered HTTP {} without a MessageId",
                    status.as_u16()
                ))),
            };
        }
        // The code only: the error's `Message` may quote the phone number.
        let code = xml_text(&text, "Code").filter(|c| {
            !c.is_empty()
                && c.len() <= 64
                && c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '.')
        });
        let detail = code
            .as_deref()
            .map(|c| format!(" ({c})"))
            .unwrap_or_default();
        if code
            .as_deref()
            .is_some_and(|c| SNS_THROTTLING_CODES.contains(&c))
        {
            return Err(DeliveryError::Transient {
                retry_after: parse_retry_after(&headers, SystemTime::now()),
                reason: format!("sns answered HTTP {}{detail}", status.as_u16()),
            });
        }
        Err(status_error("sns", status, &headers, &detail))
    }
}

impl Notifier for AmazonSns {
    fn send<'a>(&'a self, msg: &'a Outgoing) -> SendFuture<'a> {
        Box::pin(async move {
            let result = self.deliver(msg).await;
            log_outcome(msg, &result);
            result
        })
    }

    fn provider(&self) -> &'static str {
        "sns"
    }
}

// ---- demo sink -------------------------------------------------------------------------

/// A sink for demos and development: logs that a notification would have gone out (ids,
/// channel and template only) and reports success as `logged-<key>`.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogOnlyNotifier;

impl Notifier for LogOnlyNotifier {
    fn send<'a>(&'a self, msg: &'a Outgoing) -> SendFuture<'a> {
        Box::pin(async move {
            tracing::info!(
                notification.id = %msg.idempotency_key,
                incident.id = %msg.incident_id,
                channel = msg.channel.as_str(),
                template = %msg.template,
                "notification logged, not sent (log-only notifier)"
            );
            Ok(format!("logged-{}", msg.idempotency_key))
        })
    }
    fn provider(&self) -> &'static str {
        "log"
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use actix_web::{HttpRequest, HttpResponse, web};
    use serde_json::json;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};
    use tracing::instrument::WithSubscriber;

    use super::*;
    use shers_test_support::{FakeHttp, Recorded, free_port, header, install_crypto};

    const PHONE: &str = "+15551234567";
    const EMAIL: &str = "jane.doe@example.org";
    const KEY: &str = "unit_assigned-0a1b2c3d";

    fn outgoing(channel: Channel, to: &str) -> Outgoing {
        Outgoing {
            channel,
            to: to.to_owned(),
            subject: "Ambulance on its way (ref INC-1)".to_owned(),
            body: "Hello,\n\nAmbulance A12 is on its way to Jane Doe.\n\nReference: INC-1\n"
                .to_owned(),
            idempotency_key: KEY.to_owned(),
            incident_id: "0190a1b2-0000-7000-8000-000000000001".to_owned(),
            template: "unit_assigned".to_owned(),
            patient_id: Some("p-1".to_owned()),
        }
    }

    fn sns(target: SnsTarget) -> AmazonSns {
        AmazonSns::new(
            "https://sns.us-east-1.amazonaws.com",
            "us-east-1",
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            target,
            Duration::from_secs(5),
        )
        .unwrap()
    }

    #[test]
    fn an_sns_sms_publish_is_the_body_the_signer_is_pinned_on() {
        // The body of sigv4's botocore vector `an_sms_publish_signs_as_botocore_signs_it`.
        let mut msg = outgoing(Channel::Sms, "+447700900123");
        msg.body = "Help is on its way. Ref INC-1".to_owned();
        assert_eq!(
            sns(SnsTarget::Sms).publish_body(&msg).unwrap(),
            "Action=Publish&Version=2010-03-31&PhoneNumber=%2B447700900123&\
             Message=Help+is+on+its+way.+Ref+INC-1&\
             MessageAttributes.entry.1.Name=AWS.SNS.SMS.SMSType&\
             MessageAttributes.entry.1.Value.DataType=String&\
             MessageAttributes.entry.1.Value.StringValue=Transactional"
        );
        assert!(
            sns(SnsTarget::Sms)
                .publish_body(&outgoing(Channel::Email, "a@b.c"))
                .is_err()
        );
    }

    #[test]
    fn an_sns_topic_publish_carries_the_patient_id_attribute() {
        let arn = "arn:aws:sns:us-east-1:123456789012:next-of-kin";
        let body = sns(SnsTarget::Topic(arn.to_owned()))
            .publish_body(&outgoing(Channel::Sns, arn))
            .unwrap();
        assert!(body.starts_with(
            "Action=Publish&Version=2010-03-31&\
             TopicArn=arn%3Aaws%3Asns%3Aus-east-1%3A123456789012%3Anext-of-kin&Message="
        ));
        assert!(body.ends_with(
            "&MessageAttributes.entry.1.Name=patient_id&\
             MessageAttributes.entry.1.Value.DataType=String&\
             MessageAttributes.entry.1.Value.StringValue=p-1"
        ));
        assert!(!body.contains("PhoneNumber"));
    }

    #[test]
    fn sns_answers_are_read_without_an_xml_parser() {
        let ok = "<PublishResponse xmlns=\"http://sns.amazonaws.com/doc/2010-03-31/\">\
                  <PublishResult><MessageId>abc-1</MessageId></PublishResult></PublishResponse>";
        assert_eq!(xml_text(ok, "MessageId").as_deref(), Some("abc-1"));
        let err = "<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code>\
                   <Message>Rate exceeded &amp; more</Message></Error></ErrorResponse>";
        assert_eq!(xml_text(err, "Code").as_deref(), Some("Throttling"));
        assert_eq!(
            xml_text(err, "Message").as_deref(),
            Some("Rate exceeded & more")
        );
        assert_eq!(xml_text(err, "MessageId"), None);
        assert_eq!(xml_text("<Code>unterminated", "Code"), None);
    }

    #[test]
    fn sns_refuses_bad_configuration() {
        let build = |base: &str, region: &str, key: &str, secret: &str, target: SnsTarget| {
            AmazonSns::new(base, region, key, secret, target, Duration::from_secs(1)).is_ok()
        };
        let base = "https://sns.eu-west-1.amazonaws.com";
        assert!(build(base, "eu-west-1", "AKID", "s", SnsTarget::Sms));
        assert!(!build("ftp://x", "eu-west-1", "AKID", "s", SnsTarget::Sms));
        assert!(!build(base, "", "AKID", "s", SnsTarget::Sms));
        assert!(!build(base, "eu west", "AKID", "s", SnsTarget::Sms));
        assert!(!build(base, "eu-west-1", "AKID", "", SnsTarget::Sms));
        assert!(!build(
            base,
            "eu-west-1",
            "AKID",
            "s",
            SnsTarget::Topic("x".into())
        ));
        let debug = format!("{:?}", sns(SnsTarget::Sms));
        assert!(!debug.contains("EXAMPLEKEY"), "{debug}");
    }

    /// Reasons must never carry the address or the content.
    fn assert_no_phi(e: &DeliveryError) {
        let text = format!("{e} {e:?}");
        for secret in [
            PHONE,
            "5551234567",
            EMAIL,
            "jane",
            "Jane",
            "A12",
            "tok3n",
            "INC-1",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }

    /// Collects formatted log output of one future.
    #[derive(Clone, Default)]
    struct LogCapture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for LogCapture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl LogCapture {
        fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
            let sink = self.clone();
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(move || sink.clone())
                .finish()
        }

        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    // ---- pure helpers ----------------------------------------------------------------

    #[test]
    fn sign_matches_rfc_4231() {
        // Test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        assert_eq!(
            sign(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            ),
            "sha256=60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        // And agrees with the hmac crate's own key handling at every boundary.
        for len in [0, 1, 31, 32, 63, 64, 65, 200] {
            let key = vec![0x5a_u8; len];
            let mut mac = <HmacSha256 as Mac>::new_from_slice(&key).unwrap();
            mac.update(b"{\"a\":1}");
            let hex: String = mac
                .finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(sign(&key, b"{\"a\":1}"), format!("sha256={hex}"), "{len}");
        }
    }

    #[test]
    fn form_encoding_follows_whatwg() {
        assert_eq!(
            form_encode(&[("To", "+1 555"), ("Body", "a&b=c 100% é\n🚑*-._~")]),
            "To=%2B1+555&Body=a%26b%3Dc+100%25+%C3%A9%0A%F0%9F%9A%91*-._%7E"
        );
        assert_eq!(form_encode(&[]), "");
        assert_eq!(form_encode(&[("k", "")]), "k=");
    }

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let headers = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, v.parse().unwrap());
            h
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 2015-10-21 07:28:00 UTC
        assert_eq!(
            parse_retry_after(&headers("3"), now),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            parse_retry_after(&headers(" 120 "), now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after(&headers("Wed, 21 Oct 2015 07:28:30 GMT"), now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after(&headers("Wed, 21 Oct 2015 07:00:00 GMT"), now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after(&headers("99999999999"), now),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(parse_retry_after(&headers("soon"), now), None);
        assert_eq!(parse_retry_after(&headers("-1"), now), None);
        assert_eq!(parse_retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn debug_output_hides_secrets_and_content() {
        install_crypto();
        let twilio = TwilioSms::new(
            "http://127.0.0.1:1",
            "AC123",
            "tok3n",
            "+15550000000",
            Duration::from_secs(1),
        )
        .unwrap();
        assert!(!format!("{twilio:?}").contains("tok3n"));
        let hook = SignedWebhook::new("http://127.0.0.1:1/hook", b"s3cret", Duration::from_secs(1))
            .unwrap();
        assert!(!format!("{hook:?}").contains("s3cret"));
        // Built outside any runtime: nothing is spawned until the first send.
        let smtp = SmtpEmail::new(
            "smtp://user:hunter2@127.0.0.1:2525",
            "SHERS <noreply@shers.example>",
        )
        .unwrap();
        assert!(!format!("{smtp:?}").contains("hunter2"));
        let msg = outgoing(Channel::Email, EMAIL);
        let text = format!("{msg:?}");
        assert!(text.contains(KEY));
        assert!(!text.contains(EMAIL) && !text.contains("Jane") && !text.contains("Ambulance"));
    }

    #[test]
    fn configuration_is_checked() {
        install_crypto();
        let t = Duration::from_secs(1);
        for bad in ["not a url", "ftp://twilio", ""] {
            assert!(matches!(
                TwilioSms::new(bad, "AC1", "x", "+1", t),
                Err(NotifierConfigError::InvalidUrl)
            ));
            assert!(matches!(
                SignedWebhook::new(bad, b"k", t),
                Err(NotifierConfigError::InvalidUrl)
            ));
        }
        for bad in ["", "AC1/../x", "AC 1"] {
            assert!(matches!(
                TwilioSms::new("http://twilio", bad, "x", "+1", t),
                Err(NotifierConfigError::InvalidAccountSid)
            ));
        }
        assert!(matches!(
            SignedWebhook::new("http://hook", b"", t),
            Err(NotifierConfigError::EmptySecret)
        ));
        assert!(matches!(
            SmtpEmail::new("http://mail", "a@b.c"),
            Err(NotifierConfigError::InvalidSmtpUrl)
        ));
        assert!(matches!(
            SmtpEmail::new("smtp://127.0.0.1:25", "not an address"),
            Err(NotifierConfigError::InvalidFrom)
        ));
        let smtp = SmtpEmail::new("smtp://127.0.0.1:25", "noreply@shers.example").unwrap();
        assert_eq!(
            smtp.message_id("unit_assigned-00ff"),
            "<unit_assigned-00ff@shers.example>"
        );
        // Not a dot-atom: hashed.
        let id = smtp.message_id("a b@c");
        assert!(id.starts_with('<') && id.ends_with("@shers.example>"));
        assert_eq!(id.len(), 1 + 64 + "@shers.example>".len());
    }

    #[actix_web::test]
    async fn log_only_notifier_logs_ids_but_no_content() {
        let logs = LogCapture::default();
        let msg = outgoing(Channel::Sms, PHONE);
        let id = LogOnlyNotifier
            .send(&msg)
            .with_subscriber(logs.subscriber())
            .await
            .unwrap();
        assert_eq!(id, format!("logged-{KEY}"));
        let text = logs.text();
        assert!(text.contains(KEY) && text.contains("sms") && text.contains("unit_assigned"));
        assert!(
            !text.contains("5551234567") && !text.contains("Jane"),
            "{text}"
        );
    }

    // ---- a real local fake Twilio ----------------------------------------------------

    /// The fake Twilio: no state of its own, its journal keeps the requests.
    struct FakeTwilio;

    /// `/{mode}/2010-04-01/Accounts/{sid}/Messages.json`: the first segment picks the answer.
    /// The `web::Form` argument refuses a body that is not a form (a 400 the test would see).
    async fn twilio_messages(
        req: HttpRequest,
        _form: web::Form<HashMap<String, String>>,
    ) -> HttpResponse {
        match req.match_info().get("mode").unwrap_or_default() {
            "ok" => HttpResponse::Created().json(json!({
                "sid": "SM0123456789abcdef", "status": "queued"
            })),
            "busy" => HttpResponse::TooManyRequests()
                .insert_header(("Retry-After", "3"))
                .json(json!({"code": 20429, "message": "Too Many Requests", "status": 429})),
            "down" => HttpResponse::InternalServerError().body("upstream exploded"),
            "bad" => HttpResponse::BadRequest().json(json!({
                "code": 21211,
                "message": format!("The 'To' number {PHONE} is not a valid phone number."),
                "status": 400
            })),
            "unauthorized" => HttpResponse::Unauthorized().json(json!({
                "code": 20003, "message": "Authenticate", "status": 401
            })),
            "nosid" => HttpResponse::Created().body("<html>ok</html>"),
            _ => HttpResponse::NotFound().finish(),
        }
    }

    /// The fake Twilio or the webhook receiver, with the adapter built against it.
    struct Fake<S: 'static>(FakeHttp<S>);

    impl<S> std::ops::Deref for Fake<S> {
        type Target = FakeHttp<S>;

        fn deref(&self) -> &Self::Target {
            &self.0
        }
    }

    impl<S> Fake<S> {
        async fn stop(self) {
            self.0.stop().await;
        }
    }

    impl Fake<FakeTwilio> {
        async fn start() -> Self {
            Self(FakeHttp::start(FakeTwilio, |cfg| {
                cfg.route(
                    "/{mode}/2010-04-01/Accounts/{sid}/Messages.json",
                    web::post().to(twilio_messages),
                );
            }))
        }

        fn twilio(&self, mode: &str, timeout: Duration) -> TwilioSms {
            TwilioSms::new(
                &format!("{}/{mode}/", self.url()),
                "AC123",
                "tok3n",
                "+15550000000",
                timeout,
            )
            .unwrap()
        }
    }

    #[actix_web::test]
    async fn twilio_posts_the_form_with_basic_auth_and_idempotency_token() {
        let fake = Fake::<FakeTwilio>::start().await;
        let twilio = fake.twilio("ok", Duration::from_secs(2));
        let mut msg = outgoing(Channel::Sms, PHONE);
        msg.body = "SHERS ref INC-1: ambulance A12 is on its way & 100% = 🚑 +1".to_owned();
        assert_eq!(twilio.send(&msg).await.unwrap(), "SM0123456789abcdef");

        let seen = fake.requests();
        assert_eq!(seen.len(), 1);
        let req = &seen[0];
        assert_eq!(req.path, "/ok/2010-04-01/Accounts/AC123/Messages.json");
        assert_eq!(
            req.header("authorization"),
            Some("Basic QUMxMjM6dG9rM24=") // base64("AC123:tok3n")
        );
        assert_eq!(req.header(TWILIO_IDEMPOTENCY_HEADER), Some(KEY));
        let form = req.form();
        assert_eq!(form.len(), 3);
        assert_eq!(form["To"], PHONE);
        assert_eq!(form["From"], "+15550000000");
        assert_eq!(form["Body"], msg.body);

        // A retry carries the same token.
        twilio.send(&msg).await.unwrap();
        let seen = fake.requests();
        assert_eq!(
            seen[1].header(TWILIO_IDEMPOTENCY_HEADER),
            seen[0].header(TWILIO_IDEMPOTENCY_HEADER)
        );
        fake.stop().await;
    }

    #[actix_web::test]
    async fn twilio_errors_are_classified() {
        let fake = Fake::<FakeTwilio>::start().await;
        let msg = outgoing(Channel::Sms, PHONE);
        let err = |mode: &'static str| {
            let twilio = fake.twilio(mode, Duration::from_secs(2));
            let msg = msg.clone();
            async move { twilio.send(&msg).await.unwrap_err() }
        };

        let e = err("busy").await;
        assert_eq!(
            e,
            DeliveryError::Transient {
                retry_after: Some(Duration::from_secs(3)),
                reason: "twilio answered HTTP 429 (error code 20429)".to_owned()
            }
        );
        let e = err("down").await;
        assert_eq!(
            e,
            DeliveryError::Transient {
                retry_after: None,
                reason: "twilio answered HTTP 500".to_owned()
            }
        );
        let e = err("bad").await;
        assert_eq!(
            e,
            DeliveryError::Permanent {
                reason: "twilio answered HTTP 400 (error code 21211)".to_owned()
            }
        );
        assert_no_phi(&e);
        assert!(!err("unauthorized").await.is_transient());
        // 201 without a sid: retried (the idempotency token prevents a double send).
        assert!(err("nosid").await.is_transient());
        assert!(!err("nowhere").await.is_transient());
        assert_eq!(fake.count(), 6);

        // A message for another channel never reaches the provider.
        let twilio = fake.twilio("ok", Duration::from_secs(2));
        let e = twilio
            .send(&outgoing(Channel::Email, EMAIL))
            .await
            .unwrap_err();
        assert_eq!(
            e,
            DeliveryError::Permanent {
                reason: "email message given to the sms adapter".to_owned()
            }
        );
        assert_eq!(fake.count(), 6);
        fake.stop().await;
    }

    #[actix_web::test]
    async fn twilio_timeout_is_transient() {
        let fake = Fake::<FakeTwilio>::start().await;
        // Every answer is held for as long as the fake lives: only the client's own timeout
        // can end the call.
        fake.hold(usize::MAX);
        let twilio = fake.twilio("ok", Duration::from_millis(200));
        let e = twilio
            .send(&outgoing(Channel::Sms, PHONE))
            .await
            .unwrap_err();
        assert_eq!(
            e,
            DeliveryError::Transient {
                retry_after: None,
                reason: "twilio timed out".to_owned()
            }
        );
        fake.stop().await;
    }

    #[actix_web::test]
    async fn twilio_connection_refused_is_transient_and_logged_without_phi() {
        install_crypto();
        let twilio = TwilioSms::new(
            &format!("http://127.0.0.1:{}", free_port()),
            "AC123",
            "tok3n",
            "+15550000000",
            Duration::from_secs(2),
        )
        .unwrap();
        let logs = LogCapture::default();
        let e = twilio
            .send(&outgoing(Channel::Sms, PHONE))
            .with_subscriber(logs.subscriber())
            .await
            .unwrap_err();
        assert_eq!(
            e,
            DeliveryError::Transient {
                retry_after: None,
                reason: "twilio connection failed".to_owned()
            }
        );
        let text = logs.text();
        assert!(text.contains("notification delivery failed") && text.contains(KEY));
        for secret in ["5551234567", "Jane", "A12", "tok3n"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }

    // ---- a real local fake SMTP server -----------------------------------------------

    /// How the fake answers `RCPT TO`.
    #[derive(Clone, Copy, Debug)]
    enum Rcpt {
        Accept,
        TryLater,
        NoSuchUser,
    }

    /// One accepted mail transaction.
    #[derive(Clone, Debug, Default)]
    struct Mail {
        mail_from: String,
        rcpt_to: Vec<String>,
        data: String,
    }

    /// A line-based SMTP server, just enough for lettre: greeting, EHLO, MAIL, RCPT, DATA
    /// (with dot-unstuffing), RSET, NOOP, QUIT.
    struct FakeSmtp {
        addr: SocketAddr,
        mails: Arc<Mutex<Vec<Mail>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl FakeSmtp {
        async fn start(rcpt: Rcpt) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mails = Arc::new(Mutex::new(Vec::new()));
            let sink = mails.clone();
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(smtp_session(stream, rcpt, sink.clone()));
                }
            });
            Self { addr, mails, task }
        }

        fn email(&self) -> SmtpEmail {
            SmtpEmail::new(
                &format!("smtp://{}", self.addr),
                "SHERS Dispatch <noreply@shers.example>",
            )
            .unwrap()
            .with_timeout(Duration::from_secs(5))
        }

        fn mails(&self) -> Vec<Mail> {
            self.mails.lock().unwrap().clone()
        }
    }

    impl Drop for FakeSmtp {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn smtp_session(stream: TcpStream, rcpt: Rcpt, mails: Arc<Mutex<Vec<Mail>>>) {
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        let mut line = String::new();
        let mut mail = Mail::default();
        if write
            .write_all(b"220 fake.test ESMTP ready\r\n")
            .await
            .is_err()
        {
            return;
        }
        loop {
            line.clear();
            if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let command = line.trim_end().to_owned();
            let upper = command.to_ascii_uppercase();
            let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
                b"250-fake.test greets you\r\n250 8BITMIME\r\n"
            } else if upper.starts_with("MAIL FROM:") {
                mail = Mail {
                    mail_from: command["MAIL FROM:".len()..].to_owned(),
                    ..Mail::default()
                };
                b"250 2.1.0 sender ok\r\n"
            } else if upper.starts_with("RCPT TO:") {
                match rcpt {
                    Rcpt::Accept => {
                        mail.rcpt_to.push(command["RCPT TO:".len()..].to_owned());
                        b"250 2.1.5 recipient ok\r\n"
                    }
                    Rcpt::TryLater => b"451 4.3.0 try later\r\n",
                    Rcpt::NoSuchUser => b"550 5.1.1 no such user\r\n",
                }
            } else if upper == "DATA" {
                if write
                    .write_all(b"354 end data with <CR><LF>.<CR><LF>\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                loop {
                    line.clear();
                    if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if line == ".\r\n" {
                        break;
                    }
                    let unstuffed = line.strip_prefix('.').unwrap_or(&line);
                    mail.data.push_str(unstuffed);
                }
                mails.lock().unwrap().push(std::mem::take(&mut mail));
                b"250 2.0.0 queued as FAKE1\r\n"
            } else if upper == "RSET" || upper == "NOOP" {
                b"250 2.0.0 ok\r\n"
            } else if upper == "QUIT" {
                let _ = write.write_all(b"221 2.0.0 bye\r\n").await;
                return;
            } else {
                b"502 5.5.2 command not recognized\r\n"
            };
            if write.write_all(reply).await.is_err() {
                return;
            }
        }
    }

    #[actix_web::test]
    async fn smtp_delivers_subject_body_and_message_id() {
        let fake = FakeSmtp::start(Rcpt::Accept).await;
        let email = fake.email();
        let msg = outgoing(Channel::Email, &format!("Jane Doe <{EMAIL}>"));
        let id = email.send(&msg).await.unwrap();
        assert_eq!(id, format!("<{KEY}@shers.example>"));

        let mails = fake.mails();
        assert_eq!(mails.len(), 1);
        let mail = &mails[0];
        assert!(
            mail.mail_from.starts_with("<noreply@shers.example>"),
            "{mail:?}"
        );
        assert_eq!(mail.rcpt_to, [format!("<{EMAIL}>")]);
        let data = mail.data.replace("\r\n", "\n");
        assert!(
            data.contains("Subject: Ambulance on its way (ref INC-1)\n"),
            "{data}"
        );
        assert!(
            data.contains(&format!("Message-ID: <{KEY}@shers.example>\n")),
            "{data}"
        );
        assert!(
            data.contains("From: \"SHERS Dispatch\" <noreply@shers.example>\n"),
            "{data}"
        );
        assert!(data.contains("Content-Type: text/plain"), "{data}");
        assert!(
            data.contains("Hello,\n\nAmbulance A12 is on its way to Jane Doe.\n\nReference: INC-1"),
            "{data}"
        );

        // The transport is reused for the next message.
        email.send(&msg).await.unwrap();
        assert_eq!(fake.mails().len(), 2);
    }

    #[actix_web::test]
    async fn smtp_4xx_is_transient_and_5xx_permanent() {
        let msg = outgoing(Channel::Email, EMAIL);

        let fake = FakeSmtp::start(Rcpt::TryLater).await;
        let e = fake.email().send(&msg).await.unwrap_err();
        assert_eq!(
            e,
            DeliveryError::Transient {
                retry_after: None,
                reason: "smtp answered 451".to_owned()
            }
        );
        assert!(fake.mails().is_empty());

        let fake = FakeSmtp::start(Rcpt::NoSuchUser).await;
        let logs = LogCapture::default();
        let e = fake
            .email()
            .send(&msg)
            .with_subscriber(logs.subscriber())
            .await
            .unwrap_err();
        assert_eq!(
            e,
            DeliveryError::Permanent {
                reason: "smtp answered 550".to_owned()
            }
        );
        assert_no_phi(&e);
        assert!(fake.mails().is_empty());
        let text = logs.text();
        assert!(text.contains("permanent") && text.contains(KEY), "{text}");
        assert!(!text.contains("jane") && !text.contains("Jane"), "{text}");
    }

    #[actix_web::test]
    async fn smtp_connection_failure_is_transient_and_bad_recipient_permanent() {
        let email = SmtpEmail::new(
            &format!("smtp://127.0.0.1:{}", free_port()),
            "noreply@shers.example",
        )
        .unwrap();
        let e = email
            .send(&outgoing(Channel::Email, EMAIL))
            .await
            .unwrap_err();
        assert_eq!(
            e,
            DeliveryError::Transient {
                retry_after: None,
                reason: "smtp connection failed".to_owned()
            }
        );
        let e = email
            .send(&outgoing(Channel::Email, "jane at example"))
            .await
            .unwrap_err();
        assert_eq!(
            e,
            DeliveryError::Permanent {
                reason: "invalid recipient address".to_owned()
            }
        );
        assert!(
            !email
                .send(&outgoing(Channel::Sms, PHONE))
                .await
                .unwrap_err()
                .is_transient()
        );
    }

    // ---- a real local webhook receiver -----------------------------------------------

    const HOOK_SECRET: &[u8] = b"whsec_test_0123456789";

    /// The webhook receiver: no state of its own, its journal keeps the requests.
    struct FakeHook;

    /// Whether `signature` signs `body` with [`HOOK_SECRET`], checked the way a receiver
    /// would (hmac's constant-time check over the raw body).
    fn signature_valid(signature: Option<&str>, body: &[u8]) -> bool {
        signature
            .and_then(|s| s.strip_prefix("sha256="))
            .and_then(|hex| {
                (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                    .collect::<Option<Vec<u8>>>()
            })
            .is_some_and(|tag| {
                let mut mac = <HmacSha256 as Mac>::new_from_slice(HOOK_SECRET).unwrap();
                mac.update(body);
                mac.verify_slice(&tag).is_ok()
            })
    }

    /// A request the receiver got: was it signed with the right secret?
    fn signed(req: &Recorded) -> bool {
        signature_valid(req.header(SIGNATURE_HEADER), &req.body)
    }

    /// Answers 401 if the signature is wrong, else as the mode says.
    async fn hook(req: HttpRequest, body: web::Bytes) -> HttpResponse {
        if !signature_valid(header(&req, SIGNATURE_HEADER).as_deref(), &body) {
            return HttpResponse::Unauthorized().body("bad signature");
        }
        match req.match_info().get("mode").unwrap_or_default() {
            "ok" => HttpResponse::Ok().json(json!({"id": "hook-77"})),
            "empty" => HttpResponse::NoContent().finish(),
            "busy" => HttpResponse::TooManyRequests()
                .insert_header(("Retry-After", "7"))
                .finish(),
            "down" => HttpResponse::ServiceUnavailable().finish(),
            "bad" => HttpResponse::UnprocessableEntity().finish(),
            _ => HttpResponse::NotFound().finish(),
        }
    }

    impl Fake<FakeHook> {
        async fn start() -> Self {
            Self(FakeHttp::start(FakeHook, |cfg| {
                cfg.route("/{mode}/hook", web::post().to(hook));
            }))
        }

        fn webhook(&self, mode: &str, secret: &[u8], timeout: Duration) -> SignedWebhook {
            SignedWebhook::new(&format!("{}/{mode}/hook", self.url()), secret, timeout).unwrap()
        }
    }

    #[actix_web::test]
    async fn webhook_posts_signed_json() {
        let fake = Fake::<FakeHook>::start().await;
        let msg = outgoing(Channel::Webhook, "");
        let hook = fake.webhook("ok", HOOK_SECRET, Duration::from_secs(2));
        assert_eq!(hook.send(&msg).await.unwrap(), "hook-77");
        let hook = fake.webhook("empty", HOOK_SECRET, Duration::from_secs(2));
        assert_eq!(hook.send(&msg).await.unwrap(), KEY);

        let seen = fake.requests();
        assert_eq!(seen.len(), 2);
        let req = &seen[0];
        assert!(signed(req));
        assert_eq!(req.header("content-type"), Some("application/json"));
        assert_eq!(req.header(IDEMPOTENCY_HEADER), Some(KEY));
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&req.body).unwrap_or_default(),
            json!({
                "incident_id": msg.incident_id,
                "template": "unit_assigned",
                "channel": "webhook",
                "subject": msg.subject,
                "body": msg.body,
                "idempotency_key": KEY,
            })
        );
        fake.stop().await;
    }

    #[actix_web::test]
    async fn webhook_errors_are_classified() {
        let fake = Fake::<FakeHook>::start().await;
        let msg = outgoing(Channel::Webhook, "");
        let err = |mode: &'static str, secret: &'static [u8]| {
            let hook = fake.webhook(mode, secret, Duration::from_millis(500));
            let msg = msg.clone();
            async move { hook.send(&msg).await.unwrap_err() }
        };
        assert_eq!(
            err("busy", HOOK_SECRET).await,
            DeliveryError::Transient {
                retry_after: Some(Duration::from_secs(7)),
                reason: "webhook answered HTTP 429".to_owned()
            }
        );
        assert!(err("down", HOOK_SECRET).await.is_transient());
        assert_eq!(
            err("bad", HOOK_SECRET).await,
            DeliveryError::Permanent {
                reason: "webhook answered HTTP 422".to_owned()
            }
        );
        // This answer is held for as long as the fake lives: only the client's own timeout
        // can end the call.
        fake.hold(1);
        assert_eq!(
            err("ok", HOOK_SECRET).await,
            DeliveryError::Transient {
                retry_after: None,
                reason: "webhook timed out".to_owned()
            }
        );
        // Signed with the wrong secret: the receiver refuses, retrying cannot help.
        assert_eq!(
            err("ok", b"not-the-secret").await,
            DeliveryError::Permanent {
                reason: "webhook answered HTTP 401".to_owned()
            }
        );
        let seen = fake.requests();
        assert_eq!(seen.len(), 5);
        assert!(seen[..4].iter().all(signed));
        assert!(!signed(&seen[4]));
        fake.stop().await;
    }
}
