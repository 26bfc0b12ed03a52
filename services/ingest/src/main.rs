use meterline_ingest::{App, Settings};
use meterline_shared::{settings, shutdown, telemetry};

// mimalloc: the services allocate many small, short-lived values per
// request; it measurably beats the system allocator here (see `make bench`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init("ingest");
    let settings: Settings = settings::load("INGEST")?;
    tracing::info!(?settings, "starting ingest");
    let shutdown = shutdown::on_signals();
    let app = App::build(settings).await?;
    app.run_until_stopped(shutdown).await
}
