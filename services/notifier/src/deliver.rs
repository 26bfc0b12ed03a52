//! Delivery: each message on `DELIVERIES` is POSTed to its webhook, signed
//! per Standard Webhooks, until the webhook answers 2xx.
//!
//! At least once: the message is acknowledged only after a 2xx, or after it
//! is stored as a dead letter. A failed attempt (5xx, 429, another 4xx, a
//! timeout, a refused or dropped connection) is retried after the next
//! delay of the retry schedule, or after the `Retry-After` the webhook asked
//! for; the attempt number is the stream's delivery count, so it survives
//! restarts. After the last retry, and at once on `410 Gone` (which also
//! deactivates the webhook) or when the webhook is inactive, deleted, or
//! refused by the egress policy, the delivery becomes a dead letter on
//! `DEADLETTERS` and an `integration.webhook.error` event on `EVENTS`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, AckKind};
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use meterline_shared::envelope::HEADER_EVENT_NAME;
use meterline_shared::shutdown::DRAIN_DEADLINE;
use meterline_shared::{codec::Codec, subjects};

use crate::fire::Delivery;
use crate::sign;
use crate::Notifier;

/// Durable consumer of `DELIVERIES`.
pub const CONSUMER: &str = "notifier-deliveries";
/// The event name of a delivery that failed for good.
pub const ERROR_EVENT: &str = "integration.webhook.error";

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered(u16),
    /// Worth another attempt; `after` is the webhook's `Retry-After`.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// `410 Gone`: the webhook is deactivated and the delivery dead-lettered.
    Gone,
    /// Cannot succeed by retrying (refused address, no secret...).
    Fail {
        reason: String,
        error_type: &'static str,
    },
}

/// Parses a retry schedule such as `5s,5m,30m,2h,5h,10h,10h` (units `ms`,
/// `s`, `m`, `h`, `d`): the delay before each retry.
pub fn parse_schedule(text: &str) -> Result<Vec<Duration>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let split = s
                .find(|c: char| !c.is_ascii_digit())
                .ok_or_else(|| format!("{s:?} has no unit (ms, s, m, h, d)"))?;
            let (n, unit) = s.split_at(split);
            let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a delay"))?;
            let ms = match unit {
                "ms" => 1,
                "s" => 1000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return Err(format!("{s:?}: the unit must be ms, s, m, h or d")),
            };
            Ok(Duration::from_millis(n.saturating_mul(ms)))
        })
        .collect()
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let secs = (at.with_timezone(&Utc) - Utc::now()).num_seconds().max(0);
    Some(Duration::from_secs(secs as u64))
}

