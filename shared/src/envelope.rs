//! The entity event: the one message shape of the `ENTITIES` stream.
//!
//! Each mutation of an entity is appended to `ENTITIES` as one JSON
//! [`EntityEvent`] carrying the full new state, the old state, the action and
//! who did it. `EVENTS` sources these bytes unchanged (with a subject
//! transform), so the stored mutation *is* the user-visible Event: there is no
//! second write that could be lost or disagree.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Header carrying the event name (e.g. `configuration.account.created`), so
/// consumers can filter without parsing the payload.
pub const HEADER_EVENT_NAME: &str = "Meterline-Event-Name";
/// Header carrying the action (`created`, `updated`, `deleted`).
pub const HEADER_ACTION: &str = "Meterline-Action";
/// Header naming who asked for a request (set by the gateway from the token,
/// or by a bus producer about itself).
pub const HEADER_ACTOR: &str = "Meterline-Actor";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Created,
    Updated,
    Deleted,
}

impl Action {
    pub const ALL: [Action; 3] = [Action::Created, Action::Updated, Action::Deleted];

    /// The action named `name` (as [`Action::as_str`] writes it).
    pub fn parse(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Created => "created",
            Action::Updated => "updated",
            Action::Deleted => "deleted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntityEvent {
    /// Unique id of this event (a ULID). Also the `Nats-Msg-Id` of the write,
    /// so a retried publish is de-duplicated by the stream.
    pub id: String,
    /// e.g. `configuration.account.created`.
    pub event_name: String,
    pub event_time: DateTime<Utc>,
    pub org_id: String,
    /// Registry name of the entity type, e.g. `account`.
    pub entity_type: String,
    pub entity_id: String,
    pub action: Action,
    /// Who made the change: a service user id, or a bus producer's name.
    pub actor: String,
    /// The state after the change; `null` for a delete.
    pub new: Option<Value>,
    /// The state before the change; `null` for a create. A delete carries the
    /// last state here.
    pub old: Option<Value>,
}

impl EntityEvent {
    /// A change made now by `actor`: a fresh id, and the event name of the
    /// type's category in the registry (`configuration` for types it does
    /// not know).
    pub fn now(
        org: &str,
        entity_type: &str,
        entity_id: &str,
        action: Action,
        actor: &str,
        new: Option<Value>,
        old: Option<Value>,
    ) -> EntityEvent {
        EntityEvent {
            id: uuid::Uuid::now_v7().to_string(),
            event_name: crate::registry::get(entity_type).map_or_else(
                || format!("configuration.{entity_type}.{}", action.as_str()),
                |t| t.event_name(action),
            ),
            event_time: Utc::now(),
            org_id: org.to_owned(),
            entity_type: entity_type.to_owned(),
            entity_id: entity_id.to_owned(),
            action,
            actor: actor.to_owned(),
            new,
            old,
        }
    }

    /// The entity's state as of this event: `new`, or for a tombstone `None`.
    pub fn current(&self) -> Option<&Value> {
        self.new.as_ref()
    }

    pub fn is_tombstone(&self) -> bool {
        self.action == Action::Deleted
    }

    /// The headers it is stored with on `ENTITIES` (JSON payload): its
    /// content type, event name and action, so readers can route and
    /// filter without parsing the payload.
    pub fn headers(&self) -> async_nats::HeaderMap {
        let mut headers = crate::codec::Codec::Json.headers();
        headers.insert(HEADER_EVENT_NAME, self.event_name.as_str());
        headers.insert(HEADER_ACTION, self.action.as_str());
        headers
    }
}
