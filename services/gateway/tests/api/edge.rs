//! The gateway on its own: a real nats-server, and a stand-in responder on
//! `svc.auth.verify` and `svc.entities.<org>.>` that records what reached the
//! bus and echoes it back. Checks the mapping of HTTP onto subjects, headers
//! and bodies, and every refusal the gateway makes before the bus.

use std::sync::{Arc, Mutex};

use async_nats::HeaderMap;
use futures::StreamExt;
use meterline_gateway::Settings;
use meterline_shared::bus::{ERROR_CODE_HEADER, ERROR_HEADER};
use meterline_shared::protocol::{EntityRequest, Principal, VerifyRequest};
use meterline_shared::testkit::NatsServer;
use meterline_shared::{envelope, subjects};
use serde_json::json;

use crate::helpers::{send, Gateway, STEP};

const ORG: &str = "org-edge";
const KEY: &str = "AK-EDGE";
const SECRET: &str = "s3cret/with:colon";

/// What reached the bus: (subject, actor header, content-type header, request).
type Seen = Arc<Mutex<Vec<(String, String, String, EntityRequest)>>>;

/// Answers `svc.auth.verify` for one access key and echoes entity requests of
/// [`ORG`]; a request for id `missing` gets a 404 error reply.
async fn stand_in(nats: &NatsServer) -> Seen {
    let client = nats.client().await;
    let seen: Seen = Default::default();

    let mut verify = client.subscribe(subjects::AUTH_VERIFY).await.unwrap();
    let c = client.clone();
    tokio::spawn(async move {
        while let Some(msg) = verify.next().await {
            let req: VerifyRequest = serde_json::from_slice(&msg.payload).unwrap();
            let reply = msg.reply.unwrap();
            if req.access_key == KEY && req.secret == SECRET {
                let p = Principal {
                    org_id: ORG.into(),
                    service_user_id: "su-edge".into(),
                };
                c.publish(reply, serde_json::to_vec(&p).unwrap().into())
                    .await
                    .unwrap();
            } else {
                let mut h = HeaderMap::new();
                h.insert(ERROR_CODE_HEADER, "401");
                h.insert(ERROR_HEADER, "invalid access key or secret");
                c.publish_with_headers(reply, h, "".into()).await.unwrap();
            }
        }
    });

    let mut entities = client
        .subscribe(format!("svc.entities.{ORG}.>"))
        .await
        .unwrap();
    let c = client.clone();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Some(msg) = entities.next().await {
            let h = msg.headers.clone().unwrap_or_default();
            let get = |k: &str| h.get(k).map(|v| v.as_str().to_owned()).unwrap_or_default();
            let req: EntityRequest = serde_json::from_slice(&msg.payload).unwrap();
            let reply = msg.reply.unwrap();
            s.lock().unwrap().push((
                msg.subject.to_string(),
                get(envelope::HEADER_ACTOR),
                get("Content-Type"),
                req.clone(),
            ));
            if req.id.as_deref() == Some("missing") {
                let mut h = HeaderMap::new();
                h.insert(ERROR_CODE_HEADER, "404");
                h.insert(ERROR_HEADER, "account missing not found");
                c.publish_with_headers(reply, h, "".into()).await.unwrap();
            } else {
                let echo = json!({"subject": msg.subject.as_str(), "request": serde_json::to_value(&req).unwrap()});
                c.publish(reply, serde_json::to_vec(&echo).unwrap().into())
                    .await
                    .unwrap();
            }
        }
    });
    // The subscriptions are registered once the server has seen a round trip.
    tokio::time::timeout(STEP, client.flush())
        .await
        .unwrap()
        .unwrap();
    seen
}

fn seen_count(seen: &Seen) -> usize {
    seen.lock().unwrap().len()
}

