//! Measurements as submitted (m3ter's `MeasurementRequest`) and as stored on
//! `MEASUREMENTS`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The most measurements one request may carry (m3ter's limit).
pub const MAX_BATCH: usize = 1000;
/// The longest uid m3ter accepts.
pub const MAX_UID_LEN: usize = 50;

/// A submit request: `{"measurements": [...]}`. Items stay raw JSON text
/// until validated, so a failure event can carry the measurement as it was
/// sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest<'a> {
    #[serde(borrow)]
    pub measurements: Vec<&'a serde_json::value::RawValue>,
}

/// One valid measurement, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// The caller's uid, or one Meterline generated when none was sent
    /// (then `generatedUid` is true and it takes no part in de-duplication).
    pub uid: String,
    #[serde(
        default,
        skip_serializing_if = "std::ops::Not::not",
        rename = "generatedUid"
    )]
    pub generated_uid: bool,
    pub meter: String,
    pub account: String,
    pub ts: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ets: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub who: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub what: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", rename = "where")]
    pub where_: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub other: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub measure: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cost: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub income: BTreeMap<String, f64>,
}

/// One message on `usage.<org>.<meter>`: the measurements of one meter from
/// one commit, MessagePack-encoded (`Content-Type: application/msgpack`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeasurementGroup {
    pub org_id: String,
    pub meter: String,
    pub meter_id: String,
    /// When Meterline accepted them (RFC 3339, UTC).
    pub received_at: String,
    pub measurements: Vec<Measurement>,
}

/// The commit marker of one atomic write, on `uidx.<org>.<partition>`: the uids it
/// accepted. Replaying markers rebuilds the uid index; a marker is also where
/// a fingerprint match is checked against the real uid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    /// Days since the Unix epoch of the write (UTC): the 35-day window
    /// counts from here.
    pub day: u32,
    /// Number of measurement messages committed with this marker.
    pub groups: u32,
    pub uids: Vec<String>,
}

/// The reply to a submit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubmitReply {
    /// `accepted` (m3ter's word) whenever the request itself was valid, even
    /// if some measurements in it were rejected.
    pub result: String,
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<Rejection>,
}

/// Why one measurement of a request was rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rejection {
    /// Position in the request's `measurements` array.
    pub index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    pub error_type: ErrorType,
    pub message: String,
}

/// The error types of `ingest.validation.failure` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorType {
    /// Not a JSON object.
    InvalidMeasurement,
    /// `meter`, `account` or `ts` is missing.
    MissingField,
    /// The meter code names no meter of the organization.
    UndefinedMeter,
    /// A data field the meter does not define, or in the wrong category.
    UndefinedField,
    /// A field of the wrong type (a non-numeric measure, say).
    InvalidField,
    /// The same field code in two categories.
    DuplicateField,
    /// The same uid twice in one request.
    DuplicateUid,
    /// `ts` or `ets` is not an ISO-8601 date-time, or `ets` is before `ts`.
    InvalidTimestamp,
    /// `uid` is longer than 50 characters or not a string.
    InvalidUid,
}
