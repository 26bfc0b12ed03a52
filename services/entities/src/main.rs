use meterline_entities::{App, Settings};
use meterline_shared::{settings, shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init("entities");
    let settings: Settings = settings::load("ENTITIES")?;
    tracing::info!(?settings, "starting entities");
    let shutdown = shutdown::on_signals();
    let app = App::build(settings).await?;
    app.run_until_stopped(shutdown).await
}
