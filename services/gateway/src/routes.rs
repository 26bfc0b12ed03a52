//! Entity routes, generated from the registry: each HTTP entity type gets a
//! collection path (GET = list, POST = create) and an item path (GET, PUT,
//! DELETE), each mapped onto `svc.entities.<org>.<type>.<op>`.

use axum::body::Bytes;
use axum::extract::{FromRef, RawPathParams, RawQuery, State};
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Router};
use meterline_shared::protocol::{EntityRequest, MAX_PAGE_SIZE};
use meterline_shared::registry::{EntityType, REGISTRY};
use meterline_shared::subjects::{self, ops};
use meterline_shared::ServiceError;
use serde_json::{Map, Value};
use tracing::{instrument, Span};

use crate::auth::Caller;
use crate::body::LimitedBody;
use crate::error::ApiError;
use crate::forward;
use crate::AppState;

/// The state of one route: the app and the entity type it serves.
#[derive(Clone)]
pub struct RouteState {
    app: AppState,
    ty: &'static EntityType,
}

impl FromRef<RouteState> for AppState {
    fn from_ref(state: &RouteState) -> AppState {
        state.app.clone()
    }
}

/// `/organizations/{orgId}/<path>`.
pub fn collection_path(ty: &EntityType) -> String {
    format!("/organizations/{{orgId}}/{}", ty.path)
}

/// `/organizations/{orgId}/<path>/{id}`.
pub fn item_path(ty: &EntityType) -> String {
    format!("{}/{{id}}", collection_path(ty))
}

/// Every entity route, unauthenticated (the caller adds the bearer check).
pub fn entity_routes(app: &AppState) -> Router {
    let mut router = Router::new();
    for ty in REGISTRY.iter().filter(|t| t.http) {
        let state = RouteState {
            app: app.clone(),
            ty,
        };
        router = router.merge(
            Router::new()
                .route(&collection_path(ty), get(list).post(create))
                .route(&item_path(ty), get(get_one).put(update).delete(delete))
                .with_state(state),
        );
    }
    router
}

/// The ids a route's path carries, each validated as a subject token.
struct PathIds {
    org: String,
    parent: Option<String>,
    id: Option<String>,
}

impl PathIds {
    fn from_params(ty: &EntityType, params: &RawPathParams) -> Result<PathIds, ApiError> {
        let find = |name: &str| {
            params
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_owned())
        };
        let org = find("orgId").ok_or_else(|| ApiError::bad_request("orgId is missing"))?;
        subjects::validate_token("orgId", &org)?;
        let parent = match ty.parent {
            Some(p) => {
                let v = find(p.field)
                    .ok_or_else(|| ApiError::bad_request(format!("{} is missing", p.field)))?;
                subjects::validate_token(p.field, &v)?;
                Some(v)
            }
            None => None,
        };
        let id = find("id");
        if let Some(id) = &id {
            subjects::validate_token("id", id)?;
        }
        Ok(PathIds { org, parent, id })
    }
}

type Params = Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>;

fn path_ids(ty: &EntityType, params: Params) -> Result<PathIds, ApiError> {
    let params = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    PathIds::from_params(ty, &params)
}

/// A body that must be one JSON object. The `Content-Type` is not checked:
/// clients that omit it still get their JSON read.
fn json_object(body: Bytes) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "request body is empty; expected a JSON object",
        ));
    }
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("request body must be a JSON object"));
    }
    Ok(value)
}

/// Sends one request to the entities service as `caller` and returns its
/// JSON reply as the 200 response.
async fn call(
    app: &AppState,
    caller: &Caller,
    ty: &EntityType,
    op: &str,
    request: &EntityRequest,
) -> Result<Response, ApiError> {
    let subject = subjects::entities_request(&caller.org_id, ty.name, op);
    let payload = serde_json::to_vec(request).map_err(ServiceError::internal)?;
    let actor = Some(caller.service_user_id.as_str());
    forward::request(app, subject, actor, payload.into())
        .await
        .map(forward::json)
}

#[instrument(skip_all, fields(entity = state.ty.name, op = "create", org))]
async fn create(
    State(state): State<RouteState>,
    Extension(caller): Extension<Caller>,
    params: Params,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let ids = path_ids(state.ty, params)?;
    Span::current().record("org", ids.org.as_str());
    let body = json_object(body)?;
    let request = EntityRequest {
        parent_id: ids.parent,
        body: Some(body),
        ..Default::default()
    };
    call(&state.app, &caller, state.ty, ops::CREATE, &request).await
}

#[instrument(skip_all, fields(entity = state.ty.name, op = "get", org, id))]
async fn get_one(
    State(state): State<RouteState>,
    Extension(caller): Extension<Caller>,
    params: Params,
) -> Result<Response, ApiError> {
    let ids = path_ids(state.ty, params)?;
    Span::current()
        .record("org", ids.org.as_str())
        .record("id", ids.id.as_deref());
    let request = EntityRequest {
        id: ids.id,
        parent_id: ids.parent,
        ..Default::default()
    };
    call(&state.app, &caller, state.ty, ops::GET, &request).await
}

