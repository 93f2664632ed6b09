//! A malformed option value is one error; the other options still apply.

use queue_core::{Queue, QueueError, channel};
use serde::{Deserialize, Serialize};

#[channel("orders/placed", lease = "10", max_attempts = 5)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub id: u64,
}

async fn produce(queue: &Queue) -> Result<(), QueueError> {
    OrderPlaced::produce(queue, OrderPlaced { id: 1 }).await?;
    Ok(())
}

fn main() {
    let _ = produce;
}
