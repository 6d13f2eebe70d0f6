//! Running as a cluster: several `shers serve` processes on one PostgreSQL database and one
//! Redis (see `docs/architecture.md`, "Running as a cluster").
//!
//! Each node runs two HTTP servers:
//! - the **front**, on the public address (`SHERS_BIND`), which any client or load balancer may
//!   reach: probes, `/metrics`, `/admin/cluster`, and everything else forwarded (HTTP and
//!   WebSocket) to the node that owns the dispatch shard;
//! - the **internal server**, on the internal address: the device shards this node serves
//!   ([`devices`]) and, while this node holds the `dispatch/default` lease, the whole
//!   single-node application (actors, recovery, every endpoint) over database connections
//!   fenced at the lease's epoch.
//!
//! The wearables are spread over `cluster.device_shards` device shards, each held by one node
//! ([`devices`]); every node takes an even share of them.
//!
//! Each start of a node is an *incarnation* with an id of its own ([`ClusterState::instance`]):
//! leases are held by an incarnation, not merely a node id, so a node restarted under its id is
//! never routed work its previous process held. Nodes call each other with a credential the
//! incarnation made at start ([`crate::http::auth::NodeCredentials`]), good for the
//! node-to-node endpoints only and dead with the process.
//!
//! The [`lease`] thread joins the cluster, renews or takes the leases and learns who owns them.
//! A node that loses a lease it held exits (code 75) and is restarted by its supervisor as a
//! standby: stopping a live actor system in place is where split brains come from.

pub mod devices;
pub mod front;
pub mod internal;
pub mod lease;
pub mod wakeups;
pub mod wire;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{Notify, mpsc, oneshot};

use actix::Actor as _;

use crate::actors::broadcaster::Broadcaster;
use crate::app::{Application, Host, open_database};
use crate::config::{Secret, Settings};
use crate::domain::shards::{Epoch, MAX_DEVICE_SHARDS, Shard};
use crate::persistence::Db;
use crate::persistence::cluster::{Owner, fenced_url};
use devices::NodeDevices;

/// Exit code of a node that lost a lease it held (EX_TEMPFAIL: restart me).
pub const LOST_LEASE_EXIT: i32 = 75;

/// Who holds the shards, as last read by the lease thread.
#[derive(Debug, Default, Clone)]
pub struct Owners {
    /// The dispatch shard's holder.
    pub dispatch: Option<Owner>,
    /// Each device shard's holder, by index.
    pub devices: Vec<Option<Owner>>,
}

/// What this node knows about the cluster, shared by the front and the lease thread.
pub struct ClusterState {
    /// This node's id.
    pub node_id: String,
    /// This incarnation's id: fresh at every start, stored with the membership and with every
    /// lease this process takes.
    pub instance: String,
    /// The SHA-256 hex of the credential this incarnation presents to the other nodes
    /// (stored with the membership; the secret itself is only in memory).
    pub credential_hash: String,
    /// This node's internal base URL (where its shard server listens).
    pub address: String,
    /// The lease duration.
    pub lease: Duration,
    /// How many device shards the wearables are spread over.
    pub device_shards: u16,
    owners: RwLock<Arc<Owners>>,
    joined: AtomicBool,
    stopping: AtomicBool,
    /// Wakes the lease thread for an immediate round (a forward failed, Redis said so).
    pub(crate) wake: Notify,
}

