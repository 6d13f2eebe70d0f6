//! Wearables spread over the cluster: the device shards this node serves, and the router that
//! sends each reading to the node serving its device's shard.
//!
//! A wearable belongs to shard `devices/<fnv1a(id) mod n>` ([`device_shard`]). The node holding
//! a device shard's lease runs that shard's device actors under a [`DeviceDirectory`] of its
//! own, whose writes go through one connection fenced at the shard's epoch: a node that lost
//! the shard (even one paused and woken up) cannot store a device's state. A reading batch
//! arriving anywhere is split by shard, applied locally or posted to the holders'
//! `/internal/v1/readings`, and answered as one. A wearer's "I'm OK" goes the same way, to
//! the holder's `/internal/v1/devices/fall/cancel`, and a device's own report that it is offline
//! (MQTT) to `/internal/v1/devices/offline`. An emergency is handed to the dispatch
//! shard's holder over `/internal/v1/emergencies` ([`RemoteHandoff`]), waiting out a failover.
//! Every node-to-node call carries this incarnation's own credential, and this node accepts the
//! other nodes' ([`NodeDevices::peers`]).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use super::ClusterState;
use super::wire::{self, PeerError};
use futures_util::future::BoxFuture;
use reqwest::header::CONTENT_TYPE;

use crate::actors::device::{
    CancelDeviceFall, DeviceDirectory, DeviceError, DevicePage, DeviceRouter, DeviceView,
    FallCancelled, ReadingOutcome, ReportOffline, Retire, TriageRuntime, apply_to, inspect_in,
    list_in, report_offline_to, wake_pending_falls,
};
use crate::actors::incident::{EmergencyDetected, HandoffError};
use crate::config::{Secret, Settings};
use crate::domain::ids::{DeviceId, IncidentId};
use crate::domain::shards::{Epoch, Shard, device_shard};
use crate::domain::triage::TriageRules;
use crate::domain::vitals::Reading;
use crate::http::auth::NodeCredentials;
use crate::persistence::Db;
use crate::persistence::cluster::fenced_url;
use crate::persistence::cluster::percent_encode;
use crate::persistence::group::GroupCommit;

/// The body of `POST /internal/v1/readings` and of its answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ShardReadings(pub Vec<(usize, Reading)>);

/// The answer of `POST /internal/v1/readings`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ShardOutcomes(pub Vec<(usize, ReadingOutcome)>);

/// The answer of `POST /internal/v1/emergencies`.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandedOff {
    /// The incident the emergency joined or opened (none: the wearer needs no new one).
    pub incident_id: Option<IncidentId>,
}

/// One device shard served here.
struct LocalShard {
    epoch: Epoch,
    directory: Addr<DeviceDirectory>,
}

/// The device shards this node serves and the router to the others'.
pub struct NodeDevices {
    cluster: Arc<ClusterState>,
    local: RwLock<HashMap<u16, Arc<LocalShard>>>,
    http: reqwest::Client,
    token: String,
    peers: actix_web::web::Data<NodeCredentials>,
    db: Db,
    settings: Settings,
    rules: TriageRules,
    arbiters: Vec<ArbiterHandle>,
    handoff: Recipient<EmergencyDetected>,
    local_dispatch: LocalDispatch,
}

/// This node's own incident directory while it holds the dispatch shard: emergencies of its
/// device shards are handed to it directly, not over HTTP to itself.
type LocalDispatch = Arc<RwLock<Option<Recipient<EmergencyDetected>>>>;

impl NodeDevices {
    /// The device side of a node: `token` is this incarnation's own credential for the other
    /// nodes' internal endpoints, `db` its unfenced connections (reads only).
    pub fn new(
        settings: &Settings,
        cluster: Arc<ClusterState>,
        db: Db,
        token: String,
        arbiters: Vec<ArbiterHandle>,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .context("building the device router's client")?;
        let lease = cluster.lease;
        let local_dispatch = LocalDispatch::default();
        let handoff = RemoteHandoff {
            cluster: cluster.clone(),
            http: http.clone(),
            token: token.clone(),
            local: local_dispatch.clone(),
        }
        .start()
        .recipient();
        Ok(Self {
            cluster,
            local: RwLock::new(HashMap::new()),
            http,
            token,
            peers: actix_web::web::Data::new(NodeCredentials::new(db.clone(), lease)),
            db,
            settings: settings.clone(),
            rules: settings.triage.rules()?,
            arbiters,
            handoff,
            local_dispatch,
        })
    }

