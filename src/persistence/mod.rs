//! Persistence: diesel + diesel-async on SQLite (embedded default) and PostgreSQL.
//!
//! The backend is chosen by the database URL's scheme. [`Db`] is a small enum over the two
//! pools; [`DbConn`] is a checked-out connection of either kind, and the [`db_run!`](crate::db_run) macro
//! compiles a query body once per backend (the habit of vaultwarden's `db_run!`). Query
//! functions take a `&mut DbConn`, never the pool, so they compose inside one transaction.
//!
//! The schema in [`schema`] is portable: ids are `TEXT`, times are `TIMESTAMP` holding UTC,
//! JSON payloads are `TEXT`. This module knows domain types, never actors or HTTP.

pub mod cluster;
pub mod cursors;
pub mod events;
pub mod fleet;
pub mod group;
pub mod ids;
pub mod incidents;
pub mod insurance;
pub mod invoices;
pub mod migrations;
pub mod patients;
pub mod push_tokens;
pub mod readings;
pub mod schema;
mod statement;
pub mod tokens;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use diesel::{ConnectionError, SqliteConnection};
use diesel_async::pooled_connection::deadpool::{Object, Pool, PoolError};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::sync_connection_wrapper::{SpawnBlocking, SyncConnectionWrapper};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection as _};
use futures_util::future::BoxFuture;

use crate::config::DatabaseSettings;

/// The SQLite connection type: diesel's synchronous connection, its statements run where its
/// [`SqliteRuntime`] says.
pub type SqliteConn = SyncConnectionWrapper<SqliteConnection, SqliteRuntime>;

/// Where a SQLite connection runs its (blocking) statements.
pub enum SqliteRuntime {
    /// On tokio's blocking pool: pooled connections used from async tasks. Each statement is
    /// a hand-off to a pool thread and back. If the caller stops waiting, the statement still
    /// finishes on its thread (the connection stays locked until it has).
    Blocking(tokio::runtime::Handle),
    /// On the calling thread, with no hand-off: only for the group-commit writer's own
    /// connection, whose thread does nothing else (see [`Db::connect_writer`]).
    Inline,
}

impl SpawnBlocking for SqliteRuntime {
    fn spawn_blocking<'a, R>(
        &mut self,
        task: impl FnOnce() -> R + Send + 'static,
    ) -> BoxFuture<'a, Result<R, Box<dyn std::error::Error + Send + Sync + 'static>>>
    where
        R: Send + 'static,
    {
        match self {
            Self::Inline => Box::pin(std::future::ready(Ok(task()))),
            Self::Blocking(handle) => {
                let task = handle.spawn_blocking(task);
                Box::pin(async move {
                    task.await
                        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                })
            }
        }
    }

    fn get_runtime() -> Self {
        Self::Blocking(tokio::runtime::Handle::current())
    }
}

/// Which database backend a [`Db`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Embedded SQLite file.
    Sqlite,
    /// PostgreSQL server.
    Postgres,
}

/// A pool of connections to the configured database.
#[derive(Clone)]
pub enum Db {
    /// SQLite pool (a handful of connections; one writer at a time).
    Sqlite(Pool<SqliteConn>),
    /// PostgreSQL pool.
    Postgres(Pool<AsyncPgConnection>),
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Db({:?})", self.backend())
    }
}

/// A connection checked out of a [`Db`] pool.
// The PostgreSQL variant is larger; connections are checked out once per unit of work and
// never stored in bulk, so boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum DbConn {
    /// SQLite connection.
    Sqlite(Object<SqliteConn>),
    /// PostgreSQL connection.
    Postgres(Object<AsyncPgConnection>),
    /// A PostgreSQL connection shared by several writes running at once inside one
    /// transaction that someone else opened (the group-commit writer's pipelined batch, see
    /// [`group`]): their statements are pipelined, each sent without waiting for the others'
    /// answers. Always inside a transaction; never commits, rolls back or sets savepoints.
    PgShared(Arc<SharedPg>),
}

