//! Reading what an export holds out of `ENTITIES`.
//!
//! A job covers the window `(C, S]` of `ENTITIES` sequences: `C` the
//! schedule's cursor, `S` the last sequence when the job started. For one
//! entity type it exports the latest version, as of `S`, of every entity
//! with a version in the window, in the order of those versions:
//!
//! - Initial export (no cursor): every entity live at `S`. A consumer with
//!   `DeliverPolicy::LastPerSubject` filtered to `ent.<org>.<type>.*` gives
//!   one message per entity, however many versions it has, so the work and
//!   memory do not depend on history. An entity changed after `S` (its last
//!   message is newer) is exported as it was at `S`: the `old` state of its
//!   first version after `S`.
//! - Incremental export: an ordered consumer replays the window once,
//!   filtered to the type, into a spill file on local disk, while the
//!   window's subjects go into two fixed-size Bloom filters. Then the spill
//!   file is read back in order: a version is exported only if it is its
//!   entity's last one up to `S`. Only entities that may occur more than
//!   once in the window are checked, with one direct get (`next_by_subj`
//!   after it) each, many at a time. Nothing is kept per entity in memory:
//!   it is constant whatever the window holds; the spill file is the size
//!   of the window. A tombstone is exported once, from its last state,
//!   with `deleted = true`.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use bytes::Bytes;
use meterline_shared::envelope::{Action, HEADER_ACTION};
use meterline_shared::subjects;

use crate::format::{Row, State};

/// How many "is there a later version" checks run at once.
const CHECKS_IN_FLIGHT: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading ENTITIES failed: {0}")]
    Bus(String),
    #[error("the job was stopped")]
    Stopped,
    #[error("the export file writer stopped")]
    WriterGone,
    #[error("the local spill file of the window failed: {0}")]
    Spill(String),
}

fn bus(e: impl std::fmt::Display) -> ReplayError {
    ReplayError::Bus(e.to_string())
}

/// The `ENTITIES` window of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// `C`: exclusive; `None` for an initial export.
    pub from: Option<u64>,
    /// `S`: inclusive.
    pub to: u64,
}

/// Rows go to the writer in batches of this many.
const BATCH: usize = 256;

/// The action of a stored entity event: from its header, else its body.
fn action_of(headers: Option<&async_nats::HeaderMap>, payload: &[u8]) -> Option<Action> {
    if let Some(action) = headers
        .and_then(|h| h.get(HEADER_ACTION))
        .and_then(|v| Action::parse(v.as_str()))
    {
        return Some(action);
    }
    #[derive(Deserialize)]
    struct Only {
        action: Action,
    }
    serde_json::from_slice::<Only>(payload)
        .ok()
        .map(|o| o.action)
}

/// The row a version stands for: its state, or for a tombstone its last
/// state marked deleted. The message's bytes are kept as they are.
fn row_of(headers: Option<&async_nats::HeaderMap>, payload: &Bytes) -> Option<Row> {
    Some(row_for(action_of(headers, payload)?, payload.clone()))
}

/// The row of a version with `action` stored as `payload`.
fn row_for(action: Action, payload: Bytes) -> Row {
    let deleted = action == Action::Deleted;
    Row {
        state: State::Event {
            payload,
            from_old: deleted,
        },
        deleted,
    }
}

/// Sends every row of `entity_type` in `window` to `rows`; returns how many.
pub async fn replay(
    stream: &Stream,
    org: &str,
    entity_type: &str,
    window: Window,
    rows: &mpsc::Sender<Vec<Row>>,
    cancel: &CancellationToken,
) -> Result<u64, ReplayError> {
    let mut out = Out {
        tx: rows,
        buf: Vec::with_capacity(BATCH),
        sent: 0,
    };
    match window.from {
        None => initial(stream, org, entity_type, window.to, &mut out, cancel).await?,
        Some(from) => {
            incremental(stream, org, entity_type, from, window.to, &mut out, cancel).await?
        }
    }
    out.flush().await?;
    Ok(out.sent)
}

