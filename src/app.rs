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

use actix::{Actor as _, Arbiter};

use crate::actors::billing::{Billing, BillingDeps, PaymentsNotConfigured, ResumeBilling};
use crate::actors::broadcaster::Broadcaster;
use crate::actors::device::{DeviceDirectory, DeviceRouter, LocalDevices, TriageRuntime};
use crate::actors::incident::{IncidentDeps, IncidentDirectory, Recover};
use crate::actors::notifier::{Channels, NotifierActor};
use crate::actors::pusher::CrewPusher;
use crate::actors::unit::{Fleet, LoadFleet, SetUnitFreeRecipient};
use crate::config::{RoutingProvider, Settings};
use crate::domain::billing::Tariff;
use crate::domain::dispatch::EtaSource;
use crate::http::auth::{AuthService, BillingCredential};
use crate::http::json::BodyLimit;
use crate::http::telemetry::{ShersRootSpan, observe, prometheus};
use crate::http::{self, AppState};
use crate::integrations::notify::{
    AmazonSns, LogOnlyNotifier, Notifier, SignedWebhook, SmtpEmail, SnsTarget, TwilioSms,
};
use crate::integrations::payments::{PaymentProvider, SandboxPayments, StripeClient};
use crate::integrations::push::FcmClient;
use crate::integrations::routing::{
    GoogleRouting, OsrmRouting, Provider, Routing, RoutingWithFallback,
};
use crate::persistence::group::GroupCommit;
use crate::persistence::tokens;
use crate::persistence::{Db, migrations};

/// A built, not yet running, SHERS server.
pub struct Application {
    port: u16,
    server: Server,
    db: Db,
    devices: Option<actix::Addr<DeviceDirectory>>,
    incidents: actix::Addr<IncidentDirectory>,
    billing: actix::Addr<Billing>,
    broadcaster: actix::Addr<Broadcaster>,
    fleet: actix::Addr<Fleet>,
    closing: Arc<tokio::sync::watch::Sender<bool>>,
}

/// Opens the configured database, applies pending migrations, and revokes the admin tokens
/// older builds minted for their own use and may have left live
/// ([`tokens::revoke_legacy_internal`]).
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
    let revoked = db
        .run(|mut conn| async move {
            tokens::revoke_legacy_internal(&mut conn, chrono::Utc::now()).await
        })
        .await
        .context("revoking the internal tokens older builds left")?;
    if revoked > 0 {
        tracing::info!(
            tokens.revoked = revoked,
            "revoked internal admin tokens left by an older build"
        );
    }
    Ok(db)
}

