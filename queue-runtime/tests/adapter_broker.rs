//! The conformance suite against `queue://`: a broker on the embedded store, in process, on
//! a loopback port, sharing the test's virtual clock.

mod conformance;

use std::sync::Arc;

use queue_core::{Queue, VirtualClock};
use queue_runtime::ConnectOptions;
use queue_runtime::adapters::file::{FileAdapter, FileOptions};
use queue_runtime::broker::{Broker, BrokerConfig};

struct Served {
    broker: Arc<Broker>,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.broker.shutdown();
    }
}

async fn broker(clock: VirtualClock) -> (Queue, Box<dyn std::any::Any + Send>) {
    let (queue, served, _) = serve(clock).await;
    (queue, served)
}

/// A broker and one client of it, with the broker's address for more.
async fn serve(
    clock: VirtualClock,
) -> (Queue, Box<dyn std::any::Any + Send>, std::net::SocketAddr) {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = FileOptions {
        segment_size: 1 << 16,
        ..FileOptions::default()
    };
    let adapter = FileAdapter::open(dir.path(), Arc::new(clock.clone()), options).expect("store");
    let broker = Broker::new(adapter, BrokerConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(broker.clone().serve_tcp(listener));
    let queue = queue_runtime::connect_with(
        &format!("queue://{addr}"),
        ConnectOptions::with_clock(Arc::new(clock)),
    )
    .await
    .expect("client");
    (queue, Box::new(Served { broker, _dir: dir }), addr)
}

conformance_suite!(broker);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_concurrency_holds_across_worker_connections() {
    let clock = VirtualClock::default();
    let (first, _served, addr) = serve(clock.clone()).await;
    let mut queues = vec![first];
    for _ in 0..2 {
        let options = ConnectOptions::with_clock(Arc::new(clock.clone()));
        queues.push(
            queue_runtime::connect_with(&format!("queue://{addr}"), options)
                .await
                .expect("client"),
        );
    }
    conformance::flow::concurrency_holds_across_worker_connections(&queues).await;
}
