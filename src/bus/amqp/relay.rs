//! The publish relay: the event store, in sequence order, onto the exchange (an outbox relay;
//! docs/interop.md §1 "Publish").
//!
//! Each step reads a batch of committed events after the stored cursor, publishes every one
//! on `shers.event.<kind>` (the envelope `/api/v1/events` shows) and, where SHERS's services
//! expect it, a copy on their routing key with their field names ([`super::shers`]); waits
//! for the broker to confirm every message of the batch; and only then moves the cursor
//! (`bus_cursors`, name [`CURSOR`]) past it. So nothing is published that is not committed
//! (only committed rows are read, and commits become visible in sequence order) and nothing
//! committed is skipped: a process that dies after publishing and before storing the cursor
//! publishes the batch again, with the same `message_id`s, which consumers dedupe on
//! (at least once). A nacked message is published again; the cursor never passes it.
//!
//! The relay runs with the application: on a single node, or on the dispatch shard's holder,
//! whose fenced connections write the cursor, so a node that lost the lease cannot move it and
//! the next holder carries on from it. It wakes at once on a local commit or another node's
//! (the event store's notifications) and polls every [`POLL`] as a backstop; a lost broker is
//! reconnected with back-off, carrying on from the cursor.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel};

use super::shers::{self, Assignment, Copy, IncidentFacts, InvoiceFacts};
use super::{Backoff, Names, connect, declare_exchange, pause, within};
use crate::bus::{LinkGuard, amqp_link};
use crate::config::AmqpSettings;
use crate::domain::events::RecordedEvent;
use crate::domain::ids::{IncidentId, UnitId};
use crate::fault::crash_point;
use crate::persistence::{Db, DbConn, StoreError, cursors, events, fleet, incidents, invoices};

/// The cursor's name in `bus_cursors`.
pub const CURSOR: &str = "amqp";
/// Events read, published and confirmed per step.
const BATCH: i64 = 256;
/// The longest wait for new events when no commit woke the relay.
const POLL: Duration = Duration::from_secs(1);
/// Incidents whose facts are kept between steps (cleared when full).
const CACHE: usize = 4096;

/// Starts the relay on its own task (on the current arbiter: it uses the database's pooled
/// tasks), reconnecting until `closing` turns true.
pub fn spawn_relay(settings: AmqpSettings, db: Db, closing: tokio::sync::watch::Receiver<bool>) {
    actix_web::rt::spawn(run(settings, db, closing));
}

async fn run(settings: AmqpSettings, db: Db, mut closing: tokio::sync::watch::Receiver<bool>) {
    let mut link = amqp_link().want();
    let names = Names::of(&settings);
    let mut backoff = Backoff::new();
    let mut known = Known::default();
    loop {
        match connected(
            &settings,
            &names,
            &db,
            &mut link,
            &mut backoff,
            &mut known,
            &closing,
        )
        .await
        {
            Ok(()) => return,
            Err(e) => {
                link.set_up(false);
                metrics::counter!("shers_amqp_disconnects_total", "role" => "relay").increment(1);
                tracing::warn!(error = %e, "AMQP relay: no connection to the broker; reconnecting");
            }
        }
        known.clear();
        if pause(backoff.next_wait(), &mut closing).await {
            return;
        }
    }
}

/// One connection's life: publisher confirms on, the exchange declared, then relay until the
/// broker fails (an error) or the process closes (`Ok`).
async fn connected(
    settings: &AmqpSettings,
    names: &Names,
    db: &Db,
    link: &mut LinkGuard,
    backoff: &mut Backoff,
    known: &mut Known,
    closing: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if settings.url.is_none() {
        return Ok(());
    }
    let connection = connect(settings, "shers relay").await?;
    // A connection the broker closes (a restart) is noticed at once, not at the next publish:
    // `/readyz` says `connecting` while the broker is away, however quiet the event store.
    let events = connection.events_listener();
    let channel = within("setting up the AMQP relay's channel", async {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        declare_exchange(&channel, names).await?;
        Ok::<_, lapin::Error>(channel)
    })
    .await??;
    link.set_up(true);
    backoff.reset();
    tracing::info!(exchange = %names.exchange, "AMQP relay: publishing the event store");
    let relay = Relay {
        channel: &channel,
        exchange: &names.exchange,
        db,
    };
    relay.run(known, closing.clone(), events).await?;
    let _ = connection.close(200, "shers stopping".into()).await;
    Ok(())
}

