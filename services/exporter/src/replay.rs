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
//! - Incremental export: consumers replay the window once,
//!   filtered to the type (a large window in two parts at once, each into
//!   its own spill file); each version is encoded into its lines as it is
//!   read, and those go into the spill file on local disk, while the
//!   window's subjects go into two fixed-size Bloom filters. Then the spill
//!   files are read back in order: a version's lines are sent on only if it
//!   is its entity's last version up to `S`. Only entities that may occur more than
//!   once in the window are checked, with one direct get (`next_by_subj`
//!   after it) each, many at a time. Nothing is kept per entity in memory:
//!   it is constant whatever the window holds; the spill file is the size
//!   of the window. A tombstone is exported once, from its last state,
//!   with `deleted = true`.
//!
//!   Most versions in a window are their entity's only one there, so the
//!   first part's lines are also sent on as they are read, tentatively
//!   ([`Piece::Tentative`]), until one of the part's entities comes again.
//!   Once the window is read, those versions are checked like the others:
//!   if none has a later version, they stand ([`Piece::Settled`]) and the
//!   read-back starts after them; else they are withdrawn
//!   ([`Piece::Void`]) and the whole window is read back. The writer makes
//!   nothing visible while lines are tentative.
//!
//! Either way the writer gets finished lines ([`RowFormat`]), in batches.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::message::{Message, StreamMessage};
use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use bytes::Bytes;
use meterline_shared::envelope::{Action, HEADER_ACTION};
use meterline_shared::subjects;

use crate::format::{Row, State};
use crate::rows::{Lines, RowFormat};

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

/// The first message of `subject` (a subject or a filter) at or after
/// sequence `seq`, if there is one.
async fn next_of(
    stream: &Stream,
    subject: &str,
    seq: u64,
) -> Result<Option<StreamMessage>, ReplayError> {
    match stream.direct_get_next_for_subject(subject, Some(seq)).await {
        Ok(m) => Ok(Some(m)),
        Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(None),
        Err(e) => Err(bus(e)),
    }
}

/// The next message of a replay, with its stream sequence and how many
/// messages of the filter the server still holds after it.
async fn next_message(
    messages: &mut pull::Stream,
    cancel: &CancellationToken,
) -> Result<(Message, u64, u64), ReplayError> {
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
    Ok((msg, seq, pending))
}

/// Runs `read` on a replay of `filter` from where `deliver_policy` says,
/// given how many messages the consumer had to deliver when created, then
/// deletes the consumer. The consumer is ephemeral and without acks
/// (nothing is redelivered: a replay that stops fails its attempt, and the
/// job's next attempt replays again); it is read in pull requests of
/// `batch` messages. A lost connection shows as missed heartbeats.
async fn with_replay<T>(
    stream: &Stream,
    filter: &str,
    deliver_policy: DeliverPolicy,
    description: &str,
    batch: usize,
    read: impl AsyncFnOnce(u64, &mut pull::Stream) -> Result<T, ReplayError>,
) -> Result<T, ReplayError> {
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: filter.to_owned(),
            deliver_policy,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            memory_storage: true,
            description: Some(format!("Meterline exporter: {description}")),
            ..Default::default()
        })
        .await
        .map_err(bus)?;
    let info = consumer.cached_info();
    let (name, pending) = (info.name.clone(), info.num_pending);
    let result = match consumer
        .stream()
        .max_messages_per_batch(batch)
        .max_bytes_per_batch(PULL_BATCH_BYTES)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
    {
        Ok(mut messages) => read(pending, &mut messages).await,
        Err(e) => Err(bus(e)),
    };
    let _ = stream.delete_consumer(&name).await;
    result
}

/// The `ENTITIES` window of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// `C`: exclusive; `None` for an initial export.
    pub from: Option<u64>,
    /// `S`: inclusive.
    pub to: u64,
}

/// Messages one pull request of a replay asks for (the client asks for the
/// next batch when half of one is left): small batches leave the server's
/// delivery waiting for requests (batches of 1,000 read a type about a
/// fifth slower than batches of 8,000, and ordered consumers' 500 slower
/// still).
pub const PULL_BATCH: usize = 8192;
/// ... and at most this many bytes, which bounds what is buffered.
pub const PULL_BATCH_BYTES: usize = 8 << 20;

/// Lines go to the writer in batches of about this many.
const BATCH: usize = 256;

/// The action header's name, made once (a name looked up as text is
/// checked and copied on every look-up).
const ACTION: async_nats::HeaderName = async_nats::HeaderName::from_static(HEADER_ACTION);

