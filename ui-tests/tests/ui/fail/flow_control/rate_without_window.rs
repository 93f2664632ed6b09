//! A rate without its window: the `count/window` form is suggested.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("orders/placed", rate = "100")]
#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    customer_id: u64,
}

fn main() {}
