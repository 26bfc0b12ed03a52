//! Scheduled events: a scheduled event configuration (m3ter's
//! `ScheduledEventConfiguration`: `name` = `scheduled.<entity>.<event>`,
//! `entity`, a date `field`, an `offset` in days) emits its Event on
//! `EVENTS` at `evt.<org>.<name>` for each entity of that type once the
//! entity's field plus the offset is reached.
//!
//! - Once per entity and date: the message id and the record in the
//!   `scheduled_events` bucket are derived from the configuration, the
//!   entity and the instant, so replicas and restarts emit it once. If the
//!   entity's date changes later, the new date gets an Event of its own; the
//!   old date never gets a second one.
//! - Only instants from the configuration's creation (or last change) on: a
//!   new or edited configuration does not flood `EVENTS` with the history
//!   of every entity.
//! - Emitted late rather than never: instants reached while no scheduler ran
//!   are emitted when one starts.
//!
//! This module is the state (pure); [`Emitter`] writes.

use std::collections::{BTreeSet, HashMap, HashSet};

use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::Serialize;
use serde_json::Value;

use meterline_shared::envelope::{EntityEvent, HEADER_EVENT_NAME};
use meterline_shared::schedule::scheduled_event_name;
use meterline_shared::subjects::{self, validate_token};
use meterline_shared::{provision, registry};

use crate::schedules::{is_key_token, Refusal};

pub const CONFIG_TYPE: &str = "scheduledeventconfig";

/// KV bucket remembering which scheduled events were emitted, keyed
/// `<org>.<event id>`.
pub const SCHEDULED_EVENTS_BUCKET: &str = "scheduled_events";

/// `scheduled_events`: one small record per emitted scheduled event, kept
/// as long as the bus keeps it (an entity's date stays in the past, so the
/// record must outlive any retention the Event itself has).
pub fn scheduled_events_bucket(replicas: usize) -> kv::Config {
    kv::Config {
        bucket: SCHEDULED_EVENTS_BUCKET.into(),
        description: "Meterline scheduled events already emitted".into(),
        history: 1,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    }
}

/// Namespace of scheduled event ids (a fixed, random UUID).
const EVENT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x1f4c_92ad_35e7_4c1b_a8d2_60b7_e93f_5a14);

type EntityKey = (String, String, String);
/// An entity's date fields and their instants.
type Dates = Vec<(&'static str, DateTime<Utc>)>;

#[derive(Debug, Clone)]
struct Config {
    entity_type: &'static str,
    field: String,
    offset_days: i64,
    name: String,
    /// Creation or last change: earlier instants are not emitted.
    created: DateTime<Utc>,
}

/// One scheduled event to emit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub org: String,
    pub config: String,
    pub entity_type: &'static str,
    pub entity_id: String,
    pub name: String,
    pub field: String,
    pub offset_days: i64,
    /// The entity's field plus the offset.
    pub at: DateTime<Utc>,
}

impl Due {
    /// The event id: the same for the same configuration, entity and
    /// instant, in every replica.
    pub fn id(&self) -> String {
        let name = format!(
            "{}/{}/{}/{}",
            self.org,
            self.config,
            self.entity_id,
            self.at.timestamp_millis()
        );
        uuid::Uuid::new_v5(&EVENT_NAMESPACE, name.as_bytes()).to_string()
    }

    pub fn key(&self) -> String {
        format!("{}.{}", self.org, self.id())
    }
}

/// A date or date-time field's instant (a date is midnight UTC).
fn instant(v: &Value) -> Option<DateTime<Utc>> {
    let s = v.as_str()?;
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// The entity types scheduled events can be configured on.
pub fn dated_types() -> impl Iterator<Item = &'static registry::EntityType> {
    registry::REGISTRY
        .iter()
        .filter(|t| !t.date_fields.is_empty())
}

