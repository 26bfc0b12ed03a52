//! Request rate limits: one token bucket per key (an organization, a service
//! user), kept in memory.
//!
//! A bucket holds up to `burst` tokens and refills at `rate` tokens per
//! second; a request takes one token or is refused with the time until the
//! next token arrives. The state lives in this process only, so the limits
//! are per gateway replica: with `n` replicas behind one address a client
//! that is spread over all of them gets up to `n` times the configured rate.
//!
//! Time is passed in ([`KeyedLimiter::check_at`]), so tests drive the clock
//! and never sleep.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use meterline_shared::ErrorCode;
use tracing::debug;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::{body, AppState, Settings};

/// Below this many keys, buckets are never swept.
const MIN_SWEEP_KEYS: usize = 1024;

/// A refused request: when a token will be available again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Denied {
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Buckets {
    map: HashMap<String, Bucket>,
    /// Sweep idle buckets when the map grows past this many keys.
    sweep_at: usize,
}

/// Token buckets by key, all with the same rate and burst.
pub struct KeyedLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<Buckets>,
}

impl std::fmt::Debug for KeyedLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedLimiter")
            .field("rate", &self.rate)
            .field("burst", &self.burst)
            .finish_non_exhaustive()
    }
}

impl KeyedLimiter {
    /// A limiter of `rate` requests per second per key, allowing bursts of
    /// up to `burst` requests after a quiet period (a burst of 0 means the
    /// rate, rounded up). `None` when `rate` is 0 (limit disabled), negative
    /// or not a finite number.
    pub fn new(rate: f64, burst: u32) -> Option<KeyedLimiter> {
        if !(rate.is_finite() && rate > 0.0) {
            return None;
        }
        let burst = if burst == 0 {
            rate.ceil().max(1.0)
        } else {
            f64::from(burst)
        };
        Some(KeyedLimiter {
            rate,
            burst,
            buckets: Mutex::new(Buckets {
                map: HashMap::new(),
                sweep_at: MIN_SWEEP_KEYS,
            }),
        })
    }

    /// Requests per second per key.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Takes a token for `key` now.
    pub fn check(&self, key: &str) -> Result<(), Denied> {
        self.check_at(key, Instant::now())
    }

    /// Takes a token for `key` at time `now`, or says how long until one is
    /// available. A key seen for the first time starts with a full bucket.
    pub fn check_at(&self, key: &str, now: Instant) -> Result<(), Denied> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.map.len() >= buckets.sweep_at {
            self.sweep(&mut buckets, now);
        }
        let bucket = match buckets.map.get_mut(key) {
            Some(b) => b,
            None => buckets.map.entry(key.to_owned()).or_insert(Bucket {
                tokens: self.burst,
                at: now,
            }),
        };
        self.refill(bucket, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Denied {
                retry_after: Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate),
            })
        }
    }

    /// Gives back the token a request took (when a later check refused the
    /// request, so it was not served).
    pub fn refund(&self, key: &str) {
        self.refund_at(key, Instant::now())
    }

    /// As [`KeyedLimiter::refund`], at time `now`.
    pub fn refund_at(&self, key: &str, now: Instant) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bucket) = buckets.map.get_mut(key) {
            self.refill(bucket, now);
            bucket.tokens = (bucket.tokens + 1.0).min(self.burst);
        }
    }

    /// How many keys have a bucket (tests and metrics).
    pub fn tracked_keys(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .len()
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        // Callers read the clock before taking the lock, so `now` may be a
        // little older than the bucket's last update: no refill then, and
        // the bucket keeps the later time.
        if now > bucket.at {
            let elapsed = now.duration_since(bucket.at).as_secs_f64();
            bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
            bucket.at = now;
        }
    }

    /// Drops the buckets that have refilled completely: a full bucket is the
    /// same as no bucket, so this changes no decision. Runs when the map
    /// doubles, so its cost per request stays constant.
    fn sweep(&self, buckets: &mut Buckets, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        buckets.map.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens + elapsed * rate < burst
        });
        buckets.sweep_at = (buckets.map.len() * 2).max(MIN_SWEEP_KEYS);
    }
}

/// `40 ms`, `2 s`: a wait as a person reads it, rounded up.
pub fn human_wait(wait: Duration) -> String {
    let ms = wait.as_micros().div_ceil(1000).max(1);
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{} s", ms.div_ceil(1000))
    }
}

/// The `Retry-After` value: whole seconds, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_millis().div_ceil(1000) as u64).max(1)
}

