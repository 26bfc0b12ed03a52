//! The exporter service: operational data exports.
//!
//! Owns export jobs from request to delivery. Every replica pulls from one
//! durable consumer on the `JOBS` work queue, so each job runs once and a
//! job whose replica crashed is delivered again to another. A job replays
//! `ENTITIES` over its schedule's window `(C, S]` ([`replay`]), writes one
//! CSV or JSONL file per entity type ([`format`]) to every destination of
//! the schedule ([`destination`]: S3-compatible stores, or the
//! `export_files` object store when there is none), writes a manifest last,
//! and only then moves the schedule's cursor to `S`, publishes
//! `export.complete.<org>.<schedule>` on `EXPORTS` and the
//! `dataexport.job.success` Event ([`runner`]). Job records live in
//! `export_jobs`, cursors in `export_cursors` ([`jobs`]).
//!
//! It also answers the job requests the gateway forwards
//! (`svc.exporter.<org>.jobs.<op>`): list and get jobs, the files of a job
//! to download, and queueing ad-hoc exports and manual runs of a schedule.
//!
//! It does not decide when scheduled jobs run (the scheduler publishes
//! them), and it does not serve files over HTTP (the gateway does, with
//! signed URLs).

pub mod destination;
pub mod format;
pub mod jobs;
pub mod replay;
pub mod rows;
pub mod runner;
mod scan;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy},
    AckKind,
};
use async_nats::service::ServiceExt;
use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use meterline_shared::exportjob::{ExportJobRecord, ExportJobRequest, JobStatus, Trigger, ADHOC};
use meterline_shared::protocol::ExportsRequest;
use meterline_shared::seal::Sealer;
use meterline_shared::settings::{NatsSettings, Secret};
use meterline_shared::shutdown::{CancellationToken, DRAIN_DEADLINE};
use meterline_shared::subjects::{self, export_ops};
use meterline_shared::{admin, bus, provision, serve, ServiceError};

use crate::jobs::Jobs;
use crate::runner::{Outcome, RunSettings, Runner};

pub const SERVICE_NAME: &str = "exporter";
/// The name of the connections replays read `ENTITIES` on.
const REPLAY_CONNECTION_NAME: &str = "exporter-replay";
/// The durable consumer all replicas share on `JOBS`.
pub const CONSUMER: &str = "exporter";

/// Settings of the exporter (`METERLINE_EXPORTER_*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Bus connection (`METERLINE_NATS_*`).
    pub nats: NatsSettings,
    /// Admin HTTP port: `/healthz`, `/readyz`, `/metrics`.
    pub admin_addr: SocketAddr,
    /// Base64 of the 32-byte key the entities service seals secrets with;
    /// the exporter opens destinations' `secretAccessKey` with it. Needed
    /// only for destinations with static keys.
    pub sealing_key: Secret,
    /// Jobs one replica runs at once.
    pub workers: usize,
    /// Files larger than this many bytes (as stored) are split into parts
    /// `_part0002`, `_part0003`, ... at row boundaries. m3ter splits at 6 GB.
    pub split_bytes: u64,
    /// Size of the parts of S3 multipart uploads, in bytes (at least 5 MiB,
    /// S3's minimum). A file up to this size is one `PutObject`. The memory
    /// one upload holds.
    pub s3_part_bytes: usize,
    /// Gzip every file (`.csv.gz`, `.jsonl.gz`).
    pub gzip: bool,
    /// Attempts of a job that fails for a reason that may pass (destination
    /// unreachable, bus unavailable) before it is `FAILED`.
    pub max_attempts: u32,
    /// Wait before the second attempt, in milliseconds; doubled for each
    /// further one (at most ten minutes).
    pub retry_backoff_ms: u64,
    /// How long a job's message waits for a sign of life from its replica
    /// before another replica takes it over, in seconds. A running job
    /// reports progress every third of it.
    pub ack_wait_secs: u64,
    /// Job requests (`svc.exporter.*`) handled at once.
    pub max_in_flight: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            nats: NatsSettings::default(),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 9104)),
            sealing_key: Secret::default(),
            workers: 2,
            split_bytes: 6 * 1024 * 1024 * 1024,
            s3_part_bytes: 8 * 1024 * 1024,
            gzip: false,
            max_attempts: 5,
            retry_backoff_ms: 10_000,
            ack_wait_secs: 60,
            max_in_flight: 64,
        }
    }
}

