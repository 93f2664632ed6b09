//! The conformance suite against `file://`, each test on a fresh directory.

mod conformance;

use std::sync::Arc;

use queue_core::{Queue, VirtualClock};
use queue_runtime::ConnectOptions;

async fn file(clock: VirtualClock) -> (Queue, Box<dyn std::any::Any + Send>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("file://{}?segment_size=65536", dir.path().display());
    let queue = queue_runtime::connect_with(&url, ConnectOptions::with_clock(Arc::new(clock)))
        .await
        .expect("file queue");
    (queue, Box::new(dir))
}

conformance_suite!(file);
