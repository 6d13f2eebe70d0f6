//! The living demo: a seeded city, simulated wearables and simulated crews.

use clap::Args;

/// Options of the demo simulation (`shers demo`).
#[derive(Debug, Clone, Args)]
pub struct DemoOptions {
    /// Speed-up factor for simulated time (1 = real time).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Stop after this many (wall-clock) seconds; run until Ctrl-C when absent.
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<u64>,
    /// Do not start the simulators (an empty server with tokens only).
    #[arg(long)]
    pub no_simulation: bool,
}

/// Seeds the city through the API at `base_url` (with an admin token) and runs the simulators.
/// Runs until dropped (every task it starts is aborted with it) or until a simulator fails.
pub async fn run(
    _base_url: &str,
    _admin_token: &str,
    _options: &DemoOptions,
) -> anyhow::Result<()> {
    anyhow::bail!("the demo simulation is not built yet")
}

/// Shortens the server's own timers (offer expiry, fall grace) by the demo's time scale, so a
/// sped-up crew still answers inside the offer window.
pub fn scale_settings(settings: &mut crate::config::Settings, time_scale: f64) {
    if time_scale <= 1.0 {
        return;
    }
    let scale = |s: u64| ((s as f64 / time_scale).ceil() as u64).max(1);
    settings.dispatch.offer_ttl_s = scale(settings.dispatch.offer_ttl_s);
    if let Some(grace) = settings.triage.fall_grace_s {
        settings.triage.fall_grace_s = Some(scale(grace));
    }
}

/// Prints what the demo did: incidents by status and invoices by status, from the database.
pub async fn print_summary(_db: &crate::persistence::Db) -> anyhow::Result<()> {
    Ok(())
}
