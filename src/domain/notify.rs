//! Notification rules: message templates, the idempotency key of an outbox row and the retry
//! schedule. Pure: no I/O, no clock reads, no logging.
//!
//! - [`render`] turns a [`Template`] and a [`MessageContext`] into an email subject, an email
//!   body and an SMS text. Every context field except the incident reference is optional; a
//!   missing value is phrased around ("an ambulance is on its way"), never printed as `None`,
//!   `null` or a stray placeholder. Subjects never carry the patient's name (they show on lock
//!   screens); bodies and SMS do, because the recipient is the patient's contact.
//! - [`idempotency_key`] is one key per (incident, recipient, template), a hash, so it can be
//!   logged and sent to providers without revealing the recipient's address.
//! - [`backoff`] is the capped exponential retry delay; a delivery is abandoned after
//!   [`MAX_ATTEMPTS`] attempts.
//!
//! Rendered text is patient data: callers must never log it.

use std::fmt::{self, Write as _};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Which message to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Template {
    /// An emergency was reported and help is being arranged.
    IncidentCreated,
    /// An ambulance accepted the incident and is on its way.
    UnitAssigned,
    /// The patient arrived at hospital.
    ArrivedAtHospital,
    /// The billing or insurance decision for the call.
    BillingOutcome,
}

impl Template {
    /// Every template, in lifecycle order.
    pub const ALL: [Template; 4] = [
        Template::IncidentCreated,
        Template::UnitAssigned,
        Template::ArrivedAtHospital,
        Template::BillingOutcome,
    ];

    /// The wire name (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            Template::IncidentCreated => "incident_created",
            Template::UnitAssigned => "unit_assigned",
            Template::ArrivedAtHospital => "arrived_at_hospital",
            Template::BillingOutcome => "billing_outcome",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A delivery channel of a notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// A text message to a phone number.
    Sms,
    /// An email over SMTP.
    Email,
    /// A signed JSON POST to a configured URL (hospital or insurer systems).
    Webhook,
    /// One publish per incident and template to the configured Amazon SNS topic, whose
    /// subscribers are the next of kin.
    Sns,
}

impl Channel {
    /// Every channel.
    pub const ALL: [Channel; 4] = [Channel::Sms, Channel::Email, Channel::Webhook, Channel::Sns];

    /// The wire name (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Sms => "sms",
            Channel::Email => "email",
            Channel::Webhook => "webhook",
            Channel::Sns => "sns",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a message may mention. Only the reference is required; empty or blank strings count as
/// missing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageContext {
    /// The patient's name.
    pub patient_name: Option<String>,
    /// The recipient's name, for the greeting.
    pub recipient_name: Option<String>,
    /// The incident reference the recipient can quote when calling.
    pub incident_reference: String,
    /// A human description of the scene ("12 High Street").
    pub location_text: Option<String>,
    /// The assigned ambulance's call sign.
    pub unit_call_sign: Option<String>,
    /// Estimated seconds until the ambulance arrives.
    pub eta_s: Option<u32>,
    /// The receiving hospital.
    pub hospital_name: Option<String>,
    /// The billing decision in words ("approved", "covered by insurance", …).
    pub billing_status: Option<String>,
    /// What the recipient owes, in minor units (cents).
    pub amount_due_cents: Option<i64>,
    /// ISO 4217 code of `amount_due_cents` ("USD").
    pub currency: Option<String>,
}

/// A message ready for any channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedMessage {
    /// Email subject: no patient name.
    pub subject: String,
    /// Email (and webhook) body, plain text.
    pub body: String,
    /// SMS text, at most [`SMS_MAX_CHARS`] characters.
    pub sms: String,
}

/// The longest SMS we send, in characters (two concatenated segments' worth).
pub const SMS_MAX_CHARS: usize = 320;

/// Delivery attempts before a notification is marked failed.
pub const MAX_ATTEMPTS: u32 = 8;

/// Delay after the first failed attempt.
pub const BACKOFF_BASE: Duration = Duration::from_secs(2);

