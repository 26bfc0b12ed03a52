//! The notifier's requests: the events API over `EVENTS`, evaluating a
//! calculation, activating a webhook, and the dead letters.
//!
//! | op (`svc.notifier.<org>.<op>`) | body | reply |
//! |---|---|---|
//! | `events.list` | `pageSize`, `nextToken`, `eventName`, `resourceId`, `accountId`, `eventType`, `ids` | `{"data": [...], "nextToken"}` |
//! | `events.get` | `id` | one event |
//! | `events.types` | — | `{"events": [...]}` |
//! | `events.fields` | `eventName` | `{"events": {"<name>": {"new.x": "double", ...}}}` |
//! | `evaluate` | `calculation`, and `eventId` or `eventName` | `{"success": bool, "errorMessage"?}` |
//! | `webhook.active` | `id`, `active` | the webhook |
//! | `deadletters.list` | `pageSize`, `nextToken` | `{"data": [...], "nextToken"}` |
//! | `deadletters.replay` | `id` | `{"id", "replayed": true}` |
//!
//! An event's `id` in this API is its position in `EVENTS` (a decimal
//! string): it is stable for the event's 28 days and finds it in one read.
//! Lists go oldest first; `nextToken` is the position to continue from.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::push};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use meterline_shared::envelope::HEADER_ACTOR;
use meterline_shared::protocol::{EntityRequest, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
use meterline_shared::subjects::{self, notifier_ops as ops, validate_token};
use meterline_shared::{bus, registry, schema, ServiceError};

use crate::fire::Delivery;
use crate::Notifier;

/// The most messages one list request reads before it answers with what it
/// found and a `nextToken`.
const MAX_SCAN: u64 = 5_000;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Request {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub page_size: Option<u32>,
    #[serde(default)]
    pub next_token: Option<String>,
    #[serde(default)]
    pub event_name: Option<String>,
    #[serde(default)]
    pub resource_id: Option<String>,
    #[serde(default)]
    pub account_id: Option<String>,
    #[serde(default)]
    pub event_type: Option<String>,
    #[serde(default)]
    pub ids: Vec<String>,
    #[serde(default)]
    pub calculation: Option<String>,
    #[serde(default)]
    pub event_id: Option<String>,
    #[serde(default)]
    pub active: Option<bool>,
}

fn bad(m: impl Into<String>) -> ServiceError {
    ServiceError::bad_request(m)
}

fn to_bytes(v: &Value) -> Result<Bytes, ServiceError> {
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(ServiceError::internal)
}

/// Routes one request by its subject.
pub async fn dispatch(n: &Notifier, msg: &async_nats::Message) -> Result<Bytes, ServiceError> {
    let rest = msg
        .subject
        .as_str()
        .strip_prefix("svc.notifier.")
        .ok_or_else(|| bad(format!("unexpected subject {}", msg.subject)))?;
    let (org, op) = rest
        .split_once('.')
        .ok_or_else(|| bad(format!("unexpected subject {}", msg.subject)))?;
    validate_token("orgId", org)?;
    let req: Request = if msg.payload.is_empty() {
        Request::default()
    } else {
        serde_json::from_slice(&msg.payload).map_err(|e| bad(format!("malformed request: {e}")))?
    };
    let id = || {
        let id = req.id.as_deref().ok_or_else(|| bad("id is required"))?;
        validate_token("id", id)?;
        Ok::<_, ServiceError>(id)
    };
    match op {
        ops::EVENTS_LIST => to_bytes(&list_events(n, org, &req).await?),
        ops::EVENTS_GET => to_bytes(&get_event(n, org, id()?).await?),
        ops::EVENTS_TYPES => to_bytes(&json!({ "events": event_types() })),
        ops::EVENTS_FIELDS => {
            let name = req
                .event_name
                .as_deref()
                .ok_or_else(|| bad("eventName is required"))?;
            to_bytes(&json!({ "events": { name: event_fields(name)? } }))
        }
        ops::EVALUATE => to_bytes(&evaluate(n, org, &req).await?),
        ops::WEBHOOK_ACTIVE => {
            let active = req
                .active
                .ok_or_else(|| bad("active (true or false) is required"))?;
            to_bytes(&set_active(n, org, id()?, active).await?)
        }
        ops::DEAD_LETTERS_LIST => to_bytes(&list_dead_letters(n, org, &req).await?),
        ops::DEAD_LETTERS_REPLAY => to_bytes(&replay(n, org, id()?).await?),
        other => Err(ServiceError::not_found(format!(
            "no notifier operation {other:?}"
        ))),
    }
}

/// Every event name rules can be written for.
pub fn event_types() -> Vec<String> {
    let mut names: Vec<String> = registry::REGISTRY
        .iter()
        .filter(|t| t.http)
        .flat_map(|t| {
            ["created", "updated", "deleted"].map(|a| format!("{}.{a}", t.event_prefix()))
        })
        .collect();
    names.extend(
        [
            "ingest.validation.failure",
            "dataexport.job.success",
            "dataexport.job.failure",
            crate::deliver::ERROR_EVENT,
        ]
        .map(str::to_owned),
    );
    names.sort();
    names
}

fn field_type(node: &Value) -> &'static str {
    let node = match node.get("allOf").and_then(Value::as_array) {
        Some(all) if all.len() == 1 => &all[0],
        _ => node,
    };
    match node.get("type").and_then(Value::as_str) {
        Some("string") => "string",
        Some("number") => "double",
        Some("integer") if node.get("format").and_then(Value::as_str) == Some("int64") => "long",
        Some("integer") => "int",
        Some("boolean") => "boolean",
        Some("array") => "array",
        _ => "map",
    }
}

