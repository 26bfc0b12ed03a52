//! Request and reply bodies of the entities service, shared by every caller
//! (the gateway, bus producers, tests).
//!
//! | subject | body | reply |
//! |---|---|---|
//! | `svc.entities.<org>.<type>.create` | [`EntityRequest`] with `body` (and `parentId` for child types) | the entity |
//! | `svc.entities.<org>.<type>.update` | `id`, `body` with the current `version` | the entity |
//! | `svc.entities.<org>.<type>.delete` | `id` (and optionally `version`) | the deleted entity |
//! | `svc.entities.<org>.<type>.get` | `id` | the entity |
//! | `svc.entities.<org>.<type>.list` | `pageSize`, `nextToken`, `ids`, `codes`, `filters`, `parentId` | [`Page`] |
//! | `svc.entities.<org>.serviceuser.credentials` | `id` of the service user | [`Credentials`] |
//! | `svc.auth.verify` | [`VerifyRequest`] | [`Principal`] |
//! | `svc.ingest.<org>.upload.create` | [`UploadRequest`] with `body` (m3ter's `GetUploadUrlRequest`) | the upload job |
//! | `svc.ingest.<org>.upload.start` | `id` | the upload job, now `running` (409 if it was not `notUploaded`) |
//! | `svc.ingest.<org>.upload.fail` | `id`, `reason` | the upload job, now `failed` |
//! | `svc.ingest.<org>.upload.get` | `id` | the upload job |
//! | `svc.ingest.<org>.upload.list` | `pageSize`, `nextToken`, `dateCreatedStart`, `dateCreatedEnd` | [`Page`] of upload jobs |
//!
//! Who is asking goes in the `Meterline-Actor` header. Errors come back in
//! the micro-service error headers (see [`crate::bus`]) with the HTTP status
//! as code.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The largest page a list returns.
pub const MAX_PAGE_SIZE: u32 = 100;
/// The page size when none is asked for (m3ter's default).
pub const DEFAULT_PAGE_SIZE: u32 = 10;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntityRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The parent's id for child collections (a bill's line items, a
    /// balance's transactions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// Expected current version, for delete (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<String>,
    /// Equality filters on top-level fields, e.g. `accountId`.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub filters: Map<String, Value>,
}

/// One page of a list, as m3ter returns it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    pub data: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

/// A newly issued access key. The secret is shown once, here, and stored
/// only as a hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Credentials {
    pub org_id: String,
    pub service_user_id: String,
    pub access_key: String,
    pub secret: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyRequest {
    pub access_key: String,
    pub secret: String,
}

/// Who a verified access key belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Principal {
    pub org_id: String,
    pub service_user_id: String,
}

/// A request about measurement file-upload jobs (`svc.ingest.<org>.upload.<op>`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UploadRequest {
    /// The job, for everything but `create` and `list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// For `create`: `fileName`, `contentType`, `contentLength` as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// For `fail`: why the upload failed, shown on the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    /// ISO-8601; jobs created on or after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_created_start: Option<String>,
    /// ISO-8601; jobs created before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_created_end: Option<String>,
}

/// An uploaded file announced on `UPLOADS` (`upload.<org>.<job>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadedFile {
    pub org_id: String,
    pub job_id: String,
    /// Bytes stored.
    pub size: u64,
}

/// Name of the object holding an upload job's file in `upload_files`.
pub fn upload_object_name(org: &str, job: &str) -> String {
    format!("{org}/{job}")
}

/// A request to the exporter (`svc.exporter.<org>.jobs.<op>`, ops in
/// [`crate::subjects::export_ops`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExportsRequest {
    /// The job, for `get` and `files`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `list`: only this schedule's jobs; `run`: the schedule to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_id: Option<String>,
    /// `list`: only jobs with this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
    /// ISO-8601; jobs created on or after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_created_start: Option<String>,
    /// ISO-8601; jobs created before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_created_end: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    /// `adhoc`: the request body as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}