/// How a step went.
enum Step {
    /// A full batch went out: there may be more right away.
    More,
    /// Everything committed when the batch was read is out.
    CaughtUp,
}

/// Why a step did not finish.
#[derive(Debug, thiserror::Error)]
enum StepError {
    /// The broker or the channel failed: reconnect.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker refused (nacked) a message: publish the batch again.
    #[error("the broker nacked {0} message(s)")]
    Nacked(usize),
    /// The database failed (or fenced this node off): retry after a pause.
    #[error("database: {0}")]
    Store(#[from] StoreError),
}

/// One message to publish.
struct Message {
    routing_key: String,
    message_id: String,
    correlation_id: Option<String>,
    body: Vec<u8>,
}

impl Message {
    fn properties(&self) -> BasicProperties {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(self.message_id.as_str().into())
            .with_app_id("shers".into());
        match &self.correlation_id {
            Some(id) => properties.with_correlation_id(id.as_str().into()),
            None => properties,
        }
    }
}

/// The relay over one channel.
struct Relay<'a> {
    channel: &'a Channel,
    exchange: &'a str,
    db: &'a Db,
}

impl Relay<'_> {
    /// Steps until the process closes (`Ok`) or the broker fails (a publish fails, or the
    /// connection reports an error or ends while the relay waits for commits).
    async fn run(
        &self,
        known: &mut Known,
        mut closing: tokio::sync::watch::Receiver<bool>,
        events: impl futures_util::Stream<Item = lapin::Event> + Unpin,
    ) -> anyhow::Result<()> {
        let lost = lost(events);
        tokio::pin!(lost);
        // Re-read from the store after any failure: the stored cursor is the truth.
        let mut cursor: Option<i64> = None;
        let mut retry = Duration::from_millis(200);
        loop {
            if *closing.borrow() {
                return Ok(());
            }
            // Armed before the read, so a commit between the read and the wait wakes us.
            let local = events::appended().notified();
            let elsewhere = events::appended_elsewhere().notified();
            tokio::pin!(local, elsewhere);
            local.as_mut().enable();
            elsewhere.as_mut().enable();
            match self.step(known, &mut cursor).await {
                Ok(Step::More) => {
                    retry = Duration::from_millis(200);
                    continue;
                }
                Ok(Step::CaughtUp) => retry = Duration::from_millis(200),
                Err(StepError::Broker(e)) => return Err(e.into()),
                Err(e) => {
                    metrics::counter!("shers_amqp_publish_failures_total").increment(1);
                    tracing::warn!(error = %e, "AMQP relay: a batch did not go out; retrying it");
                    cursor = None;
                    known.clear();
                    if pause(retry, &mut closing).await {
                        return Ok(());
                    }
                    retry = (retry * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
            tokio::select! {
                () = &mut local => {}
                () = &mut elsewhere => {}
                () = tokio::time::sleep(POLL) => {}
                e = &mut lost => return Err(e),
                _ = closing.wait_for(|c| *c) => return Ok(()),
            }
        }
    }

    /// Reads, publishes, confirms and stores one batch.
    async fn step(&self, known: &mut Known, cursor: &mut Option<i64>) -> Result<Step, StepError> {
        let from = match *cursor {
            Some(c) => c,
            None => {
                let c = self
                    .db
                    .run(|mut conn| async move { cursors::read(&mut conn, CURSOR).await })
                    .await?;
                *cursor = Some(c);
                c
            }
        };
        let (batch, head) = self
            .db
            .run(move |mut conn| async move {
                let batch = events::read_since(&mut conn, from, BATCH).await?;
                let head = events::last_seq(&mut conn).await?;
                Ok::<_, StoreError>((batch, head))
            })
            .await?;
        let Some(last) = batch.last().map(|e| e.seq) else {
            set_lag(head.saturating_sub(from), None);
            return Ok(Step::CaughtUp);
        };
        set_lag(head.saturating_sub(from), batch.first().map(|e| e.at));
        let messages = self.compose(known, batch.clone()).await?;
        self.publish(&messages).await?;
        crash_point("bus.after_publish");
        self.db
            .run(move |mut conn| async move {
                cursors::advance(&mut conn, CURSOR, last, Utc::now()).await
            })
            .await?;
        *cursor = Some(last);
        for m in &messages {
            metrics::counter!("shers_amqp_published_total", "family" => shers::family(&m.routing_key))
                .increment(1);
        }
        set_lag(head.saturating_sub(last), None);
        Ok(if batch.len() as i64 >= BATCH {
            Step::More
        } else {
            Step::CaughtUp
        })
    }

    /// Publishes `messages` in order and waits for the broker to confirm each.
    async fn publish(&self, messages: &[Message]) -> Result<(), StepError> {
        let mut confirms = Vec::with_capacity(messages.len());
        for m in messages {
            let confirm = self
                .channel
                .basic_publish(
                    self.exchange.into(),
                    m.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &m.body,
                    m.properties(),
                )
                .await?;
            confirms.push(confirm);
        }
        let mut nacked = 0;
        for confirm in confirms {
            match confirm.await? {
                Confirmation::Ack(_) => {}
                Confirmation::Nack(_) | Confirmation::NotRequested => nacked += 1,
            }
        }
        if nacked > 0 {
            return Err(StepError::Nacked(nacked));
        }
        Ok(())
    }

    /// The messages of `batch`: each event's envelope, then its SHERS copy if it has one.
    async fn compose(
        &self,
        known: &mut Known,
        batch: Vec<RecordedEvent>,
    ) -> Result<Vec<Message>, StepError> {
        let mut out = Vec::with_capacity(batch.len() * 2);
        for event in batch {
            let copy = match Copy::of(&event) {
                Some(kind) => self.copy(known, kind, &event).await?,
                None => None,
            };
            let envelope = serde_json::to_vec(&event)
                .map_err(|e| StoreError::Corrupt(format!("event {}: {e}", event.seq)))?;
            out.push(Message {
                routing_key: format!("shers.event.{}", event.kind),
                message_id: format!("shers-{}", event.seq),
                correlation_id: event.incident_id.map(|i| i.to_string()),
                body: envelope,
            });
            if let Some((kind, incident, body)) = copy {
                let key = kind.routing_key();
                out.push(Message {
                    routing_key: key.to_owned(),
                    message_id: format!("shers-{}-{key}", event.seq),
                    correlation_id: incident.map(|i| i.to_string()),
                    body: serde_json::to_vec(&body)
                        .map_err(|e| StoreError::Corrupt(format!("event {}: {e}", event.seq)))?,
                });
            }
        }
        Ok(out)
    }

    /// The SHERS copy of `event` (`kind`): its incident (the correlation id) and body; `None`
    /// when the event lacks what the copy needs (an incident SHERS never stored, say).
    async fn copy(
        &self,
        known: &mut Known,
        kind: Copy,
        event: &RecordedEvent,
    ) -> Result<Option<(Copy, Option<IncidentId>, serde_json::Value)>, StoreError> {
        if matches!(kind, Copy::TriageEmergency | Copy::TriageAbnormal) {
            let patient = event
                .data
                .get("patient_id")
                .and_then(serde_json::Value::as_str)
                .map(crate::domain::ids::PatientId::from);
            let open = match patient {
                Some(p) => {
                    self.db
                        .run(move |mut conn| async move {
                            incidents::open_for_patient(&mut conn, &p).await
                        })
                        .await?
                }
                None => None,
            };
            return Ok(Some((kind, open, shers::triage(event, open))));
        }
        let Some(id) = event.incident_id else {
            return Ok(None);
        };
        let Some(facts) = known.incident(self.db, id).await? else {
            return Ok(None);
        };
        let body = match kind {
            Copy::UnitAssigned => {
                let unit = event
                    .data
                    .get("unit_id")
                    .and_then(serde_json::Value::as_str)
                    .map(UnitId::from);
                let Some(unit) = unit else {
                    return Ok(None);
                };
                let manual = event.data.get("manual") == Some(&serde_json::Value::Bool(true));
                let assignment = assignment_of(self.db, id, unit, manual).await?;
                known.assignments.insert(id, assignment.clone());
                shers::unit_assigned(event, id, &facts, &assignment)
            }
            Copy::BillingCompleted | Copy::BillingFailed => {
                let invoice = self
                    .db
                    .run(move |mut conn| async move { invoices::for_incident(&mut conn, id).await })
                    .await?
                    .map(|i| InvoiceFacts {
                        id: i.id,
                        amount_cents: i.saga.amount_cents,
                        payment_reference: i.saga.payment.map(|p| p.intent_id),
                    });
                shers::billing(event, id, &facts, invoice.as_ref())
            }
            _ => {
                let (assignment, hospital) = match known.assignments.get(&id).cloned() {
                    Some(a) if kind != Copy::ArrivedAtHospital => (a, None),
                    cached => {
                        let Some((incident, _)) = self
                            .db
                            .run(
                                move |mut conn| async move { incidents::find(&mut conn, id).await },
                            )
                            .await?
                        else {
                            return Ok(None);
                        };
                        let assignment = match (cached, incident.assigned_unit_id) {
                            (Some(a), _) => a,
                            (None, Some(unit)) => {
                                let a = assignment_of(self.db, id, unit, false).await?;
                                known.assignments.insert(id, a.clone());
                                a
                            }
                            (None, None) => return Ok(None),
                        };
                        (assignment, incident.hospital_id)
                    }
                };
                match kind {
                    Copy::Enroute => shers::enroute(event, id, &facts, &assignment),
                    Copy::PatientOnboard => shers::patient_onboard(event, id, &facts, &assignment),
                    _ => shers::arrived_at_hospital(
                        event,
                        id,
                        &facts,
                        &assignment,
                        hospital.as_ref(),
                    ),
                }
            }
        };
        if matches!(kind, Copy::BillingCompleted | Copy::BillingFailed) {
            known.forget(id);
        }
        Ok(Some((kind, Some(id), body)))
    }
}

/// Waits for the connection to fail: the error it reports, or the end of its events.
async fn lost(mut events: impl futures_util::Stream<Item = lapin::Event> + Unpin) -> anyhow::Error {
    use futures_util::StreamExt as _;
    while let Some(event) = events.next().await {
        if let lapin::Event::Error(e) = event {
            return e.into();
        }
    }
    anyhow::anyhow!("the connection to the broker ended")
}

/// The unit on incident `id` and the offer it accepted (none when assigned by hand).
async fn assignment_of(
    db: &Db,
    id: IncidentId,
    unit: UnitId,
    manual: bool,
) -> Result<Assignment, StoreError> {
    if manual {
        return Ok(Assignment {
            unit_id: unit,
            dispatch_id: None,
            eta_s: None,
        });
    }
    let offers = db
        .run(move |mut conn| async move { fleet::offers_for(&mut conn, id).await })
        .await?;
    let accepted = offers
        .into_iter()
        .rev()
        .find(|o| o.status == "accepted" && o.unit_id == unit);
    Ok(Assignment {
        dispatch_id: accepted.as_ref().map(|o| o.id),
        eta_s: accepted.map(|o| o.eta_s),
        unit_id: unit,
    })
}

/// What the relay remembers of incidents between events (cheap to rebuild: cleared on any
/// failure and when it grows past [`CACHE`]).
#[derive(Default)]
struct Known {
    incidents: HashMap<IncidentId, IncidentFacts>,
    assignments: HashMap<IncidentId, Assignment>,
}

impl Known {
    fn clear(&mut self) {
        self.incidents.clear();
        self.assignments.clear();
    }

    fn forget(&mut self, id: IncidentId) {
        self.incidents.remove(&id);
        self.assignments.remove(&id);
    }

    /// The patient and location of incident `id` (they never change), from its projection.
    async fn incident(
        &mut self,
        db: &Db,
        id: IncidentId,
    ) -> Result<Option<IncidentFacts>, StoreError> {
        if let Some(facts) = self.incidents.get(&id) {
            return Ok(Some(facts.clone()));
        }
        let found = db
            .run(move |mut conn: DbConn| async move { incidents::find(&mut conn, id).await })
            .await?;
        let Some((incident, _)) = found else {
            return Ok(None);
        };
        if self.incidents.len() >= CACHE || self.assignments.len() >= CACHE {
            self.clear();
        }
        let facts = IncidentFacts {
            patient_id: incident.patient_id,
            location: incident.location,
        };
        self.incidents.insert(id, facts.clone());
        Ok(Some(facts))
    }
}

/// The relay's lag: events committed and not yet confirmed, and the age of the oldest of
/// them (0 when none, or not known yet).
fn set_lag(events: i64, oldest: Option<chrono::DateTime<Utc>>) {
    metrics::gauge!("shers_amqp_relay_lag_events").set(events as f64);
    let seconds = match oldest {
        Some(at) if events > 0 => (Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0,
        _ => 0.0,
    };
    metrics::gauge!("shers_amqp_relay_lag_seconds").set(seconds);
}