/// The longest delay between attempts (unless the provider asks for longer).
pub const BACKOFF_CAP: Duration = Duration::from_secs(600);

/// The context's values, trimmed, whitespace-collapsed and with blanks as `None`.
struct Fields {
    patient: Option<String>,
    recipient: Option<String>,
    reference: String,
    location: Option<String>,
    unit: Option<String>,
    eta_s: Option<u32>,
    hospital: Option<String>,
    billing_status: Option<String>,
    amount: Option<String>,
    amount_cents: Option<i64>,
}

/// Trims and collapses whitespace runs (newlines included) into single spaces, so a value
/// can neither break a subject line nor a sentence.
fn clean(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn present(v: &Option<String>) -> Option<String> {
    v.as_deref().map(clean).filter(|s| !s.is_empty())
}

impl Fields {
    fn new(ctx: &MessageContext) -> Self {
        let reference = clean(&ctx.incident_reference);
        Self {
            patient: present(&ctx.patient_name),
            recipient: present(&ctx.recipient_name),
            reference: if reference.is_empty() {
                "not yet assigned".to_owned()
            } else {
                reference
            },
            location: present(&ctx.location_text),
            unit: present(&ctx.unit_call_sign),
            eta_s: ctx.eta_s,
            hospital: present(&ctx.hospital_name),
            billing_status: present(&ctx.billing_status),
            amount: ctx
                .amount_due_cents
                .map(|c| format_money(c, present(&ctx.currency).as_deref())),
            amount_cents: ctx.amount_due_cents,
        }
    }

    fn greeting(&self) -> String {
        match &self.recipient {
            Some(name) => format!("Hello {name},"),
            None => "Hello,".to_owned(),
        }
    }
}

/// Formats minor units as `"USD 123.45"` (`"123.45"` without a currency, `"USD -5.00"` for a
/// credit). The currency code is upper-cased.
pub fn format_money(cents: i64, currency: Option<&str>) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    let amount = format!("{sign}{}.{:02}", abs / 100, abs % 100);
    match currency.map(clean).filter(|c| !c.is_empty()) {
        Some(code) => format!("{} {amount}", code.to_uppercase()),
        None => amount,
    }
}

/// An ETA in words: "less than a minute", "about 1 minute", "about 7 minutes",
/// "about 1 hour 5 minutes". Minutes are rounded up.
pub fn format_eta(eta_s: u32) -> String {
    if eta_s < 60 {
        return "less than a minute".to_owned();
    }
    let minutes = eta_s.div_ceil(60);
    let plural = |n: u32, unit: &str| {
        if n == 1 {
            format!("1 {unit}")
        } else {
            format!("{n} {unit}s")
        }
    };
    if minutes < 60 {
        return format!("about {}", plural(minutes, "minute"));
    }
    let (h, m) = (minutes / 60, minutes % 60);
    if m == 0 {
        format!("about {}", plural(h, "hour"))
    } else {
        format!("about {} {}", plural(h, "hour"), plural(m, "minute"))
    }
}

