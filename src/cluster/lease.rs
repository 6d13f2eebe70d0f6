//! The lease thread: membership, the dispatch shard's lease, and who owns it.
//!
//! It runs on a thread and runtime of its own, with database connections of its own, so a
//! busy actor system or HTTP worker never delays a renewal: a late renewal is a lost lease.
//! Every third of the lease it heartbeats, renews the lease it holds (or exits the process
//! when it no longer holds it), tries to take the lease when nobody holds it, and refreshes the
//! owner the front forwards to. Redis carries wake-ups between nodes (`shers:cluster`): a
//! released or taken lease is seen by the others at once instead of at their next round.
//! Without Redis, or while it is down, the rounds alone keep everything correct, only slower.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot};

use super::{ClusterState, LOST_LEASE_EXIT};
use crate::config::Settings;
use crate::persistence::cluster::{self, DISPATCH_SHARD};
use crate::persistence::{Db, DbConn, StoreError};

/// The Redis channel for cluster wake-ups.
pub const CHANNEL: &str = "shers:cluster";

/// What the lease thread tells the node.
#[derive(Debug)]
pub enum Event {
    /// This node now holds the dispatch shard at `epoch`: start serving it.
    Acquired {
        /// The fencing epoch.
        epoch: i64,
    },
}

/// What the node tells the lease thread.
#[derive(Debug)]
pub enum Control {
    /// Release the lease (if held), leave the cluster, answer, and end the thread.
    Leave(oneshot::Sender<()>),
}

/// Starts the lease thread.
pub fn spawn(
    settings: Settings,
    state: Arc<ClusterState>,
    events: mpsc::UnboundedSender<Event>,
    control: mpsc::UnboundedReceiver<Control>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("shers-lease".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "no runtime for the lease thread");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                if let Err(e) = run(settings, state, events, control).await {
                    tracing::error!(error = ?e, "the lease thread stopped");
                }
            });
        })
        .context("starting the lease thread")
}

struct Lease {
    db: Db,
    state: Arc<ClusterState>,
    lease_ms: i64,
    version: &'static str,
    /// The epoch held, and when it was last renewed (by this node's clock, which only
    /// decides when to give up, never whether a write is allowed).
    held: Option<(i64, Instant)>,
    redis: Option<redis::aio::ConnectionManager>,
    redis_url: Option<String>,
    pushes: mpsc::UnboundedSender<redis::PushInfo>,
    rounds_without_redis: u64,
}

async fn run(
    settings: Settings,
    state: Arc<ClusterState>,
    events: mpsc::UnboundedSender<Event>,
    mut control: mpsc::UnboundedReceiver<Control>,
) -> anyhow::Result<()> {
    let mut db_settings = settings.database.clone();
    db_settings.pool_size = 2;
    let db = Db::connect(&db_settings)
        .await
        .context("opening the lease thread's database connections")?;
    let (push_tx, mut pushes) = mpsc::unbounded_channel();
    let redis_url = settings.redis.url.as_ref().map(|u| u.expose().clone());
    let redis = match &redis_url {
        Some(url) => connect_redis(url, push_tx.clone()).await,
        None => None,
    };
    let mut lease = Lease {
        db,
        lease_ms: i64::try_from(state.lease.as_millis()).unwrap_or(3_000),
        state,
        version: env!("CARGO_PKG_VERSION"),
        held: None,
        redis,
        redis_url,
        pushes: push_tx,
        rounds_without_redis: 0,
    };
    lease.join().await?;
    let tick = lease.state.lease / 3;
    loop {
        lease.round(&events).await;
        lease.state.set_joined();
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            () = lease.state.wake.notified() => {}
            Some(_) = pushes.recv() => {}
            command = control.recv() => {
                lease.leave().await;
                if let Some(Control::Leave(done)) = command {
                    let _ = done.send(());
                }
                return Ok(());
            }
        }
    }
}

