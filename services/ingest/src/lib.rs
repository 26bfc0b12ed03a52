//! The ingest service: usage measurements at bus speed.
//!
//! Owns the submit path (`svc.ingest.<org>.submit`, and through the gateway
//! `POST /organizations/{orgId}/measurements`): validation against the
//! org's meters (kept current by watching `ENTITIES`), exact 35-day
//! de-duplication by uid across restarts and replicas ([`uids`]), durable
//! grouped writes to `MEASUREMENTS` acknowledged only after JetStream
//! acknowledged them ([`commit`]), and an `ingest.validation.failure` event
//! on `EVENTS` for each rejected measurement. Measurement files uploaded
//! through the gateway become upload jobs whose rows go through the same
//! submit path ([`uploads`]).
//!
//! It does not aggregate or price usage: downstream readers consume
//! `usage.<org>.<meter>` (MessagePack groups, every measurement with its uid).

pub mod batch;
pub mod commit;
pub mod meters;
pub mod model;
pub mod uids;
pub mod uploads;
pub mod wire;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::push, stream::DirectGetErrorKind};
use async_nats::service::ServiceExt;
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use meterline_shared::codec::Codec;
use meterline_shared::envelope::{EntityEvent, HEADER_EVENT_NAME};
use meterline_shared::settings::NatsSettings;
use meterline_shared::shutdown::CancellationToken;
use meterline_shared::{admin, bus, provision, serve, subjects, ServiceError};

use crate::commit::{Committer, Item};
use crate::meters::{Failure, Meter, Meters};
use crate::model::{ErrorType, Marker, Rejection, SubmitReply, SubmitRequest, MAX_BATCH};
use crate::uids::{fingerprint, UidIndex};

pub const SERVICE_NAME: &str = "ingest";
/// m3ter's limit on one submit body.
pub const MAX_BODY_BYTES: usize = 512_000;
pub const FAILURE_EVENT: &str = "ingest.validation.failure";

/// Settings of the ingest service (`METERLINE_INGEST_*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Bus connection (`METERLINE_NATS_*`).
    pub nats: NatsSettings,
    /// Admin HTTP port: `/healthz`, `/readyz`, `/metrics`.
    pub admin_addr: SocketAddr,
    /// How long `MEASUREMENTS` keeps accepted usage, in days (at least 35:
    /// uids are remembered for 35 days from the same stream).
    pub retention_days: u64,
    /// Submit requests handled at once by one replica.
    pub max_in_flight: usize,
    /// Measurement file uploads.
    pub uploads: uploads::Settings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            nats: NatsSettings::default(),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 9102)),
            retention_days: 35,
            max_in_flight: 512,
            uploads: uploads::Settings::default(),
        }
    }
}

impl Settings {
    pub fn for_tests(nats_url: &str) -> Settings {
        Settings {
            nats: NatsSettings {
                url: nats_url.to_owned(),
                ..Default::default()
            },
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..Default::default()
        }
    }
}

/// The submit logic, independent of transport.
#[derive(Clone)]
pub struct Ingest {
    js: jetstream::Context,
    entities: jetstream::stream::Stream,
    meters: Arc<Meters>,
    index: Arc<UidIndex>,
    committer: Committer,
}

fn new_uid() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn bad(message: impl Into<String>) -> ServiceError {
    ServiceError::bad_request(message)
}

impl Ingest {
    pub fn index(&self) -> &UidIndex {
        &self.index
    }

    /// The meter `code` names; `known` holds those of this request so far
    /// (a request names few meters: a list beats a map).
    fn meter(
        &self,
        org: &str,
        code: &str,
        known: &mut Vec<(String, Option<Arc<Meter>>)>,
    ) -> Option<Arc<Meter>> {
        if let Some((_, m)) = known.iter().find(|(c, _)| c == code) {
            return m.clone();
        }
        let m = self.meters.get(org, code);
        known.push((code.to_owned(), m.clone()));
        m
    }

