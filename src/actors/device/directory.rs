//! `DeviceDirectory`: routes triaged readings to the per-wearable actors, starting an actor on
//! a device's first reading (and again after an idle one stopped). Device actors are spread
//! over a few arbiters (threads) by device id, so devices are processed in parallel while each
//! device's readings stay strictly ordered.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use actix::prelude::*;
use futures_util::future::join_all;

use super::actor::{
    DeviceActor, DeviceSummary, InspectDevice, Preload, ProcessReadings, ReadingOutcome, Summarise,
    TriageRuntime,
};
use crate::actors::incident::EmergencyDetected;
use crate::domain::ids::DeviceId;
use crate::domain::patients::Device;
use crate::domain::vitals::Reading;
use crate::persistence::patients::{self, DeviceState};
use crate::persistence::{Db, StoreError};

struct Entry {
    addr: Addr<DeviceActor>,
    /// How many times an actor was started for this device (restarts = starts − 1).
    starts: u32,
}

/// The directory of live device actors.
pub struct DeviceDirectory {
    db: Db,
    runtime: Arc<TriageRuntime>,
    handoff: Recipient<EmergencyDetected>,
    arbiters: Vec<ArbiterHandle>,
    hasher: RandomState,
    devices: HashMap<DeviceId, Entry>,
}

impl DeviceDirectory {
    /// A directory spreading device actors over `arbiters` (the current one when empty).
    pub fn new(
        db: Db,
        runtime: Arc<TriageRuntime>,
        handoff: Recipient<EmergencyDetected>,
        arbiters: Vec<ArbiterHandle>,
    ) -> Self {
        Self {
            db,
            runtime,
            handoff,
            arbiters,
            hasher: RandomState::new(),
            devices: HashMap::new(),
        }
    }

    /// The triage runtime (rules and timers) shared by all devices.
    pub fn runtime(&self) -> &Arc<TriageRuntime> {
        &self.runtime
    }

    fn live(&self, id: &DeviceId) -> Option<Addr<DeviceActor>> {
        self.devices
            .get(id)
            .filter(|e| e.addr.connected())
            .map(|e| e.addr.clone())
    }

    /// Starts an actor for `id`, its registration coming from `preload`.
    fn start(&mut self, id: &DeviceId, preload: Preload) -> Addr<DeviceActor> {
        let make = {
            let (id, db, runtime, handoff) = (
                id.clone(),
                self.db.clone(),
                self.runtime.clone(),
                self.handoff.clone(),
            );
            move |_: &mut Context<DeviceActor>| {
                DeviceActor::new(id, db, runtime, handoff).preloaded(preload)
            }
        };
        let addr = if self.arbiters.is_empty() {
            DeviceActor::create(make)
        } else {
            let shard =
                usize::try_from(self.hasher.hash_one(id)).unwrap_or(0) % self.arbiters.len();
            DeviceActor::start_in_arbiter(&self.arbiters[shard], make)
        };
        let entry = self.devices.entry(id.clone()).or_insert(Entry {
            addr: addr.clone(),
            starts: 0,
        });
        entry.addr = addr.clone();
        entry.starts += 1;
        addr
    }
}

impl Actor for DeviceDirectory {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The directory is the ingest front door: let it queue generously; HTTP admission
        // control bounds what can be in flight.
        ctx.set_mailbox_capacity(1024);
        // Forget stopped actors now and then so the map does not grow with idle devices.
        ctx.run_interval(std::time::Duration::from_secs(60), |act, _| {
            act.devices.retain(|_, e| e.addr.connected());
        });
    }
}

/// Triage readings (pure, on the caller's thread) and apply them to their devices.
#[derive(Message, Debug)]
#[rtype(result = "Vec<(usize, ReadingOutcome)>")]
pub struct Ingest(pub Vec<(usize, Reading)>);

impl Handler<Ingest> for DeviceDirectory {
    type Result = ResponseFuture<Vec<(usize, ReadingOutcome)>>;