/// Rows on their way to the writer, sent a batch at a time.
struct Out<'a> {
    tx: &'a mpsc::Sender<Vec<Row>>,
    buf: Vec<Row>,
    sent: u64,
}

impl Out<'_> {
    async fn push(&mut self, row: Row) -> Result<(), ReplayError> {
        self.buf.push(row);
        self.sent += 1;
        if self.buf.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ReplayError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.buf, Vec::with_capacity(BATCH));
        self.tx
            .send(batch)
            .await
            .map_err(|_| ReplayError::WriterGone)
    }
}

async fn initial(
    stream: &Stream,
    org: &str,
    entity_type: &str,
    to: u64,
    out: &mut Out<'_>,
    cancel: &CancellationToken,
) -> Result<(), ReplayError> {
    if to == 0 {
        return Ok(());
    }
    let filter = subjects::entity_type_filter(org, entity_type);
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: filter,
            deliver_policy: DeliverPolicy::LastPerSubject,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            memory_storage: true,
            description: Some("Meterline exporter: initial export".into()),
            ..Default::default()
        })
        .await
        .map_err(bus)?;
    // As the server counted at creation: one message per entity. Messages
    // written since come after these and are not read (a second message
    // of an entity would export it twice).
    let snapshot = consumer.cached_info().num_pending;
    let name = consumer.cached_info().name.clone();
    let result = async {
        if snapshot == 0 {
            return Ok(());
        }
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(1000)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(bus)?;
        let mut seen = 0u64;
        while seen < snapshot {
            let msg = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(ReplayError::Stopped),
                m = messages.next() => m,
            };
            let msg = msg
                .ok_or_else(|| ReplayError::Bus("the replay ended early".into()))?
                .map_err(bus)?;
            seen += 1;
            let info = msg.info().map_err(bus)?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            let row = if seq <= to {
                row_of(msg.headers.as_ref(), &msg.payload).filter(|r| !r.deleted)
            } else {
                // Changed since S: export it as it was at S, if it was live.
                as_of(stream, msg.subject.as_str(), to).await?
            };
            if let Some(row) = row {
                out.push(row).await?;
            }
            if pending == 0 {
                break;
            }
        }
        Ok(())
    }
    .await;
    let _ = stream.delete_consumer(&name).await;
    result
}

/// An entity's live state as of sequence `at`: the `old` state of its first
/// version after `at`, unless that version created it.
async fn as_of(stream: &Stream, subject: &str, at: u64) -> Result<Option<Row>, ReplayError> {
    let next = match stream
        .direct_get_next_for_subject(subject, Some(at + 1))
        .await
    {
        Ok(m) => m,
        Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => return Ok(None),
        Err(e) => return Err(bus(e)),
    };
    match action_of(Some(&next.headers), &next.payload) {
        None | Some(Action::Created) => Ok(None),
        Some(_) => Ok(Some(Row {
            state: State::Event {
                payload: next.payload,
                from_old: true,
            },
            deleted: false,
        })),
    }
}

/// Whether `subject` has a version after `seq` and at or before `to`.
async fn superseded(
    stream: Stream,
    subject: String,
    seq: u64,
    to: u64,
) -> Result<bool, ReplayError> {
    if seq >= to {
        return Ok(false);
    }
    match stream
        .direct_get_next_for_subject(subject, Some(seq + 1))
        .await
    {
        Ok(m) => Ok(m.sequence <= to),
        Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(false),
        Err(e) => Err(bus(e)),
    }
}

