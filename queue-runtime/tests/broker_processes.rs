//! Real processes around a real `queue-broker`:
//!
//! - three worker processes consume one channel; one is killed with SIGKILL while it holds
//!   messages, and the other two process every message;
//! - the broker is killed with SIGKILL while producers write through it, restarted on the
//!   same directory, and every produce it confirmed is still there;
//! - the broker is stopped with SIGTERM and restarted: its counters count on.
//!
//! Runs without the libtest harness: this binary is also the worker (`BROKER_TEST_WORKER`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use queue_core::{Channel as _, Queue, channel};
use serde::{Deserialize, Serialize};

#[channel("proc/jobs", lease = "30s")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub n: u32,
}

const JOBS: u32 = 240;

fn main() {
    if let Ok(url) = std::env::var("BROKER_TEST_WORKER") {
        worker(&url);
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut failed = 0;
    for (name, result) in [
        (
            "a_killed_worker_messages_go_to_the_other_workers",
            rt.block_on(killed_worker()),
        ),
        (
            "a_killed_broker_keeps_every_confirmed_produce",
            rt.block_on(killed_broker()),
        ),
        (
            "a_restarted_broker_keeps_its_counters",
            rt.block_on(restarted_broker_counters()),
        ),
    ] {
        match result {
            Ok(summary) => println!("test {name} ... ok ({summary})"),
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED: {e}");
            }
        }
    }
    println!("{} passed, {failed} failed", 3 - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}

/// A worker process: handles jobs slowly and prints `DONE n` for each.
fn worker(url: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let queue = queue_runtime::connect(url).await.expect("connect");
        let _consumer = Job::consumer(&queue)
            .max_parallel(4)
            .handle(|job: Job| async move {
                tokio::time::sleep(Duration::from_millis(15)).await;
                println!("DONE {}", job.n);
            })
            .await
            .expect("consume");
        println!("READY");
        std::future::pending::<()>().await;
    });
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Broker(Child);

