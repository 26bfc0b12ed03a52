//! File-upload jobs of the ingest service against a real nats-server, with
//! the real entities service holding the meters: processing that runs
//! again after a crash stores nothing twice, and a file announced while
//! ingest is down is processed when it comes back. (The HTTP side, signed
//! URLs and streaming, is tested in `meterline-gateway`.)

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use serde_json::{json, Value};

use meterline_ingest::model::MeasurementGroup;
use meterline_ingest::uploads::{JobStatus, UploadJob, Uploads};
use meterline_shared::protocol::{upload_object_name, EntityRequest, UploadRequest, UploadedFile};
use meterline_shared::shutdown::CancellationToken;
use meterline_shared::subjects::{self, upload_ops};
use meterline_shared::testkit::{eventually, NatsServer, Running};
use meterline_shared::{bus, provision};

const ORG: &str = "acme";
const STEP: Duration = Duration::from_secs(20);

/// Runs ingest; returns it with a handle on its uploads.
async fn start_ingest(nats: &NatsServer) -> (Running, Uploads) {
    let app = meterline_ingest::App::build(meterline_ingest::Settings::for_tests(nats.url()))
        .await
        .unwrap();
    let uploads = app.uploads().clone();
    (Running::spawn(|stop| app.run_until_stopped(stop)), uploads)
}

/// A nats-server, the entities service with the org and a meter.
async fn world() -> (NatsServer, async_nats::Client, Running) {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let app = meterline_entities::App::build(meterline_entities::Settings::for_tests(nats.url()))
        .await
        .unwrap();
    let entities = Running::spawn(|stop| app.run_until_stopped(stop));
    meterline_entities::bootstrap(&client, ORG, "Acme", "upload-tests")
        .await
        .unwrap();
    let meter = EntityRequest {
        body: Some(json!({"name": "API calls", "code": "api", "dataFields": [
            {"category": "MEASURE", "code": "calls", "name": "Calls", "unit": "{call}"}
        ], "derivedFields": []})),
        ..Default::default()
    };
    bus::request(
        &client,
        subjects::entities_request(ORG, "meter", "create"),
        Default::default(),
        serde_json::to_vec(&meter).unwrap().into(),
    )
    .await
    .unwrap();
    (nats, client, entities)
}

/// `n` rows; every fifth has no uid.
fn file(n: usize) -> Vec<u8> {
    let rows: Vec<Value> = (0..n)
        .map(|i| {
            let mut m = json!({"meter": "api", "account": "acct-1", "ts": "2024-05-01T10:00:00Z", "measure": {"calls": i}});
            if i % 5 != 4 {
                m["uid"] = json!(format!("row-{i}"));
            }
            m
        })
        .collect();
    serde_json::to_vec(&rows).unwrap()
}

async fn store_file(client: &async_nats::Client, job: &str, bytes: &[u8]) {
    let js = jetstream::new(client.clone());
    let files = js
        .get_object_store(provision::UPLOAD_FILES_BUCKET)
        .await
        .unwrap();
    let mut reader = bytes;
    files
        .put(upload_object_name(ORG, job).as_str(), &mut reader)
        .await
        .unwrap();
}