async fn incremental(
    stream: &Stream,
    org: &str,
    entity_type: &str,
    from: u64,
    to: u64,
    out: &mut Out<'_>,
    cancel: &CancellationToken,
) -> Result<(), ReplayError> {
    if from >= to {
        return Ok(());
    }
    let filter = subjects::entity_type_filter(org, entity_type);
    // Nothing of this type in the window: no consumer needed.
    match stream
        .direct_get_next_for_subject(filter.clone(), Some(from + 1))
        .await
    {
        Ok(m) if m.sequence <= to => {}
        Ok(_) => return Ok(()),
        Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => return Ok(()),
        Err(e) => return Err(bus(e)),
    }
    let reading = std::time::Instant::now();
    let (spill, repeats) = read_window(stream, &filter, from, to, cancel).await?;
    tracing::debug!(
        filter,
        seconds = reading.elapsed().as_secs_f64(),
        "window read into the spill file"
    );
    let mut versions = spill.read().await?;
    let mut checks = futures::stream::FuturesOrdered::new();
    let mut waiting: VecDeque<Spilled> = VecDeque::new();
    let mut done = false;
    loop {
        // Keep up to CHECKS_IN_FLIGHT checks running; emit in order.
        while !done && checks.len() < CHECKS_IN_FLIGHT {
            if cancel.is_cancelled() {
                return Err(ReplayError::Stopped);
            }
            let Some(v) = versions.next().await? else {
                done = true;
                break;
            };
            // Only an entity seen more than once in the window can have a
            // later version in it.
            let repeated = repeats.maybe_repeated(&v.subject);
            if !repeated && checks.is_empty() {
                // Nothing to wait for: straight out.
                emit(out, v).await?;
                continue;
            }
            let check = repeated.then(|| (stream.clone(), v.subject.clone(), v.seq));
            checks.push_back(async move {
                match check {
                    Some((stream, subject, seq)) => superseded(stream, subject, seq, to).await,
                    None => Ok(false),
                }
            });
            waiting.push_back(v);
        }
        let Some(result) = checks.next().await else {
            break;
        };
        let v = waiting
            .pop_front()
            .ok_or_else(|| ReplayError::Bus("replay bookkeeping lost a message".into()))?;
        if !result? {
            emit(out, v).await?;
        }
    }
    Ok(())
}

/// The row of a spilled version that is its entity's last in the window.
async fn emit(out: &mut Out<'_>, v: Spilled) -> Result<(), ReplayError> {
    match v.action.map(|a| row_for(a, v.payload)) {
        Some(row) => out.push(row).await,
        None => Ok(()),
    }
}

/// Reads the window once, filtered to the type, into a spill file on local
/// disk, and its subjects into a [`Repeats`]. Whether a version is its
/// entity's last in the window is only known once the whole window has
/// been read; the spill file lets the second look be a local read instead
/// of a second replay from the bus. Its size is the window's, on disk;
/// memory stays constant.
async fn read_window(
    stream: &Stream,
    filter: &str,
    from: u64,
    to: u64,
    cancel: &CancellationToken,
) -> Result<(spill::Writer, Repeats), ReplayError> {
    let mut repeats = Repeats::new();
    let mut spill = spill::Writer::new().await?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter.to_owned(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: from + 1,
            },
            description: Some("Meterline exporter: incremental export".into()),
            ..Default::default()
        })
        .await
        .map_err(bus)?;
    let mut messages = consumer.messages().await.map_err(bus)?;
    loop {
        let msg = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(ReplayError::Stopped),
            m = messages.next() => m,
        };
        let msg = msg
            .ok_or_else(|| ReplayError::Bus("the replay ended early".into()))?
            .map_err(bus)?;
        let info = msg.info().map_err(bus)?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        if seq > to {
            break;
        }
        repeats.insert(msg.subject.as_str());
        let action = action_of(msg.headers.as_ref(), &msg.payload);
        spill
            .push(seq, msg.subject.as_str(), action, &msg.payload)
            .await?;
        if pending == 0 || seq == to {
            break;
        }
    }
    Ok((spill, repeats))
}

/// One version as the spill file keeps it.
struct Spilled {
    seq: u64,
    subject: String,
    action: Option<Action>,
    payload: Bytes,
}

mod spill {
    //! The spill file of an incremental export: one record per version,
    //! `seq u64 | subject length u16 | subject | action u8 | payload
    //! length u32 | payload`, little-endian. An unnamed temporary file
    //! (in `TMPDIR`): it disappears when closed, also after a crash.