/// A PostgreSQL connection shared for pipelining ([`DbConn::PgShared`]).
pub struct SharedPg {
    conn: Object<AsyncPgConnection>,
    /// Shared for statements in autocommit (see [`DbConn::pipelined`]), not for a
    /// transaction someone else opened.
    reads_only: bool,
    /// Set when a write saw something that must not be committed with the others (an
    /// append's version check failed after its sequence numbers were taken): the owner rolls
    /// the whole transaction back instead of committing.
    poisoned: AtomicBool,
    /// Statements run through it so far (see [`SharedPg::statements`]).
    statements: AtomicUsize,
}

impl SharedPg {
    /// Shares `conn`, which must be inside a transaction the caller will end.
    pub(crate) fn new(conn: Object<AsyncPgConnection>) -> Arc<Self> {
        Self::shared(conn, false)
    }

    /// Shares `conn` for statements that each commit as they run (no transaction).
    pub(crate) fn autocommit(conn: Object<AsyncPgConnection>) -> Arc<Self> {
        Self::shared(conn, true)
    }

    fn shared(conn: Object<AsyncPgConnection>, reads_only: bool) -> Arc<Self> {
        Arc::new(Self {
            conn,
            reads_only,
            poisoned: AtomicBool::new(false),
            statements: AtomicUsize::new(0),
        })
    }

    /// How many statements have been run through this handle (each [`db_run!`](crate::db_run)
    /// on it counts one).
    pub(crate) fn statements(&self) -> usize {
        AtomicUsize::load(&self.statements, Ordering::Relaxed)
    }

    /// The connection back, once every handle but this one is gone.
    pub(crate) fn into_inner(shared: Arc<Self>) -> Option<Object<AsyncPgConnection>> {
        Arc::into_inner(shared).map(|s| s.conn)
    }

    /// The connection, for statements.
    pub(crate) fn conn(&self) -> &AsyncPgConnection {
        self.statements.fetch_add(1, Ordering::Relaxed);
        &self.conn
    }

    /// Marks the transaction as not to be committed.
    pub(crate) fn poison(&self) {
        self.poisoned.store(true, Ordering::Relaxed);
    }

    /// Whether some write marked the transaction as not to be committed.
    pub(crate) fn is_poisoned(&self) -> bool {
        AtomicBool::load(&self.poisoned, Ordering::Relaxed)
    }
}

/// The concrete connection behind a [`DbConn`], as [`db_run!`](crate::db_run) hands it to a
/// query body. PostgreSQL statements always go through a shared reference, which is what lets
/// diesel-async pipeline them when several run at once.
#[doc(hidden)]
pub enum Backed<'a> {
    /// A connection to the embedded SQLite file.
    Sqlite(&'a mut SqliteConn),
    /// PostgreSQL (owned or shared).
    Pg(&'a AsyncPgConnection),
}

/// Errors of the persistence layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached (connection refused or closed, or it could not be
    /// opened).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database is there but contended: every pooled connection stayed in use for the
    /// whole wait, or SQLite's write lock stayed taken for its whole busy timeout. Retrying
    /// shortly succeeds once the load passes.
    #[error("database busy: {0}")]
    Busy(String),
    /// The row asked for does not exist.
    #[error("not found")]
    NotFound,
    /// A uniqueness or version constraint was violated.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Any other database error.
    #[error("database error: {0}")]
    Database(#[source] diesel::result::Error),
    /// Stored data could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

impl From<diesel::result::Error> for StoreError {
    fn from(err: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind, Error};
        match err {
            Error::NotFound => Self::NotFound,
            Error::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
                Self::Conflict(info.message().to_owned())
            }
            Error::DatabaseError(DatabaseErrorKind::ClosedConnection, info) => {
                Self::Unavailable(info.message().to_owned())
            }
            // SQLITE_BUSY / SQLITE_LOCKED, after `busy_timeout` (diesel has no kind for them).
            Error::DatabaseError(_, info) if is_sqlite_busy(info.message()) => {
                Self::Busy(info.message().to_owned())
            }
            Error::BrokenTransactionManager => {
                Self::Unavailable("broken transaction manager".to_owned())
            }
            // A stored value its Rust type refuses (an id column that is not an id): the
            // field, then why.
            Error::DeserializationError(e) => {
                let mut message = e.to_string();
                let mut source = e.source();
                while let Some(cause) = source {
                    message.push_str(&format!(": {cause}"));
                    source = cause.source();
                }
                Self::Corrupt(message)
            }
            other => Self::Database(other),
        }
    }
}

