//! `Notifier`: the outbox worker. It delivers queued next-of-kin notifications over SMS, email
//! or a signed webhook, at least once (each carries its idempotency key), retrying transient
//! failures with capped exponential backoff (honouring `Retry-After`) and recording the final
//! outcome as `notification.sent` / `notification.failed`. Message content, phone numbers and
//! addresses never reach the logs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::Utc;

use crate::domain::events::{DeliveryOutcome, ExpectedVersion, NotificationEvent};
use crate::domain::notify::{Channel, MAX_ATTEMPTS, MessageContext, Template, backoff, render};
use crate::integrations::notify::{DeliveryError, Notifier, Outgoing};
use crate::persistence::incidents::{self as store, DueNotification};
use crate::persistence::{Db, StoreError, events, patients};

/// How often the outbox is polled (a `Kick` delivers at once).
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Notifications handled per poll.
pub const BATCH: i64 = 50;

/// The provider for each channel (`None`: not configured; the message is logged, not sent).
#[derive(Clone)]
pub struct Channels {
    /// SMS provider.
    pub sms: Option<Arc<dyn Notifier>>,
    /// Email provider.
    pub email: Option<Arc<dyn Notifier>>,
    /// The signed webhook channel, when configured.
    pub webhook: Option<Arc<dyn Notifier>>,
    /// The Amazon SNS topic (`notify.sns_topic_arn`), when configured.
    pub sns: Option<Arc<dyn Notifier>>,
    /// Where messages for unconfigured channels go (the log-only sink).
    pub fallback: Arc<dyn Notifier>,
}

/// The outbox worker.
pub struct NotifierActor {
    db: Db,
    channels: Channels,
    busy: bool,
}

impl NotifierActor {
    /// A worker over `db` delivering through `channels`.
    pub fn new(db: Db, channels: Channels) -> Self {
        Self {
            db,
            channels,
            busy: false,
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        self.busy = true;
        let (db, channels) = (self.db.clone(), self.channels.clone());
        ctx.spawn(
            async move {
                if let Err(e) = deliver_due(&db, &channels).await {
                    tracing::warn!(error = %e, "notification outbox pass failed");
                }
            }
            .into_actor(self)
            .map(|(), act, _| act.busy = false),
        );
    }
}

impl Actor for NotifierActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(POLL_INTERVAL, |act, ctx| act.tick(ctx));
    }
}

/// Deliver due notifications now.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Kick;

impl Handler<Kick> for NotifierActor {
    type Result = ();

    fn handle(&mut self, _: Kick, ctx: &mut Self::Context) {
        self.tick(ctx);
    }
}

/// The message's context and the incident's patient id. A topic message greets no one by
/// name: it goes to every subscriber.
async fn context_for(
    db: &Db,
    n: &DueNotification,
    channel: Channel,
    template: Template,
) -> Result<(MessageContext, Option<String>), StoreError> {
    let (id, recipient) = (n.incident_id, n.recipient_name.clone());
    db.run(move |mut conn| async move {
        let mut ctx = MessageContext {
            recipient_name: (channel != Channel::Sns).then_some(recipient),
            ..MessageContext::default()
        };
        let mut patient_id = None;
        if let Some((incident, _)) = store::find(&mut conn, id).await? {
            ctx.incident_reference = incident.reference;
            patient_id = incident.patient_id.as_ref().map(|p| p.to_string());
            if let Some(pid) = &incident.patient_id {
                ctx.patient_name = patients::find_patient(&mut conn, pid)
                    .await?
                    .map(|p| p.name);
            }
            match template {
                Template::UnitAssigned => {
                    let offers = crate::persistence::fleet::offers_for(&mut conn, id).await?;
                    if let Some(o) = offers.iter().find(|o| o.status == "accepted") {
                        ctx.eta_s = Some(o.eta_s);
                        ctx.unit_call_sign = Some(o.unit_id.0.clone());
                    }
                }
                Template::BillingOutcome => {
                    if let Some(inv) =
                        crate::persistence::invoices::for_incident(&mut conn, id).await?
                    {
                        let saga = inv.saga;
                        let paid = saga.status == crate::domain::billing::InvoiceStatus::Paid;
                        ctx.billing_status =
                            Some(if paid { "paid" } else { "not completed" }.to_owned());
                        ctx.amount_due_cents = Some(if paid {
                            0
                        } else {
                            saga.insurance
                                .as_ref()
                                .map_or(saga.amount_cents, |d| d.patient_due_cents)
                        });
                        ctx.currency = Some(saga.currency.to_uppercase());
                    }
                }
                Template::IncidentCreated | Template::ArrivedAtHospital => {}
            }
        }
        if ctx.incident_reference.is_empty() {
            ctx.incident_reference = id.to_string();
        }
        Ok((ctx, patient_id))
    })
    .await
}

