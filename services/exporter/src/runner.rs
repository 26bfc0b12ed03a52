//! Running one export job, from its request to a final record.
//!
//! 1. The record in `export_jobs` is created if missing (ad-hoc, manual and
//!    test-published jobs), and a final one ends the work at once: a
//!    request seen twice runs once.
//! 2. `RUNNING`; the job's window `(C, S]` is captured once and kept on the
//!    record, so a retried or redelivered job writes the same files to the
//!    same keys.
//! 3. One file per entity type (split into parts at `split_bytes`) is
//!    streamed to every destination at once, then a manifest per
//!    destination, written last.
//! 4. Only then: the cursor moves to `S` (revision checked), the
//!    `export.complete.<org>.<schedule>` message is published with the job
//!    id as message id, the `dataexport.job.success` Event, and `SUCCEEDED`.
//!    Each step is safe to repeat: a job that crashed after moving the
//!    cursor finds the cursor naming it and only finishes announcing.
//!
//! A failure that retrying cannot fix (schedule deleted, unknown entity
//! type, missing destination) fails the job at once; any other is retried
//! with backoff up to `max_attempts`. Either way a failed job leaves the
//! cursor where it was and emits `dataexport.job.failure`.
//!
//! Once the cursor has moved, the job no longer fails: the next run starts
//! after its window, so downstream systems must hear of it. Announcing is
//! retried with backoff until it works, and needs only the record (files,
//! format, manifests), so a schedule deleted in the meantime does not stop
//! it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream::DirectGetErrorKind};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::future::try_join_all;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use meterline_shared::codec::Codec;
use meterline_shared::envelope::{EntityEvent, HEADER_EVENT_NAME};
use meterline_shared::exportjob::{
    ExportFile, ExportJobRecord, ExportJobRequest, JobStatus, ADHOC,
};
use meterline_shared::seal::{self, Sealer};
use meterline_shared::{subjects, ErrorCode, ServiceError};

use crate::destination::{
    self, DeliveryError, Destination, PartitionOrder, Sha256Digest, Upload, S3,
};
use crate::format::{Encoder, Format};
use crate::jobs::{Cursor, Jobs};
use crate::replay::{self, Piece, ReplayError, Window};
use crate::rows::{export_types, ExportKind, RowFormat};

pub const SUCCESS_EVENT: &str = "dataexport.job.success";
pub const FAILURE_EVENT: &str = "dataexport.job.failure";

/// Bytes handed to the destinations at a time.
const CHUNK_BYTES: usize = 1 << 20;
/// How often a running job's rows and bytes are written to its record.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What the runner needs from the service's settings.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub split_bytes: u64,
    pub part_bytes: usize,
    pub gzip: bool,
    pub max_attempts: u32,
    pub retry_backoff: Duration,
}

/// Why an attempt failed.
#[derive(Debug, Clone)]
pub enum JobError {
    /// Retrying cannot help: the job fails now.
    Permanent(String),
    /// May work later: retried with backoff.
    Transient(String),
    /// The window is out of date (the cursor moved): run again at once with
    /// a fresh window.
    Stale(String),
    /// The files are delivered and the cursor has moved past them: only
    /// announcing is left. Retried with backoff until it works, never
    /// failed: a failed job would tell downstream systems its window is
    /// still to come, while the next run starts after it.
    Announcing(String),
}

impl JobError {
    fn message(&self) -> &str {
        match self {
            JobError::Permanent(m)
            | JobError::Transient(m)
            | JobError::Stale(m)
            | JobError::Announcing(m) => m,
        }
    }
}

impl From<ServiceError> for JobError {
    fn from(e: ServiceError) -> Self {
        match e.code {
            ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::TooManyRequests => {
                JobError::Transient(e.message)
            }
            ErrorCode::Conflict => JobError::Stale(e.message),
            _ => JobError::Permanent(e.message),
        }
    }
}

impl From<DeliveryError> for JobError {
    fn from(e: DeliveryError) -> Self {
        JobError::Transient(e.0)
    }
}

impl From<ReplayError> for JobError {
    fn from(e: ReplayError) -> Self {
        JobError::Transient(e.to_string())
    }
}

/// What to do with the job's `JOBS` message.
#[derive(Debug)]
pub enum Outcome {
    /// The job is final: acknowledge.
    Final(Box<ExportJobRecord>),
    /// Try again after the delay (the message is redelivered).
    Retry(Duration),
}

/// What one job exports, resolved from its schedule or ad-hoc request.
struct Spec {
    types: Vec<ExportKind>,
    format: Format,
    destinations: Vec<Box<dyn Destination>>,
    /// Ad-hoc `startDate`: only entities modified since.
    since: Option<DateTime<Utc>>,
}

/// A file delivered to every destination.
#[derive(Default)]
struct Delivered {
    files: Vec<ExportFile>,
    /// Every destination's manifest, once written.
    manifests: Vec<String>,
    rows: u64,
    bytes: u64,
}

/// Runs jobs. Cheap to clone.
#[derive(Clone)]
pub struct Runner {
    inner: Arc<Inner>,
}