/// The sealing key of [`Settings::for_tests`], the same as the entities
/// service's test key.
pub const TEST_SEALING_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

impl Settings {
    /// Settings for tests: the given server, a free admin port, the test
    /// sealing key, quick retries and takeovers.
    pub fn for_tests(nats_url: &str) -> Settings {
        Settings {
            nats: NatsSettings {
                url: nats_url.to_owned(),
                ..Default::default()
            },
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            sealing_key: Secret::new(TEST_SEALING_KEY),
            max_attempts: 3,
            retry_backoff_ms: 100,
            ack_wait_secs: 3,
            ..Default::default()
        }
    }

    /// Refuses settings that cannot work.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.s3_part_bytes >= destination::MIN_PART_BYTES,
            "s3_part_bytes must be at least {} (S3's smallest part)",
            destination::MIN_PART_BYTES
        );
        anyhow::ensure!(
            self.split_bytes >= 1024,
            "split_bytes must be at least 1024"
        );
        anyhow::ensure!(self.max_attempts >= 1, "max_attempts must be at least 1");
        anyhow::ensure!(self.ack_wait_secs >= 1, "ack_wait_secs must be at least 1");
        Ok(())
    }

    fn run_settings(&self) -> RunSettings {
        RunSettings {
            split_bytes: self.split_bytes,
            part_bytes: self.s3_part_bytes,
            gzip: self.gzip,
            max_attempts: self.max_attempts,
            retry_backoff: Duration::from_millis(self.retry_backoff_ms),
        }
    }
}

pub struct App {
    client: async_nats::Client,
    /// The connections replays read on.
    reader_clients: Vec<async_nats::Client>,
    runner: Runner,
    queue: jetstream::stream::Stream,
    settings: Settings,
    admin_listener: Option<tokio::net::TcpListener>,
    admin_addr: SocketAddr,
    service: async_nats::service::Service,
    endpoints: Vec<async_nats::service::endpoint::Endpoint>,
}

