//! Data exports end to end: an account and an export schedule written over
//! HTTP, the scheduler's immediate job run by the exporter, the job followed
//! and its file downloaded over HTTP, and the completion announced on
//! `EXPORTS` for downstream systems.

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use serde_json::{json, Value};

use meterline_shared::subjects;
mod common;

use common::{Service, System};
use meterline_shared::testkit::eventually;

#[tokio::test]
async fn a_new_schedule_is_exported_at_once_and_announced() {
    let system = System::start(
        &[Service::Scheduler, Service::Exporter],
        "export-org",
        "Exports",
        "exports",
    )
    .await;
    let (client, creds, base) = (&system.client, &system.creds, &system.base);

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let bearer = system.bearer(&http).await;
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

    system.stop().await;
}
