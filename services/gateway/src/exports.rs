//! Data export jobs at the edge: m3ter's `dataexports/jobs`,
//! `getdownloadurl` and `adhoc` routes, Meterline's
//! `dataexports/schedules/{id}/run`, and the signed URLs exported files are
//! downloaded from.
//!
//! Jobs belong to the exporter (`svc.exporter.<org>.jobs.<op>`); the
//! gateway forwards and signs:
//!
//! - `GET .../dataexports/jobs` (`ids`, `scheduleId`, `status`,
//!   `dateCreatedStart`, `dateCreatedEnd`, `pageSize`, `nextToken`) and
//!   `GET .../dataexports/jobs/{id}`: the exporter's replies as they are.
//! - `POST .../dataexports/adhoc`: the body goes to the exporter, which
//!   checks it and queues the job; the answer is `{"jobId"}`.
//! - `POST .../dataexports/schedules/{id}/run`: a job for the schedule now,
//!   from its cursor.
//! - `GET .../dataexports/jobs/{jobId}/getdownloadurl`: for a succeeded job
//!   without destination (its files are in the `export_files` object store
//!   for 24 hours), a URL on this gateway valid for 15 minutes,
//!   `/exports/files/<name>?org=..&expires=..&sig=..`, signed with the same
//!   HMAC key as upload URLs. `url` is the job's first file; `files` lists a
//!   URL for each file (a Meterline addition: a job has one file per entity
//!   type). A `GET` on the URL streams the file.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use meterline_shared::protocol::{ExportsRequest, MAX_PAGE_SIZE};
use meterline_shared::subjects::{self, export_ops};
use meterline_shared::{provision, ServiceError};
use serde_json::{json, Value};
use tracing::instrument;

use crate::auth::Caller;
use crate::body::LimitedBody;
use crate::error::ApiError;
use crate::forward;
use crate::uploads::Purpose;
use crate::AppState;

pub const JOBS_PATH: &str = "/organizations/{orgId}/dataexports/jobs";
pub const JOB_PATH: &str = "/organizations/{orgId}/dataexports/jobs/{id}";
pub const DOWNLOAD_URL_PATH: &str = "/organizations/{orgId}/dataexports/jobs/{id}/getdownloadurl";
pub const ADHOC_PATH: &str = "/organizations/{orgId}/dataexports/adhoc";
pub const RUN_PATH: &str = "/organizations/{orgId}/dataexports/schedules/{id}/run";
/// Where signed download URLs of exported files point.
pub const FILE_PATH: &str = "/exports/files/{*name}";

/// How long a download URL is valid (m3ter: 15 minutes).
pub const DOWNLOAD_URL_TTL: Duration = Duration::from_secs(15 * 60);

/// The authenticated routes (the caller adds the bearer check and limits).
pub fn routes(state: &AppState) -> Router {
    Router::new()
        .route(JOBS_PATH, get(list_jobs))
        .route(JOB_PATH, get(get_job))
        .route(DOWNLOAD_URL_PATH, get(download_url))
        .route(ADHOC_PATH, post(adhoc))
        .route(RUN_PATH, post(run_schedule))
        .with_state(state.clone())
}

async fn exporter(
    app: &AppState,
    org: &str,
    actor: Option<&str>,
    op: &str,
    request: &ExportsRequest,
) -> Result<Bytes, ApiError> {
    let payload = serde_json::to_vec(request).map_err(ServiceError::internal)?;
    forward::request(
        app,
        subjects::exporter_request(org, op),
        actor,
        payload.into(),
    )
    .await
}

fn token(what: &str, v: &str) -> Result<(), ApiError> {
    subjects::validate_token(what, v).map_err(ApiError::from)
}

/// `GET /organizations/{orgId}/dataexports/jobs`.
#[instrument(skip_all, fields(org = %caller.org_id))]
pub async fn list_jobs(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mut request = ExportsRequest::default();
    for (key, value) in form_urlencoded::parse(query.as_deref().unwrap_or_default().as_bytes()) {
        let value = value.trim();
        if value.is_empty() {
            continue;
        }
        match key.as_ref() {
            "pageSize" => {
                let size = value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "pageSize must be an integer from 1 to {MAX_PAGE_SIZE}, got {value:?}"
                        ))
                    })?;
                request.page_size = Some(size);
            }
            "nextToken" => request.next_token = Some(value.to_owned()),
            "scheduleId" => {
                token("scheduleId", value)?;
                request.schedule_id = Some(value.to_owned());
            }
            "status" => request.status = Some(value.to_owned()),
            "dateCreatedStart" => request.date_created_start = Some(value.to_owned()),
            "dateCreatedEnd" => request.date_created_end = Some(value.to_owned()),
            "ids" => {
                for id in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    token("ids", id)?;
                    request.ids.push(id.to_owned());
                }
            }
            _ => {}
        }
    }
    let reply = exporter(&app, &caller.org_id, None, export_ops::LIST, &request).await?;
    Ok(forward::json(reply))
}