/// Configurations, the date fields of the entities they watch, and the
/// queue of instants to come.
#[derive(Default)]
pub struct ScheduledEvents {
    configs: HashMap<(String, String), Config>,
    refused: HashMap<(String, String), String>,
    /// (org, type) → entity id → its date fields.
    dates: HashMap<(String, &'static str), HashMap<String, Dates>>,
    queue: BTreeSet<(DateTime<Utc>, String, String, String)>,
    /// (org, config, entity) → the instant queued for it.
    planned: HashMap<EntityKey, DateTime<Utc>>,
    /// Keys of events already emitted.
    emitted: HashSet<String>,
    live: bool,
}

impl ScheduledEvents {
    pub fn next_wake(&self) -> Option<DateTime<Utc>> {
        if !self.live {
            return None;
        }
        self.queue.first().map(|(t, ..)| *t)
    }

    pub fn refusals(&self) -> Vec<Refusal> {
        let mut out: Vec<Refusal> = self
            .refused
            .iter()
            .map(|((org, id), reason)| Refusal {
                org_id: org.clone(),
                entity_type: CONFIG_TYPE,
                id: id.clone(),
                reason: reason.clone(),
            })
            .collect();
        out.sort_by(|a, b| (&a.org_id, &a.id).cmp(&(&b.org_id, &b.id)));
        out
    }

    /// Records events emitted before (read from the bucket at start).
    pub fn remember(&mut self, key: String) {
        self.emitted.insert(key);
    }

    pub fn start(&mut self) {
        self.live = true;
    }

    /// Applies one `ENTITIES` message (a configuration or a dated entity).
    pub fn apply(&mut self, ev: &EntityEvent) {
        if ev.entity_type == CONFIG_TYPE {
            self.apply_config(ev);
            return;
        }
        let Some(t) = registry::get(&ev.entity_type).filter(|t| !t.date_fields.is_empty()) else {
            return;
        };
        let by_id = self.dates.entry((ev.org_id.clone(), t.name)).or_default();
        match ev.new.as_ref().filter(|_| !ev.is_tombstone()) {
            Some(state) => {
                let fields: Dates = t
                    .date_fields
                    .iter()
                    .filter_map(|f| state.get(*f).and_then(instant).map(|i| (*f, i)))
                    .collect();
                by_id.insert(ev.entity_id.clone(), fields);
            }
            None => {
                by_id.remove(&ev.entity_id);
            }
        }
        let configs: Vec<String> = self
            .configs
            .iter()
            .filter(|((org, _), c)| *org == ev.org_id && c.entity_type == t.name)
            .map(|((_, id), _)| id.clone())
            .collect();
        for c in configs {
            self.plan(&ev.org_id, &c, &ev.entity_id);
        }
    }

    fn apply_config(&mut self, ev: &EntityEvent) {
        let key = (ev.org_id.clone(), ev.entity_id.clone());
        self.configs.remove(&key);
        self.refused.remove(&key);
        let stale: Vec<EntityKey> = self
            .planned
            .keys()
            .filter(|(o, c, _)| *o == key.0 && *c == key.1)
            .cloned()
            .collect();
        for k in stale {
            self.unplan(&k);
        }
        let Some(state) = ev.new.as_ref().filter(|_| !ev.is_tombstone()) else {
            return;
        };
        match config_of(&key.0, &key.1, state, ev.event_time) {
            Ok(c) => {
                let entity_type = c.entity_type;
                self.configs.insert(key.clone(), c);
                let ids: Vec<String> = self
                    .dates
                    .get(&(key.0.clone(), entity_type))
                    .map(|m| m.keys().cloned().collect())
                    .unwrap_or_default();
                for id in ids {
                    self.plan(&key.0, &key.1, &id);
                }
            }
            Err(reason) => {
                tracing::warn!(org = %key.0, config = %key.1, %reason, "scheduled event configuration refused");
                self.refused.insert(key, reason);
            }
        }
    }

    fn unplan(&mut self, k: &EntityKey) {
        if let Some(at) = self.planned.remove(k) {
            self.queue
                .remove(&(at, k.0.clone(), k.1.clone(), k.2.clone()));
        }
    }

