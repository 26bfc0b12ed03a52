//! Graceful shutdown: one [`CancellationToken`] per process, cancelled by the
//! first SIGINT or SIGTERM. Services stop taking work, finish what is in
//! flight under a deadline, drain their NATS client and exit. A second signal
//! exits at once.

use std::time::Duration;

pub use tokio_util::sync::CancellationToken;

/// How long in-flight work may take after a shutdown signal.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// A token cancelled on the first signal; the second signal exits the process.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; draining (signal again to exit now)");
        t.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal; exiting now");
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
