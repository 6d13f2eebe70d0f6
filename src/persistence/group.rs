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
//!
//! On PostgreSQL a batch is pipelined: `BEGIN`, every write and the appends run at once on
//! one shared connection ([`DbConn::PgShared`]), so their statements go out without waiting
//! for each other's answers and a batch costs about as many round trips as its longest write
//! (a new incident: three, with the commit) instead of the sum of all of them. Writes use
//! [`DbConn::try_both`] and [`DbConn::try_each`] to send their own independent statements
//! together. If anything in the pipelined attempt fails, the transaction is rolled back and
//! the batch replayed one write at a time with savepoints, as above.
//!
//! A unit's changes are bookkeeping that nobody waits for (the unit actor's live state is
//! authoritative), and hundreds of position fixes arrive every second. They wait in the
//! writer ([`UNIT_STATUS_LINGER`], [`UNIT_POSITION_LINGER`]) and are then stored together, in
//! batches of their own: the writer is idle most of the time, so an emergency's write finds
//! it free instead of queueing behind a batch of positions, and the status changes of the
//! units reserved for that emergency's first offer round are stored just after its write
//! instead of just before it. When one is due, everything waiting goes with it, in order.
//!
//! The writer's queue is bounded ([`QUEUED_BATCHES`] batches): however far the database falls
//! behind (a stall, an outage while the writer waits for a connection), what waits for it stays
//! bounded. A write or an append waits for room, which its caller would spend waiting for the
//! commit anyway; a unit's position fix, which nobody waits for and the next fix supersedes, is
//! dropped instead and counted (`shers_group_commit_dropped_total`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use super::events::{self, Prepared};
use super::fleet::{self, UnitRecord};
use super::{Db, DbConn, SharedPg, StoreError};
use crate::domain::events::NewEvent;

/// A queued write. Jobs come from any thread (device actors run on their own arbiters); they
/// run on the writer's. A job may run twice: first optimistically, with the rest of its batch
/// and no savepoint; again in a savepoint of its own if some write of the batch failed and the
/// batch was replayed. Only the last run's result is answered, after the commit.
trait Write: Send {
    /// Runs the work (in a savepoint when `isolate`); keeps the result; true when it succeeded.
    fn run<'a>(
        &'a mut self,
        conn: &'a mut DbConn,
        isolate: bool,
    ) -> Pin<Box<dyn Future<Output = bool> + 'a>>;
    /// Answers with the kept result (the batch committed, or this write failed alone).
    fn answer(self: Box<Self>);
    /// Whether the work is one statement on PostgreSQL (see [`GroupCommit::write_atomic`]).
    fn atomic(&self) -> bool;
}

/// A [`Write`] of `work`, answered on `answer`.
struct Pending<F, T, E> {
    work: F,
    result: Option<Result<T, E>>,
    answer: oneshot::Sender<Result<T, E>>,
    atomic: bool,
}

impl<F, T, E> Write for Pending<F, T, E>
where
    F: for<'a> Fn(&'a mut DbConn) -> WriteFuture<'a, T, E> + Send,
    T: Send,
    E: From<StoreError> + Send,
{
    fn run<'a>(
        &'a mut self,
        conn: &'a mut DbConn,
        isolate: bool,
    ) -> Pin<Box<dyn Future<Output = bool> + 'a>> {
        Box::pin(async move {
            let result = if isolate {
                isolated(conn, &self.work).await
            } else {
                (self.work)(conn).await
            };
            let ok = result.is_ok();
            self.result = Some(result);
            ok
        })
    }

    fn answer(self: Box<Self>) {
        if let Some(result) = self.result {
            let _ = self.answer.send(result);
        }
    }

    fn atomic(&self) -> bool {
        self.atomic
    }
}

type Job = Box<dyn Write>;

/// The future a write's work returns, borrowing the connection.
pub type WriteFuture<'a, T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + 'a>>;

