//! The conformance suite against `memory://`.

mod conformance;

use std::sync::Arc;

use queue_core::{Queue, VirtualClock};
use queue_runtime::ConnectOptions;

async fn memory(clock: VirtualClock) -> (Queue, Box<dyn std::any::Any + Send>) {
    let queue =
        queue_runtime::connect_with("memory://", ConnectOptions::with_clock(Arc::new(clock)))
            .await
            .expect("memory queue");
    (queue, Box::new(()))
}

conformance_suite!(memory);
