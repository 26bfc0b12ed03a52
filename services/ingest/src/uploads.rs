//! Measurement file uploads: m3ter's `fileuploads/measurements` jobs and the
//! processing of the files.
//!
//! The gateway owns the HTTP side (signed URLs, streaming the file into the
//! `upload_files` object store); this module owns the jobs and what a file
//! means:
//!
//! 1. `svc.ingest.<org>.upload.create` validates m3ter's
//!    `GetUploadUrlRequest` and stores a job in the `upload_jobs` bucket
//!    (`<org>.<job>`) with status `notUploaded`.
//! 2. `upload.start` claims the job for its one upload (`notUploaded` →
//!    `running`, a revision-checked update, so of two PUTs of the same URL
//!    exactly one wins); `upload.fail` records an upload that broke off.
//! 3. Once the file is stored, the gateway announces it on the `UPLOADS`
//!    work queue. A worker here ([`Uploads::process`]) reads the file twice
//!    as a stream: first to check it is one complete, well-formed JSON array
//!    and count its rows (a broken file fails the job and stores nothing),
//!    then to cut it into batches of up to 1000 rows that go through the same
//!    [`Ingest::submit`] as any request, recording `processedRows` and
//!    `failedRows` after each batch. The message is acknowledged only when
//!    the job is `succeeded` or `failed`.
//!
//! Processing can run more than once for a job (a worker crash, a
//! redelivery): it resumes after the rows already recorded, and a batch
//! that was stored but not recorded is stored again without effect, because
//! submit de-duplicates by uid. A row without a uid gets one derived from
//! the job and its position (`<job id>-<row index>`), so it too is stored
//! once however often the file is processed.
//!
//! A gateway that stops in the middle of an upload leaves its job `running`
//! with no file announced. Each replica sweeps for such jobs
//! ([`Uploads::sweep_stalled`]) and fails them once they have been running
//! for `stale_after_secs` with nothing on `UPLOADS` and no processing
//! recorded; an announced file's job keeps its message on `UPLOADS` until it
//! is final, so it is never swept.

pub mod split;

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy},
    kv,
    message::AckKind,
    object_store::ObjectStore,
};
use async_nats::service::endpoint::Endpoint;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use meterline_shared::envelope::HEADER_ACTOR;
use meterline_shared::protocol::{
    upload_object_name, Page, UploadRequest, UploadedFile, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE,
};
use meterline_shared::shutdown::{CancellationToken, DRAIN_DEADLINE};
use meterline_shared::subjects::{self, upload_ops};
use meterline_shared::{provision, ErrorCode, ServiceError};

use crate::meters::Failure;
use crate::model::{ErrorType, MAX_BATCH};
use crate::{Ingest, MAX_BODY_BYTES};
use split::{ArraySplitter, Element, FeedError};

/// m3ter's largest file: 1 GiB.
pub const MAX_CONTENT_LENGTH: u64 = 1 << 30;
/// The content types m3ter accepts for a measurements file.
pub const CONTENT_TYPES: [&str; 2] = ["application/json", "text/json"];
/// The longest file name m3ter accepts.
pub const MAX_FILE_NAME: usize = 100;

const BODY_OPEN: &[u8] = br#"{"measurements":["#;
const BODY_CLOSE: &[u8] = b"]}";
/// Room kept in a submit body for the uid given to a row without one.
const UID_ROOM: usize = 64;
/// The largest row: alone, with a derived uid, it still fits one submit body.
pub const MAX_ROW_BYTES: usize = MAX_BODY_BYTES - BODY_OPEN.len() - BODY_CLOSE.len() - UID_ROOM;
/// Bytes read from the object store at a time.
const READ_BUF: usize = 256 * 1024;
/// The durable consumer of `UPLOADS`, shared by every ingest replica.
const CONSUMER: &str = "ingest-uploads";
/// How long a worker may go without a sign of life before the job is given
/// to another replica; a running job says it is alive every third of this.
const ACK_WAIT: Duration = Duration::from_secs(60);

/// Why a swept job failed.
pub const STALLED_REASON: &str = "the upload did not complete: no file was received for this job";
/// The shortest `stale_after_secs`: an upload URL alone is valid a minute.
const MIN_STALE_AFTER_SECS: u64 = 60;

/// Settings of file-upload processing (`METERLINE_INGEST_UPLOADS__*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// How long upload jobs and uploaded files are kept, in days.
    pub retention_days: u64,
    /// Files one replica processes at once.
    pub workers: usize,
    /// How long, in seconds, a job may stay `running` after its upload began
    /// without its file being announced for processing before it is failed
    /// with "the upload did not complete" (a gateway stopped mid-upload).
    /// Keep it above the longest upload takes: an upload still streaming
    /// when it runs out is failed too. Each replica looks for such jobs every
    /// quarter of this (at least every 15 minutes). At least 60.
    pub stale_after_secs: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            retention_days: 28,
            workers: 2,
            stale_after_secs: 3600,
        }
    }
}

impl Settings {
    /// How often a replica sweeps for stalled uploads.
    fn sweep_every(&self) -> Duration {
        Duration::from_secs((self.stale_after_secs / 4).clamp(15, 900))
    }
}

/// m3ter's `JobStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum JobStatus {
    /// The upload URL was issued; no file yet.
    NotUploaded,
    /// The file is being uploaded or processed.
    Running,
    Failed,
    Succeeded,
}

impl JobStatus {
    pub fn is_final(self) -> bool {
        matches!(self, JobStatus::Failed | JobStatus::Succeeded)
    }
}