    fn handle(&mut self, msg: Ingest, _: &mut Self::Context) -> Self::Result {
        let mut groups: HashMap<DeviceId, Vec<(usize, Reading)>> = HashMap::new();
        for (index, reading) in msg.0 {
            groups
                .entry(reading.device_id.clone())
                .or_default()
                .push((index, reading));
        }
        // Devices without a live actor (their first reading since the server started, or
        // since their actor stopped when idle) are loaded with one query for the batch, not
        // one each: after a restart every wearable's first batch would otherwise queue a read.
        let mut new_devices: Vec<(DeviceId, Loaded)> = Vec::new();
        let sends: Vec<_> = groups
            .into_iter()
            .map(|(id, readings)| {
                let addr = self.live(&id).unwrap_or_else(|| {
                    let (loaded, preload) = tokio::sync::oneshot::channel();
                    let addr = self.start(&id, preload);
                    new_devices.push((id, loaded));
                    addr
                });
                let indices: Vec<usize> = readings.iter().map(|(i, _)| *i).collect();
                async move {
                    match addr.send(ProcessReadings(readings)).await {
                        Ok(outcomes) => outcomes,
                        Err(_) => indices
                            .into_iter()
                            .map(|i| (i, ReadingOutcome::Unavailable))
                            .collect(),
                    }
                }
            })
            .collect();
        if !new_devices.is_empty() {
            let db = self.db.clone();
            actix::spawn(load_devices(db, new_devices));
        }
        Box::pin(async move {
            let mut all: Vec<(usize, ReadingOutcome)> =
                join_all(sends).await.into_iter().flatten().collect();
            all.sort_by_key(|(i, _)| *i);
            all
        })
    }
}

/// Where a new device actor waits for its registration.
type Loaded = tokio::sync::oneshot::Sender<Result<Option<DeviceState>, StoreError>>;

/// Loads `devices` with one query and hands each actor its registration (`None`: not
/// registered). If the query fails, each actor is told and reads its own.
async fn load_devices(db: Db, devices: Vec<(DeviceId, Loaded)>) {
    let ids: Vec<DeviceId> = devices.iter().map(|(id, _)| id.clone()).collect();
    let found = db
        .run(move |mut conn| async move { patients::find_devices(&mut conn, &ids).await })
        .await;
    match found {
        Ok(states) => {
            let mut states: HashMap<String, DeviceState> = states
                .into_iter()
                .map(|state| (state.device.id.0.clone(), state))
                .collect();
            for (id, loaded) in devices {
                let _ = loaded.send(Ok(states.remove(id.as_str())));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, devices = devices.len(), "new devices not loaded together");
            for (_, loaded) in devices {
                let _ = loaded.send(Err(StoreError::Unavailable(e.to_string())));
            }
        }
    }
}

/// The live actor of a device, if one is running.
#[derive(Message, Debug)]
#[rtype(result = "Option<(Addr<DeviceActor>, u32)>")]
pub struct Lookup(pub DeviceId);

impl Handler<Lookup> for DeviceDirectory {
    type Result = Option<(Addr<DeviceActor>, u32)>;

    fn handle(&mut self, msg: Lookup, _: &mut Self::Context) -> Self::Result {
        self.devices
            .get(&msg.0)
            .filter(|e| e.addr.connected())
            .map(|e| (e.addr.clone(), e.starts.saturating_sub(1)))
    }
}

/// A page of live device actors for `/admin/actors`.
#[derive(Message, Debug)]
#[rtype(result = "(usize, Vec<(DeviceSummary, u32)>)")]
pub struct ListDevices {
    /// Most entries returned.
    pub limit: usize,
}

impl Handler<ListDevices> for DeviceDirectory {
    type Result = ResponseFuture<(usize, Vec<(DeviceSummary, u32)>)>;

