//! The command line: `serve`, `migrate`, `token create|list|revoke`, `demo`.
//!
//! Configuration precedence: built-in defaults → `--config` TOML → environment → flags.

use std::path::PathBuf;

use anyhow::Context as _;
use chrono::Utc;
use clap::{Args, Parser, Subcommand};

use crate::app::{Application, open_database};
use crate::config::Settings;
use crate::domain::auth::{Role, validate_new_token};
use crate::domain::ids::{PatientId, TokenId, UnitId};
use crate::http::telemetry::{init_tracing, init_tracing_with_default};
use crate::persistence::{Db, migrations, tokens};

/// SHERS: Smart Healthcare Emergency Response System.
///
/// Emergency medical dispatch backend: wearable vitals in, triage, incidents, ambulance
/// dispatch, next-of-kin notification and billing out.
#[derive(Debug, Parser)]
#[command(name = "shers", version, propagate_version = true)]
pub struct Cli {
    /// TOML configuration file (keys as in the README's configuration reference).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Database URL (`sqlite://path` or `postgres://…`); overrides DATABASE_URL and the file.
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// What to run.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (migrations are applied at start).
    Serve(ServeArgs),
    /// Apply pending database migrations and exit.
    Migrate(MigrateArgs),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Run the living demo city on an embedded SQLite database; prints the URL and tokens.
    Demo(DemoArgs),
    /// Run the insurance verification service alone (`/insurance/v1`).
    Insurance(ServeArgs),
    /// Measure a running SHERS under load (ingest, detect-to-offer, accept-race, fanout).
    Loadgen(Box<crate::sim::loadgen::LoadgenArgs>),
    /// Crash-point drills.
    #[command(subcommand)]
    Fault(FaultCommand),
    /// Serve a stand-in Google Routes / OSRM router that answers after a fixed delay
    /// (benchmarks only: `scripts/routing-bench.sh`).
    FakeRouting(crate::sim::fake_routing::FakeRoutingArgs),
}

/// `fault` subcommands.
#[derive(Debug, Subcommand)]
pub enum FaultCommand {
    /// Print every crash point, one bare name per line (`#` lines are comments): first those
    /// a plain emergency reaches, in order, then the rest.
    Points,
}

/// Options of `demo`: the server's and the simulation's.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Server options.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Simulation options.
    #[command(flatten)]
    pub sim: crate::sim::demo::DemoOptions,
}

/// Options of `serve` and `demo`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (overrides SHERS_BIND).
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<String>,
    /// Expose the admin crash endpoint for resilience drills (never in production).
    #[arg(long)]
    pub enable_fault_injection: bool,
}

/// Options of `migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Revert every migration instead (destroys all data; for development).
    #[arg(long)]
    pub revert_all: bool,
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; the token is printed as the last line of stdout (shown once).
    Create {
        /// Role: admin, console, crew, gateway or patient.
        #[arg(long, value_name = "ROLE")]
        role: Role,
        /// Unit a crew token acts for (required for crew).
        #[arg(long, value_name = "ID")]
        unit: Option<String>,
        /// Patient a patient token acts for (required for patient).
        #[arg(long, value_name = "ID")]
        patient: Option<String>,
        /// A label for people, e.g. the console desk or gateway site.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id (running servers stop accepting it within auth.cache_ttl_s).
    Revoke {
        /// The token id shown by `token list`.
        id: TokenId,
    },
}

/// The SQLite file `demo` uses unless `--database-url` says otherwise.
pub const DEMO_DATABASE_URL: &str = "sqlite://data/shers-demo.db";

/// The `token create` option a problem pointer of [`validate_new_token`] stands for.
fn cli_option(pointer: &str) -> &str {
    match pointer {
        "/unit_id" => "--unit",
        "/patient_id" => "--patient",
        "/name" => "--name",
        other => other,
    }
}

fn settings(cli: &Cli, bind: Option<String>) -> anyhow::Result<Settings> {
    Ok(Settings::load(cli.config.as_deref())?.with_overrides(bind, cli.database_url.clone()))
}

