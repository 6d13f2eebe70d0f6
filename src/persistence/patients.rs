//! Patients, next of kin and registered devices.

use chrono::{DateTime, NaiveDate, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::events::{self, Prepared};
use super::schema::{devices, next_of_kin, patients};
use super::statement::{Bind, Statement};
use super::{DbConn, StoreError, from_db_time, to_db_time};
use crate::db_run;
use crate::domain::events::DeviceEvent;
use crate::domain::geo::LatLng;
use crate::domain::ids::{DeviceId, PatientId};
use crate::domain::patients::{Device, Insurance, NextOfKin, Patient};

#[derive(Insertable, Queryable, Selectable)]
#[diesel(table_name = patients, treat_none_as_default_value = false)]
struct PatientRow {
    id: PatientId,
    name: String,
    date_of_birth: Option<String>,
    home_lat: Option<f64>,
    home_lng: Option<f64>,
    insurance_provider: Option<String>,
    insurance_member_id: Option<String>,
    created_at: chrono::NaiveDateTime,
}

#[derive(Insertable, Queryable, Selectable)]
#[diesel(table_name = next_of_kin, treat_none_as_default_value = false)]
struct KinRow {
    /// The row's own key (a UUID no other table refers to): text.
    id: String,
    patient_id: PatientId,
    position: i32,
    name: String,
    relation: Option<String>,
    phone: Option<String>,
    email: Option<String>,
}

/// Stores a patient and their next of kin in one transaction. A duplicate id is a
/// `StoreError::Conflict`.
pub async fn insert_patient(conn: &mut DbConn, patient: &Patient) -> Result<(), StoreError> {
    let row = PatientRow {
        id: patient.id.clone(),
        name: patient.name.clone(),
        date_of_birth: patient.date_of_birth.map(|d| d.to_string()),
        home_lat: patient.home_location.map(|l| l.lat),
        home_lng: patient.home_location.map(|l| l.lng),
        insurance_provider: patient.insurance.as_ref().map(|i| i.provider.clone()),
        insurance_member_id: patient.insurance.as_ref().map(|i| i.member_id.clone()),
        created_at: to_db_time(patient.created_at),
    };
    let kin: Vec<KinRow> = patient
        .next_of_kin
        .iter()
        .zip(0_i32..)
        .map(|(k, position)| KinRow {
            id: uuid::Uuid::now_v7().to_string(),
            patient_id: patient.id.clone(),
            position,
            name: k.name.clone(),
            relation: k.relation.clone(),
            phone: k.phone.clone(),
            email: k.email.clone(),
        })
        .collect();
    let (row, kin) = (&row, &kin);
    conn.write_transaction(async |tx| {
        db_run!(tx, |c| {
            diesel::insert_into(patients::table)
                .values(row)
                .execute(c)
                .await?;
            for k in kin {
                diesel::insert_into(next_of_kin::table)
                    .values(k)
                    .execute(c)
                    .await?;
            }
        });
        Ok::<_, StoreError>(())
    })
    .await
}

/// The patient with `id`, if any.
pub async fn find_patient(
    conn: &mut DbConn,
    id: &PatientId,
) -> Result<Option<Patient>, StoreError> {
    // The row and its next of kin are independent reads: one round trip when pipelined.
    let (row, kin) = conn
        .try_both(
            async |c| {
                let row: Option<PatientRow> = db_run!(c, |c| {
                    patients::table
                        .find(id)
                        .select(PatientRow::as_select())
                        .first(c)
                        .await
                        .optional()?
                });
                Ok::<_, StoreError>(row)
            },
            async |c| {
                let kin: Vec<KinRow> = db_run!(c, |c| {
                    next_of_kin::table
                        .filter(next_of_kin::patient_id.eq(id))
                        .order(next_of_kin::position.asc())
                        .select(KinRow::as_select())
                        .load(c)
                        .await?
                });
                Ok(kin)
            },
        )
        .await?;
    let found = row.map(|row| (row, kin));
    let Some((row, kin)) = found else {
        return Ok(None);
    };
    let date_of_birth = row
        .date_of_birth
        .map(|d| d.parse::<NaiveDate>())
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("patient date_of_birth: {e}")))?;
    Ok(Some(Patient {
        id: row.id,
        name: row.name,
        date_of_birth,
        home_location: row
            .home_lat
            .zip(row.home_lng)
            .map(|(lat, lng)| LatLng { lat, lng }),
        insurance: row.insurance_provider.zip(row.insurance_member_id).map(
            |(provider, member_id)| Insurance {
                provider,
                member_id,
            },
        ),
        next_of_kin: kin
            .into_iter()
            .map(|k| NextOfKin {
                name: k.name,
                relation: k.relation,
                phone: k.phone,
                email: k.email,
            })
            .collect(),
        created_at: from_db_time(row.created_at),
    }))
}

