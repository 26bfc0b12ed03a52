//! The system under test: one real nats-server, the entities service, the
//! services a test asks for and the gateway, all in this process, with an
//! organization and a service user bootstrapped.

use serde_json::{json, Value};

use meterline_shared::protocol::Credentials;
use meterline_shared::testkit::{NatsServer, Running};

/// Services a system test may run beside entities and the gateway.
#[derive(Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)] // each test binary uses some of them
pub enum Service {
    Ingest,
    Scheduler,
    Exporter,
    Notifier,
}

pub struct System {
    /// Held so the server lives as long as the system.
    _nats: NatsServer,
    #[allow(dead_code)] // not every test binary reads the bus itself
    pub client: async_nats::Client,
    /// `http://<gateway>`.
    pub base: String,
    pub creds: Credentials,
    /// Stopped in reverse start order: the gateway first, entities last.
    running: Vec<Running>,
}

impl System {
    /// Starts entities, then `services` in the order given, then the
    /// gateway, and bootstraps organization `org` with a service user.
    pub async fn start(services: &[Service], org: &str, org_name: &str, user: &str) -> System {
        let nats = NatsServer::start();
        let url = nats.url().to_owned();
        let mut running = Vec::new();
        let app = meterline_entities::App::build(meterline_entities::Settings::for_tests(&url))
            .await
            .expect("build entities");
        running.push(Running::spawn(|stop| app.run_until_stopped(stop)));
        for service in services {
            running.push(match service {
                Service::Ingest => {
                    let app =
                        meterline_ingest::App::build(meterline_ingest::Settings::for_tests(&url))
                            .await
                            .expect("build ingest");
                    Running::spawn(|stop| app.run_until_stopped(stop))
                }
                Service::Scheduler => {
                    let app = meterline_scheduler::App::build(
                        meterline_scheduler::Settings::for_tests(&url),
                    )
                    .await
                    .expect("build scheduler");
                    Running::spawn(|stop| app.run_until_stopped(stop))
                }
                Service::Exporter => {
                    let app = meterline_exporter::App::build(
                        meterline_exporter::Settings::for_tests(&url),
                    )
                    .await
                    .expect("build exporter");
                    Running::spawn(|stop| app.run_until_stopped(stop))
                }
                Service::Notifier => {
                    let app = meterline_notifier::App::build(
                        meterline_notifier::Settings::for_tests(&url),
                    )
                    .await
                    .expect("build notifier");
                    Running::spawn(|stop| app.run_until_stopped(stop))
                }
            });
        }
        let gateway = meterline_gateway::App::build(meterline_gateway::Settings::for_tests(&url))
            .await
            .expect("build gateway");
        let base = format!("http://{}", gateway.http_addr());
        running.push(Running::spawn(|stop| gateway.run_until_stopped(stop)));
        // The services answer as soon as their `build` returned.
        let client = nats.client().await;
        let creds = meterline_entities::bootstrap(&client, org, org_name, user)
            .await
            .expect("bootstrap an organization and a service user");
        System {
            _nats: nats,
            client,
            base,
            creds,
            running,
        }
    }

    /// A bearer token for the service user, from `/oauth/token`.
    #[allow(dead_code)] // not every test binary talks HTTP itself
    pub async fn bearer(&self, http: &reqwest::Client) -> String {
        let token: Value = http
            .post(format!("{}/oauth/token", self.base))
            .basic_auth(&self.creds.access_key, Some(&self.creds.secret))
            .json(&json!({"grant_type": "client_credentials"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        token["access_token"].as_str().unwrap().to_owned()
    }

    /// Stops every service cleanly, the gateway first.
    pub async fn stop(mut self) {
        while let Some(service) = self.running.pop() {
            service.stop().await;
        }
    }
}