/// Whether a SQLite error message is `SQLITE_BUSY` or `SQLITE_LOCKED` (contention, not a
/// fault).
fn is_sqlite_busy(message: &str) -> bool {
    matches!(
        message,
        "database is locked" | "database is busy" | "database table is locked"
    )
}

impl From<PoolError> for StoreError {
    fn from(err: PoolError) -> Self {
        use deadpool::managed::TimeoutType;
        match err {
            // Every connection is open and in use: the database answers, it is busy.
            PoolError::Timeout(TimeoutType::Wait) => {
                Self::Busy("every database connection stayed in use".to_owned())
            }
            other => Self::Unavailable(other.to_string()),
        }
    }
}

/// Errors opening the database at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL scheme is neither `sqlite://` nor `postgres://`/`postgresql://`.
    #[error(
        "unsupported database URL scheme {0:?}: use sqlite://path/to/file.db or postgres://user@host/db"
    )]
    UnsupportedScheme(String),
    /// The SQLite file's directory could not be created.
    #[error("cannot create the SQLite directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The pool could not be built.
    #[error("cannot build the connection pool: {0}")]
    Pool(String),
    /// The database refused the first connection.
    #[error("cannot connect to the database: {0}")]
    Connect(#[from] StoreError),
}

/// Compiles `$body` once per backend with `$conn` bound to the concrete connection
/// (`&mut SqliteConn`, or `&mut &AsyncPgConnection`: PostgreSQL statements go through a shared
/// reference so that concurrent ones pipeline). The second form takes one body per backend
/// (`db_run!(conn, |c| { sqlite } else |c| { postgres })`) for the rare differences.
#[macro_export]
macro_rules! db_run {
    ($db_conn:expr, |$sq:ident| $sq_body:block else |$pg:ident| $pg_body:block) => {
        match $crate::persistence::DbConn::backed($db_conn) {
            $crate::persistence::Backed::Sqlite($sq) => $sq_body,
            $crate::persistence::Backed::Pg(shared) => {
                let mut shared: &::diesel_async::AsyncPgConnection = shared;
                let $pg = &mut shared;
                $pg_body
            }
        }
    };
    ($db_conn:expr, |$conn:ident| $body:expr) => {
        match $crate::persistence::DbConn::backed($db_conn) {
            $crate::persistence::Backed::Sqlite($conn) => $body,
            $crate::persistence::Backed::Pg(shared) => {
                let mut shared: &::diesel_async::AsyncPgConnection = shared;
                let $conn = &mut shared;
                $body
            }
        }
    };
}

/// Pragmas every SQLite connection gets: WAL for concurrent readers, a busy timeout instead of
/// immediate "database is locked", full fsync so an acknowledged write survives power loss.
/// `busy_timeout` comes first so that switching to WAL waits for other connections too.
const SQLITE_PRAGMAS: &str = "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; \
     PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL;";

/// SQLite's `busy_timeout` (in [`SQLITE_PRAGMAS`]). A request waits at least this long for a
/// pooled connection too, on either database ([`POOL_WAIT_MIN`]).
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The least a request waits for a pooled connection when every one is in use. Every
/// connection being in use is contention (a busy machine, a burst of requests), not an outage:
/// an unreachable database fails the connection's opening, bounded by `database.timeout_ms`,
/// not this wait. Contention is waited out, not answered 503; on SQLite it matches the busy
/// timeout that the write lock is waited for anyway.
const POOL_WAIT_MIN: Duration = SQLITE_BUSY_TIMEOUT;