/// The action of a stored entity event: from its header, else its body.
fn action_of(headers: Option<&async_nats::HeaderMap>, payload: &[u8]) -> Option<Action> {
    if let Some(action) = headers
        .and_then(|h| h.get(ACTION))
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

/// What a replay sends the file writer.
#[derive(Debug)]
pub enum Piece {
    /// Lines of rows, in order.
    Lines(Vec<Bytes>),
    /// The lines from here on are tentative until `Settled` or `Void`: the
    /// writer makes no part of the file visible meanwhile.
    Tentative,
    /// The tentative lines stand.
    Settled,
    /// Every line sent so far is withdrawn: the writer starts the file
    /// over, and the lines that follow are the whole of it.
    Void,
}

/// Sends the lines of every row of `entity_type` in `window`, as `rows`
/// makes them, to `lines`; returns how many stand.
///
/// `streams` are handles on `ENTITIES`, best each on its own connection:
/// the parts of a large window are read one on each (a client parses what
/// one connection receives on one task, so two connections let two cores
/// parse). The first also answers the lookups.
pub async fn replay(
    streams: &[Stream],
    org: &str,
    entity_type: &str,
    window: Window,
    rows: &RowFormat,
    lines: &mpsc::Sender<Piece>,
    cancel: &CancellationToken,
) -> Result<u64, ReplayError> {
    let mut out = Out {
        tx: lines,
        rows,
        encoded: Lines::default(),
        ready: Vec::with_capacity(BATCH),
        sent: 0,
    };
    let stream = streams
        .first()
        .ok_or_else(|| ReplayError::Bus("no connection to read ENTITIES on".into()))?;
    match window.from {
        None => initial(stream, org, entity_type, window.to, &mut out, cancel).await?,
        Some(from) => {
            incremental(streams, org, entity_type, from, window.to, &mut out, cancel).await?
        }
    }
    out.flush().await?;
    Ok(out.sent)
}

/// Lines on their way to the writer, sent a batch at a time.
struct Out<'a> {
    tx: &'a mpsc::Sender<Piece>,
    rows: &'a RowFormat,
    /// Lines of rows encoded here, not yet in `ready`.
    encoded: Lines,
    ready: Vec<Bytes>,
    sent: u64,
}