/// Whether a patient with `id` exists.
pub async fn patient_exists(conn: &mut DbConn, id: &PatientId) -> Result<bool, StoreError> {
    let n: i64 = db_run!(conn, |c| {
        patients::table
            .filter(patients::id.eq(id))
            .count()
            .get_result(c)
            .await?
    });
    Ok(n > 0)
}

#[derive(Insertable, Queryable, Selectable)]
#[diesel(table_name = devices, treat_none_as_default_value = false)]
struct DeviceRow {
    id: DeviceId,
    patient_id: PatientId,
    model: Option<String>,
    registered_at: chrono::NaiveDateTime,
    last_status: Option<String>,
    last_seen_at: Option<chrono::NaiveDateTime>,
    fall_at: Option<chrono::NaiveDateTime>,
    fall_deadline: Option<chrono::NaiveDateTime>,
    heard_at: Option<chrono::NaiveDateTime>,
}

/// A running fall watch: when the wearer fell, and when it escalates without movement.
pub type FallWatchState = (DateTime<Utc>, DateTime<Utc>);

/// A registered device with its last known triage state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceState {
    /// The registration.
    pub device: Device,
    /// The last status a `vitals.status_changed` recorded (`normal`, `abnormal`, `emergency`).
    pub last_status: Option<String>,
    /// When the last reading behind that status was measured.
    pub last_seen_at: Option<DateTime<Utc>>,
    /// Its running fall watch, if one was running when its state was last stored.
    pub fall: Option<FallWatchState>,
    /// When it was last heard, as stored ([`mark_heard`]): at or after the last reading's
    /// arrival; `None` when never heard or once its `device.offline` is recorded.
    pub heard_at: Option<DateTime<Utc>>,
}

/// Registers a device. A duplicate id is a `StoreError::Conflict`.
pub async fn insert_device(conn: &mut DbConn, device: &Device) -> Result<(), StoreError> {
    let row = DeviceRow {
        id: device.id.clone(),
        patient_id: device.patient_id.clone(),
        model: device.model.clone(),
        registered_at: to_db_time(device.registered_at),
        last_status: None,
        last_seen_at: None,
        fall_at: None,
        fall_deadline: None,
        heard_at: None,
    };
    db_run!(conn, |c| {
        diesel::insert_into(devices::table)
            .values(&row)
            .execute(c)
            .await?
    });
    Ok(())
}

/// The device with `id` and its last known status, if registered.
pub async fn find_device(
    conn: &mut DbConn,
    id: &DeviceId,
) -> Result<Option<DeviceState>, StoreError> {
    let row: Option<DeviceRow> = db_run!(conn, |c| {
        devices::table
            .find(id)
            .select(DeviceRow::as_select())
            .first(c)
            .await
            .optional()?
    });
    Ok(row.map(DeviceRow::into_state))
}

