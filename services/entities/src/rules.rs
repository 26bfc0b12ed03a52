//! Rules a type's bodies must follow beyond what its schema says.
//!
//! Export schedules: `scheduleType` MINUTE/HOUR/DAY with `period` (and an
//! optional `offset`), or a `cronExpression`; no more often than every 15
//! minutes and no less often than every 3 days; an offset is minutes past the
//! hour for hourly schedules and hours past midnight for daily ones.
//! The arithmetic and the limits live in `meterline_shared::schedule`, so the
//! scheduler refuses exactly what is refused here. Scheduled event
//! configurations: `entity` and `field` name a date field the registry
//! knows, and `name` reads `scheduled.<entity>.<event name>`.
//! S3 export destinations: an `iamRoleArn`, or static `accessKeyId` and
//! `secretAccessKey` (both or neither).
//! Notification rules: a `calculation` that parses (the error names its
//! position), required unless `alwaysFireEvent` is true.

use chrono::Utc;
use serde_json::Value;

use meterline_shared::schedule::{scheduled_event_name, Timing};
use meterline_shared::{registry, ServiceError};

/// Checks the rules of `ty` on a body already valid against its schema.
pub fn check(ty: &str, body: &Value) -> Result<(), ServiceError> {
    match ty {
        "exportschedule" => check_schedule(body),
        "meter" => check_meter(body),
        "scheduledeventconfig" => check_scheduled_event(body),
        "exportdestination" => check_destination(body),
        "notificationrule" => check_notification(body),
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
    // One definition of what a schedule may be, shared with the scheduler.
    Timing::from_body(body, Utc::now())?;
    Ok(())
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
    scheduled_event_name(body)?;
    Ok(())
}

/// A rule's calculation is parsed when the rule is saved, so a rule that
/// could never be evaluated is refused with the position of the error.
fn check_notification(body: &Value) -> Result<(), ServiceError> {
    let always = body
        .get("alwaysFireEvent")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let calculation = body
        .get("calculation")
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty());
    match calculation {
        Some(calc) => meterline_calc::Calculation::parse(calc)
            .map(|_| ())
            .map_err(|e| ServiceError::bad_request(format!("calculation: {e}"))),
        None if always => Ok(()),
        None => Err(ServiceError::bad_request(
            "calculation is required unless alwaysFireEvent is true",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn notification_calculations_must_parse() {
        let rule = |v: Value| check("notificationrule", &v);
        rule(json!({"calculation": "new.amount > 5"})).unwrap();
        rule(json!({"alwaysFireEvent": true})).unwrap();
        assert!(rule(json!({})).is_err());
        let e = rule(json!({"calculation": "new.amount >"})).unwrap_err();
        assert!(e.message.contains("at position 13"), "{}", e.message);
        let e = rule(json!({"calculation": "Math.sqrt(new.amount) > 1"})).unwrap_err();
        assert!(e.message.contains("unknown function"), "{}", e.message);
    }

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
            sched(json!({"cronExpression": "0 0 30 2 *"})).is_err(),
            "never runs"
        );
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
            &json!({"entity": "Bill", "field": "dueDate", "name": "scheduled.bill.due"}),
        )
        .unwrap();
        assert!(check(
            "scheduledeventconfig",
            &json!({"entity": "Bill", "field": "dueDate", "name": "due soon"})
        )
        .is_err());
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
