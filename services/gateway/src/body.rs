//! Reading request bodies under the size limit.
//!
//! A body over the limit gets a 413, and the client must be able to read it.
//! If the server answered and closed while the client was still sending, the
//! client's TCP stack would see a reset and could lose the response (the
//! problem nginx's "lingering close" solves). So the rest of an over-limit
//! body is read and thrown away, within a bound on bytes and time, before
//! the 413 goes out; a body beyond that bound is cut off.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRef, FromRequest, Request};
use axum::http::{header, HeaderMap};
use bytes::BytesMut;
use futures::StreamExt;
use meterline_shared::ErrorCode;

use crate::error::ApiError;
use crate::AppState;

/// The most of an over-limit body that is read and discarded.
const DRAIN_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// How long discarding an over-limit body may take.
const DRAIN_MAX_TIME: Duration = Duration::from_secs(5);

/// A request body read whole under the gateway's `body_limit_bytes`.
#[derive(Debug, Clone)]
pub struct LimitedBody(pub Bytes);

impl<S> FromRequest<S> for LimitedBody
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = AppState::from_ref(state).inner.body_limit;
        let content_length = content_length(req.headers());
        read(req.into_body(), limit, content_length)
            .await
            .map(LimitedBody)
    }
}

/// The request's `Content-Length`, if it has a valid one.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Reads and throws away a body the gateway refuses without reading (a
/// rate-limited request, say), within the same bounds as an over-limit
/// body, so the client can read the refusal.
pub async fn discard(body: Body, content_length: Option<u64>) {
    if content_length.is_some_and(|n| n > DRAIN_MAX_BYTES) {
        return;
    }
    drain(body.into_data_stream()).await;
}

/// The whole body, or 413 when it is larger than `limit` bytes.
pub async fn read(
    body: Body,
    limit: usize,
    content_length: Option<u64>,
) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    if content_length.is_some_and(|n| n > limit as u64) {
        if content_length.is_some_and(|n| n <= DRAIN_MAX_BYTES) {
            drain(stream).await;
        }
        return Err(too_large(limit));
    }
    // A body that arrives in one chunk is used as it is; one in several is
    // copied once, into a buffer of its announced length.
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut read = 0;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("cannot read request body: {e}")))?;
        read += chunk.len();
        if read > limit {
            drain(stream).await;
            return Err(too_large(limit));
        }
        if let Some(head) = first.take() {
            let expected = content_length.map_or(0, |n| n as usize);
            buf.reserve(expected.max(read).min(limit));
            buf.extend_from_slice(&head);
            buf.extend_from_slice(&chunk);
        } else if buf.is_empty() {
            first = Some(chunk);
        } else {
            buf.extend_from_slice(&chunk);
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("request body is larger than the gateway accepts ({limit} bytes)"),
    )
}

async fn drain(mut stream: axum::body::BodyDataStream) {
    let _ = tokio::time::timeout(DRAIN_MAX_TIME, async {
        let mut seen = 0u64;
        while let Some(Ok(chunk)) = stream.next().await {
            seen += chunk.len() as u64;
            if seen > DRAIN_MAX_BYTES {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_up_to_the_limit_are_read_and_larger_ones_refused() {
        let ok = read(Body::from("x".repeat(10)), 10, None).await.unwrap();
        assert_eq!(ok.len(), 10);
        let err = read(Body::from("x".repeat(11)), 10, None)
            .await
            .unwrap_err();
        assert_eq!(err.status(), 413);
        let chunks = futures::stream::iter(
            ["ab", "", "cde", "fgh"].map(|c| Ok::<_, std::io::Error>(Bytes::from(c))),
        );
        let whole = read(Body::from_stream(chunks), 10, Some(8)).await.unwrap();
        assert_eq!(&whole[..], b"abcdefgh");
        let chunks = futures::stream::iter(
            ["abcdef", "ghijk"].map(|c| Ok::<_, std::io::Error>(Bytes::from(c))),
        );
        let err = read(Body::from_stream(chunks), 10, None).await.unwrap_err();
        assert_eq!(err.status(), 413);
        let err = read(Body::from("x"), 10, Some(1_000_000))
            .await
            .unwrap_err();
        assert_eq!(err.status(), 413);
    }
}
