//! Notifications: event-to-webhook latency at a steady rate of events with
//! 100 rules on their name (each event fires one rule, one signed delivery
//! to a local receiver), and the most deliveries per second the notifier
//! makes to that receiver; beside core NATS request/reply (no JetStream) on
//! the same server: the same steady rate for latency, and as fast as it
//! goes at the same concurrency for throughput.
//!
//! Rules, the webhook and the links are written straight onto `ENTITIES`
//! (as the entities service would write them), so only the notifier is
//! measured. `BENCH_NOTIFY_RATE` (events per second, default 1000),
//! `BENCH_NOTIFY_SECS` (default 10) and `BENCH_NOTIFY_DELIVERIES` (default
//! 10000) size it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};

use meterline_notifier::fire::Delivery;
use meterline_notifier::{App, Settings};
use meterline_shared::envelope::{Action, EntityEvent};
use meterline_shared::provision;
use meterline_shared::seal::Sealer;
use meterline_shared::testkit::{eventually, NatsServer, Running};
use meterline_shared::{subjects, ServiceError};

use crate::{compare, env_usize, Figure, Row, ORG};

const RULES: usize = 100;

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What the receiver saw: each delivery's latency from its `sentAt`.
#[derive(Default)]
struct Seen {
    latencies: Mutex<Vec<Duration>>,
}

