//! One conformance suite for every [`Destination`]: the S3 implementation
//! against a real S3-compatible server (`s3s-fs`), the object store against
//! a real nats-server. Each check runs against each implementation.

use std::time::Duration;

use bytes::Bytes;
use meterline_exporter::destination::{Destination, ObjectStore, S3Config, MIN_PART_BYTES, S3};
use meterline_shared::provision;
use meterline_shared::testkit::{NatsServer, S3Server};
use sha2::{Digest, Sha256};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn put(dest: &dyn Destination, key: &str, data: &[u8], chunk: usize) -> String {
    let mut up = dest.begin(key, "text/csv").await.unwrap();
    for c in data.chunks(chunk.max(1)) {
        up.write(Bytes::copy_from_slice(c)).await.unwrap();
    }
    if data.is_empty() {
        up.write(Bytes::new()).await.unwrap();
    }
    up.finish(Sha256::digest(data).into()).await.unwrap()
}

/// The behaviour every destination must have.
async fn conformance(dest: &dyn Destination, scheme: &str) {
    dest.check().await.unwrap();
    // A small object, in one write, reads back as written, under its URI.
    let key = format!("{}/small.csv", dest.prefix());
    let uri = put(dest, &key, b"id,deleted\r\na1,false\r\n", 1 << 20).await;
    assert!(uri.starts_with(scheme) && uri.ends_with(&key), "{uri}");
    assert_eq!(dest.uri(&key), uri);
    assert_eq!(
        dest.read(&key).await.unwrap().as_deref(),
        Some(&b"id,deleted\r\na1,false\r\n"[..])
    );

    // A large object in many writes (a multipart upload on S3) is whole,
    // also when writes straddle the parts' boundaries.
    let big = pattern(2 * MIN_PART_BYTES + 12345, 7);
    let key = format!("{}/big.csv", dest.prefix());
    put(dest, &key, &big, 1_000_003).await;
    let back = dest.read(&key).await.unwrap().expect("big object");
    assert_eq!(back.len(), big.len());
    assert!(back == big, "the large object came back different");

    // Writing a key again replaces the object (a retried job overwrites).
    put(dest, &key, b"replaced", 3).await;
    assert_eq!(
        dest.read(&key).await.unwrap().as_deref(),
        Some(&b"replaced"[..])
    );

    // An empty object is an object.
    let key = format!("{}/empty.csv", dest.prefix());
    put(dest, &key, b"", 1).await;
    assert_eq!(dest.read(&key).await.unwrap().as_deref(), Some(&b""[..]));

    // An aborted upload leaves nothing, and the old object as it was.
    let key = format!("{}/aborted.csv", dest.prefix());
    let mut up = dest.begin(&key, "text/csv").await.unwrap();
    up.write(Bytes::from(pattern(MIN_PART_BYTES + 1, 1)))
        .await
        .unwrap();
    up.abort().await;
    assert_eq!(dest.read(&key).await.unwrap(), None);
    let small = format!("{}/small.csv", dest.prefix());
    let mut up = dest.begin(&small, "text/csv").await.unwrap();
    up.write(Bytes::from_static(b"half")).await.unwrap();
    up.abort().await;
    assert_eq!(
        dest.read(&small).await.unwrap().as_deref(),
        Some(&b"id,deleted\r\na1,false\r\n"[..])
    );

    // A missing object reads as none.
    assert_eq!(
        dest.read(&format!("{}/nothing-here", dest.prefix()))
            .await
            .unwrap(),
        None
    );
}

fn s3_config(s3: &S3Server, bucket: &str) -> S3Config {
    S3Config {
        bucket: bucket.into(),
        prefix: "exports/test".into(),
        region: Some("us-east-1".into()),
        endpoint_url: Some(s3.endpoint()),
        path_style: true,
        access_key_id: Some(s3.access_key().into()),
        secret_access_key: Some(s3.secret_key().into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn s3_destination_conforms() {
    let s3 = S3Server::start();
    s3.create_bucket("conformance");
    let dest = S3::connect(s3_config(&s3, "conformance"), MIN_PART_BYTES).await;
    conformance(&dest, "s3://conformance/").await;
}

#[tokio::test]
async fn object_store_destination_conforms() {
    let nats = NatsServer::start();
    let js = async_nats::jetstream::new(nats.client().await);
    let store = provision::ensure_object_store(&js, provision::export_files_bucket(1))
        .await
        .unwrap();
    let dest = ObjectStore::new(
        js.clone(),
        provision::EXPORT_FILES_BUCKET,
        store,
        "org1/job1",
    );
    conformance(&dest, "export_files:").await;
    // Nothing is left of replaced or aborted objects: one chunk each for
    // `small.csv` and the replaced `big.csv`, none for `empty.csv`, and
    // the three objects' infos.
    let mut stream = js
        .get_stream(format!("OBJ_{}", provision::EXPORT_FILES_BUCKET))
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 5);
}

async fn first_error(dest: &dyn Destination) -> String {
    if let Err(e) = dest.check().await {
        return e.0;
    }
    let mut up = dest.begin("k/file.csv", "text/csv").await.unwrap();
    if let Err(e) = up.write(Bytes::from_static(b"x")).await {
        return e.0;
    }
    tokio::time::timeout(
        Duration::from_secs(60),
        up.finish(Sha256::digest(b"x").into()),
    )
    .await
    .expect("the failure shows in time")
    .expect_err("the upload must fail")
    .0
}

#[tokio::test]
async fn s3_failures_say_what_went_wrong() {
    let mut s3 = S3Server::start();
    s3.create_bucket("real");

    let wrong_secret = S3Config {
        secret_access_key: Some("not-the-secret".into()),
        ..s3_config(&s3, "real")
    };
    let e = first_error(&S3::connect(wrong_secret, MIN_PART_BYTES).await).await;
    assert!(
        e.contains("s3://real") && e.contains("403") && e.contains("access denied"),
        "{e}"
    );
    assert!(!e.contains("not-the-secret"), "a secret leaked: {e}");

    let e = first_error(&S3::connect(s3_config(&s3, "missing-bucket"), MIN_PART_BYTES).await).await;
    assert!(
        e.contains("s3://missing-bucket") && e.contains("does not exist"),
        "{e}"
    );

    s3.kill();
    let e = first_error(&S3::connect(s3_config(&s3, "real"), MIN_PART_BYTES).await).await;
    assert!(e.contains("could not be reached"), "{e}");
}
