//! `make bench`: Meterline's figures beside the raw bus figures for the same
//! work, measured in the same run against the same nats-server (JetStream,
//! `sync_interval: always`), printed as one table with ratios.
//!
//! - Entity writes ([`entities`]): creates and version-checked updates
//!   through the entities service's NATS request path, beside the same
//!   number of `Nats-Expected-Last-Subject-Sequence` publishes of the same
//!   bytes on a bare stream, at the same concurrency.
//! - Ingest ([`ingest`]): measurements per second in 1000-measurement
//!   batches with de-duplication on, over the NATS request path and through
//!   the gateway over HTTP, beside raw JetStream publishes of the same bytes
//!   in the same messages; p99 request latency; CPU time per batch;
//!   memory per remembered uid.
//! - Scheduler ([`scheduler`]): with 10,000 active schedules, the delay from
//!   a slot to its job request on `JOBS` (p50, p99) beside a bare timer
//!   publishing at the same times, and CPU while idle between slots beside
//!   the same process with nothing scheduled.
//! - Exports ([`exports`]): rows per second of initial (1,000,000 entities)
//!   and incremental (100,000 changes) export jobs to the download store and
//!   to an S3 server, beside a raw ordered-consumer replay of the same
//!   messages; the exporter's peak memory. `BENCH_EXPORT_ENTITIES`,
//!   `BENCH_EXPORT_CHANGES` set the sizes.
//! - Notifications ([`notifier`]): event-to-webhook latency at a steady
//!   1000 events per second with 100 rules, and deliveries per second to a
//!   local receiver, beside core NATS request/reply on the same server.
//!
//! The machine is shared and noisy: Meterline and raw runs alternate in
//! rounds so both see the same background load. Sizes can be set with
//! `BENCH_ENTITY_OPS`, `BENCH_INGEST_BATCHES`, `BENCH_SCHEDULES` and `BENCH_CONCURRENCY`; `cargo run
//! --release -p meterline-bench -- ingest` runs only the named parts.

mod entities;
mod exports;
mod ingest;
mod notifier;
mod scheduler;

use std::time::{Duration, Instant};

use futures::StreamExt;

use meterline_shared::testkit::NatsServer;

pub const ORG: &str = "bench";

// The same allocator as the service binaries, so in-process services run as
// they do in production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Operations, their total time and each one's latency.
pub struct Figure {
    pub ops: usize,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

impl Figure {
    pub fn empty() -> Figure {
        Figure {
            ops: 0,
            elapsed: Duration::ZERO,
            latencies: Vec::new(),
        }
    }
    pub fn add(&mut self, other: Figure) {
        self.ops += other.ops;
        self.elapsed += other.elapsed;
        self.latencies.extend(other.latencies);
    }
    /// Operations per second, counting each operation as `weight` units
    /// (e.g. measurements per batch).
    pub fn rate(&self, weight: usize) -> f64 {
        (self.ops * weight) as f64 / self.elapsed.as_secs_f64()
    }
    pub fn pct(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l[((l.len() as f64 * p).ceil() as usize)
            .saturating_sub(1)
            .min(l.len() - 1)]
    }
}

/// Runs `n` operations `f(i)` with `concurrency` in flight; records each
/// operation's latency.
pub async fn measure<F, Fut>(n: usize, concurrency: usize, f: F) -> anyhow::Result<Figure>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let start = Instant::now();
    let latencies: Vec<Duration> = futures::stream::iter(0..n)
        .map(|i| {
            let fut = f(i);
            async move {
                let t = Instant::now();
                fut.await.map(|_| t.elapsed())
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    Ok(Figure {
        ops: n,
        elapsed: start.elapsed(),
        latencies,
    })
}

/// One line of the table.
pub struct Row {
    pub figure: String,
    pub meterline: String,
    pub raw: String,
    pub ratio: String,
}

pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// Rows for a throughput (higher is better) and p50/p99 latency comparison.
pub fn compare(name: &str, unit: &str, weight: usize, ml: &Figure, raw: &Figure) -> Vec<Row> {
    let mut rows = vec![Row {
        figure: format!("{name}: {unit}/s"),
        meterline: format!("{:.0}", ml.rate(weight)),
        raw: format!("{:.0}", raw.rate(weight)),
        ratio: format!("{:.2}", ml.rate(weight) / raw.rate(weight)),
    }];
    for (label, p) in [("p50", 0.50), ("p99", 0.99)] {
        rows.push(Row {
            figure: format!("{name}: {label} latency ms"),
            meterline: ms(ml.pct(p)),
            raw: ms(raw.pct(p)),
            ratio: format!("{:.2}", ml.pct(p).as_secs_f64() / raw.pct(p).as_secs_f64()),
        });
    }
    rows
}

/// CPU time (user and system) a process (`self` for this one) has used so
/// far, from `/proc/<pid>/stat`, in clock ticks (100 per second on Linux).
pub fn cpu_ticks(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // The fields after the command name, which is in parentheses.
            let rest = s.rsplit_once(')')?.1.to_owned();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs of the services run in-process, only when asked for.
    if std::env::var_os("RUST_LOG").is_some() {
        meterline_shared::telemetry::init("bench");
    }
    let nats = NatsServer::start();
    println!(
        "nats-server {} (JetStream, sync_interval: always)",
        nats.url()
    );
    // `make bench` runs every part; `cargo run -p meterline-bench -- ingest`
    // runs only the parts whose names are given.
    let only: Vec<String> = std::env::args().skip(1).collect();
    let wanted = |part: &str| only.is_empty() || only.iter().any(|o| o == part);
    let mut rows = Vec::new();
    if wanted("entities") {
        rows.extend(entities::run(&nats).await?);
    }
    if wanted("ingest") {
        rows.extend(ingest::run(&nats).await?);
    }
    if wanted("scheduler") {
        rows.extend(scheduler::run(&nats).await?);
    }
    if wanted("exports") {
        rows.extend(exports::run(&nats).await?);
    }
    if wanted("notifier") {
        rows.extend(notifier::run(&nats).await?);
    }
    println!();
    println!("| figure | Meterline | raw bus | ratio |");
    println!("|---|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} |",
            r.figure, r.meterline, r.raw, r.ratio
        );
    }
    println!();
    println!("ratio: rates Meterline / raw (higher is better, 1.00 = the bus's own speed); latencies Meterline / raw (lower is better).");
    Ok(())
}