/// A projection written with a batch's appends (see [`GroupCommit::append`]).
/// Like a write, it may run twice (a replayed batch): it must rebuild what it moves into its
/// future on each call.
pub type Projection = Box<dyn for<'a> Fn(&'a mut DbConn) -> WriteFuture<'a, (), StoreError> + Send>;

/// An append stored at the end of its batch.
struct Deferred {
    events: Vec<Prepared>,
    /// A unit's live state, saved with the batch's other units in one statement.
    unit: Option<UnitRecord>,
    key: Option<String>,
    projection: Option<Projection>,
    /// How long it may wait in the writer for company (`None`: the next batch).
    linger: Option<Duration>,
    answer: oneshot::Sender<Result<(), StoreError>>,
}

impl Deferred {
    /// An append with no events yet ([`GroupCommit::send`] adds them) and the receiver of its
    /// answer.
    fn new(
        unit: Option<UnitRecord>,
        key: Option<String>,
        projection: Option<Projection>,
        linger: Option<Duration>,
    ) -> (Self, oneshot::Receiver<Result<(), StoreError>>) {
        let (answer, answered) = oneshot::channel();
        let deferred = Self {
            events: Vec::new(),
            unit,
            key,
            projection,
            linger,
            answer,
        };
        (deferred, answered)
    }
}

/// What the writer is sent.
enum Item {
    Job(Job),
    Append(Box<Deferred>),
}

/// How long a unit's status change may wait in the writer for company: long enough for an
/// emergency's write, which reserving its first offer round runs alongside, to go first.
pub const UNIT_STATUS_LINGER: Duration = Duration::from_millis(5);

/// How long a unit's position fix may wait in the writer. Fixes come about once a second per
/// unit: storing 500 units' fixes as about twenty batches a second instead of hundreds keeps
/// the writer free. The live map shows a fix this much later at most.
pub const UNIT_POSITION_LINGER: Duration = Duration::from_millis(50);

/// How many full batches may queue for the writer (with 128 writes a batch, 4,096 writes):
/// about what the writer commits in a second when the database keeps up, so a burst is
/// absorbed, and little memory (a write or an append is a boxed closure or a few hundred
/// bytes) when it does not.
pub const QUEUED_BATCHES: usize = 32;

/// What a queued item does when the writer's queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WhenFull {
    /// Waits for room (the caller waits for the commit anyway).
    Wait,
    /// Is dropped and counted: only for what the next change supersedes (position fixes).
    Drop,
}

