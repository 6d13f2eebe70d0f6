//! The one door to the wearables: [`DeviceRouter`]. Every ingest edge (the vitals endpoint, the
//! gateway WebSocket, a wearer's "I'm OK", the admin inspector, and the buses to come) holds a
//! `dyn DeviceRouter` and never learns where the device actors run: on this process
//! ([`LocalDevices`], a single node) or spread over a cluster's device shards (the cluster's
//! own implementation, which sends each device's work to the node serving its shard).

use std::sync::Arc;

use actix::Addr;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::actor::{DeviceInspection, DeviceSummary, FallCancelled, ReadingOutcome};
use super::directory::{
    CancelDeviceFall, DeviceDirectory, Ingest, ListDevices, Lookup, ReportOffline, inspect,
};
use crate::domain::ids::DeviceId;
use crate::domain::patients::Device;
use crate::domain::vitals::Reading;
use crate::persistence::{Db, StoreError};

/// A page of live device actors: how many there are in all, and up to the limit asked for.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DevicePage {
    /// Live device actors in all (wherever they run).
    pub count: usize,
    /// Up to the limit asked for, each with its restarts.
    pub items: Vec<LiveDevice>,
}

/// One live device actor in a [`DevicePage`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LiveDevice {
    /// What it says of itself.
    #[serde(flatten)]
    pub summary: DeviceSummary,
    /// How many times it was started again.
    pub restarts: u32,
}

/// One live device actor's whole in-memory state, with its restarts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceView {
    /// How many times it was started again.
    pub restarts: u32,
    /// What it reports of itself.
    #[serde(flatten)]
    pub inspection: DeviceInspection,
}

/// Why a device's work could not be done.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device's actor, or the node serving its shard, cannot be reached right now (a
    /// directory restarting, a shard changing hands): retry shortly.
    #[error("the device cannot be reached right now: {0}")]
    Unreachable(String),
    /// Its state could not be read or stored.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a device's work goes. Implemented by [`LocalDevices`] and by the cluster's device
/// shards; the callers hold an `Arc<dyn DeviceRouter>`.
pub trait DeviceRouter: Send + Sync + 'static {
    /// Applies readings (each with its index in the request) and answers every one, in request
    /// order. A reading whose device cannot be reached right now is answered
    /// [`ReadingOutcome::Unavailable`] (its client retries).
    fn apply(&self, readings: Vec<(usize, Reading)>)
    -> BoxFuture<'_, Vec<(usize, ReadingOutcome)>>;

    /// A wearer's "I'm OK", sent to the device's actor.
    fn cancel_fall(
        &self,
        cancel: CancelDeviceFall,
    ) -> BoxFuture<'_, Result<FallCancelled, DeviceError>>;

    /// The device said it is offline (an MQTT status): `device.offline` is recorded at once,
    /// in line after the device's earlier changes. `Ok(false)`: nothing recorded (an unknown
    /// device, or one not heard since its last `device.offline`); an error is transient.
    fn report_offline(&self, device_id: DeviceId) -> BoxFuture<'_, Result<bool, DeviceError>>;

    /// Up to `limit` live device actors, and how many there are.
    fn list(&self, limit: usize) -> BoxFuture<'_, Result<DevicePage, DeviceError>>;

    /// One live device actor's state; `None` when the device has no live actor.
    fn inspect(&self, id: DeviceId) -> BoxFuture<'_, Result<Option<DeviceView>, DeviceError>>;
}

/// The device actors of a single node: one [`DeviceDirectory`] on this process.
pub struct LocalDevices {
    directory: Addr<DeviceDirectory>,
    /// The threads the device actors run on, kept alive with the router.
    _arbiters: Vec<actix::Arbiter>,
}

impl LocalDevices {
    /// Routes to `directory`, whose actors run on `arbiters`.
    pub fn new(directory: Addr<DeviceDirectory>, arbiters: Vec<actix::Arbiter>) -> Arc<Self> {
        Arc::new(Self {
            directory,
            _arbiters: arbiters,
        })
    }
}

