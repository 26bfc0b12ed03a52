//! Requesting one export job: its `PENDING` record in `export_jobs`, then
//! its request on `JOBS`.
//!
//! The record is written with a create (which fails if the key exists) and
//! the request is published with `Nats-Msg-Id` = job id, after the record.
//! So for any slot, however many replicas request it and however often:
//!
//! - the record is created once (one create wins);
//! - a record that exists and is still `PENDING` is published again with the
//!   same message id (a crash between the two writes loses nothing; within
//!   the hour of `JOBS`' duplicate window the server drops the repeat);
//! - a record that is `RUNNING`, `SUCCEEDED` or `FAILED` is left alone: that
//!   slot's job exists, and a restart never requests it twice.

use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use bytes::Bytes;

use meterline_shared::exportjob::{self, ExportJobRecord, ExportJobRequest, JobStatus, Trigger};
use meterline_shared::subjects;

use crate::clock::Clock;
use crate::schedules::Fire;

/// What requesting a slot did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new job: record created and request published.
    Created,
    /// The record existed and was still pending: request published again.
    Republished,
    /// The job exists and is running or done.
    Exists,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("writing the job record failed: {0}")]
    Record(String),
    #[error("publishing the job request failed: {0}")]
    Publish(String),
    #[error("the job record {0} is not readable: {1}")]
    Corrupt(String, String),
}

/// Writes job records and requests.
#[derive(Clone)]
pub struct JobWriter {
    js: jetstream::Context,
    jobs: kv::Store,
    clock: Arc<dyn Clock>,
}

impl JobWriter {
    pub fn new(js: jetstream::Context, jobs: kv::Store, clock: Arc<dyn Clock>) -> JobWriter {
        JobWriter { js, jobs, clock }
    }

    /// Requests the job of `fire`'s slot, once (see the module docs).
    pub async fn request(&self, fire: &Fire) -> Result<Outcome, JobError> {
        let job_id = exportjob::job_id(&fire.org, &fire.schedule, fire.slot);
        let request = ExportJobRequest {
            job_id: job_id.clone(),
            org_id: fire.org.clone(),
            schedule_id: Some(fire.schedule.clone()),
            slot: fire.slot,
            trigger: fire.trigger,
            adhoc: None,
        };
        let key = exportjob::job_key(&fire.org, &job_id);
        let record = ExportJobRecord {
            source_type: fire.source_type.clone(),
            ..ExportJobRecord::pending(&request, self.clock.now())
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| JobError::Record(e.to_string()))?;
        let outcome = match self.jobs.create(&key, Bytes::from(bytes)).await {
            Ok(_) => Outcome::Created,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let existing = self
                    .jobs
                    .get(&key)
                    .await
                    .map_err(|e| JobError::Record(e.to_string()))?;
                let Some(existing) = existing else {
                    // Expired or deleted between the two calls: the slot's
                    // job was there, which is all the scheduler promises.
                    return Ok(Outcome::Exists);
                };
                let existing: ExportJobRecord = serde_json::from_slice(&existing)
                    .map_err(|e| JobError::Corrupt(key.clone(), e.to_string()))?;
                if existing.status != JobStatus::Pending {
                    return Ok(Outcome::Exists);
                }
                // Publish what was recorded (its trigger may differ from ours).
                return self
                    .publish(&ExportJobRequest {
                        trigger: existing.trigger,
                        slot: existing.slot,
                        ..request
                    })
                    .await
                    .map(|_| Outcome::Republished);
            }
            Err(e) => return Err(JobError::Record(e.to_string())),
        };
        self.publish(&request).await?;
        Ok(outcome)
    }

    async fn publish(&self, request: &ExportJobRequest) -> Result<(), JobError> {
        let schedule = request.schedule_id.as_deref().unwrap_or(exportjob::ADHOC);
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", request.job_id.as_str());
        headers.insert("Content-Type", "application/json");
        let payload = serde_json::to_vec(request).map_err(|e| JobError::Publish(e.to_string()))?;
        self.js
            .publish_with_headers(
                subjects::export_job(&request.org_id, schedule),
                headers,
                Bytes::from(payload),
            )
            .await
            .map_err(|e| JobError::Publish(e.to_string()))?
            .await
            .map_err(|e| JobError::Publish(e.to_string()))?;
        let delay = (self.clock.now() - request.slot).num_milliseconds().max(0) as f64 / 1000.0;
        if request.trigger == Trigger::Schedule {
            metrics::histogram!("meterline_scheduler_slot_delay_seconds").record(delay);
        }
        metrics::counter!("meterline_scheduler_jobs_requested_total", "trigger" => trigger_label(request.trigger))
            .increment(1);
        Ok(())
    }
}

fn trigger_label(t: Trigger) -> &'static str {
    match t {
        Trigger::Immediate => "immediate",
        Trigger::Schedule => "schedule",
        Trigger::CatchUp => "catch_up",
        Trigger::Manual => "manual",
        Trigger::AdHoc => "adhoc",
    }
}
