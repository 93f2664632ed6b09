//! A `group` field whose type cannot name a group (`f64`) is one error, at the field's name
//! in the attribute, and the channel's uses still compile.

use queue_core::{Channel, Message, Queue, QueueError, channel};
use serde::{Deserialize, Serialize};

#[channel("orders/priced", group = price)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderPriced {
    pub order_id: u64,
    pub price: f64,
}

async fn produce(queue: &Queue) -> Result<(), QueueError> {
    let order = OrderPriced {
        order_id: 1,
        price: 9.5,
    };
    let _ = order.group();
    OrderPriced::produce(queue, order).await?;
    let _ = OrderPricedChannel::SPEC.concurrency_per_group;
    Ok(())
}

fn main() {
    let _ = produce;
}
