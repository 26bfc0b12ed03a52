//! Export schedules end to end: written over HTTP through the gateway as a
//! customer would, turned into export jobs by the scheduler on the wall
//! clock, and visible where the exporter reads them (`JOBS`, `export_jobs`).

use std::time::Duration;

use async_nats::jetstream;
use serde_json::{json, Value};

use meterline_shared::exportjob::{job_id, job_key};
use meterline_shared::testkit::{eventually, NatsServer, Running};
use meterline_shared::{provision, subjects};

#[tokio::test]
async fn a_schedule_created_over_http_gets_its_first_job_at_once() {
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
    let gateway = meterline_gateway::App::build(meterline_gateway::Settings::for_tests(nats.url()))
        .await
        .expect("build gateway");
    let base = format!("http://{}", gateway.http_addr());
    let gateway = Running::spawn(|stop| gateway.run_until_stopped(stop));
    let client = nats.client().await;
    let creds = meterline_entities::bootstrap(&client, "sched-org", "Scheduling", "sched")
        .await
        .expect("bootstrap");

    let http = reqwest::Client::new();
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

    gateway.stop().await;
    scheduler.stop().await;
    entities.stop().await;
}
