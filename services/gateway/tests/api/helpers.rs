//! A gateway on a free port against a real nats-server, an HTTP client, and
//! the real entities service behind it with a bootstrapped org.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use meterline_gateway::{App, Claims, Settings, TokenKeys, TEST_JWT_SECRET};
use meterline_shared::envelope::EntityEvent;
use meterline_shared::protocol::Credentials;
use meterline_shared::shutdown::CancellationToken;
use meterline_shared::subjects;
use meterline_shared::testkit::{NatsServer, Running};
use serde_json::{json, Value};

/// How long any single awaited step of a test may take.
pub const STEP: Duration = Duration::from_secs(15);

pub struct Gateway {
    pub base: String,
    pub http_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub http: reqwest::Client,
}

impl Gateway {
    pub async fn start_with(settings: Settings) -> Gateway {
        let app = tokio::time::timeout(STEP, App::build(settings))
            .await
            .expect("build in time")
            .expect("build");
        let http_addr = app.http_addr();
        let admin_addr = app.admin_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        let http = reqwest::Client::builder().timeout(STEP).build().unwrap();
        Gateway {
            base: format!("http://{http_addr}"),
            http_addr,
            admin_addr,
            shutdown,
            task,
            http,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn org_url(&self, org: &str, path: &str) -> String {
        format!("{}/organizations/{org}/{path}", self.base)
    }

    /// A token for `org` as `service_user`, signed with the test key, expiring
    /// `ttl_secs` from now (negative: already expired).
    pub fn token(&self, org: &str, service_user: &str, ttl_secs: i64) -> String {
        let keys = TokenKeys::new(TEST_JWT_SECRET.as_bytes(), Duration::from_secs(60));
        let now = chrono::Utc::now().timestamp();
        keys.sign(&Claims {
            sub: service_user.into(),
            org: org.into(),
            iat: now as u64,
            exp: (now + ttl_secs) as u64,
            iss: "meterline".into(),
            jti: ulid::Ulid::new().to_string(),
        })
        .unwrap()
    }

    /// Stops the gateway and checks it exits cleanly, in time.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(STEP, self.task)
            .await
            .expect("gateway stops in time")
            .unwrap()
            .unwrap();
    }
}

/// Status and JSON body of a response. Error bodies must be JSON objects
/// with a non-empty `message`.
pub async fn status_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = response.text().await.expect("read body");
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text:?}"));
    assert!(
        content_type.starts_with("application/json"),
        "status {status}: content-type {content_type:?}"
    );
    if status >= 400 {
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            !message.is_empty(),
            "status {status}: error without a message: {body}"
        );
    }
    (status, body)
}

/// Sends a request and returns status and JSON body.
pub async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = tokio::time::timeout(STEP, request.send())
        .await
        .expect("response in time")
        .expect("send");
    status_json(response).await
}

/// Awaits `future` for at most [`STEP`], naming `what` if it takes longer.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP:?}"))
}

/// The real entities service, running in this process.
pub struct Entities;

impl Entities {
    pub async fn start(nats: &NatsServer) -> Running {
        let app = within(
            "building entities",
            meterline_entities::App::build(meterline_entities::Settings::for_tests(nats.url())),
        )
        .await
        .expect("build entities");
        Running::spawn(|stop| app.run_until_stopped(stop))
    }
}

/// The real ingest service, running in this process.
pub struct Ingest;

impl Ingest {
    /// Builds (which registers its submit endpoint) and runs the service.
    pub async fn start(nats: &NatsServer) -> Running {
        let app = within(
            "building ingest",
            meterline_ingest::App::build(meterline_ingest::Settings::for_tests(nats.url())),
        )
        .await
        .expect("build ingest");
        Running::spawn(|stop| app.run_until_stopped(stop))
    }
}

/// A nats-server, the entities service, a gateway in front of it and one
/// org bootstrapped with a service user and access key.
pub struct World {
    pub nats: NatsServer,
    pub entities: Running,
    pub gw: Gateway,
    pub creds: Credentials,
    js: jetstream::Context,
}

impl World {
    pub async fn new(org: &str) -> World {
        Self::with_gateway(org, |_| {}).await
    }

    /// As [`World::new`], with the gateway's settings changed by `configure`.
    pub async fn with_gateway(org: &str, configure: impl FnOnce(&mut Settings)) -> World {
        let nats = NatsServer::start();
        let entities = Entities::start(&nats).await;
        let mut settings = Settings::for_tests(nats.url());
        configure(&mut settings);
        let gw = Gateway::start_with(settings).await;
        let creds = bootstrap(&nats, org).await;
        let js = jetstream::new(nats.client().await);
        World {
            nats,
            entities,
            gw,
            creds,
            js,
        }
    }

    pub fn org(&self) -> &str {
        &self.creds.org_id
    }

    /// A token from `/oauth/token` the way m3ter's SDK asks for one.
    pub async fn token(&self) -> String {
        token_for(&self.gw, &self.creds).await
    }

    async fn entities_stream(&self) -> jetstream::stream::Stream {
        within(
            "looking up ENTITIES",
            self.js.get_stream(subjects::ENTITIES_STREAM),
        )
        .await
        .expect("ENTITIES exists")
    }

    /// The number of messages in `ENTITIES`: every write is one.
    pub async fn entity_messages(&self) -> u64 {
        let mut stream = self.entities_stream().await;
        within("ENTITIES info", stream.info())
            .await
            .expect("stream info")
            .state
            .messages
    }

    /// The last event stored for one entity of this world's org, read from
    /// `ENTITIES` on `ent.<org>.<type>.<id>`.
    pub async fn last_event(&self, entity_type: &str, id: &str) -> EntityEvent {
        let subject = subjects::entity(self.org(), entity_type, id);
        let stream = self.entities_stream().await;
        let message = within(
            "reading ENTITIES",
            stream.direct_get_last_for_subject(subject.as_str()),
        )
        .await
        .unwrap_or_else(|e| panic!("nothing stored on {subject}: {e}"));
        serde_json::from_slice(&message.payload)
            .unwrap_or_else(|e| panic!("{subject} does not hold an entity event: {e}"))
    }

    /// Stops the gateway, then the entities service.
    pub async fn stop(self) {
        self.gw.stop().await;
        self.entities.stop().await;
        drop(self.nats);
    }
}

/// Creates an org with a service user and access key once the entities
/// service answers (it registers its endpoints after it starts running).
pub async fn bootstrap(nats: &NatsServer, org: &str) -> Credentials {
    // The entities service answers as soon as its `build` returned.
    let client = nats.client().await;
    within(
        "bootstrap",
        meterline_entities::bootstrap(&client, org, "Test org", "tester"),
    )
    .await
    .unwrap_or_else(|e| panic!("bootstrap {org}: {e}"))
}

/// A token for `creds` from `/oauth/token`: Basic credentials, JSON grant.
pub async fn token_for(gw: &Gateway, creds: &Credentials) -> String {
    let (status, body) = send(
        gw.http
            .post(gw.url("/oauth/token"))
            .basic_auth(&creds.access_key, Some(&creds.secret))
            .json(&json!({"grant_type": "client_credentials"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

/// A valid account body.
pub fn account(code: &str) -> Value {
    json!({"name": format!("Account {code}"), "code": code, "emailAddress": format!("{code}@example.com")})
}
