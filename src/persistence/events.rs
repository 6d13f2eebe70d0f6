//! The event store: an append-only log with a global gap-free sequence and per-stream versions.
//!
//! `append` runs one transaction that (1) bumps the single `event_sequence` row, which takes the
//! write lock first (SQLite) or a row lock (PostgreSQL) and so serialises appenders — the
//! sequence has no gaps and commits become visible in `seq` order, which the console stream
//! relies on; (2) checks the stream's current version against the caller's expectation; (3)
//! inserts the events. The unique `(stream_id, version)` constraint is the backstop: two writers
//! of one stream can never both succeed, also across nodes.

use chrono::{DateTime, SubsecRound as _, Utc};
use diesel::dsl::max;
use diesel::prelude::*;
use diesel_async::{AsyncConnection as _, RunQueryDsl};

use super::schema::{event_sequence, events};
use super::{DbConn, StoreError, from_db_time, to_db_time};
use crate::db_run;
use crate::domain::events::{ExpectedVersion, NewEvent, RecordedEvent};

/// Woken after events may have been committed, so tailers (the console broadcaster) look at
/// once instead of waiting for their next poll. A wake-up before the commit is harmless: the
/// tailer reads by sequence and finds the events on its next look.
pub fn appended() -> &'static tokio::sync::Notify {
    static NOTIFY: std::sync::OnceLock<tokio::sync::Notify> = std::sync::OnceLock::new();
    NOTIFY.get_or_init(tokio::sync::Notify::new)
}

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another writer appended to the stream first.
    #[error("version conflict on stream {stream}: expected {expected:?}, found {actual}")]
    Conflict {
        /// The stream.
        stream: String,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's actual last version (-1 when only the unique constraint told us).
        actual: i64,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<diesel::result::Error> for AppendError {
    fn from(err: diesel::result::Error) -> Self {
        Self::Store(err.into())
    }
}

#[derive(Insertable)]
#[diesel(table_name = events, treat_none_as_default_value = false)]
struct NewEventRow<'a> {
    seq: i64,
    stream_id: &'a str,
    version: i64,
    kind: &'a str,
    incident_id: Option<&'a str>,
    unit_id: Option<&'a str>,
    device_id: Option<&'a str>,
    payload: &'a str,
    recorded_at: chrono::NaiveDateTime,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = events)]
struct EventRow {
    seq: i64,
    stream_id: String,
    version: i64,
    kind: String,
    incident_id: Option<String>,
    unit_id: Option<String>,
    device_id: Option<String>,
    payload: String,
    recorded_at: chrono::NaiveDateTime,
}

impl TryFrom<EventRow> for RecordedEvent {
    type Error = StoreError;
    fn try_from(row: EventRow) -> Result<Self, StoreError> {
        let data = serde_json::from_str(&row.payload)
            .map_err(|e| StoreError::Corrupt(format!("event {} payload: {e}", row.seq)))?;
        Ok(RecordedEvent {
            seq: row.seq,
            at: from_db_time(row.recorded_at),
            kind: row.kind,
            incident_id: row.incident_id,
            unit_id: row.unit_id,
            device_id: row.device_id,
            data,
            stream_id: row.stream_id,
            version: row.version,
        })
    }
}