    /// The verifier of the other nodes' credentials, for this node's servers of node-to-node
    /// endpoints (its internal server, and its shard server while it holds dispatch).
    pub fn peers(&self) -> actix_web::web::Data<NodeCredentials> {
        self.peers.clone()
    }

    /// This node now serves the dispatch shard with `incidents`: hand emergencies to it directly.
    pub fn serve_dispatch(&self, incidents: Recipient<EmergencyDetected>) {
        if let Ok(mut slot) = self.local_dispatch.write() {
            *slot = Some(incidents);
        }
    }

    fn local(&self, index: u16) -> Option<Arc<LocalShard>> {
        self.local.read().ok()?.get(&index).cloned()
    }

    /// The device shards served here, with their epochs.
    pub fn served(&self) -> Vec<(u16, Epoch)> {
        let mut served: Vec<(u16, Epoch)> = self
            .local
            .read()
            .map(|l| l.iter().map(|(i, s)| (*i, s.epoch)).collect())
            .unwrap_or_default();
        served.sort_unstable();
        served
    }

    /// Starts serving device shard `index` at `epoch`: a directory of its own whose writes go
    /// through one connection fenced at that epoch.
    pub async fn start_shard(&self, index: u16, epoch: Epoch) -> anyhow::Result<()> {
        let shard = Shard::Devices(index);
        let mut fenced = self.settings.database.clone();
        fenced.url = Secret::new(fenced_url(
            self.settings.database.url.expose(),
            shard,
            epoch,
        ));
        let writer = Db::connect_writer(&fenced)
            .await
            .with_context(|| format!("opening {shard}'s fenced writer connection"))?;
        let runtime = Arc::new(TriageRuntime {
            writer: GroupCommit::start(writer, 128),
            rules: self.rules.clone(),
            offline_after: Duration::from_secs(self.settings.triage.device_offline_s.max(1)),
            retention: self.settings.triage.raw_retention,
            repeat_window: self.settings.repeat_window(),
        });
        let directory = DeviceDirectory::new(
            self.db.clone(),
            runtime,
            self.handoff.clone(),
            self.arbiters.clone(),
        )
        .for_shard(index, self.cluster.device_shards)
        .start();
        if let Ok(mut local) = self.local.write() {
            local.insert(
                index,
                Arc::new(LocalShard {
                    epoch,
                    directory: directory.clone(),
                }),
            );
        }
        let shards = self.cluster.device_shards;
        if let Err(e) =
            wake_pending_falls(&self.db, &directory, |id| device_shard(id, shards) == index).await
        {
            tracing::warn!(shard = %shard, error = %e, "running fall watches not resumed yet; they resume on each wearable's next reading");
        }
        tracing::info!(shard = %shard, epoch = epoch.0, "serving a device shard");
        Ok(())
    }

    /// Stops serving device shard `index`: new readings are refused (503, retried), the ones in
    /// flight finish (up to `drain`), then its device actors stop.
    pub async fn stop_shard(&self, index: u16, drain: Duration) {
        let Some(shard) = self.local.write().ok().and_then(|mut l| l.remove(&index)) else {
            return;
        };
        let deadline = Instant::now() + drain;
        while Arc::strong_count(&shard) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shard.directory.do_send(Retire);
        tracing::info!(shard = %Shard::Devices(index), epoch = shard.epoch.0, "stopped serving a device shard");
    }

    /// Stops serving every device shard (the node is stopping).
    pub async fn stop_all(&self, drain: Duration) {
        let served = self.served();
        join_all(
            served
                .into_iter()
                .map(|(index, _)| self.stop_shard(index, drain)),
        )
        .await;
    }