/// `shers demo`: the server on the demo database with the simulated city.
///
/// The banner (dashboard URL and tokens) is printed at start, again once the city is seeded
/// (so it is the last thing on screen when the first ambulance goes out) and whenever Enter
/// is pressed. Request logs are kept off the screen unless `RUST_LOG` asks for them. Ctrl-C
/// or SIGTERM stops the simulators first, then the server, so the drain is not held open by
/// simulated crews still talking to it.
async fn demo(
    cli: &Cli,
    args: &ServeArgs,
    sim: &crate::sim::demo::DemoOptions,
) -> anyhow::Result<()> {
    let mut settings = settings(cli, args.bind.clone())?;
    settings.admin.enable_fault_injection |= args.enable_fault_injection;
    crate::sim::demo::scale_settings(&mut settings, sim.time_scale);
    if cli.database_url.is_none() {
        settings.database.url = crate::config::Secret::new(DEMO_DATABASE_URL.to_owned());
    }
    // The demo never moves real money: the labelled sandbox provider.
    settings.payments.provider = crate::config::PaymentProvider::Sandbox;
    init_tracing_with_default(
        settings.log.format,
        &format!("info,{}=warn", crate::http::telemetry::ACCESS_LOG),
    );
    let db = open_database(&settings).await?;
    let now = Utc::now();
    let mut conn = db.conn().await?;
    let console = tokens::create(&mut conn, Role::Console, None, None, "demo console", now).await?;
    let admin = tokens::create(&mut conn, Role::Admin, None, None, "demo admin", now).await?;
    drop(conn);
    let app = Application::build_with_db(settings, db).await?;
    let port = app.port();
    let banner = format!(
        "SHERS demo is running.\n\
         dashboard: http://127.0.0.1:{port}/\n\
         api docs: http://127.0.0.1:{port}/api/openapi.json\n\
         console token: {}\n\
         admin token: {}\n\
         Press Enter to show this again, Ctrl-C to stop.",
        console.token, admin.token
    );
    println!("{banner}");
    let handle = app.handle();
    let db = app.db().clone();
    let base_url = format!("http://127.0.0.1:{port}");
    let server = app.run_until_stopped();
    tokio::pin!(server);
    let simulation = async {
        if sim.no_simulation {
            std::future::pending::<anyhow::Result<()>>().await
        } else {
            crate::sim::demo::run(&base_url, &admin.token, sim, || println!("{banner}")).await
        }
    };
    let deadline = async {
        match sim.duration {
            Some(s) => tokio::time::sleep(std::time::Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    let banner_on_enter = async {
        use tokio::io::AsyncBufReadExt as _;
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(_)) = lines.next_line().await {
            println!("{banner}");
        }
        // No terminal (stdin closed): nothing more to wait for here.
        std::future::pending::<()>().await
    };
    tokio::select! {
        r = &mut server => {
            r?;
            return crate::sim::demo::print_summary(&db).await;
        }
        r = simulation => {
            if let Err(e) = r {
                tracing::error!(error = %e, "demo simulation stopped");
            }
        }
        () = deadline => {}
        () = crate::app::stop_signal() => {}
        () = banner_on_enter => {}
    }
    // The simulators are dropped by now; the server future handles the stop command, so
    // poll both together.
    let ((), served) = tokio::join!(handle.stop(true), &mut server);
    served?;
    crate::sim::demo::print_summary(&db).await
}

/// Arms `[fault] crash_at` when `serve` runs with `--enable-fault-injection`; an unknown
/// point stops the server before it starts.
fn arm_crash_point(settings: &Settings) -> anyhow::Result<()> {
    let Some(name) = settings.fault.crash_at.as_deref() else {
        return Ok(());
    };
    if !settings.admin.enable_fault_injection {
        tracing::warn!(
            fault.crash_at = name,
            "fault.crash_at is ignored without --enable-fault-injection"
        );
        return Ok(());
    }
    let point = crate::fault::arm(name)?;
    tracing::warn!(fault.crash_at = point, "fault injection: crash point armed");
    Ok(())
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    match &cli.command {
        Command::Serve(args) => {
            let mut settings = settings(&cli, args.bind.clone())?;
            settings.admin.enable_fault_injection |= args.enable_fault_injection;
            init_tracing(settings.log.format);
            arm_crash_point(&settings)?;
            tracing::info!(bind = %settings.bind, "starting SHERS");
            if settings.clustered() {
                crate::cluster::serve(settings).await?;
            } else {
                if settings.redis.url.is_some() {
                    tracing::warn!("REDIS_URL is ignored on SQLite: one node holds every shard");
                }
                let app = Application::build(settings).await?;
                app.run_until_stopped().await?;
            }
            tracing::info!("stopped");
        }
        Command::Demo(DemoArgs { serve: args, sim }) => demo(&cli, args, sim).await?,
        Command::Insurance(args) => {
            let settings = settings(&cli, args.bind.clone())?;
            init_tracing(settings.log.format);
            crate::app::serve_insurance(settings).await?;
        }
        Command::Fault(FaultCommand::Points) => print!("{}", crate::fault::listing()),
        Command::Loadgen(args) => {
            init_tracing(crate::config::LogFormat::Text);
            crate::sim::loadgen::run((**args).clone()).await?;
        }
        Command::FakeRouting(args) => {
            init_tracing(crate::config::LogFormat::Text);
            crate::sim::fake_routing::run(args.clone()).await?;
        }
        Command::Migrate(args) => {
            let settings = settings(&cli, None)?;
            init_tracing(settings.log.format);
            let db = Db::connect(&settings.database).await?;
            let url = settings.database.url.expose();
            if args.revert_all {
                let n = migrations::revert_all(&db, url).await?;
                println!("reverted {n} migration(s)");
            } else {
                let n = migrations::run_pending(&db, url).await?;
                println!(
                    "applied {n} migration(s); the {:?} schema is up to date",
                    db.backend()
                );
            }
        }
        Command::Token(command) => {
            let settings = settings(&cli, None)?;
            init_tracing(settings.log.format);
            let db = open_database(&settings).await?;
            let mut conn = db.conn().await?;
            match command {
                TokenCommand::Create {
                    role,
                    unit,
                    patient,
                    name,
                } => {
                    let unit = unit.as_deref().map(UnitId::from);
                    let patient = patient.as_deref().map(PatientId::from);
                    let name = name.clone().unwrap_or_else(|| format!("{role} token"));
                    let name = validate_new_token(*role, unit.as_ref(), patient.as_ref(), &name)
                        .map_err(|errors| {
                            let problems: Vec<String> = errors
                                .iter()
                                .map(|e| format!("{}: {}", cli_option(&e.pointer), e.message))
                                .collect();
                            anyhow::anyhow!("{}", problems.join("; "))
                        })?;
                    let created = tokens::create(
                        &mut conn,
                        *role,
                        unit.as_ref(),
                        patient.as_ref(),
                        &name,
                        Utc::now(),
                    )
                    .await
                    .context("storing the token")?;
                    println!("created {role} token {} ({name})", created.record.id);
                    println!("{}", created.token);
                }
                TokenCommand::List => {
                    for t in tokens::list(&mut conn).await? {
                        let binding = t
                            .unit_id
                            .as_ref()
                            .map(|u| format!("unit={u}"))
                            .or_else(|| t.patient_id.as_ref().map(|p| format!("patient={p}")))
                            .unwrap_or_default();
                        let state = t.revoked_at.map_or("active".to_owned(), |at| {
                            format!("revoked {}", at.to_rfc3339())
                        });
                        println!(
                            "{}\t{}\t{}\t{}\t{}\t{}",
                            t.id,
                            t.role,
                            binding,
                            t.name,
                            t.created_at.to_rfc3339(),
                            state
                        );
                    }
                }
                TokenCommand::Revoke { id } => {
                    tokens::revoke(&mut conn, *id, Utc::now())
                        .await
                        .with_context(|| format!("revoking token {id}"))?;
                    println!("revoked token {id}");
                }
            }
        }
    }
    Ok(())
}
