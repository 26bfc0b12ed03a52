//! `POST /organizations/{orgId}/measurements`: m3ter's Submit Measurements.
//!
//! The gateway checks only what an edge must: the bearer token (in the
//! middleware), the rate limits and the body size (m3ter's limit: under
//! 512,000 bytes). The body then goes to the ingest service unchanged, as one
//! request on `svc.ingest.<org>.submit`, without being parsed here: reading
//! the JSON (a malformed body is a 400 from ingest), validating the batch,
//! de-duplicating uids and storing measurements is ingest's work, and
//! parsing the body twice would cost as much as storing it. Its reply (`{"result": "accepted", "accepted": n,
//! "duplicates": n, "rejected": n, "errors": [...]}`) is returned as is.

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;
use meterline_shared::subjects;
use tracing::{instrument, Span};

use crate::auth::Caller;
use crate::body;
use crate::error::ApiError;
use crate::forward;
use crate::AppState;

/// The route, as m3ter names it.
pub const PATH: &str = "/organizations/{orgId}/measurements";

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
    let subject = subjects::ingest_submit(&caller.org_id);
    let actor = Some(caller.service_user_id.as_str());
    forward::request(&app, subject, actor, payload)
        .await
        .map(forward::json)
}
