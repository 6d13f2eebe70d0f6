//! Retained raw readings (`triage.raw_retention`): one multi-row insert per flush.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::readings;
use super::statement::{Bind, Statement};
use super::{DbConn, StoreError, to_db_time};
use crate::db_run;
use crate::domain::ids::{DeviceId, PatientId};

/// A reading to retain.
#[derive(Clone, Debug)]
pub struct RetainedReading {
    /// The wearable that measured it.
    pub device_id: DeviceId,
    /// The wearer it belongs to.
    pub patient_id: PatientId,
    /// When measured.
    pub measured_at: DateTime<Utc>,
    /// When SHERS accepted it.
    pub received_at: DateTime<Utc>,
    /// Its triage status.
    pub status: &'static str,
    /// Its (partial) NEWS2 score.
    pub news2_score: Option<i32>,
    /// The normalised reading as JSON.
    pub reading: String,
}

#[derive(Insertable)]
#[diesel(table_name = readings, treat_none_as_default_value = false)]
struct Row<'a> {
    device_id: &'a DeviceId,
    patient_id: &'a PatientId,
    measured_at: chrono::NaiveDateTime,
    received_at: chrono::NaiveDateTime,
    status: &'a str,
    news2_score: Option<i32>,
    reading: &'a str,
}

/// Rows per statement (bounds one statement's size).
const CHUNK: usize = 5_000;

/// Inserts `batch` (multi-row statements on PostgreSQL; per-row inside the caller's
/// transaction on SQLite, where that is as fast).
pub async fn insert_many(
    conn: &mut DbConn,
    batch: &[RetainedReading],
) -> Result<usize, StoreError> {
    let rows: Vec<Row<'_>> = batch
        .iter()
        .map(|r| Row {
            device_id: &r.device_id,
            patient_id: &r.patient_id,
            measured_at: to_db_time(r.measured_at),
            received_at: to_db_time(r.received_at),
            status: r.status,
            news2_score: r.news2_score,
            reading: &r.reading,
        })
        .collect();
    let mut n = 0;
    db_run!(conn, |c| {
        for row in &rows {
            n += diesel::insert_into(readings::table).values(row).execute(c).await?;
        }
    } else |c| {
        // Arrays unnested: one prepared statement whatever the row count (a multi-row
        // `values(chunk)` is parsed anew each time, a round trip that stalls a pipelined batch).
        const INSERT_READINGS_PG: &[&str] = &[
            "INSERT INTO readings (device_id, patient_id, measured_at, received_at, status, \
             news2_score, reading) SELECT * FROM unnest(",
            "::text[], ",
            "::text[], ",
            "::timestamp[], ",
            "::timestamp[], ",
            "::text[], ",
            "::int4[], ",
            "::text[])",
        ];
        struct InsertReadingsPg;
        for chunk in rows.chunks(CHUNK) {
            n += Statement::<InsertReadingsPg>::new(
                INSERT_READINGS_PG,
                vec![
                    Bind::Texts(chunk.iter().map(|r| r.device_id.as_str()).collect()),
                    Bind::Texts(chunk.iter().map(|r| r.patient_id.as_str()).collect()),
                    Bind::Timestamps(chunk.iter().map(|r| r.measured_at).collect()),
                    Bind::Timestamps(chunk.iter().map(|r| r.received_at).collect()),
                    Bind::Texts(chunk.iter().map(|r| r.status).collect()),
                    Bind::OptInts(chunk.iter().map(|r| r.news2_score).collect()),
                    Bind::Texts(chunk.iter().map(|r| r.reading).collect()),
                ],
            )
            .execute(c)
            .await?;
        }
    });
    Ok(n)
}

/// How many readings are retained for `device_id`.
pub async fn count_for_device(conn: &mut DbConn, device_id: &DeviceId) -> Result<i64, StoreError> {
    Ok(db_run!(conn, |c| {
        readings::table
            .filter(readings::device_id.eq(device_id))
            .count()
            .get_result(c)
            .await?
    }))
}
