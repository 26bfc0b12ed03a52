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
use meterline_exporter::replay::{replay, Piece, Window};
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

    let got = read(&nats, from, to, None).await;
    // Accounts of the first half are changed again in it: its lines, sent
    // as read, are withdrawn and the file written again.
    assert_eq!(marks(&got), ["tentative", "void"]);
    assert!(
        got.marks[1].1 > 0,
        "lines were sent as read: {:?}",
        got.marks
    );
    assert_eq!(got.count, expected.len() as u64);
    let got = got.lines;
    let project = |v: &Value| json!({"id": v["id"], "version": v["version"], "name": v["name"], "deleted": v["deleted"]});
    let got: Vec<Value> = got.iter().map(project).collect();
    let expected: Vec<Value> = expected.iter().map(project).collect();
    assert_eq!(got.len(), expected.len());
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g, e);
    }
}

/// A fresh server whose `ENTITIES` holds `before`, then `window`; the
/// window's `(from, to]`.
async fn window_of(before: &[EntityEvent], window: &[EntityEvent]) -> (NatsServer, u64, u64) {
    let nats = NatsServer::start();
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    provision::ensure_core(&js, 1).await.unwrap();
    let from = store(&js, before).await.last().copied().unwrap_or(0);
    let to = *store(&js, window).await.last().unwrap();
    (nats, from, to)
}

