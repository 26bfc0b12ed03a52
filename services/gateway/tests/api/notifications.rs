//! The notifier's routes through the gateway, in front of the real entities
//! and notifier services: the events API, `notifications/evaluate`, webhook
//! activation and the dead letters.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{send, World};
use meterline_shared::testkit::{eventually, Running};

async fn start_notifier(w: &World) -> Running {
    let app = meterline_notifier::App::build(meterline_notifier::Settings::for_tests(w.nats.url()))
        .await
        .expect("build notifier");
    Running::spawn(|stop| app.run_until_stopped(stop))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_evaluate_webhook_activation_and_dead_letters_over_http() {
    let w = World::new("org-notify").await;
    let notifier = start_notifier(&w).await;
    let gw = &w.gw;
    let org = &w.creds.org_id;
    let token = w.token().await;

    let (status, hook) = send(
        gw.http
            .post(gw.org_url(org, "integrationdestinations/webhooks"))
            .bearer_auth(&token)
            .json(&json!({
                "name": "hook", "description": "d", "url": "https://hooks.example.com/m3ter",
                "credentials": {"type": "M3TER_SIGNED_REQUEST", "apiKey": "k", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
            })),
    )
    .await;
    assert_eq!(status, 200, "{hook}");
    assert_eq!(hook["credentials"]["secret"], "********");
    let hook_id = hook["id"].as_str().unwrap();

    // Deactivate with m3ter's query parameter; the entity shows it.
    let active = gw.org_url(
        org,
        &format!("integrationdestinations/webhooks/{hook_id}/active"),
    );
    let (status, off) = send(
        gw.http
            .put(format!("{active}?active=false"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 200, "{off}");
    assert_eq!(off["active"], false);
    assert_eq!(off["version"], 2);
    let (status, _) = send(
        gw.http
            .put(format!("{active}?active=maybe"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 400);

    // The two writes are events (EVENTS sources them from ENTITIES
    // asynchronously); the list filters by resource.
    let events = gw.org_url(org, &format!("events?resourceId={hook_id}&pageSize=10"));
    let page = eventually(
        Duration::from_secs(20),
        "both webhook events listed",
        || async {
            let (status, page) = send(gw.http.get(&events).bearer_auth(&token)).await;
            (status == 200 && page["data"].as_array()?.len() == 2).then_some(page)
        },
    )
    .await;
    let names: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["eventName"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "configuration.webhook.created",
            "configuration.webhook.updated"
        ]
    );
    let event_id = page["data"][1]["id"].as_str().unwrap();
    let (status, event) = send(
        gw.http
            .get(gw.org_url(org, &format!("events/{event_id}")))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(event["m3terEvent"]["new"]["active"], false);
    assert_ne!(
        event["m3terEvent"]["new"]["credentials"]["secret"],
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "no secret in clear on EVENTS"
    );

    let (status, r) = send(
        gw.http
            .post(gw.org_url(org, "notifications/evaluate"))
            .bearer_auth(&token)
            .json(&json!({"eventId": event_id, "calculation": "new.active == true"})),
    )
    .await;
    assert_eq!((status, r), (200, json!({"success": false})));
    let (status, r) = send(
        gw.http
            .post(gw.org_url(org, "notifications/evaluate"))
            .bearer_auth(&token)
            .json(&json!({"eventId": event_id, "calculation": "new.active != old.active"})),
    )
    .await;
    assert_eq!((status, r), (200, json!({"success": true})));
    let (status, r) = send(
        gw.http
            .post(gw.org_url(org, "notifications/evaluate"))
            .bearer_auth(&token)
            .json(&json!({"calculation": 5})),
    )
    .await;
    assert_eq!(status, 400, "{r}");

    let (status, types) = send(
        gw.http
            .get(gw.org_url(org, "events/types"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 200);
    assert!(types["events"]
        .as_array()
        .unwrap()
        .contains(&json!("configuration.commitment.updated")));
    let (status, fields) = send(
        gw.http
            .get(gw.org_url(
                org,
                "events/fields?eventName=configuration.commitment.created",
            ))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        fields["events"]["configuration.commitment.created"]["new.amount"],
        "double"
    );
    let (status, _) = send(
        gw.http
            .get(gw.org_url(org, "events/fields"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 400);

    let (status, dead) = send(
        gw.http
            .get(gw.org_url(org, "notifications/deadletters"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!((status, dead), (200, json!({"data": []})));
    let (status, body) = send(
        gw.http
            .post(gw.org_url(org, "notifications/deadletters/nope/replay"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(body["message"].as_str().is_some());

    notifier.stop().await;
    w.stop().await;
}
