//! The export schedules of every organization as this replica knows them
//! from `ENTITIES`, and which slots are due: pure state, no I/O, so the
//! rules of when a job is requested are tested without a bus or a clock.
//!
//! - A new schedule's first job is immediate: its slot is the creation
//!   time, trigger `IMMEDIATE`.
//! - Then every slot of its timing ([`Timing::next_after`]), trigger
//!   `SCHEDULE`.
//! - A replica that finds itself behind (it started after a downtime, or
//!   was stalled) requests one job for the latest slot it missed, trigger
//!   `CATCH_UP`, never one per missed slot. The writer requests a slot only
//!   if it has no job yet in `export_jobs`, so a restart repeats nothing.
//! - Editing the timing moves the next slots from the time of the edit on;
//!   no slot before the edit is caught up, and the cursor is untouched.
//! - Deleting a schedule stops its slots; so does setting `active` to
//!   `false`, and setting it back to `true` requests an immediate job.
//! - A change counts from the time it was made (`dtCreated`,
//!   `dtLastModified`), not from when a replica reads it: a slot that falls
//!   between the two still runs, and replicas agree on a re-activation's
//!   immediate slot. A replica whose clock is more than a minute away from
//!   that time counts from its own clock instead.
//! - A schedule the scheduler cannot run (bad timing, an organization or
//!   id that cannot be a bucket key, a destination that was deleted) is
//!   refused: it gets no jobs and is reported ([`Schedules::refusals`]).

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use meterline_shared::envelope::EntityEvent;
use meterline_shared::exportjob::Trigger;
use meterline_shared::schedule::Timing;
use meterline_shared::subjects::validate_token;

pub const SCHEDULE_TYPE: &str = "exportschedule";
pub const DESTINATION_TYPE: &str = "exportdestination";

type Key = (String, String);

/// A job to request: the schedule's slot and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fire {
    pub org: String,
    pub schedule: String,
    pub slot: DateTime<Utc>,
    pub trigger: Trigger,
    /// The schedule's `sourceType` (`OPERATIONAL` or `USAGE`), for the record.
    pub source_type: String,
}

/// A schedule (or scheduled event configuration) the scheduler does not
/// run, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Refusal {
    pub org_id: String,
    /// `exportschedule` or `scheduledeventconfig`.
    pub entity_type: &'static str,
    pub id: String,
    pub reason: String,
}

#[derive(Debug)]
struct Schedule {
    created: DateTime<Utc>,
    source_type: String,
    timing: Result<Timing, String>,
    destinations: Vec<String>,
    active: bool,
    /// The immediate slot: creation, or the latest re-activation.
    start: DateTime<Utc>,
    /// Slots at or before this are never caught up (the timing changed).
    effective_from: DateTime<Utc>,
    next: Option<DateTime<Utc>>,
    refusal: Option<String>,
}

/// Characters NATS KV allows in a key token (a job key is `<org>.<job>`).
pub fn is_key_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=' | b'/'))
}

