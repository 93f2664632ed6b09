//! The conformance suite against `nats://` on one real `nats-server`, each test in a fresh
//! namespace, and the tests of what crosses clients: several connections sharing a channel,
//! a client that joins late rebuilding the state from the stream.

mod conformance;
mod nats;

use std::sync::Arc;

use queue_core::{Queue, VirtualClock};
use queue_runtime::ConnectOptions;

async fn open(url: &str, clock: &VirtualClock) -> Queue {
    queue_runtime::connect_with(url, ConnectOptions::with_clock(Arc::new(clock.clone())))
        .await
        .expect("nats queue")
}

async fn single(clock: VirtualClock) -> (Queue, Box<dyn std::any::Any + Send>) {
    let url = nats::shared_single().url("");
    (open(&url, &clock).await, Box::new(()))
}

conformance_suite!(single);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_concurrency_holds_across_worker_connections() {
    let clock = VirtualClock::default();
    let url = nats::shared_single().url("");
    let mut queues = Vec::new();
    for _ in 0..3 {
        queues.push(open(&url, &clock).await);
    }
    conformance::flow::concurrency_holds_across_worker_connections(&queues).await;
    for q in queues {
        q.close().await.unwrap();
    }
}
