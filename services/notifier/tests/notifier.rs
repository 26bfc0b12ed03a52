//! The notifier against a real nats-server, the real entities service and a
//! real webhook receiver that verifies every signature with the official
//! `standardwebhooks` library.

mod common;

use serde_json::{json, Value};

use common::*;
use meterline_shared::testkit::{eventually, NatsServer};
use meterline_shared::ErrorCode;

/// m3ter's documented example, verbatim.
const NINETY_PERCENT: &str = "(new.amountSpent >= ((new.amount*100)/90)) AND ((old.amountSpent <= ((old.amount*100)/90)) OR (old.amountSpent == null))";

fn commitment(account: &str, spent: f64) -> Value {
    json!({
        "accountId": account, "amount": 900, "amountSpent": spent, "currency": "USD",
        "startDate": "2026-01-01", "endDate": "2027-01-01",
    })
}

#[tokio::test]
async fn the_ninety_percent_rule_fires_exactly_once_across_a_series_of_updates() {
    let nats = NatsServer::start();
    let entities = start_entities(&nats, "127.0.0.0/8").await;
    let notifier = start_notifier(meterline_notifier::Settings::for_tests(nats.url())).await;
    let w = World::new(&nats).await;
    let rx = Receiver::start(SECRET);
    let account = w.account("acme").await;
    let one_account = format!("new.accountId == \"{account}\"");

    // The rules are created, then used at once: no restart, no waiting.
    let hook = w.webhook(&rx.url("c90", "ok")).await;
    let rule = w
        .rule(
            "c90",
            "configuration.commitment.updated",
            Some(NINETY_PERCENT),
        )
        .await;
    w.link(&rule, &hook).await;
    let acct_hook = w.webhook(&rx.url("acct", "ok")).await;
    let acct_rule = w
        .rule(
            "acct",
            "configuration.commitment.created",
            Some(&one_account),
        )
        .await;
    w.link(&acct_rule, &acct_hook).await;

    // Threshold: 900 * 100 / 90 = 1000.
    let c = w
        .create("commitment", commitment(&account, 0.0))
        .await
        .unwrap();
    let id = c["id"].as_str().unwrap().to_owned();
    for (version, spent) in [
        (1, 400.0),
        (2, 999.0),
        (3, 1001.0),
        (4, 1100.0),
        (5, 1500.0),
    ] {
        let mut body = commitment(&account, spent);
        body["version"] = json!(version);
        w.update("commitment", &id, body).await.unwrap();
    }
    w.settled().await;

    let hits = rx.hits("c90").await;
    assert_eq!(hits.len(), 1, "fired once: {hits:#?}");
    let hit = &hits[0];
    assert_eq!(hit["verified"], true, "{hit}");
    assert_eq!(hit["apiKey"], API_KEY);
    assert_eq!(hit["body"]["notification"]["id"], rule.as_str());
    assert_eq!(
        hit["body"]["event"]["eventName"],
        "configuration.commitment.updated"
    );
    assert_eq!(hit["body"]["event"]["new"]["amountSpent"], 1001.0);
    assert_eq!(hit["body"]["event"]["old"]["amountSpent"], 999.0);
    assert_eq!(hit["id"], hit["body"]["id"]);

    // The single-account example fired for the create.
    let acct = rx.wait_hits("acct", 1).await;
    assert_eq!(acct[0]["verified"], true);
    assert_eq!(
        acct[0]["body"]["event"]["new"]["accountId"],
        account.as_str()
    );

    notifier.stop().await;
    entities.stop().await;
}

#[tokio::test]
async fn calculations_that_do_not_parse_are_refused_with_their_position() {
    let nats = NatsServer::start();
    let entities = start_entities(&nats, "").await;
    let w = World::new(&nats).await;
    let rule = |calc: &str| {
        json!({"code": "bad", "name": "bad", "description": "d",
               "eventName": "configuration.account.updated", "calculation": calc})
    };
    let e = w
        .create("notificationrule", rule("new.amount >"))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.contains("at position 13"), "{}", e.message);
    let e = w
        .create("notificationrule", rule("Math.sqrt(new.amount) > 2"))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(
        e.message.contains("unknown function \"Math.sqrt\""),
        "{}",
        e.message
    );
    let page = w
        .entity("notificationrule", "list", Default::default())
        .await
        .unwrap();
    assert_eq!(page["data"], json!([]), "nothing was stored");
    entities.stop().await;
}