/// Handle to the group-commit writer; cheap to clone and usable from any thread.
#[derive(Clone, Debug)]
pub struct GroupCommit {
    jobs: mpsc::Sender<Item>,
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
    /// gone); at most `max_batch` writes per commit, and [`QUEUED_BATCHES`] batches queued.
    /// `db` is best a pool of its own ([`Db::connect_writer`]): the writer keeps one
    /// connection checked out, and one opened on its thread does its I/O there.
    pub fn start(db: Db, max_batch: usize) -> Self {
        let max_batch = max_batch.max(1);
        let (jobs, rx) = mpsc::channel(max_batch.saturating_mul(QUEUED_BATCHES));
        let stats = Arc::new(Stats::default());
        let arbiter = actix::Arbiter::new();
        let writer_stats = stats.clone();
        arbiter.spawn_fn(move || {
            actix::spawn(async move {
                writer(db, rx, max_batch, writer_stats).await;
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
    /// shared commit has succeeded (or its own error, with its changes rolled back). It first
    /// waits for room in the writer's queue if that is full ([`QUEUED_BATCHES`]). If the caller
    /// stops waiting once the write is queued, it still completes or rolls back as a whole; if
    /// it stops while the write waits for room, nothing is written. `work` may run
    /// twice (optimistically, then again in a savepoint if its batch is replayed): it must only
    /// touch the database, and rebuild anything it moves into its future on each call.
    pub async fn write<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: for<'a> Fn(&'a mut DbConn) -> WriteFuture<'a, T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.write_as(false, work).await
    }

    /// [`GroupCommit::write`], or with `atomic`, for work that runs exactly one statement on
    /// PostgreSQL (a data-modifying CTE, say), which is atomic on its own. When such work is
    /// the only thing in its batch it runs outside any transaction: no `BEGIN` before it and
    /// no `COMMIT` round trip after it, its statement commits as it runs. With company it
    /// joins the batch's transaction like any write. On SQLite it is an ordinary write.
    pub async fn write_as<T, E, F>(&self, atomic: bool, work: F) -> Result<T, E>
    where
        F: for<'a> Fn(&'a mut DbConn) -> WriteFuture<'a, T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel::<Result<T, E>>();
        let job: Job = Box::new(Pending {
            work,
            result: None,
            answer,
            atomic,
        });
        if self.jobs.send(Item::Job(job)).await.is_err() {
            return Err(writer_stopped().into());
        }
        answered
            .await
            .unwrap_or_else(|_| Err(commit_failed().into()))
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
        let deferred = Deferred::new(None, key, projection, None);
        self.send(stream, events, deferred, WhenFull::Wait).await
    }

    /// Appends `events` to a unit's stream and saves `unit`'s live state, within
    /// [`UNIT_STATUS_LINGER`] and after the unit's earlier changes: every unit changed in a
    /// batch is saved by one statement on PostgreSQL, a unit changed twice with its later state.
    pub async fn append_unit(
        &self,
        stream: &str,
        events: Vec<NewEvent>,
        unit: UnitRecord,
    ) -> Result<(), StoreError> {
        let deferred = Deferred::new(Some(unit), None, None, Some(UNIT_STATUS_LINGER));
        self.send(stream, events, deferred, WhenFull::Wait).await
    }

    /// Like [`GroupCommit::append_unit`], for a position fix: it waits in the writer for up
    /// to [`UNIT_POSITION_LINGER`] and is stored with the other units' fixes (or earlier, with
    /// the unit's next other change, which it precedes). Returns once committed. When the
    /// writer's queue is full it is not queued: `StoreError::Busy` at once, and
    /// `shers_group_commit_dropped_total{write="unit_position"}` counts it (the unit's live
    /// state stays authoritative, and its next fix or change stores it).
    pub async fn append_unit_position(
        &self,
        stream: &str,
        events: Vec<NewEvent>,
        unit: UnitRecord,
    ) -> Result<(), StoreError> {
        let deferred = Deferred::new(Some(unit), None, None, Some(UNIT_POSITION_LINGER));
        self.send(stream, events, deferred, WhenFull::Drop).await
    }

    /// Queues a deferred append (its `events` serialised here, off the writer's thread) and
    /// waits for its batch's commit.
    async fn send(
        &self,
        stream: &str,
        events: Vec<NewEvent>,
        (mut deferred, answered): (Deferred, oneshot::Receiver<Result<(), StoreError>>),
        when_full: WhenFull,
    ) -> Result<(), StoreError> {
        deferred.events = events
            .into_iter()
            .map(|e| Prepared::new(stream, e))
            .collect::<Result<Vec<_>, _>>()?;
        let item = Item::Append(Box::new(deferred));
        let queued = match when_full {
            WhenFull::Wait => self.jobs.send(item).await.is_ok(),
            WhenFull::Drop => match self.jobs.try_send(item) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    metrics::counter!("shers_group_commit_dropped_total", "write" => "unit_position")
                        .increment(1);
                    return Err(StoreError::Busy(
                        "the database writer's queue is full; the position fix was dropped".into(),
                    ));
                }
                Err(TrySendError::Closed(_)) => false,
            },
        };
        if !queued {
            return Err(writer_stopped());
        }
        answered.await.unwrap_or_else(|_| Err(commit_failed()))
    }
}

/// The writer task has ended (the system is stopping).
fn writer_stopped() -> StoreError {
    StoreError::Unavailable("the database writer has stopped".into())
}

