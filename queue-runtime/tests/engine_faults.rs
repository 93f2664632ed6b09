//! The engine under ordinary faults:
//!
//! - produce futures dropped while their commit is pending (a caller's timeout, a
//!   disconnected HTTP client): every message stored is deliverable before a reopen;
//! - a message that makes its worker process die (abort) is dead-lettered once its attempts
//!   are used, on the embedded store and through the broker, never handed out forever;
//! - a store that crashes before its first commit does not hand out a fencing token again;
//! - a duplicate is confirmed only once its original is durable;
//! - a message produced while a subscription waits is leased in its produce's commit, its
//!   attempt as durable as the message, without overtaking earlier messages and without
//!   being lost to a subscription that stops meanwhile.
//!
//! Runs without the libtest harness: this binary is also the worker (`FAULTS_WORKER`).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use parking_lot::{Condvar, Mutex};
use queue_core::{Channel, Delivery, Outcome, Queue, Subscription, VirtualClock, channel};
use queue_runtime::TokioSpawner;
use queue_runtime::adapters::file::writer::{Handle, Storage};
use queue_runtime::adapters::file::{FileAdapter, FileOptions};
use serde::{Deserialize, Serialize};

#[channel("faults/jobs")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub n: u32,
}

#[channel("faults/signups", exactly_once, dedup = "1m")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Signup {
    pub n: u32,
}

#[channel("faults/poison", max_attempts = 3, lease = "10m")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Poison {
    pub n: u32,
}