fn ids(lines: &[Value]) -> Vec<(String, u64)> {
    lines
        .iter()
        .map(|v| {
            (
                v["id"].as_str().unwrap().to_owned(),
                v["version"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn marks(got: &Received) -> Vec<&'static str> {
    got.marks.iter().map(|(m, _)| *m).collect()
}

#[tokio::test]
async fn a_window_of_distinct_entities_is_sent_as_read_and_stands() {
    let window: Vec<EntityEvent> = (0..2400).map(|i| change(i, Action::Created, 1)).collect();
    let (nats, from, to) = window_of(&[], &window).await;
    let got = read(&nats, from, to, None).await;
    // The first half's lines went out as read and stood; the second
    // half's followed.
    assert_eq!(marks(&got), ["tentative", "settled"]);
    assert_eq!(got.marks[1].1, 1200, "{:?}", got.marks);
    let want: Vec<(String, u64)> = (0..2400).map(|i| (format!("acct-{i}"), 1)).collect();
    assert_eq!(ids(&got.lines), want);
    assert_eq!(got.count, 2400);
}

#[tokio::test]
async fn an_entity_of_the_first_part_changed_in_the_second_starts_the_file_over() {
    let before: Vec<EntityEvent> = (0..1200).map(|i| change(i, Action::Created, 1)).collect();
    // Each account once in the first half; account 7 again at the end.
    let mut window: Vec<EntityEvent> = (0..1200).map(|i| change(i, Action::Updated, 2)).collect();
    window.extend((1200..2400).map(|i| change(i, Action::Created, 1)));
    window.push(change(7, Action::Deleted, 2));
    let (nats, from, to) = window_of(&before, &window).await;
    let got = read(&nats, from, to, None).await;
    // The first half (1,201 of 2,401 sequences) went out as read.
    assert_eq!(marks(&got), ["tentative", "void"]);
    assert_eq!(got.marks[1].1, 1201, "{:?}", got.marks);
    let mut want: Vec<(String, u64)> = (0..1200)
        .filter(|i| *i != 7)
        .map(|i| (format!("acct-{i}"), 2))
        .collect();
    want.extend((1200..2400).map(|i| (format!("acct-{i}"), 1)));
    want.push(("acct-7".into(), 2));
    assert_eq!(ids(&got.lines), want);
    assert_eq!(got.lines.last().unwrap()["deleted"], json!(true));
    assert_eq!(got.count, 2400);
}

#[tokio::test]
async fn lines_sent_before_a_repeat_stand_when_none_of_them_is_superseded() {
    // With a start date, account 0's first version (unmodified since)
    // has no line; its second, later in the first half, has. Sending as
    // read stops at the repeat, and what was sent before it stands.
    let dated = |i: usize, v: u64, modified: &str| {
        let mut a = account(i, v);
        a["dtLastModified"] = json!(modified);
        a
    };
    let old = "2020-01-01T00:00:00Z";
    let new = "2026-06-01T00:00:00Z";
    let mut window = vec![event(
        "account",
        "acct-0",
        Action::Created,
        Some(dated(0, 1, old)),
        None,
    )];
    let created = |i: usize| {
        let id = format!("acct-{i}");
        event(
            "account",
            &id,
            Action::Created,
            Some(dated(i, 1, new)),
            None,
        )
    };
    window.extend((1..600).map(created));
    window.push(event(
        "account",
        "acct-0",
        Action::Updated,
        Some(dated(0, 2, new)),
        Some(dated(0, 1, old)),
    ));
    window.extend((600..2400).map(created));
    let (nats, from, to) = window_of(&[], &window).await;
    let got = read(&nats, from, to, Some("2026-01-01T00:00:00Z")).await;
    assert_eq!(marks(&got), ["tentative", "settled"]);
    assert_eq!(got.marks[1].1, 599, "{:?}", got.marks);
    let mut want: Vec<(String, u64)> = (1..600).map(|i| (format!("acct-{i}"), 1)).collect();
    want.push(("acct-0".into(), 2));
    want.extend((600..2400).map(|i| (format!("acct-{i}"), 1)));
    assert_eq!(ids(&got.lines), want);
}

#[tokio::test]
async fn a_bloom_filter_false_positive_does_not_stop_sending_as_read() {
    // The filter takes acct-x for a repeat once the three accounts before
    // it are in (see the replay module's unit tests): one lookup shows it
    // is not, and its line is sent as read like the others.
    let accounts = ["acct-8130509", "acct-9436799", "acct-21518302", "acct-x"];
    let window: Vec<EntityEvent> = accounts
        .iter()
        .map(|id| {
            let a = json!({"id": id, "version": 1, "name": id, "code": id});
            event("account", id, Action::Created, Some(a), None)
        })
        .collect();
    let (nats, from, to) = window_of(&[], &window).await;
    let got = read(&nats, from, to, None).await;
    assert_eq!(marks(&got), ["tentative", "settled"]);
    assert_eq!(got.marks[1].1, 4, "all sent as read: {:?}", got.marks);
    let want: Vec<(String, u64)> = accounts.iter().map(|id| (id.to_string(), 1)).collect();
    assert_eq!(ids(&got.lines), want);
}

/// What a replay sent the writer: the lines that stand, and each mark
/// with how many lines (withdrawn or not) had come before it.
struct Received {
    lines: Vec<Value>,
    marks: Vec<(&'static str, usize)>,
    /// What the replay said it sent.
    count: u64,
}

/// Replays the accounts of `(from, to]` as JSON lines, read on two
/// connections as the exporter reads them, and receives them as the
/// writer does.
async fn read(nats: &NatsServer, from: u64, to: u64, since: Option<&str>) -> Received {
    let kind = export_types(Some(&json!(["ACCOUNTS"]))).unwrap()[0];
    let since = since.map(|s| s.parse().unwrap());
    let rows = RowFormat::new(kind, Format::Jsonl, since);
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let mut streams = Vec::new();
    for _ in 0..2 {
        let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        streams.push(js.get_stream(subjects::ENTITIES_STREAM).await.unwrap());
    }
    let reader = tokio::spawn(async move {
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
    });
    let mut got = Received {
        lines: Vec::new(),
        marks: Vec::new(),
        count: 0,
    };
    let mut sent = 0;
    while let Some(piece) = rx.recv().await {
        let mark = match piece {
            Piece::Lines(batch) => {
                sent += batch.len();
                for line in batch {
                    got.lines
                        .push(serde_json::from_slice(&line).expect("a JSON line"));
                }
                continue;
            }
            Piece::Tentative => "tentative",
            Piece::Settled => "settled",
            Piece::Void => {
                got.lines.clear();
                "void"
            }
        };
        got.marks.push((mark, sent));
    }
    got.count = reader.await.unwrap().unwrap();
    got
}