/// A file-upload job as stored and as returned: m3ter's
/// `UploadJobResponse`, plus `contentType`, `dtCreated`,
/// `dtLastModified`, `createdBy` and, for a failed job, `failureReason`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadJob {
    pub id: String,
    pub version: u64,
    pub file_name: String,
    pub content_type: String,
    pub content_length: u64,
    pub status: JobStatus,
    /// When the file's upload began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_date: Option<String>,
    /// Rows in the file, once it has been read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_rows: Option<u64>,
    /// Rows handled so far, stored, duplicate or failed alike.
    pub processed_rows: u64,
    /// Rows refused by validation (each with an `ingest.validation.failure`
    /// event), included in `processedRows`.
    pub failed_rows: u64,
    pub dt_created: String,
    pub dt_last_modified: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn key(org: &str, id: &str) -> String {
    format!("{org}.{id}")
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> ServiceError {
    ServiceError::unavailable(format!("{what}: {e}"))
}

fn bad(message: impl Into<String>) -> ServiceError {
    ServiceError::bad_request(message)
}

/// Checks m3ter's `GetUploadUrlRequest`: `fileName` (1 to 100 characters),
/// `contentType` (`application/json` or `text/json`), `contentLength` (1
/// byte to 1 GiB).
pub fn check_request(body: &Value) -> Result<(String, String, u64), ServiceError> {
    let obj = body
        .as_object()
        .ok_or_else(|| bad("the body must be a JSON object"))?;
    let file_name = match obj.get("fileName") {
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= MAX_FILE_NAME => s.clone(),
        Some(Value::String(_)) => {
            return Err(bad(format!(
                "fileName must be 1 to {MAX_FILE_NAME} characters"
            )))
        }
        Some(_) => return Err(bad("fileName must be a string")),
        None => return Err(bad("fileName is required")),
    };
    let content_type = match obj.get("contentType") {
        Some(Value::String(s)) if CONTENT_TYPES.contains(&s.as_str()) => s.clone(),
        Some(_) => {
            return Err(bad(format!(
                "contentType must be one of {}",
                CONTENT_TYPES.join(", ")
            )))
        }
        None => return Err(bad("contentType is required")),
    };
    let content_length = match obj.get("contentLength") {
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=MAX_CONTENT_LENGTH).contains(n))
            .ok_or_else(|| {
                bad(format!(
                    "contentLength must be an integer from 1 to {MAX_CONTENT_LENGTH}"
                ))
            })?,
        None => return Err(bad("contentLength is required")),
    };
    Ok((file_name, content_type, content_length))
}

/// When a UUIDv7 job id was made (job ids sort by creation time).
fn created_at(id: &str) -> Option<DateTime<Utc>> {
    let (secs, nanos) = uuid::Uuid::parse_str(id).ok()?.get_timestamp()?.to_unix();
    DateTime::from_timestamp(secs as i64, nanos)
}

/// Whether a job looks left behind by an upload that never finished:
/// `running` since before `cutoff`, with no processing recorded. (Whether
/// its file was announced is checked on `UPLOADS`.)
fn stalled(job: &UploadJob, cutoff: DateTime<Utc>) -> bool {
    let began = job.upload_date.as_deref().unwrap_or(&job.dt_created);
    job.status == JobStatus::Running
        && job.total_rows.is_none()
        && job.processed_rows == 0
        && DateTime::parse_from_rfc3339(began).is_ok_and(|t| t < cutoff)
}

fn parse_date(what: &str, value: &str) -> Result<DateTime<Utc>, ServiceError> {
    DateTime::parse_from_rfc3339(value)
        .map(|d| d.with_timezone(&Utc))
        .map_err(|_| {
            bad(format!(
                "{what} must be an ISO-8601 date-time such as 2026-01-31T00:00:00Z, got {value:?}"
            ))
        })
}

/// The jobs, the files and the processing of one ingest replica.
#[derive(Clone)]
pub struct Uploads {
    ingest: Ingest,
    jobs: kv::Store,
    /// The stream under `jobs`, for listing an org's keys.
    jobs_stream: jetstream::stream::Stream,
    files: ObjectStore,
    queue: jetstream::stream::Stream,
    settings: Settings,
}

/// Why reading a file failed.
enum ReadError {
    /// The file is not what it must be: the job fails.
    Bad(String),
    /// The file could not be read now: try again later.
    Unavailable(ServiceError),
}

/// Rows of the file on their way to one submit.
#[derive(Default)]
struct Batch {
    first_row: u64,
    /// Rows in this batch, including those too large to send.
    rows: u64,
    /// Rows in `body`.
    sent: usize,
    body: Vec<u8>,
    /// (row index, size) of rows too large to submit.
    too_large: Vec<(u64, u64)>,
    /// The uids in `body` (as JSON text).
    uids: HashSet<String>,
}

impl Batch {
    fn starting_at(row: u64) -> Batch {
        let mut body = Vec::with_capacity(64 * 1024);
        body.extend_from_slice(BODY_OPEN);
        Batch {
            first_row: row,
            body,
            ..Default::default()
        }
    }

    /// Whether `row` (with uid `uid`) can join this batch. A uid already
    /// in it cannot: submit refuses a uid twice in one request, while in a
    /// file a repeated row is a duplicate like any other, so it goes to the
    /// next batch and is counted as one.
    fn fits(&self, row: &[u8], uid: Option<&str>) -> bool {
        let comma = usize::from(self.sent > 0);
        uid.is_none_or(|u| !self.uids.contains(u))
            && self.sent < MAX_BATCH
            && self.body.len() + comma + row.len() + BODY_CLOSE.len() <= MAX_BODY_BYTES
    }

    fn push(&mut self, row: &[u8], uid: Option<&str>) {
        if let Some(u) = uid {
            self.uids.insert(u.to_owned());
        }
        if self.sent > 0 {
            self.body.push(b',');
        }
        self.body.extend_from_slice(row);
        self.sent += 1;
        self.rows += 1;
    }
}

#[derive(Deserialize)]
struct UidProbe<'a> {
    #[serde(borrow, default)]
    uid: Option<&'a serde_json::value::RawValue>,
}

