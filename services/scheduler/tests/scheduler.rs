//! The scheduler against a real nats-server and the real entities service:
//! schedules are written as a user writes them (requests to entities), and
//! what comes out is read where the exporter and the API read it (the
//! `JOBS` stream and the `export_jobs` bucket). Time is a manual clock
//! moved slot by slot, except in the test of the first run on the wall
//! clock.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use meterline_scheduler::clock::{Clock, ManualClock, SystemClock};
use meterline_scheduler::{App, Settings};
use meterline_shared::envelope::{Action, EntityEvent};
use meterline_shared::exportjob::{self, ExportJobRecord, ExportJobRequest, JobStatus, Trigger};
use meterline_shared::protocol::EntityRequest;
use meterline_shared::schedule::Timing;
use meterline_shared::testkit::{eventually, Entities, NatsServer, Running};
use meterline_shared::{provision, subjects, ServiceError};

const ORG: &str = "org-sched";
/// Generous: the machine may be busy, and every write is flushed to disk.
const WAIT: Duration = Duration::from_secs(30);

struct World {
    nats: NatsServer,
    client: async_nats::Client,
    js: jetstream::Context,
    _entities: Running,
}

impl World {
    async fn new() -> World {
        let nats = NatsServer::start();
        let app =
            meterline_entities::App::build(meterline_entities::Settings::for_tests(nats.url()))
                .await
                .expect("build entities");
        let entities = Running::spawn(|stop| app.run_until_stopped(stop));
        let client = nats.client().await;
        let js = jetstream::new(client.clone());
        let w = World {
            nats,
            client,
            js,
            _entities: entities,
        };
        w.call(
            "organization",
            "create",
            EntityRequest {
                id: Some(ORG.into()),
                body: Some(json!({"name": "Scheduling org"})),
                ..Default::default()
            },
        )
        .await
        .expect("create org");
        w
    }

    async fn call(&self, ty: &str, op: &str, req: EntityRequest) -> Result<Value, ServiceError> {
        Entities::new(self.client.clone(), ORG)
            .call(ty, op, req)
            .await
    }

    async fn create(&self, ty: &str, body: Value) -> Result<Value, ServiceError> {
        self.call(
            ty,
            "create",
            EntityRequest {
                body: Some(body),
                ..Default::default()
            },
        )
        .await
    }

