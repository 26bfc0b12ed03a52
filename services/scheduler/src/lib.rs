//! The scheduler service: export schedules become export job requests, and
//! scheduled event configurations become Events.
//!
//! It learns every organization's export schedules, destinations, scheduled
//! event configurations and dated entities by watching `ENTITIES` (the last
//! message of each entity at start, then every change; schedules and dated
//! entities in two reads, so jobs never wait for millions of bills): no
//! polling, and no second copy to drift. For each slot of each schedule it writes a
//! `PENDING` record to `export_jobs` and publishes an
//! [`ExportJobRequest`](meterline_shared::exportjob::ExportJobRequest) on
//! `JOBS` with the job id as message id ([`jobs`]); when a slot is due is
//! decided by [`schedules`], and scheduled events by [`events`]. Any number
//! of replicas may run: each requests every slot, and the job id (derived
//! from schedule and slot), the record's create and the stream's duplicate
//! window make one job of it.
//!
//! Time comes from a [`clock::Clock`], so tests drive days of schedule in
//! milliseconds. It does not run jobs: the exporter consumes `JOBS`.

pub mod clock;
pub mod events;
pub mod jobs;
pub mod schedules;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::push, consumer::DeliverPolicy};
use axum::{routing::get, Json, Router};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::task::TaskTracker;

use meterline_shared::envelope::EntityEvent;
use meterline_shared::settings::NatsSettings;
use meterline_shared::shutdown::{CancellationToken, DRAIN_DEADLINE};
use meterline_shared::{admin, bus, provision, subjects};

use crate::clock::{Clock, SystemClock};
use crate::events::{Due, Emitter, ScheduledEvents};
use crate::jobs::JobWriter;
use crate::schedules::{Fire, Refusal, Schedules, DESTINATION_TYPE, SCHEDULE_TYPE};

pub const SERVICE_NAME: &str = "scheduler";

/// Settings of the scheduler (`METERLINE_SCHEDULER_*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Bus connection (`METERLINE_NATS_*`).
    pub nats: NatsSettings,
    /// Admin HTTP port: `/healthz`, `/readyz` (ready once the schedules,
    /// destinations and scheduled event configurations on `ENTITIES` at start
    /// are read), `/metrics`, and `/refused` (the
    /// schedules and scheduled event configurations it does not run, and
    /// why, as JSON).
    pub admin_addr: SocketAddr,
    /// Job requests and scheduled events written at once by one replica.
    pub max_in_flight: usize,
    /// How long to wait before writing a job or event again after the bus
    /// refused it, in milliseconds (doubling up to 30 s).
    pub retry_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            nats: NatsSettings::default(),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 9103)),
            max_in_flight: 64,
            retry_ms: 500,
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
            retry_ms: 50,
            ..Default::default()
        }
    }
}

/// What the admin port shows of a running scheduler.
#[derive(Default)]
struct Status {
    ready: std::sync::atomic::AtomicBool,
    refused: Mutex<Vec<Refusal>>,
}

pub struct App {
    client: async_nats::Client,
    settings: Settings,
    clock: Arc<dyn Clock>,
    entities: jetstream::stream::Stream,
    writer: JobWriter,
    emitter: Emitter,
    admin_listener: Option<tokio::net::TcpListener>,
    admin_addr: SocketAddr,
    status: Arc<Status>,
}

