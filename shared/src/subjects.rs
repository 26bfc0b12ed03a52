//! The subject grammar of the bus, and validation of every user-supplied token
//! that ends up in a subject.
//!
//! | stream | subject |
//! |---|---|
//! | `ENTITIES` | `ent.<org>.<type>.<id>` |
//! | `EVENTS` | `evt.<org>.<name...>`; entity events `evt.<org>.entity.<type>.<id>` |
//! | `UPLOADS` | `upload.<org>.<job>` |
//! | `JOBS` | `job.export.<org>.<schedule>` |
//! | `EXPORTS` | `export.complete.<org>.<schedule>` |
//! | `DELIVERIES` | `notify.<org>.<webhook>` |
//! | `DEADLETTERS` | `deadletter.<org>.<notification>` |
//! | requests | `svc.<service>.<org>.<...>.<op>` |

use crate::error::ServiceError;

pub const ENTITIES_STREAM: &str = "ENTITIES";
pub const EVENTS_STREAM: &str = "EVENTS";
pub const MEASUREMENTS_STREAM: &str = "MEASUREMENTS";

pub const UPLOADS_STREAM: &str = "UPLOADS";
pub const JOBS_STREAM: &str = "JOBS";
pub const EXPORTS_STREAM: &str = "EXPORTS";
pub const DELIVERIES_STREAM: &str = "DELIVERIES";
pub const DEAD_LETTERS_STREAM: &str = "DEADLETTERS";

/// `notify.<org>.<webhook>`: one pending webhook delivery (a fired
/// notification for one webhook), on the `DELIVERIES` work queue.
pub fn delivery(org: &str, webhook: &str) -> String {
    format!("notify.{org}.{webhook}")
}

/// `deadletter.<org>.<notification>`: a delivery that failed its last
/// retry, kept on `DEADLETTERS` until it is replayed or expires.
pub fn dead_letter(org: &str, notification: &str) -> String {
    format!("deadletter.{org}.{notification}")
}

/// `svc.notifier.<org>.<op...>`: requests to the notifier (events API,
/// evaluation, webhook activation, dead letters); see [`notifier_ops`].
pub fn notifier_request(org: &str, op: &str) -> String {
    format!("svc.notifier.{org}.{op}")
}

/// Operations of the notifier, the tokens after the org in its request
/// subjects.
pub mod notifier_ops {
    pub const EVENTS_LIST: &str = "events.list";
    pub const EVENTS_GET: &str = "events.get";
    pub const EVENTS_TYPES: &str = "events.types";
    pub const EVENTS_FIELDS: &str = "events.fields";
    pub const EVALUATE: &str = "evaluate";
    pub const WEBHOOK_ACTIVE: &str = "webhook.active";
    pub const DEAD_LETTERS_LIST: &str = "deadletters.list";
    pub const DEAD_LETTERS_REPLAY: &str = "deadletters.replay";
}

/// `job.export.<org>.<schedule>`: a request to run one export job (ad-hoc
/// jobs use [`crate::exportjob::ADHOC`] as the schedule token).
pub fn export_job(org: &str, schedule: &str) -> String {
    format!("job.export.{org}.{schedule}")
}

/// `export.complete.<org>.<schedule>`: the public announcement of a
/// delivered export.
pub fn export_complete(org: &str, schedule: &str) -> String {
    format!("export.complete.{org}.{schedule}")
}

/// Operations of the exporter, the last token of
/// `svc.exporter.<org>.jobs.<op>`.
pub mod export_ops {
    /// Export jobs of the org, newest first, filtered.
    pub const LIST: &str = "list";
    pub const GET: &str = "get";
    /// The files of a job without destination, to be downloaded.
    pub const FILES: &str = "files";
    /// Queue an ad-hoc export.
    pub const ADHOC: &str = "adhoc";
    /// Queue a job for a schedule now, from its cursor.
    pub const RUN: &str = "run";
    pub const ALL: [&str; 5] = [LIST, GET, FILES, ADHOC, RUN];
}

/// `svc.exporter.<org>.jobs.<op>`: export jobs.
pub fn exporter_request(org: &str, op: &str) -> String {
    format!("svc.exporter.{org}.jobs.{op}")
}

/// `svc.ingest.<org>.submit`: a batch of measurements.
pub fn ingest_submit(org: &str) -> String {
    format!("svc.ingest.{org}.submit")
}

/// Operations on measurement file-upload jobs, the last token of
/// `svc.ingest.<org>.upload.<op>`.
pub mod upload_ops {
    /// Create a job for a file about to be uploaded (status `notUploaded`).
    pub const CREATE: &str = "create";
    /// Claim a job for its one upload (`notUploaded` → `running`).
    pub const START: &str = "start";
    /// Record that an upload failed before its file was complete.
    pub const FAIL: &str = "fail";
    pub const GET: &str = "get";
    pub const LIST: &str = "list";
}