/// A dropped answer: the batch's commit (or connection) failed, nothing of the write was kept.
fn commit_failed() -> StoreError {
    StoreError::Unavailable("the shared commit failed; nothing was written".into())
}

/// Runs `work` in a savepoint of the batch's transaction. The savepoint is set by hand and
/// never released (releasing is one more round trip and changes nothing before the commit);
/// on failure the work is rolled back to it. All savepoints share one name: `ROLLBACK TO`
/// finds the most recent, which is this write's.
async fn isolated<T, E, F>(conn: &mut DbConn, work: &F) -> Result<T, E>
where
    F: for<'a> Fn(&'a mut DbConn) -> WriteFuture<'a, T, E>,
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
/// with the same key replaces. On a shared connection (a pipelined batch) the events, the
/// unit rows and each projection are sent at once. It consumes nothing: a replayed batch
/// flushes again.
async fn flush(conn: &mut DbConn, deferred: &[Deferred]) -> Result<(), StoreError> {
    let events: Vec<&Prepared> = deferred.iter().flat_map(|d| d.events.iter()).collect();
    let now = chrono::Utc::now();
    // Units: the last state of each, in one statement.
    let mut units: Vec<&UnitRecord> = Vec::new();
    for unit in deferred.iter().rev().filter_map(|d| d.unit.as_ref()) {
        if !units.iter().any(|u| u.id == unit.id) {
            units.push(unit);
        }
    }
    let mut last_of_key: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, d) in deferred.iter().enumerate() {
        if let Some(key) = d.key.as_deref() {
            last_of_key.insert(key, i);
        }
    }
    let projections: Vec<&Projection> = deferred
        .iter()
        .enumerate()
        .filter(|(i, d)| {
            d.key
                .as_deref()
                .is_none_or(|k| last_of_key.get(k) == Some(i))
        })
        .filter_map(|(_, d)| d.projection.as_ref())
        .collect();
    conn.try_both(
        async |c| events::append_many(c, &events, now).await,
        async |c| {
            c.try_both(
                async |c| {
                    if units.is_empty() {
                        Ok(())
                    } else {
                        fleet::save_units(c, &units, now).await
                    }
                },
                async |c| run_projections(c, &projections).await,
            )
            .await
        },
    )
    .await?;
    Ok(())
}

/// Runs `projections` (which touch distinct rows): at once on a shared connection.
async fn run_projections(c: &mut DbConn, projections: &[&Projection]) -> Result<(), StoreError> {
    c.try_each(projections, async |c, projection| projection(c).await)
        .await?;
    Ok(())
}

