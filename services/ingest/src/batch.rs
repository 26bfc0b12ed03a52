//! Atomic batch publishing (JetStream, nats-server 2.12+): every message of
//! a batch is stored, or none is.
//!
//! Messages carry `Nats-Batch-Id` and `Nats-Batch-Sequence`; the last one
//! also `Nats-Batch-Commit: 1` and is answered with the batch's ack. Header
//! checks such as `Nats-Expected-Last-Subject-Sequence` are evaluated at the
//! commit, so a batch can be made conditional on the state of a subject.

use std::time::Duration;

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use serde::Deserialize;

/// The JetStream error code of a failed `Nats-Expected-Last-Subject-Sequence`.
pub const WRONG_LAST_SEQUENCE: u64 = 10071;

/// One message of a batch.
pub struct Outgoing {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

#[derive(Debug, Deserialize)]
pub struct BatchAck {
    pub stream: String,
    /// Sequence of the last (commit) message.
    #[serde(rename = "seq")]
    pub sequence: u64,
    #[serde(rename = "count", default)]
    pub count: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ApiError {
    #[serde(default)]
    pub code: u64,
    #[serde(default)]
    pub err_code: u64,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("batch refused: {} (code {})", .0.description, .0.err_code)]
    Refused(ApiError),
    #[error("batch publish failed: {0}")]
    Transport(String),
}

impl BatchError {
    pub fn is_wrong_last_sequence(&self) -> bool {
        matches!(self, BatchError::Refused(e) if e.err_code == WRONG_LAST_SEQUENCE)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Reply {
    Err { error: ApiError },
    Ack(BatchAck),
}

fn parse_error(payload: &[u8]) -> Option<ApiError> {
    match serde_json::from_slice::<Reply>(payload) {
        Ok(Reply::Err { error }) => Some(error),
        _ => None,
    }
}

/// Publishes `messages` (at least one) as one atomic batch and returns the
/// commit's ack.
pub async fn publish(
    client: &Client,
    messages: Vec<Outgoing>,
    timeout: Duration,
) -> Result<BatchAck, BatchError> {
    let n = messages.len();
    let id = uuid::Uuid::new_v4().simple().to_string();
    for (i, mut m) in messages.into_iter().enumerate() {
        let seq = i + 1;
        m.headers.insert("Nats-Batch-Id", id.as_str());
        m.headers
            .insert("Nats-Batch-Sequence", seq.to_string().as_str());
        let last = seq == n;
        if last {
            m.headers.insert("Nats-Batch-Commit", "1");
        }
        if last {
            // Only the commit is a request: a message of the batch the
            // server refused (atomic publish not enabled, say) abandons the
            // batch, and the commit's reply says so.
            let reply = tokio::time::timeout(
                timeout,
                client.request_with_headers(m.subject, m.headers, m.payload),
            )
            .await
            .map_err(|_| BatchError::Transport("no ack in time".into()))?
            .map_err(|e| BatchError::Transport(e.to_string()))?;
            if let Some(err) = parse_error(&reply.payload) {
                return Err(BatchError::Refused(err));
            }
            return match serde_json::from_slice::<Reply>(&reply.payload) {
                Ok(Reply::Ack(ack)) if ack.count == n as u64 || ack.count == 0 => Ok(ack),
                Ok(Reply::Ack(ack)) => Err(BatchError::Transport(format!(
                    "ack counts {} messages, sent {n}",
                    ack.count
                ))),
                _ => Err(BatchError::Transport("unreadable batch ack".into())),
            };
        } else {
            client
                .publish_with_headers(m.subject, m.headers, m.payload)
                .await
                .map_err(|e| BatchError::Transport(e.to_string()))?;
        }
    }
    Err(BatchError::Transport("empty batch".into()))
}
