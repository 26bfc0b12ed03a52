//! Job records (`export_jobs`) and schedule cursors (`export_cursors`).
//!
//! Both are changed only by revision-checked writes: a record by
//! read-modify-write retried on conflict, a cursor by one compare-and-set
//! whose failure means another job of the schedule moved it first.

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::{self, kv};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use meterline_shared::exportjob::{cursor_key, job_key, ExportJobRecord, JobStatus};
use meterline_shared::protocol::{ExportsRequest, Page, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
use meterline_shared::{provision, subjects, ErrorCode, ServiceError};

fn unavailable(what: &str, e: impl std::fmt::Display) -> ServiceError {
    ServiceError::unavailable(format!("{what}: {e}"))
}

/// A schedule's cursor: the last `ENTITIES` sequence its exports cover, and
/// the job that moved it there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cursor {
    pub sequence: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
}

impl Cursor {
    /// From a stored value: this JSON, or a bare sequence number.
    pub fn parse(bytes: &[u8]) -> Option<Cursor> {
        serde_json::from_slice(bytes).ok().or_else(|| {
            std::str::from_utf8(bytes)
                .ok()?
                .trim()
                .parse()
                .ok()
                .map(|sequence| Cursor {
                    sequence,
                    job_id: None,
                    updated_at: None,
                })
        })
    }
}

/// The records and cursors of export jobs.
#[derive(Clone)]
pub struct Jobs {
    jobs: kv::Store,
    jobs_stream: jetstream::stream::Stream,
    cursors: kv::Store,
}

impl Jobs {
    pub async fn open(js: &jetstream::Context, replicas: usize) -> anyhow::Result<Jobs> {
        let jobs = provision::ensure_kv(js, provision::export_jobs_bucket(replicas)).await?;
        let cursors = provision::ensure_kv(js, provision::export_cursors_bucket(replicas)).await?;
        let jobs_stream = js
            .get_stream(format!("KV_{}", provision::EXPORT_JOBS_BUCKET))
            .await?;
        Ok(Jobs {
            jobs,
            jobs_stream,
            cursors,
        })
    }

    /// A job's record and its revision.
    pub async fn entry(
        &self,
        org: &str,
        id: &str,
    ) -> Result<Option<(ExportJobRecord, u64)>, ServiceError> {
        let entry = self
            .jobs
            .entry(job_key(org, id))
            .await
            .map_err(|e| unavailable("reading the export job failed", e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let rec = serde_json::from_slice(&e.value).map_err(ServiceError::internal)?;
                Ok(Some((rec, e.revision)))
            }
            _ => Ok(None),
        }
    }

    pub async fn get(&self, org: &str, id: &str) -> Result<ExportJobRecord, ServiceError> {
        subjects::validate_token("orgId", org)?;
        subjects::validate_token("id", id)?;
        self.entry(org, id)
            .await?
            .map(|(r, _)| r)
            .ok_or_else(|| ServiceError::not_found(format!("no export job {id}")))
    }

