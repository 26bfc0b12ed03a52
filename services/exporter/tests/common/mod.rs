//! Helpers of the exporter tests: a real nats-server, the real entities
//! service and exporter talking over the bus, a real S3-compatible server,
//! and a real S3 client reading exports back.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};

use meterline_exporter::destination::{S3Config, S3};
use meterline_exporter::jobs::Cursor;
use meterline_shared::exportjob::{
    cursor_key, job_key, ExportJobRecord, ExportJobRequest, Trigger,
};
use meterline_shared::protocol::{EntityRequest, ExportsRequest};
use meterline_shared::testkit::{eventually, Entities, NatsServer, Running, S3Server};
use meterline_shared::{bus, provision, subjects, ServiceError};

pub const ORG: &str = "org-export";
pub const BUCKET: &str = "exports";

pub struct World {
    pub nats: NatsServer,
    pub s3: S3Server,
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub entities: Option<Running>,
    pub exporter: Option<Running>,
}

pub async fn start_exporter(nats: &NatsServer, settings: meterline_exporter::Settings) -> Running {
    let _ = nats;
    let app = meterline_exporter::App::build(settings)
        .await
        .expect("build exporter");
    Running::spawn(|stop| app.run_until_stopped(stop))
}

impl World {
    /// Servers, entities, an org, a bucket; the exporter with `tune`d test
    /// settings (`None`: not started).
    pub async fn new(tune: Option<fn(&mut meterline_exporter::Settings)>) -> World {
        let nats = NatsServer::start();
        let s3 = S3Server::start();
        s3.create_bucket(BUCKET);
        let app =
            meterline_entities::App::build(meterline_entities::Settings::for_tests(nats.url()))
                .await
                .expect("build entities");
        let entities = Running::spawn(|stop| app.run_until_stopped(stop));
        let client = nats.client().await;
        let js = async_nats::jetstream::new(client.clone());
        // As the scheduler does: jobs can be queued before an exporter runs.
        for config in [provision::jobs(), provision::exports()] {
            provision::ensure_stream(&js, config).await.unwrap();
        }
        let mut w = World {
            nats,
            s3,
            client,
            js,
            entities: Some(entities),
            exporter: None,
        };
        w.call(
            "organization",
            "create",
            EntityRequest {
                id: Some(ORG.into()),
                body: Some(json!({"name": "Export org"})),
                ..Default::default()
            },
        )
        .await
        .expect("create org");
        if let Some(tune) = tune {
            let mut settings = meterline_exporter::Settings::for_tests(w.nats.url());
            tune(&mut settings);
            w.exporter = Some(start_exporter(&w.nats, settings).await);
        }
        w
    }

    pub async fn call(
        &self,
        ty: &str,
        op: &str,
        req: EntityRequest,
    ) -> Result<Value, ServiceError> {
        Entities::new(self.client.clone(), ORG)
            .call(ty, op, req)
            .await
    }

