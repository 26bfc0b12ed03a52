//! The notifier service: events, notification rules and signed webhooks.
//!
//! Owns:
//! - the rules, webhooks and rule-to-webhook links, learnt by following
//!   `ENTITIES` ([`state`]), with each rule's calculation parsed once;
//! - firing: every event on `EVENTS` is checked against the rules on its
//!   name, and a rule that fires becomes one delivery per linked webhook on
//!   the `DELIVERIES` work queue ([`fire`]);
//! - delivery: a signed HTTP POST per Standard Webhooks ([`sign`]), at least
//!   once, retried on a schedule, then dead-lettered on `DEADLETTERS` with an
//!   `integration.webhook.error` event ([`deliver`]);
//! - the events API, `notifications/evaluate`, webhook activation and the
//!   dead letters, as requests on `svc.notifier.<org>.<op>` ([`api`]).
//!
//! It does not store rules or webhooks (the entities service does) and does
//! not speak HTTP to users (the gateway does). Webhook URLs are checked
//! against the egress policy (`meterline_shared::egress`) on every send,
//! after DNS resolution, and connections go only to the addresses checked.

pub mod api;
pub mod deliver;
pub mod fire;
pub mod sign;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::service::ServiceExt;
use serde::{Deserialize, Serialize};

use meterline_shared::egress::Egress;
use meterline_shared::seal::Sealer;
use meterline_shared::settings::{NatsSettings, Secret};
use meterline_shared::shutdown::CancellationToken;
use meterline_shared::{admin, bus, provision, serve, subjects};

use crate::state::State;

pub const SERVICE_NAME: &str = "notifier";

/// Settings of the notifier (`METERLINE_NOTIFIER_*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Bus connection (`METERLINE_NATS_*`).
    pub nats: NatsSettings,
    /// Admin HTTP port: `/healthz`, `/readyz`, `/metrics`.
    pub admin_addr: SocketAddr,
    /// The sealing key of the entities service (base64 of 32 bytes): opens
    /// webhook secrets to sign deliveries.
    pub sealing_key: Secret,
    /// Networks (CIDR, comma separated) webhooks may reach although they
    /// are loopback or private, e.g. `127.0.0.0/8,::1/128` for local
    /// development. Empty: public addresses only. Give the entities service
    /// the same list.
    pub webhook_allow_networks: String,
    /// Delays before each retry of a failed delivery, comma separated with
    /// units (`ms`, `s`, `m`, `h`, `d`). The default follows Svix: 5
    /// seconds, then minutes, then hours, the last about a day after the
    /// first attempt. After the last retry a delivery is dead-lettered.
    pub retry_schedule: String,
    /// The longest `Retry-After` honoured, in seconds; longer asks wait this.
    pub max_retry_after_secs: u64,
    /// How long one webhook request may take in all, in milliseconds.
    pub request_timeout_ms: u64,
    /// How long connecting to a webhook may take, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Webhook requests in flight at once, per replica.
    pub workers: usize,
    /// API requests handled at once, per replica.
    pub max_in_flight: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            nats: NatsSettings::default(),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 9105)),
            sealing_key: Secret::default(),
            webhook_allow_networks: String::new(),
            retry_schedule: "5s,5m,30m,2h,5h,10h,10h".into(),
            max_retry_after_secs: 86_400,
            request_timeout_ms: 15_000,
            connect_timeout_ms: 5_000,
            workers: 64,
            max_in_flight: 64,
        }
    }
}

impl Settings {
    /// Settings for tests: the given server, a free admin port, the sealing
    /// key of the entities service's test settings, loopback allowed and
    /// retries within a second.
    pub fn for_tests(nats_url: &str) -> Settings {
        Settings {
            nats: NatsSettings {
                url: nats_url.to_owned(),
                ..Default::default()
            },
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            sealing_key: Secret::new("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="),
            webhook_allow_networks: "127.0.0.0/8,::1/128".into(),
            retry_schedule: "100ms,200ms,300ms".into(),
            request_timeout_ms: 2_000,
            connect_timeout_ms: 1_000,
            ..Default::default()
        }
    }
}

/// Resolves webhook host names through the egress policy, so a connection
/// goes only to addresses that were checked.
struct EgressResolver(Egress);

