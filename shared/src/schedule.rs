//! Export schedule arithmetic: when a schedule runs, and which schedules are
//! allowed at all. The entities service checks schedules with it on write;
//! the scheduler computes slots with it and refuses what it refuses, so the
//! two can never disagree.
//!
//! A schedule is either simple (`scheduleType` MINUTE/HOUR/DAY with
//! `period` and an optional `offset`) or advanced (`cronExpression`). All
//! times are UTC, whatever the organization's time zone.
//!
//! - Without an offset, slots follow the period from the creation time: a
//!   schedule created at 10:00 on June 1 to run every 2 days runs at 10:00
//!   on June 3, June 5, ...
//! - With an offset (HOUR: minutes past the hour, DAY: hours past midnight),
//!   the first slot is the first such boundary after the creation time, and
//!   the period counts from there: every 3 hours at offset 15, created at
//!   10:20, runs 11:15, 14:15, 17:15, ... MINUTE schedules take no offset.
//! - A cron expression has 5 fields (minute hour day-of-month month
//!   day-of-week), or 6/7 with seconds first (and a year last). Day-of-week
//!   numbers are Unix cron's in every form, as the cron article m3ter's
//!   document points to describes them: 0 and 7 are Sunday, 1 is Monday, 6 is
//!   Saturday; names (`SUN`..`SAT`) work too. When both day-of-month and
//!   day-of-week are restricted, a time must match both.
//! - Every schedule runs at most every 15 minutes and at least every 3 days;
//!   a cron expression is checked over a year of its runs from now, so one
//!   that never runs again (a past year) is refused too.

use std::str::FromStr;

use chrono::{DateTime, Duration, DurationRound, TimeZone, Utc};
use serde_json::Value;

/// The highest frequency a schedule may have.
pub const MIN_INTERVAL: Duration = Duration::minutes(15);
/// The lowest frequency a schedule may have.
pub const MAX_INTERVAL: Duration = Duration::days(3);

/// Why a schedule is not acceptable, in words for its owner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScheduleError(pub String);

fn bad(m: impl Into<String>) -> ScheduleError {
    ScheduleError(m.into())
}

impl From<ScheduleError> for crate::ServiceError {
    fn from(e: ScheduleError) -> Self {
        crate::ServiceError::bad_request(e.0)
    }
}

/// The unit of a simple schedule's period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Minute,
    Hour,
    Day,
}

impl Unit {
    fn step(self, period: u32) -> Duration {
        match self {
            Unit::Minute => Duration::minutes(period.into()),
            Unit::Hour => Duration::hours(period.into()),
            Unit::Day => Duration::days(period.into()),
        }
    }

    fn name(self, n: u32) -> String {
        let u = match self {
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
        };
        if n == 1 {
            u.to_owned()
        } else {
            format!("{u}s")
        }
    }
}

/// When a schedule runs.
#[derive(Debug, Clone)]
pub enum Timing {
    /// Every `period` units, from the creation time or from the first
    /// `offset` boundary after it.
    Every {
        unit: Unit,
        period: u32,
        offset: Option<u32>,
    },
    /// At the times of a cron expression (as written, and as parsed).
    Cron {
        expression: String,
        schedule: Box<cron::Schedule>,
    },
}

impl PartialEq for Timing {
    fn eq(&self, other: &Timing) -> bool {
        match (self, other) {
            (
                Timing::Every {
                    unit,
                    period,
                    offset,
                },
                Timing::Every {
                    unit: u2,
                    period: p2,
                    offset: o2,
                },
            ) => unit == u2 && period == p2 && offset == o2,
            (Timing::Cron { expression: a, .. }, Timing::Cron { expression: b, .. }) => {
                a.split_whitespace().eq(b.split_whitespace())
            }
            _ => false,
        }
    }
}