    /// The live device actors of the shards served here: up to `limit`, and how many.
    pub async fn list_local(&self, limit: usize) -> DevicePage {
        let shards: Vec<Arc<LocalShard>> = self
            .local
            .read()
            .map(|l| l.values().cloned().collect())
            .unwrap_or_default();
        let pages = join_all(shards.iter().map(|s| list_in(&s.directory, limit))).await;
        let mut all = DevicePage::default();
        for page in pages.into_iter().flatten() {
            all.count += page.count;
            all.items.extend(page.items);
        }
        all.items.truncate(limit);
        all
    }

    /// The state of `id`'s live actor, if its shard is served here and it has one.
    pub async fn inspect_local(&self, id: DeviceId) -> Result<Option<DeviceView>, DeviceError> {
        let index = device_shard(&id, self.cluster.device_shards);
        match self.local(index) {
            Some(shard) => inspect_in(&shard.directory, id).await,
            None => Ok(None),
        }
    }

    /// The internal address of the node serving device shard `index`, when it is not this one.
    fn holder_of(&self, index: u16) -> Option<String> {
        self.cluster
            .owners()
            .devices
            .get(usize::from(index))
            .and_then(Option::as_ref)
            .filter(|o| o.node_id != self.cluster.node_id)
            .map(|o| o.address.clone())
    }

    /// The internal addresses of the other nodes serving device shards.
    fn other_holders(&self) -> Vec<String> {
        let mut addresses: Vec<String> = self
            .cluster
            .owners()
            .devices
            .iter()
            .flatten()
            .filter(|o| o.node_id != self.cluster.node_id)
            .map(|o| o.address.clone())
            .collect();
        addresses.sort_unstable();
        addresses.dedup();
        addresses
    }

    /// `GET {address}{path}` on another node with this node's credential, decoded.
    async fn get_from<T: serde::de::DeserializeOwned>(
        &self,
        address: &str,
        path: &str,
    ) -> Result<Option<T>, PeerError> {
        let resp = self
            .http
            .get(format!("{address}{path}"))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_err(|e| {
                self.cluster.refresh_owners();
                PeerError::from_reqwest(e)
            })?;
        match resp.status().as_u16() {
            200 => resp
                .json::<T>()
                .await
                .map(Some)
                .map_err(|e| PeerError::BadAnswer(e.without_url().to_string())),
            404 => Ok(None),
            status => {
                self.cluster.refresh_owners();
                Err(PeerError::Refused(status))
            }
        }
    }

    /// The live device actors of every node: this node's and the other holders' (a holder
    /// that cannot be reached is left out of the page).
    async fn list_all(&self, limit: usize) -> DevicePage {
        let path = format!("/internal/v1/actors/devices?limit={limit}");
        let (mut all, others) = futures_util::join!(
            self.list_local(limit),
            join_all(self.other_holders().into_iter().map(|address| {
                let path = &path;
                async move { self.get_from::<DevicePage>(&address, path).await }
            }))
        );
        for page in others.into_iter().filter_map(|p| p.ok().flatten()) {
            all.count += page.count;
            all.items.extend(page.items);
        }
        all.items.truncate(limit);
        all
    }

    /// The state of `id`'s live actor, wherever its shard is served.
    async fn inspect_anywhere(&self, id: DeviceId) -> Result<Option<DeviceView>, DeviceError> {
        let index = device_shard(&id, self.cluster.device_shards);
        if self.local(index).is_some() {
            return self.inspect_local(id).await;
        }
        let Some(address) = self.holder_of(index) else {
            return Ok(None);
        };
        let path = format!(
            "/internal/v1/actors/devices/{}",
            percent_encode(id.as_str())
        );
        Ok(self.get_from::<DeviceView>(&address, &path).await?)
    }

