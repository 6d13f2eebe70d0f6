//! `DeviceDirectory`: routes triaged readings to the per-wearable actors, starting an actor on
//! a device's first reading (and again after an idle one stopped). Device actors are spread
//! over a few arbiters (threads) by device id, so devices are processed in parallel while each
//! device's readings stay strictly ordered.
//!
//! It also keeps silence durable. Every reading passes here, so the directory stores when each
//! device was last heard (`devices.heard_at`, one statement for a batch's devices, at most once
//! per [`heard_step`] per device, before the batch is answered), and sweeps the stored marks
//! every few seconds: a device not heard for `triage.device_offline_s` whose actor is not
//! running (the server restarted, or the device's cluster shard moved here) gets its
//! `device.offline` from the sweep, without an actor. A running actor records its own, at the
//! exact deadline. No actor is started per known device at start-up.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use futures_util::future::join_all;

use super::actor::{
    CancelFall, DeviceActor, DeviceSummary, FallCancelled, InspectDevice, Preload, ProcessReadings,
    ReadingOutcome, ReportedOffline, Summarise, TriageRuntime,
};
use crate::actors::incident::EmergencyDetected;
use crate::domain::ids::DeviceId;
use crate::domain::shards::device_shard;
use crate::domain::vitals::Reading;
use crate::persistence::patients::{self, DeviceState};
use crate::persistence::{Db, StoreError};

struct Entry {
    addr: Addr<DeviceActor>,
    /// How many times an actor was started for this device (restarts = starts − 1).
    starts: u32,
    /// The `heard_at` stored for the device since its actor started (`None`: not yet).
    heard: Option<DateTime<Utc>>,
}

/// How far apart a device's stored `heard_at` marks are: a twentieth of the silence limit, at
/// most 15 s. A mark is stored at or after the reading's arrival and at most two steps after
/// it, so a device recorded offline by the sweep (its actor was not running) is recorded up to
/// a tenth of the limit late, never early; a busy device costs one row update per step.
pub fn heard_step(limit: Duration) -> Duration {
    (limit / 20).clamp(Duration::from_millis(1), Duration::from_secs(15))
}

/// The `heard_at` mark to store for readings arriving at `now`: the second grid point of
/// `step` after `now` (at least one step ahead). On a grid, the devices heard within one step
/// share their mark and are stored by one statement, and are due again together.
pub fn heard_mark(now: DateTime<Utc>, step: Duration) -> DateTime<Utc> {
    let step_ms = i64::try_from(step.as_millis()).unwrap_or(i64::MAX).max(1);
    let at = now.timestamp_millis();
    let next = at
        .div_euclid(step_ms)
        .saturating_add(2)
        .saturating_mul(step_ms);
    DateTime::<Utc>::from_timestamp_millis(next).unwrap_or(now)
}