impl Notifier {
    /// One attempt to deliver `d`.
    pub async fn attempt(&self, d: &Delivery) -> Outcome {
        let Some(webhook) = self.state.webhook(&d.org_id, &d.webhook_id) else {
            return Outcome::Fail {
                reason: "the webhook no longer exists".into(),
                error_type: "disabled",
            };
        };
        if !webhook.active {
            return Outcome::Fail {
                reason: "the webhook is not active".into(),
                error_type: "disabled",
            };
        }
        let target = match self.egress.check_url(&webhook.url) {
            Ok(t) => t,
            Err(e) => {
                return Outcome::Fail {
                    reason: e.message,
                    error_type: "validation",
                }
            }
        };
        // Resolved here and checked, then pinned in the client's resolver
        // (see `lib.rs`), so a name cannot point elsewhere between the
        // check and the connection.
        if let Err(e) = self.egress.resolve(&target.host, target.port).await {
            return if e.code == meterline_shared::ErrorCode::Unavailable {
                Outcome::Retry {
                    reason: e.message,
                    after: None,
                }
            } else {
                Outcome::Fail {
                    reason: e.message,
                    error_type: "validation",
                }
            };
        }
        let key = match webhook.sealed_secret.as_deref() {
            Some(s) if s.starts_with(meterline_shared::seal::PREFIX) => match self.sealer.open(s) {
                Ok(clear) => sign::key_of(&clear),
                Err(e) => {
                    return Outcome::Fail {
                        reason: format!("the webhook's secret cannot be opened: {}", e.message),
                        error_type: "authentication",
                    }
                }
            },
            Some(clear) if !clear.is_empty() => sign::key_of(clear),
            _ => {
                return Outcome::Fail {
                    reason: "the webhook has no secret".into(),
                    error_type: "authentication",
                }
            }
        };
        let timestamp = Utc::now().timestamp();
        let signature = sign::signature(&key, &d.id, timestamp, d.body.as_bytes());
        let mut req = self
            .http
            .post(&webhook.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(sign::HEADER_ID, &d.id)
            .header(sign::HEADER_TIMESTAMP, timestamp.to_string())
            .header(sign::HEADER_SIGNATURE, signature)
            .body(d.body.clone());
        if let Some(k) = &webhook.api_key {
            req = req.header(sign::HEADER_API_KEY, k);
        }
        match req.send().await {
            Ok(res) => {
                let status = res.status().as_u16();
                let after = retry_after(res.headers());
                match status {
                    200..=299 => Outcome::Delivered(status),
                    410 => Outcome::Gone,
                    _ => Outcome::Retry {
                        reason: format!("the webhook answered {status}"),
                        after,
                    },
                }
            }
            Err(e) if e.is_timeout() => Outcome::Retry {
                reason: format!(
                    "the webhook did not answer within {:?}",
                    self.request_timeout
                ),
                after: None,
            },
            Err(e) => Outcome::Retry {
                reason: format!("the request failed: {}", error_chain(&e)),
                after: None,
            },
        }
    }

    /// Handles one `DELIVERIES` message (attempt `attempt`, from 1).
    pub async fn process_delivery(&self, msg: &jetstream::Message) {
        let d: Delivery = match serde_json::from_slice(&msg.payload) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %e, "dropping an unreadable delivery");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        let attempt = msg.info().map(|i| i.delivered).unwrap_or(1).max(1) as usize;
        let started = std::time::Instant::now();
        let outcome = self.attempt(&d).await;
        metrics::histogram!("meterline_notifier_attempt_seconds").record(started.elapsed());
        let (org, webhook, id) = (&d.org_id, &d.webhook_id, &d.id);
        let result: Result<(), String> = match outcome {
            Outcome::Delivered(status) => {
                metrics::counter!("meterline_notifier_deliveries_total", "outcome" => "delivered")
                    .increment(1);
                tracing::debug!(org, webhook, id, attempt, status, "delivered");
                msg.double_ack().await.map_err(|e| e.to_string())
            }
            Outcome::Retry { reason, after } if attempt <= self.schedule.len() => {
                let delay = after
                    .map(|a| a.min(self.max_retry_after))
                    .unwrap_or(self.schedule[attempt - 1]);
                metrics::counter!("meterline_notifier_deliveries_total", "outcome" => "retried")
                    .increment(1);
                tracing::info!(org, webhook, id, attempt, retry_in = ?delay, %reason, "delivery failed; will retry");
                msg.ack_with(AckKind::Nak(Some(delay)))
                    .await
                    .map_err(|e| e.to_string())
            }
            Outcome::Retry { reason, .. } => {
                self.dead_letter(
                    msg,
                    &d,
                    attempt,
                    &format!("{reason} (after {attempt} attempts)"),
                    "perform",
                )
                .await
            }
            Outcome::Gone => {
                if let Err(e) = crate::api::set_active(self, org, webhook, false).await {
                    tracing::warn!(org, webhook, error = %e.message, "deactivating a gone webhook failed");
                }
                self.dead_letter(
                    msg,
                    &d,
                    attempt,
                    "the webhook answered 410 Gone; it is now inactive",
                    "disabled",
                )
                .await
            }
            Outcome::Fail { reason, error_type } => {
                self.dead_letter(msg, &d, attempt, &reason, error_type)
                    .await
            }
        };
        if let Err(e) = result {
            tracing::warn!(org, webhook, id, error = %e, "settling a delivery failed; it will be tried again");
        }
    }