type Test = (&'static str, fn() -> Result<String, String>);

fn main() {
    if let Ok(url) = std::env::var("FAULTS_WORKER") {
        worker(&url);
        return;
    }
    let tests: [Test; 8] = [
        (
            "a_dropped_produce_is_either_not_stored_or_stored_and_deliverable",
            dropped_produces,
        ),
        (
            "a_duplicate_is_confirmed_only_once_its_original_is_durable",
            duplicate_waits_for_original,
        ),
        (
            "a_crash_before_the_first_commit_does_not_reuse_fencing_tokens",
            epoch_is_durable,
        ),
        (
            "a_message_produced_while_a_subscription_waits_is_leased_in_its_produce_commit",
            lease_on_arrival,
        ),
        (
            "a_message_leased_on_arrival_does_not_overtake_earlier_ones_still_committing",
            arrival_keeps_order,
        ),
        (
            "a_message_leased_on_arrival_to_a_subscription_that_stops_goes_to_another",
            arrival_to_a_stopped_subscription,
        ),
        (
            "a_message_that_kills_its_worker_is_dead_lettered_on_the_embedded_store",
            poison_embedded,
        ),
        (
            "a_message_that_kills_its_worker_is_dead_lettered_through_the_broker",
            poison_broker,
        ),
    ];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut failed = 0;
    let mut passed = 0;
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        match test() {
            Ok(summary) => {
                passed += 1;
                println!("test {name} ... ok ({summary})");
            }
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED: {e}");
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Storage whose syncs wait while the gate is closed, and are counted.
#[derive(Default)]
struct Gate {
    closed: Mutex<bool>,
    opened: Condvar,
    syncs: AtomicU64,
}

impl Gate {
    fn set(&self, closed: bool) {
        *self.closed.lock() = closed;
        self.opened.notify_all();
    }

    fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }
}

struct StallingStorage(Arc<Gate>);

impl Storage for StallingStorage {
    fn sync_data(&self, file: &Handle) -> std::io::Result<()> {
        let mut closed = self.0.closed.lock();
        while *closed {
            self.0.opened.wait(&mut closed);
        }
        drop(closed);
        self.0.syncs.fetch_add(1, Ordering::SeqCst);
        file.file()?.sync_data()
    }
}

fn open_gated(dir: &Path, gate: &Arc<Gate>) -> (Arc<FileAdapter>, Queue) {
    let clock = VirtualClock::new(1_767_225_600_000);
    let options = FileOptions {
        segment_size: 1 << 20,
        storage: Arc::new(StallingStorage(gate.clone())),
        background_compaction: false,
        // Commits wait for the gate on the writer thread, so that produces can be dropped
        // while theirs is pending (a producer leading its commit would wait in its poll).
        lead_commits: false,
    };
    let adapter = FileAdapter::open(dir, Arc::new(clock.clone()), options).expect("open store");
    let queue = Queue::new(
        adapter.clone(),
        Arc::new(clock),
        Arc::new(TokioSpawner::current()),
        "file://test",
    );
    (adapter, queue)
}

async fn pending_ids(queue: &Queue, channel: &str) -> BTreeSet<u64> {
    queue
        .peek(channel, 100_000)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.id.0)
        .collect()
}

/// Produce futures dropped before their first poll, right after it, and at random times
/// while the commit is stalled: after the stall ends, what a reopen finds is exactly what
/// was deliverable before it.
fn dropped_produces() -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let gate = Arc::new(Gate::default());
    runtime().block_on(async {
        let (adapter, queue) = open_gated(dir.path(), &gate);
        gate.set(true);
        let mut started = 0;
        let mut timed = Vec::new();
        for n in 0..400u32 {
            let job = Job { n };
            match n % 4 {
                // Never polled: nothing is stored.
                0 => drop(Job::produce(&queue, job)),
                // Polled once, then dropped while the commit waits.
                1 | 2 => {
                    started += 1;
                    assert!(Job::produce(&queue, job).now_or_never().is_none());
                }
                // Given up on by a timeout at some point.
                _ => {
                    let queue = queue.clone();
                    let after = Duration::from_micros(u64::from(n) * 37 % 3_000);
                    timed.push(tokio::spawn(async move {
                        tokio::time::timeout(after, Job::produce(&queue, job)).await
                    }));
                }
            }
        }
        // Signups retried after a dropped first attempt are answered with an id a consumer
        // can see.
        assert!(
            Signup::produce(&queue, Signup { n: 1 })
                .now_or_never()
                .is_none()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        gate.set(false);
        for t in timed {
            let _ = t.await;
        }
        let again = Signup::produce(&queue, Signup { n: 1 })
            .await
            .map_err(|e| e.to_string())?;
        if !again.duplicate {
            return Err("the retried signup was not a duplicate".into());
        }
        // One more awaited produce: every earlier commit is done once it returns.
        Job::produce(&queue, Job { n: 1_000 })
            .await
            .map_err(|e| e.to_string())?;
        let before = pending_ids(&queue, JobChannel::SPEC.name.as_ref()).await;
        let signups_before = pending_ids(&queue, SignupChannel::SPEC.name.as_ref()).await;
        if !signups_before.contains(&again.id.0) {
            return Err(format!(
                "the original of the duplicate ({}) cannot be delivered",
                again.id
            ));
        }
        queue.close().await.map_err(|e| e.to_string())?;
        drop(adapter);
        let (_adapter, queue) = open_gated(dir.path(), &gate);
        let after = pending_ids(&queue, JobChannel::SPEC.name.as_ref()).await;
        if before != after {
            let hidden: Vec<_> = after.difference(&before).take(5).collect();
            return Err(format!(
                "{} messages were stored but not deliverable before the reopen (e.g. {hidden:?}); {} before, {} after",
                after.difference(&before).count(),
                before.len(),
                after.len()
            ));
        }
        if before.len() < started + 1 {
            return Err(format!(
                "only {} of the {started} started produces were stored",
                before.len() - 1
            ));
        }
        Ok(format!(
            "400 produces dropped at different points; {} stored and deliverable before and after the reopen, none hidden",
            before.len() - 1
        ))
    })
}

/// While the original's commit is stalled, its duplicate is not confirmed.
fn duplicate_waits_for_original() -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let gate = Arc::new(Gate::default());
    runtime().block_on(async {
        let (_adapter, queue) = open_gated(dir.path(), &gate);
        gate.set(true);
        let q = queue.clone();
        let original = tokio::spawn(async move { Signup::produce(&q, Signup { n: 7 }).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let q = queue.clone();
        let duplicate = tokio::spawn(async move { Signup::produce(&q, Signup { n: 7 }).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        if duplicate.is_finished() {
            return Err("the duplicate was confirmed while its original was not durable".into());
        }
        gate.set(false);
        let original = original.await.unwrap().map_err(|e| e.to_string())?;
        let duplicate = duplicate.await.unwrap().map_err(|e| e.to_string())?;
        if !duplicate.duplicate || duplicate.id != original.id {
            return Err(format!("{duplicate:?} is not a duplicate of {original:?}"));
        }
        Ok("confirmed after the original's commit".into())
    })
}

/// A copy of the store taken right after open (what a crash leaves) reopens with a new
/// epoch: its first token differs from the one the original run handed out.
fn epoch_is_durable() -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let copy = tempfile::tempdir().map_err(|e| e.to_string())?;
    let gate = Arc::new(Gate::default());
    runtime().block_on(async {
        {
            let (_a, queue) = open_gated(dir.path(), &gate);
            Job::produce(&queue, Job { n: 1 })
                .await
                .map_err(|e| e.to_string())?;
            queue.close().await.map_err(|e| e.to_string())?;
        }
        let (_a, queue) = open_gated(dir.path(), &gate);
        for entry in std::fs::read_dir(dir.path()).map_err(|e| e.to_string())? {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.extension().is_some_and(|e| e == "qlog") {
                std::fs::copy(&path, copy.path().join(path.file_name().unwrap()))
                    .map_err(|e| e.to_string())?;
            }
        }
        let first = first_token(&queue).await?;
        let (_b, crashed) = open_gated(copy.path(), &gate);
        let second = first_token(&crashed).await?;
        if first == second {
            return Err(format!(
                "token {first} was handed out by both runs of the same epoch"
            ));
        }
        Ok(format!("tokens {first:#x} and {second:#x}"))
    })
}

async fn first_token(queue: &Queue) -> Result<u64, String> {
    let sub = queue
        .adapter()
        .subscribe(&JobChannel::SPEC, 1)
        .await
        .map_err(|e| e.to_string())?;
    let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .map_err(|_| "no delivery".to_string())?
        .map_err(|e| e.to_string())?;
    std::mem::forget(sub);
    Ok(d.lease.token)
}

async fn subscribe(queue: &Queue, max_parallel: u32) -> Result<Box<dyn Subscription>, String> {
    let sub = queue
        .adapter()
        .subscribe(&JobChannel::SPEC, max_parallel)
        .await
        .map_err(|e| e.to_string())?;
    sub.take_ahead();
    Ok(sub)
}

/// The next delivery's job number and attempt, within 5 s.
async fn next_job(sub: &dyn Subscription) -> Result<(u32, u32, queue_core::Lease), String> {
    let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .map_err(|_| "no delivery within 5 s".to_string())?
        .map_err(|e| e.to_string())?;
    let job: Job = queue_core::codec::decode(&d.payload).map_err(|e| e.to_string())?;
    Ok((job.n, d.attempt, d.lease))
}

/// Produces job `n` on a task of its own.
fn spawn_job(
    queue: &Queue,
    n: u32,
) -> tokio::task::JoinHandle<Result<queue_core::Receipt, String>> {
    let queue = queue.clone();
    tokio::spawn(async move {
        Job::produce(&queue, Job { n })
            .await
            .map_err(|e| e.to_string())
    })
}

/// Waits for produces started by [`spawn_job`].
async fn confirmed(
    produces: impl IntoIterator<Item = tokio::task::JoinHandle<Result<queue_core::Receipt, String>>>,
) -> Result<(), String> {
    for p in produces {
        p.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Acks a delivery.
async fn ack(queue: &Queue, lease: &queue_core::Lease) -> Result<(), String> {
    queue
        .adapter()
        .settle(lease, Outcome::Ack)
        .await
        .map_err(|e| e.to_string())
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// A subscription waits with room; a message produced now is in its hands when the produce
/// is confirmed, after one sync for both, and a crash right then (the files as they are)
/// finds the delivery counted as an attempt. So are messages produced while it holds one
/// and while an earlier one's commit is pending.
fn lease_on_arrival() -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let copy = tempfile::tempdir().map_err(|e| e.to_string())?;
    let gate = Arc::new(Gate::default());
    runtime().block_on(async {
        let (_adapter, queue) = open_gated(dir.path(), &gate);
        let sub = subscribe(&queue, 4).await?;
        let before = gate.syncs();
        let receipt = Job::produce(&queue, Job { n: 7 })
            .await
            .map_err(|e| e.to_string())?;
        let synced = gate.syncs() - before;
        let Some(delivery) = sub.next().now_or_never() else {
            return Err("the message was not in the subscription's hands at its confirm".into());
        };
        let delivery = delivery.map_err(|e| e.to_string())?;
        if delivery.lease.id != receipt.id || delivery.attempt != 1 {
            return Err(format!(
                "delivered {} on attempt {}, produced {}",
                delivery.lease.id, delivery.attempt, receipt.id
            ));
        }
        if synced != 1 {
            return Err(format!("{synced} syncs for the produce and its delivery"));
        }
        copy_tree(dir.path(), copy.path()).map_err(|e| e.to_string())?;
        let (_crashed, after) = open_gated(copy.path(), &gate);
        let stored = after
            .peek(JobChannel::SPEC.name.as_ref(), 10)
            .await
            .map_err(|e| e.to_string())?;
        match &stored[..] {
            [m] if m.id == receipt.id && m.attempts == 1 => {}
            other => {
                return Err(format!(
                    "after a crash: {:?}",
                    other.iter().map(|m| (m.id, m.attempts)).collect::<Vec<_>>()
                ));
            }
        }
        // Two more while the subscription still holds the first, the second produced while
        // the first's commit is stalled: both are in its hands at their confirms.
        gate.set(true);
        let a = spawn_job(&queue, 8);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let b = spawn_job(&queue, 9);
        tokio::time::sleep(Duration::from_millis(20)).await;
        gate.set(false);
        confirmed([a, b]).await?;
        for n in [8, 9] {
            match sub.next().now_or_never() {
                Some(Ok(d)) if d.attempt == 1 => {}
                other => {
                    return Err(format!(
                        "job {n} was not in the subscription's hands at its confirm: {:?}",
                        other.map(|r| r.map(|d| d.attempt))
                    ));
                }
            }
        }
        Ok("one sync for the produce and its delivery; attempt 1 found after a crash".into())
    })
}

/// A subscription with one slot frees it while message A's commit is stalled, then B is
/// produced: B waits for A rather than being leased ahead of it. Then a batch whose second
/// message has the higher priority: it leaves first.
fn arrival_keeps_order() -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let gate = Arc::new(Gate::default());
    runtime().block_on(async {
        let (_adapter, queue) = open_gated(dir.path(), &gate);
        let sub = subscribe(&queue, 1).await?;
        Job::produce(&queue, Job { n: 0 })
            .await
            .map_err(|e| e.to_string())?;
        let (_, _, first) = next_job(&*sub).await?;
        gate.set(true);
        let a = spawn_job(&queue, 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Applied when called; durable behind A's commit.
        let _ = queue.adapter().settle(&first, Outcome::Ack).now_or_never();
        let b = spawn_job(&queue, 2);
        tokio::time::sleep(Duration::from_millis(20)).await;
        gate.set(false);
        confirmed([a, b]).await?;
        let (n, _, lease) = next_job(&*sub).await?;
        ack(&queue, &lease).await?;
        let (m, _, lease) = next_job(&*sub).await?;
        if (n, m) != (1, 2) {
            return Err(format!("delivered {n} then {m}, produced 1 then 2"));
        }
        ack(&queue, &lease).await?;
        // A batch whose later message has the higher priority: that one leaves first, as it
        // would from the ready messages.
        let job = |n: u32, priority: u8| queue_core::Outgoing {
            payload: queue_core::codec::encode(&Job { n }).expect("encodes"),
            dedup_key: None,
            delay: Duration::ZERO,
            priority,
            group: None,
        };
        queue
            .adapter()
            .produce(&JobChannel::SPEC, vec![job(3, 0), job(4, 9)])
            .await
            .map_err(|e| e.to_string())?;
        let (_, _, lease) = next_job(&*sub).await.and_then(|(n, a, l)| {
            if n == 4 {
                Ok((n, a, l))
            } else {
                Err(format!("delivered {n} (priority 0) before 4 (priority 9)"))
            }
        })?;
        ack(&queue, &lease).await?;
        Ok("1 then 2; of a batch, priority 9 before 0".into())
    })
}

/// A message is leased on arrival to a subscription that stops and goes away before the
/// commit is durable: it is given back, unattempted, and another subscription gets it.
fn arrival_to_a_stopped_subscription() -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let gate = Arc::new(Gate::default());
    runtime().block_on(async {
        let (_adapter, queue) = open_gated(dir.path(), &gate);
        let first = subscribe(&queue, 1).await?;
        gate.set(true);
        let produced = spawn_job(&queue, 5);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = queue
            .adapter()
            .subscribe(&JobChannel::SPEC, 1)
            .await
            .map_err(|e| e.to_string())?;
        first.stop().await;
        drop(first);
        gate.set(false);
        confirmed([produced]).await?;
        let (n, attempt, _) = next_job(&*second).await?;
        if (n, attempt) != (5, 1) {
            return Err(format!("delivered {n} on attempt {attempt}"));
        }
        Ok("given back and delivered to the other subscription on attempt 1".into())
    })
}

/// A worker process: prints the attempt of each poison delivery and aborts.
fn worker(url: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let queue = queue_runtime::connect(url).await.expect("connect");
        let _consumer = Poison::consumer(&queue)
            .deliveries(|d: Delivery<Poison>| async move {
                println!("SAW {}", d.attempt());
                let _ = std::io::stdout().flush();
                if d.attempt() > 0 {
                    std::process::abort();
                }
            })
            .await
            .expect("consume");
        println!("READY");
        let _ = std::io::stdout().flush();
        std::future::pending::<()>().await;
    });
}

/// Runs worker processes one after another until one sees nothing for 5 s; returns the
/// attempts the workers saw.
fn run_workers(url: &str, at_most: usize) -> Result<Vec<u32>, String> {
    let mut seen = Vec::new();
    for _ in 0..at_most {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("FAULTS_WORKER", url)
            .env("RUST_LOG", "off")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting a worker: {e}"))?;
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut ready_at = None;
        let mut saw = None;
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) if line == "READY" => ready_at = Some(Instant::now()),
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("SAW ") {
                        saw = a.parse::<u32>().ok();
                    }
                }
                Err(_) => {}
            }
            if child.try_wait().map_err(|e| e.to_string())?.is_some() {
                break;
            }
            if saw.is_none() && ready_at.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        for line in rx.try_iter() {
            if let Some(a) = line.strip_prefix("SAW ") {
                saw = a.parse::<u32>().ok();
            }
        }
        match saw {
            Some(a) => seen.push(a),
            None => return Ok(seen),
        }
    }
    Err(format!(
        "the poison message was handed out {at_most} times: attempts {seen:?}"
    ))
}