/// A RESP3 connection manager subscribed to [`CHANNEL`], re-subscribing after reconnects.
/// `None` (with a warning) when Redis cannot be reached now; the cluster still works.
async fn connect_redis(
    url: &str,
    pushes: mpsc::UnboundedSender<redis::PushInfo>,
) -> Option<redis::aio::ConnectionManager> {
    let url = if url.contains("protocol=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    };
    let client = redis::Client::open(url.as_str())
        .inspect_err(|e| tracing::warn!(error = %e, "invalid REDIS_URL"))
        .ok()?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_push_sender(pushes)
        .set_automatic_resubscription()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)));
    let mut manager = match redis::aio::ConnectionManager::new_with_config(client, config).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "Redis unreachable: cluster wake-ups fall back to polling");
            return None;
        }
    };
    if let Err(e) = manager.subscribe(CHANNEL).await {
        tracing::warn!(error = %e, "cannot subscribe to cluster wake-ups; polling instead");
    }
    Some(manager)
}

impl Lease {
    async fn conn(&self) -> Result<DbConn, StoreError> {
        self.db.conn().await
    }

    async fn join(&mut self) -> anyhow::Result<()> {
        let mut conn = self.conn().await?;
        cluster::join(
            &mut conn,
            &self.state.node_id,
            &self.state.address,
            self.version,
        )
        .await
        .context("joining the cluster")?;
        let (key, address) = (self.heartbeat_key(), self.state.address.clone());
        self.announce(&key, &address, 3).await;
        Ok(())
    }

    fn heartbeat_key(&self) -> String {
        format!("shers:node:{}", self.state.node_id)
    }

    /// One round: heartbeat, renew or take the lease, refresh the owner.
    async fn round(&mut self, events: &mpsc::UnboundedSender<Event>) {
        let Ok(mut conn) = self.conn().await else {
            self.give_up_if_expired();
            return;
        };
        // The renewal first: nothing else in the round may delay it.
        match self.held {
            Some((epoch, _)) => self.renew(&mut conn, epoch).await,
            None => self.try_take(&mut conn, events).await,
        }
        if let Err(e) = cluster::heartbeat(&mut conn, &self.state.node_id).await {
            tracing::warn!(error = %e, "cluster heartbeat failed");
        }
        match cluster::owner(&mut conn, DISPATCH_SHARD).await {
            Ok(owner) => self.state.set_owner(owner),
            Err(e) => tracing::warn!(error = %e, "cannot read the dispatch shard's owner"),
        }
        let (key, address) = (self.heartbeat_key(), self.state.address.clone());
        self.announce(&key, &address, 3).await;
    }

    async fn renew(&mut self, conn: &mut DbConn, epoch: i64) {
        let started = Instant::now();
        match cluster::renew(
            conn,
            DISPATCH_SHARD,
            &self.state.node_id,
            epoch,
            self.lease_ms,
        )
        .await
        {
            Ok(true) => {
                metrics::histogram!("shers_lease_renew_seconds")
                    .record(started.elapsed().as_secs_f64());
                self.held = Some((epoch, started));
            }
            Ok(false) => {
                // Taken over while this node was paused or cut off: the fence already refuses
                // its writes; stop before it does anything else.
                tracing::error!(
                    shard = DISPATCH_SHARD,
                    epoch,
                    "lost the dispatch shard's lease; exiting so the supervisor restarts this node"
                );
                std::process::exit(LOST_LEASE_EXIT);
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease renewal failed");
                self.give_up_if_expired();
            }
        }
    }

    /// Exits when the lease has certainly run out by now (no renewal for a whole lease).
    fn give_up_if_expired(&self) {
        if let Some((epoch, renewed)) = self.held
            && renewed.elapsed() >= self.state.lease
        {
            tracing::error!(
                shard = DISPATCH_SHARD,
                epoch,
                "could not renew the dispatch shard's lease in time; exiting"
            );
            std::process::exit(LOST_LEASE_EXIT);
        }
    }

