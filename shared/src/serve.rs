//! The request loop every micro service runs.
//!
//! Each request is handled on its own task (at most `max_in_flight` at
//! once) and answered with the handler's result; a [`ServiceError`] goes back
//! in the micro-service error headers. On shutdown the loop stops taking
//! requests and lets those in flight finish under [`DRAIN_DEADLINE`].

use std::future::Future;
use std::sync::Arc;

use async_nats::service::Request;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::shutdown::DRAIN_DEADLINE;
use crate::ServiceError;

/// Serves `requests` with `handler` until `shutdown` is cancelled or the
/// stream ends, then drains.
pub async fn serve<S, H, Fut>(
    mut requests: S,
    max_in_flight: usize,
    shutdown: CancellationToken,
    handler: H,
) -> anyhow::Result<()>
where
    S: Stream<Item = Request> + Unpin,
    H: Fn(async_nats::Message) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Bytes, ServiceError>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let mut in_flight = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            req = requests.next() => {
                let Some(req) = req else { break };
                let permit = permits.clone().acquire_owned().await?;
                let handler = handler.clone();
                in_flight.spawn(async move {
                    let reply = handler(req.message.clone()).await;
                    if let Err(e) = &reply {
                        tracing::debug!(subject = %req.message.subject, code = ?e.code, message = %e.message, "request refused");
                    }
                    if let Err(e) = req.respond(reply.map_err(Into::into)).await {
                        tracing::warn!(error = %e, "reply failed");
                    }
                    drop(permit);
                });
            }
        }
    }
    tracing::info!(in_flight = in_flight.len(), "draining");
    let drain = async { while in_flight.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_DEADLINE, drain).await.is_err() {
        tracing::warn!("in-flight requests did not finish before the deadline");
    }
    Ok(())
}
