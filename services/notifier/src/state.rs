//! What the notifier knows of notification rules, webhooks and the links
//! between them, learnt by following `ENTITIES`.
//!
//! A rule's calculation is parsed once, when its version is applied here;
//! events are then evaluated against the parsed tree. [`State::applied`]
//! is the `ENTITIES` sequence of the last rule, webhook or link version
//! applied, so the firing loop can wait until every such write made before
//! an event is known ([`State::wait_for`]): a rule created now applies to the
//! next event, without restarts.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::push};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use meterline_calc::Calculation;
use meterline_shared::envelope::EntityEvent;

/// The `ENTITIES` subjects the notifier follows.
pub const FILTERS: [&str; 3] = [
    "ent.*.notificationrule.*",
    "ent.*.webhook.*",
    "ent.*.integrationconfig.*",
];

/// A notification rule, as last written.
#[derive(Debug)]
pub struct Rule {
    pub id: String,
    pub name: String,
    pub code: String,
    pub event_name: String,
    pub always: bool,
    pub active: bool,
    /// Parsed once; `None` with `always`, or when the stored text does not
    /// parse (a rule written before the check existed): such a rule never
    /// fires, and says why in the log.
    pub calculation: Option<Calculation>,
}

/// A webhook destination, as last written. The secret stays sealed until a
/// delivery needs it.
#[derive(Debug)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    pub api_key: Option<String>,
    pub sealed_secret: Option<String>,
    pub active: bool,
}

#[derive(Default)]
struct Org {
    rules: HashMap<String, Arc<Rule>>,
    webhooks: HashMap<String, Arc<Webhook>>,
    /// Integration config id → (rule id, webhook id).
    links: HashMap<String, (String, String)>,
    /// Event name → active rules on it (rebuilt when a rule changes).
    by_event: HashMap<String, Vec<Arc<Rule>>>,
}

impl Org {
    fn reindex(&mut self) {
        self.by_event.clear();
        for r in self.rules.values().filter(|r| r.active) {
            self.by_event
                .entry(r.event_name.clone())
                .or_default()
                .push(r.clone());
        }
        for rules in self.by_event.values_mut() {
            rules.sort_by(|a, b| a.id.cmp(&b.id));
        }
    }
}

/// Rules, webhooks and links of every org, and how far they are applied.
pub struct State {
    orgs: RwLock<HashMap<String, Org>>,
    applied: watch::Sender<u64>,
}

impl Default for State {
    fn default() -> Self {
        State {
            orgs: RwLock::default(),
            applied: watch::channel(0).0,
        }
    }
}

/// A rule that matches an event's name, with the webhooks it is linked to.
pub struct Candidate {
    pub rule: Arc<Rule>,
    pub webhooks: Vec<String>,
}