#[tokio::test]
async fn a_type_mismatch_is_reported_the_rule_does_not_fire_and_others_still_do() {
    let nats = NatsServer::start();
    let entities = start_entities(&nats, "127.0.0.0/8").await;
    let notifier = start_notifier(meterline_notifier::Settings::for_tests(nats.url())).await;
    let w = World::new(&nats).await;
    let rx = Receiver::start(SECRET);
    let hook = w.webhook(&rx.url("typed", "ok")).await;
    let mismatched = w
        .rule(
            "mismatch",
            "configuration.account.created",
            Some("new.name > 5"),
        )
        .await;
    w.link(&mismatched, &hook).await;
    let good = w
        .rule(
            "good",
            "configuration.account.created",
            Some("new.code == \"beta\""),
        )
        .await;
    w.link(&good, &hook).await;

    w.account("alpha").await;
    let beta = w.account("beta").await;
    w.settled().await;
    let hits = rx.hits("typed").await;
    assert_eq!(hits.len(), 1, "{hits:#?}");
    assert_eq!(hits[0]["body"]["notification"]["id"], good.as_str());
    assert_eq!(hits[0]["body"]["event"]["new"]["id"], beta.as_str());

    // The same mismatch through notifications/evaluate, against a stored
    // event, is reported with its reason.
    let events = w
        .notifier(
            "events.list",
            json!({"eventName": "configuration.account.created", "resourceId": beta}),
        )
        .await
        .unwrap();
    let event_id = events["data"][0]["id"].as_str().unwrap().to_owned();
    let r = w
        .notifier(
            "evaluate",
            json!({"eventId": event_id, "calculation": "new.name > 5"}),
        )
        .await
        .unwrap();
    assert_eq!(r["success"], false);
    assert!(
        r["errorMessage"]
            .as_str()
            .unwrap()
            .contains("cannot compare"),
        "{r}"
    );
    let r = w
        .notifier(
            "evaluate",
            json!({"eventId": event_id, "calculation": "new.code == \"beta\""}),
        )
        .await
        .unwrap();
    assert_eq!(r, json!({"success": true}));
    let r = w
        .notifier(
            "evaluate",
            json!({"eventId": event_id, "calculation": "new.code =="}),
        )
        .await
        .unwrap();
    assert!(
        r["errorMessage"].as_str().unwrap().contains("at position"),
        "{r}"
    );

    notifier.stop().await;
    entities.stop().await;
}