/// The `new.*` / `old.*` fields of an entity event and their types, from
/// the entity's response schema.
pub fn event_fields(event_name: &str) -> Result<Map<String, Value>, ServiceError> {
    let unknown = || {
        ServiceError::not_found(format!(
            "{event_name:?} is not an event name with fields; see events/types"
        ))
    };
    let mut parts = event_name.split('.');
    let (Some(category), Some(ty), Some(action), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(unknown());
    };
    let t = registry::get(ty)
        .filter(|t| t.category.as_str() == category && t.http)
        .ok_or_else(unknown)?;
    let sides: &[&str] = match action {
        "created" => &["new"],
        "updated" => &["new", "old"],
        "deleted" => &["old"],
        _ => return Err(unknown()),
    };
    let (props, _) = schema::flatten(t.response).ok_or_else(unknown)?;
    let mut out = Map::new();
    for side in sides {
        for (name, node) in &props {
            out.insert(format!("{side}.{name}"), Value::from(field_type(node)));
        }
    }
    Ok(out)
}

/// An event as the API shows it.
fn render(seq: u64, payload: &[u8]) -> Value {
    let stored: Value = serde_json::from_slice(payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()));
    json!({
        "id": seq.to_string(),
        "eventName": stored.get("eventName").cloned().unwrap_or(Value::Null),
        "eventTime": stored.get("eventTime").cloned().unwrap_or(Value::Null),
        "m3terEvent": stored,
    })
}

fn seq_of(id: &str) -> Result<u64, ServiceError> {
    id.parse::<u64>()
        .ok()
        .filter(|s| *s > 0)
        .ok_or_else(|| ServiceError::not_found(format!("no event {id:?}")))
}

async fn load_event(n: &Notifier, org: &str, id: &str) -> Result<(u64, Value), ServiceError> {
    let seq = seq_of(id)?;
    let msg = n
        .events
        .direct_get(seq)
        .await
        .map_err(|_| ServiceError::not_found(format!("no event {id:?}")))?;
    if msg.subject.as_str().split('.').nth(1) != Some(org) {
        return Err(ServiceError::not_found(format!("no event {id:?}")));
    }
    let value = serde_json::from_slice(&msg.payload).map_err(ServiceError::internal)?;
    Ok((seq, value))
}

pub async fn get_event(n: &Notifier, org: &str, id: &str) -> Result<Value, ServiceError> {
    let seq = seq_of(id)?;
    let msg = n
        .events
        .direct_get(seq)
        .await
        .map_err(|_| ServiceError::not_found(format!("no event {id:?}")))?;
    if msg.subject.as_str().split('.').nth(1) != Some(org) {
        return Err(ServiceError::not_found(format!("no event {id:?}")));
    }
    Ok(render(seq, &msg.payload))
}

fn page_size(req: &Request) -> Result<usize, ServiceError> {
    let size = req.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
    if !(1..=MAX_PAGE_SIZE).contains(&size) {
        return Err(bad(format!("pageSize must be 1 to {MAX_PAGE_SIZE}")));
    }
    Ok(size as usize)
}

fn start_of(req: &Request) -> Result<u64, ServiceError> {
    match req.next_token.as_deref() {
        None | Some("") => Ok(1),
        Some(t) => t
            .parse::<u64>()
            .map_err(|_| bad(format!("nextToken {t:?} is not one this API returned"))),
    }
}

