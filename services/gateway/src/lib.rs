//! The HTTP edge of Meterline.
//!
//! The gateway owns what only an HTTP edge can own: m3ter-compatible REST
//! routes (generated from the entity registry, so a new entity type needs no
//! gateway code), `POST /oauth/token`, bearer-token authentication,
//! organization isolation, request body limits, rate limits, the OpenAPI
//! document and the mapping of typed errors to HTTP statuses with JSON
//! bodies.
//!
//! It owns no domain logic and no durable state: every entity request
//! becomes one NATS request to `svc.entities.<org>.<type>.<op>` carrying the
//! caller in the `Meterline-Actor` header, and the reply is returned as is;
//! a batch of measurements becomes one request to `svc.ingest.<org>.submit`.
//! Validation of bodies, versions, references, credentials and measurements
//! lives in `meterline-entities` and `meterline-ingest`. Because tokens are
//! verified locally (HS256 with a shared key), any number of gateway
//! replicas can run behind one address. The one state it keeps is the token
//! buckets of its rate limits ([`ratelimit`]), in memory, so those limits
//! apply per replica. Measurement files are the one thing it moves itself:
//! it streams them between signed URLs and the `upload_files` object store,
//! and leaves their jobs to ingest ([`uploads`]).
//!
//! | method | path | NATS subject |
//! |---|---|---|
//! | POST | `/oauth/token` | `svc.auth.verify` |
//! | POST | `/organizations/{orgId}/measurements` | `svc.ingest.<org>.submit` |
//! | GET, POST | `/organizations/{orgId}/<path>` | `svc.entities.<org>.<type>.list` / `.create` |
//! | GET, PUT, DELETE | `/organizations/{orgId}/<path>/{id}` | `.get` / `.update` / `.delete` |
//! | POST | `/organizations/{orgId}/fileuploads/measurements/generateUploadUrl` | `svc.ingest.<org>.upload.create` |
//! | GET | `/organizations/{orgId}/fileuploads/measurements/jobs[/{id}[/original]]` | `svc.ingest.<org>.upload.list` / `.get` |
//! | PUT, GET | `/uploads/measurements/{jobId}` (signed URL, no token) | `.upload.start`, object store `upload_files`, `UPLOADS` |
//! | GET | `/organizations/{orgId}/dataexports/jobs[/{id}[/getdownloadurl]]` | `svc.exporter.<org>.jobs.list` / `.get` / `.files` |
//! | POST | `/organizations/{orgId}/dataexports/adhoc`, `.../schedules/{id}/run` | `svc.exporter.<org>.jobs.adhoc` / `.run` |
//! | GET | `/exports/files/<name>` (signed URL, no token) | object store `export_files` |
//! | GET, POST, PUT | events, `notifications/evaluate`, webhook `active`, dead letters ([`notifications`]) | `svc.notifier.<org>.<op>` |
//! | GET | `/openapi.json`, `/docs/openapi.json`, `/healthz` | — |

pub mod auth;
pub mod body;
pub mod error;
pub mod exports;
pub mod forward;
pub mod measurements;
pub mod notifications;
pub mod ratelimit;
pub mod routes;
pub mod uploads;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
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
    /// The largest body of `POST /organizations/{orgId}/measurements`, in
    /// bytes; larger bodies get 413. m3ter's limit: a batch must be under
    /// 512,000 bytes (about 1000 measurements of a few fields each).
    pub measurements_body_limit_bytes: usize,
    /// Measurement requests per second that one organization may make, over
    /// all its service users. Rate limits are token buckets kept in memory
    /// by each gateway replica, so they apply per replica: with `n`
    /// replicas an org can reach `n` times this rate. m3ter allows 50 per
    /// org; at up to 1000 measurements a request that is 50,000
    /// measurements per second per replica. 0 disables the limit.
    pub measurements_org_rate_per_sec: f64,
    /// How many measurement requests an organization may make at once after
    /// a quiet period (the bucket size). 0: the rate, rounded up.
    pub measurements_org_burst: u32,
    /// Measurement requests per second from one source (a service user, the
    /// `sub` of its bearer token), per replica, so one runaway producer
    /// cannot take all of its organization's rate. m3ter limits a source
    /// host to about 16 per second; 25 leaves room for batch back-fills.
    /// 0 disables the limit.
    pub measurements_source_rate_per_sec: f64,
    /// The burst of one source's measurement requests. 0: the rate, rounded
    /// up.
    pub measurements_source_burst: u32,
    /// Requests per second that one organization may make to every other
    /// `/organizations/{orgId}/...` route (m3ter's Config API, which allows
    /// 50), per replica. Higher than the measurements limit because these
    /// are single small reads and writes that scripts and SDK syncs issue
    /// in quick runs. 0 disables the limit.
    pub config_org_rate_per_sec: f64,
    /// The burst of one organization's other requests. 0: the rate, rounded
    /// up.
    pub config_org_burst: u32,
    /// HMAC-SHA256 key that signs the upload and download URLs of
    /// measurement files. Every replica must have the same one. Empty: a
    /// random key is generated at start, so URLs work only on the replica
    /// that issued them, and not after a restart.
    pub upload_signing_key: Secret,
    /// How long an upload URL from `generateUploadUrl` is valid, in seconds
    /// (m3ter: one minute).
    pub upload_url_ttl_secs: u64,
    /// How long a download URL of an uploaded file is valid, in seconds.
    pub download_url_ttl_secs: u64,
    /// The largest measurements file accepted, in bytes (m3ter: 1 GiB).
    /// Files are streamed, never held in memory.
    pub upload_max_bytes: u64,
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
            measurements_body_limit_bytes: 512_000,
            measurements_org_rate_per_sec: 50.0,
            measurements_org_burst: 100,
            measurements_source_rate_per_sec: 25.0,
            measurements_source_burst: 50,
            config_org_rate_per_sec: 100.0,
            config_org_burst: 200,
            upload_signing_key: Secret::default(),
            upload_url_ttl_secs: 60,
            download_url_ttl_secs: 300,
            upload_max_bytes: 1 << 30,
        }
    }
}

