//! Patients, next of kin and registered devices.

use chrono::{DateTime, NaiveDate, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::{devices, next_of_kin, patients};
use super::{DbConn, StoreError, from_db_time, to_db_time};
use crate::db_run;
use crate::domain::geo::LatLng;
use crate::domain::ids::{DeviceId, PatientId};
use crate::domain::patients::{Device, Insurance, NextOfKin, Patient};

#[derive(Insertable, Queryable, Selectable)]
#[diesel(table_name = patients, treat_none_as_default_value = false)]
struct PatientRow {
    id: String,
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
    id: String,
    patient_id: String,
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
        id: patient.id.0.clone(),
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
            patient_id: patient.id.0.clone(),
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
                        .find(id.as_str())
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
                        .filter(next_of_kin::patient_id.eq(id.as_str()))
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
        id: PatientId(row.id),
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
            .filter(patients::id.eq(id.as_str()))
            .count()
            .get_result(c)
            .await?
    });
    Ok(n > 0)
}

#[derive(Insertable, Queryable, Selectable)]
#[diesel(table_name = devices, treat_none_as_default_value = false)]
struct DeviceRow {
    id: String,
    patient_id: String,
    model: Option<String>,
    registered_at: chrono::NaiveDateTime,
    last_status: Option<String>,
    last_seen_at: Option<chrono::NaiveDateTime>,
    fall_at: Option<chrono::NaiveDateTime>,
    fall_deadline: Option<chrono::NaiveDateTime>,
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
}

/// Registers a device. A duplicate id is a `StoreError::Conflict`.
pub async fn insert_device(conn: &mut DbConn, device: &Device) -> Result<(), StoreError> {
    let row = DeviceRow {
        id: device.id.0.clone(),
        patient_id: device.patient_id.0.clone(),
        model: device.model.clone(),
        registered_at: to_db_time(device.registered_at),
        last_status: None,
        last_seen_at: None,
        fall_at: None,
        fall_deadline: None,
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
            .find(id.as_str())
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
                id: DeviceId(self.id),
                patient_id: PatientId(self.patient_id),
                model: self.model,
                registered_at: from_db_time(self.registered_at),
            },
            last_status: self.last_status,
            last_seen_at: self.last_seen_at.map(from_db_time),
            fall: self
                .fall_at
                .zip(self.fall_deadline)
                .map(|(at, deadline)| (from_db_time(at), from_db_time(deadline))),
        }
    }
}

/// The devices among `ids` that are registered, with their last known status: one query
/// for a batch of devices seen for the first time since the server started.
pub async fn find_devices(
    conn: &mut DbConn,
    ids: &[DeviceId],
) -> Result<Vec<DeviceState>, StoreError> {
    let ids: Vec<&str> = ids.iter().map(DeviceId::as_str).collect();
    let rows: Vec<DeviceRow> = db_run!(conn, |c| {
        devices::table
            .filter(devices::id.eq_any(&ids))
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
        diesel::update(devices::table.find(id.as_str()))
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
    let ids: Vec<String> = db_run!(conn, |c| {
        devices::table
            .filter(devices::fall_deadline.is_not_null())
            .select(devices::id)
            .load(c)
            .await?
    });
    Ok(ids.into_iter().map(DeviceId).collect())
}