/// The row as it is submitted, and its uid (as JSON text): unchanged when
/// it has a uid (or is not an object, which submit refuses), else with the
/// uid `<job>-<row>`.
fn with_uid<'a>(row: &'a [u8], job: &str, index: u64) -> (Cow<'a, [u8]>, Option<String>) {
    match serde_json::from_slice::<UidProbe>(row) {
        Ok(p) => match p.uid.map(|u| u.get()) {
            None | Some("null") | Some("\"\"") => {}
            Some(uid) => return (row.into(), Some(uid.to_owned())),
        },
        Err(_) => return (row.into(), None),
    }
    let Ok(mut map) = serde_json::from_slice::<Map<String, Value>>(row) else {
        return (row.into(), None);
    };
    let uid = format!("{job}-{index}");
    map.insert("uid".into(), Value::String(uid.clone()));
    match serde_json::to_vec(&map) {
        Ok(v) => (v.into(), Some(format!("{uid:?}"))),
        Err(_) => (row.into(), None),
    }
}

impl Uploads {
    /// Provisions `upload_jobs`, `upload_files` and `UPLOADS` (idempotently,
    /// with `replicas` copies each).
    pub async fn provision(
        ingest: Ingest,
        settings: &Settings,
        replicas: usize,
    ) -> anyhow::Result<Uploads> {
        anyhow::ensure!(
            settings.stale_after_secs >= MIN_STALE_AFTER_SECS,
            "uploads.stale_after_secs must be at least {MIN_STALE_AFTER_SECS}, got {}",
            settings.stale_after_secs
        );
        let js = ingest.js.clone();
        let jobs = provision::ensure_kv(
            &js,
            provision::upload_jobs_bucket(settings.retention_days, replicas),
        )
        .await?;
        let files = provision::ensure_object_store(
            &js,
            provision::upload_files_bucket(settings.retention_days, replicas),
        )
        .await?;
        provision::ensure_streams(&js, replicas, [provision::uploads()]).await?;
        let queue = js.get_stream(subjects::UPLOADS_STREAM).await?;
        let jobs_stream = js
            .get_stream(format!("KV_{}", provision::UPLOAD_JOBS_BUCKET))
            .await?;
        Ok(Uploads {
            ingest,
            jobs,
            jobs_stream,
            files,
            queue,
            settings: settings.clone(),
        })
    }

    /// A new job for a file about to be uploaded: status `notUploaded`.
    pub async fn create(
        &self,
        org: &str,
        actor: Option<&str>,
        body: &Value,
    ) -> Result<UploadJob, ServiceError> {
        subjects::validate_token("orgId", org)?;
        let (file_name, content_type, content_length) = check_request(body)?;
        let now = now();
        let job = UploadJob {
            id: uuid::Uuid::now_v7().to_string(),
            version: 1,
            file_name,
            content_type,
            content_length,
            status: JobStatus::NotUploaded,
            upload_date: None,
            total_rows: None,
            processed_rows: 0,
            failed_rows: 0,
            dt_created: now.clone(),
            dt_last_modified: now,
            created_by: actor.map(str::to_owned),
            failure_reason: None,
        };
        let value = serde_json::to_vec(&job).map_err(ServiceError::internal)?;
        self.jobs
            .create(key(org, &job.id), value.into())
            .await
            .map_err(|e| unavailable("storing the upload job failed", e))?;
        tracing::info!(org, job = %job.id, file = %job.file_name, bytes = job.content_length, "upload job created");
        Ok(job)
    }

    pub async fn get(&self, org: &str, id: &str) -> Result<UploadJob, ServiceError> {
        Ok(self.entry(org, id).await?.0)
    }

    async fn entry(&self, org: &str, id: &str) -> Result<(UploadJob, u64), ServiceError> {
        subjects::validate_token("orgId", org)?;
        subjects::validate_token("id", id)?;
        let entry = self
            .jobs
            .entry(key(org, id))
            .await
            .map_err(|e| unavailable("reading the upload job failed", e))?
            .ok_or_else(|| ServiceError::not_found(format!("no file upload job {id}")))?;
        let job = serde_json::from_slice(&entry.value).map_err(ServiceError::internal)?;
        Ok((job, entry.revision))
    }

    /// Changes a job by `change`, guarded by the revision it was read at;
    /// reads again and retries when someone else wrote in between.
    async fn update(
        &self,
        org: &str,
        id: &str,
        mut change: impl FnMut(&mut UploadJob) -> Result<(), ServiceError>,
    ) -> Result<UploadJob, ServiceError> {
        for _ in 0..16 {
            let (mut job, revision) = self.entry(org, id).await?;
            change(&mut job)?;
            job.version += 1;
            job.dt_last_modified = now();
            let value = serde_json::to_vec(&job).map_err(ServiceError::internal)?;
            match self.jobs.update(key(org, id), value.into(), revision).await {
                Ok(_) => return Ok(job),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(unavailable("updating the upload job failed", e)),
            }
        }
        Err(ServiceError::unavailable(
            "the upload job kept changing; try again",
        ))
    }

    /// Claims a job for its one upload: `notUploaded` → `running`. A second
    /// claim (a replayed upload URL) is a conflict.
    pub async fn start(&self, org: &str, id: &str) -> Result<UploadJob, ServiceError> {
        self.update(org, id, |job| match job.status {
            JobStatus::NotUploaded => {
                job.status = JobStatus::Running;
                job.upload_date = Some(now());
                Ok(())
            }
            _ => Err(ServiceError::conflict(format!(
                "this upload URL has already been used: file upload job {id} is {}",
                status_name(job.status)
            ))),
        })
        .await
    }

    /// Records that the upload of a claimed job broke off (too large,
    /// interrupted): the job fails with `reason`.
    pub async fn fail(&self, org: &str, id: &str, reason: &str) -> Result<UploadJob, ServiceError> {
        let job = self
            .update(org, id, |job| {
                if job.status.is_final() {
                    return Err(ServiceError::conflict(format!(
                        "file upload job {id} is already {}",
                        status_name(job.status)
                    )));
                }
                job.status = JobStatus::Failed;
                job.failure_reason = Some(reason.to_owned());
                Ok(())
            })
            .await?;
        tracing::info!(org, job = id, reason, "upload failed");
        Ok(job)
    }

