//! Event-store wake-ups between nodes over Redis pub/sub (`shers:events`).
//!
//! The event store is the bus: every node's tailers (the console broadcaster) read it in
//! sequence order. Within a process a commit wakes them at once; across nodes a commit on one
//! node (a wearable's status change on the node serving its shard) would otherwise be seen by
//! the dispatch holder's tail only at its next poll. So each node publishes its own node id
//! after its commits (coalesced: one message per burst), and every other node that hears it
//! wakes its tailers. Only wake-ups travel over Redis, never events: with Redis down the tails
//! poll, and nothing is lost, only later.

use std::time::Duration;

use tokio::sync::mpsc;

use super::lease::connect_redis;
use crate::persistence::events;

/// The Redis channel of event-store wake-ups.
pub const EVENTS_CHANNEL: &str = "shers:events";

/// How long a publish may take before it is given up (the tails poll anyway).
const PUBLISH_BUDGET: Duration = Duration::from_millis(250);

/// The least time between two publishes: a node committing thousands of times a second sends
/// at most a thousand wake-ups, each covering every commit since the last.
const SPACING: Duration = Duration::from_millis(1);

/// How often a node without a Redis connection tries to open one.
const RECONNECT_EVERY: Duration = Duration::from_secs(2);

/// Starts publishing this node's commits and waking its tailers on the others' (on the
/// current runtime, until the process ends).
pub fn spawn(redis_url: String, node_id: String) {
    actix_web::rt::spawn(async move {
        // Unbounded because Redis's push sender must never block the connection's reader. What
        // arrives is bounded by what the nodes publish (at most one wake-up a millisecond
        // each, [`SPACING`]), and the task below drains it at once: each push costs a compare
        // and a notify.
        let (pushes, mut heard) = mpsc::unbounded_channel::<redis::PushInfo>();
        let own = node_id.clone();
        actix_web::rt::spawn(async move {
            while let Some(push) = heard.recv().await {
                if let Some(from) = sender(&push)
                    && from != own.as_bytes()
                {
                    metrics::counter!("shers_event_wakeups_total", "direction" => "received")
                        .increment(1);
                    events::appended_elsewhere().notify_waiters();
                }
            }
        });
        let mut redis = None;
        // Created before each publish, so a commit during the publish is not missed.
        let mut next = Box::pin(events::appended().notified());
        let mut last = tokio::time::Instant::now();
        loop {
            if redis.is_none() {
                redis = connect_redis(&redis_url, pushes.clone(), EVENTS_CHANNEL).await;
                if redis.is_none() {
                    tokio::time::sleep(RECONNECT_EVERY).await;
                    continue;
                }
            }
            next.as_mut().await;
            tokio::time::sleep_until(last + SPACING).await;
            next = Box::pin(events::appended().notified());
            last = tokio::time::Instant::now();
            let Some(manager) = redis.as_mut() else {
                continue;
            };
            let mut publish = redis::cmd("PUBLISH");
            publish.arg(EVENTS_CHANNEL).arg(&node_id);
            match tokio::time::timeout(PUBLISH_BUDGET, publish.query_async::<i64>(manager)).await {
                Ok(Ok(_)) => {
                    metrics::counter!("shers_event_wakeups_total", "direction" => "sent")
                        .increment(1);
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "event wake-up not published"),
                Err(_) => tracing::debug!("event wake-up publish timed out"),
            }
        }
    });
}

/// The payload (a node id) of a message pushed on [`EVENTS_CHANNEL`].
fn sender(push: &redis::PushInfo) -> Option<&[u8]> {
    if push.kind != redis::PushKind::Message {
        return None;
    }
    match push.data.as_slice() {
        [
            redis::Value::BulkString(channel),
            redis::Value::BulkString(payload),
        ] if channel.as_slice() == EVENTS_CHANNEL.as_bytes() => Some(payload.as_slice()),
        _ => None,
    }
}