    fn handle(&mut self, msg: ListDevices, _: &mut Self::Context) -> Self::Result {
        let live: Vec<_> = self
            .devices
            .values()
            .filter(|e| e.addr.connected())
            .map(|e| (e.addr.clone(), e.starts.saturating_sub(1)))
            .collect();
        let total = live.len();
        let page: Vec<_> = live.into_iter().take(msg.limit).collect();
        Box::pin(async move {
            let summaries = join_all(page.into_iter().map(|(addr, restarts)| async move {
                addr.send(Summarise).await.ok().map(|s| (s, restarts))
            }))
            .await;
            (total, summaries.into_iter().flatten().collect())
        })
    }
}

/// The full in-memory state of one device actor.
pub async fn inspect(addr: &Addr<DeviceActor>) -> Option<super::DeviceInspection> {
    addr.send(InspectDevice).await.ok()
}

/// Register a wearable to its patient. Answers `false` when no patient has the id named;
/// `StoreError::Conflict` when the device id is taken.
#[derive(Message, Debug)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct RegisterDevice(pub Device);

impl Handler<RegisterDevice> for DeviceDirectory {
    type Result = ResponseFuture<Result<bool, StoreError>>;

    fn handle(&mut self, msg: RegisterDevice, _: &mut Self::Context) -> Self::Result {
        let db = self.db.clone();
        let device = msg.0;
        Box::pin(async move {
            db.run(move |mut conn| async move {
                if !patients::patient_exists(&mut conn, &device.patient_id).await? {
                    return Ok(false);
                }
                patients::insert_device(&mut conn, &device).await?;
                Ok(true)
            })
            .await
        })
    }
}

/// Stops every device actor and then the directory: the shard they belong to moved to another
/// node (a cluster rebalanced), which reloads each device's stored state on its next reading.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Retire;

impl Handler<Retire> for DeviceDirectory {
    type Result = ();

    fn handle(&mut self, _: Retire, ctx: &mut Self::Context) {
        for entry in self.devices.values() {
            entry.addr.do_send(Retire);
        }
        self.devices.clear();
        ctx.stop();
    }
}

impl Handler<Retire> for DeviceActor {
    type Result = ();

    fn handle(&mut self, _: Retire, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

/// Starts the actors of `devices` (those not running), each loading its stored state: the
/// devices whose fall watch was running when their state was last stored, so it escalates on
/// time even if the wearable says nothing more (after a restart, or a shard taken over).
#[derive(Message, Debug)]
#[rtype(result = "usize")]
pub struct WakeDevices(pub Vec<DeviceId>);

impl Handler<WakeDevices> for DeviceDirectory {
    type Result = usize;

    fn handle(&mut self, msg: WakeDevices, _: &mut Self::Context) -> usize {
        let mut new_devices: Vec<(DeviceId, Loaded)> = Vec::new();
        for id in msg.0 {
            if self.live(&id).is_none() {
                let (loaded, preload) = tokio::sync::oneshot::channel();
                self.start(&id, preload);
                new_devices.push((id, loaded));
            }
        }
        let started = new_devices.len();
        if started > 0 {
            actix::spawn(load_devices(self.db.clone(), new_devices));
        }
        started
    }
}

/// Wakes the devices with a running fall watch among those `owns` accepts.
pub async fn wake_pending_falls(
    db: &Db,
    directory: &Addr<DeviceDirectory>,
    owns: impl Fn(&DeviceId) -> bool,
) -> Result<usize, StoreError> {
    let pending = db
        .run(|mut conn| async move { patients::pending_falls(&mut conn).await })
        .await?;
    let mine: Vec<DeviceId> = pending.into_iter().filter(|id| owns(id)).collect();
    if mine.is_empty() {
        return Ok(0);
    }
    let started = directory
        .send(WakeDevices(mine))
        .await
        .map_err(|e| StoreError::Unavailable(format!("device directory: {e}")))?;
    if started > 0 {
        tracing::info!(devices = started, "resumed running fall watches");
    }
    Ok(started)
}
