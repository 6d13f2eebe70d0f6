//! `shers loadgen`: load scenarios against a running SHERS.

use clap::Args;

/// Options of `shers loadgen`.
#[derive(Debug, Clone, Args)]
pub struct LoadgenArgs {
    /// Base URL of the SHERS server, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    pub url: String,
    /// An admin token.
    #[arg(long)]
    pub token: String,
}

/// Runs the chosen scenario and prints its summary.
pub async fn run(_args: LoadgenArgs) -> anyhow::Result<()> {
    anyhow::bail!("loadgen is not built yet")
}
