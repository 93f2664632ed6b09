//! The conformance suite against `nats://` on a cluster of three real `nats-server`s on
//! loopback, with every stream kept on three replicas (`?replicas=3`), each test in a fresh
//! namespace, snapshotting every 16 commands.

mod conformance;
mod nats;

use std::sync::Arc;

use queue_core::{Queue, VirtualClock};
use queue_runtime::ConnectOptions;

async fn cluster(clock: VirtualClock) -> (Queue, Box<dyn std::any::Any + Send>) {
    // Small snapshot intervals: every case with more than 16 commands stores snapshots and
    // purges its stream while it runs.
    let url = nats::shared_cluster().url("replicas=3&compact_every=16");
    let queue = queue_runtime::connect_with(&url, ConnectOptions::with_clock(Arc::new(clock)))
        .await
        .expect("nats cluster queue");
    (queue, Box::new(()))
}

conformance_suite!(cluster);
