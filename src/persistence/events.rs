//! The event store: an append-only log with a global gap-free sequence and per-stream versions.
//!
//! `append` runs inside one transaction that (1) bumps the single `event_sequence` row
//! (`UPDATE … RETURNING`), which takes the write lock first (SQLite) or a row lock (PostgreSQL)
//! and so serialises appenders — the sequence has no gaps and commits become visible in `seq`
//! order, which the console stream relies on; (2) inserts the events with `INSERT … SELECT`,
//! reading the stream's current version and checking the caller's expectation in the same
//! statement. On PostgreSQL that is two round trips for any batch. The unique `(stream_id, version)` constraint is the backstop: two writers
//! of one stream can never both succeed, also across nodes.

use chrono::{DateTime, SubsecRound as _, Utc};
use diesel::dsl::max;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel_async::RunQueryDsl;

use super::ids::UuidText;
use super::schema::{event_sequence, events};
use super::statement::{Bind, Statement};
use super::{Backend, DbConn, StoreError, from_db_time, to_db_time};
use crate::db_run;
use crate::domain::events::{ExpectedVersion, NewEvent, RecordedEvent};
use crate::domain::ids::{DeviceId, IncidentId, UnitId};

/// Woken after each top-level commit of a write transaction (which is where every append
/// happens), so tailers (the console broadcaster) look at once instead of waiting for their
/// next poll.
pub fn appended() -> &'static tokio::sync::Notify {
    static NOTIFY: std::sync::OnceLock<tokio::sync::Notify> = std::sync::OnceLock::new();
    NOTIFY.get_or_init(tokio::sync::Notify::new)
}

/// Woken when another cluster node committed events (its wake-up arrived over Redis): tailers
/// look at once. Kept apart from [`appended`], which the node publishes, so a wake-up is never
/// echoed back.
pub fn appended_elsewhere() -> &'static tokio::sync::Notify {
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

impl From<AppendError> for StoreError {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::Conflict { .. } => StoreError::Conflict(e.to_string()),
            AppendError::Store(s) => s,
        }
    }
}

impl From<diesel::result::Error> for AppendError {
    fn from(err: diesel::result::Error) -> Self {
        Self::Store(err.into())
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = events)]
struct EventRow {
    seq: i64,
    stream_id: String,
    version: i64,
    kind: String,
    incident_id: Option<IncidentId>,
    unit_id: Option<UnitId>,
    device_id: Option<DeviceId>,
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

/// The last assigned sequence, as `UPDATE … RETURNING` gives it.
#[derive(QueryableByName)]
struct LastSeq {
    #[diesel(sql_type = BigInt)]
    last_seq: i64,
}

/// A version an insert assigned, as `INSERT … RETURNING` gives it.
#[derive(QueryableByName)]
struct Assigned {
    #[diesel(sql_type = BigInt)]
    version: i64,
}

/// Bumps the sequence by `count` (the bind) and returns the new last value: one statement that
/// takes the sequence row's lock.
const BUMP_SEQUENCE: &[&str] = &[
    "UPDATE event_sequence SET last_seq = last_seq + ",
    " WHERE id = 1 RETURNING last_seq",
];
struct BumpSequence;

/// Gives `count` sequence numbers back; only ever run while still holding the row lock taken
/// by [`BUMP_SEQUENCE`] in the same transaction, so nobody else has taken any since. Rare.
const UNDO_SEQUENCE: &str = "UPDATE event_sequence SET last_seq = last_seq - $1 WHERE id = 1";

/// The start of every event insert.
macro_rules! insert_events {
    () => {
        "INSERT INTO events \
         (seq, stream_id, version, kind, incident_id, unit_id, device_id, payload, recorded_at) \
         SELECT "
    };
}

/// PostgreSQL, for appends of any version: every event of the batch in one statement. The
/// stream's current version is read in the same statement, whose snapshot is taken after the
/// sequence lock was acquired (by the statement before), so it sees every earlier append.
/// Binds: base seq, stream, recorded_at, stream, then [`Batch::columns`].
const INSERT_PG: &[&str] = &[
    insert_events!(),
    " + t.ord, ",
    ", cur.v + t.ord, t.kind, t.incident_id, t.unit_id, t.device_id, t.payload, ",
    " FROM (SELECT COALESCE(MAX(version), 0) AS v FROM events WHERE stream_id = ",
    ") AS cur, unnest(",
    "::text[], ",
    "::text[], ",
    "::text[], ",
    "::text[], ",
    "::text[]) WITH ORDINALITY AS t(kind, incident_id, unit_id, device_id, payload, ord) \
     RETURNING version",
];
struct InsertPg;

/// PostgreSQL, for appends that check a version: the sequence bump and the insert in one
/// statement (a data-modifying CTE). Its snapshot is taken before the sequence lock is
/// granted, so the stream version it reads can miss an append committed while it waited; that
/// append's caller was not expected by ours, so the unique `(stream_id, version)` constraint
/// then rejects our insert as the conflict it is. (Appends of any version keep the two
/// statements, where no such conflict may arise.) Binds: count, count, stream, recorded_at,
/// stream, [`Batch::columns`], expected version.
const INSERT_CHECKED_PG: &[&str] = &[
    "WITH bumped AS (UPDATE event_sequence SET last_seq = last_seq + ",
    " WHERE id = 1 RETURNING last_seq) \
     INSERT INTO events \
     (seq, stream_id, version, kind, incident_id, unit_id, device_id, payload, recorded_at) \
     SELECT bumped.last_seq - ",
    " + t.ord, ",
    ", cur.v + t.ord, t.kind, t.incident_id, t.unit_id, t.device_id, t.payload, ",
    " FROM bumped, (SELECT COALESCE(MAX(version), 0) AS v FROM events WHERE stream_id = ",
    ") AS cur, unnest(",
    "::text[], ",
    "::text[], ",
    "::text[], ",
    "::text[], ",
    "::text[]) WITH ORDINALITY AS t(kind, incident_id, unit_id, device_id, payload, ord) \
     WHERE cur.v = ",
    " RETURNING seq, version",
];
struct InsertCheckedPg;

/// What [`INSERT_CHECKED_PG`] returns per event.
#[derive(QueryableByName)]
struct Stored {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = BigInt)]
    version: i64,
}