    async fn update(&self, ty: &str, current: &Value, changes: Value) -> Value {
        let mut body = current.clone();
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                body.as_object_mut().unwrap().remove(k);
            } else {
                body[k] = v.clone();
            }
        }
        for k in [
            "id",
            "dtCreated",
            "dtLastModified",
            "createdBy",
            "lastModifiedBy",
        ] {
            body.as_object_mut().unwrap().remove(k);
        }
        self.call(
            ty,
            "update",
            EntityRequest {
                id: Some(current["id"].as_str().unwrap().to_owned()),
                body: Some(body),
                ..Default::default()
            },
        )
        .await
        .expect("update")
    }

    async fn delete(&self, ty: &str, id: &str) {
        self.call(
            ty,
            "delete",
            EntityRequest {
                id: Some(id.to_owned()),
                ..Default::default()
            },
        )
        .await
        .expect("delete");
    }

    async fn schedule(&self, code: &str, timing: Value) -> Value {
        let mut body = json!({"name": code, "code": code, "sourceType": "OPERATIONAL",
            "operationalDataTypes": ["ACCOUNTS"]});
        body.as_object_mut()
            .unwrap()
            .extend(timing.as_object().unwrap().clone());
        self.create("exportschedule", body)
            .await
            .expect("create schedule")
    }

    async fn start(&self, clock: Arc<dyn Clock>) -> (Running, std::net::SocketAddr) {
        let app = App::build_with_clock(Settings::for_tests(self.nats.url()), clock)
            .await
            .expect("build scheduler");
        let admin = app.admin_addr();
        let running = Running::spawn(|stop| app.run_until_stopped(stop));
        // Ready once it has read ENTITIES.
        let url = format!("http://{admin}/readyz");
        eventually(WAIT, "scheduler ready", || {
            let url = url.clone();
            async move {
                let r = reqwest::get(&url).await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
        (running, admin)
    }

    async fn records(&self) -> jetstream::kv::Store {
        self.js
            .get_key_value(provision::EXPORT_JOBS_BUCKET)
            .await
            .expect("export_jobs bucket")
    }

    async fn record(&self, schedule: &str, slot: DateTime<Utc>) -> Option<ExportJobRecord> {
        let key = exportjob::job_key(ORG, &exportjob::job_id(ORG, schedule, slot));
        let bytes = self.records().await.get(key).await.ok()??;
        Some(serde_json::from_slice(&bytes).unwrap())
    }

    async fn wait_record(&self, schedule: &str, slot: DateTime<Utc>) -> ExportJobRecord {
        eventually(WAIT, &format!("a job for the slot {slot}"), || {
            self.record(schedule, slot)
        })
        .await
    }

    /// Every request on `JOBS`, in order (read without consuming).
    async fn job_requests(&self) -> Vec<ExportJobRequest> {
        let mut stream = self.js.get_stream(subjects::JOBS_STREAM).await.unwrap();
        let info = stream.info().await.unwrap();
        let mut out = Vec::new();
        for seq in info.state.first_sequence..=info.state.last_sequence {
            if let Ok(m) = stream.get_raw_message(seq).await {
                let req: ExportJobRequest = serde_json::from_slice(&m.payload).unwrap();
                let id = m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_owned());
                assert_eq!(
                    id.as_deref(),
                    Some(req.job_id.as_str()),
                    "message id = job id"
                );
                assert_eq!(
                    m.subject.as_str(),
                    subjects::export_job(&req.org_id, req.schedule_id.as_deref().unwrap())
                );
                out.push(req);
            }
        }
        out
    }

    /// Waits until `JOBS` holds exactly `n` requests for `schedule`.
    async fn wait_requests(&self, schedule: &str, n: usize) -> Vec<ExportJobRequest> {
        eventually(WAIT, &format!("{n} requests for {schedule}"), || async {
            let all: Vec<ExportJobRequest> = self
                .job_requests()
                .await
                .into_iter()
                .filter(|r| r.schedule_id.as_deref() == Some(schedule))
                .collect();
            assert!(all.len() <= n, "more than {n} requests: {all:#?}");
            (all.len() == n).then_some(all)
        })
        .await
    }

    async fn refused(&self, admin: std::net::SocketAddr) -> Vec<Value> {
        reqwest::get(format!("http://{admin}/refused"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

fn time(s: &Value, field: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s[field].as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc)
}

fn created(s: &Value) -> DateTime<Utc> {
    time(s, "dtCreated")
}

fn modified(s: &Value) -> DateTime<Utc> {
    time(s, "dtLastModified")
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_owned()
}

/// The slots of `timing` for a schedule created at `c`, up to `until`.
fn slots(body: &Value, c: DateTime<Utc>, until: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let t = Timing::from_body(body, c).unwrap();
    let mut out = vec![];
    let mut at = c;
    while let Some(n) = t.next_after(c, at) {
        if n > until {
            break;
        }
        out.push(n);
        at = n;
    }
    out
}

#[tokio::test]
async fn three_days_of_simple_and_cron_schedules_one_job_per_slot() {
    let w = World::new().await;
    let clock = ManualClock::new(Utc::now());
    let (scheduler, _) = w.start(Arc::new(clock.clone())).await;
    let timings = [
        (
            "hourly-at-30",
            json!({"scheduleType": "HOUR", "period": 1, "offset": 30}),
        ),
        ("every-2-days", json!({"scheduleType": "DAY", "period": 2})),
        (
            "every-45-min",
            json!({"scheduleType": "MINUTE", "period": 45}),
        ),
        ("cron-6h", json!({"cronExpression": "0 */6 * * *"})),
        (
            "cron-weekdays",
            json!({"cronExpression": "15 8,20 * * 1-5"}),
        ),
    ];
    let mut expected: BTreeMap<DateTime<Utc>, Vec<String>> = BTreeMap::new();
    let mut ids = HashMap::new();
    let end = clock.now() + chrono::Duration::days(3);
    for (code, timing) in &timings {
        let s = w.schedule(code, timing.clone()).await;
        let c = created(&s);
        // A new schedule gets its job at once, for its creation time.
        let first = w.wait_record(&id(&s), c).await;
        assert_eq!(first.trigger, Trigger::Immediate);
        assert_eq!(first.status, JobStatus::Pending);
        for slot in slots(timing, c, end) {
            expected.entry(slot).or_default().push(id(&s));
        }
        ids.insert(id(&s), (*code, c));
    }
    assert!(expected.len() > 80, "three days hold many slots");
    // Move the clock slot by slot: each slot's job appears before the next.
    for (slot, schedules) in &expected {
        clock.set(*slot);
        for s in schedules {
            let r = w.wait_record(s, *slot).await;
            assert_eq!(
                (r.slot, r.trigger, r.status),
                (*slot, Trigger::Schedule, JobStatus::Pending)
            );
        }
    }
    for (s, (code, c)) in &ids {
        let want: Vec<DateTime<Utc>> = std::iter::once(*c)
            .chain(
                expected
                    .iter()
                    .filter(|(_, v)| v.contains(s))
                    .map(|(t, _)| *t),
            )
            .collect();
        let got: Vec<DateTime<Utc>> = w
            .wait_requests(s, want.len())
            .await
            .iter()
            .map(|r| r.slot)
            .collect();
        assert_eq!(got, want, "{code}: one request per slot, in order");
    }
    // Spot checks of the arithmetic as the seeds describe it.
    let two_days = ids.iter().find(|(_, (c, _))| *c == "every-2-days").unwrap();
    let c = two_days.1 .1;
    assert!(expected.contains_key(&(c + chrono::Duration::days(2))));
    for (slot, schedules) in &expected {
        for s in schedules {
            match ids[s].0 {
                "hourly-at-30" => assert_eq!(slot.format("%M").to_string(), "30"),
                "cron-6h" => assert!(
                    slot.format("%M").to_string() == "00"
                        && slot.format("%H").to_string().parse::<u32>().unwrap() % 6 == 0
                ),
                "cron-weekdays" => {
                    let wd = slot.format("%u").to_string().parse::<u32>().unwrap();
                    assert!((1..=5).contains(&wd), "{slot} is a weekend");
                }
                _ => {}
            }
        }
    }
    scheduler.stop().await;
}

#[tokio::test]
async fn the_first_run_is_immediate_on_the_wall_clock() {
    let w = World::new().await;
    let (scheduler, _) = w.start(Arc::new(SystemClock)).await;
    let s = w
        .schedule("daily", json!({"scheduleType": "DAY", "period": 1}))
        .await;
    let c = created(&s);
    let r = w.wait_record(&id(&s), c).await;
    assert_eq!(r.trigger, Trigger::Immediate);
    assert_eq!(r.source_type, "OPERATIONAL");
    assert_eq!(r.schedule_id.as_deref(), Some(id(&s).as_str()));
    let reqs = w.wait_requests(&id(&s), 1).await;
    assert_eq!(reqs[0].slot, c);
    assert_eq!(reqs[0].job_id, exportjob::job_id(ORG, &id(&s), c));
    let delay = r.date_created - c;
    assert!(
        delay < chrono::Duration::seconds(5),
        "the job was requested {delay} after the schedule was created"
    );
    scheduler.stop().await;
}

#[tokio::test]
async fn an_edit_moves_the_next_slots_and_delete_or_deactivation_stop_them() {
    let w = World::new().await;
    let clock = ManualClock::new(Utc::now());
    let (scheduler, _) = w.start(Arc::new(clock.clone())).await;
    let s = w
        .schedule("edited", json!({"scheduleType": "MINUTE", "period": 30}))
        .await;
    let c = created(&s);
    w.wait_record(&id(&s), c).await;
    clock.set(c + chrono::Duration::minutes(30));
    w.wait_record(&id(&s), c + chrono::Duration::minutes(30))
        .await;
    // Hourly at :05 from now on.
    let edited = w
        .update(
            "exportschedule",
            &s,
            json!({"scheduleType": "HOUR", "period": 1, "offset": 5}),
        )
        .await;
    let after_edit = clock.now();
    let next = Timing::from_body(&edited, after_edit)
        .unwrap()
        .next_after(c, after_edit + chrono::Duration::minutes(1))
        .unwrap();
    // The old timing's next slot passes without a job.
    clock.set(c + chrono::Duration::minutes(60));
    clock.set(next);
    w.wait_record(&id(&s), next).await;
    assert!(w
        .record(&id(&s), c + chrono::Duration::minutes(60))
        .await
        .is_none());
    assert_eq!(w.wait_requests(&id(&s), 3).await.len(), 3);

    // Deactivated: no jobs; active again: an immediate job.
    let deactivated = w
        .update("exportschedule", &edited, json!({"active": false}))
        .await;
    for h in 1..=3 {
        clock.set(next + chrono::Duration::hours(h));
    }
    let reactivated = w
        .update("exportschedule", &deactivated, json!({"active": true}))
        .await;
    // Its slot is the time of the re-activation.
    let at = modified(&reactivated);
    assert_eq!(w.wait_record(&id(&s), at).await.trigger, Trigger::Immediate);
    assert_eq!(w.wait_requests(&id(&s), 4).await.len(), 4);

    // Deleted: nothing more, ever.
    w.delete("exportschedule", &id(&reactivated)).await;
    let other = w
        .schedule("witness", json!({"scheduleType": "MINUTE", "period": 15}))
        .await;
    let oc = created(&other);
    w.wait_record(&id(&other), oc).await;
    let every15 = Timing::from_body(&other, oc).unwrap();
    let mut last = clock.now();
    for _ in 0..8 {
        last = every15.next_after(oc, last).unwrap();
        clock.set(last);
        w.wait_record(&id(&other), last).await;
    }
    assert_eq!(w.wait_requests(&id(&s), 4).await.len(), 4);
    scheduler.stop().await;
}

#[tokio::test]
async fn two_replicas_request_exactly_one_job_per_slot() {
    let w = World::new().await;
    let clock = ManualClock::new(Utc::now());
    let (a, _) = w.start(Arc::new(clock.clone())).await;
    let (b, _) = w.start(Arc::new(clock.clone())).await;
    let mut all = vec![];
    for (code, timing) in [
        ("r15", json!({"scheduleType": "MINUTE", "period": 15})),
        ("r1h", json!({"scheduleType": "HOUR", "period": 1})),
        ("rcron", json!({"cronExpression": "*/20 * * * *"})),
    ] {
        let s = w.schedule(code, timing.clone()).await;
        // Read by the replicas before the clock moves.
        w.wait_record(&id(&s), created(&s)).await;
        all.push((id(&s), timing, created(&s)));
    }
    let end = clock.now() + chrono::Duration::hours(12);
    let mut by_slot: BTreeMap<DateTime<Utc>, Vec<String>> = BTreeMap::new();
    for (s, timing, c) in &all {
        for slot in slots(timing, *c, end) {
            by_slot.entry(slot).or_default().push(s.clone());
        }
    }
    for (slot, ss) in &by_slot {
        clock.set(*slot);
        for s in ss {
            w.wait_record(s, *slot).await;
        }
    }
    for (s, timing, c) in &all {
        let n = slots(timing, *c, end).len() + 1;
        let reqs = w.wait_requests(s, n).await;
        let mut ids: Vec<&str> = reqs.iter().map(|r| r.job_id.as_str()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "{s}: a job id twice");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_killed_scheduler_restarts_with_one_catch_up_and_nothing_twice() {
    let w = World::new().await;
    let clock = ManualClock::new(Utc::now());
    let (first, _) = w.start(Arc::new(clock.clone())).await;
    let timing = json!({"scheduleType": "MINUTE", "period": 15});
    let s = w.schedule("restarted", timing.clone()).await;
    let (sid, c) = (id(&s), created(&s));
    let q = |k: i32| c + chrono::Duration::minutes(15 * i64::from(k));
    w.wait_record(&sid, c).await;
    for k in 1..=2 {
        clock.set(q(k));
        w.wait_record(&sid, q(k)).await;
    }
    first.kill();
    // Down for slots 3, 4 and 5.
    clock.set(q(5) + chrono::Duration::minutes(2));
    let (second, _) = w.start(Arc::new(clock.clone())).await;
    let catch_up = w.wait_record(&sid, q(5)).await;
    assert_eq!(catch_up.trigger, Trigger::CatchUp);
    for k in 3..=4 {
        assert!(
            w.record(&sid, q(k)).await.is_none(),
            "slot {k} was caught up on its own"
        );
    }
    for k in 6..=8 {
        clock.set(q(k));
        w.wait_record(&sid, q(k)).await;
    }
    second.kill();
    // Restarted right after slot 8 was requested: nothing is owed.
    let (third, _) = w.start(Arc::new(clock.clone())).await;
    clock.set(q(9));
    w.wait_record(&sid, q(9)).await;
    let slots: Vec<DateTime<Utc>> = w
        .wait_requests(&sid, 8)
        .await
        .iter()
        .map(|r| r.slot)
        .collect();
    let want: Vec<DateTime<Utc>> = [0, 1, 2, 5, 6, 7, 8, 9].iter().map(|k| q(*k)).collect();
    assert_eq!(
        slots, want,
        "every slot once, the missed ones as one catch-up"
    );
    third.stop().await;
}

#[tokio::test]
async fn a_pending_record_without_its_request_is_published_at_start() {
    let w = World::new().await;
    let clock = ManualClock::new(Utc::now());
    let s = w
        .schedule("half-written", json!({"scheduleType": "HOUR", "period": 2}))
        .await;
    let (sid, c) = (id(&s), created(&s));
    // As if a scheduler crashed after the record and before the request.
    let store = provision::ensure_kv(&w.js, provision::export_jobs_bucket(1))
        .await
        .unwrap();
    let key = exportjob::job_key(ORG, &exportjob::job_id(ORG, &sid, c));
    let req = ExportJobRequest {
        job_id: exportjob::job_id(ORG, &sid, c),
        org_id: ORG.into(),
        schedule_id: Some(sid.clone()),
        slot: c,
        trigger: Trigger::Immediate,
        adhoc: None,
    };
    store
        .put(
            &key,
            serde_json::to_vec(&ExportJobRecord::pending(&req, c))
                .unwrap()
                .into(),
        )
        .await
        .unwrap();
    let (scheduler, _) = w.start(Arc::new(clock.clone())).await;
    let reqs = w.wait_requests(&sid, 1).await;
    assert_eq!(reqs[0], req);
    scheduler.stop().await;
}

/// Writes a raw schedule onto `ENTITIES`, as a producer that skips the
/// entities service could.
async fn raw_schedule(w: &World, org: &str, sid: &str, body: Value) {
    let now = Utc::now();
    let mut state = json!({"id": sid, "version": 1, "name": sid, "code": sid, "sourceType": "OPERATIONAL",
        "operationalDataTypes": ["ACCOUNTS"], "dtCreated": now.to_rfc3339(), "dtLastModified": now.to_rfc3339()});
    state
        .as_object_mut()
        .unwrap()
        .extend(body.as_object().unwrap().clone());
    let ev = EntityEvent {
        id: uuid::Uuid::new_v4().to_string(),
        event_name: "configuration.exportschedule.created".into(),
        event_time: now,
        org_id: org.into(),
        entity_type: "exportschedule".into(),
        entity_id: sid.into(),
        action: Action::Created,
        actor: "raw".into(),
        new: Some(state),
        old: None,
    };
    w.js.publish(
        subjects::entity(org, "exportschedule", sid),
        Bytes::from(serde_json::to_vec(&ev).unwrap()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// One bad timing, both ways: the entities service refuses it on write
/// (400 with the reason), and the scheduler, meeting it on `ENTITIES`
/// anyway, refuses and reports it, gives it no job and keeps serving.
async fn refused_both_ways(timing: Value, needle: &str) {
    let w = World::new().await;
    let mut body = json!({"name": "bad", "code": "bad", "sourceType": "OPERATIONAL", "operationalDataTypes": ["ACCOUNTS"]});
    body.as_object_mut()
        .unwrap()
        .extend(timing.as_object().unwrap().clone());
    let e = w
        .create("exportschedule", body)
        .await
        .expect_err("accepted");
    assert_eq!(e.code, meterline_shared::ErrorCode::BadRequest);
    assert!(
        e.message.contains(needle),
        "{:?} lacks {needle:?}",
        e.message
    );

    let clock = ManualClock::new(Utc::now());
    let (scheduler, admin) = w.start(Arc::new(clock.clone())).await;
    raw_schedule(&w, ORG, "bad-on-the-bus", timing).await;
    let refused = eventually(WAIT, "the refusal", || async {
        let r = w.refused(admin).await;
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(refused[0]["id"], "bad-on-the-bus");
    assert!(
        refused[0]["reason"].as_str().unwrap().contains(needle),
        "{refused:?}"
    );
    let good = w
        .schedule("good", json!({"scheduleType": "MINUTE", "period": 15}))
        .await;
    let gc = created(&good);
    w.wait_record(&id(&good), gc).await;
    clock.set(gc + chrono::Duration::days(4));
    w.wait_record(&id(&good), gc + chrono::Duration::days(4))
        .await;
    let reqs = w.job_requests().await;
    assert!(
        reqs.iter()
            .all(|r| r.schedule_id.as_deref() == Some(id(&good).as_str())),
        "{reqs:#?}"
    );
    scheduler.stop().await;
}

#[tokio::test]
async fn a_frequency_above_every_15_minutes_is_refused() {
    refused_both_ways(
        json!({"scheduleType": "MINUTE", "period": 10}),
        "every 15 minutes",
    )
    .await;
}

#[tokio::test]
async fn a_frequency_below_every_3_days_is_refused() {
    refused_both_ways(
        json!({"scheduleType": "HOUR", "period": 73}),
        "every 3 days",
    )
    .await;
}

#[tokio::test]
async fn a_cron_more_frequent_than_15_minutes_is_refused() {
    refused_both_ways(
        json!({"cronExpression": "*/30 * * * * *"}),
        "more often than every 15 minutes",
    )
    .await;
}

#[tokio::test]
async fn a_cron_that_never_fires_is_refused() {
    refused_both_ways(json!({"cronExpression": "0 0 30 2 *"}), "never runs").await;
}

#[tokio::test]
async fn an_offset_with_minute_is_refused() {
    refused_both_ways(
        json!({"scheduleType": "MINUTE", "period": 30, "offset": 5}),
        "offset",
    )
    .await;
}

#[tokio::test]
async fn a_schedule_naming_a_deleted_destination_is_refused() {
    let w = World::new().await;
    let dest = w
        .create("exportdestination", json!({"name": "d", "code": "d", "bucketName": "bucket", "iamRoleArn": "arn:aws:iam::123456789012:role/x"}))
        .await
        .unwrap();
    w.delete("exportdestination", &id(&dest)).await;
    let e = w
        .create("exportschedule", json!({"name": "bad", "code": "bad", "sourceType": "OPERATIONAL",
            "operationalDataTypes": ["ACCOUNTS"], "scheduleType": "HOUR", "period": 1, "destinationIds": [id(&dest)]}))
        .await
        .unwrap_err();
    assert_eq!(e.code, meterline_shared::ErrorCode::BadRequest);
    assert!(e.message.contains("does not exist"), "{}", e.message);
    let e = w
        .create(
            "scheduledeventconfig",
            json!({"name": "due soon", "entity": "Bill", "field": "dueDate", "offset": 1}),
        )
        .await
        .unwrap_err();
    assert!(e.message.contains("scheduled.bill."), "{}", e.message);

    // A destination deleted after a schedule named it: the scheduler stops
    // the schedule's jobs and reports it.
    let clock = ManualClock::new(Utc::now());
    let (scheduler, admin) = w.start(Arc::new(clock.clone())).await;
    let dest = w
        .create("exportdestination", json!({"name": "d2", "code": "d2", "bucketName": "bucket", "iamRoleArn": "arn:aws:iam::123456789012:role/x"}))
        .await
        .unwrap();
    let s = w
        .schedule(
            "named",
            json!({"scheduleType": "MINUTE", "period": 15, "destinationIds": [id(&dest)]}),
        )
        .await;
    let c = created(&s);
    w.wait_record(&id(&s), c).await;
    w.delete("exportdestination", &id(&dest)).await;
    let refused = eventually(WAIT, "the refusal", || async {
        let r = w.refused(admin).await;
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(refused[0]["id"], id(&s).as_str());
    assert!(refused[0]["reason"].as_str().unwrap().contains("deleted"));
    let witness = w
        .schedule("witness", json!({"scheduleType": "MINUTE", "period": 15}))
        .await;
    let wc = created(&witness);
    w.wait_record(&id(&witness), wc).await;
    clock.set(wc + chrono::Duration::hours(1));
    w.wait_record(&id(&witness), wc + chrono::Duration::hours(1))
        .await;
    assert_eq!(
        w.wait_requests(&id(&s), 1).await.len(),
        1,
        "only its immediate job"
    );
    scheduler.stop().await;
}

#[tokio::test]
async fn bad_schedules_met_on_the_bus_are_refused_and_reported_not_fatal() {
    let w = World::new().await;
    let clock = ManualClock::new(Utc::now());
    // One written before the scheduler starts, the rest while it runs.
    raw_schedule(
        &w,
        ORG,
        "too-fast",
        json!({"scheduleType": "MINUTE", "period": 5}),
    )
    .await;
    let (scheduler, admin) = w.start(Arc::new(clock.clone())).await;
    for (sid, body) in [
        ("too-slow", json!({"scheduleType": "DAY", "period": 4})),
        ("cron-fast", json!({"cronExpression": "*/5 * * * *"})),
        ("cron-never", json!({"cronExpression": "0 0 31 2 *"})),
        (
            "offset-minute",
            json!({"scheduleType": "MINUTE", "period": 15, "offset": 3}),
        ),
        (
            "no-destination",
            json!({"scheduleType": "HOUR", "period": 1, "destinationIds": ["00000000-0000-7000-8000-00000000dead"]}),
        ),
    ] {
        raw_schedule(&w, ORG, sid, body).await;
    }
    raw_schedule(
        &w,
        "Ärger",
        "key-unsafe",
        json!({"scheduleType": "HOUR", "period": 1}),
    )
    .await;
    // A destination deleted after its schedule was made.
    let dest = w
        .create("exportdestination", json!({"name": "d", "code": "d", "bucketName": "bucket", "iamRoleArn": "arn:aws:iam::123456789012:role/x"}))
        .await
        .unwrap();
    let orphan = w
        .schedule(
            "orphan",
            json!({"scheduleType": "MINUTE", "period": 15, "destinationIds": [id(&dest)]}),
        )
        .await;
    let oc = created(&orphan);
    w.wait_record(&id(&orphan), oc).await;
    w.delete("exportdestination", &id(&dest)).await;
    let refused = eventually(WAIT, "eight refusals", || async {
        let r = w.refused(admin).await;
        (r.len() == 8).then_some(r)
    })
    .await;
    let reason = |sid: &str| -> String {
        refused
            .iter()
            .find(|r| r["id"] == sid)
            .unwrap_or_else(|| panic!("{sid} not reported: {refused:#?}"))["reason"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(reason("too-fast").contains("15 minutes"));
    assert!(reason("too-slow").contains("3 days"));
    assert!(reason("cron-fast").contains("more often"));
    assert!(reason("cron-never").contains("never runs"));
    assert!(reason("offset-minute").contains("offset"));
    assert!(reason("no-destination").contains("does not exist"));
    assert!(reason("key-unsafe").contains("organization id"));
    assert!(reason(&id(&orphan)).contains("deleted"));
    // None of them gets a job, and a good schedule still does.
    let good = w
        .schedule("good", json!({"scheduleType": "MINUTE", "period": 15}))
        .await;
    let gc = created(&good);
    w.wait_record(&id(&good), gc).await;
    for k in 1..=4 {
        clock.set(gc + chrono::Duration::minutes(15 * k));
        w.wait_record(&id(&good), gc + chrono::Duration::minutes(15 * k))
            .await;
    }
    let reqs = w.job_requests().await;
    assert!(
        reqs.iter()
            .all(|r| [id(&good), id(&orphan)].contains(r.schedule_id.as_ref().unwrap())),
        "{reqs:#?}"
    );
    assert_eq!(
        reqs.iter()
            .filter(|r| r.schedule_id.as_deref() == Some(id(&orphan).as_str()))
            .count(),
        1,
        "the orphan got only its immediate job"
    );
    scheduler.stop().await;
}

#[tokio::test]
async fn scheduled_events_fire_once_per_entity_and_date() {
    let w = World::new().await;
    let clock = ManualClock::new(Utc::now());
    let (first, _) = w.start(Arc::new(clock.clone())).await;
    w.create(
        "scheduledeventconfig",
        json!({"name": "scheduled.bill.overdue", "entity": "Bill", "field": "dueDate", "offset": 1}),
    )
    .await
    .unwrap();
    let account = w
        .create(
            "account",
            json!({"code": "acme", "name": "Acme", "emailAddress": "ap@acme.example"}),
        )
        .await
        .unwrap();
    let due = (clock.now() + chrono::Duration::days(2)).date_naive();
    let bill = w
        .create(
            "bill",
            json!({"accountId": id(&account), "billDate": due.to_string(), "dueDate": due.to_string(),
                   "startDate": "2026-01-01", "endDate": "2026-02-01", "currency": "USD", "status": "PENDING"}),
        )
        .await
        .unwrap();
    let subject = subjects::event(ORG, "scheduled.bill.overdue");
    let events = || async {
        let mut stream = w.js.get_stream(subjects::EVENTS_STREAM).await.unwrap();
        let info = stream.info().await.unwrap();
        let mut out = vec![];
        for seq in info.state.first_sequence..=info.state.last_sequence {
            if let Ok(m) = stream.get_raw_message(seq).await {
                if m.subject.as_str() == subject {
                    out.push(serde_json::from_slice::<Value>(&m.payload).unwrap());
                }
            }
        }
        out
    };
    let fire_at = due.and_hms_opt(0, 0, 0).unwrap().and_utc() + chrono::Duration::days(1);
    clock.set(fire_at - chrono::Duration::minutes(1));
    clock.set(fire_at);
    let first_events = eventually(WAIT, "the scheduled event", || async {
        let e = events().await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert_eq!(first_events.len(), 1);
    let e = &first_events[0];
    assert_eq!(e["eventName"], "scheduled.bill.overdue");
    assert_eq!(e["entityId"], bill["id"]);
    assert_eq!(e["new"]["dueDate"], due.to_string());
    assert_eq!(
        e["eventTime"]
            .as_str()
            .map(|s| s.starts_with(&due.succ_opt().unwrap().to_string())),
        Some(true)
    );
    // Restarted: the same date does not fire again.
    first.kill();
    clock.advance(chrono::Duration::hours(1));
    let (second, _) = w.start(Arc::new(clock.clone())).await;
    // The due date moves a week on: a new event for the new date.
    let later = due + chrono::Duration::days(7);
    w.update(
        "bill",
        &bill,
        json!({"dueDate": later.to_string(), "version": 1}),
    )
    .await;
    clock.set(later.and_hms_opt(0, 0, 0).unwrap().and_utc() + chrono::Duration::days(1));
    let both = eventually(WAIT, "the event for the new date", || async {
        let e = events().await;
        (e.len() >= 2).then_some(e)
    })
    .await;
    assert_eq!(both.len(), 2, "{both:#?}");
    assert_eq!(both[1]["new"]["dueDate"], later.to_string());
    assert_ne!(both[0]["id"], both[1]["id"]);
    second.stop().await;
}
