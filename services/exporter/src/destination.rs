//! Where export files go: every destination is a [`Destination`], so the
//! job runner streams a file the same way to each, and one conformance test
//! suite (`tests/destinations.rs`) runs against every implementation.
//!
//! - [`S3`]: any S3-compatible store through aws-sdk-s3. Credentials come
//!   from the destination's static `accessKeyId`/`secretAccessKey` (a
//!   Meterline addition for S3-compatible stores), else from the standard
//!   AWS chain (environment, profile, web identity, container and instance
//!   roles); with `iamRoleArn` that identity assumes the role, as m3ter
//!   does. `endpointUrl`, `region` and `pathStyle` reach other stores: GCS
//!   through its S3-compatible XML API (`https://storage.googleapis.com`
//!   with HMAC keys), MinIO, Ceph, s3s. Files up to one part are one
//!   `PutObject`; larger ones a multipart upload, so memory stays at one
//!   part whatever the file size.
//! - [`ObjectStore`]: the `export_files` JetStream object store, for exports
//!   without a destination ("download locally"); the gateway serves these
//!   files through signed URLs.

use std::time::Duration;

use async_nats::jetstream::object_store;
use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use futures::channel::mpsc;
use futures::SinkExt;
use serde_json::Value;

/// A failed delivery, with a message fit for the job's `error`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct DeliveryError(pub String);

/// How object keys are laid out (m3ter's `partitionOrder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PartitionOrder {
    /// `orgId=../date=../hour=../type=../` (m3ter's default).
    #[default]
    TimeFirst,
    /// `orgId=../type=../date=../hour=../`.
    TypeFirst,
}

impl PartitionOrder {
    pub fn parse(v: Option<&str>) -> Result<PartitionOrder, String> {
        match v {
            None | Some("TIME_FIRST") => Ok(PartitionOrder::TimeFirst),
            Some("TYPE_FIRST") => Ok(PartitionOrder::TypeFirst),
            Some(other) => Err(format!(
                "partitionOrder {other:?} is not one of TIME_FIRST, TYPE_FIRST"
            )),
        }
    }
}

/// One destination: objects are written under keys the caller chooses.
#[async_trait]
pub trait Destination: Send + Sync {
    /// Names the destination in errors and logs (no secrets).
    fn describe(&self) -> String;
    /// The key prefix files go under (the destination's `prefix`), without
    /// a trailing `/`; empty for the bucket's root.
    fn prefix(&self) -> &str;
    fn partition_order(&self) -> PartitionOrder;
    /// The URI an object of `key` is known by: `s3://bucket/key`, or
    /// `export_files:key`.
    fn uri(&self, key: &str) -> String;
    /// Checks the destination can be written to (it exists, the
    /// credentials are accepted), before a job writes anything.
    async fn check(&self) -> Result<(), DeliveryError>;
    /// Starts writing the object `key`; it becomes visible, replacing any
    /// object of that key, only when [`Upload::finish`] succeeds.
    async fn begin(&self, key: &str, content_type: &str) -> Result<Box<dyn Upload>, DeliveryError>;
    /// The whole object `key`, or `None` if there is none. For checks and
    /// tests: exports never read back.
    async fn read(&self, key: &str) -> Result<Option<Vec<u8>>, DeliveryError>;
}

/// The SHA-256 of an object's bytes.
pub type Sha256Digest = [u8; 32];

/// An object being written.
#[async_trait]
pub trait Upload: Send {
    async fn write(&mut self, chunk: Bytes) -> Result<(), DeliveryError>;
    /// Completes the object and returns its URI. `sha256` is the digest of
    /// every byte written: the writer hashes them anyway (for the
    /// manifest), so a store that records a digest takes it from here
    /// instead of hashing the bytes again.
    async fn finish(self: Box<Self>, sha256: Sha256Digest) -> Result<String, DeliveryError>;
    /// Gives up: nothing becomes visible (best effort).
    async fn abort(self: Box<Self>);
}