impl ClusterState {
    fn new(
        node_id: String,
        credential_hash: String,
        address: String,
        lease: Duration,
        device_shards: u16,
    ) -> Self {
        Self {
            node_id,
            instance: uuid::Uuid::new_v4().simple().to_string(),
            credential_hash,
            address,
            lease,
            device_shards,
            owners: RwLock::new(Arc::new(Owners::default())),
            joined: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    /// The live holders of every shard, as last seen.
    pub fn owners(&self) -> Arc<Owners> {
        self.owners.read().map(|o| o.clone()).unwrap_or_default()
    }

    /// The live owner of the dispatch shard, as last seen.
    pub fn owner(&self) -> Option<Owner> {
        self.owners().dispatch.clone()
    }

    pub(crate) fn set_owners(&self, owners: Owners) {
        if let Ok(mut slot) = self.owners.write() {
            *slot = Arc::new(owners);
        }
    }

    /// Whether this node has registered and run its first lease round.
    pub fn joined(&self) -> bool {
        self.joined.load(Ordering::Acquire)
    }

    pub(crate) fn set_joined(&self) {
        self.joined.store(true, Ordering::Release);
    }

    /// Whether this node is handing its shards over (SIGTERM).
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Called when a connection to the dispatch owner `failed` could not be made: forget it
    /// (unless the owners were read again since) and look again now. Only a failure to reach
    /// the peer may lead here, never anything a client sent: what a client sends must not
    /// change what this node believes about its peers.
    pub fn suspect_owner(&self, failed: &Owner) {
        if let Ok(mut slot) = self.owners.write()
            && slot.dispatch.as_ref() == Some(failed)
        {
            let mut owners = Owners::clone(&slot);
            owners.dispatch = None;
            *slot = Arc::new(owners);
        }
        self.wake.notify_one();
    }

    /// Called when a shard had no known holder, or its holder refused or could not be reached:
    /// read the owners again now (this changes nothing by itself).
    pub fn refresh_owners(&self) {
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

/// Runs this process as a cluster node until SIGINT/SIGTERM (then hands its shards over at
/// once) or until it loses a lease (then exits with [`LOST_LEASE_EXIT`]).
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let (mut node, mut events) = Node::start(settings).await?;
    let stop = crate::app::stop_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            event = events.recv() => match event {
                Some(event) => node.on_lease_event(event).await?,
                // The lease thread ended: it has already logged why.
                None => break,
            },
        }
    }
    node.hand_over().await;
    Ok(())
}

/// One cluster node: its front, its device shards, the lease thread, and the dispatch shard's
/// application while it holds that shard. [`Node::start`] joins; [`Node::on_lease_event`]
/// starts or stops serving what the lease thread says this node took or must shed;
/// [`Node::hand_over`] gives everything back in order and leaves.
pub struct Node {
    settings: Settings,
    state: Arc<ClusterState>,
    devices: Arc<NodeDevices>,
    /// The internal address: served by the node server until this node holds dispatch, then
    /// by the dispatch shard's application.
    internal: TcpListener,
    node_server: Option<Served>,
    dispatch: Option<DispatchServer>,
    front: Served,
    /// Turns true when the node starts handing over: the front's SSE streams end.
    closing: tokio::sync::watch::Sender<bool>,
    control: mpsc::UnboundedSender<lease::Control>,
    lease_thread: std::thread::JoinHandle<()>,
    /// The threads the device actors run on.
    _arbiters: Vec<actix::Arbiter>,
}

/// How long a shed device shard's readings in flight are given to finish.
const DRAIN: Duration = Duration::from_secs(2);

impl Node {
    /// Opens the database, binds both addresses, joins the cluster and starts the front, the
    /// node server and the lease thread; the lease thread's events arrive on the receiver.
    pub async fn start(
        settings: Settings,
    ) -> anyhow::Result<(Self, mpsc::UnboundedReceiver<lease::Event>)> {
        let shards = settings.cluster.device_shards;
        anyhow::ensure!(
            (1..=MAX_DEVICE_SHARDS).contains(&shards),
            "cluster.device_shards (SHERS_CLUSTER__DEVICE_SHARDS) must be 1 to {MAX_DEVICE_SHARDS}, not {shards}"
        );
        let db = open_database(&settings).await?;
        let node_id = node_id(&settings);
        let internal = TcpListener::bind(&settings.cluster.internal_bind)
            .with_context(|| format!("binding {}", settings.cluster.internal_bind))?;
        let address = advertised(&settings, &internal)?;
        let public = TcpListener::bind(&settings.bind)
            .with_context(|| format!("binding {}", settings.bind))?;
        // This incarnation's credential for the other nodes' internal endpoints: in memory
        // only, known to them by its hash in the membership row, dead when this process is.
        let credential = crate::http::auth::new_secret(crate::domain::auth::NODE_CREDENTIAL_PREFIX)
            .context("making the node's credential")?;
        let state = Arc::new(ClusterState::new(
            node_id.clone(),
            crate::domain::auth::hash_token(&credential),
            address.clone(),
            Duration::from_millis(settings.cluster.lease_ms.max(300)),
            shards,
        ));
        tracing::info!(node = %node_id, instance = %state.instance, address = %address, "joining the cluster");
        // Device actors run on their own threads, one per core, sharded by device id.
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arbiters: Vec<actix::Arbiter> = (0..threads).map(|_| actix::Arbiter::new()).collect();
        let devices = Arc::new(NodeDevices::new(
            &settings,
            state.clone(),
            db.clone(),
            credential,
            arbiters.iter().map(actix::Arbiter::handle).collect(),
        )?);

        if let Some(url) = &settings.redis.url {
            wakeups::spawn(url.expose().clone(), node_id);
        }
        // Unbounded: the lease thread sends an event only for a shard it took or sheds, at
        // most one per shard per lease round, and the node handles each at once.
        let (events_tx, events) = mpsc::unbounded_channel();
        // Unbounded: the node sends one release per shed shard and one leave, never more.
        let (control, control_rx) = mpsc::unbounded_channel();
        let lease_thread = lease::spawn(settings.clone(), state.clone(), events_tx, control_rx)?;

        // SSE streams are served by every front from its own tail of the event store.
        let broadcaster = Broadcaster::new(db.clone())
            .await
            .context("starting the node's event tail")?
            .start();
        let (closing, closing_rx) = tokio::sync::watch::channel(false);
        let ingest_gate = Arc::new(tokio::sync::Semaphore::new(
            settings.triage.max_in_flight_readings.max(1),
        ));
        // Every node consumes the buses: each reading goes to its device's shard.
        crate::bus::start_ingest(
            &settings,
            crate::bus::IngestDeps {
                devices: devices.clone(),
                gate: ingest_gate.clone(),
                db: db.clone(),
                closing: closing_rx.clone(),
                node_name: state.node_id.clone(),
            },
        );
        let front = Served::spawn(front::server(
            &settings,
            db,
            state.clone(),
            front::Local {
                devices: devices.clone(),
                broadcaster,
                closing: closing_rx,
                ingest_gate,
            },
            public,
        )?);
        // The internal address serves the device routes until this node holds the dispatch
        // shard, whose server then serves them too.
        let node_server = Some(Served::spawn(front::node_server(
            &settings,
            devices.clone(),
            internal.try_clone()?,
        )?));
        Ok((
            Self {
                settings,
                state,
                devices,
                internal,
                node_server,
                dispatch: None,
                front,
                closing,
                control,
                lease_thread,
                _arbiters: arbiters,
            },
            events,
        ))
    }