/// The signing key of [`Settings::for_tests`].
pub const TEST_JWT_SECRET: &str = "meterline-test-signing-key";
/// The URL signing key of [`Settings::for_tests`].
pub const TEST_UPLOAD_SIGNING_KEY: &str = "meterline-test-upload-key";

impl Settings {
    /// Settings for tests: free ports on localhost, a fixed signing key, and
    /// no rate limits (system tests and benchmarks drive one org hard; tests
    /// of the limits set them).
    pub fn for_tests(nats_url: &str) -> Settings {
        Settings {
            nats: NatsSettings {
                url: nats_url.to_owned(),
                ..NatsSettings::default()
            },
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            jwt_secret: Secret::new(TEST_JWT_SECRET),
            upload_signing_key: Secret::new(TEST_UPLOAD_SIGNING_KEY),
            measurements_org_rate_per_sec: 0.0,
            measurements_source_rate_per_sec: 0.0,
            config_org_rate_per_sec: 0.0,
            ..Settings::default()
        }
    }

    /// Refuses settings that cannot mean what the operator wanted.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (name, rate) in [
            (
                "measurements_org_rate_per_sec",
                self.measurements_org_rate_per_sec,
            ),
            (
                "measurements_source_rate_per_sec",
                self.measurements_source_rate_per_sec,
            ),
            ("config_org_rate_per_sec", self.config_org_rate_per_sec),
        ] {
            anyhow::ensure!(
                rate.is_finite() && rate >= 0.0,
                "{name} must be a number of requests per second, 0 or more (0 disables the limit), got {rate}"
            );
        }
        Ok(())
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
    measurements_body_limit: usize,
    limits: ratelimit::RateLimits,
    openapi: Bytes,
    uploads: uploads::UploadState,
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
        let upload_key = if settings.upload_signing_key.is_empty() {
            warn!(
                "upload_signing_key is empty: using a random key; upload and download URLs \
                 will not survive a restart and will not be accepted by other gateway replicas"
            );
            let mut key = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut key);
            key.to_vec()
        } else {
            settings.upload_signing_key.expose().as_bytes().to_vec()
        };
        AppState {
            inner: Arc::new(Inner {
                uploads: uploads::UploadState::new(nats.clone(), settings, upload_key),
                nats,
                keys: TokenKeys::new(&secret, Duration::from_secs(settings.token_ttl_secs)),
                body_limit: settings.body_limit_bytes,
                measurements_body_limit: settings.measurements_body_limit_bytes,
                limits: ratelimit::RateLimits::from_settings(settings),
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
    forward::json(state.inner.openapi.clone())
}

/// The whole HTTP API. Tests can drive it without a socket.
pub fn router(state: AppState) -> Router {
    use axum::middleware::from_fn_with_state;
    // The route layer added last runs first: the bearer check, then the
    // route's rate limit, which needs the caller the check found.
    let config = routes::entity_routes(&state).route_layer(from_fn_with_state(
        state.clone(),
        ratelimit::limit_config_routes,
    ));
    let measurements = Router::new()
        .route(measurements::PATH, post(measurements::submit))
        .route_layer(from_fn_with_state(
            state.clone(),
            ratelimit::limit_measurements,
        ))
        .with_state(state.clone());
    let file_uploads = Router::new()
        .route(uploads::GENERATE_PATH, post(uploads::generate_upload_url))
        .route(uploads::JOBS_PATH, get(uploads::list_jobs))
        .route(uploads::JOB_PATH, get(uploads::get_job))
        .route(uploads::ORIGINAL_PATH, get(uploads::original))
        .route_layer(from_fn_with_state(
            state.clone(),
            ratelimit::limit_config_routes,
        ))
        .with_state(state.clone());
    let data_exports = exports::routes(&state).route_layer(from_fn_with_state(
        state.clone(),
        ratelimit::limit_config_routes,
    ));
    let organizations = config
        .merge(measurements)
        .merge(file_uploads)
        .merge(data_exports)
        .merge(notifications::routes(&state))
        .route_layer(from_fn_with_state(state.clone(), auth::require_bearer));
    let public = Router::new()
        .route("/oauth/token", post(auth::issue_token))
        // Signed URLs: the signature is the credential.
        .route(
            uploads::FILE_PATH,
            put(uploads::put_file).get(uploads::get_file),
        )
        .route(exports::FILE_PATH, get(exports::get_file))
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
        // Signed URLs carry their credential in the query: logged without it.
        .layer(TraceLayer::new_for_http().make_span_with(uploads::request_span))
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
        settings.validate()?;
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
        offline_router_with(Settings::for_tests("nats://127.0.0.1:1")).await
    }

    async fn offline_router_with(settings: Settings) -> Router {
        let nats = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("nats://127.0.0.1:1")
            .await
            .unwrap();
        router(AppState::new(nats, &settings))
    }

    fn token(org: &str) -> String {
        let keys = TokenKeys::new(TEST_JWT_SECRET.as_bytes(), Duration::from_secs(60));
        keys.issue(&meterline_shared::protocol::Principal {
            org_id: org.into(),
            service_user_id: "su1".into(),
        })
        .unwrap()
    }

    fn submit(org: &str, body: impl Into<Body>) -> Request<Body> {
        Request::post(format!("/organizations/{org}/measurements"))
            .header("authorization", format!("Bearer {}", token(org)))
            .body(body.into())
            .unwrap()
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

    #[tokio::test]
    async fn measurements_are_refused_before_the_bus_when_they_must_be() {
        let mut settings = Settings::for_tests("nats://127.0.0.1:1");
        settings.measurements_body_limit_bytes = 100;
        // One request, then none for a thousand seconds.
        settings.measurements_org_rate_per_sec = 0.001;
        settings.measurements_org_burst = 1;
        let r = offline_router_with(settings).await;
        let unauthenticated = Request::post("/organizations/o1/measurements")
            .body(Body::from("{}"))
            .unwrap();
        let (status, _) = call(r.clone(), unauthenticated).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        // The first request takes the org's one token, and is over the size
        // limit.
        let (status, body) = call(r.clone(), submit("o1", "x".repeat(101))).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        let res = r.clone().oneshot(submit("o1", "{}")).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()[axum::http::header::RETRY_AFTER], "1000");
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body["message"],
            "rate limit of 0.001 requests per second for organization o1 exceeded; retry after 1000 s"
        );
        // Another org has its own bucket; its body is over the limit.
        let (status, body) = call(r.clone(), submit("o2", "x".repeat(101))).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        let (status, _) = call(r, submit("o2", "x".repeat(101))).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn bad_rates_are_refused_at_start_and_defaults_are_as_documented() {
        let d = Settings::default();
        assert_eq!(d.measurements_body_limit_bytes, 512_000);
        assert_eq!(
            (d.measurements_org_rate_per_sec, d.measurements_org_burst),
            (50.0, 100)
        );
        assert_eq!(
            (
                d.measurements_source_rate_per_sec,
                d.measurements_source_burst
            ),
            (25.0, 50)
        );
        assert_eq!(
            (d.config_org_rate_per_sec, d.config_org_burst),
            (100.0, 200)
        );
        d.validate().unwrap();
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let s = Settings {
                measurements_source_rate_per_sec: bad,
                ..Settings::default()
            };
            assert!(s.validate().is_err(), "{bad}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn rate_limits_load_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("METERLINE_GATEWAY_MEASUREMENTS_ORG_RATE_PER_SEC", "200");
            jail.set_env("METERLINE_GATEWAY_MEASUREMENTS_ORG_BURST", "400");
            jail.set_env("METERLINE_GATEWAY_MEASUREMENTS_SOURCE_RATE_PER_SEC", "0.5");
            jail.set_env("METERLINE_GATEWAY_CONFIG_ORG_RATE_PER_SEC", "0");
            let s: Settings =
                meterline_shared::settings::load("GATEWAY").map_err(|e| e.to_string())?;
            assert_eq!(s.measurements_org_rate_per_sec, 200.0);
            assert_eq!(s.measurements_org_burst, 400);
            assert_eq!(s.measurements_source_rate_per_sec, 0.5);
            assert_eq!(s.measurements_source_burst, 50);
            assert_eq!(s.config_org_rate_per_sec, 0.0);
            assert_eq!(s.measurements_body_limit_bytes, 512_000);
            Ok(())
        });
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
