//! Test kit: real servers on free ports in temp dirs, cleaned up on drop.
//!
//! [`NatsServer::start`] runs `nats-server` with JetStream (and
//! `sync_interval: always`, as in production) in a fresh temp dir, reads its
//! port from the ports file the server writes, and kills it on drop. The
//! binary is found at `$NATS_SERVER_BIN`, else in the project's `.tools/`
//! (where `make test` installs it), else on `PATH`.
//!
//! [`S3Server::start`] runs `s3s-fs`, an S3-compatible server storing
//! objects as files, on a free port in a fresh temp dir with its own access
//! key and secret. The binary is found at `$S3S_FS_BIN`, else in the
//! per-machine cache where `make tools` installs it
//! (`~/.cache/meterline/s3s-fs-<version>/bin/s3s-fs`).
//!
//! [`Entities`] is the entities service over the bus, as every service's
//! tests use it to set up the entities they need.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A running `nats-server`, killed and cleaned up on drop.
pub struct NatsServer {
    child: Option<Child>,
    dir: TempDir,
    url: String,
    port: u16,
}

fn workspace_root() -> PathBuf {
    // shared/ is one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Where the `nats-server` binary is.
pub fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let local = workspace_root().join(".tools/venv/bin/nats-server");
    if local.exists() {
        return local;
    }
    PathBuf::from("nats-server")
}

impl NatsServer {
    /// Starts a fresh server with JetStream in a new temp dir.
    pub fn start() -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("meterline-nats-")
            .tempdir()
            .expect("temp dir");
        Self::start_in(dir, None)
    }

    fn start_in(dir: TempDir, port: Option<u16>) -> NatsServer {
        crate::telemetry::init_for_tests();
        let store = dir.path().join("jetstream");
        let conf = dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{}\nmax_payload: 8MB\njetstream {{\n  store_dir: {:?}\n  sync_interval: always\n  max_memory_store: 256MB\n  max_file_store: 8GB\n}}\n",
                port.map(i64::from).unwrap_or(-1),
                store.display().to_string()
            ),
        )
        .expect("write nats.conf");
        let ports_dir = dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).expect("ports dir");
        let bin = nats_server_bin();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("TEST_LOG").is_some() { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run nats-server ({}): {e}. Run `make test` (it installs nats-server 2.15.1 into .tools/), \
                     or set NATS_SERVER_BIN.",
                    bin.display()
                )
            });
        let url = read_ports_file(&ports_dir, child.id());
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port in ports file");
        NatsServer {
            child: Some(child),
            dir,
            url,
            port,
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id while it runs (the bench reads its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    /// A connected client.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(&self.url)
            .await
            .expect("connect to test nats-server")
    }

    /// Stops the server (as a crash would: SIGKILL) and starts it again on
    /// the same port and store.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
        let fresh = Self::start_in(dir, Some(self.port));
        *self = fresh;
    }
}