// The gateway's limits.

/// The rate limits the gateway applies, built from its [`Settings`].
#[derive(Debug, Default)]
pub struct RateLimits {
    measurements_org: Option<KeyedLimiter>,
    measurements_source: Option<KeyedLimiter>,
    config_org: Option<KeyedLimiter>,
}

impl RateLimits {
    pub fn from_settings(s: &Settings) -> RateLimits {
        RateLimits {
            measurements_org: KeyedLimiter::new(
                s.measurements_org_rate_per_sec,
                s.measurements_org_burst,
            ),
            measurements_source: KeyedLimiter::new(
                s.measurements_source_rate_per_sec,
                s.measurements_source_burst,
            ),
            config_org: KeyedLimiter::new(s.config_org_rate_per_sec, s.config_org_burst),
        }
    }

    /// Admits one measurements request from `caller` at `now`. The service
    /// user's own limit is checked first, so a source over its limit does
    /// not use up its organization's tokens; a request the organization's
    /// limit refuses gives the source its token back.
    pub fn measurements(&self, caller: &Caller, now: Instant) -> Result<(), ApiError> {
        let source = caller.source_key();
        if let Some(l) = &self.measurements_source {
            l.check_at(&source, now).map_err(|d| {
                refused(
                    "measurements_source",
                    l,
                    &format!("service user {}", caller.service_user_id),
                    d,
                )
            })?;
        }
        if let Some(l) = &self.measurements_org {
            if let Err(d) = l.check_at(&caller.org_id, now) {
                if let Some(s) = &self.measurements_source {
                    s.refund_at(&source, now);
                }
                return Err(refused(
                    "measurements_org",
                    l,
                    &format!("organization {}", caller.org_id),
                    d,
                ));
            }
        }
        Ok(())
    }

    /// Admits one request to any other organization route.
    pub fn config(&self, caller: &Caller, now: Instant) -> Result<(), ApiError> {
        match &self.config_org {
            Some(l) => l.check_at(&caller.org_id, now).map_err(|d| {
                refused(
                    "config_org",
                    l,
                    &format!("organization {}", caller.org_id),
                    d,
                )
            }),
            None => Ok(()),
        }
    }
}

fn refused(limit: &'static str, l: &KeyedLimiter, whose: &str, d: Denied) -> ApiError {
    metrics::counter!("meterline_gateway_rate_limited_total", "limit" => limit).increment(1);
    debug!(limit, whose, retry_after = ?d.retry_after, "rate limited");
    ApiError::new(
        ErrorCode::TooManyRequests,
        format!(
            "rate limit of {} requests per second for {whose} exceeded; retry after {}",
            l.rate(),
            human_wait(d.retry_after)
        ),
    )
    .with_retry_after(d.retry_after)
}

/// Middleware of `POST /organizations/{orgId}/measurements`, inside the
/// bearer check (it needs the [`Caller`]).
pub async fn limit_measurements(State(app): State<AppState>, req: Request, next: Next) -> Response {
    admit(req, next, |caller, now| {
        app.inner.limits.measurements(caller, now)
    })
    .await
}

/// Middleware of every other organization route, inside the bearer check.
pub async fn limit_config_routes(
    State(app): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    admit(req, next, |caller, now| {
        app.inner.limits.config(caller, now)
    })
    .await
}

