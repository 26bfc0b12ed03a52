//! `POST /organizations/{orgId}/measurements` in front of the real ingest
//! service: what the gateway decides (body limit, JSON, rate limits,
//! authentication) and that ingest's replies and refusals reach the client
//! unchanged. Validation and de-duplication themselves are tested in
//! `meterline-ingest`.

use serde_json::{json, Value};

use crate::helpers::{account, bootstrap, send, token_for, within, Gateway, Ingest, World};

const METER: &str = "storage";
const ACCOUNT: &str = "acme";
/// m3ter's limit, the gateway's default.
const LIMIT: usize = 512_000;

/// Creates the meter and account the measurements of these tests name.
async fn prepare_org(gw: &Gateway, org: &str, token: &str) {
    let meter = json!({
        "name": "Storage", "code": METER,
        "dataFields": [{"category": "MEASURE", "code": "gb", "name": "GB", "unit": "GiBy"}],
        "derivedFields": [],
    });
    let (status, body) = send(
        gw.http
            .post(gw.org_url(org, "meters"))
            .bearer_auth(token)
            .json(&meter),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = send(
        gw.http
            .post(gw.org_url(org, "accounts"))
            .bearer_auth(token)
            .json(&account(ACCOUNT)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

fn measurement(uid: &str) -> Value {
    json!({
        "uid": uid, "meter": METER, "account": ACCOUNT,
        "ts": "2024-05-01T10:00:00Z", "measure": {"gb": 1.5},
    })
}

/// A batch of measurements with the given uids.
fn batch<S: AsRef<str>>(uids: impl IntoIterator<Item = S>) -> Value {
    let measurements: Vec<Value> = uids.into_iter().map(|u| measurement(u.as_ref())).collect();
    json!({ "measurements": measurements })
}

/// A valid batch serialized and padded with trailing whitespace (still one
/// JSON document) to exactly `len` bytes.
fn batch_of_size(uid: &str, len: usize) -> String {
    let mut text = batch([uid]).to_string();
    assert!(text.len() <= len);
    text.extend(std::iter::repeat_n(' ', len - text.len()));
    text
}

fn assert_counts(reply: &Value, accepted: u64, duplicates: u64, rejected: u64) {
    assert_eq!(reply["result"], "accepted", "{reply}");
    assert_eq!(
        (
            reply["accepted"].as_u64(),
            reply["duplicates"].as_u64(),
            reply["rejected"].as_u64()
        ),
        (Some(accepted), Some(duplicates), Some(rejected)),
        "{reply}"
    );
    let errors = reply["errors"].as_array().map_or(0, Vec::len) as u64;
    assert_eq!(
        errors, rejected,
        "one error per rejected measurement: {reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_reach_ingest_and_its_replies_come_back_unchanged() {
    const ORG: &str = "org-usage";
    let w = World::new(ORG).await;
    let ingest = Ingest::start(&w.nats).await;
    let gw = &w.gw;
    let token = w.token().await;
    prepare_org(gw, ORG, &token).await;
    let url = gw.org_url(ORG, "measurements");

    let (status, reply) = send(
        gw.http
            .post(&url)
            .bearer_auth(&token)
            .json(&batch(["u1", "u2", "u3"])),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_counts(&reply, 3, 0, 0);

    // The same uids again, one new: ingest's de-duplication shows through.
    let (status, reply) = send(
        gw.http
            .post(&url)
            .bearer_auth(&token)
            .json(&batch(["u1", "u2", "u3", "u4"])),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_counts(&reply, 1, 3, 0);

    // A measurement of an unknown meter is rejected, the rest stored.
    let mut mixed = batch(["u5"]);
    let mut unknown = measurement("u6");
    unknown["meter"] = json!("no-such-meter");
    mixed["measurements"].as_array_mut().unwrap().push(unknown);
    let (status, reply) = send(gw.http.post(&url).bearer_auth(&token).json(&mixed)).await;
    assert_eq!(status, 200, "{reply}");
    assert_counts(&reply, 1, 0, 1);

    // Refusals of the whole request keep ingest's status and message.
    let uids: Vec<String> = (0..1001).map(|i| format!("big{i}")).collect();
    for (what, body) in [
        ("empty batch", json!({"measurements": []})),
        ("1001 measurements", batch(&uids)),
        ("no measurements key", json!({"foo": 1})),
    ] {
        let (status, reply) = send(gw.http.post(&url).bearer_auth(&token).json(&body)).await;
        assert_eq!(status, 400, "{what}: {reply}");
    }

    ingest.stop().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_limit_is_m3ters_bodies_must_be_json_and_the_gateway_keeps_serving() {
    const ORG: &str = "org-limits";
    // The default measurements limit, with the general limit far lower:
    // the route has its own.
    let w = World::with_gateway(ORG, |s| s.body_limit_bytes = 4096).await;
    let ingest = Ingest::start(&w.nats).await;
    let gw = &w.gw;
    let h = &gw.http;
    let token = w.token().await;
    prepare_org(gw, ORG, &token).await;
    let url = gw.org_url(ORG, "measurements");
    let json_post = |body: String| {
        h.post(&url)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
    };

    // Exactly the limit is accepted; one byte more is not.
    let (status, reply) = send(json_post(batch_of_size("at-limit", LIMIT))).await;
    assert_eq!(status, 200, "{reply}");
    assert_counts(&reply, 1, 0, 0);
    let (status, reply) = send(json_post(batch_of_size("over-limit", LIMIT + 1))).await;
    assert_eq!(status, 413, "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("512000 bytes"),
        "{reply}"
    );
    // Far over: the gateway reads the body away so the client sees the 413.
    let (status, _) = send(json_post(batch_of_size("far-over", 3 << 20))).await;
    assert_eq!(status, 413);

    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "not json",
            h.post(&url)
                .bearer_auth(&token)
                .header("content-type", "text/plain")
                .body("uid=u1,meter=storage"),
            400,
            "malformed JSON",
        ),
        (
            "truncated json",
            json_post(batch(["t1"]).to_string()[..40].to_owned()),
            400,
            "malformed JSON",
        ),
        ("empty body", h.post(&url).bearer_auth(&token), 400, "empty"),
        (
            "no token",
            h.post(&url).json(&batch(["n1"])),
            401,
            "missing bearer token",
        ),
        (
            "another org's token",
            h.post(&url)
                .bearer_auth(gw.token("org-other", "su", 60))
                .json(&batch(["n2"])),
            403,
            "not valid for organization",
        ),
        (
            "subject characters in the org",
            h.post(gw.org_url("org*", "measurements"))
                .bearer_auth(&token)
                .json(&batch(["n3"])),
            400,
            "not allowed",
        ),
        (
            "wrong method",
            h.get(&url).bearer_auth(&token),
            405,
            "method not allowed",
        ),
    ];
    for (what, request, want, text) in cases {
        let (status, body) = send(request).await;
        assert_eq!(status, want, "{what}: {body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(text), "{what}: {message:?}");
    }

    // Still serving, and nothing refused was stored.
    let (status, reply) = send(h.post(&url).bearer_auth(&token).json(&batch([
        "at-limit",
        "over-limit",
        "far-over",
        "t1",
        "n1",
        "after",
    ])))
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_counts(&reply, 5, 1, 0);
    let (status, page) = send(h.get(gw.org_url(ORG, "meters")).bearer_auth(&token)).await;
    assert_eq!(status, 200, "{page}");
    ingest.stop().await;
    w.stop().await;
}

/// The value of a response header as text.
fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_refuse_per_source_and_per_org_with_retry_after() {
    const ORG: &str = "org-busy";
    const QUIET: &str = "org-quiet";
    // Buckets that do not refill while the test runs (one token in 1000 s):
    // what passes is exactly the burst.
    let w = World::with_gateway(ORG, |s| {
        s.measurements_org_rate_per_sec = 0.001;
        s.measurements_org_burst = 4;
        s.measurements_source_rate_per_sec = 0.001;
        s.measurements_source_burst = 2;
    })
    .await;
    let ingest = Ingest::start(&w.nats).await;
    let gw = &w.gw;
    let h = &gw.http;
    let first = w.token().await;
    let first_su = w.creds.service_user_id.clone();
    // Other sources of the same org: the gateway only needs valid tokens.
    let second = gw.token(ORG, "second-source", 600);
    let third = gw.token(ORG, "third-source", 600);
    prepare_org(gw, ORG, &first).await;
    let url = gw.org_url(ORG, "measurements");
    let submit = |token: &str, uid: &str| h.post(&url).bearer_auth(token).json(&batch([uid]));

    // The first source spends its burst of two...
    for uid in ["a1", "a2"] {
        let (status, reply) = send(submit(&first, uid)).await;
        assert_eq!(status, 200, "{reply}");
        assert_counts(&reply, 1, 0, 0);
    }
    // ...and is refused the third, with a near-limit body the gateway
    // reads away so the client gets the 429 rather than a reset.
    let refused = within(
        "a rate-limited request",
        h.post(&url)
            .bearer_auth(&first)
            .header("content-type", "application/json")
            .body(batch_of_size("a3", LIMIT - 10))
            .send(),
    )
    .await
    .expect("the 429 reaches the client");
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = header(&refused, "retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=1000).contains(&retry_after), "{retry_after}");
    let retry_after_ms: u64 = header(&refused, "retry-after-ms")
        .expect("retry-after-ms")
        .parse()
        .unwrap();
    assert!(
        retry_after_ms.div_ceil(1000) == retry_after,
        "{retry_after_ms}"
    );
    let (_, body) = crate::helpers::status_json(refused).await;
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!(
            "rate limit of 0.001 requests per second for service user {first_su} exceeded; retry after "
        )),
        "{message}"
    );

    // A second source takes the org's last two tokens; then the org is out
    // for every source.
    for uid in ["b1", "b2"] {
        let (status, reply) = send(submit(&second, uid)).await;
        assert_eq!(status, 200, "{reply}");
    }
    let response = within("an org-limited request", submit(&third, "c1").send())
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert!(header(&response, "retry-after").is_some());
    let (_, body) = crate::helpers::status_json(response).await;
    assert!(
        body["message"].as_str().unwrap().starts_with(&format!(
            "rate limit of 0.001 requests per second for organization {ORG} exceeded; retry after "
        )),
        "{body}"
    );

    // Another org is not limited by the first one's traffic.
    let quiet = bootstrap(&w.nats, QUIET).await;
    let quiet_token = token_for(gw, &quiet).await;
    prepare_org(gw, QUIET, &quiet_token).await;
    for uid in ["q1", "q2"] {
        let (status, reply) = send(
            h.post(gw.org_url(QUIET, "measurements"))
                .bearer_auth(&quiet_token)
                .json(&batch([uid])),
        )
        .await;
        assert_eq!(status, 200, "{reply}");
        assert_counts(&reply, 1, 0, 0);
    }

    // The busy org's other routes have their own limit (off here), and the
    // gateway keeps serving.
    let (status, page) = send(h.get(gw.org_url(ORG, "accounts")).bearer_auth(&first)).await;
    assert_eq!(status, 200, "{page}");
    let (status, _) = send(submit(&first, "a4")).await;
    assert_eq!(
        status, 429,
        "refused requests took no tokens, and none refilled"
    );
    ingest.stop().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_org_routes_have_their_own_org_limit() {
    const ORG: &str = "org-config";
    let w = World::with_gateway(ORG, |s| {
        s.config_org_rate_per_sec = 0.001;
        s.config_org_burst = 3;
    })
    .await;
    let gw = &w.gw;
    let token = w.token().await;
    let accounts = gw.org_url(ORG, "accounts");
    for _ in 0..3 {
        let (status, page) = send(gw.http.get(&accounts).bearer_auth(&token)).await;
        assert_eq!(status, 200, "{page}");
    }
    let response = within(
        "a rate-limited read",
        gw.http.get(&accounts).bearer_auth(&token).send(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 429);
    assert!(header(&response, "retry-after").is_some());
    // Measurements are limited separately (off here): no ingest runs, so
    // the request reaches the bus and finds nobody.
    let (status, body) = send(
        gw.http
            .post(gw.org_url(ORG, "measurements"))
            .bearer_auth(&token)
            .json(&batch(["x1"])),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    // Token issuing is not an org route.
    let _ = w.token().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_ingest_service_submissions_get_503_and_the_gateway_keeps_serving() {
    const ORG: &str = "org-no-ingest";
    let w = World::new(ORG).await;
    let gw = &w.gw;
    let token = w.token().await;
    let (status, body) = send(
        gw.http
            .post(gw.org_url(ORG, "measurements"))
            .bearer_auth(&token)
            .json(&batch(["u1"])),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["message"], "no service is answering ingest");
    let (status, page) = send(gw.http.get(gw.org_url(ORG, "accounts")).bearer_auth(&token)).await;
    assert_eq!(status, 200, "{page}");
    w.stop().await;
}

/// Sends a request with a `len`-byte body the way simple clients do: the
/// whole body first, then the response. Returns whether writing the body
/// succeeded, and the status line.
async fn write_then_read(gw: &Gateway, org: &str, token: &str, len: usize) -> (bool, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = batch_of_size("raw", len);
    let head = format!(
        "POST /organizations/{org}/measurements HTTP/1.1\r\nhost: {}\r\n\
         authorization: Bearer {token}\r\ncontent-type: application/json\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n",
        gw.http_addr,
        body.len()
    );
    let mut stream = within("connecting", tokio::net::TcpStream::connect(gw.http_addr))
        .await
        .unwrap();
    let written = within("writing the request", async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await
    })
    .await;
    let mut response = Vec::new();
    let _ = within("reading the response", stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    let status_line = text.lines().next().unwrap_or_default().to_owned();
    (written.is_ok(), status_line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_bodies_are_read_away_so_clients_that_send_first_see_the_refusal() {
    const ORG: &str = "org-raw";
    let w = World::with_gateway(ORG, |s| {
        s.measurements_org_rate_per_sec = 0.001;
        s.measurements_org_burst = 1;
    })
    .await;
    let gw = &w.gw;
    let token = gw.token(ORG, "su", 600);
    // Over the body limit (this request takes the org's one token).
    let (written, status) = write_then_read(gw, ORG, &token, 4 << 20).await;
    assert!(written, "the gateway closed while the body was being sent");
    assert_eq!(status, "HTTP/1.1 413 Payload Too Large");
    // Rate limited: refused before the body is read, then read away. A
    // gateway that closed without reading would break the client's write
    // (at 4 MiB the socket buffers cannot absorb the body).
    let (written, status) = write_then_read(gw, ORG, &token, 4 << 20).await;
    assert!(written, "the gateway closed while the body was being sent");
    assert_eq!(status, "HTTP/1.1 429 Too Many Requests");
    w.stop().await;
}
