//! How a route reaches a service: one NATS request carrying the caller, and
//! the service's JSON reply (or typed error) turned into the HTTP answer.

use axum::body::Bytes;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use meterline_shared::{bus, codec, envelope};
use tracing::debug;

use crate::error::ApiError;
use crate::AppState;

/// Sends `payload` to `subject` on behalf of `actor` and returns the reply.
pub async fn request(
    app: &AppState,
    subject: String,
    actor: Option<&str>,
    payload: Bytes,
) -> Result<Bytes, ApiError> {
    let mut headers = codec::Codec::Json.headers();
    if let Some(actor) = actor {
        headers.insert(envelope::HEADER_ACTOR, actor);
    }
    bus::request(&app.inner.nats, subject.clone(), headers, payload)
        .await
        .map_err(|e| {
            debug!(%subject, code = ?e.code, reason = %e.message, "service request failed");
            ApiError::from(e)
        })
}

/// A service's JSON reply as a 200 response.
pub fn json(bytes: Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
        .into_response()
}