    use std::io::Read;

    use bytes::BytesMut;
    use tokio::io::{AsyncSeekExt, AsyncWriteExt};

    use super::{Action, ReplayError, Spilled};

    const BUFFER: usize = 1 << 20;

    fn io(e: std::io::Error) -> ReplayError {
        ReplayError::Spill(e.to_string())
    }

    pub struct Writer {
        file: tokio::fs::File,
        buf: Vec<u8>,
    }

    impl Writer {
        pub async fn new() -> Result<Writer, ReplayError> {
            let file = tokio::task::spawn_blocking(tempfile::tempfile)
                .await
                .map_err(|e| ReplayError::Spill(e.to_string()))?
                .map_err(io)?;
            Ok(Writer {
                file: tokio::fs::File::from_std(file),
                buf: Vec::with_capacity(BUFFER + (64 << 10)),
            })
        }

        pub async fn push(
            &mut self,
            seq: u64,
            subject: &str,
            action: Option<Action>,
            payload: &[u8],
        ) -> Result<(), ReplayError> {
            let subject_len = u16::try_from(subject.len())
                .map_err(|_| ReplayError::Spill("a subject is too long".into()))?;
            let payload_len = u32::try_from(payload.len())
                .map_err(|_| ReplayError::Spill("a message is too large".into()))?;
            self.buf.extend_from_slice(&seq.to_le_bytes());
            self.buf.extend_from_slice(&subject_len.to_le_bytes());
            self.buf.extend_from_slice(subject.as_bytes());
            // 0: unknown, else 1 + its place in `Action::ALL`.
            self.buf.push(
                action
                    .and_then(|a| Action::ALL.iter().position(|x| *x == a))
                    .map_or(0, |i| i as u8 + 1),
            );
            self.buf.extend_from_slice(&payload_len.to_le_bytes());
            self.buf.extend_from_slice(payload);
            if self.buf.len() >= BUFFER {
                self.file.write_all(&self.buf).await.map_err(io)?;
                self.buf.clear();
            }
            Ok(())
        }

        /// Ends writing; the records can be read back from the start.
        pub async fn read(mut self) -> Result<Reader, ReplayError> {
            self.file.write_all(&self.buf).await.map_err(io)?;
            self.file.flush().await.map_err(io)?;
            self.file.rewind().await.map_err(io)?;
            Ok(Reader {
                file: Some(self.file.into_std().await),
                buf: BytesMut::with_capacity(2 * BUFFER),
                eof: false,
            })
        }
    }

    pub struct Reader {
        file: Option<std::fs::File>,
        buf: BytesMut,
        eof: bool,
    }

    impl Reader {
        /// Whether at least `need` bytes are buffered, reading more (in
        /// large blocks, off the async threads) as needed.
        async fn fill(&mut self, need: usize) -> Result<bool, ReplayError> {
            while self.buf.len() < need && !self.eof {
                let Some(mut file) = self.file.take() else {
                    return Err(ReplayError::Spill("the spill file is closed".into()));
                };
                let (file, chunk) = tokio::task::spawn_blocking(move || {
                    let mut chunk = vec![0u8; BUFFER];
                    let n = file.read(&mut chunk)?;
                    chunk.truncate(n);
                    Ok::<_, std::io::Error>((file, chunk))
                })
                .await
                .map_err(|e| ReplayError::Spill(e.to_string()))?
                .map_err(io)?;
                self.file = Some(file);
                self.eof = chunk.is_empty();
                self.buf.extend_from_slice(&chunk);
            }
            Ok(self.buf.len() >= need)
        }

        fn damaged() -> ReplayError {
            ReplayError::Spill("the spill file is damaged".into())
        }

