//! `meterline-admin`: operator commands over the bus.
//!
//! `meterline-admin bootstrap --org dev --org-name "Dev" --service-user cli`
//! creates the organization if missing, a service user and an access key,
//! and prints them as shell assignments.

use clap::{Parser, Subcommand};
use meterline_shared::settings::{self, NatsSettings};
use meterline_shared::{bus, telemetry};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
#[command(
    name = "meterline-admin",
    about = "Operator commands for Meterline, over NATS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an organization (if missing), a service user and an access
    /// key; print `METERLINE_ORG`, `METERLINE_KEY` and `METERLINE_SECRET`.
    Bootstrap {
        /// The organization id (a subject-safe token).
        #[arg(long)]
        org: String,
        /// The organization's display name.
        #[arg(long, default_value = "Organization")]
        org_name: String,
        /// The service user's name.
        #[arg(long, default_value = "api")]
        service_user: String,
    },
}

#[derive(Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct AdminSettings {
    nats: NatsSettings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init("admin");
    let cli = Cli::parse();
    let s: AdminSettings = settings::load("ADMIN")?;
    let client = bus::connect(&s.nats, "meterline-admin").await?;
    match cli.command {
        Command::Bootstrap {
            org,
            org_name,
            service_user,
        } => {
            let c = meterline_entities::bootstrap(&client, &org, &org_name, &service_user)
                .await
                .map_err(|e| anyhow::anyhow!("bootstrap failed: {}", e.message))?;
            println!("METERLINE_ORG={}", c.org_id);
            println!("METERLINE_SERVICE_USER={}", c.service_user_id);
            println!("METERLINE_KEY={}", c.access_key);
            println!("METERLINE_SECRET={}", c.secret);
        }
    }
    client.flush().await?;
    Ok(())
}