/// How often the directory sweeps for silent devices: every step, at least every 5 s.
fn sweep_every(limit: Duration) -> Duration {
    heard_step(limit).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// Most devices recorded offline by one write.
const OFFLINE_PER_WRITE: usize = 1_024;

/// The directory of live device actors.
pub struct DeviceDirectory {
    db: Db,
    runtime: Arc<TriageRuntime>,
    handoff: Recipient<EmergencyDetected>,
    arbiters: Vec<ArbiterHandle>,
    hasher: RandomState,
    devices: HashMap<DeviceId, Entry>,
    /// The cluster device shard served (index, shard count); `None`: every device.
    shard: Option<(u16, u16)>,
    /// Whether a sweep for silent devices is running.
    sweeping: bool,
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
            shard: None,
            sweeping: false,
        }
    }

    /// Serves only the devices of cluster device shard `index` of `shards`: the sweep leaves
    /// the other shards' devices to their holders.
    pub fn for_shard(mut self, index: u16, shards: u16) -> Self {
        self.shard = Some((index, shards));
        self
    }

    fn owns(&self, id: &DeviceId) -> bool {
        self.shard
            .is_none_or(|(index, shards)| device_shard(id, shards) == index)
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
            heard: None,
        });
        entry.addr = addr.clone();
        entry.starts += 1;
        // The stored mark may have been cleared (`device.offline`) since the last actor.
        entry.heard = None;
        addr
    }

    /// The live actor of `id`, started if there is none (it loads its stored state itself).
    fn live_or_start(&mut self, id: &DeviceId) -> Addr<DeviceActor> {
        match self.live(id) {
            Some(addr) => addr,
            None => {
                // The sender is dropped: the actor reads its registration itself.
                let (_, preload) = tokio::sync::oneshot::channel();
                self.start(id, preload)
            }
        }
    }

    /// Looks for devices not heard for the silence limit whose actor is not running, and
    /// records their `device.offline` (a running actor records its own).
    fn sweep(&mut self, ctx: &mut Context<Self>) {
        if self.sweeping {
            return;
        }
        self.sweeping = true;
        let limit = self.runtime.offline_after;
        let before =
            Utc::now() - chrono::Duration::from_std(limit).unwrap_or(chrono::Duration::MAX);
        let db = self.db.clone();
        let found = async move {
            db.run(move |mut conn| async move { patients::silent_devices(&mut conn, before).await })
                .await
        };
        ctx.spawn(
            found
                .into_actor(self)
                .then(move |found, act, _| {
                    let silent: Vec<DeviceId> = match found {
                        Ok(ids) => ids
                            .into_iter()
                            .filter(|id| act.owns(id) && act.live(id).is_none())
                            .collect(),
                        Err(e) => {
                            tracing::warn!(error = %e, "silent devices not looked up; the next sweep retries");
                            Vec::new()
                        }
                    };
                    let writer = act.runtime.writer.clone();
                    async move {
                        for chunk in silent.chunks(OFFLINE_PER_WRITE) {
                            let chunk = chunk.to_vec();
                            let recorded = writer
                                .write(move |conn| {
                                    let chunk = chunk.clone();
                                    Box::pin(async move {
                                        patients::record_offline(
                                            conn,
                                            &chunk,
                                            before,
                                            limit.as_secs(),
                                            Utc::now(),
                                        )
                                        .await
                                    })
                                })
                                .await;
                            match recorded {
                                Ok(ids) if !ids.is_empty() => {
                                    tracing::info!(devices = ids.len(), "silent devices recorded offline");
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    tracing::warn!(error = %e, "silent devices not recorded offline; the next sweep retries");
                                    break;
                                }
                            }
                        }
                    }
                    .into_actor(act)
                })
                .map(|(), act, _| act.sweeping = false),
        );
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
        // Silent devices without an actor: at once (those that fell silent while this server
        // was down, or while their shard had no holder), then every few seconds.
        self.sweep(ctx);
        ctx.run_interval(sweep_every(self.runtime.offline_after), |act, ctx| {
            act.sweep(ctx)
        });
    }
}

/// A stored `heard_at` mark was not written: forget it, so the devices' next batch stores it.
#[derive(Message, Debug)]
#[rtype(result = "()")]
struct MarkFailed(Vec<DeviceId>);

impl Handler<MarkFailed> for DeviceDirectory {
    type Result = ();

    fn handle(&mut self, msg: MarkFailed, _: &mut Self::Context) {
        for id in msg.0 {
            if let Some(entry) = self.devices.get_mut(&id) {
                entry.heard = None;
            }
        }
    }
}

/// Apply readings to their devices (each device's actor triages its own, on its arbiter).
#[derive(Message, Debug)]
#[rtype(result = "Vec<(usize, ReadingOutcome)>")]
pub struct Ingest(pub Vec<(usize, Reading)>);

impl Handler<Ingest> for DeviceDirectory {
    type Result = ResponseFuture<Vec<(usize, ReadingOutcome)>>;