impl DeviceRow {
    fn into_state(self) -> DeviceState {
        DeviceState {
            device: Device {
                id: self.id,
                patient_id: self.patient_id,
                model: self.model,
                registered_at: from_db_time(self.registered_at),
            },
            last_status: self.last_status,
            last_seen_at: self.last_seen_at.map(from_db_time),
            fall: self
                .fall_at
                .zip(self.fall_deadline)
                .map(|(at, deadline)| (from_db_time(at), from_db_time(deadline))),
            heard_at: self.heard_at.map(from_db_time),
        }
    }
}

/// The devices among `ids` that are registered, with their last known status: one query
/// for a batch of devices seen for the first time since the server started.
pub async fn find_devices(
    conn: &mut DbConn,
    ids: &[DeviceId],
) -> Result<Vec<DeviceState>, StoreError> {
    let rows: Vec<DeviceRow> = db_run!(conn, |c| {
        devices::table
            .filter(devices::id.eq_any(ids))
            .select(DeviceRow::as_select())
            .load(c)
            .await?
    });
    Ok(rows.into_iter().map(DeviceRow::into_state).collect())
}

/// Records a device's new status (projection of `vitals.status_changed`) and its fall watch.
pub async fn set_device_status(
    conn: &mut DbConn,
    id: &DeviceId,
    status: &str,
    seen_at: DateTime<Utc>,
    fall: Option<FallWatchState>,
) -> Result<(), StoreError> {
    let (fall_at, fall_deadline) = match fall {
        Some((at, deadline)) => (Some(to_db_time(at)), Some(to_db_time(deadline))),
        None => (None, None),
    };
    db_run!(conn, |c| {
        diesel::update(devices::table.find(id))
            .set((
                devices::last_status.eq(Some(status)),
                devices::last_seen_at.eq(Some(to_db_time(seen_at))),
                devices::fall_at.eq(fall_at),
                devices::fall_deadline.eq(fall_deadline),
            ))
            .execute(c)
            .await?
    });
    Ok(())
}

/// The devices with a fall watch running, as last stored: their actors are started at once
/// (at start-up, or when their cluster shard is taken over) so the watch escalates on time
/// even if the wearable says nothing more.
pub async fn pending_falls(conn: &mut DbConn) -> Result<Vec<DeviceId>, StoreError> {
    Ok(db_run!(conn, |c| {
        devices::table
            .filter(devices::fall_deadline.is_not_null())
            .select(devices::id)
            .load(c)
            .await?
    }))
}

/// Most devices named in one SQLite statement (its limit is 32,766 binds).
const IDS_PER_STATEMENT: usize = 8_192;

/// PostgreSQL: marks many devices heard in one statement (binds: heard at, ids, newest
/// measurement per device). `last_seen_at` only moves forward.
const MARK_HEARD_PG: &[&str] = &[
    "UPDATE devices SET heard_at = ",
    ", last_seen_at = CASE WHEN devices.last_seen_at IS NULL OR devices.last_seen_at < t.seen \
         THEN t.seen ELSE devices.last_seen_at END \
     FROM unnest(",
    "::text[], ",
    "::timestamp[]) AS t(id, seen) WHERE devices.id = t.id",
];
struct MarkHeardPg;

/// SQLite: marks one device heard (binds: heard at, newest measurement twice, id).
const MARK_HEARD_SQLITE: &[&str] = &[
    "UPDATE devices SET heard_at = ",
    ", last_seen_at = CASE WHEN last_seen_at IS NULL OR last_seen_at < ",
    " THEN ",
    " ELSE last_seen_at END WHERE id = ",
    "",
];
struct MarkHeardSqlite;

