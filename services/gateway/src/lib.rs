//! The HTTP edge of Meterline.
//!
//! The gateway owns what only an HTTP edge can own: m3ter-compatible REST
//! routes (generated from the entity registry, so a new entity type needs no
//! gateway code), `POST /oauth/token`, bearer-token authentication,
//! organization isolation, the request body limit, the OpenAPI document and
//! the mapping of typed errors to HTTP statuses with JSON bodies.
//!
//! It owns no domain logic and no state: every entity request becomes one
//! NATS request to `svc.entities.<org>.<type>.<op>` carrying the caller in
//! the `Meterline-Actor` header, and the reply is returned as is. Validation
//! of bodies, versions, references and credentials lives in
//! `meterline-entities`. Because tokens are verified locally (HS256 with a
//! shared key), any number of gateway replicas can run behind one address.
//!
//! | method | path | NATS subject |
//! |---|---|---|
//! | POST | `/oauth/token` | `svc.auth.verify` |
//! | GET, POST | `/organizations/{orgId}/<path>` | `svc.entities.<org>.<type>.list` / `.create` |
//! | GET, PUT, DELETE | `/organizations/{orgId}/<path>/{id}` | `.get` / `.update` / `.delete` |
//! | GET | `/openapi.json`, `/docs/openapi.json`, `/healthz` | — |

pub mod auth;
pub mod body;
pub mod error;
pub mod routes;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use meterline_shared::settings::{NatsSettings, Secret};
use meterline_shared::{admin, bus, schema, shutdown};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;
use tracing::{info, warn};

pub use auth::{Caller, Claims, TokenKeys};
pub use error::ApiError;

/// The gateway's settings: defaults here, then the `[gateway]` table of the
/// config file, then `METERLINE_GATEWAY_*` environment variables.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// How the gateway reaches NATS.
    pub nats: NatsSettings,
    /// Address the public HTTP API listens on. Port 0 picks a free port.
    pub http_addr: SocketAddr,
    /// Address of the admin port (`/healthz`, `/readyz`, `/metrics`).
    pub admin_addr: SocketAddr,
    /// HS256 key that signs and verifies bearer tokens. Every replica must
    /// have the same one. Empty: a random key is generated at start, so
    /// tokens do not survive a restart and are not accepted by other replicas.
    pub jwt_secret: Secret,
    /// Lifetime of issued bearer tokens, in seconds (m3ter: 5 hours).
    pub token_ttl_secs: u64,
    /// The largest request body accepted, in bytes; larger bodies get 413.
    /// Entity bodies are small: 1 MiB leaves room for big pricing bands and
    /// plan templates while bounding what one request can make the gateway
    /// buffer.
    pub body_limit_bytes: usize,
    /// The URL clients reach the gateway at (behind a proxy, say). When set,
    /// it is the `servers` entry of the served OpenAPI document.
    pub public_url: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            nats: NatsSettings::default(),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 9100)),
            jwt_secret: Secret::default(),
            token_ttl_secs: 18_000,
            body_limit_bytes: 1024 * 1024,
            public_url: None,
        }
    }
}

/// The signing key of [`Settings::for_tests`].
pub const TEST_JWT_SECRET: &str = "meterline-test-signing-key";

impl Settings {
    /// Settings for tests: free ports on localhost, a fixed signing key.
    pub fn for_tests(nats_url: &str) -> Settings {
        Settings {
            nats: NatsSettings {
                url: nats_url.to_owned(),
                ..NatsSettings::default()
            },
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            jwt_secret: Secret::new(TEST_JWT_SECRET),
            ..Settings::default()
        }
    }
}

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    nats: async_nats::Client,
    keys: TokenKeys,
    body_limit: usize,
    openapi: Bytes,
}

impl AppState {
    /// State from a connected client and the settings. An empty
    /// `jwt_secret` gets a random key (with a warning).
    pub fn new(nats: async_nats::Client, settings: &Settings) -> AppState {
        let secret = if settings.jwt_secret.is_empty() {
            warn!(
                "jwt_secret is empty: using a random signing key; tokens will not survive a restart \
                 and will not be accepted by other gateway replicas"
            );
            let mut key = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut key);
            key.to_vec()
        } else {
            settings.jwt_secret.expose().as_bytes().to_vec()
        };
        AppState {
            inner: Arc::new(Inner {
                nats,
                keys: TokenKeys::new(&secret, Duration::from_secs(settings.token_ttl_secs)),
                body_limit: settings.body_limit_bytes,
                openapi: openapi_document(settings.public_url.as_deref()),
            }),
        }
    }

    /// The token keys (tests sign their own tokens with them).
    pub fn keys(&self) -> &TokenKeys {
        &self.inner.keys
    }
}

/// The OpenAPI document, with `servers` pointing at `public_url` when set.
fn openapi_document(public_url: Option<&str>) -> Bytes {
    match public_url {
        None => Bytes::from_static(schema::OPENAPI_JSON.as_bytes()),
        Some(url) => {
            let mut doc = schema::document().clone();
            doc["servers"] = serde_json::json!([{ "url": url }]);
            Bytes::from(
                serde_json::to_vec(&doc)
                    .unwrap_or_else(|_| schema::OPENAPI_JSON.as_bytes().to_vec()),
            )
        }
    }
}

