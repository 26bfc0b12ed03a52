//! Time, injected: the scheduler asks a [`Clock`] what time it is and waits
//! on it for the next slot, so tests can run days of schedule in
//! milliseconds with a [`ManualClock`] they move forward themselves.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

/// A source of the current time that can also be waited on.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;

    /// Resolves at or after `t` (it may also resolve earlier; callers look
    /// at [`Clock::now`] again).
    fn sleep_until(&self, t: DateTime<Utc>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

/// The longest the system clock sleeps at once, so a wall-clock step (NTP)
/// is noticed within this long.
const MAX_NAP: Duration = Duration::from_secs(30);

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, t: DateTime<Utc>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let wait = (t - Utc::now()).to_std().unwrap_or_default().min(MAX_NAP);
        Box::pin(tokio::time::sleep(wait))
    }
}

/// A clock that moves only when told to. Cloning shares the time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<watch::Sender<DateTime<Utc>>>,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> ManualClock {
        ManualClock {
            now: Arc::new(watch::Sender::new(start)),
        }
    }

    /// Moves the clock to `t` (never backwards).
    pub fn set(&self, t: DateTime<Utc>) {
        self.now.send_if_modified(|now| {
            let later = t > *now;
            if later {
                *now = t;
            }
            later
        });
    }

    pub fn advance(&self, by: chrono::Duration) {
        self.set(self.now() + by);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.borrow()
    }

    fn sleep_until(&self, t: DateTime<Utc>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let mut rx = self.now.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|now| *now >= t).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_wakes_sleepers_when_moved_past_their_time() {
        let start = meterline_shared::schedule::utc(2026, 6, 1, 10, 0);
        let clock = ManualClock::new(start);
        let c2 = clock.clone();
        let sleeper = tokio::spawn(async move {
            c2.sleep_until(start + chrono::Duration::hours(1)).await;
            c2.now()
        });
        clock.advance(chrono::Duration::minutes(30));
        assert!(!sleeper.is_finished());
        clock.advance(chrono::Duration::minutes(31));
        let woke = tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("woken in time")
            .unwrap();
        assert_eq!(woke, start + chrono::Duration::minutes(61));
        clock.set(start);
        assert_eq!(clock.now(), woke, "never backwards");
    }
}
