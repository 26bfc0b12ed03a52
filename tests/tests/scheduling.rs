//! Export schedules end to end: written over HTTP through the gateway as a
//! customer would, turned into export jobs by the scheduler on the wall
//! clock, and visible where the exporter reads them (`JOBS`, `export_jobs`).

use std::time::Duration;

use async_nats::jetstream;
use serde_json::{json, Value};

use meterline_shared::exportjob::{job_id, job_key};
mod common;

use common::{Service, System};
use meterline_shared::testkit::eventually;
use meterline_shared::{provision, subjects};

#[tokio::test]
async fn a_schedule_created_over_http_gets_its_first_job_at_once() {
    let system = System::start(&[Service::Scheduler], "sched-org", "Scheduling", "sched").await;
    let (client, creds, base) = (&system.client, &system.creds, &system.base);

    let http = reqwest::Client::new();
    let bearer = system.bearer(&http).await;
    let api = format!(
        "{base}/organizations/{}/dataexports/schedules",
        creds.org_id
    );

    let refused = http
        .post(&api)
        .bearer_auth(&bearer)
        .json(
            &json!({"name": "Too often", "code": "too-often", "sourceType": "OPERATIONAL",
            "operationalDataTypes": ["ACCOUNTS"], "cronExpression": "*/5 * * * *"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("more often than every 15 minutes"),
        "{body}"
    );

    let created = http
        .post(&api)
        .bearer_auth(&bearer)
        .json(&json!({"name": "Hourly accounts", "code": "hourly-accounts", "sourceType": "OPERATIONAL",
            "operationalDataTypes": ["ACCOUNTS"], "scheduleType": "HOUR", "period": 1, "offset": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let schedule: Value = created.json().await.unwrap();
    let sid = schedule["id"].as_str().unwrap();
    let slot = chrono::DateTime::parse_from_rfc3339(schedule["dtCreated"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);
    let job = job_id(&creds.org_id, sid, slot);

    let js = jetstream::new(client.clone());
    let record: Value = eventually(
        Duration::from_secs(15),
        "the immediate job's record",
        || {
            let js = js.clone();
            let key = job_key(&creds.org_id, &job);
            async move {
                let kv = js.get_key_value(provision::EXPORT_JOBS_BUCKET).await.ok()?;
                let bytes = kv.get(key).await.ok()??;
                serde_json::from_slice(&bytes).ok()
            }
        },
    )
    .await;
    assert_eq!(record["status"], "PENDING");
    assert_eq!(record["trigger"], "IMMEDIATE");
    assert_eq!(record["scheduleId"], sid);
    let request = eventually(Duration::from_secs(15), "the request on JOBS", || {
        let js = js.clone();
        let subject = subjects::export_job(&creds.org_id, sid);
        async move {
            let stream = js.get_stream(subjects::JOBS_STREAM).await.ok()?;
            let m = stream
                .get_last_raw_message_by_subject(&subject)
                .await
                .ok()?;
            serde_json::from_slice::<Value>(&m.payload).ok()
        }
    })
    .await;
    assert_eq!(request["jobId"], job.as_str());

    system.stop().await;
}
