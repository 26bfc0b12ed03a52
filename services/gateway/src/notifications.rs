//! Routes of the notifier: m3ter's events API, `notifications/evaluate` and
//! webhook activation, plus Meterline's dead letters. Each becomes one
//! request on `svc.notifier.<org>.<op>`; the reply is returned as is.
//!
//! | method | path | op |
//! |---|---|---|
//! | GET | `/organizations/{orgId}/events` | `events.list` |
//! | GET | `/organizations/{orgId}/events/{id}` | `events.get` |
//! | GET | `/organizations/{orgId}/events/types` | `events.types` |
//! | GET | `/organizations/{orgId}/events/fields?eventName=` | `events.fields` |
//! | POST | `/organizations/{orgId}/notifications/evaluate` | `evaluate` |
//! | PUT | `/organizations/{orgId}/integrationdestinations/webhooks/{id}/active?active=` | `webhook.active` |
//! | GET | `/organizations/{orgId}/notifications/deadletters` | `deadletters.list` |
//! | POST | `/organizations/{orgId}/notifications/deadletters/{id}/replay` | `deadletters.replay` |
//!
//! Rules, webhooks and their links are ordinary entities, served by the
//! generic entity routes.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::{Extension, Router};
use meterline_shared::protocol::MAX_PAGE_SIZE;
use meterline_shared::subjects::{self, notifier_ops as ops};
use serde_json::{json, Map, Value};

use crate::auth::Caller;
use crate::body::LimitedBody;
use crate::error::ApiError;
use crate::forward;
use crate::AppState;

/// The routes, for the authenticated part of the router.
pub fn routes(state: &AppState) -> Router {
    Router::new()
        .route("/organizations/{orgId}/events", get(list_events))
        .route("/organizations/{orgId}/events/types", get(event_types))
        .route("/organizations/{orgId}/events/fields", get(event_fields))
        .route("/organizations/{orgId}/events/{id}", get(get_event))
        .route(
            "/organizations/{orgId}/notifications/evaluate",
            post(evaluate),
        )
        .route(
            "/organizations/{orgId}/integrationdestinations/webhooks/{id}/active",
            put(set_active),
        )
        .route(
            "/organizations/{orgId}/notifications/deadletters",
            get(list_dead_letters),
        )
        .route(
            "/organizations/{orgId}/notifications/deadletters/{id}/replay",
            post(replay),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::ratelimit::limit_config_routes,
        ))
        .with_state(state.clone())
}

async fn call(
    app: &AppState,
    caller: &Caller,
    op: &str,
    body: Value,
) -> Result<Response, ApiError> {
    let subject = subjects::notifier_request(&caller.org_id, op);
    let actor = Some(caller.service_user_id.as_str());
    forward::request(app, subject, actor, Bytes::from(body.to_string()))
        .await
        .map(forward::json)
}

/// A list query: `pageSize` (1..=100), `nextToken`, `ids` (repeated or
/// comma separated) and the string filters `allowed` names.
fn query(raw: Option<&str>, allowed: &[&str]) -> Result<Value, ApiError> {
    let mut out = Map::new();
    let mut ids: Vec<Value> = Vec::new();
    for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "pageSize" => {
                let n = v
                    .trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "pageSize must be an integer from 1 to {MAX_PAGE_SIZE}, got {v:?}"
                        ))
                    })?;
                out.insert("pageSize".into(), json!(n));
            }
            "ids" => ids.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| json!(s)),
            ),
            key if !v.is_empty() && (key == "nextToken" || allowed.contains(&key)) => {
                out.insert(key.to_owned(), json!(v));
            }
            _ => {}
        }
    }
    if !ids.is_empty() {
        out.insert("ids".into(), Value::Array(ids));
    }
    Ok(Value::Object(out))
}

async fn list_events(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let body = query(
        q.as_deref(),
        &["eventName", "resourceId", "accountId", "eventType"],
    )?;
    call(&app, &caller, ops::EVENTS_LIST, body).await
}

async fn get_event(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((_, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    subjects::validate_token("id", &id)?;
    call(&app, &caller, ops::EVENTS_GET, json!({ "id": id })).await
}

async fn event_types(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    call(&app, &caller, ops::EVENTS_TYPES, json!({})).await
}

async fn event_fields(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let body = query(q.as_deref(), &["eventName"])?;
    if body.get("eventName").is_none() {
        return Err(ApiError::bad_request("eventName is required"));
    }
    call(&app, &caller, ops::EVENTS_FIELDS, body).await
}

async fn evaluate(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    let Value::Object(fields) = v else {
        return Err(ApiError::bad_request("request body must be a JSON object"));
    };
    // Only EvaluateCalculationRequest's fields go on.
    let mut out = Map::new();
    for key in ["eventId", "eventName", "calculation"] {
        match fields.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                out.insert(key.into(), json!(s));
            }
            Some(_) => return Err(ApiError::bad_request(format!("{key} must be a string"))),
        }
    }
    call(&app, &caller, ops::EVALUATE, Value::Object(out)).await
}

async fn set_active(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((_, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    subjects::validate_token("id", &id)?;
    let mut active = None;
    for (k, v) in form_urlencoded::parse(q.as_deref().unwrap_or_default().as_bytes()) {
        if k == "active" {
            active = Some(match v.as_ref() {
                "true" => true,
                "false" => false,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "active must be true or false, got {other:?}"
                    )))
                }
            });
        }
    }
    // m3ter's parameter is optional: without it the webhook is activated.
    let active = active.unwrap_or(true);
    call(
        &app,
        &caller,
        ops::WEBHOOK_ACTIVE,
        json!({ "id": id, "active": active }),
    )
    .await
}

async fn list_dead_letters(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let body = query(q.as_deref(), &[])?;
    call(&app, &caller, ops::DEAD_LETTERS_LIST, body).await
}

async fn replay(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((_, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    subjects::validate_token("id", &id)?;
    call(&app, &caller, ops::DEAD_LETTERS_REPLAY, json!({ "id": id })).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries_keep_known_filters_and_check_page_sizes() {
        let q = query(
            Some("pageSize=5&eventName=configuration.account.created&ids=1,2&ids=3&bogus=x&nextToken=9"),
            &["eventName"],
        )
        .unwrap();
        assert_eq!(
            q,
            json!({"pageSize": 5, "eventName": "configuration.account.created", "ids": ["1", "2", "3"], "nextToken": "9"})
        );
        assert!(query(Some("pageSize=0"), &[]).is_err());
        assert!(query(Some("pageSize=101"), &[]).is_err());
    }
}
