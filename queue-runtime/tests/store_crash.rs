//! Crash test: a child process produces and consumes on an embedded store and is killed
//! with SIGKILL at a random moment, again and again on the same directory. After each kill
//! the store is reopened and checked:
//!
//! - every produce that returned `Ok` is still stored or an ack was sent for it;
//! - every ack that returned `Ok` is gone for good;
//! - nothing is stored that was never produced.
//!
//! 50 cycles by default; `QUEUE_CRASH_CYCLES` sets another count. Runs without the libtest
//! harness: this binary is also the child (`QUEUE_CRASH_CHILD` names its directory).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use queue_core::{Adapter, ChannelSpec, Outcome, Outgoing, QueueError, codec};
use queue_runtime::SystemClock;
use queue_runtime::adapters::file::{FileAdapter, FileOptions};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Item {
    seq: u64,
    body: String,
}

fn spec() -> ChannelSpec {
    ChannelSpec::new("crash/items").max_attempts(1000)
}

fn options() -> FileOptions {
    FileOptions {
        segment_size: 256 * 1024,
        background_compaction: true,
        ..FileOptions::default()
    }
}

fn main() {
    if let Ok(dir) = std::env::var("QUEUE_CRASH_CHILD") {
        let start: u64 = std::env::var("QUEUE_CRASH_SEQ").unwrap().parse().unwrap();
        child(Path::new(&dir), start);
        return;
    }
    let cycles: u32 = std::env::var("QUEUE_CRASH_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(50);
    match parent(cycles) {
        Ok(summary) => {
            println!("{summary}");
            println!("1 passed, 0 failed");
        }
        Err(e) => {
            println!("crash test failed: {e}");
            println!("0 passed, 1 failed");
            std::process::exit(1);
        }
    }
}

/// The workload: producers and a consumer, printing each confirmed step.
fn child(dir: &Path, start: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let adapter = FileAdapter::open(dir, Arc::new(SystemClock), options()).expect("open");
        let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
        let say = {
            let out = out.clone();
            move |line: String| {
                let mut o = out.lock().unwrap();
                writeln!(o, "{line}").unwrap();
                o.flush().unwrap();
            }
        };
        say("READY".into());
        let mut tasks = Vec::new();
        for p in 0..3u64 {
            let adapter = adapter.clone();
            let say = say.clone();
            tasks.push(tokio::spawn(async move {
                let mut seq = start + p * 100_000;
                loop {
                    let n = if seq.is_multiple_of(7) { 3 } else { 1 };
                    let batch: Vec<Outgoing> = (seq..seq + n)
                        .map(|s| {
                            say(format!("I {s}"));
                            Outgoing {
                                payload: codec::encode(&Item {
                                    seq: s,
                                    body: "x".repeat((s % 300) as usize),
                                })
                                .unwrap(),
                                dedup_key: None,
                                delay: Duration::ZERO,
                                priority: 0,
                                group: None,
                            }
                        })
                        .collect();
                    let receipts = adapter.produce(&spec(), batch).await.expect("produce");
                    for (i, r) in receipts.iter().enumerate() {
                        say(format!("P {} {}", seq + i as u64, r.id.0));
                    }
                    seq += n;
                }
            }));
        }
        let consumer = {
            let adapter = adapter.clone();
            let say = say.clone();
            tokio::spawn(async move {
                let sub = adapter.subscribe(&spec(), 16).await.expect("subscribe");
                let mut i = 0u64;
                loop {
                    let d = sub.next().await.expect("delivery");
                    i += 1;
                    let outcome = match i % 10 {
                        0 => Outcome::Retry {
                            after: Some(Duration::ZERO),
                            error: "again".into(),
                        },
                        1 => Outcome::Release,
                        _ => Outcome::Ack,
                    };
                    let acked = outcome == Outcome::Ack;
                    if acked {
                        say(format!("a {}", d.lease.id.0));
                    }
                    adapter.settle(&d.lease, outcome).await.expect("settle");
                    if acked {
                        say(format!("A {}", d.lease.id.0));
                    }
                }
            })
        };
        let _ = consumer.await;
        for t in tasks {
            let _ = t.await;
        }
    });
}

