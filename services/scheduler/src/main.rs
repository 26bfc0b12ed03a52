use meterline_scheduler::{App, Settings};
use meterline_shared::{settings, shutdown, telemetry};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init("scheduler");
    let settings: Settings = settings::load("SCHEDULER")?;
    tracing::info!(?settings, "starting scheduler");
    let shutdown = shutdown::on_signals();
    let app = App::build(settings).await?;
    app.run_until_stopped(shutdown).await
}