/// Settings of an S3 destination, read from an `exportdestination` entity.
#[derive(Clone, Default)]
pub struct S3Config {
    pub bucket: String,
    pub prefix: String,
    pub partition_order: PartitionOrder,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub path_style: bool,
    pub access_key_id: Option<String>,
    /// Clear text, unsealed by the caller; never printed.
    pub secret_access_key: Option<String>,
    pub iam_role_arn: Option<String>,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .field("iam_role_arn", &self.iam_role_arn)
            .finish_non_exhaustive()
    }
}

fn text(v: &Value, field: &str) -> Option<String> {
    v.get(field)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

impl S3Config {
    /// From a destination's stored state; `open` unseals secrets.
    pub fn from_entity(
        state: &Value,
        open: impl Fn(&str) -> Result<String, String>,
    ) -> Result<S3Config, String> {
        match state.get("destinationType").and_then(Value::as_str) {
            None | Some("S3") => {}
            Some("GCS") => {
                return Err(
                    "GCS destinations with workload identity federation are not supported; \
                     create an S3 destination with endpointUrl https://storage.googleapis.com \
                     and an HMAC key (accessKeyId, secretAccessKey) instead"
                        .into(),
                )
            }
            Some(other) => return Err(format!("destinationType {other:?} is not supported")),
        }
        let bucket = text(state, "bucketName").ok_or("the destination has no bucketName")?;
        let secret = match text(state, "secretAccessKey") {
            Some(sealed) => Some(open(&sealed)?),
            None => None,
        };
        Ok(S3Config {
            bucket,
            prefix: text(state, "prefix")
                .map(|p| p.trim_matches('/').to_owned())
                .unwrap_or_default(),
            partition_order: PartitionOrder::parse(
                state.get("partitionOrder").and_then(Value::as_str),
            )?,
            region: text(state, "region"),
            endpoint_url: text(state, "endpointUrl"),
            path_style: state
                .get("pathStyle")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            access_key_id: text(state, "accessKeyId"),
            secret_access_key: secret,
            iam_role_arn: text(state, "iamRoleArn"),
        })
    }
}

/// The smallest part S3 accepts (but the last).
pub const MIN_PART_BYTES: usize = 5 * 1024 * 1024;

/// An S3 (or S3-compatible) bucket.
pub struct S3 {
    client: aws_sdk_s3::Client,
    config: S3Config,
    part_bytes: usize,
}

fn sdk_error<E: std::error::Error + aws_sdk_s3::error::ProvideErrorMetadata + 'static>(
    what: &str,
    target: &str,
    e: aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> DeliveryError {
    use aws_sdk_s3::error::SdkError;
    let detail = match &e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code().unwrap_or_default();
            let message = se.err().message().unwrap_or_default();
            let hint = match status {
                401 | 403 => " (access denied: check the destination's credentials or role)",
                _ => "",
            };
            format!("the server answered {status} {code} {message}{hint}")
        }
        SdkError::DispatchFailure(d) => {
            let mut s = "the server could not be reached".to_owned();
            if let Some(c) = d.as_connector_error() {
                let mut src: Option<&dyn std::error::Error> = Some(c);
                while let Some(err) = src {
                    s = format!("{s}: {err}");
                    src = err.source();
                }
            }
            s
        }
        SdkError::TimeoutError(_) => "the server did not answer in time".to_owned(),
        SdkError::ResponseError(_) => "the server's answer was not understood".to_owned(),
        other => other.to_string(),
    };
    DeliveryError(format!("{what} {target} failed: {}", detail.trim()))
}