    pub async fn create(&self, ty: &str, body: Value) -> Value {
        self.call(
            ty,
            "create",
            EntityRequest {
                body: Some(body),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("create {ty}: {e}"))
    }

    pub async fn update(&self, ty: &str, current: &Value, change: Value) -> Value {
        let mut body = current.clone();
        for (k, v) in change.as_object().unwrap() {
            body[k] = v.clone();
        }
        self.call(
            ty,
            "update",
            EntityRequest {
                id: Some(current["id"].as_str().unwrap().into()),
                body: Some(body),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("update {ty}: {e}"))
    }

    pub async fn delete(&self, ty: &str, id: &str) {
        self.call(
            ty,
            "delete",
            EntityRequest {
                id: Some(id.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("delete {ty}: {e}"));
    }

    pub async fn account(&self, code: &str, name: &str) -> Value {
        self.create(
            "account",
            json!({"name": name, "code": code, "emailAddress": format!("{code}@example.com")}),
        )
        .await
    }

    /// An S3 destination on the test server with its static keys.
    pub async fn destination(&self, code: &str, extra: Value) -> Value {
        let mut body = json!({
            "name": format!("Destination {code}"),
            "code": code,
            "bucketName": BUCKET,
            "prefix": format!("meterline/{code}"),
            "endpointUrl": self.s3.endpoint(),
            "region": "us-east-1",
            "pathStyle": true,
            "accessKeyId": self.s3.access_key(),
            "secretAccessKey": self.s3.secret_key(),
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        self.create("exportdestination", body).await
    }

    pub async fn schedule(
        &self,
        code: &str,
        types: &[&str],
        destinations: &[&str],
        extra: Value,
    ) -> Value {
        let mut body = json!({
            "name": format!("Schedule {code}"),
            "code": code,
            "sourceType": "OPERATIONAL",
            "operationalDataTypes": types,
            "destinationIds": destinations,
            "scheduleType": "HOUR",
            "period": 1,
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        self.create("exportschedule", body).await
    }

    /// Publishes a scheduled job for `schedule` and returns its id.
    pub async fn publish_job(&self, schedule: &str) -> String {
        let req = ExportJobRequest {
            job_id: uuid::Uuid::new_v4().to_string(),
            org_id: ORG.into(),
            schedule_id: Some(schedule.into()),
            slot: chrono::Utc::now(),
            trigger: Trigger::Schedule,
            adhoc: None,
        };
        self.publish_request(&req).await;
        req.job_id
    }

    pub async fn publish_request(&self, req: &ExportJobRequest) {
        let token = req.schedule_id.as_deref().unwrap_or("adhoc");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", req.job_id.as_str());
        self.js
            .publish_with_headers(
                subjects::export_job(ORG, token),
                headers,
                Bytes::from(serde_json::to_vec(req).unwrap()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    pub async fn job(&self, id: &str) -> Option<ExportJobRecord> {
        let kv = self
            .js
            .get_key_value(provision::EXPORT_JOBS_BUCKET)
            .await
            .ok()?;
        let v = kv.get(job_key(ORG, id)).await.ok()??;
        serde_json::from_slice(&v).ok()
    }

    /// Waits for the job to be final and returns it.
    pub async fn finished(&self, id: &str) -> ExportJobRecord {
        eventually(
            Duration::from_secs(60),
            "the export job to finish",
            || async { self.job(id).await.filter(|r| r.status.is_final()) },
        )
        .await
    }

    /// Runs a scheduled job to its end.
    pub async fn run(&self, schedule: &str) -> ExportJobRecord {
        let id = self.publish_job(schedule).await;
        self.finished(&id).await
    }

    pub async fn cursor(&self, schedule: &str) -> Option<Cursor> {
        let kv = self
            .js
            .get_key_value(provision::EXPORT_CURSORS_BUCKET)
            .await
            .ok()?;
        let v = kv.get(cursor_key(ORG, schedule)).await.ok()??;
        Cursor::parse(&v)
    }

    pub async fn exporter_request(
        &self,
        op: &str,
        req: ExportsRequest,
    ) -> Result<Value, ServiceError> {
        let reply = bus::request(
            &self.client,
            subjects::exporter_request(ORG, op),
            async_nats::HeaderMap::new(),
            Bytes::from(serde_json::to_vec(&req).unwrap()),
        )
        .await?;
        Ok(serde_json::from_slice(&reply).unwrap())
    }

    /// A real S3 client for the test server.
    pub async fn s3_client(&self) -> aws_sdk_s3::Client {
        let s3 = S3::connect(
            S3Config {
                bucket: BUCKET.into(),
                endpoint_url: Some(self.s3.endpoint()),
                path_style: true,
                access_key_id: Some(self.s3.access_key().into()),
                secret_access_key: Some(self.s3.secret_key().into()),
                ..Default::default()
            },
            meterline_exporter::destination::MIN_PART_BYTES,
        )
        .await;
        s3.client().clone()
    }

    /// A file of the download store (`export_files`), by name.
    pub async fn download_store_file(&self, name: &str) -> Vec<u8> {
        let store = self.js.get_object_store("export_files").await.unwrap();
        let mut obj = store.get(name).await.unwrap();
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut obj, &mut bytes)
            .await
            .unwrap();
        bytes
    }

    /// Every object under `prefix`, by key.
    pub async fn objects(&self, prefix: &str) -> BTreeMap<String, Vec<u8>> {
        let client = self.s3_client().await;
        let listed = client
            .list_objects_v2()
            .bucket(BUCKET)
            .prefix(prefix)
            .send()
            .await
            .expect("list objects");
        let mut out = BTreeMap::new();
        for o in listed.contents() {
            let key = o.key().unwrap().to_owned();
            let body = client
                .get_object()
                .bucket(BUCKET)
                .key(&key)
                .send()
                .await
                .expect("get object")
                .body
                .collect()
                .await
                .unwrap()
                .into_bytes()
                .to_vec();
            out.insert(key, body);
        }
        out
    }

    /// The `EVENTS` messages on `evt.<org>.dataexport.>` so far.
    pub async fn export_events(&self) -> Vec<Value> {
        self.stream_messages("EVENTS", &format!("evt.{ORG}.dataexport.>"))
            .await
    }

    /// The `EXPORTS` messages for `schedule` so far.
    pub async fn completions(&self, schedule: &str) -> Vec<Value> {
        self.stream_messages("EXPORTS", &subjects::export_complete(ORG, schedule))
            .await
    }

    async fn stream_messages(&self, stream: &str, filter: &str) -> Vec<Value> {
        let stream = self.js.get_stream(stream).await.unwrap();
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let pending = consumer.cached_info().num_pending;
        let mut out = Vec::new();
        if pending == 0 {
            return out;
        }
        let mut messages = consumer.messages().await.unwrap();
        while out.len() < pending as usize {
            let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
                .await
                .expect("a message in time")
                .unwrap()
                .unwrap();
            out.push(serde_json::from_slice(&m.payload).unwrap());
        }
        out
    }
}

/// A CSV file's rows as maps of column to cell (a small RFC 4180 reader).
pub fn csv_rows(bytes: &[u8]) -> (Vec<String>, Vec<BTreeMap<String, String>>) {
    let text = std::str::from_utf8(bytes).expect("utf-8 csv");
    let mut records: Vec<Vec<String>> = Vec::new();
    let mut field = String::new();
    let mut record = Vec::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(
        field.is_empty() && record.is_empty(),
        "the file ends mid-record"
    );
    let header = records.remove(0);
    let rows = records
        .into_iter()
        .map(|r| {
            assert_eq!(r.len(), header.len(), "a row has the header's width");
            header.iter().cloned().zip(r).collect()
        })
        .collect();
    (header, rows)
}

/// What the [`Proxy`] does with bytes going to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Forward,
    /// Drops the connection once `after` bytes have gone through (counted
    /// from when the mode was set); back to `Forward` after one cut if
    /// `once`.
    Cut {
        after: u64,
        once: bool,
    },
    /// Stops passing bytes on after `after` bytes, holding the connection
    /// open, until the mode changes.
    Hang {
        after: u64,
    },
}

/// A TCP proxy in front of a real server that can cut or stall
/// connections: a server dying or hanging mid-upload, on demand.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    state: std::sync::Arc<std::sync::Mutex<(Mode, u64)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: u16) -> Proxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = std::sync::Arc::new(std::sync::Mutex::new((Mode::Forward, 0u64)));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let back = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    });
                    let mut buf = vec![0u8; 16 * 1024];
                    'conn: loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let mut sent = 0;
                        while sent < n {
                            let (mode, passed) = *state.lock().unwrap();
                            let allowed = match mode {
                                Mode::Forward => n - sent,
                                Mode::Cut { after, once } => {
                                    if passed + (n - sent) as u64 > after {
                                        if once {
                                            *state.lock().unwrap() = (Mode::Forward, 0);
                                        }
                                        break 'conn;
                                    }
                                    n - sent
                                }
                                Mode::Hang { after } => {
                                    (after.saturating_sub(passed) as usize).min(n - sent)
                                }
                            };
                            if allowed == 0 {
                                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                                continue;
                            }
                            if sw.write_all(&buf[sent..sent + allowed]).await.is_err() {
                                break 'conn;
                            }
                            state.lock().unwrap().1 += allowed as u64;
                            sent += allowed;
                        }
                    }
                    back.abort();
                });
            }
        });
        Proxy { addr, state, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        *self.state.lock().unwrap() = (mode, 0);
    }

    /// Bytes passed on since the mode was set.
    pub fn passed(&self) -> u64 {
        self.state.lock().unwrap().1
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
