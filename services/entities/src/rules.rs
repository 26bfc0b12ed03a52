//! Rules a type's bodies must follow beyond what its schema says.
//!
//! Export schedules: `scheduleType` MINUTE/HOUR/DAY with `period` (and an
//! optional `offset`), or a `cronExpression`; no more often than every 15
//! minutes and no less often than every 3 days; an offset is minutes past the
//! hour for hourly schedules and hours past midnight for daily ones.
//! Scheduled event configurations: `entity` and `field` name a date field
//! the registry knows.
//! S3 export destinations: an `iamRoleArn`, or static `accessKeyId` and
//! `secretAccessKey` (both or neither).

use std::str::FromStr;

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::Value;

use meterline_shared::{registry, ServiceError};

pub const MIN_INTERVAL: Duration = Duration::minutes(15);
pub const MAX_INTERVAL: Duration = Duration::days(3);

/// Checks the rules of `ty` on a body already valid against its schema.
pub fn check(ty: &str, body: &Value) -> Result<(), ServiceError> {
    match ty {
        "exportschedule" => check_schedule(body),
        "meter" => check_meter(body),
        "scheduledeventconfig" => check_scheduled_event(body),
        "exportdestination" => check_destination(body),
        _ => Ok(()),
    }
}

fn check_destination(body: &Value) -> Result<(), ServiceError> {
    if body.get("destinationType").and_then(Value::as_str) == Some("GCS") {
        return Ok(());
    }
    let has = |f: &str| {
        body.get(f)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.trim().is_empty())
    };
    match (has("accessKeyId"), has("secretAccessKey")) {
        (true, false) => Err(ServiceError::bad_request(
            "secretAccessKey: required with accessKeyId",
        )),
        (false, true) => Err(ServiceError::bad_request(
            "accessKeyId: required with secretAccessKey",
        )),
        (false, false) if !has("iamRoleArn") => Err(ServiceError::bad_request(
            "iamRoleArn: required unless accessKeyId and secretAccessKey are given",
        )),
        _ => Ok(()),
    }
}

fn check_schedule(body: &Value) -> Result<(), ServiceError> {
    fn bad(m: impl Into<String>) -> ServiceError {
        ServiceError::bad_request(m)
    }
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
        return check_cron(expr).map(|_| ());
    }
    let (Some(schedule_type), Some(period)) = (schedule_type, period) else {
        return Err(bad(
            "scheduleType and period are required when there is no cronExpression",
        ));
    };
    let every = match schedule_type {
        "MINUTE" => Duration::minutes(period),
        "HOUR" => Duration::hours(period),
        "DAY" => Duration::days(period),
        other => {
            return Err(bad(format!(
                "scheduleType must be MINUTE, HOUR or DAY, not {other:?}"
            )))
        }
    };
    if every < MIN_INTERVAL {
        return Err(bad(format!(
            "the schedule runs every {period} {}: the highest frequency allowed is every 15 minutes",
            unit(schedule_type, period)
        )));
    }
    if every > MAX_INTERVAL {
        return Err(bad(format!(
            "the schedule runs every {period} {}: the lowest frequency allowed is every 3 days",
            unit(schedule_type, period)
        )));
    }
    if let Some(offset) = offset {
        match schedule_type {
            "MINUTE" => return Err(bad("offset is only allowed for HOUR (minutes past the hour) and DAY (hours past midnight) schedules")),
            "HOUR" if !(0..60).contains(&offset) => {
                return Err(bad("offset of an HOUR schedule is minutes past the hour: 0 to 59"));
            }
            "DAY" if !(0..24).contains(&offset) => {
                return Err(bad("offset of a DAY schedule is hours past midnight UTC: 0 to 23"));
            }
            _ => {}
        }
    }
    Ok(())
}

fn unit(schedule_type: &str, n: i64) -> String {
    let u = match schedule_type {
        "MINUTE" => "minute",
        "HOUR" => "hour",
        _ => "day",
    };
    if n == 1 {
        u.to_owned()
    } else {
        format!("{u}s")
    }
}