impl App {
    /// Connects, provisions `JOBS`, `export_jobs` and `scheduled_events`
    /// (and the core streams), and binds the admin port. Runs on the wall
    /// clock.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        App::build_with_clock(settings, Arc::new(SystemClock)).await
    }

    /// As [`App::build`], with time from `clock`.
    pub async fn build_with_clock(
        settings: Settings,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<App> {
        anyhow::ensure!(
            settings.max_in_flight > 0,
            "max_in_flight must be at least 1"
        );
        let client = bus::connect(&settings.nats, SERVICE_NAME).await?;
        let js = jetstream::new(client.clone());
        let replicas = settings.nats.stream_replicas.max(1);
        provision::ensure_core(&js, replicas).await?;
        provision::ensure_streams(&js, replicas, [provision::jobs()]).await?;
        let job_records =
            provision::ensure_kv(&js, provision::export_jobs_bucket(replicas)).await?;
        let emitted = events::provision(&js, replicas).await?;
        let entities = js.get_stream(subjects::ENTITIES_STREAM).await?;
        let writer = JobWriter::new(js.clone(), job_records, clock.clone());
        let emitter = Emitter::new(js, entities.clone(), emitted);
        let admin_listener = tokio::net::TcpListener::bind(settings.admin_addr).await?;
        let admin_addr = admin_listener.local_addr()?;
        Ok(App {
            client,
            settings,
            clock,
            entities,
            writer,
            emitter,
            admin_listener: Some(admin_listener),
            admin_addr,
            status: Arc::new(Status::default()),
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Runs until `shutdown`: reads `ENTITIES`, then requests jobs and emits
    /// events as their time comes. On shutdown, writes in flight finish
    /// under a deadline; anything cut short is requested again by the next
    /// start (a pending record is published again, a missed slot caught up).
    pub async fn run_until_stopped(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ready_client = self.client.clone();
        let status = self.status.clone();
        let ready: admin::Readiness = Arc::new(move || {
            ready_client.connection_state() == async_nats::connection::State::Connected
                && status.ready.load(std::sync::atomic::Ordering::Relaxed)
        });
        if let Some(listener) = self.admin_listener.take() {
            let status = self.status.clone();
            let app = admin::router(ready).merge(Router::new().route(
                "/refused",
                get(move || {
                    let status = status.clone();
                    async move {
                        Json(
                            status
                                .refused
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .clone(),
                        )
                    }
                }),
            ));
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
            });
        }
        let (tx, rx) = mpsc::channel(1024);
        let watchers = [Part::Config, Part::Dates].map(|part| {
            tokio::spawn(watch_entities(
                self.entities.clone(),
                part,
                tx.clone(),
                shutdown.clone(),
            ))
        });
        drop(tx);
        tracing::info!(admin = %self.admin_addr, "scheduler started; reading ENTITIES");
        let engine = Engine {
            clock: self.clock.clone(),
            schedules: Schedules::default(),
            events: ScheduledEvents::default(),
            writer: self.writer.clone(),
            emitter: self.emitter.clone(),
            status: self.status.clone(),
            permits: Arc::new(Semaphore::new(self.settings.max_in_flight)),
            tasks: TaskTracker::new(),
            retry: Duration::from_millis(self.settings.retry_ms.max(1)),
            shutdown: shutdown.clone(),
        };
        let result = engine.run(rx).await;
        for w in watchers {
            w.abort();
        }
        let _ = self.client.drain().await;
        result
    }
}

/// The two reads of `ENTITIES`: the configuration (schedules,
/// destinations, scheduled event configurations), which is small and gates
/// the jobs, and the dated entities (accounts, bills, ...), which may be
/// large and only scheduled events need. Jobs do not wait for bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Config,
    Dates,
}

impl Part {
    fn filters(self) -> Vec<String> {
        match self {
            Part::Config => [SCHEDULE_TYPE, DESTINATION_TYPE, events::CONFIG_TYPE]
                .iter()
                .map(|t| format!("ent.*.{t}.*"))
                .collect(),
            Part::Dates => events::dated_types()
                .map(|t| format!("ent.*.{}.*", t.name))
                .collect(),
        }
    }
}

/// What the watchers of `ENTITIES` tell the engine.
enum Input {
    Entity(Box<EntityEvent>),
    /// Everything of this part that was in `ENTITIES` at start has been read.
    CaughtUp(Part),
}

