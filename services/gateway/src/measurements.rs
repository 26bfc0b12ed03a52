//! `POST /organizations/{orgId}/measurements`: m3ter's Submit Measurements.
//!
//! The gateway checks only what an edge must: the bearer token (in the
//! middleware), the rate limits, the body size (m3ter's limit: under
//! 512,000 bytes) and that the body is JSON at all. The body then goes to the
//! ingest service unchanged, as one request on `svc.ingest.<org>.submit`;
//! validating the batch, de-duplicating uids and storing measurements is
//! ingest's work. Its reply (`{"result": "accepted", "accepted": n,
//! "duplicates": n, "rejected": n, "errors": [...]}`) is returned as is.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;
use meterline_shared::subjects;
use serde::de::IgnoredAny;
use tracing::{instrument, Span};

use crate::auth::Caller;
use crate::body;
use crate::error::ApiError;
use crate::forward;
use crate::AppState;

/// The route, as m3ter names it.
pub const PATH: &str = "/organizations/{orgId}/measurements";

/// Checks that `body` is one JSON document, without building it.
fn check_json(body: &Bytes) -> Result<(), ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "request body is empty; expected a JSON object with measurements",
        ));
    }
    serde_json::from_slice::<IgnoredAny>(body)
        .map(drop)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))
}

#[instrument(skip_all, fields(org = %caller.org_id, bytes))]
pub async fn submit(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    request_body: Body,
) -> Result<Response, ApiError> {
    let limit = app.inner.measurements_body_limit;
    let payload = body::read(request_body, limit, body::content_length(&headers)).await?;
    Span::current().record("bytes", payload.len());
    check_json(&payload)?;
    let subject = subjects::ingest_submit(&caller.org_id);
    let actor = Some(caller.service_user_id.as_str());
    forward::request(&app, subject, actor, payload)
        .await
        .map(forward::json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_json_documents_pass() {
        for ok in [
            r#"{"measurements": []}"#,
            r#" [1, 2] "#,
            r#"{"measurements": [{"uid": "u1", "measure": {"gb": 1.5}}]}"#,
        ] {
            assert!(check_json(&Bytes::from(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "  \n",
            "hello",
            "{\"measurements\": [",
            "{} {}",
            "\u{feff}{}",
        ] {
            let err = check_json(&Bytes::from(bad)).unwrap_err();
            assert_eq!(err.status(), 400, "{bad:?}");
        }
    }
}
