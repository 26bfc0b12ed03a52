//! Upload and download URL signatures never reach the logs.
//!
//! A binary of its own: it installs a global subscriber that captures every
//! span and event field, which no other test may share.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use meterline_gateway::{router, AppState, Settings};
use tower::ServiceExt;

/// Every field of every span and event, as `name=value` lines.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<String>>);

impl tracing::field::Visit for &Captured {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        let mut out = self.0.lock().unwrap();
        let _ = writeln!(out, "{}={value:?}", field.name());
    }
}

impl tracing::Subscriber for Captured {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        span.record(&mut &*self);
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        values.record(&mut &*self);
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        event.record(&mut &*self);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test]
async fn request_logs_never_show_an_upload_url_signature() {
    let captured = Captured::default();
    tracing::subscriber::set_global_default(captured.clone())
        .expect("the only subscriber of this binary");
    let nats = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect("nats://127.0.0.1:1")
        .await
        .unwrap();
    let r = router(AppState::new(
        nats,
        &Settings::for_tests("nats://127.0.0.1:1"),
    ));
    let sig = "c2VjcmV0LXNpZ25hdHVyZQ";
    let url = format!("/uploads/measurements/job1?org=o1&expires=1900000000&sig={sig}");
    for req in [
        Request::put(&url).body(Body::from("[]")).unwrap(),
        Request::get(&url).body(Body::empty()).unwrap(),
    ] {
        let res = r.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "a forged signature");
    }
    let logs = captured.0.lock().unwrap().clone();
    assert!(
        logs.contains("uri=/uploads/measurements/job1?org=o1&expires=1900000000&sig=[redacted]"),
        "{logs}"
    );
    assert!(!logs.contains(sig), "{logs}");
}
