//! The living demo: a seeded city, simulated wearables and simulated crews.
//!
//! [`run`] registers Edinburgh ([`super::city`]) through the API with an admin token, then
//! starts one task for the wearable gateway ([`super::wearables`]) and one per ambulance crew
//! ([`super::crews`]). They talk to the server only through its public HTTP and WebSocket
//! API, at `--time-scale` times real speed; [`scale_settings`] shortens the server's own
//! timers to match. With the defaults someone gets into trouble about once a simulated minute
//! and a job takes about ten simulated minutes from alarm to closed invoice.

use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use tokio::task::JoinSet;

use super::city::{self, City, HospitalSpec};
use super::client::Api;
use super::clock::Clock;
use super::crews::Crew;
use super::rng::SimRng;
use super::wearables::Wearables;
use crate::config::Settings;
use crate::persistence::{Db, StoreError, incidents, invoices};

/// Options of the demo simulation (`shers demo`).
#[derive(Debug, Clone, Args)]
pub struct DemoOptions {
    /// Speed-up factor for simulated time (1 = real time, 20 = a simulated minute every 3 s).
    #[arg(long, default_value_t = 1.0, value_parser = parse_time_scale)]
    pub time_scale: f64,
    /// Stop after this many (wall-clock) seconds; run until Ctrl-C when absent.
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<u64>,
    /// Do not start the simulators (an empty server with tokens only).
    #[arg(long)]
    pub no_simulation: bool,
    /// Wearers in the city (each with a device, next of kin and maybe insurance).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u16).range(1..=5000))]
    pub patients: u16,
    /// How many wearers get into trouble per simulated hour, city-wide (falls that stand down
    /// included, so slightly fewer incidents).
    #[arg(long, default_value_t = 60.0, value_parser = parse_rate)]
    pub incidents_per_hour: f64,
    /// Seed of the simulation's dice (the city itself is always the same); random when absent.
    #[arg(long)]
    pub seed: Option<u64>,
}