impl Timing {
    /// Reads and checks the timing of an export schedule body (m3ter's
    /// `scheduleType`, `period`, `offset`, `cronExpression`). `now` is the
    /// reference a cron expression's runs are checked from.
    pub fn from_body(body: &Value, now: DateTime<Utc>) -> Result<Timing, ScheduleError> {
        let cron = body
            .get("cronExpression")
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty());
        let schedule_type = body.get("scheduleType").and_then(Value::as_str);
        let period = body.get("period").and_then(Value::as_i64);
        let offset = body.get("offset").and_then(Value::as_i64);
        if let Some(expr) = cron {
            if schedule_type.is_some() || period.is_some() || offset.is_some() {
                return Err(bad(
                    "give either cronExpression or scheduleType with period (and offset), not both",
                ));
            }
            return Timing::cron(expr, now);
        }
        let (Some(schedule_type), Some(period)) = (schedule_type, period) else {
            return Err(bad(
                "scheduleType and period are required when there is no cronExpression",
            ));
        };
        let unit = match schedule_type {
            "MINUTE" => Unit::Minute,
            "HOUR" => Unit::Hour,
            "DAY" => Unit::Day,
            other => {
                return Err(bad(format!(
                    "scheduleType must be MINUTE, HOUR or DAY, not {other:?}"
                )))
            }
        };
        let Ok(period) = u32::try_from(period) else {
            return Err(bad(format!(
                "period must be a positive number, not {period}"
            )));
        };
        let every = unit.step(period);
        if every < MIN_INTERVAL {
            return Err(bad(format!(
                "the schedule runs every {period} {}: the highest frequency allowed is every 15 minutes",
                unit.name(period)
            )));
        }
        if every > MAX_INTERVAL {
            return Err(bad(format!(
                "the schedule runs every {period} {}: the lowest frequency allowed is every 3 days",
                unit.name(period)
            )));
        }
        let offset = match (unit, offset) {
            (_, None) => None,
            (Unit::Minute, Some(_)) => return Err(bad(
                "offset is only allowed for HOUR (minutes past the hour) and DAY (hours past midnight) schedules",
            )),
            (Unit::Hour, Some(o)) if !(0..60).contains(&o) => {
                return Err(bad("offset of an HOUR schedule is minutes past the hour: 0 to 59"))
            }
            (Unit::Day, Some(o)) if !(0..24).contains(&o) => {
                return Err(bad("offset of a DAY schedule is hours past midnight UTC: 0 to 23"))
            }
            (_, Some(o)) => Some(o as u32),
        };
        Ok(Timing::Every {
            unit,
            period,
            offset,
        })
    }

    /// Parses a cron expression and checks its runs over the year after
    /// `now`: never closer than 15 minutes, never more than 3 days apart,
    /// and at least one.
    pub fn cron(expr: &str, now: DateTime<Utc>) -> Result<Timing, ScheduleError> {
        let full = normalize_cron(expr)?;
        let schedule = cron::Schedule::from_str(&full)
            .map_err(|e| bad(format!("cronExpression {expr:?} is not valid: {e}")))?;
        let start = now.duration_trunc(Duration::minutes(1)).unwrap_or(now);
        let end = start + Duration::days(366);
        let mut prev: Option<DateTime<Utc>> = None;
        for t in schedule.after(&start) {
            if t > end {
                break;
            }
            let gap = t - prev.unwrap_or(start);
            if prev.is_some() && gap < MIN_INTERVAL {
                return Err(bad(format!(
                    "cronExpression {expr:?} runs more often than every 15 minutes"
                )));
            }
            if gap > MAX_INTERVAL {
                return Err(bad(format!(
                    "cronExpression {expr:?} leaves more than 3 days between runs"
                )));
            }
            prev = Some(t);
        }
        match prev {
            None => Err(bad(format!("cronExpression {expr:?} never runs"))),
            Some(last) if end - last > MAX_INTERVAL => Err(bad(format!(
                "cronExpression {expr:?} stops running within a year"
            ))),
            Some(_) => Ok(Timing::Cron {
                expression: expr.trim().to_owned(),
                schedule: Box::new(schedule),
            }),
        }
    }

    /// The first slot strictly after `t` of a schedule created at
    /// `created`; `None` if there is none (a cron expression whose last
    /// year has passed).
    pub fn next_after(&self, created: DateTime<Utc>, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Timing::Every {
                unit,
                period,
                offset,
            } => {
                let step = unit.step(*period);
                let base = match (unit, offset) {
                    (Unit::Hour, Some(m)) => {
                        first_boundary(created, Duration::hours(1), Duration::minutes((*m).into()))
                    }
                    (Unit::Day, Some(h)) => {
                        first_boundary(created, Duration::days(1), Duration::hours((*h).into()))
                    }
                    // Without an offset the creation time is the base, and
                    // the creation time itself is the immediate run.
                    _ => created + step,
                };
                if t < base {
                    return Some(base);
                }
                let k = (t - base).num_milliseconds() / step.num_milliseconds() + 1;
                Some(base + step * (k as i32))
            }
            // No run before the creation (the immediate run stands for it).
            Timing::Cron { schedule, .. } => schedule.after(&t.max(created)).next(),
        }
    }

    /// The last slot at or before `t` (and after `created`), if any.
    pub fn last_at_or_before(
        &self,
        created: DateTime<Utc>,
        t: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        match self {
            Timing::Every { unit, period, .. } => {
                let first = self.next_after(created, created)?;
                if t < first {
                    return None;
                }
                let step = unit.step(*period);
                let k = (t - first).num_milliseconds() / step.num_milliseconds();
                Some(first + step * (k as i32))
            }
            Timing::Cron { .. } => {
                // Runs are at most 3 days apart: look back that far and walk.
                let from = (t - MAX_INTERVAL - Duration::minutes(1)).max(created);
                let mut last = None;
                let mut cursor = from;
                while let Some(next) = self.next_after(created, cursor) {
                    if next > t {
                        break;
                    }
                    last = Some(next);
                    cursor = next;
                }
                last
            }
        }
    }
}

