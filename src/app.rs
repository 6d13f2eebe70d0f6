//! The composition root: opens the database, runs migrations, wires services and starts the
//! HTTP server. `main.rs` and the tests build the same [`Application`] (tests on port 0).

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use tracing_actix_web::TracingLogger;

use crate::config::Settings;
use crate::http::auth::AuthService;
use crate::http::json::BodyLimit;
use crate::http::telemetry::{ShersRootSpan, observe, prometheus};
use crate::http::{self, AppState};
use crate::persistence::{Db, migrations};

/// A built, not yet running, SHERS server.
pub struct Application {
    port: u16,
    server: Server,
    db: Db,
}

/// Opens the configured database and applies pending migrations.
pub async fn open_database(settings: &Settings) -> anyhow::Result<Db> {
    let db = Db::connect(&settings.database)
        .await
        .context("opening the database")?;
    let applied = migrations::run_pending(&db, settings.database.url.expose())
        .await
        .context("running migrations")?;
    if applied > 0 {
        tracing::info!(migrations.applied = applied, db.backend = ?db.backend(), "migrations applied");
    }
    Ok(db)
}

impl Application {
    /// Opens the database, migrates it and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let db = open_database(&settings).await?;
        Self::build_with_db(settings, db)
    }

    /// Binds the listener and builds the server over an already opened database.
    pub fn build_with_db(settings: Settings, db: Db) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(&settings.bind)
            .with_context(|| format!("binding {}", settings.bind))?;
        let port = listener.local_addr()?.port();
        let _ = prometheus();

        let settings = Arc::new(settings);
        let state = web::Data::new(AppState {
            db: db.clone(),
            settings: settings.clone(),
        });
        let auth = web::Data::new(AuthService::new(
            db.clone(),
            Duration::from_secs(settings.auth.cache_ttl_s),
        ));
        let body_limit = BodyLimit(settings.http.body_limit_bytes);

        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .app_data(auth.clone())
                .app_data(body_limit)
                .configure(http::routes)
                .default_service(web::to(http::not_found))
                .wrap(from_fn(observe))
                // Outermost, so every log line of a request carries its span.
                .wrap(TracingLogger::<ShersRootSpan>::new())
        })
        .shutdown_timeout(settings.http.shutdown_timeout_s);
        if let Some(workers) = settings.http.workers {
            server = server.workers(workers.max(1));
        }
        let server = server.listen(listener)?.run();
        Ok(Self { port, server, db })
    }

    /// The port actually bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The database pool.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// A handle to stop the server.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until the server is stopped (SIGINT/SIGTERM drain in-flight requests).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}