/// Parses `sqlite://path` into the file path (`sqlite:///abs` → `/abs`).
pub fn sqlite_path(url: &str) -> Option<&str> {
    url.strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .filter(|p| !p.is_empty())
}

/// Opens a PostgreSQL connection whose I/O runs on the database I/O thread.
///
/// A tokio-postgres connection reads and writes its socket on the thread that opened it. Left
/// to chance, that is whichever arbiter first needed a connection: an HTTP worker triaging a
/// batch of 500 readings, or the system arbiter that hosts the directories and the fleet, and
/// an answer that has arrived waits until that thread is free. Every pooled connection is
/// therefore opened on one thread that does nothing else, so an answer is read as soon as it
/// arrives (it is handed to the waiting task on its own thread), and pooled connections
/// outlive the actix system that first used them. The group-commit writer's connection is the
/// exception: it lives on the writer's own thread.
fn establish_on_io_thread(
    url: String,
) -> BoxFuture<'static, diesel::ConnectionResult<AsyncPgConnection>> {
    Box::pin(async move {
        let io = io_thread().ok_or_else(|| {
            ConnectionError::BadConnection("the database I/O thread could not be started".into())
        })?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        io.spawn(async move {
            let _ = tx.send(AsyncPgConnection::establish(&url).await);
        });
        rx.await.map_err(|_| {
            ConnectionError::BadConnection("the database I/O thread has stopped".into())
        })?
    })
}

/// The database I/O thread's runtime, started on first use; it runs for the whole process.
/// `None` if the thread could not be started (then no pooled PostgreSQL connection opens).
fn io_thread() -> Option<&'static tokio::runtime::Handle> {
    static IO: std::sync::OnceLock<Option<tokio::runtime::Handle>> = std::sync::OnceLock::new();
    IO.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .inspect_err(|e| tracing::error!(error = %e, "no runtime for database I/O"))
            .ok()?;
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("shers-db-io".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))
            .inspect_err(|e| tracing::error!(error = %e, "no thread for database I/O"))
            .ok()?;
        Some(handle)
    })
    .as_ref()
}

impl Db {
    /// Opens the pool for `settings.url` and checks that one connection works.
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, ConnectError> {
        Self::open(settings, false).await
    }

    /// Opens a one-connection pool for the group-commit writer ([`group::GroupCommit`]). Its
    /// SQLite connection runs statements inline on the writer's own thread: a batch of writes
    /// is dozens of statements, and handing each to the blocking pool and back cost more than
    /// the statements themselves (the accept-race profile: over half the CPU in context
    /// switches between the runtime and blocking-pool threads). Its PostgreSQL connection is
    /// opened by the first checkout, on that thread, and does its I/O there (the incident
    /// directory's reader uses one too).
    pub async fn connect_writer(settings: &DatabaseSettings) -> Result<Self, ConnectError> {
        Self::open(settings, true).await
    }

