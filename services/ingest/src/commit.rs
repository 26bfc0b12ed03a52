//! Group commit: the durable, exactly-once write of accepted measurements.
//!
//! A uid belongs to one of [`PARTITIONS`] partitions of its organization, and
//! each (org, partition) has one committer task per replica. It takes every
//! request part waiting for it, decides which measurements are new (against
//! the uid index and each other), and writes them as one atomic batch: one
//! MessagePack message per meter on `usage.<org>.<meter>` plus a commit
//! marker on `uidx.<org>.<partition>` listing the accepted uids. The marker
//! carries `Nats-Expected-Last-Subject-Sequence` = the last marker this
//! replica has seen for the partition, so if another replica committed in
//! between, the batch is refused as a whole; the committer then catches up
//! with the newer markers and decides again. Nothing is acknowledged to a
//! caller before every part's ack, and a crash before an ack leaves that
//! part unstored.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, stream::DirectGetErrorKind};
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use tokio::sync::{mpsc, oneshot};

use meterline_shared::codec::Codec;
use meterline_shared::ServiceError;

use crate::batch::{self, Outgoing};
use crate::meters::Meter;
use crate::model::Marker;
use crate::uids::{fingerprint, UidIndex};
use crate::wire;

/// Most measurements one commit takes from waiting requests.
const GROUP_MEASUREMENTS: usize = 50_000;
/// Most messages in one atomic batch (the server allows 1000).
const GROUP_MESSAGES: usize = 900;
/// Most measurements in one `usage` message (keeps messages near 1 MB).
const MESSAGE_MEASUREMENTS: usize = 2_500;
/// Attempts when other replicas keep committing first.
const ATTEMPTS: usize = 20;
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// `usage.<org>.<meter>`.
pub fn usage_subject(org: &str, meter: &str) -> String {
    format!("usage.{org}.{meter}")
}

/// Uid partitions of an organization. A uid belongs to one partition, by a
/// hash that is the same in every build, so every replica checks it against
/// the same commit markers; each partition commits on its own, so one org's
/// requests are written by several commits at once. Every replica must use
/// the same number.
pub const PARTITIONS: usize = 4;

/// The partition of a uid (FNV-1a: fixed, unlike the standard hasher).
pub fn partition(uid: &str) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % PARTITIONS as u64) as usize
}

/// `uidx.<org>.<partition>`.
pub fn marker_subject(org: &str, partition: usize) -> String {
    format!("uidx.{org}.{partition}")
}

/// The uid index's key for one partition: the marker subject without
/// `uidx.`.
pub fn index_key(org: &str, partition: usize) -> String {
    format!("{org}.{partition}")
}

/// A valid measurement waiting to be committed.
#[derive(Debug, Clone)]
pub struct Item {
    /// Position in the caller's request.
    pub index: usize,
    pub uid: String,
    /// The uid was generated: it takes no part in de-duplication.
    pub generated_uid: bool,
    pub meter: Arc<Meter>,
    /// The measurement as stored, MessagePack-encoded (see [`crate::wire`]).
    pub encoded: Bytes,
}

/// What became of each item of a request.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outcome {
    pub accepted: Vec<usize>,
    pub duplicates: Vec<usize>,
}

/// A request's write, encoded by the caller's task (in parallel with other
/// requests), so the org's committer only decides and sends.
struct Prepared {
    /// One MessagePack group per meter.
    groups: Vec<Outgoing>,
    /// The marker listing this request's uids.
    marker: Bytes,
    /// Fingerprints of the uids in `marker`.
    fps: Vec<u64>,
}

fn prepare<'a>(
    org: &str,
    items: impl Iterator<Item = &'a Item> + Clone,
) -> Result<Prepared, ServiceError> {
    let received_at = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    let mut by_meter: BTreeMap<(&str, &str), Vec<&Item>> = BTreeMap::new();
    for item in items.clone() {
        by_meter
            .entry((item.meter.code.as_str(), item.meter.id.as_str()))
            .or_default()
            .push(item);
    }
    let mut groups = Vec::new();
    for ((meter, meter_id), ms) in by_meter {
        for chunk in ms.chunks(MESSAGE_MEASUREMENTS) {
            let size: usize = chunk.iter().map(|i| i.encoded.len()).sum();
            let mut payload = Vec::with_capacity(size + 256);
            wire::encode_group_head(
                &mut payload,
                org,
                meter,
                meter_id,
                &received_at,
                chunk.len(),
            );
            for item in chunk {
                payload.extend_from_slice(&item.encoded);
            }
            let mut headers = Codec::MsgPack.headers();
            headers.insert("Meterline-Count", chunk.len().to_string().as_str());
            groups.push(Outgoing {
                subject: usage_subject(org, meter),
                headers,
                payload: Bytes::from(payload),
            });
        }
    }
    let uids: Vec<&str> = items
        .filter(|i| !i.generated_uid)
        .map(|i| i.uid.as_str())
        .collect();
    let fps = uids.iter().map(|u| fingerprint(org, u)).collect();
    let marker = MarkerRef {
        day: today(),
        groups: groups.len() as u32,
        uids,
    };
    Ok(Prepared {
        groups,
        marker: Bytes::from(Codec::MsgPack.encode(&marker)?),
        fps,
    })
}