    /// (Re)computes the instant of one configuration for one entity.
    fn plan(&mut self, org: &str, config: &str, entity: &str) {
        let k = (org.to_owned(), config.to_owned(), entity.to_owned());
        self.unplan(&k);
        let Some(c) = self.configs.get(&(k.0.clone(), k.1.clone())) else {
            return;
        };
        let at = self
            .dates
            .get(&(k.0.clone(), c.entity_type))
            .and_then(|m| m.get(entity))
            .and_then(|fields| fields.iter().find(|(f, _)| *f == c.field))
            .map(|(_, t)| *t + Duration::days(c.offset_days));
        if let Some(at) = at.filter(|at| *at >= c.created) {
            self.queue
                .insert((at, k.0.clone(), k.1.clone(), k.2.clone()));
            self.planned.insert(k, at);
        }
    }

    /// The events due at `now` that were not emitted before.
    pub fn due(&mut self, now: DateTime<Utc>) -> Vec<Due> {
        let mut out = Vec::new();
        if !self.live {
            return out;
        }
        while let Some((at, org, config, entity)) = self.queue.first().cloned() {
            if at > now {
                break;
            }
            self.queue.pop_first();
            self.planned
                .remove(&(org.clone(), config.clone(), entity.clone()));
            let Some(c) = self.configs.get(&(org.clone(), config.clone())) else {
                continue;
            };
            let due = Due {
                org,
                config,
                entity_type: c.entity_type,
                entity_id: entity,
                name: c.name.clone(),
                field: c.field.clone(),
                offset_days: c.offset_days,
                at,
            };
            if self.emitted.insert(due.key()) {
                out.push(due);
            }
        }
        out
    }

    /// An emission failed: forget it was emitted, so it is tried again.
    pub fn retry(&mut self, due: &Due) {
        self.emitted.remove(&due.key());
        let k = (due.org.clone(), due.config.clone(), due.entity_id.clone());
        if !self.planned.contains_key(&k) {
            self.queue
                .insert((due.at, k.0.clone(), k.1.clone(), k.2.clone()));
            self.planned.insert(k, due.at);
        }
    }
}

fn config_of(
    org: &str,
    id: &str,
    state: &Value,
    event_time: DateTime<Utc>,
) -> Result<Config, String> {
    if validate_token("orgId", org).is_err() || !is_key_token(org) {
        return Err(format!(
            "organization id {org:?} cannot name scheduled event keys (letters, digits, '-', '_', '=' and '/' only)"
        ));
    }
    validate_token("id", id).map_err(|e| e.message)?;
    let entity = state
        .get("entity")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let field = state
        .get("field")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Some(t) = registry::by_display_name(entity).filter(|t| !t.date_fields.is_empty()) else {
        return Err(format!("entity {entity:?} has no date fields"));
    };
    if !t.date_fields.contains(&field) {
        return Err(format!("field {field:?} is not a date field of {}", t.name));
    }
    let name = scheduled_event_name(state).map_err(|e| e.0)?;
    let offset_days = state.get("offset").and_then(Value::as_i64).unwrap_or(0);
    if offset_days.abs() > 36_500 {
        return Err(format!(
            "offset {offset_days} is more than a century of days"
        ));
    }
    // From the last change on: an edited offset or field does not replay
    // the instants it moves into the past.
    let created = state
        .get("dtLastModified")
        .or_else(|| state.get("dtCreated"))
        .and_then(instant)
        .unwrap_or(event_time);
    Ok(Config {
        entity_type: t.name,
        field: field.to_owned(),
        offset_days,
        name,
        created,
    })
}

/// A scheduled Event as published on `EVENTS` (JSON), shaped like the
/// entity events: `eventName`, `eventTime`, `new` (the entity now).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduledEvent {
    pub id: String,
    pub event_name: String,
    pub event_time: DateTime<Utc>,
    pub org_id: String,
    pub entity_type: String,
    pub entity_id: String,
    pub scheduled_event_configuration_id: String,
    pub field: String,
    pub offset: i64,
    pub new: Option<Value>,
    pub old: Option<Value>,
}

