//! The entities service against a real nats-server, over the bus.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use serde_json::{json, Value};

use common::{account, start_entities, World, ORG};
use meterline_shared::envelope::EntityEvent;
use meterline_shared::protocol::EntityRequest;
use meterline_shared::{subjects, ErrorCode};

#[tokio::test]
async fn create_update_delete_appear_on_events_in_order_with_new_and_old() {
    let w = World::new().await;
    let created = w.create("account", account("acme")).await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["version"], 1);
    assert_eq!(created["createdBy"], "tester");

    let mut body = account("acme");
    body["name"] = json!("Acme Renamed");
    body["version"] = json!(1);
    let updated = w.update("account", &id, body).await.unwrap();
    assert_eq!(updated["version"], 2);
    assert_eq!(updated["name"], "Acme Renamed");
    assert_eq!(updated["dtCreated"], created["dtCreated"]);

    let deleted = w.delete("account", &id).await.unwrap();
    assert_eq!(deleted["name"], "Acme Renamed");
    assert_eq!(
        w.get("account", &id).await.unwrap_err().code,
        ErrorCode::NotFound
    );

    // EVENTS holds the same three mutations, sourced from ENTITIES.
    let js = jetstream::new(w.client.clone());
    let stream = js.get_stream(subjects::EVENTS_STREAM).await.unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subjects::entity_event(ORG, "account", &id),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut msgs = consumer.messages().await.unwrap();
    let mut events = Vec::new();
    while events.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
            .await
            .expect("event in time")
            .unwrap()
            .unwrap();
        let name = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Meterline-Event-Name"))
            .map(|v| v.as_str().to_owned());
        let ev: EntityEvent = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(
            name.as_deref(),
            Some(ev.event_name.as_str()),
            "event name header survives sourcing"
        );
        events.push(ev);
    }
    let names: Vec<&str> = events.iter().map(|e| e.event_name.as_str()).collect();
    assert_eq!(
        names,
        [
            "configuration.account.created",
            "configuration.account.updated",
            "configuration.account.deleted"
        ]
    );
    assert_eq!(events[0].old, None);
    assert_eq!(events[0].new.as_ref().unwrap()["name"], "Account acme");
    assert_eq!(events[1].old.as_ref().unwrap()["name"], "Account acme");
    assert_eq!(events[1].new.as_ref().unwrap()["name"], "Acme Renamed");
    assert_eq!(events[2].new, None);
    assert_eq!(events[2].old.as_ref().unwrap()["version"], 2);
}

#[tokio::test]
async fn concurrent_updates_at_one_version_exactly_one_wins() {
    let w = World::new().await;
    let created = w
        .create("product", json!({"name": "P", "code": "p"}))
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let attempts = 24;
    let mut tasks = Vec::new();
    for i in 0..attempts {
        let client = w.client.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let req = EntityRequest {
                id: Some(id),
                body: Some(json!({"name": format!("P{i}"), "code": "p", "version": 1})),
                ..Default::default()
            };
            let payload = bytes::Bytes::from(serde_json::to_vec(&req).unwrap());
            meterline_shared::bus::request(
                &client,
                subjects::entities_request(ORG, "product", "update"),
                Default::default(),
                payload,
            )
            .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code, ErrorCode::Conflict, "{e}"),
        }
    }
    assert_eq!(ok, 1, "exactly one concurrent writer wins");
    assert_eq!(w.get("product", &id).await.unwrap()["version"], 2);
}

