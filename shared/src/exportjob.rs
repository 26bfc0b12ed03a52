//! The export job contract between the scheduler (which requests jobs), the
//! exporter (which runs them) and the gateway (which lists them and queues
//! ad-hoc and manual runs).
//!
//! A job request is one message on `JOBS` at `job.export.<org>.<schedule>`
//! ([`crate::subjects::export_job`]) whose JetStream message id is the job
//! id. A scheduled job's id is derived from the schedule and its slot time
//! ([`job_id`]), so any number of scheduler replicas publishing the same
//! slot produce one job. The job's record lives in the `export_jobs` KV
//! bucket at `<org>.<job>` ([`job_key`]) and the schedule's cursor, the last
//! `ENTITIES` sequence covered by a successful export, in `export_cursors` at
//! `<org>.<schedule>` ([`cursor_key`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The schedule token of ad-hoc jobs (`job.export.<org>.adhoc`). Schedule
/// ids are server-generated UUIDs, so it cannot name a real schedule.
pub const ADHOC: &str = "adhoc";

/// Why a job was requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Trigger {
    /// The first run of a newly created (or re-activated) schedule.
    Immediate,
    /// A slot of the schedule's frequency.
    Schedule,
    /// One job for all the slots missed while no scheduler ran.
    CatchUp,
    /// `POST .../dataexports/schedules/{id}/run`.
    Manual,
    /// `POST .../dataexports/adhoc`.
    AdHoc,
}

/// A request to run one export job, the payload of a `JOBS` message (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportJobRequest {
    pub job_id: String,
    pub org_id: String,
    /// The schedule whose cursor the job reads and advances; `None` for
    /// ad-hoc jobs, which have no cursor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_id: Option<String>,
    /// The slot the job was requested for (scheduled jobs), or when it was
    /// requested.
    pub slot: DateTime<Utc>,
    pub trigger: Trigger,
    /// Ad-hoc jobs: the request body as accepted by the gateway
    /// (`operationalDataTypes`, `startDate`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adhoc: Option<Value>,
}

/// A job's status, as m3ter names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "PENDING",
            JobStatus::Running => "RUNNING",
            JobStatus::Succeeded => "SUCCEEDED",
            JobStatus::Failed => "FAILED",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed)
    }
}

/// One file a job delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportFile {
    /// Where it was delivered: `s3://bucket/key`, or `export_files:<name>`
    /// for the local-download store.
    pub uri: String,
    pub entity_type: String,
    pub rows: u64,
    pub bytes: u64,
    /// Hex SHA-256 of the object's bytes as stored.
    pub sha256: String,
}

/// The record of one job in `export_jobs` (JSON). The first fields are
/// m3ter's `JobResponse`; the rest are what Meterline adds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportJobRecord {
    pub id: String,
    /// Incremented on every change of the record.
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_id: Option<String>,
    /// `OPERATIONAL` (the only source exported so far) or `USAGE`.
    pub source_type: String,
    pub status: JobStatus,
    pub date_created: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
    pub slot: DateTime<Utc>,
    pub trigger: Trigger,
    /// Rows and bytes written so far (all files, all destinations once).
    #[serde(default)]
    pub rows: u64,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<ExportFile>,
    /// The files' format (`CSV`, `JSONL`) and every destination's manifest
    /// URI, recorded with `files`: a job that moved its cursor can announce
    /// its delivery from the record alone, even if its schedule is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifests: Vec<String>,
    /// The `ENTITIES` window `(from, to]` the job covers, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_sequence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_sequence: Option<u64>,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ExportJobRecord {
    /// A new `PENDING` record for `request`.
    pub fn pending(request: &ExportJobRequest, now: DateTime<Utc>) -> ExportJobRecord {
        ExportJobRecord {
            id: request.job_id.clone(),
            version: 1,
            schedule_id: request.schedule_id.clone(),
            source_type: "OPERATIONAL".into(),
            status: JobStatus::Pending,
            date_created: now,
            started_at: None,
            completed_at: None,
            slot: request.slot,
            trigger: request.trigger,
            rows: 0,
            bytes: 0,
            files: Vec::new(),
            format: None,
            manifests: Vec::new(),
            from_sequence: None,
            to_sequence: None,
            attempts: 0,
            error: None,
        }
    }
}

/// Namespace of job ids derived from slots (a fixed, random UUID).
const JOB_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d2f_41c8_9b0e_4a57_8e1d_3c5a_7f90_b214);

/// The id of the job of `schedule`'s slot at `slot`: the same in every
/// replica and across restarts, a UUID like m3ter's job ids.
pub fn job_id(org: &str, schedule: &str, slot: DateTime<Utc>) -> String {
    let name = format!("{org}/{schedule}/{}", slot.timestamp_millis());
    uuid::Uuid::new_v5(&JOB_NAMESPACE, name.as_bytes()).to_string()
}

/// Key of a job record in `export_jobs`.
pub fn job_key(org: &str, job: &str) -> String {
    format!("{org}.{job}")
}

/// Key of a schedule's cursor in `export_cursors`.
pub fn cursor_key(org: &str, schedule: &str) -> String {
    format!("{org}.{schedule}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_stable_per_slot() {
        let t = DateTime::parse_from_rfc3339("2026-06-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let a = job_id("o", "s", t);
        assert_eq!(a, job_id("o", "s", t));
        assert_ne!(a, job_id("o", "s2", t));
        assert_ne!(a, job_id("o", "s", t + chrono::Duration::minutes(15)));
        assert_eq!(a.len(), 36);
    }

    #[test]
    fn records_round_trip_with_m3ter_names() {
        let req = ExportJobRequest {
            job_id: "j".into(),
            org_id: "o".into(),
            schedule_id: Some("s".into()),
            slot: Utc::now(),
            trigger: Trigger::Schedule,
            adhoc: None,
        };
        let rec = ExportJobRecord::pending(&req, Utc::now());
        let v = serde_json::to_value(&rec).unwrap();
        assert_eq!(v["status"], "PENDING");
        assert_eq!(v["scheduleId"], "s");
        assert_eq!(v["sourceType"], "OPERATIONAL");
        assert!(v.get("dateCreated").is_some());
        let back: ExportJobRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, rec);
    }
}