/// The notification providers configured in `notify.*`; unconfigured channels go to the
/// log-only sink (with a warning at start-up, so nobody believes SMS are being sent).
pub fn notification_channels(settings: &Settings) -> anyhow::Result<Channels> {
    let n = &settings.notify;
    let timeout = Duration::from_secs(n.timeout_s.unwrap_or(10));
    let mut sms: Option<Arc<dyn Notifier>> = match (
        &n.sms_base_url,
        &n.sms_account_sid,
        &n.sms_auth_token,
        &n.sms_from,
    ) {
        (Some(base), Some(sid), Some(token), Some(from)) => Some(Arc::new(
            TwilioSms::new(base, sid, token.expose(), from, timeout)
                .context("configuring SMS (notify.sms_*)")?,
        )),
        (None, None, None, None) => None,
        _ => anyhow::bail!(
            "notify.sms_base_url, sms_account_sid, sms_auth_token and sms_from must be set together"
        ),
    };
    let email: Option<Arc<dyn Notifier>> = match &n.smtp_url {
        Some(url) => Some(Arc::new(
            SmtpEmail::new(
                url.expose(),
                n.email_from
                    .as_deref()
                    .unwrap_or("SHERS <noreply@shers.invalid>"),
            )
            .context("configuring email (notify.smtp_url)")?,
        )),
        None => None,
    };
    let webhook: Option<Arc<dyn Notifier>> = match (&n.webhook_url, &n.webhook_secret) {
        (Some(url), Some(secret)) => Some(Arc::new(
            SignedWebhook::new(url, secret.expose().as_bytes(), timeout)
                .context("configuring the webhook (notify.webhook_*)")?,
        )),
        (None, _) => None,
        (Some(_), None) => {
            anyhow::bail!("notify.webhook_url needs notify.webhook_secret to sign requests")
        }
    };
    let mut sns: Option<Arc<dyn Notifier>> = None;
    match (
        &n.sns_region,
        &n.sns_access_key_id,
        &n.sns_secret_access_key,
    ) {
        (Some(region), Some(key_id), Some(secret)) => {
            let base = n
                .sns_base_url
                .clone()
                .unwrap_or_else(|| AmazonSns::default_base_url(region));
            let target = match &n.sns_topic_arn {
                Some(arn) => SnsTarget::Topic(arn.clone()),
                None => SnsTarget::Sms,
            };
            let topic = matches!(target, SnsTarget::Topic(_));
            let client: Arc<dyn Notifier> = Arc::new(
                AmazonSns::new(&base, region, key_id, secret.expose(), target, timeout)
                    .context("configuring Amazon SNS (notify.sns_*)")?,
            );
            if topic {
                sns = Some(client);
            } else if sms.is_some() {
                anyhow::bail!(
                    "notify.sms_* (Twilio) and SNS SMS (notify.sns_* without notify.sns_topic_arn) \
                     are both configured: the sms channel has one provider; unset one of them, \
                     or set notify.sns_topic_arn to publish to a topic instead"
                );
            } else {
                sms = Some(client);
            }
        }
        (None, None, None) => {
            if n.sns_topic_arn.is_some() || n.sns_base_url.is_some() {
                anyhow::bail!(
                    "notify.sns_topic_arn and notify.sns_base_url need notify.sns_region, \
                     sns_access_key_id and sns_secret_access_key"
                );
            }
        }
        _ => anyhow::bail!(
            "notify.sns_region, sns_access_key_id and sns_secret_access_key must be set together"
        ),
    }
    for (name, configured) in [("SMS", sms.is_some()), ("email", email.is_some())] {
        if !configured {
            tracing::warn!(
                channel = name,
                "no {name} provider configured: those notifications are logged, not delivered"
            );
        }
    }
    Ok(Channels {
        sms,
        email,
        webhook,
        sns,
        fallback: Arc::new(LogOnlyNotifier),
    })
}

/// The routing service for ETAs: the providers `routing.providers` lists, in order, each that
/// is configured (OSRM needs `routing.base_url`; Google's key is checked when the settings
/// load), always with the straight line last.
fn routing_service(settings: &Settings) -> anyhow::Result<Arc<RoutingWithFallback>> {
    let r = &settings.routing;
    let mut providers = Vec::with_capacity(r.providers.len());
    for provider in &r.providers {
        match provider {
            RoutingProvider::Google => {
                let Some(key) = r.google_api_key.clone() else {
                    anyhow::bail!(
                        "routing.providers lists google but routing.google_api_key is not set"
                    );
                };
                providers.push(Provider {
                    source: EtaSource::Google,
                    router: Arc::new(
                        GoogleRouting::new(
                            &r.google_base_url,
                            key,
                            Duration::from_millis(r.google_timeout_ms),
                        )
                        .context("configuring the Google routing provider")?,
                    ) as Arc<dyn Routing>,
                });
            }
            RoutingProvider::Osrm => match &r.base_url {
                Some(url) => providers.push(Provider {
                    source: EtaSource::Osrm,
                    router: Arc::new(
                        OsrmRouting::new(url, Duration::from_millis(r.timeout_ms))
                            .context("configuring the OSRM routing provider")?,
                    ) as Arc<dyn Routing>,
                }),
                None => tracing::debug!("osrm is listed but routing.base_url is unset: skipped"),
            },
        }
    }
    let routing = RoutingWithFallback::new(providers);
    tracing::info!(providers = ?routing.sources(), "ETA providers (straight line last)");
    Ok(Arc::new(routing))
}

/// The SNS topic incidents queue a publish for: `notify.sns_topic_arn` when SNS is configured
/// (a topic without keys is refused by [`notification_channels`]).
fn sns_topic(settings: &Settings) -> Option<Arc<str>> {
    let n = &settings.notify;
    if n.sns_region.is_some() && n.sns_access_key_id.is_some() && n.sns_secret_access_key.is_some()
    {
        n.sns_topic_arn.as_deref().map(Arc::from)
    } else {
        None
    }
}

