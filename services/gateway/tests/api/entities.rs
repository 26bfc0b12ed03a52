//! The gateway in front of the real entities service, driven over HTTP as
//! an m3ter client would: CRUD, paging, child collections, and bad input
//! refused with a clear 4xx and nothing written to `ENTITIES`. Token issuing
//! and the refusals the gateway makes on its own are in `edge`.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{account, bootstrap, send, token_for, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_can_be_created_read_updated_listed_and_deleted() {
    let w = World::new("org-crud").await;
    let gw = &w.gw;
    let org = &w.creds.org_id;

    let token = w.token().await;

    let accounts = gw.org_url(org, "accounts");
    let (status, created) = send(
        gw.http
            .post(&accounts)
            .bearer_auth(&token)
            .json(&account("acme")),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["version"], 1);
    assert_eq!(created["code"], "acme");
    assert_eq!(
        created["createdBy"],
        w.creds.service_user_id.as_str(),
        "actor comes from the token"
    );
    let id = created["id"].as_str().unwrap().to_owned();
    let item = format!("{accounts}/{id}");

    let (status, got) = send(gw.http.get(&item).bearer_auth(&token)).await;
    assert_eq!(status, 200);
    assert_eq!(got, created);

    let mut changed = created.clone();
    changed["name"] = json!("Acme Renamed");
    let (status, updated) = send(gw.http.put(&item).bearer_auth(&token).json(&changed)).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(
        (updated["version"].as_i64(), updated["name"].as_str()),
        (Some(2), Some("Acme Renamed"))
    );

    let (status, page) = send(gw.http.get(&accounts).bearer_auth(&token)).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert_eq!(page["data"][0]["id"], id.as_str());

    let (status, deleted) = send(gw.http.delete(&item).bearer_auth(&token)).await;
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(deleted["id"], id.as_str());
    assert_eq!(deleted["name"], "Acme Renamed");
    let (status, _) = send(gw.http.get(&item).bearer_auth(&token)).await;
    assert_eq!(status, 404);
    let (status, page) = send(gw.http.get(&accounts).bearer_auth(&token)).await;
    assert_eq!(status, 200);
    assert!(page["data"].as_array().unwrap().is_empty(), "{page}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_with_page_size_and_next_token_and_filter_by_ids_and_codes() {
    let w = World::new("org-paging").await;
    let gw = &w.gw;
    let token = w.token().await;
    let accounts = gw.org_url(&w.creds.org_id, "accounts");
    let mut ids = Vec::new();
    for i in 0..5 {
        let (status, body) = send(
            gw.http
                .post(&accounts)
                .bearer_auth(&token)
                .json(&account(&format!("pg{i}"))),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }

    let mut seen = Vec::new();
    let mut next: Option<String> = None;
    for _ in 0..5 {
        let url = match &next {
            Some(t) => format!("{accounts}?pageSize=2&nextToken={t}"),
            None => format!("{accounts}?pageSize=2"),
        };
        let (status, page) = send(gw.http.get(url).bearer_auth(&token)).await;
        assert_eq!(status, 200, "{page}");
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= 2, "{page}");
        seen.extend(data.iter().map(|a| a["id"].as_str().unwrap().to_owned()));
        next = page["nextToken"].as_str().map(str::to_owned);
        if next.is_none() {
            break;
        }
    }
    assert!(next.is_none(), "paging did not end");
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 5, "every account exactly once: {seen:?}");

    // ids: repeated and comma-separated; codes.
    let (status, page) = send(
        gw.http
            .get(format!(
                "{accounts}?ids={}&ids={},{}",
                ids[0], ids[1], ids[2]
            ))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["data"].as_array().unwrap().len(), 3, "{page}");
    let (status, page) = send(
        gw.http
            .get(format!("{accounts}?codes=pg4"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["data"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["data"][0]["id"], ids[4].as_str());
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_transactions_live_under_their_balance() {
    let w = World::new("org-child").await;
    let gw = &w.gw;
    let org = &w.creds.org_id;
    let token = w.token().await;
    let (status, acc) = send(
        gw.http
            .post(gw.org_url(org, "accounts"))
            .bearer_auth(&token)
            .json(&account("bal-acc")),
    )
    .await;
    assert_eq!(status, 200, "{acc}");
    let balance = json!({
        "accountId": acc["id"], "code": "prepaid", "currency": "USD", "name": "Prepaid",
        "startDate": "2026-01-01T00:00:00Z", "endDate": "2027-01-01T00:00:00Z",
    });
    let (status, bal) = send(
        gw.http
            .post(gw.org_url(org, "balances"))
            .bearer_auth(&token)
            .json(&balance),
    )
    .await;
    assert_eq!(status, 200, "{bal}");
    let bal_id = bal["id"].as_str().unwrap();
    let transactions = gw.org_url(org, &format!("balances/{bal_id}/transactions"));

    let (status, tx) = send(
        gw.http
            .post(&transactions)
            .bearer_auth(&token)
            .json(&json!({"amount": 25.5, "description": "top-up"})),
    )
    .await;
    assert_eq!(status, 200, "{tx}");
    assert_eq!(tx["balanceId"], bal_id);
    let tx_id = tx["id"].as_str().unwrap();

    let (status, got) = send(
        gw.http
            .get(format!("{transactions}/{tx_id}"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["amount"], 25.5);
    let (status, page) = send(gw.http.get(&transactions).bearer_auth(&token)).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["data"].as_array().unwrap().len(), 1);

    // Under a balance that does not exist: refused, nothing written.
    let before = w.entity_messages().await;
    let (status, body) = send(
        gw.http
            .post(gw.org_url(org, "balances/no-such-balance/transactions"))
            .bearer_auth(&token)
            .json(&json!({"amount": 1})),
    )
    .await;
    assert!(matches!(status, 400 | 404), "{status}: {body}");
    let (status, page) = send(
        gw.http
            .get(gw.org_url(org, "balances/no-such-balance/transactions"))
            .bearer_auth(&token),
    )
    .await;
    assert!(matches!(status, 200 | 404), "{status}: {page}");
    if status == 200 {
        assert!(page["data"].as_array().unwrap().is_empty());
    }
    assert_eq!(w.entity_messages().await, before);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_writes_nothing() {
    let w = World::new("org-bad").await;
    let gw = &w.gw;
    let org = w.creds.org_id.clone();
    let token = w.token().await;
    let h = &gw.http;
    let accounts = gw.org_url(&org, "accounts");
    let (status, acc) = send(h.post(&accounts).bearer_auth(&token).json(&account("keep"))).await;
    assert_eq!(status, 200, "{acc}");
    let item = format!("{accounts}/{}", acc["id"].as_str().unwrap());
    let mut missing_email = account("nomail");
    missing_email
        .as_object_mut()
        .unwrap()
        .remove("emailAddress");
    let mut stale = acc.clone();
    stale["version"] = json!(7);
    let mut unversioned = acc.clone();
    unversioned.as_object_mut().unwrap().remove("version");
    let forged = {
        let keys =
            meterline_gateway::TokenKeys::new(b"someone-else's-key", Duration::from_secs(60));
        keys.issue(&meterline_shared::protocol::Principal {
            org_id: org.clone(),
            service_user_id: w.creds.service_user_id.clone(),
        })
        .unwrap()
    };

    // A second org, with its own token: it may not touch this org's data.
    let other = bootstrap(&w.nats, "org-bad-other").await;
    let other_token = token_for(gw, &other).await;

    let before = w.entity_messages().await;
    let cases: Vec<(&str, reqwest::RequestBuilder, &[u16])> = vec![
        ("missing required field", h.post(&accounts).bearer_auth(&token).json(&missing_email), &[400]),
        ("over-long code", h.post(&accounts).bearer_auth(&token).json(&account(&"c".repeat(81))), &[400]),
        ("duplicate code", h.post(&accounts).bearer_auth(&token).json(&account("keep")), &[400, 409]),
        ("star in id", h.put(format!("{accounts}/a*")).bearer_auth(&token).json(&stale), &[400]),
        ("gt in id", h.delete(format!("{accounts}/%3E")).bearer_auth(&token), &[400]),
        ("dot in org id", h.get(gw.org_url("org.bad", "accounts")).bearer_auth(&token), &[400]),
        ("space in org id", h.get(gw.org_url("org%20bad", "accounts")).bearer_auth(&token), &[400]),
        ("wrong version", h.put(&item).bearer_auth(&token).json(&stale), &[409]),
        ("missing version", h.put(&item).bearer_auth(&token).json(&unversioned), &[400]),
        ("update unknown id", h.put(format!("{accounts}/nope")).bearer_auth(&token).json(&json!({"name": "N", "code": "nope", "emailAddress": "n@x.io", "version": 1})), &[404]),
        ("delete unknown id", h.delete(format!("{accounts}/nope")).bearer_auth(&token), &[404]),
        (
            "reference to a missing account",
            h.post(gw.org_url(&org, "accountplans"))
                .bearer_auth(&token)
                .json(&json!({"accountId": "no-such-account", "planId": "no-such-plan", "startDate": "2026-01-01T00:00:00Z"})),
            &[400, 404, 422],
        ),
        ("unknown filter", h.get(format!("{accounts}?colour=red")).bearer_auth(&token), &[400]),
        (
            "body over the size limit",
            h.post(&accounts).bearer_auth(&token).json(&json!({"name": "x".repeat(2 * 1024 * 1024), "code": "big", "emailAddress": "b@x.io"})),
            &[413],
        ),
        ("forged token", h.delete(&item).bearer_auth(&forged), &[401]),
        ("another org's token", h.delete(&item).bearer_auth(&other_token), &[403]),
        ("another org's token on its own path", h.get(gw.org_url(&other.org_id, "accounts")).bearer_auth(&token), &[403]),
    ];
    // JSON without a Content-Type is still read: the refusal is about the
    // missing fields, not the encoding.
    let (status, body) = send(
        h.post(&accounts)
            .bearer_auth(&token)
            .body(r#"{"name": "x"}"#),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        !body["message"].as_str().unwrap().contains("malformed"),
        "{body}"
    );
    for (what, request, want) in cases {
        let (status, body) = send(request).await;
        assert!(
            want.contains(&status),
            "{what}: got {status}, want {want:?}: {body}"
        );
        // The gateway keeps serving.
        let (status, _) = send(h.get(&item).bearer_auth(&token)).await;
        assert_eq!(status, 200, "after {what}");
    }
    assert_eq!(
        w.entity_messages().await,
        before,
        "a refused request was written"
    );

    // The other org sees none of this org's accounts.
    let (status, page) = send(
        h.get(gw.org_url(&other.org_id, "accounts"))
            .bearer_auth(&other_token),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert!(page["data"].as_array().unwrap().is_empty(), "{page}");
    w.stop().await;
}
