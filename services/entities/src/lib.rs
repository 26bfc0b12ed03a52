//! The entities service: the system of record for every configuration and
//! billing entity.
//!
//! Owns create/update/delete/get/list of every type in the registry, with
//! optimistic concurrency, reference checks, unique codes and sealed secrets,
//! appended to `ENTITIES` (whose messages `EVENTS` sources as entity events),
//! and the service users and access keys the gateway authenticates against.
//! Exposed as a NATS micro service (`svc.entities.<org>.<type>.<op>`,
//! `svc.auth.verify`); replicas join one queue group.
//!
//! It does not speak HTTP (the gateway does) and does not schedule or export
//! anything (the scheduler and exporter read `ENTITIES`).

pub mod auth;
pub mod codes;
pub mod domain;
pub mod index;
pub mod rules;
pub use meterline_shared::seal;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::push};
use async_nats::service::ServiceExt;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use meterline_shared::envelope::{EntityEvent, HEADER_ACTOR};
use meterline_shared::protocol::{Credentials, EntityRequest, VerifyRequest};
use meterline_shared::settings::{NatsSettings, Secret};
use meterline_shared::shutdown::CancellationToken;
use meterline_shared::{admin, bus, provision, registry, serve, subjects, ServiceError};

use crate::auth::Auth;
use crate::codes::Codes;
use crate::domain::{index_entry, Entities};
use crate::index::Index;
use crate::seal::Sealer;
use crate::store::Store;

pub const SERVICE_NAME: &str = "entities";

/// Settings of the entities service (`METERLINE_ENTITIES_*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Bus connection (`METERLINE_NATS_*`).
    pub nats: NatsSettings,
    /// Admin HTTP port: `/healthz`, `/readyz`, `/metrics`.
    pub admin_addr: SocketAddr,
    /// Base64 of a 32-byte key that seals secrets (webhook signing secrets,
    /// integration credentials) before they are stored. Without it, writes
    /// carrying secrets are refused. Keep it stable: sealed values need it.
    pub sealing_key: Secret,
    /// Requests handled at once by one replica.
    pub max_in_flight: usize,
    /// Networks (CIDR, comma separated) webhook URLs may point into although
    /// they are loopback or private, e.g. `127.0.0.0/8,::1/128` for local
    /// development. Empty: webhooks must reach public addresses. Give the
    /// notifier the same list.
    pub webhook_allow_networks: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            nats: NatsSettings::default(),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 9101)),
            sealing_key: Secret::default(),
            max_in_flight: 256,
            webhook_allow_networks: String::new(),
        }
    }
}

impl Settings {
    /// Settings for tests: the given server, a free admin port, a fixed key.
    pub fn for_tests(nats_url: &str) -> Settings {
        Settings {
            nats: NatsSettings {
                url: nats_url.to_owned(),
                ..Default::default()
            },
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            sealing_key: Secret::new("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="),
            max_in_flight: 256,
            webhook_allow_networks: String::new(),
        }
    }
}

pub struct App {
    client: async_nats::Client,
    service: async_nats::service::Service,
    endpoints: Vec<async_nats::service::endpoint::Endpoint>,
    entities: Entities,
    auth: Auth,
    settings: Settings,
    admin_addr: SocketAddr,
    admin_listener: Option<tokio::net::TcpListener>,
}

