//! The exporter against real servers: entities written through the
//! entities service, jobs published on `JOBS`, exports read back from a
//! real S3-compatible server with a real S3 client and checked against the
//! entity history.

mod common;

use std::collections::BTreeMap;

use serde_json::{json, Value};

use common::{csv_rows, World, BUCKET, ORG};
use meterline_shared::exportjob::{ExportJobRecord, JobStatus};
use meterline_shared::protocol::ExportsRequest;

fn key_of(uri: &str) -> &str {
    uri.strip_prefix(&format!("s3://{BUCKET}/"))
        .expect("an s3 uri")
}

/// The rows a job delivered, by entity id: (name, deleted, version).
async fn exported(w: &World, rec: &ExportJobRecord) -> BTreeMap<String, (String, bool, String)> {
    let mut out = BTreeMap::new();
    for f in &rec.files {
        let key = key_of(&f.uri);
        let objects = w.objects(key).await;
        let body = objects
            .get(key)
            .unwrap_or_else(|| panic!("{key} was delivered"));
        assert_eq!(body.len() as u64, f.bytes);
        let sha: String = sha2_hex(body);
        assert_eq!(sha, f.sha256, "checksum of {key}");
        let (header, rows) = csv_rows(body);
        assert_eq!(header.last().map(String::as_str), Some("deleted"));
        assert_eq!(rows.len() as u64, f.rows);
        for r in rows {
            let prev = out.insert(
                r["id"].clone(),
                (
                    r["name"].clone(),
                    r["deleted"] == "true",
                    r["version"].clone(),
                ),
            );
            assert!(prev.is_none(), "{} exported twice in one job", r["id"]);
        }
    }
    out
}