    /// Stores `d` as a dead letter and publishes the error event, then
    /// acknowledges the delivery. Both writes carry message ids, so doing it
    /// twice stores them once.
    async fn dead_letter(
        &self,
        msg: &jetstream::Message,
        d: &Delivery,
        attempts: usize,
        reason: &str,
        error_type: &str,
    ) -> Result<(), String> {
        metrics::counter!("meterline_notifier_deliveries_total", "outcome" => "dead").increment(1);
        tracing::warn!(org = %d.org_id, webhook = %d.webhook_id, id = %d.id, attempts, %reason, "delivery failed for good; dead-lettered");
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let letter = json!({
            "id": d.id,
            "delivery": d,
            "attempts": attempts,
            "lastError": reason,
            "errorType": error_type,
            "dtFailed": now,
        });
        let url = self
            .state
            .webhook(&d.org_id, &d.webhook_id)
            .map(|w| w.url.clone());
        let event_id = uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("dead/{}/{seq}", d.id).as_bytes(),
        )
        .to_string();
        let event = json!({
            "id": event_id,
            "eventName": ERROR_EVENT,
            "eventTime": now,
            "orgId": d.org_id,
            "errorType": error_type,
            "message": reason,
            "notificationId": d.id,
            "ruleId": d.rule_id,
            "webhookId": d.webhook_id,
            "url": url,
            "attempts": attempts,
        });
        let publish = |subject: String, msg_id: String, event_name: Option<&str>, body: &Value| {
            let mut headers = Codec::Json.headers();
            headers.insert("Nats-Msg-Id", msg_id.as_str());
            if let Some(n) = event_name {
                headers.insert(HEADER_EVENT_NAME, n);
            }
            let bytes = Bytes::from(body.to_string());
            async move {
                self.js
                    .publish_with_headers(subject, headers, bytes)
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        publish(
            subjects::dead_letter(&d.org_id, &d.id),
            format!("dead-{}-{seq}", d.id),
            None,
            &letter,
        )
        .await?;
        publish(
            subjects::event(&d.org_id, ERROR_EVENT),
            event_id.clone(),
            Some(ERROR_EVENT),
            &event,
        )
        .await?;
        msg.double_ack().await.map_err(|e| e.to_string())
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

pub(crate) async fn consumer(
    deliveries: &jetstream::stream::Stream,
    ack_wait: Duration,
) -> Result<jetstream::consumer::Consumer<pull::Config>, anyhow::Error> {
    Ok(deliveries
        .get_or_create_consumer(
            CONSUMER,
            pull::Config {
                durable_name: Some(CONSUMER.into()),
                description: Some("Meterline notifier: delivers webhooks".into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait,
                max_deliver: -1,
                // Deliveries waiting for a retry hold an acknowledgement
                // slot; a webhook that is down for hours must not stop the
                // others.
                max_ack_pending: 1_000_000,
                ..Default::default()
            },
        )
        .await?)
}

/// The delivery loop: at most `workers` attempts at once; a message is
/// pulled only for a free worker, so none waits here while its
/// acknowledgement deadline runs.
pub async fn run(
    notifier: Notifier,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    workers: usize,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(workers.max(1)));
    let mut in_flight = JoinSet::new();
    loop {
        while in_flight.try_join_next().is_some() {}
        // Wait for a free worker, then pull at most as many deliveries as
        // there are free workers; the pull waits (up to a second) for
        // deliveries, so an idle notifier does not poll.
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let free = permits.available_permits() + 1;
        drop(first);
        let fetched = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            b = consumer.batch().max_messages(free).expires(Duration::from_secs(1)).messages() => b,
        };
        let mut batch = match fetched {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "fetching deliveries failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        while let Some(m) = batch.next().await {
            let Ok(msg) = m else { continue };
            let permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let notifier = notifier.clone();
            in_flight.spawn(async move {
                notifier.process_delivery(&msg).await;
                drop(permit);
            });
        }
    }
    let drain = async { while in_flight.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_DEADLINE, drain).await.is_err() {
        tracing::warn!("deliveries in flight did not finish before the deadline");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_with_units() {
        let s = parse_schedule("5s,5m,30m,2h,5h,10h,10h").unwrap();
        assert_eq!(s.len(), 7);
        assert_eq!(s[0], Duration::from_secs(5));
        let total: Duration = s.iter().sum();
        assert!(total > Duration::from_secs(20 * 3600) && total < Duration::from_secs(36 * 3600));
        assert_eq!(
            parse_schedule("100ms, 1d").unwrap()[1],
            Duration::from_secs(86_400)
        );
        assert!(parse_schedule("5").is_err());
        assert!(parse_schedule("5y").is_err());
    }
}
