//! A rate written as a number rather than a `count/window` string.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("orders/placed", rate = 100)]
#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    customer_id: u64,
}

fn main() {}