/// The first `period` boundary plus `offset` strictly after `t`.
fn first_boundary(t: DateTime<Utc>, period: Duration, offset: Duration) -> DateTime<Utc> {
    let start = t.duration_trunc(period).unwrap_or(t) + offset;
    if start > t {
        start
    } else {
        start + period
    }
}

/// The six- or seven-field form the `cron` crate reads, with seconds
/// first and Unix day-of-week numbers turned into names.
fn normalize_cron(expr: &str) -> Result<String, ScheduleError> {
    let mut fields: Vec<String> = expr.split_whitespace().map(str::to_owned).collect();
    match fields.len() {
        5 => fields.insert(0, "0".into()),
        6 | 7 => {}
        _ => {
            return Err(bad(format!(
                "cronExpression {expr:?} must have 5 fields (minute hour day-of-month month day-of-week), or 6 or 7 with seconds first"
            )))
        }
    }
    fields[5] = day_of_week(&fields[5])
        .ok_or_else(|| bad(format!("cronExpression {expr:?}: day-of-week {:?} is not valid (0-7 with 0 and 7 Sunday, or SUN-SAT)", fields[5])))?;
    Ok(fields.join(" "))
}

const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// A day-of-week field in Unix numbering as a list of names.
fn day_of_week(field: &str) -> Option<String> {
    if field == "*" || field == "?" {
        return Some(field.to_owned());
    }
    fn day(s: &str) -> Option<u32> {
        if let Ok(n) = s.parse::<u32>() {
            return (n <= 7).then_some(n);
        }
        let upper = s.to_ascii_uppercase();
        DAYS.iter()
            .position(|d| upper.starts_with(d) && upper.len() >= 3)
            .map(|p| p as u32)
    }
    let mut set = [false; 7];
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, s.parse::<u32>().ok().filter(|s| *s > 0)?),
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" {
            (0, 6)
        } else if let Some((a, b)) = range.split_once('-') {
            (day(a)?, day(b)?)
        } else {
            let a = day(range)?;
            (a, if part.contains('/') { 6 } else { a })
        };
        if lo > hi {
            return None;
        }
        let mut d = lo;
        while d <= hi {
            set[(d % 7) as usize] = true;
            d += step;
        }
    }
    let names: Vec<&str> = (0..7).filter(|d| set[*d]).map(|d| DAYS[d]).collect();
    Some(names.join(","))
}

