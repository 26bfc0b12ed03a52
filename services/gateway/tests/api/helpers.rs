//! A gateway on a free port against a real nats-server, and an HTTP client.

use std::net::SocketAddr;
use std::time::Duration;

use meterline_gateway::{App, Claims, Settings, TokenKeys, TEST_JWT_SECRET};
use meterline_shared::shutdown::CancellationToken;
use meterline_shared::testkit::NatsServer;
use serde_json::Value;

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
    pub async fn start(nats: &NatsServer) -> Gateway {
        Self::start_with(Settings::for_tests(nats.url())).await
    }

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
