//! Bad input and faults: each fails its job with a clear error and a
//! `dataexport.job.failure` Event, leaves the cursor where it was, and the
//! exporter keeps serving. A crash (SIGKILL of the exporter process) in the
//! middle of a job loses nothing and exports nothing twice.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use common::{csv_rows, Mode, Proxy, World, BUCKET, ORG};
use meterline_shared::exportjob::{ExportJobRecord, ExportJobRequest, JobStatus, Trigger};
use meterline_shared::protocol::ExportsRequest;
use meterline_shared::testkit::eventually;

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_owned()
}

/// The failure Event of `job`.
async fn failure_event(w: &World, job: &str) -> Value {
    eventually(Duration::from_secs(10), "the failure event", || async {
        w.export_events()
            .await
            .into_iter()
            .find(|e| e["eventName"] == "dataexport.job.failure" && e["jobId"] == job)
    })
    .await
}

/// Checks a failed job: its error says `says`, its Event too, no cursor
/// moved, nothing announced.
async fn assert_failed(w: &World, rec: &ExportJobRecord, schedule: Option<&str>, says: &str) {
    assert_eq!(rec.status, JobStatus::Failed);
    let error = rec.error.as_deref().unwrap_or_default();
    assert!(
        error.contains(says),
        "error {error:?} does not say {says:?}"
    );
    let event = failure_event(w, &rec.id).await;
    assert!(event["error"].as_str().unwrap().contains(says), "{event}");
    if let Some(s) = schedule {
        assert_eq!(w.cursor(s).await, None, "the cursor moved for a failed job");
        assert!(
            w.completions(s).await.is_empty(),
            "a failed job was announced"
        );
    }
}

