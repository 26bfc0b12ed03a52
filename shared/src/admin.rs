//! The small admin HTTP port every service has: `/healthz` (the process is
//! up), `/readyz` (it is connected to NATS and serving) and Prometheus
//! `/metrics`.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::{extract::State, http::StatusCode, routing::get, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process-wide Prometheus recorder (installed on first use).
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .as_ref()
}

/// Readiness: true while the service can do its work.
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// Readiness that follows a NATS client's connection state.
pub fn nats_readiness(client: async_nats::Client) -> Readiness {
    Arc::new(move || client.connection_state() == async_nats::connection::State::Connected)
}

pub fn router(ready: Readiness) -> Router {
    prometheus();
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(ready): State<Readiness>| async move {
                if ready() {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .route(
            "/metrics",
            get(|| async { prometheus().map(|h| h.render()).unwrap_or_default() }),
        )
        .with_state(ready)
}

/// Binds the admin port (port 0 picks a free one) and serves it until
/// `shutdown` is cancelled. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    ready: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = router(ready);
    let handle = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((local, handle))
}
