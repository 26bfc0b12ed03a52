//! Measurement file uploads at the edge: m3ter's `fileuploads/measurements`
//! routes, and the signed URLs files are uploaded to and downloaded from.
//!
//! The jobs themselves belong to the ingest service (`svc.ingest.<org>.upload.<op>`);
//! the gateway signs URLs and moves bytes:
//!
//! - `POST .../generateUploadUrl` asks ingest for a job, then answers with a
//!   URL on this gateway, `/uploads/measurements/{jobId}?org=..&expires=..&sig=..`,
//!   signed with HMAC-SHA256 over (purpose, org, job, expiry) and valid for
//!   `upload_url_ttl_secs` (m3ter: one minute). Like an S3 presigned URL it
//!   needs no bearer token.
//! - `PUT` on that URL checks the signature and expiry, claims the job with
//!   ingest (the first PUT wins; a replay gets 409), and streams the body
//!   into the `upload_files` object store in 512 KiB chunks, never holding
//!   the file whole. Bytes past the job's `contentLength` (at most
//!   `upload_max_bytes`) end the upload with 413 and the partial object is
//!   deleted. A stored file is announced on the `UPLOADS` work queue, from
//!   which ingest processes it even if it is restarted in between.
//! - `GET .../jobs`, `.../jobs/{id}` are ingest's replies as they are;
//!   `.../jobs/{id}/original` answers with a signed download URL
//!   (`download_url_ttl_secs`), whose `GET` streams the file back.
//!
//! A signature is a credential while its URL is valid, so request logs
//! never show it ([`request_span`]).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::{self, object_store::ObjectStore};
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::BytesMut;
use futures::{Stream, StreamExt};
use hmac::{Hmac, Mac};
use meterline_shared::protocol::{upload_object_name, UploadRequest, UploadedFile, MAX_PAGE_SIZE};
use meterline_shared::subjects::{self, upload_ops};
use meterline_shared::{codec, provision, ErrorCode, ServiceError};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::OnceCell;
use tracing::{debug, info, instrument, warn};

use crate::auth::Caller;
use crate::body::{self, LimitedBody};
use crate::error::ApiError;
use crate::forward;
use crate::{AppState, Settings};

pub const GENERATE_PATH: &str = "/organizations/{orgId}/fileuploads/measurements/generateUploadUrl";
pub const JOBS_PATH: &str = "/organizations/{orgId}/fileuploads/measurements/jobs";
pub const JOB_PATH: &str = "/organizations/{orgId}/fileuploads/measurements/jobs/{id}";
pub const ORIGINAL_PATH: &str =
    "/organizations/{orgId}/fileuploads/measurements/jobs/{id}/original";
/// Where signed URLs point: `PUT` uploads, `GET` downloads.
pub const FILE_PATH: &str = "/uploads/measurements/{jobId}";

/// Size of the chunks a file is stored in: one JetStream message each, well
/// under the server's default 1 MB `max_payload`.
pub const CHUNK_BYTES: usize = 512 * 1024;
/// The most of a refused upload that is read and discarded, so the client
/// sees the refusal rather than a reset connection.
const DRAIN_MAX_BYTES: u64 = 16 * 1024 * 1024;
const DRAIN_MAX_TIME: Duration = Duration::from_secs(5);

/// What a signed URL allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Upload,
    Download,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Upload => "upload",
            Purpose::Download => "download",
        }
    }
}

/// Signs and checks URLs with one HMAC-SHA256 key.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(***)")
    }
}

impl Signer {
    pub fn new(key: &[u8]) -> Signer {
        Signer { key: key.to_vec() }
    }

    fn mac(&self, purpose: Purpose, org: &str, job: &str, expires: i64) -> Hmac<Sha256> {
        // Org and job are subject tokens (no whitespace), so the newlines
        // keep the fields apart.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(format!("meterline\n{}\n{org}\n{job}\n{expires}", purpose.as_str()).as_bytes());
        mac
    }

