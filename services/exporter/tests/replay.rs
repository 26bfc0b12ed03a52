//! The replay of an incremental window against a real nats-server, large
//! enough to be read by several consumers at once: each entity changed in
//! the window still comes out once, at its last version up to `S`, in the
//! order of those versions, whichever part of the window its versions
//! were in.

use std::collections::{BTreeMap, HashMap};

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};

use meterline_exporter::format::Format;
use meterline_exporter::replay::{replay, Window};
use meterline_exporter::rows::{export_types, RowFormat};
use meterline_shared::envelope::{Action, EntityEvent};
use meterline_shared::shutdown::CancellationToken;
use meterline_shared::testkit::NatsServer;
use meterline_shared::{provision, subjects};

const ORG: &str = "org1";

fn event(
    ty: &str,
    id: &str,
    action: Action,
    new: Option<Value>,
    old: Option<Value>,
) -> EntityEvent {
    EntityEvent::now(ORG, ty, id, action, "test", new, old)
}

/// Stores `events` in order, as the entities service does; returns their
/// sequences.
async fn store(js: &jetstream::Context, events: &[EntityEvent]) -> Vec<u64> {
    let mut acks = futures::stream::FuturesOrdered::new();
    for ev in events {
        let mut headers = ev.headers();
        headers.insert("Nats-Msg-Id", ev.id.as_str());
        let ack = js
            .publish_with_headers(
                subjects::entity(ORG, &ev.entity_type, &ev.entity_id),
                headers,
                Bytes::from(serde_json::to_vec(ev).unwrap()),
            )
            .await
            .unwrap();
        acks.push_back(async move { ack.await.unwrap().sequence });
    }
    acks.collect().await
}

fn account(i: usize, version: u64) -> Value {
    json!({"id": format!("acct-{i}"), "version": version, "name": format!("Account {i} v{version}"),
           "code": format!("acct-{i}")})
}

/// A change of account `i` whose version is (or, deleted, was) `v`.
fn change(i: usize, action: Action, v: u64) -> EntityEvent {
    let (new, old) = match action {
        Action::Created => (Some(account(i, v)), None),
        Action::Updated => (Some(account(i, v)), Some(account(i, v - 1))),
        Action::Deleted => (None, Some(account(i, v))),
    };
    event("account", &format!("acct-{i}"), action, new, old)
}

#[tokio::test]
async fn a_large_window_read_in_parts_exports_each_entity_once_at_its_last_version() {
    let nats = NatsServer::start();
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    provision::ensure_core(&js, 1).await.unwrap();
    let stream = js.get_stream(subjects::ENTITIES_STREAM).await.unwrap();

    // Before the window: 200 accounts.
    let mut versions: HashMap<usize, u64> = HashMap::new();
    let before: Vec<EntityEvent> = (0..200)
        .map(|i| {
            versions.insert(i, 1);
            change(i, Action::Created, 1)
        })
        .collect();
    let from = *store(&js, &before).await.last().unwrap();

    // The window: 3000 changes. Accounts are updated (many in both halves
    // of the window, some several times), created and deleted; products
    // are changed in between and never exported.
    let mut window = Vec::new();
    // Accounts with exactly one version in each half of the window.
    let halves = 1000..1100;
    for i in halves.clone() {
        window.push(change(i, Action::Created, 1));
    }
    let mut deleted = std::collections::HashSet::new();
    for k in 0..3000usize {
        if k % 4 == 0 {
            let id = format!("prod-{}", k % 50);
            window.push(event(
                "product",
                &id,
                Action::Updated,
                Some(json!({"id": id})),
                None,
            ));
            continue;
        }
        let i = (k * 37) % 300;
        if deleted.contains(&i) {
            continue;
        }
        let ev = match versions.get(&i).copied() {
            None => {
                versions.insert(i, 1);
                change(i, Action::Created, 1)
            }
            Some(v) if k % 97 == 0 => {
                deleted.insert(i);
                change(i, Action::Deleted, v)
            }
            Some(v) => {
                versions.insert(i, v + 1);
                change(i, Action::Updated, v + 1)
            }
        };
        window.push(ev);
    }
    for i in halves {
        window.push(change(i, Action::Updated, 2));
    }
    let seqs = store(&js, &window).await;
    let to = *seqs.last().unwrap();
    assert!(to - from >= 2000, "a window of {} sequences", to - from);

    // After S: changes the export must not see.
    let after: Vec<EntityEvent> = (0..20)
        .filter(|i| !deleted.contains(i))
        .map(|i| change(i, Action::Updated, versions[&i] + 100))
        .collect();
    store(&js, &after).await;

    // Expected: each account changed in the window, at its last version
    // in it, ordered by that version's sequence.
    let mut last: BTreeMap<String, (u64, &EntityEvent)> = BTreeMap::new();
    for (ev, seq) in window.iter().zip(&seqs) {
        if ev.entity_type == "account" {
            last.insert(ev.entity_id.clone(), (*seq, ev));
        }
    }
    let mut expected: Vec<(u64, Value)> = last
        .values()
        .map(|(seq, ev)| {
            let mut state = if ev.action == Action::Deleted {
                ev.old.clone().unwrap()
            } else {
                ev.new.clone().unwrap()
            };
            state["deleted"] = json!(ev.action == Action::Deleted);
            (*seq, state)
        })
        .collect();
    expected.sort_by_key(|(seq, _)| *seq);
    let expected: Vec<Value> = expected.into_iter().map(|(_, v)| v).collect();
    assert!(expected.iter().any(|v| v["deleted"] == true));

    let kind = export_types(Some(&json!(["ACCOUNTS"]))).unwrap()[0];
    let rows = RowFormat::new(kind, Format::Jsonl, None);
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    // The window's two parts are read on two connections, as the exporter
    // reads them.
    let second = jetstream::new(async_nats::connect(nats.url()).await.unwrap())
        .get_stream(subjects::ENTITIES_STREAM)
        .await
        .unwrap();
    let reader = {
        let streams = [stream.clone(), second];
        tokio::spawn(async move {
            let window = Window {
                from: Some(from),
                to,
            };
            replay(
                &streams,
                ORG,
                "account",
                window,
                &rows,
                &tx,
                &CancellationToken::new(),
            )
            .await
        })
    };
    let mut got: Vec<Value> = Vec::new();
    while let Some(batch) = rx.recv().await {
        for line in batch {
            got.push(serde_json::from_slice(&line).expect("a JSON line"));
        }
    }
    assert_eq!(reader.await.unwrap().unwrap(), expected.len() as u64);
    let project = |v: &Value| json!({"id": v["id"], "version": v["version"], "name": v["name"], "deleted": v["deleted"]});
    let got: Vec<Value> = got.iter().map(project).collect();
    let expected: Vec<Value> = expected.iter().map(project).collect();
    assert_eq!(got.len(), expected.len());
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g, e);
    }
}
