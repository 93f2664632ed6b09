//! A node of a three-node NATS cluster killed (SIGKILL) and restarted while producers and
//! workers run on `nats://…?replicas=3`: every confirmed produce is delivered or still
//! stored, and no message whose ack was confirmed is delivered again.
//!
//! `QUEUE_NATS_KILLS` sets how many kills (each of the next node, round robin; 2 by
//! default), `QUEUE_NATS_RUN_SECS` how long producers run around them (6 by default).

mod nats;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use queue_core::{Channel, MessageId, Outcome, Queue, channel, codec};
use serde::{Deserialize, Serialize};

#[channel("loss/jobs", lease = "3s", max_attempts = 1000, backoff = "100ms")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub n: u64,
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Default)]
struct Record {
    /// Confirmed produces: id → n.
    produced: HashMap<MessageId, u64>,
    /// Every message delivered at least once.
    delivered: HashSet<MessageId>,
    /// Confirmed acks: id → when confirmed.
    acked: HashMap<MessageId, Instant>,
    /// Deliveries after their message's ack was confirmed.
    came_back: Vec<MessageId>,
    produce_errors: u64,
    settle_errors: u64,
    /// The last confirmed produce, and the longest time between two.
    last_produce: Option<Instant>,
    longest_gap: Duration,
}

async fn open(url: &str) -> Queue {
    queue_runtime::connect(url)
        .await
        .expect("nats cluster queue")
}

async fn work(queue: Queue, record: Arc<Mutex<Record>>, stop: Arc<AtomicBool>) {
    let spec = JobChannel::SPEC;
    let sub = loop {
        match queue.adapter().subscribe(&spec, 8).await {
            Ok(sub) => break sub,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    while !stop.load(Ordering::Acquire) {
        let Ok(Ok(d)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await else {
            continue;
        };
        {
            let mut r = record.lock();
            if r.acked.contains_key(&d.lease.id) {
                r.came_back.push(d.lease.id);
            }
            r.delivered.insert(d.lease.id);
        }
        let _: Job = codec::decode(&d.payload).expect("payload");
        match queue.adapter().settle(&d.lease, Outcome::Ack).await {
            Ok(()) => {
                record.lock().acked.insert(d.lease.id, Instant::now());
            }
            Err(_) => record.lock().settle_errors += 1,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_no_confirmed_produce_and_brings_back_no_confirmed_ack() {
    // Every call is bounded (30 s of retries); a run that does not end fails instead of
    // holding CI.
    let bound = Duration::from_secs(120 + 2 * env("QUEUE_NATS_RUN_SECS", 6));
    tokio::time::timeout(bound, run())
        .await
        .expect("the node-loss run did not end");
}

async fn run() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
    let mut servers = nats::Servers::cluster();
    // Snapshots every 64 commands: the stream is purged while nodes die, and the checker, a
    // client that starts at the end, rebuilds the state from a snapshot.
    let url = servers.url("replicas=3&compact_every=64");
    let kills = env("QUEUE_NATS_KILLS", 2) as usize;
    let run = Duration::from_secs(env("QUEUE_NATS_RUN_SECS", 6));
    let record = Arc::new(Mutex::new(Record::default()));
    let stop_producing = Arc::new(AtomicBool::new(false));
    let stop_working = Arc::new(AtomicBool::new(false));
    let next_n = Arc::new(AtomicU64::new(0));

    let mut producers = Vec::new();
    for _ in 0..2 {
        let queue = open(&url).await;
        let (record, stop, next_n) = (record.clone(), stop_producing.clone(), next_n.clone());
        producers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let n = next_n.fetch_add(1, Ordering::Relaxed);
                match Job::produce(&queue, Job { n }).await {
                    Ok(receipt) => {
                        let mut r = record.lock();
                        r.produced.insert(receipt.id, n);
                        let now = Instant::now();
                        if let Some(last) = r.last_produce {
                            r.longest_gap = r.longest_gap.max(now - last);
                        }
                        r.last_produce = Some(now);
                    }
                    Err(_) => record.lock().produce_errors += 1,
                }
            }
            queue.close().await.ok();
        }));
    }
    let mut workers = Vec::new();
    for _ in 0..2 {
        let queue = open(&url).await;
        workers.push(tokio::spawn(work(
            queue,
            record.clone(),
            stop_working.clone(),
        )));
    }

    let started = Instant::now();
    let mut killed = Vec::new();
    for k in 0..kills {
        let at = run.mul_f64((k as f64 + 0.5) / kills as f64);
        tokio::time::sleep(at.saturating_sub(started.elapsed())).await;
        let node = k % servers.nodes.len();
        let before = record.lock().produced.len();
        tokio::task::block_in_place(|| servers.nodes[node].kill());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tokio::task::block_in_place(|| servers.nodes[node].restart());
        killed.push((node, before));
    }
    tokio::time::sleep(run.saturating_sub(started.elapsed())).await;
    stop_producing.store(true, Ordering::Release);
    for p in producers {
        p.await.unwrap();
    }

    // Drain: until every confirmed produce was delivered and nothing is pending. (An ack
    // applied whose confirmation failed leaves a message delivered, gone, and not in
    // `acked`.)
    let checker = open(&url).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all_delivered = {
            let r = record.lock();
            r.produced.keys().all(|id| r.delivered.contains(id))
        };
        let pending = checker
            .stats()
            .await
            .ok()
            .and_then(|all| all.into_iter().find(|s| s.channel == "loss/jobs"))
            .is_none_or(|s| s.ready + s.in_flight + s.delayed > 0);
        if (all_delivered && !pending) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_working.store(true, Ordering::Release);
    for w in workers {
        w.await.unwrap();
    }

    let stats = checker
        .stats()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.channel == "loss/jobs")
        .expect("the channel");
    let stored: HashSet<MessageId> = checker
        .peek("loss/jobs", 1_000_000)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    checker.close().await.unwrap();
    let r = record.lock();
    let missing: Vec<&MessageId> = r
        .produced
        .keys()
        .filter(|id| !r.delivered.contains(id) && !stored.contains(id))
        .collect();
    let acked_confirmed = r.acked.len();
    println!(
        "kills (node, confirmed produces before): {killed:?}; confirmed produces {}, \
         produce errors {}, longest pause between confirmed produces {:?}, confirmed acks {acked_confirmed}, settle errors {}, \
         stats: produced {} acked {} ready {} in flight {} lease expiries {}",
        r.produced.len(),
        r.produce_errors,
        r.longest_gap,
        r.settle_errors,
        stats.produced,
        stats.acked,
        stats.ready,
        stats.in_flight,
        stats.lease_expiries,
    );
    assert!(!r.produced.is_empty(), "nothing was produced");
    assert!(
        missing.is_empty(),
        "confirmed produces neither delivered nor stored: {missing:?}"
    );
    assert!(
        r.came_back.is_empty(),
        "delivered again after a confirmed ack: {:?}",
        r.came_back
    );
    for id in r.acked.keys() {
        assert!(!stored.contains(id), "message {id} acked and still stored");
    }
    assert!(stats.acked >= acked_confirmed as u64);
}