/// What an attempt leaves behind: the row's status, when to try next, the last error and
/// `delivered` (`Some` when this attempt is final: `true` sent, `false` given up; `None` to
/// retry with backoff).
fn outcome_of(
    result: Result<String, DeliveryError>,
    attempts: i32,
    now: chrono::DateTime<Utc>,
) -> (
    &'static str,
    chrono::DateTime<Utc>,
    Option<String>,
    Option<bool>,
) {
    match result {
        Ok(_) => ("sent", now, None, Some(true)),
        Err(DeliveryError::Transient {
            retry_after,
            reason,
        }) => {
            if u32::try_from(attempts).unwrap_or(u32::MAX) >= MAX_ATTEMPTS {
                ("failed", now, Some(reason), Some(false))
            } else {
                let wait = backoff(u32::try_from(attempts).unwrap_or(0), retry_after);
                let next = now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX);
                ("queued", next, Some(reason), None)
            }
        }
        Err(DeliveryError::Permanent { reason }) => ("failed", now, Some(reason), Some(false)),
    }
}

/// Per provider and channel: `shers_notification_calls_total`,
/// `shers_notification_failures_total{kind}` (`transient`/`permanent`) and
/// `shers_notification_call_seconds`.
fn record_call(
    provider: &'static str,
    channel: Channel,
    result: &Result<String, DeliveryError>,
    took: Duration,
) {
    let channel = channel.as_str();
    metrics::counter!("shers_notification_calls_total", "provider" => provider, "channel" => channel)
        .increment(1);
    if let Err(e) = result {
        metrics::counter!(
            "shers_notification_failures_total",
            "provider" => provider,
            "channel" => channel,
            "kind" => e.kind()
        )
        .increment(1);
    }
    metrics::histogram!("shers_notification_call_seconds", "provider" => provider, "channel" => channel)
        .record(took.as_secs_f64());
}

async fn deliver_due(db: &Db, channels: &Channels) -> Result<(), StoreError> {
    let due = db
        .run(|mut conn| async move { store::due_notifications(&mut conn, Utc::now(), BATCH).await })
        .await?;
    for n in due {
        let channel = Channel::parse(&n.channel).unwrap_or(Channel::Sms);
        let template = Template::parse(&n.template).unwrap_or(Template::IncidentCreated);
        let (ctx, patient_id) = context_for(db, &n, channel, template).await?;
        let rendered = render(template, &ctx);
        let provider = match channel {
            Channel::Sms => channels.sms.clone(),
            Channel::Email => channels.email.clone(),
            Channel::Webhook => channels.webhook.clone(),
            Channel::Sns => channels.sns.clone(),
        }
        .unwrap_or_else(|| channels.fallback.clone());
        let outgoing = Outgoing {
            channel,
            to: n.address.clone(),
            subject: rendered.subject,
            // A topic's subscribers may read it as a text message: the short form.
            body: if matches!(channel, Channel::Sms | Channel::Sns) {
                rendered.sms
            } else {
                rendered.body
            },
            idempotency_key: n.idempotency_key.clone(),
            incident_id: n.incident_id.to_string(),
            template: n.template.clone(),
            patient_id,
        };
        // Not sent by a node that lost dispatch (it would be sent twice).
        db.run(
            |mut conn| async move { crate::persistence::cluster::confirm_lease(&mut conn).await },
        )
        .await?;
        crate::fault::crash_point("notify.before_send");
        let started = Instant::now();
        let result = provider.send(&outgoing).await;
        record_call(provider.provider(), channel, &result, started.elapsed());
        crate::fault::crash_point("notify.after_send");
        let attempts = n.attempts.saturating_add(1);
        let now = Utc::now();
        let (status, next, error, delivered) = outcome_of(result, attempts, now);
        tracing::info!(notification.id = %n.id, notification.channel = %n.channel, notification.status = status, attempts, "notification attempt");
        let (id, incident, channel_name, template_name) = (
            n.id.clone(),
            n.incident_id,
            n.channel.clone(),
            n.template.clone(),
        );
        db.run(move |mut conn| async move {
            conn.write_transaction(async |tx| {
                store::record_attempt(tx, &id, status, attempts, next, error.as_deref(), now)
                    .await?;
                if let Some(delivered) = delivered {
                    let outcome = DeliveryOutcome {
                        notification_id: &id,
                        incident_id: incident,
                        channel: &channel_name,
                        template: &template_name,
                        attempts,
                        reason: error.as_deref(),
                    };
                    let event = if delivered {
                        NotificationEvent::Sent(outcome)
                    } else {
                        NotificationEvent::Failed(outcome)
                    };
                    let stream = format!("notifications-{incident}");
                    events::append(tx, &stream, ExpectedVersion::Any, &[event.to_new()], now)
                        .await?;
                }
                Ok::<_, StoreError>(())
            })
            .await
        })
        .await?;
        crate::fault::crash_point("notify.after_mark");
    }
    Ok(())
}
