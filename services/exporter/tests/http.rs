//! The export routes of the gateway in front of the real exporter, over
//! real sockets with a real HTTP client: ad-hoc exports, job status and
//! lists, signed download URLs, manual runs, and what is refused.

mod common;

use std::time::Duration;

use serde_json::{json, Value};

use common::{World, ORG};
use meterline_gateway::{Claims, TokenKeys, TEST_JWT_SECRET};
use meterline_shared::testkit::{eventually, Running};

struct Http {
    base: String,
    client: reqwest::Client,
    token: String,
    _gateway: Running,
}

fn token(org: &str) -> String {
    let keys = TokenKeys::new(TEST_JWT_SECRET.as_bytes(), Duration::from_secs(60));
    let now = chrono::Utc::now().timestamp() as u64;
    keys.sign(&Claims {
        sub: "su-test".into(),
        org: org.into(),
        iat: now,
        exp: now + 600,
        iss: "meterline".into(),
        jti: uuid::Uuid::new_v4().to_string(),
    })
    .unwrap()
}

impl Http {
    async fn start(w: &World) -> Http {
        let app =
            meterline_gateway::App::build(meterline_gateway::Settings::for_tests(w.nats.url()))
                .await
                .unwrap();
        let base = format!("http://{}", app.http_addr());
        Http {
            base,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .unwrap(),
            token: token(ORG),
            _gateway: Running::spawn(|stop| app.run_until_stopped(stop)),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/organizations/{ORG}/{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let res = req.send().await.expect("response");
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("status {status}: not JSON: {text}"));
        if status >= 400 {
            assert!(
                body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "an error without a message: {body}"
            );
        }
        (status, body)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.client.get(self.url(path)).bearer_auth(&self.token))
            .await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(
            self.client
                .post(self.url(path))
                .bearer_auth(&self.token)
                .json(&body),
        )
        .await
    }

    async fn wait_done(&self, job: &str) -> Value {
        eventually(Duration::from_secs(60), "the job to finish", || async {
            let (status, body) = self.get(&format!("dataexports/jobs/{job}")).await;
            (status == 200 && matches!(body["status"].as_str(), Some("SUCCEEDED" | "FAILED")))
                .then_some(body)
        })
        .await
    }
}