impl reqwest::dns::Resolve for EgressResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let egress = self.0.clone();
        Box::pin(async move {
            let addrs = egress
                .resolve(name.as_str(), 0)
                .await
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { e.message.into() })?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The notifier's logic and what it needs, independent of transport.
#[derive(Clone)]
pub struct Notifier {
    client: async_nats::Client,
    js: jetstream::Context,
    entities: jetstream::stream::Stream,
    events: jetstream::stream::Stream,
    dead_letters: jetstream::stream::Stream,
    state: Arc<State>,
    sealer: Sealer,
    egress: Egress,
    http: reqwest::Client,
    schedule: Vec<Duration>,
    max_retry_after: Duration,
    request_timeout: Duration,
    /// Webhook requests in flight at once.
    requests: Arc<tokio::sync::Semaphore>,
    /// How long a `DELIVERIES` message may go without a sign of work.
    ack_wait: Duration,
}

impl Notifier {
    pub fn state(&self) -> &State {
        &self.state
    }
}

pub struct App {
    client: async_nats::Client,
    notifier: Notifier,
    settings: Settings,
    admin_listener: Option<tokio::net::TcpListener>,
    admin_addr: SocketAddr,
    service: async_nats::service::Service,
    endpoint: async_nats::service::endpoint::Endpoint,
    events_consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
    deliveries_consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
}

impl App {
    /// Connects, provisions `DELIVERIES` and `DEADLETTERS` (and the streams
    /// they rely on), creates the durable consumers (events from now on are
    /// fired), registers the endpoint and binds the admin port.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        let sealer = Sealer::from_base64(settings.sealing_key.expose())?;
        let egress = Egress::parse(&settings.webhook_allow_networks)
            .map_err(|e| anyhow::anyhow!("webhook_allow_networks: {e}"))?;
        let schedule = deliver::parse_schedule(&settings.retry_schedule)
            .map_err(|e| anyhow::anyhow!("retry_schedule: {e}"))?;
        let request_timeout = Duration::from_millis(settings.request_timeout_ms.max(1));
        let http = reqwest::Client::builder()
            .timeout(request_timeout)
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms.max(1)))
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(EgressResolver(egress.clone())))
            .user_agent(concat!("meterline-notifier/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let client = bus::connect(&settings.nats, SERVICE_NAME).await?;
        let js = jetstream::new(client.clone());
        let replicas = settings.nats.stream_replicas.max(1);
        provision::ensure_core(&js, replicas).await?;
        provision::ensure_streams(
            &js,
            replicas,
            [provision::deliveries(), provision::dead_letters()],
        )
        .await?;
        let entities = js.get_stream(subjects::ENTITIES_STREAM).await?;
        let events = js.get_stream(subjects::EVENTS_STREAM).await?;
        let deliveries = js.get_stream(subjects::DELIVERIES_STREAM).await?;
        let dead_letters = js.get_stream(subjects::DEAD_LETTERS_STREAM).await?;
        let events_consumer = fire::consumer(&events).await?;
        let ack_wait = request_timeout + Duration::from_secs(5);
        let deliveries_consumer = deliver::consumer(&deliveries, ack_wait).await?;
        let notifier = Notifier {
            client: client.clone(),
            js,
            entities,
            events,
            dead_letters,
            state: Arc::new(State::default()),
            sealer,
            egress,
            http,
            schedule,
            max_retry_after: Duration::from_secs(settings.max_retry_after_secs),
            request_timeout,
            requests: Arc::new(tokio::sync::Semaphore::new(settings.workers.max(1))),
            ack_wait,
        };
        let admin_listener = tokio::net::TcpListener::bind(settings.admin_addr).await?;
        let admin_addr = admin_listener.local_addr()?;
        let service = client
            .service_builder()
            .description("Meterline notifier: events, notification rules and webhooks")
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| anyhow::anyhow!("starting the micro service failed: {e}"))?;
        let endpoint = service
            .endpoint_builder()
            .name("api")
            .add("svc.notifier.*.>")
            .await
            .map_err(|e| anyhow::anyhow!("adding endpoint api: {e}"))?;
        bus::round_trip(&client).await?;
        Ok(App {
            client,
            notifier,
            settings,
            admin_listener: Some(admin_listener),
            admin_addr,
            service,
            endpoint,
            events_consumer,
            deliveries_consumer,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// Serves until `shutdown`: learns rules, fires, delivers and answers
    /// requests; then drains in-flight work under a deadline and the client.
    pub async fn run_until_stopped(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let n = self.notifier.clone();
        let follow = tokio::spawn(state::follow(
            n.entities.clone(),
            n.state.clone(),
            shutdown.clone(),
        ));
        // Rules, webhooks and links that exist now are known before any
        // event is fired or delivery attempted.
        let initial = state::last_relevant_seq(&n.entities).await;
        let caught_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ready_client = self.client.clone();
        let ready_flag = caught_up.clone();
        let ready: admin::Readiness = Arc::new(move || {
            ready_client.connection_state() == async_nats::connection::State::Connected
                && ready_flag.load(std::sync::atomic::Ordering::Relaxed)
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
        let workers = {
            let n = n.clone();
            let stop = shutdown.clone();
            let (events_consumer, deliveries_consumer) = (
                self.events_consumer.clone(),
                self.deliveries_consumer.clone(),
            );
            let worker_count = self.settings.workers;
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = n.state.wait_for(initial) => {}
                }
                caught_up.store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(rules_seq = initial, "rules loaded; firing and delivering");
                tokio::join!(
                    fire::run(n.clone(), events_consumer, stop.clone()),
                    deliver::run(n.clone(), deliveries_consumer, worker_count, stop.clone()),
                );
            })
        };
        tracing::info!(admin = %self.admin_addr, "notifier service ready");
        let handler = move |msg: async_nats::Message| {
            let n = n.clone();
            async move { api::dispatch(&n, &msg).await }
        };
        serve::serve(
            self.endpoint,
            self.settings.max_in_flight,
            shutdown.clone(),
            handler,
        )
        .await?;
        let _ = self.service.stop().await;
        let _ = workers.await;
        follow.abort();
        let _ = self.client.drain().await;
        Ok(())
    }
}