    /// `readings` grouped by their devices' shard.
    fn by_shard(&self, readings: Vec<(usize, Reading)>) -> HashMap<u16, Vec<(usize, Reading)>> {
        let shards = self.cluster.device_shards;
        let mut groups: HashMap<u16, Vec<(usize, Reading)>> = HashMap::new();
        for item in readings {
            groups
                .entry(device_shard(&item.1.device_id, shards))
                .or_default()
                .push(item);
        }
        groups
    }

    /// Applies readings wherever their devices' shards are served, as one answer.
    pub async fn ingest(&self, readings: Vec<(usize, Reading)>) -> Vec<(usize, ReadingOutcome)> {
        let groups = self.by_shard(readings);
        let sends = groups.into_iter().map(|(index, group)| {
            let owner = self.holder_of(index);
            async move {
                match (self.local(index), owner) {
                    (Some(shard), _) => apply_local(&shard, group).await,
                    (None, Some(address)) => self.post(&address, group).await,
                    (None, None) => {
                        self.cluster.refresh_owners();
                        unavailable(group)
                    }
                }
            }
        });
        let mut all: Vec<(usize, ReadingOutcome)> =
            join_all(sends).await.into_iter().flatten().collect();
        all.sort_by_key(|(i, _)| *i);
        all
    }

    /// Applies readings of shards served here; the others are answered `Unavailable` (the
    /// caller's view of the owners was stale: its client retries).
    pub async fn ingest_local(
        &self,
        readings: Vec<(usize, Reading)>,
    ) -> Vec<(usize, ReadingOutcome)> {
        let groups = self.by_shard(readings);
        let sends = groups.into_iter().map(|(index, group)| async move {
            match self.local(index) {
                Some(shard) => apply_local(&shard, group).await,
                None => unavailable(group),
            }
        });
        let mut all: Vec<(usize, ReadingOutcome)> =
            join_all(sends).await.into_iter().flatten().collect();
        all.sort_by_key(|(i, _)| *i);
        all
    }