impl App {
    /// Connects, provisions streams and buckets, and binds the admin port.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        let sealer = Sealer::from_base64(settings.sealing_key.expose())?;
        let client = bus::connect(&settings.nats, SERVICE_NAME).await?;
        let js = jetstream::new(client.clone());
        let replicas = settings.nats.stream_replicas.max(1);
        provision::ensure_core(&js, replicas).await?;
        let creds = provision::ensure_kv(
            &js,
            jetstream::kv::Config {
                num_replicas: replicas,
                ..provision::credentials_bucket()
            },
        )
        .await?;
        let codes = provision::ensure_kv(
            &js,
            jetstream::kv::Config {
                num_replicas: replicas,
                ..codes::bucket_config()
            },
        )
        .await?;
        let store = Store::open(js.clone()).await?;
        let index = Arc::new(Index::default());
        let egress = meterline_shared::egress::Egress::parse(&settings.webhook_allow_networks)
            .map_err(|e| anyhow::anyhow!("webhook_allow_networks: {e}"))?;
        let entities =
            Entities::new(store.clone(), index, Codes::new(codes), sealer).with_egress(egress);
        let auth = Auth::new(creds, store);
        let admin_listener = tokio::net::TcpListener::bind(settings.admin_addr).await?;
        let admin_addr = admin_listener.local_addr()?;
        let (service, endpoints) = start_service(&client).await?;
        Ok(App {
            client,
            service,
            endpoints,
            entities,
            auth,
            settings,
            admin_addr,
            admin_listener: Some(admin_listener),
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The domain logic, for callers in the same process (tests, benches).
    pub fn entities(&self) -> &Entities {
        &self.entities
    }

    /// Serves until `shutdown` is cancelled, then finishes in-flight requests
    /// (under a deadline) and drains the NATS client.
    pub async fn run_until_stopped(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let index = self.entities.index.clone();
        let ready_client = self.client.clone();
        let ready_index = index.clone();
        let initial_last = self.entities.store.last_seq().await.unwrap_or(0);
        let ready: admin::Readiness = Arc::new(move || {
            ready_client.connection_state() == async_nats::connection::State::Connected
                && ready_index.caught_up() >= initial_last
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

        let replay = tokio::spawn(replay(self.entities.store.clone(), index, shutdown.clone()));

        let (service, endpoints) = (self.service, self.endpoints);
        tracing::info!(admin = %self.admin_addr, "entities service ready");

        let requests = futures::stream::select_all(endpoints);
        let (entities, auth) = (self.entities.clone(), self.auth.clone());
        let handler = move |msg: async_nats::Message| {
            let (entities, auth) = (entities.clone(), auth.clone());
            async move { dispatch(&entities, &auth, &msg).await }
        };
        serve::serve(
            requests,
            self.settings.max_in_flight,
            shutdown.clone(),
            handler,
        )
        .await?;
        let _ = service.stop().await;
        replay.abort();
        let _ = self.client.drain().await;
        Ok(())
    }
}

/// Registers the micro service and its endpoints. Requests that arrive
/// before the serving loop starts wait in the subscriptions.
async fn start_service(
    client: &async_nats::Client,
) -> anyhow::Result<(
    async_nats::service::Service,
    Vec<async_nats::service::endpoint::Endpoint>,
)> {
    let service = client
        .service_builder()
        .description(
            "Meterline entities: the system of record for configuration and billing entities",
        )
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("starting the micro service failed: {e}"))?;
    let mut endpoints = Vec::new();
    for op in subjects::ops::ALL {
        let ep = service
            .endpoint_builder()
            .name(op)
            .add(format!("svc.entities.*.*.{op}"))
            .await
            .map_err(|e| anyhow::anyhow!("adding endpoint {op}: {e}"))?;
        endpoints.push(ep);
    }
    let credentials = service
        .endpoint_builder()
        .name("credentials")
        .add("svc.entities.*.serviceuser.credentials")
        .await
        .map_err(|e| anyhow::anyhow!("adding endpoint credentials: {e}"))?;
    let verify = service
        .endpoint_builder()
        .name("verify")
        .add(subjects::AUTH_VERIFY)
        .await
        .map_err(|e| anyhow::anyhow!("adding endpoint verify: {e}"))?;
    endpoints.push(credentials);
    endpoints.push(verify);
    // Once the server has the subscriptions, a request sent after
    // `App::build` finds a responder.
    bus::round_trip(client).await?;
    Ok((service, endpoints))
}

/// Routes one request message to the domain.
async fn dispatch(
    entities: &Entities,
    auth: &Auth,
    msg: &async_nats::Message,
) -> Result<Bytes, ServiceError> {
    let subject = msg.subject.as_str();
    if subject == subjects::AUTH_VERIFY {
        let req: VerifyRequest = serde_json::from_slice(&msg.payload)
            .map_err(|e| ServiceError::bad_request(format!("malformed verify request: {e}")))?;
        return to_bytes(&auth.verify(req).await?);
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    let [_, _, org, ty, op] = tokens[..] else {
        return Err(ServiceError::bad_request(format!(
            "unexpected subject {subject}"
        )));
    };
    let req: EntityRequest = if msg.payload.is_empty() {
        EntityRequest::default()
    } else {
        serde_json::from_slice(&msg.payload)
            .map_err(|e| ServiceError::bad_request(format!("malformed request: {e}")))?
    };
    if ty == "serviceuser" && op == "credentials" {
        let id = req
            .id
            .as_deref()
            .ok_or_else(|| ServiceError::bad_request("credentials need the service user's id"))?;
        return to_bytes(&auth.issue(org, id).await?);
    }
    let actor = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(HEADER_ACTOR))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| "bus".to_owned());
    if actor.len() > 200 {
        return Err(ServiceError::bad_request("the actor header is too long"));
    }
    to_bytes(&entities.handle(org, ty, op, &actor, req).await?)
}

fn to_bytes<T: Serialize>(v: &T) -> Result<Bytes, ServiceError> {
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(ServiceError::internal)
}

/// Keeps the index current: replays `ENTITIES` from the start with an
/// ordered consumer and applies every version, including those written by
/// other replicas.
async fn replay(store: Store, index: Arc<Index>, shutdown: CancellationToken) {
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        if let Err(e) = replay_once(&store, &index, &shutdown).await {
            tracing::warn!(error = %e, "entity replay interrupted; restarting");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

async fn replay_once(
    store: &Store,
    index: &Index,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let start = index.caught_up() + 1;
    let consumer = store
        .stream()
        .create_consumer(push::OrderedConfig {
            deliver_subject: format!("_INBOX.entities-replay.{}", ulid::Ulid::new()),
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    if store.last_seq().await.unwrap_or(0) < start {
        index.mark_caught_up(start - 1);
    }
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = messages.next() => m,
        };
        let Some(msg) = msg else {
            anyhow::bail!("replay consumer ended")
        };
        let msg = msg?;
        let seq = msg
            .info()
            .map(|i| i.stream_sequence)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        match serde_json::from_slice::<EntityEvent>(&msg.payload) {
            Ok(ev) => {
                if let Some(ty) = registry::get(&ev.entity_type) {
                    let entry = if ev.is_tombstone() {
                        None
                    } else {
                        ev.new.as_ref().map(|s| index_entry(ty, seq, s))
                    };
                    index.apply(&ev.org_id, ty.name, &ev.entity_id, seq, entry);
                }
            }
            Err(e) => tracing::warn!(seq, error = %e, "skipping undecodable ENTITIES message"),
        }
        index.mark_caught_up(seq);
    }
}

/// Creates (if missing) an organization, then a service user in it, and
/// issues that user an access key: everything a new tenant needs to call the
/// API. Talks to a running entities service over the bus.
pub async fn bootstrap(
    client: &async_nats::Client,
    org_id: &str,
    org_name: &str,
    service_user_name: &str,
) -> Result<Credentials, ServiceError> {
    subjects::validate_token("orgId", org_id)?;
    let call = |ty: &'static str, op: &'static str, req: EntityRequest| {
        let client = client.clone();
        let subject = subjects::entities_request(org_id, ty, op);
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(HEADER_ACTOR, "bootstrap");
            let payload = Bytes::from(serde_json::to_vec(&req).map_err(ServiceError::internal)?);
            let reply = bus::request(&client, subject, headers, payload).await?;
            serde_json::from_slice::<serde_json::Value>(&reply).map_err(ServiceError::internal)
        }
    };
    let get = EntityRequest {
        id: Some(org_id.to_owned()),
        ..Default::default()
    };
    match call("organization", "get", get).await {
        Ok(_) => {}
        Err(e) if e.code == meterline_shared::ErrorCode::NotFound => {
            let body = serde_json::json!({ "name": org_name });
            let create = EntityRequest {
                id: Some(org_id.to_owned()),
                body: Some(body),
                ..Default::default()
            };
            match call("organization", "create", create).await {
                Ok(_) => {}
                // Created concurrently by someone else: fine.
                Err(e) if e.code == meterline_shared::ErrorCode::Conflict => {}
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    }
    let su = call(
        "serviceuser",
        "create",
        EntityRequest {
            body: Some(serde_json::json!({ "name": service_user_name })),
            ..Default::default()
        },
    )
    .await?;
    let su_id = su
        .get("id")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let headers = async_nats::HeaderMap::new();
    let payload = Bytes::from(
        serde_json::to_vec(&EntityRequest {
            id: Some(su_id),
            ..Default::default()
        })
        .map_err(ServiceError::internal)?,
    );
    let reply = bus::request(
        client,
        subjects::credentials_request(org_id),
        headers,
        payload,
    )
    .await?;
    serde_json::from_slice(&reply).map_err(ServiceError::internal)
}