/// Starts the incident directory (with a reader connection of its own on PostgreSQL), tells
/// the fleet where freed units go, and resumes the open incidents before anything is served.
async fn start_incidents(
    settings: &Settings,
    db: &Db,
    writer: &GroupCommit,
    fleet: &actix::Addr<Fleet>,
) -> anyhow::Result<actix::Addr<IncidentDirectory>> {
    let mut directory = IncidentDirectory::new(IncidentDeps {
        db: db.clone(),
        directory: None,
        fleet: Some(fleet.clone()),
        dispatch: settings.dispatch.clone(),
        writer: writer.clone(),
        sns_topic: sns_topic(settings),
    });
    if db.backend() == crate::persistence::Backend::Postgres {
        // A connection of the directory's own, opened on its thread.
        directory = directory.with_reader(
            Db::connect_writer(&settings.database)
                .await
                .context("opening the incident directory's database connection")?,
        );
    }
    let incidents = directory.start();
    fleet.do_send(SetUnitFreeRecipient(incidents.clone().recipient()));
    let recovered = incidents
        .send(Recover)
        .await
        .context("recovering open incidents")?
        .context("recovering open incidents")?;
    if recovered > 0 {
        tracing::info!(incidents.recovered = recovered, "resumed open incidents");
    }
    Ok(incidents)
}

/// The credential billing presents to the insurance service: the configured
/// `insurance.api_token`, or else one of this process's own, accepted by this server's
/// embedded `/insurance/v1` alone (its verifier is returned to be mounted with it) and gone
/// with the process.
fn insurance_credential(
    settings: &Settings,
) -> anyhow::Result<(String, Option<web::Data<BillingCredential>>)> {
    if let Some(token) = &settings.insurance.api_token {
        return Ok((token.expose().clone(), None));
    }
    if settings.insurance.base_url.is_some() {
        tracing::warn!(
            "insurance.base_url is set without insurance.api_token: billing's own credential \
             is accepted only by this server's embedded insurance service"
        );
    }
    let (verifier, secret) =
        BillingCredential::generate().context("making billing's insurance credential")?;
    Ok((secret, Some(web::Data::new(verifier))))
}

/// Starts the billing saga driver with its payment provider and insurance client (presenting
/// `insurance_token`), and resumes unfinished sagas.
async fn start_billing(
    settings: &Settings,
    db: &Db,
    port: u16,
    insurance_token: String,
    fleet: &actix::Addr<Fleet>,
    incidents: &actix::Addr<IncidentDirectory>,
) -> anyhow::Result<actix::Addr<Billing>> {
    let payments: Arc<dyn PaymentProvider> =
        match (settings.payments.provider, &settings.payments.api_key) {
            (crate::config::PaymentProvider::Sandbox, _) => {
                tracing::warn!("payments: SANDBOX provider (demo only): no real money moves");
                Arc::new(SandboxPayments::new())
            }
            (crate::config::PaymentProvider::Stripe, Some(key)) => Arc::new(
                StripeClient::new(
                    &settings.payments.base_url,
                    key.expose(),
                    Duration::from_secs(10),
                )
                .map_err(|e| anyhow::anyhow!("configuring payments: {e}"))?,
            ),
            (crate::config::PaymentProvider::Stripe, None) => {
                tracing::warn!(
                    "payments: no api_key configured; charges are refused and invoices end failed"
                );
                Arc::new(PaymentsNotConfigured)
            }
        };
    let insurance_base = settings
        .insurance
        .base_url
        .clone()
        .unwrap_or_else(|| format!("http://127.0.0.1:{port}"));
    let billing = Billing::new(BillingDeps {
        db: db.clone(),
        insurance_base,
        insurance_token,
        payments,
        tariff: Tariff {
            base_cents: settings.payments.base_fee_cents,
            per_km_cents: settings.payments.per_km_cents,
            als_surcharge_cents: settings.payments.als_surcharge_cents,
            currency: settings.payments.currency.clone(),
        },
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?,
        fleet: fleet.clone(),
        incidents: incidents.clone(),
    })
    .start();
    billing.do_send(ResumeBilling);
    Ok(billing)
}

/// What a host that runs the application as one part of something bigger (a cluster node
/// holding the dispatch shard) puts in: the application starts no device actors of its own and
/// leaves the stop signals to the host.
pub struct Host {
    /// The host's wearables, wherever their actors run.
    pub devices: Arc<dyn DeviceRouter>,
    /// Routes the host serves on the application's server besides the API (node-to-node
    /// endpoints), with the app data they need.
    pub routes: Arc<dyn Fn(&mut web::ServiceConfig) + Send + Sync>,
}

