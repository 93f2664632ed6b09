//! Throughput of the `postgres://` adapter with a pool of 8 connections: produce (one
//! message per commit, and batches of 64), consume+ack through the consumer loop, and the
//! dequeue rate while draining a deep backlog (1,000,000 messages by default), printed per
//! slice of the backlog to show that it does not collapse as dead rows pile up.
//!
//! ```text
//! QUEUE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:55432/queue_test \
//!     cargo bench -p queue-runtime --bench postgres
//! ```
//!
//! `QUEUE_BENCH_BACKLOG` sets the backlog (0 skips that part); each run uses a fresh schema
//! and drops it at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use queue_core::{Queue, channel};
use queue_runtime::adapters::postgres::Postgres;
use serde::{Deserialize, Serialize};

#[channel("bench/pg", lease = "60s")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Msg {
    body: String,
}

fn msg() -> Msg {
    // About 256 bytes of BSON.
    Msg {
        body: "x".repeat(236),
    }
}

const CONNECTIONS: usize = 8;

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too, briefly.
    let quick = !std::env::args().any(|a| a == "--bench");
    let Ok(server) = std::env::var("QUEUE_TEST_POSTGRES_URL") else {
        eprintln!("QUEUE_TEST_POSTGRES_URL is not set: this benchmark needs a PostgreSQL server");
        std::process::exit(1);
    };
    let backlog: u64 = std::env::var("QUEUE_BENCH_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 2_000 } else { 1_000_000 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let schema = format!("bench_{}", std::process::id());
        let sep = if server.contains('?') { '&' } else { '?' };
        let url = format!("{server}{sep}schema={schema}&pool_size={CONNECTIONS}");
        let queue = queue_runtime::connect(&url).await.expect("connect");
        let scale = if quick { 20 } else { 1 };
        println!("postgres adapter, {CONNECTIONS} connections, 256-byte messages");
        produce(&queue, 64, 20_000 / scale).await;
        produce_batches(&queue, 64, 200_000 / scale).await;
        consume(&queue, 100_000 / scale).await;
        if backlog > 0 {
            drain(&queue, backlog).await;
        }
        queue.close().await.unwrap();
        let (client, conn) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    });
}

fn rate(n: u64, d: Duration) -> String {
    format!("{:.0} msg/s", n as f64 / d.as_secs_f64())
}