/// `GET /organizations/{orgId}/dataexports/jobs/{id}`.
#[instrument(skip_all, fields(org = %caller.org_id, job = %id))]
pub async fn get_job(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((_, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    token("id", &id)?;
    let request = ExportsRequest {
        id: Some(id),
        ..Default::default()
    };
    let reply = exporter(&app, &caller.org_id, None, export_ops::GET, &request).await?;
    Ok(forward::json(reply))
}

/// `POST /organizations/{orgId}/dataexports/adhoc`.
#[instrument(skip_all, fields(org = %caller.org_id))]
pub async fn adhoc(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    let request = ExportsRequest {
        body: Some(body),
        ..Default::default()
    };
    let reply = exporter(
        &app,
        &caller.org_id,
        Some(&caller.service_user_id),
        export_ops::ADHOC,
        &request,
    )
    .await?;
    Ok(forward::json(reply))
}

/// `POST /organizations/{orgId}/dataexports/schedules/{id}/run`.
#[instrument(skip_all, fields(org = %caller.org_id, schedule = %id))]
pub async fn run_schedule(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((_, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    token("id", &id)?;
    let request = ExportsRequest {
        schedule_id: Some(id),
        ..Default::default()
    };
    let reply = exporter(
        &app,
        &caller.org_id,
        Some(&caller.service_user_id),
        export_ops::RUN,
        &request,
    )
    .await?;
    Ok(forward::json(reply))
}

/// What a download URL signs: the object's name in `export_files`, kept
/// apart from upload job ids (which have no `/`).
fn signed_name(name: &str) -> String {
    format!("{}/{name}", provision::EXPORT_FILES_BUCKET)
}

/// `GET /organizations/{orgId}/dataexports/jobs/{jobId}/getdownloadurl`.
#[instrument(skip_all, fields(org = %caller.org_id, job = %id))]
pub async fn download_url(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((_, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    token("id", &id)?;
    let uploads = &app.inner.uploads;
    let base = uploads.base_url(&headers)?;
    let request = ExportsRequest {
        id: Some(id),
        ..Default::default()
    };
    let reply = exporter(&app, &caller.org_id, None, export_ops::FILES, &request).await?;
    let reply: Value = serde_json::from_slice(&reply).map_err(ServiceError::internal)?;
    let expires = chrono::Utc::now() + DOWNLOAD_URL_TTL;
    let signer = uploads.signer();
    let mut files = Vec::new();
    for f in reply["files"].as_array().into_iter().flatten() {
        let Some(name) = f["name"].as_str() else {
            continue;
        };
        let query = signer.query(
            Purpose::Download,
            &caller.org_id,
            &signed_name(name),
            expires.timestamp(),
        );
        let mut entry = f.clone();
        entry["url"] = Value::String(format!("{base}/exports/files/{name}?{query}"));
        files.push(entry);
    }
    let url = files
        .first()
        .and_then(|f| f["url"].as_str())
        .ok_or_else(|| ServiceError::not_found("the export job has no files to download"))?
        .to_owned();
    Ok(Json(json!({
        "url": url,
        "expirationTime": expires.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "files": files,
    }))
    .into_response())
}

/// `GET /exports/files/<name>?org=..&expires=..&sig=..`: streams one
/// exported file.
pub async fn get_file(
    State(app): State<AppState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params: HashMap<String, String> =
        form_urlencoded::parse(query.as_deref().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let (Some(org), Some(expires), Some(sig)) =
        (params.get("org"), params.get("expires"), params.get("sig"))
    else {
        return Err(ApiError::forbidden(
            "download URL is not signed: org, expires and sig are required",
        ));
    };
    let forged = || ApiError::forbidden("invalid download URL signature");
    let expires: i64 = expires.parse().map_err(|_| forged())?;
    let signer = app.inner.uploads.signer();
    if subjects::validate_token("org", org).is_err()
        || !name.starts_with(&format!("{org}/"))
        || name.split('/').any(|p| p.is_empty() || p == "..")
        || !signer.verify(Purpose::Download, org, &signed_name(&name), expires, sig)
    {
        return Err(forged());
    }
    if chrono::Utc::now().timestamp() >= expires {
        return Err(ApiError::forbidden("download URL expired"));
    }
    let js = jetstream::new(app.inner.nats.clone());
    let store = js
        .get_object_store(provision::EXPORT_FILES_BUCKET)
        .await
        .map_err(|_| {
            ServiceError::unavailable(
                "exported files are not available: the exporter has not started",
            )
        })?;
    let object = store.get(&name).await.map_err(|e| match e.kind() {
        jetstream::object_store::GetErrorKind::NotFound => ApiError::from(ServiceError::not_found(
            "the exported file is gone: exported files are kept for 24 hours",
        )),
        _ => ServiceError::unavailable(format!("reading the file failed: {e}")).into(),
    })?;
    let size = object.info().size as u64;
    let file_name: String = name
        .rsplit('/')
        .next()
        .unwrap_or("export")
        .chars()
        .filter(|c| !c.is_control() && *c != '"' && *c != '\\')
        .collect();
    let content_type = if file_name.ends_with(".gz") {
        "application/gzip"
    } else if file_name.ends_with(".csv") {
        "text/csv"
    } else if file_name.ends_with(".jsonl") {
        "application/x-ndjson"
    } else {
        "application/json"
    };
    let mut response = Response::new(Body::from_stream(
        tokio_util::io::ReaderStream::with_capacity(object, 64 * 1024),
    ));
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}
