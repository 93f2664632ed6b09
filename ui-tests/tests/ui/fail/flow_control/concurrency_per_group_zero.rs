//! `concurrency_per_group = 0` is refused: no group could ever run.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("orders/placed", group = customer_id, concurrency_per_group = 0)]
#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    customer_id: u64,
}

fn main() {}