/// Reads `filter` from `start`, keeping what `keep` accepts, until `limit`
/// are kept, the stream ends, or [`MAX_SCAN`] messages were read. Returns
/// the kept `(seq, payload)` pairs and where to continue, if anywhere.
async fn scan(
    stream: &jetstream::stream::Stream,
    filter: String,
    start: u64,
    limit: usize,
    keep: impl Fn(&[u8]) -> bool,
) -> Result<(Vec<(u64, Bytes)>, Option<u64>), ServiceError> {
    let unavailable =
        |e: String| ServiceError::unavailable(format!("reading the stream failed: {e}"));
    let mut consumer = stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: format!("_INBOX.notifier-scan.{}", uuid::Uuid::new_v4().simple()),
            filter_subject: filter,
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start.max(1),
            },
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let pending = consumer
        .info()
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .num_pending;
    let mut out = Vec::new();
    if pending == 0 {
        return Ok((out, None));
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let mut scanned = 0u64;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .map_err(|_| unavailable("timed out".into()))?;
        let Some(Ok(msg)) = msg else {
            return Err(unavailable("the consumer ended".into()));
        };
        let info = msg.info().map_err(|e| unavailable(e.to_string()))?;
        let (seq, left) = (info.stream_sequence, info.pending);
        scanned += 1;
        if keep(&msg.payload) {
            out.push((seq, msg.payload.clone()));
        }
        if left == 0 {
            return Ok((out, None));
        }
        if out.len() >= limit || scanned >= MAX_SCAN {
            return Ok((out, Some(seq + 1)));
        }
    }
}

fn matches_account(v: &Value, account: &str) -> bool {
    let has = |x: Option<&Value>| {
        x.and_then(|x| x.get("accountId")).and_then(Value::as_str) == Some(account)
    };
    has(Some(v)) || has(v.get("new")) || has(v.get("old"))
}

pub async fn list_events(n: &Notifier, org: &str, req: &Request) -> Result<Value, ServiceError> {
    let limit = page_size(req)?;
    if !req.ids.is_empty() {
        let mut data = Vec::new();
        for id in req.ids.iter().take(MAX_PAGE_SIZE as usize) {
            if let Ok(e) = get_event(n, org, id).await {
                data.push(e);
            }
        }
        return Ok(json!({ "data": data }));
    }
    if let Some(r) = &req.resource_id {
        validate_token("resourceId", r)?;
    }
    // The narrowest subject filter the query allows.
    let filter = match req.event_name.as_deref() {
        Some(name) => {
            let parts: Vec<&str> = name.split('.').collect();
            let entity = match parts[..] {
                [cat, ty, _] => registry::get(ty).filter(|t| t.category.as_str() == cat),
                _ => None,
            };
            match entity {
                Some(t) => format!(
                    "evt.{org}.entity.{}.{}",
                    t.name,
                    req.resource_id.as_deref().unwrap_or("*")
                ),
                None => {
                    if name
                        .split('.')
                        .any(|p| validate_token("eventName", p).is_err())
                    {
                        return Err(bad(format!("eventName {name:?} is not an event name")));
                    }
                    // Only these names are stored besides entity events.
                    let stored = ["ingest", "dataexport", "integration", "scheduled"];
                    if !stored.iter().any(|p| name.starts_with(&format!("{p}."))) {
                        return Ok(json!({ "data": [] }));
                    }
                    subjects::event(org, name)
                }
            }
        }
        None => match req.resource_id.as_deref() {
            Some(r) => format!("evt.{org}.entity.*.{r}"),
            None => format!("evt.{org}.>"),
        },
    };
    let (event_name, event_type, account) = (
        req.event_name.clone(),
        req.event_type.clone(),
        req.account_id.clone(),
    );
    let keep = move |payload: &[u8]| {
        if event_name.is_none() && event_type.is_none() && account.is_none() {
            return true;
        }
        let Ok(v) = serde_json::from_slice::<Value>(payload) else {
            return false;
        };
        let name = v
            .get("eventName")
            .and_then(Value::as_str)
            .unwrap_or_default();
        event_name.as_deref().is_none_or(|n| n == name)
            && event_type
                .as_deref()
                .is_none_or(|t| name == t || name.starts_with(&format!("{t}.")))
            && account.as_deref().is_none_or(|a| matches_account(&v, a))
    };
    let (found, next) = scan(&n.events, filter, start_of(req)?, limit, keep).await?;
    let data: Vec<Value> = found.iter().map(|(s, p)| render(*s, p)).collect();
    let mut page = json!({ "data": data });
    if let Some(next) = next {
        page["nextToken"] = Value::String(next.to_string());
    }
    Ok(page)
}

