//! Measurement file uploads through the gateway in front of the real ingest
//! service: `generateUploadUrl`, a `PUT` of the file to the signed URL, the
//! job processed to its end, and what is refused (expired, replayed and
//! forged URLs, files over the limit, files that are not one complete JSON
//! array).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use meterline_gateway::uploads::{Purpose, Signer};
use meterline_gateway::TEST_UPLOAD_SIGNING_KEY;
use meterline_ingest::model::MeasurementGroup;
use meterline_shared::protocol::upload_object_name;
use meterline_shared::testkit::{eventually, Running};
use meterline_shared::{provision, subjects};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{account, send, within, Gateway, Ingest, World, STEP};

const METER: &str = "storage";
const ACCOUNT: &str = "acme";

/// A world with ingest running and the meter and account rows name, made
/// through the API. Returns it with a bearer token.
async fn world(
    org: &str,
    configure: impl FnOnce(&mut meterline_gateway::Settings),
) -> (World, Running, String) {
    let w = World::with_gateway(org, configure).await;
    let ingest = Ingest::start(&w.nats).await;
    let token = w.token().await;
    let meter = json!({
        "name": "Storage", "code": METER,
        "dataFields": [{"category": "MEASURE", "code": "gb", "name": "GB", "unit": "GiBy"}],
        "derivedFields": [],
    });
    for (path, body) in [("meters", meter), ("accounts", account(ACCOUNT))] {
        let (status, body) = send(
            w.gw.http
                .post(w.gw.org_url(org, path))
                .bearer_auth(&token)
                .json(&body),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    (w, ingest, token)
}

fn row(uid: Option<&str>, gb: Value) -> Value {
    let mut m = json!({"meter": METER, "account": ACCOUNT, "ts": "2024-05-01T10:00:00Z", "measure": {"gb": gb}});
    if let Some(uid) = uid {
        m["uid"] = json!(uid);
    }
    m
}

/// A file of `n` measurements, pretty-printed as editors write them; the
/// uids are `<prefix>-<i>`, except every tenth row, which has none.
fn file(prefix: &str, n: usize) -> Vec<u8> {
    let rows: Vec<Value> = (0..n)
        .map(|i| {
            let uid = format!("{prefix}-{i}");
            row((i % 10 != 9).then_some(uid.as_str()), json!(i as f64 / 2.0))
        })
        .collect();
    serde_json::to_vec_pretty(&rows).unwrap()
}

/// `generateUploadUrl` for a file of `len` bytes: the job id and URL.
async fn upload_url(gw: &Gateway, org: &str, token: &str, len: usize) -> (String, String) {
    let (status, body) = send(
        gw.http
            .post(gw.org_url(org, "fileuploads/measurements/generateUploadUrl"))
            .bearer_auth(token)
            .json(&json!({"fileName": "usage.json", "contentType": "application/json", "contentLength": len})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let job = body["jobId"].as_str().expect("jobId").to_owned();
    let url = body["url"].as_str().expect("url").to_owned();
    assert_eq!(body["headers"], json!({"Content-Type": "application/json"}));
    (job, url)
}

/// A PUT of `bytes` to a signed URL, with no bearer token.
async fn put(gw: &Gateway, url: &str, bytes: Vec<u8>) -> (u16, Value) {
    send(
        gw.http
            .put(url)
            .header("content-type", "application/json")
            .body(bytes),
    )
    .await
}

async fn job(gw: &Gateway, org: &str, token: &str, id: &str) -> (u16, Value) {
    send(
        gw.http
            .get(gw.org_url(org, &format!("fileuploads/measurements/jobs/{id}")))
            .bearer_auth(token),
    )
    .await
}

/// Polls the job until it is `succeeded` or `failed`.
async fn finished(gw: &Gateway, org: &str, token: &str, id: &str) -> Value {
    eventually(
        Duration::from_secs(60),
        "the upload job to finish",
        || async {
            let (status, body) = job(gw, org, token, id).await;
            assert_eq!(status, 200, "{body}");
            matches!(body["status"].as_str(), Some("succeeded" | "failed")).then_some(body)
        },
    )
    .await
}

/// Every stored measurement's uid, with how often it is stored.
async fn stored(w: &World, org: &str) -> HashMap<String, usize> {
    let js = jetstream::new(w.nats.client().await);
    let mut out = HashMap::new();
    let Ok(stream) = js.get_stream(subjects::MEASUREMENTS_STREAM).await else {
        return out;
    };
    let filter = format!("usage.{org}.>");
    let Ok(last) = stream.direct_get_last_for_subject(filter.as_str()).await else {
        return out;
    };
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: filter,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut msgs = consumer.messages().await.unwrap();
    loop {
        let m = within("reading MEASUREMENTS", msgs.next())
            .await
            .unwrap()
            .unwrap();
        let group: MeasurementGroup = rmp_serde::from_slice(&m.payload).unwrap();
        for ms in group.measurements {
            *out.entry(ms.uid).or_default() += 1;
        }
        if m.info().unwrap().stream_sequence >= last.sequence {
            return out;
        }
    }
}

/// How many `ingest.validation.failure` events the org has on `EVENTS`.
async fn failure_events(w: &World, org: &str) -> usize {
    let js = jetstream::new(w.nats.client().await);
    let stream = js.get_stream(subjects::EVENTS_STREAM).await.unwrap();
    let mut subjects = stream
        .info_with_subjects(format!("evt.{org}.ingest.validation.failure"))
        .await
        .unwrap();
    let mut n = 0;
    while let Some(s) = subjects.next().await {
        n += s.unwrap().1;
    }
    n
}

async fn object_exists(w: &World, org: &str, job: &str) -> bool {
    let js = jetstream::new(w.nats.client().await);
    let files = js
        .get_object_store(provision::UPLOAD_FILES_BUCKET)
        .await
        .unwrap();
    files
        .info(upload_object_name(org, job))
        .await
        .is_ok_and(|info| !info.deleted)
}

fn assert_counts(job: &Value, status: &str, total: u64, processed: u64, failed: u64) {
    assert_eq!(
        (
            job["status"].as_str(),
            job["totalRows"].as_u64(),
            job["processedRows"].as_u64(),
            job["failedRows"].as_u64()
        ),
        (Some(status), Some(total), Some(processed), Some(failed)),
        "{job}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_uploaded_to_its_url_is_processed_once_and_can_be_downloaded() {
    const ORG: &str = "org-upload";
    let (w, ingest, token) = world(ORG, |_| {}).await;
    let gw = &w.gw;
    // 2500 rows, padded with whitespace to over 2 MiB: larger than any
    // other body the gateway takes, stored in several chunks.
    let mut bytes = file("f", 2500);
    bytes.extend(std::iter::repeat_n(b' ', 2 << 20));
    let (id, url) = upload_url(gw, ORG, &token, bytes.len()).await;
    assert!(
        url.starts_with(&format!("{}/uploads/measurements/{id}?", gw.base)),
        "{url}"
    );

    let (status, before) = job(gw, ORG, &token, &id).await;
    assert_eq!(status, 200, "{before}");
    assert_eq!(before["status"], "notUploaded");
    assert_eq!(before["fileName"], "usage.json");
    assert_eq!(before["contentLength"], bytes.len());
    assert_eq!(before["version"], 1);

    let (status, body) = put(gw, &url, bytes.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "running");

    let done = finished(gw, ORG, &token, &id).await;
    assert_counts(&done, "succeeded", 2500, 2500, 0);
    let js = jetstream::new(w.nats.client().await);
    let info = js
        .get_object_store(provision::UPLOAD_FILES_BUCKET)
        .await
        .unwrap()
        .info(upload_object_name(ORG, &id))
        .await
        .unwrap();
    assert_eq!(info.size, bytes.len());
    assert_eq!(
        info.chunks,
        bytes
            .len()
            .div_ceil(meterline_gateway::uploads::CHUNK_BYTES),
        "stored in whole chunks"
    );
    assert!(done["uploadDate"].is_string(), "{done}");
    assert!(done["version"].as_u64().unwrap() > 1);

    // Every row is stored exactly once; rows without a uid got one from
    // the job and their index.
    let uids = stored(&w, ORG).await;
    assert_eq!(uids.len(), 2500);
    assert!(uids.values().all(|n| *n == 1));
    assert_eq!(uids.get("f-0"), Some(&1));
    assert_eq!(uids.get(&format!("{id}-9")), Some(&1));

    // The URL is single-use.
    let (status, body) = put(gw, &url, bytes.clone()).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("already been used"),
        "{body}"
    );
    assert_eq!(stored(&w, ORG).await.len(), 2500);

    // Listed, newest first, paged.
    let (second, _) = upload_url(gw, ORG, &token, 10).await;
    let (status, page) = send(
        gw.http
            .get(gw.org_url(ORG, "fileuploads/measurements/jobs?pageSize=1"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["data"][0]["id"], second);
    let next = page["nextToken"].as_str().expect("a next page").to_owned();
    let (status, page) = send(
        gw.http
            .get(gw.org_url(
                ORG,
                &format!("fileuploads/measurements/jobs?pageSize=1&nextToken={next}"),
            ))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["data"][0]["id"], id);
    assert!(page.get("nextToken").is_none(), "{page}");
    let (status, page) = send(
        gw.http
            .get(gw.org_url(
                ORG,
                "fileuploads/measurements/jobs?dateCreatedStart=2000-01-01T00:00:00Z&dateCreatedEnd=2001-01-01T00:00:00Z",
            ))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(
        (status, page["data"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{page}"
    );

    // The original file, from a signed download URL without a token.
    let (status, link) = send(
        gw.http
            .get(gw.org_url(ORG, &format!("fileuploads/measurements/jobs/{id}/original")))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 200, "{link}");
    assert_eq!(link["jobId"], id);
    let download = link["url"].as_str().unwrap();
    let response = within("download", gw.http.get(download).send())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let got = response.bytes().await.unwrap();
    assert_eq!(got.len(), bytes.len());
    assert!(got == bytes, "the download is the uploaded file");
    // A download URL does not upload, and an upload URL does not download.
    let (status, body) = put(gw, download, b"[]".to_vec()).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = send(gw.http.get(&url)).await;
    assert_eq!(status, 403, "{body}");

    // Unknown jobs, and jobs with no file yet.
    let (status, body) = job(gw, ORG, &token, "01990000-0000-7000-8000-000000000000").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = send(
        gw.http
            .get(gw.org_url(
                ORG,
                &format!("fileuploads/measurements/jobs/{second}/original"),
            ))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 404, "{body}");

    ingest.stop().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_fail_validation_are_counted_and_reported_and_the_rest_stored() {
    const ORG: &str = "org-upload-rows";
    let (w, ingest, token) = world(ORG, |_| {}).await;
    let gw = &w.gw;
    let mut unknown_meter = row(Some("bad-meter"), json!(1));
    unknown_meter["meter"] = json!("no-such-meter");
    let mut no_ts = row(Some("bad-ts"), json!(1));
    no_ts.as_object_mut().unwrap().remove("ts");
    let rows = vec![
        row(Some("ok-1"), json!(1)),
        unknown_meter,
        row(Some("bad-measure"), json!("lots")),
        row(Some("ok-2"), json!(2)),
        no_ts,
        json!(42),
        row(Some("ok-3"), json!(3)),
        // Larger than one submit body may be: refused by itself.
        json!({"uid": "huge", "meter": METER, "account": ACCOUNT, "ts": "2024-05-01T10:00:00Z",
               "metadata": {"note": "x".repeat(600_000)}}),
        row(Some("ok-1"), json!(1)),
    ];
    let bytes = serde_json::to_vec(&rows).unwrap();
    let (id, url) = upload_url(gw, ORG, &token, bytes.len()).await;
    let (status, body) = put(gw, &url, bytes).await;
    assert_eq!(status, 200, "{body}");
    let done = finished(gw, ORG, &token, &id).await;
    // Five refused; the repeated ok-1 is a duplicate, processed but not
    // stored again.
    assert_counts(&done, "succeeded", 9, 9, 5);
    let uids = stored(&w, ORG).await;
    let mut kept: Vec<&str> = uids.keys().map(String::as_str).collect();
    kept.sort_unstable();
    assert_eq!(kept, ["ok-1", "ok-2", "ok-3"]);
    let events = eventually(STEP, "five failure events", || async {
        let n = failure_events(&w, ORG).await;
        (n >= 5).then_some(n)
    })
    .await;
    assert_eq!(events, 5);

    ingest.stop().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_that_are_not_one_complete_json_array_fail_and_store_nothing() {
    const ORG: &str = "org-upload-broken";
    let (w, ingest, token) = world(ORG, |_| {}).await;
    let gw = &w.gw;
    let whole = file("t", 300);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", whole[..whole.len() / 2].to_vec(), "truncated"),
        (
            "an object",
            serde_json::to_vec(&json!({"measurements": [row(Some("o-1"), json!(1))]})).unwrap(),
            "must be a JSON array",
        ),
        (
            "a bad row",
            format!("[{}, {{\"uid\": tru}}]", row(Some("b-1"), json!(1))).into_bytes(),
            "row 1 is not valid JSON",
        ),
        (
            "missing brackets",
            b"[{\"a\": [1, 2}]".to_vec(),
            "unexpected",
        ),
        ("empty", Vec::new(), "the file is empty"),
    ];
    for (what, bytes, reason) in cases {
        let (id, url) = upload_url(gw, ORG, &token, bytes.len().max(1)).await;
        let (status, body) = put(gw, &url, bytes).await;
        assert_eq!(status, 200, "{what}: {body}");
        let done = finished(gw, ORG, &token, &id).await;
        assert_eq!(done["status"], "failed", "{what}: {done}");
        assert_eq!(done["processedRows"], 0, "{what}: {done}");
        let why = done["failureReason"].as_str().unwrap_or_default();
        assert!(why.contains(reason), "{what}: {why:?}");
    }
    assert!(stored(&w, ORG).await.is_empty(), "nothing stored");

    // An empty array is a file with no rows.
    let (id, url) = upload_url(gw, ORG, &token, 2).await;
    let (status, body) = put(gw, &url, b"[]".to_vec()).await;
    assert_eq!(status, 200, "{body}");
    assert_counts(&finished(gw, ORG, &token, &id).await, "succeeded", 0, 0, 0);

    ingest.stop().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_replayed_forged_and_unsigned_urls_are_refused() {
    const ORG: &str = "org-upload-urls";
    let (w, ingest, token) = world(ORG, |_| {}).await;
    let gw = &w.gw;
    let bytes = file("u", 5);
    let (id, url) = upload_url(gw, ORG, &token, bytes.len()).await;
    let base = format!("{}/uploads/measurements/{id}", gw.base);
    let signer = Signer::new(TEST_UPLOAD_SIGNING_KEY.as_bytes());
    let now = chrono::Utc::now().timestamp();

    let expired = format!(
        "{base}?{}",
        signer.query(Purpose::Upload, ORG, &id, now - 1)
    );
    let (status, body) = put(gw, &expired, bytes.clone()).await;
    assert_eq!(
        (status, body["message"].as_str()),
        (403, Some("upload URL expired"))
    );

    let later = now + 3600;
    let forged = format!(
        "{base}?{}",
        Signer::new(b"not the gateway's key").query(Purpose::Upload, ORG, &id, later)
    );
    let stretched = url.replace("expires=", &format!("expires={later}&was="));
    let other_org = format!(
        "{base}?{}",
        signer.query(Purpose::Upload, "org-other", &id, later)
    )
    .replace("org=org-other", &format!("org={ORG}"));
    for (what, u) in [
        ("forged", forged),
        ("stretched", stretched),
        ("other org", other_org),
    ] {
        let (status, body) = put(gw, &u, bytes.clone()).await;
        assert_eq!(
            (status, body["message"].as_str()),
            (403, Some("invalid upload URL signature")),
            "{what}"
        );
    }
    let (status, body) = put(gw, &base, bytes.clone()).await;
    assert_eq!(status, 403, "{body}");

    // None of that used the URL: the job is untouched and the real URL works once.
    let (_, before) = job(gw, ORG, &token, &id).await;
    assert_eq!(before["status"], "notUploaded");
    let (status, body) = put(gw, &url, bytes.clone()).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = put(gw, &url, bytes.clone()).await;
    assert_eq!(status, 409, "{body}");
    assert_counts(&finished(gw, ORG, &token, &id).await, "succeeded", 5, 5, 0);

    // A URL from a gateway whose URLs live zero seconds is expired at once.
    let mut settings = meterline_gateway::Settings::for_tests(w.nats.url());
    settings.upload_url_ttl_secs = 0;
    let instant = Gateway::start_with(settings).await;
    let (id, url) = upload_url(&instant, ORG, &token, bytes.len()).await;
    let (status, body) = put(&instant, &url, bytes.clone()).await;
    assert_eq!(
        (status, body["message"].as_str()),
        (403, Some("upload URL expired"))
    );
    let (_, after) = job(gw, ORG, &token, &id).await;
    assert_eq!(after["status"], "notUploaded");
    instant.stop().await;

    // The job routes need a token for the org, like every org route.
    let (status, _) = send(
        gw.http
            .get(gw.org_url(ORG, "fileuploads/measurements/jobs")),
    )
    .await;
    assert_eq!(status, 401);
    let (status, body) = send(
        gw.http
            .get(gw.org_url(ORG, "fileuploads/measurements/jobs?pageSize=0"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    ingest.stop().await;
    w.stop().await;
}

/// A PUT with a chunked body (no `Content-Length`), over a raw socket: the
/// status code the gateway answers with.
async fn put_chunked(gw: &Gateway, url: &str, bytes: &[u8]) -> u16 {
    let url = reqwest::Url::parse(url).unwrap();
    let mut tcp = within("connect", tokio::net::TcpStream::connect(gw.http_addr))
        .await
        .unwrap();
    let head = format!(
        "PUT {}?{} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        url.path(),
        url.query().unwrap_or_default(),
        gw.http_addr
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    for chunk in bytes.chunks(1000) {
        let framed = [
            format!("{:x}\r\n", chunk.len()).as_bytes(),
            chunk,
            b"\r\n".as_slice(),
        ]
        .concat();
        if tcp.write_all(&framed).await.is_err() {
            break;
        }
    }
    let _ = tcp.write_all(b"0\r\n\r\n").await;
    let mut response = Vec::new();
    within("the response", tcp.read_to_end(&mut response))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_over_the_limit_are_refused_while_streaming_and_not_kept() {
    const ORG: &str = "org-upload-limit";
    const LIMIT: usize = 20_000;
    let (w, ingest, token) = world(ORG, |s| s.upload_max_bytes = LIMIT as u64).await;
    let gw = &w.gw;

    // More than the gateway takes cannot even be announced.
    let (status, body) = send(
        gw.http
            .post(gw.org_url(ORG, "fileuploads/measurements/generateUploadUrl"))
            .bearer_auth(&token)
            .json(&json!({"fileName": "big.json", "contentType": "application/json", "contentLength": LIMIT + 1})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    // Nor can m3ter's refusals of the request.
    for bad in [
        json!({"fileName": "a.csv", "contentType": "text/csv", "contentLength": 10}),
        json!({"contentType": "application/json", "contentLength": 10}),
        json!({"fileName": "a.json", "contentType": "application/json", "contentLength": 0}),
    ] {
        let (status, body) = send(
            gw.http
                .post(gw.org_url(ORG, "fileuploads/measurements/generateUploadUrl"))
                .bearer_auth(&token)
                .json(&bad),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }

    let big = file("big", 400);
    assert!(big.len() > LIMIT);

    // Streamed without a length: cut off at the limit, the partial file
    // deleted, the job failed.
    let (id, url) = upload_url(gw, ORG, &token, LIMIT).await;
    assert_eq!(put_chunked(gw, &url, &big).await, 413);
    let (_, failed) = job(gw, ORG, &token, &id).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["failureReason"]
            .as_str()
            .unwrap()
            .contains("larger than 20000 bytes"),
        "{failed}"
    );
    assert!(
        !object_exists(&w, ORG, &id).await,
        "the partial file is deleted"
    );

    // More than the job's contentLength is refused the same way.
    let (id, url) = upload_url(gw, ORG, &token, 1000).await;
    assert_eq!(put_chunked(gw, &url, &big[..5000]).await, 413);
    let (_, failed) = job(gw, ORG, &token, &id).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(!object_exists(&w, ORG, &id).await);

    // A Content-Length over the gateway's limit is refused before the URL
    // is used; one over the job's length uses it up.
    let (id, url) = upload_url(gw, ORG, &token, LIMIT).await;
    let (status, body) = put(gw, &url, big.clone()).await;
    assert_eq!(status, 413, "{body}");
    let (_, untouched) = job(gw, ORG, &token, &id).await;
    assert_eq!(untouched["status"], "notUploaded");
    let (id, url) = upload_url(gw, ORG, &token, 100).await;
    let (status, body) = put(gw, &url, big[..5000].to_vec()).await;
    assert_eq!(status, 413, "{body}");
    let (_, failed) = job(gw, ORG, &token, &id).await;
    assert_eq!(failed["status"], "failed", "{failed}");

    // A file within the limit, sent the same chunked way, goes through.
    let fits = file("fits", 50);
    let (id, url) = upload_url(gw, ORG, &token, fits.len()).await;
    assert_eq!(put_chunked(gw, &url, &fits).await, 200);
    assert_counts(
        &finished(gw, ORG, &token, &id).await,
        "succeeded",
        50,
        50,
        0,
    );
    assert_eq!(stored(&w, ORG).await.len(), 50);

    ingest.stop().await;
    w.stop().await;
}
