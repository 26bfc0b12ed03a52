//! The ingest service against a real nats-server, with the real entities
//! service holding the meters.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};

use meterline_ingest::model::MeasurementGroup;
use meterline_shared::protocol::EntityRequest;
use meterline_shared::testkit::{NatsServer, Running};
use meterline_shared::{bus, subjects, ErrorCode, ServiceError};

const ORG: &str = "acme";

async fn start_ingest(nats: &NatsServer) -> Running {
    let app = meterline_ingest::App::build(meterline_ingest::Settings::for_tests(nats.url()))
        .await
        .unwrap();
    Running::spawn(|stop| app.run_until_stopped(stop))
}

struct World {
    nats: NatsServer,
    client: async_nats::Client,
    entities: Option<Running>,
    ingest: Option<Running>,
}

impl World {
    async fn new() -> World {
        let nats = NatsServer::start();
        let client = nats.client().await;
        let app =
            meterline_entities::App::build(meterline_entities::Settings::for_tests(nats.url()))
                .await
                .unwrap();
        let entities = Running::spawn(|stop| app.run_until_stopped(stop));
        meterline_entities::bootstrap(&client, ORG, "Acme", "ingest-tests")
            .await
            .unwrap();
        let ingest = Some(start_ingest(&nats).await);
        let w = World {
            nats,
            client,
            entities: Some(entities),
            ingest,
        };
        w.entity(
            "meter",
            json!({"name": "API calls", "code": "api", "dataFields": [
                {"category": "MEASURE", "code": "calls", "name": "Calls", "unit": "{call}"},
                {"category": "WHO", "code": "user", "name": "User"}
            ], "derivedFields": []}),
        )
        .await;
        w.entity(
            "meter",
            json!({"name": "Storage", "code": "storage", "dataFields": [
                {"category": "MEASURE", "code": "gb", "name": "GB", "unit": "GiBy"}
            ], "derivedFields": []}),
        )
        .await;
        w
    }

    async fn entity(&self, ty: &str, body: Value) -> Value {
        let req = EntityRequest {
            body: Some(body),
            ..Default::default()
        };
        let reply = bus::request(
            &self.client,
            subjects::entities_request(ORG, ty, "create"),
            Default::default(),
            serde_json::to_vec(&req).unwrap().into(),
        )
        .await
        .unwrap();
        serde_json::from_slice(&reply).unwrap()
    }

    async fn submit_raw(&self, body: Bytes) -> Result<Value, ServiceError> {
        let reply = bus::request(
            &self.client,
            subjects::ingest_submit(ORG),
            Default::default(),
            body,
        )
        .await?;
        Ok(serde_json::from_slice(&reply).unwrap())
    }

    async fn submit(&self, measurements: Vec<Value>) -> Result<Value, ServiceError> {
        self.submit_raw(
            serde_json::to_vec(&json!({ "measurements": measurements }))
                .unwrap()
                .into(),
        )
        .await
    }

    /// Every stored measurement's uid, with how often it is stored.
    async fn stored(&self) -> HashMap<String, usize> {
        let js = jetstream::new(self.client.clone());
        let stream = js.get_stream(subjects::MEASUREMENTS_STREAM).await.unwrap();
        let mut out = HashMap::new();
        let Ok(last) = stream
            .direct_get_last_for_subject(format!("usage.{ORG}.>"))
            .await
        else {
            return out;
        };
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: format!("usage.{ORG}.>"),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut msgs = consumer.messages().await.unwrap();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
                .await
                .expect("stored measurements")
                .unwrap()
                .unwrap();
            assert_eq!(
                m.headers
                    .as_ref()
                    .and_then(|h| h.get("Content-Type"))
                    .map(|v| v.as_str()),
                Some("application/msgpack")
            );
            let group: MeasurementGroup = rmp_serde::from_slice(&m.payload).unwrap();
            assert_eq!(m.subject.as_str(), format!("usage.{ORG}.{}", group.meter));
            for ms in group.measurements {
                *out.entry(ms.uid).or_default() += 1;
            }
            if m.info().unwrap().stream_sequence >= last.sequence {
                return out;
            }
        }
    }
}

