//! Disk use of the embedded store stays bounded by its live data: an old backlog that
//! nobody consumes, dead letters and long delays do not pin the segments written after them.
//!
//! `QUEUE_SPACE_MIB` sets how much is produced and acked meanwhile (default 24).

use std::sync::Arc;
use std::time::{Duration, Instant};

use queue_core::{Queue, VirtualClock, channel};
use queue_runtime::TokioSpawner;
use queue_runtime::adapters::file::{FileAdapter, FileOptions};
use serde::{Deserialize, Serialize};

#[channel("space/backlog")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Backlog {
    pub body: String,
}

#[channel("space/churn", max_attempts = 1)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Churn {
    pub body: String,
}

const SEGMENT: u64 = 1 << 20;

fn open(dir: &std::path::Path, clock: &VirtualClock) -> (Arc<FileAdapter>, Queue) {
    let options = FileOptions {
        segment_size: SEGMENT,
        background_compaction: false,
        ..FileOptions::default()
    };
    let adapter = FileAdapter::open(dir, Arc::new(clock.clone()), options).expect("open store");
    let queue = Queue::new(
        adapter.clone(),
        Arc::new(clock.clone()),
        Arc::new(TokioSpawner::current()),
        "file://test",
    );
    (adapter, queue)
}

fn disk_use(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".qlog"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// Produces and acks `bytes` on the churn channel in 4 KiB messages, with a compaction
/// after every segment's worth; returns the most disk in use at any compaction.
async fn churn(adapter: &FileAdapter, queue: &Queue, bytes: u64) -> u64 {
    let body = "c".repeat(4096);
    let spec = <ChurnChannel as queue_core::Channel>::SPEC;
    let sub = queue.adapter().subscribe(&spec, 64).await.unwrap();
    let mut done = 0u64;
    let mut most = 0;
    while done < bytes {
        let batch: Vec<Churn> = (0..32).map(|_| Churn { body: body.clone() }).collect();
        Churn::producer(queue).produce_batch(batch).await.unwrap();
        let mut acks = Vec::with_capacity(32);
        for _ in 0..32 {
            let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .expect("a delivery")
                .unwrap();
            let queue = queue.clone();
            acks.push(tokio::spawn(async move {
                queue
                    .adapter()
                    .settle(&d.lease, queue_core::Outcome::Ack)
                    .await
            }));
        }
        for ack in acks {
            ack.await.unwrap().unwrap();
        }
        let before = done / SEGMENT;
        done += 32 * 4096;
        if done / SEGMENT != before {
            adapter.compact().await.unwrap();
            most = most.max(disk_use(adapter.dir()));
        }
    }
    most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_backlog_dead_letters_and_delays_do_not_pin_later_segments() {
    let mib: u64 = std::env::var("QUEUE_SPACE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let dir = tempfile::tempdir().unwrap();
    let clock = VirtualClock::new(1_767_225_600_000);
    let (adapter, queue) = open(dir.path(), &clock);
    // 300 KiB nobody consumes, a long-delayed message, and a dead letter, all in segment 1.
    let body = "b".repeat(3000);
    let backlog: Vec<Backlog> = (0..100).map(|_| Backlog { body: body.clone() }).collect();
    Backlog::producer(&queue)
        .produce_batch(backlog)
        .await
        .unwrap();
    Backlog::producer(&queue)
        .delay(Duration::from_secs(30 * 86_400))
        .produce(Backlog {
            body: "d".repeat(100),
        })
        .await
        .unwrap();
    let spec = <ChurnChannel as queue_core::Channel>::SPEC;
    Churn::produce(
        &queue,
        Churn {
            body: "e".repeat(100),
        },
    )
    .await
    .unwrap();
    {
        let sub = queue.adapter().subscribe(&spec, 1).await.unwrap();
        let d = sub.next().await.unwrap();
        queue
            .adapter()
            .settle(
                &d.lease,
                queue_core::Outcome::DeadLetter {
                    error: "kept".into(),
                },
            )
            .await
            .unwrap();
    }
    let started = Instant::now();
    let most = churn(&adapter, &queue, mib << 20).await;
    let live = 100 * 3000 + 100 + 100;
    // The active segment, the one being prepared, and the relocated live data beside dead
    // space at most its own size.
    let bound = 2 * live + 3 * SEGMENT;
    assert!(
        most <= bound,
        "{most} bytes on disk at a compaction with {live} live bytes (bound {bound}); segments {:?}",
        adapter.segments()
    );
    queue.close().await.unwrap();
    drop(adapter);
    let reopened = Instant::now();
    let (adapter, queue) = open(dir.path(), &clock);
    let took = reopened.elapsed();
    let pending = queue.peek("space/backlog", 1_000).await.unwrap();
    assert_eq!(
        pending.len(),
        101,
        "the backlog and the delayed message are kept"
    );
    assert!(pending.iter().take(100).all(|m| m.payload.len() > 3000));
    let dead = queue.dead_letters("space/churn", 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].error, "kept");
    println!(
        "{mib} MiB produced and acked in {:.1?}: at most {most} bytes on disk (bound {bound}), {} segments now, reopen {took:.1?}",
        started.elapsed(),
        adapter.segments().len()
    );
}