impl App {
    /// Connects, provisions `JOBS`, `EXPORTS` and the job buckets, and binds
    /// the admin port.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        settings.validate()?;
        let sealer = Sealer::from_base64(settings.sealing_key.expose())?;
        let client = bus::connect(&settings.nats, SERVICE_NAME).await?;
        let js = jetstream::new(client.clone());
        let replicas = settings.nats.stream_replicas.max(1);
        provision::ensure_core(&js, replicas).await?;
        provision::ensure_streams(&js, replicas, [provision::jobs(), provision::exports()]).await?;
        let jobs = Jobs::open(&js, replicas).await?;
        let files =
            provision::ensure_object_store(&js, provision::export_files_bucket(replicas)).await?;
        let entities = js.get_stream(subjects::ENTITIES_STREAM).await?;
        let queue = js.get_stream(subjects::JOBS_STREAM).await?;
        // Replays read on connections of their own: a client parses what
        // one connection receives on one task, so the parts of a window
        // are parsed on as many cores, and file chunks sent to the
        // download store do not queue behind the replay's messages.
        let mut reader_clients = Vec::new();
        let mut readers = Vec::new();
        for _ in 0..replay::SEGMENTS {
            let reader = bus::connect(&settings.nats, REPLAY_CONNECTION_NAME).await?;
            readers.push(
                jetstream::new(reader.clone())
                    .get_stream(subjects::ENTITIES_STREAM)
                    .await?,
            );
            reader_clients.push(reader);
        }
        let runner = Runner::new(
            js.clone(),
            entities,
            readers,
            jobs,
            files,
            sealer,
            settings.run_settings(),
        );
        let admin_listener = tokio::net::TcpListener::bind(settings.admin_addr).await?;
        let admin_addr = admin_listener.local_addr()?;
        let service = client
            .service_builder()
            .description("Meterline exporter: operational data export jobs")
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| anyhow::anyhow!("starting the micro service failed: {e}"))?;
        let mut endpoints = Vec::new();
        for op in export_ops::ALL {
            endpoints.push(
                service
                    .endpoint_builder()
                    .name(op)
                    .add(subjects::exporter_request("*", op))
                    .await
                    .map_err(|e| anyhow::anyhow!("adding endpoint {op}: {e}"))?,
            );
        }
        bus::round_trip(&client).await?;
        Ok(App {
            client,
            reader_clients,
            runner,
            queue,
            settings,
            admin_listener: Some(admin_listener),
            admin_addr,
            service,
            endpoints,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The job runner, for callers in the same process (tests, benches).
    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// Works the `JOBS` queue and answers requests until `shutdown`, then
    /// lets running jobs stop at their next step (they are resumed from
    /// their message by another replica, or by this one at its next start)
    /// and drains the client.
    pub async fn run_until_stopped(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        if let Some(listener) = self.admin_listener.take() {
            let app = admin::router(admin::nats_readiness(self.client.clone()));
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
            });
        }
        tracing::info!(admin = %self.admin_addr, workers = self.settings.workers, "exporter ready");
        let requests = futures::stream::select_all(std::mem::take(&mut self.endpoints));
        let runner = self.runner.clone();
        let handler = move |msg: async_nats::Message| {
            let runner = runner.clone();
            async move { handle_request(&runner, &msg).await }
        };
        let work = work(
            self.runner.clone(),
            self.queue.clone(),
            self.settings.clone(),
            shutdown.clone(),
        );
        let (served, ()) = tokio::join!(
            serve::serve(
                requests,
                self.settings.max_in_flight,
                shutdown.clone(),
                handler
            ),
            work
        );
        served?;
        let _ = self.service.stop().await;
        let _ = self.client.drain().await;
        for reader in &self.reader_clients {
            let _ = reader.drain().await;
        }
        tracing::info!("exporter stopped");
        Ok(())
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Bytes, ServiceError> {
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(ServiceError::internal)
}

/// Answers one `svc.exporter.<org>.jobs.<op>` request.
pub async fn handle_request(
    runner: &Runner,
    msg: &async_nats::Message,
) -> Result<Bytes, ServiceError> {
    let tokens: Vec<&str> = msg.subject.split('.').collect();
    let [_, _, org, _, op] = tokens[..] else {
        return Err(ServiceError::bad_request(format!(
            "unexpected subject {}",
            msg.subject
        )));
    };
    subjects::validate_token("orgId", org)?;
    let req: ExportsRequest = if msg.payload.is_empty() {
        ExportsRequest::default()
    } else {
        serde_json::from_slice(&msg.payload)
            .map_err(|e| ServiceError::bad_request(format!("malformed request: {e}")))?
    };
    let id = || {
        let id = req
            .id
            .as_deref()
            .ok_or_else(|| ServiceError::bad_request("the request needs the job's id"))?;
        subjects::validate_token("id", id)?;
        Ok::<_, ServiceError>(id)
    };
    match op {
        export_ops::LIST => to_json(&runner.jobs().list(org, &req).await?),
        export_ops::GET => to_json(&runner.jobs().get(org, id()?).await?),
        export_ops::FILES => to_json(&downloadable(runner, org, id()?).await?),
        export_ops::ADHOC => to_json(&queue_adhoc(runner, org, req.body.as_ref()).await?),
        export_ops::RUN => {
            let schedule = req
                .schedule_id
                .as_deref()
                .ok_or_else(|| ServiceError::bad_request("the request needs the scheduleId"))?;
            to_json(&queue_run(runner, org, schedule).await?)
        }
        other => Err(ServiceError::not_found(format!(
            "no export operation {other:?}"
        ))),
    }
}

/// How long files for download are kept (the `export_files` bucket's age).
pub const DOWNLOAD_WINDOW: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// The files of a job that can be downloaded: a `SUCCEEDED` job without
/// destination, completed in the last 24 hours.
async fn downloadable(runner: &Runner, org: &str, id: &str) -> Result<Value, ServiceError> {
    let rec = runner.jobs().get(org, id).await?;
    if rec.status != JobStatus::Succeeded {
        return Err(ServiceError::conflict(format!(
            "export job {id} is {}; files can be downloaded once it has SUCCEEDED",
            rec.status.as_str()
        )));
    }
    if rec
        .completed_at
        .is_some_and(|t| Utc::now() - t > DOWNLOAD_WINDOW)
    {
        return Err(ServiceError::not_found(format!(
            "the files of export job {id} were removed: exported files are kept for 24 hours"
        )));
    }
    let prefix = format!("{}:", provision::EXPORT_FILES_BUCKET);
    let files: Vec<Value> = rec
        .files
        .iter()
        .filter_map(|f| {
            f.uri.strip_prefix(&prefix).map(|name| {
                json!({"name": name, "entityType": f.entity_type, "rows": f.rows, "bytes": f.bytes, "sha256": f.sha256})
            })
        })
        .collect();
    if files.is_empty() {
        return Err(ServiceError::not_found(format!(
            "export job {id} delivered its files to its destinations; there is nothing to download"
        )));
    }
    Ok(json!({ "jobId": id, "files": files }))
}

/// Publishes a job request on `JOBS` (message id = job id) after storing
/// its `PENDING` record.
pub async fn queue_job(runner: &Runner, req: &ExportJobRequest) -> Result<(), ServiceError> {
    let org = req.org_id.as_str();
    runner
        .jobs()
        .create(org, &ExportJobRecord::pending(req, Utc::now()))
        .await?;
    let token = req.schedule_id.as_deref().unwrap_or(ADHOC);
    let publish = jetstream::message::PublishMessage::build()
        .payload(Bytes::from(
            serde_json::to_vec(req).map_err(ServiceError::internal)?,
        ))
        .message_id(&req.job_id);
    runner
        .js()
        .send_publish(subjects::export_job(org, token), publish)
        .await
        .map_err(|e| ServiceError::unavailable(format!("queueing the export job failed: {e}")))?
        .await
        .map_err(|e| ServiceError::unavailable(format!("queueing the export job failed: {e}")))?;
    Ok(())
}

/// `POST .../dataexports/adhoc`: checks the body as m3ter's
/// `AdHocOperationalDataExportConfigurationRequest`, queues the job and
/// answers `{"jobId"}`.
async fn queue_adhoc(
    runner: &Runner,
    org: &str,
    body: Option<&Value>,
) -> Result<Value, ServiceError> {
    let body = body.ok_or_else(|| ServiceError::bad_request("the request needs a body"))?;
    if !body.is_object() {
        return Err(ServiceError::bad_request("the body must be a JSON object"));
    }
    match body.get("sourceType").and_then(Value::as_str) {
        Some("OPERATIONAL") => {}
        Some("USAGE") => {
            return Err(ServiceError::bad_request(
                "sourceType USAGE: usage data exports are not supported; use OPERATIONAL",
            ))
        }
        _ => return Err(ServiceError::bad_request("sourceType: must be OPERATIONAL")),
    }
    let allowed = [
        "sourceType",
        "operationalDataTypes",
        "destinationIds",
        "exportFileFormat",
        "startDate",
        "version",
    ];
    if let Some(unknown) = body
        .as_object()
        .and_then(|o| o.keys().find(|k| !allowed.contains(&k.as_str())))
    {
        return Err(ServiceError::bad_request(format!(
            "{unknown}: unknown field"
        )));
    }
    rows::export_types(body.get("operationalDataTypes"))
        .map_err(|m| ServiceError::bad_request(format!("operationalDataTypes: {m}")))?;
    format::Format::parse(body.get("exportFileFormat").and_then(Value::as_str))
        .map_err(ServiceError::bad_request)?;
    if let Some(d) = body.get("startDate") {
        let ok = d
            .as_str()
            .is_some_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok());
        if !ok {
            return Err(ServiceError::bad_request(
                "startDate must be a date-time like 2026-01-31T00:00:00Z",
            ));
        }
    }
    if let Some(ids) = body.get("destinationIds") {
        let ids = ids
            .as_array()
            .ok_or_else(|| ServiceError::bad_request("destinationIds must be an array of ids"))?;
        for id in ids {
            let id = id.as_str().ok_or_else(|| {
                ServiceError::bad_request("destinationIds must be an array of ids")
            })?;
            subjects::validate_token("destinationIds", id)?;
            if runner
                .live_entity(org, "exportdestination", id)
                .await?
                .is_none()
            {
                return Err(ServiceError::bad_request(format!(
                    "destinationIds: export destination {id:?} does not exist"
                )));
            }
        }
    }
    let req = ExportJobRequest {
        job_id: uuid::Uuid::new_v4().to_string(),
        org_id: org.to_owned(),
        schedule_id: None,
        slot: Utc::now(),
        trigger: Trigger::AdHoc,
        adhoc: Some(body.clone()),
    };
    queue_job(runner, &req).await?;
    Ok(json!({ "jobId": req.job_id }))
}