/// The exporter still works: an ad-hoc export succeeds.
async fn still_serving(w: &World) {
    let queued = w
        .exporter_request(
            "adhoc",
            ExportsRequest {
                body: Some(
                    json!({"sourceType": "OPERATIONAL", "operationalDataTypes": ["ACCOUNTS"]}),
                ),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let rec = w.finished(queued["jobId"].as_str().unwrap()).await;
    assert_eq!(rec.status, JobStatus::Succeeded, "{:?}", rec.error);
}

#[tokio::test]
async fn wrong_credentials_fail_after_retries_and_the_fixed_destination_runs() {
    let w = World::new(Some(|_| {})).await;
    w.account("a", "Alpha").await;
    let dest = w
        .destination("wrong", json!({"secretAccessKey": "not-the-secret"}))
        .await;
    let sched = w
        .schedule("s", &["ACCOUNTS"], &[&id(&dest)], json!({}))
        .await;
    let sid = id(&sched);
    let rec = w.run(&sid).await;
    assert_failed(&w, &rec, Some(&sid), "access denied").await;
    assert!(rec.error.as_deref().unwrap().contains("403"));
    assert_eq!(rec.attempts, 3, "retried up to max_attempts");
    assert!(!rec.error.as_deref().unwrap().contains("not-the-secret"));

    // Fixed, and run again on demand: the export covers everything.
    w.update(
        "exportdestination",
        &dest,
        json!({"secretAccessKey": w.s3.secret_key()}),
    )
    .await;
    let queued = w
        .exporter_request(
            "run",
            ExportsRequest {
                schedule_id: Some(sid.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let rec = w.finished(queued["jobId"].as_str().unwrap()).await;
    assert_eq!(rec.status, JobStatus::Succeeded, "{:?}", rec.error);
    assert_eq!((rec.from_sequence, rec.rows), (None, 1));
    assert_eq!(
        w.cursor(&sid).await.unwrap().sequence,
        rec.to_sequence.unwrap()
    );
}

#[tokio::test]
async fn a_missing_bucket_or_a_server_that_is_down_fails_the_job_clearly() {
    let mut w = World::new(Some(|_| {})).await;
    w.account("a", "Alpha").await;
    let dest = w
        .destination("nobucket", json!({"bucketName": "no-such-bucket"}))
        .await;
    let sched = w
        .schedule("s1", &["ACCOUNTS"], &[&id(&dest)], json!({}))
        .await;
    let rec = w.run(&id(&sched)).await;
    assert_failed(
        &w,
        &rec,
        Some(&id(&sched)),
        "s3://no-such-bucket failed: the bucket does not exist",
    )
    .await;

    let dest = w.destination("down", json!({})).await;
    let sched = w
        .schedule("s2", &["ACCOUNTS"], &[&id(&dest)], json!({}))
        .await;
    let sid = id(&sched);
    w.s3.kill();
    let rec = w.run(&sid).await;
    assert_failed(&w, &rec, Some(&sid), "could not be reached").await;
    still_serving(&w).await;
    // Back up: the next run exports everything since the last success.
    w.s3.resume();
    let rec = w.run(&sid).await;
    assert_eq!(rec.status, JobStatus::Succeeded, "{:?}", rec.error);
    assert_eq!((rec.from_sequence, rec.rows), (None, 1));
}

/// A destination `code` whose S3 traffic goes through a proxy the test
/// can cut, and a schedule of accounts to it: the proxy and the schedule.
async fn through_proxy(w: &World, code: &str) -> (Proxy, String) {
    let proxy = Proxy::start(w.s3.port()).await;
    let dest = w
        .destination(code, json!({"endpointUrl": proxy.endpoint()}))
        .await;
    let sched = w
        .schedule("s", &["ACCOUNTS"], &[&id(&dest)], json!({}))
        .await;
    (proxy, id(&sched))
}

async fn no_manifest(w: &World, code: &str) {
    assert!(
        w.objects(&format!("meterline/{code}/orgId"))
            .await
            .keys()
            .all(|k| !k.contains("_manifests")),
        "no manifest for a failed job"
    );
}

#[tokio::test]
async fn a_server_dying_mid_upload_is_retried_or_fails_without_half_a_delivery() {
    let w = World::new(Some(|s| s.max_attempts = 2)).await;
    for i in 0..300 {
        w.account(
            &format!("a{i}"),
            &format!("Account {i} with a longer name to fill the file"),
        )
        .await;
    }
    let (proxy, sid) = through_proxy(&w, "flaky").await;

    // The connection dies for good mid-upload: the job fails, nothing moves.
    proxy.set(Mode::Cut {
        after: 20_000,
        once: false,
    });
    let rec = w.run(&sid).await;
    assert_failed(&w, &rec, Some(&sid), "s3://exports/").await;
    assert_eq!(rec.attempts, 2);
    no_manifest(&w, "flaky").await;

    // It dies once: the retry delivers the whole file.
    proxy.set(Mode::Cut {
        after: 20_000,
        once: true,
    });
    let rec = w.run(&sid).await;
    assert_eq!(rec.status, JobStatus::Succeeded, "{:?}", rec.error);
    let key = rec.files[0]
        .uri
        .strip_prefix(&format!("s3://{BUCKET}/"))
        .unwrap();
    let body = w.objects(key).await.remove(key).unwrap();
    let (_, rows) = csv_rows(&body);
    assert_eq!(rows.len(), 300);
    assert_eq!(
        w.cursor(&sid).await.unwrap().sequence,
        rec.to_sequence.unwrap()
    );
    assert_eq!(w.completions(&sid).await.len(), 1);
}

/// Stores `n` accounts in `ENTITIES` directly, as the entities service
/// stores them (many more, and faster, than through its API).
async fn store_accounts(w: &World, n: usize) {
    use meterline_shared::envelope::{Action, EntityEvent};
    let mut acks = Vec::new();
    for i in 0..n {
        let id = format!("bulk-{i}");
        let body = json!({"id": id, "version": 1, "code": id, "name": format!("Bulk account {i}")});
        let ev = EntityEvent::now(
            ORG,
            "account",
            &id,
            Action::Created,
            "test",
            Some(body),
            None,
        );
        let mut headers = ev.headers();
        headers.insert("Nats-Msg-Id", ev.id.as_str());
        let subject = meterline_shared::subjects::entity(ORG, "account", &id);
        let payload = bytes::Bytes::from(serde_json::to_vec(&ev).unwrap());
        acks.push(
            w.js.publish_with_headers(subject, headers, payload)
                .await
                .unwrap(),
        );
        // The client holds back publishes past a number of acks awaited.
        if acks.len() == 1000 || i + 1 == n {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
}

#[tokio::test]
async fn a_destination_failing_while_rows_still_come_fails_the_job_at_once() {
    // Parts of 2 KiB, each stored as it fills: the first store fails while
    // the replay still has thousands of rows to send.
    let w = World::new(Some(|s| {
        s.split_bytes = 2048;
        s.max_attempts = 1;
    }))
    .await;
    store_accounts(&w, 6000).await;
    let (proxy, sid) = through_proxy(&w, "failing").await;
    proxy.set(Mode::Cut {
        after: 5_000,
        once: false,
    });
    let rec = w.run(&sid).await;
    assert_failed(&w, &rec, Some(&sid), "s3://exports/").await;
    no_manifest(&w, "failing").await;
    proxy.set(Mode::Forward);
    still_serving(&w).await;
}

#[tokio::test]
async fn a_schedule_deleted_while_its_job_waits_fails_the_job() {
    let mut w = World::new(None).await;
    let sched = w.schedule("gone", &["ACCOUNTS"], &[], json!({})).await;
    let sid = id(&sched);
    let job = w.publish_job(&sid).await;
    w.delete("exportschedule", &sid).await;
    let settings = meterline_exporter::Settings::for_tests(w.nats.url());
    w.exporter = Some(common::start_exporter(&w.nats, settings).await);
    let rec = w.finished(&job).await;
    assert_failed(&w, &rec, Some(&sid), "does not exist or was deleted").await;
    assert_eq!(rec.attempts, 1, "not retried: it cannot succeed");
}

#[tokio::test]
async fn a_job_that_moved_its_cursor_is_announced_even_if_its_schedule_is_then_deleted() {
    // One attempt only: before the cursor moves, a failure would be final.
    let w = World::new(Some(|s| s.max_attempts = 1)).await;
    let account = w.account("a", "Alpha").await;
    let sched = w.schedule("moved", &["ACCOUNTS"], &[], json!({})).await;
    let sid = id(&sched);
    // Completions cannot be published: the files are delivered and the
    // cursor moves, then announcing fails, again and again.
    w.js.delete_stream("EXPORTS").await.unwrap();
    let job = w.publish_job(&sid).await;
    let moved = eventually(Duration::from_secs(30), "the cursor to move", || async {
        w.cursor(&sid)
            .await
            .filter(|c| c.job_id.as_deref() == Some(job.as_str()))
    })
    .await;
    eventually(
        Duration::from_secs(30),
        "a failed announcement on the record",
        || async {
            w.job(&job).await.filter(|r| {
                r.error
                    .as_deref()
                    .unwrap_or_default()
                    .contains("announcing")
            })
        },
    )
    .await;
    assert_eq!(
        w.job(&job).await.unwrap().status,
        JobStatus::Running,
        "a job whose cursor moved must not fail"
    );
    w.delete("exportschedule", &sid).await;
    meterline_shared::provision::ensure_stream(&w.js, meterline_shared::provision::exports())
        .await
        .unwrap();
    let rec = w.finished(&job).await;
    assert_eq!(rec.status, JobStatus::Succeeded, "{:?}", rec.error);
    assert_eq!(rec.to_sequence, Some(moved.sequence));
    let completions = w.completions(&sid).await;
    assert_eq!(completions.len(), 1, "{completions:?}");
    let c = &completions[0];
    assert_eq!(c["jobId"], job.as_str());
    assert_eq!(c["format"], "CSV");
    assert_eq!(c["rows"], 1);
    assert_eq!(c["files"].as_array().unwrap().len(), 1);
    assert_eq!(c["files"][0]["uri"], rec.files[0].uri.as_str());
    assert_eq!(c["manifests"].as_array().unwrap().len(), 1);
    let events = w.export_events().await;
    assert!(events
        .iter()
        .any(|e| e["eventName"] == "dataexport.job.success" && e["jobId"] == job.as_str()));
    assert!(!events
        .iter()
        .any(|e| e["eventName"] == "dataexport.job.failure" && e["jobId"] == job.as_str()));
    let name = rec.files[0].uri.strip_prefix("export_files:").unwrap();
    let (_, rows) = csv_rows(&w.download_store_file(name).await);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["id"], id(&account));
}

#[tokio::test]
async fn types_that_cannot_be_exported_and_garbage_requests_are_refused() {
    let w = World::new(Some(|_| {})).await;
    w.account("a", "Alpha").await;
    for (body, says) in [
        (
            json!({"sourceType": "OPERATIONAL", "operationalDataTypes": ["ACCOUNTS", "WIDGETS"]}),
            "entity type \"WIDGETS\" cannot be exported",
        ),
        (
            json!({"sourceType": "USAGE", "operationalDataTypes": ["ACCOUNTS"]}),
            "sourceType USAGE exports are not supported",
        ),
        (
            json!({"sourceType": "OPERATIONAL", "operationalDataTypes": ["ACCOUNTS"], "exportFileFormat": "XML"}),
            "exportFileFormat \"XML\" is not supported",
        ),
    ] {
        let req = ExportJobRequest {
            job_id: uuid::Uuid::new_v4().to_string(),
            org_id: ORG.into(),
            schedule_id: None,
            slot: chrono::Utc::now(),
            trigger: Trigger::AdHoc,
            adhoc: Some(body),
        };
        w.publish_request(&req).await;
        let rec = w.finished(&req.job_id).await;
        assert_failed(&w, &rec, None, says).await;
    }

    // Not a job request at all: a failure Event for the org, and the
    // message is dropped.
    w.js.publish(format!("job.export.{ORG}.whatever"), "garbage".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let event = eventually(Duration::from_secs(10), "the garbage event", || async {
        w.export_events().await.into_iter().find(|e| {
            e["error"]
                .as_str()
                .is_some_and(|m| m.contains("an export job request could not be read"))
        })
    })
    .await;
    assert_eq!(event["orgId"], ORG);
    eventually(
        Duration::from_secs(10),
        "the JOBS queue to empty",
        || async {
            let mut s = w.js.get_stream("JOBS").await.unwrap();
            (s.info().await.unwrap().state.messages == 0).then_some(())
        },
    )
    .await;
    still_serving(&w).await;
}

/// The exporter binary, as a process of its own.
fn spawn_exporter(w: &World) -> Child {
    Command::new(env!("CARGO_BIN_EXE_meterline-exporter"))
        .env("METERLINE_NATS_URL", w.nats.url())
        .env("METERLINE_EXPORTER_ADMIN_ADDR", "127.0.0.1:0")
        .env(
            "METERLINE_EXPORTER_SEALING_KEY",
            meterline_exporter::TEST_SEALING_KEY,
        )
        .env("METERLINE_EXPORTER_ACK_WAIT_SECS", "2")
        .env("METERLINE_EXPORTER_RETRY_BACKOFF_MS", "100")
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("run the exporter binary")
}

/// Rows of a job by id: version.
async fn versions(w: &World, rec: &ExportJobRecord) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for f in &rec.files {
        let key = f.uri.strip_prefix(&format!("s3://{BUCKET}/")).unwrap();
        let body = w.objects(key).await.remove(key).unwrap();
        for r in csv_rows(&body).1 {
            assert!(out.insert(r["id"].clone(), r["version"].clone()).is_none());
        }
    }
    out
}

#[tokio::test]
async fn a_job_killed_mid_upload_completes_after_restart_and_no_change_is_lost_or_doubled() {
    let w = World::new(None).await;
    let mut accounts = Vec::new();
    for i in 0..200 {
        accounts.push(
            w.account(
                &format!("k{i}"),
                &format!("Account {i} with a name long enough"),
            )
            .await,
        );
    }
    let (proxy, sid) = through_proxy(&w, "crash").await;

    // The upload stalls part-way; the exporter is killed (SIGKILL) there.
    proxy.set(Mode::Hang { after: 8_000 });
    let mut exporter = spawn_exporter(&w);
    let job = w.publish_job(&sid).await;
    eventually(
        Duration::from_secs(30),
        "the upload to stall mid-way",
        || async {
            let rec = w.job(&job).await?;
            (rec.status == JobStatus::Running
                && rec.to_sequence.is_some()
                && proxy.passed() >= 8_000)
                .then_some(())
        },
    )
    .await;
    exporter.kill().unwrap();
    exporter.wait().unwrap();
    let stalled = w.job(&job).await.unwrap();
    assert_eq!(stalled.status, JobStatus::Running);
    assert_eq!(w.cursor(&sid).await, None, "nothing moved before delivery");

    // Changes while it is down belong to the next window.
    let mut changed = Vec::new();
    for a in accounts.iter().take(5) {
        changed.push(w.update("account", a, json!({"name": "Renamed"})).await);
    }
    w.delete("account", &id(&accounts[5])).await;

    proxy.set(Mode::Forward);
    let mut exporter = spawn_exporter(&w);
    let first = w.finished(&job).await;
    assert_eq!(first.status, JobStatus::Succeeded, "{:?}", first.error);
    assert_eq!(
        first.to_sequence, stalled.to_sequence,
        "the same window, resumed"
    );
    assert!(first.attempts >= 2);
    let initial = versions(&w, &first).await;
    assert_eq!(initial.len(), 200);
    assert!(
        initial.values().all(|v| v == "1"),
        "the state as of S, not later"
    );

    let second = w.run(&sid).await;
    assert_eq!(second.status, JobStatus::Succeeded, "{:?}", second.error);
    assert_eq!(second.from_sequence, first.to_sequence);
    let next = versions(&w, &second).await;
    let mut expected: BTreeMap<String, String> =
        changed.iter().map(|a| (id(a), "2".to_string())).collect();
    expected.insert(id(&accounts[5]), "1".into());
    assert_eq!(
        next, expected,
        "each change once, in the window after the crash"
    );
    assert_eq!(w.completions(&sid).await.len(), 2);
    exporter.kill().unwrap();
    exporter.wait().unwrap();
}