fn time_of(state: &Value, field: &str) -> Option<DateTime<Utc>> {
    state
        .get(field)
        .and_then(Value::as_str)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// How far apart the time of a change and the time a replica reads it
/// may be for the change to count from the time it was made.
const READ_LAG: chrono::Duration = chrono::Duration::minutes(1);

/// The time the next slots of a change are counted from: the time it was
/// made, `at`, if this replica reads it within [`READ_LAG`] (so a slot that
/// falls between the two still runs), else the time it is read (this
/// replica's clock disagrees with the writer's: its own clock decides).
fn read_late(at: DateTime<Utc>, now: DateTime<Utc>) -> DateTime<Utc> {
    if (now - at).abs() <= READ_LAG {
        at
    } else {
        now
    }
}

fn is_active(state: Option<&Value>) -> bool {
    state
        .and_then(|s| s.get("active"))
        .and_then(Value::as_bool)
        .unwrap_or(true)
}

/// Timings per cron expression: a cron is checked over a year of its runs,
/// which is worth doing once per expression, not once per schedule.
#[derive(Default)]
struct Timings {
    cron: HashMap<String, Result<Timing, String>>,
}

impl Timings {
    fn of(&mut self, body: &Value, now: DateTime<Utc>) -> Result<Timing, String> {
        match body.get("cronExpression").and_then(Value::as_str) {
            Some(expr) if !expr.trim().is_empty() && body.get("scheduleType").is_none() => self
                .cron
                .entry(expr.trim().to_owned())
                .or_insert_with(|| Timing::from_body(body, now).map_err(|e| e.0))
                .clone(),
            _ => Timing::from_body(body, now).map_err(|e| e.0),
        }
    }
}

/// Every schedule this replica knows, and the queue of their next slots.
#[derive(Default)]
pub struct Schedules {
    schedules: HashMap<Key, Schedule>,
    destinations: HashSet<Key>,
    queue: BTreeSet<(DateTime<Utc>, Key)>,
    timings: Timings,
    /// Set by [`Schedules::start`]: changes are then live, not a replay.
    live: bool,
}

impl Schedules {
    pub fn len(&self) -> usize {
        self.schedules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.schedules.is_empty()
    }

    /// The earliest next slot of any schedule.
    pub fn next_wake(&self) -> Option<DateTime<Utc>> {
        self.queue.first().map(|(t, _)| *t)
    }

    /// Schedules that get no jobs, and why.
    pub fn refusals(&self) -> Vec<Refusal> {
        let mut out: Vec<Refusal> = self
            .schedules
            .iter()
            .filter_map(|((org, id), s)| {
                s.refusal.as_ref().map(|r| Refusal {
                    org_id: org.clone(),
                    entity_type: SCHEDULE_TYPE,
                    id: id.clone(),
                    reason: r.clone(),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.org_id, &a.id).cmp(&(&b.org_id, &b.id)));
        out
    }

    /// Applies one `ENTITIES` message about a schedule or a destination;
    /// returns the jobs it makes due (only once live).
    pub fn apply(&mut self, ev: &EntityEvent, now: DateTime<Utc>) -> Vec<Fire> {
        let key = (ev.org_id.clone(), ev.entity_id.clone());
        match ev.entity_type.as_str() {
            DESTINATION_TYPE => {
                if ev.is_tombstone() {
                    self.destinations.remove(&key);
                } else {
                    self.destinations.insert(key);
                }
                if self.live {
                    self.recheck_org(&ev.org_id, now);
                }
                Vec::new()
            }
            SCHEDULE_TYPE => self.apply_schedule(key, ev, now),
            _ => Vec::new(),
        }
    }

    fn apply_schedule(&mut self, key: Key, ev: &EntityEvent, now: DateTime<Utc>) -> Vec<Fire> {
        self.unqueue(&key);
        let Some(state) = ev.new.as_ref().filter(|_| !ev.is_tombstone()) else {
            self.schedules.remove(&key);
            return Vec::new();
        };
        let modified = time_of(state, "dtLastModified").unwrap_or(ev.event_time);
        let created = time_of(state, "dtCreated").unwrap_or(modified);
        let timing = self.timings.of(state, now);
        let active = is_active(Some(state));
        let old_timing = ev.old.as_ref().map(|o| self.timings.of(o, now));
        let previous = self.schedules.remove(&key);
        let timing_changed = match (&previous, &old_timing) {
            (Some(p), _) => p.timing != timing || p.refusal.is_some(),
            (None, Some(o)) => *o != timing,
            (None, None) => false,
        };
        let was_active = match &previous {
            Some(p) => p.active,
            None => ev.old.is_none() || is_active(ev.old.as_ref()),
        };
        let reactivated = active && !was_active;
        let mut s = Schedule {
            created,
            source_type: state
                .get("sourceType")
                .and_then(Value::as_str)
                .unwrap_or("OPERATIONAL")
                .to_owned(),
            timing,
            destinations: state
                .get("destinationIds")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            active,
            start: previous.as_ref().map_or(created, |p| p.start),
            effective_from: previous.as_ref().map_or(created, |p| p.effective_from),
            next: previous.as_ref().and_then(|p| p.next),
            refusal: None,
        };
        // Live or replayed, a change takes effect at the time it was made
        // (`dtLastModified`), not when this replica reads it: replicas that
        // read it at different times, or replay it after a restart, agree on
        // the immediate job's slot and so on its id.
        if reactivated {
            s.start = modified;
        }
        if timing_changed {
            s.effective_from = modified;
        }
        s.refusal = self.check(&key, &s);
        let mut fires = Vec::new();
        if self.live && s.refusal.is_none() && s.active {
            let is_new = previous.is_none() && ev.old.is_none();
            if is_new || reactivated {
                fires.push(Fire {
                    org: key.0.clone(),
                    schedule: key.1.clone(),
                    slot: s.start,
                    trigger: Trigger::Immediate,
                    source_type: s.source_type.clone(),
                });
            }
            let from = if is_new {
                Some(read_late(created, now))
            } else if reactivated || timing_changed {
                Some(read_late(modified, now))
            } else if s.next.is_none() {
                Some(now)
            } else {
                None
            };
            if let Some(from) = from {
                s.next = s
                    .timing
                    .as_ref()
                    .ok()
                    .and_then(|t| t.next_after(created, from));
            }
        }
        self.report(&key, previous.as_ref().and_then(|p| p.refusal.as_ref()), &s);
        if self.live && s.refusal.is_none() && s.active {
            if let Some(t) = s.next {
                self.queue.insert((t, key.clone()));
            }
        }
        self.schedules.insert(key, s);
        fires
    }

    fn report(&self, key: &Key, before: Option<&String>, s: &Schedule) {
        if let Some(reason) = &s.refusal {
            if before != Some(reason) {
                tracing::warn!(org = %key.0, schedule = %key.1, %reason, "schedule refused: it gets no jobs");
            }
        }
    }

    /// Why `s` cannot run, if it cannot.
    fn check(&self, key: &Key, s: &Schedule) -> Option<String> {
        let (org, id) = key;
        if validate_token("orgId", org).is_err() || !is_key_token(org) {
            return Some(format!(
                "organization id {org:?} cannot name export job keys (letters, digits, '-', '_', '=' and '/' only)"
            ));
        }
        if validate_token("id", id).is_err() || !is_key_token(id) {
            return Some(format!("schedule id {id:?} cannot name export job keys"));
        }
        if let Err(e) = &s.timing {
            return Some(e.clone());
        }
        if let Some(gone) = s
            .destinations
            .iter()
            .find(|d| !self.destinations.contains(&(org.clone(), (*d).clone())))
        {
            return Some(format!(
                "destination {gone:?} does not exist (it was deleted): give the schedule an existing destination"
            ));
        }
        None
    }

    /// Destinations of `org` changed: schedules may be refused or run again.
    fn recheck_org(&mut self, org: &str, now: DateTime<Utc>) {
        let keys: Vec<Key> = self
            .schedules
            .keys()
            .filter(|(o, _)| o == org)
            .cloned()
            .collect();
        for key in keys {
            let Some(s) = self.schedules.get(&key) else {
                continue;
            };
            let refusal = self.check(&key, s);
            if refusal == s.refusal {
                continue;
            }
            let before = s.refusal.clone();
            self.unqueue(&key);
            let Some(s) = self.schedules.get_mut(&key) else {
                continue;
            };
            s.refusal = refusal;
            if s.refusal.is_none() && s.active {
                s.effective_from = now;
                s.next = s
                    .timing
                    .as_ref()
                    .ok()
                    .and_then(|t| t.next_after(s.created, now));
                if let Some(t) = s.next {
                    self.queue.insert((t, key.clone()));
                }
            }
            if let Some(s) = self.schedules.get(&key) {
                self.report(&key, before.as_ref(), s);
            }
        }
    }

    fn unqueue(&mut self, key: &Key) {
        if let Some(t) = self.schedules.get(key).and_then(|s| s.next) {
            self.queue.remove(&(t, key.clone()));
        }
    }

    /// Ends the replay of `ENTITIES`: from now on changes are live. Returns
    /// the job each schedule is owed: its immediate job if none of its
    /// slots has come since, else one catch-up job for its latest slot.
    pub fn start(&mut self, now: DateTime<Utc>) -> Vec<Fire> {
        self.live = true;
        let mut fires = Vec::new();
        let keys: Vec<Key> = self.schedules.keys().cloned().collect();
        for key in keys {
            let Some(s) = self.schedules.get(&key) else {
                continue;
            };
            let refusal = self.check(&key, s);
            let Some(s) = self.schedules.get_mut(&key) else {
                continue;
            };
            s.refusal = refusal;
            if s.refusal.is_some() {
                tracing::warn!(org = %key.0, schedule = %key.1, reason = s.refusal.as_deref().unwrap_or_default(), "schedule refused: it gets no jobs");
                continue;
            }
            if !s.active {
                continue;
            }
            let Ok(timing) = &s.timing else { continue };
            let last = timing.last_at_or_before(s.created, now);
            match last {
                Some(l) if l > s.start => {
                    if l > s.effective_from {
                        fires.push(Fire {
                            org: key.0.clone(),
                            schedule: key.1.clone(),
                            slot: l,
                            trigger: Trigger::CatchUp,
                            source_type: s.source_type.clone(),
                        });
                    }
                }
                // Also when this replica's clock is behind the creation
                // time: the first run is owed either way.
                _ => fires.push(Fire {
                    org: key.0.clone(),
                    schedule: key.1.clone(),
                    slot: s.start,
                    trigger: Trigger::Immediate,
                    source_type: s.source_type.clone(),
                }),
            }
            s.next = timing.next_after(s.created, now);
            if let Some(t) = s.next {
                self.queue.insert((t, key.clone()));
            }
        }
        fires
    }

    /// The slots due at `now`. A schedule more than one slot behind gets
    /// one catch-up job for its latest slot.
    pub fn due(&mut self, now: DateTime<Utc>) -> Vec<Fire> {
        let mut fires = Vec::new();
        while let Some((t, key)) = self.queue.first().cloned() {
            if t > now {
                break;
            }
            self.queue.pop_first();
            let Some(s) = self.schedules.get_mut(&key) else {
                continue;
            };
            let Ok(timing) = &s.timing else { continue };
            let next = timing.next_after(s.created, t);
            let (slot, trigger) = match next {
                Some(n) if n <= now => (
                    timing.last_at_or_before(s.created, now).unwrap_or(t),
                    Trigger::CatchUp,
                ),
                _ => (t, Trigger::Schedule),
            };
            fires.push(Fire {
                org: key.0.clone(),
                schedule: key.1.clone(),
                slot,
                trigger,
                source_type: s.source_type.clone(),
            });
            s.next = timing.next_after(s.created, slot.max(now));
            match s.next {
                Some(n) => {
                    self.queue.insert((n, key));
                }
                None => {
                    s.refusal = Some("the cron expression runs no more".into());
                    tracing::warn!(org = %key.0, schedule = %key.1, "schedule ended: its cron expression runs no more");
                }
            }
        }
        fires
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;
    use meterline_shared::envelope::Action;
    use meterline_shared::schedule::utc;
    use serde_json::json;

    fn ev(
        ty: &str,
        id: &str,
        action: Action,
        new: Option<Value>,
        old: Option<Value>,
        at: DateTime<Utc>,
    ) -> EntityEvent {
        EntityEvent {
            id: "e".into(),
            event_name: format!("configuration.{ty}.{}", action.as_str()),
            event_time: at,
            org_id: "org1".into(),
            entity_type: ty.into(),
            entity_id: id.into(),
            action,
            actor: "t".into(),
            new,
            old,
        }
    }

    fn sched(extra: Value, created: DateTime<Utc>, modified: DateTime<Utc>) -> Value {
        let mut v = json!({"name": "s", "code": "s", "sourceType": "OPERATIONAL",
            "operationalDataTypes": ["ACCOUNTS"], "dtCreated": created.to_rfc3339(),
            "dtLastModified": modified.to_rfc3339()});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    }

    fn slots(f: &[Fire]) -> Vec<(DateTime<Utc>, Trigger)> {
        f.iter().map(|f| (f.slot, f.trigger)).collect()
    }

    #[test]
    fn created_runs_at_once_then_every_period_from_creation() {
        let mut s = Schedules::default();
        let c = utc(2024, 6, 1, 10, 0);
        assert!(s.start(c).is_empty());
        let body = sched(json!({"scheduleType": "DAY", "period": 2}), c, c);
        let f = s.apply(
            &ev(SCHEDULE_TYPE, "s1", Action::Created, Some(body), None, c),
            c,
        );
        assert_eq!(slots(&f), [(c, Trigger::Immediate)]);
        assert_eq!(s.next_wake(), Some(utc(2024, 6, 3, 10, 0)));
        assert!(s.due(utc(2024, 6, 3, 9, 59)).is_empty());
        let f = s.due(utc(2024, 6, 3, 10, 0));
        assert_eq!(slots(&f), [(utc(2024, 6, 3, 10, 0), Trigger::Schedule)]);
        // Far behind: one catch-up for the latest slot only.
        let f = s.due(utc(2024, 6, 12, 0, 0));
        assert_eq!(slots(&f), [(utc(2024, 6, 11, 10, 0), Trigger::CatchUp)]);
        assert_eq!(s.next_wake(), Some(utc(2024, 6, 13, 10, 0)));
    }

    #[test]
    fn at_start_a_schedule_is_owed_its_latest_slot_once() {
        let c = utc(2024, 6, 1, 10, 0);
        let body = sched(json!({"scheduleType": "HOUR", "period": 1}), c, c);
        let created = ev(SCHEDULE_TYPE, "s1", Action::Created, Some(body), None, c);
        // Started before any slot: the immediate job (if it is missing).
        let mut s = Schedules::default();
        s.apply(&created, c);
        let f = s.start(c + Duration::minutes(5));
        assert_eq!(slots(&f), [(c, Trigger::Immediate)]);
        // Started after several slots: one catch-up for the last.
        let mut s = Schedules::default();
        s.apply(&created, c);
        let f = s.start(utc(2024, 6, 1, 15, 30));
        assert_eq!(slots(&f), [(utc(2024, 6, 1, 15, 0), Trigger::CatchUp)]);
        assert_eq!(s.next_wake(), Some(utc(2024, 6, 1, 16, 0)));
    }

    #[test]
    fn editing_the_timing_moves_the_next_slots_without_catching_up() {
        let c = utc(2024, 6, 1, 10, 0);
        let mut s = Schedules::default();
        s.start(c);
        let hourly = sched(json!({"scheduleType": "HOUR", "period": 1}), c, c);
        s.apply(
            &ev(
                SCHEDULE_TYPE,
                "s1",
                Action::Created,
                Some(hourly.clone()),
                None,
                c,
            ),
            c,
        );
        let edit = c + Duration::minutes(90);
        let daily = sched(
            json!({"scheduleType": "DAY", "period": 1, "offset": 2}),
            c,
            edit,
        );
        let f = s.apply(
            &ev(
                SCHEDULE_TYPE,
                "s1",
                Action::Updated,
                Some(daily.clone()),
                Some(hourly.clone()),
                edit,
            ),
            edit,
        );
        assert!(f.is_empty(), "an edit requests no job");
        assert_eq!(s.next_wake(), Some(utc(2024, 6, 2, 2, 0)));
        // A replica starting after the edit catches up no hourly slot: it
        // owes only the immediate job (which the writer finds done).
        let mut r = Schedules::default();
        r.apply(
            &ev(
                SCHEDULE_TYPE,
                "s1",
                Action::Updated,
                Some(daily.clone()),
                Some(hourly.clone()),
                edit,
            ),
            edit,
        );
        assert_eq!(
            slots(&r.start(edit + Duration::minutes(1))),
            [(c, Trigger::Immediate)]
        );
        // Hourly again, restarted after two new slots: no catch-up of the
        // slot before the edit, one for the latest after it.
        let edit2 = utc(2024, 6, 1, 12, 30);
        let mut r = Schedules::default();
        r.apply(
            &ev(
                SCHEDULE_TYPE,
                "s1",
                Action::Updated,
                Some(sched(
                    json!({"scheduleType": "HOUR", "period": 1}),
                    c,
                    edit2,
                )),
                Some(daily),
                edit2,
            ),
            edit2,
        );
        assert!(r.start(utc(2024, 6, 1, 12, 45)).is_empty());
        let mut r2 = Schedules::default();
        r2.apply(
            &ev(
                SCHEDULE_TYPE,
                "s1",
                Action::Updated,
                Some(sched(
                    json!({"scheduleType": "HOUR", "period": 1}),
                    c,
                    edit2,
                )),
                Some(hourly),
                edit2,
            ),
            edit2,
        );
        assert_eq!(
            slots(&r2.start(utc(2024, 6, 1, 14, 45))),
            [(utc(2024, 6, 1, 14, 0), Trigger::CatchUp)]
        );
    }

    #[test]
    fn deleted_or_deactivated_schedules_stop_and_reactivation_runs_at_once() {
        let c = utc(2024, 6, 1, 10, 0);
        let mut s = Schedules::default();
        s.start(c);
        let on = sched(json!({"scheduleType": "MINUTE", "period": 30}), c, c);
        s.apply(
            &ev(
                SCHEDULE_TYPE,
                "s1",
                Action::Created,
                Some(on.clone()),
                None,
                c,
            ),
            c,
        );
        let mut off = on.clone();
        off["active"] = json!(false);
        let t1 = c + Duration::minutes(10);
        assert!(s
            .apply(
                &ev(
                    SCHEDULE_TYPE,
                    "s1",
                    Action::Updated,
                    Some(off.clone()),
                    Some(on.clone()),
                    t1
                ),
                t1
            )
            .is_empty());
        assert_eq!(s.next_wake(), None);
        assert!(s.due(c + Duration::hours(5)).is_empty());
        let t2 = c + Duration::hours(5);
        let back_on = sched(json!({"scheduleType": "MINUTE", "period": 30}), c, t2);
        let f = s.apply(
            &ev(
                SCHEDULE_TYPE,
                "s1",
                Action::Updated,
                Some(back_on),
                Some(off),
                t2,
            ),
            t2 + Duration::seconds(3),
        );
        assert_eq!(slots(&f), [(t2, Trigger::Immediate)]);
        assert_eq!(s.next_wake(), Some(c + Duration::minutes(330)));
        s.apply(
            &ev(SCHEDULE_TYPE, "s1", Action::Deleted, None, Some(on), t2),
            t2,
        );
        assert_eq!(s.next_wake(), None);
        assert!(s.is_empty());
    }

    #[test]
    fn a_change_read_late_keeps_the_slots_of_the_time_it_was_made() {
        // Created just before a slot and read just after it: that slot
        // still runs, as a scheduled job.
        let c = utc(2024, 6, 1, 9, 40) - Duration::milliseconds(100);
        let read = utc(2024, 6, 1, 9, 40) + Duration::milliseconds(400);
        let body = sched(json!({"cronExpression": "*/20 * * * *"}), c, c);
        let created = ev(SCHEDULE_TYPE, "s1", Action::Created, Some(body), None, c);
        let mut s = Schedules::default();
        s.start(c - Duration::minutes(1));
        assert_eq!(slots(&s.apply(&created, read)), [(c, Trigger::Immediate)]);
        assert_eq!(s.next_wake(), Some(utc(2024, 6, 1, 9, 40)));
        assert_eq!(
            slots(&s.due(read)),
            [(utc(2024, 6, 1, 9, 40), Trigger::Schedule)]
        );
        // Two replicas reading a re-activation at different times request
        // the same immediate job.
        let mut off = sched(json!({"cronExpression": "*/20 * * * *"}), c, c);
        off["active"] = json!(false);
        let t = utc(2024, 6, 1, 11, 5);
        let on = sched(json!({"cronExpression": "*/20 * * * *"}), c, t);
        let reactivated = ev(SCHEDULE_TYPE, "s1", Action::Updated, Some(on), Some(off), t);
        let mut firsts = vec![];
        for lag in [1, 700] {
            let mut r = Schedules::default();
            r.start(c);
            r.apply(&created, c);
            let deactivated = {
                let mut e = reactivated.clone();
                std::mem::swap(&mut e.new, &mut e.old);
                e
            };
            r.apply(&deactivated, t - Duration::minutes(1));
            firsts.push(slots(
                &r.apply(&reactivated, t + Duration::milliseconds(lag)),
            ));
        }
        assert_eq!(
            firsts,
            [[(t, Trigger::Immediate)], [(t, Trigger::Immediate)]]
        );
    }

    #[test]
    fn schedules_that_cannot_run_are_refused_and_reported() {
        let c = utc(2024, 6, 1, 10, 0);
        let mut s = Schedules::default();
        s.start(c);
        let dest = json!({"name": "d"});
        s.apply(
            &ev(
                DESTINATION_TYPE,
                "d1",
                Action::Created,
                Some(dest.clone()),
                None,
                c,
            ),
            c,
        );
        let body = sched(
            json!({"scheduleType": "HOUR", "period": 1, "destinationIds": ["d1"]}),
            c,
            c,
        );
        let f = s.apply(
            &ev(
                SCHEDULE_TYPE,
                "ok",
                Action::Created,
                Some(body.clone()),
                None,
                c,
            ),
            c,
        );
        assert_eq!(f.len(), 1);
        for (id, bad) in [
            ("fast", json!({"scheduleType": "MINUTE", "period": 5})),
            ("slow", json!({"scheduleType": "DAY", "period": 4})),
            (
                "offset",
                json!({"scheduleType": "MINUTE", "period": 15, "offset": 3}),
            ),
            ("cronfast", json!({"cronExpression": "* * * * *"})),
            ("cronnever", json!({"cronExpression": "0 0 31 2 *"})),
        ] {
            let f = s.apply(
                &ev(
                    SCHEDULE_TYPE,
                    id,
                    Action::Created,
                    Some(sched(bad, c, c)),
                    None,
                    c,
                ),
                c,
            );
            assert!(f.is_empty(), "{id} was given a job");
        }
        // The destination goes: the good schedule is refused too.
        s.apply(
            &ev(DESTINATION_TYPE, "d1", Action::Deleted, None, Some(dest), c),
            c,
        );
        let refused = s.refusals();
        let ids: Vec<&str> = refused.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            ["cronfast", "cronnever", "fast", "offset", "ok", "slow"]
        );
        assert!(refused[4].reason.contains("deleted"), "{:?}", refused[4]);
        assert!(s.due(c + Duration::days(2)).is_empty());
    }

    #[test]
    fn organizations_that_cannot_be_key_tokens_are_refused() {
        let c = utc(2024, 6, 1, 10, 0);
        let mut s = Schedules::default();
        s.start(c);
        let mut e = ev(
            SCHEDULE_TYPE,
            "s1",
            Action::Created,
            Some(sched(json!({"scheduleType": "HOUR", "period": 1}), c, c)),
            None,
            c,
        );
        e.org_id = "Ärger".into();
        assert!(s.apply(&e, c).is_empty());
        assert!(s.refusals()[0].reason.contains("organization id"));
    }
}
