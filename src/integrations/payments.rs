//! Charging the patient's share: the [`PaymentProvider`] port, a Stripe-compatible REST
//! adapter ([`StripeClient`]) and the deterministic demo provider ([`SandboxPayments`]).
//!
//! The billing saga ([`crate::domain::billing`]) drives these calls; every POST carries the
//! saga's idempotency key, so a retried or replayed step gets the provider's first answer
//! instead of a second charge.
//!
//! # Errors
//!
//! [`PaymentError`] sorts every failure into what the saga needs to know: [`Declined`] (a
//! card error, HTTP 402; final, with the intent the attempt left behind), [`Transient`] (429,
//! 408, 409, 5xx, timeouts, connection errors, or `Stripe-Should-Retry: true`; try again,
//! after `retry_after` when the provider said so), [`Rejected`] (any other 4xx or redirect;
//! final) and [`Malformed`] (an answer we cannot read, or bad input or configuration caught
//! before sending). 409 is retried because Stripe answers it while another request with the
//! same idempotency key is still running.
//!
//! # The sandbox rule
//!
//! [`SandboxPayments`] never touches a network and is only for `shers demo`. It decides by the
//! last character of [`ChargeRequest::customer_ref`]:
//!
//! | last character | outcome |
//! |---|---|
//! | `0` | declined: [`PaymentError::Declined`] with code `card_declined` (the intent stays `requires_payment_method`) |
//! | `9` | an intent in `requires_action` (needs the cardholder, which an off-session charge cannot get) |
//! | anything else (or empty) | an intent in `succeeded` |
//!
//! It keeps its intents in memory, so cancel, refund and retrieve behave like Stripe's (cancel
//! only before capture, refund only after, never more than was charged), and the same
//! idempotency key returns the first answer (a reuse with other parameters is rejected).
//!
//! # What never leaves this module
//!
//! Card data never passes through SHERS (the provider holds the payment method). The API key
//! is sent only in the `Authorization` header (marked sensitive) and `Debug` prints it as
//! `[REDACTED]`. Provider messages are scrubbed of anything that looks like a key or a card
//! number before they reach an error; a 401/403 message (which can echo part of the key) is
//! replaced entirely. The customer reference is not logged.
//!
//! [`Declined`]: PaymentError::Declined
//! [`Transient`]: PaymentError::Transient
//! [`Rejected`]: PaymentError::Rejected
//! [`Malformed`]: PaymentError::Malformed

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use serde::{Deserialize, Serialize};

use crate::domain::billing::MAX_IDEMPOTENCY_KEY_LEN;

/// The future every [`PaymentProvider`] method returns.
pub type PaymentFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, PaymentError>> + Send + 'a>>;

/// A payment provider, object safe so billing can hold `Arc<dyn PaymentProvider>`.
pub trait PaymentProvider: Send + Sync {
    /// Creates a payment intent for `req.amount_cents` and confirms it off-session against the
    /// customer's saved payment method.
    fn create_and_confirm(&self, req: ChargeRequest) -> PaymentFuture<'_, PaymentIntent>;

    /// Cancels an intent that was not captured.
    fn cancel<'a>(
        &'a self,
        intent_id: &'a str,
        idempotency_key: &'a str,
    ) -> PaymentFuture<'a, PaymentIntent>;

    /// Refunds `amount_cents` of a captured intent; returns the refund id.
    fn refund<'a>(
        &'a self,
        intent_id: &'a str,
        amount_cents: i64,
        idempotency_key: &'a str,
    ) -> PaymentFuture<'a, String>;

    /// Reads an intent's current state (e.g. one that was `processing`).
    fn retrieve<'a>(&'a self, intent_id: &'a str) -> PaymentFuture<'a, PaymentIntent>;

    /// `stripe` or `sandbox`, for logs and metrics.
    fn name(&self) -> &'static str;
}

/// One charge of a patient's share.
#[derive(Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    /// Minor units, > 0.
    pub amount_cents: i64,
    /// ISO 4217 code (sent lower case).
    pub currency: String,
    /// The provider's customer id (Stripe `cus_…`), which holds the saved payment method.
    /// Omitted from the request when empty.
    pub customer_ref: String,
    /// Shown on the provider's dashboard and statements; no patient data. Omitted when empty.
    pub description: String,
    /// The saga's key for this step ([`crate::domain::billing::idempotency_key`]).
    pub idempotency_key: String,
}

impl fmt::Debug for ChargeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChargeRequest")
            .field("amount_cents", &self.amount_cents)
            .field("currency", &self.currency)
            .field("customer_ref", &"[REDACTED]")
            .field("description", &self.description)
            .field("idempotency_key", &self.idempotency_key)
            .finish()
    }
}

/// A payment intent's status, with exactly Stripe's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentIntentStatus {
    /// The attempt failed (e.g. declined) or no payment method is attached yet.
    RequiresPaymentMethod,
    /// Created but not confirmed.
    RequiresConfirmation,
    /// The cardholder must act (3-D Secure); impossible off-session.
    RequiresAction,
    /// The payment is under way (e.g. a bank debit); re-read later.
    Processing,
    /// Authorised, waiting for a capture (manual capture only).
    RequiresCapture,
    /// Captured: the money is taken.
    Succeeded,
    /// Cancelled before capture.
    Canceled,
}

impl PaymentIntentStatus {
    /// Stripe's name (`requires_payment_method`, …), also what the billing saga stores.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RequiresPaymentMethod => "requires_payment_method",
            Self::RequiresConfirmation => "requires_confirmation",
            Self::RequiresAction => "requires_action",
            Self::Processing => "processing",
            Self::RequiresCapture => "requires_capture",
            Self::Succeeded => "succeeded",
            Self::Canceled => "canceled",
        }
    }

    /// Whether the money is taken (undo by refund).
    pub fn is_captured(self) -> bool {
        self == Self::Succeeded
    }

    /// Whether the intent may still be cancelled (undo by cancel).
    pub fn is_cancelable(self) -> bool {
        !matches!(self, Self::Succeeded | Self::Canceled)
    }
}

impl fmt::Display for PaymentIntentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A payment intent as SHERS needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentIntent {
    /// The provider's id (`pi_…`).
    pub id: String,
    /// Its status.
    pub status: PaymentIntentStatus,
    /// The amount, in minor units.
    pub amount_cents: i64,
}

/// Why a payment call failed. Messages never carry card data, customer references or keys.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    /// A card error (HTTP 402): final for this charge.
    #[error("payment declined: {code}")]
    Declined {
        /// The provider's code (`card_declined`, `expired_card`, …).
        code: String,
        /// The provider's message, scrubbed.
        message: String,
        /// The intent the failed attempt left (Stripe: `requires_payment_method`).
        intent_id: Option<String>,
    },
    /// Worth retrying: 429, 408, 409, 5xx, timeouts, connection errors.
    #[error("payment provider unavailable: {reason}")]
    Transient {
        /// How long the provider asked us to wait (`Retry-After`), if it said.
        retry_after: Option<Duration>,
        /// What happened.
        reason: String,
    },
    /// The provider refused the request for good (another 4xx, or a redirect).
    #[error("payment provider rejected the request (HTTP {status}): {message}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The provider's message, scrubbed (fixed text for 401/403).
        message: String,
    },
    /// An answer we cannot read, or input/configuration refused before sending.
    #[error("payment call malformed: {0}")]
    Malformed(String),
}