#[tokio::test]
async fn export_jobs_over_http() {
    let w = World::new(Some(|_| {})).await;
    let http = Http::start(&w).await;
    let a = w.account("a", "Alpha").await;

    // Ad hoc, no destination: the job runs, and its file is downloaded
    // through a signed URL without a token.
    let (status, body) = http
        .post(
            "dataexports/adhoc",
            json!({"sourceType": "OPERATIONAL", "operationalDataTypes": ["ACCOUNTS"], "exportFileFormat": "CSV"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let job = body["jobId"].as_str().unwrap().to_owned();
    let done = http.wait_done(&job).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    assert_eq!(done["sourceType"], "OPERATIONAL");
    assert_eq!(done["rows"], 1);

    let (status, link) = http
        .get(&format!("dataexports/jobs/{job}/getdownloadurl"))
        .await;
    assert_eq!(status, 200, "{link}");
    let expires = chrono::DateTime::parse_from_rfc3339(link["expirationTime"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);
    let left = expires - chrono::Utc::now();
    assert!(left > chrono::TimeDelta::minutes(14) && left <= chrono::TimeDelta::minutes(15));
    let url = link["url"].as_str().unwrap();
    assert!(url.starts_with(&http.base));
    let res = http.client.get(url).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(res.headers()["content-type"], "text/csv");
    let csv = res.text().await.unwrap();
    let (_, rows) = common::csv_rows(csv.as_bytes());
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["id"], a["id"].as_str().unwrap());
    // A tampered or unsigned URL is refused.
    let tampered = url.replace("sig=", "sig=x");
    let (status, _) = http.send(http.client.get(&tampered)).await;
    assert_eq!(status, 403);
    let other = url.replace(&format!("/{ORG}/"), "/another-org/");
    let (status, _) = http.send(http.client.get(&other)).await;
    assert_eq!(status, 403);

    // Lists, filtered and paged; bad filters are 400s.
    let (status, page) = http
        .get("dataexports/jobs?status=SUCCEEDED&pageSize=5")
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["data"][0]["id"], job.as_str());
    let (status, _) = http.get("dataexports/jobs?status=DONE").await;
    assert_eq!(status, 400);
    let (status, _) = http.get("dataexports/jobs?pageSize=0").await;
    assert_eq!(status, 400);
    let (status, _) = http
        .get("dataexports/jobs?dateCreatedStart=yesterday")
        .await;
    assert_eq!(status, 400);
    let (status, page) = http.get("dataexports/jobs?status=FAILED").await;
    assert_eq!((status, page["data"].as_array().unwrap().len()), (200, 0));
    let (status, _) = http.get("dataexports/jobs/no-such-job").await;
    assert_eq!(status, 404);
    // Another org sees nothing of it.
    let (status, _) = http
        .send(
            http.client
                .get(format!(
                    "{}/organizations/another-org/dataexports/jobs/{job}",
                    http.base
                ))
                .bearer_auth(token("another-org")),
        )
        .await;
    assert_eq!(status, 404);

    // Bad ad-hoc bodies are refused with the reason.
    let (status, body) = http
        .post(
            "dataexports/adhoc",
            json!({"sourceType": "OPERATIONAL", "operationalDataTypes": ["WIDGETS"]}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(body["message"].as_str().unwrap().contains("WIDGETS"));

    // A destination with static keys: the secret is never shown again.
    let (status, dest) = http
        .post(
            "dataexports/destinations",
            json!({
                "name": "S3 compatible", "code": "s3c", "bucketName": common::BUCKET,
                "prefix": "http", "endpointUrl": w.s3.endpoint(), "pathStyle": true,
                "accessKeyId": w.s3.access_key(), "secretAccessKey": w.s3.secret_key(),
            }),
        )
        .await;
    assert_eq!(status, 200, "{dest}");
    assert_eq!(dest["secretAccessKey"], "********");
    assert!(!dest.to_string().contains(w.s3.secret_key()));
    let (status, body) = http
        .post(
            "dataexports/destinations",
            json!({"name": "No keys", "code": "nokeys", "bucketName": "b1b"}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        body["message"].as_str().unwrap().contains("iamRoleArn"),
        "{body}"
    );

    // A schedule run on demand, to that destination.
    let (status, sched) = http
        .post(
            "dataexports/schedules",
            json!({
                "name": "Hourly", "code": "hourly", "sourceType": "OPERATIONAL",
                "operationalDataTypes": ["ACCOUNTS"], "destinationIds": [dest["id"]],
                "scheduleType": "HOUR", "period": 1,
            }),
        )
        .await;
    assert_eq!(status, 200, "{sched}");
    let sid = sched["id"].as_str().unwrap();
    let (status, run) = http
        .post(&format!("dataexports/schedules/{sid}/run"), json!({}))
        .await;
    assert_eq!(status, 200, "{run}");
    let done = http.wait_done(run["jobId"].as_str().unwrap()).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    assert_eq!(done["scheduleId"], sid);
    let uri = done["files"][0]["uri"].as_str().unwrap();
    assert!(
        uri.starts_with(&format!("s3://{}/http/orgId={ORG}/", common::BUCKET)),
        "{uri}"
    );
    // Its files went to the bucket: nothing to download here.
    let (status, body) = http
        .get(&format!(
            "dataexports/jobs/{}/getdownloadurl",
            done["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = http
        .post("dataexports/schedules/no-such-schedule/run", json!({}))
        .await;
    assert_eq!(status, 404);
    let (status, _) = http
        .get(&format!("dataexports/jobs?scheduleId={sid}"))
        .await;
    assert_eq!(status, 200);
}
