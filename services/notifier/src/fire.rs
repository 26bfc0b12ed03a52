//! Firing: every event on `EVENTS` is checked against the active rules on
//! its name, and each rule that fires becomes one delivery per linked
//! webhook on `DELIVERIES`.
//!
//! The event is acknowledged only after its deliveries are stored. Each
//! delivery's message id is its notification id, derived from the event,
//! the rule and the webhook, so an event handled twice (after a crash)
//! produces the same notification, which the stream de-duplicates within
//! its window and receivers de-duplicate on `webhook-id` beyond it.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, AckKind};
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use meterline_shared::{codec::Codec, subjects, ServiceError};

use crate::Notifier;

/// Durable consumer of `EVENTS`.
pub const CONSUMER: &str = "notifier";
/// Events handled together: their deliveries are stored concurrently.
const BATCH: usize = 256;

/// One pending webhook delivery, the payload of `notify.<org>.<webhook>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// The notification id: `webhook-id` on every attempt.
    pub id: String,
    pub org_id: String,
    pub webhook_id: String,
    pub rule_id: String,
    pub event_name: String,
    pub created_at: String,
    /// The exact JSON body POSTed on every attempt.
    pub body: String,
}

/// The notification id of `rule` firing on an event for `webhook`: the same
/// however often the event is handled.
pub fn notification_id(org: &str, event_id: &str, rule: &str, webhook: &str) -> String {
    let name = format!("{org}/{event_id}/{rule}/{webhook}");
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string()
}

/// What one event makes: deliveries to store, and calculation errors.
pub struct Fired {
    pub deliveries: Vec<Delivery>,
    pub errors: Vec<(String, String)>,
}

impl Notifier {
    /// Decides which rules fire on one event (`seq` is its `EVENTS`
    /// position), without side effects.
    pub fn fire(&self, org: &str, seq: u64, event: &Value) -> Fired {
        let mut out = Fired {
            deliveries: Vec::new(),
            errors: Vec::new(),
        };
        let Some(event_name) = event.get("eventName").and_then(Value::as_str) else {
            return out;
        };
        let candidates = self.state.candidates(org, event_name);
        if candidates.is_empty() {
            return out;
        }
        let event_id = event
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| seq.to_string());
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        for c in candidates {
            let fires = if c.rule.always {
                true
            } else if let Some(calc) = &c.rule.calculation {
                match calc.eval(event) {
                    Ok(b) => b,
                    Err(e) => {
                        out.errors.push((c.rule.id.clone(), e.message));
                        false
                    }
                }
            } else {
                false
            };
            if !fires {
                continue;
            }
            metrics::counter!("meterline_notifier_rules_fired_total").increment(1);
            for webhook in &c.webhooks {
                let id = notification_id(org, &event_id, &c.rule.id, webhook);
                let body = json!({
                    "id": id,
                    "type": "notification",
                    "orgId": org,
                    "timestamp": now,
                    "notification": {
                        "id": c.rule.id,
                        "code": c.rule.code,
                        "name": c.rule.name,
                        "eventName": c.rule.event_name,
                    },
                    "eventId": seq.to_string(),
                    "event": event,
                });
                out.deliveries.push(Delivery {
                    id,
                    org_id: org.to_owned(),
                    webhook_id: webhook.clone(),
                    rule_id: c.rule.id.clone(),
                    event_name: event_name.to_owned(),
                    created_at: now.clone(),
                    body: body.to_string(),
                });
            }
        }
        out
    }

    /// Stores deliveries on `DELIVERIES` and waits for every acknowledgement.
    pub async fn enqueue(
        &self,
        deliveries: &[Delivery],
        msg_suffix: &str,
    ) -> Result<(), ServiceError> {
        // The client bounds the publishes waiting for acknowledgements (and
        // events are handled concurrently): wait for them in groups.
        const GROUP: usize = 256;
        let mut acks: Vec<jetstream::context::PublishAckFuture> =
            Vec::with_capacity(deliveries.len().min(GROUP));
        for d in deliveries {
            if acks.len() == GROUP {
                for ack in acks.drain(..) {
                    ack.await.map_err(|e| {
                        ServiceError::unavailable(format!("queueing a delivery failed: {e}"))
                    })?;
                }
            }
            let mut headers = Codec::Json.headers();
            headers.insert("Nats-Msg-Id", format!("{}{msg_suffix}", d.id).as_str());
            let payload = serde_json::to_vec(d).map_err(ServiceError::internal)?;
            let publish = jetstream::message::PublishMessage::build()
                .payload(Bytes::from(payload))
                .headers(headers);
            let ack = self
                .js
                .send_publish(subjects::delivery(&d.org_id, &d.webhook_id), publish)
                .await
                .map_err(|e| {
                    ServiceError::unavailable(format!("queueing a delivery failed: {e}"))
                })?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| {
                ServiceError::unavailable(format!("queueing a delivery failed: {e}"))
            })?;
        }
        Ok(())
    }

    /// What one event message fires (calculation errors are reported
    /// here); nothing is stored yet.
    pub fn prepare(&self, msg: &jetstream::Message) -> Vec<Delivery> {
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let Some(org) = msg.subject.as_str().split('.').nth(1) else {
            return Vec::new();
        };
        let event: Value = match serde_json::from_slice(&msg.payload) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(seq, error = %e, "skipping an event that is not JSON");
                return Vec::new();
            }
        };
        let fired = self.fire(org, seq, &event);
        for (rule, error) in &fired.errors {
            metrics::counter!("meterline_notifier_calculation_errors_total").increment(1);
            tracing::warn!(org, rule = %rule, seq, %error, "calculation failed on an event; the rule did not fire");
        }
        fired.deliveries
    }
}