async fn admit(
    req: Request,
    next: Next,
    check: impl FnOnce(&Caller, Instant) -> Result<(), ApiError>,
) -> Response {
    let verdict = match req.extensions().get::<Caller>() {
        Some(caller) => check(caller, Instant::now()),
        None => Ok(()),
    };
    match verdict {
        Ok(()) => next.run(req).await,
        Err(e) => {
            // The client may still be sending its body: read it away so
            // it sees the 429 rather than a reset connection.
            let length = body::content_length(req.headers());
            body::discard(req.into_body(), length).await;
            e.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_full_bucket_allows_the_burst_then_refuses_until_a_token_refills() {
        let l = KeyedLimiter::new(10.0, 3).unwrap();
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(l.check_at("org", t0), Ok(()), "request {i} of the burst");
        }
        let denied = l.check_at("org", t0).unwrap_err();
        assert!(
            denied.retry_after.abs_diff(ms(100)) < Duration::from_micros(1),
            "one token per 100 ms: {denied:?}"
        );
        // Refused requests take nothing: 60 ms later the wait is 40 ms.
        let denied = l.check_at("org", t0 + ms(60)).unwrap_err();
        assert!(
            denied.retry_after.abs_diff(ms(40)) < Duration::from_micros(1),
            "{denied:?}"
        );
        assert_eq!(l.check_at("org", t0 + ms(100)), Ok(()));
        assert!(l.check_at("org", t0 + ms(100)).is_err());
    }

    #[test]
    fn the_sustained_rate_is_the_configured_one() {
        let l = KeyedLimiter::new(50.0, 100).unwrap();
        let t0 = Instant::now();
        // Ten seconds of one request per millisecond: the burst plus 50 per
        // second get through.
        let allowed = (0..10_000)
            .filter(|i| l.check_at("org", t0 + ms(*i)).is_ok())
            .count();
        assert!((599..=601).contains(&allowed), "{allowed} allowed");
    }

    #[test]
    fn an_idle_bucket_refills_to_the_burst_and_no_further() {
        let l = KeyedLimiter::new(2.0, 4).unwrap();
        let t0 = Instant::now();
        for _ in 0..4 {
            l.check_at("k", t0).unwrap();
        }
        assert!(l.check_at("k", t0).is_err());
        let later = t0 + Duration::from_secs(3600);
        let allowed = (0..10).filter(|_| l.check_at("k", later).is_ok()).count();
        assert_eq!(allowed, 4);
    }

    #[test]
    fn keys_do_not_share_tokens() {
        let l = KeyedLimiter::new(1.0, 2).unwrap();
        let t0 = Instant::now();
        l.check_at("a", t0).unwrap();
        l.check_at("a", t0).unwrap();
        assert!(l.check_at("a", t0).is_err());
        assert_eq!(l.check_at("b", t0), Ok(()));
        assert_eq!(l.check_at("b", t0), Ok(()));
        assert!(l.check_at("b", t0).is_err());
    }

    #[test]
    fn a_refund_gives_back_one_token_up_to_the_burst() {
        let l = KeyedLimiter::new(1.0, 1).unwrap();
        let t0 = Instant::now();
        l.check_at("k", t0).unwrap();
        assert!(l.check_at("k", t0).is_err());
        l.refund_at("k", t0);
        assert_eq!(l.check_at("k", t0), Ok(()));
        // Refunding a full bucket does not raise it above the burst.
        let later = t0 + Duration::from_secs(10);
        l.refund_at("k", later);
        l.refund_at("k", later);
        assert_eq!(l.check_at("k", later), Ok(()));
        assert!(l.check_at("k", later).is_err());
        // Refunding an unknown key creates nothing.
        l.refund_at("nobody", later);
        assert_eq!(l.tracked_keys(), 1);
    }

    #[test]
    fn a_clock_reading_older_than_the_bucket_neither_refills_nor_panics() {
        let l = KeyedLimiter::new(1.0, 1).unwrap();
        let t0 = Instant::now() + Duration::from_secs(5);
        l.check_at("k", t0).unwrap();
        let denied = l.check_at("k", t0 - Duration::from_secs(5)).unwrap_err();
        assert_eq!(denied.retry_after, Duration::from_secs(1));
    }

    #[test]
    fn rates_below_one_per_second_and_default_bursts() {
        let l = KeyedLimiter::new(0.5, 0).unwrap();
        let t0 = Instant::now();
        l.check_at("k", t0).unwrap();
        let denied = l.check_at("k", t0).unwrap_err();
        assert_eq!(denied.retry_after, Duration::from_secs(2));
        let l = KeyedLimiter::new(2.5, 0).unwrap();
        let allowed = (0..10).filter(|_| l.check_at("k", t0).is_ok()).count();
        assert_eq!(allowed, 3, "a burst of 0 means the rate, rounded up");
    }

    #[test]
    fn zero_negative_and_non_finite_rates_disable_the_limit() {
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(KeyedLimiter::new(rate, 10).is_none(), "{rate}");
        }
    }

    #[test]
    fn full_buckets_are_swept_once_the_map_grows_and_busy_ones_kept() {
        let l = KeyedLimiter::new(1.0, 2).unwrap();
        let t0 = Instant::now();
        l.check_at("busy", t0).unwrap();
        l.check_at("busy", t0).unwrap();
        // One key short of a sweep.
        for i in 0..MIN_SWEEP_KEYS - 1 {
            l.check_at(&format!("k{i}"), t0).unwrap();
        }
        assert_eq!(l.tracked_keys(), MIN_SWEEP_KEYS);
        // 1.5 s later the one-token buckets are full again; "busy" is not.
        let t1 = t0 + ms(1500);
        l.check_at("new", t1).unwrap();
        assert_eq!(l.tracked_keys(), 2, "busy and new remain");
        assert!(l.check_at("busy", t1).is_ok());
        assert!(l.check_at("busy", t1).is_err(), "the sweep kept its state");
    }

    #[test]
    fn waits_are_rounded_up_for_people_and_for_retry_after() {
        assert_eq!(human_wait(Duration::from_micros(39_200)), "40 ms");
        assert_eq!(human_wait(Duration::from_nanos(1)), "1 ms");
        assert_eq!(human_wait(ms(1000)), "1 s");
        assert_eq!(human_wait(ms(1001)), "2 s");
        assert_eq!(retry_after_secs(ms(40)), 1);
        assert_eq!(retry_after_secs(ms(1000)), 1);
        assert_eq!(retry_after_secs(ms(1001)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    fn caller(org: &str, su: &str) -> Caller {
        Caller {
            org_id: org.into(),
            service_user_id: su.into(),
        }
    }

    fn limits(org: (f64, u32), source: (f64, u32), config: (f64, u32)) -> RateLimits {
        RateLimits::from_settings(&Settings {
            measurements_org_rate_per_sec: org.0,
            measurements_org_burst: org.1,
            measurements_source_rate_per_sec: source.0,
            measurements_source_burst: source.1,
            config_org_rate_per_sec: config.0,
            config_org_burst: config.1,
            ..Settings::default()
        })
    }

    #[test]
    fn a_source_over_its_limit_leaves_its_organizations_tokens_to_others() {
        let l = limits((10.0, 4), (5.0, 2), (0.0, 0));
        let t0 = Instant::now();
        let (a, b) = (caller("org1", "su-a"), caller("org1", "su-b"));
        l.measurements(&a, t0).unwrap();
        l.measurements(&a, t0).unwrap();
        for _ in 0..10 {
            let e = l.measurements(&a, t0).unwrap_err();
            assert_eq!(e.status(), 429);
            assert_eq!(
                e.error.message,
                "rate limit of 5 requests per second for service user su-a exceeded; retry after 200 ms"
            );
            assert_eq!(e.retry_after, Some(ms(200)));
        }
        // The org has 2 of its 4 tokens left, and su-b gets them; then the
        // org is out, for su-c too.
        l.measurements(&b, t0).unwrap();
        l.measurements(&b, t0).unwrap();
        let e = l.measurements(&caller("org1", "su-c"), t0).unwrap_err();
        assert_eq!(
            e.error.message,
            "rate limit of 10 requests per second for organization org1 exceeded; retry after 100 ms"
        );
        // Another org is not touched by org1's traffic.
        l.measurements(&caller("org2", "su-d"), t0).unwrap();
    }

    #[test]
    fn a_request_the_organization_refuses_costs_its_source_nothing() {
        let l = limits((1.0, 1), (1.0, 2), (0.0, 0));
        let t0 = Instant::now();
        let (a, b) = (caller("org1", "su-a"), caller("org1", "su-b"));
        l.measurements(&b, t0).unwrap();
        // The org is empty: su-a is refused by the org limit three times...
        for _ in 0..3 {
            let e = l.measurements(&a, t0).unwrap_err();
            assert!(e.error.message.contains("organization org1"), "{e:?}");
        }
        // ...and still has both of its own tokens once the org refills.
        let t1 = t0 + Duration::from_secs(2);
        l.measurements(&a, t1).unwrap();
        let e = l.measurements(&a, t1).unwrap_err();
        assert!(e.error.message.contains("organization org1"), "{e:?}");
    }

    #[test]
    fn the_config_limit_is_separate_from_the_measurements_limits() {
        let l = limits((1.0, 1), (1.0, 1), (2.0, 2));
        let t0 = Instant::now();
        let a = caller("org1", "su-a");
        l.measurements(&a, t0).unwrap();
        assert!(l.measurements(&a, t0).is_err());
        l.config(&a, t0).unwrap();
        l.config(&a, t0).unwrap();
        let e = l.config(&a, t0).unwrap_err();
        assert_eq!(e.retry_after, Some(ms(500)));
        // Disabled limits admit everything.
        let open = limits((0.0, 0), (0.0, 0), (0.0, 0));
        for _ in 0..1000 {
            open.measurements(&a, t0).unwrap();
            open.config(&a, t0).unwrap();
        }
    }
}
