//! Group commit: many small write transactions share one database commit.
//!
//! Every incident change is a short transaction (events, projections, offers, outbox rows)
//! whose cost is dominated by the commit's `fsync`, and all of them serialise on the event
//! sequence row anyway. [`GroupCommit`] runs them through one writer task: the writes queued
//! while a commit is in flight go into the next transaction together, each inside its own
//! savepoint. A write that fails rolls back its savepoint only and is answered at once; the
//! others are answered after their shared commit, so nothing is acknowledged before it is
//! durable. Under light load a batch is one write and the latency is unchanged; under heavy
//! load one fsync serves up to `max_batch` writes.
//!
//! The commonest writes are simpler still: an event for a stream with one writer by design
//! (a unit's status or position, a device's status) plus a projection row. Those go through
//! [`GroupCommit::append`] and are stored together at the end of the batch: one sequence bump
//! and one multi-row insert for all their events, then their projections, where a later
//! projection with the same key replaces an earlier one (a unit that moved twice in a batch is
//! written once). On PostgreSQL, where every statement is a round trip, that turns five round
//! trips per unit location into a handful per batch.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use super::events::{self, Prepared};
use super::fleet::{self, UnitRecord};
use super::{Db, DbConn, StoreError};
use crate::domain::events::NewEvent;

/// A write's answer, given once the batch's commit is known.
type Completion = Box<dyn FnOnce()>;

/// A queued write: runs (in a savepoint when `isolate` is true) and returns how to answer
/// once committed, or `None` when it failed (and has answered already). Jobs come from any
/// thread (device actors run on their own arbiters); they run on the writer's.
type Job = Box<
    dyn for<'a> FnOnce(
            &'a mut DbConn,
            bool,
        ) -> Pin<Box<dyn Future<Output = Option<Completion>> + 'a>>
        + Send,
>;

/// The future a write's work returns, borrowing the connection.
pub type WriteFuture<'a, T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + 'a>>;

/// A projection written with a batch's appends (see [`GroupCommit::append`]).
pub type Projection =
    Box<dyn for<'a> FnOnce(&'a mut DbConn) -> WriteFuture<'a, (), StoreError> + Send>;

/// An append stored at the end of its batch.
struct Deferred {
    events: Vec<Prepared>,
    /// A unit's live state, saved with the batch's other units in one statement.
    unit: Option<UnitRecord>,
    key: Option<String>,
    projection: Option<Projection>,
    answer: oneshot::Sender<Result<(), StoreError>>,
}

/// What the writer is sent.
enum Item {
    Job(Job),
    Append(Box<Deferred>),
}

/// Handle to the group-commit writer; cheap to clone and usable from any thread.
#[derive(Clone, Debug)]
pub struct GroupCommit {
    jobs: mpsc::UnboundedSender<Item>,
    stats: Arc<Stats>,
}

/// Writes and commits so far.
#[derive(Debug, Default)]
struct Stats {
    writes: AtomicU64,
    commits: AtomicU64,
}

impl GroupCommit {
    /// Starts the writer on a thread of its own (an arbiter that stops when every handle is
    /// gone); at most `max_batch` writes per commit. `db` is best a pool of its own
    /// ([`Db::connect_writer`]): the writer keeps one connection checked out, and one opened
    /// on its thread does its I/O there.
    pub fn start(db: Db, max_batch: usize) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Stats::default());
        let arbiter = actix::Arbiter::new();
        let writer_stats = stats.clone();
        arbiter.spawn_fn(move || {
            actix::spawn(async move {
                writer(db, rx, max_batch.max(1), writer_stats).await;
                actix::Arbiter::current().stop();
            });
        });
        Self { jobs, stats }
    }

    /// Writes attempted and transactions committed so far (writes per commit is the batching).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.stats.writes.load(Ordering::Relaxed),
            self.stats.commits.load(Ordering::Relaxed),
        )
    }

    /// Runs `work` in a transaction shared with other writes; returns its result once the
    /// shared commit has succeeded (or its own error, with its changes rolled back). If the
    /// caller stops waiting, the write still completes or rolls back as a whole.
    pub async fn write<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: for<'a> FnOnce(&'a mut DbConn) -> WriteFuture<'a, T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel::<Result<T, E>>();
        let job: Job = Box::new(move |conn, isolate| {
            Box::pin(async move {
                // Nested in the batch's transaction, this is a savepoint. A write alone in its
                // batch needs none: if it fails, the writer rolls the whole transaction back.
                let result = if isolate {
                    isolated(conn, work).await
                } else {
                    work(conn).await
                };
                match result {
                    Ok(value) => Some(Box::new(move || {
                        let _ = answer.send(Ok(value));
                    }) as Completion),
                    Err(e) => {
                        let _ = answer.send(Err(e));
                        None
                    }
                }
            })
        });
        if self.jobs.send(Item::Job(job)).is_err() {
            return Err(StoreError::Unavailable("the database writer has stopped".into()).into());
        }
        // A dropped answer means the batch's commit (or connection) failed: nothing of this
        // write was kept.
        answered.await.unwrap_or_else(|_| {
            Err(
                StoreError::Unavailable("the shared commit failed; nothing was written".into())
                    .into(),
            )
        })
    }
}