struct Inner {
    js: jetstream::Context,
    entities: jetstream::stream::Stream,
    /// `ENTITIES` on the connections replays read on (see [`replay::replay`]).
    readers: Arc<[jetstream::stream::Stream]>,
    jobs: Jobs,
    files: jetstream::object_store::ObjectStore,
    sealer: Sealer,
    settings: RunSettings,
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

/// The key of part `part` (from 1) of a type's file.
#[allow(clippy::too_many_arguments)]
pub fn file_key(
    prefix: &str,
    order: PartitionOrder,
    org: &str,
    slot: DateTime<Utc>,
    type_token: &str,
    job: &str,
    part: u32,
    extension: &str,
) -> String {
    let date = slot.format("%Y-%m-%d");
    let hour = slot.format("%H");
    let dir = match order {
        PartitionOrder::TimeFirst => {
            format!("orgId={org}/date={date}/hour={hour}/type={type_token}")
        }
        PartitionOrder::TypeFirst => {
            format!("orgId={org}/type={type_token}/date={date}/hour={hour}")
        }
    };
    let name = if part <= 1 {
        format!("{job}_{type_token}.{extension}")
    } else {
        format!("{job}_{type_token}_part{part:04}.{extension}")
    };
    join(prefix, &format!("{dir}/{name}"))
}

/// The key of a job's manifest: under `_manifests`, which Hive-style
/// readers skip, so it never mixes into the data.
pub fn manifest_key(prefix: &str, org: &str, job: &str) -> String {
    join(prefix, &format!("orgId={org}/_manifests/{job}.json"))
}

fn join(prefix: &str, rest: &str) -> String {
    if prefix.is_empty() {
        rest.to_owned()
    } else {
        format!("{prefix}/{rest}")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Runner {
    /// `readers`: `ENTITIES` on the connections replays read on.
    pub fn new(
        js: jetstream::Context,
        entities: jetstream::stream::Stream,
        readers: Vec<jetstream::stream::Stream>,
        jobs: Jobs,
        files: jetstream::object_store::ObjectStore,
        sealer: Sealer,
        settings: RunSettings,
    ) -> Runner {
        Runner {
            inner: Arc::new(Inner {
                js,
                readers: readers.into(),
                entities,
                jobs,
                files,
                sealer,
                settings,
            }),
        }
    }

    pub fn jobs(&self) -> &Jobs {
        &self.inner.jobs
    }

    pub fn files(&self) -> &jetstream::object_store::ObjectStore {
        &self.inner.files
    }

    pub fn entities(&self) -> &jetstream::stream::Stream {
        &self.inner.entities
    }

    pub fn js(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// The last stored state of an entity, `None` if missing or deleted.
    pub async fn live_entity(
        &self,
        org: &str,
        ty: &str,
        id: &str,
    ) -> Result<Option<Value>, ServiceError> {
        match self
            .inner
            .entities
            .direct_get_last_for_subject(subjects::entity(org, ty, id))
            .await
        {
            Ok(m) => {
                let ev: EntityEvent = serde_json::from_slice(&m.payload)
                    .map_err(|e| ServiceError::internal(format!("undecodable entity: {e}")))?;
                Ok(if ev.is_tombstone() { None } else { ev.new })
            }
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(None),
            Err(e) => Err(ServiceError::unavailable(format!(
                "reading ENTITIES failed: {e}"
            ))),
        }
    }

    /// Runs (or resumes, or finishes announcing) one job. `delivered` is
    /// how many times its message has been delivered.
    pub async fn run(&self, req: &ExportJobRequest, cancel: &CancellationToken) -> Outcome {
        let org = req.org_id.as_str();
        tracing::debug!(org, job = %req.job_id, "export job taken");
        let rec = match self.start(req).await {
            Ok(Ok(rec)) => rec,
            Ok(Err(done)) => return Outcome::Final(Box::new(done)),
            Err(e) => {
                tracing::warn!(org, job = %req.job_id, error = %e.message, "starting the export job failed");
                return Outcome::Retry(self.backoff(1));
            }
        };
        let attempt = rec.attempts;
        let result = self.attempt(req, rec, cancel).await;
        match result {
            Ok(done) => Outcome::Final(Box::new(done)),
            Err(JobError::Stale(m)) => {
                tracing::info!(org, job = %req.job_id, reason = %m, "export window out of date; running again");
                match self
                    .inner
                    .jobs
                    .update(org, &req.job_id, |r| {
                        r.from_sequence = None;
                        r.to_sequence = None;
                        r.files.clear();
                        r.format = None;
                        r.manifests.clear();
                        r.attempts = r.attempts.saturating_sub(1);
                        Ok(())
                    })
                    .await
                {
                    Ok(_) => Outcome::Retry(Duration::from_millis(10)),
                    Err(_) => Outcome::Retry(self.backoff(attempt)),
                }
            }
            Err(_) if cancel.is_cancelled() => {
                // Stopping: the job stays RUNNING and is resumed elsewhere.
                Outcome::Retry(Duration::from_secs(1))
            }
            Err(JobError::Announcing(m)) => {
                let delay = self.backoff(attempt);
                tracing::warn!(org, job = %req.job_id, attempt, retry_in = ?delay, error = %m, "announcing a delivered export failed");
                self.note(
                    req,
                    format!("delivered; announcing failed (attempt {attempt}, retrying): {m}"),
                )
                .await;
                Outcome::Retry(delay)
            }
            Err(JobError::Transient(m)) if attempt < self.inner.settings.max_attempts => {
                let delay = self.backoff(attempt);
                tracing::warn!(org, job = %req.job_id, attempt, retry_in = ?delay, error = %m, "export attempt failed");
                let max = self.inner.settings.max_attempts;
                self.note(req, format!("attempt {attempt} of {max} failed: {m}"))
                    .await;
                Outcome::Retry(delay)
            }
            Err(e) => {
                let message = match &e {
                    JobError::Transient(m) => format!("{m} (gave up after {attempt} attempts)"),
                    other => other.message().to_owned(),
                };
                match self.fail(req, &message).await {
                    Ok(rec) => Outcome::Final(Box::new(rec)),
                    Err(e) => {
                        tracing::warn!(org, job = %req.job_id, error = %e.message, "recording the failure failed");
                        Outcome::Retry(self.backoff(attempt))
                    }
                }
            }
        }
    }

    /// Says on the record why the job is being retried.
    async fn note(&self, req: &ExportJobRequest, note: String) {
        let _ = self
            .inner
            .jobs
            .update(&req.org_id, &req.job_id, |r| {
                r.error = Some(note.clone());
                Ok(())
            })
            .await;
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.inner.settings.retry_backoff;
        base.saturating_mul(1 << attempt.saturating_sub(1).min(8))
            .min(Duration::from_secs(600))
    }

    /// The record, created if missing and set `RUNNING`; `Err(final)` if
    /// the job is already final.
    async fn start(
        &self,
        req: &ExportJobRequest,
    ) -> Result<Result<ExportJobRecord, ExportJobRecord>, ServiceError> {
        let org = req.org_id.as_str();
        if self.inner.jobs.entry(org, &req.job_id).await?.is_none() {
            self.inner
                .jobs
                .create(org, &ExportJobRecord::pending(req, now()))
                .await?;
        }
        let rec = self
            .inner
            .jobs
            .update(org, &req.job_id, |r| {
                if r.status.is_final() {
                    return Ok(());
                }
                r.status = JobStatus::Running;
                r.started_at.get_or_insert_with(now);
                r.attempts += 1;
                Ok(())
            })
            .await?;
        if rec.status.is_final() {
            return Ok(Err(rec));
        }
        Ok(Ok(rec))
    }

    /// Records the failure, emits its Event and returns the final record.
    async fn fail(
        &self,
        req: &ExportJobRequest,
        message: &str,
    ) -> Result<ExportJobRecord, ServiceError> {
        let org = req.org_id.as_str();
        tracing::warn!(org, job = %req.job_id, error = message, "export job failed");
        let rec = self.inner.jobs.get(org, &req.job_id).await?;
        self.event(org, FAILURE_EVENT, &rec, Some(message)).await?;
        let rec = self
            .inner
            .jobs
            .update(org, &req.job_id, |r| {
                if !r.status.is_final() {
                    r.status = JobStatus::Failed;
                    r.completed_at = Some(now());
                    r.error = Some(message.to_owned());
                }
                Ok(())
            })
            .await?;
        metrics::counter!("meterline_exporter_jobs_total", "status" => "failed").increment(1);
        Ok(rec)
    }

    /// Publishes a `dataexport.job.*` Event about `rec`; its message id makes
    /// a repeat a no-op.
    async fn event(
        &self,
        org: &str,
        name: &str,
        rec: &ExportJobRecord,
        error: Option<&str>,
    ) -> Result<(), ServiceError> {
        let event = json!({
            "id": uuid::Uuid::now_v7().to_string(),
            "eventName": name,
            "eventTime": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            "orgId": org,
            "jobId": rec.id,
            "scheduleId": rec.schedule_id,
            "trigger": rec.trigger,
            "fromSequence": rec.from_sequence,
            "toSequence": rec.to_sequence,
            "rows": rec.rows,
            "bytes": rec.bytes,
            "files": rec.files,
            "attempts": rec.attempts,
            "error": error,
        });
        let mut headers = Codec::Json.headers();
        headers.insert(HEADER_EVENT_NAME, name);
        let publish = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(
                serde_json::to_vec(&event).map_err(ServiceError::internal)?,
            ))
            .headers(headers)
            .message_id(format!("{}.{name}", rec.id));
        self.inner
            .js
            .send_publish(subjects::event(org, name), publish)
            .await
            .map_err(|e| {
                ServiceError::unavailable(format!("publishing the {name} event failed: {e}"))
            })?
            .await
            .map_err(|e| {
                ServiceError::unavailable(format!("publishing the {name} event failed: {e}"))
            })?;
        Ok(())
    }

    /// The schedule or ad-hoc request this job runs, resolved.
    async fn spec(&self, req: &ExportJobRequest) -> Result<Spec, JobError> {
        let org = req.org_id.as_str();
        let config: Value = match req.schedule_id.as_deref() {
            Some(schedule) if schedule != ADHOC => self
                .live_entity(org, "exportschedule", schedule)
                .await?
                .ok_or_else(|| {
                    JobError::Permanent(format!(
                        "export schedule {schedule} does not exist or was deleted"
                    ))
                })?,
            _ => req.adhoc.clone().ok_or_else(|| {
                JobError::Permanent("an ad-hoc job request carries no export request".into())
            })?,
        };
        match config.get("sourceType").and_then(Value::as_str) {
            None | Some("OPERATIONAL") => {}
            Some(other) => {
                return Err(JobError::Permanent(format!(
                "sourceType {other} exports are not supported; only OPERATIONAL data is exported"
            )))
            }
        }
        let types =
            export_types(config.get("operationalDataTypes")).map_err(JobError::Permanent)?;
        let format = Format::parse(config.get("exportFileFormat").and_then(Value::as_str))
            .map_err(JobError::Permanent)?;
        let since = match config.get("startDate").and_then(Value::as_str) {
            Some(s) => Some(
                DateTime::parse_from_rfc3339(s)
                    .map_err(|_| {
                        JobError::Permanent(format!("startDate {s:?} is not a date-time"))
                    })?
                    .with_timezone(&Utc),
            ),
            None => None,
        };
        let ids: Vec<String> = config
            .get("destinationIds")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let mut destinations: Vec<Box<dyn Destination>> = Vec::new();
        for id in &ids {
            subjects::validate_token("destinationId", id).map_err(JobError::from)?;
            let state = self
                .live_entity(org, "exportdestination", id)
                .await?
                .ok_or_else(|| {
                    JobError::Permanent(format!(
                        "export destination {id} does not exist or was deleted"
                    ))
                })?;
            let sealer = &self.inner.sealer;
            let cfg = destination::S3Config::from_entity(&state, |sealed| {
                if sealed.starts_with(seal::PREFIX) {
                    sealer.open(sealed).map_err(|e| {
                        format!(
                            "the secretAccessKey of destination {id} cannot be opened: {}",
                            e.message
                        )
                    })
                } else {
                    Err(format!(
                        "the secretAccessKey of destination {id} is not sealed"
                    ))
                }
            })
            .map_err(|m| JobError::Permanent(format!("destination {id}: {m}")))?;
            destinations.push(Box::new(
                S3::connect(cfg, self.inner.settings.part_bytes).await,
            ));
        }
        if destinations.is_empty() {
            destinations.push(Box::new(destination::ObjectStore::new(
                self.inner.js.clone(),
                meterline_shared::provision::EXPORT_FILES_BUCKET,
                self.inner.files.clone(),
                format!("{org}/{}", req.job_id),
            )));
        }
        Ok(Spec {
            types,
            format,
            destinations,
            since,
        })
    }

    /// One attempt: window, files, manifest, cursor, announcements.
    async fn attempt(
        &self,
        req: &ExportJobRequest,
        rec: ExportJobRecord,
        cancel: &CancellationToken,
    ) -> Result<ExportJobRecord, JobError> {
        let org = req.org_id.as_str();
        let job = req.job_id.as_str();
        let started = Instant::now();
        let schedule = req
            .schedule_id
            .as_deref()
            .filter(|s| *s != ADHOC && req.adhoc.is_none());
        // The cursor, and whether this job already moved it.
        let cursor = match schedule {
            Some(s) => self.inner.jobs.cursor(org, s).await?,
            None => None,
        };
        let advanced = cursor
            .as_ref()
            .is_some_and(|(c, _)| c.job_id.as_deref() == Some(job));
        // Delivered, with the cursor moved past it: what is left to do is
        // announcing, from the record, so the schedule (which may be gone
        // by now) is not read.
        let delivered = advanced && !rec.files.is_empty() && rec.format.is_some();
        let spec = if delivered {
            None
        } else {
            Some(self.spec(req).await?)
        };
        tracing::debug!(org, job, "export job specified");
        let rec = match (rec.to_sequence, advanced) {
            (Some(_), true) => rec,
            (Some(_), false)
                if rec.from_sequence
                    != cursor.as_ref().map(|(c, _)| c.sequence).filter(|s| *s > 0) =>
            {
                return Err(JobError::Stale(
                    "the schedule's cursor moved since the window was captured".into(),
                ))
            }
            (Some(_), false) => rec,
            (None, _) => {
                let to = self
                    .inner
                    .entities
                    .get_info()
                    .await
                    .map_err(|e| {
                        JobError::Transient(format!("reading ENTITIES state failed: {e}"))
                    })?
                    .state
                    .last_sequence;
                let from = cursor.as_ref().map(|(c, _)| c.sequence).filter(|s| *s > 0);
                self.inner
                    .jobs
                    .update(org, job, |r| {
                        r.from_sequence = from;
                        r.to_sequence = Some(to);
                        r.error = None;
                        Ok(())
                    })
                    .await?
            }
        };
        let window = Window {
            from: rec.from_sequence,
            to: rec.to_sequence.unwrap_or(0),
        };
        let rec = if delivered {
            rec
        } else {
            let Some(spec) = &spec else {
                unreachable!("only a delivered job goes on without its spec")
            };
            let delivering = Instant::now();
            let delivered = self.deliver(req, spec, window, cancel).await?;
            tracing::debug!(
                org,
                job,
                seconds = delivering.elapsed().as_secs_f64(),
                "files delivered"
            );
            self.inner
                .jobs
                .update(org, job, |r| {
                    r.files = delivered.files.clone();
                    r.rows = delivered.rows;
                    r.bytes = delivered.bytes;
                    r.format = Some(spec.format.as_str().to_owned());
                    r.manifests = delivered.manifests.clone();
                    r.error = None;
                    Ok(())
                })
                .await?
        };
        if let (Some(s), false) = (schedule, advanced) {
            let to = Cursor {
                sequence: window.to,
                job_id: Some(job.to_owned()),
                updated_at: Some(now()),
            };
            self.inner
                .jobs
                .advance(org, s, cursor.as_ref().map(|(_, r)| *r), &to)
                .await?;
            tracing::info!(
                org,
                job,
                schedule = s,
                cursor = window.to,
                "export cursor advanced"
            );
        }
        let finish = async {
            // Two streams, no order between them: both at once.
            tokio::try_join!(self.announce(req, &rec), async {
                self.event(org, SUCCESS_EVENT, &rec, None)
                    .await
                    .map_err(JobError::from)
            })?;
            tracing::debug!(org, job, "export job announced");
            self.inner
                .jobs
                .update(org, job, |r| {
                    r.status = JobStatus::Succeeded;
                    r.completed_at = Some(now());
                    r.error = None;
                    Ok(())
                })
                .await
                .map_err(JobError::from)
        };
        let done = match (finish.await, schedule) {
            (Ok(done), _) => done,
            // The cursor has moved: the job must not fail now.
            (Err(e), Some(_)) => return Err(JobError::Announcing(e.message().to_owned())),
            (Err(e), None) => return Err(e),
        };
        metrics::counter!("meterline_exporter_jobs_total", "status" => "succeeded").increment(1);
        metrics::counter!("meterline_exporter_rows_total").increment(done.rows);
        tracing::info!(
            org,
            job,
            rows = done.rows,
            bytes = done.bytes,
            files = done.files.len(),
            seconds = started.elapsed().as_secs_f64(),
            "export job succeeded"
        );
        Ok(done)
    }

    /// Publishes `export.complete.<org>.<schedule>` (message id = job id).
    async fn announce(
        &self,
        req: &ExportJobRequest,
        rec: &ExportJobRecord,
    ) -> Result<(), JobError> {
        let org = req.org_id.as_str();
        let token = req.schedule_id.as_deref().unwrap_or(ADHOC);
        let message = Completion {
            job_id: &rec.id,
            schedule_id: rec.schedule_id.as_deref(),
            org_id: org,
            trigger: rec.trigger,
            format: rec.format.as_deref().unwrap_or_default(),
            compressed: self.inner.settings.gzip,
            from_sequence: rec.from_sequence,
            to_sequence: rec.to_sequence.unwrap_or(0),
            rows: rec.rows,
            bytes: rec.bytes,
            files: &rec.files,
            manifests: &rec.manifests,
            completed_at: Utc::now(),
        };
        let publish = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(
                serde_json::to_vec(&message).map_err(|e| JobError::Transient(e.to_string()))?,
            ))
            .headers(Codec::Json.headers())
            .message_id(&rec.id);
        self.inner
            .js
            .send_publish(subjects::export_complete(org, token), publish)
            .await
            .map_err(|e| JobError::Transient(format!("publishing export.complete failed: {e}")))?
            .await
            .map_err(|e| JobError::Transient(format!("publishing export.complete failed: {e}")))?;
        Ok(())
    }

    /// Writes every file to every destination, then the manifests.
    async fn deliver(
        &self,
        req: &ExportJobRequest,
        spec: &Spec,
        window: Window,
        cancel: &CancellationToken,
    ) -> Result<Delivered, JobError> {
        for dest in &spec.destinations {
            dest.check().await?;
        }
        let mut all = Delivered::default();
        let mut progress = Progress {
            runner: self,
            org: &req.org_id,
            job: &req.job_id,
            rows: 0,
            bytes: 0,
            last: Instant::now(),
        };
        for ty in &spec.types {
            let d = self
                .deliver_type(req, spec, ty, window, cancel, &mut progress)
                .await?;
            all.rows += d.rows;
            all.bytes += d.bytes;
            all.files.extend(d.files);
        }
        for dest in &spec.destinations {
            let files: Vec<&ExportFile> = all
                .files
                .iter()
                .filter(|f| uri_belongs(dest.as_ref(), &f.uri))
                .collect();
            let manifest = json!({
                "jobId": req.job_id,
                "orgId": req.org_id,
                "scheduleId": req.schedule_id,
                "format": spec.format.as_str(),
                "compressed": self.inner.settings.gzip,
                "fromSequence": window.from,
                "toSequence": window.to,
                "rows": all.rows,
                "bytes": all.bytes,
                "files": files,
            });
            let key = manifest_key(dest.prefix(), &req.org_id, &req.job_id);
            let mut up = dest.begin(&key, "application/json").await?;
            let body = Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap_or_default());
            let digest: Sha256Digest = Sha256::digest(&body).into();
            if let Err(e) = up.write(body).await {
                up.abort().await;
                return Err(e.into());
            }
            up.finish(digest).await?;
            all.manifests.push(dest.uri(&key));
        }
        Ok(all)
    }

    /// One kind's file (and its parts) to every destination.
    async fn deliver_type(
        &self,
        req: &ExportJobRequest,
        spec: &Spec,
        ty: &ExportKind,
        window: Window,
        cancel: &CancellationToken,
        progress: &mut Progress<'_>,
    ) -> Result<Delivered, JobError> {
        let (tx, mut rx) = mpsc::channel::<Piece>(16);
        let streams = self.inner.readers.clone();
        let (org, name) = (req.org_id.clone(), ty.source.name);
        let stop = cancel.child_token();
        let rows = RowFormat::new(*ty, spec.format, spec.since);
        let mut reader = {
            let stop = stop.clone();
            tokio::spawn(async move {
                replay::replay(&streams, &org, name, window, &rows, &tx, &stop).await
            })
        };
        let written = self
            .write_parts(req, spec, ty, &mut rx, &mut reader, progress)
            .await;
        drop(rx);
        if written.is_err() {
            stop.cancel();
            reader.abort();
        }
        written
    }

    /// Joins the replay's lines into the type's file, split into parts.
    async fn write_parts(
        &self,
        req: &ExportJobRequest,
        spec: &Spec,
        ty: &ExportKind,
        lines: &mut mpsc::Receiver<Piece>,
        reader: &mut tokio::task::JoinHandle<Result<u64, ReplayError>>,
        progress: &mut Progress<'_>,
    ) -> Result<Delivered, JobError> {
        let mut file = KindFile::begin(&self.inner.settings, spec, req, ty).await?;
        let written = async {
            while let Some(piece) = lines.recv().await {
                match piece {
                    Piece::Lines(batch) => {
                        for line in batch {
                            file.line(&line, progress).await?;
                        }
                        progress.maybe_save().await;
                    }
                    Piece::Tentative => file.tentative = true,
                    Piece::Settled => file.settle().await?,
                    Piece::Void => file.void().await?,
                }
            }
            Ok::<_, JobError>(())
        }
        .await;
        // Failed writing: the caller stops the replay (which may be
        // waiting to send more lines).
        if let Err(e) = written {
            file.abort().await;
            return Err(e);
        }
        // The last part is completed only if the replay ended well: a
        // partial file never becomes visible under its final name.
        let read = match reader.await {
            Ok(r) => r.map_err(JobError::from),
            Err(e) => Err(JobError::Transient(format!("the replay stopped: {e}"))),
        };
        if let Err(e) = read {
            file.abort().await;
            return Err(e);
        }
        let finishing = Instant::now();
        let out = file.finish(progress).await?;
        tracing::debug!(
            org = %req.org_id,
            job = %req.job_id,
            seconds = finishing.elapsed().as_secs_f64(),
            "last part completed"
        );
        Ok(out)
    }
}

impl Delivered {
    fn push(&mut self, (files, rows, bytes): (Vec<ExportFile>, u64, u64)) {
        self.files.extend(files);
        self.rows += rows;
        self.bytes += bytes;
    }
}

/// One kind's file as it is written, part after part. While the replay's
/// lines are tentative, a full part is sealed but held back: it becomes
/// visible only once they stand, and is dropped unseen if they are
/// withdrawn.
struct KindFile<'a> {
    settings: &'a RunSettings,
    spec: &'a Spec,
    req: &'a ExportJobRequest,
    ty: &'a ExportKind,
    columns: Vec<String>,
    part: u32,
    file: PartWriter,
    enc: Encoder,
    tentative: bool,
    held: Vec<Sealed>,
    done: Delivered,
    tally: Tally,
}