/// Reads the last message of every entity of interest, says when it has
/// caught up, then follows. Resumes after the last message if the
/// consumer fails.
async fn watch_entities(
    stream: jetstream::stream::Stream,
    part: Part,
    tx: mpsc::Sender<Input>,
    shutdown: CancellationToken,
) {
    let mut next: Option<u64> = None;
    let mut caught_up = false;
    loop {
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: format!(
                    "_INBOX.scheduler-watch.{}",
                    uuid::Uuid::new_v4().simple()
                ),
                filter_subjects: part.filters(),
                deliver_policy: match next {
                    None => DeliverPolicy::LastPerSubject,
                    Some(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
                },
                ..Default::default()
            })
            .await;
        match consumer {
            Ok(mut consumer) => {
                let pending = consumer
                    .info()
                    .await
                    .map(|i| i.num_pending)
                    .unwrap_or(u64::MAX);
                if pending == 0 && !caught_up {
                    caught_up = true;
                    if tx.send(Input::CaughtUp(part)).await.is_err() {
                        return;
                    }
                }
                match consumer.messages().await {
                    Ok(mut messages) => loop {
                        let msg = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            m = messages.next() => m,
                        };
                        let Some(Ok(msg)) = msg else { break };
                        let Ok(info) = msg.info() else { break };
                        let (seq, left) = (info.stream_sequence, info.pending);
                        next = Some(seq + 1);
                        match serde_json::from_slice::<EntityEvent>(&msg.payload) {
                            Ok(ev) => {
                                if tx.send(Input::Entity(Box::new(ev))).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(seq, subject = %msg.subject, error = %e, "skipping undecodable entity message")
                            }
                        }
                        if left == 0 && !caught_up {
                            caught_up = true;
                            if tx.send(Input::CaughtUp(part)).await.is_err() {
                                return;
                            }
                        }
                    },
                    Err(e) => tracing::warn!(error = %e, "reading ENTITIES failed"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "watching ENTITIES failed"),
        }
        tracing::warn!("watch of ENTITIES interrupted; resuming");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The one task that owns the state: applies `ENTITIES`, wakes at the next
/// slot or event, and hands the writes to bounded tasks.
struct Engine {
    clock: Arc<dyn Clock>,
    schedules: Schedules,
    events: ScheduledEvents,
    writer: JobWriter,
    emitter: Emitter,
    status: Arc<Status>,
    permits: Arc<Semaphore>,
    tasks: TaskTracker,
    retry: Duration,
    shutdown: CancellationToken,
}

impl Engine {
    async fn run(mut self, mut rx: mpsc::Receiver<Input>) -> anyhow::Result<()> {
        let (failed_tx, mut failed_rx) = mpsc::unbounded_channel::<Due>();
        // Jobs start once the configuration is read; scheduled events once
        // the dated entities are read too.
        let mut live = false;
        let mut dates_read = false;
        let mut events_live = false;
        let mut dirty = false;
        loop {
            // Each queue is filled only once its part is live.
            let wake = [self.schedules.next_wake(), self.events.next_wake()]
                .into_iter()
                .flatten()
                .min();
            let clock = self.clock.clone();
            let sleep = async move {
                match wake {
                    Some(t) => clock.sleep_until(t).await,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                input = rx.recv() => match input {
                    None => break,
                    Some(Input::Entity(ev)) => {
                        let now = self.clock.now();
                        let fires = self.schedules.apply(&ev, now);
                        self.events.apply(&ev);
                        dirty |= matches!(ev.entity_type.as_str(), SCHEDULE_TYPE | DESTINATION_TYPE | events::CONFIG_TYPE);
                        self.request_all(fires);
                        // A steady stream of entity changes must not hold
                        // back due slots (this branch is polled first).
                        let due = self.schedules.due(now);
                        self.request_all(due);
                        if events_live {
                            self.emit_due(&failed_tx);
                        }
                    }
                    Some(Input::CaughtUp(Part::Config)) => {
                        let now = self.clock.now();
                        let fires = self.schedules.start(now);
                        live = true;
                        dirty = true;
                        tracing::info!(schedules = self.schedules.len(), owed = fires.len(), "schedules read from ENTITIES; scheduling");
                        self.request_all(fires);
                        self.status.ready.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    Some(Input::CaughtUp(Part::Dates)) => dates_read = true,
                },
                Some(due) = failed_rx.recv() => self.events.retry(&due),
                _ = sleep => {
                    let now = self.clock.now();
                    let fires = self.schedules.due(now);
                    self.request_all(fires);
                    self.emit_due(&failed_tx);
                }
            }
            if live && dates_read && !events_live {
                // Before any event is emitted: what was emitted before.
                for key in self.emitter.emitted_keys().await.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "reading emitted scheduled events failed");
                    Vec::new()
                }) {
                    self.events.remember(key);
                }
                self.events.start();
                events_live = true;
                tracing::info!("dated entities read from ENTITIES; scheduled events running");
                self.emit_due(&failed_tx);
            }
            if dirty && live && rx.is_empty() {
                dirty = false;
                let mut refused = self.schedules.refusals();
                refused.extend(self.events.refusals());
                metrics::gauge!("meterline_scheduler_refused").set(refused.len() as f64);
                metrics::gauge!("meterline_scheduler_schedules").set(self.schedules.len() as f64);
                *self
                    .status
                    .refused
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = refused;
            }
        }
        self.tasks.close();
        if tokio::time::timeout(DRAIN_DEADLINE, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "writes still in flight at the deadline; the next start requests them again"
            );
        }
        Ok(())
    }

    fn request_all(&self, fires: Vec<Fire>) {
        for fire in fires {
            let writer = self.writer.clone();
            let permits = self.permits.clone();
            let stop = self.shutdown.clone();
            let mut backoff = self.retry;
            self.tasks.spawn(async move {
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                loop {
                    match writer.request(&fire).await {
                        Ok(outcome) => {
                            tracing::debug!(org = %fire.org, schedule = %fire.schedule, slot = %fire.slot, ?outcome, "job requested");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(org = %fire.org, schedule = %fire.slot, error = %e, "requesting a job failed; retrying");
                        }
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            });
        }
    }

    fn emit_due(&mut self, failed: &mpsc::UnboundedSender<Due>) {
        let now: DateTime<Utc> = self.clock.now();
        for due in self.events.due(now) {
            let emitter = self.emitter.clone();
            let permits = self.permits.clone();
            let failed = failed.clone();
            let stop = self.shutdown.clone();
            let backoff = self.retry;
            self.tasks.spawn(async move {
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                if let Err(e) = emitter.emit(&due).await {
                    tracing::warn!(org = %due.org, event = %due.name, entity = %due.entity_id, error = %e, "emitting a scheduled event failed; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    let _ = failed.send(due);
                }
            });
        }
    }
}