impl S3 {
    /// A client for `config`. Reaches nothing yet: errors show on first use.
    pub async fn connect(config: S3Config, part_bytes: usize) -> S3 {
        use aws_config::timeout::TimeoutConfig;
        use aws_config::{BehaviorVersion, Region};
        let region = Region::new(config.region.clone().unwrap_or_else(|| "us-east-1".into()));
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(60))
            .operation_attempt_timeout(Duration::from_secs(300))
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(region.clone())
            .timeout_config(timeouts);
        let static_keys = match (&config.access_key_id, &config.secret_access_key) {
            (Some(k), Some(s)) => Some(aws_sdk_s3::config::Credentials::new(
                k,
                s,
                None,
                None,
                "meterline-destination",
            )),
            _ => None,
        };
        match (&config.iam_role_arn, static_keys) {
            (Some(role), keys) => {
                use aws_sdk_s3::config::SharedCredentialsProvider;
                // The role is assumed by the static keys if given, else by
                // whatever identity the standard chain finds.
                let base = match keys {
                    Some(k) => SharedCredentialsProvider::new(k),
                    None => SharedCredentialsProvider::new(
                        aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                            .region(region.clone())
                            .build()
                            .await,
                    ),
                };
                let provider = aws_config::sts::AssumeRoleProvider::builder(role)
                    .session_name("meterline-export")
                    .region(region)
                    .build_from_provider(base)
                    .await;
                loader = loader.credentials_provider(provider);
            }
            (None, Some(k)) => loader = loader.credentials_provider(k),
            (None, None) => {}
        }
        let sdk = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&sdk).force_path_style(config.path_style);
        if let Some(url) = &config.endpoint_url {
            b = b.endpoint_url(url);
        }
        S3 {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            config,
            part_bytes: part_bytes.max(MIN_PART_BYTES),
        }
    }

    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }
}

#[async_trait]
impl Destination for S3 {
    fn describe(&self) -> String {
        match &self.config.endpoint_url {
            Some(url) => format!("s3://{} at {url}", self.config.bucket),
            None => format!("s3://{}", self.config.bucket),
        }
    }

    fn prefix(&self) -> &str {
        &self.config.prefix
    }

    fn partition_order(&self) -> PartitionOrder {
        self.config.partition_order
    }

    fn uri(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.config.bucket)
    }

    async fn check(&self) -> Result<(), DeliveryError> {
        let target = format!("s3://{}", self.config.bucket);
        match self
            .client
            .head_bucket()
            .bucket(&self.config.bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => {
                Err(DeliveryError(format!(
                    "checking {target} failed: the bucket does not exist"
                )))
            }
            Err(e) => Err(sdk_error("checking", &target, e)),
        }
    }

    async fn begin(&self, key: &str, content_type: &str) -> Result<Box<dyn Upload>, DeliveryError> {
        Ok(Box::new(S3Upload {
            client: self.client.clone(),
            bucket: self.config.bucket.clone(),
            key: key.to_owned(),
            content_type: content_type.to_owned(),
            buf: Vec::new(),
            part_bytes: self.part_bytes,
            upload_id: None,
            sent: 0,
            in_flight: tokio::task::JoinSet::new(),
            parts: Vec::new(),
        }))
    }

    async fn read(&self, key: &str) -> Result<Option<Vec<u8>>, DeliveryError> {
        let target = format!("s3://{}/{key}", self.config.bucket);
        match self
            .client
            .get_object()
            .bucket(&self.config.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => {
                let bytes = out
                    .body
                    .collect()
                    .await
                    .map_err(|e| DeliveryError(format!("reading {target} failed: {e}")))?;
                Ok(Some(bytes.into_bytes().to_vec()))
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(sdk_error("reading", &target, e)),
        }
    }
}

/// Parts of one multipart upload sent at once: the rows of the next part
/// are encoded while the previous ones travel.
const PARTS_IN_FLIGHT: usize = 3;

struct S3Upload {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    content_type: String,
    buf: Vec<u8>,
    part_bytes: usize,
    upload_id: Option<String>,
    /// Parts sent so far (the number of the last one).
    sent: i32,
    in_flight: tokio::task::JoinSet<Result<CompletedPart, DeliveryError>>,
    parts: Vec<CompletedPart>,
}

