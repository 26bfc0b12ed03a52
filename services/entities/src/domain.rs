//! What an entity write means: validation, references, versions, codes,
//! secrets, and the event appended to `ENTITIES`. Transport-agnostic: the
//! NATS endpoints and the tests call the same [`Entities`] methods.

use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use futures::{stream, StreamExt, TryStreamExt};
use serde_json::{Map, Value};

use meterline_shared::envelope::{Action, EntityEvent};
use meterline_shared::protocol::{EntityRequest, Page, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
use meterline_shared::registry::{self, EntityType, RequestSchema};
use meterline_shared::{schema, subjects::validate_token, ServiceError};

use crate::codes::Codes;
use crate::index::{Entry, Index};
use crate::rules;
use crate::seal::{self, Sealer};
use crate::store::{Store, Version};

/// Fields every stored entity has that callers cannot set.
const AUDIT_FIELDS: [&str; 6] = [
    "id",
    "version",
    "dtCreated",
    "dtLastModified",
    "createdBy",
    "lastModifiedBy",
];

/// How long a list waits for this replica's index to catch up with writes
/// made elsewhere before it gives up with 503.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Entities {
    pub(crate) store: Store,
    pub(crate) index: Arc<Index>,
    codes: Codes,
    sealer: Sealer,
    egress: meterline_shared::egress::Egress,
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn entity_type(name: &str) -> Result<&'static EntityType, ServiceError> {
    registry::get(name)
        .ok_or_else(|| ServiceError::not_found(format!("unknown entity type {name:?}")))
}

fn required_id<'a>(req: &'a EntityRequest, what: &str) -> Result<&'a str, ServiceError> {
    let id = req
        .id
        .as_deref()
        .ok_or_else(|| ServiceError::bad_request(format!("{what} needs an id")))?;
    validate_token("id", id)?;
    Ok(id)
}

/// The index entry of a live state: its code and the fields lists filter on.
pub fn index_entry(ty: &EntityType, seq: u64, state: &Value) -> Entry {
    let mut fields = Vec::new();
    let mut add = |field: &'static str| {
        if let Some(v) = state.get(field).and_then(Value::as_str) {
            fields.push((field, v.to_owned()));
        }
    };
    if let Some(p) = ty.parent {
        add(p.field);
    }
    for r in ty.references.iter().filter(|r| !r.many) {
        add(r.field);
    }
    Entry {
        seq,
        code: state.get("code").and_then(Value::as_str).map(str::to_owned),
        fields,
    }
}

impl Entities {
    pub fn new(store: Store, index: Arc<Index>, codes: Codes, sealer: Sealer) -> Self {
        Entities {
            store,
            index,
            codes,
            sealer,
            egress: Default::default(),
        }
    }

    /// Where webhook URLs may point: public addresses, plus the networks
    /// the operator allows (none by default).
    pub fn with_egress(mut self, egress: meterline_shared::egress::Egress) -> Self {
        self.egress = egress;
        self
    }

    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// Dispatches one request by operation name.
    pub async fn handle(
        &self,
        org: &str,
        ty: &str,
        op: &str,
        actor: &str,
        req: EntityRequest,
    ) -> Result<Value, ServiceError> {
        validate_token("orgId", org)?;
        let ty = entity_type(ty)?;
        match op {
            "create" => self.create(org, ty, actor, req).await,
            "update" => self.update(org, ty, actor, req).await,
            "delete" => self.delete(org, ty, actor, req).await,
            "get" => self.get(org, ty, req).await,
            "list" => {
                serde_json::to_value(self.list(org, ty, req).await?).map_err(ServiceError::internal)
            }
            other => Err(ServiceError::not_found(format!(
                "unknown operation {other:?}"
            ))),
        }
    }

    async fn require_org(&self, org: &str) -> Result<(), ServiceError> {
        if self.index.contains(org, "organization", org)
            || self.store.live(org, "organization", org).await?.is_some()
        {
            Ok(())
        } else {
            Err(ServiceError::not_found(format!(
                "organization {org:?} does not exist"
            )))
        }
    }