impl PaymentError {
    /// A short, stable name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PaymentError::Declined { .. } => "declined",
            PaymentError::Transient { .. } => "transient",
            PaymentError::Rejected { .. } => "rejected",
            PaymentError::Malformed(_) => "malformed",
        }
    }

    /// Whether retrying the same call (with the same idempotency key) may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, PaymentError::Transient { .. })
    }
}

// ---- Stripe ----------------------------------------------------------------------------------

/// The longest `Retry-After` we honour; a larger one is capped.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3_600);

/// A Stripe-compatible REST client (PaymentIntents and refunds).
pub struct StripeClient {
    client: reqwest::Client,
    base_url: String,
    /// `Bearer <key>`, marked sensitive.
    authorization: HeaderValue,
}

impl fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeClient")
            .field("base_url", &self.base_url)
            .field("api_key", &"[REDACTED]")
            .finish_non_exhaustive()
    }
}

impl StripeClient {
    /// A client for the API at `base_url` (`https://api.stripe.com`, or a fake in tests),
    /// authenticating with `api_key`, each call limited to `timeout` (connect included).
    /// Redirects are not followed.
    ///
    /// A rustls crypto provider must be installed first (`app` and the CLI do it).
    pub fn new(base_url: &str, api_key: &str, timeout: Duration) -> Result<Self, PaymentError> {
        let base_url = base_url.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&base_url)
            .map_err(|_| PaymentError::Malformed("invalid payments base URL".to_owned()))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.cannot_be_a_base() {
            return Err(PaymentError::Malformed(
                "invalid payments base URL".to_owned(),
            ));
        }
        if api_key.trim().is_empty() {
            return Err(PaymentError::Malformed(
                "payments API key is empty".to_owned(),
            ));
        }
        let mut authorization =
            HeaderValue::from_str(&format!("Bearer {api_key}")).map_err(|_| {
                PaymentError::Malformed("payments API key is not a valid header value".to_owned())
            })?;
        authorization.set_sensitive(true);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| {
                PaymentError::Malformed(format!(
                    "could not build the payments HTTP client: {}",
                    e.without_url()
                ))
            })?;
        Ok(Self {
            client,
            base_url,
            authorization,
        })
    }

    /// A POST of `form` to `path` with the idempotency key.
    async fn post(
        &self,
        op: &'static str,
        path: &str,
        form: &[(&str, &str)],
        idempotency_key: &str,
    ) -> Result<Vec<u8>, PaymentError> {
        let key = idempotency_header(idempotency_key)?;
        let request = self
            .client
            .post(format!("{}{path}", self.base_url))
            .header(AUTHORIZATION, self.authorization.clone())
            .header("Idempotency-Key", key)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form_encode(form));
        self.send(op, request).await
    }

    /// Sends, and returns the body of a 2xx answer or the classified error.
    async fn send(
        &self,
        op: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<Vec<u8>, PaymentError> {
        let started = Instant::now();
        let result = async {
            let response = request.send().await.map_err(transport_error)?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await.map_err(transport_error)?;
            if status.is_success() {
                Ok(body.to_vec())
            } else {
                Err(error_from_response(status.as_u16(), &headers, &body))
            }
        }
        .await;
        tracing::debug!(
            payments.provider = "stripe",
            payments.op = op,
            outcome = result.as_ref().map_or_else(PaymentError::kind, |_| "ok"),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "payment provider call"
        );
        result
    }
}

impl PaymentProvider for StripeClient {
    fn create_and_confirm(&self, req: ChargeRequest) -> PaymentFuture<'_, PaymentIntent> {
        Box::pin(async move {
            if req.amount_cents <= 0 {
                return Err(PaymentError::Malformed(
                    "amount must be positive".to_owned(),
                ));
            }
            let currency = req.currency.trim().to_ascii_lowercase();
            if currency.is_empty() {
                return Err(PaymentError::Malformed("currency is empty".to_owned()));
            }
            let amount = req.amount_cents.to_string();
            let mut form: Vec<(&str, &str)> = vec![("amount", &amount), ("currency", &currency)];
            if !req.customer_ref.is_empty() {
                form.push(("customer", &req.customer_ref));
            }
            if !req.description.is_empty() {
                form.push(("description", &req.description));
            }
            form.extend([
                ("confirm", "true"),
                ("off_session", "true"),
                ("payment_method_types[]", "card"),
            ]);
            let body = self
                .post("create", "/v1/payment_intents", &form, &req.idempotency_key)
                .await?;
            parse_intent(&body)
        })
    }

    fn cancel<'a>(
        &'a self,
        intent_id: &'a str,
        idempotency_key: &'a str,
    ) -> PaymentFuture<'a, PaymentIntent> {
        Box::pin(async move {
            check_intent_id(intent_id)?;
            let path = format!("/v1/payment_intents/{intent_id}/cancel");
            let body = self.post("cancel", &path, &[], idempotency_key).await?;
            parse_intent(&body)
        })
    }

    fn refund<'a>(
        &'a self,
        intent_id: &'a str,
        amount_cents: i64,
        idempotency_key: &'a str,
    ) -> PaymentFuture<'a, String> {
        Box::pin(async move {
            check_intent_id(intent_id)?;
            if amount_cents <= 0 {
                return Err(PaymentError::Malformed(
                    "refund amount must be positive".to_owned(),
                ));
            }
            let amount = amount_cents.to_string();
            let form = [("payment_intent", intent_id), ("amount", amount.as_str())];
            let body = self
                .post("refund", "/v1/refunds", &form, idempotency_key)
                .await?;
            let refund: StripeObject = parse_json(&body)?;
            Ok(refund.id)
        })
    }

    fn retrieve<'a>(&'a self, intent_id: &'a str) -> PaymentFuture<'a, PaymentIntent> {
        Box::pin(async move {
            check_intent_id(intent_id)?;
            let request = self
                .client
                .get(format!("{}/v1/payment_intents/{intent_id}", self.base_url))
                .header(AUTHORIZATION, self.authorization.clone());
            let body = self.send("retrieve", request).await?;
            parse_intent(&body)
        })
    }

    fn name(&self) -> &'static str {
        "stripe"
    }
}