fn call(uid: &str, n: f64) -> Value {
    json!({"uid": uid, "meter": "api", "account": "acct-1", "ts": "2024-05-01T10:00:00Z", "measure": {"calls": n}, "who": {"user": "ann"}})
}

fn batch(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| call(&format!("{prefix}-{i}"), i as f64))
        .collect()
}

#[tokio::test]
async fn a_batch_is_stored_once_with_every_uid_and_a_resend_stores_nothing() {
    let mut w = World::new().await;
    let mut ms = batch("b1", 1000);
    ms[10] = json!({"uid": "s-1", "meter": "storage", "account": "acct-1", "ts": "2024-05-01T10:00:00Z", "measure": {"gb": 2.5}});
    let r = w.submit(ms.clone()).await.unwrap();
    assert_eq!(
        (
            r["result"].as_str(),
            r["accepted"].as_u64(),
            r["duplicates"].as_u64(),
            r["rejected"].as_u64()
        ),
        (Some("accepted"), Some(1000), Some(0), Some(0))
    );
    let stored = w.stored().await;
    assert_eq!(stored.len(), 1000);
    assert!(stored.values().all(|&n| n == 1));
    assert!(stored.contains_key("s-1"));

    let again = w.submit(ms.clone()).await.unwrap();
    assert_eq!(
        (again["accepted"].as_u64(), again["duplicates"].as_u64()),
        (Some(0), Some(1000))
    );

    // The same uids in another batch, mixed with new ones.
    let mut mixed = batch("b1", 5);
    mixed.extend(batch("b2", 5));
    let r = w.submit(mixed).await.unwrap();
    assert_eq!(
        (r["accepted"].as_u64(), r["duplicates"].as_u64()),
        (Some(5), Some(5))
    );

    // After a restart of ingest, the uids are still remembered.
    w.ingest.take().unwrap().stop().await;
    w.ingest = Some(start_ingest(&w.nats).await);
    let after = w.submit(ms).await.unwrap();
    assert_eq!(
        (after["accepted"].as_u64(), after["duplicates"].as_u64()),
        (Some(0), Some(1000))
    );
    assert_eq!(w.stored().await.len(), 1005);
    w.ingest.take().unwrap().stop().await;
    w.entities.take().unwrap().stop().await;
}

#[tokio::test]
async fn two_replicas_receiving_the_same_uids_store_each_once() {
    let w = World::new().await;
    let second = start_ingest(&w.nats).await;
    // Forty requests over both replicas (the queue group spreads them), each
    // uid sent by four different requests at once.
    let mut tasks = Vec::new();
    for r in 0..40 {
        let client = w.client.clone();
        let ms: Vec<Value> = (0..100)
            .map(|i| call(&format!("u-{}-{i}", r % 10), 1.0))
            .collect();
        tasks.push(tokio::spawn(async move {
            let body = serde_json::to_vec(&json!({ "measurements": ms })).unwrap();
            bus::request(
                &client,
                subjects::ingest_submit(ORG),
                Default::default(),
                body.into(),
            )
            .await
        }));
    }
    let (mut accepted, mut duplicates) = (0, 0);
    for t in tasks {
        let v: Value = serde_json::from_slice(&t.await.unwrap().unwrap()).unwrap();
        accepted += v["accepted"].as_u64().unwrap();
        duplicates += v["duplicates"].as_u64().unwrap();
    }
    assert_eq!(
        accepted, 1000,
        "each of the 1000 uids accepted exactly once"
    );
    assert_eq!(duplicates, 3000);
    let stored = w.stored().await;
    assert_eq!(stored.len(), 1000);
    assert!(stored.values().all(|&n| n == 1), "a uid stored twice");
    second.stop().await;
}