/// Records that `devices` (each with its newest reading's measurement time) were heard, as of
/// `heard_at` (which the caller makes at or after the readings' arrival): the offline sweep
/// ([`silent_devices`]) finds a device once `heard_at` is older than the silence limit, even if
/// no actor of the device is running. Their `last_seen_at` moves forward to the newest reading.
pub async fn mark_heard(
    conn: &mut DbConn,
    devices: &[(DeviceId, DateTime<Utc>)],
    heard_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    if devices.is_empty() {
        return Ok(());
    }
    let heard_at = to_db_time(heard_at);
    db_run!(conn, |c| {
        for (id, seen) in devices {
            let seen = to_db_time(*seen);
            Statement::<MarkHeardSqlite>::new(
                MARK_HEARD_SQLITE,
                vec![
                    Bind::Timestamp(heard_at),
                    Bind::Timestamp(seen),
                    Bind::Timestamp(seen),
                    Bind::Text(id.as_str()),
                ],
            )
            .execute(c)
            .await?;
        }
    } else |c| {
        Statement::<MarkHeardPg>::new(
            MARK_HEARD_PG,
            vec![
                Bind::Timestamp(heard_at),
                Bind::Texts(devices.iter().map(|(id, _)| id.as_str()).collect()),
                Bind::Timestamps(devices.iter().map(|(_, seen)| to_db_time(*seen)).collect()),
            ],
        )
        .execute(c)
        .await?;
    });
    Ok(())
}

/// The devices not heard since `heard_before` (and not yet recorded offline): one range of the
/// `devices_heard_at` index, holding the silent ones.
pub async fn silent_devices(
    conn: &mut DbConn,
    heard_before: DateTime<Utc>,
) -> Result<Vec<DeviceId>, StoreError> {
    let before = to_db_time(heard_before);
    Ok(db_run!(conn, |c| {
        devices::table
            .filter(devices::heard_at.is_not_null())
            .filter(devices::heard_at.lt(before))
            .select(devices::id)
            .load(c)
            .await?
    }))
}

#[derive(Queryable)]
struct SilentRow {
    id: DeviceId,
    patient_id: PatientId,
    last_seen_at: Option<chrono::NaiveDateTime>,
}

/// Records `device.offline` (silence of `silent_s` seconds) for those of `ids` not heard since
/// `heard_before`, and clears their `heard_at`, in the caller's transaction; returns them. A
/// device heard meanwhile (or already recorded offline) is left alone, so whoever notices the
/// silence first records it once: the device's actor at its exact deadline, or the sweep of
/// the devices without one.
pub async fn record_offline(
    conn: &mut DbConn,
    ids: &[DeviceId],
    heard_before: DateTime<Utc>,
    silent_s: u64,
    now: DateTime<Utc>,
) -> Result<Vec<DeviceId>, StoreError> {
    let before = to_db_time(heard_before);
    let mut silent: Vec<SilentRow> = Vec::new();
    for chunk in ids.chunks(IDS_PER_STATEMENT) {
        let rows: Vec<SilentRow> = db_run!(&mut *conn, |c| {
            devices::table
                .filter(devices::id.eq_any(chunk))
                .filter(devices::heard_at.is_not_null())
                .filter(devices::heard_at.lt(before))
                .select((devices::id, devices::patient_id, devices::last_seen_at))
                .load(c)
                .await?
        });
        silent.extend(rows);
    }
    if silent.is_empty() {
        return Ok(Vec::new());
    }
    for chunk in silent.chunks(IDS_PER_STATEMENT) {
        let chunk: Vec<&DeviceId> = chunk.iter().map(|r| &r.id).collect();
        db_run!(&mut *conn, |c| {
            diesel::update(devices::table.filter(devices::id.eq_any(&chunk)))
                .set(devices::heard_at.eq(None::<chrono::NaiveDateTime>))
                .execute(c)
                .await?
        });
    }
    let prepared = silent
        .iter()
        .map(|row| {
            let event = DeviceEvent::Offline {
                device_id: row.id.clone(),
                patient_id: row.patient_id.clone(),
                last_seen_at: row.last_seen_at.map(from_db_time),
                silent_s,
            }
            .to_new();
            Prepared::new(&format!("device-{}", row.id), event)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<&Prepared> = prepared.iter().collect();
    events::append_many(conn, &refs, now).await?;
    Ok(silent.into_iter().map(|r| r.id).collect())
}