impl Out<'_> {
    /// Encodes `row` and sends its lines on.
    async fn push(&mut self, row: Row) -> Result<(), ReplayError> {
        self.rows.lines(row, &mut self.encoded);
        if self.encoded.len() + self.ready.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends lines encoded here before on.
    async fn push_encoded(&mut self, lines: &Lines) -> Result<(), ReplayError> {
        self.encoded.append(lines);
        if self.encoded.len() + self.ready.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends lines encoded before on.
    async fn push_lines(&mut self, lines: Vec<Bytes>) -> Result<(), ReplayError> {
        self.ready.extend(self.encoded.take());
        self.ready.extend(lines);
        if self.ready.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ReplayError> {
        self.ready.extend(self.encoded.take());
        if self.ready.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.ready, Vec::with_capacity(BATCH));
        self.sent += batch.len() as u64;
        self.send(Piece::Lines(batch)).await
    }

    /// Sends the lines so far on, then `mark` (not lines).
    async fn mark(&mut self, mark: Piece) -> Result<(), ReplayError> {
        self.flush().await?;
        if matches!(mark, Piece::Void) {
            self.sent = 0;
        }
        self.send(mark).await
    }

    async fn send(&mut self, piece: Piece) -> Result<(), ReplayError> {
        self.tx
            .send(piece)
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
    with_replay(
        stream,
        &filter,
        DeliverPolicy::LastPerSubject,
        "initial export",
        PULL_BATCH,
        // `snapshot`, as the server counted at creation: one message per
        // entity. Messages written since come after these and are not read
        // (a second message of an entity would export it twice).
        async |snapshot, messages| {
            let mut seen = 0u64;
            while seen < snapshot {
                let (msg, seq, pending) = next_message(messages, cancel).await?;
                seen += 1;
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
        },
    )
    .await
}

/// An entity's live state as of sequence `at`: the `old` state of its first
/// version after `at`, unless that version created it.
async fn as_of(stream: &Stream, subject: &str, at: u64) -> Result<Option<Row>, ReplayError> {
    let Some(next) = next_of(stream, subject, at + 1).await? else {
        return Ok(None);
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

/// Whether `subject` has a version in `(after, up_to]`: one direct get.
/// A version at `seq` is superseded if it has one in `(seq, S]`, and is
/// a repeat in its part if it has one in `(part start, seq - 1]`.
async fn has_version(
    stream: &Stream,
    subject: &str,
    after: u64,
    up_to: u64,
) -> Result<bool, ReplayError> {
    if after >= up_to {
        return Ok(false);
    }
    Ok(next_of(stream, subject, after + 1)
        .await?
        .is_some_and(|m| m.sequence <= up_to))
}

async fn incremental(
    streams: &[Stream],
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
    let reading = std::time::Instant::now();
    // The first part's lines go out as they are read, tentatively: most
    // versions in a window are their entity's only one, and the file then
    // need not wait for the whole window to start.
    out.mark(Piece::Tentative).await?;
    let (parts, repeats) = read_window(streams, &filter, from, to, out, cancel).await?;
    let stream = &streams[0];
    let live = parts.first().map_or(0, |p| p.live);
    tracing::debug!(
        filter,
        seconds = reading.elapsed().as_secs_f64(),
        sent_as_read = live,
        "window read into the spill files"
    );
    let mut spills = Vec::with_capacity(parts.len());
    for part in parts {
        spills.push(part.spill.read().await?);
    }
    // The lines sent as they were read stand if none of their versions
    // has a later one in the window; the first record read back after
    // them is where the rest starts. Else the file starts over.
    if live > 0 && !stands(&mut spills[0], live, &repeats, stream, to, cancel).await? {
        tracing::debug!(
            filter,
            "a version sent as read has a later one: starting over"
        );
        spills[0].rewind()?;
        out.mark(Piece::Void).await?;
    } else {
        out.mark(Piece::Settled).await?;
    }
    tracing::debug!(
        filter,
        seconds = reading.elapsed().as_secs_f64(),
        "versions sent as read checked"
    );
    let mut versions = spill::Versions::new(spills);
    // Each version waits in its check, so they come out in order.
    let mut checks = futures::stream::FuturesOrdered::new();
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
                out.push_lines(v.lines).await?;
                continue;
            }
            let stream = repeated.then(|| stream.clone());
            checks.push_back(async move {
                let later = match stream {
                    Some(stream) => has_version(&stream, &v.subject, v.seq, to).await?,
                    None => false,
                };
                Ok::<_, ReplayError>((later, v))
            });
        }
        let Some(checked) = checks.next().await else {
            break;
        };
        let (later, v) = checked?;
        if !later {
            out.push_lines(v.lines).await?;
        }
    }
    tracing::debug!(
        filter,
        seconds = reading.elapsed().as_secs_f64(),
        "window sent"
    );
    Ok(())
}

/// Whether none of the first `count` versions of `spill` has a later
/// version in the window (up to `to`); reads exactly those records when
/// none has.
async fn stands(
    spill: &mut spill::Reader,
    count: u64,
    repeats: &Repeats,
    stream: &Stream,
    to: u64,
    cancel: &CancellationToken,
) -> Result<bool, ReplayError> {
    let mut checks = futures::stream::FuturesUnordered::new();
    let mut read = 0;
    while read < count || !checks.is_empty() {
        while read < count && checks.len() < CHECKS_IN_FLIGHT {
            if cancel.is_cancelled() {
                return Err(ReplayError::Stopped);
            }
            let v = spill.next().await?.ok_or_else(spill::damaged)?;
            read += 1;
            if repeats.maybe_repeated(&v.subject) {
                checks.push(async move { has_version(stream, &v.subject, v.seq, to).await });
            }
        }
        if let Some(later) = checks.next().await {
            if later? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Windows of at least this many sequences are read in [`SEGMENTS`] parts.
const SEGMENT_MIN: u64 = 1_000;
/// How many consumers read a large window at once, each its own part of
/// the sequences: one consumer leaves the server's second core idle (two
/// read a window about 1.3 times as fast as one on two cores). It is also
/// how many connections an exporter reads `ENTITIES` on.
pub const SEGMENTS: u64 = 2;

/// One part of a window, read.
struct Part {
    /// Its versions' lines, in order.
    spill: spill::Writer,
    /// How many of its first versions were also sent on as they were read.
    live: u64,
}

/// Reads the window once, filtered to the type, encodes each version into
/// its lines, and writes those into spill files on local disk (one per
/// part of the window, in order), and the subjects into a [`Repeats`].
/// Whether a version is its entity's last in the window is only known once
/// the whole window has been read; the spill files let the second look be
/// a local read of finished lines instead of a second replay from the bus.
/// Their size is about the window's, on disk; memory stays constant.
///
/// The first part also sends its lines on to `out` as it reads them,
/// until one of its entities comes again (then that speculation is lost).
async fn read_window(
    streams: &[Stream],
    filter: &str,
    from: u64,
    to: u64,
    out: &mut Out<'_>,
    cancel: &CancellationToken,
) -> Result<(Vec<Part>, Repeats), ReplayError> {
    let segments = if to - from >= SEGMENT_MIN {
        SEGMENTS
    } else {
        1
    };
    let step = (to - from).div_ceil(segments);
    let rows = out.rows;
    let mut live = Some(out);
    let reads = (0..segments)
        .map(|i| (from + i * step, (from + (i + 1) * step).min(to)))
        .filter(|(a, b)| a < b)
        .zip(streams.iter().cycle())
        .map(|((a, b), stream)| read_segment(stream, filter, a, b, rows, live.take(), cancel));
    let (parts, seen): (Vec<_>, Vec<_>) = futures::future::try_join_all(reads)
        .await?
        .into_iter()
        .flatten()
        .unzip();
    let repeats = seen
        .into_iter()
        .reduce(Repeats::union)
        .unwrap_or_else(Repeats::new);
    Ok((parts, repeats))
}

/// Reads the part `(from, to]` of a window (see [`read_window`]); `None`
/// if it holds nothing of the type. With `live`, each version's lines are
/// also sent there as read, until an entity of the part comes again.
async fn read_segment(
    stream: &Stream,
    filter: &str,
    from: u64,
    to: u64,
    rows: &RowFormat,
    mut live: Option<&mut Out<'_>>,
    cancel: &CancellationToken,
) -> Result<Option<(Part, Repeats)>, ReplayError> {
    with_replay(
        stream,
        filter,
        DeliverPolicy::ByStartSequence {
            start_sequence: from + 1,
        },
        "incremental export",
        segment_batch(to - from),
        async |pending, messages| {
            // Nothing of the type from here on: nothing to wait for. (Of
            // the type only after the part: its first message ends it.)
            if pending == 0 {
                return Ok(None);
            }
            // The spill file and filters, from the part's first version.
            let mut part: Option<(Part, Repeats)> = None;
            let mut lines = Lines::default();
            loop {
                let (msg, seq, pending) = next_message(messages, cancel).await?;
                if seq > to {
                    break;
                }
                let (part, repeats) = match &mut part {
                    Some(p) => p,
                    None => {
                        let spill = spill::Writer::new().await?;
                        part.insert((Part { spill, live: 0 }, Repeats::new()))
                    }
                };
                // An entity seen before in the part: its earlier version,
                // sent, is superseded; the rest waits for the checks. The
                // filter can be wrong about it (more often the fuller it
                // gets: about a hundred times in a part of 500,000
                // entities), so while lines are sent as read, one lookup
                // makes sure before giving that up.
                if repeats.insert(msg.subject.as_str())
                    && (live.is_none()
                        || has_version(stream, msg.subject.as_str(), from, seq - 1).await?)
                {
                    live = None;
                }
                // A version with no lines (not modified since the job's
                // start date, or of an unknown action) is not spilled; its
                // entity still counts as seen, so its earlier versions are
                // checked.
                if let Some(action) = action_of(msg.headers.as_ref(), &msg.payload) {
                    lines.clear();
                    rows.lines(row_for(action, msg.payload.clone()), &mut lines);
                    if !lines.is_empty() {
                        part.spill.push(seq, msg.subject.as_str(), &lines).await?;
                        if let Some(out) = live.as_deref_mut() {
                            out.push_encoded(&lines).await?;
                            part.live += 1;
                        }
                    }
                }
                if pending == 0 || seq == to {
                    break;
                }
            }
            Ok(part)
        },
    )
    .await
}

/// The pull batch of a segment `span` sequences long. The server keeps
/// delivering past a segment's end what was asked for (up to one and a
/// half batches, read and dropped), so a segment asks for at most a
/// sixteenth of its span: at most about a tenth more read in vain. (A
/// window of 100,000 changes in two segments was read fastest so, ahead of
/// a quarter and of a 64th.)
fn segment_batch(span: u64) -> usize {
    usize::try_from(span / 16)
        .unwrap_or(PULL_BATCH)
        .clamp(256, PULL_BATCH)
}

/// One version as the spill file keeps it: its lines, encoded.
struct Spilled {
    seq: u64,
    subject: String,
    lines: Vec<Bytes>,
}

mod spill {
    //! The spill file of an incremental export: one record per version,
    //! `seq u64 | subject length u16 | lines u32 | line bytes u32 |
    //! subject | end of each line u32 ... | lines`, little-endian. An
    //! unnamed temporary file (in `TMPDIR`): it disappears when closed,
    //! also after a crash.

    use std::io::{Read, Seek};

    use bytes::BytesMut;
    use tokio::io::{AsyncSeekExt, AsyncWriteExt};

    use super::{Lines, ReplayError, Spilled};

    const BUFFER: usize = 1 << 20;
    /// Bytes of a record before its subject.
    const HEAD: usize = 8 + 2 + 4 + 4;

    fn io(e: std::io::Error) -> ReplayError {
        ReplayError::Spill(e.to_string())
    }

    fn too_large() -> ReplayError {
        ReplayError::Spill("a version's lines are too large to spill".into())
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
            lines: &Lines,
        ) -> Result<(), ReplayError> {
            let subject_len = u16::try_from(subject.len())
                .map_err(|_| ReplayError::Spill("a subject is too long".into()))?;
            let count = u32::try_from(lines.len()).map_err(|_| too_large())?;
            let mut total = 0u32;
            self.buf.extend_from_slice(&seq.to_le_bytes());
            self.buf.extend_from_slice(&subject_len.to_le_bytes());
            self.buf.extend_from_slice(&count.to_le_bytes());
            let total_at = self.buf.len();
            self.buf.extend_from_slice(&total.to_le_bytes());
            self.buf.extend_from_slice(subject.as_bytes());
            for line in lines.iter() {
                total = u32::try_from(line.len())
                    .ok()
                    .and_then(|n| total.checked_add(n))
                    .ok_or_else(too_large)?;
                self.buf.extend_from_slice(&total.to_le_bytes());
            }
            self.buf[total_at..total_at + 4].copy_from_slice(&total.to_le_bytes());
            for line in lines.iter() {
                self.buf.extend_from_slice(line);
            }
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

    /// The versions of several spill files, one file after the other.
    pub struct Versions {
        files: std::vec::IntoIter<Reader>,
        current: Option<Reader>,
    }

    impl Versions {
        pub fn new(files: Vec<Reader>) -> Versions {
            Versions {
                files: files.into_iter(),
                current: None,
            }
        }

        pub async fn next(&mut self) -> Result<Option<Spilled>, ReplayError> {
            loop {
                if let Some(reader) = &mut self.current {
                    if let Some(v) = reader.next().await? {
                        return Ok(Some(v));
                    }
                }
                match self.files.next() {
                    Some(r) => self.current = Some(r),
                    None => return Ok(None),
                }
            }
        }
    }

    pub fn damaged() -> ReplayError {
        ReplayError::Spill("the spill file is damaged".into())
    }

    fn u32_at(b: &[u8], at: usize) -> usize {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
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

        /// Back to the first record.
        pub fn rewind(&mut self) -> Result<(), ReplayError> {
            let file = self
                .file
                .as_mut()
                .ok_or_else(|| ReplayError::Spill("the spill file is closed".into()))?;
            file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
            self.buf.clear();
            self.eof = false;
            Ok(())
        }

        pub async fn next(&mut self) -> Result<Option<Spilled>, ReplayError> {
            if !self.fill(HEAD).await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(damaged())
                };
            }
            let subject_len = u16::from_le_bytes([self.buf[8], self.buf[9]]) as usize;
            let count = u32_at(&self.buf, 10);
            let total = u32_at(&self.buf, 14);
            let ends_at = HEAD + subject_len;
            let body_at = ends_at + 4 * count;
            if !self.fill(body_at + total).await? {
                return Err(damaged());
            }
            let record = self.buf.split_to(body_at + total).freeze();
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&record[..8]);
            let subject = std::str::from_utf8(&record[HEAD..ends_at])
                .map_err(|_| damaged())?
                .to_owned();
            let mut lines = Vec::with_capacity(count);
            let mut start = 0;
            for i in 0..count {
                let end = u32_at(&record, ends_at + 4 * i);
                if end < start || end > total {
                    return Err(damaged());
                }
                lines.push(record.slice(body_at + start..body_at + end));
                start = end;
            }
            Ok(Some(Spilled {
                seq: u64::from_le_bytes(seq),
                subject,
                lines,
            }))
        }
    }
}

/// Bits of each of the two filters of [`Repeats`]: 2 MiB each.
const FILTER_BITS: u64 = 1 << 24;
/// A subject's bits all lie in one block of this many 64-bit words (a
/// cache line), so a look-up touches one line, not three.
const BLOCK_WORDS: usize = 8;

/// Which subjects occur more than once in a window, approximately and in
/// fixed memory: two Bloom filters, of subjects seen and of subjects seen
/// again. A subject not in the second occurs once (no false negatives); one
/// in it may be checked for nothing (false positives, rare below a few
/// million changes, then more checks, never wrong rows). Each filter is
/// blocked: a subject's three bits are in one cache line of it.
struct Repeats {
    seen: Vec<u64>,
    again: Vec<u64>,
}

/// Where a subject's bits are: the first word of its block, and the bit
/// of each of three words of the block.
#[derive(Clone, Copy)]
struct Bits {
    block: usize,
    words: [(usize, u64); 3],
}

impl Repeats {
    fn new() -> Repeats {
        let words = (FILTER_BITS / 64) as usize;
        Repeats {
            seen: vec![0; words],
            again: vec![0; words],
        }
    }

    fn bits(subject: &str) -> Bits {
        use std::hash::BuildHasher;
        let h = foldhash::quality::FixedState::with_seed(0x6d65_7465_726c_696e).hash_one(subject);
        let blocks = FILTER_BITS as usize / 64 / BLOCK_WORDS;
        // The high bits pick the block, 9 bits each a word and its bit.
        let block = ((h >> 32) as usize % blocks) * BLOCK_WORDS;
        let words = [0u32, 9, 18].map(|shift| {
            let b = (h >> shift) as usize & 511;
            (b / 64, 1u64 << (b % 64))
        });
        Bits { block, words }
    }

    fn contains(filter: &[u64], bits: Bits) -> bool {
        let block = &filter[bits.block..bits.block + BLOCK_WORDS];
        bits.words.iter().all(|&(w, bit)| block[w] & bit != 0)
    }

    /// Adds `subject`; whether it may have been seen before.
    fn insert(&mut self, subject: &str) -> bool {
        let bits = Self::bits(subject);
        let again = Self::contains(&self.seen, bits);
        let filter = if again {
            &mut self.again
        } else {
            &mut self.seen
        };
        let block = &mut filter[bits.block..bits.block + BLOCK_WORDS];
        for (w, bit) in bits.words {
            block[w] |= bit;
        }
        again
    }

    /// The repeats of two parts of a window: a subject is repeated if it
    /// is in either, or seen in both.
    fn union(mut self, other: Repeats) -> Repeats {
        for i in 0..self.seen.len() {
            self.again[i] |= other.again[i] | (self.seen[i] & other.seen[i]);
            self.seen[i] |= other.seen[i];
        }
        self
    }

    fn maybe_repeated(&self, subject: &str) -> bool {
        Self::contains(&self.again, Self::bits(subject))
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

    /// Accounts whose subjects set every bit of `acct-x`'s (found by
    /// search): the filter takes `acct-x` for a repeat after them. The
    /// replay test of a false positive stores exactly these.
    const FALSE_POSITIVE: [&str; 4] = ["acct-8130509", "acct-9436799", "acct-21518302", "acct-x"];

    #[test]
    fn a_full_filter_can_take_a_new_subject_for_a_repeat() {
        let mut r = Repeats::new();
        let subject = |id: &str| format!("ent.org1.account.{id}");
        let (others, x) = FALSE_POSITIVE.split_at(3);
        for id in others {
            assert!(!r.insert(&subject(id)), "{id} is new");
        }
        assert!(
            r.insert(&subject(x[0])),
            "acct-x is no longer a false positive: search for accounts whose bits cover it again"
        );
    }

    #[test]
    fn the_union_of_two_parts_knows_subjects_seen_once_in_each() {
        let (mut a, mut b) = (Repeats::new(), Repeats::new());
        a.insert("ent.o.account.both");
        b.insert("ent.o.account.both");
        a.insert("ent.o.account.twice");
        a.insert("ent.o.account.twice");
        a.insert("ent.o.account.once");
        let u = a.union(b);
        assert!(u.maybe_repeated("ent.o.account.both"));
        assert!(u.maybe_repeated("ent.o.account.twice"));
        assert!(!u.maybe_repeated("ent.o.account.once"));
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