impl GroupCommit {
    /// Appends `events` to `stream` (which must have one writer by design: no version check)
    /// and then runs `projection`, at the end of the next batch and in its commit; returns
    /// once committed. With a `key`, a later append's projection with the same key in the same
    /// batch replaces this one's (its events are all kept). A failure of any of the batch's
    /// appends fails them all (the other writes of the batch are unaffected).
    pub async fn append(
        &self,
        stream: &str,
        events: Vec<NewEvent>,
        key: Option<String>,
        projection: Option<Projection>,
    ) -> Result<(), StoreError> {
        let events = events
            .into_iter()
            .map(|e| Prepared::new(stream, e))
            .collect::<Result<Vec<_>, _>>()?;
        self.send(Deferred {
            events,
            unit: None,
            key,
            projection,
            answer: oneshot::channel().0,
        })
        .await
    }

    /// Appends `events` to a unit's stream and saves `unit`'s live state, at the end of the
    /// next batch: every unit changed in a batch is saved by one statement on PostgreSQL, a
    /// unit changed twice with its later state.
    pub async fn append_unit(
        &self,
        stream: &str,
        events: Vec<NewEvent>,
        unit: UnitRecord,
    ) -> Result<(), StoreError> {
        let events = events
            .into_iter()
            .map(|e| Prepared::new(stream, e))
            .collect::<Result<Vec<_>, _>>()?;
        self.send(Deferred {
            events,
            unit: Some(unit),
            key: None,
            projection: None,
            answer: oneshot::channel().0,
        })
        .await
    }

    async fn send(&self, mut deferred: Deferred) -> Result<(), StoreError> {
        let (answer, answered) = oneshot::channel();
        deferred.answer = answer;
        if self.jobs.send(Item::Append(Box::new(deferred))).is_err() {
            return Err(StoreError::Unavailable(
                "the database writer has stopped".into(),
            ));
        }
        answered.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the shared commit failed; nothing was written".into(),
            ))
        })
    }
}

/// Runs `work` in a savepoint of the batch's transaction. The savepoint is set by hand and
/// never released (releasing is one more round trip and changes nothing before the commit);
/// on failure the work is rolled back to it. All savepoints share one name: `ROLLBACK TO`
/// finds the most recent, which is this write's.
async fn isolated<T, E, F>(conn: &mut DbConn, work: F) -> Result<T, E>
where
    F: for<'a> FnOnce(&'a mut DbConn) -> WriteFuture<'a, T, E>,
    E: From<StoreError>,
{
    savepoint(conn, "SAVEPOINT group_write").await?;
    let result = work(conn).await;
    if result.is_err() {
        savepoint(conn, "ROLLBACK TO SAVEPOINT group_write").await?;
    }
    result
}

async fn savepoint(conn: &mut DbConn, sql: &str) -> Result<(), StoreError> {
    use diesel_async::SimpleAsyncConnection as _;
    crate::db_run!(conn, |c| c.batch_execute(sql).await)?;
    Ok(())
}

/// Stores a batch's deferred appends: all events, then the projections that no later one
/// with the same key replaces.
async fn flush(conn: &mut DbConn, deferred: &mut [Deferred]) -> Result<(), StoreError> {
    let events: Vec<Prepared> = deferred
        .iter_mut()
        .flat_map(|d| std::mem::take(&mut d.events))
        .collect();
    let now = chrono::Utc::now();
    events::append_many(conn, &events, now).await?;
    // Units: the last state of each, in one statement.
    let mut units: Vec<&UnitRecord> = Vec::new();
    for unit in deferred.iter().rev().filter_map(|d| d.unit.as_ref()) {
        if !units.iter().any(|u| u.id == unit.id) {
            units.push(unit);
        }
    }
    if !units.is_empty() {
        fleet::save_units(conn, &units, now).await?;
    }
    let mut last_of_key: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, d) in deferred.iter().enumerate() {
        if let Some(key) = d.key.as_deref() {
            last_of_key.insert(key, i);
        }
    }
    let keep: Vec<bool> = deferred
        .iter()
        .enumerate()
        .map(|(i, d)| {
            d.key
                .as_deref()
                .is_none_or(|k| last_of_key.get(k) == Some(&i))
        })
        .collect();
    for (d, keep) in deferred.iter_mut().zip(keep) {
        if let (Some(projection), true) = (d.projection.take(), keep) {
            projection(conn).await?;
        }
    }
    Ok(())
}