fn sha2_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn scheduled_exports_hold_the_initial_state_then_only_changes() {
    let w = World::new(Some(|_| {})).await;
    let a = w.account("a", "Alpha").await;
    let b = w.account("b", "Beta").await;
    let c = w.account("c", "Gamma").await;
    let b = w.update("account", &b, json!({"name": "Beta 2"})).await;
    let b = w.update("account", &b, json!({"name": "Beta 3"})).await;
    // Another type, not selected: never exported.
    w.create("product", json!({"name": "P", "code": "p"})).await;
    let dest = w.destination("d1", json!({})).await;
    let sched = w
        .schedule("s1", &["ACCOUNTS"], &[&id(&dest)], json!({}))
        .await;
    let sid = id(&sched);

    // Initial: every live account, each at its latest version.
    let first = w.run(&sid).await;
    assert_eq!(first.status, JobStatus::Succeeded, "{:?}", first.error);
    assert_eq!(first.from_sequence, None);
    let rows = exported(&w, &first).await;
    assert_eq!(
        rows,
        BTreeMap::from([
            (id(&a), ("Alpha".into(), false, "1".into())),
            (id(&b), ("Beta 3".into(), false, "3".into())),
            (id(&c), ("Gamma".into(), false, "1".into())),
        ])
    );
    assert_eq!(first.rows, 3);
    let f = &first.files[0];
    assert!(
        key_of(&f.uri).starts_with(&format!(
            "meterline/d1/orgId={ORG}/date={}/hour={}/type=account/{}_account.csv",
            first.slot.format("%Y-%m-%d"),
            first.slot.format("%H"),
            first.id
        )),
        "{}",
        f.uri
    );
    assert_eq!(f.entity_type, "ACCOUNTS");
    // The manifest is there, listing the file.
    let manifest_key = format!("meterline/d1/orgId={ORG}/_manifests/{}.json", first.id);
    let objects = w.objects(&manifest_key).await;
    let manifest: Value = serde_json::from_slice(&objects[&manifest_key]).unwrap();
    assert_eq!(manifest["files"][0]["sha256"], f.sha256.as_str());
    assert_eq!(manifest["toSequence"], first.to_sequence.unwrap());
    // The cursor moved to S, and the completion was announced.
    let cursor = w.cursor(&sid).await.unwrap();
    assert_eq!(cursor.sequence, first.to_sequence.unwrap());
    assert_eq!(cursor.job_id.as_deref(), Some(first.id.as_str()));
    let done = w.completions(&sid).await;
    assert_eq!(done.len(), 1);
    assert_eq!(done[0]["jobId"], first.id.as_str());
    assert_eq!(done[0]["files"][0]["uri"], f.uri.as_str());
    assert_eq!(done[0]["rows"], 3);

    // Then only what changed: updates (the latest only), a delete (once,
    // marked), a create.
    let a = w.update("account", &a, json!({"name": "Alpha 1b"})).await;
    let a = w.update("account", &a, json!({"name": "Alpha 2"})).await;
    w.delete("account", &id(&c)).await;
    let d = w.account("d", "Delta").await;
    let second = w.run(&sid).await;
    assert_eq!(second.status, JobStatus::Succeeded, "{:?}", second.error);
    assert_eq!(second.from_sequence, first.to_sequence);
    assert_eq!(
        exported(&w, &second).await,
        BTreeMap::from([
            (id(&a), ("Alpha 2".into(), false, "3".into())),
            (id(&c), ("Gamma".into(), true, "1".into())),
            (id(&d), ("Delta".into(), false, "1".into())),
        ])
    );

    // Nothing changed: an empty file, header only.
    let third = w.run(&sid).await;
    assert_eq!(third.status, JobStatus::Succeeded);
    assert_eq!(third.rows, 0);
    let key = key_of(&third.files[0].uri).to_owned();
    let body = w.objects(&key).await.remove(&key).unwrap();
    let (header, rows) = csv_rows(&body);
    assert!(rows.is_empty());
    assert_eq!(header[0], "id");

    // Editing the frequency keeps the cursor: the next export holds only
    // what changed since the last one, not everything again.
    w.update(
        "exportschedule",
        &sched,
        json!({"scheduleType": "DAY", "period": 1}),
    )
    .await;
    let d = w.update("account", &d, json!({"name": "Delta 2"})).await;
    let fourth = w.run(&sid).await;
    assert_eq!(fourth.from_sequence, third.to_sequence);
    assert_eq!(
        exported(&w, &fourth).await,
        BTreeMap::from([(id(&d), ("Delta 2".into(), false, "2".into()))])
    );
    assert_eq!(w.completions(&sid).await.len(), 4);
    let events = w.export_events().await;
    let successes: Vec<&Value> = events
        .iter()
        .filter(|e| e["eventName"] == "dataexport.job.success")
        .collect();
    assert_eq!(successes.len(), 4);
    assert_eq!(successes[3]["jobId"], fourth.id.as_str());

    // A job already done is not run again when its request comes back.
    let mut again = w.job(&fourth.id).await.unwrap();
    let before = again.version;
    w.publish_request(&meterline_shared::exportjob::ExportJobRequest {
        job_id: fourth.id.clone(),
        org_id: ORG.into(),
        schedule_id: Some(sid.clone()),
        slot: fourth.slot,
        trigger: fourth.trigger,
        adhoc: None,
    })
    .await;
    // The list (served by the exporter) shows the four jobs, newest first.
    let page = w
        .exporter_request(
            "list",
            ExportsRequest {
                schedule_id: Some(sid.clone()),
                page_size: Some(3),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page["data"].as_array().unwrap().len(), 3);
    assert_eq!(page["data"][0]["id"], fourth.id.as_str());
    let rest = w
        .exporter_request(
            "list",
            ExportsRequest {
                schedule_id: Some(sid.clone()),
                page_size: Some(3),
                next_token: page["nextToken"].as_str().map(str::to_owned),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(rest["data"][0]["id"], first.id.as_str());
    assert!(rest.get("nextToken").is_none());
    again = w.job(&fourth.id).await.unwrap();
    assert_eq!(again.version, before, "a finished job was touched again");
    assert_eq!(w.completions(&sid).await.len(), 4);
}

#[tokio::test]
async fn large_files_are_split_into_parts_at_the_configured_size() {
    let w = World::new(Some(|s| s.split_bytes = 2048)).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(id(&w
            .account(&format!("acct{i}"), &format!("Account number {i}"))
            .await));
    }
    let dest = w
        .destination("split", json!({"partitionOrder": "TYPE_FIRST"}))
        .await;
    let sched = w
        .schedule("split", &["ACCOUNTS"], &[&id(&dest)], json!({}))
        .await;
    let rec = w.run(&id(&sched)).await;
    assert_eq!(rec.status, JobStatus::Succeeded, "{:?}", rec.error);
    assert!(rec.files.len() >= 3, "{} parts", rec.files.len());
    let mut seen = Vec::new();
    for (i, f) in rec.files.iter().enumerate() {
        let key = key_of(&f.uri);
        assert!(key.starts_with(&format!("meterline/split/orgId={ORG}/type=account/date=")));
        if i == 0 {
            assert!(key.ends_with("_account.csv"), "{key}");
        } else {
            assert!(
                key.ends_with(&format!("_account_part{:04}.csv", i + 1)),
                "{key}"
            );
        }
        let body = w.objects(key).await.remove(key).unwrap();
        assert!(body.len() <= 2048, "part {key} has {} bytes", body.len());
        let (_, rows) = csv_rows(&body);
        assert!(!rows.is_empty());
        seen.extend(rows.into_iter().map(|r| r["id"].clone()));
    }
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids, "every account once, across the parts");
}

/// The job's objects under destination `code`, as S3 lists them, are
/// exactly the parts its record lists.
async fn only_listed_parts(w: &World, code: &str, rec: &ExportJobRecord) {
    let mut keys: Vec<String> = w
        .objects(&format!("meterline/{code}/"))
        .await
        .into_keys()
        .filter(|k| k.contains(&rec.id) && !k.contains("_manifests"))
        .collect();
    keys.sort();
    let mut want: Vec<String> = rec
        .files
        .iter()
        .map(|f| key_of(&f.uri).to_owned())
        .collect();
    want.sort();
    assert_eq!(keys, want, "the job's objects are the parts it lists");
}

/// Appends `suffix` to every account's name, one update each.
async fn rename_all(w: &World, accounts: &mut [Value], suffix: &str) {
    for a in accounts.iter_mut() {
        let name = format!("{}{suffix}", a["name"].as_str().unwrap());
        *a = w.update("account", a, json!({ "name": name })).await;
    }
}

#[tokio::test]
async fn incremental_files_split_into_parts_hold_each_change_once_with_no_part_left_behind() {
    let w = World::new(Some(|s| s.split_bytes = 2048)).await;
    let mut accounts = Vec::new();
    for i in 0..40 {
        accounts.push(
            w.account(&format!("acct{i}"), &format!("Account number {i}"))
                .await,
        );
    }
    let dest = w.destination("parts", json!({})).await;
    let sched = w
        .schedule("parts", &["ACCOUNTS"], &[&id(&dest)], json!({}))
        .await;
    let sid = id(&sched);
    let initial = w.run(&sid).await;
    assert_eq!(initial.status, JobStatus::Succeeded, "{:?}", initial.error);

    // Every account changed once: rows sent as read stand, parts and all.
    rename_all(&w, &mut accounts, " v2").await;
    let once = w.run(&sid).await;
    assert_eq!(once.status, JobStatus::Succeeded, "{:?}", once.error);
    assert!(once.files.len() >= 2, "{} parts", once.files.len());
    only_listed_parts(&w, "parts", &once).await;
    let rows = exported(&w, &once).await;
    assert_eq!(rows.len(), 40);
    assert!(rows
        .values()
        .all(|(name, _, version)| name.ends_with(" v2") && version == "2"));
    assert_eq!(once.rows, 40);

    // Every account changed, then a few again: the first versions of
    // those must not be exported, nor any part written before that was
    // known.
    rename_all(&w, &mut accounts, " v3").await;
    for a in accounts.iter_mut().take(5) {
        *a = w.update("account", a, json!({"name": "again"})).await;
    }
    w.delete("account", &id(&accounts[39])).await;
    let again = w.run(&sid).await;
    assert_eq!(again.status, JobStatus::Succeeded, "{:?}", again.error);
    assert!(again.files.len() >= 2, "{} parts", again.files.len());
    only_listed_parts(&w, "parts", &again).await;
    let rows = exported(&w, &again).await;
    assert_eq!(rows.len(), 40);
    for (i, a) in accounts.iter().enumerate() {
        let (name, deleted, version) = &rows[&id(a)];
        if i < 5 {
            assert_eq!((name.as_str(), version.as_str()), ("again", "4"));
        } else {
            assert!(
                name.ends_with(" v2 v3") && version == "3",
                "{name} {version}"
            );
        }
        assert_eq!(*deleted, i == 39);
    }
    assert_eq!(again.rows, 40);
}

#[tokio::test]
async fn exports_without_destination_go_to_the_download_store_as_gzipped_jsonl() {
    let w = World::new(Some(|s| s.gzip = true)).await;
    let a = w.account("a", "Alpha, \"the first\"").await;
    let sched = w
        .schedule(
            "local",
            &["ACCOUNTS", "PRODUCTS"],
            &[],
            json!({"exportFileFormat": "JSONL"}),
        )
        .await;
    let rec = w.run(&id(&sched)).await;
    assert_eq!(rec.status, JobStatus::Succeeded, "{:?}", rec.error);
    assert_eq!(rec.files.len(), 2);
    let files = w
        .exporter_request(
            "files",
            ExportsRequest {
                id: Some(rec.id.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let account_file = files["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["entityType"] == "ACCOUNTS")
        .unwrap();
    let name = account_file["name"].as_str().unwrap();
    assert!(name.ends_with("_account.jsonl.gz"), "{name}");
    let gz = w.download_store_file(name).await;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["id"], a["id"]);
    assert_eq!(lines[0]["name"], "Alpha, \"the first\"");
    assert_eq!(lines[0]["deleted"], false);
    // A job's files are not offered before it has succeeded.
    let err = w
        .exporter_request(
            "files",
            ExportsRequest {
                id: Some("no-such-job".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, meterline_shared::ErrorCode::NotFound);
}

#[tokio::test]
async fn ad_hoc_exports_and_manual_runs_are_queued_over_the_bus() {
    let w = World::new(Some(|_| {})).await;
    let a = w.account("a", "Alpha").await;
    // Ad hoc: every account, no cursor involved.
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
    let job = queued["jobId"].as_str().unwrap();
    let rec = w.finished(job).await;
    assert_eq!(rec.status, JobStatus::Succeeded, "{:?}", rec.error);
    assert_eq!(rec.rows, 1);
    assert_eq!(w.completions("adhoc").await.len(), 1);
    // Bad ad-hoc requests are refused before anything is queued.
    for (body, says) in [
        (
            json!({"sourceType": "OPERATIONAL", "operationalDataTypes": ["WIDGETS"]}),
            "WIDGETS",
        ),
        (
            json!({"sourceType": "USAGE", "operationalDataTypes": ["ACCOUNTS"]}),
            "USAGE",
        ),
        (json!({"sourceType": "OPERATIONAL"}), "operationalDataTypes"),
        (
            json!({"sourceType": "OPERATIONAL", "operationalDataTypes": ["ACCOUNTS"], "destinationIds": ["nope"]}),
            "nope",
        ),
    ] {
        let e = w
            .exporter_request(
                "adhoc",
                ExportsRequest {
                    body: Some(body),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, meterline_shared::ErrorCode::BadRequest);
        assert!(e.message.contains(says), "{}", e.message);
    }
    // A manual run of a schedule uses its cursor like any other job.
    let sched = w.schedule("m", &["ACCOUNTS"], &[], json!({})).await;
    let sid = id(&sched);
    let first = w.run(&sid).await;
    assert_eq!(first.rows, 1);
    w.update("account", &a, json!({"name": "Alpha 2"})).await;
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
    let manual = w.finished(queued["jobId"].as_str().unwrap()).await;
    assert_eq!(manual.status, JobStatus::Succeeded);
    assert_eq!(manual.from_sequence, first.to_sequence);
    assert_eq!(manual.rows, 1);
    let e = w
        .exporter_request(
            "run",
            ExportsRequest {
                schedule_id: Some("no-such-schedule".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, meterline_shared::ErrorCode::NotFound);
}

#[tokio::test]
async fn replicas_share_the_queue_and_run_each_job_once() {
    let mut w = World::new(Some(|_| {})).await;
    let second = common::start_exporter(
        &w.nats,
        meterline_exporter::Settings::for_tests(w.nats.url()),
    )
    .await;
    w.account("a", "Alpha").await;
    let mut jobs = Vec::new();
    let mut schedules = Vec::new();
    for i in 0..6 {
        let sched = w
            .schedule(&format!("r{i}"), &["ACCOUNTS"], &[], json!({}))
            .await;
        let sid = id(&sched);
        jobs.push(w.publish_job(&sid).await);
        schedules.push(sid);
    }
    for (job, sid) in jobs.iter().zip(&schedules) {
        let rec = w.finished(job).await;
        assert_eq!(rec.status, JobStatus::Succeeded, "{:?}", rec.error);
        assert_eq!((rec.attempts, rec.rows), (1, 1), "job {job} ran once");
        assert_eq!(w.completions(sid).await.len(), 1);
    }
    second.stop().await;
    w.exporter.take().unwrap().stop().await;
}

#[tokio::test]
async fn the_admin_port_reports_health_readiness_and_metrics() {
    let w = World::new(None).await;
    let app = meterline_exporter::App::build(meterline_exporter::Settings::for_tests(w.nats.url()))
        .await
        .unwrap();
    let admin = app.admin_addr();
    let running = meterline_shared::testkit::Running::spawn(|stop| app.run_until_stopped(stop));
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let url = format!("http://{admin}{path}");
        let http = http.clone();
        async move {
            let res = http.get(url).send().await.ok()?;
            Some((res.status().as_u16(), res.text().await.ok()?))
        }
    };
    let (status, body) = get("/healthz").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "ok"));
    meterline_shared::testkit::eventually(std::time::Duration::from_secs(10), "ready", || async {
        get("/readyz").await.filter(|(s, _)| *s == 200)
    })
    .await;
    let (status, _) = get("/metrics").await.unwrap();
    assert_eq!(status, 200);
    running.stop().await;
}