    /// The signature of a URL for `purpose` on `job` of `org`, valid until
    /// `expires` (Unix seconds).
    pub fn sign(&self, purpose: Purpose, org: &str, job: &str, expires: i64) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(purpose, org, job, expires).finalize().into_bytes())
    }

    /// Checks a signature in constant time.
    pub fn verify(&self, purpose: Purpose, org: &str, job: &str, expires: i64, sig: &str) -> bool {
        match URL_SAFE_NO_PAD.decode(sig) {
            Ok(bytes) => self
                .mac(purpose, org, job, expires)
                .verify_slice(&bytes)
                .is_ok(),
            Err(_) => false,
        }
    }

    /// The query of a signed URL: `org=..&expires=..&sig=..`.
    pub fn query(&self, purpose: Purpose, org: &str, job: &str, expires: i64) -> String {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("org", org)
            .append_pair("expires", &expires.to_string())
            .append_pair("sig", &self.sign(purpose, org, job, expires))
            .finish()
    }
}

/// The upload side of the gateway's state.
pub struct UploadState {
    signer: Signer,
    upload_ttl: Duration,
    download_ttl: Duration,
    max_bytes: u64,
    public_url: Option<String>,
    js: jetstream::Context,
    /// Looked up on first use: ingest provisions it.
    files: OnceCell<ObjectStore>,
}

impl UploadState {
    pub fn new(nats: async_nats::Client, settings: &Settings, key: Vec<u8>) -> UploadState {
        UploadState {
            signer: Signer::new(&key),
            upload_ttl: Duration::from_secs(settings.upload_url_ttl_secs),
            download_ttl: Duration::from_secs(settings.download_url_ttl_secs),
            max_bytes: settings.upload_max_bytes,
            public_url: settings
                .public_url
                .as_deref()
                .map(|u| u.trim_end_matches('/').to_owned()),
            js: jetstream::new(nats),
            files: OnceCell::new(),
        }
    }

    async fn files(&self) -> Result<&ObjectStore, ApiError> {
        self.files
            .get_or_try_init(|| self.js.get_object_store(provision::UPLOAD_FILES_BUCKET))
            .await
            .map_err(|e| {
                debug!(error = %e, "upload_files bucket not found");
                ApiError::from(ServiceError::unavailable(
                    "file uploads are not available yet: the ingest service has not started",
                ))
            })
    }

    /// The URL signer (export downloads sign with the same key).
    pub(crate) fn signer(&self) -> &Signer {
        &self.signer
    }

    /// Where clients reach this gateway: `public_url`, else the request's
    /// `Host` (and `X-Forwarded-Proto`, if a proxy set it).
    pub(crate) fn base_url(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        if let Some(url) = &self.public_url {
            return Ok(url.clone());
        }
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .filter(|h| !h.is_empty())
            .ok_or_else(|| {
                ApiError::bad_request("the request has no Host header to build a URL from")
            })?;
        let scheme = match headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
        {
            Some("https") => "https",
            _ => "http",
        };
        Ok(format!("{scheme}://{host}"))
    }

    fn url(&self, base: &str, purpose: Purpose, org: &str, job: &str, ttl: Duration) -> String {
        let expires = chrono::Utc::now().timestamp() + ttl.as_secs() as i64;
        format!(
            "{base}/uploads/measurements/{job}?{}",
            self.signer.query(purpose, org, job, expires)
        )
    }
}

/// One request to ingest's upload endpoint.
async fn ingest(
    app: &AppState,
    org: &str,
    actor: Option<&str>,
    op: &str,
    request: &UploadRequest,
) -> Result<Bytes, ApiError> {
    let payload = serde_json::to_vec(request).map_err(ServiceError::internal)?;
    forward::request(app, subjects::ingest_upload(org, op), actor, payload.into()).await
}

fn job_id(id: &str) -> Result<(), ApiError> {
    subjects::validate_token("id", id).map_err(ApiError::from)
}