/// Why a batch's transaction was not committed.
enum Batch {
    /// Its only write failed (and has been answered).
    Failed,
    /// Its appends failed, with nothing else in the batch.
    Appends(StoreError),
    /// The database failed (begin, commit, a savepoint).
    Store(StoreError),
}

impl From<StoreError> for Batch {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

async fn writer(
    db: Db,
    mut items: mpsc::UnboundedReceiver<Item>,
    max_batch: usize,
    stats: Arc<Stats>,
) {
    let mut batch = Vec::with_capacity(max_batch);
    // Kept between batches; dropped after a failed commit (it may be broken) and opened again.
    let mut held: Option<DbConn> = None;
    while items.recv_many(&mut batch, max_batch).await > 0 {
        let size = batch.len();
        stats.writes.fetch_add(size as u64, Ordering::Relaxed);
        let mut work = Vec::with_capacity(size);
        let mut deferred = Vec::new();
        for item in batch.drain(..) {
            match item {
                Item::Job(job) => work.push(job),
                Item::Append(d) => deferred.push(*d),
            }
        }
        let conn = match &mut held {
            Some(conn) => conn,
            None => match db.conn().await {
                Ok(conn) => held.insert(conn),
                Err(e) => {
                    // Nothing runs: every waiting writer hears nothing was written.
                    tracing::warn!(error = %e, writes = size, "group commit has no connection");
                    continue;
                }
            },
        };
        // Savepoints keep one write's failure from undoing the others; a batch of one write
        // (common when the writer keeps up) needs none, which saves two round trips.
        let isolate = work.len() + usize::from(!deferred.is_empty()) > 1;
        let started = std::time::Instant::now();
        let committed = conn
            .write_transaction(async |tx| {
                let mut answers = Vec::with_capacity(work.len());
                for job in work {
                    match job(tx, isolate).await {
                        Some(answer) => answers.push(answer),
                        // Alone in the batch and failed (already answered): roll back.
                        None if !isolate => return Err(Batch::Failed),
                        None => {}
                    }
                }
                let flushed = if deferred.is_empty() {
                    Ok(())
                } else if isolate {
                    // In a savepoint of its own: if it fails, the jobs above still commit.
                    savepoint(tx, "SAVEPOINT group_write").await?;
                    let flushed = flush(tx, &mut deferred).await;
                    if flushed.is_err() {
                        savepoint(tx, "ROLLBACK TO SAVEPOINT group_write").await?;
                    }
                    flushed
                } else {
                    match flush(tx, &mut deferred).await {
                        Ok(()) => Ok(()),
                        Err(e) => return Err(Batch::Appends(e)),
                    }
                };
                Ok::<_, Batch>((answers, flushed))
            })
            .await;
        metrics::histogram!("shers_group_commit_seconds").record(started.elapsed().as_secs_f64());
        let (answers, flushed) = match committed {
            Ok(done) => {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                done
            }
            // A lone write failed and has been answered; the rollback undid it.
            Err(Batch::Failed) => (Vec::new(), Ok(())),
            Err(Batch::Appends(e)) => (Vec::new(), Err(e)),
            // The answers are dropped: every waiting writer is told nothing was written.
            Err(Batch::Store(e)) => {
                tracing::warn!(error = %e, writes = size, "group commit failed");
                held = None;
                metrics::histogram!("shers_group_commit_batch_size").record(size as f64);
                continue;
            }
        };
        answers.into_iter().for_each(|answer| answer());
        match flushed {
            Ok(()) => deferred.into_iter().for_each(|d| {
                let _ = d.answer.send(Ok(()));
            }),
            Err(e) => {
                tracing::warn!(error = %e, appends = deferred.len(), "batched appends failed");
                let reason = e.to_string();
                deferred.into_iter().for_each(|d| {
                    let _ = d.answer.send(Err(StoreError::Unavailable(reason.clone())));
                });
            }
        }
        metrics::histogram!("shers_group_commit_batch_size").record(size as f64);
    }
}
