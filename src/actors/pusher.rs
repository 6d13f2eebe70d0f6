//! The crew pusher: an offer made to a unit whose crew has no live WebSocket is pushed to each
//! phone registered for the unit, through FCM ([`crate::integrations::push`]).
//!
//! Each token's push is tried until FCM takes it, with back-off honouring `Retry-After`, and
//! never past the offer's expiry (a lapsed offer is not worth a buzz). A token FCM no longer
//! knows is deleted. A push is a nudge, not the offer: the offer stands in the store and on the
//! crew's next connection whatever happens here, so failures are counted and logged, never
//! retried beyond the offer.
//!
//! Logs name the unit and the outcome, never a token.

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use chrono::Utc;

use crate::domain::ids::UnitId;
use crate::domain::push::retry_wait;
use crate::integrations::push::{FcmClient, OfferPush, PushError};
use crate::persistence::Db;
use crate::persistence::push_tokens::{self, PushToken};

/// Push `offer` to the phones of `unit_id`'s crew.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct PushOffer {
    /// The unit offered the job.
    pub unit_id: UnitId,
    /// What the push says.
    pub offer: OfferPush,
}

/// The actor that pushes offers to crews' phones.
pub struct CrewPusher {
    db: Db,
    fcm: Arc<FcmClient>,
}

impl CrewPusher {
    /// A pusher sending through `fcm`, reading tokens from `db`.
    pub fn new(db: Db, fcm: Arc<FcmClient>) -> Self {
        Self { db, fcm }
    }
}

impl Actor for CrewPusher {
    type Context = Context<Self>;
}

impl Handler<PushOffer> for CrewPusher {
    type Result = ();

    fn handle(&mut self, msg: PushOffer, _: &mut Self::Context) {
        let (db, fcm) = (self.db.clone(), self.fcm.clone());
        actix::spawn(async move { push_offer(&db, &fcm, msg).await });
    }
}

/// Pushes one offer to every token of its unit, at once.
async fn push_offer(db: &Db, fcm: &FcmClient, msg: PushOffer) {
    let unit = msg.unit_id.clone();
    let tokens = match db
        .run(move |mut conn| async move { push_tokens::for_unit(&mut conn, &unit).await })
        .await
    {
        Ok(tokens) => tokens,
        Err(e) => {
            metrics::counter!("shers_push_failures_total", "provider" => "fcm", "kind" => "store")
                .increment(1);
            tracing::warn!(unit.id = %msg.unit_id, error = %e, "push: the unit's tokens could not be read");
            return;
        }
    };
    if tokens.is_empty() {
        metrics::counter!("shers_push_no_token_total").increment(1);
        tracing::debug!(unit.id = %msg.unit_id, "push: no phone registered for the unit");
        return;
    }
    let sends = tokens
        .into_iter()
        .map(|token| push_one(db, fcm, token, &msg.offer));
    futures_util::future::join_all(sends).await;
}

/// Pushes `offer` to one token until FCM takes it, refuses it, or the offer lapses.
async fn push_one(db: &Db, fcm: &FcmClient, token: PushToken, offer: &OfferPush) {
    let mut failures: u32 = 0;
    loop {
        let started = Instant::now();
        let result = fcm
            .send(&token.token, token.platform, offer, Utc::now())
            .await;
        metrics::counter!("shers_push_calls_total", "provider" => "fcm").increment(1);
        metrics::histogram!("shers_push_seconds", "provider" => "fcm")
            .record(started.elapsed().as_secs_f64());
        let error = match result {
            Ok(_) => {
                metrics::counter!("shers_push_sent_total", "provider" => "fcm").increment(1);
                tracing::debug!(unit.id = %token.unit_id, offer.id = %offer.offer_id, "push: offer pushed");
                return;
            }
            Err(e) => e,
        };
        metrics::counter!("shers_push_failures_total", "provider" => "fcm", "kind" => error.kind())
            .increment(1);
        match error {
            PushError::Unregistered => {
                let gone = token.token.clone();
                let forgotten = db
                    .run(move |mut conn| async move { push_tokens::forget(&mut conn, &gone).await })
                    .await;
                tracing::info!(
                    unit.id = %token.unit_id,
                    platform = token.platform.as_str(),
                    deleted = forgotten.is_ok(),
                    "push: FCM no longer knows a phone of the unit; its token is deleted"
                );
                return;
            }
            PushError::Rejected { status, reason } => {
                tracing::warn!(unit.id = %token.unit_id, status, reason, "push: FCM refused the offer");
                return;
            }
            PushError::Transient {
                retry_after,
                reason,
            } => {
                failures = failures.saturating_add(1);
                let Some(wait) = retry_wait(failures, retry_after, Utc::now(), offer.expires_at)
                else {
                    metrics::counter!("shers_push_expired_total", "provider" => "fcm").increment(1);
                    tracing::warn!(
                        unit.id = %token.unit_id,
                        failures,
                        reason,
                        "push: FCM did not take the offer before it lapsed"
                    );
                    return;
                };
                tracing::debug!(unit.id = %token.unit_id, failures, wait_ms = wait.as_millis() as u64, reason, "push: retrying");
                actix_web::rt::time::sleep(wait).await;
            }
        }
    }
}