    /// An org's jobs, newest first.
    pub async fn list(&self, org: &str, req: &UploadRequest) -> Result<Page, ServiceError> {
        subjects::validate_token("orgId", org)?;
        let size = req.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
        if !(1..=MAX_PAGE_SIZE).contains(&size) {
            return Err(bad(format!(
                "pageSize must be from 1 to {MAX_PAGE_SIZE}, got {size}"
            )));
        }
        if let Some(t) = &req.next_token {
            subjects::validate_token("nextToken", t)?;
        }
        let start = req
            .date_created_start
            .as_deref()
            .map(|d| parse_date("dateCreatedStart", d))
            .transpose()?;
        let end = req
            .date_created_end
            .as_deref()
            .map(|d| parse_date("dateCreatedEnd", d))
            .transpose()?;
        let prefix = format!("$KV.{}.{org}.", provision::UPLOAD_JOBS_BUCKET);
        let mut subjects = self
            .jobs_stream
            .info_with_subjects(format!("{prefix}*"))
            .await
            .map_err(|e| unavailable("listing upload jobs failed", e))?;
        let mut ids = Vec::new();
        while let Some(s) = subjects.next().await {
            let (subject, _) = s.map_err(|e| unavailable("listing upload jobs failed", e))?;
            if let Some(id) = subject.strip_prefix(&prefix) {
                ids.push(id.to_owned());
            }
        }
        // UUIDv7 ids sort by creation time: newest first.
        ids.sort_unstable_by(|a, b| b.cmp(a));
        let in_range = |id: &str| match created_at(id) {
            Some(t) => start.is_none_or(|s| t >= s) && end.is_none_or(|e| t < e),
            None => true,
        };
        let mut candidates = ids
            .into_iter()
            .filter(|id| req.next_token.as_deref().is_none_or(|t| id.as_str() < t))
            .filter(|id| in_range(id))
            .peekable();
        let mut data = Vec::new();
        while let Some(id) = candidates.next() {
            match self.get(org, &id).await {
                Ok(job) => data.push(serde_json::to_value(job).map_err(ServiceError::internal)?),
                Err(e) if e.code == ErrorCode::NotFound => continue,
                Err(e) => return Err(e),
            }
            if data.len() == size as usize {
                let next_token = candidates.peek().is_some().then_some(id);
                return Ok(Page { data, next_token });
            }
        }
        Ok(Page {
            data,
            next_token: None,
        })
    }

    /// Runs a job whose file is stored to a final state, and returns it.
    /// Safe to run again for the same job, also concurrently with a stale
    /// run: it resumes after the rows already recorded, and returns a
    /// finished job as it is. `cancel` stops it between batches (with an
    /// `Unavailable` error: the job stays `running`, to be resumed).
    pub async fn process(
        &self,
        org: &str,
        id: &str,
        cancel: &CancellationToken,
    ) -> Result<UploadJob, ServiceError> {
        let job = self.get(org, id).await?;
        match job.status {
            JobStatus::Running => {}
            s if s.is_final() => return Ok(job),
            _ => {
                return Err(bad(format!("file upload job {id} has no uploaded file")));
            }
        }
        let name = upload_object_name(org, id);
        let total = match self.count_rows(&name, cancel).await {
            Ok(n) => n,
            Err(ReadError::Bad(reason)) => return self.finish_failed(org, id, &reason).await,
            Err(ReadError::Unavailable(e)) => return Err(e),
        };
        let job = if job.total_rows == Some(total) {
            job
        } else {
            // The job may have been swept as stalled while the file was
            // read: then it stays as it is and nothing is stored.
            let counted = self
                .update(org, id, |j| {
                    if j.status.is_final() {
                        return Err(ServiceError::conflict(format!(
                            "file upload job {id} is already {}",
                            status_name(j.status)
                        )));
                    }
                    j.total_rows = Some(total);
                    Ok(())
                })
                .await;
            match counted {
                Ok(job) => job,
                Err(e) if e.code == ErrorCode::Conflict => return self.get(org, id).await,
                Err(e) => return Err(e),
            }
        };
        tracing::info!(
            org,
            job = id,
            rows = total,
            resume_at = job.processed_rows,
            "processing upload"
        );
        match self.ingest_rows(org, &job, cancel).await {
            Ok(()) => {}
            Err(ReadError::Bad(reason)) => return self.finish_failed(org, id, &reason).await,
            Err(ReadError::Unavailable(e)) => return Err(e),
        }
        let job = self
            .update(org, id, |j| {
                if !j.status.is_final() {
                    j.status = JobStatus::Succeeded;
                }
                Ok(())
            })
            .await?;
        tracing::info!(
            org,
            job = id,
            rows = total,
            failed = job.failed_rows,
            "upload processed"
        );
        Ok(job)
    }