/// Parses a cron expression (standard five fields, or six/seven with
/// seconds and year) and checks its frequency over a year of firings.
pub fn check_cron(expr: &str) -> Result<cron::Schedule, ServiceError> {
    let fields = expr.split_whitespace().count();
    let full = match fields {
        5 => format!("0 {expr}"),
        6 | 7 => expr.to_owned(),
        _ => {
            return Err(ServiceError::bad_request(format!(
                "cronExpression {expr:?} must have 5 fields (minute hour day-of-month month day-of-week)"
            )))
        }
    };
    let schedule = cron::Schedule::from_str(&full).map_err(|e| {
        ServiceError::bad_request(format!("cronExpression {expr:?} is not valid: {e}"))
    })?;
    // A fixed reference makes the check repeatable; a year covers every
    // month-day combination a cron can express.
    let start: DateTime<Utc> = Utc
        .with_ymd_and_hms(2025, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or_else(Utc::now);
    let end = start + Duration::days(366);
    let mut prev: Option<DateTime<Utc>> = None;
    let mut count = 0;
    for t in schedule.after(&start) {
        if t > end {
            break;
        }
        if let Some(p) = prev {
            let gap = t - p;
            if gap < MIN_INTERVAL {
                return Err(ServiceError::bad_request(format!(
                    "cronExpression {expr:?} runs more often than every 15 minutes"
                )));
            }
            if gap > MAX_INTERVAL {
                return Err(ServiceError::bad_request(format!(
                    "cronExpression {expr:?} leaves more than 3 days between runs"
                )));
            }
        } else if t - start > MAX_INTERVAL {
            return Err(ServiceError::bad_request(format!(
                "cronExpression {expr:?} leaves more than 3 days between runs"
            )));
        }
        prev = Some(t);
        count += 1;
        if count > 40_000 {
            break;
        }
    }
    if prev.is_none() {
        return Err(ServiceError::bad_request(format!(
            "cronExpression {expr:?} never runs"
        )));
    }
    Ok(schedule)
}

/// A meter's code names its usage subject (`usage.<org>.<code>`), so it
/// must be a subject-safe token: m3ter's code rules allow a `.`, Meterline's
/// do not.
fn check_meter(body: &Value) -> Result<(), ServiceError> {
    match body.get("code").and_then(Value::as_str) {
        Some(code) => meterline_shared::subjects::validate_token("code", code),
        None => Ok(()),
    }
}

fn check_scheduled_event(body: &Value) -> Result<(), ServiceError> {
    let entity = body
        .get("entity")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let field = body
        .get("field")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Some(t) = registry::by_display_name(entity).filter(|t| !t.date_fields.is_empty()) else {
        let known: Vec<&str> = registry::REGISTRY
            .iter()
            .filter(|t| !t.date_fields.is_empty())
            .map(|t| t.name)
            .collect();
        return Err(ServiceError::bad_request(format!(
            "entity {entity:?} has no date fields scheduled events can use; one of: {}",
            known.join(", ")
        )));
    };
    if !t.date_fields.contains(&field) {
        return Err(ServiceError::bad_request(format!(
            "field {field:?} is not a date field of {}; one of: {}",
            t.name,
            t.date_fields.join(", ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sched(v: Value) -> Result<(), ServiceError> {
        check("exportschedule", &v)
    }

    #[test]
    fn simple_schedules_between_15_minutes_and_3_days() {
        sched(json!({"scheduleType": "MINUTE", "period": 15})).unwrap();
        sched(json!({"scheduleType": "HOUR", "period": 1, "offset": 30})).unwrap();
        sched(json!({"scheduleType": "DAY", "period": 3, "offset": 2})).unwrap();
        sched(json!({"scheduleType": "HOUR", "period": 72})).unwrap();
        assert!(sched(json!({"scheduleType": "MINUTE", "period": 5})).is_err());
        assert!(sched(json!({"scheduleType": "DAY", "period": 4})).is_err());
        assert!(sched(json!({"scheduleType": "HOUR", "period": 73})).is_err());
        assert!(sched(json!({"scheduleType": "HOUR", "period": 1, "offset": 60})).is_err());
        assert!(sched(json!({"scheduleType": "DAY", "period": 1, "offset": 24})).is_err());
        assert!(sched(json!({"scheduleType": "MINUTE", "period": 30, "offset": 5})).is_err());
        assert!(sched(json!({})).is_err());
    }

    #[test]
    fn cron_schedules_are_parsed_and_bounded() {
        sched(json!({"cronExpression": "0 * * * *"})).unwrap();
        sched(json!({"cronExpression": "*/15 * * * *"})).unwrap();
        sched(json!({"cronExpression": "0 0 */2 * * *"})).unwrap();
        sched(json!({"cronExpression": "30 6 * * MON-FRI"})).unwrap();
        assert!(sched(json!({"cronExpression": "*/5 * * * *"})).is_err());
        assert!(
            sched(json!({"cronExpression": "0 0 1 * *"})).is_err(),
            "monthly is rarer than every 3 days"
        );
        assert!(sched(json!({"cronExpression": "not a cron"})).is_err());
        assert!(
            sched(json!({"cronExpression": "0 * * * *", "period": 1, "scheduleType": "HOUR"}))
                .is_err()
        );
    }

    #[test]
    fn meter_codes_are_subject_safe() {
        check("meter", &json!({"code": "api_calls"})).unwrap();
        for bad in ["api.calls", "api calls", "api*", "a>"] {
            assert!(check("meter", &json!({ "code": bad })).is_err(), "{bad}");
        }
    }

    #[test]
    fn scheduled_events_name_a_known_date_field() {
        check(
            "scheduledeventconfig",
            &json!({"entity": "Bill", "field": "dueDate"}),
        )
        .unwrap();
        assert!(check(
            "scheduledeventconfig",
            &json!({"entity": "Bill", "field": "colour"})
        )
        .is_err());
        assert!(check(
            "scheduledeventconfig",
            &json!({"entity": "Spaceship", "field": "dueDate"})
        )
        .is_err());
    }
}
