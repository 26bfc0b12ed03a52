//! Ingest: measurements per second in 1000-measurement batches with
//! de-duplication on, beside raw JetStream publishes of the same bytes in the
//! same grouping on a bare stream (for each uid partition of the batch, one
//! MessagePack group per meter plus the uid marker: the messages ingest
//! stores); p99 request latency; memory per remembered uid.

use std::sync::Arc;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use serde_json::{json, Value};

use meterline_ingest::commit::{partition, PARTITIONS};
use meterline_ingest::model::{Marker, Measurement, MeasurementGroup};
use meterline_ingest::uids::{fingerprint, UidIndex};
use meterline_shared::codec::Codec;
use meterline_shared::protocol::EntityRequest;
use meterline_shared::testkit::{NatsServer, Running};
use meterline_shared::{bus, subjects};

use crate::{compare, cpu_ticks, env_usize, measure, Figure, Row, ORG};

const BATCH: usize = 1000;
/// JetStream's own de-duplication (`Nats-Msg-Id`) keeps about this much
/// server memory per remembered id.
const JETSTREAM_BYTES_PER_ID: f64 = 220.0;

fn measurements(batch: usize) -> Vec<Value> {
    (0..BATCH)
        .map(|i| {
            json!({"uid": format!("m-{batch}-{i}"), "meter": "api", "account": format!("acct-{}", i % 50),
                   "ts": "2024-05-01T10:00:00Z", "measure": {"calls": i}, "who": {"user": format!("user-{}", i % 7)}})
        })
        .collect()
}

/// The messages ingest stores for one batch, subject and payload: for each
/// uid partition the batch's uids fall in, the group of its measurements and
/// the marker listing their uids (see `meterline_ingest::commit`).
fn stored_form(batch: usize, raw: &[Value]) -> anyhow::Result<Vec<(String, Bytes)>> {
    let ms: Vec<Measurement> = raw
        .iter()
        .map(|v| serde_json::from_value(v.clone()))
        .collect::<Result<_, _>>()?;
    let mut parts: Vec<Vec<Measurement>> = (0..PARTITIONS).map(|_| Vec::new()).collect();
    for m in ms {
        parts[partition(&m.uid)].push(m);
    }
    let mut messages = Vec::new();
    for (p, measurements) in parts.into_iter().enumerate() {
        if measurements.is_empty() {
            continue;
        }
        let uids = measurements.iter().map(|m| m.uid.clone()).collect();
        let group = MeasurementGroup {
            org_id: ORG.into(),
            meter: "api".into(),
            meter_id: format!("meter-{batch}"),
            received_at: "2024-05-01T10:00:00.000Z".into(),
            measurements,
        };
        let marker = Marker {
            day: 20_000,
            groups: 1,
            uids,
        };
        messages.push((
            format!("rawusage.usage.{ORG}.api"),
            Bytes::from(Codec::MsgPack.encode(&group)?),
        ));
        messages.push((
            format!("rawusage.uidx.{ORG}.{p}"),
            Bytes::from(Codec::MsgPack.encode(&marker)?),
        ));
    }
    Ok(messages)
}

/// CPU time of this process (client and in-process services) and of
/// nats-server spent on one path, in clock ticks.
#[derive(Default)]
struct Cpu {
    process: u64,
    server: u64,
}

impl Cpu {
    async fn add<T>(&mut self, server: &str, work: impl std::future::Future<Output = T>) -> T {
        let (p, s) = (cpu_ticks("self"), cpu_ticks(server));
        let out = work.await;
        self.process += cpu_ticks("self").saturating_sub(p);
        self.server += cpu_ticks(server).saturating_sub(s);
        out
    }

    /// Milliseconds per `batches` batches of [`BATCH`]: (process, server).
    fn per_batch(&self, batches: usize) -> (f64, f64) {
        let ms = |ticks: u64| ticks as f64 * 10.0 / batches.max(1) as f64;
        (ms(self.process), ms(self.server))
    }
}

fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<usize>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

/// Bytes per remembered uid in the index, by its maps' capacity, and by the
/// process's resident memory.
fn uid_memory(n: usize) -> (f64, f64) {
    let before = rss_bytes();
    let index = UidIndex::default();
    let mut next = 0;
    let mut seq = 1;
    while next < n {
        let end = (next + BATCH).min(n);
        index.apply(
            ORG,
            seq,
            20_000,
            (next..end).map(|i| fingerprint(ORG, &format!("uid-{i}"))),
        );
        next = end;
        seq += 1;
    }
    let rss = rss_bytes().saturating_sub(before) as f64 / n as f64;
    (index.heap_bytes() as f64 / n as f64, rss)
}

pub async fn run(nats: &NatsServer) -> anyhow::Result<Vec<Row>> {
    let batches = env_usize("BENCH_INGEST_BATCHES", 400);
    let concurrency = env_usize("BENCH_CONCURRENCY", 64).min(32);
    let client = nats.client().await;
    let mut js = jetstream::new(client.clone());
    // On a shared machine's busy disk a flushed write can take seconds.
    js.set_timeout(std::time::Duration::from_secs(60));
    let entities =
        meterline_entities::App::build(meterline_entities::Settings::for_tests(nats.url())).await?;
    let entities = Running::spawn(|stop| entities.run_until_stopped(stop));
    let ingest =
        meterline_ingest::App::build(meterline_ingest::Settings::for_tests(nats.url())).await?;
    let ingest = Running::spawn(|stop| ingest.run_until_stopped(stop));
    // The gateway as tests build it: no rate limits, so the figure is the
    // path's own speed.
    let gateway =
        meterline_gateway::App::build(meterline_gateway::Settings::for_tests(nats.url())).await?;
    let url = format!("http://{}", gateway.http_addr());
    let gateway = Running::spawn(|stop| gateway.run_until_stopped(stop));
    let creds = meterline_entities::bootstrap(&client, ORG, "Bench", "bench-ingest")
        .await
        .map_err(|e| anyhow::anyhow!("bootstrap: {e}"))?;
    let http = reqwest::Client::new();
    let token: Value = http
        .post(format!("{url}/oauth/token"))
        .basic_auth(&creds.access_key, Some(&creds.secret))
        .json(&json!({"grant_type": "client_credentials"}))
        .send()
        .await?
        .json()
        .await?;
    let token = token["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let endpoint = format!("{url}/organizations/{ORG}/measurements");
    let meter = EntityRequest {
        body: Some(json!({"name": "API", "code": "api", "dataFields": [
            {"category": "MEASURE", "code": "calls", "name": "Calls", "unit": "{call}"},
            {"category": "WHO", "code": "user", "name": "User"}], "derivedFields": []})),
        ..Default::default()
    };
    bus::request(
        &client,
        subjects::entities_request(ORG, "meter", "create"),
        Default::default(),
        serde_json::to_vec(&meter)?.into(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("meter: {e}"))?;

    js.create_stream(stream::Config {
        name: "RAWUSAGE".into(),
        subjects: vec!["rawusage.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    // NATS batches and HTTP batches carry different uids: every one is new.
    let raw_batches: Vec<Vec<Value>> = (0..2 * batches).map(measurements).collect();
    let bodies: Arc<Vec<Bytes>> = Arc::new(
        raw_batches
            .iter()
            .map(|ms| serde_json::to_vec(&json!({ "measurements": ms })).map(Bytes::from))
            .collect::<Result<_, _>>()?,
    );
    let stored: Arc<Vec<Vec<(String, Bytes)>>> = Arc::new(
        raw_batches
            .iter()
            .enumerate()
            .map(|(b, ms)| stored_form(b, ms))
            .collect::<anyhow::Result<_>>()?,
    );
    println!(
        "ingest: {batches} batches of {BATCH} at {concurrency} in flight; request body {} bytes, stored {} bytes in {} messages per batch",
        bodies[0].len(),
        stored[0].iter().map(|(_, b)| b.len()).sum::<usize>(),
        stored[0].len()
    );

    let rounds = 4;
    let per_round = batches / rounds;
    let (mut raw, mut nats_path, mut http_path) =
        (Figure::empty(), Figure::empty(), Figure::empty());
    let server_pid = nats.pid().map(|p| p.to_string()).unwrap_or_default();
    let (mut raw_cpu, mut nats_cpu, mut http_cpu) =
        (Cpu::default(), Cpu::default(), Cpu::default());
    for round in 0..rounds {
        let base = round * per_round;
        raw.add(
            raw_cpu
                .add(
                    &server_pid,
                    measure(per_round, concurrency, |i| {
                        let js = js.clone();
                        let stored = stored.clone();
                        async move {
                            let mut acks = Vec::new();
                            for (subject, payload) in &stored[base + i] {
                                acks.push(js.publish(subject.clone(), payload.clone()).await?);
                            }
                            for ack in acks {
                                ack.await?;
                            }
                            Ok(())
                        }
                    }),
                )
                .await?,
        );
        nats_path.add(
            nats_cpu
                .add(
                    &server_pid,
                    measure(per_round, concurrency, |i| {
                        let client = client.clone();
                        let bodies = bodies.clone();
                        async move {
                            let reply = bus::request(
                                &client,
                                subjects::ingest_submit(ORG),
                                Default::default(),
                                bodies[base + i].clone(),
                            )
                            .await
                            .map_err(|e| anyhow::anyhow!("submit: {e}"))?;
                            let v: Value = serde_json::from_slice(&reply)?;
                            anyhow::ensure!(v["accepted"] == BATCH, "not all accepted: {v}");
                            Ok(())
                        }
                    }),
                )
                .await?,
        );
        http_path.add(
            http_cpu
                .add(
                    &server_pid,
                    measure(per_round, concurrency, |i| {
                        let http = http.clone();
                        let bodies = bodies.clone();
                        let (endpoint, token) = (endpoint.clone(), token.clone());
                        async move {
                            let v: Value = http
                                .post(endpoint)
                                .bearer_auth(token)
                                .header("content-type", "application/json")
                                .body(bodies[batches + base + i].clone())
                                .send()
                                .await?
                                .error_for_status()?
                                .json()
                                .await?;
                            anyhow::ensure!(v["accepted"] == BATCH, "not all accepted: {v}");
                            Ok(())
                        }
                    }),
                )
                .await?,
        );
    }
    for (name, cpu) in [
        ("raw publishes", &raw_cpu),
        ("NATS request path", &nats_cpu),
        ("HTTP through the gateway", &http_cpu),
    ] {
        let (process, server) = cpu.per_batch(rounds * per_round);
        println!("ingest CPU per batch of {BATCH}, {name}: {process:.2} ms bench process (client and services), {server:.2} ms nats-server");
    }
    gateway.stop().await;
    ingest.stop().await;
    entities.stop().await;

    let mut rows = compare(
        "ingest, HTTP through the gateway",
        "measurements",
        BATCH,
        &http_path,
        &raw,
    );
    rows.extend(compare(
        "ingest, NATS request path",
        "measurements",
        BATCH,
        &nats_path,
        &raw,
    ));
    for n in [1_000_000usize, 10_000_000] {
        let (heap, rss) = uid_memory(n);
        println!("uid index at {n} uids: {heap:.1} bytes/uid by capacity, {rss:.1} bytes/uid by resident memory");
        rows.push(Row {
            figure: format!(
                "memory per remembered uid at {}M uids, bytes (raw: JetStream Nats-Msg-Id)",
                n / 1_000_000
            ),
            meterline: format!("{heap:.1}"),
            raw: format!("{JETSTREAM_BYTES_PER_ID:.0}"),
            ratio: format!("{:.2}", heap / JETSTREAM_BYTES_PER_ID),
        });
    }
    Ok(rows)
}