/// `POST .../dataexports/schedules/{id}/run`: a job for the schedule now,
/// from its cursor.
async fn queue_run(runner: &Runner, org: &str, schedule: &str) -> Result<Value, ServiceError> {
    subjects::validate_token("scheduleId", schedule)?;
    if runner
        .live_entity(org, "exportschedule", schedule)
        .await?
        .is_none()
    {
        return Err(ServiceError::not_found(format!(
            "export schedule {schedule:?} does not exist"
        )));
    }
    let req = ExportJobRequest {
        job_id: uuid::Uuid::new_v4().to_string(),
        org_id: org.to_owned(),
        schedule_id: Some(schedule.to_owned()),
        slot: Utc::now(),
        trigger: Trigger::Manual,
        adhoc: None,
    };
    queue_job(runner, &req).await?;
    let rec = runner.jobs().get(org, &req.job_id).await?;
    Ok(json!({ "jobId": req.job_id, "job": rec }))
}

async fn consumer(
    queue: &jetstream::stream::Stream,
    ack_wait: Duration,
    shutdown: &CancellationToken,
) -> Option<jetstream::consumer::Consumer<pull::Config>> {
    loop {
        let c = queue
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.into()),
                    description: Some("Meterline exporter: runs export jobs".into()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait,
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await;
        match c {
            Ok(c) => return Some(c),
            Err(e) => tracing::warn!(error = %e, "creating the jobs consumer failed; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Takes job requests off `JOBS`, at most `workers` at once; a message is
/// fetched only when a worker is free.
async fn work(
    runner: Runner,
    queue: jetstream::stream::Stream,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let ack_wait = Duration::from_secs(settings.ack_wait_secs);
    let Some(consumer) = consumer(&queue, ack_wait, &shutdown).await else {
        return;
    };
    let permits = Arc::new(Semaphore::new(settings.workers.max(1)));
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
                tracing::warn!(error = %e, "fetching from JOBS failed");
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
                let runner = runner.clone();
                let cancel = shutdown.clone();
                in_flight.spawn(async move {
                    process_one(&runner, msg, ack_wait, &cancel).await;
                    drop(permit);
                });
            }
            Some(Err(e)) => tracing::debug!(error = %e, "no job message"),
            None => {}
        }
    }
    let drain = async { while in_flight.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_DEADLINE, drain).await.is_err() {
        tracing::warn!("export jobs did not stop before the deadline");
    }
}

/// Handles one `JOBS` message: runs the job and acknowledges the message
/// once the job is final; asks for redelivery (with backoff) otherwise. A
/// message that is not a job request is recorded as a failure Event for its
/// org (when the subject names one) and dropped.
pub async fn process_one(
    runner: &Runner,
    msg: jetstream::Message,
    ack_wait: Duration,
    cancel: &CancellationToken,
) {
    let msg = Arc::new(msg);
    let req = match parse_request(&msg.subject, &msg.payload) {
        Ok(r) => r,
        Err(reason) => {
            tracing::warn!(subject = %msg.subject, reason, "dropping an unreadable job message");
            if let Some(org) = msg
                .subject
                .split('.')
                .nth(2)
                .filter(|o| subjects::validate_token("orgId", o).is_ok())
            {
                let _ = garbage_event(runner, org, &reason).await;
            }
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
    };
    // Tells the server this replica is still at work, so a long job is not
    // handed to another replica meanwhile.
    let alive = {
        let msg = msg.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(ack_wait / 3).await;
                if msg.ack_with(AckKind::Progress).await.is_err() {
                    return;
                }
            }
        })
    };
    let outcome = runner.run(&req, cancel).await;
    alive.abort();
    let ack = match outcome {
        Outcome::Final(rec) => {
            tracing::debug!(job = %rec.id, status = rec.status.as_str(), "job final");
            msg.double_ack().await.map_err(|e| e.to_string())
        }
        Outcome::Retry(delay) => msg
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| e.to_string()),
    };
    if let Err(e) = ack {
        tracing::warn!(job = %req.job_id, error = %e, "acknowledging a job message failed");
    }
}