/// `POST notifications/evaluate`: a calculation against a stored event
/// (`eventId`), or against an event with no fields (`eventName` only).
pub async fn evaluate(n: &Notifier, org: &str, req: &Request) -> Result<Value, ServiceError> {
    let text = req
        .calculation
        .as_deref()
        .ok_or_else(|| bad("calculation is required"))?;
    let event = match (&req.event_id, &req.event_name) {
        (Some(id), _) => load_event(n, org, id).await?.1,
        (None, Some(name)) => json!({ "eventName": name, "new": null, "old": null }),
        (None, None) => {
            return Err(bad(
                "give eventId (an event to evaluate against) or eventName",
            ))
        }
    };
    let calc = match meterline_calc::Calculation::parse(text) {
        Ok(c) => c,
        Err(e) => {
            return Ok(json!({ "success": false, "errorMessage": format!("calculation: {e}") }))
        }
    };
    Ok(match calc.eval(&event) {
        Ok(b) => json!({ "success": b }),
        Err(e) => json!({ "success": false, "errorMessage": e.message }),
    })
}

async fn entities_call(
    n: &Notifier,
    org: &str,
    op: &str,
    req: &EntityRequest,
) -> Result<Value, ServiceError> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(HEADER_ACTOR, "notifier");
    let payload = Bytes::from(serde_json::to_vec(req).map_err(ServiceError::internal)?);
    let reply = bus::request(
        &n.client,
        subjects::entities_request(org, "webhook", op),
        headers,
        payload,
    )
    .await?;
    serde_json::from_slice(&reply).map_err(ServiceError::internal)
}

/// Sets a webhook's `active` through the entities service (a versioned
/// update, retried if someone else wrote in between).
pub async fn set_active(
    n: &Notifier,
    org: &str,
    id: &str,
    active: bool,
) -> Result<Value, ServiceError> {
    for _ in 0..5 {
        let get = EntityRequest {
            id: Some(id.to_owned()),
            ..Default::default()
        };
        let mut current = entities_call(n, org, subjects::ops::GET, &get).await?;
        if current.get("active").and_then(Value::as_bool) == Some(active) {
            return Ok(current);
        }
        current["active"] = Value::Bool(active);
        let update = EntityRequest {
            id: Some(id.to_owned()),
            body: Some(current),
            ..Default::default()
        };
        match entities_call(n, org, subjects::ops::UPDATE, &update).await {
            Err(e) if e.code == meterline_shared::ErrorCode::Conflict => continue,
            other => return other,
        }
    }
    Err(ServiceError::conflict(
        "the webhook keeps changing; try again",
    ))
}

pub async fn list_dead_letters(
    n: &Notifier,
    org: &str,
    req: &Request,
) -> Result<Value, ServiceError> {
    let limit = page_size(req)?;
    let (found, next) = scan(
        &n.dead_letters,
        format!("deadletter.{org}.*"),
        start_of(req)?,
        limit,
        |_| true,
    )
    .await?;
    let data: Vec<Value> = found
        .iter()
        .filter_map(|(_, p)| serde_json::from_slice(p).ok())
        .collect();
    let mut page = json!({ "data": data });
    if let Some(next) = next {
        page["nextToken"] = Value::String(next.to_string());
    }
    Ok(page)
}

/// Queues a dead letter's delivery again (same notification id, attempts
/// from one) and removes the dead letter.
pub async fn replay(n: &Notifier, org: &str, id: &str) -> Result<Value, ServiceError> {
    let msg = n
        .dead_letters
        .direct_get_last_for_subject(subjects::dead_letter(org, id))
        .await
        .map_err(|_| ServiceError::not_found(format!("no dead letter {id:?}")))?;
    let letter: Value = serde_json::from_slice(&msg.payload).map_err(ServiceError::internal)?;
    let delivery: Delivery =
        serde_json::from_value(letter["delivery"].clone()).map_err(ServiceError::internal)?;
    n.enqueue(
        std::slice::from_ref(&delivery),
        &format!(".replay.{}", msg.sequence),
    )
    .await?;
    n.dead_letters
        .delete_message(msg.sequence)
        .await
        .map_err(|e| ServiceError::unavailable(format!("removing the dead letter failed: {e}")))?;
    Ok(json!({ "id": id, "replayed": true }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_come_from_the_entity_schema() {
        let f = event_fields("configuration.commitment.updated").unwrap();
        assert_eq!(f["new.amountSpent"], "double");
        assert_eq!(f["old.amount"], "double");
        assert_eq!(f["new.accountId"], "string");
        let created = event_fields("configuration.commitment.created").unwrap();
        assert!(created.keys().all(|k| k.starts_with("new.")));
        assert!(event_fields("configuration.nothing.created").is_err());
        assert!(event_fields("billing.commitment.created").is_err());
        let types = event_types();
        assert!(types.contains(&"configuration.commitment.updated".to_owned()));
        assert!(types.contains(&"integration.webhook.error".to_owned()));
    }
}