/// Rows and bytes of one kind's file: written into its current try, and
/// counted in the job's progress. Progress counts the most written into
/// any one try, so it never goes back when a tentative start is withdrawn:
/// the file written again counts once it is past what was withdrawn.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    written: (u64, u64),
    shown: (u64, u64),
}

impl Tally {
    /// Counts rows and bytes written; returns what the job's progress
    /// gains.
    fn add(&mut self, rows: u64, bytes: u64) -> (u64, u64) {
        self.written.0 += rows;
        self.written.1 += bytes;
        let more = (
            self.written.0.saturating_sub(self.shown.0),
            self.written.1.saturating_sub(self.shown.1),
        );
        self.shown.0 += more.0;
        self.shown.1 += more.1;
        more
    }

    /// The file starts over.
    fn restart(&mut self) {
        self.written = (0, 0);
    }
}

impl<'a> KindFile<'a> {
    async fn begin(
        settings: &'a RunSettings,
        spec: &'a Spec,
        req: &'a ExportJobRequest,
        ty: &'a ExportKind,
    ) -> Result<KindFile<'a>, JobError> {
        let columns = ty.columns();
        let file = KindFile::open(settings, spec, req, ty, 1).await?;
        Ok(KindFile {
            enc: Encoder::new(spec.format, &columns, settings.gzip),
            settings,
            spec,
            req,
            ty,
            columns,
            part: 1,
            file,
            tentative: false,
            held: Vec::new(),
            done: Delivered::default(),
            tally: Tally::default(),
        })
    }

    async fn open(
        settings: &RunSettings,
        spec: &Spec,
        req: &ExportJobRequest,
        ty: &ExportKind,
        part: u32,
    ) -> Result<PartWriter, JobError> {
        let ext = spec.format.extension(settings.gzip);
        let content_type = spec.format.content_type(settings.gzip);
        PartWriter::begin(spec, req, ty.token, part, ext, content_type).await
    }

    fn count(&mut self, progress: &mut Progress<'_>, rows: u64, bytes: u64) {
        let (rows, bytes) = self.tally.add(rows, bytes);
        progress.add(rows, bytes);
    }

    async fn line(&mut self, line: &[u8], progress: &mut Progress<'_>) -> Result<(), JobError> {
        if self.enc.rows() > 0 && self.enc.size() + line.len() as u64 > self.settings.split_bytes {
            self.next_part(progress).await?;
        }
        self.enc.push_line(line);
        self.file.rows += 1;
        if let Some(chunk) = self.enc.take(CHUNK_BYTES) {
            self.count(progress, 0, chunk.len() as u64);
            self.file.write(Bytes::from(chunk)).await?;
        }
        self.count(progress, 1, 0);
        Ok(())
    }

    /// Writes the encoder's last bytes into the current part; a fresh
    /// encoder for what follows.
    async fn end_encoding(&mut self, progress: &mut Progress<'_>) -> Result<(), JobError> {
        let fresh = Encoder::new(self.spec.format, &self.columns, self.settings.gzip);
        let last = std::mem::replace(&mut self.enc, fresh).finish();
        self.count(progress, 0, last.len() as u64);
        self.file.write(Bytes::from(last)).await
    }

    async fn next_part(&mut self, progress: &mut Progress<'_>) -> Result<(), JobError> {
        self.end_encoding(progress).await?;
        let next = KindFile::open(self.settings, self.spec, self.req, self.ty, self.part + 1);
        let sealed = std::mem::replace(&mut self.file, next.await?).seal();
        self.part += 1;
        if self.tentative {
            self.held.push(sealed);
        } else {
            self.done.push(sealed.complete(self.ty).await?);
        }
        Ok(())
    }

    /// The tentative lines stand: the parts held back become visible.
    async fn settle(&mut self) -> Result<(), JobError> {
        self.tentative = false;
        for sealed in std::mem::take(&mut self.held) {
            self.done.push(sealed.complete(self.ty).await?);
        }
        Ok(())
    }

    /// Every line so far is withdrawn: the file starts over at part 1,
    /// and what follows stands. The job's progress stays where it is until
    /// the new file is past it.
    async fn void(&mut self) -> Result<(), JobError> {
        let mut fresh = KindFile::begin(self.settings, self.spec, self.req, self.ty).await?;
        fresh.tally = self.tally;
        fresh.tally.restart();
        let withdrawn = std::mem::replace(self, fresh);
        debug_assert!(
            withdrawn.done.files.is_empty(),
            "a visible part is withdrawn"
        );
        withdrawn.abort().await;
        Ok(())
    }

    /// Completes every part; the file's parts, rows and bytes.
    async fn finish(mut self, progress: &mut Progress<'_>) -> Result<Delivered, JobError> {
        self.settle().await?;
        self.end_encoding(progress).await?;
        self.done.push(self.file.seal().complete(self.ty).await?);
        Ok(self.done)
    }

    async fn abort(self) {
        for sealed in self.held {
            sealed.abort().await;
        }
        self.file.abort().await;
    }
}

