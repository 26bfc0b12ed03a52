//! Helpers of the notifier tests: a real nats-server, the real entities and
//! notifier services, and a real webhook receiver (Python, verifying every
//! signature with the official `standardwebhooks` library).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use serde_json::{json, Value};

use meterline_shared::protocol::EntityRequest;
use meterline_shared::testkit::{self, eventually, Entities, NatsServer, Running};
use meterline_shared::{bus, subjects, ServiceError};

pub const ORG: &str = "org-n";
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const API_KEY: &str = "key-123";
pub const WAIT: Duration = Duration::from_secs(30);

pub async fn start_entities(nats: &NatsServer, allow: &str) -> Running {
    let mut s = meterline_entities::Settings::for_tests(nats.url());
    s.webhook_allow_networks = allow.to_owned();
    let app = meterline_entities::App::build(s)
        .await
        .expect("build entities");
    Running::spawn(|stop| app.run_until_stopped(stop))
}

pub async fn start_notifier(settings: meterline_notifier::Settings) -> Running {
    let app = meterline_notifier::App::build(settings)
        .await
        .expect("build notifier");
    Running::spawn(|stop| app.run_until_stopped(stop))
}

/// A webhook receiver process, killed on drop.
pub struct Receiver {
    child: Child,
    pub port: u16,
    http: reqwest::Client,
}

fn python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let venv = root.join(".tools/venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run `make tools` (it installs the standardwebhooks library the tests verify signatures with)",
        venv.display()
    );
    venv
}

impl Receiver {
    pub fn start(secret: &str) -> Receiver {
        Self::start_with(&[secret])
    }

    pub fn start_with(args: &[&str]) -> Receiver {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/receiver.py");
        let mut child = Command::new(python())
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the webhook receiver");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the receiver prints its port");
        let port = line.trim().parse().expect("a port");
        Receiver {
            child,
            port,
            http: reqwest::Client::new(),
        }
    }

    /// The URL of hook `name` answering with `plan` (see receiver.py).
    pub fn url(&self, name: &str, plan: &str) -> String {
        format!("http://127.0.0.1:{}/h/{name}?plan={plan}", self.port)
    }

    /// Every request received so far.
    pub async fn log(&self) -> Vec<Value> {
        self.http
            .get(format!("http://127.0.0.1:{}/log", self.port))
            .send()
            .await
            .expect("receiver answers")
            .json()
            .await
            .expect("receiver log is JSON")
    }

    /// The requests to hook `name`.
    pub async fn hits(&self, name: &str) -> Vec<Value> {
        self.log()
            .await
            .into_iter()
            .filter(|r| r["name"] == name)
            .collect()
    }

    /// Waits until hook `name` got at least `n` requests; returns them all.
    pub async fn wait_hits(&self, name: &str, n: usize) -> Vec<Value> {
        eventually(WAIT, &format!("{n} requests to {name}"), || async {
            let hits = self.hits(name).await;
            (hits.len() >= n).then_some(hits)
        })
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client, an org, and calls to the services over the bus.
pub struct World {
    pub client: async_nats::Client,
}

impl World {
    pub async fn new(nats: &NatsServer) -> World {
        let w = World {
            client: nats.client().await,
        };
        w.entity(
            "organization",
            "create",
            EntityRequest {
                id: Some(ORG.into()),
                body: Some(json!({"name": "Notifier test org"})),
                ..Default::default()
            },
        )
        .await
        .expect("create org");
        w
    }

    /// The entities service over the bus, in the test org.
    pub fn bus(&self) -> Entities {
        Entities::new(self.client.clone(), ORG)
    }

    pub async fn entity(
        &self,
        ty: &str,
        op: &str,
        req: EntityRequest,
    ) -> Result<Value, ServiceError> {
        self.bus().call(ty, op, req).await
    }

    pub async fn create(&self, ty: &str, body: Value) -> Result<Value, ServiceError> {
        self.bus().create(ty, body).await
    }

    pub async fn update(&self, ty: &str, id: &str, body: Value) -> Result<Value, ServiceError> {
        self.bus().update(ty, id, body).await
    }

    pub async fn get(&self, ty: &str, id: &str) -> Result<Value, ServiceError> {
        self.bus().get(ty, id).await
    }

    /// A request to the notifier.
    pub async fn notifier(&self, op: &str, body: Value) -> Result<Value, ServiceError> {
        let reply = bus::request(
            &self.client,
            subjects::notifier_request(ORG, op),
            async_nats::HeaderMap::new(),
            Bytes::from(body.to_string()),
        )
        .await?;
        Ok(serde_json::from_slice(&reply).expect("reply is JSON"))
    }

    pub async fn webhook(&self, url: &str) -> String {
        self.webhook_with(url, SECRET).await
    }

    pub async fn webhook_with(&self, url: &str, secret: &str) -> String {
        let w = self
            .create(
                "webhook",
                json!({
                    "name": "hook", "description": "test hook", "url": url,
                    "credentials": {"type": "M3TER_SIGNED_REQUEST", "apiKey": API_KEY, "secret": secret},
                }),
            )
            .await
            .expect("create webhook");
        w["id"].as_str().unwrap().to_owned()
    }

    /// A rule on `event`: `calculation`, or always firing when `None`.
    pub async fn rule(&self, code: &str, event: &str, calculation: Option<&str>) -> String {
        let mut body = json!({
            "code": code, "name": code, "description": "test rule", "eventName": event,
            "active": true, "alwaysFireEvent": calculation.is_none(),
        });
        if let Some(c) = calculation {
            body["calculation"] = json!(c);
        }
        let r = self
            .create("notificationrule", body)
            .await
            .expect("create rule");
        r["id"].as_str().unwrap().to_owned()
    }

    pub async fn link(&self, rule: &str, webhook: &str) {
        self.create(
            "integrationconfig",
            json!({
                "entityType": "Notification", "entityId": rule,
                "destination": "Webhook", "destinationId": webhook,
            }),
        )
        .await
        .expect("link rule to webhook");
    }

    pub async fn account(&self, code: &str) -> String {
        let a = self
            .create(
                "account",
                json!({"code": code, "name": format!("Account {code}"), "emailAddress": "a@example.com"}),
            )
            .await
            .expect("create account");
        a["id"].as_str().unwrap().to_owned()
    }

    /// Waits until the notifier has handled every event and settled every
    /// delivery it queued (delivered or dead-lettered).
    pub async fn settled(&self) {
        let js = jetstream::new(self.client.clone());
        eventually(WAIT, "events handled and deliveries settled", || {
            let js = js.clone();
            async move {
                // Every entity change must be on EVENTS before the
                // notifier can have handled it.
                testkit::events_caught_up(&js).await?;
                let mut events = js.get_stream(subjects::EVENTS_STREAM).await.ok()?;
                let mut consumer: jetstream::consumer::PullConsumer =
                    events.get_consumer("notifier").await.ok()?;
                let info = consumer.info().await.ok()?;
                let last = events.info().await.ok()?.state.last_sequence;
                let idle = info.num_pending == 0
                    && info.num_ack_pending == 0
                    && info.ack_floor.stream_sequence >= last;
                let mut deliveries = js.get_stream(subjects::DELIVERIES_STREAM).await.ok()?;
                let queued = deliveries.info().await.ok()?.state.messages;
                (idle && queued == 0).then_some(())
            }
        })
        .await
    }
}