/// SQLite: one event per statement (SQLite has no arrays; statements are in-process). Binds:
/// seq, stream, kind, incident id, unit id, device id, payload, recorded_at, stream,
/// expectation, expectation.
const INSERT_SQLITE: &[&str] = &[
    insert_events!(),
    ", ",
    ", cur.v + 1, ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    " FROM (SELECT COALESCE(MAX(version), 0) AS v FROM events WHERE stream_id = ",
    ") AS cur WHERE ",
    " IS NULL OR cur.v = ",
    " RETURNING version",
];
struct InsertSqlite;

/// An event's correlation ids, borrowed for binding: incident, unit, device.
type Ids<'a> = (Option<IncidentId>, Option<&'a UnitId>, Option<&'a DeviceId>);

/// The correlation ids of `event`, for [`insert_sqlite`].
fn ids_of(event: &NewEvent) -> Ids<'_> {
    (
        event.incident_id,
        event.unit_id.as_ref(),
        event.device_id.as_ref(),
    )
}

/// One SQLite event insert ([`INSERT_SQLITE`]); `ids` are the incident, unit and device ids.
fn insert_sqlite<'a>(
    seq: i64,
    stream: &'a str,
    kind: &'a str,
    ids: Ids<'a>,
    payload: &'a str,
    recorded_at: chrono::NaiveDateTime,
    check: Option<i64>,
) -> Statement<'a, InsertSqlite> {
    let (incident, unit, device) = ids;
    Statement::new(
        INSERT_SQLITE,
        vec![
            Bind::BigInt(seq),
            Bind::Text(stream),
            Bind::Text(kind),
            Bind::OptUuid(incident.map(UuidText::from)),
            Bind::OptText(unit.map(UnitId::as_str)),
            Bind::OptText(device.map(DeviceId::as_str)),
            Bind::Text(payload),
            Bind::Timestamp(recorded_at),
            Bind::Text(stream),
            Bind::OptBigInt(check),
            Bind::OptBigInt(check),
        ],
    )
}

/// The version `expected` requires the stream to be at, or `None` for any.
fn required(expected: ExpectedVersion) -> Option<i64> {
    match expected {
        ExpectedVersion::Any => None,
        ExpectedVersion::NoStream => Some(0),
        ExpectedVersion::Exact(v) => Some(v),
    }
}

/// The stream's current version (0 when empty); used to report a conflict.
async fn current_version(conn: &mut DbConn, stream: &str) -> Result<i64, StoreError> {
    let current: Option<i64> = db_run!(conn, |c| {
        events::table
            .filter(events::stream_id.eq(stream))
            .select(max(events::version))
            .first(c)
            .await?
    });
    Ok(current.unwrap_or(0))
}