/// Multi-row insert where the backend supports it in diesel (PostgreSQL); one statement per
/// row inside the same transaction on SQLite (cheap: it is in-process).
trait InsertEvents {
    async fn insert_events(&mut self, rows: &[NewEventRow<'_>]) -> QueryResult<usize>;
}

impl InsertEvents for super::SqliteConn {
    async fn insert_events(&mut self, rows: &[NewEventRow<'_>]) -> QueryResult<usize> {
        let mut n = 0;
        for row in rows {
            n += diesel::insert_into(events::table)
                .values(row)
                .execute(self)
                .await?;
        }
        Ok(n)
    }
}

impl InsertEvents for diesel_async::AsyncPgConnection {
    async fn insert_events(&mut self, rows: &[NewEventRow<'_>]) -> QueryResult<usize> {
        diesel::insert_into(events::table)
            .values(rows)
            .execute(self)
            .await
    }
}

/// Appends `new` to `stream` if its current version matches `expected`, atomically.
/// Returns the recorded events (with their `seq` and `version`).
pub async fn append(
    conn: &mut DbConn,
    stream: &str,
    expected: ExpectedVersion,
    new: &[NewEvent],
    now: DateTime<Utc>,
) -> Result<Vec<RecordedEvent>, AppendError> {
    if new.is_empty() {
        return Ok(Vec::new());
    }
    let count =
        i64::try_from(new.len()).map_err(|_| StoreError::Conflict("batch too large".into()))?;
    let mut payloads = Vec::with_capacity(new.len());
    for event in new {
        payloads.push(
            serde_json::to_string(&event.data)
                .map_err(|e| StoreError::Corrupt(format!("unserialisable payload: {e}")))?,
        );
    }
    // PostgreSQL keeps microseconds, SQLite whatever it is given: store microseconds on both
    // so what `append` returns is exactly what a later read sees.
    let at = now.trunc_subsecs(6);
    let recorded_at = to_db_time(at);

    let payloads_ref = &payloads;
    let (first_seq, current) = db_run!(conn, |c| {
        c.transaction::<_, AppendError, _>(async move |tx| {
            diesel::update(event_sequence::table)
                .set(event_sequence::last_seq.eq(event_sequence::last_seq + count))
                .execute(tx)
                .await?;
            let last: i64 = event_sequence::table
                .select(event_sequence::last_seq)
                .first(tx)
                .await?;
            let current: Option<i64> = events::table
                .filter(events::stream_id.eq(stream))
                .select(max(events::version))
                .first(tx)
                .await?;
            let current = current.unwrap_or(0);
            if !expected.matches(current) {
                return Err(AppendError::Conflict {
                    stream: stream.to_owned(),
                    expected,
                    actual: current,
                });
            }
            let first_seq = last - count + 1;
            let rows: Vec<NewEventRow<'_>> = new
                .iter()
                .zip(payloads_ref.iter())
                .zip(0_i64..)
                .map(|((event, payload), i)| NewEventRow {
                    seq: first_seq + i,
                    stream_id: stream,
                    version: current + 1 + i,
                    kind: &event.kind,
                    incident_id: event.incident_id.as_deref(),
                    unit_id: event.unit_id.as_deref(),
                    device_id: event.device_id.as_deref(),
                    payload,
                    recorded_at,
                })
                .collect();
            InsertEvents::insert_events(tx, &rows).await.map_err(|e| {
                match StoreError::from(e) {
                    StoreError::Conflict(_) => AppendError::Conflict {
                        stream: stream.to_owned(),
                        expected,
                        actual: -1,
                    },
                    other => AppendError::Store(other),
                }
            })?;
            Ok((first_seq, current))
        })
        .await
    })?;

    appended().notify_waiters();
    Ok(new
        .iter()
        .zip(0_i64..)
        .map(|(event, i)| RecordedEvent {
            seq: first_seq + i,
            at,
            kind: event.kind.clone(),
            incident_id: event.incident_id.clone(),
            unit_id: event.unit_id.clone(),
            device_id: event.device_id.clone(),
            data: event.data.clone(),
            stream_id: stream.to_owned(),
            version: current + 1 + i,
        })
        .collect())
}

/// Every event of `stream`, in version order.
pub async fn read_stream(
    conn: &mut DbConn,
    stream: &str,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let rows: Vec<EventRow> = db_run!(conn, |c| {
        events::table
            .filter(events::stream_id.eq(stream))
            .order(events::version.asc())
            .select(EventRow::as_select())
            .load(c)
            .await?
    });
    rows.into_iter().map(RecordedEvent::try_from).collect()
}

/// Every event of each of `streams`, grouped by stream, each in version order: the bulk
/// load used when many actors are resumed at once (start-up).
pub async fn read_streams(
    conn: &mut DbConn,
    streams: &[String],
) -> Result<std::collections::HashMap<String, Vec<RecordedEvent>>, StoreError> {
    let mut by_stream: std::collections::HashMap<String, Vec<RecordedEvent>> =
        std::collections::HashMap::with_capacity(streams.len());
    // Bounded IN lists keep every backend well inside its bind-parameter limit.
    for chunk in streams.chunks(500) {
        let rows: Vec<EventRow> = db_run!(conn, |c| {
            events::table
                .filter(events::stream_id.eq_any(chunk))
                .order((events::stream_id.asc(), events::version.asc()))
                .select(EventRow::as_select())
                .load(c)
                .await?
        });
        for row in rows {
            let event = RecordedEvent::try_from(row)?;
            by_stream
                .entry(event.stream_id.clone())
                .or_default()
                .push(event);
        }
    }
    Ok(by_stream)
}

/// Up to `limit` events with `seq > since`, in sequence order.
pub async fn read_since(
    conn: &mut DbConn,
    since: i64,
    limit: i64,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let rows: Vec<EventRow> = db_run!(conn, |c| {
        events::table
            .filter(events::seq.gt(since))
            .order(events::seq.asc())
            .limit(limit)
            .select(EventRow::as_select())
            .load(c)
            .await?
    });
    rows.into_iter().map(RecordedEvent::try_from).collect()
}

/// The highest assigned sequence (0 when the store is empty).
pub async fn last_seq(conn: &mut DbConn) -> Result<i64, StoreError> {
    Ok(db_run!(conn, |c| {
        event_sequence::table
            .select(event_sequence::last_seq)
            .first(c)
            .await?
    }))
}
