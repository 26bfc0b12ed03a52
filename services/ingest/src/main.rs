use meterline_ingest::{App, Settings};
use meterline_shared::{settings, shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init("ingest");
    let settings: Settings = settings::load("INGEST")?;
    tracing::info!(?settings, "starting ingest");
    let shutdown = shutdown::on_signals();
    let app = App::build(settings).await?;
    app.run_until_stopped(shutdown).await
}