    // Long on purpose: the ingest front door (group, start, mark heard, answer as one), one
    // pass over the batch.
    fn handle(&mut self, msg: Ingest, ctx: &mut Self::Context) -> Self::Result {
        let now = Utc::now();
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
        // The devices whose stored `heard_at` is older than now, with their newest reading.
        let mark = heard_mark(now, heard_step(self.runtime.offline_after));
        let mut heard: Vec<(DeviceId, DateTime<Utc>)> = Vec::new();
        let mut marked: HashSet<usize> = HashSet::new();
        let mut sends = Vec::with_capacity(groups.len());
        for (id, readings) in groups {
            let addr = self.live(&id).unwrap_or_else(|| {
                let (loaded, preload) = tokio::sync::oneshot::channel();
                let addr = self.start(&id, preload);
                new_devices.push((id.clone(), loaded));
                addr
            });
            if let Some(entry) = self.devices.get_mut(&id)
                && entry.heard.is_none_or(|h| h < now)
            {
                entry.heard = Some(mark);
                let newest = readings.iter().map(|(_, r)| r.timestamp).max();
                heard.push((id, newest.unwrap_or(now)));
                marked.extend(readings.iter().map(|(i, _)| *i));
            }
            let indices: Vec<usize> = readings.iter().map(|(i, _)| *i).collect();
            sends.push(async move {
                match addr.send(ProcessReadings(readings)).await {
                    Ok(outcomes) => outcomes,
                    Err(_) => indices
                        .into_iter()
                        .map(|i| (i, ReadingOutcome::Unavailable))
                        .collect(),
                }
            });
        }
        if !new_devices.is_empty() {
            let db = self.db.clone();
            actix::spawn(load_devices(db, new_devices));
        }
        // Stored alongside the readings' triage, and before they are answered: an answered
        // reading is never lost to the offline sweep of a server started after a crash.
        let marking = (!heard.is_empty()).then(|| {
            let (writer, me) = (self.runtime.writer.clone(), ctx.address());
            async move {
                let ids: Vec<DeviceId> = heard.iter().map(|(id, _)| id.clone()).collect();
                let heard = Arc::new(heard);
                let stored = writer
                    .write_as(true, move |conn| {
                        let heard = heard.clone();
                        Box::pin(async move { patients::mark_heard(conn, &heard, mark).await })
                    })
                    .await;
                if let Err(e) = &stored {
                    tracing::warn!(error = %e, devices = ids.len(), "heard marks not stored; those readings are refused");
                    me.do_send(MarkFailed(ids));
                }
                stored.is_ok()
            }
        });
        Box::pin(async move {
            let (outcomes, marked_ok) = futures_util::future::join(
                join_all(sends),
                futures_util::future::OptionFuture::from(marking),
            )
            .await;
            let refuse = marked_ok == Some(false);
            let mut all: Vec<(usize, ReadingOutcome)> = outcomes
                .into_iter()
                .flatten()
                .map(|(i, outcome)| {
                    if refuse && marked.contains(&i) {
                        (i, ReadingOutcome::Unavailable)
                    } else {
                        (i, outcome)
                    }
                })
                .collect();
            all.sort_by_key(|(i, _)| *i);
            all
        })
    }
}

/// The wearer's "I'm OK" for a device: sent to its actor (started if none runs, to resume a
/// stored fall watch and stand it down).
#[derive(Message, Debug, Clone, serde::Serialize, serde::Deserialize)]
#[rtype(result = "Result<FallCancelled, StoreError>")]
pub struct CancelDeviceFall {
    /// The device.
    pub device_id: DeviceId,
    /// Who sent it (`gateway` or `patient`).
    pub by: crate::domain::auth::Role,
}

impl Handler<CancelDeviceFall> for DeviceDirectory {
    type Result = ResponseFuture<Result<FallCancelled, StoreError>>;

