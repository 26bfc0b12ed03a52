//! The scheduler with 10,000 active schedules (`BENCH_SCHEDULES`), on the
//! wall clock:
//!
//! - slot-to-publish delay: from a slot's time to its request stored on
//!   `JOBS` (the stream's own timestamp), p50 and p99, for 10,000 slots
//!   spread over 30 s; beside a bare timer loop publishing one message per
//!   slot (message id, awaited ack) on a work-queue stream, for the same
//!   slots pattern;
//! - CPU while idle between slots: this process's CPU time over 10 s with
//!   the scheduler holding every schedule and no slot due, beside the same
//!   process before the scheduler started (a connected client, nothing to do).
//!
//! Schedules are written straight onto `ENTITIES` (with creation times 15
//! minutes before their first slot), as a producer on the bus could.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::json;

use meterline_scheduler::{App, Settings};
use meterline_shared::envelope::{Action, EntityEvent};
use meterline_shared::exportjob::{ExportJobRequest, Trigger};
use meterline_shared::subjects;
use meterline_shared::testkit::{NatsServer, Running};

use crate::{env_usize, ms, Row, ORG};

/// CPU time (user + system) of this process so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 here.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

async fn idle_cpu(window: Duration) -> f64 {
    let (c0, t0) = (cpu_time(), Instant::now());
    tokio::time::sleep(window).await;
    (cpu_time() - c0).as_secs_f64() / t0.elapsed().as_secs_f64() * 100.0
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize)
        .saturating_sub(1)
        .min(sorted.len() - 1)]
}

fn stored_at(m: &jetstream::message::StreamMessage) -> DateTime<Utc> {
    let nanos = m.time.unix_timestamp_nanos();
    DateTime::from_timestamp_nanos(nanos as i64)
}

fn until(t: DateTime<Utc>) -> Duration {
    (t - Utc::now()).to_std().unwrap_or_default()
}

pub async fn run(nats: &NatsServer) -> anyhow::Result<Vec<Row>> {
    let n = env_usize("BENCH_SCHEDULES", 10_000);
    let spread = Duration::from_secs(30);
    let client = nats.client().await;
    let mut js = jetstream::new(client.clone());
    // The machine is shared: a flushed ack may take longer than the
    // default 5 s when others are busy.
    js.set_timeout(Duration::from_secs(60));
    meterline_shared::provision::ensure_core(&js, 1).await?;
    println!("scheduler: {n} schedules, their slots spread over {spread:?}");

    let raw_idle = idle_cpu(Duration::from_secs(10)).await;

    // The slots start once the scheduler has read ENTITIES and requested
    // every schedule's immediate job.
    let first = Utc::now() + chrono::Duration::seconds(60);
    let step = spread / n as u32;
    let slot = |i: usize| first + chrono::Duration::from_std(step * i as u32).unwrap_or_default();
    let mut acks = Vec::with_capacity(n);
    for i in 0..n {
        let created = slot(i) - chrono::Duration::minutes(15);
        let id = format!("bench-{i:05}");
        let ev = EntityEvent {
            id: uuid::Uuid::new_v4().to_string(),
            event_name: "configuration.exportschedule.created".into(),
            event_time: created,
            org_id: ORG.into(),
            entity_type: "exportschedule".into(),
            entity_id: id.clone(),
            action: Action::Created,
            actor: "bench".into(),
            new: Some(json!({"id": id, "version": 1, "name": id, "code": id,
                "sourceType": "OPERATIONAL", "operationalDataTypes": ["ACCOUNTS"],
                "scheduleType": "MINUTE", "period": 15,
                "dtCreated": created.to_rfc3339(), "dtLastModified": created.to_rfc3339()})),
            old: None,
        };
        acks.push(
            js.publish(
                subjects::entity(ORG, "exportschedule", &id),
                Bytes::from(serde_json::to_vec(&ev)?),
            )
            .await?,
        );
        if acks.len() >= 512 {
            for a in acks.drain(..) {
                a.await?;
            }
        }
    }
    for a in acks.drain(..) {
        a.await?;
    }

    let started = Instant::now();
    let app = App::build(Settings::for_tests(nats.url())).await?;
    let scheduler = Running::spawn(|stop| app.run_until_stopped(stop));
    let mut jobs = js.get_stream(subjects::JOBS_STREAM).await?;
    let deadline = Instant::now() + Duration::from_secs(55);
    while jobs.info().await?.state.messages < n as u64 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "immediate jobs not all requested in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "scheduler: read ENTITIES and requested {n} immediate jobs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let idle_window = until(first).saturating_sub(Duration::from_secs(2));
    let ml_idle = idle_cpu(idle_window.min(Duration::from_secs(10))).await;

    tokio::time::sleep(until(slot(n - 1)) + Duration::from_secs(1)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while jobs.info().await?.state.messages < 2 * n as u64 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "slot jobs not all requested in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let info = jobs.info().await?;
    let mut ml = Vec::with_capacity(n);
    for seq in info.state.first_sequence..=info.state.last_sequence {
        let m = jobs.get_raw_message(seq).await?;
        let req: ExportJobRequest = serde_json::from_slice(&m.payload)?;
        if req.trigger == Trigger::Schedule {
            ml.push((stored_at(&m) - req.slot).to_std().unwrap_or_default());
        }
    }
    scheduler.stop().await;
    anyhow::ensure!(ml.len() == n, "{} slot jobs, not {n}", ml.len());

    // The bare bus: a timer per slot, one publish with a message id each.
    js.create_stream(stream::Config {
        name: "RAWJOBS".into(),
        subjects: vec!["rawjob.>".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(3600),
        ..Default::default()
    })
    .await?;
    let first_raw = Utc::now() + chrono::Duration::seconds(3);
    let raw_slot =
        |i: usize| first_raw + chrono::Duration::from_std(step * i as u32).unwrap_or_default();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let js = js.clone();
        let at = raw_slot(i);
        tasks.spawn(async move {
            tokio::time::sleep(until(at)).await;
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("raw-{i}").as_str());
            js.publish_with_headers(
                format!("rawjob.{ORG}.{i}"),
                headers,
                Bytes::from(serde_json::to_vec(&json!({"slot": at}))?),
            )
            .await?
            .await?;
            Ok::<(), anyhow::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let mut rawjobs = js.get_stream("RAWJOBS").await?;
    let info = rawjobs.info().await?;
    let mut raw = Vec::with_capacity(n);
    for seq in info.state.first_sequence..=info.state.last_sequence {
        let m = rawjobs.get_raw_message(seq).await?;
        let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
        let at: DateTime<Utc> = serde_json::from_value(v["slot"].clone())?;
        raw.push((stored_at(&m) - at).to_std().unwrap_or_default());
    }
    ml.sort();
    raw.sort();
    let mut rows = Vec::new();
    for (label, p) in [("p50", 0.50), ("p99", 0.99)] {
        let (a, b) = (pct(&ml, p), pct(&raw, p));
        rows.push(Row {
            figure: format!("scheduler, {n} schedules: slot-to-publish delay {label} ms"),
            meterline: ms(a),
            raw: ms(b),
            ratio: format!("{:.2}", a.as_secs_f64() / b.as_secs_f64().max(1e-6)),
        });
    }
    rows.push(Row {
        figure: format!("scheduler, {n} schedules: CPU while idle between slots, % of a core"),
        meterline: format!("{ml_idle:.2}"),
        raw: format!("{raw_idle:.2}"),
        ratio: if raw_idle > 0.0 {
            format!("{:.2}", ml_idle / raw_idle)
        } else {
            "n/a (raw 0)".into()
        },
    });
    Ok(rows)
}
