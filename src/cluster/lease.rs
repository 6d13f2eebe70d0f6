//! The lease thread: membership, the shards' leases, and who owns them.
//!
//! It runs on a thread and runtime of its own, with database connections of its own, so a
//! busy actor system or HTTP worker never delays a renewal: a late renewal is a lost lease.
//! Every third of the lease it renews the leases it holds (or exits the process when it no
//! longer holds one), takes the dispatch shard when nobody holds it, heartbeats, refreshes the
//! owners the front and the device router forward to, and takes or sheds device shards so
//! every live node holds its even share of the wearables. Redis carries wake-ups between nodes (`shers:cluster`): a
//! released or taken lease is seen by the others at once instead of at their next round.
//! Without Redis, or while it is down, the rounds alone keep everything correct, only slower.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot};

use super::{ClusterState, LOST_LEASE_EXIT, Owners};
use crate::config::Settings;
use crate::domain::shards::{Epoch, Shard, fair_share};
use crate::persistence::cluster;
use crate::persistence::{Db, DbConn, StoreError};

/// The Redis channel for cluster wake-ups.
pub const CHANNEL: &str = "shers:cluster";

/// What the lease thread tells the node.
#[derive(Debug)]
pub enum Event {
    /// This node now holds `shard` at `epoch`: start serving it.
    Acquired {
        /// The shard.
        shard: Shard,
        /// The fencing epoch.
        epoch: Epoch,
    },
    /// This node holds more device shards than its share: stop serving `shard`, then answer
    /// with [`Control::Release`] so another node takes it at once.
    Shed {
        /// The shard.
        shard: Shard,
        /// The epoch held.
        epoch: Epoch,
    },
}

/// What the node tells the lease thread.
#[derive(Debug)]
pub enum Control {
    /// Release every lease held, leave the cluster, answer, and end the thread.
    Leave(oneshot::Sender<()>),
    /// A shed shard is no longer served here: release its lease.
    Release {
        /// The shard.
        shard: Shard,
        /// The epoch held.
        epoch: Epoch,
    },
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
    /// The shards held: epoch, and when last renewed (by this node's clock, which only
    /// decides when to give up, never whether a write is allowed).
    held: BTreeMap<Shard, (Epoch, Instant)>,
    /// Device shards told to the node as shed, waiting for its [`Control::Release`].
    shedding: BTreeSet<Shard>,
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
    // Unbounded because Redis's push sender must never block the connection's reader. What
    // arrives on `shers:cluster` is one message per lease taken or released anywhere in the
    // cluster, a handful per handover; each only starts a lease round early.
    let (push_tx, mut pushes) = mpsc::unbounded_channel();
    let redis_url = settings.redis.url.as_ref().map(|u| u.expose().clone());
    let redis = match &redis_url {
        Some(url) => connect_redis(url, push_tx.clone(), CHANNEL).await,
        None => None,
    };
    let mut lease = Lease {
        db,
        lease_ms: i64::try_from(state.lease.as_millis()).unwrap_or(3_000),
        state,
        version: env!("CARGO_PKG_VERSION"),
        held: BTreeMap::new(),
        shedding: BTreeSet::new(),
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
            command = control.recv() => match command {
                Some(Control::Release { shard, epoch }) => lease.release(shard, epoch).await,
                Some(Control::Leave(done)) => {
                    lease.leave().await;
                    let _ = done.send(());
                    return Ok(());
                }
                None => {
                    lease.leave().await;
                    return Ok(());
                }
            }
        }
    }
}