#[tokio::test]
async fn rejected_measurements_become_failure_events_and_the_rest_is_ingested() {
    let w = World::new().await;
    let ts = "2024-05-01T10:00:00Z";
    let ms = vec![
        call("ok-1", 1.0),
        json!({"uid": "bad-meter", "meter": "nosuch", "account": "a", "ts": ts}),
        json!({"uid": "no-ts", "meter": "api", "account": "a"}),
        json!({"uid": "no-meter", "account": "a", "ts": ts}),
        json!({"uid": "nan", "meter": "api", "account": "a", "ts": ts, "measure": {"calls": "lots"}}),
        json!({"uid": "dup-field", "meter": "api", "account": "a", "ts": ts, "measure": {"calls": 1}, "who": {"calls": "x"}}),
        json!({"uid": "u".repeat(51), "meter": "api", "account": "a", "ts": ts}),
        json!({"uid": "bad-ts", "meter": "api", "account": "a", "ts": "last tuesday"}),
        call("ok-2", 2.0),
        call("ok-2", 3.0),
    ];
    let r = w.submit(ms).await.unwrap();
    assert_eq!(
        (r["accepted"].as_u64(), r["rejected"].as_u64()),
        (Some(2), Some(8)),
        "{r}"
    );
    let types: Vec<&str> = r["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["errorType"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "UndefinedMeter",
            "MissingField",
            "MissingField",
            "InvalidField",
            "DuplicateField",
            "InvalidUid",
            "InvalidTimestamp",
            "DuplicateUid"
        ]
    );
    let stored = w.stored().await;
    assert_eq!(stored.len(), 2);
    assert_eq!(stored["ok-2"], 1);

    let js = jetstream::new(w.client.clone());
    let events = js.get_stream(subjects::EVENTS_STREAM).await.unwrap();
    let consumer = events
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("evt.{ORG}.ingest.validation.failure"),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut msgs = consumer.messages().await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 8 {
        let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
            .await
            .expect("failure event")
            .unwrap()
            .unwrap();
        let ev: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(ev["eventName"], "ingest.validation.failure");
        assert!(
            ev["measurement"].is_object(),
            "the original measurement travels with the event"
        );
        seen.push(ev);
    }
    let bad_meter = seen
        .iter()
        .find(|e| e["errorType"] == "UndefinedMeter")
        .unwrap();
    assert_eq!(bad_meter["measurement"]["meter"], "nosuch");
}