    /// Fails the jobs left `running` by an upload that never finished: no
    /// file announced on `UPLOADS`, no processing recorded, and the upload
    /// begun more than `stale_after_secs` before `now`. Returns how many it
    /// failed. Any number of replicas may sweep at once: a job is failed by
    /// a revision-checked update that re-checks it, so it is failed once,
    /// and a job that moved on meanwhile (processing began, the gateway
    /// failed it) is left as it is.
    pub async fn sweep_stalled(&self, now: DateTime<Utc>) -> Result<usize, ServiceError> {
        let cutoff = i64::try_from(self.settings.stale_after_secs)
            .ok()
            .and_then(chrono::Duration::try_seconds)
            .and_then(|d| now.checked_sub_signed(d));
        let Some(cutoff) = cutoff else {
            // A threshold beyond the calendar: nothing is ever stalled.
            return Ok(0);
        };
        let mut keys = self
            .jobs
            .keys()
            .await
            .map_err(|e| unavailable("listing upload jobs failed", e))?;
        let mut candidates = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(|e| unavailable("listing upload jobs failed", e))?;
            let Some((org, id)) = k.split_once('.') else {
                continue;
            };
            // Job ids are UUIDv7: a job made after the cutoff cannot have
            // been uploading since before it, so it is not even read.
            if created_at(id).is_some_and(|t| t >= cutoff) {
                continue;
            }
            candidates.push((org.to_owned(), id.to_owned()));
        }
        let mut failed = 0;
        for (org, id) in candidates {
            match self.fail_if_stalled(&org, &id, cutoff).await {
                Ok(true) => failed += 1,
                Ok(false) => {}
                Err(e) if e.code == ErrorCode::NotFound => {}
                Err(e) => {
                    tracing::warn!(org, job = id, reason = %e.message, "checking an upload job for a stalled upload failed");
                }
            }
        }
        Ok(failed)
    }

    async fn fail_if_stalled(
        &self,
        org: &str,
        id: &str,
        cutoff: DateTime<Utc>,
    ) -> Result<bool, ServiceError> {
        if !stalled(&self.get(org, id).await?, cutoff) || self.announced(org, id).await? {
            return Ok(false);
        }
        let failed = self
            .update(org, id, |job| {
                if !stalled(job, cutoff) {
                    return Err(ServiceError::conflict("the upload job moved on"));
                }
                job.status = JobStatus::Failed;
                job.failure_reason = Some(STALLED_REASON.to_owned());
                Ok(())
            })
            .await;
        match failed {
            Ok(job) => {
                tracing::info!(
                    org,
                    job = id,
                    upload_date = job.upload_date.as_deref(),
                    "stalled upload failed"
                );
                Ok(true)
            }
            Err(e) if e.code == ErrorCode::Conflict => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether the job's file is on `UPLOADS`: announced and not yet
    /// processed to a final state.
    async fn announced(&self, org: &str, id: &str) -> Result<bool, ServiceError> {
        match self
            .queue
            .get_last_raw_message_by_subject(&subjects::upload_job(org, id))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(false)
            }
            Err(e) => Err(unavailable(
                "looking for the uploaded file on UPLOADS failed",
                e,
            )),
        }
    }

    async fn finish_failed(
        &self,
        org: &str,
        id: &str,
        reason: &str,
    ) -> Result<UploadJob, ServiceError> {
        tracing::info!(org, job = id, reason, "upload file refused");
        self.update(org, id, |j| {
            if !j.status.is_final() {
                j.status = JobStatus::Failed;
                j.failure_reason = Some(reason.to_owned());
            }
            Ok(())
        })
        .await
    }

    async fn open(&self, name: &str) -> Result<jetstream::object_store::Object, ReadError> {
        match self.files.get(name).await {
            Ok(o) => Ok(o),
            Err(e) if e.kind() == jetstream::object_store::GetErrorKind::NotFound => Err(
                ReadError::Bad("the uploaded file is no longer stored".into()),
            ),
            Err(e) => Err(ReadError::Unavailable(unavailable(
                "reading the uploaded file failed",
                e,
            ))),
        }
    }

    /// Pass one: the file is one complete JSON array of well-formed values;
    /// its number of rows.
    async fn count_rows(&self, name: &str, cancel: &CancellationToken) -> Result<u64, ReadError> {
        let mut object = self.open(name).await?;
        let mut splitter = ArraySplitter::new(MAX_ROW_BYTES);
        let mut buf = vec![0u8; READ_BUF];
        let mut row = 0u64;
        loop {
            if cancel.is_cancelled() {
                return Err(ReadError::Unavailable(ServiceError::unavailable(
                    "shutting down",
                )));
            }
            let n = object.read(&mut buf).await.map_err(|e| {
                ReadError::Unavailable(unavailable("reading the uploaded file failed", e))
            })?;
            if n == 0 {
                break;
            }
            splitter
                .feed(&buf[..n], |e| {
                    let index = row;
                    row += 1;
                    match e {
                        Element::Complete(bytes) => {
                            serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
                                .map(drop)
                                .map_err(|err| format!("row {index} is not valid JSON: {err}"))
                        }
                        // Refused at ingest, but not a reason to refuse the file.
                        Element::TooLarge(_) => Ok(()),
                    }
                })
                .map_err(|e| match e {
                    FeedError::Split(e) => ReadError::Bad(e.to_string()),
                    FeedError::Emit(reason) => ReadError::Bad(reason),
                })?;
        }
        splitter.finish().map_err(|e| ReadError::Bad(e.to_string()))
    }

    /// Pass two: the rows after those already recorded, in batches through
    /// [`Ingest::submit`], recording progress after each.
    async fn ingest_rows(
        &self,
        org: &str,
        job: &UploadJob,
        cancel: &CancellationToken,
    ) -> Result<(), ReadError> {
        let skip = job.processed_rows;
        let mut object = self.open(&upload_object_name(org, &job.id)).await?;
        let mut splitter = ArraySplitter::new(MAX_ROW_BYTES);
        let mut buf = vec![0u8; READ_BUF];
        let mut row = 0u64;
        let mut current = Batch::starting_at(skip);
        let mut ready: Vec<Batch> = Vec::new();
        loop {
            if cancel.is_cancelled() {
                return Err(ReadError::Unavailable(ServiceError::unavailable(
                    "shutting down",
                )));
            }
            let n = object.read(&mut buf).await.map_err(|e| {
                ReadError::Unavailable(unavailable("reading the uploaded file failed", e))
            })?;
            let end = n == 0;
            splitter
                .feed(&buf[..n], |e| {
                    let index = row;
                    row += 1;
                    if index < skip {
                        return Ok(());
                    }
                    match e {
                        Element::Complete(bytes) => {
                            let (bytes, uid) = with_uid(bytes, &job.id, index);
                            if !current.fits(&bytes, uid.as_deref()) {
                                let next = Batch::starting_at(index);
                                ready.push(std::mem::replace(&mut current, next));
                            }
                            current.push(&bytes, uid.as_deref());
                        }
                        Element::TooLarge(size) => {
                            current.too_large.push((index, size));
                            current.rows += 1;
                        }
                    }
                    Ok::<(), ()>(())
                })
                .map_err(|e| match e {
                    FeedError::Split(e) => ReadError::Bad(e.to_string()),
                    FeedError::Emit(()) => ReadError::Bad("unreadable row".into()),
                })?;
            if end {
                splitter
                    .finish()
                    .map_err(|e| ReadError::Bad(e.to_string()))?;
                if current.rows > 0 {
                    ready.push(std::mem::take(&mut current));
                }
            }
            for batch in ready.drain(..) {
                self.submit_batch(org, &job.id, batch)
                    .await
                    .map_err(ReadError::Unavailable)?;
            }
            if end {
                return Ok(());
            }
        }
    }

    /// Submits one batch and records it on the job. The record is
    /// conditional on the job's progress being where this batch starts, so
    /// a stale second run of the same job cannot count rows twice.
    async fn submit_batch(
        &self,
        org: &str,
        id: &str,
        mut batch: Batch,
    ) -> Result<(), ServiceError> {
        let mut failed = 0u64;
        if batch.sent > 0 {
            batch.body.extend_from_slice(BODY_CLOSE);
            match self.ingest.submit(org, &batch.body).await {
                Ok(reply) => failed += reply.rejected as u64,
                Err(e) if e.code == ErrorCode::BadRequest => {
                    // Cannot happen for rows the splitter checked; if it
                    // does, the rows fail rather than the whole file.
                    tracing::warn!(org, job = id, first_row = batch.first_row, reason = %e.message, "batch refused");
                    failed += batch.sent as u64;
                }
                Err(e) => return Err(e),
            }
        }
        if !batch.too_large.is_empty() {
            let (raw, failures): (Vec<Value>, Vec<(usize, Failure)>) = batch
                .too_large
                .iter()
                .map(|&(row, size)| {
                    (
                        serde_json::json!({ "fileUploadJobId": id, "row": row }),
                        (
                            row as usize,
                            Failure {
                                error_type: ErrorType::InvalidMeasurement,
                                message: format!(
                                    "row {row} of the file is {size} bytes; a measurement may be at most {MAX_ROW_BYTES} bytes"
                                ),
                            },
                        ),
                    )
                })
                .unzip();
            self.ingest.publish_failures(org, &raw, &failures).await?;
            failed += batch.too_large.len() as u64;
        }
        let first = batch.first_row;
        let rows = batch.rows;
        self.update(org, id, |j| {
            if j.processed_rows != first || j.status.is_final() {
                return Err(ServiceError::conflict(format!(
                    "file upload job {id} is being processed elsewhere"
                )));
            }
            j.processed_rows += rows;
            j.failed_rows += failed;
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Answers one request on `svc.ingest.<org>.upload.<op>`.
    pub async fn handle(&self, msg: &async_nats::Message) -> Result<Bytes, ServiceError> {
        let rest = msg
            .subject
            .as_str()
            .strip_prefix("svc.ingest.")
            .ok_or_else(|| bad(format!("unexpected subject {}", msg.subject)))?;
        let (org, op) = rest
            .split_once(".upload.")
            .ok_or_else(|| bad(format!("unexpected subject {}", msg.subject)))?;
        let req: UploadRequest = if msg.payload.is_empty() {
            UploadRequest::default()
        } else {
            serde_json::from_slice(&msg.payload)
                .map_err(|e| bad(format!("malformed upload request: {e}")))?
        };
        let actor = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(HEADER_ACTOR))
            .map(|v| v.as_str().to_owned());
        let id = || req.id.as_deref().ok_or_else(|| bad("id is required"));
        let reply = match op {
            upload_ops::CREATE => {
                let body = req.body.as_ref().ok_or_else(|| bad("body is required"))?;
                to_json(&self.create(org, actor.as_deref(), body).await?)
            }
            upload_ops::START => to_json(&self.start(org, id()?).await?),
            upload_ops::FAIL => {
                let reason = req.reason.as_deref().unwrap_or("the upload failed");
                to_json(&self.fail(org, id()?, reason).await?)
            }
            upload_ops::GET => to_json(&self.get(org, id()?).await?),
            upload_ops::LIST => to_json(&self.list(org, &req).await?),
            other => Err(ServiceError::not_found(format!(
                "no upload operation {other:?}"
            ))),
        }?;
        Ok(reply)
    }

    /// Handles one `UPLOADS` message: processes the job, then acknowledges
    /// it once the job is final. A transient failure is retried later, with
    /// backoff; a job processed elsewhere is left to that run.
    async fn handle_uploaded(&self, msg: jetstream::Message, cancel: CancellationToken) {
        let msg = Arc::new(msg);
        let file: UploadedFile = match serde_json::from_slice(&msg.payload) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %e, "dropping an unreadable upload message");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        // Tells the server this replica is still at work, so a long file is
        // not handed to another replica meanwhile.
        let alive = {
            let msg = msg.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ACK_WAIT / 3).await;
                    if msg.ack_with(AckKind::Progress).await.is_err() {
                        return;
                    }
                }
            })
        };
        let result = self.process(&file.org_id, &file.job_id, &cancel).await;
        alive.abort();
        let (org, job) = (&file.org_id, &file.job_id);
        let ack = match result {
            Ok(_) => msg.double_ack().await.map_err(|e| e.to_string()),
            // Another run of the same job is ahead: it finishes the job,
            // and a redelivery of this message then finds it final.
            Err(e) if e.code == ErrorCode::Conflict => {
                tracing::info!(org, job, reason = %e.message, "upload not processed here");
                Ok(())
            }
            Err(e) if matches!(e.code, ErrorCode::NotFound | ErrorCode::BadRequest) => {
                tracing::warn!(org, job, reason = %e.message, "dropping an upload message");
                msg.ack_with(AckKind::Term).await.map_err(|e| e.to_string())
            }
            Err(e) => {
                let attempt = msg.info().map(|i| i.delivered).unwrap_or(1).max(1) as u32;
                let delay = if cancel.is_cancelled() {
                    // Shutting down: let another replica resume it soon.
                    Duration::from_secs(1)
                } else {
                    Duration::from_secs(5u64.saturating_mul(1 << attempt.min(6)).min(300))
                };
                tracing::warn!(org, job, attempt, retry_in = ?delay, reason = %e.message, "upload processing interrupted");
                msg.ack_with(AckKind::Nak(Some(delay)))
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        if let Err(e) = ack {
            tracing::warn!(org, job, error = %e, "acknowledging an upload message failed");
        }
    }
}

