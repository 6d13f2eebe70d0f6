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

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use super::{Db, DbConn, StoreError};

/// A write's answer, given once the batch's commit is known.
type Completion = Box<dyn FnOnce()>;

/// A queued write: runs in its savepoint and returns how to answer once committed. Jobs come
/// from any thread (device actors run on their own arbiters); they run on the writer's.
type Job = Box<
    dyn for<'a> FnOnce(&'a mut DbConn) -> Pin<Box<dyn Future<Output = Completion> + 'a>> + Send,
>;

/// The future a write's work returns, borrowing the connection.
pub type WriteFuture<'a, T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + 'a>>;

/// Handle to the group-commit writer; cheap to clone and usable from any thread.
#[derive(Clone, Debug)]
pub struct GroupCommit {
    jobs: mpsc::UnboundedSender<Job>,
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
        let job: Job = Box::new(move |conn| {
            Box::pin(async move {
                // Nested in the batch's transaction, this is a savepoint.
                match conn.write_transaction(async |sp| work(sp).await).await {
                    Ok(value) => Box::new(move || {
                        let _ = answer.send(Ok(value));
                    }) as Completion,
                    Err(e) => {
                        let _ = answer.send(Err(e));
                        Box::new(|| {}) as Completion
                    }
                }
            })
        });
        if self.jobs.send(job).is_err() {
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

async fn writer(
    db: Db,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    max_batch: usize,
    stats: Arc<Stats>,
) {
    let mut batch = Vec::with_capacity(max_batch);
    // Kept between batches; dropped after a failed commit (it may be broken) and opened again.
    let mut held: Option<DbConn> = None;
    while jobs.recv_many(&mut batch, max_batch).await > 0 {
        let size = batch.len();
        stats.writes.fetch_add(size as u64, Ordering::Relaxed);
        let work = std::mem::replace(&mut batch, Vec::with_capacity(max_batch));
        let conn = match &mut held {
            Some(conn) => conn,
            None => match db.conn().await {
                Ok(conn) => held.insert(conn),
                Err(e) => {
                    // The jobs are dropped unrun: every waiting writer hears nothing was written.
                    tracing::warn!(error = %e, writes = size, "group commit has no connection");
                    continue;
                }
            },
        };
        let committed = conn
            .write_transaction(async |tx| {
                let mut answers = Vec::with_capacity(work.len());
                for job in work {
                    answers.push(job(tx).await);
                }
                Ok::<_, StoreError>(answers)
            })
            .await;
        match committed {
            Ok(answers) => {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                answers.into_iter().for_each(|answer| answer());
            }
            // The answers are dropped: every waiting writer is told nothing was written.
            Err(e) => {
                tracing::warn!(error = %e, writes = size, "group commit failed");
                held = None;
            }
        }
        metrics::histogram!("shers_group_commit_batch_size").record(size as f64);
    }
}