#[tokio::test]
async fn bad_requests_are_refused_whole_and_nothing_is_stored() {
    let w = World::new().await;
    let cases: Vec<(Bytes, ErrorCode)> = vec![
        (
            Bytes::from_static(b"{\"measurements\": []}"),
            ErrorCode::BadRequest,
        ),
        (
            serde_json::to_vec(&json!({"measurements": batch("x", 1001)}))
                .unwrap()
                .into(),
            ErrorCode::BadRequest,
        ),
        (Bytes::from_static(b"not json"), ErrorCode::BadRequest),
        (
            Bytes::from_static(b"{\"measurements\": \"nope\"}"),
            ErrorCode::BadRequest,
        ),
        (
            Bytes::from_static(b"{\"measurement\": []}"),
            ErrorCode::BadRequest,
        ),
        (Bytes::from(vec![b' '; 512_001]), ErrorCode::PayloadTooLarge),
    ];
    for (body, code) in cases {
        let e = w.submit_raw(body.clone()).await.expect_err("refused");
        assert_eq!(e.code, code, "{}", e.message);
        assert!(!e.message.is_empty());
    }
    // An org token with subject characters never reaches a subject: within
    // one token `*` and `>` are not wildcards, so such a request does reach
    // ingest, which refuses it whole.
    let body =
        Bytes::from(serde_json::to_vec(&json!({"measurements": [call("org", 1.0)]})).unwrap());
    for org in ["ac*me", "ac>me"] {
        let e = bus::request(
            &w.client,
            format!("svc.ingest.{org}.submit"),
            Default::default(),
            body.clone(),
        )
        .await
        .expect_err("refused");
        assert_eq!(e.code, ErrorCode::BadRequest, "{org}: {}", e.message);
        assert!(e.message.contains("orgId"), "{}", e.message);
    }
    // A meter token with subject characters names no meter: that
    // measurement is rejected, and no subject is made of it.
    let ts = "2024-05-01T10:00:00Z";
    let r = w
        .submit(
            ["api.calls", "api*", "api>", "a pi", "api.>"]
                .iter()
                .enumerate()
                .map(|(i, m)| json!({"uid": format!("subj-{i}"), "meter": m, "account": "a", "ts": ts}))
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(
        (r["accepted"].as_u64(), r["rejected"].as_u64()),
        (Some(0), Some(5)),
        "{r}"
    );
    assert!(r["errors"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["errorType"] == "UndefinedMeter"));
    assert!(w.stored().await.is_empty());
    let js = jetstream::new(w.client.clone());
    let info = js
        .get_stream(subjects::MEASUREMENTS_STREAM)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    assert_eq!(info.state.messages, 0, "nothing at all is stored");
    let r = w.submit(vec![call("after", 1.0)]).await.unwrap();
    assert_eq!(r["accepted"], 1, "the service keeps serving");
}

#[tokio::test]
async fn nothing_acknowledged_is_lost_when_ingest_or_the_server_crashes() {
    let mut w = World::new().await;
    // Submit in the background and crash ingest while requests are in flight.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for r in 0..30 {
        let client = w.client.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let ms: Vec<Value> = (0..200).map(|i| call(&format!("c-{r}-{i}"), 1.0)).collect();
            let body = serde_json::to_vec(&json!({ "measurements": ms })).unwrap();
            let result = bus::request(
                &client,
                subjects::ingest_submit(ORG),
                Default::default(),
                body.into(),
            )
            .await;
            let _ = done.send((r, result));
        });
    }
    drop(done_tx);
    // Wait until a first request has been acknowledged, then crash ingest.
    let mut acknowledged = Vec::new();
    let mut record = |r: usize, result: Result<Bytes, _>| {
        if let Ok(reply) = result {
            let v: Value = serde_json::from_slice(&reply).unwrap();
            assert_eq!(v["accepted"], 200);
            acknowledged.push(r);
        }
    };
    loop {
        let (r, result) = tokio::time::timeout(Duration::from_secs(20), done_rx.recv())
            .await
            .expect("a first request answered")
            .expect("requests outstanding");
        let ok = result.is_ok();
        record(r, result);
        if ok {
            break;
        }
    }
    w.ingest.take().unwrap().kill();
    while let Some((r, result)) = tokio::time::timeout(Duration::from_secs(30), done_rx.recv())
        .await
        .expect("every request answered or failed")
    {
        record(r, result);
    }
    assert!(!acknowledged.is_empty());
    // Crash the server as well (SIGKILL), then look.
    w.entities.take().unwrap().kill();
    w.nats.restart();
    w.client = w.nats.client().await;
    let stored = w.stored().await;
    for r in acknowledged {
        for i in 0..200 {
            assert_eq!(
                stored.get(&format!("c-{r}-{i}")),
                Some(&1),
                "acknowledged c-{r}-{i} lost"
            );
        }
    }
    // A fresh ingest accepts the unacknowledged rest exactly once.
    w.ingest = Some(start_ingest(&w.nats).await);
    for r in 0..30 {
        let ms: Vec<Value> = (0..200).map(|i| call(&format!("c-{r}-{i}"), 1.0)).collect();
        let v = loop {
            match w.submit(ms.clone()).await {
                Ok(v) => break v,
                Err(e) if e.code == ErrorCode::Unavailable => tokio::task::yield_now().await,
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(
            v["accepted"].as_u64().unwrap() + v["duplicates"].as_u64().unwrap(),
            200
        );
    }
    let stored = w.stored().await;
    assert_eq!(stored.len(), 6000);
    assert!(stored.values().all(|&n| n == 1));
}