/// [`Marker`] by reference.
#[derive(serde::Serialize)]
struct MarkerRef<'a> {
    day: u32,
    groups: u32,
    uids: Vec<&'a str>,
}

struct Pending {
    items: Vec<Item>,
    prepared: Prepared,
    reply: oneshot::Sender<Result<Outcome, ServiceError>>,
}

#[derive(Clone)]
pub struct Committer {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    stream: jetstream::stream::Stream,
    index: Arc<UidIndex>,
    workers: Mutex<HashMap<(String, usize), mpsc::Sender<Pending>>>,
}

impl Committer {
    pub fn new(
        client: async_nats::Client,
        stream: jetstream::stream::Stream,
        index: Arc<UidIndex>,
    ) -> Self {
        Committer {
            inner: Arc::new(Inner {
                client,
                stream,
                index,
                workers: Mutex::default(),
            }),
        }
    }

    /// Commits `items` for `org`; returns which were accepted and which were
    /// duplicates of uids accepted before. The items are split by uid
    /// partition and each part is committed atomically by its partition's
    /// committer; the reply waits for every part. If a part fails, the
    /// others may be stored: a retry of the request stores the rest, and the
    /// uids keep it exact.
    pub async fn commit(&self, org: &str, items: Vec<Item>) -> Result<Outcome, ServiceError> {
        let mut parts: Vec<Vec<Item>> = (0..PARTITIONS).map(|_| Vec::new()).collect();
        let mut spread = 0;
        for item in items {
            let p = if item.generated_uid {
                // No uid to de-duplicate: any partition will do.
                spread = (spread + 1) % PARTITIONS;
                spread
            } else {
                partition(&item.uid)
            };
            parts[p].push(item);
        }
        let results = futures::future::join_all(
            parts
                .into_iter()
                .enumerate()
                .filter(|(_, items)| !items.is_empty())
                .map(|(p, items)| self.commit_part(org, p, items)),
        )
        .await;
        let mut outcome = Outcome::default();
        for r in results {
            let r = r?;
            outcome.accepted.extend(r.accepted);
            outcome.duplicates.extend(r.duplicates);
        }
        Ok(outcome)
    }

    async fn commit_part(
        &self,
        org: &str,
        partition: usize,
        items: Vec<Item>,
    ) -> Result<Outcome, ServiceError> {
        let prepared = prepare(org, items.iter())?;
        let (reply, rx) = oneshot::channel();
        let tx = {
            let mut workers = self.inner.workers.lock().unwrap_or_else(|e| e.into_inner());
            workers
                .entry((org.to_owned(), partition))
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(1024);
                    tokio::spawn(worker(self.inner.clone(), org.to_owned(), partition, rx));
                    tx
                })
                .clone()
        };
        tx.send(Pending {
            items,
            prepared,
            reply,
        })
        .await
        .map_err(|_| ServiceError::unavailable("ingest is shutting down"))?;
        rx.await
            .map_err(|_| ServiceError::unavailable("ingest is shutting down"))?
    }
}

async fn worker(inner: Arc<Inner>, org: String, partition: usize, mut rx: mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut count = first.items.len();
        let mut messages = first.prepared.groups.len() + 1;
        let mut group = vec![first];
        while count < GROUP_MEASUREMENTS && messages < GROUP_MESSAGES {
            match rx.try_recv() {
                Ok(p) => {
                    count += p.items.len();
                    messages += p.prepared.groups.len() + 1;
                    group.push(p);
                }
                Err(_) => break,
            }
        }
        let result = commit_group(&inner, &org, partition, &group).await;
        metrics::counter!("meterline_ingest_commits_total").increment(1);
        for (i, p) in group.into_iter().enumerate() {
            let _ = p
                .reply
                .send(result.as_ref().map(|r| r[i].clone()).map_err(Clone::clone));
        }
    }
}

fn today() -> u32 {
    (Utc::now().timestamp().div_euclid(86_400)) as u32
}

/// Reads a marker by sequence and returns its uids.
async fn marker_uids(
    stream: &jetstream::stream::Stream,
    org: &str,
    partition: usize,
    seq: u64,
) -> Result<HashSet<String>, ServiceError> {
    let m = stream
        .direct_get(seq)
        .await
        .map_err(|e| ServiceError::unavailable(format!("reading uid marker #{seq} failed: {e}")))?;
    if m.subject.as_str() != marker_subject(org, partition) {
        return Err(ServiceError::internal(format!(
            "#{seq} is {}, not a uid marker of {org}",
            m.subject
        )));
    }
    let marker: Marker = rmp_serde::from_slice(&m.payload).map_err(ServiceError::internal)?;
    Ok(marker.uids.into_iter().collect())
}