fn parse_time_scale(s: &str) -> Result<f64, String> {
    let x: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if x.is_finite() && (0.05..=1000.0).contains(&x) {
        Ok(x)
    } else {
        Err("must be between 0.05 and 1000".to_owned())
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let x: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if x.is_finite() && (0.1..=3600.0).contains(&x) {
        Ok(x)
    } else {
        Err("must be between 0.1 and 3600".to_owned())
    }
}

/// Seeds the city through the API at `base_url` (with an admin token), calls `seeded`, and runs
/// the simulators. Runs until dropped (every task it starts is aborted with it) or until a
/// simulator fails.
pub async fn run(
    base_url: &str,
    admin_token: &str,
    options: &DemoOptions,
    seeded: impl FnOnce(),
) -> anyhow::Result<()> {
    let clock = Clock::new(options.time_scale)?;
    let admin = Api::new(base_url, admin_token)?;
    let city = City::edinburgh(usize::from(options.patients));
    let registered = city::seed(&admin, &city)
        .await
        .context("seeding the demo city")?;
    tracing::info!(
        hospitals = city.hospitals.len(),
        units = city.units.len(),
        patients = city.wearers.len(),
        created = registered.created,
        time_scale = clock.scale(),
        "demo city seeded (Edinburgh); wearables and crews running"
    );
    seeded();
    let mut rng = options.seed.map_or_else(SimRng::from_entropy, SimRng::new);
    let hospitals: Arc<[HospitalSpec]> = city.hospitals.into();
    // Owned by this future: dropping it aborts every simulator.
    let mut tasks = JoinSet::new();
    for (unit, token) in city.units.into_iter().zip(&registered.crew_tokens) {
        let crew = Crew::new(
            admin.with_token(token),
            admin.clone(),
            unit,
            hospitals.clone(),
            clock,
            rng.fork(),
        );
        tasks.spawn(crew.run());
    }
    let wearables = Wearables::new(
        admin.with_token(&registered.gateway_token),
        admin.clone(),
        clock,
        rng.fork(),
        city.wearers,
        options.incidents_per_hour,
    );
    tasks.spawn(wearables.run());
    // The simulators run until dropped: one that returns has failed.
    match tasks.join_next().await {
        Some(Ok(Ok(()))) | None => anyhow::bail!("a demo simulator stopped"),
        Some(Ok(Err(e))) => Err(e.context("a demo simulator failed")),
        Some(Err(e)) => anyhow::bail!("a demo simulator panicked: {e}"),
    }
}

/// Fits the server's own timers to the demo's time scale, so sped-up (or slowed-down) people
/// still meet them: offer expiry (a crew answers within a few simulated seconds) and the fall
/// grace window (the configured one, else the rules file's, else 60 s) are divided by the
/// scale. The device offline timeout is only ever lengthened: sped up, the wearables already
/// report more often in wall-clock time, so the configured silence still means a dead device;
/// slowed down, it is stretched so slow-motion readings do not look like silence.
pub fn scale_settings(settings: &mut Settings, time_scale: f64) {
    if !time_scale.is_finite() || time_scale <= 0.0 || time_scale == 1.0 {
        return;
    }
    let scale = |s: u64| ((s as f64 / time_scale).ceil() as u64).max(1);
    settings.dispatch.offer_ttl_s = scale(settings.dispatch.offer_ttl_s);
    let grace = settings
        .triage
        .fall_grace_s
        .or_else(|| settings.triage.rules().ok().map(|rules| rules.fall_grace_s));
    if let Some(grace) = grace {
        // The rules allow 1 s to an hour.
        settings.triage.fall_grace_s = Some(scale(grace).min(3600));
    }
    settings.triage.device_offline_s = settings
        .triage
        .device_offline_s
        .max(scale(settings.triage.device_offline_s));
}

/// Prints what the demo did: incidents by status and invoices by status, from the database,
/// as one stable line (`demo summary: incidents created=… closed=… cancelled=… open=…;
/// invoices paid=… failed=… voided=… in_progress=…`).
pub async fn print_summary(db: &Db) -> anyhow::Result<()> {
    discard_idle_connections(db);
    let (by_incident, by_invoice) = db
        .run(|mut conn| async move {
            let i = incidents::count_by_status(&mut conn).await?;
            let v = invoices::count_by_status(&mut conn).await?;
            Ok::<_, StoreError>((i, v))
        })
        .await
        .context("reading the demo summary")?;
    println!("{}", summary_line(&by_incident, &by_invoice));
    Ok(())
}

/// Pooled connections opened by HTTP worker threads belong to those workers' runtimes, which
/// stopped with the server: such a connection cannot run another query. Dropping the idle ones
/// makes the summary open fresh connections on this thread.
fn discard_idle_connections(db: &Db) {
    match db {
        Db::Sqlite(pool) => {
            pool.retain(|_, _| false);
        }
        Db::Postgres(pool) => {
            pool.retain(|_, _| false);
        }
    }
}

fn summary_line(by_incident: &[(String, i64)], by_invoice: &[(String, i64)]) -> String {
    let count = |rows: &[(String, i64)], status: &str| -> i64 {
        rows.iter()
            .filter(|(s, _)| s == status)
            .map(|(_, n)| n)
            .sum()
    };
    let total = |rows: &[(String, i64)]| -> i64 { rows.iter().map(|(_, n)| n).sum() };
    let created = total(by_incident);
    let closed = count(by_incident, "closed");
    let cancelled = count(by_incident, "cancelled");
    let paid = count(by_invoice, "paid");
    let failed = count(by_invoice, "failed");
    let voided = count(by_invoice, "voided");
    let in_progress = total(by_invoice) - paid - failed - voided;
    format!(
        "demo summary: incidents created={created} closed={closed} cancelled={cancelled} open={}; \
         invoices paid={paid} failed={failed} voided={voided} in_progress={in_progress}",
        created - closed - cancelled
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn summary_line_is_stable() {
        let rows = |r: &[(&str, i64)]| -> Vec<(String, i64)> {
            r.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect()
        };
        let line = summary_line(
            &rows(&[
                ("billing", 1),
                ("cancelled", 1),
                ("closed", 9),
                ("enroute", 2),
            ]),
            &rows(&[("failed", 1), ("insurance_verified", 1), ("paid", 7)]),
        );
        assert_eq!(
            line,
            "demo summary: incidents created=13 closed=9 cancelled=1 open=3; \
             invoices paid=7 failed=1 voided=0 in_progress=1"
        );
        assert_eq!(
            summary_line(&[], &[]),
            "demo summary: incidents created=0 closed=0 cancelled=0 open=0; \
             invoices paid=0 failed=0 voided=0 in_progress=0"
        );
    }

    #[test]
    fn server_timers_follow_the_time_scale() {
        let mut s = Settings::default();
        scale_settings(&mut s, 20.0);
        assert_eq!(s.dispatch.offer_ttl_s, 2);
        assert_eq!(s.triage.fall_grace_s, Some(3));
        assert_eq!(s.triage.device_offline_s, 300);
        let mut s = Settings::default();
        scale_settings(&mut s, 0.5);
        assert_eq!(s.dispatch.offer_ttl_s, 60);
        assert_eq!(s.triage.fall_grace_s, Some(120));
        assert_eq!(s.triage.device_offline_s, 600);
        let mut s = Settings::default();
        scale_settings(&mut s, 1.0);
        assert_eq!(s.dispatch.offer_ttl_s, 30);
        assert_eq!(s.triage.fall_grace_s, None);
    }
}