    /// Sends a wearer's "I'm OK" to the device's shard: here, or its holder's
    /// `/internal/v1/devices/fall/cancel`.
    pub async fn cancel_fall(
        &self,
        cancel: CancelDeviceFall,
    ) -> Result<FallCancelled, DeviceError> {
        let index = device_shard(&cancel.device_id, self.cluster.device_shards);
        if self.local(index).is_some() {
            return self.cancel_fall_local(cancel).await;
        }
        let Some(address) = self.holder_of(index) else {
            self.cluster.refresh_owners();
            return Err(PeerError::NoHolder.into());
        };
        let sent = self
            .http
            .post(format!("{address}/internal/v1/devices/fall/cancel"))
            .bearer_auth(&self.token)
            .json(&cancel)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => r
                .json::<FallCancelled>()
                .await
                .map_err(|e| PeerError::BadAnswer(e.without_url().to_string()).into()),
            Ok(r) => {
                self.cluster.refresh_owners();
                Err(PeerError::Refused(r.status().as_u16()).into())
            }
            Err(e) => {
                self.cluster.refresh_owners();
                Err(PeerError::from_reqwest(e).into())
            }
        }
    }

    /// A wearer's "I'm OK" for a device of a shard served here (another's is refused: the
    /// caller's view of the owners was stale, and its client retries).
    pub async fn cancel_fall_local(
        &self,
        cancel: CancelDeviceFall,
    ) -> Result<FallCancelled, DeviceError> {
        let index = device_shard(&cancel.device_id, self.cluster.device_shards);
        let Some(shard) = self.local(index) else {
            return Err(DeviceError::Unreachable(
                "the device's shard is not served here".to_owned(),
            ));
        };
        Ok(shard
            .directory
            .send(cancel)
            .await
            .map_err(|e| DeviceError::Unreachable(format!("device directory: {e}")))??)
    }

    /// Records `device.offline` now for a device that said it is offline, on the node serving
    /// its shard: here, or its holder's `/internal/v1/devices/offline`.
    pub async fn report_offline(&self, device_id: DeviceId) -> Result<bool, DeviceError> {
        let index = device_shard(&device_id, self.cluster.device_shards);
        if self.local(index).is_some() {
            return self.report_offline_local(device_id).await;
        }
        let Some(address) = self.holder_of(index) else {
            self.cluster.refresh_owners();
            return Err(PeerError::NoHolder.into());
        };
        let sent = self
            .http
            .post(format!("{address}/internal/v1/devices/offline"))
            .bearer_auth(&self.token)
            .json(&ReportOffline { device_id })
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => r
                .json::<bool>()
                .await
                .map_err(|e| PeerError::BadAnswer(e.without_url().to_string()).into()),
            Ok(r) => {
                self.cluster.refresh_owners();
                Err(PeerError::Refused(r.status().as_u16()).into())
            }
            Err(e) => {
                self.cluster.refresh_owners();
                Err(PeerError::from_reqwest(e).into())
            }
        }
    }

    /// A device's report that it is offline, for a shard served here (another's is refused:
    /// the caller's view of the owners was stale, and it retries).
    pub async fn report_offline_local(&self, device_id: DeviceId) -> Result<bool, DeviceError> {
        let index = device_shard(&device_id, self.cluster.device_shards);
        let Some(shard) = self.local(index) else {
            return Err(DeviceError::Unreachable(
                "the device's shard is not served here".to_owned(),
            ));
        };
        report_offline_to(&shard.directory, device_id).await
    }

    async fn post(
        &self,
        address: &str,
        group: Vec<(usize, Reading)>,
    ) -> Vec<(usize, ReadingOutcome)> {
        let indices: Vec<usize> = group.iter().map(|(i, _)| *i).collect();
        match self.post_readings(address, &ShardReadings(group)).await {
            Ok(ShardOutcomes(outcomes)) => {
                if outcomes
                    .iter()
                    .any(|(_, o)| *o == ReadingOutcome::Unavailable)
                {
                    self.cluster.refresh_owners();
                }
                outcomes
            }
            Err(e) => {
                tracing::debug!(error = %e, "readings not applied by their device shard's holder");
                self.cluster.refresh_owners();
                indices
                    .into_iter()
                    .map(|i| (i, ReadingOutcome::Unavailable))
                    .collect()
            }
        }
    }

    /// `POST /internal/v1/readings` on the node at `address`: the readings in their validated
    /// form, encoded once ([`wire`]).
    async fn post_readings(
        &self,
        address: &str,
        readings: &ShardReadings,
    ) -> Result<ShardOutcomes, PeerError> {
        let body = wire::encode(readings)?;
        let resp = self
            .http
            .post(format!("{address}/internal/v1/readings"))
            .bearer_auth(&self.token)
            .header(CONTENT_TYPE, wire::MSGPACK)
            .body(body)
            .send()
            .await
            .map_err(PeerError::from_reqwest)?;
        if !resp.status().is_success() {
            return Err(PeerError::Refused(resp.status().as_u16()));
        }
        let bytes = resp.bytes().await.map_err(PeerError::from_reqwest)?;
        wire::decode(&bytes)
    }
}

async fn apply_local(
    shard: &Arc<LocalShard>,
    group: Vec<(usize, Reading)>,
) -> Vec<(usize, ReadingOutcome)> {
    apply_to(&shard.directory, group).await
}

fn unavailable(group: Vec<(usize, Reading)>) -> Vec<(usize, ReadingOutcome)> {
    group
        .into_iter()
        .map(|(i, _)| (i, ReadingOutcome::Unavailable))
        .collect()
}

