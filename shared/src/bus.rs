//! Connecting to NATS, and requests to other services with their typed
//! errors read back from the micro-service error headers.

use std::time::Duration;

use async_nats::{Client, ConnectOptions, HeaderMap};
use bytes::Bytes;

use crate::error::{ErrorCode, ServiceError};
use crate::settings::NatsSettings;

pub const ERROR_CODE_HEADER: &str = "Nats-Service-Error-Code";
pub const ERROR_HEADER: &str = "Nats-Service-Error";

/// Connects with the service's name and credentials. Retries the first
/// connection, so services may start before the server.
pub async fn connect(settings: &NatsSettings, name: &str) -> anyhow::Result<Client> {
    let mut opts = ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .request_timeout(Some(Duration::from_millis(settings.request_timeout_ms)));
    if let (Some(user), Some(pass)) = (&settings.user, &settings.password) {
        opts = opts.user_and_password(user.clone(), pass.expose().to_owned());
    }
    let client = opts.connect(settings.url.as_str()).await?;
    Ok(client)
}

/// Sends a request and returns the reply payload, or the [`ServiceError`] the
/// responder sent in its error headers.
pub async fn request(
    client: &Client,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
) -> Result<Bytes, ServiceError> {
    let msg = client
        .request_with_headers(subject.clone(), headers, payload)
        .await
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => ServiceError::unavailable(format!(
                "no service is answering {}",
                service_of(&subject)
            )),
            async_nats::RequestErrorKind::TimedOut => ServiceError::unavailable(format!(
                "{} did not answer in time",
                service_of(&subject)
            )),
            _ => ServiceError::unavailable(format!("request failed: {e}")),
        })?;
    if let Some(err) = error_of(msg.headers.as_ref()) {
        return Err(err);
    }
    Ok(msg.payload)
}

/// The [`ServiceError`] carried in a reply's headers, if any.
pub fn error_of(headers: Option<&HeaderMap>) -> Option<ServiceError> {
    let h = headers?;
    let code = h
        .get(ERROR_CODE_HEADER)?
        .as_str()
        .parse::<usize>()
        .unwrap_or(500);
    let message = h
        .get(ERROR_HEADER)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    Some(ServiceError::new(ErrorCode::from_nats_code(code), message))
}

fn service_of(subject: &str) -> &str {
    subject.split('.').nth(1).unwrap_or(subject)
}

/// Waits until the server has processed everything this client sent before
/// (subscriptions included): a message to ourselves comes back only after
/// the server handled what preceded it on the connection. `flush` alone only
/// empties the client's buffer.
pub async fn round_trip(client: &Client) -> anyhow::Result<()> {
    use futures::StreamExt;
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await?;
    client.publish(inbox, Bytes::new()).await?;
    tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .map_err(|_| anyhow::anyhow!("the NATS server did not answer in time"))?;
    Ok(())
}