fn status_name(s: JobStatus) -> &'static str {
    match s {
        JobStatus::NotUploaded => "notUploaded",
        JobStatus::Running => "running",
        JobStatus::Failed => "failed",
        JobStatus::Succeeded => "succeeded",
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<Bytes, ServiceError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(ServiceError::internal)
}

/// Serves the upload endpoint, works the `UPLOADS` queue and sweeps for
/// stalled uploads until `shutdown`, then lets in-flight work finish or stop
/// under the drain deadline (an interrupted job resumes on the next
/// delivery).
pub async fn run(uploads: Uploads, endpoint: Endpoint, shutdown: CancellationToken) {
    tokio::join!(
        serve(uploads.clone(), endpoint, shutdown.clone()),
        work(uploads.clone(), shutdown.clone()),
        sweep(uploads, shutdown)
    );
}

/// Fails stalled uploads every [`Settings::sweep_every`]. A sweep cut short
/// by shutdown leaves every job either as it was or failed.
async fn sweep(uploads: Uploads, shutdown: CancellationToken) {
    let every = uploads.settings.sweep_every();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let swept = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = uploads.sweep_stalled(Utc::now()) => r,
        };
        match swept {
            Ok(0) => {}
            Ok(failed) => tracing::info!(failed, "stalled uploads failed"),
            Err(e) => tracing::warn!(reason = %e.message, "sweeping for stalled uploads failed"),
        }
    }
}

