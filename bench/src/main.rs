//! `make bench`: Meterline's figures beside the raw bus figures for the same
//! work, measured in the same run against the same nats-server (JetStream,
//! `sync_interval: always`), printed as one table with ratios.
//!
//! Entity writes: creates and version-checked updates through the entities
//! service's NATS request path, against the same number of
//! `Nats-Expected-Last-Subject-Sequence` publishes of the same bytes on a
//! bare stream, at the same concurrency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage, stream};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};

use meterline_entities::{App, Settings};
use meterline_shared::protocol::EntityRequest;
use meterline_shared::shutdown::CancellationToken;
use meterline_shared::testkit::NatsServer;
use meterline_shared::{bus, subjects};

const ORG: &str = "bench";

struct Figure {
    ops: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Figure {
    fn empty() -> Figure {
        Figure {
            ops: 0,
            elapsed: Duration::ZERO,
            latencies: Vec::new(),
        }
    }
    fn add(&mut self, other: Figure) {
        self.ops += other.ops;
        self.elapsed += other.elapsed;
        self.latencies.extend(other.latencies);
    }
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l[((l.len() as f64 * p).ceil() as usize)
            .saturating_sub(1)
            .min(l.len() - 1)]
    }
}

/// Runs `n` operations `f(i)` with `concurrency` in flight; records each
/// operation's latency.
async fn measure<F, Fut>(n: usize, concurrency: usize, f: F) -> anyhow::Result<Figure>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let start = Instant::now();
    let latencies: Vec<Duration> = futures::stream::iter(0..n)
        .map(|i| {
            let fut = f(i);
            async move {
                let t = Instant::now();
                fut.await.map(|_| t.elapsed())
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    Ok(Figure {
        ops: n,
        elapsed: start.elapsed(),
        latencies,
    })
}

fn product(i: usize) -> Value {
    json!({"name": format!("Product {i}"), "code": format!("product-{i}")})
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::var("BENCH_ENTITY_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let concurrency: usize = std::env::var("BENCH_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let nats = NatsServer::start();
    let client = nats.client().await;
    let js = jetstream::new(client.clone());

    let app = App::build(Settings::for_tests(nats.url())).await?;
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(stop.clone()));
    let creds = loop {
        match meterline_entities::bootstrap(&client, ORG, "Bench", "bench").await {
            Ok(c) => break c,
            Err(e) if e.code == meterline_shared::ErrorCode::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => anyhow::bail!("bootstrap: {e}"),
        }
    };
    let _ = creds;

    // The bare stream: same storage and sync settings as ENTITIES.
    js.create_stream(stream::Config {
        name: "RAW".into(),
        subjects: vec!["raw.>".into()],
        storage: stream::StorageType::File,
        max_messages_per_subject: -1,
        ..Default::default()
    })
    .await?;
    // The raw payload is what an entity write stores: one entity event.
    let sample = bus::request(
        &client,
        subjects::entities_request(ORG, "product", "create"),
        Default::default(),
        serde_json::to_vec(&EntityRequest {
            body: Some(json!({"name": "sample", "code": "sample"})),
            ..Default::default()
        })?
        .into(),
    )
    .await?;
    let sample: Value = serde_json::from_slice(&sample)?;
    let stored = js
        .get_stream(subjects::ENTITIES_STREAM)
        .await?
        .direct_get_last_for_subject(subjects::entity(
            ORG,
            "product",
            sample["id"].as_str().unwrap_or_default(),
        ))
        .await?;
    let raw_payload = stored.payload.clone();
    println!(
        "entity writes: {n} ops at {concurrency} in flight; stored event {} bytes; nats-server {} with sync_interval: always",
        raw_payload.len(),
        nats.url()
    );

    // The machine is shared and noisy: raw and Meterline alternate in
    // rounds, so both see the same background load.
    let rounds = 4;
    let per_round = n / rounds;
    let (mut raw_create, mut raw_update, mut ml_create, mut ml_update) = (
        Figure::empty(),
        Figure::empty(),
        Figure::empty(),
        Figure::empty(),
    );
    let request = |op: &'static str, req: EntityRequest| {
        let client = client.clone();
        async move {
            let payload = Bytes::from(serde_json::to_vec(&req)?);
            let reply = bus::request(
                &client,
                subjects::entities_request(ORG, "product", op),
                Default::default(),
                payload,
            )
            .await
            .map_err(|e| anyhow::anyhow!("{op}: {e}"))?;
            Ok::<Value, anyhow::Error>(serde_json::from_slice(&reply)?)
        }
    };
    for round in 0..rounds {
        let base = round * per_round;
        let raw_ids: Arc<Vec<String>> = Arc::new(
            (0..per_round)
                .map(|_| uuid::Uuid::now_v7().to_string())
                .collect(),
        );
        let raw_seqs = Arc::new(std::sync::Mutex::new(vec![0u64; per_round]));
        raw_create.add(
            measure(per_round, concurrency, |i| {
                let js = js.clone();
                let ids = raw_ids.clone();
                let seqs = raw_seqs.clone();
                let payload = raw_payload.clone();
                async move {
                    let ack = js
                        .send_publish(
                            format!("raw.{ORG}.product.{}", ids[i]),
                            PublishMessage::build()
                                .payload(payload)
                                .expected_last_subject_sequence(0),
                        )
                        .await?
                        .await?;
                    seqs.lock().map_err(|_| anyhow::anyhow!("poisoned"))?[i] = ack.sequence;
                    Ok(())
                }
            })
            .await?,
        );
        let ids = Arc::new(std::sync::Mutex::new(vec![String::new(); per_round]));
        ml_create.add(
            measure(per_round, concurrency, |i| {
                let ids = ids.clone();
                let fut = request(
                    "create",
                    EntityRequest {
                        body: Some(product(base + i)),
                        ..Default::default()
                    },
                );
                async move {
                    let v = fut.await?;
                    ids.lock().map_err(|_| anyhow::anyhow!("poisoned"))?[i] =
                        v["id"].as_str().unwrap_or_default().to_owned();
                    Ok(())
                }
            })
            .await?,
        );
        raw_update.add(
            measure(per_round, concurrency, |i| {
                let js = js.clone();
                let ids = raw_ids.clone();
                let seqs = raw_seqs.clone();
                let payload = raw_payload.clone();
                async move {
                    let expected = seqs.lock().map_err(|_| anyhow::anyhow!("poisoned"))?[i];
                    js.send_publish(
                        format!("raw.{ORG}.product.{}", ids[i]),
                        PublishMessage::build()
                            .payload(payload)
                            .expected_last_subject_sequence(expected),
                    )
                    .await?
                    .await?;
                    Ok(())
                }
            })
            .await?,
        );
        ml_update.add(
            measure(per_round, concurrency, |i| {
                let id = ids.lock().map(|v| v[i].clone()).unwrap_or_default();
                let mut body = product(base + i);
                body["name"] = json!(format!("Product {} v2", base + i));
                body["version"] = json!(1);
                let fut = request(
                    "update",
                    EntityRequest {
                        id: Some(id),
                        body: Some(body),
                        ..Default::default()
                    },
                );
                async move { fut.await.map(|_| ()) }
            })
            .await?,
        );
    }

    println!();
    println!("| figure | Meterline | raw bus | ratio |");
    println!("|---|---:|---:|---:|");
    for (name, ml, raw) in [
        ("entity creates", &ml_create, &raw_create),
        ("entity updates (version-checked)", &ml_update, &raw_update),
    ] {
        println!(
            "| {name}: writes/s | {:.0} | {:.0} | {:.2} |",
            ml.rate(),
            raw.rate(),
            ml.rate() / raw.rate()
        );
        println!(
            "| {name}: p50 latency ms | {} | {} | {:.2} |",
            ms(ml.pct(0.50)),
            ms(raw.pct(0.50)),
            ml.pct(0.50).as_secs_f64() / raw.pct(0.50).as_secs_f64()
        );
        println!(
            "| {name}: p99 latency ms | {} | {} | {:.2} |",
            ms(ml.pct(0.99)),
            ms(raw.pct(0.99)),
            ml.pct(0.99).as_secs_f64() / raw.pct(0.99).as_secs_f64()
        );
    }
    println!();
    println!("ratio: writes/s Meterline / raw (higher is better, 1.00 = the bus's own speed); latency Meterline / raw (lower is better).");
    println!("A Meterline create also reserves its unique code (one KV write) and EVENTS sources every write (a second stored copy).");

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(20), running).await;
    Ok(())
}