impl S3Upload {
    fn target(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    /// Waits for one part in flight to be stored.
    async fn settle_one(&mut self) -> Result<(), DeliveryError> {
        match self.in_flight.join_next().await {
            None => Ok(()),
            Some(Ok(part)) => {
                self.parts.push(part?);
                Ok(())
            }
            Some(Err(e)) => Err(DeliveryError(format!(
                "uploading a part of {} stopped: {e}",
                self.target()
            ))),
        }
    }

    /// Sends `body` as the next part, once fewer than [`PARTS_IN_FLIGHT`]
    /// are on their way.
    async fn upload_part(&mut self, body: Vec<u8>) -> Result<(), DeliveryError> {
        if self.upload_id.is_none() {
            let out = self
                .client
                .create_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .content_type(&self.content_type)
                .send()
                .await
                .map_err(|e| sdk_error("starting the upload of", &self.target(), e))?;
            self.upload_id = Some(
                out.upload_id
                    .ok_or_else(|| DeliveryError("the server gave no upload id".into()))?,
            );
        }
        while self.in_flight.len() >= PARTS_IN_FLIGHT {
            self.settle_one().await?;
        }
        self.sent += 1;
        let number = self.sent;
        let request = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(self.upload_id.clone().unwrap_or_default())
            .part_number(number)
            .body(ByteStream::from(body))
            // The part's integrity is checked by the server against its
            // CRC32 checksum (and by TLS where the endpoint has it); signing
            // the payload too would hash every byte with SHA-256 once more
            // on each side.
            .customize()
            .disable_payload_signing();
        let target = self.target();
        self.in_flight.spawn(async move {
            let out = request
                .send()
                .await
                .map_err(|e| sdk_error(&format!("uploading part {number} of"), &target, e))?;
            Ok(CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag)
                .set_checksum_crc32(out.checksum_crc32)
                .set_checksum_crc32_c(out.checksum_crc32_c)
                .set_checksum_crc64_nvme(out.checksum_crc64_nvme)
                .set_checksum_sha1(out.checksum_sha1)
                .set_checksum_sha256(out.checksum_sha256)
                .build())
        });
        Ok(())
    }
}

#[async_trait]
impl Upload for S3Upload {
    async fn write(&mut self, mut chunk: Bytes) -> Result<(), DeliveryError> {
        // Each part's buffer is allocated once at its full size and filled
        // to exactly that size: no regrowing, no copying of the rest.
        while !chunk.is_empty() {
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(self.part_bytes);
            }
            let take = (self.part_bytes - self.buf.len()).min(chunk.len());
            self.buf.extend_from_slice(&chunk.split_to(take));
            if self.buf.len() == self.part_bytes {
                let part = std::mem::take(&mut self.buf);
                self.upload_part(part).await?;
            }
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>, _sha256: Sha256Digest) -> Result<String, DeliveryError> {
        let target = self.target();
        if self.upload_id.is_none() {
            let body = std::mem::take(&mut self.buf);
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&self.key)
                .content_type(&self.content_type)
                .body(ByteStream::from(body))
                .customize()
                .disable_payload_signing()
                .send()
                .await
                .map_err(|e| sdk_error("writing", &target, e))?;
            return Ok(target);
        }
        if !self.buf.is_empty() {
            let last = std::mem::take(&mut self.buf);
            self.upload_part(last).await?;
        }
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        let mut parts = std::mem::take(&mut self.parts);
        parts.sort_by_key(|p| p.part_number());
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(self.upload_id.clone().unwrap_or_default())
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| sdk_error("completing the upload of", &target, e))?;
        Ok(target)
    }

    async fn abort(mut self: Box<Self>) {
        self.in_flight.shutdown().await;
        if let Some(id) = &self.upload_id {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(id)
                .send()
                .await;
        }
    }
}

/// The `export_files` object store: files of exports without a
/// destination, named `<org>/<job>/<file>`.
pub struct ObjectStore {
    js: async_nats::jetstream::Context,
    bucket: String,
    store: object_store::ObjectStore,
    prefix: String,
}

impl ObjectStore {
    /// Files go under `prefix` (`<org>/<job>` for a job's files).
    pub fn new(
        js: async_nats::jetstream::Context,
        bucket: impl Into<String>,
        store: object_store::ObjectStore,
        prefix: impl Into<String>,
    ) -> ObjectStore {
        ObjectStore {
            js,
            bucket: bucket.into(),
            store,
            prefix: prefix.into(),
        }
    }
}

/// The URI of an object in `export_files`.
pub fn object_store_uri(name: &str) -> String {
    format!(
        "{}:{name}",
        meterline_shared::provision::EXPORT_FILES_BUCKET
    )
}

