//! Exports: rows exported per second by real export jobs, beside the raw
//! ordered-consumer replay of the same `ENTITIES` messages in the same run.
//!
//! `BENCH_EXPORT_ENTITIES` accounts (default 1,000,000) are written to
//! `ENTITIES` as entity events, then exported by the exporter (in this
//! process, pulling its jobs from `JOBS` like any replica): an initial
//! export to the local download store (`export_files`) and one to an S3
//! server (`s3s-fs`, real HTTP), then `BENCH_EXPORT_CHANGES` updates
//! (default 100,000) and the incremental export of that window to each.
//! Each export runs `BENCH_EXPORT_RUNS` times (default 5; one schedule per
//! run, so each covers the same window from its own cursor). A figure is
//! the fastest run's rows over its wall time (from the request's publish
//! to its record becoming `SUCCEEDED`), beside the fastest of raw ordered
//! consumers reading the same messages (the whole type for the initial
//! export, the window for the incremental one) with nothing done to them,
//! one before the first run and one after each: on a shared machine any
//! single run can be slowed by anything, and both sides get the same
//! chances. Peak memory is the largest over the runs of the process's peak
//! resident set during the export, over what it held before (Linux
//! `VmHWM`, reset before each job).
//!
//! To see where an export's time goes: `BENCH_EXPORT_PROBE=1` also times
//! the exporter's replay into lines (no delivery) and, for the initial
//! export, the same messages read and dropped by the raw figure's consumer
//! and by pull consumers of both kinds the exporter makes, and
//! `RUST_LOG=meterline_exporter=debug` logs each job's stages.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, consumer::DeliverPolicy};
use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use serde_json::{json, Value};

use meterline_shared::envelope::{Action, EntityEvent};
use meterline_shared::exportjob::{job_key, ExportJobRecord, ExportJobRequest, JobStatus, Trigger};
use meterline_shared::seal::Sealer;
use meterline_shared::testkit::{events_caught_up, eventually, NatsServer, Running, S3Server};
use meterline_shared::{provision, subjects};

use crate::{env_usize, Row};

const ORG: &str = "bench-export";

fn account(i: usize, version: u64) -> Value {
    json!({
        "id": format!("acct-{i:08}"),
        "version": version,
        "name": format!("Account {i} (v{version})"),
        "code": format!("account-{i}"),
        "emailAddress": format!("billing+{i}@example.com"),
        "currency": "USD",
        "daysBeforeBillDue": 30,
        "address": {"addressLine1": "1 Main Street", "locality": "Springfield", "country": "US"},
        "customFields": {"tier": "gold", "seats": 12},
        "dtCreated": "2026-11-01T10:00:00.000Z",
        "dtLastModified": "2026-11-01T10:00:00.000Z",
        "createdBy": "bench",
        "lastModifiedBy": "bench",
    })
}

fn event(
    ty: &str,
    id: &str,
    action: Action,
    new: Option<Value>,
    old: Option<Value>,
) -> EntityEvent {
    EntityEvent::now(ORG, ty, id, action, "bench", new, old)
}

/// Appends events to `ENTITIES` with many publishes in flight.
async fn write(
    js: &jetstream::Context,
    events: impl Iterator<Item = EntityEvent>,
) -> anyhow::Result<()> {
    let mut acks = futures::stream::FuturesUnordered::new();
    for ev in events {
        let subject = subjects::entity(ORG, &ev.entity_type, &ev.entity_id);
        // As the entities service stores them: with their headers and
        // the event id as message id.
        let mut headers = ev.headers();
        headers.insert("Nats-Msg-Id", ev.id.as_str());
        let ack = js
            .publish_with_headers(subject, headers, Bytes::from(serde_json::to_vec(&ev)?))
            .await?;
        acks.push(async move { ack.await });
        while acks.len() >= 1024 {
            if let Some(a) = acks.next().await {
                a?;
            }
        }
    }
    while let Some(a) = acks.next().await {
        a?;
    }
    Ok(())
}