/// Starts a single node's device actors (on their own threads, one per core, sharded by device
/// id) and resumes their running fall watches; the router to them, and their directory.
async fn start_devices(
    db: &Db,
    triage: Arc<TriageRuntime>,
    handoff: actix::Recipient<crate::actors::incident::EmergencyDetected>,
) -> (Arc<dyn DeviceRouter>, actix::Addr<DeviceDirectory>) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let arbiters: Vec<Arbiter> = (0..threads).map(|_| Arbiter::new()).collect();
    let directory = DeviceDirectory::new(
        db.clone(),
        triage,
        handoff,
        arbiters.iter().map(Arbiter::handle).collect(),
    )
    .start();
    if let Err(e) = crate::actors::device::wake_pending_falls(db, &directory, |_| true).await {
        tracing::warn!(error = %e, "running fall watches not resumed yet; they resume on each wearable's next reading");
    }
    (LocalDevices::new(directory.clone(), arbiters), directory)
}

impl Application {
    /// Opens the database, migrates it and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let db = open_database(&settings).await?;
        Self::build_with_db(settings, db).await
    }

    /// Binds the listener and builds the server over an already opened database; recovers the
    /// open incidents before serving.
    pub async fn build_with_db(settings: Settings, db: Db) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(&settings.bind)
            .with_context(|| format!("binding {}", settings.bind))?;
        Self::build_with_listener(settings, db, listener, None).await
    }

    /// Builds the server on an already bound listener (a cluster node binds its internal
    /// address at start, long before it owns anything to serve there). Standing alone
    /// (`host` is `None`), it stops on SIGINT/SIGTERM and runs its own device actors. Run by a
    /// host ([`Host`]: a cluster node holding the dispatch shard), it leaves the signals to the
    /// host, reaches the wearables through the host's router, and serves the host's routes too.
    // Long on purpose: the whole wiring of the application, in start order.
    pub async fn build_with_listener(
        settings: Settings,
        db: Db,
        listener: TcpListener,
        host: Option<Host>,
    ) -> anyhow::Result<Self> {
        let own_signals = host.is_none();
        let rules = settings.triage.rules()?;
        let port = listener.local_addr()?.port();
        let _ = prometheus();

        // Every event-store write of the hot paths (device status, unit status and location,
        // incidents) goes through one group-commit writer: one fsync per batch.
        let writer = GroupCommit::start(
            Db::connect_writer(&settings.database)
                .await
                .context("opening the writer's database connection")?,
            128,
        );
        let triage = Arc::new(TriageRuntime {
            writer: writer.clone(),
            rules,
            offline_after: Duration::from_secs(settings.triage.device_offline_s.max(1)),
            retention: settings.triage.raw_retention,
            repeat_window: settings.repeat_window(),
        });
        let routing = routing_service(&settings)?;
        let pusher = FcmClient::from_settings(&settings.push)
            .context("setting up push to crews' phones")?
            .map(|fcm| {
                CrewPusher::new(db.clone(), Arc::new(fcm))
                    .start()
                    .recipient()
            });
        if pusher.is_some() {
            tracing::info!(
                "push: offers to units without a crew session go to their phones through FCM"
            );
        }
        let fleet = Fleet::new(db.clone(), writer.clone(), routing)
            .with_pusher(pusher)
            .start();
        let units = fleet
            .send(LoadFleet)
            .await
            .context("loading the fleet")?
            .context("loading the fleet")?;
        tracing::info!(units, "fleet loaded");
        let incidents = start_incidents(&settings, &db, &writer, &fleet).await?;
        let (devices, directory): (Arc<dyn DeviceRouter>, _) = match &host {
            Some(host) => (host.devices.clone(), None),
            None => {
                let (router, directory) =
                    start_devices(&db, triage.clone(), incidents.clone().recipient()).await;
                (router, Some(directory))
            }
        };

        let notifier = NotifierActor::new(db.clone(), notification_channels(&settings)?).start();
        let broadcaster = Broadcaster::new(db.clone())
            .await
            .context("starting the event broadcaster")?
            .start();
        let (insurance_token, billing_credential) = insurance_credential(&settings)?;
        let billing =
            start_billing(&settings, &db, port, insurance_token, &fleet, &incidents).await?;
        let host_routes = host.map(|h| h.routes);

        let settings = Arc::new(settings);
        let (closing, closing_rx) = tokio::sync::watch::channel(false);
        let ingest_gate = Arc::new(tokio::sync::Semaphore::new(
            settings.triage.max_in_flight_readings.max(1),
        ));
        if own_signals {
            // Standing alone, this process is every node: it consumes the buses. Under a
            // host, the host does (on every node, whichever holds dispatch).
            crate::bus::start_ingest(
                &settings,
                crate::bus::IngestDeps {
                    devices: devices.clone(),
                    gate: ingest_gate.clone(),
                    db: db.clone(),
                    closing: closing_rx.clone(),
                    node_name: crate::bus::host_name(),
                },
            );
        }
        // The relay to the buses runs with the application: on the dispatch shard's holder in
        // a cluster, over its fenced connections.
        crate::bus::start_relay(&settings, db.clone(), closing_rx.clone());
        let state = web::Data::new(AppState {
            db: db.clone(),
            settings: settings.clone(),
            triage,
            incidents: incidents.clone(),
            fleet: fleet.clone(),
            notifier: notifier.clone(),
            broadcaster: broadcaster.clone(),
            billing: billing.clone(),
            devices,
            ingest_gate,
            closing: closing_rx,
        });
        let auth = web::Data::new(AuthService::new(
            db.clone(),
            Duration::from_secs(settings.auth.cache_ttl_s),
        ));
        let body_limit = BodyLimit(settings.http.body_limit_bytes);
        let db_data = web::Data::new(db.clone());
        let embed_insurance = settings.insurance.embedded;

        let mut server = HttpServer::new(move || {
            let mut app = App::new()
                .app_data(state.clone())
                .app_data(auth.clone())
                .app_data(body_limit)
                .app_data(db_data.clone());
            if let Some(billing) = &billing_credential {
                app = app.app_data(billing.clone());
            }
            app.configure(http::routes)
                .configure(|cfg| {
                    if let Some(routes) = &host_routes {
                        routes(cfg);
                    }
                    if embed_insurance {
                        crate::http::insurance::routes(cfg);
                    }
                })
                .default_service(web::to(http::not_found))
                .wrap(from_fn(crate::http::auth::authenticate))
                .wrap(from_fn(observe))
                // Outermost, so every log line of a request carries its span.
                .wrap(TracingLogger::<ShersRootSpan>::new())
        })
        .shutdown_timeout(settings.http.shutdown_timeout_s)
        // Offer frames, console events and small answers go out at once: with Nagle's
        // algorithm a frame written while an earlier one awaits its (delayed) ACK waits
        // up to tens of milliseconds.
        .tcp_nodelay(true);
        if let Some(workers) = settings.http.workers {
            server = server.workers(workers.max(1));
        }
        if !own_signals {
            server = server.disable_signals();
        }
        let server = server.listen(listener)?.run();
        Ok(Self {
            port,
            server,
            db,
            devices: directory,
            incidents,
            billing,
            broadcaster,
            fleet,
            closing: Arc::new(closing),
        })
    }

    /// The port actually bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The database pool.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The device directory of a server standing alone (tests drive device timers through
    /// it); `None` under a host, whose router serves the wearables.
    pub fn devices(&self) -> Option<&actix::Addr<DeviceDirectory>> {
        self.devices.as_ref()
    }

    /// The console event fan-out.
    pub fn broadcaster(&self) -> &actix::Addr<Broadcaster> {
        &self.broadcaster
    }

    /// The billing sagas.
    pub fn billing(&self) -> &actix::Addr<Billing> {
        &self.billing
    }

    /// The incident directory.
    pub fn incidents(&self) -> &actix::Addr<IncidentDirectory> {
        &self.incidents
    }

    /// The fleet (units and hospitals).
    pub fn fleet(&self) -> &actix::Addr<Fleet> {
        &self.fleet
    }

    /// Ends every long-lived session (WebSocket with 1012 "service restart", SSE streams), so
    /// a graceful stop drains only requests; call it before stopping the server through
    /// [`Application::handle`]. The returned closure may be called from anywhere, later.
    pub fn session_closer(&self) -> impl Fn() + 'static {
        let closing = self.closing.clone();
        move || {
            closing.send_replace(true);
        }
    }

    /// A handle to stop the server.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until the server is stopped (SIGINT/SIGTERM drain in-flight requests).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let served = self.server.await;
        // What runs beside the server (the buses' consumers and relay) stops with it.
        self.closing.send_replace(true);
        served
    }
}

