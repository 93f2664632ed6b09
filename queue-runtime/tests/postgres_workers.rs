//! Two worker processes on one PostgreSQL database share a backlog, and no message is
//! processed twice: each handler records the message id in a table without a unique key,
//! so a message delivered to both workers would show up twice.
//!
//! Runs without the libtest harness: this binary is also the worker (`QUEUE_PG_WORKER` names
//! the schema). Needs `QUEUE_TEST_POSTGRES_URL`, which `.ci/run` sets; without it the test
//! fails.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use queue_core::{Delivery, channel};
use queue_runtime::adapters::postgres::Postgres;
use serde::{Deserialize, Serialize};

#[channel("pg/work", lease = "30s")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Work {
    n: i32,
}

const MESSAGES: i32 = 2_000;

fn main() {
    if let Ok(schema) = std::env::var("QUEUE_PG_WORKER") {
        let id: i32 = std::env::var("QUEUE_PG_WORKER_ID")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        worker(&schema, id);
        return;
    }
    let started = Instant::now();
    match parent() {
        Ok(summary) => {
            println!(
                "test two_worker_processes_share_the_load_and_process_each_message_once ... ok ({summary}, {:.1?})",
                started.elapsed()
            );
            println!("1 passed, 0 failed");
        }
        Err(e) => {
            println!(
                "test two_worker_processes_share_the_load_and_process_each_message_once ... FAILED: {e}"
            );
            println!("0 passed, 1 failed");
            std::process::exit(1);
        }
    }
}

fn server_url() -> Result<String, String> {
    std::env::var("QUEUE_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            "QUEUE_TEST_POSTGRES_URL is not set: this test needs a PostgreSQL server; `.ci/run` starts a throwaway one".to_string()
        })
}

fn url_for(schema: &str, pool: usize) -> Result<String, String> {
    let url = server_url()?;
    let sep = if url.contains('?') { '&' } else { '?' };
    Ok(format!("{url}{sep}schema={schema}&pool_size={pool}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A worker: consumes `pg/work`, recording each message it handles, until killed.
fn worker(schema: &str, id: i32) {
    runtime().block_on(async move {
        let url = url_for(schema, 4).expect("url");
        let queue = queue_runtime::connect(&url).await.expect("connect");
        let pg = Postgres::of(&queue).expect("postgres queue");
        let insert = Arc::new(format!(
            "INSERT INTO {schema}.processed (msg_id, worker, n) VALUES ($1, $2, $3)"
        ));
        let _consumer = Work::consumer(&queue)
            .max_parallel(8)
            .deliveries(move |d: Delivery<Work>| {
                let pool = pg.pool().clone();
                let insert = insert.clone();
                async move {
                    let client = pool.get().await.map_err(|e| e.to_string())?;
                    let msg_id = i64::try_from(d.id().0).map_err(|e| e.to_string())?;
                    client
                        .execute(insert.as_str(), &[&msg_id, &id, &d.message().n])
                        .await
                        .map_err(|e| e.to_string())?;
                    // A little work, so that both workers are busy at once.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    Ok::<(), String>(())
                }
            })
            .await
            .expect("consumer");
        println!("ready");
        std::future::pending::<()>().await;
    });
}

struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn parent() -> Result<String, String> {
    let schema = format!("w_{}_{}", std::process::id(), fastrand::u32(..));
    let url = url_for(&schema, 4)?;
    let rt = runtime();
    let queue = rt
        .block_on(queue_runtime::connect(&url))
        .map_err(|e| e.to_string())?;
    let pg = Postgres::of(&queue).map_err(|e| e.to_string())?;
    let result = run(&rt, &queue, &pg, &schema);
    rt.block_on(async {
        let _ = queue.close().await;
        if let Ok((client, conn)) =
            tokio_postgres::connect(&server_url()?, tokio_postgres::NoTls).await
        {
            tokio::spawn(conn);
            let _ = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .await;
        }
        Ok::<(), String>(())
    })?;
    result
}

fn run(
    rt: &tokio::runtime::Runtime,
    queue: &queue_core::Queue,
    pg: &Postgres,
    schema: &str,
) -> Result<String, String> {
    rt.block_on(async {
        let client = pg.pool().get().await.map_err(|e| e.to_string())?;
        client
            .batch_execute(&format!(
                "CREATE TABLE {schema}.processed (msg_id BIGINT NOT NULL, worker INT NOT NULL, n INT NOT NULL)"
            ))
            .await
            .map_err(|e| e.to_string())
    })?;

    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut workers = Workers(Vec::new());
    for id in 1..=2 {
        let child = Command::new(&exe)
            .env("QUEUE_PG_WORKER", schema)
            .env("QUEUE_PG_WORKER_ID", id.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawning a worker: {e}"))?;
        workers.0.push(child);
    }
    for child in &mut workers.0 {
        let stdout = child.stdout.take().ok_or("no worker stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if line.trim() != "ready" {
            return Err(format!("a worker did not start: {line:?}"));
        }
    }

    rt.block_on(async {
        let producer = Work::producer(queue);
        for start in (0..MESSAGES).step_by(100) {
            producer
                .produce_batch((start..(start + 100).min(MESSAGES)).map(|n| Work { n }))
                .await
                .map_err(|e| e.to_string())?;
        }
        let client = pg.pool().get().await.map_err(|e| e.to_string())?;
        let count = format!("SELECT count(*) FROM {schema}.processed");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let done: i64 = client
                .query_one(count.as_str(), &[])
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            let acked = queue
                .stats()
                .await
                .map_err(|e| e.to_string())?
                .iter()
                .find(|s| s.channel == "pg/work")
                .map_or(0, |s| s.acked);
            if done >= i64::from(MESSAGES) && acked >= MESSAGES as u64 {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "only {done} of {MESSAGES} messages processed ({acked} acked) after 120 s"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Late duplicates would show up here.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), count(DISTINCT msg_id), count(DISTINCT n),
                            count(*) FILTER (WHERE worker = 1), count(*) FILTER (WHERE worker = 2)
                     FROM {schema}.processed"
                ),
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        let (total, ids, ns, one, two): (i64, i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        let m = i64::from(MESSAGES);
        if total != m || ids != m || ns != m {
            return Err(format!(
                "{total} handler runs for {m} messages ({ids} distinct ids, {ns} distinct payloads)"
            ));
        }
        if one < m / 10 || two < m / 10 {
            return Err(format!(
                "the load was not shared: worker 1 handled {one}, worker 2 handled {two}"
            ));
        }
        let stats = queue.stats().await.map_err(|e| e.to_string())?;
        let s = stats
            .iter()
            .find(|s| s.channel == "pg/work")
            .ok_or("no stats")?;
        if (s.ready, s.in_flight, s.retried, s.lease_expiries) != (0, 0, 0, 0) {
            return Err(format!("unexpected stats after the run: {s:?}"));
        }
        Ok(format!(
            "{m} messages, worker 1 handled {one}, worker 2 handled {two}"
        ))
    })
}