fn str_of(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

impl State {
    /// The `ENTITIES` sequence of the last applied version.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Waits until the version at `seq` (and everything before it) is applied.
    pub async fn wait_for(&self, seq: u64) {
        let mut rx = self.applied.subscribe();
        let _ = rx.wait_for(|applied| *applied >= seq).await;
    }

    /// Applies one `ENTITIES` message of a followed type.
    pub fn apply(&self, seq: u64, ev: &EntityEvent) {
        let mut orgs = self.orgs.write().unwrap_or_else(|e| e.into_inner());
        let org = orgs.entry(ev.org_id.clone()).or_default();
        let id = ev.entity_id.clone();
        let state = ev.current().filter(|_| !ev.is_tombstone());
        match ev.entity_type.as_str() {
            "notificationrule" => {
                match state {
                    None => {
                        org.rules.remove(&id);
                    }
                    Some(s) => {
                        let always = s
                            .get("alwaysFireEvent")
                            .and_then(Value::as_bool)
                            .unwrap_or(false);
                        let text = s
                            .get("calculation")
                            .and_then(Value::as_str)
                            .filter(|t| !t.trim().is_empty());
                        let calculation = match text {
                            Some(t) if !always => match Calculation::parse(t) {
                                Ok(c) => Some(c),
                                Err(e) => {
                                    tracing::warn!(org = %ev.org_id, rule = %id, error = %e, "stored calculation does not parse; the rule will not fire");
                                    None
                                }
                            },
                            _ => None,
                        };
                        org.rules.insert(
                            id.clone(),
                            Arc::new(Rule {
                                id,
                                name: str_of(s, "name"),
                                code: str_of(s, "code"),
                                event_name: str_of(s, "eventName"),
                                always,
                                active: s.get("active").and_then(Value::as_bool).unwrap_or(true),
                                calculation,
                            }),
                        );
                    }
                }
                org.reindex();
            }
            "webhook" => match state {
                None => {
                    org.webhooks.remove(&id);
                }
                Some(s) => {
                    let creds = s.get("credentials");
                    let cred = |k: &str| {
                        creds
                            .and_then(|c| c.get(k))
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                    };
                    org.webhooks.insert(
                        id.clone(),
                        Arc::new(Webhook {
                            id,
                            url: str_of(s, "url"),
                            api_key: cred("apiKey"),
                            sealed_secret: cred("secret"),
                            active: s.get("active").and_then(Value::as_bool).unwrap_or(true),
                        }),
                    );
                }
            },
            "integrationconfig" => {
                let link = state.and_then(|s| {
                    let is = |k: &str, want: &str| {
                        s.get(k)
                            .and_then(Value::as_str)
                            .is_some_and(|v| v.eq_ignore_ascii_case(want))
                    };
                    (is("entityType", "notification") && is("destination", "webhook"))
                        .then(|| (str_of(s, "entityId"), str_of(s, "destinationId")))
                        .filter(|(r, w)| !r.is_empty() && !w.is_empty())
                });
                match link {
                    Some(l) => {
                        org.links.insert(id, l);
                    }
                    None => {
                        org.links.remove(&id);
                    }
                }
            }
            _ => {}
        }
        drop(orgs);
        self.applied.send_modify(|a| *a = (*a).max(seq));
    }

    /// The active rules on `event_name` in `org`, each with its linked
    /// webhooks (in a stable order).
    pub fn candidates(&self, org: &str, event_name: &str) -> Vec<Candidate> {
        let orgs = self.orgs.read().unwrap_or_else(|e| e.into_inner());
        let Some(o) = orgs.get(org) else {
            return Vec::new();
        };
        let Some(rules) = o.by_event.get(event_name) else {
            return Vec::new();
        };
        rules
            .iter()
            .map(|rule| {
                let mut webhooks: Vec<String> = o
                    .links
                    .values()
                    .filter(|(r, _)| *r == rule.id)
                    .map(|(_, w)| w.clone())
                    .collect();
                webhooks.sort();
                webhooks.dedup();
                Candidate {
                    rule: rule.clone(),
                    webhooks,
                }
            })
            .collect()
    }

    pub fn webhook(&self, org: &str, id: &str) -> Option<Arc<Webhook>> {
        let orgs = self.orgs.read().unwrap_or_else(|e| e.into_inner());
        orgs.get(org)?.webhooks.get(id).cloned()
    }

    pub fn rule(&self, org: &str, id: &str) -> Option<Arc<Rule>> {
        let orgs = self.orgs.read().unwrap_or_else(|e| e.into_inner());
        orgs.get(org)?.rules.get(id).cloned()
    }
}

/// The `ENTITIES` sequence of the last rule, webhook or link write (0 when
/// there is none).
pub async fn last_relevant_seq(entities: &jetstream::stream::Stream) -> u64 {
    let gets = FILTERS.map(|f| entities.direct_get_last_for_subject(f));
    futures::future::join_all(gets)
        .await
        .into_iter()
        .filter_map(Result::ok)
        .map(|m| m.sequence)
        .max()
        .unwrap_or(0)
}

/// Follows rule, webhook and link versions from the start of `ENTITIES`
/// into `state`, resuming after the last applied one if interrupted.
pub async fn follow(
    entities: jetstream::stream::Stream,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    loop {
        let next = state.applied() + 1;
        let consumer = entities
            .create_consumer(push::OrderedConfig {
                deliver_subject: format!("_INBOX.notifier-rules.{}", uuid::Uuid::new_v4().simple()),
                filter_subjects: FILTERS.iter().map(|s| s.to_string()).collect(),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: next,
                },
                ..Default::default()
            })
            .await;
        match consumer {
            Ok(c) => match c.messages().await {
                Ok(mut messages) => loop {
                    let msg = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        m = messages.next() => m,
                    };
                    let Some(Ok(msg)) = msg else { break };
                    let Ok(seq) = msg.info().map(|i| i.stream_sequence) else {
                        break;
                    };
                    match serde_json::from_slice::<EntityEvent>(&msg.payload) {
                        Ok(ev) => state.apply(seq, &ev),
                        Err(e) => {
                            tracing::warn!(seq, error = %e, "skipping undecodable entity version");
                            state.applied.send_modify(|a| *a = (*a).max(seq));
                        }
                    }
                },
                Err(e) => tracing::warn!(error = %e, "following rules failed"),
            },
            Err(e) => tracing::warn!(error = %e, "following rules failed"),
        }
        tracing::warn!("following rules interrupted; resuming");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