/// Truncates `s` to at most `max` characters, ending with "…" when anything was cut. Never
/// splits a character.
pub fn truncate_chars(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    if max == 0 {
        return String::new();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    // Do not leave a dangling space before the ellipsis.
    let trimmed = out.trim_end().len();
    out.truncate(trimmed);
    out.push('…');
    out
}

const SIGN_OFF: &str = "SHERS emergency dispatch";

/// Renders `template` with what `ctx` knows. Plain text, calm wording, no placeholders.
pub fn render(template: Template, ctx: &MessageContext) -> RenderedMessage {
    let f = Fields::new(ctx);
    let (subject, paragraphs, sms) = match template {
        Template::IncidentCreated => incident_created(&f),
        Template::UnitAssigned => unit_assigned(&f),
        Template::ArrivedAtHospital => arrived_at_hospital(&f),
        Template::BillingOutcome => billing_outcome(&f),
    };
    let mut body = f.greeting();
    for p in paragraphs {
        body.push_str("\n\n");
        body.push_str(&p);
    }
    let _ = write!(body, "\n\nReference: {}\n\n{SIGN_OFF}\n", f.reference);
    RenderedMessage {
        subject,
        body,
        sms: truncate_chars(&sms, SMS_MAX_CHARS),
    }
}

type Parts = (String, Vec<String>, String);

fn incident_created(f: &Fields) -> Parts {
    let subject = format!("Emergency call received (ref {})", f.reference);
    let mut first = match &f.patient {
        Some(p) => format!("We have received an emergency call about {p}."),
        None => "We have received an emergency call.".to_owned(),
    };
    if let Some(loc) = &f.location {
        let _ = write!(first, " The reported location is {loc}.");
    }
    first.push_str(" Help is being arranged now.");
    let second = "You do not need to do anything right now. We will message you again when an \
                  ambulance has been assigned. Please keep the reference below if you contact us."
        .to_owned();
    let sms = match &f.patient {
        Some(p) => format!(
            "SHERS ref {}: we received an emergency call about {p}. Help is being arranged; \
             we will update you when an ambulance is assigned.",
            f.reference
        ),
        None => format!(
            "SHERS ref {}: we received an emergency call. Help is being arranged; we will \
             update you when an ambulance is assigned.",
            f.reference
        ),
    };
    (subject, vec![first, second], sms)
}

/// "Ambulance A12" / "An ambulance".
fn ambulance(f: &Fields) -> String {
    match &f.unit {
        Some(u) => format!("Ambulance {u}"),
        None => "An ambulance".to_owned(),
    }
}

fn unit_assigned(f: &Fields) -> Parts {
    let subject = format!("An ambulance is on its way (ref {})", f.reference);
    let mut first = ambulance(f);
    first.push_str(" has been assigned");
    if let Some(p) = &f.patient {
        let _ = write!(first, " to {p}");
    }
    match f.eta_s {
        Some(eta) => {
            let _ = write!(first, " and is expected in {}.", format_eta(eta));
        }
        None => first.push_str(" and is on its way."),
    }
    if let Some(loc) = &f.location {
        let _ = write!(first, " It is heading to {loc}.");
    }
    let second = "The crew will take good care of the patient. We will message you again when \
                  there is news."
        .to_owned();
    let mut sms = format!(
        "SHERS ref {}: {}",
        f.reference,
        lowercase_first(&ambulance(f))
    );
    match (&f.patient, f.eta_s) {
        (Some(p), Some(eta)) => {
            let _ = write!(
                sms,
                " is on its way to {p}, expected in {}.",
                format_eta(eta)
            );
        }
        (Some(p), None) => {
            let _ = write!(sms, " is on its way to {p}.");
        }
        (None, Some(eta)) => {
            let _ = write!(sms, " is on its way, expected in {}.", format_eta(eta));
        }
        (None, None) => sms.push_str(" is on its way."),
    }
    (subject, vec![first, second], sms)
}

fn arrived_at_hospital(f: &Fields) -> Parts {
    let subject = format!("Arrived at hospital (ref {})", f.reference);
    let who = f
        .patient
        .clone()
        .unwrap_or_else(|| "The patient".to_owned());
    let place = match &f.hospital {
        Some(h) => h.clone(),
        None => "hospital".to_owned(),
    };
    let first =
        format!("{who} has arrived at {place} and is now in the care of the hospital team.");
    let second = match &f.hospital {
        Some(h) => format!(
            "For updates on their condition, please contact {h} directly and mention the \
             reference below."
        ),
        None => "For updates on their condition, please contact the hospital directly and \
                 mention the reference below."
            .to_owned(),
    };
    let sms = format!(
        "SHERS ref {}: {} has arrived at {place} and is in the care of the hospital team.",
        f.reference,
        f.patient.as_deref().unwrap_or("the patient")
    );
    (subject, vec![first, second], sms)
}

fn billing_outcome(f: &Fields) -> Parts {
    let subject = format!(
        "Billing update for your emergency call (ref {})",
        f.reference
    );
    let about = match &f.patient {
        Some(p) => format!("the emergency call for {p}"),
        None => "this emergency call".to_owned(),
    };
    let first = match &f.billing_status {
        Some(s) => format!("The billing status for {about} is now: {s}."),
        None => format!("There is an update on the billing for {about}."),
    };
    let second = match &f.amount {
        Some(a) if f.amount_cents.is_some_and(|c| c > 0) => {
            format!("Amount due: {a}. Our billing team will send payment details separately.")
        }
        Some(_) => "Nothing is due from you.".to_owned(),
        None => "We will let you know separately if anything is due.".to_owned(),
    };
    let third =
        "If you have questions, please contact us and mention the reference below.".to_owned();
    let mut sms = format!("SHERS ref {}: billing update for {about}", f.reference);
    if let Some(s) = &f.billing_status {
        let _ = write!(sms, ": {s}");
    }
    sms.push('.');
    match &f.amount {
        Some(a) if f.amount_cents.is_some_and(|c| c > 0) => {
            let _ = write!(sms, " Amount due: {a}.");
        }
        Some(_) => sms.push_str(" Nothing is due."),
        None => sms.push_str(" Details follow by email or post."),
    }
    (subject, vec![first, second, third], sms)
}

/// "An ambulance" → "an ambulance"; "Ambulance A12" → "ambulance A12".
fn lowercase_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The idempotency key of one notification: the same (incident, recipient, template) always
/// gives the same key, so a retried or re-enqueued delivery is recognised by the outbox and by
/// providers. `"{template}-{64 hex}"`, a SHA-256 over length-prefixed fields: safe to log and
/// to put in headers, it reveals neither the recipient nor the incident. Callers pass the
/// recipient in its normalized form (E.164 phone number, lower-case email domain).
pub fn idempotency_key(incident_id: &str, recipient: &str, template: Template) -> String {
    let mut h = Sha256::new();
    for part in [incident_id, recipient.trim(), template.as_str()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let mut key = String::with_capacity(template.as_str().len() + 1 + 64);
    key.push_str(template.as_str());
    key.push('-');
    for b in digest {
        let _ = write!(key, "{b:02x}");
    }
    key
}

/// How long to wait before the next attempt after attempt number `attempt` (0-based) failed:
/// 2 s, 4 s, 8 s, … doubling up to [`BACKOFF_CAP`] (10 min), but never shorter than the
/// provider's `retry_after`, which is honoured even beyond the cap.
pub fn backoff(attempt: u32, retry_after: Option<Duration>) -> Duration {
    // 2 s · 2^9 = 1024 s already exceeds the cap; stopping the shift there avoids overflow.
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(9));
    let delay = exp.min(BACKOFF_CAP);
    match retry_after {
        Some(r) => delay.max(r),
        None => delay,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn full() -> MessageContext {
        MessageContext {
            patient_name: Some("Jane Doe".to_owned()),
            recipient_name: Some("John Doe".to_owned()),
            incident_reference: "INC-2024-0042".to_owned(),
            location_text: Some("12 High Street".to_owned()),
            unit_call_sign: Some("A12".to_owned()),
            eta_s: Some(420),
            hospital_name: Some("St Mary's Hospital".to_owned()),
            billing_status: Some("approved by insurer".to_owned()),
            amount_due_cents: Some(12_345),
            currency: Some("usd".to_owned()),
        }
    }

    fn minimal() -> MessageContext {
        MessageContext {
            incident_reference: "INC-7".to_owned(),
            ..MessageContext::default()
        }
    }

    fn assert_clean(m: &RenderedMessage) {
        for text in [&m.subject, &m.body, &m.sms] {
            for bad in [
                "None", "null", "Some(", "{", "}", "  ", " .", " ,", "..", "\n\n\n",
            ] {
                assert!(!text.contains(bad), "{bad:?} in {text:?}");
            }
            assert!(!text.trim().is_empty());
        }
        assert!(!m.subject.contains('\n'));
        assert!(!m.sms.contains('\n'));
        assert!(m.sms.chars().count() <= SMS_MAX_CHARS);
    }

    #[test]
    fn every_template_with_all_fields_mentions_them() {
        let ctx = full();
        for t in Template::ALL {
            let m = render(t, &ctx);
            assert_clean(&m);
            assert!(m.subject.contains("INC-2024-0042"), "{t}: {}", m.subject);
            assert!(m.body.contains("INC-2024-0042"), "{t}");
            assert!(m.sms.contains("INC-2024-0042"), "{t}");
            assert!(m.body.starts_with("Hello John Doe,"), "{t}");
            assert!(m.body.contains("Jane Doe"), "{t}");
            assert!(m.sms.contains("Jane Doe"), "{t}");
            // The subject shows on lock screens: no patient name.
            assert!(!m.subject.contains("Jane"), "{t}: {}", m.subject);
        }
        let created = render(Template::IncidentCreated, &ctx);
        assert!(
            created
                .body
                .contains("The reported location is 12 High Street.")
        );
        let assigned = render(Template::UnitAssigned, &ctx);
        assert!(assigned.body.contains(
            "Ambulance A12 has been assigned to Jane Doe and is expected in about 7 minutes."
        ));
        assert!(assigned.body.contains("It is heading to 12 High Street."));
        assert_eq!(
            assigned.sms,
            "SHERS ref INC-2024-0042: ambulance A12 is on its way to Jane Doe, expected in \
             about 7 minutes."
        );
        let arrived = render(Template::ArrivedAtHospital, &ctx);
        assert!(
            arrived
                .body
                .contains("Jane Doe has arrived at St Mary's Hospital")
        );
        assert!(
            arrived
                .body
                .contains("please contact St Mary's Hospital directly")
        );
        let billing = render(Template::BillingOutcome, &ctx);
        assert!(billing.body.contains("is now: approved by insurer."));
        assert!(billing.body.contains("Amount due: USD 123.45."));
        assert!(billing.sms.contains("Amount due: USD 123.45."));
    }

    #[test]
    fn every_template_with_no_optional_field_is_phrased_around() {
        for ctx in [
            minimal(),
            // Blank strings are as good as missing.
            MessageContext {
                patient_name: Some("  ".to_owned()),
                recipient_name: Some(String::new()),
                location_text: Some("\n".to_owned()),
                unit_call_sign: Some(" ".to_owned()),
                hospital_name: Some(String::new()),
                billing_status: Some(" \t".to_owned()),
                currency: Some(String::new()),
                ..minimal()
            },
        ] {
            for t in Template::ALL {
                let m = render(t, &ctx);
                assert_clean(&m);
                assert!(m.body.starts_with("Hello,\n\n"), "{t}: {}", m.body);
                assert!(m.body.contains("Reference: INC-7"), "{t}");
                assert!(m.sms.starts_with("SHERS ref INC-7: "), "{t}: {}", m.sms);
            }
        }
        let ctx = minimal();
        let assigned = render(Template::UnitAssigned, &ctx);
        assert!(
            assigned
                .body
                .contains("An ambulance has been assigned and is on its way."),
            "{}",
            assigned.body
        );
        assert_eq!(assigned.sms, "SHERS ref INC-7: an ambulance is on its way.");
        let created = render(Template::IncidentCreated, &ctx);
        assert!(
            created
                .body
                .contains("We have received an emergency call. Help is being arranged now.")
        );
        let arrived = render(Template::ArrivedAtHospital, &ctx);
        assert!(
            arrived
                .body
                .contains("The patient has arrived at hospital and")
        );
        assert!(arrived.sms.contains("the patient has arrived at hospital"));
        let billing = render(Template::BillingOutcome, &ctx);
        assert!(
            billing
                .body
                .contains("There is an update on the billing for this emergency call.")
        );
        assert!(
            billing
                .body
                .contains("We will let you know separately if anything is due.")
        );
    }

    #[test]
    fn partial_contexts_read_naturally() {
        let ctx = MessageContext {
            eta_s: Some(30),
            ..minimal()
        };
        let m = render(Template::UnitAssigned, &ctx);
        assert!(
            m.body
                .contains("An ambulance has been assigned and is expected in less than a minute.")
        );
        assert_eq!(
            m.sms,
            "SHERS ref INC-7: an ambulance is on its way, expected in less than a minute."
        );
        let ctx = MessageContext {
            unit_call_sign: Some("Medic 3".to_owned()),
            patient_name: Some("Ana".to_owned()),
            ..minimal()
        };
        let m = render(Template::UnitAssigned, &ctx);
        assert!(
            m.body
                .contains("Ambulance Medic 3 has been assigned to Ana and is on its way.")
        );
        assert_eq!(
            m.sms,
            "SHERS ref INC-7: ambulance Medic 3 is on its way to Ana."
        );

        // Amount without currency, zero due, a credit.
        let amount = |cents, currency: Option<&str>| {
            render(
                Template::BillingOutcome,
                &MessageContext {
                    amount_due_cents: Some(cents),
                    currency: currency.map(str::to_owned),
                    ..minimal()
                },
            )
        };
        let m = amount(5_000, None);
        assert_clean(&m);
        assert!(m.body.contains("Amount due: 50.00."));
        let m = amount(0, Some("EUR"));
        assert_clean(&m);
        assert!(m.body.contains("Nothing is due from you."));
        assert!(m.sms.contains("Nothing is due."));
        let m = amount(-250, Some("EUR"));
        assert_clean(&m);
        assert!(m.body.contains("Nothing is due from you."));
    }

    #[test]
    fn values_cannot_break_lines_or_subjects() {
        let ctx = MessageContext {
            incident_reference: " INC-9\r\nBcc: x ".to_owned(),
            patient_name: Some("Jane\n\nDoe".to_owned()),
            ..MessageContext::default()
        };
        let m = render(Template::IncidentCreated, &ctx);
        assert_eq!(m.subject, "Emergency call received (ref INC-9 Bcc: x)");
        assert!(m.body.contains("about Jane Doe."));
        let m = render(Template::IncidentCreated, &MessageContext::default());
        assert_clean(&m);
        assert!(m.body.contains("Reference: not yet assigned"));
    }

    #[test]
    fn money_is_formatted_from_cents() {
        assert_eq!(format_money(12_345, Some("USD")), "USD 123.45");
        assert_eq!(format_money(12_345, Some(" usd ")), "USD 123.45");
        assert_eq!(format_money(5, Some("EUR")), "EUR 0.05");
        assert_eq!(format_money(100, Some("GBP")), "GBP 1.00");
        assert_eq!(format_money(0, Some("USD")), "USD 0.00");
        assert_eq!(format_money(-1_999, Some("USD")), "USD -19.99");
        assert_eq!(format_money(7_00, None), "7.00");
        assert_eq!(format_money(7_00, Some("")), "7.00");
        assert_eq!(
            format_money(i64::MIN, Some("USD")),
            "USD -92233720368547758.08"
        );
        assert_eq!(
            format_money(i64::MAX, Some("USD")),
            "USD 92233720368547758.07"
        );
    }

    #[test]
    fn eta_in_words() {
        assert_eq!(format_eta(0), "less than a minute");
        assert_eq!(format_eta(59), "less than a minute");
        assert_eq!(format_eta(60), "about 1 minute");
        assert_eq!(format_eta(61), "about 2 minutes");
        assert_eq!(format_eta(420), "about 7 minutes");
        assert_eq!(format_eta(3_540), "about 59 minutes");
        assert_eq!(format_eta(3_600), "about 1 hour");
        assert_eq!(format_eta(3_900), "about 1 hour 5 minutes");
        assert_eq!(format_eta(7_260), "about 2 hours 1 minute");
        assert_eq!(format_eta(u32::MAX), "about 1193046 hours 29 minutes");
    }

    #[test]
    fn sms_is_truncated_at_a_char_boundary() {
        assert_eq!(truncate_chars("short", 10), "short");
        assert_eq!(truncate_chars("exactly10!", 10), "exactly10!");
        assert_eq!(truncate_chars("abcdefghijk", 5), "abcd…");
        assert_eq!(truncate_chars("abc defgh", 5), "abc…");
        assert_eq!(truncate_chars("ééééééé", 4), "ééé…");
        assert_eq!(truncate_chars("🚑🚑🚑", 2), "🚑…");
        assert_eq!(truncate_chars("abc", 0), "");

        // Long multi-byte values: the SMS stays within 320 characters, ends with the ellipsis,
        // and still starts with the reference.
        let ctx = MessageContext {
            patient_name: Some("Zoë-Åsa ".repeat(80)),
            unit_call_sign: Some("🚑".repeat(50)),
            eta_s: Some(600),
            ..minimal()
        };
        for t in Template::ALL {
            let m = render(t, &ctx);
            assert!(m.sms.chars().count() <= SMS_MAX_CHARS, "{t}");
            assert!(m.sms.starts_with("SHERS ref INC-7: "), "{t}");
            // Cut near the limit (a trailing space before the ellipsis is dropped).
            assert!(m.sms.chars().count() >= SMS_MAX_CHARS - 1, "{t}");
            assert!(m.sms.ends_with('…') && !m.sms.ends_with(" …"), "{t}");
        }
        // Normal messages are short enough for one or two segments untouched.
        for t in Template::ALL {
            let m = render(t, &full());
            assert!(!m.sms.ends_with('…'), "{t}: {}", m.sms);
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_honours_retry_after() {
        let s = Duration::from_secs;
        let expected = [2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600];
        for (attempt, want) in expected.into_iter().enumerate() {
            assert_eq!(backoff(attempt as u32, None), s(want), "attempt {attempt}");
        }
        assert_eq!(backoff(u32::MAX, None), s(600));
        assert_eq!(backoff(0, Some(s(3))), s(3));
        assert_eq!(backoff(3, Some(s(3))), s(16));
        assert_eq!(backoff(0, Some(Duration::from_millis(500))), s(2));
        // A provider asking for longer than the cap wins.
        assert_eq!(backoff(20, Some(s(3_600))), s(3_600));
        let total: Duration = (0..MAX_ATTEMPTS - 1).map(|a| backoff(a, None)).sum();
        assert_eq!(total, s(254));
    }

    #[test]
    fn idempotency_key_is_stable_and_reveals_nothing() {
        let k = idempotency_key("0190-incident", "+15551234567", Template::UnitAssigned);
        assert_eq!(
            k,
            idempotency_key("0190-incident", "+15551234567", Template::UnitAssigned)
        );
        assert_eq!(
            k,
            idempotency_key("0190-incident", " +15551234567 ", Template::UnitAssigned)
        );
        assert!(k.starts_with("unit_assigned-"));
        assert_eq!(k.len(), "unit_assigned-".len() + 64);
        assert!(!k.contains("5551234567") && !k.contains("incident"));
        let others = [
            idempotency_key("0190-incident", "+15551234568", Template::UnitAssigned),
            idempotency_key("0190-incidenu", "+15551234567", Template::UnitAssigned),
            idempotency_key("0190-incident", "+15551234567", Template::IncidentCreated),
            // Length prefixes: moving a character between fields changes the key.
            idempotency_key("0190-inciden", "t+15551234567", Template::UnitAssigned),
        ];
        for o in others {
            assert_ne!(k, o);
        }
    }

    #[test]
    fn wire_names_round_trip() {
        for t in Template::ALL {
            assert_eq!(Template::parse(t.as_str()), Some(t));
            assert_eq!(
                serde_json::to_string(&t).ok(),
                Some(format!("\"{}\"", t.as_str()))
            );
        }
        for c in Channel::ALL {
            assert_eq!(Channel::parse(c.as_str()), Some(c));
            assert_eq!(
                serde_json::to_string(&c).ok(),
                Some(format!("\"{}\"", c.as_str()))
            );
        }
        assert_eq!(Template::parse("UnitAssigned"), None);
        assert_eq!(Channel::parse("fax"), None);
        assert_eq!(
            serde_json::from_str::<Template>("\"arrived_at_hospital\"").ok(),
            Some(Template::ArrivedAtHospital)
        );
    }
}
