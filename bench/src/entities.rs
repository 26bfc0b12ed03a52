//! Entity writes: creates and version-checked updates over the NATS request
//! path, beside `Nats-Expected-Last-Subject-Sequence` publishes of the same
//! bytes on a bare stream.

use std::sync::Arc;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use bytes::Bytes;
use serde_json::{json, Value};

use meterline_entities::{App, Settings};
use meterline_shared::protocol::EntityRequest;
use meterline_shared::testkit::{NatsServer, Running};
use meterline_shared::{bus, subjects};

use crate::{compare, env_usize, measure, Figure, Row, ORG};

fn product(i: usize) -> Value {
    json!({"name": format!("Product {i}"), "code": format!("product-{i}")})
}

pub async fn run(nats: &NatsServer) -> anyhow::Result<Vec<Row>> {
    let n = env_usize("BENCH_ENTITY_OPS", 4000);
    let concurrency = env_usize("BENCH_CONCURRENCY", 64);
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let app = App::build(Settings::for_tests(nats.url())).await?;
    let entities = Running::spawn(|stop| app.run_until_stopped(stop));
    meterline_entities::bootstrap(&client, ORG, "Bench", "bench")
        .await
        .map_err(|e| anyhow::anyhow!("bootstrap: {e}"))?;

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
        "entity writes: {n} ops at {concurrency} in flight; stored event {} bytes",
        raw_payload.len()
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

    entities.stop().await;
    let mut rows = compare("entity creates", "writes", 1, &ml_create, &raw_create);
    rows.extend(compare(
        "entity updates (version-checked)",
        "writes",
        1,
        &ml_update,
        &raw_update,
    ));
    Ok(rows)
}