/// Why a batch's transaction was not committed.
enum Batch {
    /// A write failed outside a savepoint (the transaction was rolled back).
    Failed,
    /// The transaction was rolled back though no write failed (a pipelined batch's appends
    /// failed, or its commit did not happen): every write must run again.
    Replay,
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

/// One attempt at a batch, in one transaction: the writes (each in a savepoint when
/// `isolate`), then the appends. Returns how the appends went; `Batch::Failed` when a write
/// failed without a savepoint (the transaction is rolled back and nothing was answered).
async fn run_batch(
    conn: &mut DbConn,
    work: &mut [Job],
    deferred: &[Deferred],
    isolate: bool,
) -> Result<Result<(), StoreError>, Batch> {
    conn.write_transaction(async |tx| {
        for job in work.iter_mut() {
            if !job.run(tx, isolate).await && !isolate {
                return Err(Batch::Failed);
            }
        }
        // PostgreSQL aborts a transaction in which a statement failed, and silently turns
        // its `COMMIT` into a rollback: if a write swallowed such an error, this fails and
        // the batch is answered as not written instead of acknowledged and lost.
        if tx.backend() == super::Backend::Postgres {
            savepoint(tx, "SELECT 1").await?;
        }
        if deferred.is_empty() {
            Ok(Ok(()))
        } else if work.is_empty() {
            // Nothing else to protect: a failure rolls the transaction back.
            match flush(tx, deferred).await {
                Ok(()) => Ok(Ok(())),
                Err(e) => Err(Batch::Appends(e)),
            }
        } else {
            // In a savepoint of its own: if it fails, the writes above still commit.
            savepoint(tx, "SAVEPOINT group_write").await?;
            let flushed = flush(tx, deferred).await;
            if flushed.is_err() {
                savepoint(tx, "ROLLBACK TO SAVEPOINT group_write").await?;
            }
            Ok(flushed)
        }
    })
    .await
}

/// One attempt at a batch on PostgreSQL with every statement pipelined: `BEGIN`, all the
/// writes and the appends at once on one shared connection, then a check and `COMMIT` in one
/// round trip. A batch of writes then costs about as many round trips as its longest write,
/// not the sum of all of them. Any failure (a write's error, a version check that took
/// sequence numbers, a statement that failed while its write carried on) rolls the whole
/// transaction back and answers `Batch::Failed`, for a replay one write at a time.
async fn run_pipelined(
    shared: &Arc<SharedPg>,
    work: &mut [Job],
    deferred: &[Deferred],
) -> Result<Result<(), StoreError>, Batch> {
    let mut begin_conn = DbConn::PgShared(shared.clone());
    let mut job_conns: Vec<DbConn> = work
        .iter()
        .map(|_| DbConn::PgShared(shared.clone()))
        .collect();
    let mut flush_conn = DbConn::PgShared(shared.clone());
    // Polled in this order on the first poll, so `BEGIN` is sent before any write's statement.
    // Each part's finishing time goes to the debug log: PostgreSQL answers `BEGIN` only once it
    // has run what was pipelined behind it, so they show where a slow batch spent its time.
    let started = std::time::Instant::now();
    let (begun, (ran, flushed)) = futures_util::future::join(
        timed(started, savepoint(&mut begin_conn, "BEGIN")),
        futures_util::future::join(
            timed(
                started,
                futures_util::future::join_all(
                    work.iter_mut()
                        .zip(job_conns.iter_mut())
                        .map(|(job, conn)| job.run(conn, false)),
                ),
            ),
            timed(started, async {
                if deferred.is_empty() {
                    Ok(())
                } else {
                    flush(&mut flush_conn, deferred).await
                }
            }),
        ),
    )
    .await;
    let ((begun, begin_ms), ((ran, writes_ms), (flushed, appends_ms))) = (begun, (ran, flushed));
    tracing::debug!(begin_ms, writes_ms, appends_ms, "pipelined batch sent");
    begun?;
    let failed = ran.iter().any(|ok| !ok);
    if !failed && flushed.is_ok() && !shared.is_poisoned() {
        // A statement whose error a write swallowed leaves the transaction aborted, and
        // PostgreSQL turns the `COMMIT` of an aborted transaction into a silent rollback: the
        // `SELECT` fails first in that case, and the `COMMIT` is not run.
        match savepoint(&mut begin_conn, "SELECT 1; COMMIT").await {
            Ok(()) => {
                events::appended().notify_waiters();
                return Ok(Ok(()));
            }
            Err(e) => tracing::debug!(error = %e, "pipelined batch did not commit"),
        }
    }
    savepoint(&mut begin_conn, "ROLLBACK").await?;
    Err(if failed { Batch::Failed } else { Batch::Replay })
}

/// A lone atomic write on PostgreSQL ([`GroupCommit::write_atomic`]): its one statement runs
/// outside any transaction, which commits it as it runs. A failed statement changed nothing.
async fn run_alone(shared: &Arc<SharedPg>, job: &mut Job) -> Result<Result<(), StoreError>, Batch> {
    let mut conn = DbConn::PgShared(shared.clone());
    let ok = job.run(&mut conn, false).await;
    drop(conn);
    // More than one statement would have committed one by one: a bug in the write, which the
    // test suite must catch.
    let statements = shared.statements();
    if statements > 1 {
        tracing::error!(
            statements,
            "an atomic write ran more than one statement outside a transaction"
        );
        debug_assert!(
            statements <= 1,
            "an atomic write ran {statements} statements"
        );
    }
    if ok {
        events::appended().notify_waiters();
        Ok(Ok(()))
    } else {
        Err(Batch::Failed)
    }
}

/// `future`'s output and when it finished, in milliseconds since `started`.
async fn timed<T>(started: std::time::Instant, future: impl Future<Output = T>) -> (T, f64) {
    let output = future.await;
    (output, started.elapsed().as_secs_f64() * 1e3)
}

// Long on purpose: the group-commit loop (collect, run, replay, answer), read top to bottom;
// every write in the process passes here, so it stays one loop with no extra awaits.
async fn writer(db: Db, mut items: mpsc::Receiver<Item>, max_batch: usize, stats: Arc<Stats>) {
    let mut batch = Vec::with_capacity(max_batch);
    // Kept between batches; dropped after a failed commit (it may be broken) and opened again.
    let mut held: Option<DbConn> = None;
    // Appends waiting for company, in arrival order, each with when it is due.
    let mut waiting: Vec<(tokio::time::Instant, Deferred)> = Vec::new();
    loop {
        let due = waiting.iter().map(|(due, _)| *due).min();
        let received = match due {
            Some(due) => tokio::select! {
                biased;
                n = items.recv_many(&mut batch, max_batch) => Some(n),
                () = tokio::time::sleep_until(due) => None,
            },
            None => Some(items.recv_many(&mut batch, max_batch).await),
        };
        // Every handle is gone: store what waits, then stop.
        let closed = received == Some(0);
        let now = tokio::time::Instant::now();
        stats
            .writes
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let mut work = Vec::with_capacity(batch.len());
        let mut deferred = Vec::new();
        for item in batch.drain(..) {
            match item {
                Item::Job(job) => work.push(job),
                // Every unit change waits, so a unit's changes keep their order in `waiting`.
                Item::Append(d) => match d.linger {
                    Some(linger) => waiting.push((now + linger, *d)),
                    None => deferred.push(*d),
                },
            }
        }
        // When anything is due, everything waiting goes: one batch for all of it.
        if closed || waiting.len() >= max_batch || waiting.iter().any(|(due, _)| *due <= now) {
            deferred.extend(waiting.drain(..).map(|(_, d)| d));
        }
        if work.is_empty() && deferred.is_empty() {
            if closed {
                break;
            }
            continue;
        }
        let size = work.len() + deferred.len();
        if held.as_mut().is_some_and(DbConn::is_broken) {
            tracing::warn!("group commit connection lost; opening another");
            held = None;
        }
        if held.is_none() {
            match db.conn().await {
                Ok(conn) => held = Some(conn),
                Err(e) => {
                    // Nothing runs: every waiting writer hears nothing was written.
                    tracing::warn!(error = %e, writes = size, "group commit has no connection");
                    continue;
                }
            }
        }
        let started = std::time::Instant::now();
        // PostgreSQL: first with every statement pipelined. SQLite (whose statements are
        // local calls): first without savepoints (one round trip per write fewer). If a write
        // fails, that transaction is rolled back and the batch replayed with a savepoint per
        // write, so only the failing write fails. A lone write that fails is simply rolled
        // back.
        let alone = work.len() == 1 && deferred.is_empty() && work.iter().all(|w| w.atomic());
        let mut committed = match held.take() {
            Some(DbConn::Postgres(obj)) if alone => {
                let shared = SharedPg::autocommit(obj);
                let outcome = run_alone(&shared, &mut work[0]).await;
                held = SharedPg::into_inner(shared).map(DbConn::Postgres);
                outcome
            }
            Some(DbConn::Postgres(obj)) => {
                let shared = SharedPg::new(obj);
                let outcome = run_pipelined(&shared, &mut work, &deferred).await;
                // Every other handle is gone with `run_pipelined`'s futures.
                held = SharedPg::into_inner(shared).map(DbConn::Postgres);
                outcome
            }
            Some(mut conn) => {
                let outcome = run_batch(&mut conn, &mut work, &deferred, false).await;
                held = Some(conn);
                outcome
            }
            None => Err(Batch::Store(writer_stopped())),
        };
        let replay = match &committed {
            Err(Batch::Failed) => work.len() > 1 || !deferred.is_empty(),
            Err(Batch::Replay) => true,
            _ => false,
        };
        if replay {
            metrics::counter!("shers_group_commit_replays_total").increment(1);
            committed = match &mut held {
                Some(conn) => run_batch(conn, &mut work, &deferred, true).await,
                None => Err(Batch::Store(writer_stopped())),
            };
        }
        let elapsed = started.elapsed();
        metrics::histogram!("shers_group_commit_seconds").record(elapsed.as_secs_f64());
        tracing::debug!(
            writes = work.len(),
            appends = deferred.len(),
            replayed = replay,
            ms = elapsed.as_secs_f64() * 1e3,
            alone,
            "batch ran"
        );
        let flushed = match committed {
            Ok(flushed) => {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                flushed
            }
            // A lone write failed; the rollback undid it and it is answered with its error.
            Err(Batch::Failed) => Ok(()),
            Err(Batch::Appends(e)) => Err(e),
            // The answers are dropped: every waiting writer is told nothing was written. (Only
            // a pipelined attempt asks for a replay, and the replay never does.)
            Err(e @ (Batch::Store(_) | Batch::Replay)) => {
                if let Batch::Store(e) = e {
                    tracing::warn!(error = %e, writes = size, "group commit failed");
                }
                held = None;
                metrics::histogram!("shers_group_commit_batch_size").record(size as f64);
                continue;
            }
        };
        work.into_iter().for_each(|job| job.answer());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::geo::LatLng;
    use crate::domain::ids::UnitId;

    fn unit() -> UnitRecord {
        UnitRecord {
            id: UnitId::from("M-1"),
            call_sign: "M-1".into(),
            capability: "als".into(),
            status: "available".into(),
            location: LatLng {
                lat: 51.5,
                lng: 0.0,
            },
            fix_at: chrono::DateTime::UNIX_EPOCH,
            base: None,
            current_incident_id: None,
        }
    }

    /// A full queue: a position fix is dropped at once, a status change waits for room.
    #[tokio::test]
    async fn a_full_queue_drops_position_fixes_and_makes_other_writes_wait() {
        let (jobs, mut queue) = mpsc::channel(1);
        let writer = GroupCommit {
            jobs,
            stats: Arc::default(),
        };
        let first = tokio::spawn({
            let writer = writer.clone();
            async move { writer.append_unit("unit-M-1", Vec::new(), unit()).await }
        });
        while queue.is_empty() {
            tokio::task::yield_now().await;
        }
        let fix = NewEvent::new("unit.location", serde_json::json!({}));
        let dropped = writer
            .append_unit_position("unit-M-1", vec![fix], unit())
            .await;
        assert!(matches!(dropped, Err(StoreError::Busy(_))), "{dropped:?}");
        let second = tokio::spawn({
            let writer = writer.clone();
            async move { writer.append_unit("unit-M-1", Vec::new(), unit()).await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(queue.len(), 1, "the second change waits for room");
        assert!(!second.is_finished());
        // The writer takes the first change (and answers it): the second is queued.
        let Some(Item::Append(taken)) = queue.recv().await else {
            panic!("the first change was not queued");
        };
        let _ = taken.answer.send(Ok(()));
        assert!(matches!(first.await, Ok(Ok(()))));
        let Some(Item::Append(taken)) = queue.recv().await else {
            panic!("the second change was not queued");
        };
        drop(taken);
        assert!(
            matches!(second.await, Ok(Err(StoreError::Unavailable(_)))),
            "an unanswered change is reported as not written"
        );
    }
}
