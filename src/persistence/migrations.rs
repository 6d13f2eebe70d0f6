//! Embedded, mirrored migrations (`migrations/sqlite`, `migrations/postgres`).
//!
//! diesel's migration harness is synchronous. On actix-rt (a current-thread runtime) it must not
//! block the reactor, so every run happens in `spawn_blocking`: SQLite through a plain
//! `SqliteConnection`, PostgreSQL through diesel-async's harness over a pooled connection.

use diesel::Connection as _;
use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel::sqlite::Sqlite;
use diesel_async::AsyncMigrationHarness;
use diesel_async::RunQueryDsl;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use super::{Backend, Db, DbConn, StoreError, sqlite_path};
use crate::db_run;

/// SQLite migrations, compiled into the binary.
pub const SQLITE: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
/// PostgreSQL migrations, compiled into the binary.
pub const POSTGRES: EmbeddedMigrations = embed_migrations!("migrations/postgres");

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn migration_error(e: BoxError) -> StoreError {
    StoreError::Unavailable(format!("migration failed: {e}"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BoxError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Unavailable(format!("migration task failed: {e}")))?
        .map_err(migration_error)
}

/// A session advisory lock around PostgreSQL migrations (the number is arbitrary and fixed).
const MIGRATION_LOCK: &str = "SELECT pg_advisory_lock(7411300651)";
const MIGRATION_UNLOCK: &str = "SELECT pg_advisory_unlock(7411300651)";

/// Which direction to move the schema.
enum Direction {
    Up,
    DownAll,
}

async fn run(
    db: &Db,
    sqlite_url: Option<String>,
    direction: Direction,
) -> Result<usize, StoreError> {
    match db {
        Db::Sqlite(_) => {
            let url = sqlite_url.ok_or_else(|| StoreError::Unavailable("no SQLite path".into()))?;
            blocking(move || {
                let path = sqlite_path(&url).unwrap_or(&url).to_owned();
                let mut conn = diesel::SqliteConnection::establish(&path)?;
                let n = match direction {
                    Direction::Up => conn.run_pending_migrations(SQLITE)?.len(),
                    Direction::DownAll => conn.revert_all_migrations(SQLITE)?.len(),
                };
                Ok(n)
            })
            .await
        }
        Db::Postgres(pool) => {
            // Nodes of a cluster start together: one migrates while the others wait on this
            // lock (held by a connection of its own), then find nothing left to do.
            let mut lock = pool.get().await?;
            diesel::sql_query(MIGRATION_LOCK)
                .execute(&mut *lock)
                .await?;
            let conn = pool.get().await?;
            let ran = blocking(move || {
                let mut harness = AsyncMigrationHarness::new(conn);
                let n = match direction {
                    Direction::Up => harness.run_pending_migrations(POSTGRES)?.len(),
                    Direction::DownAll => harness.revert_all_migrations(POSTGRES)?.len(),
                };
                Ok(n)
            })
            .await;
            diesel::sql_query(MIGRATION_UNLOCK)
                .execute(&mut *lock)
                .await?;
            ran
        }
    }
}

/// Applies every pending migration; returns how many ran.
pub async fn run_pending(db: &Db, url: &str) -> Result<usize, StoreError> {
    run(db, Some(url.to_owned()), Direction::Up).await
}

/// Reverts every migration (tests and `shers migrate --revert-all`); returns how many ran.
pub async fn revert_all(db: &Db, url: &str) -> Result<usize, StoreError> {
    run(db, Some(url.to_owned()), Direction::DownAll).await
}

/// Versions of the embedded migrations for `db`'s backend.
pub fn embedded_versions(db: &Db) -> Vec<String> {
    versions_for(db.backend())
}

fn versions_for(backend: Backend) -> Vec<String> {
    let names = match backend {
        Backend::Sqlite => MigrationSource::<Sqlite>::migrations(&SQLITE)
            .map(|ms| ms.iter().map(|m| m.name().version().to_string()).collect()),
        Backend::Postgres => MigrationSource::<Pg>::migrations(&POSTGRES)
            .map(|ms| ms.iter().map(|m| m.name().version().to_string()).collect()),
    };
    names.unwrap_or_default()
}

#[derive(diesel::QueryableByName)]
struct AppliedVersion {
    #[diesel(sql_type = diesel::sql_types::Text)]
    version: String,
}

/// Versions recorded as applied in the database (empty when the bookkeeping table is missing).
pub async fn applied_versions(conn: &mut DbConn) -> Result<Vec<String>, StoreError> {
    let query = diesel::sql_query("SELECT version FROM __diesel_schema_migrations");
    let rows: Result<Vec<AppliedVersion>, diesel::result::Error> =
        db_run!(conn, |c| query.load(c).await);
    match rows {
        Ok(rows) => Ok(rows.into_iter().map(|r| r.version).collect()),
        // The table does not exist yet: nothing is applied.
        Err(diesel::result::Error::DatabaseError(_, info))
            if info.message().contains("__diesel_schema_migrations") =>
        {
            Ok(Vec::new())
        }
        Err(e) => Err(e.into()),
    }
}

/// Embedded migrations that the database has not applied.
pub async fn missing(conn: &mut DbConn) -> Result<Vec<String>, StoreError> {
    let backend = conn.backend();
    let applied = applied_versions(conn).await?;
    Ok(versions_for(backend)
        .into_iter()
        .filter(|v| !applied.contains(v))
        .collect())
}
