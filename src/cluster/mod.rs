//! Running as a cluster: several `shers serve` processes on one PostgreSQL database and one
//! Redis (see `docs/architecture.md`, "Running as a cluster").
//!
//! Each node runs two HTTP servers:
//! - the **front**, on the public address (`SHERS_BIND`), which any client or load balancer may
//!   reach: probes, `/metrics`, `/admin/cluster`, and everything else forwarded (HTTP and
//!   WebSocket) to the node that owns the dispatch shard;
//! - the **shard server**, on the internal address, started only while this node holds the
//!   `dispatch/default` lease: the whole single-node application (actors, recovery, every
//!   endpoint) over database connections fenced at the lease's epoch.
//!
//! The [`lease`] thread joins the cluster, renews or takes the lease and learns who owns it.
//! A node that loses a lease it held exits (code 75) and is restarted by its supervisor as a
//! standby: stopping a live actor system in place is where split brains come from.

pub mod lease;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::app::{Application, open_database};
use crate::config::{Secret, Settings};
use crate::persistence::Db;
use crate::persistence::cluster::{DISPATCH_SHARD, Owner, fenced_url};

/// Exit code of a node that lost a lease it held (EX_TEMPFAIL: restart me).
pub const LOST_LEASE_EXIT: i32 = 75;

/// What this node knows about the cluster, shared by the front and the lease thread.
pub struct ClusterState {
    /// This node's id.
    pub node_id: String,
    /// This node's internal base URL (where its shard server listens).
    pub address: String,
    /// The lease duration.
    pub lease: Duration,
    owner: RwLock<Option<Owner>>,
    joined: AtomicBool,
    /// Wakes the lease thread for an immediate round (a forward failed, Redis said so).
    pub(crate) wake: Notify,
}

impl ClusterState {
    fn new(node_id: String, address: String, lease: Duration) -> Self {
        Self {
            node_id,
            address,
            lease,
            owner: RwLock::new(None),
            joined: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    /// The live owner of the dispatch shard, as last seen.
    pub fn owner(&self) -> Option<Owner> {
        self.owner.read().ok().and_then(|o| o.clone())
    }

    pub(crate) fn set_owner(&self, owner: Option<Owner>) {
        if let Ok(mut slot) = self.owner.write() {
            *slot = owner;
        }
    }

    /// Whether this node has registered and run its first lease round.
    pub fn joined(&self) -> bool {
        self.joined.load(Ordering::Acquire)
    }

    pub(crate) fn set_joined(&self) {
        self.joined.store(true, Ordering::Release);
    }

    /// Called when forwarding to the owner failed: forget it and look again now.
    pub fn suspect_owner(&self) {
        self.set_owner(None);
        self.wake.notify_one();
    }
}

/// This node's id: configured, or the host name with a random suffix.
fn node_id(settings: &Settings) -> String {
    settings.cluster.node_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "node".to_owned());
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        format!("{host}-{}", &suffix[..6])
    })
}

/// The internal URL other nodes reach `listener` at.
fn advertised(settings: &Settings, listener: &TcpListener) -> anyhow::Result<String> {
    if let Some(url) = &settings.cluster.advertise_url {
        return Ok(url.trim_end_matches('/').to_owned());
    }
    let addr = listener.local_addr()?;
    anyhow::ensure!(
        !addr.ip().is_unspecified(),
        "cluster.internal_bind {addr} listens on every interface: set cluster.advertise_url \
         (SHERS_CLUSTER__ADVERTISE_URL) to the address other nodes reach it at"
    );
    Ok(format!("http://{addr}"))
}

/// Runs this process as a cluster node until SIGINT/SIGTERM (then hands its shard over at
/// once) or until it loses its lease (then exits with [`LOST_LEASE_EXIT`]).
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let db = open_database(&settings).await?;
    let node_id = node_id(&settings);
    let internal = TcpListener::bind(&settings.cluster.internal_bind)
        .with_context(|| format!("binding {}", settings.cluster.internal_bind))?;
    let address = advertised(&settings, &internal)?;
    let public =
        TcpListener::bind(&settings.bind).with_context(|| format!("binding {}", settings.bind))?;
    let state = Arc::new(ClusterState::new(
        node_id.clone(),
        address.clone(),
        Duration::from_millis(settings.cluster.lease_ms.max(300)),
    ));
    tracing::info!(node = %node_id, address = %address, "joining the cluster");

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (control, control_rx) = mpsc::unbounded_channel();
    let lease_thread = lease::spawn(settings.clone(), state.clone(), events_tx, control_rx)?;

    let front = crate::http::front::server(&settings, db.clone(), state.clone(), public)?;
    let front_handle = front.handle();
    let front_task = actix_web::rt::spawn(front);

    let mut internal = Some(internal);
    let mut shard: Option<Shard> = None;
    let stop = crate::cli::stop_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            event = events.recv() => match event {
                Some(lease::Event::Acquired { epoch }) => {
                    let Some(listener) = internal.take() else { continue };
                    let app = start_shard(&settings, epoch, listener).await?;
                    let (handle, close_sessions) = (app.handle(), Box::new(app.session_closer()));
                    let task = actix_web::rt::spawn(async move {
                        if let Err(e) = app.run_until_stopped().await {
                            tracing::error!(error = %e, "the shard server failed");
                        }
                    });
                    shard = Some(Shard { handle, close_sessions, task });
                }
                // The lease thread ended: it has already logged why.
                None => break,
            },
        }
    }

    tracing::info!(node = %node_id, "stopping: handing the dispatch shard over");
    if let Some(shard) = shard {
        // Sessions first (their clients reconnect through any front and resume), then the
        // requests in flight, so every acknowledged write is done before the release.
        (shard.close_sessions)();
        shard.handle.stop(true).await;
        let _ = shard.task.await;
    }
    let (done, released) = oneshot::channel();
    if control.send(lease::Control::Leave(done)).is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(5), released).await;
    }
    front_handle.stop(true).await;
    let _ = front_task.await;
    let _ = lease_thread.join();
    tracing::info!(node = %node_id, "left the cluster");
    Ok(())
}

/// The shard server while this node holds the dispatch shard.
struct Shard {
    handle: actix_web::dev::ServerHandle,
    close_sessions: Box<dyn Fn()>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts the shard server: the whole application over connections fenced at `epoch`,
/// recovering open incidents, timers, offers and sagas from the event store as a restart does.
async fn start_shard(
    settings: &Settings,
    epoch: i64,
    listener: TcpListener,
) -> anyhow::Result<Application> {
    let mut fenced = settings.clone();
    fenced.database.url = Secret::new(fenced_url(
        settings.database.url.expose(),
        DISPATCH_SHARD,
        epoch,
    ));
    let started = std::time::Instant::now();
    let db = Db::connect(&fenced.database)
        .await
        .context("opening fenced database connections")?;
    let app = Application::build_with_listener(fenced, db, listener, false).await?;
    tracing::info!(
        shard = DISPATCH_SHARD,
        epoch,
        recovery_ms = started.elapsed().as_millis() as u64,
        "serving the dispatch shard"
    );
    metrics::histogram!("shers_shard_recovery_seconds").record(started.elapsed().as_secs_f64());
    Ok(app)
}