/// `POST /organizations/{orgId}/fileuploads/measurements/generateUploadUrl`.
#[instrument(skip_all, fields(org = %caller.org_id, job))]
pub async fn generate_upload_url(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let uploads = &app.inner.uploads;
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    if let Some(n) = body.get("contentLength").and_then(Value::as_u64) {
        if n > uploads.max_bytes {
            return Err(ApiError::bad_request(format!(
                "contentLength must be at most {} bytes, the largest file this gateway accepts",
                uploads.max_bytes
            )));
        }
    }
    let base = uploads.base_url(&headers)?;
    let request = UploadRequest {
        body: Some(body),
        ..Default::default()
    };
    let reply = ingest(
        &app,
        &caller.org_id,
        Some(&caller.service_user_id),
        upload_ops::CREATE,
        &request,
    )
    .await?;
    let job: Value = serde_json::from_slice(&reply).map_err(ServiceError::internal)?;
    let id = job["id"]
        .as_str()
        .ok_or_else(|| ServiceError::internal("upload job without an id"))?;
    tracing::Span::current().record("job", id);
    let url = uploads.url(
        &base,
        Purpose::Upload,
        &caller.org_id,
        id,
        uploads.upload_ttl,
    );
    let content_type = job["contentType"].as_str().unwrap_or("application/json");
    Ok(Json(json!({
        "jobId": id,
        "url": url,
        "headers": { "Content-Type": content_type },
    }))
    .into_response())
}

/// `GET /organizations/{orgId}/fileuploads/measurements/jobs`: `pageSize`
/// (1 to 100), `nextToken`, `dateCreatedStart`, `dateCreatedEnd`.
#[instrument(skip_all, fields(org = %caller.org_id))]
pub async fn list_jobs(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mut request = UploadRequest::default();
    for (key, value) in form_urlencoded::parse(query.as_deref().unwrap_or_default().as_bytes()) {
        let value = value.trim();
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
            "nextToken" if !value.is_empty() => request.next_token = Some(value.to_owned()),
            "dateCreatedStart" if !value.is_empty() => {
                request.date_created_start = Some(value.to_owned())
            }
            "dateCreatedEnd" if !value.is_empty() => {
                request.date_created_end = Some(value.to_owned())
            }
            // `fileKey` is deprecated in m3ter's API; other keys are ignored.
            _ => {}
        }
    }
    let reply = ingest(&app, &caller.org_id, None, upload_ops::LIST, &request).await?;
    Ok(forward::json(reply))
}