fn uri_belongs(dest: &dyn Destination, uri: &str) -> bool {
    uri.starts_with(&dest.uri(dest.prefix()))
}

/// One part being written to every destination, with its checksum.
struct PartWriter {
    uploads: Vec<Box<dyn Upload>>,
    hash: Sha256,
    bytes: u64,
    rows: u64,
}

impl PartWriter {
    async fn begin(
        spec: &Spec,
        req: &ExportJobRequest,
        type_token: &str,
        part: u32,
        ext: &str,
        content_type: &str,
    ) -> Result<PartWriter, JobError> {
        let mut uploads = Vec::new();
        for dest in &spec.destinations {
            let key = file_key(
                dest.prefix(),
                dest.partition_order(),
                &req.org_id,
                req.slot,
                type_token,
                &req.job_id,
                part,
                ext,
            );
            match dest.begin(&key, content_type).await {
                Ok(u) => uploads.push(u),
                Err(e) => {
                    for u in uploads {
                        u.abort().await;
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(PartWriter {
            uploads,
            hash: Sha256::new(),
            bytes: 0,
            rows: 0,
        })
    }

    async fn write(&mut self, chunk: Bytes) -> Result<(), JobError> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.hash.update(&chunk);
        self.bytes += chunk.len() as u64;
        let r = try_join_all(self.uploads.iter_mut().map(|u| u.write(chunk.clone()))).await;
        if let Err(e) = r {
            for u in self.uploads.drain(..) {
                u.abort().await;
            }
            return Err(e.into());
        }
        Ok(())
    }

    async fn abort(self) {
        for u in self.uploads {
            u.abort().await;
        }
    }

    /// Ends writing: the part with its checksum, not yet visible.
    fn seal(self) -> Sealed {
        Sealed {
            digest: self.hash.finalize().into(),
            uploads: self.uploads,
            bytes: self.bytes,
            rows: self.rows,
        }
    }
}

/// A part written in full, everywhere, and not yet completed.
struct Sealed {
    uploads: Vec<Box<dyn Upload>>,
    digest: Sha256Digest,
    bytes: u64,
    rows: u64,
}

impl Sealed {
    /// Completes the part everywhere: its files, rows and bytes.
    async fn complete(self, ty: &ExportKind) -> Result<(Vec<ExportFile>, u64, u64), JobError> {
        let digest = self.digest;
        let sha = hex(&digest);
        let uris = try_join_all(self.uploads.into_iter().map(|u| u.finish(digest))).await?;
        let files = uris
            .into_iter()
            .map(|uri| ExportFile {
                uri,
                entity_type: ty.export_type.to_owned(),
                rows: self.rows,
                bytes: self.bytes,
                sha256: sha.clone(),
            })
            .collect();
        Ok((files, self.rows, self.bytes))
    }

    async fn abort(self) {
        for u in self.uploads {
            u.abort().await;
        }
    }
}

/// Rows and bytes written so far, saved on the record now and then.
struct Progress<'a> {
    runner: &'a Runner,
    org: &'a str,
    job: &'a str,
    rows: u64,
    bytes: u64,
    last: Instant,
}

impl Progress<'_> {
    fn add(&mut self, rows: u64, bytes: u64) {
        self.rows += rows;
        self.bytes += bytes;
    }

    async fn maybe_save(&mut self) {
        if self.last.elapsed() < PROGRESS_EVERY {
            return;
        }
        self.last = Instant::now();
        let (rows, bytes) = (self.rows, self.bytes);
        let _ = self
            .runner
            .inner
            .jobs
            .update(self.org, self.job, |r| {
                r.rows = rows;
                r.bytes = bytes;
                Ok(())
            })
            .await;
    }
}

/// The `export.complete.<org>.<schedule>` message.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Completion<'a> {
    job_id: &'a str,
    schedule_id: Option<&'a str>,
    org_id: &'a str,
    trigger: meterline_shared::exportjob::Trigger,
    format: &'a str,
    compressed: bool,
    /// `C`, exclusive; absent for an initial (full) export.
    from_sequence: Option<u64>,
    /// `S`, inclusive.
    to_sequence: u64,
    rows: u64,
    bytes: u64,
    files: &'a [ExportFile],
    manifests: &'a [String],
    completed_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_never_goes_back_when_a_file_starts_over() {
        let mut t = Tally::default();
        assert_eq!(t.add(10, 1000), (10, 1000));
        // Withdrawn: writing again counts only once past what was shown.
        t.restart();
        assert_eq!(t.add(4, 300), (0, 0));
        assert_eq!(t.add(6, 650), (0, 0));
        assert_eq!(t.add(2, 100), (2, 50));
        assert_eq!(t.add(1, 10), (1, 10));
        assert_eq!(t.shown, (13, 1060));
        assert_eq!(t.written, (13, 1060));
    }

    #[test]
    fn keys_follow_the_hive_layout_in_both_orders() {
        let slot = DateTime::parse_from_rfc3339("2026-06-01T10:15:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            file_key(
                "exports/m3",
                PartitionOrder::TimeFirst,
                "o1",
                slot,
                "account",
                "j1",
                1,
                "csv"
            ),
            "exports/m3/orgId=o1/date=2026-06-01/hour=10/type=account/j1_account.csv"
        );
        assert_eq!(
            file_key(
                "",
                PartitionOrder::TypeFirst,
                "o1",
                slot,
                "bill",
                "j1",
                3,
                "jsonl.gz"
            ),
            "orgId=o1/type=bill/date=2026-06-01/hour=10/j1_bill_part0003.jsonl.gz"
        );
        assert_eq!(
            manifest_key("p", "o1", "j1"),
            "p/orgId=o1/_manifests/j1.json"
        );
    }
}