/// `tasks` producers, one message per produce (one commit each), `n` messages in all.
async fn produce(queue: &Queue, tasks: u64, n: u64) {
    let start = Instant::now();
    let mut joins = Vec::new();
    for t in 0..tasks {
        let queue = queue.clone();
        let share = n / tasks + u64::from(t < n % tasks);
        joins.push(tokio::spawn(async move {
            let m = msg();
            for _ in 0..share {
                Msg::produce(&queue, m.clone()).await.unwrap();
            }
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    println!(
        "produce, 1 message per commit, {tasks} producers: {} ({n} messages in {:.2?})",
        rate(n, start.elapsed()),
        start.elapsed()
    );
}

/// `tasks` producers of batches of 64.
async fn produce_batches(queue: &Queue, tasks: u64, n: u64) {
    let batches = n / 64;
    let start = Instant::now();
    let mut joins = Vec::new();
    for t in 0..tasks {
        let queue = queue.clone();
        let share = batches / tasks + u64::from(t < batches % tasks);
        joins.push(tokio::spawn(async move {
            let batch: Vec<Msg> = (0..64).map(|_| msg()).collect();
            let p = Msg::producer(&queue);
            for _ in 0..share {
                p.produce_batch(batch.clone()).await.unwrap();
            }
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    let n = batches * 64;
    println!(
        "produce, batches of 64, {tasks} producers: {} ({n} messages in {:.2?})",
        rate(n, start.elapsed()),
        start.elapsed()
    );
}

async fn acked(queue: &Queue) -> u64 {
    queue
        .stats()
        .await
        .unwrap()
        .iter()
        .find(|s| s.channel == "bench/pg")
        .map_or(0, |s| s.acked)
}

async fn pending(queue: &Queue) -> u64 {
    queue
        .stats()
        .await
        .unwrap()
        .iter()
        .find(|s| s.channel == "bench/pg")
        .map_or(0, |s| s.ready + s.in_flight + s.delayed)
}

/// Starts `consumers` consumers taking up to 64 each and acking every message; returns a
/// counter of handled messages.
async fn start_consumers(
    queue: &Queue,
    consumers: usize,
) -> (Vec<queue_core::ConsumerHandle>, Arc<AtomicU64>) {
    let handled = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for _ in 0..consumers {
        let handled = handled.clone();
        handles.push(
            Msg::consumer(queue)
                .max_parallel(64)
                .handle(move |_m: Msg| {
                    handled.fetch_add(1, Ordering::Relaxed);
                    async {}
                })
                .await
                .unwrap(),
        );
    }
    (handles, handled)
}

/// Consume+ack of everything produced so far plus `n` more.
async fn consume(queue: &Queue, n: u64) {
    let producer = Msg::producer(queue);
    let batch: Vec<Msg> = (0..64).map(|_| msg()).collect();
    for _ in 0..n / 64 {
        producer.produce_batch(batch.clone()).await.unwrap();
    }
    let total = pending(queue).await;
    let before = acked(queue).await;
    let start = Instant::now();
    let (handles, handled) = start_consumers(queue, 2).await;
    while handled.load(Ordering::Relaxed) < total {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while acked(queue).await - before < total {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = start.elapsed();
    for h in handles {
        h.stop(Duration::from_secs(5)).await.unwrap();
    }
    println!(
        "consume+ack, 2 consumers taking up to 64 each: {} ({total} messages in {took:.2?})",
        rate(total, took)
    );
}

/// Fills a backlog of `n`, then drains it, printing the dequeue rate per tenth.
async fn drain(queue: &Queue, n: u64) {
    let n = (n / 1000).max(1) * 1000;
    let pg = Postgres::of(queue).unwrap();
    let start = Instant::now();
    produce_batches_quiet(queue, n).await;
    println!(
        "backlog of {n} produced in {:.1?} ({})",
        start.elapsed(),
        rate(n, start.elapsed())
    );
    let before = acked(queue).await;
    let start = Instant::now();
    let (handles, handled) = start_consumers(queue, 2).await;
    let slice = (n / 10).max(1);
    let mut mark = Instant::now();
    let mut next = slice;
    let mut slowest = f64::MAX;
    let mut fastest = 0f64;
    while handled.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let done = handled.load(Ordering::Relaxed);
        if done >= next {
            let r = slice as f64 / mark.elapsed().as_secs_f64();
            slowest = slowest.min(r);
            fastest = fastest.max(r);
            println!(
                "  drained {done:>8} of {n}: {r:.0} msg/s over the last {slice}, {} dead rows",
                dead_rows(&pg).await
            );
            mark = Instant::now();
            next += slice;
        }
    }
    while acked(queue).await - before < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = start.elapsed();
    for h in handles {
        h.stop(Duration::from_secs(5)).await.unwrap();
    }
    println!(
        "dequeue+ack from a backlog of {n}: {} overall, slices from {slowest:.0} to {fastest:.0} msg/s ({took:.1?})",
        rate(n, took)
    );
}

async fn produce_batches_quiet(queue: &Queue, n: u64) {
    let batches = n / 1000;
    let tasks = CONNECTIONS as u64;
    let mut joins = Vec::new();
    for t in 0..tasks {
        let queue = queue.clone();
        let share = batches / tasks + u64::from(t < batches % tasks);
        joins.push(tokio::spawn(async move {
            let batch: Vec<Msg> = (0..1000).map(|_| msg()).collect();
            let p = Msg::producer(&queue);
            for _ in 0..share {
                p.produce_batch(batch.clone()).await.unwrap();
            }
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
}

async fn dead_rows(pg: &Postgres) -> i64 {
    let client = pg.pool().get().await.unwrap();
    client
        .query_one(
            "SELECT coalesce(n_dead_tup, 0) FROM pg_stat_user_tables WHERE relid = to_regclass($1)",
            &[&format!("{}.messages", pg.schema())],
        )
        .await
        .map_or(-1, |r| r.get(0))
}