/// `GET /organizations/{orgId}/fileuploads/measurements/jobs/{id}`.
#[instrument(skip_all, fields(org = %caller.org_id, job = %id))]
pub async fn get_job(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((_, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    job_id(&id)?;
    let request = UploadRequest {
        id: Some(id),
        ..Default::default()
    };
    let reply = ingest(&app, &caller.org_id, None, upload_ops::GET, &request).await?;
    Ok(forward::json(reply))
}

/// `GET /organizations/{orgId}/fileuploads/measurements/jobs/{id}/original`:
/// a signed URL to download the file as it was uploaded.
#[instrument(skip_all, fields(org = %caller.org_id, job = %id))]
pub async fn original(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((_, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    job_id(&id)?;
    let uploads = &app.inner.uploads;
    let base = uploads.base_url(&headers)?;
    let request = UploadRequest {
        id: Some(id.clone()),
        ..Default::default()
    };
    let reply = ingest(&app, &caller.org_id, None, upload_ops::GET, &request).await?;
    let job: Value = serde_json::from_slice(&reply).map_err(ServiceError::internal)?;
    if job["status"] == "notUploaded" {
        return Err(
            ServiceError::not_found(format!("file upload job {id} has no uploaded file")).into(),
        );
    }
    let url = uploads.url(
        &base,
        Purpose::Download,
        &caller.org_id,
        &id,
        uploads.download_ttl,
    );
    Ok(Json(json!({ "jobId": id, "url": url, "headers": {} })).into_response())
}

/// The span of one HTTP request: tower-http's default (`request` at debug
/// level, with method, URI and version), but with the URI as
/// [`redact_signature`] leaves it.
pub fn request_span<B>(req: &Request<B>) -> tracing::Span {
    tracing::debug_span!(
        "request",
        method = %req.method(),
        uri = %redact_signature(req.uri()),
        version = ?req.version(),
    )
}

/// `uri` for logs: the value of every `sig` query parameter (however its
/// name is percent-encoded) replaced by `[redacted]`.
pub fn redact_signature(uri: &Uri) -> String {
    let full = uri.to_string();
    let Some(query) = uri.query() else {
        return full;
    };
    let is_sig = |pair: &&str| {
        form_urlencoded::parse(pair.as_bytes())
            .next()
            .is_some_and(|(key, _)| key == "sig")
    };
    if !query.split('&').any(|p| is_sig(&p)) {
        return full;
    }
    // The query is the end of a URI's text.
    let mut out = full[..full.len() - query.len()].to_owned();
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(if is_sig(&pair) {
            "sig=[redacted]"
        } else {
            pair
        });
    }
    out
}

/// The org of a signed URL, once its signature and expiry are checked.
fn check_signed(
    signer: &Signer,
    purpose: Purpose,
    job: &str,
    query: Option<&str>,
) -> Result<String, ApiError> {
    let what = match purpose {
        Purpose::Upload => "upload",
        Purpose::Download => "download",
    };
    let params: HashMap<String, String> =
        form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let (Some(org), Some(expires), Some(sig)) =
        (params.get("org"), params.get("expires"), params.get("sig"))
    else {
        return Err(ApiError::forbidden(format!(
            "{what} URL is not signed: org, expires and sig are required"
        )));
    };
    let forged = || ApiError::forbidden(format!("invalid {what} URL signature"));
    let expires: i64 = expires.parse().map_err(|_| forged())?;
    if subjects::validate_token("org", org).is_err()
        || subjects::validate_token("id", job).is_err()
        || !signer.verify(purpose, org, job, expires, sig)
    {
        return Err(forged());
    }
    if chrono::Utc::now().timestamp() >= expires {
        return Err(ApiError::forbidden(format!("{what} URL expired")));
    }
    Ok(org.clone())
}

/// A request body as an [`AsyncRead`] for the object store: reads ahead
/// until a whole chunk is buffered, so each stored chunk is full-sized
/// rather than one network read; stops (as at the end of the file) at the
/// byte limit or when the body fails, and says which.
struct BodyReader {
    stream: Pin<Box<dyn Stream<Item = Result<Bytes, axum::Error>> + Send>>,
    staged: BytesMut,
    ended: bool,
    limit: u64,
    read: u64,
    over_limit: bool,
    failed: Option<String>,
}

impl BodyReader {
    fn new(body: Body, limit: u64) -> BodyReader {
        BodyReader {
            stream: Box::pin(body.into_data_stream()),
            staged: BytesMut::new(),
            ended: false,
            limit,
            read: 0,
            over_limit: false,
            failed: None,
        }
    }

    /// Reads and discards what the client is still sending, within bounds.
    async fn drain(&mut self) {
        let _ = tokio::time::timeout(DRAIN_MAX_TIME, async {
            let mut seen = 0u64;
            while let Some(Ok(chunk)) = self.stream.next().await {
                seen += chunk.len() as u64;
                if seen > DRAIN_MAX_BYTES {
                    break;
                }
            }
        })
        .await;
    }
}

impl AsyncRead for BodyReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while !this.ended && this.staged.len() < CHUNK_BYTES {
            match this.stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => {
                    this.read += bytes.len() as u64;
                    if this.read > this.limit {
                        // Keep up to the limit; the rest is refused.
                        let keep = bytes.len() - (this.read - this.limit) as usize;
                        this.staged.extend_from_slice(&bytes[..keep]);
                        this.over_limit = true;
                        this.ended = true;
                    } else {
                        this.staged.extend_from_slice(&bytes);
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.failed = Some(e.to_string());
                    this.ended = true;
                }
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = buf.remaining().min(this.staged.len());
        buf.put_slice(&this.staged.split_to(n));
        Poll::Ready(Ok(()))
    }
}

/// Tells ingest the claimed upload failed, and logs if even that fails.
async fn fail_job(app: &AppState, org: &str, job: &str, reason: &str) {
    let request = UploadRequest {
        id: Some(job.to_owned()),
        reason: Some(reason.to_owned()),
        ..Default::default()
    };
    if let Err(e) = ingest(app, org, None, upload_ops::FAIL, &request).await {
        warn!(org, job, reason, error = %e.error.message, "marking the upload failed did not work");
    }
}

/// `PUT /uploads/measurements/{jobId}?org=..&expires=..&sig=..`: the file
/// of a job, streamed into the object store.
#[instrument(skip_all, fields(job = %job, org, bytes))]
pub async fn put_file(
    State(app): State<AppState>,
    Path(job): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    request_body: Body,
) -> Result<Response, ApiError> {
    let uploads = &app.inner.uploads;
    let declared = body::content_length(&headers);
    // A refused PUT's body is read away (within bounds) so the client
    // sees the refusal rather than a reset connection.
    let refuse = |e: ApiError, body: Body| async move {
        body::discard(body, declared).await;
        Err(e)
    };
    let org = match check_signed(&uploads.signer, Purpose::Upload, &job, query.as_deref()) {
        Ok(org) => org,
        Err(e) => return refuse(e, request_body).await,
    };
    tracing::Span::current().record("org", org.as_str());
    if declared.is_some_and(|n| n > uploads.max_bytes) {
        let e = too_large(uploads.max_bytes);
        return refuse(e, request_body).await;
    }
    let files = match uploads.files().await {
        Ok(f) => f,
        Err(e) => return refuse(e, request_body).await,
    };
    // Claim the job: the first PUT of a URL wins, a replay is refused.
    let request = UploadRequest {
        id: Some(job.clone()),
        ..Default::default()
    };
    let claimed = match ingest(&app, &org, None, upload_ops::START, &request).await {
        Ok(reply) => reply,
        Err(e) => return refuse(e, request_body).await,
    };
    let claimed_job: Value = serde_json::from_slice(&claimed).map_err(ServiceError::internal)?;
    let limit = claimed_job["contentLength"]
        .as_u64()
        .unwrap_or(uploads.max_bytes)
        .min(uploads.max_bytes);
    if declared.is_some_and(|n| n > limit) {
        fail_job(&app, &org, &job, &over_limit_reason(limit)).await;
        return refuse(too_large(limit), request_body).await;
    }
    let name = upload_object_name(&org, &job);
    let mut meta = async_nats::jetstream::object_store::ObjectMetadata {
        name: name.clone(),
        chunk_size: Some(CHUNK_BYTES),
        ..Default::default()
    };
    for key in ["contentType", "fileName"] {
        if let Some(v) = claimed_job[key].as_str() {
            meta.metadata.insert(key.to_owned(), v.to_owned());
        }
    }
    let mut reader = BodyReader::new(request_body, limit);
    let stored = files.put(meta, &mut reader).await;
    let refusal = match (&stored, reader.over_limit, &reader.failed) {
        (Err(e), _, _) => Some((
            ApiError::from(ServiceError::unavailable(format!(
                "storing the file failed: {e}"
            ))),
            "storing the file failed".to_owned(),
        )),
        (Ok(_), true, _) => Some((too_large(limit), over_limit_reason(limit))),
        (Ok(_), false, Some(why)) => Some((
            ApiError::bad_request(format!("the upload was interrupted: {why}")),
            "the upload was interrupted before the file was complete".to_owned(),
        )),
        (Ok(_), false, None) => None,
    };
    if let Some((error, reason)) = refusal {
        if let Err(e) = files.delete(&name).await {
            debug!(object = %name, error = %e, "deleting a partial upload failed");
        }
        fail_job(&app, &org, &job, &reason).await;
        if reader.over_limit {
            reader.drain().await;
        }
        return Err(error);
    }
    let size = reader.read;
    tracing::Span::current().record("bytes", size);
    // Announce the file on the work queue; the job id is the message id,
    // so a repeated announce is dropped by the server.
    let announce = UploadedFile {
        org_id: org.clone(),
        job_id: job.clone(),
        size,
    };
    let mut bus_headers = codec::Codec::Json.headers();
    bus_headers.insert("Nats-Msg-Id", format!("{org}.{job}").as_str());
    let payload = serde_json::to_vec(&announce).map_err(ServiceError::internal)?;
    let queued = async {
        uploads
            .js
            .publish_with_headers(
                subjects::upload_job(&org, &job),
                bus_headers,
                payload.into(),
            )
            .await?
            .await
    }
    .await;
    if let Err(e) = queued {
        warn!(org, job, error = %e, "queueing an uploaded file failed");
        fail_job(
            &app,
            &org,
            &job,
            "the file could not be queued for processing",
        )
        .await;
        return Err(
            ServiceError::unavailable("the file could not be queued for processing").into(),
        );
    }
    info!(org, job, bytes = size, "file uploaded");
    Ok(forward::json(claimed))
}

fn over_limit_reason(limit: u64) -> String {
    format!("the file is larger than {limit} bytes (the contentLength given for it, or the gateway's limit)")
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(ErrorCode::PayloadTooLarge, over_limit_reason(limit))
}

/// `GET /uploads/measurements/{jobId}?org=..&expires=..&sig=..`: the
/// uploaded file, streamed from the object store.
#[instrument(skip_all, fields(job = %job, org))]
pub async fn get_file(
    State(app): State<AppState>,
    Path(job): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let uploads = &app.inner.uploads;
    let org = check_signed(&uploads.signer, Purpose::Download, &job, query.as_deref())?;
    tracing::Span::current().record("org", org.as_str());
    let files = uploads.files().await?;
    let name = upload_object_name(&org, &job);
    let object = files.get(&name).await.map_err(|e| match e.kind() {
        async_nats::jetstream::object_store::GetErrorKind::NotFound => ApiError::from(
            ServiceError::not_found(format!("file upload job {job} has no stored file")),
        ),
        _ => ServiceError::unavailable(format!("reading the file failed: {e}")).into(),
    })?;
    let info = object.info().clone();
    let content_type = info
        .metadata
        .get("contentType")
        .cloned()
        .unwrap_or_else(|| "application/json".into());
    let file_name: String = info
        .metadata
        .get("fileName")
        .map(|n| {
            n.chars()
                .filter(|c| !c.is_control() && *c != '"' && *c != '\\')
                .collect()
        })
        .unwrap_or_else(|| format!("{job}.json"));
    let mut response = Response::new(Body::from_stream(
        tokio_util::io::ReaderStream::with_capacity(object, 64 * 1024),
    ));
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(info.size as u64));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_purpose_org_job_and_expiry() {
        let s = Signer::new(b"key");
        let sig = s.sign(Purpose::Upload, "org1", "job1", 100);
        assert!(s.verify(Purpose::Upload, "org1", "job1", 100, &sig));
        assert!(!s.verify(Purpose::Download, "org1", "job1", 100, &sig));
        assert!(!s.verify(Purpose::Upload, "org2", "job1", 100, &sig));
        assert!(!s.verify(Purpose::Upload, "org1", "job2", 100, &sig));
        assert!(!s.verify(Purpose::Upload, "org1", "job1", 101, &sig));
        assert!(!Signer::new(b"other").verify(Purpose::Upload, "org1", "job1", 100, &sig));
        assert!(!s.verify(Purpose::Upload, "org1", "job1", 100, "not base64!"));
        assert!(!s.verify(Purpose::Upload, "org1", "job1", 100, ""));
    }

    #[test]
    fn signed_urls_are_checked_for_signature_then_expiry() {
        let s = Signer::new(b"key");
        let later = chrono::Utc::now().timestamp() + 60;
        let q = s.query(Purpose::Upload, "org1", "job1", later);
        assert_eq!(
            check_signed(&s, Purpose::Upload, "job1", Some(&q)).unwrap(),
            "org1"
        );
        let message = |r: Result<String, ApiError>| r.unwrap_err().error.message;
        assert_eq!(
            message(check_signed(&s, Purpose::Download, "job1", Some(&q))),
            "invalid download URL signature"
        );
        assert_eq!(
            message(check_signed(&s, Purpose::Upload, "job2", Some(&q))),
            "invalid upload URL signature"
        );
        let past = chrono::Utc::now().timestamp() - 1;
        let q = s.query(Purpose::Upload, "org1", "job1", past);
        let err = check_signed(&s, Purpose::Upload, "job1", Some(&q)).unwrap_err();
        assert_eq!(
            (err.status(), err.error.message.as_str()),
            (StatusCode::FORBIDDEN, "upload URL expired")
        );
        // A later expiry the signature does not cover is a forgery.
        let forged = q.replace(&format!("expires={past}"), &format!("expires={later}"));
        assert_eq!(
            message(check_signed(&s, Purpose::Upload, "job1", Some(&forged))),
            "invalid upload URL signature"
        );
        for q in [None, Some("org=org1&expires=1"), Some("sig=x")] {
            let err = check_signed(&s, Purpose::Upload, "job1", q).unwrap_err();
            assert_eq!(err.status(), StatusCode::FORBIDDEN);
            assert!(err.error.message.contains("not signed"), "{q:?}");
        }
    }

    #[test]
    fn signatures_are_redacted_from_logged_uris() {
        let s = Signer::new(b"key");
        let q = s.query(Purpose::Upload, "org1", "job1", 1_900_000_000);
        let sig = s.sign(Purpose::Upload, "org1", "job1", 1_900_000_000);
        let redact = |u: &str| redact_signature(&u.parse::<Uri>().unwrap());
        let logged = redact(&format!("/uploads/measurements/job1?{q}"));
        assert_eq!(
            logged,
            "/uploads/measurements/job1?org=org1&expires=1900000000&sig=[redacted]"
        );
        assert!(!logged.contains(&sig));
        for (uri, expected) in [
            (
                "http://gw:8080/uploads/measurements/j?sig=abc&org=o",
                "http://gw:8080/uploads/measurements/j?sig=[redacted]&org=o",
            ),
            // Percent-encoded names are read as `sig` too, so they are redacted.
            ("/x?%73ig=abc", "/x?sig=[redacted]"),
            ("/x?sig=a&sig=b", "/x?sig=[redacted]&sig=[redacted]"),
            ("/x?sig", "/x?sig=[redacted]"),
            ("/x?signature=a&pageSize=2", "/x?signature=a&pageSize=2"),
            ("/organizations/o1/meters", "/organizations/o1/meters"),
            ("/x?", "/x?"),
        ] {
            assert_eq!(redact(uri), expected, "{uri}");
        }
    }

    #[tokio::test]
    async fn the_body_reader_fills_whole_chunks_and_stops_at_the_limit() {
        use tokio::io::AsyncReadExt;
        let pieces: Vec<Result<Bytes, std::io::Error>> = (0..100)
            .map(|_| Ok(Bytes::from(vec![b'x'; 10 * 1024])))
            .collect();
        let body = Body::from_stream(futures::stream::iter(pieces));
        let mut r = BodyReader::new(body, u64::MAX);
        let mut buf = vec![0u8; CHUNK_BYTES];
        let n = r.read(&mut buf).await.unwrap();
        assert_eq!(
            n,
            CHUNK_BYTES.min(1000 * 1024),
            "a read returns a whole chunk"
        );
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert_eq!(n + rest.len(), 1000 * 1024);
        assert!(!r.over_limit && r.failed.is_none());

        let body = Body::from(vec![b'y'; 1000]);
        let mut r = BodyReader::new(body, 999);
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.unwrap();
        assert_eq!(all.len(), 999);
        assert!(r.over_limit);

        let body = Body::from(vec![b'y'; 1000]);
        let mut r = BodyReader::new(body, 1000);
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.unwrap();
        assert_eq!(all.len(), 1000);
        assert!(!r.over_limit, "exactly the limit is allowed");

        let broken: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"[1,")),
            Err(std::io::Error::other("connection reset")),
        ];
        let mut r = BodyReader::new(Body::from_stream(futures::stream::iter(broken)), 100);
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"[1,");
        assert!(r.failed.as_deref().unwrap().contains("connection reset"));
    }
}