/// A job request, checked against the subject it came on.
pub fn parse_request(subject: &str, payload: &[u8]) -> Result<ExportJobRequest, String> {
    let req: ExportJobRequest =
        serde_json::from_slice(payload).map_err(|e| format!("not an export job request: {e}"))?;
    for (what, v) in [
        ("orgId", req.org_id.as_str()),
        ("jobId", req.job_id.as_str()),
    ] {
        subjects::validate_token(what, v).map_err(|e| e.message)?;
    }
    if let Some(s) = &req.schedule_id {
        subjects::validate_token("scheduleId", s).map_err(|e| e.message)?;
    }
    let token = req.schedule_id.as_deref().unwrap_or(ADHOC);
    if subject != subjects::export_job(&req.org_id, token) {
        return Err(format!(
            "a request for org {} and schedule {token} arrived on {subject}",
            req.org_id
        ));
    }
    Ok(req)
}

async fn garbage_event(runner: &Runner, org: &str, reason: &str) -> Result<(), ServiceError> {
    let event = json!({
        "id": uuid::Uuid::now_v7().to_string(),
        "eventName": runner::FAILURE_EVENT,
        "eventTime": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "orgId": org,
        "error": format!("an export job request could not be read: {reason}"),
    });
    let mut headers = meterline_shared::codec::Codec::Json.headers();
    headers.insert(
        meterline_shared::envelope::HEADER_EVENT_NAME,
        runner::FAILURE_EVENT,
    );
    runner
        .js()
        .publish_with_headers(
            subjects::event(org, runner::FAILURE_EVENT),
            headers,
            Bytes::from(serde_json::to_vec(&event).map_err(ServiceError::internal)?),
        )
        .await
        .map_err(|e| ServiceError::unavailable(e.to_string()))?
        .await
        .map_err(|e| ServiceError::unavailable(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_must_match_their_subject() {
        let req = json!({"jobId": "j1", "orgId": "o1", "scheduleId": "s1", "slot": "2026-01-01T00:00:00Z", "trigger": "SCHEDULE"});
        let bytes = serde_json::to_vec(&req).unwrap();
        assert!(parse_request("job.export.o1.s1", &bytes).is_ok());
        assert!(parse_request("job.export.o2.s1", &bytes).is_err());
        assert!(parse_request("job.export.o1.s1", b"garbage").is_err());
        let bad = json!({"jobId": "j.1", "orgId": "o1", "slot": "2026-01-01T00:00:00Z", "trigger": "AD_HOC"});
        assert!(parse_request("job.export.o1.adhoc", &serde_json::to_vec(&bad).unwrap()).is_err());
    }

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let d = Settings::default();
        d.validate().unwrap();
        assert_eq!(d.split_bytes, 6 << 30);
        let small = Settings {
            s3_part_bytes: 1024,
            ..Settings::default()
        };
        assert!(small.validate().is_err());
        let v = serde_json::to_value(Settings::for_tests("nats://x:1")).unwrap();
        let back: Settings = serde_json::from_value(v).unwrap();
        assert_eq!(back.sealing_key.expose(), TEST_SEALING_KEY);
        assert!(serde_json::from_value::<Settings>(json!({"workerz": 1})).is_err());
    }
}