/// Publishes scheduled events and records them.
#[derive(Clone)]
pub struct Emitter {
    js: jetstream::Context,
    entities: jetstream::stream::Stream,
    emitted: kv::Store,
}

impl Emitter {
    pub fn new(
        js: jetstream::Context,
        entities: jetstream::stream::Stream,
        emitted: kv::Store,
    ) -> Emitter {
        Emitter {
            js,
            entities,
            emitted,
        }
    }

    /// Keys of every event emitted so far.
    pub async fn emitted_keys(&self) -> anyhow::Result<Vec<String>> {
        use futures::TryStreamExt;
        match self.emitted.keys().await {
            Ok(keys) => Ok(keys.try_collect().await?),
            Err(e) => Err(e.into()),
        }
    }

    /// Publishes `due` (message id = its id) and then records it.
    pub async fn emit(&self, due: &Due) -> anyhow::Result<()> {
        let id = due.id();
        let current = self
            .entities
            .direct_get_last_for_subject(subjects::entity(
                &due.org,
                due.entity_type,
                &due.entity_id,
            ))
            .await
            .ok()
            .and_then(|m| serde_json::from_slice::<EntityEvent>(&m.payload).ok())
            .and_then(|e| e.new);
        let event = ScheduledEvent {
            id: id.clone(),
            event_name: due.name.clone(),
            event_time: due.at,
            org_id: due.org.clone(),
            entity_type: due.entity_type.to_owned(),
            entity_id: due.entity_id.clone(),
            scheduled_event_configuration_id: due.config.clone(),
            field: due.field.clone(),
            offset: due.offset_days,
            new: current,
            old: None,
        };
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        headers.insert(HEADER_EVENT_NAME, due.name.as_str());
        headers.insert("Content-Type", "application/json");
        self.js
            .publish_with_headers(
                subjects::event(&due.org, &due.name),
                headers,
                Bytes::from(serde_json::to_vec(&event)?),
            )
            .await?
            .await?;
        self.emitted
            .put(
                due.key(),
                Bytes::from(serde_json::to_vec(&serde_json::json!({"at": due.at}))?),
            )
            .await?;
        metrics::counter!("meterline_scheduler_scheduled_events_total").increment(1);
        Ok(())
    }
}