#[async_trait]
impl Destination for ObjectStore {
    fn describe(&self) -> String {
        format!(
            "the {} object store",
            meterline_shared::provision::EXPORT_FILES_BUCKET
        )
    }

    fn prefix(&self) -> &str {
        &self.prefix
    }

    fn partition_order(&self) -> PartitionOrder {
        PartitionOrder::TimeFirst
    }

    fn uri(&self, key: &str) -> String {
        object_store_uri(key)
    }

    async fn check(&self) -> Result<(), DeliveryError> {
        Ok(())
    }

    async fn begin(
        &self,
        key: &str,
        _content_type: &str,
    ) -> Result<Box<dyn Upload>, DeliveryError> {
        let (tx, rx) = mpsc::channel::<Piece>(4);
        let put = ObjectPut {
            js: self.js.clone(),
            bucket: self.bucket.clone(),
            store: self.store.clone(),
            name: key.to_owned(),
        };
        let task = tokio::spawn(put.run(rx));
        Ok(Box::new(ObjectUpload {
            name: key.to_owned(),
            tx: Some(tx),
            task: Some(task),
        }))
    }

    async fn read(&self, key: &str) -> Result<Option<Vec<u8>>, DeliveryError> {
        use tokio::io::AsyncReadExt;
        match self.store.get(key).await {
            Ok(mut obj) => {
                let mut out = Vec::new();
                obj.read_to_end(&mut out)
                    .await
                    .map_err(|e| DeliveryError(format!("reading {key} failed: {e}")))?;
                Ok(Some(out))
            }
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => Ok(None),
            Err(e) => Err(DeliveryError(format!("reading {key} failed: {e}"))),
        }
    }
}

/// Chunks of one object on their way at once: each is stored (and synced
/// to disk) by the server before it is acknowledged, so waiting for each
/// in turn would leave the writer idle.
const CHUNKS_IN_FLIGHT: usize = 4;

/// Chunk size of exported objects: as large as the server takes, up to
/// 1 MiB, since the server syncs each chunk to disk on its own (256 KiB
/// chunks took twice as long to store as 1 MiB ones).
fn chunk_bytes(js: &async_nats::jetstream::Context) -> usize {
    // Room for the protocol's headers within the server's max_payload.
    let max = js.client().server_info().max_payload.saturating_sub(4096);
    max.clamp(64 * 1024, 1024 * 1024)
}

/// Writes one object to an object store bucket as the NATS object store
/// lays it out (chunks on `$O.<bucket>.C.<nuid>`, then the object's info on
/// `$O.<bucket>.M.<name>`, rolled up), with several chunks in flight. The
/// object becomes visible only with its info, after every chunk is stored;
/// a failed or aborted put removes its chunks, and a completed one those
/// of the object it replaces.
struct ObjectPut {
    js: async_nats::jetstream::Context,
    bucket: String,
    store: object_store::ObjectStore,
    name: String,
}

impl ObjectPut {
    /// The subject of the chunks of the object instance `nuid`.
    fn chunk_subject(&self, nuid: &str) -> String {
        format!("$O.{}.C.{nuid}", self.bucket)
    }

    fn failed(&self, e: impl std::fmt::Display) -> DeliveryError {
        DeliveryError(format!(
            "writing {} to {} failed: {e}",
            self.name, self.bucket
        ))
    }

    async fn run(self, chunks: mpsc::Receiver<Piece>) -> Result<(), DeliveryError> {
        let nuid = uuid::Uuid::new_v4().simple().to_string();
        let chunk_subject = self.chunk_subject(&nuid);
        let result = self.write(&chunk_subject, &nuid, chunks).await;
        if result.is_err() {
            self.purge(&chunk_subject).await;
        }
        result
    }

    async fn purge(&self, chunk_subject: &str) {
        if let Ok(stream) = self.js.get_stream(format!("OBJ_{}", self.bucket)).await {
            let _ = stream.purge().filter(chunk_subject).await;
        }
    }