/// Reads every message of `filter` from `start` with an ordered consumer,
/// doing nothing with them; returns how many and how long.
async fn raw_replay(
    stream: &jetstream::stream::Stream,
    filter: &str,
    start: u64,
    to: u64,
) -> anyhow::Result<(u64, Duration)> {
    let t = Instant::now();
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter.into(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut n = 0u64;
    while let Some(m) = messages.next().await {
        let m = m?;
        n += 1;
        let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        if info.stream_sequence >= to || info.pending == 0 {
            break;
        }
    }
    Ok((n, t.elapsed()))
}

/// Diagnostic: the exporter's replay of a window into CSV lines, without
/// delivery (`BENCH_EXPORT_PROBE=1`), read on `streams` (each on its own
/// connection, or the same one several times), described by `on`.
async fn probe(
    on: &str,
    streams: &[jetstream::stream::Stream],
    from: Option<u64>,
    to: u64,
) -> anyhow::Result<()> {
    use meterline_exporter::format::Format;
    use meterline_exporter::replay::{replay, Window};
    use meterline_exporter::rows::{export_types, RowFormat};
    let kind = export_types(Some(&json!(["ACCOUNTS"]))).map_err(anyhow::Error::msg)?[0];
    let rows = RowFormat::new(kind, Format::Csv, None);
    let t = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let cancel = meterline_shared::shutdown::CancellationToken::new();
    let s = streams.to_vec();
    let reader = tokio::spawn(async move {
        replay(&s, ORG, "account", Window { from, to }, &rows, &tx, &cancel).await
    });
    while rx.recv().await.is_some() {}
    let n = reader.await??;
    println!(
        "probe: replay into lines of {n} rows on {on}: {:.0} rows/s",
        n as f64 / t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Diagnostic (`BENCH_EXPORT_PROBE=1`): the same messages read, doing
/// nothing with them, by the raw figure's ordered consumer and by pull
/// consumers as the exporter makes and reads them, delivering the last message of
/// each subject (as an initial export reads) or all; with how long each
/// took to create and the CPU seconds of this process and nats-server.
async fn probe_consumers(
    entities: &jetstream::stream::Stream,
    filter: &str,
    last: u64,
    nats_pid: &str,
) -> anyhow::Result<()> {
    let cpu = || (cpu_seconds("self"), cpu_seconds(nats_pid));
    let report = |what: &str, n: u64, t: Instant, (own, nats): (f64, f64)| {
        let (own_now, nats_now) = cpu();
        println!(
            "probe: {what}: {n} messages in {:.2}s: reader {:.2}, nats-server {:.2} CPU seconds",
            t.elapsed().as_secs_f64(),
            own_now - own,
            nats_now - nats,
        );
    };
    for _ in 0..3 {
        let (before, t) = (cpu(), Instant::now());
        let (n, _) = raw_replay(entities, filter, 1, last).await?;
        report("ordered consumer, by start sequence", n, t, before);
        for (what, deliver_policy) in [
            (
                "pull consumer, last per subject",
                DeliverPolicy::LastPerSubject,
            ),
            ("pull consumer, all", DeliverPolicy::All),
        ] {
            let (before, t) = (cpu(), Instant::now());
            let consumer = entities
                .create_consumer(pull::Config {
                    filter_subject: filter.to_owned(),
                    deliver_policy,
                    ack_policy: jetstream::consumer::AckPolicy::None,
                    memory_storage: true,
                    ..Default::default()
                })
                .await?;
            let created = t.elapsed().as_secs_f64();
            let pending = consumer.cached_info().num_pending;
            let mut messages = consumer
                .stream()
                .max_messages_per_batch(meterline_exporter::replay::PULL_BATCH)
                .max_bytes_per_batch(meterline_exporter::replay::PULL_BATCH_BYTES)
                .messages()
                .await?;
            let mut n = 0u64;
            while n < pending {
                let m = messages
                    .next()
                    .await
                    .ok_or_else(|| anyhow::anyhow!("the probe's replay ended early"))??;
                n += 1;
                if m.info().map_err(|e| anyhow::anyhow!("{e}"))?.pending == 0 {
                    break;
                }
            }
            report(&format!("{what} (created in {created:.3}s)"), n, t, before);
            entities
                .delete_consumer(&consumer.cached_info().name)
                .await?;
        }
    }
    Ok(())
}

fn peak_rss_reset() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs one job for `schedule` and returns its record, its wall time and
/// the peak memory it added (MiB).
async fn export(
    js: &jetstream::Context,
    jobs: &jetstream::kv::Store,
    schedule: &str,
) -> anyhow::Result<(ExportJobRecord, Duration, f64)> {
    let req = ExportJobRequest {
        job_id: uuid::Uuid::new_v4().to_string(),
        org_id: ORG.into(),
        schedule_id: Some(schedule.into()),
        slot: Utc::now(),
        trigger: Trigger::Manual,
        adhoc: None,
    };
    let base = status_kib("VmRSS:");
    peak_rss_reset();
    let t = Instant::now();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", req.job_id.as_str());
    js.publish_with_headers(
        subjects::export_job(ORG, schedule),
        headers,
        Bytes::from(serde_json::to_vec(&req)?),
    )
    .await?
    .await?;
    let mut watch = jobs.watch(job_key(ORG, &req.job_id)).await?;
    let rec = loop {
        let entry = tokio::time::timeout(Duration::from_secs(1800), watch.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("job watch ended"))??;
        let rec: ExportJobRecord = serde_json::from_slice(&entry.value)?;
        if rec.status.is_final() {
            break rec;
        }
    };
    let elapsed = t.elapsed();
    anyhow::ensure!(
        rec.status == JobStatus::Succeeded,
        "export job failed: {:?}",
        rec.error
    );
    let peak = status_kib("VmHWM:").saturating_sub(base) as f64 / 1024.0;
    Ok((rec, elapsed, peak))
}

fn rows(
    name: &str,
    rec: &ExportJobRecord,
    elapsed: Duration,
    raw: (u64, Duration),
    peak: f64,
) -> Vec<Row> {
    let ml = rec.rows as f64 / elapsed.as_secs_f64();
    let raw_rate = rate(raw);
    vec![
        Row {
            figure: format!(
                "{name}: rows/s ({} rows, {:.1} MB)",
                rec.rows,
                rec.bytes as f64 / 1e6
            ),
            meterline: format!("{ml:.0}"),
            raw: format!("{raw_rate:.0}"),
            ratio: format!("{:.2}", ml / raw_rate),
        },
        Row {
            figure: format!("{name}: peak memory added, MiB"),
            meterline: format!("{peak:.0}"),
            raw: "-".into(),
            ratio: "-".into(),
        },
    ]
}

/// CPU time used so far by this process (the exporter, or the raw
/// reader), the bus server and the S3 server, in seconds.
#[derive(Debug, Clone, Copy, Default)]
struct CpuUse {
    own: f64,
    nats: f64,
    s3: f64,
}

impl std::ops::Sub for CpuUse {
    type Output = CpuUse;
    fn sub(self, o: CpuUse) -> CpuUse {
        CpuUse {
            own: self.own - o.own,
            nats: self.nats - o.nats,
            s3: self.s3 - o.s3,
        }
    }
}

/// CPU seconds process `pid` (`self` for this one) has used so far.
fn cpu_seconds(pid: &str) -> f64 {
    crate::cpu_ticks(pid) as f64 / 100.0
}

/// What a run of the export bench works with.
struct Bench<'a> {
    js: &'a jetstream::Context,
    jobs: &'a jetstream::kv::Store,
    entities: &'a jetstream::stream::Stream,
    filter: &'a str,
    nats_pid: Option<u32>,
    s3_pid: Option<u32>,
}

impl Bench<'_> {
    fn cpu(&self) -> CpuUse {
        let of = |pid: Option<u32>| pid.map_or(0.0, |p| cpu_seconds(&p.to_string()));
        CpuUse {
            own: cpu_seconds("self"),
            nats: of(self.nats_pid),
            s3: of(self.s3_pid),
        }
    }

    /// A raw replay of `[start, to]` and the CPU it took.
    async fn raw(&self, (start, to): (u64, u64)) -> anyhow::Result<((u64, Duration), CpuUse)> {
        let before = self.cpu();
        let raw = raw_replay(self.entities, self.filter, start, to).await?;
        Ok((raw, self.cpu() - before))
    }

    /// Best of several runs: the exports of `schedules` one after the
    /// other, a raw replay of `window` before the first and after each;
    /// the fastest export against the fastest raw replay, and the largest
    /// peak memory of any run. Prints the CPU time each side took in its
    /// fastest run: on a machine this small, the servers' share is what
    /// the ratio is made of.
    async fn best_of(
        &self,
        window: (u64, u64),
        schedules: &[String],
        name: &str,
        expect_rows: u64,
    ) -> anyhow::Result<(Vec<Row>, ExportJobRecord)> {
        let mut raw = self.raw(window).await?;
        let mut best: Option<(ExportJobRecord, Duration, CpuUse)> = None;
        let mut peak = 0f64;
        for schedule in schedules {
            let before = self.cpu();
            let (rec, elapsed, m) = export(self.js, self.jobs, schedule).await?;
            let cpu = self.cpu() - before;
            anyhow::ensure!(
                rec.rows == expect_rows,
                "{name} ({schedule}) holds {} rows, not {expect_rows}",
                rec.rows
            );
            let again = self.raw(window).await?;
            if rate(again.0) > rate(raw.0) {
                raw = again;
            }
            peak = peak.max(m);
            if best.as_ref().is_none_or(|(_, t, _)| elapsed < *t) {
                best = Some((rec, elapsed, cpu));
            }
        }
        let (rec, elapsed, cpu) = best.ok_or_else(|| anyhow::anyhow!("no runs"))?;
        let ((_, raw_took), raw_cpu) = raw;
        println!(
            "exports: {name}: CPU seconds of the fastest run ({:.2} s): exporter {:.2}, \
             nats-server {:.2}, S3 server {:.2}; of the fastest raw replay ({:.2} s): \
             reader {:.2}, nats-server {:.2}",
            elapsed.as_secs_f64(),
            cpu.own,
            cpu.nats,
            cpu.s3,
            raw_took.as_secs_f64(),
            raw_cpu.own,
            raw_cpu.nats,
        );
        Ok((rows(name, &rec, elapsed, raw.0, peak), rec))
    }
}

/// Waits until `EVENTS` has copied every `ENTITIES` message written so
/// far (a server still copying would be measured with whatever runs
/// beside it); prints how long that took.
async fn sourced(js: &jetstream::Context, what: &str) {
    let t = Instant::now();
    eventually(Duration::from_secs(1800), "EVENTS to copy ENTITIES", || {
        events_caught_up(js)
    })
    .await;
    println!(
        "exports: EVENTS had copied the {what} {:.1}s after they were written",
        t.elapsed().as_secs_f64()
    );
}

fn rate(r: (u64, Duration)) -> f64 {
    r.0 as f64 / r.1.as_secs_f64().max(1e-9)
}

pub async fn run(nats: &NatsServer) -> anyhow::Result<Vec<Row>> {
    let n = env_usize("BENCH_EXPORT_ENTITIES", 1_000_000);
    let changes = env_usize("BENCH_EXPORT_CHANGES", 100_000).min(n);
    let runs = env_usize("BENCH_EXPORT_RUNS", 5).max(1);
    let client = nats.client().await;
    // A long ack timeout: the bulk writes below keep many publishes in
    // flight on a machine that flushes every write to disk.
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(120))
        .build(client.clone());
    let s3 = S3Server::start();
    s3.create_bucket("bench");

    let settings = meterline_exporter::Settings {
        workers: 1,
        ..meterline_exporter::Settings::for_tests(nats.url())
    };
    let app = meterline_exporter::App::build(settings).await?;
    let exporter = Running::spawn(|stop| app.run_until_stopped(stop));
    let jobs = js.get_key_value(provision::EXPORT_JOBS_BUCKET).await?;
    let entities = js.get_stream(subjects::ENTITIES_STREAM).await?;

    // A destination on the S3 server (its secret sealed as entities seals
    // it) and two schedules: one to it, one without destination.
    let sealer = Sealer::from_base64(meterline_exporter::TEST_SEALING_KEY)?;
    let dest = json!({
        "id": "bench-s3", "version": 1, "name": "Bench S3", "code": "bench-s3",
        "bucketName": "bench", "prefix": "exports", "endpointUrl": s3.endpoint(),
        "pathStyle": true, "accessKeyId": s3.access_key(),
        "secretAccessKey": sealer.seal(s3.secret_key()).map_err(|e| anyhow::anyhow!("{e}"))?,
    });
    let schedule = |id: &str, destinations: Vec<&str>| {
        json!({
            "id": id, "version": 1, "name": id, "code": id, "sourceType": "OPERATIONAL",
            "operationalDataTypes": ["ACCOUNTS"], "destinationIds": destinations,
            "scheduleType": "HOUR", "period": 1,
        })
    };
    // One schedule per run and destination, so every run of an export
    // covers the same window from its own cursor.
    let local: Vec<String> = (1..=runs).map(|i| format!("local-{i}")).collect();
    let remote: Vec<String> = (1..=runs).map(|i| format!("s3-{i}")).collect();
    let mut config = vec![event(
        "exportdestination",
        "bench-s3",
        Action::Created,
        Some(dest),
        None,
    )];
    for id in &local {
        config.push(event(
            "exportschedule",
            id,
            Action::Created,
            Some(schedule(id, vec![])),
            None,
        ));
    }
    for id in &remote {
        config.push(event(
            "exportschedule",
            id,
            Action::Created,
            Some(schedule(id, vec!["bench-s3"])),
            None,
        ));
    }
    write(&js, config.into_iter()).await?;

    let t = Instant::now();
    write(
        &js,
        (0..n).map(|i| {
            event(
                "account",
                &format!("acct-{i:08}"),
                Action::Created,
                Some(account(i, 1)),
                None,
            )
        }),
    )
    .await?;
    let sample = serde_json::to_vec(&event(
        "account",
        "x",
        Action::Created,
        Some(account(0, 1)),
        None,
    ))?
    .len();
    println!(
        "exports: {n} accounts written to ENTITIES in {:.1}s ({sample} bytes each)",
        t.elapsed().as_secs_f64()
    );
    sourced(&js, "accounts").await;
    let filter = subjects::entity_type_filter(ORG, "account");
    let mut out = Vec::new();

    // Initial exports: every account.
    if std::env::var_os("BENCH_EXPORT_PROBE").is_some() {
        let last = entities.get_info().await?.state.last_sequence;
        let nats_pid = nats.pid().map(|p| p.to_string()).unwrap_or_default();
        probe_consumers(&entities, &filter, last, &nats_pid).await?;
        probe(
            "one connection",
            std::slice::from_ref(&entities),
            None,
            last,
        )
        .await?;
    }
    let bench = Bench {
        js: &js,
        jobs: &jobs,
        entities: &entities,
        filter: &filter,
        nats_pid: nats.pid(),
        s3_pid: s3.pid(),
    };
    let whole = (1, u64::MAX);
    let (figures, first) = bench
        .best_of(whole, &local, "initial export to local files", n as u64)
        .await?;
    out.extend(figures);
    let (figures, _) = bench
        .best_of(whole, &remote, "initial export to S3", n as u64)
        .await?;
    out.extend(figures);

    // A window of changes: updates of distinct accounts, spread over all.
    let step = (n / changes.max(1)).max(1);
    let t = Instant::now();
    write(
        &js,
        (0..changes).map(|k| {
            let i = (k * step) % n;
            let id = format!("acct-{i:08}");
            event(
                "account",
                &id,
                Action::Updated,
                Some(account(i, 2)),
                Some(account(i, 1)),
            )
        }),
    )
    .await?;
    println!(
        "exports: {changes} updates written in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    sourced(&js, "updates").await;
    let from = first.to_sequence.unwrap_or(0) + 1;
    let last = entities.get_info().await?.state.last_sequence;
    if std::env::var_os("BENCH_EXPORT_PROBE").is_some() {
        let raw = raw_replay(&entities, &filter, from, last).await?;
        println!(
            "probe: raw {:.0} rows/s",
            raw.0 as f64 / raw.1.as_secs_f64()
        );
        // One connection for both parts of the window, or one each.
        let second = jetstream::new(nats.client().await)
            .get_stream(subjects::ENTITIES_STREAM)
            .await?;
        for _ in 0..4 {
            let one = [entities.clone(), entities.clone()];
            probe("one connection", &one, Some(from - 1), last).await?;
            let two = [entities.clone(), second.clone()];
            probe("two connections", &two, Some(from - 1), last).await?;
        }
        // Would two consumers, each on half the window, read it faster?
        let mid = from + (last - from) / 2;
        let t = Instant::now();
        let (a, b) = tokio::try_join!(
            raw_replay(&entities, &filter, from, mid),
            raw_replay(&entities, &filter, mid + 1, last)
        )?;
        println!(
            "probe: raw in two halves at once {:.0} rows/s",
            (a.0 + b.0) as f64 / t.elapsed().as_secs_f64()
        );
    }
    let window = (from, last);
    for (schedules, name) in [
        (&local, "incremental export to local files"),
        (&remote, "incremental export to S3"),
    ] {
        let (figures, _) = bench
            .best_of(window, schedules, name, changes as u64)
            .await?;
        out.extend(figures);
    }
    exporter.stop().await;
    Ok(out)
}