/// Ctrl-C or SIGTERM.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs the insurance verification service alone (`shers insurance`): its routes, the probes
/// and token authentication, on the configured database.
pub async fn serve_insurance(settings: Settings) -> anyhow::Result<()> {
    let db = open_database(&settings).await?;
    let listener =
        TcpListener::bind(&settings.bind).with_context(|| format!("binding {}", settings.bind))?;
    let _ = prometheus();
    let auth = web::Data::new(AuthService::new(
        db.clone(),
        Duration::from_secs(settings.auth.cache_ttl_s),
    ));
    let db_data = web::Data::new(db);
    let body_limit = BodyLimit(settings.http.body_limit_bytes);
    tracing::info!(bind = %settings.bind, "insurance service listening");
    HttpServer::new(move || {
        App::new()
            .app_data(auth.clone())
            .app_data(db_data.clone())
            .app_data(body_limit)
            .route("/healthz", web::get().to(crate::http::ops::healthz))
            .configure(crate::http::insurance::routes)
            .default_service(web::to(http::not_found))
            .wrap(from_fn(crate::http::auth::authenticate))
            .wrap(from_fn(observe))
            .wrap(TracingLogger::<ShersRootSpan>::new())
    })
    .shutdown_timeout(settings.http.shutdown_timeout_s)
    .tcp_nodelay(true)
    .listen(listener)?
    .run()
    .await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn with_sns(topic: Option<&str>) -> Settings {
        let mut s = Settings::default();
        s.notify.sns_region = Some("eu-west-1".into());
        s.notify.sns_access_key_id = Some("AKIDEXAMPLE".into());
        s.notify.sns_secret_access_key = Some(Secret::new("secret".into()));
        s.notify.sns_topic_arn = topic.map(str::to_owned);
        s
    }

    fn with_twilio(mut s: Settings) -> Settings {
        s.notify.sms_base_url = Some("https://api.twilio.com".into());
        s.notify.sms_account_sid = Some("AC123".into());
        s.notify.sms_auth_token = Some(Secret::new("tok".into()));
        s.notify.sms_from = Some("+15550000000".into());
        s
    }

    fn providers(s: &Settings) -> anyhow::Result<(Option<&'static str>, Option<&'static str>)> {
        let c = notification_channels(s)?;
        Ok((
            c.sms.as_ref().map(|n| n.provider()),
            c.sns.as_ref().map(|n| n.provider()),
        ))
    }

    #[test]
    fn sns_is_off_by_default_and_on_with_region_and_keys() {
        shers_test_support::install_crypto();
        assert_eq!(providers(&Settings::default()).unwrap(), (None, None));
        assert!(sns_topic(&Settings::default()).is_none());
        assert_eq!(providers(&with_sns(None)).unwrap(), (Some("sns"), None));
        let topic = "arn:aws:sns:eu-west-1:123456789012:nok";
        assert_eq!(
            providers(&with_sns(Some(topic))).unwrap(),
            (None, Some("sns"))
        );
        assert_eq!(sns_topic(&with_sns(Some(topic))).as_deref(), Some(topic));
        // A topic beside Twilio: Twilio keeps the sms channel.
        assert_eq!(
            providers(&with_twilio(with_sns(Some(topic)))).unwrap(),
            (Some("twilio"), Some("sns"))
        );
    }

    #[test]
    fn twilio_and_sns_sms_together_are_refused_at_start() {
        shers_test_support::install_crypto();
        let err = providers(&with_twilio(with_sns(None)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("both configured"), "{err}");
        let mut partial = with_sns(None);
        partial.notify.sns_secret_access_key = None;
        let err = providers(&partial).unwrap_err().to_string();
        assert!(err.contains("must be set together"), "{err}");
        let mut keyless = Settings::default();
        keyless.notify.sns_topic_arn = Some("arn:aws:sns:eu-west-1:1:nok".into());
        assert!(providers(&keyless).is_err());
        assert!(sns_topic(&keyless).is_none());
    }
}