#[tokio::test]
async fn failing_webhooks_are_retried_honouring_retry_after_then_dead_lettered_and_replayable() {
    let nats = NatsServer::start();
    let entities = start_entities(&nats, "127.0.0.0/8").await;
    let notifier = start_notifier(meterline_notifier::Settings::for_tests(nats.url())).await;
    let w = World::new(&nats).await;
    let rx = Receiver::start(SECRET);
    let rule = w
        .rule("products", "configuration.product.created", None)
        .await;
    let mut hooks = std::collections::HashMap::new();
    for (name, plan) in [
        ("flaky", "500,500,ok"),
        ("busy", "429:2,ok"),
        ("gone", "410"),
        ("hangs", "hang,ok"),
        ("closes", "close,ok"),
        ("down", "500,500,500,500,ok"),
    ] {
        let hook = w.webhook(&rx.url(name, plan)).await;
        w.link(&rule, &hook).await;
        hooks.insert(name, hook);
    }
    w.create("product", json!({"code": "p1", "name": "Product 1"}))
        .await
        .unwrap();

    // 500, 500, then 200: three attempts with the same id, all signed.
    let flaky = rx.wait_hits("flaky", 3).await;
    let ids: Vec<&Value> = flaky.iter().map(|h| &h["id"]).collect();
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "one id on every retry: {ids:?}"
    );
    assert!(flaky.iter().all(|h| h["verified"] == true), "{flaky:#?}");

    // 429 with Retry-After: 2 is retried no sooner (the schedule says 100 ms).
    let busy = rx.wait_hits("busy", 2).await;
    let gap = busy[1]["receivedAt"].as_f64().unwrap() - busy[0]["receivedAt"].as_f64().unwrap();
    assert!(gap >= 1.9, "Retry-After honoured: {gap}s");

    // A webhook that hangs past the timeout, or closes the connection, gets
    // another attempt.
    rx.wait_hits("hangs", 2).await;
    rx.wait_hits("closes", 2).await;

    // 410: the webhook is deactivated, and the delivery dead-lettered at once.
    eventually(WAIT, "the gone webhook deactivated", || async {
        let hook = w.get("webhook", &hooks["gone"]).await.ok()?;
        (hook["active"] == false).then_some(())
    })
    .await;
    assert_eq!(rx.hits("gone").await.len(), 1);

    // Four failures (the first attempt and three retries) dead-letter it,
    // with an integration error event.
    w.settled().await;
    assert_eq!(rx.hits("down").await.len(), 4);
    let dead = w.notifier("deadletters.list", json!({})).await.unwrap();
    let dead = dead["data"].as_array().unwrap().clone();
    assert_eq!(dead.len(), 2, "{dead:#?}");
    let down = dead
        .iter()
        .find(|d| d["delivery"]["webhookId"] == hooks["down"].as_str())
        .expect("the down webhook's dead letter");
    assert_eq!(down["attempts"], 4);
    assert!(
        down["lastError"].as_str().unwrap().contains("500"),
        "{down}"
    );
    let errors = w
        .notifier(
            "events.list",
            json!({"eventName": "integration.webhook.error"}),
        )
        .await
        .unwrap();
    let errors = errors["data"].as_array().unwrap().clone();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors
        .iter()
        .any(|e| e["m3terEvent"]["webhookId"] == hooks["gone"].as_str()
            && e["m3terEvent"]["errorType"] == "disabled"));

    // Replay: the same notification id is delivered (the fifth answer is 200).
    let id = down["id"].as_str().unwrap().to_owned();
    let r = w
        .notifier("deadletters.replay", json!({"id": id}))
        .await
        .unwrap();
    assert_eq!(r["replayed"], true);
    let hits = rx.wait_hits("down", 5).await;
    assert_eq!(hits[4]["id"], id.as_str());
    assert_eq!(hits[4]["verified"], true);
    w.settled().await;
    let dead = w.notifier("deadletters.list", json!({})).await.unwrap();
    assert_eq!(
        dead["data"].as_array().unwrap().len(),
        1,
        "the replayed letter is gone"
    );
    let e = w
        .notifier("deadletters.replay", json!({"id": id}))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);

    notifier.stop().await;
    entities.stop().await;
}

#[tokio::test]
async fn loopback_webhooks_are_refused_without_the_allow_list() {
    let nats = NatsServer::start();
    // Entities refuses on write...
    let strict = start_entities(&nats, "").await;
    let w = World::new(&nats).await;
    let rx = Receiver::start(SECRET);
    for url in [
        rx.url("x", "ok"),
        "http://localhost:1/x".into(),
        "http://169.254.169.254/".into(),
    ] {
        let e = w
            .create(
                "webhook",
                json!({"name": "h", "description": "d", "url": url,
                       "credentials": {"type": "M3TER_SIGNED_REQUEST", "apiKey": "k", "secret": SECRET}}),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest, "{url}");
        assert!(e.message.contains("non-public"), "{}", e.message);
    }
    strict.stop().await;

    // ...and the notifier refuses on send, even when entities allowed it.
    let lenient = start_entities(&nats, "127.0.0.0/8").await;
    let mut settings = meterline_notifier::Settings::for_tests(nats.url());
    settings.webhook_allow_networks = String::new();
    let notifier = start_notifier(settings).await;
    let hook = w.webhook(&rx.url("private", "ok")).await;
    let rule = w.rule("r", "configuration.product.created", None).await;
    w.link(&rule, &hook).await;
    w.create("product", json!({"code": "p", "name": "P"}))
        .await
        .unwrap();
    w.settled().await;
    assert!(
        rx.hits("private").await.is_empty(),
        "nothing reached the loopback receiver"
    );
    let dead = w.notifier("deadletters.list", json!({})).await.unwrap();
    assert!(
        dead["data"][0]["lastError"]
            .as_str()
            .unwrap()
            .contains("non-public"),
        "{dead}"
    );
    notifier.stop().await;
    lenient.stop().await;
}