/// Every stored measurement's uid, with how often it is stored.
async fn stored(client: &async_nats::Client) -> HashMap<String, usize> {
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(subjects::MEASUREMENTS_STREAM).await.unwrap();
    let mut out = HashMap::new();
    let filter = format!("usage.{ORG}.>");
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
        let m = tokio::time::timeout(STEP, msgs.next())
            .await
            .expect("stored measurements")
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

/// Rewrites a job's record as a crashed run would have left it: `running`,
/// with `processed` rows recorded.
async fn crash_at(client: &async_nats::Client, job: &UploadJob, processed: u64) {
    let js = jetstream::new(client.clone());
    let kv = js
        .get_key_value(provision::UPLOAD_JOBS_BUCKET)
        .await
        .unwrap();
    let mut j = job.clone();
    j.status = JobStatus::Running;
    j.processed_rows = processed;
    j.failed_rows = 0;
    kv.put(
        format!("{ORG}.{}", job.id),
        serde_json::to_vec(&j).unwrap().into(),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_processed_again_after_a_crash_stores_nothing_twice() {
    let (_nats, client, entities) = world().await;
    let (ingest, uploads) = start_ingest(&_nats).await;
    let bytes = file(2500);
    let request =
        json!({"fileName": "calls.json", "contentType": "text/json", "contentLength": bytes.len()});
    let job = uploads.create(ORG, Some("tester"), &request).await.unwrap();
    assert_eq!(job.status, JobStatus::NotUploaded);
    assert_eq!(job.created_by.as_deref(), Some("tester"));
    let running = uploads.start(ORG, &job.id).await.unwrap();
    assert_eq!(running.status, JobStatus::Running);
    assert_eq!(
        uploads.start(ORG, &job.id).await.unwrap_err().code,
        meterline_shared::ErrorCode::Conflict,
        "a job is claimed once"
    );
    store_file(&client, &job.id, &bytes).await;

    let never = CancellationToken::new();
    let done = uploads.process(ORG, &job.id, &never).await.unwrap();
    assert_eq!(
        (
            done.status,
            done.total_rows,
            done.processed_rows,
            done.failed_rows
        ),
        (JobStatus::Succeeded, Some(2500), 2500, 0)
    );
    let first = stored(&client).await;
    assert_eq!(first.len(), 2500);
    assert!(first.values().all(|n| *n == 1));
    assert_eq!(first.get(&format!("{}-4", job.id)), Some(&1));

    // A finished job is returned as it is.
    assert_eq!(uploads.process(ORG, &job.id, &never).await.unwrap(), done);

    // Crashed after storing everything but recording only the first batch,
    // or nothing at all: processing again stores nothing new, also for the
    // rows that came without a uid.
    for processed in [1000, 0] {
        crash_at(&client, &done, processed).await;
        let again = uploads.process(ORG, &job.id, &never).await.unwrap();
        assert_eq!(
            (again.status, again.processed_rows, again.failed_rows),
            (JobStatus::Succeeded, 2500, 0),
            "resumed at {processed}"
        );
        assert_eq!(stored(&client).await, first, "resumed at {processed}");
    }

    // A cancelled run leaves the job running, to be resumed.
    crash_at(&client, &done, 0).await;
    let cancelled = CancellationToken::new();
    cancelled.cancel();
    let e = uploads.process(ORG, &job.id, &cancelled).await.unwrap_err();
    assert_eq!(e.code, meterline_shared::ErrorCode::Unavailable);
    assert_eq!(
        uploads.get(ORG, &job.id).await.unwrap().status,
        JobStatus::Running
    );

    ingest.stop().await;
    entities.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_announced_while_ingest_is_down_is_processed_when_it_comes_back() {
    let (nats, client, entities) = world().await;
    let (ingest, _) = start_ingest(&nats).await;
    let bytes = file(1200);
    // Over the bus, as a producer without the gateway would.
    let request = |op: &'static str, req: UploadRequest| {
        let client = client.clone();
        async move {
            let reply = bus::request(
                &client,
                subjects::ingest_upload(ORG, op),
                Default::default(),
                serde_json::to_vec(&req).unwrap().into(),
            )
            .await?;
            Ok::<Value, meterline_shared::ServiceError>(serde_json::from_slice(&reply).unwrap())
        }
    };
    let job = request(
        upload_ops::CREATE,
        UploadRequest {
            body: Some(json!({"fileName": "calls.json", "contentType": "application/json", "contentLength": bytes.len()})),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    let by_id = || UploadRequest {
        id: Some(id.clone()),
        ..Default::default()
    };
    let claimed = request(upload_ops::START, by_id()).await.unwrap();
    assert_eq!(claimed["status"], "running");
    let refused = request(upload_ops::CREATE, UploadRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code, meterline_shared::ErrorCode::BadRequest);
    let page = request(upload_ops::LIST, UploadRequest::default())
        .await
        .unwrap();
    assert_eq!(page["data"][0]["id"], id);

    ingest.stop().await;
    store_file(&client, &id, &bytes).await;
    let js = jetstream::new(client.clone());
    let announce = UploadedFile {
        org_id: ORG.into(),
        job_id: id.clone(),
        size: bytes.len() as u64,
    };
    js.publish(
        subjects::upload_job(ORG, &id),
        serde_json::to_vec(&announce).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let (ingest, _) = start_ingest(&nats).await;
    let done = eventually(STEP * 3, "the job to be processed", || async {
        let job = request(upload_ops::GET, by_id()).await.unwrap();
        (job["status"] == "succeeded").then_some(job)
    })
    .await;
    assert_eq!(
        (
            done["totalRows"].as_u64(),
            done["processedRows"].as_u64(),
            done["failedRows"].as_u64()
        ),
        (Some(1200), Some(1200), Some(0))
    );
    assert_eq!(stored(&client).await.len(), 1200);
    // The message is acknowledged once the job is final: the queue is empty.
    eventually(STEP, "UPLOADS to be empty", || {
        let js = js.clone();
        async move {
            let mut queue = js.get_stream(subjects::UPLOADS_STREAM).await.unwrap();
            (queue.info().await.unwrap().state.messages == 0).then_some(())
        }
    })
    .await;

    ingest.stop().await;
    entities.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_that_never_finished_are_failed_and_announced_ones_are_left_alone() {
    let (nats, client, entities) = world().await;
    // Two replicas, built but not yet working the queue, so an announced
    // file waits on UPLOADS.
    let build = || async {
        meterline_ingest::App::build(meterline_ingest::Settings::for_tests(nats.url()))
            .await
            .unwrap()
    };
    let (app, other) = (build().await, build().await);
    let uploads = app.uploads().clone();
    let bytes = file(10);
    let request =
        json!({"fileName": "calls.json", "contentType": "text/json", "contentLength": bytes.len()});
    let new_job = || async { uploads.create(ORG, None, &request).await.unwrap() };
    // Claimed as the gateway does, then the gateway stopped: twice.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let job = new_job().await;
        stalled.push(uploads.start(ORG, &job.id).await.unwrap());
    }
    // Claimed, stored and announced: waiting to be processed.
    let announced = new_job().await;
    uploads.start(ORG, &announced.id).await.unwrap();
    store_file(&client, &announced.id, &bytes).await;
    let js = jetstream::new(client.clone());
    let file_msg = UploadedFile {
        org_id: ORG.into(),
        job_id: announced.id.clone(),
        size: bytes.len() as u64,
    };
    js.publish(
        subjects::upload_job(ORG, &announced.id),
        serde_json::to_vec(&file_msg).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // Being processed: its rows counted.
    let counted = new_job().await;
    let running = uploads.start(ORG, &counted.id).await.unwrap();
    let mut at_work = running.clone();
    at_work.total_rows = Some(10);
    crash_at(&client, &at_work, 0).await;
    // Never uploaded.
    let waiting = new_job().await;

    let threshold = chrono::Duration::seconds(3600);
    let now = chrono::Utc::now();
    assert_eq!(uploads.sweep_stalled(now).await.unwrap(), 0);
    assert_eq!(
        uploads.sweep_stalled(now + threshold / 2).await.unwrap(),
        0,
        "not stalled for long enough yet"
    );
    for job in &stalled {
        assert_eq!(
            uploads.get(ORG, &job.id).await.unwrap().status,
            JobStatus::Running
        );
    }

    // Both replicas sweep at once: each stalled job is failed once.
    let later = now + threshold + chrono::Duration::seconds(1);
    let (a, b) = tokio::join!(
        uploads.sweep_stalled(later),
        other.uploads().sweep_stalled(later)
    );
    assert_eq!(a.unwrap() + b.unwrap(), 2);
    for claimed in &stalled {
        let job = uploads.get(ORG, &claimed.id).await.unwrap();
        assert_eq!(job.status, JobStatus::Failed);
        assert_eq!(
            job.failure_reason.as_deref(),
            Some(meterline_ingest::uploads::STALLED_REASON)
        );
        assert_eq!(job.version, claimed.version + 1, "failed exactly once");
    }
    assert_eq!(uploads.sweep_stalled(later).await.unwrap(), 0);
    for (job, status) in [
        (&announced, JobStatus::Running),
        (&counted, JobStatus::Running),
        (&waiting, JobStatus::NotUploaded),
    ] {
        let job = uploads.get(ORG, &job.id).await.unwrap();
        assert_eq!(
            (job.status, job.failure_reason.as_deref()),
            (status, None),
            "{}",
            job.file_name
        );
    }

    // The announced file is processed once ingest works the queue.
    let stop = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(stop.clone()));
    let done = eventually(STEP * 3, "the announced job to be processed", || async {
        let job = uploads.get(ORG, &announced.id).await.unwrap();
        (job.status == JobStatus::Succeeded).then_some(job)
    })
    .await;
    assert_eq!(done.processed_rows, 10);
    stop.cancel();
    tokio::time::timeout(STEP, task)
        .await
        .expect("stopped in time")
        .unwrap()
        .unwrap();
    drop(other);
    entities.stop().await;
}