    /// Starts serving what the lease thread says this node took, or stops serving a shard it
    /// must shed (then releases it). An error ends the node: it could not serve dispatch.
    pub async fn on_lease_event(&mut self, event: lease::Event) -> anyhow::Result<()> {
        match event {
            lease::Event::Acquired {
                shard: Shard::Dispatch,
                epoch,
            } => {
                if self.dispatch.is_some() {
                    return Ok(());
                }
                if let Some(server) = self.node_server.take() {
                    // At once, not gracefully: readings in flight may be waiting for this very
                    // shard to hand their emergencies to. Their callers answer 503 and the
                    // retries are deduplicated; new connections wait in the listener's backlog
                    // meanwhile.
                    server.abort().await;
                }
                let app = start_dispatch(
                    &self.settings,
                    epoch,
                    self.internal.try_clone()?,
                    self.devices.clone(),
                )
                .await?;
                crate::fault::crash_point("lease.after_recover");
                self.devices
                    .serve_dispatch(app.incidents().clone().recipient());
                let (handle, close_sessions) = (app.handle(), Box::new(app.session_closer()));
                let task = actix_web::rt::spawn(async move {
                    if let Err(e) = app.run_until_stopped().await {
                        tracing::error!(error = %e, "the dispatch shard's server failed");
                    }
                });
                self.dispatch = Some(DispatchServer {
                    handle,
                    close_sessions,
                    task,
                });
            }
            lease::Event::Acquired {
                shard: shard @ Shard::Devices(index),
                epoch,
            } => {
                if let Err(e) = self.devices.start_shard(index, epoch).await {
                    tracing::error!(shard = %shard, error = ?e, "cannot serve a device shard; giving it back");
                    let _ = self.control.send(lease::Control::Release { shard, epoch });
                }
            }
            lease::Event::Shed { shard, epoch } => {
                let (devices, control) = (self.devices.clone(), self.control.clone());
                actix_web::rt::spawn(async move {
                    if let Shard::Devices(index) = shard {
                        devices.stop_shard(index, DRAIN).await;
                    }
                    let _ = control.send(lease::Control::Release { shard, epoch });
                });
            }
        }
        Ok(())
    }