#[tokio::test]
async fn the_events_api_lists_filters_and_describes_events() {
    let nats = NatsServer::start();
    let entities = start_entities(&nats, "").await;
    let notifier = start_notifier(meterline_notifier::Settings::for_tests(nats.url())).await;
    let w = World::new(&nats).await;
    let a = w.account("a").await;
    let b = w.account("b").await;
    let mut body =
        json!({"code": "a", "name": "A2", "emailAddress": "a@example.com", "version": 1});
    w.update("account", &a, body.take()).await.unwrap();

    // EVENTS sources ENTITIES asynchronously: the three events appear soon.
    let all = eventually(WAIT, "three account events", || async {
        let all = w
            .notifier("events.list", json!({"eventType": "configuration.account"}))
            .await
            .ok()?;
        (all["data"].as_array()?.len() == 3).then_some(all)
    })
    .await;
    let names: Vec<&str> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["eventName"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "configuration.account.created",
            "configuration.account.created",
            "configuration.account.updated"
        ]
    );
    let of_a = w
        .notifier("events.list", json!({"resourceId": a}))
        .await
        .unwrap();
    assert_eq!(of_a["data"].as_array().unwrap().len(), 2);
    // Pages of one, continued by nextToken.
    let first = w
        .notifier(
            "events.list",
            json!({"eventName": "configuration.account.created", "pageSize": 1}),
        )
        .await
        .unwrap();
    assert_eq!(first["data"][0]["m3terEvent"]["entityId"], a.as_str());
    let second = w
        .notifier(
            "events.list",
            json!({"eventName": "configuration.account.created", "pageSize": 1, "nextToken": first["nextToken"]}),
        )
        .await
        .unwrap();
    assert_eq!(second["data"][0]["m3terEvent"]["entityId"], b.as_str());
    let id = second["data"][0]["id"].as_str().unwrap();
    let one = w.notifier("events.get", json!({"id": id})).await.unwrap();
    assert_eq!(one, second["data"][0]);
    assert_eq!(
        w.notifier("events.get", json!({"id": "999999"}))
            .await
            .unwrap_err()
            .code,
        ErrorCode::NotFound
    );
    assert_eq!(
        w.notifier("events.list", json!({"pageSize": 0}))
            .await
            .unwrap_err()
            .code,
        ErrorCode::BadRequest
    );
    for name in ["configuration.nothing.created", "no.such.event"] {
        let none = w
            .notifier("events.list", json!({"eventName": name}))
            .await
            .unwrap();
        assert_eq!(none, json!({"data": []}), "{name}");
    }
    let types = w.notifier("events.types", json!({})).await.unwrap();
    assert!(types["events"]
        .as_array()
        .unwrap()
        .contains(&json!("configuration.commitment.updated")));
    let fields = w
        .notifier(
            "events.fields",
            json!({"eventName": "configuration.commitment.updated"}),
        )
        .await
        .unwrap();
    assert_eq!(
        fields["events"]["configuration.commitment.updated"]["new.amountSpent"],
        "double"
    );
    assert_eq!(
        fields["events"]["configuration.commitment.updated"]["old.amount"],
        "double"
    );
    notifier.stop().await;
    entities.stop().await;
}

#[tokio::test]
async fn a_plain_secret_signs_with_its_own_bytes() {
    // m3ter's API secrets are not `whsec_` base64: the key is the text itself.
    let nats = NatsServer::start();
    let entities = start_entities(&nats, "127.0.0.0/8").await;
    let notifier = start_notifier(meterline_notifier::Settings::for_tests(nats.url())).await;
    let w = World::new(&nats).await;
    let rx = Receiver::start_with(&["an m3ter api secret", "--raw"]);
    let hook = w
        .webhook_with(&rx.url("plain", "ok"), "an m3ter api secret")
        .await;
    let rule = w.rule("plain", "configuration.product.created", None).await;
    w.link(&rule, &hook).await;
    w.create("product", json!({"code": "p", "name": "P"}))
        .await
        .unwrap();
    let hits = rx.wait_hits("plain", 1).await;
    assert_eq!(hits[0]["verified"], true, "{:#?}", hits[0]);
    notifier.stop().await;
    entities.stop().await;
}