async fn serve(uploads: Uploads, mut endpoint: Endpoint, shutdown: CancellationToken) {
    let mut in_flight = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            req = endpoint.next() => {
                let Some(req) = req else { break };
                let uploads = uploads.clone();
                in_flight.spawn(async move {
                    let reply = uploads.handle(&req.message).await;
                    if let Err(e) = &reply {
                        tracing::debug!(subject = %req.message.subject, code = ?e.code, message = %e.message, "upload request refused");
                    }
                    if let Err(e) = req.respond(reply.map_err(Into::into)).await {
                        tracing::warn!(error = %e, "reply failed");
                    }
                });
            }
        }
    }
    let drain = async { while in_flight.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(DRAIN_DEADLINE, drain).await;
}

async fn consumer(
    uploads: &Uploads,
    shutdown: &CancellationToken,
) -> Option<jetstream::consumer::Consumer<pull::Config>> {
    loop {
        let c = uploads
            .queue
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.into()),
                    description: Some(
                        "Meterline ingest: processes uploaded measurement files".into(),
                    ),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await;
        match c {
            Ok(c) => return Some(c),
            Err(e) => tracing::warn!(error = %e, "creating the uploads consumer failed; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Takes uploaded files off `UPLOADS`, at most `workers` at once: one
/// message is fetched only when a worker is free, so no message waits here
/// while its acknowledgement deadline runs.
async fn work(uploads: Uploads, shutdown: CancellationToken) {
    let Some(consumer) = consumer(&uploads, &shutdown).await else {
        return;
    };
    let permits = Arc::new(Semaphore::new(uploads.settings.workers.max(1)));
    let mut in_flight = JoinSet::new();
    loop {
        while in_flight.try_join_next().is_some() {}
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let fetched = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            b = consumer.fetch().max_messages(1).expires(Duration::from_secs(5)).messages() => b,
        };
        let mut batch = match fetched {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "fetching from UPLOADS failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let msg = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            m = batch.next() => m,
        };
        match msg {
            Some(Ok(msg)) => {
                let uploads = uploads.clone();
                let cancel = shutdown.clone();
                in_flight.spawn(async move {
                    uploads.handle_uploaded(msg, cancel).await;
                    drop(permit);
                });
            }
            Some(Err(e)) => tracing::debug!(error = %e, "no upload message"),
            None => {}
        }
    }
    let drain = async { while in_flight.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_DEADLINE, drain).await.is_err() {
        tracing::warn!("upload processing did not stop before the deadline");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn upload_requests_are_checked_as_m3ter_documents_them() {
        let ok = json!({"fileName": "usage.json", "contentType": "application/json", "contentLength": 485});
        assert_eq!(
            check_request(&ok).unwrap(),
            ("usage.json".into(), "application/json".into(), 485)
        );
        let max = json!({"fileName": "x".repeat(100), "contentType": "text/json", "contentLength": MAX_CONTENT_LENGTH});
        check_request(&max).unwrap();
        for (bad, why) in [
            (json!([]), "JSON object"),
            (
                json!({"contentType": "text/json", "contentLength": 1}),
                "fileName is required",
            ),
            (
                json!({"fileName": "", "contentType": "text/json", "contentLength": 1}),
                "1 to 100",
            ),
            (
                json!({"fileName": "x".repeat(101), "contentType": "text/json", "contentLength": 1}),
                "1 to 100",
            ),
            (
                json!({"fileName": 7, "contentType": "text/json", "contentLength": 1}),
                "string",
            ),
            (
                json!({"fileName": "a", "contentType": "text/csv", "contentLength": 1}),
                "contentType must be",
            ),
            (
                json!({"fileName": "a", "contentLength": 1}),
                "contentType is required",
            ),
            (
                json!({"fileName": "a", "contentType": "text/json"}),
                "contentLength is required",
            ),
            (
                json!({"fileName": "a", "contentType": "text/json", "contentLength": 0}),
                "from 1",
            ),
            (
                json!({"fileName": "a", "contentType": "text/json", "contentLength": MAX_CONTENT_LENGTH + 1}),
                "from 1",
            ),
            (
                json!({"fileName": "a", "contentType": "text/json", "contentLength": 1.5}),
                "integer",
            ),
            (
                json!({"fileName": "a", "contentType": "text/json", "contentLength": "12"}),
                "integer",
            ),
        ] {
            let e = check_request(&bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.message.contains(why), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn rows_without_a_uid_get_one_from_the_job_and_their_index() {
        let job = "0196a3c2-0000-7000-8000-000000000000";
        let row = br#"{"meter":"m","account":"a","ts":"2024-01-01T00:00:00Z"}"#;
        let (out, uid) = with_uid(row, job, 7);
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["uid"], format!("{job}-7"));
        assert_eq!(uid, Some(format!("\"{job}-7\"")));
        assert_eq!(out["meter"], "m");
        assert!(format!("{job}-{}", u32::MAX).len() <= crate::model::MAX_UID_LEN);
        for empty in [
            br#"{"uid":null,"meter":"m"}"#.as_slice(),
            br#"{"uid":"","meter":"m"}"#.as_slice(),
        ] {
            let out: Value = serde_json::from_slice(&with_uid(empty, job, 3).0).unwrap();
            assert_eq!(out["uid"], format!("{job}-3"));
        }
        // Rows with a uid, and rows submit will refuse anyway, are left as sent.
        for same in [
            br#"{"uid":"u1","meter":"m"}"#.as_slice(),
            br#"{"uid":17}"#.as_slice(),
            b"42".as_slice(),
            br#""text""#.as_slice(),
            br#"{"uid":"a","uid":"b"}"#.as_slice(),
        ] {
            assert_eq!(&*with_uid(same, job, 0).0, same);
        }
        assert_eq!(
            with_uid(br#"{"uid":"u1"}"#, job, 0).1.as_deref(),
            Some(r#""u1""#)
        );
        assert_eq!(with_uid(b"42", job, 0).1, None);
    }

    #[test]
    fn batches_hold_at_most_1000_rows_and_fit_one_submit_body() {
        let mut b = Batch::starting_at(0);
        let row = vec![b'1'; 10];
        for _ in 0..MAX_BATCH {
            assert!(b.fits(&row, None));
            b.push(&row, None);
        }
        assert!(!b.fits(&row, None));
        let mut b = Batch::starting_at(0);
        let big = vec![b'1'; MAX_ROW_BYTES + UID_ROOM];
        assert!(b.fits(&big, None), "the largest row fits an empty batch");
        b.push(&big, None);
        assert!(!b.fits(b"1", None));
        let mut b = Batch::starting_at(0);
        b.push(b"{}", Some("\"u1\""));
        assert!(
            !b.fits(b"{}", Some("\"u1\"")),
            "a repeated uid waits for the next batch"
        );
        assert!(b.fits(b"{}", Some("\"u2\"")));
        b.body.extend_from_slice(BODY_CLOSE);
        assert!(b.body.len() <= MAX_BODY_BYTES);
    }

    #[test]
    fn job_ids_carry_their_creation_time() {
        let before = Utc::now() - chrono::Duration::milliseconds(1);
        let id = uuid::Uuid::now_v7().to_string();
        let t = created_at(&id).unwrap();
        assert!(t >= before && t <= Utc::now(), "{t}");
        assert_eq!(created_at("not-a-uuid"), None);
    }

    fn job(status: JobStatus, upload_date: Option<&str>) -> UploadJob {
        UploadJob {
            id: "j".into(),
            version: 2,
            file_name: "f.json".into(),
            content_type: "application/json".into(),
            content_length: 10,
            status,
            upload_date: upload_date.map(str::to_owned),
            total_rows: None,
            processed_rows: 0,
            failed_rows: 0,
            dt_created: "2026-01-01T09:59:00.000Z".into(),
            dt_last_modified: "2026-01-01T10:00:00.000Z".into(),
            created_by: None,
            failure_reason: None,
        }
    }

    #[test]
    fn only_uploads_running_since_before_the_cutoff_without_processing_are_stalled() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().to_utc();
        let began = Some("2026-01-01T10:00:00.000Z");
        let cutoff = at("2026-01-01T11:00:00Z");
        assert!(stalled(&job(JobStatus::Running, began), cutoff));
        assert!(!stalled(
            &job(JobStatus::Running, began),
            at("2026-01-01T10:00:00Z")
        ));
        for status in [
            JobStatus::NotUploaded,
            JobStatus::Failed,
            JobStatus::Succeeded,
        ] {
            assert!(!stalled(&job(status, began), cutoff), "{status:?}");
        }
        let mut counted = job(JobStatus::Running, began);
        counted.total_rows = Some(0);
        assert!(!stalled(&counted, cutoff), "processing began");
        let mut resumed = job(JobStatus::Running, began);
        resumed.processed_rows = 1000;
        assert!(!stalled(&resumed, cutoff), "processing began");
        // Without an upload date, the job's creation counts.
        assert!(stalled(&job(JobStatus::Running, None), cutoff));
        assert!(!stalled(&job(JobStatus::Running, Some("garbled")), cutoff));
    }

    #[test]
    fn the_sweep_runs_every_quarter_of_the_threshold_within_bounds() {
        let every = |secs| {
            Settings {
                stale_after_secs: secs,
                ..Settings::default()
            }
            .sweep_every()
        };
        assert_eq!(Settings::default().stale_after_secs, 3600);
        assert_eq!(every(3600), Duration::from_secs(900));
        assert_eq!(every(600), Duration::from_secs(150));
        assert_eq!(every(60), Duration::from_secs(15));
        assert_eq!(every(86_400), Duration::from_secs(900));
    }

    #[test]
    fn jobs_serialize_with_m3ters_field_names() {
        let job = UploadJob {
            id: "j".into(),
            version: 1,
            file_name: "f.json".into(),
            content_type: "application/json".into(),
            content_length: 10,
            status: JobStatus::NotUploaded,
            upload_date: None,
            total_rows: None,
            processed_rows: 0,
            failed_rows: 0,
            dt_created: "t".into(),
            dt_last_modified: "t".into(),
            created_by: None,
            failure_reason: None,
        };
        let v = serde_json::to_value(&job).unwrap();
        for k in [
            "id",
            "version",
            "fileName",
            "contentType",
            "contentLength",
            "status",
            "processedRows",
            "failedRows",
        ] {
            assert!(v.get(k).is_some(), "{k} missing: {v}");
        }
        assert_eq!(v["status"], "notUploaded");
        assert_eq!(
            serde_json::to_value(JobStatus::Succeeded).unwrap(),
            status_name(JobStatus::Succeeded)
        );
    }
}