fn read_ports_file(dir: &Path, pid: u32) -> String {
    let path = dir.join(format!("nats-server_{pid}.ports"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                if let Some(url) = v["nats"][0].as_str() {
                    return url.replace("0.0.0.0", "127.0.0.1");
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "nats-server did not write {} in time",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `s3s-fs` version `make tools` installs.
pub const S3S_FS_VERSION: &str = "0.14.1";

/// Where the `s3s-fs` binary is: `$S3S_FS_BIN`, else the per-machine cache
/// (`$XDG_CACHE_HOME` or `~/.cache`, then `meterline/s3s-fs-<version>`).
pub fn s3s_fs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("S3S_FS_BIN") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache
        .join("meterline")
        .join(format!("s3s-fs-{S3S_FS_VERSION}"))
        .join("bin")
        .join("s3s-fs")
}

/// A running `s3s-fs` (an S3-compatible server keeping objects as files),
/// killed and cleaned up on drop. Buckets are folders of its root.
pub struct S3Server {
    child: Option<Child>,
    dir: TempDir,
    port: u16,
    access_key: String,
    secret_key: String,
}

impl S3Server {
    /// The server's process id while it runs (the bench reads its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts a server on a free port with a fresh root and fresh keys.
    pub fn start() -> S3Server {
        crate::telemetry::init_for_tests();
        let dir = tempfile::Builder::new()
            .prefix("meterline-s3-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(dir.path().join("root")).expect("s3 root");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let suffix = ulid::Ulid::new().to_string().to_ascii_lowercase();
        let mut server = S3Server {
            child: None,
            dir,
            port,
            access_key: format!("AK{}", &suffix[..16]),
            secret_key: format!("secret-{suffix}"),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let bin = s3s_fs_bin();
        let child = Command::new(&bin)
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--access-key")
            .arg(&self.access_key)
            .arg("--secret-key")
            .arg(&self.secret_key)
            .arg(self.dir.path().join("root"))
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("TEST_LOG").is_some() { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run s3s-fs ({}): {e}. Run `make tools` (it installs s3s-fs {S3S_FS_VERSION} \
                     once per machine with `cargo install`), or set S3S_FS_BIN.",
                    bin.display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "s3s-fs exited at start ({status}); is port {} taken?",
                    self.port
                );
            }
            assert!(Instant::now() < deadline, "s3s-fs did not listen in time");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// Creates a bucket (a folder of the server's root).
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.dir.path().join("root").join(name)).expect("bucket folder");
    }

    /// Stops the server as a crash would (SIGKILL); [`S3Server::resume`]
    /// starts it again on the same port and data.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a killed server again.
    pub fn resume(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `Some` once `EVENTS` holds a copy of every `ENTITIES` message: it
/// sources them on its own time, so tests and benches wait for this before
/// looking at what follows an entity change. Both counts are the server's
/// (the stream's messages, and what a fresh consumer of the entity events
/// has pending), so it costs two requests however many entities there are.
pub async fn events_caught_up(js: &async_nats::jetstream::Context) -> Option<()> {
    use async_nats::jetstream::consumer::{pull, AckPolicy};
    let mut entities = js.get_stream(crate::subjects::ENTITIES_STREAM).await.ok()?;
    let changes = entities.info().await.ok()?.state.messages;
    let events = js.get_stream(crate::subjects::EVENTS_STREAM).await.ok()?;
    let consumer = events
        .create_consumer(pull::Config {
            filter_subject: "evt.*.entity.>".into(),
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(10),
            ..Default::default()
        })
        .await
        .ok()?;
    let info = consumer.cached_info();
    let sourced = info.num_pending;
    let _ = events.delete_consumer(&info.name).await;
    (sourced >= changes).then_some(())
}

/// A service running in this process until stopped: what tests and benches
/// hold for each `App::run_until_stopped` they start.
pub struct Running {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Spawns `run` with a fresh shutdown token.
    pub fn spawn<F>(run: impl FnOnce(tokio_util::sync::CancellationToken) -> F) -> Running
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(run(stop.clone()));
        Running { stop, task }
    }

    /// Shuts the service down as a signal would and checks it ran cleanly.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the service stopped in time")
            .expect("the service task")
            .expect("the service ran cleanly");
    }

    /// Ends the service without draining, as a crash would.
    pub fn kill(self) {
        self.task.abort();
    }
}

/// A test's client of the entities service over the bus, writing as actor
/// `tester`: the request every service's tests make to set up entities.
pub struct Entities {
    client: async_nats::Client,
    org: String,
}

impl Entities {
    pub fn new(client: async_nats::Client, org: &str) -> Entities {
        Entities {
            client,
            org: org.to_owned(),
        }
    }

    /// Any operation, in any org, with the reply body as JSON.
    pub async fn call_in(
        &self,
        org: &str,
        ty: &str,
        op: &str,
        req: crate::protocol::EntityRequest,
    ) -> Result<serde_json::Value, crate::ServiceError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(crate::envelope::HEADER_ACTOR, "tester");
        let payload = bytes::Bytes::from(serde_json::to_vec(&req).expect("request serializes"));
        let reply = crate::bus::request(
            &self.client,
            crate::subjects::entities_request(org, ty, op),
            headers,
            payload,
        )
        .await?;
        Ok(serde_json::from_slice(&reply).expect("reply is JSON"))
    }

    pub async fn call(
        &self,
        ty: &str,
        op: &str,
        req: crate::protocol::EntityRequest,
    ) -> Result<serde_json::Value, crate::ServiceError> {
        self.call_in(&self.org, ty, op, req).await
    }

    pub async fn create(
        &self,
        ty: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, crate::ServiceError> {
        let req = crate::protocol::EntityRequest {
            body: Some(body),
            ..Default::default()
        };
        self.call(ty, "create", req).await
    }

    pub async fn update(
        &self,
        ty: &str,
        id: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, crate::ServiceError> {
        let req = crate::protocol::EntityRequest {
            id: Some(id.into()),
            body: Some(body),
            ..Default::default()
        };
        self.call(ty, "update", req).await
    }

    pub async fn get(&self, ty: &str, id: &str) -> Result<serde_json::Value, crate::ServiceError> {
        let req = crate::protocol::EntityRequest {
            id: Some(id.into()),
            ..Default::default()
        };
        self.call(ty, "get", req).await
    }

    pub async fn delete(
        &self,
        ty: &str,
        id: &str,
    ) -> Result<serde_json::Value, crate::ServiceError> {
        let req = crate::protocol::EntityRequest {
            id: Some(id.into()),
            ..Default::default()
        };
        self.call(ty, "delete", req).await
    }
}