    // Long on purpose: the two backends' pool set-ups side by side, each with the reason for
    // its settings, read top to bottom.
    async fn open(settings: &DatabaseSettings, writer: bool) -> Result<Self, ConnectError> {
        let url = settings.url.expose();
        let timeout = Duration::from_millis(settings.timeout_ms);
        let db = if let Some(path) = sqlite_path(url) {
            if let Some(dir) = Path::new(path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir).map_err(|source| ConnectError::CreateDir {
                    path: dir.display().to_string(),
                    source,
                })?;
            }
            let mut cfg = ManagerConfig::<SqliteConn>::default();
            cfg.recycling_method = RecyclingMethod::Fast;
            cfg.custom_setup = Box::new(move |url| {
                let url = url.to_owned();
                Box::pin(async move {
                    let mut conn = if writer {
                        SyncConnectionWrapper::with_runtime(
                            <SqliteConnection as diesel::Connection>::establish(&url)?,
                            SqliteRuntime::Inline,
                        )
                    } else {
                        SqliteConn::establish(&url).await?
                    };
                    // batch_execute: sql_query would run only the first statement.
                    conn.batch_execute(SQLITE_PRAGMAS)
                        .await
                        .map_err(ConnectionError::CouldntSetupConfiguration)?;
                    Ok(conn)
                })
            });
            let manager = AsyncDieselConnectionManager::new_with_config(path, cfg);
            let pool = Pool::builder(manager)
                .max_size(if writer {
                    1
                } else {
                    settings.pool_size.clamp(1, 4)
                })
                .runtime(deadpool::Runtime::Tokio1)
                .wait_timeout(Some(timeout.max(POOL_WAIT_MIN)))
                .create_timeout(Some(timeout))
                .recycle_timeout(Some(timeout))
                .build()
                .map_err(|e| ConnectError::Pool(e.to_string()))?;
            Db::Sqlite(pool)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            // `Fast` recycling: no test query on every checkout (a round trip per request);
            // a closed connection is still detected (`is_broken` checks it) and discarded.
            let mut cfg = ManagerConfig::<AsyncPgConnection>::default();
            cfg.recycling_method = RecyclingMethod::Fast;
            if !writer {
                cfg.custom_setup = Box::new(|url| establish_on_io_thread(url.to_owned()));
            }
            let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
                url.as_str(),
                cfg,
            );
            let pool = Pool::builder(manager)
                .max_size(if writer { 1 } else { settings.pool_size.max(1) })
                .runtime(deadpool::Runtime::Tokio1)
                .wait_timeout(Some(timeout.max(POOL_WAIT_MIN)))
                .create_timeout(Some(timeout))
                .recycle_timeout(Some(timeout))
                .build()
                .map_err(|e| ConnectError::Pool(e.to_string()))?;
            Db::Postgres(pool)
        } else {
            let scheme = url.split_once(':').map_or(url.as_str(), |(s, _)| s);
            return Err(ConnectError::UnsupportedScheme(scheme.to_owned()));
        };
        db.ping().await?;
        if writer && let Db::Postgres(pool) = &db {
            // A PostgreSQL connection does its I/O on the thread that opened it, and the ping
            // opened this one on the caller's (the system arbiter, the busiest thread): drop
            // it, so the writer opens its own on its dedicated thread. Measured: with the
            // writer's socket on the system arbiter, an emergency's one-write batch took
            // 1.7 ms for 0.45 ms of statement execution.
            pool.retain(|_, _| false);
        }
        Ok(db)
    }

    /// Which backend this pool talks to.
    pub fn backend(&self) -> Backend {
        match self {
            Db::Sqlite(_) => Backend::Sqlite,
            Db::Postgres(_) => Backend::Postgres,
        }
    }

    /// Checks out a connection.
    pub async fn conn(&self) -> Result<DbConn, StoreError> {
        Ok(match self {
            Db::Sqlite(pool) => DbConn::Sqlite(pool.get().await?),
            Db::Postgres(pool) => DbConn::Postgres(pool.get().await?),
        })
    }

    /// Runs `SELECT 1` on a pooled connection.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.run(|mut conn| async move {
            db_run!(&mut conn, |c| {
                diesel::sql_query("SELECT 1").execute(c).await?;
            });
            Ok(())
        })
        .await
    }

    /// Runs `work` with a pooled connection in its own task and awaits the result.
    ///
    /// Callers whose future may be dropped mid-flight (request handlers when a client hangs
    /// up, timeouts, stopping actors) must use this: the database work then always runs to
    /// completion, so an acknowledged write is never half-done, and diesel-async's SQLite
    /// wrapper (which blocks in `Drop` when cancelled, a panic on actix's current-thread
    /// runtime) is never cancelled. Must be called on an actix/tokio `LocalSet`.
    pub async fn run<T, E, F, Fut>(&self, work: F) -> Result<T, E>
    where
        F: FnOnce(DbConn) -> Fut + 'static,
        Fut: std::future::Future<Output = Result<T, E>> + 'static,
        T: 'static,
        E: From<StoreError> + 'static,
    {
        let db = self.clone();
        let task = actix_web::rt::spawn(async move {
            let conn = db.conn().await?;
            work(conn).await
        });
        match task.await {
            Ok(result) => result,
            Err(e) => Err(StoreError::Unavailable(format!("database task failed: {e}")).into()),
        }
    }
}