    /// The parent id of a child-collection request, checked to exist.
    async fn parent(
        &self,
        org: &str,
        ty: &EntityType,
        req: &EntityRequest,
    ) -> Result<Option<String>, ServiceError> {
        let Some(p) = ty.parent else { return Ok(None) };
        let id = req.parent_id.as_deref().ok_or_else(|| {
            ServiceError::bad_request(format!("{} needs its {}", ty.name, p.field))
        })?;
        validate_token(p.field, id)?;
        if self.store.live(org, p.target, id).await?.is_none() {
            return Err(ServiceError::not_found(format!(
                "{} {id:?} does not exist",
                p.target
            )));
        }
        Ok(Some(id.to_owned()))
    }

    fn request_schema(ty: &EntityType, body: &Value) -> Result<&'static str, ServiceError> {
        match ty.request {
            RequestSchema::One(s) => Ok(s),
            RequestSchema::By {
                field,
                default,
                variants,
            } => match body.get(field).and_then(Value::as_str) {
                None => Ok(default),
                Some(v) => variants
                    .iter()
                    .find(|(k, _)| *k == v)
                    .map(|(_, s)| *s)
                    .ok_or_else(|| {
                        let names: Vec<&str> = variants.iter().map(|(k, _)| *k).collect();
                        ServiceError::bad_request(format!(
                            "{field}: must be one of {}",
                            names.join(", ")
                        ))
                    }),
            },
        }
    }

    /// Schema, rules and references of a create or update body.
    async fn check_body(
        &self,
        org: &str,
        ty: &EntityType,
        body: &Value,
    ) -> Result<(), ServiceError> {
        let schema_name = Self::request_schema(ty, body)?;
        let mut also_allowed: Vec<&str> = AUDIT_FIELDS.to_vec();
        also_allowed.extend(ty.parent.map(|p| p.field));
        let opts = schema::Options {
            enforce_required: true,
            also_allowed: &also_allowed,
            also_allowed_from: std::slice::from_ref(&ty.response),
        };
        schema::validate(schema_name, body, opts)
            .map_err(|errors| ServiceError::bad_request(errors.join("; ")))?;
        rules::check(ty.name, body)?;
        if ty.name == "webhook" {
            if let Some(url) = body.get("url").and_then(Value::as_str) {
                self.egress.check_url(url)?;
            }
        }
        for r in ty.references {
            if let Some((field, value)) = r.when {
                let matches = body
                    .get(field)
                    .and_then(Value::as_str)
                    .is_some_and(|v| v.eq_ignore_ascii_case(value));
                if !matches {
                    continue;
                }
            }
            let ids: Vec<&str> = match body.get(r.field) {
                None | Some(Value::Null) => continue,
                Some(Value::String(s)) if !r.many => vec![s.as_str()],
                Some(Value::Array(a)) if r.many => a.iter().filter_map(Value::as_str).collect(),
                Some(_) => {
                    return Err(ServiceError::bad_request(format!(
                        "{}: has the wrong type",
                        r.field
                    )))
                }
            };
            for id in ids {
                if id.is_empty() {
                    continue;
                }
                validate_token(r.field, id)?;
                if self.store.live(org, r.target, id).await?.is_none() {
                    return Err(ServiceError::bad_request(format!(
                        "{}: {} {id:?} does not exist",
                        r.field, r.target
                    )));
                }
            }
        }
        Ok(())
    }

    /// What a reader sees of a stored state: secrets masked.
    fn view(&self, ty: &EntityType, state: &Value) -> Value {
        let mut v = state.clone();
        seal::mask_fields(ty.secrets, &mut v);
        v
    }

    /// Appends one mutation as the entity's next version, if its last
    /// version is still `expected` (0: it must not exist), and records it in
    /// the index.
    #[allow(clippy::too_many_arguments)]
    async fn write(
        &self,
        org: &str,
        ty: &EntityType,
        id: &str,
        action: Action,
        actor: &str,
        new: Option<&Value>,
        old: Option<&Value>,
        expected: u64,
    ) -> Result<(), ServiceError> {
        let event = EntityEvent::now(org, ty.name, id, action, actor, new.cloned(), old.cloned());
        let seq = self.store.append(&event, expected).await?;
        let entry = new.map(|s| index_entry(ty, seq, s));
        self.index.apply(org, ty.name, id, seq, entry);
        metrics::counter!("meterline_entity_writes_total", "type" => ty.name, "action" => action.as_str())
            .increment(1);
        Ok(())
    }

    pub async fn create(
        &self,
        org: &str,
        ty: &EntityType,
        actor: &str,
        req: EntityRequest,
    ) -> Result<Value, ServiceError> {
        let id = match &req.id {
            Some(id) => {
                validate_token("id", id)?;
                id.clone()
            }
            None if ty.name == "organization" => org.to_owned(),
            // UUIDs as m3ter uses; version 7 sorts by creation time, which
            // gives lists their order.
            None => uuid::Uuid::now_v7().to_string(),
        };
        if ty.name == "organization" {
            if id != org {
                return Err(ServiceError::bad_request(
                    "an organization's id is its orgId",
                ));
            }
        } else {
            self.require_org(org).await?;
        }
        let mut body = req
            .body
            .clone()
            .ok_or_else(|| ServiceError::bad_request("a body is required"))?;
        let obj = body
            .as_object_mut()
            .ok_or_else(|| ServiceError::bad_request("the body must be a JSON object"))?;
        if obj.get("version").is_some_and(|v| !v.is_null()) {
            return Err(ServiceError::bad_request(
                "version must not be set on create; it starts at 1",
            ));
        }
        let parent = self.parent(org, ty, &req).await?;
        if let (Some(p), Some(pid)) = (ty.parent, &parent) {
            match obj.get(p.field).and_then(Value::as_str) {
                Some(given) if given != pid => {
                    return Err(ServiceError::bad_request(format!(
                        "{}: does not match the path",
                        p.field
                    )));
                }
                _ => {
                    obj.insert(p.field.to_owned(), Value::String(pid.clone()));
                }
            }
        }
        // Engine-written types are validated against m3ter's response
        // schema, which requires the id.
        if let Some(obj) = body.as_object_mut() {
            obj.insert("id".into(), Value::String(id.clone()));
        }
        self.check_body(org, ty, &body).await?;
        seal::seal_fields(&self.sealer, ty.secrets, &mut body, None)?;
        let at = now();
        let state = compose(&id, 1, &body, &at, actor, &at, actor);
        let code = ty
            .unique_code
            .then(|| state.get("code").and_then(Value::as_str))
            .flatten();
        if let Some(code) = code {
            self.codes
                .reserve(&self.store, org, ty.name, code, &id)
                .await?;
        }
        self.write(org, ty, &id, Action::Created, actor, Some(&state), None, 0)
            .await
            .map_err(|e| {
                if e.code == meterline_shared::ErrorCode::Conflict {
                    ServiceError::conflict(format!("{} {id:?} already exists", ty.name))
                } else {
                    e
                }
            })?;
        Ok(self.view(ty, &state))
    }

    /// The current live version, or 404; for child types the parent given
    /// (if any) must be the entity's parent.
    async fn current(
        &self,
        org: &str,
        ty: &EntityType,
        id: &str,
        req: &EntityRequest,
    ) -> Result<Version, ServiceError> {
        let v =
            self.store.live(org, ty.name, id).await?.ok_or_else(|| {
                ServiceError::not_found(format!("{} {id:?} does not exist", ty.name))
            })?;
        if let (Some(p), Some(pid)) = (ty.parent, req.parent_id.as_deref()) {
            if v.live()
                .and_then(|s| s.get(p.field))
                .and_then(Value::as_str)
                != Some(pid)
            {
                return Err(ServiceError::not_found(format!(
                    "{} {id:?} does not exist under {} {pid:?}",
                    ty.name, p.target
                )));
            }
        }
        Ok(v)
    }

    pub async fn update(
        &self,
        org: &str,
        ty: &EntityType,
        actor: &str,
        req: EntityRequest,
    ) -> Result<Value, ServiceError> {
        let id = required_id(&req, "an update")?.to_owned();
        let mut body = req
            .body
            .clone()
            .ok_or_else(|| ServiceError::bad_request("a body is required"))?;
        let obj = body
            .as_object_mut()
            .ok_or_else(|| ServiceError::bad_request("the body must be a JSON object"))?;
        let version = match obj.get("version") {
            Some(Value::Number(n)) if n.as_i64().is_some() => n.as_i64().unwrap_or_default(),
            None | Some(Value::Null) => {
                return Err(ServiceError::bad_request(
                    "version is required on update: send the version you read",
                ))
            }
            Some(_) => return Err(ServiceError::bad_request("version: must be an integer")),
        };
        if let Some(given) = obj.get("id").and_then(Value::as_str) {
            if given != id {
                return Err(ServiceError::bad_request("id: does not match the path"));
            }
        }
        let current = self.current(org, ty, &id, &req).await?;
        let old = current.live().cloned().unwrap_or(Value::Null);
        let current_version = check_version(ty, &id, &old, version)?;
        if let Some(p) = ty.parent {
            let pid = old.get(p.field).cloned().unwrap_or(Value::Null);
            match obj.get(p.field) {
                Some(given) if !given.is_null() && *given != pid => {
                    return Err(ServiceError::bad_request(format!(
                        "{}: cannot be changed",
                        p.field
                    )));
                }
                _ => {
                    obj.insert(p.field.to_owned(), pid);
                }
            }
        }
        obj.insert("id".into(), Value::String(id.clone()));
        self.check_body(org, ty, &body).await?;
        seal::seal_fields(&self.sealer, ty.secrets, &mut body, Some(&old))?;
        let created_at = old
            .get("dtCreated")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let created_by = old
            .get("createdBy")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let state = compose(
            &id,
            current_version + 1,
            &body,
            &created_at,
            &created_by,
            &now(),
            actor,
        );
        let old_code = old
            .get("code")
            .and_then(Value::as_str)
            .filter(|_| ty.unique_code);
        let new_code = state
            .get("code")
            .and_then(Value::as_str)
            .filter(|_| ty.unique_code);
        if let Some(code) = new_code.filter(|c| Some(*c) != old_code) {
            self.codes
                .reserve(&self.store, org, ty.name, code, &id)
                .await?;
        }
        let (new, before) = (Some(&state), Some(&old));
        self.write(
            org,
            ty,
            &id,
            Action::Updated,
            actor,
            new,
            before,
            current.seq,
        )
        .await?;
        if let Some(code) = old_code.filter(|c| Some(*c) != new_code) {
            self.codes.release(org, ty.name, code, &id).await;
        }
        Ok(self.view(ty, &state))
    }

    pub async fn delete(
        &self,
        org: &str,
        ty: &EntityType,
        actor: &str,
        req: EntityRequest,
    ) -> Result<Value, ServiceError> {
        let id = required_id(&req, "a delete")?.to_owned();
        let current = self.current(org, ty, &id, &req).await?;
        let old = current.live().cloned().unwrap_or(Value::Null);
        if let Some(expected) = req.version {
            check_version(ty, &id, &old, expected)?;
        }
        self.write(
            org,
            ty,
            &id,
            Action::Deleted,
            actor,
            None,
            Some(&old),
            current.seq,
        )
        .await?;
        if let Some(code) = old
            .get("code")
            .and_then(Value::as_str)
            .filter(|_| ty.unique_code)
        {
            self.codes.release(org, ty.name, code, &id).await;
        }
        Ok(self.view(ty, &old))
    }

    pub async fn get(
        &self,
        org: &str,
        ty: &EntityType,
        req: EntityRequest,
    ) -> Result<Value, ServiceError> {
        let id = required_id(&req, "a get")?;
        let v = self.current(org, ty, id, &req).await?;
        Ok(self.view(ty, v.live().unwrap_or(&Value::Null)))
    }

    /// Waits until this replica has seen every write acknowledged so far, by
    /// any replica, so a list never misses an entity whose create returned.
    async fn catch_up(&self) -> Result<(), ServiceError> {
        let last = self.store.last_seq().await?;
        if self.index.caught_up() >= last {
            return Ok(());
        }
        tokio::time::timeout(CATCH_UP_WAIT, self.index.wait_for(last))
            .await
            .map_err(|_| {
                ServiceError::unavailable("the entity index is still catching up; retry shortly")
            })
    }

    pub async fn list(
        &self,
        org: &str,
        ty: &EntityType,
        req: EntityRequest,
    ) -> Result<Page, ServiceError> {
        let page_size = req.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
        if !(1..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(ServiceError::bad_request(format!(
                "pageSize must be between 1 and {MAX_PAGE_SIZE}"
            )));
        }
        let parent = if ty.parent.is_some() {
            self.parent(org, ty, &req).await?
        } else {
            None
        };
        if let Some(token) = &req.next_token {
            validate_token("nextToken", token)?;
        }
        let filterable: Vec<&str> = ty
            .parent
            .iter()
            .map(|p| p.field)
            .chain(ty.references.iter().filter(|r| !r.many).map(|r| r.field))
            .collect();
        let mut filters: Vec<(&str, String)> = Vec::new();
        for (k, v) in &req.filters {
            if !filterable.contains(&k.as_str()) {
                return Err(ServiceError::bad_request(format!(
                    "cannot filter {} by {k:?}{}",
                    ty.path,
                    if filterable.is_empty() {
                        String::new()
                    } else {
                        format!("; filters: {}", filterable.join(", "))
                    }
                )));
            }
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            filters.push((k.as_str(), v));
        }
        if let (Some(p), Some(pid)) = (ty.parent, parent) {
            filters.push((p.field, pid));
        }
        self.catch_up().await?;
        let keep = |id: &str, e: &Entry| {
            (req.ids.is_empty() || req.ids.iter().any(|x| x == id))
                && (req.codes.is_empty() || e.code.as_ref().is_some_and(|c| req.codes.contains(c)))
                && filters
                    .iter()
                    .all(|(f, v)| e.fields.iter().any(|(k, x)| k == f && x == v))
        };
        let (entries, more) = self.index.page(
            org,
            ty.name,
            req.next_token.as_deref(),
            page_size as usize,
            keep,
        );
        let next_token = if more {
            entries.last().map(|(id, _)| id.clone())
        } else {
            None
        };
        let data: Vec<Value> = stream::iter(entries)
            .map(|(_, e)| async move { self.store.by_seq(e.seq).await })
            .buffered(16)
            .try_filter_map(|v| async move { Ok(v.live().map(|s| self.view(ty, s))) })
            .try_collect()
            .await?;
        Ok(Page { data, next_token })
    }
}