/// What one append needs, borrowed from the caller.
struct Batch<'a> {
    stream: &'a str,
    expected: ExpectedVersion,
    new: &'a [NewEvent],
    payloads: &'a [String],
    recorded_at: chrono::NaiveDateTime,
}

impl<'a> Batch<'a> {
    /// The per-event columns as PostgreSQL arrays, in the order the inserts' `unnest` takes
    /// them: kinds, incident ids, unit ids, device ids, payloads.
    fn columns(&self) -> [Bind<'a>; 5] {
        columns(self.new, self.payloads)
    }
}

/// The per-event columns of `new` (with their serialised `payloads`) as PostgreSQL arrays, in
/// the order the inserts' `unnest` takes them: kinds, incident ids, unit ids, device ids,
/// payloads.
pub(crate) fn columns<'a>(new: &'a [NewEvent], payloads: &'a [String]) -> [Bind<'a>; 5] {
    [
        Bind::Texts(new.iter().map(|e| e.kind.as_str()).collect()),
        Bind::OptUuids(
            new.iter()
                .map(|e| e.incident_id.map(UuidText::from))
                .collect(),
        ),
        Bind::OptTexts(
            new.iter()
                .map(|e| e.unit_id.as_ref().map(UnitId::as_str))
                .collect(),
        ),
        Bind::OptTexts(
            new.iter()
                .map(|e| e.device_id.as_ref().map(DeviceId::as_str))
                .collect(),
        ),
        Bind::Texts(payloads.iter().map(String::as_str).collect()),
    ]
}

/// Each event's data as stored.
pub(crate) fn payloads(new: &[NewEvent]) -> Result<Vec<String>, StoreError> {
    new.iter()
        .map(|event| {
            serde_json::to_string(&event.data)
                .map_err(|e| StoreError::Corrupt(format!("unserialisable payload: {e}")))
        })
        .collect()
}

/// When events appended at `now` are recorded: PostgreSQL keeps microseconds, SQLite whatever
/// it is given, so both store microseconds and what an append returns is exactly what a later
/// read sees.
pub(crate) fn recorded_at(now: DateTime<Utc>) -> DateTime<Utc> {
    now.trunc_subsecs(6)
}

