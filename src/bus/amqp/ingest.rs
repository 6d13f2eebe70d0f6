//! `wearable.data` in: each delivery is one ingest body (SHERS's wearable shape, or anything
//! `POST /api/v1/vitals` accepts), applied through the device router with unknown devices
//! bound to the message's patient.
//!
//! - Applied (every reading accepted, or some accepted and the rest refused): acknowledged.
//! - Never applicable (not JSON, not a reading, an unknown patient, a device claimed by another
//!   patient, every reading invalid): rejected without requeue, so the broker dead-letters it
//!   once; the reason is logged (never the body: it holds patient data) and counted in
//!   `shers_amqp_rejected_total{reason}`.
//! - Transient (ingest at capacity, a device's state not stored, a shard moving): the delivery
//!   is held and retried with back-off; after a minute, or when the process stops, it is
//!   requeued. Prefetch bounds how many are held, so the broker keeps the backlog.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;

use super::{Backoff, Names, connect, declare_ingest, pause, within};
use crate::bus::{IngestDeps, LinkGuard, amqp_link};
use crate::config::AmqpSettings;
use crate::ingest::{Expect, IngestError, UnknownDevices, ingest};

/// How long a transiently failing delivery is retried before it goes back to the queue.
const HOLD_AT_MOST: Duration = Duration::from_secs(60);

/// Starts consuming `wearable.data` on its own task, reconnecting until the process closes.
pub fn spawn_ingest(settings: AmqpSettings, deps: IngestDeps) {
    // On the arbiter's local set: the device router and the database pool spawn local tasks.
    actix_web::rt::spawn(run(settings, deps));
}

async fn run(settings: AmqpSettings, mut deps: IngestDeps) {
    let mut link = amqp_link().want();
    let names = Names::of(&settings);
    let mut backoff = Backoff::new();
    loop {
        match consume(&settings, &names, &deps, &mut link, &mut backoff).await {
            Ok(()) => return,
            Err(e) => {
                link.set_up(false);
                metrics::counter!("shers_amqp_disconnects_total", "role" => "ingest").increment(1);
                tracing::warn!(error = %e, "AMQP ingest: no connection to the broker; reconnecting");
            }
        }
        if pause(backoff.next_wait(), &mut deps.closing).await {
            return;
        }
    }
}

/// One connection's life: declare, consume until the connection fails (an error) or the
/// process closes (`Ok`).
async fn consume(
    settings: &AmqpSettings,
    names: &Names,
    deps: &IngestDeps,
    link: &mut LinkGuard,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    if settings.url.is_none() {
        return Ok(());
    }
    let connection = connect(settings, "shers ingest").await?;
    let consumer = within("setting up the AMQP consumer", async {
        let channel = connection.create_channel().await?;
        declare_ingest(&channel, names).await?;
        channel
            .basic_qos(settings.prefetch, BasicQosOptions::default())
            .await?;
        channel
            .basic_consume(
                names.ingest_queue.as_str().into(),
                "shers-ingest".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
    })
    .await??;
    link.set_up(true);
    backoff.reset();
    tracing::info!(queue = %names.ingest_queue, "AMQP ingest: consuming");

    let mut closing = deps.closing.clone();
    let closed = async move {
        let _ = closing.wait_for(|c| *c).await;
    };
    // Each delivery is applied on a task of its own, at most `prefetch` at once. A lost
    // connection is made again at once: the deliveries still being applied (a transient
    // failure may hold one for up to a minute) finish on their own, their acknowledgements
    // fail with the old channel, and the broker's redelivery is answered from the device's
    // repeat memory.
    let prefetch = usize::from(settings.prefetch);
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(prefetch));
    let mut deliveries = std::pin::pin!(consumer.take_until(closed));
    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery?;
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let deps = deps.clone();
        actix_web::rt::spawn(async move {
            handle(&deps, delivery).await;
            drop(permit);
        });
    }
    if !*deps.closing.borrow() {
        anyhow::bail!("the broker ended the consumer");
    }
    // Stopping: the deliveries being applied get a few seconds to finish and be acknowledged;
    // the rest go back to the queue when the channel closes.
    let all = u32::try_from(prefetch).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(DRAIN, in_flight.acquire_many(all)).await;
    let _ = connection.close(200, "shers stopping".into()).await;
    Ok(())
}

/// How long a stopping consumer waits for the deliveries it is applying.
const DRAIN: Duration = Duration::from_secs(5);

/// What became of one delivery.
enum Verdict {
    Ack,
    DeadLetter(&'static str),
    Requeue,
}

/// Applies one delivery and answers the broker.
async fn handle(deps: &IngestDeps, delivery: Delivery) {
    let verdict = apply(deps, &delivery.data).await;
    let answered = match verdict {
        Verdict::Ack => {
            metrics::counter!("shers_amqp_consumed_total").increment(1);
            delivery.ack(BasicAckOptions::default()).await
        }
        Verdict::DeadLetter(reason) => {
            metrics::counter!("shers_amqp_rejected_total", "reason" => reason).increment(1);
            delivery.reject(BasicRejectOptions { requeue: false }).await
        }
        Verdict::Requeue => {
            metrics::counter!("shers_amqp_requeued_total").increment(1);
            delivery
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
        }
    };
    if let Err(e) = answered {
        // The channel is gone: the broker redelivers what was not acknowledged, and a
        // reading applied twice changes nothing.
        tracing::debug!(error = %e, "AMQP ingest: answer to the broker lost");
    }
}

/// Applies one body, retrying transient failures; never logs the body.
async fn apply(deps: &IngestDeps, body: &[u8]) -> Verdict {
    let started = Instant::now();
    let mut wait = Duration::from_millis(100);
    let mut closing = deps.closing.clone();
    loop {
        let expect = Expect {
            unknown: UnknownDevices::BindToPatient(&deps.db),
            device: None,
        };
        match ingest(deps.devices.as_ref(), &deps.gate, body, expect).await {
            Ok(answer) => {
                for refused in &answer.rejected {
                    metrics::counter!("shers_amqp_refused_readings_total", "reason" => refused.reason.label())
                        .increment(1);
                    tracing::warn!(
                        reason = refused.reason.label(),
                        index = refused.index,
                        "AMQP ingest: a reading of an acknowledged batch was refused"
                    );
                }
                return Verdict::Ack;
            }
            Err(IngestError::Body(e)) => {
                tracing::warn!(
                    reason = "invalid_body",
                    pointer = e.pointer(),
                    "AMQP ingest: dead-lettered a body that is not a reading"
                );
                return Verdict::DeadLetter("invalid_body");
            }
            Err(IngestError::Refused(rejected)) => {
                let reason = rejected.first().map_or("invalid", |r| r.reason.label());
                let pointers: Vec<&str> = rejected
                    .iter()
                    .flat_map(|r| r.errors.iter().map(|e| e.pointer.as_str()))
                    .collect();
                tracing::warn!(
                    reason,
                    pointers = ?pointers,
                    "AMQP ingest: dead-lettered a message none of whose readings can be applied"
                );
                return Verdict::DeadLetter(reason);
            }
            Err(e @ (IngestError::AtCapacity | IngestError::Unavailable)) => {
                if started.elapsed() >= HOLD_AT_MOST {
                    tracing::warn!(error = %e, "AMQP ingest: still failing; requeued");
                    return Verdict::Requeue;
                }
                tracing::debug!(error = %e, "AMQP ingest: transient failure; retrying");
                if pause(wait, &mut closing).await {
                    return Verdict::Requeue;
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}