    fn handle(&mut self, msg: CancelDeviceFall, _: &mut Self::Context) -> Self::Result {
        let addr = self.live_or_start(&msg.device_id);
        Box::pin(async move {
            addr.send(CancelFall {
                now: Utc::now(),
                by: msg.by,
            })
            .await
            .map_err(|e| StoreError::Unavailable(format!("device actor: {e}")))?
        })
    }
}

/// A device said it is offline (an MQTT status `offline`, usually its Will): `device.offline`
/// is recorded at once, not at the end of the silence, by its actor when one runs (in line
/// after its earlier changes), else here. Answers whether it was recorded now (`false`: an
/// unknown device, or one not heard since its last `device.offline`).
#[derive(Message, Debug, Clone, serde::Serialize, serde::Deserialize)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct ReportOffline {
    /// The device.
    pub device_id: DeviceId,
}

impl Handler<ReportOffline> for DeviceDirectory {
    type Result = ResponseFuture<Result<bool, StoreError>>;

    fn handle(&mut self, msg: ReportOffline, _: &mut Self::Context) -> Self::Result {
        let now = Utc::now();
        // Every reading that arrived until now has a stored mark before this one.
        let heard_before = heard_mark(now, heard_step(self.runtime.offline_after))
            + chrono::Duration::milliseconds(1);
        if let Some(entry) = self.devices.get_mut(&msg.device_id) {
            // The mark is cleared with the event: the device's next reading stores it again.
            entry.heard = None;
        }
        if let Some(addr) = self.live(&msg.device_id) {
            return Box::pin(async move {
                addr.send(ReportedOffline { heard_before })
                    .await
                    .map_err(|e| StoreError::Unavailable(format!("device actor: {e}")))?
            });
        }
        let writer = self.runtime.writer.clone();
        Box::pin(async move {
            let ids = vec![msg.device_id];
            let recorded = writer
                .write(move |conn| {
                    let ids = ids.clone();
                    Box::pin(async move {
                        patients::record_offline(conn, &ids, heard_before, 0, Utc::now()).await
                    })
                })
                .await?;
            if !recorded.is_empty() {
                tracing::info!(device.id = %recorded[0], "device offline (reported)");
            }
            Ok(!recorded.is_empty())
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp_millis(ms).unwrap()
    }

    #[test]
    fn steps_are_a_twentieth_of_the_limit_and_at_most_fifteen_seconds() {
        assert_eq!(
            heard_step(Duration::from_secs(300)),
            Duration::from_secs(15)
        );
        assert_eq!(
            heard_step(Duration::from_secs(3_600)),
            Duration::from_secs(15)
        );
        assert_eq!(
            heard_step(Duration::from_secs(2)),
            Duration::from_millis(100)
        );
        assert_eq!(heard_step(Duration::ZERO), Duration::from_millis(1));
        assert_eq!(
            sweep_every(Duration::from_secs(300)),
            Duration::from_secs(5)
        );
        assert_eq!(
            sweep_every(Duration::from_secs(1)),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn a_mark_is_never_before_the_reading_and_at_most_two_steps_after_it() {
        let step = Duration::from_secs(15);
        let step_ms = 15_000;
        for ms in [
            0,
            1,
            14_999,
            15_000,
            15_001,
            1_796_688_000_123,
            1_796_688_014_999,
        ] {
            let mark = heard_mark(at(ms), step);
            assert!(mark.timestamp_millis() >= ms + step_ms, "{ms}: {mark}");
            assert!(mark.timestamp_millis() <= ms + 2 * step_ms, "{ms}: {mark}");
            assert_eq!(mark.timestamp_millis() % step_ms, 0, "{ms}: on the grid");
        }
        // Devices heard within one step share their mark (one statement, due together).
        assert_eq!(heard_mark(at(15_000), step), heard_mark(at(29_999), step));
        assert_ne!(heard_mark(at(29_999), step), heard_mark(at(30_000), step));
    }
}