/// The entity's current version, if `expected` is it; else 409.
fn check_version(
    ty: &EntityType,
    id: &str,
    state: &Value,
    expected: i64,
) -> Result<i64, ServiceError> {
    let current = state.get("version").and_then(Value::as_i64).unwrap_or(0);
    if expected != current {
        return Err(ServiceError::conflict(format!(
            "version {expected} is not the current version of {} {id:?} ({current}); read it again and retry",
            ty.name
        )));
    }
    Ok(current)
}

/// A stored state: `id` and `version` first, then the body's own fields in
/// the order given, then the audit fields.
fn compose(
    id: &str,
    version: i64,
    body: &Value,
    created: &str,
    created_by: &str,
    modified: &str,
    modified_by: &str,
) -> Value {
    let mut out = Map::new();
    out.insert("id".into(), Value::String(id.to_owned()));
    out.insert("version".into(), Value::from(version));
    if let Some(obj) = body.as_object() {
        for (k, v) in obj {
            if !AUDIT_FIELDS.contains(&k.as_str()) {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out.insert("dtCreated".into(), Value::String(created.to_owned()));
    out.insert("dtLastModified".into(), Value::String(modified.to_owned()));
    out.insert("createdBy".into(), Value::String(created_by.to_owned()));
    out.insert(
        "lastModifiedBy".into(),
        Value::String(modified_by.to_owned()),
    );
    Value::Object(out)
}