fn check_dead(queue: &Queue, rt: &tokio::runtime::Runtime) -> Result<String, String> {
    let dead = rt
        .block_on(queue.dead_letters(PoisonChannel::SPEC.name.as_ref(), 10))
        .map_err(|e| e.to_string())?;
    match &dead[..] {
        [d] if d.error == "worker lost on attempt 3 of 3" && d.attempts == 3 => Ok(d.error.clone()),
        other => Err(format!("dead letters: {other:?}")),
    }
}

fn poison_embedded() -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let url = format!("file://{}", dir.path().display());
    let rt = runtime();
    rt.block_on(async {
        let queue = queue_runtime::connect(&url)
            .await
            .map_err(|e| e.to_string())?;
        Poison::produce(&queue, Poison { n: 1 })
            .await
            .map_err(|e| e.to_string())?;
        queue.close().await.map_err(|e| e.to_string())
    })?;
    let seen = run_workers(&url, 6)?;
    if seen != [1, 2, 3] {
        return Err(format!("workers saw attempts {seen:?}, not 1, 2, 3"));
    }
    let queue = rt
        .block_on(queue_runtime::connect(&url))
        .map_err(|e| e.to_string())?;
    let error = check_dead(&queue, &rt)?;
    Ok(format!(
        "attempts {seen:?} in three aborted workers, then dead-lettered: {error:?}"
    ))
}

fn poison_broker() -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let mut broker = Command::new(env!("CARGO_BIN_EXE_queue-broker"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting queue-broker: {e}"))?;
    let result = (|| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("queue-broker did not start listening".to_string());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let url = format!("queue://127.0.0.1:{port}");
        let rt = runtime();
        let queue = rt
            .block_on(queue_runtime::connect(&url))
            .map_err(|e| e.to_string())?;
        rt.block_on(Poison::produce(&queue, Poison { n: 1 }))
            .map_err(|e| e.to_string())?;
        let seen = run_workers(&url, 6)?;
        if seen != [1, 2, 3] {
            let dead = rt.block_on(queue.dead_letters(PoisonChannel::SPEC.name.as_ref(), 10));
            let stats = rt.block_on(queue.stats());
            return Err(format!(
                "workers saw attempts {seen:?}, not 1, 2, 3; dead letters {dead:?}; stats {stats:?}"
            ));
        }
        let error = check_dead(&queue, &rt)?;
        Ok(format!(
            "attempts {seen:?} in three aborted workers, then dead-lettered: {error:?}"
        ))
    })();
    let _ = broker.kill();
    let _ = broker.wait();
    result
}
