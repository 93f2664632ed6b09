//! A per-group limit above the channel's limit can never be reached.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("orders/placed", group = customer_id, concurrency = 4, concurrency_per_group = 8)]
#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    customer_id: u64,
}

fn main() {}