    /// Hands every shard over and leaves: sessions end, requests in flight finish, the device
    /// shards drain, the leases are released (the next holders take them at once), and the
    /// front stops last.
    pub async fn hand_over(self) {
        let node_id = self.state.node_id.clone();
        tracing::info!(node = %node_id, "stopping: handing the shards over");
        self.state.stopping.store(true, Ordering::Release);
        // This front's SSE streams end; their clients reconnect (through any node) and resume.
        let _ = self.closing.send(true);
        // The internal socket closes as soon as its server stops accepting: other nodes'
        // calls are refused at once (and retried elsewhere) instead of waiting in its backlog.
        drop(self.internal);
        if let Some(dispatch) = self.dispatch {
            // Sessions first (their clients reconnect through any front and resume), then the
            // requests in flight, so every acknowledged write is done before the release.
            (dispatch.close_sessions)();
            dispatch.handle.stop(true).await;
            let _ = dispatch.task.await;
        }
        if let Some(server) = self.node_server {
            server.stop().await;
        }
        self.devices.stop_all(DRAIN).await;
        let (done, released) = oneshot::channel();
        if self.control.send(lease::Control::Leave(done)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), released).await;
        }
        self.front.stop().await;
        let _ = self.lease_thread.join();
        tracing::info!(node = %node_id, "left the cluster");
    }
}

/// A server running on its own task.
struct Served {
    handle: actix_web::dev::ServerHandle,
    task: tokio::task::JoinHandle<Result<(), std::io::Error>>,
}

impl Served {
    fn spawn(server: actix_web::dev::Server) -> Self {
        Self {
            handle: server.handle(),
            task: actix_web::rt::spawn(server),
        }
    }

    /// Stops it gracefully (requests in flight finish).
    async fn stop(self) {
        self.handle.stop(true).await;
        let _ = self.task.await;
    }

    /// Stops it now, dropping the requests in flight.
    async fn abort(self) {
        self.handle.stop(false).await;
        let _ = self.task.await;
    }
}

/// The dispatch shard's application while this node holds the shard.
struct DispatchServer {
    handle: actix_web::dev::ServerHandle,
    close_sessions: Box<dyn Fn()>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts the dispatch shard's application: the whole application over connections fenced at `epoch`,
/// recovering open incidents, timers, offers and sagas from the event store as a restart does.
async fn start_dispatch(
    settings: &Settings,
    epoch: Epoch,
    listener: TcpListener,
    devices: Arc<NodeDevices>,
) -> anyhow::Result<Application> {
    let mut fenced = settings.clone();
    fenced.database.url = Secret::new(fenced_url(
        settings.database.url.expose(),
        Shard::Dispatch,
        epoch,
    ));
    let started = std::time::Instant::now();
    let db = Db::connect(&fenced.database)
        .await
        .context("opening fenced database connections")?;
    let peers = devices.peers();
    let routes_devices = actix_web::web::Data::from(devices.clone());
    let host = Host {
        devices,
        routes: Arc::new(move |cfg: &mut actix_web::web::ServiceConfig| {
            // The other nodes call this server's node-to-node endpoints with their own
            // credentials.
            cfg.app_data(peers.clone());
            internal::dispatch_routes(cfg);
            internal::node_routes(cfg, routes_devices.clone());
        }),
    };
    let app = Application::build_with_listener(fenced, db, listener, Some(host)).await?;
    tracing::info!(
        shard = %Shard::Dispatch,
        epoch = epoch.0,
        recovery_ms = started.elapsed().as_millis() as u64,
        "serving the dispatch shard"
    );
    metrics::histogram!("shers_shard_recovery_seconds").record(started.elapsed().as_secs_f64());
    Ok(app)
}