impl DbConn {
    /// The concrete connection, for [`db_run!`](crate::db_run).
    #[doc(hidden)]
    pub fn backed(&mut self) -> Backed<'_> {
        match self {
            DbConn::Sqlite(obj) => Backed::Sqlite(obj),
            DbConn::Postgres(obj) => Backed::Pg(obj),
            DbConn::PgShared(shared) => Backed::Pg(shared.conn()),
        }
    }

    /// Which backend this connection talks to.
    pub fn backend(&self) -> Backend {
        match self {
            DbConn::Sqlite(_) => Backend::Sqlite,
            DbConn::Postgres(_) | DbConn::PgShared(_) => Backend::Postgres,
        }
    }

    /// Whether this PostgreSQL connection is known to be dead (its socket closed, say after
    /// a database restart or a network cut), so a long-held connection is replaced before a
    /// write is sent on it instead of failing that write. A shared connection is only checked
    /// while no other handle is out; SQLite connections are never broken this way.
    pub fn is_broken(&mut self) -> bool {
        use diesel_async::pooled_connection::PoolableConnection;
        match self {
            DbConn::Sqlite(_) => false,
            DbConn::Postgres(obj) => PoolableConnection::is_broken(&mut **obj),
            DbConn::PgShared(shared) => {
                Arc::get_mut(shared).is_some_and(|pg| PoolableConnection::is_broken(&mut *pg.conn))
            }
        }
    }

    /// Another handle on the same shared connection (a pipelined batch), to run statements
    /// at once; `None` for a connection of its own (statements then run one after another).
    pub fn fork(&self) -> Option<DbConn> {
        match self {
            DbConn::PgShared(shared) => Some(DbConn::PgShared(shared.clone())),
            _ => None,
        }
    }

    /// Marks a shared connection's transaction as not to be committed (see
    /// [`SharedPg`]); true if it was shared (a connection of its own has no one to tell).
    pub(crate) fn poison(&self) -> bool {
        match self {
            DbConn::PgShared(shared) => {
                shared.poison();
                true
            }
            _ => false,
        }
    }

    /// This connection for independent statements outside any transaction (reads, or a
    /// write that is atomic on its own), pipelined on PostgreSQL through
    /// [`try_both`](Self::try_both) and [`try_each`](Self::try_each): one round trip for
    /// several. A write transaction on it fails: that needs a connection of its own.
    pub fn pipelined(self) -> DbConn {
        match self {
            DbConn::Postgres(conn) => DbConn::PgShared(SharedPg::shared(conn, true)),
            other => other,
        }
    }

    /// Runs `a` and `b`, which must not depend on each other: at once on a shared
    /// PostgreSQL connection (their statements pipelined, one round trip for both), one after
    /// the other otherwise (`b` not at all if `a` failed).
    pub async fn try_both<A, B, E>(
        &mut self,
        a: impl AsyncFnOnce(&mut DbConn) -> Result<A, E>,
        b: impl AsyncFnOnce(&mut DbConn) -> Result<B, E>,
    ) -> Result<(A, B), E> {
        match self.fork() {
            Some(mut other) => futures_util::future::try_join(a(self), b(&mut other)).await,
            None => {
                let a = a(self).await?;
                let b = b(self).await?;
                Ok((a, b))
            }
        }
    }

    /// Runs `f` for each of `items`, which must not depend on each other: all at once on a
    /// shared PostgreSQL connection (pipelined), one after another otherwise (stopping at the
    /// first error).
    pub async fn try_each<I, T, E>(
        &mut self,
        items: impl IntoIterator<Item = I>,
        f: impl AsyncFn(&mut DbConn, I) -> Result<T, E>,
    ) -> Result<Vec<T>, E> {
        let items: Vec<I> = items.into_iter().collect();
        if self.fork().is_some() {
            let mut forks: Vec<DbConn> = items.iter().filter_map(|_| self.fork()).collect();
            let runs = items
                .into_iter()
                .zip(forks.iter_mut())
                .map(|(item, c)| f(c, item));
            futures_util::future::try_join_all(runs).await
        } else {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                out.push(f(self, item).await?);
            }
            Ok(out)
        }
    }

    /// Whether this connection is inside a transaction already (then a nested
    /// `write_transaction` is a savepoint, and an append needs no savepoint of its own).
    /// A shared connection always is.
    pub fn in_transaction(&mut self) -> bool {
        use diesel_async::TransactionManager as _;
        let depth = match self {
            DbConn::Sqlite(c) => {
                let c: &mut SqliteConn = c;
                <SqliteConn as AsyncConnection>::TransactionManager::transaction_manager_status_mut(
                    c,
                )
                .transaction_depth()
            }
            DbConn::Postgres(c) => {
                let c: &mut AsyncPgConnection = c;
                <AsyncPgConnection as AsyncConnection>::TransactionManager::transaction_manager_status_mut(c)
                    .transaction_depth()
            }
            DbConn::PgShared(shared) => return !shared.reads_only,
        };
        matches!(depth, Ok(Some(_)))
    }

    /// Runs `work` inside one write transaction: committed when it returns `Ok`, rolled back
    /// otherwise. Query functions called inside that open their own transaction (such as
    /// `events::append`) become savepoints, so an event and its projections commit together.
    ///
    /// On SQLite the transaction takes the write lock first (`BEGIN IMMEDIATE`), so it waits
    /// for other writers through `busy_timeout` instead of failing on a lock upgrade.
    ///
    /// On a shared connection (a pipelined batch) `work` runs directly in the batch's
    /// transaction, with no savepoint: a failure there fails the whole batch, which the
    /// writer then replays with a savepoint per write.
    pub async fn write_transaction<T, E>(
        &mut self,
        work: impl AsyncFnOnce(&mut DbConn) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        use diesel_async::TransactionManager as _;
        let top_level = !self.in_transaction();
        let begun: Result<(), diesel::result::Error> = match self {
            // `BEGIN IMMEDIATE`: the write lock is taken first, waiting through `busy_timeout`.
            // A deferred transaction would take it at its first write, and one that has read
            // by then fails at once if another connection committed meanwhile
            // (`SQLITE_BUSY_SNAPSHOT`, which no busy timeout waits out). Nested: a savepoint.
            DbConn::Sqlite(c) if top_level => {
                let c: &mut SqliteConn = c;
                c.spawn_blocking(|inner| {
                    diesel::connection::AnsiTransactionManager::begin_transaction_sql(
                        inner,
                        "BEGIN IMMEDIATE",
                    )
                })
                .await
            }
            DbConn::Sqlite(c) => {
                let c: &mut SqliteConn = c;
                <SqliteConn as AsyncConnection>::TransactionManager::begin_transaction(c).await
            }
            DbConn::Postgres(c) => {
                let c: &mut AsyncPgConnection = c;
                <AsyncPgConnection as AsyncConnection>::TransactionManager::begin_transaction(c)
                    .await
            }
            DbConn::PgShared(shared) if shared.reads_only => {
                return Err(StoreError::Unavailable(
                    "a write transaction on a connection shared for single statements".into(),
                )
                .into());
            }
            DbConn::PgShared(_) => return work(self).await,
        };
        begun.map_err(StoreError::from)?;
        let result = work(self).await;
        let finished: Result<(), diesel::result::Error> = match (self, result.is_ok()) {
            (DbConn::Sqlite(c), true) => {
                let c: &mut SqliteConn = c;
                <SqliteConn as AsyncConnection>::TransactionManager::commit_transaction(c).await
            }
            (DbConn::Sqlite(c), false) => {
                let c: &mut SqliteConn = c;
                <SqliteConn as AsyncConnection>::TransactionManager::rollback_transaction(c).await
            }
            (DbConn::Postgres(c), true) => {
                let c: &mut AsyncPgConnection = c;
                <AsyncPgConnection as AsyncConnection>::TransactionManager::commit_transaction(c)
                    .await
            }
            (DbConn::Postgres(c), false) => {
                let c: &mut AsyncPgConnection = c;
                <AsyncPgConnection as AsyncConnection>::TransactionManager::rollback_transaction(c)
                    .await
            }
            // Returned above: a shared connection's transaction is not its own to end.
            (DbConn::PgShared(_), _) => Err(diesel::result::Error::BrokenTransactionManager),
        };
        // Only a top-level commit makes anything visible; releasing a savepoint does not.
        if top_level && finished.is_ok() && result.is_ok() {
            events::appended().notify_waiters();
        }
        match (result, finished) {
            (Ok(value), Ok(())) => Ok(value),
            (Ok(_), Err(e)) => Err(StoreError::from(e).into()),
            (Err(e), _) => Err(e),
        }
    }
}