async fn openapi(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        state.inner.openapi.clone(),
    )
}

/// The whole HTTP API. Tests can drive it without a socket.
pub fn router(state: AppState) -> Router {
    let organizations = routes::entity_routes(&state).route_layer(
        axum::middleware::from_fn_with_state(state.clone(), auth::require_bearer),
    );
    let public = Router::new()
        .route("/oauth/token", post(auth::issue_token))
        .route("/openapi.json", get(openapi))
        .route("/docs/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state.clone());
    Router::new()
        .merge(public)
        .merge(organizations)
        .method_not_allowed_fallback(error::method_not_allowed)
        .fallback(error::not_found)
        // Entity and token bodies are read by `body::LimitedBody`; this bounds
        // any other extractor the same way.
        .layer(DefaultBodyLimit::max(state.inner.body_limit))
        .layer(axum::middleware::from_fn(error::json_errors))
        .layer(TraceLayer::new_for_http())
}

/// A built gateway: listeners bound, NATS client created (it connects, and
/// reconnects, in the background), not yet serving.
pub struct App {
    listener: TcpListener,
    http_addr: SocketAddr,
    admin_addr: SocketAddr,
    admin_stop: CancellationToken,
    admin_task: tokio::task::JoinHandle<()>,
    nats: async_nats::Client,
    router: Router,
}

impl App {
    /// Creates the NATS client and binds both listeners (port 0 picks free
    /// ones). The admin port serves from here on; `/readyz` reports ready
    /// once NATS is connected.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        let nats = bus::connect(&settings.nats, "meterline-gateway")
            .await
            .context("connecting to NATS")?;
        let listener = TcpListener::bind(settings.http_addr)
            .await
            .with_context(|| format!("binding the HTTP listener on {}", settings.http_addr))?;
        let http_addr = listener.local_addr()?;
        let admin_stop = CancellationToken::new();
        let (admin_addr, admin_task) = admin::serve(
            settings.admin_addr,
            admin::nats_readiness(nats.clone()),
            admin_stop.clone(),
        )
        .await
        .with_context(|| format!("binding the admin listener on {}", settings.admin_addr))?;
        let router = router(AppState::new(nats.clone(), &settings));
        Ok(App {
            listener,
            http_addr,
            admin_addr,
            admin_stop,
            admin_task,
            nats,
            router,
        })
    }

    /// Where the public API listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where the admin port listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Serves until `shutdown` is cancelled, then stops accepting
    /// connections, lets in-flight requests finish (within
    /// [`shutdown::DRAIN_DEADLINE`]), stops the admin port and drains the
    /// NATS client.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        info!(http = %self.http_addr, admin = %self.admin_addr, "gateway serving");
        let stop = shutdown.clone();
        let server = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .into_future();
        tokio::pin!(server);
        let served = tokio::select! {
            r = &mut server => r,
            _ = shutdown.cancelled() => {
                match tokio::time::timeout(shutdown::DRAIN_DEADLINE, &mut server).await {
                    Ok(r) => r,
                    Err(_) => {
                        warn!(deadline = ?shutdown::DRAIN_DEADLINE, "in-flight requests did not finish in time");
                        Ok(())
                    }
                }
            }
        };
        self.admin_stop.cancel();
        let _ = self.admin_task.await;
        if let Err(e) = self.nats.drain().await {
            warn!(error = %e, "draining the nats client failed");
        }
        info!("gateway stopped");
        served.context("serving HTTP")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    /// A router whose bus is unreachable: enough for everything the gateway
    /// decides on its own.
    async fn offline_router() -> Router {
        let nats = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("nats://127.0.0.1:1")
            .await
            .unwrap();
        router(AppState::new(
            nats,
            &Settings::for_tests("nats://127.0.0.1:1"),
        ))
    }

    async fn call(router: Router, req: Request<Body>) -> (StatusCode, serde_json::Value) {
        let res = router.oneshot(req).await.unwrap();
        let status = res.status();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn the_router_answers_without_a_socket() {
        let r = offline_router().await;
        let get = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();
        let (status, doc) = call(r.clone(), get("/openapi.json")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(doc["paths"].is_object());
        let (status, body) = call(r.clone(), get("/organizations/o1/accounts")).await;
        assert_eq!(
            (status, body["message"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("missing bearer token"))
        );
        let (status, body) = call(r.clone(), get("/organizations/o*/accounts")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let (status, _) = call(r, get("/nowhere")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn defaults_survive_the_loader_round_trip() {
        // The settings loader starts from the serialized defaults.
        let v = serde_json::to_value(Settings::for_tests("nats://x:1")).unwrap();
        let back: Settings = serde_json::from_value(v).unwrap();
        assert_eq!(back.jwt_secret.expose(), TEST_JWT_SECRET);
        assert_eq!(back.token_ttl_secs, 18_000);
        let unknown = serde_json::json!({"jwt_secert": "typo"});
        assert!(serde_json::from_value::<Settings>(unknown).is_err());
    }
}