    /// Stores a new record; `false` if one exists already (kept as it is).
    pub async fn create(&self, org: &str, record: &ExportJobRecord) -> Result<bool, ServiceError> {
        let value = serde_json::to_vec(record).map_err(ServiceError::internal)?;
        match self
            .jobs
            .create(job_key(org, &record.id), value.into())
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(unavailable("storing the export job failed", e)),
        }
    }

    /// Changes a record by `change`, guarded by the revision it was read at;
    /// reads again and retries when someone else wrote in between.
    pub async fn update(
        &self,
        org: &str,
        id: &str,
        mut change: impl FnMut(&mut ExportJobRecord) -> Result<(), ServiceError>,
    ) -> Result<ExportJobRecord, ServiceError> {
        for _ in 0..16 {
            let (mut rec, revision) = self
                .entry(org, id)
                .await?
                .ok_or_else(|| ServiceError::not_found(format!("no export job {id}")))?;
            change(&mut rec)?;
            rec.version += 1;
            let value = serde_json::to_vec(&rec).map_err(ServiceError::internal)?;
            match self
                .jobs
                .update(job_key(org, id), value.into(), revision)
                .await
            {
                Ok(_) => return Ok(rec),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(unavailable("updating the export job failed", e)),
            }
        }
        Err(ServiceError::unavailable(
            "the export job kept changing; try again",
        ))
    }

    /// A schedule's cursor and its revision.
    pub async fn cursor(
        &self,
        org: &str,
        schedule: &str,
    ) -> Result<Option<(Cursor, u64)>, ServiceError> {
        let entry = self
            .cursors
            .entry(cursor_key(org, schedule))
            .await
            .map_err(|e| unavailable("reading the export cursor failed", e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let c = Cursor::parse(&e.value).ok_or_else(|| {
                    ServiceError::internal(format!("export cursor of {schedule} is unreadable"))
                })?;
                Ok(Some((c, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Moves a cursor to `to` if it is still at `revision` (`None`: it must
    /// not exist yet). `Conflict` when another job moved it first.
    pub async fn advance(
        &self,
        org: &str,
        schedule: &str,
        revision: Option<u64>,
        to: &Cursor,
    ) -> Result<(), ServiceError> {
        let key = cursor_key(org, schedule);
        let value: bytes::Bytes = serde_json::to_vec(to)
            .map_err(ServiceError::internal)?
            .into();
        let conflict = || {
            ServiceError::conflict(format!(
                "the cursor of schedule {schedule} was moved by another job"
            ))
        };
        match revision {
            Some(r) => match self.cursors.update(&key, value, r).await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(conflict()),
                Err(e) => Err(unavailable("advancing the export cursor failed", e)),
            },
            None => match self.cursors.create(&key, value).await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Err(conflict()),
                Err(e) => Err(unavailable("advancing the export cursor failed", e)),
            },
        }
    }

    /// An org's jobs, newest first, filtered as m3ter's `listJobStatuses`.
    pub async fn list(&self, org: &str, req: &ExportsRequest) -> Result<Page, ServiceError> {
        subjects::validate_token("orgId", org)?;
        let size = req.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
        if !(1..=MAX_PAGE_SIZE).contains(&size) {
            return Err(ServiceError::bad_request(format!(
                "pageSize must be from 1 to {MAX_PAGE_SIZE}, got {size}"
            )));
        }
        let status = match req.status.as_deref() {
            None | Some("") => None,
            Some(s) => Some(
                serde_json::from_value::<JobStatus>(serde_json::Value::String(s.to_owned()))
                    .map_err(|_| {
                        ServiceError::bad_request(format!(
                            "status must be one of PENDING, RUNNING, SUCCEEDED, FAILED, got {s:?}"
                        ))
                    })?,
            ),
        };
        let start = parse_date("dateCreatedStart", req.date_created_start.as_deref())?;
        let end = parse_date("dateCreatedEnd", req.date_created_end.as_deref())?;
        // Newest first; the token is the sort key of the last one returned.
        let after = match req.next_token.as_deref() {
            Some(t) => Some(parse_token(t)?),
            None => None,
        };
        let wanted = |r: &ExportJobRecord| {
            req.schedule_id
                .as_deref()
                .is_none_or(|s| r.schedule_id.as_deref() == Some(s))
                && status.is_none_or(|s| r.status == s)
                && start.is_none_or(|s| r.date_created >= s)
                && end.is_none_or(|e| r.date_created < e)
                && after
                    .as_ref()
                    .is_none_or(|(t, id)| (r.date_created, &r.id) < (*t, id))
        };
        // The page and one more (to know whether there is a next page).
        let mut newest = Newest::new(size as usize + 1);
        if req.ids.is_empty() {
            self.each_record(org, |r| {
                if wanted(&r) {
                    newest.push(r);
                }
            })
            .await?;
        } else {
            let ids: std::collections::BTreeSet<&String> = req.ids.iter().collect();
            for id in ids {
                match self.get(org, id).await {
                    Ok(r) if wanted(&r) => newest.push(r),
                    Ok(_) => {}
                    Err(e) if e.code == ErrorCode::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let mut page = newest.into_vec();
        let more = page.len() > size as usize;
        page.truncate(size as usize);
        let next_token = if more {
            page.last()
                .map(|r| format!("{}_{}", r.date_created.timestamp_micros(), r.id))
        } else {
            None
        };
        let data = page
            .into_iter()
            .map(|r| serde_json::to_value(r).map_err(ServiceError::internal))
            .collect::<Result<_, _>>()?;
        Ok(Page { data, next_token })
    }

    /// Calls `each` with every record of `org`, read in one pass over the
    /// bucket (the last version of each of the org's keys), so listing
    /// costs one replay, not one request per job.
    async fn each_record(
        &self,
        org: &str,
        mut each: impl FnMut(ExportJobRecord),
    ) -> Result<(), ServiceError> {
        let failed = |e: &dyn std::fmt::Display| unavailable("listing export jobs failed", e);
        let consumer = self
            .jobs_stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: format!("$KV.{}.{org}.*", provision::EXPORT_JOBS_BUCKET),
                deliver_policy: DeliverPolicy::LastPerSubject,
                description: Some("Meterline exporter: listing jobs".into()),
                ..Default::default()
            })
            .await
            .map_err(|e| failed(&e))?;
        // No records: nothing would come (the consumer would wait).
        if consumer.cached_info().num_pending == 0 {
            return Ok(());
        }
        let mut messages = consumer.messages().await.map_err(|e| failed(&e))?;
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(|e| failed(&e))?;
            let removed = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| op.as_str() != "PUT");
            if !removed {
                each(serde_json::from_slice(&msg.payload).map_err(ServiceError::internal)?);
            }
            if msg.info().map_err(|e| failed(&e))?.pending == 0 {
                break;
            }
        }
        Ok(())
    }
}

/// The `n` newest records pushed (by `dateCreated`, then id), kept while
/// the rest go by: a page costs memory for its own records only.
struct Newest {
    n: usize,
    /// Oldest on top.
    heap: std::collections::BinaryHeap<ByAge>,
}

struct ByAge(ExportJobRecord);

impl ByAge {
    fn key(&self) -> (DateTime<Utc>, &str) {
        (self.0.date_created, &self.0.id)
    }
}

impl Ord for ByAge {
    /// Reversed, so that the heap's top is the oldest.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.key().cmp(&self.key())
    }
}

impl PartialOrd for ByAge {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for ByAge {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for ByAge {}

impl Newest {
    fn new(n: usize) -> Newest {
        Newest {
            n,
            heap: std::collections::BinaryHeap::with_capacity(n + 1),
        }
    }

    fn push(&mut self, record: ExportJobRecord) {
        self.heap.push(ByAge(record));
        if self.heap.len() > self.n {
            self.heap.pop();
        }
    }

    /// Newest first.
    fn into_vec(self) -> Vec<ExportJobRecord> {
        // Ascending in the reversed order: newest first.
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|r| r.0)
            .collect()
    }
}

fn parse_date(what: &str, v: Option<&str>) -> Result<Option<DateTime<Utc>>, ServiceError> {
    match v.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => DateTime::parse_from_rfc3339(s)
            .map(|d| Some(d.with_timezone(&Utc)))
            .map_err(|_| {
                ServiceError::bad_request(format!(
                    "{what} must be a date-time like 2026-01-31T00:00:00Z, got {s:?}"
                ))
            }),
    }
}

fn parse_token(t: &str) -> Result<(DateTime<Utc>, String), ServiceError> {
    let bad = || ServiceError::bad_request("nextToken is not one this API returned");
    let (micros, id) = t.split_once('_').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let at = DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
    Ok((at, id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_keeps_the_newest_records_newest_first() {
        use meterline_shared::exportjob::{ExportJobRequest, Trigger};
        let t0 = Utc::now();
        let record = |id: &str, secs: i64| {
            let req = ExportJobRequest {
                job_id: id.into(),
                org_id: "o".into(),
                schedule_id: None,
                slot: t0,
                trigger: Trigger::Manual,
                adhoc: None,
            };
            ExportJobRecord::pending(&req, t0 + chrono::Duration::seconds(secs))
        };
        let mut newest = Newest::new(3);
        // Out of order, with two created in the same instant (then by id).
        for (id, secs) in [("c", 5), ("a", 1), ("e", 9), ("b", 5), ("d", 7), ("f", 0)] {
            newest.push(record(id, secs));
        }
        let ids: Vec<String> = newest.into_vec().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["e", "d", "c"]);
        assert!(Newest::new(2).into_vec().is_empty());
    }

    #[test]
    fn cursors_read_json_and_bare_numbers() {
        assert_eq!(Cursor::parse(b"42").unwrap().sequence, 42);
        let c = Cursor {
            sequence: 7,
            job_id: Some("j".into()),
            updated_at: None,
        };
        assert_eq!(Cursor::parse(&serde_json::to_vec(&c).unwrap()).unwrap(), c);
        assert!(Cursor::parse(b"nope").is_none());
    }

    #[test]
    fn page_tokens_round_trip_and_bad_ones_are_refused() {
        let (t, id) = parse_token("1700000000000000_abc").unwrap();
        assert_eq!(t.timestamp(), 1_700_000_000);
        assert_eq!(id, "abc");
        assert!(parse_token("x").is_err());
        assert!(parse_date("d", Some("yesterday")).is_err());
    }
}