#[instrument(skip_all, fields(entity = state.ty.name, op = "update", org, id))]
async fn update(
    State(state): State<RouteState>,
    Extension(caller): Extension<Caller>,
    params: Params,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let ids = path_ids(state.ty, params)?;
    Span::current()
        .record("org", ids.org.as_str())
        .record("id", ids.id.as_deref());
    let body = json_object(body)?;
    let request = EntityRequest {
        id: ids.id,
        parent_id: ids.parent,
        body: Some(body),
        ..Default::default()
    };
    call(&state.app, &caller, state.ty, ops::UPDATE, &request).await
}

#[instrument(skip_all, fields(entity = state.ty.name, op = "delete", org, id))]
async fn delete(
    State(state): State<RouteState>,
    Extension(caller): Extension<Caller>,
    params: Params,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let ids = path_ids(state.ty, params)?;
    Span::current()
        .record("org", ids.org.as_str())
        .record("id", ids.id.as_deref());
    // An optional `?version=N` makes the delete conditional on the current
    // version (m3ter has no such parameter; it is a Meterline extension).
    let mut version = None;
    for (k, v) in form_urlencoded::parse(query.as_deref().unwrap_or_default().as_bytes()) {
        if k == "version" {
            version = Some(v.parse::<i64>().map_err(|_| {
                ApiError::bad_request(format!("version must be an integer, got {v:?}"))
            })?);
        }
    }
    let request = EntityRequest {
        id: ids.id,
        parent_id: ids.parent,
        version,
        ..Default::default()
    };
    call(&state.app, &caller, state.ty, ops::DELETE, &request).await
}

#[instrument(skip_all, fields(entity = state.ty.name, op = "list", org))]
async fn list(
    State(state): State<RouteState>,
    Extension(caller): Extension<Caller>,
    params: Params,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let ids = path_ids(state.ty, params)?;
    Span::current().record("org", ids.org.as_str());
    let mut request = list_request(query.as_deref().unwrap_or_default())?;
    request.parent_id = ids.parent;
    call(&state.app, &caller, state.ty, ops::LIST, &request).await
}

/// Parses a list query: `pageSize` (1..=100), `nextToken`, `ids` and
/// `codes` (repeated keys or comma-separated values), and every other key
/// as an equality filter.
pub fn list_request(query: &str) -> Result<EntityRequest, ApiError> {
    let mut request = EntityRequest::default();
    let mut filters = Map::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "pageSize" => {
                let size = value
                    .trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "pageSize must be an integer from 1 to {MAX_PAGE_SIZE}, got {value:?}"
                        ))
                    })?;
                request.page_size = Some(size);
            }
            "nextToken" => {
                if !value.is_empty() {
                    request.next_token = Some(value.into_owned());
                }
            }
            "ids" | "codes" => {
                let list = if key == "ids" {
                    &mut request.ids
                } else {
                    &mut request.codes
                };
                list.extend(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                );
            }
            "" => {}
            _ => {
                // A repeated filter key: the last value wins.
                filters.insert(key.into_owned(), Value::String(value.into_owned()));
            }
        }
    }
    request.filters = filters;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries_parse_repeated_and_comma_separated_keys() {
        let r = list_request(
            "pageSize=5&nextToken=abc&ids=a&ids=b,c&codes=x&accountId=acc1&active=true",
        )
        .unwrap();
        assert_eq!(r.page_size, Some(5));
        assert_eq!(r.next_token.as_deref(), Some("abc"));
        assert_eq!(r.ids, ["a", "b", "c"]);
        assert_eq!(r.codes, ["x"]);
        assert_eq!(r.filters["accountId"], "acc1");
        assert_eq!(r.filters["active"], "true");
        assert_eq!(list_request("").unwrap(), EntityRequest::default());
    }

    #[test]
    fn page_size_out_of_range_is_a_bad_request() {
        for bad in [
            "pageSize=0",
            "pageSize=101",
            "pageSize=ten",
            "pageSize=-1",
            "pageSize=",
        ] {
            assert_eq!(list_request(bad).unwrap_err().status(), 400, "{bad}");
        }
        assert_eq!(list_request("pageSize=100").unwrap().page_size, Some(100));
    }

    #[test]
    fn every_http_type_gets_two_distinct_paths() {
        let mut seen = std::collections::HashSet::new();
        for ty in REGISTRY.iter().filter(|t| t.http) {
            assert!(seen.insert(collection_path(ty)));
            assert!(seen.insert(item_path(ty)));
        }
        assert!(seen.contains("/organizations/{orgId}/balances/{balanceId}/transactions/{id}"));
    }
}