pub(crate) async fn consumer(
    events: &jetstream::stream::Stream,
) -> Result<jetstream::consumer::Consumer<pull::Config>, anyhow::Error> {
    Ok(events
        .get_or_create_consumer(
            CONSUMER,
            pull::Config {
                durable_name: Some(CONSUMER.into()),
                description: Some("Meterline notifier: fires notification rules".into()),
                // Rules apply to events from the moment the notifier first
                // runs; after that the durable consumer resumes where it was.
                deliver_policy: jetstream::consumer::DeliverPolicy::New,
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(60),
                max_deliver: -1,
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
        .await?)
}

/// The firing loop: takes events as they arrive, in chunks of what is
/// ready at once; makes sure every rule written before them is known; fires;
/// stores deliveries; then acknowledges.
pub async fn run(
    notifier: Notifier,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    shutdown: CancellationToken,
) {
    loop {
        // A pull request that waits for events (up to a second), so an
        // idle notifier does not poll.
        let pulled = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            b = consumer.batch().max_messages(BATCH).expires(Duration::from_secs(1)).messages() => b,
        };
        let mut batch = match pulled {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "pulling events failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                m = batch.next() => m,
            };
            let Some(first) = first else { break };
            let mut messages = Vec::new();
            match first {
                Ok(m) => messages.push(m),
                Err(e) => {
                    tracing::debug!(error = %e, "no event");
                    continue;
                }
            }
            while messages.len() < BATCH {
                match batch.next().now_or_never() {
                    Some(Some(Ok(m))) => messages.push(m),
                    Some(Some(Err(_))) => continue,
                    _ => break,
                }
            }
            handle_chunk(&notifier, &messages).await;
        }
    }
}

async fn handle_chunk(notifier: &Notifier, messages: &[jetstream::Message]) {
    // Rules, webhooks and links written before these events.
    let last = crate::state::last_relevant_seq(&notifier.entities).await;
    if tokio::time::timeout(Duration::from_secs(5), notifier.state.wait_for(last))
        .await
        .is_err()
    {
        tracing::warn!(
            last,
            applied = notifier.state.applied(),
            "rules are not caught up; firing with what is known"
        );
    }
    let deliveries: Vec<Delivery> = messages.iter().flat_map(|m| notifier.prepare(m)).collect();
    // One writer per chunk: the client bounds the publishes waiting for
    // their acknowledgements, and `enqueue` waits for them in groups.
    let stored = notifier.enqueue(&deliveries, "").await;
    if let Err(e) = &stored {
        tracing::warn!(error = %e.message, events = messages.len(), "deliveries not stored; the events will be redelivered");
    }
    for msg in messages {
        let ack = match &stored {
            Ok(()) => msg.ack().await,
            Err(_) => {
                msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await
            }
        };
        if let Err(e) = ack {
            tracing::warn!(error = %e, "acknowledging an event failed");
        }
    }
}