impl Broker {
    fn start(data: &Path, port: u16) -> Result<Self, String> {
        let child = Command::new(env!("CARGO_BIN_EXE_queue-broker"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--data"])
            .arg(data)
            .args(["--segment-size", "1048576"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting queue-broker: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("queue-broker did not start listening".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Broker(child))
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Stops the broker with SIGTERM and waits for it to exit.
    fn stop(&mut self) -> Result<(), String> {
        let pid = self.0.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .map_err(|e| e.to_string())?;
        let status = self.0.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("queue-broker exited with {status} on SIGTERM"));
        }
        Ok(())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Worker {
    child: Child,
    done: Arc<Mutex<Vec<u32>>>,
}

impl Worker {
    fn start(url: &str) -> Result<Self, String> {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("BROKER_TEST_WORKER", url)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().unwrap();
        let done = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let seen = done.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line == "READY" {
                    let _ = ready_tx.send(());
                } else if let Some(n) = line.strip_prefix("DONE ") {
                    seen.lock().push(n.parse().unwrap());
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| "a worker never became ready".to_string())?;
        Ok(Worker { child, done })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn stats(queue: &Queue, channel: &str) -> queue_core::ChannelStats {
    queue
        .stats()
        .await
        .unwrap_or_default()
        .into_iter()
        .find(|s| s.channel == channel)
        .unwrap_or_default()
}

async fn killed_worker() -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let port = free_port();
    let _broker = Broker::start(dir.path(), port)?;
    let url = format!("queue://127.0.0.1:{port}");
    let queue = queue_runtime::connect(&url)
        .await
        .map_err(|e| e.to_string())?;
    let mut workers = vec![
        Worker::start(&url)?,
        Worker::start(&url)?,
        Worker::start(&url)?,
    ];
    Job::producer(&queue)
        .produce_batch((0..JOBS).map(|n| Job { n }))
        .await
        .map_err(|e| e.to_string())?;
    // Kill the first worker once it is well into its share (it always holds up to 4).
    let deadline = Instant::now() + Duration::from_secs(30);
    while workers[0].done.lock().len() < 10 {
        if Instant::now() > deadline {
            return Err("the first worker processed nothing".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let held = stats(&queue, "proc/jobs").await.in_flight;
    workers[0].kill();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = stats(&queue, "proc/jobs").await;
        if s.acked >= u64::from(JOBS) - 4 && s.ready == 0 && s.in_flight == 0 && s.delayed == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("the surviving workers did not finish: {s:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut done: BTreeMap<u32, usize> = BTreeMap::new();
    for w in &workers {
        for n in w.done.lock().iter() {
            *done.entry(*n).or_default() += 1;
        }
    }
    let missing: Vec<u32> = (0..JOBS).filter(|n| !done.contains_key(n)).collect();
    if !missing.is_empty() {
        return Err(format!("never processed: {missing:?}"));
    }
    let by_survivors: usize = workers[1..].iter().map(|w| w.done.lock().len()).sum();
    let again = done.values().filter(|c| **c > 1).count();
    Ok(format!(
        "{JOBS} jobs; the killed worker finished {} ({held} in flight across workers when it died); the survivors did {by_survivors}; {again} handled twice (killed between handler and ack)",
        workers[0].done.lock().len()
    ))
}

async fn killed_broker() -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let port = free_port();
    let mut broker = Broker::start(dir.path(), port)?;
    let url = format!("queue://127.0.0.1:{port}");
    let queue = queue_runtime::connect(&url)
        .await
        .map_err(|e| e.to_string())?;
    let confirmed: Arc<Mutex<BTreeMap<u32, u64>>> = Arc::default();
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut producers = Vec::new();
    for p in 0..16u32 {
        let queue = queue.clone();
        let confirmed = confirmed.clone();
        let failures = failures.clone();
        producers.push(tokio::spawn(async move {
            for i in 0..150u32 {
                let n = p * 1000 + i;
                match Job::produce(&queue, Job { n }).await {
                    Ok(r) => {
                        confirmed.lock().insert(n, r.id.0);
                    }
                    Err(e) => failures.lock().push(format!("{n}: {e}")),
                }
            }
        }));
    }
    while confirmed.lock().len() < 600 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    broker.kill();
    let at_kill = confirmed.lock().len();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _restarted = Broker::start(dir.path(), port)?;
    for p in producers {
        p.await.map_err(|e| e.to_string())?;
    }
    let confirmed = confirmed.lock().clone();
    let stored: BTreeSet<u64> = queue
        .peek("proc/jobs", 100_000)
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .map(|m| m.id.0)
        .collect();
    let lost: Vec<(&u32, &u64)> = confirmed
        .iter()
        .filter(|(_, id)| !stored.contains(id))
        .collect();
    if !lost.is_empty() {
        return Err(format!(
            "{} confirmed produces lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        ));
    }
    // A produce stored just before the kill but not confirmed is sent again under its key
    // after the restart, and answered from the key: nothing is stored twice. Only a produce
    // that failed outright may have left a message nobody confirmed.
    let failed = failures.lock().len();
    let extra = stored.len().saturating_sub(confirmed.len());
    if extra > failed {
        return Err(format!(
            "{} messages stored for {} confirmed produces and {failed} failed ones: produces were stored twice",
            stored.len(),
            confirmed.len()
        ));
    }
    Ok(format!(
        "{} produces confirmed ({at_kill} before the kill), all present after the restart and none stored twice; {failed} produces failed while the broker was down",
        confirmed.len(),
    ))
}

async fn restarted_broker_counters() -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let port = free_port();
    let url = format!("queue://127.0.0.1:{port}");
    let mut broker = Broker::start(dir.path(), port)?;
    {
        let queue = queue_runtime::connect(&url)
            .await
            .map_err(|e| e.to_string())?;
        for n in 0..10 {
            Job::produce(&queue, Job { n })
                .await
                .map_err(|e| e.to_string())?;
        }
        let sub = queue
            .adapter()
            .subscribe(&JobChannel::SPEC, 4)
            .await
            .map_err(|e| e.to_string())?;
        for _ in 0..4 {
            let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .map_err(|_| "no delivery".to_string())?
                .map_err(|e| e.to_string())?;
            queue
                .adapter()
                .settle(&d.lease, queue_core::Outcome::Ack)
                .await
                .map_err(|e| e.to_string())?;
        }
        sub.stop().await;
        queue.close().await.map_err(|e| e.to_string())?;
    }
    broker.stop()?;
    let _restarted = Broker::start(dir.path(), port)?;
    let queue = queue_runtime::connect(&url)
        .await
        .map_err(|e| e.to_string())?;
    let s = stats(&queue, "proc/jobs").await;
    let seen = (s.produced, s.acked, s.ready, s.in_flight);
    if seen != (10, 4, 6, 0) {
        return Err(format!(
            "after the restart: produced {}, acked {}, ready {}, in flight {}; expected 10, 4, 6, 0",
            seen.0, seen.1, seen.2, seen.3
        ));
    }
    Ok("produced 10, acked 4, ready 6 after the restart".into())
}