#[derive(Default)]
struct Ledger {
    intended: HashSet<u64>,
    produced: HashMap<u64, u64>,
    /// Acks that were sent; they may or may not have been made durable.
    acking: HashSet<u64>,
    /// Acks that returned `Ok`.
    acked: HashSet<u64>,
}

fn parent(cycles: u32) -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut ledger = Ledger::default();
    let mut checked = 0u64;
    let began = Instant::now();
    for cycle in 0..cycles {
        let mut child = Command::new(&exe)
            .env("QUEUE_CRASH_CHILD", dir.path())
            .env(
                "QUEUE_CRASH_SEQ",
                (u64::from(cycle) * 1_000_000).to_string(),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line == "READY" {
                    let _ = ready_tx.send(());
                }
                lines.push(line);
            }
            lines
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| format!("cycle {cycle}: the child never became ready"))?;
        std::thread::sleep(Duration::from_millis(5 + fastrand::u64(..120)));
        child.kill().map_err(|e| e.to_string())?;
        child.wait().map_err(|e| e.to_string())?;
        let lines = reader.join().map_err(|_| "reader panicked".to_string())?;
        for line in &lines {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("I"), Some(seq), None) => {
                    ledger.intended.insert(seq.parse().unwrap());
                }
                (Some("P"), Some(seq), Some(id)) => {
                    ledger
                        .produced
                        .insert(seq.parse().unwrap(), id.parse().unwrap());
                }
                (Some("a"), Some(id), None) => {
                    ledger.acking.insert(id.parse().unwrap());
                }
                (Some("A"), Some(id), None) => {
                    ledger.acked.insert(id.parse().unwrap());
                }
                _ => {}
            }
        }
        checked += verify(dir.path(), &ledger).map_err(|e| format!("cycle {cycle}: {e}"))?;
    }
    Ok(format!(
        "crash test: {cycles} SIGKILL cycles in {:.1}s, {} produces and {} acks confirmed, {checked} message checks, 0 lost, 0 acked messages back, 0 unknown messages",
        began.elapsed().as_secs_f64(),
        ledger.produced.len(),
        ledger.acked.len()
    ))
}

/// Reopens the store and checks it against what the children confirmed.
fn verify(dir: &Path, ledger: &Ledger) -> Result<u64, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let options = FileOptions {
            background_compaction: false,
            ..options()
        };
        let adapter = FileAdapter::open(dir, Arc::new(SystemClock), options)
            .map_err(|e| format!("reopen: {e}"))?;
        let stored = match adapter.peek("crash/items", usize::MAX).await {
            Ok(s) => s,
            Err(QueueError::UnknownChannel(_)) => Vec::new(),
            Err(e) => return Err(e.to_string()),
        };
        let mut ids = HashSet::new();
        for m in &stored {
            let item: Item = codec::decode(&m.payload)
                .map_err(|e| format!("message {} does not decode: {e}", m.id))?;
            if !ledger.intended.contains(&item.seq) {
                return Err(format!(
                    "message {} carries seq {}, which was never produced",
                    m.id, item.seq
                ));
            }
            if let Some(&id) = ledger.produced.get(&item.seq)
                && id != m.id.0
            {
                return Err(format!(
                    "seq {} stored as {} but confirmed as {id}",
                    item.seq, m.id
                ));
            }
            if ledger.acked.contains(&m.id.0) {
                return Err(format!("message {} was acked but is stored again", m.id));
            }
            ids.insert(m.id.0);
        }
        for (seq, id) in &ledger.produced {
            if !ids.contains(id) && !ledger.acking.contains(id) {
                return Err(format!(
                    "lost: seq {seq} (id {id}) was confirmed, is neither stored nor acked"
                ));
            }
        }
        // Compact now and then, so that deletion and relocation are crashed into too.
        adapter
            .compact()
            .await
            .map_err(|e| format!("compact: {e}"))?;
        adapter.close().await.map_err(|e| e.to_string())?;
        Ok((stored.len() + ledger.produced.len() + ledger.acked.len()) as u64)
    })
}