#[tokio::test]
async fn tokens_are_issued_for_basic_json_form_and_body_credentials() {
    let nats = NatsServer::start();
    let _seen = stand_in(&nats).await;
    let gw = Gateway::start(&nats).await;
    let token_url = gw.url("/oauth/token");

    // m3ter's SDK: Basic credentials and a JSON grant.
    let (status, body) = send(
        gw.http
            .post(&token_url)
            .basic_auth(KEY, Some(SECRET))
            .json(&json!({"grant_type": "client_credentials", "scope": "whatever"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 18000);
    assert_eq!(body["scope"], "m3ter-resources/m3ter-scope");
    let token = body["access_token"].as_str().unwrap().to_owned();

    // OAuth form body with Basic credentials.
    let (status, body) = send(
        gw.http
            .post(&token_url)
            .basic_auth(KEY, Some(SECRET))
            .form(&[("grant_type", "client_credentials")]),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Credentials in the form body (RFC 6749 §2.3.1).
    let (status, body) = send(gw.http.post(&token_url).form(&[
        ("grant_type", "client_credentials"),
        ("client_id", KEY),
        ("client_secret", SECRET),
    ]))
    .await;
    assert_eq!(status, 200, "{body}");

    // The token opens the org's routes.
    let (status, body) = send(
        gw.http
            .get(gw.org_url(ORG, "accounts/acc1"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["subject"], format!("svc.entities.{ORG}.account.get"));

    // Refusals.
    let (status, body) = send(
        gw.http
            .post(&token_url)
            .basic_auth(KEY, Some(SECRET))
            .json(&json!({"grant_type": "password"})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "unsupported_grant_type");
    let (status, _) = send(
        gw.http
            .post(&token_url)
            .basic_auth(KEY, Some(SECRET))
            .json(&json!({})),
    )
    .await;
    assert_eq!(status, 400);
    let (status, body) = send(
        gw.http
            .post(&token_url)
            .json(&json!({"grant_type": "client_credentials"})),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid_client");
    let (status, body) = send(
        gw.http
            .post(&token_url)
            .basic_auth(KEY, Some("wrong"))
            .json(&json!({"grant_type": "client_credentials"})),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["message"], "invalid access key or secret");
    let (status, _) = send(
        gw.http
            .post(&token_url)
            .header("authorization", "Basic not-base64!")
            .json(&json!({"grant_type": "client_credentials"})),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = send(
        gw.http
            .post(&token_url)
            .basic_auth(KEY, Some(SECRET))
            .header("content-type", "application/json")
            .body("{not json"),
    )
    .await;
    assert_eq!(status, 400);
    gw.stop().await;
}

#[tokio::test]
async fn routes_map_onto_entity_subjects_with_the_caller_as_actor() {
    let nats = NatsServer::start();
    let seen = stand_in(&nats).await;
    let gw = Gateway::start(&nats).await;
    let token = gw.token(ORG, "su-7", 60);

    let (status, body) = send(
        gw.http
            .post(gw.org_url(ORG, "accounts"))
            .bearer_auth(&token)
            .json(&json!({"name": "Acme", "code": "acme", "emailAddress": "a@acme.test"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["subject"],
        format!("svc.entities.{ORG}.account.create")
    );
    assert_eq!(body["request"]["body"]["code"], "acme");

    let (status, body) = send(
        gw.http
            .put(gw.org_url(ORG, "accounts/acc1"))
            .bearer_auth(&token)
            .json(&json!({"name": "B", "version": 1})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["request"]["id"], "acc1");
    assert_eq!(body["request"]["body"]["version"], 1);

    let (status, body) = send(
        gw.http
            .delete(gw.org_url(ORG, "accounts/acc1?version=2"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["subject"],
        format!("svc.entities.{ORG}.account.delete")
    );
    assert_eq!(body["request"]["version"], 2);

    // Lists: paging, repeated and comma-separated ids and codes, filters.
    let (status, body) = send(
        gw.http
            .get(gw.org_url(
                ORG,
                "accountplans?pageSize=2&nextToken=t1&ids=a&ids=b,c&codes=x&accountId=acc1",
            ))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["subject"],
        format!("svc.entities.{ORG}.accountplan.list")
    );
    assert_eq!(
        body["request"],
        json!({"pageSize": 2, "nextToken": "t1", "ids": ["a", "b", "c"], "codes": ["x"], "filters": {"accountId": "acc1"}})
    );

    // A child collection carries its parent's id; nested static paths work.
    let (status, body) = send(
        gw.http
            .post(gw.org_url(ORG, "balances/bal1/transactions"))
            .bearer_auth(&token)
            .json(&json!({"amount": 5})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["subject"],
        format!("svc.entities.{ORG}.balancetransaction.create")
    );
    assert_eq!(body["request"]["parentId"], "bal1");
    let (status, body) = send(
        gw.http
            .get(gw.org_url(ORG, "picklists/transactiontypes/tt1"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["subject"],
        format!("svc.entities.{ORG}.transactiontype.get")
    );

    // Error replies from the bus keep their status.
    let (status, body) = send(
        gw.http
            .get(gw.org_url(ORG, "accounts/missing"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(
        (status, body["message"].as_str().unwrap()),
        (404, "account missing not found")
    );

    for (_, actor, content_type, _) in seen.lock().unwrap().iter() {
        assert_eq!(actor, "su-7");
        assert_eq!(content_type, "application/json");
    }
    assert_eq!(seen_count(&seen), 7);
    gw.stop().await;
}

#[tokio::test]
async fn bad_requests_are_refused_before_the_bus_and_the_gateway_keeps_serving() {
    let nats = NatsServer::start();
    let seen = stand_in(&nats).await;
    let gw = Gateway::start_with(Settings {
        body_limit_bytes: 4096,
        ..Settings::for_tests(nats.url())
    })
    .await;
    let token = gw.token(ORG, "su-1", 60);
    let accounts = gw.org_url(ORG, "accounts");
    let h = &gw.http;

    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "malformed json",
            h.post(&accounts).bearer_auth(&token).body("{\"name\": "),
            400,
            "malformed JSON",
        ),
        (
            "array body",
            h.post(&accounts).bearer_auth(&token).json(&json!([1, 2])),
            400,
            "JSON object",
        ),
        (
            "empty body",
            h.post(&accounts).bearer_auth(&token),
            400,
            "empty",
        ),
        (
            "text body",
            h.post(&accounts)
                .bearer_auth(&token)
                .header("content-type", "text/plain")
                .body("hello"),
            400,
            "malformed JSON",
        ),
        (
            "too large",
            h.post(&accounts)
                .bearer_auth(&token)
                .json(&json!({"name": "x".repeat(5000)})),
            413,
            "larger",
        ),
        (
            "much too large",
            h.post(&accounts)
                .bearer_auth(&token)
                .json(&json!({"name": "x".repeat(3 << 20)})),
            413,
            "larger",
        ),
        (
            "dot in id",
            h.get(format!("{accounts}/a.b")).bearer_auth(&token),
            400,
            "not allowed",
        ),
        (
            "encoded dot in id",
            h.get(format!("{accounts}/a%2Eb")).bearer_auth(&token),
            400,
            "not allowed",
        ),
        (
            "star in id",
            h.delete(format!("{accounts}/a*")).bearer_auth(&token),
            400,
            "not allowed",
        ),
        (
            "gt in id",
            h.put(format!("{accounts}/%3E"))
                .bearer_auth(&token)
                .json(&json!({"version": 1})),
            400,
            "not allowed",
        ),
        (
            "space in id",
            h.get(format!("{accounts}/a%20b")).bearer_auth(&token),
            400,
            "not allowed",
        ),
        (
            "space in parent id",
            h.get(gw.org_url(ORG, "balances/b%20x/transactions"))
                .bearer_auth(&token),
            400,
            "balanceId",
        ),
        (
            "dot in org id, no token",
            h.get(gw.org_url("org.x", "accounts")),
            400,
            "orgId",
        ),
        (
            "wildcard org id",
            h.get(gw.org_url("%3E", "accounts")).bearer_auth(&token),
            400,
            "orgId",
        ),
        (
            "page size too big",
            h.get(format!("{accounts}?pageSize=101"))
                .bearer_auth(&token),
            400,
            "pageSize",
        ),
        (
            "page size zero",
            h.get(format!("{accounts}?pageSize=0")).bearer_auth(&token),
            400,
            "pageSize",
        ),
        (
            "delete version not a number",
            h.delete(format!("{accounts}/a?version=x"))
                .bearer_auth(&token),
            400,
            "version",
        ),
        ("no token", h.get(&accounts), 401, "missing bearer token"),
        (
            "basic instead of bearer",
            h.get(&accounts).basic_auth(KEY, Some(SECRET)),
            401,
            "missing bearer token",
        ),
        (
            "expired token",
            h.get(&accounts).bearer_auth(gw.token(ORG, "su-1", -3600)),
            401,
            "token expired",
        ),
        (
            "garbage token",
            h.get(&accounts).bearer_auth("abc.def.ghi"),
            401,
            "invalid token",
        ),
        (
            "forged token",
            h.get(&accounts).bearer_auth(forged(ORG)),
            401,
            "invalid token",
        ),
        (
            "other org's token",
            h.get(&accounts)
                .bearer_auth(gw.token("org-other", "su-1", 60)),
            403,
            "org-edge",
        ),
        (
            "unknown route",
            h.get(gw.org_url(ORG, "nosuchthings")).bearer_auth(&token),
            404,
            "no such route",
        ),
        (
            "unknown top-level route",
            h.get(gw.url("/v2/whatever")),
            404,
            "no such route",
        ),
        (
            "wrong method on item",
            h.post(format!("{accounts}/a"))
                .bearer_auth(&token)
                .json(&json!({})),
            405,
            "method",
        ),
        (
            "wrong method on collection",
            h.delete(&accounts).bearer_auth(&token),
            405,
            "method",
        ),
        (
            "wrong method on token",
            h.get(gw.url("/oauth/token")),
            405,
            "method",
        ),
    ];
    for (what, request, want, needle) in cases {
        let (status, body) = send(request).await;
        let message = body["message"].as_str().unwrap();
        assert_eq!(status, want, "{what}: {body}");
        assert!(
            message.contains(needle),
            "{what}: {message:?} lacks {needle:?}"
        );
        // After each refusal the gateway still answers.
        let (status, _) = send(h.get(format!("{accounts}/ok")).bearer_auth(&token)).await;
        assert_eq!(status, 200, "after {what}");
    }
    // Only the health probes reached the bus.
    let reached_bus = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, _, _, r)| r.id.as_deref() != Some("ok"))
        .count();
    assert_eq!(reached_bus, 0, "a refused request reached the bus");
    gw.stop().await;
}

fn forged(org: &str) -> String {
    let keys = meterline_gateway::TokenKeys::new(
        b"not-the-gateway-key",
        std::time::Duration::from_secs(60),
    );
    keys.issue(&Principal {
        org_id: org.into(),
        service_user_id: "su-1".into(),
    })
    .unwrap()
}

#[tokio::test]
async fn no_responder_is_a_503_and_public_documents_need_no_token() {
    let nats = NatsServer::start();
    let _seen = stand_in(&nats).await;
    let gw = Gateway::start_with(Settings {
        public_url: Some("https://billing.example.com".into()),
        ..Settings::for_tests(nats.url())
    })
    .await;

    // Nothing answers for this org.
    let (status, body) = send(
        gw.http
            .get(gw.org_url("org-nobody", "meters"))
            .bearer_auth(gw.token("org-nobody", "su", 60)),
    )
    .await;
    assert_eq!(status, 503, "{body}");

    for path in ["/openapi.json", "/docs/openapi.json"] {
        let (status, doc) = send(gw.http.get(gw.url(path))).await;
        assert_eq!(status, 200);
        assert!(
            doc["paths"].is_object(),
            "{path} is not an OpenAPI document"
        );
        assert_eq!(doc["servers"][0]["url"], "https://billing.example.com");
    }
    let r = gw.http.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = gw
            .http
            .get(format!("http://{}{path}", gw.admin_addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "admin {path}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn an_empty_jwt_secret_still_issues_working_tokens() {
    let nats = NatsServer::start();
    let _seen = stand_in(&nats).await;
    let mut settings = Settings::for_tests(nats.url());
    settings.jwt_secret = Default::default();
    settings.token_ttl_secs = 120;
    let gw = Gateway::start_with(settings).await;
    let (status, body) = send(
        gw.http
            .post(gw.url("/oauth/token"))
            .basic_auth(KEY, Some(SECRET))
            .json(&json!({"grant_type": "client_credentials"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in"], 120);
    let token = body["access_token"].as_str().unwrap();
    let (status, _) = send(gw.http.get(gw.org_url(ORG, "accounts")).bearer_auth(token)).await;
    assert_eq!(status, 200);
    // A token signed with the fixed test key is not accepted by this gateway.
    let (status, _) = send(
        gw.http
            .get(gw.org_url(ORG, "accounts"))
            .bearer_auth(gw.token(ORG, "su", 60)),
    )
    .await;
    assert_eq!(status, 401);
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_stops_serving_and_returns() {
    let nats = NatsServer::start();
    let gw = Gateway::start(&nats).await;
    let addr = gw.http_addr;
    let (status, _) = send(gw.http.get(gw.url("/nowhere"))).await;
    assert_eq!(status, 404);
    gw.stop().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting connections after shutdown"
    );
}