    async fn write(
        &self,
        chunk_subject: &str,
        nuid: &str,
        mut chunks: mpsc::Receiver<Piece>,
    ) -> Result<(), DeliveryError> {
        use base64::Engine;
        use futures::StreamExt;
        let existing = self.store.info(&self.name).await.ok();
        let mut acks = futures::stream::FuturesOrdered::new();
        let (mut size, mut count) = (0usize, 0usize);
        let chunk_size = chunk_bytes(&self.js);
        let mut pending = bytes::BytesMut::with_capacity(chunk_size);
        let digest = loop {
            let end = match chunks.next().await {
                Some(Piece::Data(bytes)) => {
                    pending.extend_from_slice(&bytes);
                    None
                }
                Some(Piece::End(d)) => Some(d),
                Some(Piece::Abort) => return Err(self.failed("upload aborted")),
                None => return Err(self.failed("the upload was dropped unfinished")),
            };
            while pending.len() >= chunk_size || (end.is_some() && !pending.is_empty()) {
                let n = pending.len().min(chunk_size);
                let chunk = pending.split_to(n).freeze();
                size += chunk.len();
                count += 1;
                let ack = self
                    .js
                    .publish(chunk_subject.to_owned(), chunk)
                    .await
                    .map_err(|e| self.failed(e))?;
                acks.push_back(std::future::IntoFuture::into_future(ack));
                while acks.len() >= CHUNKS_IN_FLIGHT {
                    if let Some(ack) = acks.next().await {
                        ack.map_err(|e| self.failed(e))?;
                    }
                }
            }
            if let Some(digest) = end {
                break digest;
            }
        };
        while let Some(ack) = acks.next().await {
            ack.map_err(|e| self.failed(e))?;
        }
        let info = serde_json::json!({
            "name": self.name,
            "bucket": self.bucket,
            "nuid": nuid,
            "size": size,
            "chunks": count,
            "mtime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            "digest": format!(
                "SHA-256={}",
                base64::engine::general_purpose::URL_SAFE.encode(digest)
            ),
            "options": {"max_chunk_size": chunk_size},
        });
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_ROLLUP, "sub");
        let subject = format!(
            "$O.{}.M.{}",
            self.bucket,
            base64::engine::general_purpose::URL_SAFE.encode(&self.name)
        );
        self.js
            .publish_with_headers(subject, headers, Bytes::from(info.to_string()))
            .await
            .map_err(|e| self.failed(e))?
            .await
            .map_err(|e| self.failed(e))?;
        if let Some(old) = existing.filter(|o| o.nuid != nuid) {
            self.purge(&self.chunk_subject(&old.nuid)).await;
        }
        Ok(())
    }
}

/// What an [`ObjectUpload`] hands its put: bytes, then the end with the
/// object's digest, or an abort. A put whose sender goes away without
/// either stores nothing.
enum Piece {
    Data(Bytes),
    End(Sha256Digest),
    Abort,
}

struct ObjectUpload {
    name: String,
    tx: Option<mpsc::Sender<Piece>>,
    task: Option<tokio::task::JoinHandle<Result<(), DeliveryError>>>,
}

impl ObjectUpload {
    async fn outcome(&mut self) -> Result<(), DeliveryError> {
        match self.task.take() {
            Some(t) => t
                .await
                .map_err(|e| DeliveryError(format!("writing {} stopped: {e}", self.name)))?
                .map(|_| ()),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Upload for ObjectUpload {
    async fn write(&mut self, chunk: Bytes) -> Result<(), DeliveryError> {
        let sent = match &mut self.tx {
            Some(tx) => tx.send(Piece::Data(chunk)).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The writer ended early: its error says why.
        self.tx = None;
        self.outcome().await?;
        Err(DeliveryError(format!("writing {} stopped", self.name)))
    }

    async fn finish(mut self: Box<Self>, sha256: Sha256Digest) -> Result<String, DeliveryError> {
        if let Some(mut tx) = self.tx.take() {
            // If the put ended early, its outcome says why.
            let _ = tx.send(Piece::End(sha256)).await;
        }
        self.outcome().await?;
        Ok(object_store_uri(&self.name))
    }

    async fn abort(mut self: Box<Self>) {
        if let Some(mut tx) = self.tx.take() {
            let _ = tx.send(Piece::Abort).await;
        }
        let _ = self.outcome().await;
    }
}