async fn commit_group(
    inner: &Inner,
    org: &str,
    partition: usize,
    requests: &[Pending],
) -> Result<Vec<Outcome>, ServiceError> {
    let key = index_key(org, partition);
    for _ in 0..ATTEMPTS {
        let expected = inner.index.last_seq(&key);
        let day = today();
        // Decide: new, or a duplicate of an earlier commit or of an earlier
        // request in this group.
        let mut outcomes = vec![Outcome::default(); requests.len()];
        let mut fresh: Vec<Vec<usize>> = vec![Vec::new(); requests.len()];
        let mut in_group: HashSet<&str, foldhash::fast::RandomState> = HashSet::default();
        let mut to_check: HashMap<u64, Vec<(usize, usize)>> = HashMap::new();
        for (r, p) in requests.iter().enumerate() {
            let mut candidates = inner
                .index
                .candidates(&key, &p.prepared.fps, day)
                .into_iter();
            for (i, item) in p.items.iter().enumerate() {
                if item.generated_uid {
                    fresh[r].push(i);
                    continue;
                }
                let candidate = candidates.next().flatten();
                if !in_group.insert(item.uid.as_str()) {
                    outcomes[r].duplicates.push(item.index);
                } else if let Some(c) = candidate {
                    to_check.entry(c.marker_seq).or_default().push((r, i));
                } else {
                    fresh[r].push(i);
                }
            }
        }
        for (seq, refs) in to_check {
            let uids = marker_uids(&inner.stream, org, partition, seq).await?;
            for (r, i) in refs {
                let item = &requests[r].items[i];
                if uids.contains(&item.uid) {
                    outcomes[r].duplicates.push(item.index);
                } else {
                    // A fingerprint collision: the uid is new.
                    fresh[r].push(i);
                }
            }
        }
        // Write: each request's groups (re-encoded without its duplicates,
        // if it had any), then one marker per request; the first marker
        // carries the expected last sequence of `uidx.<org>`.
        let mut messages = Vec::new();
        let mut markers: Vec<(Bytes, Vec<u64>)> = Vec::new();
        for (r, p) in requests.iter().enumerate() {
            if fresh[r].is_empty() {
                continue;
            }
            if fresh[r].len() == p.items.len() {
                messages.extend(p.prepared.groups.iter().map(|g| Outgoing {
                    subject: g.subject.clone(),
                    headers: g.headers.clone(),
                    payload: g.payload.clone(),
                }));
                markers.push((p.prepared.marker.clone(), p.prepared.fps.clone()));
            } else {
                fresh[r].sort_unstable();
                let again = prepare(org, fresh[r].iter().map(|&i| &p.items[i]))?;
                messages.extend(again.groups);
                markers.push((again.marker, again.fps));
            }
        }
        if markers.is_empty() {
            return Ok(outcomes);
        }
        let marker_count = markers.len() as u64;
        for (k, (payload, _)) in markers.iter().enumerate() {
            let mut headers = Codec::MsgPack.headers();
            if k == 0 {
                headers.insert(
                    "Nats-Expected-Last-Subject-Sequence",
                    expected.to_string().as_str(),
                );
            }
            messages.push(Outgoing {
                subject: marker_subject(org, partition),
                headers,
                payload: payload.clone(),
            });
        }
        match batch::publish(&inner.client, messages, ACK_TIMEOUT).await {
            Ok(ack) => {
                // An atomic batch is stored contiguously: the markers are its
                // last sequences.
                let first = ack.sequence + 1 - marker_count;
                for (k, (_, fps)) in markers.into_iter().enumerate() {
                    inner.index.apply(&key, first + k as u64, day, fps);
                }
                for (r, p) in requests.iter().enumerate() {
                    outcomes[r]
                        .accepted
                        .extend(fresh[r].iter().map(|&i| p.items[i].index));
                }
                return Ok(outcomes);
            }
            Err(e) if e.is_wrong_last_sequence() => {
                // Another replica committed for this org: catch up, decide again.
                let latest = match inner
                    .stream
                    .direct_get_last_for_subject(marker_subject(org, partition))
                    .await
                {
                    Ok(m) => m.sequence,
                    Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => 0,
                    Err(e) => {
                        return Err(ServiceError::unavailable(format!(
                            "reading uid markers failed: {e}"
                        )))
                    }
                };
                tokio::time::timeout(CATCH_UP_TIMEOUT, inner.index.wait_for(&key, latest))
                    .await
                    .map_err(|_| {
                        ServiceError::unavailable(
                            "the uid index is still catching up; retry shortly",
                        )
                    })?;
                metrics::counter!("meterline_ingest_commit_retries_total").increment(1);
            }
            Err(e) => {
                return Err(ServiceError::unavailable(format!(
                    "storing measurements failed: {e}"
                )))
            }
        }
    }
    Err(ServiceError::unavailable(
        "too many concurrent commits for this organization; retry",
    ))
}
