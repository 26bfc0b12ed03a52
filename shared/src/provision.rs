//! Idempotent, versioned provisioning of streams and buckets.
//!
//! Every service calls [`ensure_stream`] for the streams it uses at start.
//! The desired configuration is hashed into the stream's metadata
//! (`meterline.config`); a stream whose hash differs is updated to the new
//! configuration, and if the server refuses the update (an immutable field
//! changed) the service refuses to start with the reason, rather than run
//! against a configuration it did not ask for.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    stream::{Config, DiscardPolicy, RetentionPolicy, Source, StorageType, SubjectTransform},
};
use sha2::{Digest, Sha256};

use crate::subjects::{ENTITIES_STREAM, EVENTS_STREAM};

/// Bumped when the meaning of a provisioned configuration changes in a way
/// the hash alone would not show.
pub const PROVISION_VERSION: &str = "1";
pub const META_CONFIG: &str = "meterline.config";
pub const META_VERSION: &str = "meterline.provision";

const DAY: Duration = Duration::from_secs(24 * 3600);

/// `ENTITIES`: the log of record. Every version of every entity is kept
/// forever; nothing can be deleted or purged.
pub fn entities() -> Config {
    Config {
        name: ENTITIES_STREAM.into(),
        description: Some("Meterline entity mutations: the log of record".into()),
        subjects: vec!["ent.>".into()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_messages_per_subject: -1,
        discard: DiscardPolicy::New,
        deny_delete: true,
        deny_purge: true,
        allow_direct: true,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }
}

/// `EVENTS`: every user-visible Event for 28 days. Entity events are sourced
/// from `ENTITIES` by the server with a subject transform: no second write.
pub fn events() -> Config {
    Config {
        name: EVENTS_STREAM.into(),
        description: Some(
            "Meterline events: entity mutations (sourced) and other events, 28 days".into(),
        ),
        subjects: vec![
            "evt.*.ingest.>".into(),
            "evt.*.dataexport.>".into(),
            "evt.*.integration.>".into(),
            "evt.*.scheduled.>".into(),
        ],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: 28 * DAY,
        allow_direct: true,
        duplicate_window: Duration::from_secs(120),
        sources: Some(vec![Source {
            name: ENTITIES_STREAM.into(),
            subject_transforms: vec![SubjectTransform {
                source: "ent.*.*.*".into(),
                destination: "evt.{{wildcard(1)}}.entity.{{wildcard(2)}}.{{wildcard(3)}}".into(),
            }],
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// The shortest retention of `MEASUREMENTS`: uids are remembered for 35 days
/// and their commit markers live in the same stream.
pub const MIN_MEASUREMENT_RETENTION_DAYS: u64 = 35;

/// `MEASUREMENTS`: accepted usage on `usage.<org>.<meter>` (MessagePack
/// groups) and the uid commit markers on `uidx.<org>`, written together by
/// atomic batches.
pub fn measurements(retention_days: u64) -> Config {
    Config {
        name: crate::subjects::MEASUREMENTS_STREAM.into(),
        description: Some("Meterline accepted measurements and their uid commit markers".into()),
        subjects: vec!["usage.>".into(), "uidx.>".into()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: DAY * retention_days.max(MIN_MEASUREMENT_RETENTION_DAYS) as u32,
        allow_direct: true,
        allow_atomic_publish: true,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }
}

fn fingerprint(config: &Config) -> String {
    let mut c = config.clone();
    c.metadata = HashMap::new();
    let json = serde_json::to_vec(&c).unwrap_or_default();
    let digest = Sha256::digest(&json);
    digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("stream {name}: {source}")]
    Stream {
        name: String,
        source: async_nats::Error,
    },
    #[error("stream {name} exists with another configuration and cannot be updated to this one: {source}")]
    Update {
        name: String,
        source: async_nats::Error,
    },
}

/// What [`ensure_stream`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Updated,
    Unchanged,
}

/// Creates the stream, or updates it if its configuration differs from
/// `desired`. Safe to call from every replica at every start.
pub async fn ensure_stream(
    js: &jetstream::Context,
    desired: Config,
) -> Result<Outcome, ProvisionError> {
    let name = desired.name.clone();
    let mut desired = desired;
    let hash = fingerprint(&desired);
    desired.metadata.insert(META_CONFIG.into(), hash.clone());
    desired
        .metadata
        .insert(META_VERSION.into(), PROVISION_VERSION.into());
    match js.get_stream(&name).await {
        Ok(mut stream) => {
            let info = stream.info().await.map_err(|e| ProvisionError::Stream {
                name: name.clone(),
                source: e.into(),
            })?;
            let current = &info.config.metadata;
            if current.get(META_CONFIG) == Some(&hash)
                && current.get(META_VERSION).map(String::as_str) == Some(PROVISION_VERSION)
            {
                return Ok(Outcome::Unchanged);
            }
            js.update_stream(desired)
                .await
                .map_err(|e| ProvisionError::Update {
                    name: name.clone(),
                    source: e.into(),
                })?;
            tracing::info!(stream = %name, config = %hash, "stream configuration updated");
            Ok(Outcome::Updated)
        }
        Err(_) => match js.create_stream(desired.clone()).await {
            Ok(_) => {
                tracing::info!(stream = %name, config = %hash, "stream created");
                Ok(Outcome::Created)
            }
            // Another replica created it first: check it is ours.
            Err(e) => match js.get_stream(&name).await {
                Ok(_) => Box::pin(ensure_stream(js, desired)).await,
                Err(_) => Err(ProvisionError::Stream {
                    name,
                    source: e.into(),
                }),
            },
        },
    }
}

/// `ENTITIES` and `EVENTS`, in that order (`EVENTS` sources `ENTITIES`),
/// with `replicas` copies each.
pub async fn ensure_core(js: &jetstream::Context, replicas: usize) -> Result<(), ProvisionError> {
    ensure_streams(js, replicas, [entities(), events()]).await
}

/// [`ensure_stream`] for each of `configs`, with `replicas` replicas.
pub async fn ensure_streams(
    js: &jetstream::Context,
    replicas: usize,
    configs: impl IntoIterator<Item = Config>,
) -> Result<(), ProvisionError> {
    for config in configs {
        ensure_stream(
            js,
            Config {
                num_replicas: replicas.max(1),
                ..config
            },
        )
        .await?;
    }
    Ok(())
}

/// KV bucket of service-user credentials (hashed secrets only).
pub const CREDENTIALS_BUCKET: &str = "credentials";

pub fn credentials_bucket() -> jetstream::kv::Config {
    jetstream::kv::Config {
        bucket: CREDENTIALS_BUCKET.into(),
        description: "Meterline service-user access keys (argon2 hashes of secrets)".into(),
        history: 5,
        storage: StorageType::File,
        ..Default::default()
    }
}

/// Creates a KV bucket if missing; returns it either way.
pub async fn ensure_kv(
    js: &jetstream::Context,
    config: jetstream::kv::Config,
) -> Result<jetstream::kv::Store, ProvisionError> {
    let name = config.bucket.clone();
    match js.get_key_value(&name).await {
        Ok(kv) => Ok(kv),
        Err(_) => match js.create_key_value(config).await {
            Ok(kv) => Ok(kv),
            Err(e) => js
                .get_key_value(&name)
                .await
                .map_err(|_| ProvisionError::Stream {
                    name: format!("KV_{name}"),
                    source: e.into(),
                }),
        },
    }
}

/// KV bucket of measurement file-upload jobs, keyed `<org>.<job>`.
pub const UPLOAD_JOBS_BUCKET: &str = "upload_jobs";
/// Object store bucket of uploaded measurement files, named `<org>/<job>`.
pub const UPLOAD_FILES_BUCKET: &str = "upload_files";

/// `upload_jobs`: one record per file-upload job (status, row counts),
/// changed only by revision-checked updates. Records older than
/// `retention_days` since their last change expire.
pub fn upload_jobs_bucket(retention_days: u64, replicas: usize) -> jetstream::kv::Config {
    jetstream::kv::Config {
        bucket: UPLOAD_JOBS_BUCKET.into(),
        description: "Meterline measurement file-upload jobs".into(),
        history: 1,
        max_age: DAY * retention_days.max(1) as u32,
        storage: StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    }
}

/// `upload_files`: the files as uploaded, kept `retention_days` for
/// processing and for download of the original.
pub fn upload_files_bucket(
    retention_days: u64,
    replicas: usize,
) -> jetstream::object_store::Config {
    jetstream::object_store::Config {
        bucket: UPLOAD_FILES_BUCKET.into(),
        description: Some("Meterline uploaded measurement files".into()),
        max_age: DAY * retention_days.max(1) as u32,
        storage: StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    }
}

/// `UPLOADS`: a work queue of uploaded files waiting to be processed, on
/// `upload.<org>.<job>`; the message id is the job, so a repeated announce
/// within two minutes is dropped by the server.
pub fn uploads() -> Config {
    Config {
        name: crate::subjects::UPLOADS_STREAM.into(),
        description: Some("Meterline uploaded measurement files waiting to be processed".into()),
        subjects: vec!["upload.>".into()],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        max_age: 28 * DAY,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }
}

/// Creates an object store bucket if missing; returns it either way.
pub async fn ensure_object_store(
    js: &jetstream::Context,
    config: jetstream::object_store::Config,
) -> Result<jetstream::object_store::ObjectStore, ProvisionError> {
    let name = config.bucket.clone();
    match js.get_object_store(&name).await {
        Ok(store) => Ok(store),
        Err(_) => match js.create_object_store(config).await {
            Ok(store) => Ok(store),
            Err(e) => js
                .get_object_store(&name)
                .await
                .map_err(|_| ProvisionError::Stream {
                    name: format!("OBJ_{name}"),
                    source: e.into(),
                }),
        },
    }
}

/// `JOBS`: a work queue of export job requests on
/// `job.export.<org>.<schedule>`. The message id is the job id, so replicas
/// of the scheduler publishing the same slot within the hour produce one
/// message (the scheduler also checks `export_jobs` before publishing, for
/// slots older than that).
pub fn jobs() -> Config {
    Config {
        name: crate::subjects::JOBS_STREAM.into(),
        description: Some("Meterline export job requests".into()),
        subjects: vec!["job.export.>".into()],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        max_age: 28 * DAY,
        duplicate_window: Duration::from_secs(3600),
        ..Default::default()
    }
}

/// `EXPORTS`: the export-complete announcements downstream systems
/// subscribe to, kept 28 days; message id = job id.
pub fn exports() -> Config {
    Config {
        name: crate::subjects::EXPORTS_STREAM.into(),
        description: Some("Meterline export-complete announcements, 28 days".into()),
        subjects: vec!["export.complete.>".into()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: 28 * DAY,
        allow_direct: true,
        duplicate_window: Duration::from_secs(3600),
        ..Default::default()
    }
}

/// KV bucket of export job records, keyed `<org>.<job>`.
pub const EXPORT_JOBS_BUCKET: &str = "export_jobs";
/// KV bucket of export cursors, keyed `<org>.<schedule>`.
pub const EXPORT_CURSORS_BUCKET: &str = "export_cursors";
/// Object store of exported files for local download (no destination).
pub const EXPORT_FILES_BUCKET: &str = "export_files";

/// `export_jobs`: job status, progress, files and error, 28 days after the
/// last change; changed only by revision-checked updates.
pub fn export_jobs_bucket(replicas: usize) -> jetstream::kv::Config {
    jetstream::kv::Config {
        bucket: EXPORT_JOBS_BUCKET.into(),
        description: "Meterline export jobs".into(),
        history: 1,
        max_age: 28 * DAY,
        storage: StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    }
}

/// `export_cursors`: the last `ENTITIES` sequence each schedule's exports
/// cover; kept until the schedule's owner deletes it, with some history for
/// operators.
pub fn export_cursors_bucket(replicas: usize) -> jetstream::kv::Config {
    jetstream::kv::Config {
        bucket: EXPORT_CURSORS_BUCKET.into(),
        description: "Meterline export cursors (last ENTITIES sequence exported per schedule)"
            .into(),
        history: 10,
        storage: StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    }
}

/// `export_files`: exported files for download, kept 24 hours.
pub fn export_files_bucket(replicas: usize) -> jetstream::object_store::Config {
    jetstream::object_store::Config {
        bucket: EXPORT_FILES_BUCKET.into(),
        description: Some("Meterline exported files for download, 24 hours".into()),
        max_age: DAY,
        storage: StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    }
}

/// `DELIVERIES`: the work queue of webhook deliveries (`notify.<org>.<webhook>`)
/// and their retries. The message id is the notification id, so an event
/// processed twice (after a crash) queues its notification once within the
/// duplicate window; receivers dedupe on the same id beyond it.
pub fn deliveries() -> Config {
    Config {
        name: crate::subjects::DELIVERIES_STREAM.into(),
        description: Some("Meterline pending webhook deliveries".into()),
        subjects: vec!["notify.>".into()],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        max_age: 7 * DAY,
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    }
}

/// `DEADLETTERS`: deliveries that failed their last retry
/// (`deadletter.<org>.<notification>`), kept 28 days or until replayed.
pub fn dead_letters() -> Config {
    Config {
        name: crate::subjects::DEAD_LETTERS_STREAM.into(),
        description: Some("Meterline webhook deliveries that failed every retry, 28 days".into()),
        subjects: vec!["deadletter.>".into()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: 28 * DAY,
        max_messages_per_subject: 1,
        allow_direct: true,
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    }
}
