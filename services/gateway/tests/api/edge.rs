//! The gateway's own behaviour, checked against the real entities service:
//! how tokens are issued, how routes map onto entity requests (seen in what
//! lands on `ENTITIES`), every refusal the gateway makes before the bus, and
//! what happens when the entities service is not running.

use std::time::Duration;

use meterline_gateway::{Settings, TokenKeys};
use meterline_shared::envelope::{Action, EntityEvent};
use meterline_shared::protocol::Principal;
use meterline_shared::testkit::NatsServer;
use serde_json::json;

use crate::helpers::{account, send, within, Gateway, World};

const ORG: &str = "org-edge";

/// Checks one stored event: what happened, to what, and by whom.
fn assert_event(event: &EntityEvent, name: &str, action: Action, id: &str, actor: &str) {
    assert_eq!(event.event_name, name, "{event:?}");
    assert_eq!(event.action, action, "{event:?}");
    assert_eq!(event.org_id, ORG, "{event:?}");
    assert_eq!(event.entity_id, id, "{event:?}");
    assert_eq!(event.actor, actor, "the actor is the token's service user");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_issued_for_basic_json_form_and_body_credentials() {
    let w = World::new(ORG).await;
    let gw = &w.gw;
    let (key, secret) = (w.creds.access_key.as_str(), w.creds.secret.as_str());
    let token_url = gw.url("/oauth/token");

    // m3ter's SDK: Basic credentials and a JSON grant.
    let (status, body) = send(
        gw.http
            .post(&token_url)
            .basic_auth(key, Some(secret))
            .json(&json!({"grant_type": "client_credentials", "scope": "whatever"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 18000);
    assert_eq!(body["scope"], "m3ter-resources/m3ter-scope");
    let basic_json = body["access_token"].as_str().unwrap().to_owned();

    // OAuth form body with Basic credentials.
    let (status, body) = send(
        gw.http
            .post(&token_url)
            .basic_auth(key, Some(secret))
            .form(&[("grant_type", "client_credentials")]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let basic_form = body["access_token"].as_str().unwrap().to_owned();

    // Credentials in the form body (RFC 6749 §2.3.1).
    let (status, body) = send(gw.http.post(&token_url).form(&[
        ("grant_type", "client_credentials"),
        ("client_id", key),
        ("client_secret", secret),
    ]))
    .await;
    assert_eq!(status, 200, "{body}");
    let body_form = body["access_token"].as_str().unwrap().to_owned();

    // Each token opens the org's routes.
    for token in [&basic_json, &basic_form, &body_form] {
        let (status, page) =
            send(gw.http.get(gw.org_url(ORG, "accounts")).bearer_auth(token)).await;
        assert_eq!(status, 200, "{page}");
        assert!(page["data"].is_array(), "{page}");
    }

    // Refusals.
    let (status, body) = send(
        gw.http
            .post(&token_url)
            .basic_auth(key, Some(secret))
            .json(&json!({"grant_type": "password"})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "unsupported_grant_type");
    let (status, _) = send(
        gw.http
            .post(&token_url)
            .basic_auth(key, Some(secret))
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
    for (what, key, secret) in [
        ("wrong secret", key, "wrong"),
        ("unknown key", "AK-NOBODY", secret),
    ] {
        let (status, body) = send(
            gw.http
                .post(&token_url)
                .basic_auth(key, Some(secret))
                .json(&json!({"grant_type": "client_credentials"})),
        )
        .await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"], "invalid_client", "{what}");
        assert_eq!(body["message"], "invalid access key or secret", "{what}");
    }
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
            .basic_auth(key, Some(secret))
            .header("content-type", "application/json")
            .body("{not json"),
    )
    .await;
    assert_eq!(status, 400);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_map_onto_entity_subjects_with_the_caller_as_actor() {
    let w = World::new(ORG).await;
    let gw = &w.gw;
    let token = w.token().await;
    let actor = w.creds.service_user_id.as_str();
    let accounts = gw.org_url(ORG, "accounts");

    // POST on a collection is a create.
    let (status, parent) = send(
        gw.http
            .post(&accounts)
            .bearer_auth(&token)
            .json(&account("parent")),
    )
    .await;
    assert_eq!(status, 200, "{parent}");
    let parent_id = parent["id"].as_str().unwrap().to_owned();
    let mut acme = account("acme");
    acme["parentAccountId"] = json!(parent_id);
    let (status, created) = send(gw.http.post(&accounts).bearer_auth(&token).json(&acme)).await;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let event = w.last_event("account", &id).await;
    assert_event(
        &event,
        "configuration.account.created",
        Action::Created,
        &id,
        actor,
    );
    assert_eq!(event.new.as_ref().unwrap()["code"], "acme");

    // PUT on an item updates the id in the path, at the version in the body.
    let item = format!("{accounts}/{id}");
    let mut changed = created.clone();
    changed["name"] = json!("Acme Renamed");
    let (status, body) = send(gw.http.put(&item).bearer_auth(&token).json(&changed)).await;
    assert_eq!(status, 200, "{body}");
    let event = w.last_event("account", &id).await;
    assert_event(
        &event,
        "configuration.account.updated",
        Action::Updated,
        &id,
        actor,
    );
    let new = event.new.as_ref().unwrap();
    assert_eq!(
        (new["name"].as_str(), new["version"].as_i64()),
        (Some("Acme Renamed"), Some(2))
    );

    // Other query keys of a list are filters.
    let (status, page) = send(
        gw.http
            .get(format!("{accounts}?parentAccountId={parent_id}"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let ids: Vec<_> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["id"])
        .collect();
    assert_eq!(ids, [&json!(id)], "{page}");

    // DELETE carries `?version=`: a stale one is refused and writes nothing.
    let before = w.entity_messages().await;
    let (status, body) = send(
        gw.http
            .delete(format!("{item}?version=1"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(w.entity_messages().await, before);
    // A conflict tells SDKs not to retry the same request.
    let again = within(
        "conflicting delete",
        gw.http
            .delete(format!("{item}?version=1"))
            .bearer_auth(&token)
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(again.status(), 409);
    assert_eq!(
        again
            .headers()
            .get("x-should-retry")
            .map(|v| v.to_str().unwrap()),
        Some("false")
    );
    let (status, body) = send(
        gw.http
            .delete(format!("{item}?version=2"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let event = w.last_event("account", &id).await;
    assert_event(
        &event,
        "configuration.account.deleted",
        Action::Deleted,
        &id,
        actor,
    );
    assert_eq!(event.new, None);
    assert_eq!(event.old.as_ref().unwrap()["name"], "Acme Renamed");

    // A child collection carries its parent's id from the path.
    let balance = json!({
        "accountId": parent_id, "code": "prepaid", "currency": "USD", "name": "Prepaid",
        "startDate": "2026-01-01T00:00:00Z", "endDate": "2027-01-01T00:00:00Z",
    });
    let (status, bal) = send(
        gw.http
            .post(gw.org_url(ORG, "balances"))
            .bearer_auth(&token)
            .json(&balance),
    )
    .await;
    assert_eq!(status, 200, "{bal}");
    let bal_id = bal["id"].as_str().unwrap();
    let (status, tx) = send(
        gw.http
            .post(gw.org_url(ORG, &format!("balances/{bal_id}/transactions")))
            .bearer_auth(&token)
            .json(&json!({"amount": 5})),
    )
    .await;
    assert_eq!(status, 200, "{tx}");
    let tx_id = tx["id"].as_str().unwrap();
    let event = w.last_event("balancetransaction", tx_id).await;
    assert_event(
        &event,
        "billing.balancetransaction.created",
        Action::Created,
        tx_id,
        actor,
    );
    assert_eq!(event.new.as_ref().unwrap()["balanceId"], bal_id);

    // Nested static paths map onto their type.
    let types = gw.org_url(ORG, "picklists/transactiontypes");
    let (status, tt) = send(
        gw.http
            .post(&types)
            .bearer_auth(&token)
            .json(&json!({"name": "Top-up", "code": "topup"})),
    )
    .await;
    assert_eq!(status, 200, "{tt}");
    let tt_id = tt["id"].as_str().unwrap();
    let event = w.last_event("transactiontype", tt_id).await;
    assert_event(
        &event,
        "configuration.transactiontype.created",
        Action::Created,
        tt_id,
        actor,
    );
    let (status, got) = send(gw.http.get(format!("{types}/{tt_id}")).bearer_auth(&token)).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["id"], tt_id);

    // Error replies from the bus keep their status and message.
    let (status, body) = send(
        gw.http
            .get(format!("{accounts}/missing"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(
        (status, body["message"].as_str().unwrap()),
        (404, "account \"missing\" does not exist")
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_before_the_bus_and_the_gateway_keeps_serving() {
    let w = World::with_gateway(ORG, |s| s.body_limit_bytes = 4096).await;
    let gw = &w.gw;
    let token = w.token().await;
    let su = w.creds.service_user_id.as_str();
    let accounts = gw.org_url(ORG, "accounts");
    let h = &gw.http;
    let (status, kept) = send(h.post(&accounts).bearer_auth(&token).json(&account("kept"))).await;
    assert_eq!(status, 200, "{kept}");
    let kept = format!("{accounts}/{}", kept["id"].as_str().unwrap());

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
            "page size not a number",
            h.get(format!("{accounts}?pageSize=many"))
                .bearer_auth(&token),
            400,
            "pageSize",
        ),
        (
            "delete version not a number",
            h.delete(format!("{kept}?version=x")).bearer_auth(&token),
            400,
            "version",
        ),
        ("no token", h.get(&accounts), 401, "missing bearer token"),
        (
            "basic instead of bearer",
            h.get(&accounts)
                .basic_auth(&w.creds.access_key, Some(&w.creds.secret)),
            401,
            "missing bearer token",
        ),
        (
            "expired token",
            h.delete(&kept).bearer_auth(gw.token(ORG, su, -3600)),
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
            h.delete(&kept).bearer_auth(forged(ORG, su)),
            401,
            "invalid token",
        ),
        (
            "other org's token",
            h.delete(&kept).bearer_auth(gw.token("org-other", su, 60)),
            403,
            ORG,
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
            h.post(&kept).bearer_auth(&token).json(&json!({})),
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
    let before = w.entity_messages().await;
    for (what, request, want, needle) in cases {
        let (status, body) = send(request).await;
        let message = body["message"].as_str().unwrap();
        assert_eq!(status, want, "{what}: {body}");
        assert!(
            message.contains(needle),
            "{what}: {message:?} lacks {needle:?}"
        );
        // After each refusal the gateway still answers, from the service.
        let (status, body) = send(h.get(&kept).bearer_auth(&token)).await;
        assert_eq!(status, 200, "after {what}: {body}");
    }
    assert_eq!(
        w.entity_messages().await,
        before,
        "a refused request was written to ENTITIES"
    );
    w.stop().await;
}

/// A well-formed token signed with a key the gateway does not hold.
fn forged(org: &str, service_user: &str) -> String {
    TokenKeys::new(b"not-the-gateway-key", Duration::from_secs(60))
        .issue(&Principal {
            org_id: org.into(),
            service_user_id: service_user.into(),
        })
        .unwrap()
}

#[tokio::test]
async fn no_responder_is_a_503_and_public_documents_need_no_token() {
    // The entities service is not running: nothing answers on the bus.
    let nats = NatsServer::start();
    let gw = Gateway::start_with(Settings {
        public_url: Some("https://billing.example.com".into()),
        ..Settings::for_tests(nats.url())
    })
    .await;

    let (status, body) = send(
        gw.http
            .get(gw.org_url(ORG, "meters"))
            .bearer_auth(gw.token(ORG, "su", 60)),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    let (status, body) = send(
        gw.http
            .post(gw.url("/oauth/token"))
            .basic_auth("AK-ANY", Some("secret"))
            .json(&json!({"grant_type": "client_credentials"})),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_jwt_secret_still_issues_working_tokens() {
    let w = World::with_gateway(ORG, |s| {
        s.jwt_secret = Default::default();
        s.token_ttl_secs = 120;
    })
    .await;
    let gw = &w.gw;
    let (status, body) = send(
        gw.http
            .post(gw.url("/oauth/token"))
            .basic_auth(&w.creds.access_key, Some(&w.creds.secret))
            .json(&json!({"grant_type": "client_credentials"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in"], 120);
    let token = body["access_token"].as_str().unwrap();
    let (status, page) = send(gw.http.get(gw.org_url(ORG, "accounts")).bearer_auth(token)).await;
    assert_eq!(status, 200, "{page}");
    // A token signed with the fixed test key is not accepted by this gateway.
    let (status, _) = send(
        gw.http
            .get(gw.org_url(ORG, "accounts"))
            .bearer_auth(gw.token(ORG, &w.creds.service_user_id, 60)),
    )
    .await;
    assert_eq!(status, 401);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_serving_and_returns() {
    let w = World::new(ORG).await;
    let gw = &w.gw;
    let addr = gw.http_addr;
    let token = w.token().await;
    let (status, body) = send(
        gw.http
            .post(gw.org_url(ORG, "accounts"))
            .bearer_auth(&token)
            .json(&account("before-shutdown")),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = send(gw.http.get(gw.url("/nowhere"))).await;
    assert_eq!(status, 404);
    w.stop().await;
    assert!(
        within("connecting", tokio::net::TcpStream::connect(addr))
            .await
            .is_err(),
        "still accepting connections after shutdown"
    );
}