#[tokio::test]
async fn restart_keeps_all_state() {
    let mut w = World::new().await;
    let mut ids = Vec::new();
    for i in 0..25 {
        ids.push(
            w.create("account", account(&format!("a{i}")))
                .await
                .unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let mut body = account("a3");
    body["version"] = json!(1);
    body["name"] = json!("changed");
    w.update("account", &ids[3], body).await.unwrap();
    w.delete("account", &ids[7]).await.unwrap();

    w.entities.take().unwrap().stop().await;
    w.entities = Some(start_entities(&w.nats).await);

    let all = w.list_all("account").await;
    assert_eq!(all.len(), 24);
    assert!(all.iter().all(|a| a["id"] != ids[7].as_str()));
    assert_eq!(w.get("account", &ids[3]).await.unwrap()["name"], "changed");
    // Codes survive too: a3 is still taken, a7 is free again.
    assert_eq!(
        w.create("account", account("a3")).await.unwrap_err().code,
        ErrorCode::Conflict
    );
    w.create("account", account("a7")).await.unwrap();
}

#[tokio::test]
async fn a_second_replica_lists_what_the_first_wrote() {
    let w = World::new().await;
    let second = start_entities(&w.nats).await;
    // Requests are spread over both replicas by the queue group; every list
    // must see every create acknowledged before it.
    for i in 0..20 {
        w.create("product", json!({"name": "P", "code": format!("p{i}")}))
            .await
            .unwrap();
        assert_eq!(w.list_all("product").await.len(), i + 1);
    }
    second.stop().await;
}

#[tokio::test]
async fn lists_page_with_next_token_and_filter() {
    let w = World::new().await;
    let a = w.create("account", account("a")).await.unwrap();
    let b = w.create("account", account("b")).await.unwrap();
    let product = w
        .create("product", json!({"name": "P", "code": "p"}))
        .await
        .unwrap();
    let tpl = w
        .create(
            "plantemplate",
            json!({"name": "T", "productId": product["id"], "currency": "USD", "billFrequency": "MONTHLY", "standingCharge": 0}),
        )
        .await
        .unwrap();
    let plan = w
        .create(
            "plan",
            json!({"name": "Plan", "code": "plan", "planTemplateId": tpl["id"]}),
        )
        .await
        .unwrap();
    for (acct, n) in [(&a, 3), (&b, 2)] {
        for _ in 0..n {
            w.create("accountplan", json!({"accountId": acct["id"], "planId": plan["id"], "startDate": "2024-01-01T00:00:00Z"}))
                .await
                .unwrap();
        }
    }
    let page = w
        .call(
            "accountplan",
            "list",
            EntityRequest {
                page_size: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    let token = page["nextToken"].as_str().unwrap().to_owned();
    let page2 = w
        .call(
            "accountplan",
            "list",
            EntityRequest {
                page_size: Some(2),
                next_token: Some(token),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page2["data"].as_array().unwrap().len(), 2);
    assert_ne!(page["data"][0]["id"], page2["data"][0]["id"]);

    let mut filters = serde_json::Map::new();
    filters.insert("accountId".into(), b["id"].clone());
    let only_b = w
        .call(
            "accountplan",
            "list",
            EntityRequest {
                filters,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(only_b["data"].as_array().unwrap().len(), 2);
    assert!(only_b.get("nextToken").is_none());

    let by_code = w
        .call(
            "account",
            "list",
            EntityRequest {
                codes: vec!["b".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(by_code["data"][0]["id"], b["id"]);

    let mut bad = serde_json::Map::new();
    bad.insert("colour".into(), json!("red"));
    let e = w
        .call(
            "accountplan",
            "list",
            EntityRequest {
                filters: bad,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
    let e = w
        .call(
            "account",
            "list",
            EntityRequest {
                page_size: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
}

#[tokio::test]
async fn bad_input_is_refused_clearly_and_nothing_is_written() {
    let w = World::new().await;
    let acct = w.create("account", account("acme")).await.unwrap();
    let id = acct["id"].as_str().unwrap().to_owned();
    let before = w.entity_messages().await;

    let cases: Vec<(&str, &str, EntityRequest, ErrorCode, &str)> = vec![
        (
            "account",
            "create",
            EntityRequest {
                body: Some(json!({"name": "x"})),
                ..Default::default()
            },
            ErrorCode::BadRequest,
            "code: is required",
        ),
        (
            "account",
            "create",
            EntityRequest {
                body: Some(json!({"name": "x", "code": "c".repeat(81), "emailAddress": "a@b.c"})),
                ..Default::default()
            },
            ErrorCode::BadRequest,
            "at most 80",
        ),
        (
            "account",
            "create",
            EntityRequest {
                body: Some(
                    json!({"name": "x", "code": "x", "emailAddress": "a@b.c", "colour": "red"}),
                ),
                ..Default::default()
            },
            ErrorCode::BadRequest,
            "colour: unknown field",
        ),
        (
            "account",
            "create",
            EntityRequest {
                body: Some(json!(["not", "an", "object"])),
                ..Default::default()
            },
            ErrorCode::BadRequest,
            "JSON object",
        ),
        (
            "account",
            "create",
            EntityRequest {
                body: Some(account("acme")),
                ..Default::default()
            },
            ErrorCode::Conflict,
            "already used",
        ),
        (
            "account",
            "create",
            EntityRequest {
                id: Some("a.b".into()),
                body: Some(account("z")),
                ..Default::default()
            },
            ErrorCode::BadRequest,
            "not allowed",
        ),
        (
            "account",
            "get",
            EntityRequest {
                id: Some("a*".into()),
                ..Default::default()
            },
            ErrorCode::BadRequest,
            "not allowed",
        ),
        (
            "account",
            "get",
            EntityRequest {
                id: Some("has space".into()),
                ..Default::default()
            },
            ErrorCode::BadRequest,
            "not allowed",
        ),
        (
            "account",
            "update",
            EntityRequest {
                id: Some(id.clone()),
                body: Some(account("acme")),
                ..Default::default()
            },
            ErrorCode::BadRequest,
            "version is required",
        ),
        (
            "account",
            "update",
            EntityRequest {
                id: Some(id.clone()),
                body: Some(
                    json!({"name": "n", "code": "acme", "emailAddress": "a@b.c", "version": 7}),
                ),
                ..Default::default()
            },
            ErrorCode::Conflict,
            "not the current version",
        ),
        (
            "account",
            "update",
            EntityRequest {
                id: Some("00000000-0000-7000-8000-000000000003".into()),
                body: Some(
                    json!({"name": "n", "code": "q", "emailAddress": "a@b.c", "version": 1}),
                ),
                ..Default::default()
            },
            ErrorCode::NotFound,
            "does not exist",
        ),
        (
            "account",
            "delete",
            EntityRequest {
                id: Some("00000000-0000-7000-8000-000000000003".into()),
                ..Default::default()
            },
            ErrorCode::NotFound,
            "does not exist",
        ),
        (
            "accountplan",
            "create",
            EntityRequest {
                body: Some(
                    json!({"accountId": "00000000-0000-7000-8000-000000000001", "startDate": "2024-01-01T00:00:00Z"}),
                ),
                ..Default::default()
            },
            ErrorCode::BadRequest,
            "account \"00000000-0000-7000-8000-000000000001\" does not exist",
        ),
        (
            "exportschedule",
            "create",
            EntityRequest {
                body: Some(
                    json!({"name": "s", "code": "s", "sourceType": "OPERATIONAL", "operationalDataTypes": ["ACCOUNTS"], "scheduleType": "MINUTE", "period": 5}),
                ),
                ..Default::default()
            },
            ErrorCode::BadRequest,
            "every 15 minutes",
        ),
        (
            "exportschedule",
            "create",
            EntityRequest {
                body: Some(
                    json!({"name": "s", "code": "s", "sourceType": "OPERATIONAL", "operationalDataTypes": ["ACCOUNTS"], "scheduleType": "DAY", "period": 4}),
                ),
                ..Default::default()
            },
            ErrorCode::BadRequest,
            "every 3 days",
        ),
        (
            "exportschedule",
            "create",
            EntityRequest {
                body: Some(
                    json!({"name": "s", "code": "s", "sourceType": "OPERATIONAL", "operationalDataTypes": ["ACCOUNTS"], "cronExpression": "every tuesday"}),
                ),
                ..Default::default()
            },
            ErrorCode::BadRequest,
            "cronExpression",
        ),
        (
            "exportschedule",
            "create",
            EntityRequest {
                body: Some(
                    json!({"name": "s", "code": "s", "sourceType": "OPERATIONAL", "operationalDataTypes": ["NOT_A_TYPE"], "scheduleType": "HOUR", "period": 1}),
                ),
                ..Default::default()
            },
            ErrorCode::BadRequest,
            "operationalDataTypes",
        ),
        (
            "spaceship",
            "create",
            EntityRequest {
                body: Some(json!({})),
                ..Default::default()
            },
            ErrorCode::NotFound,
            "unknown entity type",
        ),
    ];
    for (ty, op, req, code, needle) in cases {
        let e = w
            .call(ty, op, req.clone())
            .await
            .expect_err(&format!("{ty} {op} {req:?} was accepted"));
        assert_eq!(e.code, code, "{ty} {op}: {}", e.message);
        assert!(
            e.message.contains(needle),
            "{ty} {op}: {:?} lacks {needle:?}",
            e.message
        );
    }
    let e = w
        .call_in(
            "no.such",
            "account",
            "create",
            EntityRequest {
                body: Some(account("q")),
                ..Default::default()
            },
        )
        .await;
    assert!(e.is_err());
    let e = w
        .call_in(
            "ghost-org",
            "account",
            "create",
            EntityRequest {
                body: Some(account("q")),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);

    assert_eq!(
        w.entity_messages().await,
        before,
        "a refused request wrote nothing"
    );
    // And the service is still serving.
    w.create("account", account("after")).await.unwrap();
}

#[tokio::test]
async fn valid_schedules_are_stored() {
    let w = World::new().await;
    let dest = w
        .create("exportdestination", json!({"name": "d", "code": "d", "bucketName": "bucket", "iamRoleArn": "arn:aws:iam::123456789012:role/x"}))
        .await
        .unwrap();
    for (code, extra) in [
        ("every15", json!({"scheduleType": "MINUTE", "period": 15})),
        (
            "hourly",
            json!({"scheduleType": "HOUR", "period": 1, "offset": 10}),
        ),
        ("cron", json!({"cronExpression": "0 */6 * * *"})),
    ] {
        let mut body = json!({"name": code, "code": code, "sourceType": "OPERATIONAL", "operationalDataTypes": ["ACCOUNTS", "BILLS"], "destinationIds": [dest["id"]]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let s = w.create("exportschedule", body).await.unwrap();
        assert_eq!(s["version"], 1);
    }
    let e = w
        .create("exportschedule", json!({"name": "x", "code": "x", "sourceType": "OPERATIONAL", "operationalDataTypes": ["ACCOUNTS"], "scheduleType": "HOUR", "period": 1, "destinationIds": ["00000000-0000-7000-8000-000000000002"]}))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
}

#[tokio::test]
async fn secrets_are_never_stored_or_emitted_in_clear() {
    let w = World::new().await;
    let secret = "whsec-very-secret-value";
    let hook = w
        .create(
            "webhook",
            json!({"name": "hook", "description": "d", "url": "https://example.test/hook",
                   "credentials": {"type": "M3TER_SIGNED_REQUEST", "apiKey": "key", "secret": secret}}),
        )
        .await
        .unwrap();
    assert_ne!(hook["credentials"]["secret"], secret);
    let id = hook["id"].as_str().unwrap().to_owned();
    // Updating with the masked value keeps the secret.
    let mut body = hook.clone();
    body["name"] = json!("hook2");
    let updated = w.update("webhook", &id, body).await.unwrap();
    assert_eq!(updated["name"], "hook2");

    let js = jetstream::new(w.client.clone());
    for (stream, filter) in [
        (
            subjects::ENTITIES_STREAM,
            subjects::entity(ORG, "webhook", &id),
        ),
        (
            subjects::EVENTS_STREAM,
            subjects::entity_event(ORG, "webhook", &id),
        ),
    ] {
        let s = js.get_stream(stream).await.unwrap();
        let c = s
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut msgs = c.messages().await.unwrap();
        for _ in 0..2 {
            let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            let text = String::from_utf8_lossy(&m.payload);
            assert!(!text.contains(secret), "{stream} holds the secret in clear");
            assert!(text.contains("sealed:v1:"));
        }
    }
    // The sealed value opens to the original with the service's key.
    let entities = meterline_entities::seal::Sealer::from_base64(
        meterline_entities::Settings::for_tests("")
            .sealing_key
            .expose(),
    )
    .unwrap();
    let s = js.get_stream(subjects::ENTITIES_STREAM).await.unwrap();
    let last = s
        .direct_get_last_for_subject(subjects::entity(ORG, "webhook", &id))
        .await
        .unwrap();
    let ev: EntityEvent = serde_json::from_slice(&last.payload).unwrap();
    let sealed = ev.new.unwrap()["credentials"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(entities.open(&sealed).unwrap(), secret);
}

#[tokio::test]
async fn child_collections_and_engine_computed_fields() {
    let w = World::new().await;
    let acct = w.create("account", account("acme")).await.unwrap();
    let balance = w
        .create(
            "balance",
            json!({"name": "Credit", "code": "credit", "accountId": acct["id"], "currency": "USD",
                   "startDate": "2024-01-01T00:00:00Z", "endDate": "2025-01-01T00:00:00Z"}),
        )
        .await
        .unwrap();
    let bid = balance["id"].as_str().unwrap().to_owned();
    let tx = w
        .call(
            "balancetransaction",
            "create",
            EntityRequest {
                parent_id: Some(bid.clone()),
                body: Some(json!({"amount": 100.0})),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(tx["balanceId"], bid.as_str());
    let e = w
        .call(
            "balancetransaction",
            "create",
            EntityRequest {
                parent_id: Some("00000000-0000-7000-8000-000000000002".into()),
                body: Some(json!({"amount": 1.0})),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    let list = w
        .call(
            "balancetransaction",
            "list",
            EntityRequest {
                parent_id: Some(bid.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 1);

    // A billing engine writes what m3ter computes: bills, line items, amountSpent.
    let bill = w
        .create("bill", json!({"accountId": acct["id"], "billDate": "2024-02-01", "currency": "USD", "billTotal": 42.5, "status": "PENDING"}))
        .await
        .unwrap();
    let bill_id = bill["id"].as_str().unwrap().to_owned();
    w.call(
        "billlineitem",
        "create",
        EntityRequest {
            parent_id: Some(bill_id),
            body: Some(json!({"description": "usage", "subtotal": 42.5, "quantity": 10})),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let c = w
        .create("commitment", json!({"accountId": acct["id"], "amount": 1000, "currency": "USD", "startDate": "2024-01-01", "endDate": "2025-01-01", "amountSpent": 0}))
        .await
        .unwrap();
    let mut body = c.clone();
    body["amountSpent"] = json!(950.5);
    let c2 = w
        .update("commitment", c["id"].as_str().unwrap(), body)
        .await
        .unwrap();
    assert_eq!(c2["amountSpent"], 950.5);
    let mut bad = c2.clone();
    bad["amountSpent"] = json!("lots");
    assert_eq!(
        w.update("commitment", c["id"].as_str().unwrap(), bad)
            .await
            .unwrap_err()
            .code,
        ErrorCode::BadRequest
    );
}

#[tokio::test]
async fn service_user_credentials_verify_and_are_not_in_events() {
    let w = World::new().await;
    let creds = meterline_entities::bootstrap(&w.client, "tenant-b", "Tenant B", "api")
        .await
        .unwrap();
    assert_eq!(creds.org_id, "tenant-b");
    let verify = |key: String, secret: String| {
        let client = w.client.clone();
        async move {
            let payload = serde_json::to_vec(&meterline_shared::protocol::VerifyRequest {
                access_key: key,
                secret,
            })
            .unwrap();
            meterline_shared::bus::request(
                &client,
                subjects::AUTH_VERIFY.into(),
                Default::default(),
                payload.into(),
            )
            .await
        }
    };
    let ok = verify(creds.access_key.clone(), creds.secret.clone())
        .await
        .unwrap();
    let p: Value = serde_json::from_slice(&ok).unwrap();
    assert_eq!(p["orgId"], "tenant-b");
    assert_eq!(p["serviceUserId"], creds.service_user_id.as_str());
    assert_eq!(
        verify(creds.access_key.clone(), "wrong".into())
            .await
            .unwrap_err()
            .code,
        ErrorCode::Unauthorized
    );
    assert_eq!(
        verify("nokey".into(), creds.secret.clone())
            .await
            .unwrap_err()
            .code,
        ErrorCode::Unauthorized
    );
    assert_eq!(
        verify("bad.key*".into(), creds.secret.clone())
            .await
            .unwrap_err()
            .code,
        ErrorCode::Unauthorized
    );

    // Bootstrapping again reuses the org and issues a second user.
    let again = meterline_entities::bootstrap(&w.client, "tenant-b", "Tenant B", "api2")
        .await
        .unwrap();
    assert_ne!(again.access_key, creds.access_key);

    // Deleting the service user revokes its keys.
    w.call_in(
        "tenant-b",
        "serviceuser",
        "delete",
        EntityRequest {
            id: Some(creds.service_user_id.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        verify(creds.access_key.clone(), creds.secret.clone())
            .await
            .unwrap_err()
            .code,
        ErrorCode::Unauthorized
    );
}

#[tokio::test]
async fn provisioning_is_idempotent_and_updates_changed_config() {
    let nats = meterline_shared::testkit::NatsServer::start();
    let js = jetstream::new(nats.client().await);
    use meterline_shared::provision::{self, Outcome};
    assert_eq!(
        provision::ensure_stream(&js, provision::entities())
            .await
            .unwrap(),
        Outcome::Created
    );
    assert_eq!(
        provision::ensure_stream(&js, provision::entities())
            .await
            .unwrap(),
        Outcome::Unchanged
    );
    let mut changed = provision::entities();
    changed.description = Some("changed".into());
    assert_eq!(
        provision::ensure_stream(&js, changed).await.unwrap(),
        Outcome::Updated
    );
    let info = js
        .get_stream(subjects::ENTITIES_STREAM)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    assert_eq!(info.config.description.as_deref(), Some("changed"));
    // A change the server cannot apply is an error, not ignored.
    let mut immutable = provision::entities();
    immutable.storage = async_nats::jetstream::stream::StorageType::Memory;
    assert!(provision::ensure_stream(&js, immutable).await.is_err());
}

#[tokio::test]
async fn replicas_answer_the_micro_service_discovery_api() {
    let w = World::new().await;
    let second = start_entities(&w.nats).await;
    // $SRV.PING is answered by every replica; collect replies until both came.
    let inbox = w.client.new_inbox();
    let mut sub = w.client.subscribe(inbox.clone()).await.unwrap();
    w.client
        .publish_with_reply("$SRV.PING.entities", inbox, "".into())
        .await
        .unwrap();
    let mut ids = std::collections::HashSet::new();
    while ids.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("ping replies")
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["name"], "entities");
        ids.insert(v["id"].as_str().unwrap().to_owned());
    }
    let info = w
        .client
        .request("$SRV.INFO.entities", "".into())
        .await
        .unwrap();
    let info: Value = serde_json::from_slice(&info.payload).unwrap();
    let subjects: Vec<&str> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    for s in [
        "svc.entities.*.*.create",
        "svc.entities.*.*.list",
        "svc.auth.verify",
    ] {
        assert!(subjects.contains(&s), "{s} missing from {subjects:?}");
    }
    second.stop().await;
}
