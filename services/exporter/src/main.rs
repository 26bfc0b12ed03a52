use meterline_exporter::{App, Settings};
use meterline_shared::{settings, shutdown, telemetry};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init("exporter");
    let settings: Settings = settings::load("EXPORTER")?;
    tracing::info!(?settings, "starting exporter");
    let shutdown = shutdown::on_signals();
    let app = App::build(settings).await?;
    app.run_until_stopped(shutdown).await
}
