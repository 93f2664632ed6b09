//! `rate_per_group` with nothing after the `/`.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("orders/placed", group = customer_id, rate_per_group = "100/")]
#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    customer_id: u64,
}

fn main() {}