/// A node's wearables, as every ingest edge sees them: each device's work goes to the node
/// serving its shard.
impl DeviceRouter for NodeDevices {
    fn apply(
        &self,
        readings: Vec<(usize, Reading)>,
    ) -> BoxFuture<'_, Vec<(usize, ReadingOutcome)>> {
        Box::pin(self.ingest(readings))
    }

    fn cancel_fall(
        &self,
        cancel: CancelDeviceFall,
    ) -> BoxFuture<'_, Result<FallCancelled, DeviceError>> {
        Box::pin(NodeDevices::cancel_fall(self, cancel))
    }

    fn report_offline(&self, device_id: DeviceId) -> BoxFuture<'_, Result<bool, DeviceError>> {
        Box::pin(NodeDevices::report_offline(self, device_id))
    }

    fn list(&self, limit: usize) -> BoxFuture<'_, Result<DevicePage, DeviceError>> {
        Box::pin(async move { Ok(self.list_all(limit).await) })
    }

    fn inspect(&self, id: DeviceId) -> BoxFuture<'_, Result<Option<DeviceView>, DeviceError>> {
        Box::pin(self.inspect_anywhere(id))
    }
}

/// Hands emergencies detected by this node's device actors to the dispatch shard's holder,
/// wherever it is. While dispatch fails over (no holder, or the holder gone), it keeps trying
/// for up to two leases and a bit: the emergency waits for the new holder instead of being
/// refused.
pub struct RemoteHandoff {
    cluster: Arc<ClusterState>,
    http: reqwest::Client,
    token: String,
    local: LocalDispatch,
}

impl Actor for RemoteHandoff {
    type Context = Context<Self>;
}

impl Handler<EmergencyDetected> for RemoteHandoff {
    type Result = ResponseFuture<Result<Option<IncidentId>, HandoffError>>;

    fn handle(&mut self, msg: EmergencyDetected, _: &mut Self::Context) -> Self::Result {
        let (cluster, http, token) = (self.cluster.clone(), self.http.clone(), self.token.clone());
        // This node holds dispatch (and is not handing it over): no hop at all.
        let local = self.local.read().ok().and_then(|l| l.clone());
        if let Some(incidents) = local
            && !cluster.stopping()
        {
            return Box::pin(async move {
                incidents.send(msg).await.map_err(|e| {
                    HandoffError::Unreachable(format!("the incident directory: {e}"))
                })?
            });
        }
        Box::pin(async move {
            let deadline = Instant::now() + cluster.lease * 2 + Duration::from_secs(2);
            // Encoded once, whichever holder it is sent to and however often.
            let body = wire::encode(&msg).map_err(|e| HandoffError::Unreachable(e.to_string()))?;
            loop {
                let last = match cluster.owner() {
                    // This node is handing dispatch over: the reading is refused (503) and
                    // retried, rather than holding up the drain that lets the next holder in.
                    Some(owner) if owner.node_id == cluster.node_id && cluster.stopping() => {
                        return Err(HandoffError::Unreachable(
                            "dispatch is being handed over".to_owned(),
                        ));
                    }
                    None => {
                        cluster.refresh_owners();
                        PeerError::NoHolder
                    }
                    Some(owner) => {
                        let sent = http
                            .post(format!("{}/internal/v1/emergencies", owner.address))
                            .bearer_auth(&token)
                            .header(CONTENT_TYPE, wire::MSGPACK)
                            .body(body.clone())
                            .send()
                            .await;
                        match sent {
                            Ok(r) if r.status().is_success() => {
                                let answer = r.bytes().await.map_err(PeerError::from_reqwest);
                                return answer
                                    .and_then(|bytes| wire::decode::<HandedOff>(&bytes))
                                    .map(|h| h.incident_id)
                                    .map_err(|e| HandoffError::Unreachable(e.to_string()));
                            }
                            Ok(r) if r.status().is_client_error() => {
                                return Err(HandoffError::Unreachable(
                                    PeerError::Refused(r.status().as_u16()).to_string(),
                                ));
                            }
                            // Not the holder (any more): read the owners again.
                            Ok(r) => {
                                cluster.refresh_owners();
                                PeerError::Refused(r.status().as_u16())
                            }
                            Err(e) => {
                                if e.is_connect() {
                                    cluster.suspect_owner(&owner);
                                } else {
                                    cluster.refresh_owners();
                                }
                                PeerError::from_reqwest(e)
                            }
                        }
                    }
                };
                if Instant::now() >= deadline {
                    return Err(HandoffError::Unreachable(format!(
                        "the dispatch holder: {last}"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }
}
