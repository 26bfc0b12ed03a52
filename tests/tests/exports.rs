//! Data exports end to end: an account and an export schedule written over
//! HTTP, the scheduler's immediate job run by the exporter, the job followed
//! and its file downloaded over HTTP, and the completion announced on
//! `EXPORTS` for downstream systems.

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use serde_json::{json, Value};

use meterline_shared::subjects;
use meterline_shared::testkit::{eventually, NatsServer, Running};

#[tokio::test]
async fn a_new_schedule_is_exported_at_once_and_announced() {
    let nats = NatsServer::start();
    let entities =
        meterline_entities::App::build(meterline_entities::Settings::for_tests(nats.url()))
            .await
            .expect("build entities");
    let entities = Running::spawn(|stop| entities.run_until_stopped(stop));
    let scheduler =
        meterline_scheduler::App::build(meterline_scheduler::Settings::for_tests(nats.url()))
            .await
            .expect("build scheduler");
    let scheduler = Running::spawn(|stop| scheduler.run_until_stopped(stop));
    let exporter =
        meterline_exporter::App::build(meterline_exporter::Settings::for_tests(nats.url()))
            .await
            .expect("build exporter");
    let exporter = Running::spawn(|stop| exporter.run_until_stopped(stop));
    let gateway = meterline_gateway::App::build(meterline_gateway::Settings::for_tests(nats.url()))
        .await
        .expect("build gateway");
    let base = format!("http://{}", gateway.http_addr());
    let gateway = Running::spawn(|stop| gateway.run_until_stopped(stop));
    let client = nats.client().await;
    let creds = meterline_entities::bootstrap(&client, "export-org", "Exports", "exports")
        .await
        .expect("bootstrap");

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let token: Value = http
        .post(format!("{base}/oauth/token"))
        .basic_auth(&creds.access_key, Some(&creds.secret))
        .json(&json!({"grant_type": "client_credentials"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bearer = token["access_token"].as_str().unwrap().to_owned();
    let api = format!("{base}/organizations/{}", creds.org_id);
    let post = |path: &str, body: Value| {
        http.post(format!("{api}/{path}"))
            .bearer_auth(&bearer)
            .json(&body)
            .send()
    };

    let account: Value = post(
        "accounts",
        json!({"name": "Acme", "code": "acme", "emailAddress": "ap@acme.example"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let account_id = account["id"].as_str().unwrap().to_owned();

    // Subscribed before the schedule exists, as a downstream system would be.
    let js = jetstream::new(client.clone());
    let exports = js.get_stream(subjects::EXPORTS_STREAM).await.unwrap();
    let consumer = exports
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("export.complete.{}.>", creds.org_id),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut completions = consumer.messages().await.unwrap();

    let created = post(
        "dataexports/schedules",
        json!({"name": "Hourly accounts", "code": "hourly", "sourceType": "OPERATIONAL",
            "operationalDataTypes": ["ACCOUNTS"], "scheduleType": "HOUR", "period": 1}),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 200);
    let schedule: Value = created.json().await.unwrap();
    let sid = schedule["id"].as_str().unwrap().to_owned();

    // The scheduler's immediate job, run by the exporter, seen over HTTP.
    let job: Value = eventually(
        Duration::from_secs(30),
        "the first export to succeed",
        || {
            let (http, bearer) = (http.clone(), bearer.clone());
            let url = format!("{api}/dataexports/jobs?scheduleId={sid}");
            async move {
                let page: Value = http
                    .get(url)
                    .bearer_auth(bearer)
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                page["data"]
                    .as_array()?
                    .iter()
                    .find(|j| j["status"] == "SUCCEEDED")
                    .cloned()
            }
        },
    )
    .await;
    assert_eq!(job["trigger"], "IMMEDIATE");
    assert_eq!(job["rows"], 1);

    let link: Value = http
        .get(format!(
            "{api}/dataexports/jobs/{}/getdownloadurl",
            job["id"].as_str().unwrap()
        ))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let csv = http
        .get(link["url"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(csv.starts_with("id,"), "{csv}");
    assert!(csv.contains(&account_id), "{csv}");

    let done = tokio::time::timeout(Duration::from_secs(15), completions.next())
        .await
        .expect("the completion in time")
        .unwrap()
        .unwrap();
    assert_eq!(
        done.subject.as_str(),
        subjects::export_complete(&creds.org_id, &sid)
    );
    let done: Value = serde_json::from_slice(&done.payload).unwrap();
    assert_eq!(done["jobId"], job["id"]);
    assert_eq!(done["rows"], 1);
    assert!(done["files"][0]["uri"]
        .as_str()
        .unwrap()
        .starts_with("export_files:"));

    gateway.stop().await;
    exporter.stop().await;
    scheduler.stop().await;
    entities.stop().await;
}