/// The append itself; the caller provides the transaction. Returns the first `seq` and the
/// stream's version before the append: one round trip on PostgreSQL for a version-checked append,
/// two otherwise, whatever the batch size.
async fn append_in_transaction(
    conn: &mut DbConn,
    batch: &Batch<'_>,
) -> Result<(i64, i64), AppendError> {
    let count = i64::try_from(batch.new.len())
        .map_err(|_| StoreError::Conflict("batch too large".into()))?;
    let check = required(batch.expected);
    if let (Backend::Postgres, Some(expected)) = (conn.backend(), check) {
        return append_checked_pg(conn, batch, count, expected).await;
    }
    let last: LastSeq = db_run!(&mut *conn, |c| {
        Statement::<BumpSequence>::new(BUMP_SEQUENCE, vec![Bind::BigInt(count)])
            .get_result(c)
            .await?
    });
    let first_seq = last.last_seq - count + 1;
    let inserted: Result<Vec<Assigned>, diesel::result::Error> = db_run!(&mut *conn, |c| {
        let mut assigned = Vec::with_capacity(batch.new.len());
        let mut outcome = Ok(());
        for ((event, payload), i) in batch.new.iter().zip(batch.payloads).zip(0_i64..) {
            // Only the first event is checked; the rest follow it in the same transaction.
            let check = if i == 0 { check } else { None };
            let insert = insert_sqlite(
                first_seq + i,
                batch.stream,
                event.kind.as_str(),
                ids_of(event),
                payload,
                batch.recorded_at,
                check,
            );
            match insert.load::<Assigned>(c).await {
                Ok(rows) if rows.is_empty() => break,
                Ok(rows) => assigned.extend(rows),
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        outcome.map(|()| assigned)
    } else |c| {
        // Version-checked appends took `append_checked_pg`: here any version goes.
        let mut binds = vec![
            Bind::BigInt(first_seq - 1),
            Bind::Text(batch.stream),
            Bind::Timestamp(batch.recorded_at),
            Bind::Text(batch.stream),
        ];
        binds.extend(batch.columns());
        Statement::<InsertPg>::new(INSERT_PG, binds)
            .load::<Assigned>(c)
            .await
    });
    let assigned = inserted.map_err(|e| insert_failed(batch, e))?;
    if assigned.is_empty() {
        return Err(expectation_failed(conn, batch, count).await);
    }
    let first_version = assigned.iter().map(|a| a.version).min().unwrap_or(1);
    Ok((first_seq, first_version - 1))
}

/// [`INSERT_CHECKED_PG`]: one round trip for a version-checked append on PostgreSQL.
async fn append_checked_pg(
    conn: &mut DbConn,
    batch: &Batch<'_>,
    count: i64,
    expected: i64,
) -> Result<(i64, i64), AppendError> {
    let mut binds = vec![
        Bind::BigInt(count),
        Bind::BigInt(count),
        Bind::Text(batch.stream),
        Bind::Timestamp(batch.recorded_at),
        Bind::Text(batch.stream),
    ];
    binds.extend(batch.columns());
    binds.push(Bind::BigInt(expected));
    let stored: Result<Vec<Stored>, diesel::result::Error> = db_run!(&mut *conn, |_sqlite| {
        Err(diesel::result::Error::QueryBuilderError("not a PostgreSQL connection".into()))
    } else |c| {
        Statement::<InsertCheckedPg>::new(INSERT_CHECKED_PG, binds)
            .load::<Stored>(c)
            .await
    });
    let stored = stored.map_err(|e| insert_failed(batch, e))?;
    if stored.is_empty() {
        return Err(expectation_failed(conn, batch, count).await);
    }
    let first_seq = stored.iter().map(|r| r.seq).min().unwrap_or(0);
    let first_version = stored.iter().map(|r| r.version).min().unwrap_or(1);
    Ok((first_seq, first_version - 1))
}

/// An insert error: a unique violation on `(stream_id, version)` is a conflict.
fn insert_failed(batch: &Batch<'_>, e: diesel::result::Error) -> AppendError {
    match StoreError::from(e) {
        StoreError::Conflict(_) => AppendError::Conflict {
            stream: batch.stream.to_owned(),
            expected: batch.expected,
            actual: -1,
        },
        other => AppendError::Store(other),
    }
}

/// The expectation did not hold and nothing was inserted: gives the sequence numbers back,
/// so the sequence stays gap-free even if the caller goes on to commit something else.
///
/// On a shared connection (a pipelined batch, whose other writes may have taken sequence
/// numbers since) the numbers cannot be given back: the transaction is marked not to be
/// committed instead, and the writer replays the batch one write at a time.
async fn expectation_failed(conn: &mut DbConn, batch: &Batch<'_>, count: i64) -> AppendError {
    let actual = match current_version(conn, batch.stream).await {
        Ok(v) => v,
        Err(e) => return e.into(),
    };
    if conn.poison() {
        return AppendError::Conflict {
            stream: batch.stream.to_owned(),
            expected: batch.expected,
            actual,
        };
    }
    let undone: Result<usize, diesel::result::Error> = db_run!(&mut *conn, |c| {
        diesel::sql_query(UNDO_SEQUENCE)
            .bind::<BigInt, _>(count)
            .execute(c)
            .await
    });
    if let Err(e) = undone {
        return e.into();
    }
    AppendError::Conflict {
        stream: batch.stream.to_owned(),
        expected: batch.expected,
        actual,
    }
}

/// Appends `new` to `stream` if its current version matches `expected`, atomically.
/// Returns the recorded events (with their `seq` and `version`).
///
/// Inside a transaction (the usual case: an event commits with its projections) it adds no
/// savepoint of its own; on its own it opens a write transaction.
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
    let payloads = payloads(new)?;
    let at = recorded_at(now);
    let batch = Batch {
        stream,
        expected,
        new,
        payloads: &payloads,
        recorded_at: to_db_time(at),
    };
    let (first_seq, current) = if conn.in_transaction() {
        append_in_transaction(conn, &batch).await?
    } else {
        conn.write_transaction(async |tx| append_in_transaction(tx, &batch).await)
            .await?
    };
    // No wake-up here: the commit wakes the tailers (`DbConn::write_transaction`).
    Ok(new
        .iter()
        .zip(0_i64..)
        .map(|(event, i)| RecordedEvent {
            seq: first_seq + i,
            at,
            kind: event.kind.clone(),
            incident_id: event.incident_id,
            unit_id: event.unit_id.clone(),
            device_id: event.device_id.clone(),
            data: event.data.clone(),
            stream_id: stream.to_owned(),
            version: current + 1 + i,
        })
        .collect())
}

/// An event serialised and addressed to its stream, ready for [`append_many`]: callers
/// prepare it on their own thread so the writer only sends it.
#[derive(Debug)]
pub struct Prepared {
    stream: String,
    kind: String,
    incident_id: Option<IncidentId>,
    unit_id: Option<UnitId>,
    device_id: Option<DeviceId>,
    payload: String,
}

impl Prepared {
    /// Serialises `event` for `stream`.
    pub fn new(stream: &str, event: NewEvent) -> Result<Self, StoreError> {
        Ok(Self {
            stream: stream.to_owned(),
            payload: serde_json::to_string(&event.data)
                .map_err(|e| StoreError::Corrupt(format!("unserialisable payload: {e}")))?,
            kind: event.kind,
            incident_id: event.incident_id,
            unit_id: event.unit_id,
            device_id: event.device_id,
        })
    }
}

/// PostgreSQL: events of many streams in one statement with the sequence bump (a
/// data-modifying CTE), each stream's versions continuing from its current last version in
/// the order given (`ROW_NUMBER` per stream). The streams have one writer by design, so the
/// statement's snapshot (taken before the sequence lock is granted) cannot miss an append to
/// them. Binds: count, count, recorded_at, streams, kinds, incident ids, unit ids, device ids,
/// payloads.
const INSERT_MANY_PG: &[&str] = &[
    "WITH bumped AS (UPDATE event_sequence SET last_seq = last_seq + ",
    concat!(
        " WHERE id = 1 RETURNING last_seq) ",
        insert_events!(),
        "bumped.last_seq - "
    ),
    " + t.ord, t.stream_id, \
     COALESCE((SELECT MAX(e.version) FROM events e WHERE e.stream_id = t.stream_id), 0) \
         + ROW_NUMBER() OVER (PARTITION BY t.stream_id ORDER BY t.ord), \
     t.kind, t.incident_id, t.unit_id, t.device_id, t.payload, ",
    " FROM bumped, unnest(",
    "::text[], ",
    "::text[], ",
    "::text[], ",
    "::text[], ",
    "::text[], ",
    "::text[]) WITH ORDINALITY AS t(stream_id, kind, incident_id, unit_id, device_id, payload, ord)",
];
struct InsertManyPg;

/// Appends `events` (any streams, any current versions: for streams with one writer by
/// design) in the caller's transaction: one sequence bump and, on PostgreSQL, one insert for
/// the lot. This is how the group-commit writer stores a batch's unit and device events.
pub async fn append_many(
    conn: &mut DbConn,
    events: &[&Prepared],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let count =
        i64::try_from(events.len()).map_err(|_| StoreError::Conflict("batch too large".into()))?;
    let recorded_at = to_db_time(recorded_at(now));
    db_run!(&mut *conn, |c| {
        let last: LastSeq = Statement::<BumpSequence>::new(BUMP_SEQUENCE, vec![Bind::BigInt(count)])
            .get_result(c)
            .await?;
        let first_seq = last.last_seq - count + 1;
        for (event, i) in events.iter().zip(0_i64..) {
            insert_sqlite(
                first_seq + i,
                &event.stream,
                &event.kind,
                (event.incident_id, event.unit_id.as_ref(), event.device_id.as_ref()),
                &event.payload,
                recorded_at,
                None,
            )
            .load::<Assigned>(c)
            .await?;
        }
    } else |c| {
        // One statement: the sequence bump runs in a CTE of the insert. The streams have one
        // writer by design (this one), so the versions it reads cannot be missing a
        // concurrent append; the unique `(stream_id, version)` constraint is the backstop.
        let column = |f: fn(&Prepared) -> &str| events.iter().map(|e| f(e)).collect::<Vec<&str>>();
        let optional = |f: fn(&Prepared) -> Option<&str>| {
            events.iter().map(|e| f(e)).collect::<Vec<Option<&str>>>()
        };
        let incidents = events.iter().map(|e| e.incident_id.map(UuidText::from)).collect();
        Statement::<InsertManyPg>::new(
            INSERT_MANY_PG,
            vec![
                Bind::BigInt(count),
                Bind::BigInt(count),
                Bind::Timestamp(recorded_at),
                Bind::Texts(column(|e| e.stream.as_str())),
                Bind::Texts(column(|e| e.kind.as_str())),
                Bind::OptUuids(incidents),
                Bind::OptTexts(optional(|e| e.unit_id.as_ref().map(UnitId::as_str))),
                Bind::OptTexts(optional(|e| e.device_id.as_ref().map(DeviceId::as_str))),
                Bind::Texts(column(|e| e.payload.as_str())),
            ],
        )
            .execute(c)
            .await?;
    });
    Ok(())
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