async fn receiver(seen: Arc<Seen>) -> anyhow::Result<SocketAddr> {
    let app = Router::new().route(
        "/hook",
        post(move |body: Bytes| {
            let seen = seen.clone();
            async move {
                let now = micros_now();
                if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                    let sent = v["event"]["new"]["sentAt"].as_u64().unwrap_or(now);
                    let lat = Duration::from_micros(now.saturating_sub(sent));
                    seen.latencies
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(lat);
                }
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

fn entity_event(ty: &str, id: &str, action: Action, new: Value) -> EntityEvent {
    EntityEvent {
        id: uuid::Uuid::new_v4().to_string(),
        event_name: format!("configuration.{ty}.{}", action.as_str()),
        event_time: chrono_now(),
        org_id: ORG.into(),
        entity_type: ty.into(),
        entity_id: id.into(),
        action,
        actor: "bench".into(),
        new: Some(new),
        old: None,
    }
}

fn chrono_now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

async fn write(js: &jetstream::Context, ev: &EntityEvent) -> anyhow::Result<()> {
    js.publish(
        subjects::entity(ORG, &ev.entity_type, &ev.entity_id),
        Bytes::from(serde_json::to_vec(ev)?),
    )
    .await?
    .await?;
    Ok(())
}

fn count(seen: &Seen) -> usize {
    seen.latencies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .len()
}

fn take(seen: &Seen) -> Vec<Duration> {
    std::mem::take(&mut *seen.latencies.lock().unwrap_or_else(|e| e.into_inner()))
}

pub async fn run(nats: &NatsServer) -> anyhow::Result<Vec<Row>> {
    let rate = env_usize("BENCH_NOTIFY_RATE", 1000).max(1);
    let secs = env_usize("BENCH_NOTIFY_SECS", 10).max(1);
    let max_deliveries = env_usize("BENCH_NOTIFY_DELIVERIES", 10_000).max(1);
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    provision::ensure_core(&js, 1).await?;

    let seen = Arc::new(Seen::default());
    let addr = receiver(seen.clone()).await?;
    let mut settings = Settings::for_tests(nats.url());
    settings.workers = 256;
    let sealer = Sealer::from_base64(settings.sealing_key.expose())?;

    // One webhook, 100 rules on one event name, each linked to it.
    let secret = sealer
        .seal("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        .map_err(|e: ServiceError| anyhow::anyhow!(e.message))?;
    write(
        &js,
        &entity_event(
            "webhook",
            "bench-hook",
            Action::Created,
            json!({"id": "bench-hook", "url": format!("http://{addr}/hook"), "active": true,
                   "credentials": {"type": "M3TER_SIGNED_REQUEST", "apiKey": "k", "secret": secret}}),
        ),
    )
    .await?;
    for i in 0..RULES {
        let id = format!("rule-{i}");
        write(
            &js,
            &entity_event(
                "notificationrule",
                &id,
                Action::Created,
                json!({"id": id, "code": id, "name": id, "eventName": "configuration.product.updated",
                       "active": true, "calculation": format!("new.bucket == {i} AND new.sentAt > 0")}),
            ),
        )
        .await?;
        write(
            &js,
            &entity_event(
                "integrationconfig",
                &format!("link-{i}"),
                Action::Created,
                json!({"entityType": "Notification", "entityId": id,
                       "destination": "Webhook", "destinationId": "bench-hook"}),
            ),
        )
        .await?;
    }

    let app = App::build(settings).await?;
    let notifier = app.notifier().clone();
    let running = Running::spawn(|stop| app.run_until_stopped(stop));
    let mut entities = js.get_stream(subjects::ENTITIES_STREAM).await?;
    let last = entities.info().await?.state.last_sequence;
    eventually(Duration::from_secs(30), "rules loaded", || {
        let applied = notifier.state().applied();
        async move { (applied >= last).then_some(()) }
    })
    .await;

    // 1. Latency at a steady rate: each event fires one of the 100 rules.
    let n = rate * secs;
    println!("notifier: {n} events at {rate}/s, {RULES} rules on their name; then {max_deliveries} deliveries as fast as they go");
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut acks = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        tick.tick().await;
        let ev = entity_event(
            "product",
            &format!("p{}", i % 1000),
            Action::Updated,
            json!({"bucket": i % RULES, "sentAt": micros_now()}),
        );
        let ack = js
            .publish(
                subjects::entity(ORG, "product", &ev.entity_id),
                Bytes::from(serde_json::to_vec(&ev)?),
            )
            .await?;
        acks.push(std::future::IntoFuture::into_future(ack));
        while let Some(Some(r)) = futures::FutureExt::now_or_never(acks.next()) {
            r?;
        }
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    println!("notifier: {n} events published; waiting for their deliveries");
    eventually(Duration::from_secs(120), "every event delivered", || {
        let done = count(&seen) >= n;
        async move { done.then_some(()) }
    })
    .await;
    let steady = Figure {
        ops: n,
        elapsed: started.elapsed(),
        latencies: take(&seen),
    };

    // 2. Deliveries as fast as they go: queued straight onto DELIVERIES.
    let body = |i: usize| {
        json!({"id": format!("max-{i}"), "event": {"new": {"sentAt": micros_now()}}}).to_string()
    };
    let started = Instant::now();
    // Acknowledgements are awaited a thousand at a time: the client bounds
    // how many publishes may wait for theirs.
    let mut acks = Vec::with_capacity(1000);
    for i in 0..max_deliveries {
        if acks.len() == 1000 {
            for a in acks.drain(..) {
                a.await?;
            }
        }
        let d = Delivery {
            id: format!("max-{i}"),
            org_id: ORG.into(),
            webhook_id: "bench-hook".into(),
            rule_id: "rule-0".into(),
            event_name: "configuration.product.updated".into(),
            created_at: String::new(),
            body: body(i),
        };
        acks.push(
            js.publish(
                subjects::delivery(ORG, "bench-hook"),
                Bytes::from(serde_json::to_vec(&d)?),
            )
            .await?,
        );
    }
    for a in acks {
        a.await?;
    }
    eventually(
        Duration::from_secs(300),
        "every queued delivery made",
        || {
            let done = count(&seen) >= max_deliveries;
            async move { done.then_some(()) }
        },
    )
    .await;
    let burst = Figure {
        ops: max_deliveries,
        elapsed: started.elapsed(),
        latencies: take(&seen),
    };
    running.stop().await;

    // Core NATS request/reply on the same server.
    let responder = client.subscribe("bench.echo").await?;
    let echo = client.clone();
    let echo_task = tokio::spawn(async move {
        let mut responder = responder;
        while let Some(m) = responder.next().await {
            if let Some(reply) = m.reply {
                let _ = echo.publish(reply, m.payload).await;
            }
        }
    });
    let payload = Bytes::from(vec![b'x'; 512]);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        tick.tick().await;
        let c = client.clone();
        let p = payload.clone();
        inflight.push(async move {
            let t = Instant::now();
            c.request("bench.echo", p).await.map(|_| t.elapsed())
        });
        while let Some(Some(r)) = futures::FutureExt::now_or_never(inflight.next()) {
            lat.push(r?);
        }
    }
    while let Some(r) = inflight.next().await {
        lat.push(r?);
    }
    let raw_steady = Figure {
        ops: n,
        elapsed: started.elapsed(),
        latencies: lat,
    };
    let raw_burst = crate::measure(max_deliveries, 256, |_| {
        let c = client.clone();
        let p = payload.clone();
        async move {
            c.request("bench.echo", p).await?;
            Ok(())
        }
    })
    .await?;
    echo_task.abort();

    let mut rows = compare(
        &format!("event→webhook at {rate}/s, {RULES} rules (raw: request/reply at {rate}/s)"),
        "events",
        1,
        &steady,
        &raw_steady,
    );
    rows.extend(compare(
        "webhook deliveries queued at once, 256 in flight; latency = time in queue (raw: request/reply, 256 in flight)",
        "deliveries",
        1,
        &burst,
        &raw_burst,
    ));
    Ok(rows)
}