/// The subject suffix of a scheduled event configuration's events: its
/// `name`, which must read `scheduled.<entity>.<event>` with `<entity>` the
/// configured entity type and `<event>` a subject-safe token.
pub fn scheduled_event_name(body: &Value) -> Result<String, ScheduleError> {
    let name = body.get("name").and_then(Value::as_str).unwrap_or_default();
    let entity = body
        .get("entity")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_ascii_lowercase();
    let expected = format!("scheduled.{entity}.");
    let event = name
        .strip_prefix(&expected)
        .filter(|e| crate::subjects::validate_token("name", e).is_ok());
    match event {
        Some(_) => Ok(name.to_owned()),
        None => Err(bad(format!(
            "name {name:?} must read scheduled.{entity}.<event name>, the event name without '.', '*', '>' or spaces"
        ))),
    }
}

/// A UTC instant from its parts; for tests and examples.
pub fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
        .single()
        .expect("a valid UTC time")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        utc(2026, 12, 1, 18, 0)
    }

    fn timing(v: Value) -> Result<Timing, ScheduleError> {
        Timing::from_body(&v, now())
    }

    #[test]
    fn without_offset_runs_follow_the_creation_time() {
        let t = timing(json!({"scheduleType": "DAY", "period": 2})).unwrap();
        let created = utc(2024, 6, 1, 10, 0);
        assert_eq!(t.next_after(created, created), Some(utc(2024, 6, 3, 10, 0)));
        assert_eq!(
            t.next_after(created, utc(2024, 6, 3, 10, 0)),
            Some(utc(2024, 6, 5, 10, 0))
        );
        assert_eq!(
            t.last_at_or_before(created, utc(2024, 6, 6, 0, 0)),
            Some(utc(2024, 6, 5, 10, 0))
        );
        assert_eq!(t.last_at_or_before(created, utc(2024, 6, 2, 0, 0)), None);
        let m = timing(json!({"scheduleType": "MINUTE", "period": 15})).unwrap();
        let c = utc(2024, 6, 1, 10, 7);
        assert_eq!(m.next_after(c, c), Some(utc(2024, 6, 1, 10, 22)));
    }

    #[test]
    fn offsets_are_minutes_past_the_hour_and_hours_past_midnight() {
        let h = timing(json!({"scheduleType": "HOUR", "period": 3, "offset": 15})).unwrap();
        let created = utc(2024, 6, 1, 10, 20);
        let mut slots = vec![];
        let mut t = created;
        for _ in 0..3 {
            t = h.next_after(created, t).unwrap();
            slots.push(t);
        }
        assert_eq!(
            slots,
            [
                utc(2024, 6, 1, 11, 15),
                utc(2024, 6, 1, 14, 15),
                utc(2024, 6, 1, 17, 15)
            ]
        );
        let d = timing(json!({"scheduleType": "DAY", "period": 1, "offset": 3})).unwrap();
        assert_eq!(d.next_after(created, created), Some(utc(2024, 6, 2, 3, 0)));
        let early = utc(2024, 6, 1, 1, 0);
        assert_eq!(d.next_after(early, early), Some(utc(2024, 6, 1, 3, 0)));
    }

    #[test]
    fn frequencies_outside_15_minutes_to_3_days_are_refused() {
        for ok in [
            json!({"scheduleType": "MINUTE", "period": 15}),
            json!({"scheduleType": "HOUR", "period": 72}),
            json!({"scheduleType": "DAY", "period": 3, "offset": 0}),
        ] {
            timing(ok).unwrap();
        }
        for (body, needle) in [
            (
                json!({"scheduleType": "MINUTE", "period": 14}),
                "15 minutes",
            ),
            (json!({"scheduleType": "HOUR", "period": 73}), "3 days"),
            (json!({"scheduleType": "DAY", "period": 4}), "3 days"),
            (json!({"scheduleType": "DAY", "period": -1}), "positive"),
            (
                json!({"scheduleType": "MINUTE", "period": 30, "offset": 5}),
                "offset",
            ),
            (
                json!({"scheduleType": "HOUR", "period": 1, "offset": 60}),
                "0 to 59",
            ),
            (json!({"scheduleType": "WEEK", "period": 1}), "MINUTE"),
            (json!({}), "required"),
        ] {
            let e = timing(body.clone()).unwrap_err();
            assert!(e.0.contains(needle), "{body}: {e}");
        }
    }

    #[test]
    fn cron_expressions_in_five_six_and_seven_fields() {
        let t = timing(json!({"cronExpression": "30 6 * * 1-5"})).unwrap();
        // 2026-12-04 is a Friday: the next run after is Monday 06:30.
        assert_eq!(
            t.next_after(now(), utc(2026, 12, 4, 7, 0)),
            Some(utc(2026, 12, 7, 6, 30))
        );
        let names = timing(json!({"cronExpression": "30 6 * * MON-FRI"})).unwrap();
        assert_eq!(t, t.clone());
        assert_eq!(
            names.next_after(now(), utc(2026, 12, 4, 7, 0)),
            Some(utc(2026, 12, 7, 6, 30))
        );
        let with_seconds = timing(json!({"cronExpression": "0 0 */2 * * *"})).unwrap();
        assert_eq!(
            with_seconds.next_after(now(), utc(2026, 12, 1, 18, 0)),
            Some(utc(2026, 12, 1, 20, 0))
        );
        let with_year = timing(json!({"cronExpression": "0 15 10 * * * 2026-2099"})).unwrap();
        assert_eq!(
            with_year.next_after(now(), now()),
            Some(utc(2026, 12, 2, 10, 15))
        );
        // Sunday is 0 and 7; a wrap through 7 works.
        let quarter = timing(json!({"cronExpression": "*/15 * * * *"})).unwrap();
        let c = utc(2026, 12, 1, 18, 7);
        assert_eq!(
            quarter.next_after(c, utc(2026, 12, 1, 17, 59)),
            Some(utc(2026, 12, 1, 18, 15)),
            "nothing before the creation"
        );
        let wrap = timing(json!({"cronExpression": "0 0 * * 3-7,1"})).unwrap();
        assert_eq!(
            wrap.next_after(now(), utc(2026, 12, 5, 1, 0)),
            Some(utc(2026, 12, 6, 0, 0))
        );
        assert_eq!(
            wrap.next_after(now(), utc(2026, 12, 7, 1, 0)),
            Some(utc(2026, 12, 9, 0, 0)),
            "no Tuesday"
        );
        assert!(
            timing(json!({"cronExpression": "0 12 * * 0"})).is_err(),
            "weekly leaves 7 days between runs"
        );
    }

    #[test]
    fn bad_cron_expressions_are_refused_with_a_reason() {
        for (expr, needle) in [
            ("*/5 * * * *", "more often than every 15 minutes"),
            ("*/10 * * * * *", "more often than every 15 minutes"),
            ("0,5 9 * * *", "more often"),
            ("0 0 1 * *", "more than 3 days"),
            ("0 0 30 2 *", "never runs"),
            ("0 0 0 * * * 2020", "never runs"),
            ("not a cron", "5 fields"),
            ("0 0 * * 9", "day-of-week"),
            ("0 0 * * * * * *", "5 fields"),
        ] {
            let e = timing(json!({ "cronExpression": expr })).unwrap_err();
            assert!(e.0.contains(needle), "{expr}: {e}");
        }
        assert!(timing(json!({"cronExpression": "0 * * * *", "scheduleType": "HOUR"})).is_err());
    }

    #[test]
    fn cron_slots_looked_back_within_three_days() {
        let t = timing(json!({"cronExpression": "0 */6 * * *"})).unwrap();
        let created = utc(2026, 11, 1, 0, 30);
        assert_eq!(
            t.last_at_or_before(created, utc(2026, 12, 1, 17, 59)),
            Some(utc(2026, 12, 1, 12, 0))
        );
        assert_eq!(
            t.last_at_or_before(created, utc(2026, 11, 1, 5, 0)),
            None,
            "nothing between creation and the first run"
        );
    }

    #[test]
    fn scheduled_event_names_carry_their_entity() {
        let ok = json!({"name": "scheduled.bill.dueSoon", "entity": "Bill"});
        assert_eq!(scheduled_event_name(&ok).unwrap(), "scheduled.bill.dueSoon");
        for name in [
            "10 days after",
            "scheduled.account.x",
            "scheduled.bill.a.b",
            "scheduled.bill.",
        ] {
            assert!(
                scheduled_event_name(&json!({"name": name, "entity": "Bill"})).is_err(),
                "{name}"
            );
        }
    }
}
