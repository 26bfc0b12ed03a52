//! Kill -9 of the notifier process in the middle of deliveries: every fired
//! notification still arrives at least once, with the same id each time.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

use common::*;
use meterline_shared::testkit::{eventually, NatsServer};

/// The notifier binary, as an operator runs it.
fn spawn_notifier(nats: &NatsServer) -> Child {
    Command::new(env!("CARGO_BIN_EXE_meterline-notifier"))
        .env("METERLINE_NATS_URL", nats.url())
        .env("METERLINE_NOTIFIER_ADMIN_ADDR", "127.0.0.1:0")
        .env(
            "METERLINE_NOTIFIER_SEALING_KEY",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        )
        .env("METERLINE_NOTIFIER_WEBHOOK_ALLOW_NETWORKS", "127.0.0.0/8")
        .env(
            "METERLINE_NOTIFIER_RETRY_SCHEDULE",
            "100ms,200ms,400ms,800ms,1s",
        )
        .env("METERLINE_NOTIFIER_REQUEST_TIMEOUT_MS", "2000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("start the notifier binary")
}

async fn wait_serving(w: &World) {
    eventually(WAIT, "the notifier answering", || async {
        w.notifier("events.types", json!({})).await.ok().map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn kill_9_mid_delivery_loses_no_notification_and_keeps_ids() {
    let nats = NatsServer::start();
    let entities = start_entities(&nats, "127.0.0.0/8").await;
    let w = World::new(&nats).await;
    let rx = Receiver::start(SECRET);
    let mut notifier = spawn_notifier(&nats);
    wait_serving(&w).await;

    // The first request hangs: the process is killed while it is in flight.
    let hook = w.webhook(&rx.url("crash", "hang,ok")).await;
    let rule = w
        .rule("every-product", "configuration.product.created", None)
        .await;
    w.link(&rule, &hook).await;
    let mut products = Vec::new();
    for i in 0..20 {
        let p = w
            .create(
                "product",
                json!({"code": format!("p{i}"), "name": format!("P{i}")}),
            )
            .await
            .unwrap();
        products.push(p["id"].as_str().unwrap().to_owned());
    }
    rx.wait_hits("crash", 1).await;
    notifier.kill().expect("kill -9");
    notifier.wait().unwrap();

    let mut notifier = spawn_notifier(&nats);
    wait_serving(&w).await;
    let by_product = eventually(WAIT, "every product notified", || async {
        let mut by_product: HashMap<String, Vec<Value>> = HashMap::new();
        for h in rx.hits("crash").await {
            let product = h["body"]["event"]["new"]["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            by_product.entry(product).or_default().push(h);
        }
        let all = products.iter().all(|p| {
            by_product
                .get(p)
                .is_some_and(|hits| hits.iter().any(|h| h["action"] == "ok"))
        });
        all.then_some(by_product)
    })
    .await;
    for p in &products {
        let hits = &by_product[p];
        assert!(hits.iter().all(|h| h["verified"] == true), "{hits:#?}");
        assert!(
            hits.iter().all(|h| h["id"] == hits[0]["id"]),
            "one id for every attempt of a notification: {hits:#?}"
        );
    }
    let hung = by_product.values().find(|hits| hits[0]["action"] == "hang");
    assert!(
        hung.is_some_and(|hits| hits.len() >= 2),
        "the delivery in flight at the kill was attempted again"
    );
    notifier.kill().unwrap();
    notifier.wait().unwrap();
    entities.stop().await;
}