/// Converts a UTC instant to the naive UTC value stored in `TIMESTAMP` columns.
pub(crate) fn to_db_time(t: chrono::DateTime<chrono::Utc>) -> chrono::NaiveDateTime {
    t.naive_utc()
}

/// Converts a stored naive UTC value back to an instant.
pub(crate) fn from_db_time(t: chrono::NaiveDateTime) -> chrono::DateTime<chrono::Utc> {
    t.and_utc()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sqlite_busy_timeout_is_the_one_the_pragmas_set() {
        let ms = SQLITE_BUSY_TIMEOUT.as_millis();
        assert!(SQLITE_PRAGMAS.contains(&format!("PRAGMA busy_timeout = {ms};")));
    }

    /// Contention is `Busy`, an unreachable database `Unavailable`: both are 503s, which say
    /// which it is.
    #[test]
    fn contention_is_busy_not_unavailable() {
        use deadpool::managed::TimeoutType;
        use diesel::result::{DatabaseErrorKind, Error};
        assert!(matches!(
            StoreError::from(PoolError::Timeout(TimeoutType::Wait)),
            StoreError::Busy(_)
        ));
        assert!(matches!(
            StoreError::from(PoolError::Timeout(TimeoutType::Create)),
            StoreError::Unavailable(_)
        ));
        for message in [
            "database is locked",
            "database is busy",
            "database table is locked",
        ] {
            let locked =
                Error::DatabaseError(DatabaseErrorKind::Unknown, Box::new(message.to_owned()));
            assert!(
                matches!(StoreError::from(locked), StoreError::Busy(_)),
                "{message}"
            );
        }
        let closed = Error::DatabaseError(
            DatabaseErrorKind::ClosedConnection,
            Box::new("server closed the connection".to_owned()),
        );
        assert!(matches!(
            StoreError::from(closed),
            StoreError::Unavailable(_)
        ));
        let other = Error::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new("no such table".to_owned()),
        );
        assert!(matches!(StoreError::from(other), StoreError::Database(_)));
        let undecodable = Error::DeserializationError("incident id \"inc-1\": invalid".into());
        assert!(matches!(
            StoreError::from(undecodable),
            StoreError::Corrupt(m) if m.contains("inc-1")
        ));
    }

    #[test]
    fn sqlite_urls_parse() {
        assert_eq!(sqlite_path("sqlite://data/shers.db"), Some("data/shers.db"));
        assert_eq!(sqlite_path("sqlite:///var/lib/x.db"), Some("/var/lib/x.db"));
        assert_eq!(sqlite_path("sqlite://"), None);
        assert_eq!(sqlite_path("postgres://x"), None);
    }
}