        pub async fn next(&mut self) -> Result<Option<Spilled>, ReplayError> {
            if !self.fill(10).await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Self::damaged())
                };
            }
            let subject_len = u16::from_le_bytes([self.buf[8], self.buf[9]]) as usize;
            let head = 10 + subject_len + 1 + 4;
            if !self.fill(head).await? {
                return Err(Self::damaged());
            }
            let p = 10 + subject_len + 1;
            let payload_len = u32::from_le_bytes([
                self.buf[p],
                self.buf[p + 1],
                self.buf[p + 2],
                self.buf[p + 3],
            ]) as usize;
            if !self.fill(head + payload_len).await? {
                return Err(Self::damaged());
            }
            let record = self.buf.split_to(head + payload_len).freeze();
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&record[..8]);
            let subject = std::str::from_utf8(&record[10..10 + subject_len])
                .map_err(|_| Self::damaged())?
                .to_owned();
            let action = (record[10 + subject_len] as usize)
                .checked_sub(1)
                .and_then(|i| Action::ALL.get(i).copied());
            Ok(Some(Spilled {
                seq: u64::from_le_bytes(seq),
                subject,
                action,
                payload: record.slice(head..),
            }))
        }
    }
}

/// Bits of each of the two filters of [`Repeats`]: 2 MiB each.
const FILTER_BITS: u64 = 1 << 24;

/// Which subjects occur more than once in a window, approximately and in
/// fixed memory: two Bloom filters, of subjects seen and of subjects seen
/// again. A subject not in the second occurs once (no false negatives); one
/// in it may be checked for nothing (false positives, rare below a few
/// million changes, then more checks, never wrong rows).
struct Repeats {
    seen: Vec<u64>,
    again: Vec<u64>,
}

impl Repeats {
    fn new() -> Repeats {
        let words = (FILTER_BITS / 64) as usize;
        Repeats {
            seen: vec![0; words],
            again: vec![0; words],
        }
    }

    fn bits(subject: &str) -> [u64; 3] {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let h = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .hash_one(subject);
        let step = h.rotate_left(32) | 1;
        [0u64, 1, 2].map(|i| h.wrapping_add(i.wrapping_mul(step)) % FILTER_BITS)
    }

    fn contains(filter: &[u64], bits: &[u64; 3]) -> bool {
        bits.iter()
            .all(|b| filter[(b / 64) as usize] & (1 << (b % 64)) != 0)
    }

    fn insert(&mut self, subject: &str) {
        let bits = Self::bits(subject);
        let filter = if Self::contains(&self.seen, &bits) {
            &mut self.again
        } else {
            &mut self.seen
        };
        for b in bits {
            filter[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    fn maybe_repeated(&self, subject: &str) -> bool {
        Self::contains(&self.again, &Self::bits(subject))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_never_miss_a_repeated_subject() {
        let mut r = Repeats::new();
        for i in 0..100_000 {
            r.insert(&format!("ent.o.account.{i}"));
        }
        for i in (0..100_000).step_by(7) {
            r.insert(&format!("ent.o.account.{i}"));
        }
        for i in 0..100_000 {
            let s = format!("ent.o.account.{i}");
            if i % 7 == 0 {
                assert!(r.maybe_repeated(&s), "{s} missed");
            }
        }
        let false_positives = (0..100_000)
            .filter(|i| i % 7 != 0 && r.maybe_repeated(&format!("ent.o.account.{i}")))
            .count();
        assert!(false_positives < 10, "{false_positives} false positives");
    }

    #[test]
    fn tombstones_become_their_last_state_marked_deleted() {
        let del = br#"{"id":"e","eventName":"x","eventTime":"2026-01-01T00:00:00Z","orgId":"o","entityType":"account","entityId":"a","action":"deleted","actor":"t","new":null,"old":{"id":"a","name":"A"}}"#;
        let mut row = row_of(None, &Bytes::from_static(del)).unwrap();
        assert!(row.deleted);
        assert_eq!(row.map()["name"], "A");
        let upd =
            br#"{"action":"updated","new":{"id":"a","name":"B"},"old":{"id":"a","name":"A"}}"#;
        let mut row = row_of(None, &Bytes::from_static(upd)).unwrap();
        assert!(!row.deleted);
        assert_eq!(row.map()["name"], "B");
    }
}
