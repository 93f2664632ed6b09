//! `Worker` running `#[consumer]` functions linked into this test binary.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use queue_core::{Dep, VirtualClock, channel, consumer};
use queue_runtime::{ConnectOptions, SetupProblem, Worker, WorkerError};
use serde::{Deserialize, Serialize};

#[channel("worker/emails", max_attempts = 2)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Email {
    pub to: String,
}

#[channel("worker/audit")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Audit {
    pub line: String,
}

/// A stand-in for a mail service: records what it sends.
#[derive(Debug, Default)]
pub struct Outbox {
    sent: Mutex<Vec<String>>,
}

/// A second dependency nobody provides in the setup test.
#[derive(Debug)]
pub struct AuditLog;

#[consumer(max_parallel = 2)]
async fn send_email(email: Email, outbox: Dep<Outbox>) -> Result<(), String> {
    if email.to.is_empty() {
        return Err("empty address".into());
    }
    outbox.sent.lock().push(email.to);
    Ok(())
}

#[consumer]
async fn write_audit(entry: Audit, outbox: Dep<Outbox>, _log: Dep<AuditLog>) {
    outbox.sent.lock().push(format!("audit: {}", entry.line));
}

async fn queue(name: &str) -> queue_core::Queue {
    let clock = Arc::new(VirtualClock::default());
    queue_runtime::connect_with(
        &format!("memory://{name}"),
        ConnectOptions::with_clock(clock),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_worker_runs_a_registered_consumer_with_its_dependency() {
    let queue = queue("worker-run").await;
    let outbox = Arc::new(Outbox::default());
    let worker = Worker::new(queue.clone())
        .provide_arc(outbox.clone())
        .only(["send_email"])
        .start()
        .await
        .unwrap();
    assert_eq!(worker.consumers().len(), 1);
    for to in ["a@example.com", "b@example.com"] {
        Email::produce(&queue, Email { to: to.into() })
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        while outbox.sent.lock().len() < 2 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("both emails sent");
    worker.shutdown().await;
    let mut sent = outbox.sent.lock().clone();
    sent.sort();
    assert_eq!(sent, vec!["a@example.com", "b@example.com"]);
    let stats = queue.stats().await.unwrap();
    assert_eq!(
        stats
            .iter()
            .find(|s| s.channel == "worker/emails")
            .unwrap()
            .acked,
        2
    );
}

#[tokio::test]
async fn missing_dependencies_are_all_reported_before_anything_is_consumed() {
    let queue = queue("worker-missing").await;
    Email::produce(
        &queue,
        Email {
            to: "a@example.com".into(),
        },
    )
    .await
    .unwrap();
    let err = Worker::new(queue.clone()).start().await.unwrap_err();
    let WorkerError::Setup(problems) = &err else {
        panic!("{err:?}")
    };
    let missing: Vec<(String, &str)> = problems
        .iter()
        .filter_map(|p| match p {
            SetupProblem::MissingDependency {
                consumer,
                type_name,
            } => Some((consumer.clone(), *type_name)),
            _ => None,
        })
        .collect();
    assert_eq!(missing.len(), 3, "{err}");
    assert!(
        missing
            .iter()
            .any(|(c, t)| c.ends_with("send_email") && t.ends_with("Outbox"))
    );
    assert!(
        missing
            .iter()
            .any(|(c, t)| c.ends_with("write_audit") && t.ends_with("AuditLog"))
    );
    let stats = queue.stats().await.unwrap();
    assert_eq!(stats[0].ready, 1, "nothing was taken");
    assert!(err.to_string().contains("Worker::provide"), "{err}");
}

#[tokio::test]
async fn an_unknown_selection_is_a_setup_error() {
    let queue = queue("worker-unknown").await;
    let err = Worker::new(queue)
        .provide(Outbox::default())
        .only(["send_sms"])
        .plan()
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("no consumer or channel named `send_sms`"),
        "{err}"
    );
}

#[tokio::test]
async fn shutdown_lets_the_next_worker_take_over() {
    let queue = queue("worker-handover").await;
    let outbox = Arc::new(Outbox::default());
    let first = Worker::new(queue.clone())
        .provide_arc(outbox.clone())
        .provide(AuditLog)
        .only(["write_audit"])
        .shutdown_grace(Duration::ZERO)
        .start()
        .await
        .unwrap();
    first.shutdown().await;
    Audit::produce(
        &queue,
        Audit {
            line: "after".into(),
        },
    )
    .await
    .unwrap();
    let second = Worker::new(queue.clone())
        .provide_arc(outbox.clone())
        .provide(AuditLog)
        .only(["worker/audit"])
        .start()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while outbox.sent.lock().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("handled by the second worker");
    assert_eq!(outbox.sent.lock()[0], "audit: after");
    second.shutdown().await;
}

#[tokio::test]
async fn a_worker_dashboard_shows_its_handlers_latency() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let queue = queue("worker-dashboard").await;
    let outbox = Arc::new(Outbox::default());
    let worker = Worker::new(queue.clone())
        .provide_arc(outbox.clone())
        .only(["send_email"])
        .dashboard("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .unwrap();
    let addr = worker.dashboard_addr().expect("the dashboard's address");
    for to in ["a@example.com", "b@example.com", "c@example.com"] {
        Email::produce(&queue, Email { to: to.into() })
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        while outbox.sent.lock().len() < 3 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the emails sent");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /api/overview HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    let overview: serde_json::Value = serde_json::from_str(body).unwrap();
    let emails = overview["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["channel"] == "worker/emails")
        .unwrap_or_else(|| panic!("{overview}"));
    assert_eq!(emails["acked"], 3, "{emails}");
    assert!(emails["latency"]["p50_ms"].is_f64(), "{emails}");
    assert!(emails["latency"]["p95_ms"].is_f64(), "{emails}");
    worker.shutdown().await;
}