/// A RESP3 connection manager subscribed to `channel`, re-subscribing after reconnects.
/// `None` (with a warning) when Redis cannot be reached now; the cluster still works.
pub(crate) async fn connect_redis(
    url: &str,
    pushes: mpsc::UnboundedSender<redis::PushInfo>,
    channel: &str,
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
    if let Err(e) = manager.subscribe(channel).await {
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
        let member = cluster::Member {
            node_id: &self.state.node_id,
            instance: &self.state.instance,
            address: &self.state.address,
            version: self.version,
            credential_hash: &self.state.credential_hash,
        };
        cluster::join(&mut conn, member)
            .await
            .context("joining the cluster")?;
        let (key, address) = (self.heartbeat_key(), self.state.address.clone());
        self.announce(&key, &address, 3).await;
        Ok(())
    }

    fn heartbeat_key(&self) -> String {
        format!("shers:node:{}", self.state.node_id)
    }

    /// One round: renew what is held, take the dispatch shard if it is free, heartbeat,
    /// refresh the owners, then take or shed device shards towards this node's share.
    async fn round(&mut self, events: &mpsc::UnboundedSender<Event>) {
        let Ok(mut conn) = self.conn().await else {
            self.give_up_if_expired();
            return;
        };
        // The renewals first (dispatch before devices, as shards order): nothing else may
        // delay them.
        let shards: Vec<(Shard, Epoch)> = self.held.iter().map(|(s, (e, _))| (*s, *e)).collect();
        for (shard, epoch) in shards {
            self.renew(&mut conn, shard, epoch).await;
        }
        if !self.held.contains_key(&Shard::Dispatch) {
            self.try_take(&mut conn, Shard::Dispatch, events).await;
        }
        if let Err(e) =
            cluster::heartbeat(&mut conn, &self.state.node_id, &self.state.instance).await
        {
            tracing::warn!(error = %e, "cluster heartbeat failed");
        }
        let held = match cluster::owners(&mut conn).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the shards' owners");
                return;
            }
        };
        let owners = self.owners_of(held);
        self.balance_devices(&mut conn, &owners, events).await;
        self.state.set_owners(owners);
        let (key, address) = (self.heartbeat_key(), self.state.address.clone());
        self.announce(&key, &address, 3).await;
    }

    fn owners_of(&self, held: Vec<cluster::Held>) -> Owners {
        let mut owners = Owners {
            dispatch: None,
            devices: vec![None; usize::from(self.state.device_shards)],
        };
        for h in held {
            match h.shard {
                Shard::Dispatch => owners.dispatch = Some(h.owner),
                Shard::Devices(index) => {
                    if let Some(slot) = owners.devices.get_mut(usize::from(index)) {
                        *slot = Some(h.owner);
                    }
                }
            }
        }
        owners
    }

    /// Takes free device shards up to this node's fair share, or sheds what is above it (a
    /// node joined), so the wearables spread evenly over the live nodes.
    async fn balance_devices(
        &mut self,
        conn: &mut DbConn,
        owners: &Owners,
        events: &mpsc::UnboundedSender<Event>,
    ) {
        // A node is counted until one lease after its last heartbeat, about when its leases
        // run out: counted longer, the survivors would stay at their old share and leave a
        // dead node's shards unserved; counted shorter (a slow round), no harm is done, as
        // only free shards are ever taken.
        let live = match cluster::live_nodes(conn, self.lease_ms).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot count the live nodes");
                return;
            }
        };
        let share = fair_share(self.state.device_shards, live);
        let mine: Vec<Shard> = self
            .held
            .keys()
            .filter(|s| !s.is_dispatch() && !self.shedding.contains(*s))
            .copied()
            .collect();
        if mine.len() > share {
            // The highest-numbered first, so nodes agree on which move and none ping-pong.
            for shard in mine.iter().rev().take(mine.len() - share) {
                if let Some((epoch, _)) = self.held.get(shard) {
                    tracing::info!(shard = %shard, epoch = epoch.0, share, "shedding a device shard");
                    self.shedding.insert(*shard);
                    let _ = events.send(Event::Shed {
                        shard: *shard,
                        epoch: *epoch,
                    });
                }
            }
            return;
        }
        let mut wanted = share - mine.len();
        for (index, owner) in (0..self.state.device_shards).zip(owners.devices.iter()) {
            if wanted == 0 {
                break;
            }
            let shard = Shard::Devices(index);
            if owner.is_none()
                && !self.held.contains_key(&shard)
                && self.try_take(conn, shard, events).await
            {
                wanted -= 1;
            }
        }
    }

    async fn renew(&mut self, conn: &mut DbConn, shard: Shard, epoch: Epoch) {
        let started = Instant::now();
        match cluster::renew(conn, shard, &self.state.node_id, epoch, self.lease_ms).await {
            Ok(true) => {
                metrics::histogram!("shers_lease_renew_seconds")
                    .record(started.elapsed().as_secs_f64());
                self.held.insert(shard, (epoch, started));
            }
            Ok(false) => {
                // Taken over while this node was paused or cut off: the fence already refuses
                // its writes; stop before it does anything else.
                tracing::error!(
                    shard = %shard,
                    epoch = epoch.0,
                    "lost a shard's lease; exiting so the supervisor restarts this node"
                );
                std::process::exit(LOST_LEASE_EXIT);
            }
            Err(e) => {
                tracing::warn!(shard = %shard, error = %e, "lease renewal failed");
                self.give_up_if_expired();
            }
        }
    }

    /// Exits when a lease has certainly run out by now (no renewal for a whole lease).
    fn give_up_if_expired(&self) {
        for (shard, (epoch, renewed)) in &self.held {
            if renewed.elapsed() >= self.state.lease {
                tracing::error!(
                    shard = %shard,
                    epoch = epoch.0,
                    "could not renew a shard's lease in time; exiting"
                );
                std::process::exit(LOST_LEASE_EXIT);
            }
        }
    }

    /// Takes `shard` if it is free; whether it was taken.
    async fn try_take(
        &mut self,
        conn: &mut DbConn,
        shard: Shard,
        events: &mpsc::UnboundedSender<Event>,
    ) -> bool {
        let started = Instant::now();
        let (node, instance) = (&self.state.node_id, &self.state.instance);
        let taken = cluster::try_acquire(conn, shard, node, instance, self.lease_ms).await;
        let acquired = match taken {
            Ok(Some(a)) => a,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(shard = %shard, error = %e, "taking a shard failed");
                return false;
            }
        };
        // Whatever the previous holder still has open is rolled back before recovery reads.
        match cluster::end_stale_sessions(conn, shard, acquired.epoch).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                shard = %shard,
                sessions = n,
                "ended the previous holder's database sessions"
            ),
            Err(e) => {
                tracing::warn!(shard = %shard, error = %e, "could not end the previous holder's sessions")
            }
        }
        tracing::info!(
            shard = %shard,
            epoch = acquired.epoch.0,
            from = acquired.from.as_deref().unwrap_or("-"),
            reason = acquired.reason,
            "took a shard"
        );
        metrics::counter!("shers_shard_handovers_total", "shard" => shard.kind(), "reason" => acquired.reason)
            .increment(1);
        if shard.is_dispatch() {
            crate::fault::crash_point("lease.after_takeover");
        }
        self.held.insert(shard, (acquired.epoch, started));
        let _ = events.send(Event::Acquired {
            shard,
            epoch: acquired.epoch,
        });
        self.publish(&format!("acquired {shard} {}", acquired.epoch))
            .await;
        true
    }

    /// Releases one shard at once (a shed device shard), and tells the other nodes.
    async fn release(&mut self, shard: Shard, epoch: Epoch) {
        self.shedding.remove(&shard);
        if self.held.get(&shard).is_none_or(|(e, _)| *e != epoch) {
            return;
        }
        self.held.remove(&shard);
        let Ok(mut conn) = self.conn().await else {
            return;
        };
        match cluster::release(&mut conn, shard, &self.state.node_id, epoch).await {
            Ok(true) => {
                tracing::info!(shard = %shard, epoch = epoch.0, "released a shard");
                self.publish(&format!("released {shard} {epoch}")).await;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(shard = %shard, error = %e, "releasing a shard failed"),
        }
    }

    async fn leave(&mut self) {
        let Ok(mut conn) = self.conn().await else {
            return;
        };
        let held = std::mem::take(&mut self.held);
        for (shard, (epoch, _)) in held {
            match cluster::release(&mut conn, shard, &self.state.node_id, epoch).await {
                Ok(true) => {
                    tracing::info!(shard = %shard, epoch = epoch.0, "released a shard");
                    // Awaited: this thread ends next, and the others should not wait a round.
                    if let Some(redis) = self.redis.as_mut() {
                        let mut publish = redis::cmd("PUBLISH");
                        publish
                            .arg(CHANNEL)
                            .arg(format!("released {shard} {epoch}"));
                        let sent = publish.query_async::<i64>(redis);
                        let _ = tokio::time::timeout(self.state.lease / 4, sent).await;
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(shard = %shard, error = %e, "releasing a shard failed"),
            }
        }
        if let Err(e) = cluster::leave(&mut conn, &self.state.node_id, &self.state.instance).await {
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
                    tokio::time::timeout(budget, connect_redis(&url, self.pushes.clone(), CHANNEL))
                        .await
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
