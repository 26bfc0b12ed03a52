//! Helpers shared by the entities tests: a real nats-server and the real
//! entities service, talking over the bus.

#![allow(dead_code)]

use serde_json::{json, Value};

use meterline_entities::{App, Settings};
use meterline_shared::protocol::EntityRequest;
use meterline_shared::testkit::{Entities, NatsServer, Running};
use meterline_shared::{subjects, ServiceError};

pub const ORG: &str = "org-test";

pub async fn start_entities(nats: &NatsServer) -> Running {
    let app = App::build(Settings::for_tests(nats.url()))
        .await
        .expect("build entities");
    // `build` returns once the server has the endpoints' subscriptions.
    Running::spawn(|stop| app.run_until_stopped(stop))
}

/// A test world: a server, the service, a client and an org.
pub struct World {
    pub nats: NatsServer,
    pub client: async_nats::Client,
    pub entities: Option<Running>,
}

impl World {
    pub async fn new() -> World {
        let nats = NatsServer::start();
        let entities = start_entities(&nats).await;
        let client = nats.client().await;
        let w = World {
            nats,
            client,
            entities: Some(entities),
        };
        w.call(
            "organization",
            "create",
            EntityRequest {
                id: Some(ORG.into()),
                body: Some(json!({"name": "Test org"})),
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

    pub async fn call(
        &self,
        ty: &str,
        op: &str,
        req: EntityRequest,
    ) -> Result<Value, ServiceError> {
        self.bus().call(ty, op, req).await
    }

    pub async fn call_in(
        &self,
        org: &str,
        ty: &str,
        op: &str,
        req: EntityRequest,
    ) -> Result<Value, ServiceError> {
        self.bus().call_in(org, ty, op, req).await
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

    pub async fn delete(&self, ty: &str, id: &str) -> Result<Value, ServiceError> {
        self.bus().delete(ty, id).await
    }

    pub async fn list_all(&self, ty: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut next = None;
        loop {
            let page = self
                .call(
                    ty,
                    "list",
                    EntityRequest {
                        page_size: Some(100),
                        next_token: next.clone(),
                        ..Default::default()
                    },
                )
                .await
                .expect("list");
            out.extend(page["data"].as_array().unwrap().iter().cloned());
            match page.get("nextToken").and_then(Value::as_str) {
                Some(t) => next = Some(t.to_owned()),
                None => return out,
            }
        }
    }

    /// Number of messages in `ENTITIES`: a write that was refused adds none.
    pub async fn entity_messages(&self) -> u64 {
        let js = async_nats::jetstream::new(self.client.clone());
        let mut s = js.get_stream(subjects::ENTITIES_STREAM).await.unwrap();
        s.info().await.unwrap().state.messages
    }
}

pub fn account(code: &str) -> Value {
    json!({"name": format!("Account {code}"), "code": code, "emailAddress": format!("{code}@example.test")})
}