fn directory_gone(e: actix::MailboxError) -> DeviceError {
    DeviceError::Unreachable(format!("device directory: {e}"))
}

impl DeviceRouter for LocalDevices {
    fn apply(
        &self,
        readings: Vec<(usize, Reading)>,
    ) -> BoxFuture<'_, Vec<(usize, ReadingOutcome)>> {
        Box::pin(apply_to(&self.directory, readings))
    }

    fn cancel_fall(
        &self,
        cancel: CancelDeviceFall,
    ) -> BoxFuture<'_, Result<FallCancelled, DeviceError>> {
        Box::pin(async move {
            Ok(self
                .directory
                .send(cancel)
                .await
                .map_err(directory_gone)??)
        })
    }

    fn report_offline(&self, device_id: DeviceId) -> BoxFuture<'_, Result<bool, DeviceError>> {
        Box::pin(report_offline_to(&self.directory, device_id))
    }

    fn list(&self, limit: usize) -> BoxFuture<'_, Result<DevicePage, DeviceError>> {
        Box::pin(list_in(&self.directory, limit))
    }

    fn inspect(&self, id: DeviceId) -> BoxFuture<'_, Result<Option<DeviceView>, DeviceError>> {
        Box::pin(inspect_in(&self.directory, id))
    }
}

/// Applies readings to `directory`'s devices; every reading is answered `Unavailable` when the
/// directory is gone.
pub async fn apply_to(
    directory: &Addr<DeviceDirectory>,
    readings: Vec<(usize, Reading)>,
) -> Vec<(usize, ReadingOutcome)> {
    let indices: Vec<usize> = readings.iter().map(|(i, _)| *i).collect();
    match directory.send(Ingest(readings)).await {
        Ok(outcomes) => outcomes,
        Err(_) => indices
            .into_iter()
            .map(|i| (i, ReadingOutcome::Unavailable))
            .collect(),
    }
}

/// Records `device.offline` now for `device_id`, one of `directory`'s devices (see
/// [`DeviceRouter::report_offline`]).
pub async fn report_offline_to(
    directory: &Addr<DeviceDirectory>,
    device_id: DeviceId,
) -> Result<bool, DeviceError> {
    Ok(directory
        .send(ReportOffline { device_id })
        .await
        .map_err(directory_gone)??)
}

/// Up to `limit` of `directory`'s live device actors, and how many it has.
pub async fn list_in(
    directory: &Addr<DeviceDirectory>,
    limit: usize,
) -> Result<DevicePage, DeviceError> {
    let (count, page) = directory
        .send(ListDevices { limit })
        .await
        .map_err(directory_gone)?;
    Ok(DevicePage {
        count,
        items: page
            .into_iter()
            .map(|(summary, restarts)| LiveDevice { summary, restarts })
            .collect(),
    })
}

/// The state of `id`'s live actor in `directory`, if it has one.
pub async fn inspect_in(
    directory: &Addr<DeviceDirectory>,
    id: DeviceId,
) -> Result<Option<DeviceView>, DeviceError> {
    let Some((addr, restarts)) = directory.send(Lookup(id)).await.map_err(directory_gone)? else {
        return Ok(None);
    };
    Ok(inspect(&addr).await.map(|inspection| DeviceView {
        restarts,
        inspection,
    }))
}

/// Registers a wearable to its patient: `false` when no patient has the id named;
/// `StoreError::Conflict` when the device id is taken. Only the database is involved: the
/// device's actor starts on its first reading, wherever its shard is served.
pub async fn register(db: &Db, device: Device) -> Result<bool, StoreError> {
    db.run(move |mut conn| async move {
        if !crate::persistence::patients::patient_exists(&mut conn, &device.patient_id).await? {
            return Ok(false);
        }
        crate::persistence::patients::insert_device(&mut conn, &device).await?;
        Ok(true)
    })
    .await
}
