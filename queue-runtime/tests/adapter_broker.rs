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
    (queue, Box::new(Served { broker, _dir: dir }))
}

conformance_suite!(broker);