/// Creates the bucket of emitted events if missing.
pub async fn provision(js: &jetstream::Context, replicas: usize) -> anyhow::Result<kv::Store> {
    Ok(provision::ensure_kv(js, scheduled_events_bucket(replicas)).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterline_shared::envelope::Action;
    use meterline_shared::schedule::utc;
    use serde_json::json;

    fn ev(ty: &str, id: &str, new: Option<Value>, at: DateTime<Utc>) -> EntityEvent {
        EntityEvent {
            id: "e".into(),
            event_name: "x".into(),
            event_time: at,
            org_id: "org1".into(),
            entity_type: ty.into(),
            entity_id: id.into(),
            action: if new.is_some() {
                Action::Updated
            } else {
                Action::Deleted
            },
            actor: "t".into(),
            new,
            old: None,
        }
    }

    #[test]
    fn each_date_fires_once_and_a_changed_date_fires_again() {
        let t0 = utc(2026, 1, 1, 0, 0);
        let mut s = ScheduledEvents::default();
        s.apply(&ev(
            CONFIG_TYPE,
            "c1",
            Some(json!({"name": "scheduled.bill.due", "entity": "Bill", "field": "dueDate", "offset": 2, "dtCreated": t0.to_rfc3339()})),
            t0,
        ));
        s.apply(&ev(
            "bill",
            "b1",
            Some(json!({"dueDate": "2026-01-10"})),
            t0,
        ));
        s.apply(&ev(
            "bill",
            "old",
            Some(json!({"dueDate": "2025-06-01"})),
            t0,
        ));
        s.start();
        assert_eq!(s.next_wake(), Some(utc(2026, 1, 12, 0, 0)));
        assert!(s.due(utc(2026, 1, 11, 23, 59)).is_empty());
        let d = s.due(utc(2026, 1, 12, 0, 0));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].entity_id, "b1");
        // The same date again (an unrelated edit): nothing new.
        s.apply(&ev(
            "bill",
            "b1",
            Some(json!({"dueDate": "2026-01-10", "x": 1})),
            t0,
        ));
        assert!(s.due(utc(2026, 2, 1, 0, 0)).is_empty());
        // A later date: a new event.
        s.apply(&ev(
            "bill",
            "b1",
            Some(json!({"dueDate": "2026-02-10T12:00:00Z"})),
            t0,
        ));
        let d2 = s.due(utc(2026, 3, 1, 0, 0));
        assert_eq!(d2.len(), 1);
        assert_ne!(d2[0].id(), d[0].id());
        // Deleted entities fire no more.
        s.apply(&ev(
            "bill",
            "b1",
            Some(json!({"dueDate": "2026-04-10"})),
            t0,
        ));
        s.apply(&ev("bill", "b1", None, t0));
        assert!(s.due(utc(2027, 1, 1, 0, 0)).is_empty());
    }

    #[test]
    fn an_edited_configuration_does_not_replay_the_past() {
        let t0 = utc(2026, 1, 1, 0, 0);
        let edit = utc(2026, 2, 1, 0, 0);
        let mut s = ScheduledEvents::default();
        s.apply(&ev(
            "bill",
            "b1",
            Some(json!({"dueDate": "2026-01-10"})),
            t0,
        ));
        s.apply(&ev(
            "bill",
            "b2",
            Some(json!({"dueDate": "2026-02-10"})),
            t0,
        ));
        s.start();
        s.apply(&ev(
            CONFIG_TYPE,
            "c1",
            Some(json!({"name": "scheduled.bill.due", "entity": "Bill", "field": "dueDate", "offset": 5,
                "dtCreated": t0.to_rfc3339(), "dtLastModified": edit.to_rfc3339()})),
            edit,
        ));
        let d = s.due(utc(2026, 3, 1, 0, 0));
        let ids: Vec<&str> = d.iter().map(|d| d.entity_id.as_str()).collect();
        assert_eq!(ids, ["b2"], "b1's instant (Jan 15) is before the edit");
    }

    #[test]
    fn emitted_events_are_remembered_across_restarts() {
        let t0 = utc(2026, 1, 1, 0, 0);
        let config = ev(
            CONFIG_TYPE,
            "c1",
            Some(
                json!({"name": "scheduled.account.epoch", "entity": "Account", "field": "billEpoch", "offset": 0, "dtCreated": t0.to_rfc3339()}),
            ),
            t0,
        );
        let account = ev(
            "account",
            "a1",
            Some(json!({"billEpoch": "2026-01-05"})),
            t0,
        );
        let mut first = ScheduledEvents::default();
        first.apply(&config);
        first.apply(&account);
        first.start();
        let d = first.due(utc(2026, 1, 6, 0, 0));
        assert_eq!(d.len(), 1);
        let mut second = ScheduledEvents::default();
        second.remember(d[0].key());
        second.apply(&config);
        second.apply(&account);
        second.start();
        assert!(second.due(utc(2026, 1, 6, 0, 0)).is_empty());
    }

    #[test]
    fn bad_configurations_are_refused() {
        let t0 = utc(2026, 1, 1, 0, 0);
        let mut s = ScheduledEvents::default();
        s.apply(&ev(
            CONFIG_TYPE,
            "c1",
            Some(json!({"name": "due soon", "entity": "Bill", "field": "dueDate", "offset": 1})),
            t0,
        ));
        s.apply(&ev(
            CONFIG_TYPE,
            "c2",
            Some(json!({"name": "scheduled.bill.x", "entity": "Bill", "field": "colour", "offset": 1})),
            t0,
        ));
        let r = s.refusals();
        assert_eq!(r.len(), 2);
        assert!(r[0].reason.contains("scheduled.bill."), "{r:?}");
        assert!(r[1].reason.contains("colour"));
    }
}
