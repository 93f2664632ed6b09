//! `rate_per_group` whose window has an unknown unit.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("orders/placed", group = customer_id, rate_per_group = "5000/1x")]
#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    customer_id: u64,
}

fn main() {}
