//! `group` naming a field the struct does not have is one error with a suggestion, and the
//! channel's uses still compile.

use queue_core::{Channel, Message, Queue, QueueError, channel};
use serde::{Deserialize, Serialize};

#[channel("orders/placed", group = custmer_id)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub customer_id: u64,
}

async fn produce(queue: &Queue) -> Result<(), QueueError> {
    let order = OrderPlaced { customer_id: 1 };
    let _ = order.group();
    OrderPlaced::produce(queue, order).await?;
    let _ = OrderPlacedChannel::SPEC.concurrency_per_group;
    Ok(())
}

fn main() {
    let _ = produce;
}