    /// Makes sure meters written before now are known, when a measurement
    /// names one this replica has not seen.
    async fn catch_up_meters(&self, org: &str) {
        let last = match self
            .entities
            .direct_get_last_for_subject(format!("ent.{org}.meter.*"))
            .await
        {
            Ok(m) => m.sequence,
            Err(_) => return,
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), self.meters.wait_for(last)).await;
    }

    /// Validates, de-duplicates and stores one batch.
    pub async fn submit(&self, org: &str, body: &[u8]) -> Result<SubmitReply, ServiceError> {
        subjects::validate_token("orgId", org)?;
        if body.len() > MAX_BODY_BYTES {
            return Err(ServiceError::new(
                meterline_shared::ErrorCode::PayloadTooLarge,
                format!("a measurements request may be at most {MAX_BODY_BYTES} bytes"),
            ));
        }
        let (items, failures, rejected) = match self.check_fast(org, body) {
            Some(items) => (items, Vec::new(), Vec::new()),
            None => self.check(org, body).await?,
        };
        let outcome = self.committer.commit(org, items).await?;
        self.publish_failures(org, &rejected, &failures).await?;
        metrics::counter!("meterline_ingest_measurements_total", "outcome" => "accepted")
            .increment(outcome.accepted.len() as u64);
        metrics::counter!("meterline_ingest_measurements_total", "outcome" => "duplicate")
            .increment(outcome.duplicates.len() as u64);
        metrics::counter!("meterline_ingest_measurements_total", "outcome" => "rejected")
            .increment(failures.len() as u64);
        Ok(SubmitReply {
            result: "accepted".into(),
            accepted: outcome.accepted.len(),
            duplicates: outcome.duplicates.len(),
            rejected: failures.len(),
            errors: failures
                .into_iter()
                .zip(&rejected)
                .map(|((index, f), raw)| Rejection {
                    index,
                    uid: raw.get("uid").and_then(Value::as_str).map(str::to_owned),
                    error_type: f.error_type,
                    message: f.message,
                })
                .collect(),
        })
    }

    /// The common case in one pass over the body: every measurement is
    /// well-formed, names a known meter, is valid and has a uid of its own
    /// in this request. `None` when anything is off: then [`Ingest::check`]
    /// reads the request again to find each problem.
    fn check_fast(&self, org: &str, body: &[u8]) -> Option<Vec<Item>> {
        let mut encoded: Vec<u8> = Vec::with_capacity(body.len());
        let mut known: Vec<(String, Option<Arc<Meter>>)> = Vec::new();
        // A measurement takes at least 40 bytes of JSON.
        let mut valid = Vec::with_capacity((body.len() / 40).clamp(1, MAX_BATCH));
        // Each measurement is validated and encoded as it is read, and not
        // kept: no array of a thousand parsed measurements per request.
        let n = wire::for_each_measurement(body, |w| {
            if valid.len() == MAX_BATCH {
                return false;
            }
            match meters::validate_wire(
                &w,
                |code| self.meter(org, code, &mut known),
                new_uid,
                &mut encoded,
            ) {
                Ok(v) => {
                    valid.push(v);
                    true
                }
                Err(_) => false,
            }
        })?;
        if n == 0 {
            return None;
        }
        let mut seen: HashSet<&str, foldhash::fast::RandomState> =
            HashSet::with_capacity_and_hasher(n, Default::default());
        if !valid
            .iter()
            .all(|v| v.generated_uid || seen.insert(v.uid.as_str()))
        {
            return None;
        }
        drop(seen);
        let encoded = Bytes::from(encoded);
        Some(
            valid
                .into_iter()
                .enumerate()
                .map(|(index, v)| Item {
                    index,
                    encoded: encoded.slice(v.encoded),
                    uid: v.uid,
                    generated_uid: v.generated_uid,
                    meter: v.meter,
                })
                .collect(),
        )
    }

    /// Reads a request measurement by measurement: the valid ones to store,
    /// and each refused one with its reason and as it was sent.
    #[allow(clippy::type_complexity)]
    async fn check(
        &self,
        org: &str,
        body: &[u8],
    ) -> Result<(Vec<Item>, Vec<(usize, Failure)>, Vec<Value>), ServiceError> {
        let req: SubmitRequest = serde_json::from_slice(body).map_err(|e| {
            use serde_json::error::Category;
            if body.iter().all(u8::is_ascii_whitespace) {
                bad("request body is empty; expected {\"measurements\": [...]}")
            } else if matches!(e.classify(), Category::Syntax | Category::Eof) {
                bad(format!("malformed JSON: {e}"))
            } else {
                bad(format!("the body must be {{\"measurements\": [...]}}: {e}"))
            }
        })?;
        let n = req.measurements.len();
        if n == 0 || n > MAX_BATCH {
            return Err(bad(format!(
                "measurements must hold 1 to {MAX_BATCH} measurements, not {n}"
            )));
        }
        let mut valid: Vec<(usize, meters::Valid)> = Vec::with_capacity(n);
        let mut failures: Vec<(usize, Failure)> = Vec::new();
        // Every valid measurement's MessagePack encoding, one after another.
        let mut encoded: Vec<u8> = Vec::with_capacity(body.len());
        // Meters looked up once per request; an unknown one once more after
        // catching up with meters written moments ago.
        let mut known: Vec<(String, Option<Arc<Meter>>)> = Vec::new();
        let mut caught_up = false;
        for (index, raw) in req.measurements.iter().enumerate() {
            let mut result = meters::validate_raw(
                raw,
                |code| self.meter(org, code, &mut known),
                new_uid,
                &mut encoded,
            );
            if matches!(&result, Err(f) if f.error_type == ErrorType::UndefinedMeter) && !caught_up
            {
                caught_up = true;
                self.catch_up_meters(org).await;
                known.retain(|(_, m)| m.is_some());
                result = meters::validate_raw(
                    raw,
                    |code| self.meter(org, code, &mut known),
                    new_uid,
                    &mut encoded,
                );
            }
            match result {
                Ok(v) => valid.push((index, v)),
                Err(f) => failures.push((index, f)),
            }
        }
        // A uid twice in one request: the first stands, the others are
        // rejected.
        let mut first: HashSet<&str, foldhash::fast::RandomState> =
            HashSet::with_capacity_and_hasher(valid.len(), Default::default());
        let mut repeated = vec![false; valid.len()];
        for (pos, (_, v)) in valid.iter().enumerate() {
            if !v.generated_uid && !first.insert(v.uid.as_str()) {
                repeated[pos] = true;
            }
        }
        drop(first);
        let encoded = Bytes::from(encoded);
        let mut items = Vec::with_capacity(valid.len());
        for ((index, v), repeated) in valid.into_iter().zip(repeated) {
            if repeated {
                failures.push((
                    index,
                    Failure {
                        error_type: ErrorType::DuplicateUid,
                        message: format!("uid {:?} appears more than once in this request", v.uid),
                    },
                ));
            } else {
                items.push(Item {
                    index,
                    encoded: encoded.slice(v.encoded),
                    uid: v.uid,
                    generated_uid: v.generated_uid,
                    meter: v.meter,
                });
            }
        }
        failures.sort_by_key(|(index, _)| *index);
        // Refused measurements as sent, for their events and the reply.
        let rejected: Vec<Value> = failures
            .iter()
            .map(|(index, _)| {
                let raw = req.measurements[*index].get();
                serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()))
            })
            .collect();
        Ok((items, failures, rejected))
    }

    /// One `ingest.validation.failure` event per rejected measurement, with
    /// the measurement as sent (`raw`, in the order of `failures`). The message id makes a retried request's
    /// events de-duplicate within the stream's window.
    async fn publish_failures(
        &self,
        org: &str,
        raw: &[Value],
        failures: &[(usize, Failure)],
    ) -> Result<(), ServiceError> {
        if failures.is_empty() {
            return Ok(());
        }
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut acks = Vec::with_capacity(failures.len());
        for ((_, f), measurement) in failures.iter().zip(raw) {
            let event = json!({
                "id": uuid::Uuid::now_v7().to_string(),
                "eventName": FAILURE_EVENT,
                "eventTime": now,
                "orgId": org,
                "errorType": f.error_type,
                "message": f.message,
                "measurement": measurement,
            });
            let digest = Sha256::digest(
                format!("{org}\u{0}{measurement}\u{0}{:?}", f.error_type).as_bytes(),
            );
            let msg_id: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
            let mut headers = Codec::Json.headers();
            headers.insert(HEADER_EVENT_NAME, FAILURE_EVENT);
            headers.insert("Nats-Msg-Id", msg_id.as_str());
            let publish = jetstream::message::PublishMessage::build()
                .payload(Bytes::from(
                    serde_json::to_vec(&event).map_err(ServiceError::internal)?,
                ))
                .headers(headers);
            let ack = self
                .js
                .send_publish(subjects::event(org, FAILURE_EVENT), publish)
                .await
                .map_err(|e| {
                    ServiceError::unavailable(format!("storing a failure event failed: {e}"))
                })?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| {
                ServiceError::unavailable(format!("storing a failure event failed: {e}"))
            })?;
        }
        Ok(())
    }
}