/// `svc.ingest.<org>.upload.<op>`: file-upload jobs.
pub fn ingest_upload(org: &str, op: &str) -> String {
    format!("svc.ingest.{org}.upload.{op}")
}

/// `upload.<org>.<job>`: an uploaded file waiting to be processed, on the
/// `UPLOADS` work queue.
pub fn upload_job(org: &str, job: &str) -> String {
    format!("upload.{org}.{job}")
}

/// The longest token Meterline accepts from a user. m3ter ids are UUIDs (36
/// characters) and codes are at most 80; anything far longer is a mistake.
pub const MAX_TOKEN_LEN: usize = 128;

/// Checks that `value` can be used as one subject token: not empty, at most
/// [`MAX_TOKEN_LEN`] bytes, and free of `.`, `*`, `>`, whitespace and control
/// characters. `what` names the value in the error message.
pub fn validate_token(what: &str, value: &str) -> Result<(), ServiceError> {
    if value.is_empty() {
        return Err(ServiceError::bad_request(format!(
            "{what} must not be empty"
        )));
    }
    if value.len() > MAX_TOKEN_LEN {
        return Err(ServiceError::bad_request(format!(
            "{what} is longer than {MAX_TOKEN_LEN} characters"
        )));
    }
    if let Some(c) = value
        .chars()
        .find(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control())
    {
        return Err(ServiceError::bad_request(format!(
            "{what} {value:?} contains {c:?}, which is not allowed in an id"
        )));
    }
    Ok(())
}

/// `ent.<org>.<type>.<id>`: the subject of one entity's history.
pub fn entity(org: &str, entity_type: &str, id: &str) -> String {
    format!("ent.{org}.{entity_type}.{id}")
}

/// `ent.<org>.<type>.*`: every entity of one type in one org.
pub fn entity_type_filter(org: &str, entity_type: &str) -> String {
    format!("ent.{org}.{entity_type}.*")
}

/// `evt.<org>.entity.<type>.<id>`: where an entity mutation appears on `EVENTS`.
pub fn entity_event(org: &str, entity_type: &str, id: &str) -> String {
    format!("evt.{org}.entity.{entity_type}.{id}")
}

/// `evt.<org>.<event name>`: any other event, by its dotted name.
pub fn event(org: &str, event_name: &str) -> String {
    format!("evt.{org}.{event_name}")
}

/// Operations of the entities service, the last token of its request subjects.
pub mod ops {
    pub const CREATE: &str = "create";
    pub const UPDATE: &str = "update";
    pub const DELETE: &str = "delete";
    pub const GET: &str = "get";
    pub const LIST: &str = "list";
    pub const ALL: [&str; 5] = [CREATE, UPDATE, DELETE, GET, LIST];
}

/// `svc.entities.<org>.<type>.<op>`.
pub fn entities_request(org: &str, entity_type: &str, op: &str) -> String {
    format!("svc.entities.{org}.{entity_type}.{op}")
}

/// `svc.entities.<org>.serviceuser.credentials`: issue an access key and secret.
pub fn credentials_request(org: &str) -> String {
    format!("svc.entities.{org}.serviceuser.credentials")
}

/// Verifies a service user's access key and secret; answered by `entities`.
pub const AUTH_VERIFY: &str = "svc.auth.verify";

/// Splits `ent.<org>.<type>.<id>` into its three tokens.
pub fn parse_entity(subject: &str) -> Option<(&str, &str, &str)> {
    let rest = subject.strip_prefix("ent.")?;
    let mut it = rest.splitn(3, '.');
    let (org, ty, id) = (it.next()?, it.next()?, it.next()?);
    if id.contains('.') {
        return None;
    }
    Some((org, ty, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_with_subject_characters_are_rejected() {
        for bad in [
            "a.b",
            "a*",
            ">",
            "a b",
            "a\tb",
            "",
            "x\u{7}",
            &"x".repeat(129),
        ] {
            assert!(validate_token("id", bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "01J9ZQ",
            "acme-corp",
            "org_1",
            "ÄÖÜ",
            "3f2b5c1e-7a1d-4c55-9a3e-1b2c3d4e5f60",
        ] {
            validate_token("id", good).unwrap();
        }
    }

    #[test]
    fn entity_subjects_round_trip() {
        let s = entity("org1", "account", "01ABC");
        assert_eq!(parse_entity(&s), Some(("org1", "account", "01ABC")));
        assert_eq!(parse_entity("evt.a.b.c"), None);
        assert_eq!(entity_event("o", "meter", "m1"), "evt.o.entity.meter.m1");
    }
}