    async fn try_take(&mut self, conn: &mut DbConn, events: &mpsc::UnboundedSender<Event>) {
        let started = Instant::now();
        let taken =
            cluster::try_acquire(conn, DISPATCH_SHARD, &self.state.node_id, self.lease_ms).await;
        let acquired = match taken {
            Ok(Some(a)) => a,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "taking the dispatch shard failed");
                return;
            }
        };
        // Whatever the previous holder still has open is rolled back before recovery reads.
        match cluster::end_stale_sessions(conn, DISPATCH_SHARD, acquired.epoch).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                sessions = n,
                "ended the previous holder's database sessions"
            ),
            Err(e) => tracing::warn!(error = %e, "could not end the previous holder's sessions"),
        }
        tracing::info!(
            shard = DISPATCH_SHARD,
            epoch = acquired.epoch,
            from = acquired.from.as_deref().unwrap_or("-"),
            reason = acquired.reason,
            "took the dispatch shard"
        );
        metrics::counter!("shers_shard_handovers_total", "shard" => DISPATCH_SHARD, "reason" => acquired.reason)
            .increment(1);
        self.held = Some((acquired.epoch, started));
        let _ = events.send(Event::Acquired {
            epoch: acquired.epoch,
        });
        self.publish(&format!("acquired {DISPATCH_SHARD} {}", acquired.epoch))
            .await;
    }

    async fn leave(&mut self) {
        let Ok(mut conn) = self.conn().await else {
            return;
        };
        if let Some((epoch, _)) = self.held.take() {
            match cluster::release(&mut conn, DISPATCH_SHARD, &self.state.node_id, epoch).await {
                Ok(true) => {
                    tracing::info!(shard = DISPATCH_SHARD, epoch, "released the dispatch shard");
                    // Awaited: this thread ends next, and the others should not wait a round.
                    if let Some(redis) = self.redis.as_mut() {
                        let mut publish = redis::cmd("PUBLISH");
                        publish
                            .arg(CHANNEL)
                            .arg(format!("released {DISPATCH_SHARD} {epoch}"));
                        let sent = publish.query_async::<i64>(redis);
                        let _ = tokio::time::timeout(self.state.lease / 4, sent).await;
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "releasing the dispatch shard failed"),
            }
        }
        if let Err(e) = cluster::leave(&mut conn, &self.state.node_id).await {
            tracing::warn!(error = %e, "could not record leaving the cluster");
        }
        if let Some(redis) = self.redis.as_mut() {
            let key = format!("shers:node:{}", self.state.node_id);
            let mut del = redis::cmd("DEL");
            del.arg(&key);
            let del = del.query_async::<()>(redis);
            let _ = tokio::time::timeout(self.state.lease / 4, del).await;
        }
    }

    /// `SET key value PX lease*factor` on Redis (membership with expiry), best effort and in
    /// the background: a slow or absent Redis never delays a round. Without a connection
    /// (Redis was down at start), tries to open one every tenth round.
    async fn announce(&mut self, key: &str, value: &str, factor: u32) {
        let px = self
            .state
            .lease
            .as_millis()
            .saturating_mul(u128::from(factor));
        let px = u64::try_from(px).unwrap_or(u64::MAX);
        let Some(redis) = self.redis.clone() else {
            self.rounds_without_redis += 1;
            if self.rounds_without_redis.is_multiple_of(10)
                && let Some(url) = self.redis_url.clone()
            {
                let budget = self.state.lease / 4;
                if let Ok(Some(manager)) =
                    tokio::time::timeout(budget, connect_redis(&url, self.pushes.clone())).await
                {
                    tracing::info!("Redis reachable again: cluster wake-ups resume");
                    self.redis = Some(manager);
                }
            }
            return;
        };
        let (key, value, budget) = (key.to_owned(), value.to_owned(), self.state.lease / 4);
        tokio::task::spawn_local(async move {
            let mut redis = redis;
            let mut set = redis::cmd("SET");
            set.arg(&key).arg(&value).arg("PX").arg(px);
            let set = set.query_async::<()>(&mut redis);
            if let Ok(Err(e)) = tokio::time::timeout(budget, set).await {
                tracing::debug!(error = %e, "Redis heartbeat failed");
            }
        });
    }

    /// Wakes every node's lease thread, best effort and in the background.
    async fn publish(&mut self, message: &str) {
        let Some(mut redis) = self.redis.clone() else {
            return;
        };
        let (message, budget) = (message.to_owned(), self.state.lease / 4);
        tokio::task::spawn_local(async move {
            let mut publish = redis::cmd("PUBLISH");
            publish.arg(CHANNEL).arg(&message);
            let sent = publish.query_async::<i64>(&mut redis);
            if let Ok(Err(e)) = tokio::time::timeout(budget, sent).await {
                tracing::debug!(error = %e, "Redis publish failed");
            }
        });
    }
}