pub struct App {
    client: async_nats::Client,
    ingest: Ingest,
    settings: Settings,
    admin_listener: Option<tokio::net::TcpListener>,
    admin_addr: SocketAddr,
    service: async_nats::service::Service,
    endpoint: async_nats::service::endpoint::Endpoint,
    uploads: uploads::Uploads,
    upload_endpoint: async_nats::service::endpoint::Endpoint,
}

impl App {
    /// Connects, provisions `MEASUREMENTS` (and the streams it relies on),
    /// registers the submit endpoint and binds the admin port.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        anyhow::ensure!(
            settings.retention_days >= provision::MIN_MEASUREMENT_RETENTION_DAYS,
            "retention_days must be at least {} (uids are remembered for 35 days)",
            provision::MIN_MEASUREMENT_RETENTION_DAYS
        );
        let client = bus::connect(&settings.nats, SERVICE_NAME).await?;
        let js = jetstream::new(client.clone());
        let replicas = settings.nats.stream_replicas.max(1);
        provision::ensure_core(&js, replicas).await?;
        provision::ensure_streams(
            &js,
            replicas,
            [provision::measurements(settings.retention_days)],
        )
        .await?;
        let measurements = js.get_stream(subjects::MEASUREMENTS_STREAM).await?;
        let entities = js.get_stream(subjects::ENTITIES_STREAM).await?;
        let index = Arc::new(UidIndex::default());
        let committer = Committer::new(client.clone(), measurements, index.clone());
        let ingest = Ingest {
            js,
            entities,
            meters: Arc::new(Meters::default()),
            index,
            committer,
        };
        let admin_listener = tokio::net::TcpListener::bind(settings.admin_addr).await?;
        let admin_addr = admin_listener.local_addr()?;
        let service = client
            .service_builder()
            .description("Meterline ingest: usage measurements")
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| anyhow::anyhow!("starting the micro service failed: {e}"))?;
        let endpoint = service
            .endpoint_builder()
            .name("submit")
            .add("svc.ingest.*.submit")
            .await
            .map_err(|e| anyhow::anyhow!("adding endpoint submit: {e}"))?;
        let uploads =
            uploads::Uploads::provision(ingest.clone(), &settings.uploads, replicas).await?;
        let upload_endpoint = service
            .endpoint_builder()
            .name("upload")
            .add("svc.ingest.*.upload.*")
            .await
            .map_err(|e| anyhow::anyhow!("adding endpoint upload: {e}"))?;
        // Once the server has the subscription, a request sent after
        // `App::build` finds a responder.
        bus::round_trip(&client).await?;
        Ok(App {
            client,
            ingest,
            settings,
            admin_listener: Some(admin_listener),
            admin_addr,
            service,
            endpoint,
            uploads,
            upload_endpoint,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn ingest(&self) -> &Ingest {
        &self.ingest
    }

    pub fn uploads(&self) -> &uploads::Uploads {
        &self.uploads
    }

    /// Serves until `shutdown`; then finishes in-flight requests under a
    /// deadline and drains the NATS client.
    pub async fn run_until_stopped(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let js = self.ingest.js.clone();
        let measurements = js.get_stream(subjects::MEASUREMENTS_STREAM).await?;
        let initial_markers = last_seq_of(&measurements, "uidx.>").await;
        let index = self.ingest.index.clone();
        let replays = [
            tokio::spawn(replay_meters(
                self.ingest.entities.clone(),
                self.ingest.meters.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(replay_markers(
                measurements,
                index.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(expire_daily(index.clone(), shutdown.clone())),
        ];
        let ready_client = self.client.clone();
        let markers_seen = Arc::new(std::sync::atomic::AtomicBool::new(initial_markers == 0));
        {
            let seen = markers_seen.clone();
            let index = index.clone();
            let stop = shutdown.clone();
            let stream = js.get_stream(subjects::MEASUREMENTS_STREAM).await?;
            tokio::spawn(async move {
                // Ready once every marker that existed at start is applied.
                let key_of = |subject: &str| subject.strip_prefix("uidx.").map(str::to_owned);
                if let Ok(m) = stream.direct_get_last_for_subject("uidx.>").await {
                    if let Some(key) = key_of(&m.subject) {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = index.wait_for(&key, m.sequence) => {}
                        }
                    }
                }
                seen.store(true, std::sync::atomic::Ordering::Relaxed);
            });
        }
        let ready: admin::Readiness = Arc::new(move || {
            ready_client.connection_state() == async_nats::connection::State::Connected
                && markers_seen.load(std::sync::atomic::Ordering::Relaxed)
        });
        if let Some(listener) = self.admin_listener.take() {
            let app = admin::router(ready);
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
            });
        }
        let uploads = tokio::spawn(uploads::run(
            self.uploads.clone(),
            self.upload_endpoint,
            shutdown.clone(),
        ));
        tracing::info!(admin = %self.admin_addr, "ingest service ready");
        let ingest = self.ingest.clone();
        let handler = move |msg: async_nats::Message| {
            let ingest = ingest.clone();
            async move { handle(&ingest, &msg).await }
        };
        serve::serve(
            self.endpoint,
            self.settings.max_in_flight,
            shutdown.clone(),
            handler,
        )
        .await?;
        let _ = self.service.stop().await;
        // Upload processing stops with the same token and leaves unfinished
        // jobs to be resumed.
        let _ = uploads.await;
        for r in replays {
            r.abort();
        }
        let _ = self.client.drain().await;
        Ok(())
    }
}

async fn handle(ingest: &Ingest, msg: &async_nats::Message) -> Result<Bytes, ServiceError> {
    let org = msg
        .subject
        .as_str()
        .strip_prefix("svc.ingest.")
        .and_then(|s| s.strip_suffix(".submit"))
        .ok_or_else(|| bad(format!("unexpected subject {}", msg.subject)))?;
    let reply = ingest.submit(org, &msg.payload).await?;
    serde_json::to_vec(&reply)
        .map(Bytes::from)
        .map_err(ServiceError::internal)
}

async fn last_seq_of(stream: &jetstream::stream::Stream, filter: &str) -> u64 {
    match stream.direct_get_last_for_subject(filter).await {
        Ok(m) => m.sequence,
        Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => 0,
        Err(_) => 0,
    }
}

/// Replays meter entities from `ENTITIES` into the catalog, then follows.
async fn replay_meters(
    stream: jetstream::stream::Stream,
    meters: Arc<Meters>,
    shutdown: CancellationToken,
) {
    follow(
        stream,
        "ent.*.meter.*",
        shutdown,
        move |seq, payload, _| match serde_json::from_slice::<EntityEvent>(payload) {
            Ok(ev) => meters.apply(seq, &ev),
            Err(e) => tracing::warn!(seq, error = %e, "skipping undecodable meter event"),
        },
    )
    .await;
}

/// Replays uid commit markers from `MEASUREMENTS` into the index, then follows.
async fn replay_markers(
    stream: jetstream::stream::Stream,
    index: Arc<UidIndex>,
    shutdown: CancellationToken,
) {
    follow(stream, "uidx.>", shutdown, move |seq, payload, subject| {
        // `uidx.<org>.<partition>`: the index key is `<org>.<partition>`.
        let Some(key) = subject.strip_prefix("uidx.") else {
            return;
        };
        let Some((org, _)) = key.rsplit_once('.') else {
            return;
        };
        // This replica's own commits are applied when acknowledged; their
        // markers coming back need no decoding.
        if index.has_marker(key, seq) {
            return;
        }
        match rmp_serde::from_slice::<Marker>(payload) {
            Ok(m) => index.apply(key, seq, m.day, m.uids.iter().map(|u| fingerprint(org, u))),
            Err(e) => tracing::warn!(seq, error = %e, "skipping undecodable uid marker"),
        }
    })
    .await;
}

/// Runs an ordered consumer over `filter` from the start of `stream`,
/// resuming after the last applied sequence if it is interrupted.
async fn follow(
    stream: jetstream::stream::Stream,
    filter: &'static str,
    shutdown: CancellationToken,
    apply: impl Fn(u64, &[u8], &str) + Send + 'static,
) {
    let mut next = 1;
    loop {
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: format!("_INBOX.ingest-replay.{}", uuid::Uuid::new_v4().simple()),
                filter_subject: filter.to_owned(),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: next,
                },
                ..Default::default()
            })
            .await;
        let messages = match consumer {
            Ok(c) => c.messages().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = &messages {
            tracing::warn!(filter, error = %e, "replay consumer failed");
        }
        if let Ok(mut messages) = messages {
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = messages.next() => m,
                };
                let Some(Ok(msg)) = msg else { break };
                let Ok(seq) = msg.info().map(|i| i.stream_sequence) else {
                    break;
                };
                apply(seq, &msg.payload, msg.subject.as_str());
                next = seq + 1;
            }
        }
        tracing::warn!(filter, "replay interrupted; resuming");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Forgets uids older than the window, once a day.
async fn expire_daily(index: Arc<UidIndex>, shutdown: CancellationToken) {
    loop {
        let today = (Utc::now().timestamp().div_euclid(86_400)) as u32;
        let dropped = index.expire(today);
        if dropped > 0 {
            tracing::info!(dropped, "expired uids older than 35 days");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}