/// Stripe ids are letters, digits and underscores; anything else (a `/`, a `?`) would change
/// the request path, so it is refused before sending.
fn check_intent_id(intent_id: &str) -> Result<(), PaymentError> {
    let ok = !intent_id.is_empty()
        && intent_id.len() <= 255
        && intent_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(PaymentError::Malformed(
            "invalid payment intent id".to_owned(),
        ))
    }
}

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters.
fn idempotency_header(key: &str) -> Result<HeaderValue, PaymentError> {
    let ok = !key.is_empty()
        && key.len() <= MAX_IDEMPOTENCY_KEY_LEN
        && key.bytes().all(|b| b.is_ascii_graphic());
    let invalid = || PaymentError::Malformed("invalid idempotency key".to_owned());
    if !ok {
        return Err(invalid());
    }
    HeaderValue::from_str(key).map_err(|_| invalid())
}

/// `application/x-www-form-urlencoded`, as browsers and Stripe's libraries write it: letters,
/// digits and `*-._` as they are, space as `+`, every other byte of the UTF-8 as `%XX`.
fn form_encode(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode_component(&mut out, name);
        out.push('=');
        encode_component(&mut out, value);
    }
    out
}

fn encode_component(out: &mut String, s: &str) {
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

/// The fields of a Stripe payment intent we read.
#[derive(Deserialize)]
struct StripeIntent {
    id: String,
    status: PaymentIntentStatus,
    amount: i64,
}

/// Any Stripe object: only the id (refunds).
#[derive(Deserialize)]
struct StripeObject {
    id: String,
}

/// Stripe's error envelope: `{error: {type, code, message, payment_intent?}}`.
#[derive(Deserialize)]
struct StripeErrorBody {
    error: StripeErrorDetail,
}

#[derive(Deserialize)]
struct StripeErrorDetail {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    decline_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    payment_intent: Option<StripeErrorIntent>,
}

#[derive(Deserialize)]
struct StripeErrorIntent {
    id: String,
}

/// Parses JSON without echoing the body (it may hold anything).
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, PaymentError> {
    serde_json::from_slice(body).map_err(|e| {
        PaymentError::Malformed(format!(
            "unreadable provider answer ({:?} error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })
}

fn parse_intent(body: &[u8]) -> Result<PaymentIntent, PaymentError> {
    let intent: StripeIntent = parse_json(body)?;
    Ok(PaymentIntent {
        id: intent.id,
        status: intent.status,
        amount_cents: intent.amount,
    })
}

/// `Retry-After` in whole seconds (the HTTP-date form is not used by payment APIs and is
/// ignored), capped at [`MAX_RETRY_AFTER`].
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

/// Sorts a non-2xx answer (see the module docs).
fn error_from_response(status: u16, headers: &HeaderMap, body: &[u8]) -> PaymentError {
    let detail = serde_json::from_slice::<StripeErrorBody>(body)
        .ok()
        .map(|b| b.error);
    let message = || {
        detail
            .as_ref()
            .and_then(|d| d.message.as_deref())
            .map_or_else(|| format!("HTTP {status}"), scrub)
    };
    let should_retry = headers
        .get("Stripe-Should-Retry")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    match status {
        402 => PaymentError::Declined {
            code: detail
                .as_ref()
                .and_then(|d| d.code.clone().or_else(|| d.decline_code.clone()))
                .unwrap_or_else(|| "card_declined".to_owned()),
            message: message(),
            intent_id: detail
                .as_ref()
                .and_then(|d| d.payment_intent.as_ref())
                .map(|pi| pi.id.clone()),
        },
        408 | 409 | 429 | 500..=599 => PaymentError::Transient {
            retry_after: retry_after(headers),
            reason: transient_reason(status, detail.as_ref()),
        },
        _ if should_retry => PaymentError::Transient {
            retry_after: retry_after(headers),
            reason: transient_reason(status, detail.as_ref()),
        },
        401 | 403 => PaymentError::Rejected {
            status,
            // Stripe's 401 message echoes part of the key: never pass it on.
            message: "authentication with the payment provider failed".to_owned(),
        },
        _ => PaymentError::Rejected {
            status,
            message: message(),
        },
    }
}

/// `provider answered HTTP 429 (rate_limit)`: the status and the error code or type only.
fn transient_reason(status: u16, detail: Option<&StripeErrorDetail>) -> String {
    match detail.and_then(|d| d.code.as_deref().or(d.kind.as_deref())) {
        Some(code) => format!("provider answered HTTP {status} ({})", scrub(code)),
        None => format!("provider answered HTTP {status}"),
    }
}

/// Maps a reqwest error, dropping the URL.
fn transport_error(e: reqwest::Error) -> PaymentError {
    let reason = if e.is_timeout() {
        "timeout".to_owned()
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else {
        format!("request failed: {}", e.without_url())
    };
    PaymentError::Transient {
        retry_after: None,
        reason,
    }
}

/// The longest provider message kept.
const MAX_MESSAGE_CHARS: usize = 300;

/// Removes what must never be stored or logged from a provider message: words that look like
/// API keys or secrets (`sk_…`, `rk_…`, `pk_…`, `whsec_…`) and words holding 12 or more
/// digits (card numbers); then truncates.
fn scrub(message: &str) -> String {
    let mut out = String::new();
    for (i, word) in message.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let secret = ["sk_", "rk_", "pk_", "whsec_"].iter().any(|p| {
            word.trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
                .starts_with(p)
        });
        let digits = word.chars().filter(char::is_ascii_digit).count();
        if secret || digits >= 12 {
            out.push_str("[REDACTED]");
        } else {
            out.push_str(word);
        }
    }
    if out.chars().count() > MAX_MESSAGE_CHARS {
        out = out.chars().take(MAX_MESSAGE_CHARS).collect();
        out.push('…');
    }
    out
}

// ---- the sandbox -----------------------------------------------------------------------------

/// The deterministic demo provider (see the module docs for its rule). In memory only.
#[derive(Debug, Default)]
pub struct SandboxPayments {
    state: Mutex<SandboxState>,
}

#[derive(Debug, Default)]
struct SandboxState {
    /// Ids handed out so far (intents and refunds share the counter).
    issued: u64,
    intents: HashMap<String, SandboxIntent>,
    /// Idempotency key → (what was asked, the first answer).
    replies: HashMap<String, (String, SandboxReply)>,
}

#[derive(Debug)]
struct SandboxIntent {
    intent: PaymentIntent,
    refunded_cents: i64,
}

#[derive(Clone, Debug)]
enum SandboxReply {
    Intent(Result<PaymentIntent, PaymentError>),
    Refund(Result<String, PaymentError>),
}

impl SandboxState {
    fn next_id(&mut self, prefix: &str) -> String {
        self.issued += 1;
        format!("{prefix}_sandbox_{:06}", self.issued)
    }

    /// Replays the first answer for `key`, or computes, stores and returns a new one.
    fn idempotent(
        &mut self,
        key: &str,
        fingerprint: String,
        compute: impl FnOnce(&mut Self) -> SandboxReply,
    ) -> SandboxReply {
        if let Err(e) = idempotency_header(key) {
            return SandboxReply::Intent(Err(e));
        }
        if let Some((seen, reply)) = self.replies.get(key) {
            if *seen == fingerprint {
                return reply.clone();
            }
            return SandboxReply::Intent(Err(PaymentError::Rejected {
                status: 400,
                message: "idempotency key reused with different parameters".to_owned(),
            }));
        }
        let reply = compute(self);
        self.replies
            .insert(key.to_owned(), (fingerprint, reply.clone()));
        reply
    }

    fn intent_mut(&mut self, intent_id: &str) -> Result<&mut SandboxIntent, PaymentError> {
        self.intents
            .get_mut(intent_id)
            .ok_or_else(|| PaymentError::Rejected {
                status: 404,
                message: "no such payment intent".to_owned(),
            })
    }
}

impl SandboxPayments {
    /// An empty sandbox.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, SandboxState> {
        // Every update completes under the lock, so a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn create_now(&self, req: &ChargeRequest) -> Result<PaymentIntent, PaymentError> {
        let fingerprint = format!(
            "create:{}:{}:{}:{}",
            req.amount_cents, req.currency, req.customer_ref, req.description
        );
        let reply = self
            .lock()
            .idempotent(&req.idempotency_key, fingerprint, |state| {
                SandboxReply::Intent(sandbox_create(state, req))
            });
        into_intent(reply)
    }

    fn cancel_now(&self, intent_id: &str, key: &str) -> Result<PaymentIntent, PaymentError> {
        let reply = self
            .lock()
            .idempotent(key, format!("cancel:{intent_id}"), |state| {
                SandboxReply::Intent(state.intent_mut(intent_id).and_then(|entry| {
                    if !entry.intent.status.is_cancelable() {
                        return Err(PaymentError::Rejected {
                            status: 400,
                            message: format!(
                                "cannot cancel a payment intent that is {}",
                                entry.intent.status
                            ),
                        });
                    }
                    entry.intent.status = PaymentIntentStatus::Canceled;
                    Ok(entry.intent.clone())
                }))
            });
        into_intent(reply)
    }

    fn refund_now(&self, intent_id: &str, amount: i64, key: &str) -> Result<String, PaymentError> {
        let reply = self
            .lock()
            .idempotent(key, format!("refund:{intent_id}:{amount}"), |state| {
                SandboxReply::Refund(sandbox_refund(state, intent_id, amount))
            });
        match reply {
            SandboxReply::Refund(r) => r,
            SandboxReply::Intent(Err(e)) => Err(e),
            SandboxReply::Intent(Ok(_)) => Err(key_reused()),
        }
    }

    fn retrieve_now(&self, intent_id: &str) -> Result<PaymentIntent, PaymentError> {
        self.lock()
            .intent_mut(intent_id)
            .map(|entry| entry.intent.clone())
    }
}

fn key_reused() -> PaymentError {
    PaymentError::Rejected {
        status: 400,
        message: "idempotency key reused with different parameters".to_owned(),
    }
}

fn into_intent(reply: SandboxReply) -> Result<PaymentIntent, PaymentError> {
    match reply {
        SandboxReply::Intent(r) => r,
        SandboxReply::Refund(_) => Err(key_reused()),
    }
}

/// The sandbox rule (module docs).
fn sandbox_create(
    state: &mut SandboxState,
    req: &ChargeRequest,
) -> Result<PaymentIntent, PaymentError> {
    if req.amount_cents <= 0 {
        return Err(PaymentError::Rejected {
            status: 400,
            message: "amount must be positive".to_owned(),
        });
    }
    if req.currency.trim().is_empty() {
        return Err(PaymentError::Rejected {
            status: 400,
            message: "currency is required".to_owned(),
        });
    }
    let id = state.next_id("pi");
    let status = match req.customer_ref.chars().last() {
        Some('0') => PaymentIntentStatus::RequiresPaymentMethod,
        Some('9') => PaymentIntentStatus::RequiresAction,
        _ => PaymentIntentStatus::Succeeded,
    };
    let intent = PaymentIntent {
        id: id.clone(),
        status,
        amount_cents: req.amount_cents,
    };
    state.intents.insert(
        id.clone(),
        SandboxIntent {
            intent: intent.clone(),
            refunded_cents: 0,
        },
    );
    if status == PaymentIntentStatus::RequiresPaymentMethod {
        return Err(PaymentError::Declined {
            code: "card_declined".to_owned(),
            message: "Your card was declined.".to_owned(),
            intent_id: Some(id),
        });
    }
    Ok(intent)
}

fn sandbox_refund(
    state: &mut SandboxState,
    intent_id: &str,
    amount: i64,
) -> Result<String, PaymentError> {
    let rejected = |message: &str| PaymentError::Rejected {
        status: 400,
        message: message.to_owned(),
    };
    let entry = state.intent_mut(intent_id)?;
    if !entry.intent.status.is_captured() {
        return Err(rejected("only a succeeded payment intent can be refunded"));
    }
    if amount <= 0 || amount > entry.intent.amount_cents - entry.refunded_cents {
        return Err(rejected("refund amount exceeds what is left to refund"));
    }
    entry.refunded_cents += amount;
    Ok(state.next_id("re"))
}

impl PaymentProvider for SandboxPayments {
    fn create_and_confirm(&self, req: ChargeRequest) -> PaymentFuture<'_, PaymentIntent> {
        let result = self.create_now(&req);
        Box::pin(async move { result })
    }

    fn cancel<'a>(
        &'a self,
        intent_id: &'a str,
        idempotency_key: &'a str,
    ) -> PaymentFuture<'a, PaymentIntent> {
        Box::pin(async move { self.cancel_now(intent_id, idempotency_key) })
    }

    fn refund<'a>(
        &'a self,
        intent_id: &'a str,
        amount_cents: i64,
        idempotency_key: &'a str,
    ) -> PaymentFuture<'a, String> {
        Box::pin(async move { self.refund_now(intent_id, amount_cents, idempotency_key) })
    }

    fn retrieve<'a>(&'a self, intent_id: &'a str) -> PaymentFuture<'a, PaymentIntent> {
        Box::pin(async move { self.retrieve_now(intent_id) })
    }

    fn name(&self) -> &'static str {
        "sandbox"
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use actix_web::{HttpRequest, HttpResponse, web};
    use serde_json::{Value, json};

    use super::*;
    use crate::domain::billing::{Step, idempotency_key};
    use shers_test_support::{FakeHttp, free_port, header, install_crypto};

    const API_KEY: &str = "sk_test_4eC39HqLyjWDarjtT1zdp7dc";
    const INCIDENT: &str = "0190f1e2-aaaa-7bbb-8ccc-123456789abc";

    fn charge(customer: &str) -> ChargeRequest {
        ChargeRequest {
            amount_cents: 44_880,
            currency: "USD".to_owned(),
            customer_ref: customer.to_owned(),
            description: "SHERS incident INC-2026-000042".to_owned(),
            idempotency_key: idempotency_key(INCIDENT, Step::Charge),
        }
    }

    /// Form pairs decoded by actix-web's own decoder (serde_urlencoded), not ours.
    fn decode(body: &str) -> Vec<(String, String)> {
        web::Query::<Vec<(String, String)>>::from_query(body)
            .unwrap()
            .into_inner()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    // ---- pure helpers ----------------------------------------------------------------------

    #[test]
    fn form_encoding_matches_the_standard_decoder() {
        let form = [
            ("payment_method_types[]", "card"),
            ("description", "Ambulance & ALS: 100% / ünï+co=1"),
            ("empty", ""),
        ];
        let encoded = form_encode(&form);
        assert_eq!(
            encoded,
            "payment_method_types%5B%5D=card\
             &description=Ambulance+%26+ALS%3A+100%25+%2F+%C3%BCn%C3%AF%2Bco%3D1&empty="
        );
        assert_eq!(decode(&encoded), pairs(&form));
        assert_eq!(form_encode(&[]), "");
    }

    #[test]
    fn statuses_have_stripes_names() {
        use PaymentIntentStatus::*;
        for (status, name) in [
            (RequiresPaymentMethod, "requires_payment_method"),
            (RequiresConfirmation, "requires_confirmation"),
            (RequiresAction, "requires_action"),
            (Processing, "processing"),
            (RequiresCapture, "requires_capture"),
            (Succeeded, "succeeded"),
            (Canceled, "canceled"),
        ] {
            assert_eq!(serde_json::to_value(status).unwrap(), name);
            assert_eq!(status.as_str(), name);
            assert_eq!(
                serde_json::from_value::<PaymentIntentStatus>(json!(name)).unwrap(),
                status
            );
        }
        assert!(Succeeded.is_captured() && !Succeeded.is_cancelable());
        assert!(!Canceled.is_cancelable());
        assert!(Processing.is_cancelable() && RequiresAction.is_cancelable());
    }

    #[test]
    fn messages_are_scrubbed() {
        assert_eq!(
            scrub("Invalid API Key provided: sk_test_****1234"),
            "Invalid API Key provided: [REDACTED]"
        );
        assert_eq!(
            scrub("card 4242424242424242 and (rk_live_abc) kept words"),
            "card [REDACTED] and [REDACTED] kept words"
        );
        assert_eq!(scrub("Your card was declined."), "Your card was declined.");
        assert!(scrub(&"a".repeat(1_000)).chars().count() <= MAX_MESSAGE_CHARS + 1);
    }

    #[test]
    fn client_configuration_is_checked_and_the_key_redacted() {
        install_crypto();
        for bad in ["not a url", "ftp://stripe", ""] {
            assert!(matches!(
                StripeClient::new(bad, API_KEY, Duration::from_secs(1)),
                Err(PaymentError::Malformed(_))
            ));
        }
        for bad_key in ["", "  ", "sk_test_\nx"] {
            let e =
                StripeClient::new("http://stripe", bad_key, Duration::from_secs(1)).unwrap_err();
            assert!(matches!(e, PaymentError::Malformed(_)));
        }
        let client =
            StripeClient::new("https://api.stripe.com/", API_KEY, Duration::from_secs(1)).unwrap();
        let debug = format!("{client:?}");
        assert!(
            !debug.contains(API_KEY) && debug.contains("[REDACTED]"),
            "{debug}"
        );
        assert_eq!(client.name(), "stripe");
        let debug = format!("{:?}", charge("cus_secret_ref"));
        assert!(!debug.contains("cus_secret_ref"), "{debug}");
    }

    #[test]
    fn error_kinds() {
        let t = PaymentError::Transient {
            retry_after: None,
            reason: "timeout".into(),
        };
        assert!(t.is_transient());
        assert_eq!(t.kind(), "transient");
        assert_eq!(PaymentError::Malformed("x".into()).kind(), "malformed");
        assert!(
            !PaymentError::Rejected {
                status: 400,
                message: "x".into()
            }
            .is_transient()
        );
    }

    // ---- a real local fake Stripe ----------------------------------------------------------

    /// Stripe's idempotency replay store (the fake's journal keeps the requests).
    #[derive(Default)]
    struct FakeStripe {
        /// Idempotency key → the first answer (status, JSON).
        replays: Mutex<HashMap<String, (u16, Value)>>,
        /// Intents created (replays do not count).
        created: AtomicUsize,
    }

    fn stripe_error(kind: &str, code: Option<&str>, message: &str) -> Value {
        json!({"error": {"type": kind, "code": code, "message": message}})
    }

    /// Every route: answers by the first path segment (`mode`), so one server plays every
    /// scenario (the adapter's base URL is `http://addr/{mode}`); the fake records the request.
    /// Executed POSTs are stored under their idempotency key and replayed like Stripe does.
    // Long on purpose: one fake server for every Stripe scenario, one arm per mode, so the
    // scenarios read side by side.
    async fn stripe(
        req: HttpRequest,
        op: &'static str,
        body: web::Bytes,
        fake: web::Data<FakeStripe>,
    ) -> HttpResponse {
        let body = String::from_utf8(body.to_vec()).unwrap();
        let key = header(&req, "idempotency-key");
        // Each mode is its own Stripe account: keys are scoped to it.
        let mode = req.match_info().get("mode").unwrap_or_default().to_owned();
        let scoped_key = key.as_ref().map(|k| format!("{mode} {k}"));
        if let Some(key) = &scoped_key
            && let Some((status, json)) = fake.replays.lock().unwrap().get(key)
        {
            return HttpResponse::build(actix_web::http::StatusCode::from_u16(*status).unwrap())
                .insert_header(("Idempotent-Replayed", "true"))
                .json(json);
        }
        let form: HashMap<String, String> = decode(&body).into_iter().collect();
        let amount: i64 = form
            .get("amount")
            .and_then(|a| a.parse().ok())
            .unwrap_or(1_000);
        let new_intent = |status: &str| {
            let n = fake.created.fetch_add(1, Ordering::SeqCst) + 1;
            json!({"id": format!("pi_fake_{n}"), "object": "payment_intent", "amount": amount,
                   "currency": "usd", "status": status})
        };
        let (status, json): (u16, Value) = match (mode.as_str(), op) {
            ("ratelimited", _) => {
                return HttpResponse::TooManyRequests()
                    .insert_header(("Retry-After", "2"))
                    .json(stripe_error(
                        "invalid_request_error",
                        Some("rate_limit"),
                        "Too many requests",
                    ));
            }
            ("down", _) => (500, stripe_error("api_error", None, "Something went wrong")),
            ("conflict", _) => (
                409,
                stripe_error("idempotency_error", None, "Another request is in progress"),
            ),
            ("shouldretry", _) => {
                return HttpResponse::BadRequest()
                    .insert_header(("Stripe-Should-Retry", "true"))
                    .json(stripe_error(
                        "api_error",
                        Some("lock_timeout"),
                        "lock timeout",
                    ));
            }
            ("bad", _) => (
                400,
                stripe_error(
                    "invalid_request_error",
                    Some("parameter_missing"),
                    "Missing required param: customer.",
                ),
            ),
            ("unauthorized", _) => (
                401,
                stripe_error(
                    "invalid_request_error",
                    None,
                    "Invalid API Key provided: sk_test_****p7dc",
                ),
            ),
            ("garbage", _) => {
                return HttpResponse::Ok()
                    .content_type("text/html")
                    .body("<html>gateway</html>");
            }
            ("weird", _) => (
                200,
                json!({"id": "pi_x", "amount": 1, "status": "exploded"}),
            ),
            ("redirect", _) => {
                return HttpResponse::TemporaryRedirect()
                    .insert_header(("Location", "http://example.invalid/"))
                    .finish();
            }
            ("declined", "create") => {
                let intent = new_intent("requires_payment_method");
                (
                    402,
                    json!({"error": {
                    "type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds",
                    "message": "Your card has insufficient funds. Card 4000000000009995 sk_live_leak",
                    "payment_intent": intent}}),
                )
            }
            (_, "create") if form.get("customer").is_some_and(|c| c.ends_with('9')) => {
                (200, new_intent("requires_action"))
            }
            (_, "create") => (200, new_intent("succeeded")),
            (_, "cancel") => {
                let id = req.match_info().get("id").unwrap_or_default();
                (
                    200,
                    json!({"id": id, "object": "payment_intent", "amount": 44880, "status": "canceled"}),
                )
            }
            (_, "refund") => (
                200,
                json!({"id": "re_fake_1", "object": "refund", "amount": amount,
                                           "payment_intent": form.get("payment_intent"), "status": "succeeded"}),
            ),
            (_, "retrieve") => {
                let id = req.match_info().get("id").unwrap_or_default();
                (
                    200,
                    json!({"id": id, "object": "payment_intent", "amount": 44880, "status": "processing"}),
                )
            }
            _ => (
                404,
                stripe_error(
                    "invalid_request_error",
                    Some("resource_missing"),
                    "No such route",
                ),
            ),
        };
        // Stripe stores what an executed request answered (success or card error), not
        // validation, authentication, conflict or server errors.
        if let Some(key) = scoped_key
            && (status == 200 || status == 402)
        {
            fake.replays
                .lock()
                .unwrap()
                .insert(key, (status, json.clone()));
        }
        HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap()).json(json)
    }

    /// The fake Stripe server, with the adapter built against it.
    struct Fake(FakeHttp<FakeStripe>);

    impl std::ops::Deref for Fake {
        type Target = FakeHttp<FakeStripe>;

        fn deref(&self) -> &Self::Target {
            &self.0
        }
    }

    impl Fake {
        async fn start() -> Self {
            Self(FakeHttp::start(FakeStripe::default(), |cfg| {
                cfg.route("/{mode}/v1/payment_intents", web::post().to(create))
                    .route(
                        "/{mode}/v1/payment_intents/{id}/cancel",
                        web::post().to(cancel),
                    )
                    .route("/{mode}/v1/payment_intents/{id}", web::get().to(retrieve))
                    .route("/{mode}/v1/refunds", web::post().to(refund));
            }))
        }

        async fn stop(self) {
            self.0.stop().await;
        }

        fn client(&self, mode: &str) -> StripeClient {
            StripeClient::new(
                &format!("{}/{mode}", self.url()),
                API_KEY,
                Duration::from_secs(2),
            )
            .unwrap()
        }
    }

    async fn create(
        req: HttpRequest,
        body: web::Bytes,
        fake: web::Data<FakeStripe>,
    ) -> HttpResponse {
        stripe(req, "create", body, fake).await
    }

    async fn cancel(
        req: HttpRequest,
        body: web::Bytes,
        fake: web::Data<FakeStripe>,
    ) -> HttpResponse {
        stripe(req, "cancel", body, fake).await
    }

    async fn retrieve(
        req: HttpRequest,
        body: web::Bytes,
        fake: web::Data<FakeStripe>,
    ) -> HttpResponse {
        stripe(req, "retrieve", body, fake).await
    }

    async fn refund(
        req: HttpRequest,
        body: web::Bytes,
        fake: web::Data<FakeStripe>,
    ) -> HttpResponse {
        stripe(req, "refund", body, fake).await
    }

    #[actix_web::test]
    async fn create_sends_stripes_form_and_headers() {
        let fake = Fake::start().await;
        let intent = fake
            .client("ok")
            .create_and_confirm(charge("cus_123"))
            .await
            .unwrap();
        assert_eq!(
            intent,
            PaymentIntent {
                id: "pi_fake_1".into(),
                status: PaymentIntentStatus::Succeeded,
                amount_cents: 44_880
            }
        );
        let seen = fake.requests();
        assert_eq!(seen.len(), 1);
        let req = &seen[0];
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/ok/v1/payment_intents");
        assert_eq!(
            req.header("authorization"),
            Some(format!("Bearer {API_KEY}").as_str())
        );
        assert_eq!(
            req.header("idempotency-key"),
            Some(format!("shers-{INCIDENT}-charge").as_str())
        );
        assert_eq!(
            req.header("content-type"),
            Some("application/x-www-form-urlencoded")
        );
        assert_eq!(
            req.text(),
            "amount=44880&currency=usd&customer=cus_123\
             &description=SHERS+incident+INC-2026-000042\
             &confirm=true&off_session=true&payment_method_types%5B%5D=card"
        );
        assert_eq!(
            decode(&req.text()),
            pairs(&[
                ("amount", "44880"),
                ("currency", "usd"),
                ("customer", "cus_123"),
                ("description", "SHERS incident INC-2026-000042"),
                ("confirm", "true"),
                ("off_session", "true"),
                ("payment_method_types[]", "card"),
            ])
        );
        fake.stop().await;
    }

    #[actix_web::test]
    async fn empty_optional_fields_are_left_out_and_bad_input_never_sent() {
        let fake = Fake::start().await;
        let client = fake.client("ok");
        let mut req = charge("");
        req.description.clear();
        client.create_and_confirm(req).await.unwrap();
        assert_eq!(
            fake.requests()[0].text(),
            "amount=44880&currency=usd&confirm=true&off_session=true&payment_method_types%5B%5D=card"
        );
        let mut zero = charge("cus_1");
        zero.amount_cents = 0;
        let mut no_key = charge("cus_1");
        no_key.idempotency_key.clear();
        let mut long_key = charge("cus_1");
        long_key.idempotency_key = "k".repeat(256);
        for req in [zero, no_key, long_key] {
            assert!(matches!(
                client.create_and_confirm(req).await,
                Err(PaymentError::Malformed(_))
            ));
        }
        for bad_id in ["", "../refunds", "pi_1?expand=x", "pi 1"] {
            assert!(matches!(
                client.retrieve(bad_id).await,
                Err(PaymentError::Malformed(_))
            ));
            assert!(matches!(
                client.cancel(bad_id, "k").await,
                Err(PaymentError::Malformed(_))
            ));
            assert!(matches!(
                client.refund(bad_id, 1, "k").await,
                Err(PaymentError::Malformed(_))
            ));
        }
        assert!(matches!(
            client.refund("pi_1", 0, "k").await,
            Err(PaymentError::Malformed(_))
        ));
        assert_eq!(fake.requests().len(), 1);
        fake.stop().await;
    }

    #[actix_web::test]
    async fn declined_card_is_declined_with_the_intent_and_no_secrets() {
        let fake = Fake::start().await;
        let e = fake
            .client("declined")
            .create_and_confirm(charge("cus_123"))
            .await
            .unwrap_err();
        let PaymentError::Declined {
            code,
            message,
            intent_id,
        } = &e
        else {
            panic!("{e:?}");
        };
        assert_eq!(code, "card_declined");
        assert_eq!(intent_id.as_deref(), Some("pi_fake_1"));
        assert!(
            message.starts_with("Your card has insufficient funds."),
            "{message}"
        );
        let text = format!("{e} {e:?}");
        assert!(
            !text.contains("4000000000009995") && !text.contains("sk_live"),
            "{text}"
        );
        assert!(!e.is_transient());
        fake.stop().await;
    }

    #[actix_web::test]
    async fn http_errors_are_classified() {
        let fake = Fake::start().await;
        let err = |mode: &'static str| {
            let client = fake.client(mode);
            async move {
                client
                    .create_and_confirm(charge("cus_123"))
                    .await
                    .unwrap_err()
            }
        };
        assert_eq!(
            err("ratelimited").await,
            PaymentError::Transient {
                retry_after: Some(Duration::from_secs(2)),
                reason: "provider answered HTTP 429 (rate_limit)".into()
            }
        );
        assert_eq!(
            err("down").await,
            PaymentError::Transient {
                retry_after: None,
                reason: "provider answered HTTP 500 (api_error)".into()
            }
        );
        assert!(matches!(
            err("conflict").await,
            PaymentError::Transient { .. }
        ));
        assert!(matches!(
            err("shouldretry").await,
            PaymentError::Transient { .. }
        ));
        assert_eq!(
            err("bad").await,
            PaymentError::Rejected {
                status: 400,
                message: "Missing required param: customer.".into()
            }
        );
        let unauthorized = err("unauthorized").await;
        assert!(matches!(
            unauthorized,
            PaymentError::Rejected { status: 401, .. }
        ));
        let text = format!("{unauthorized} {unauthorized:?}");
        assert!(
            !text.contains("sk_test") && !text.contains("p7dc"),
            "{text}"
        );
        assert!(matches!(err("garbage").await, PaymentError::Malformed(_)));
        assert!(matches!(err("weird").await, PaymentError::Malformed(_)));
        assert!(matches!(
            err("redirect").await,
            PaymentError::Rejected { status: 307, .. }
        ));
        fake.stop().await;
    }

    #[actix_web::test]
    async fn timeout_is_transient() {
        let fake = Fake::start().await;
        // Every answer is held for as long as the fake lives: only the client's own timeout
        // can end the call, so no clock is raced and a busy machine cannot fail it.
        fake.hold(usize::MAX);
        let client = StripeClient::new(
            &format!("{}/ok", fake.url()),
            API_KEY,
            Duration::from_millis(200),
        )
        .unwrap();
        let e = client
            .create_and_confirm(charge("cus_123"))
            .await
            .unwrap_err();
        assert_eq!(
            e,
            PaymentError::Transient {
                retry_after: None,
                reason: "timeout".into()
            }
        );
        fake.stop().await;
    }

    #[actix_web::test]
    async fn connection_refused_is_transient() {
        install_crypto();
        let client = StripeClient::new(
            &format!("http://127.0.0.1:{}", free_port()),
            API_KEY,
            Duration::from_secs(2),
        )
        .unwrap();
        let e = client
            .create_and_confirm(charge("cus_123"))
            .await
            .unwrap_err();
        assert!(e.is_transient(), "{e:?}");
        let text = format!("{e} {e:?}");
        assert!(!text.contains(API_KEY), "{text}");
    }

    #[actix_web::test]
    async fn the_same_idempotency_key_gets_the_same_intent() {
        let fake = Fake::start().await;
        let client = fake.client("ok");
        let first = client.create_and_confirm(charge("cus_123")).await.unwrap();
        let again = client.create_and_confirm(charge("cus_123")).await.unwrap();
        assert_eq!(first, again);
        assert_eq!(fake.state().created.load(Ordering::SeqCst), 1);
        let seen = fake.requests();
        assert_eq!(seen.len(), 2);
        assert_eq!(
            seen[0].header("idempotency-key"),
            seen[1].header("idempotency-key")
        );
        assert_eq!(seen[0].body, seen[1].body);
        // A declined charge replays its decline too.
        let declined = fake.client("declined");
        let mut req = charge("cus_123");
        req.idempotency_key = idempotency_key("other-incident", Step::Charge);
        let e1 = declined.create_and_confirm(req.clone()).await.unwrap_err();
        let e2 = declined.create_and_confirm(req).await.unwrap_err();
        assert_eq!(e1, e2);
        assert_eq!(fake.state().created.load(Ordering::SeqCst), 2);
        // Another key is another intent.
        let mut other = charge("cus_123");
        other.idempotency_key = idempotency_key("third-incident", Step::Charge);
        assert_eq!(
            client.create_and_confirm(other).await.unwrap().id,
            "pi_fake_3"
        );
        fake.stop().await;
    }

    #[actix_web::test]
    async fn cancel_refund_and_retrieve_use_stripes_paths() {
        let fake = Fake::start().await;
        let client = fake.client("ok");
        let cancel_key = idempotency_key(INCIDENT, Step::CancelPayment);
        let refund_key = idempotency_key(INCIDENT, Step::RefundPayment);
        let cancelled = client.cancel("pi_fake_7", &cancel_key).await.unwrap();
        assert_eq!(cancelled.status, PaymentIntentStatus::Canceled);
        assert_eq!(cancelled.id, "pi_fake_7");
        assert_eq!(
            client
                .refund("pi_fake_8", 44_880, &refund_key)
                .await
                .unwrap(),
            "re_fake_1"
        );
        let read = client.retrieve("pi_fake_9").await.unwrap();
        assert_eq!(read.status, PaymentIntentStatus::Processing);

        let seen = fake.requests();
        assert_eq!(seen.len(), 3);
        assert_eq!(
            (seen[0].method.as_str(), seen[0].path.as_str()),
            ("POST", "/ok/v1/payment_intents/pi_fake_7/cancel")
        );
        assert_eq!(seen[0].header("idempotency-key"), Some(cancel_key.as_str()));
        assert_eq!(seen[0].text(), "");
        assert_eq!(
            (seen[1].method.as_str(), seen[1].path.as_str()),
            ("POST", "/ok/v1/refunds")
        );
        assert_eq!(seen[1].header("idempotency-key"), Some(refund_key.as_str()));
        assert_eq!(seen[1].text(), "payment_intent=pi_fake_8&amount=44880");
        assert_eq!(
            (seen[2].method.as_str(), seen[2].path.as_str()),
            ("GET", "/ok/v1/payment_intents/pi_fake_9")
        );
        assert_eq!(seen[2].header("idempotency-key"), None);
        for req in &seen {
            assert_eq!(
                req.header("authorization"),
                Some(format!("Bearer {API_KEY}").as_str())
            );
        }
        fake.stop().await;
    }

    #[actix_web::test]
    async fn the_adapter_is_usable_as_a_trait_object() {
        let fake = Fake::start().await;
        let providers: Vec<Arc<dyn PaymentProvider>> = vec![
            Arc::new(fake.client("ok")),
            Arc::new(SandboxPayments::new()),
        ];
        for provider in providers {
            let intent = provider.create_and_confirm(charge("cus_9")).await.unwrap();
            assert_eq!(
                intent.status,
                PaymentIntentStatus::RequiresAction,
                "{}",
                provider.name()
            );
        }
        fake.stop().await;
    }

    // ---- the sandbox -----------------------------------------------------------------------

    fn keyed(customer: &str, key: &str) -> ChargeRequest {
        ChargeRequest {
            idempotency_key: key.to_owned(),
            ..charge(customer)
        }
    }

    #[actix_web::test]
    async fn sandbox_follows_its_rule() {
        let sandbox = SandboxPayments::new();
        assert_eq!(sandbox.name(), "sandbox");
        let ok = sandbox
            .create_and_confirm(keyed("cus_1", "k1"))
            .await
            .unwrap();
        assert_eq!(ok.status, PaymentIntentStatus::Succeeded);
        assert_eq!(ok.amount_cents, 44_880);
        let plain = sandbox.create_and_confirm(keyed("", "k2")).await.unwrap();
        assert_eq!(plain.status, PaymentIntentStatus::Succeeded);
        let action = sandbox
            .create_and_confirm(keyed("cus_9", "k3"))
            .await
            .unwrap();
        assert_eq!(action.status, PaymentIntentStatus::RequiresAction);
        let e = sandbox
            .create_and_confirm(keyed("cus_10", "k4"))
            .await
            .unwrap_err();
        let PaymentError::Declined {
            code,
            intent_id: Some(declined_id),
            ..
        } = e
        else {
            panic!("{e:?}");
        };
        assert_eq!(code, "card_declined");
        assert_eq!(
            sandbox.retrieve(&declined_id).await.unwrap().status,
            PaymentIntentStatus::RequiresPaymentMethod
        );
        assert_eq!(sandbox.retrieve(&ok.id).await.unwrap(), ok);
        assert!(matches!(
            sandbox.retrieve("pi_nope").await,
            Err(PaymentError::Rejected { status: 404, .. })
        ));
        let mut zero = keyed("cus_1", "k5");
        zero.amount_cents = 0;
        assert!(matches!(
            sandbox.create_and_confirm(zero).await,
            Err(PaymentError::Rejected { status: 400, .. })
        ));
    }

    #[actix_web::test]
    async fn sandbox_replays_idempotent_requests() {
        let sandbox = SandboxPayments::new();
        let first = sandbox
            .create_and_confirm(keyed("cus_1", "same"))
            .await
            .unwrap();
        let again = sandbox
            .create_and_confirm(keyed("cus_1", "same"))
            .await
            .unwrap();
        assert_eq!(first, again);
        let declined = sandbox
            .create_and_confirm(keyed("cus_0", "dec"))
            .await
            .unwrap_err();
        assert_eq!(
            sandbox
                .create_and_confirm(keyed("cus_0", "dec"))
                .await
                .unwrap_err(),
            declined
        );
        // The same key with other parameters is refused.
        assert!(matches!(
            sandbox.create_and_confirm(keyed("cus_2", "same")).await,
            Err(PaymentError::Rejected { status: 400, .. })
        ));
        assert!(matches!(
            sandbox.refund(&first.id, 100, "same").await,
            Err(PaymentError::Rejected { status: 400, .. })
        ));
        assert!(matches!(
            sandbox.create_and_confirm(keyed("cus_1", "")).await,
            Err(PaymentError::Malformed(_))
        ));
        let other = sandbox
            .create_and_confirm(keyed("cus_1", "other"))
            .await
            .unwrap();
        assert_ne!(other.id, first.id);
    }

    #[actix_web::test]
    async fn sandbox_cancels_before_capture_and_refunds_after() {
        let sandbox = SandboxPayments::new();
        let paid = sandbox
            .create_and_confirm(keyed("cus_1", "c1"))
            .await
            .unwrap();
        let pending = sandbox
            .create_and_confirm(keyed("cus_9", "c2"))
            .await
            .unwrap();

        // Cancel: only before capture; the same key replays.
        assert!(matches!(
            sandbox.cancel(&paid.id, "x1").await,
            Err(PaymentError::Rejected { status: 400, .. })
        ));
        let cancelled = sandbox.cancel(&pending.id, "x2").await.unwrap();
        assert_eq!(cancelled.status, PaymentIntentStatus::Canceled);
        assert_eq!(sandbox.cancel(&pending.id, "x2").await.unwrap(), cancelled);
        assert!(sandbox.cancel(&pending.id, "x3").await.is_err());

        // Refund: only after capture, never more than was charged; the same key replays.
        assert!(matches!(
            sandbox.refund(&pending.id, 1, "r0").await,
            Err(PaymentError::Rejected { status: 400, .. })
        ));
        let refund = sandbox.refund(&paid.id, 40_000, "r1").await.unwrap();
        assert!(refund.starts_with("re_sandbox_"));
        assert_eq!(
            sandbox.refund(&paid.id, 40_000, "r1").await.unwrap(),
            refund
        );
        assert!(sandbox.refund(&paid.id, 4_881, "r2").await.is_err());
        let rest = sandbox.refund(&paid.id, 4_880, "r3").await.unwrap();
        assert_ne!(rest, refund);
        assert!(matches!(
            sandbox.refund("pi_nope", 1, "r4").await,
            Err(PaymentError::Rejected { status: 404, .. })
        ));
        // Refunds keep the intent succeeded, like Stripe.
        assert_eq!(
            sandbox.retrieve(&paid.id).await.unwrap().status,
            PaymentIntentStatus::Succeeded
        );
    }
}
